//! `cargo xtask soak --minutes N`: the release daemon under sustained churn, then exact
//! accounting and a leak check.
//!
//! Load, all at once for the whole run: memory cgroups created and removed a few times a second
//! with a process in each; an OOM kill every few seconds in the soak's own small memory cgroups;
//! a connect load with storms against a listener and a refused port inside a network namespace
//! of its own; a check target whose status flaps; a `/metrics` scrape every second. At the end:
//! kills caused (the cgroups' own kernel counters) = kills counted, connects made = connects
//! counted per result, and the daemon's RSS, open fds and threads flat after warm-up
//! (least-squares slope). Writes docs/soak.md. Holds the machine-wide kernel lock throughout:
//! it causes OOM kills.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    kit::cgroup::Cgroup as Cg,
    kit::promtext::sum as metric_sum,
    net::{free_port, http_get, loopback, stop_child},
    step,
};

/// Ports inside the load's own network namespace.
const PORT_OK: u16 = 15432;
const PORT_REFUSED: u16 = 15433;
/// Memory limit of the cgroups where the OOM kills happen.
const OOM_LIMIT: u64 = 32 << 20;
const OOM_CGROUPS: usize = 3;
const OOM_EVERY: Duration = Duration::from_secs(3);
/// A new churn cgroup this often (300 a minute); at most `CHURN_LIVE` exist at a time.
const CHURN_EVERY: Duration = Duration::from_millis(200);
const CHURN_LIVE: usize = 10;
/// The check target's status flips this often.
const FLAP_EVERY: Duration = Duration::from_secs(15);
/// Limits for "flat": growth over the measured part of the run, from the fitted slope.
const MAX_RSS_GROWTH_MIB_PER_MIN: f64 = 0.5;
/// Fitted RSS growth below this is allocator granularity, not a trend (measured: 2-minute runs
/// whose one measured minute moved 0.5 MiB fit +0.25 and +0.40 MiB/min; 10-minute runs fit
/// +0.16): a short run is held to this much growth over its measured window instead.
const RSS_NOISE_MIB: f64 = 1.0;
const MAX_FD_GROWTH_PER_MIN: f64 = 0.5;

#[derive(clap::Args)]
pub struct Opts {
    /// Length of the run; the first fifth (at least 60 s, at most 5 minutes) is warm-up.
    #[arg(long, default_value_t = 10.0)]
    pub minutes: f64,
    /// Where the report goes.
    #[arg(long, default_value = "docs/soak.md")]
    pub report: PathBuf,
}

mod findings;
mod load;

use findings::*;
pub use load::load;
use load::*;

