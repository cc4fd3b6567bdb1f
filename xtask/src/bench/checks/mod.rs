//! `cargo xtask bench checks`: synthetic HTTP checks against a local target, as probes per
//! CPU-second of the sensor next to prometheus-blackbox-exporter probing the same target at the
//! same offered rate (rounds alternate in one run), plus the daemon's RSS with 1,000 checks.
//!
//! Only the prober's own CPU counts (utime + stime of its process from /proc/PID/stat): the
//! target and the driver that asks blackbox_exporter for probes live in this process and are
//! reported separately.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    bench::kit::stats,
    bench::kit::{
        clk_tck, command_text, cpu_seconds, find_in_path, loadavg, metric_sum, mib, pid_cpu, rss_kib, wait_http_ok,
        Served,
    },
    bench::report::{demote_headings, machine, store, Goal, Row},
    net::{free_port, stop_child},
};

const BLACKBOX: &str = "prometheus-blackbox-exporter";
const BLACKBOX_CONFIG: &str = "modules:
  http_2xx:
    prober: http
    timeout: 2s
    http:
      valid_status_codes: [200]
      preferred_ip_protocol: ip4
";
/// What the target answers to every request.
const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n";
/// Server threads of the target (blocking accept on one shared listener).
const TARGET_THREADS: usize = 4;
/// Time a freshly started prober runs before its window opens.
const WARMUP: Duration = Duration::from_secs(2);

#[derive(clap::Args, Debug, Clone)]
#[group(id = "bench_checks_opts")]
pub struct Opts {
    /// Sensor and blackbox_exporter measurements each (alternating).
    #[arg(long = "checks-rounds", default_value_t = 5)]
    rounds: usize,
    /// Seconds per measurement window.
    #[arg(long = "checks-seconds", default_value_t = 5.0)]
    seconds: f64,
    /// Checks in the sensor's config; also the number of driver workers for blackbox_exporter.
    #[arg(long, default_value_t = 50)]
    checks: usize,
    /// Offered probes per second, the same for both (each check's interval is checks / rate).
    #[arg(long = "checks-rate", default_value_t = 1000.0)]
    rate: f64,
    /// Checks for the RSS measurement (interval 10s).
    #[arg(long, default_value_t = 1000)]
    rss_checks: usize,
    /// Seconds the RSS measurement waits before reading /proc/PID/status.
    #[arg(long, default_value_t = 25.0)]
    rss_wait: f64,
    /// Also measure the static build (`cargo xtask dist`: musl with mimalloc, what the image
    /// ships) in the same rounds and the same RSS runs, side by side with the glibc build.
    #[arg(long = "static")]
    pub with_static: bool,
}

impl Opts {
    pub fn quick(&mut self) {
        self.rounds = 1;
        self.seconds = 2.0;
        self.rss_checks = 100;
        self.rss_wait = 5.0;
    }
}

mod measure;
mod probers;
mod report;
mod target;

use {measure::*, probers::*, report::*, target::*};

// ---------------------------------------------------------------------------------------------
// Setup.

fn ensure_blackbox() -> Result<PathBuf> {
    // `cargo xtask bench` installs the bench dependencies (xtask/src/deps.rs) first.
    find_in_path(BLACKBOX).with_context(|| format!("{BLACKBOX} not installed (cargo xtask deps --bench)"))
}

/// `sensor` is the glibc release build; `sensor_static` the static one, measured alongside.
pub fn run(root: &Path, sensor: &Path, sensor_static: Option<&Path>, o: &Opts) -> Result<()> {
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if o.rounds == 0 || o.checks == 0 || o.rss_checks == 0 || !positive(o.rate) || !positive(o.seconds) {
        bail!("--checks-rounds, --checks, --rss-checks, --checks-rate and --checks-seconds must be positive");
    }
    eprintln!("==> bench checks on {}", machine());
    let blackbox = ensure_blackbox()?;
    let bb_version = command_text(Command::new(&blackbox).arg("--version"))
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    eprintln!("==> using {} ({bb_version})", blackbox.display());
    let dir = root.join("target/bench-checks");
    std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let target = Target::start()?;
    eprintln!(
        "==> target {} ({TARGET_THREADS} threads, 200 + 3-byte body, Connection: close)",
        target.url()
    );
    let interval = Duration::from_secs_f64(o.checks as f64 / o.rate);
    let sensor_yaml = dir.join("sensor.yaml");
    std::fs::write(&sensor_yaml, sensor_config(&target.url(), o.checks, interval))
        .with_context(|| format!("write {}", sensor_yaml.display()))?;
    std::fs::write(dir.join("blackbox.yml"), BLACKBOX_CONFIG).context("write blackbox.yml")?;
    let env = Env {
        sensor: sensor.to_path_buf(),
        sensor_static: sensor_static.map(Path::to_path_buf),
        blackbox,
        dir: dir.clone(),
        target,
    };

    let sensors: Vec<Prober> = std::iter::once(Prober::Sensor)
        .chain(sensor_static.map(|_| Prober::SensorStatic))
        .collect();
    // Every prober must succeed against the target before anything is timed.
    let one = dir.join("sensor-check-1.yaml");
    std::fs::write(&one, sensor_config(&env.target.url(), 1, interval))?;
    for &p in &sensors {
        let out = Command::new(env.bin(p)?)
            .arg("check")
            .arg("--config")
            .arg(&one)
            .arg("--json")
            .output()
            .context("run sensor check")?;
        if !out.status.success() {
            bail!(
                "{} check against the target failed: {}{}",
                p.name(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        eprintln!(
            "==> {} check: {}",
            p.name(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }

    eprintln!(
        "==> throughput: {} rounds x ({}, blackbox_exporter), {:.1} s windows after {:.0} s warm-up, \
         offered {:.0} probes/s ({} checks every {:?} / {} driver workers)",
        o.rounds,
        sensors.iter().map(|p| p.name()).collect::<Vec<_>>().join(", "),
        o.seconds,
        WARMUP.as_secs_f64(),
        o.rate,
        o.checks,
        interval,
        o.checks
    );
    let load_start = loadavg();
    let mut samples: Vec<Sample> = Vec::new();
    for round in 1..=o.rounds {
        for &prober in sensors.iter().chain([&Prober::Blackbox]) {
            let s = match prober {
                Prober::Blackbox => measure_blackbox(&env, o, round)?,
                _ => measure_sensor(&env, o, round, prober)?,
            };
            eprintln!(
                "round {round}/{} {:<17} {:>7.0} probes/s ({} ok, {} failed), CPU {:>5.1}% -> {:>6.0} probes/CPU-s; \
                 target {:.1}% CPU, {} requests",
                o.rounds,
                prober.name(),
                s.rate(),
                s.ok,
                s.failed,
                s.cpu_pct(),
                s.per_cpu(),
                100.0 * s.target_cpu / s.secs,
                s.target_requests
            );
            samples.push(s);
            // Let the previous prober's sockets and threads go before the next one starts.
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    eprintln!(
        "==> RSS: 1 check and {} checks (interval 10s), {:.0} s each",
        o.rss_checks, o.rss_wait
    );
    let mut rss = Vec::new();
    for &p in &sensors {
        for n in [1, o.rss_checks] {
            let r = measure_rss(&env, p, n, o.rss_wait)?;
            eprintln!(
                "{:<15} {n:>5} checks: VmRSS {:.1} MiB, VmHWM {:.1} MiB, {} runs ok, {} failed, CPU {:.2}% over {:.0} s",
                p.name(),
                mib(r.rss_kib),
            mib(r.hwm_kib),
                r.ok,
                r.failed,
                100.0 * r.cpu / r.secs,
                r.secs
            );
            rss.push(r);
        }
    }

    let load = [load_start, loadavg()];
    let report = render(o, &bb_version, interval, &samples, &rss, load);
    println!("{report}");
    summary(o, &samples, &rss);
    // The document's title and preamble give way to the report's section heading.
    let body = report
        .split_once("\n\nMachine: ")
        .map_or(report.clone(), |(_, rest)| format!("Machine: {rest}"));
    store(
        root,
        "checks",
        &machine(),
        &summary_rows(samples.as_slice(), &rss),
        &demote_headings(&body),
    )
}