fn config(path: &Path, flap_port: u16, journal: &Path) -> Result<()> {
    let journal = journal.display();
    let text = format!(
        "probes:\n  tcp:\n    destinations:\n      soak_ok: \"127.0.0.1/32:{PORT_OK}\"\n      soak_refused: \"127.0.0.1/32:{PORT_REFUSED}\"\n\
         # Vanished churn cgroups leave the label sets after 30 s, so the run reaches its steady\n\
         # state within the warm-up (the default keeps them 15 minutes).\n\
         limits: {{workloads_per_metric: 1000, vanished_grace: 30s}}\n\
         journal: {{path: {journal}}}\n\
         alerting: {{availability_threshold: 0.8, window: 20s}}\n\
         checks:\n  - name: soak-flap\n    type: http\n    url: http://127.0.0.1:{flap_port}/\n    interval: 1s\n    timeout: 1s\n"
    );
    fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

fn start_daemon(bin: &Path, cfg: &Path, port: u16, log: &Path) -> Result<Child> {
    let log_file = fs::File::create(log)?;
    let mut child = Command::new(bin)
        .arg("run")
        .arg("--config")
        .arg(cfg)
        .args(["--listen", &loopback(port).to_string()])
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    let t = Instant::now();
    while !matches!(http_get(loopback(port), "/readyz"), Ok((200, _))) {
        if let Ok(Some(st)) = child.try_wait() {
            bail!("the daemon exited ({st}) before it was ready; see {}", log.display());
        }
        if t.elapsed() > Duration::from_secs(60) {
            stop_child(child, libc::SIGKILL);
            bail!("the daemon was not ready within 60 s; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(child)
}

/// The event journal's count of OOM kills in the soak's cgroups, read back with `sensor
/// events --since 0` (the journal reader, no probes loaded) once the daemon has exited;
/// `None` when it could not be read (the report then says so and the run fails).
fn journal_kills(bin: &Path, journal: &Path, cgroups: &[String]) -> Option<u64> {
    let out = Command::new(bin)
        .args(["events", "--since", "0", "--journal.path"])
        .arg(journal)
        .stderr(Stdio::inherit())
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("    sensor events --since 0 failed: {}", out.status);
        return None;
    }
    let kills = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["type"] == "oom_kill")
        .filter(|e| e["cgroup"].as_str().is_some_and(|c| cgroups.iter().any(|r| r == c)))
        .count();
    Some(kills as u64)
}

fn branch() -> String {
    crate::output(Command::new("git").args(["rev-parse", "--abbrev-ref", "HEAD"]))
        .map(|b| b.trim().replace(|c: char| !c.is_ascii_alphanumeric(), "-"))
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "detached".into())
}

pub fn run(root: &Path, bin: &Path, opts: &Opts) -> Result<()> {
    let total = Duration::from_secs_f64(opts.minutes.max(0.5) * 60.0);
    // RSS settles about a minute in (measured: +1.5 MiB from 30 s to 120 s, +0.3 from 60 s).
    let warmup = (total / 5).clamp(Duration::from_secs(60), Duration::from_secs(300));
    let _lock = crate::bench::kit::KernelLock::acquire("soak")?;
    let dir = root.join("target/soak");
    fs::create_dir_all(&dir)?;
    let parent = Cg::under_own(&format!("sensor-soak-{}-{}", branch(), std::process::id()), None)?;
    let oom: Vec<Cg> = (0..OOM_CGROUPS)
        .map(|i| parent.child(&format!("oom-{i}"), Some(OOM_LIMIT)))
        .collect::<std::io::Result<_>>()?;
    let load_cg = parent.child("connect", None)?;
    let churn_parent = parent.child("churn", None)?;
    if churn_parent.v2 {
        fs::write(churn_parent.dir.join("cgroup.subtree_control"), "+memory")?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (flap_port, flap) = flapping_server(Arc::clone(&stop))?;
    let cfg = dir.join("soak.yaml");
    let journal = dir.join("journal");
    // A fresh journal: the kills it holds at the end are this run's.
    let _ = fs::remove_dir_all(&journal);
    config(&cfg, flap_port, &journal)?;
    let port = free_port()?;
    let host_before = crate::kit::host::vmstat_oom_kill();
    step(&format!(
        "soak: {:.1} minutes (warm-up {} s), cgroups under {}",
        opts.minutes,
        warmup.as_secs(),
        parent.dir.display()
    ));
    let daemon = start_daemon(bin, &cfg, port, &dir.join("sensor.log"))?;
    let pid = daemon.id();
    let last = Arc::new(Mutex::new(Connects::default()));
    let (mut load, load_reader) = start_load(&load_cg, Arc::clone(&last))?;
    let made_cgroups = AtomicU64::new(0);
    let victims = AtomicU64::new(0);
    let t0 = Instant::now();
    let mut samples = Vec::new();
    let (mut scrapes, mut scrape_failures, mut flaps) = (0u64, 0u64, 0u64);
    let mut check_up: Option<f64> = None;
    let mut last_text = String::new();
    let bg = std::thread::scope(|s| -> Result<()> {
        let churner = s.spawn(|| churn(&churn_parent, &stop, &made_cgroups));
        let killer = s.spawn(|| oom_kills(&oom, &stop, &victims));
        let mut progress = Instant::now();
        while t0.elapsed() < total {
            let tick = Instant::now();
            scrapes += 1;
            match http_get(loopback(port), "/metrics") {
                Ok((200, text)) => {
                    let up = metric_sum(&text, "sensor_check_up", &[("check", "soak-flap")]);
                    if check_up.is_some_and(|u| u != up) {
                        flaps += 1;
                    }
                    check_up = Some(up);
                    last_text = text;
                }
                _ => scrape_failures += 1,
            }
            if let Some(x) = sample(pid, t0.elapsed().as_secs_f64()) {
                samples.push(x);
            }
            if progress.elapsed() >= Duration::from_secs(10) {
                progress = Instant::now();
                let c = *last.lock().unwrap_or_else(|p| p.into_inner());
                let counted = metric_sum(&last_text, "sensor_oom_kills_total", &[]);
                let x = samples.last().copied();
                eprintln!(
                    "    soak {:>5.0}s  kills {} (counted {counted}), connects ok {} refused {}, cgroups {}, \
                     rss {:.1} MiB, fds {}, threads {}, scrapes {scrapes} ({scrape_failures} failed), flips {flaps}",
                    t0.elapsed().as_secs_f64(),
                    victims.load(Ordering::Relaxed),
                    c.ok,
                    c.refused,
                    made_cgroups.load(Ordering::Relaxed),
                    x.map_or(0.0, |x| x.rss_kib as f64 / 1024.0),
                    x.map_or(0, |x| x.fds),
                    x.map_or(0, |x| x.threads),
                );
            }
            std::thread::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed()));
        }
        stop.store(true, Ordering::Relaxed);
        churner
            .join()
            .map_err(|_| anyhow::anyhow!("the churn thread panicked"))??;
        killer
            .join()
            .map_err(|_| anyhow::anyhow!("the OOM thread panicked"))??;
        Ok(())
    });
    // End the load: it prints its totals when its stdin closes.
    drop(load.stdin.take());
    let load_status = load.wait()?;
    let _ = load_reader.join();
    let _ = flap.join();
    bg?;
    if !load_status.success() {
        bail!("the connect load failed: {load_status}");
    }
    // Counters are read from the kernel at scrape time; one more scrape sees the last connects.
    std::thread::sleep(Duration::from_secs(2));
    let (_, text) = http_get(loopback(port), "/metrics").context("the final scrape")?;
    let made = *last.lock().unwrap_or_else(|p| p.into_inner());
    let conn = |result: &str, dest: &str| {
        metric_sum(
            &text,
            "sensor_tcp_connects_total",
            &[("result", result), ("destination", dest), ("cgroup", &load_cg.rel)],
        ) as u64
    };
    let oom_rels: Vec<String> = oom.iter().map(|c| c.rel.clone()).collect();
    let findings = Findings {
        minutes: opts.minutes,
        warmup_secs: warmup.as_secs_f64(),
        kills_caused: oom.iter().map(Cg::kernel_oom_kills).sum(),
        kills_seen_by_load: victims.load(Ordering::Relaxed),
        kills_counted: oom_rels
            .iter()
            .map(|r| metric_sum(&text, "sensor_oom_kills_total", &[("cgroup", r)]) as u64)
            .sum(),
        kills_journaled: None,
        host_kills: crate::kit::host::vmstat_oom_kill() - host_before,
        made,
        counted: Connects {
            ok: conn("success", "soak_ok"),
            refused: conn("refused", "soak_refused"),
            other: 0,
        },
        recursion_misses: metric_sum(
            &text,
            "sensor_events_lost_total",
            &[("probe", "tcp"), ("reason", "recursion")],
        ) as u64,
        untracked: metric_sum(
            &text,
            "sensor_events_lost_total",
            &[("probe", "tcp"), ("reason", "untracked")],
        ) as u64,
        cgroups_churned: made_cgroups.load(Ordering::Relaxed),
        scrapes,
        scrape_failures,
        flaps,
        samples,
        exit: None,
    };
    let exit = {
        // SAFETY: kill(2) on the daemon, our own child.
        unsafe { libc::kill(pid as i32, libc::SIGINT) };
        let mut d = daemon;
        let t = Instant::now();
        loop {
            if let Some(st) = d.try_wait()? {
                break st.code();
            }
            if t.elapsed() > Duration::from_secs(20) {
                stop_child(d, libc::SIGKILL);
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let kills_journaled = journal_kills(bin, &journal, &oom_rels);
    let findings = Findings {
        exit,
        kills_journaled,
        ..findings
    };
    let report = findings.report();
    println!("{report}");
    let path = root.join(&opts.report);
    fs::write(&path, format!("# Soak\n\nGenerated by `cargo xtask soak`.\n\n{report}"))
        .with_context(|| format!("write {}", path.display()))?;
    step(&format!("wrote {}", path.display()));
    let failures = findings.failures();
    if !failures.is_empty() {
        bail!("soak failed: {}", failures.join("; "));
    }
    Ok(())
}
