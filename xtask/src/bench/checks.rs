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

// ---------------------------------------------------------------------------------------------
// The target: a fixed 200 to every request, one request per connection.

struct Target {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    tids: Arc<Mutex<Vec<i64>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Target {
    fn start() -> Result<Target> {
        let l = TcpListener::bind("127.0.0.1:0").context("bind the target")?;
        // SAFETY: valid listening fd; a deeper backlog than std's 128.
        unsafe { libc::listen(l.as_raw_fd(), 4096) };
        let addr = l.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let tids = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for _ in 0..TARGET_THREADS {
            let l = l.try_clone()?;
            let (stop, served, tids) = (Arc::clone(&stop), Arc::clone(&served), Arc::clone(&tids));
            threads.push(std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::syscall(libc::SYS_gettid) };
                tids.lock().unwrap_or_else(|p| p.into_inner()).push(tid);
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((s, _)) = l.accept() {
                        if serve(s) {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        Ok(Target {
            addr,
            stop,
            served,
            tids,
            threads,
        })
    }

    fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// CPU seconds of the server threads so far.
    fn cpu(&self) -> f64 {
        let tids = self.tids.lock().unwrap_or_else(|p| p.into_inner()).clone();
        tids.iter()
            .filter_map(|t| cpu_seconds(&format!("/proc/self/task/{t}/stat")).ok())
            .sum()
    }

    fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Each blocked accept needs a connection to notice the flag.
        for _ in 0..self.threads.len() {
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Reads the request head and answers 200; the server closes first, so TIME_WAIT stays on its
/// side and the probers' ephemeral ports are free again at once.
fn serve(mut s: TcpStream) -> bool {
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 2048];
    let mut have = 0;
    loop {
        match s.read(&mut buf[have..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => have += n,
        }
        if buf[..have].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
        if have == buf.len() {
            return false;
        }
    }
    s.write_all(RESPONSE).is_ok()
}

// ---------------------------------------------------------------------------------------------
// HTTP clients: one-shot (metrics, readiness) and keep-alive (the blackbox driver).

/// One persistent HTTP/1.1 connection.
struct KeepAlive {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

impl KeepAlive {
    fn new(addr: SocketAddr) -> KeepAlive {
        KeepAlive { addr, conn: None }
    }

    fn get(&mut self, path: &str) -> Result<(u16, Vec<u8>)> {
        let r = self.try_get(path);
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    fn try_get(&mut self, path: &str) -> Result<(u16, Vec<u8>)> {
        if self.conn.is_none() {
            let s = TcpStream::connect(self.addr)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            self.conn = Some(BufReader::new(s));
        }
        let conn = self.conn.as_mut().context("no connection")?;
        write!(conn.get_mut(), "GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.addr)?;
        let mut line = String::new();
        conn.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("bad status line {line:?}"))?;
        let (mut len, mut chunked, mut close) = (None, false, false);
        loop {
            line.clear();
            if conn.read_line(&mut line)? == 0 {
                bail!("connection closed in the headers");
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
                match k.as_str() {
                    "content-length" => len = v.parse::<usize>().ok(),
                    "transfer-encoding" => chunked = v.contains("chunked"),
                    "connection" => close = v.contains("close"),
                    _ => {}
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                conn.read_line(&mut line)?;
                let hex = line.trim().split(';').next().unwrap_or("");
                let n = usize::from_str_radix(hex, 16).with_context(|| format!("bad chunk size {line:?}"))?;
                if n == 0 {
                    // Trailers, then the empty line.
                    loop {
                        line.clear();
                        if conn.read_line(&mut line)? == 0 || line.trim().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let start = body.len();
                body.resize(start + n, 0);
                conn.read_exact(&mut body[start..])?;
                let mut crlf = [0u8; 2];
                conn.read_exact(&mut crlf)?;
            }
        } else if let Some(n) = len {
            body.resize(n, 0);
            conn.read_exact(&mut body)?;
        } else {
            conn.read_to_end(&mut body)?;
            close = true;
        }
        if close {
            self.conn = None;
        }
        Ok((status, body))
    }
}

// ---------------------------------------------------------------------------------------------
// The two probers.

fn sensor_config(target: &str, checks: usize, interval: Duration) -> String {
    let mut cfg =
        String::from("probes: {oom: {enabled: false}, memcg: {enabled: false}, tcp: {enabled: false}}\nchecks:\n");
    let interval = format!("{}us", interval.as_micros().max(1));
    for i in 0..checks {
        cfg.push_str(&format!(
            "  - {{name: c{i}, type: http, url: \"{target}\", interval: {interval}, timeout: 2s}}\n"
        ));
    }
    cfg
}

/// `sensor run --config FILE` (the shared [`Served`] daemon) and its check counters.
struct Sensor(Served);

impl Sensor {
    fn start(bin: &Path, config: &Path, log: &Path) -> Result<Sensor> {
        let config = config.to_str().context("config path is not UTF-8")?;
        Served::sensor(bin, &["--config", config], log).map(Sensor)
    }

    fn pid(&self) -> u32 {
        self.0.pid()
    }

    /// `sensor_check_runs_total` summed over checks: (success, failure).
    fn runs(&self) -> Result<(u64, u64)> {
        let body = self.0.metrics()?;
        let ok = metric_sum(&body, "sensor_check_runs_total", &[("result", "success")]);
        let failed = metric_sum(&body, "sensor_check_runs_total", &[("result", "failure")]);
        Ok((ok as u64, failed as u64))
    }
}

#[derive(Default)]
struct DriverCounts {
    ok: AtomicU64,
    /// probe_success 0.
    failed: AtomicU64,
    /// No answer from the exporter, or not a 200.
    errors: AtomicU64,
}

impl DriverCounts {
    fn snapshot(&self) -> [u64; 3] {
        [
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        ]
    }
}

struct Blackbox {
    child: Option<Child>,
    stop: Arc<AtomicBool>,
    counts: Arc<DriverCounts>,
    workers: Vec<JoinHandle<()>>,
}

impl Blackbox {
    /// Starts the exporter and `workers` driver threads that together ask for `rate` probes/s.
    fn start(bin: &Path, config: &Path, log: &Path, target: &str, workers: usize, rate: f64) -> Result<Blackbox> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let log = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let mut child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        if let Err(e) = wait_http_ok(addr, "/metrics", &mut child, "blackbox_exporter") {
            stop_child(child, libc::SIGKILL);
            return Err(e);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(DriverCounts::default());
        let path = format!("/probe?target={target}&module=http_2xx");
        // Each worker is one "check": a request every `period`, phases spread over the period.
        let period = Duration::from_secs_f64(workers as f64 / rate);
        let start = Instant::now();
        let mut handles = Vec::new();
        for i in 0..workers {
            let (stop, counts, path) = (Arc::clone(&stop), Arc::clone(&counts), path.clone());
            let mut next = start + period.mul_f64(i as f64 / workers as f64);
            handles.push(std::thread::spawn(move || {
                let mut conn = KeepAlive::new(addr);
                while !stop.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    match conn.get(&path) {
                        Ok((200, body)) if body.windows(17).any(|w| w == b"\nprobe_success 1\n") => {
                            counts.ok.fetch_add(1, Ordering::Relaxed)
                        }
                        Ok((200, _)) => counts.failed.fetch_add(1, Ordering::Relaxed),
                        _ => counts.errors.fetch_add(1, Ordering::Relaxed),
                    };
                    // A probe longer than the period delays the next one rather than bursting.
                    next = (next + period).max(Instant::now());
                }
            }));
        }
        Ok(Blackbox {
            child: Some(child),
            stop,
            counts,
            workers: handles,
        })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }
}

impl Drop for Blackbox {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        if let Some(c) = self.child.take() {
            stop_child(c, libc::SIGTERM);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Measurement.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prober {
    /// The glibc release build (`cargo build --release`).
    Sensor,
    /// The static musl build of `cargo xtask dist`.
    SensorStatic,
    Blackbox,
}

impl Prober {
    fn name(self) -> &'static str {
        match self {
            Prober::Sensor => "sensor",
            Prober::SensorStatic => "sensor (static)",
            Prober::Blackbox => "blackbox_exporter",
        }
    }
}

/// One measurement window.
#[derive(Clone, Debug)]
struct Sample {
    prober: Prober,
    round: usize,
    secs: f64,
    ok: u64,
    failed: u64,
    cpu: f64,
    target_requests: u64,
    target_cpu: f64,
    /// CPU of this process minus the target's (the blackbox driver; ~0 for sensor rounds).
    driver_cpu: f64,
    rss_kib: u64,
}

impl Sample {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.secs
    }
    fn per_cpu(&self) -> f64 {
        if self.cpu > 0.0 {
            self.ok as f64 / self.cpu
        } else {
            f64::INFINITY
        }
    }
    fn cpu_pct(&self) -> f64 {
        100.0 * self.cpu / self.secs
    }
}

struct Env {
    sensor: PathBuf,
    sensor_static: Option<PathBuf>,
    blackbox: PathBuf,
    dir: PathBuf,
    target: Target,
}

/// Opens a window on `pid`, sleeps `secs`, closes it; `probes` reads (ok, failed) at each edge.
fn window(
    env: &Env,
    prober: Prober,
    round: usize,
    pid: u32,
    secs: f64,
    probes: &dyn Fn() -> Result<(u64, u64)>,
) -> Result<Sample> {
    // Probe counts are read just outside the CPU readings, so a /metrics scrape of the sensor is
    // (mostly) not billed to it.
    let (ok0, failed0) = probes()?;
    let (cpu0, self0, tcpu0, treq0, t0) = (
        pid_cpu(pid)?,
        cpu_seconds("/proc/self/stat")?,
        env.target.cpu(),
        env.target.served(),
        Instant::now(),
    );
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (cpu1, self1, tcpu1, treq1, elapsed) = (
        pid_cpu(pid)?,
        cpu_seconds("/proc/self/stat")?,
        env.target.cpu(),
        env.target.served(),
        t0.elapsed().as_secs_f64(),
    );
    let (ok1, failed1) = probes()?;
    let (rss, _) = rss_kib(pid)?;
    let target_cpu = tcpu1 - tcpu0;
    Ok(Sample {
        prober,
        round,
        secs: elapsed,
        ok: ok1.saturating_sub(ok0),
        failed: failed1.saturating_sub(failed0),
        cpu: cpu1 - cpu0,
        target_requests: treq1 - treq0,
        target_cpu,
        driver_cpu: ((self1 - self0) - target_cpu).max(0.0),
        rss_kib: rss,
    })
}

impl Env {
    /// The binary of a sensor prober.
    fn bin(&self, prober: Prober) -> Result<&Path> {
        match prober {
            Prober::SensorStatic => self.sensor_static.as_deref().context("no static build given"),
            _ => Ok(&self.sensor),
        }
    }
}

fn measure_sensor(env: &Env, o: &Opts, round: usize, prober: Prober) -> Result<Sample> {
    let s = Sensor::start(
        env.bin(prober)?,
        &env.dir.join("sensor.yaml"),
        &env.dir.join("sensor.log"),
    )?;
    std::thread::sleep(WARMUP);
    window(env, prober, round, s.pid(), o.seconds, &|| s.runs())
}

fn measure_blackbox(env: &Env, o: &Opts, round: usize) -> Result<Sample> {
    let b = Blackbox::start(
        &env.blackbox,
        &env.dir.join("blackbox.yml"),
        &env.dir.join("blackbox.log"),
        &env.target.url(),
        o.checks,
        o.rate,
    )?;
    std::thread::sleep(WARMUP);
    let probes = || {
        let [ok, failed, errors] = b.counts.snapshot();
        Ok((ok, failed + errors))
    };
    window(env, Prober::Blackbox, round, b.pid(), o.seconds, &probes)
}

struct RssResult {
    prober: Prober,
    checks: usize,
    rss_kib: u64,
    hwm_kib: u64,
    ok: u64,
    failed: u64,
    cpu: f64,
    secs: f64,
}

fn measure_rss(env: &Env, prober: Prober, checks: usize, wait: f64) -> Result<RssResult> {
    let cfg = env.dir.join(format!("sensor-rss-{checks}.yaml"));
    let text = sensor_config(&env.target.url(), checks, Duration::from_secs(10));
    std::fs::write(&cfg, text).with_context(|| format!("write {}", cfg.display()))?;
    let t = Instant::now();
    let s = Sensor::start(
        env.bin(prober)?,
        &cfg,
        &env.dir.join(format!("sensor-rss-{checks}.log")),
    )?;
    std::thread::sleep(Duration::from_secs_f64(wait));
    // Status first: the scrape below allocates.
    let (rss_kib, hwm_kib) = rss_kib(s.pid())?;
    let cpu = pid_cpu(s.pid())?;
    let secs = t.elapsed().as_secs_f64();
    let (ok, failed) = s.runs()?;
    Ok(RssResult {
        prober,
        checks,
        rss_kib,
        hwm_kib,
        ok,
        failed,
        cpu,
        secs,
    })
}

// ---------------------------------------------------------------------------------------------
// Setup.

fn ensure_blackbox() -> Result<PathBuf> {
    // `cargo xtask bench` installs the bench dependencies (xtask/src/deps.rs) first.
    find_in_path(BLACKBOX).with_context(|| format!("{BLACKBOX} not installed (cargo xtask deps --bench)"))
}

// ---------------------------------------------------------------------------------------------
// Report.

fn row(label: &str, v: Vec<f64>, decimals: usize) -> String {
    let (a, b, c) = stats(v);
    format!("| {label} | {a:.decimals$} | {b:.decimals$} | {c:.decimals$} |\n")
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

/// The report's summary rows: probes per CPU-second against blackbox_exporter, RSS with many checks.
fn summary_rows(samples: &[Sample], rss: &[RssResult]) -> Vec<Row> {
    let med = |p: Prober| stats(samples.iter().filter(|s| s.prober == p).map(Sample::per_cpu).collect()).1;
    let ratio = stats(ratios(samples, Prober::Sensor, Prober::Blackbox)).1;
    let mut rows = vec![Row::measured(
        "HTTP check probes per CPU-second (same target, same offered rate)",
        med(Prober::Sensor),
        "",
        0,
        &format!(
            "blackbox_exporter {:.0} (sensor / blackbox_exporter {ratio:.2})",
            med(Prober::Blackbox)
        ),
        Goal::None,
        "-",
    )];
    if let Some(r) = rss
        .iter()
        .filter(|r| r.prober == Prober::Sensor)
        .max_by_key(|r| r.checks)
    {
        rows.push(Row::measured(
            &format!("RSS with {} HTTP checks (kernel probes off)", r.checks),
            mib(r.rss_kib),
            " MiB",
            1,
            "-",
            Goal::None,
            "-",
        ));
    }
    rows
}

/// The headline numbers, and a warning when either prober fell short of the offered rate.
/// Probes per CPU-second of `num` over `den`, one ratio per round that has both.
fn ratios(samples: &[Sample], num: Prober, den: Prober) -> Vec<f64> {
    samples
        .iter()
        .filter(|s| s.prober == num)
        .filter_map(|s| {
            samples
                .iter()
                .find(|b| b.prober == den && b.round == s.round)
                .map(|b| s.per_cpu() / b.per_cpu())
        })
        .collect()
}

/// The probers that ran, in report order.
fn probers(samples: &[Sample]) -> Vec<Prober> {
    [Prober::Sensor, Prober::SensorStatic, Prober::Blackbox]
        .into_iter()
        .filter(|p| samples.iter().any(|s| s.prober == *p))
        .collect()
}

fn summary(o: &Opts, samples: &[Sample], rss: &[RssResult]) {
    let med =
        |p: Prober, f: &dyn Fn(&Sample) -> f64| stats(samples.iter().filter(|s| s.prober == p).map(f).collect()).1;
    let ratio = stats(ratios(samples, Prober::Sensor, Prober::Blackbox));
    for p in probers(samples) {
        eprintln!(
            "==> {:<17} median {:>6.0} probes/CPU-s at {:>5.0} probes/s ({:.1}% of one core)",
            p.name(),
            med(p, &Sample::per_cpu),
            med(p, &Sample::rate),
            med(p, &Sample::cpu_pct)
        );
        let short = med(p, &Sample::rate) < 0.95 * o.rate;
        let failed: u64 = samples.iter().filter(|s| s.prober == p).map(|s| s.failed).sum();
        if short || failed > 0 {
            eprintln!(
                "==> note: {} achieved a median {:.0} of {:.0} offered probes/s, {failed} failed probes in all",
                p.name(),
                med(p, &Sample::rate),
                o.rate
            );
        }
    }
    eprintln!(
        "==> sensor / blackbox_exporter probes per CPU-second: min {:.2}, median {:.2}, max {:.2}",
        ratio.0, ratio.1, ratio.2
    );
    let st = ratios(samples, Prober::SensorStatic, Prober::Sensor);
    if !st.is_empty() {
        let st = stats(st);
        eprintln!(
            "==> sensor (static) / sensor (glibc) probes per CPU-second: min {:.2}, median {:.2}, max {:.2}",
            st.0, st.1, st.2
        );
    }
    for pair in rss.chunks(2) {
        if let [base, big] = pair {
            eprintln!(
                "==> RSS {}: {} check {:.1} MiB, {} checks {:.1} MiB ({:.1} KiB per check)",
                base.prober.name(),
                base.checks,
                mib(base.rss_kib),
                big.checks,
                mib(big.rss_kib),
                (big.rss_kib as f64 - base.rss_kib as f64) / (big.checks.saturating_sub(base.checks).max(1)) as f64
            );
        }
    }
}

fn render(
    o: &Opts,
    bb_version: &str,
    interval: Duration,
    samples: &[Sample],
    rss: &[RssResult],
    load: [f64; 2],
) -> String {
    let of = |p: Prober| samples.iter().filter(move |s| s.prober == p);
    let sensor: Vec<&Sample> = of(Prober::Sensor).collect();
    let st: Vec<&Sample> = of(Prober::SensorStatic).collect();
    let bb: Vec<&Sample> = of(Prober::Blackbox).collect();
    let bb_ratios = ratios(samples, Prober::Sensor, Prober::Blackbox);
    let col = |v: &[&Sample], f: &dyn Fn(&Sample) -> f64| v.iter().map(|s| f(s)).collect::<Vec<f64>>();

    // Machine, kernel, OS, commit and time as every benchmark prints them.
    let machine = crate::bench::report::machine();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());

    let mut t = String::new();
    t.push_str("# Benchmarks: synthetic checks\n\n");
    t.push_str(
        "Generated by `cargo xtask bench checks`; numbers from the last run on the machine named. \
         This is a benchmark, not a test: nothing here fails a build.\n\n",
    );
    t.push_str(&format!(
        "Machine: {machine}; {bb_version}. Load average (1 min) {:.1} before the rounds and {:.1} after \
         them{}.\n\n",
        load[0],
        load[1],
        // The rounds themselves keep about one CPU busy.
        if load.iter().any(|l| *l > cpus as f64) {
            ": other work shared the machine, which widens the spread between rounds"
        } else {
            ""
        }
    ));

    t.push_str("## Probes per CPU-second: sensor vs. blackbox_exporter\n\n");
    t.push_str(&format!(
        "Both probe the same local HTTP target at the same offered rate, {:.0} probes/s, in {} rounds that \
         alternate sensor / blackbox_exporter in one run; each prober is started fresh, runs {:.0} s of warm-up, then \
         a {:.1} s window. Probes per CPU-second = successful probes in the window / (utime + stime of the prober's \
         process over the window, from /proc/PID/stat). The ratio is sensor over blackbox_exporter within a round.{}\n\n",
        o.rate,
        o.rounds,
        WARMUP.as_secs_f64(),
        o.seconds,
        if st.is_empty() {
            ""
        } else {
            " Each round also runs the static build (sensor (static), `cargo xtask dist`) between the two; \
             \"sensor\" is the glibc release build."
        }
    ));
    t.push_str("| | min | median | max |\n|---|---|---|---|\n");
    t.push_str(&row(
        "**sensor / blackbox_exporter, probes per CPU-second**",
        bb_ratios,
        2,
    ));
    if !st.is_empty() {
        t.push_str(&row(
            "**sensor (static) / sensor, probes per CPU-second**",
            ratios(samples, Prober::SensorStatic, Prober::Sensor),
            3,
        ));
    }
    for (name, v) in [
        ("sensor", &sensor),
        ("sensor (static)", &st),
        ("blackbox_exporter", &bb),
    ] {
        if v.is_empty() {
            continue;
        }
        t.push_str(&row(
            &format!("{name}: probes per CPU-second"),
            col(v, &Sample::per_cpu),
            0,
        ));
        t.push_str(&row(
            &format!("{name}: CPU per probe, µs"),
            col(v, &|s| 1e6 / s.per_cpu()),
            0,
        ));
        t.push_str(&row(&format!("{name}: achieved probes/s"), col(v, &Sample::rate), 0));
        t.push_str(&row(
            &format!("{name}: CPU, % of one core"),
            col(v, &Sample::cpu_pct),
            1,
        ));
        t.push_str(&row(
            &format!("{name}: failed probes per window"),
            col(v, &|s| s.failed as f64),
            0,
        ));
        t.push_str(&row(
            &format!("{name}: RSS at window end, MiB"),
            col(v, &|s| mib(s.rss_kib)),
            1,
        ));
        t.push_str(&row(
            &format!("target CPU during {name} windows, % of one core"),
            col(v, &|s| 100.0 * s.target_cpu / s.secs),
            1,
        ));
    }
    t.push_str(&row(
        "blackbox driver CPU (not counted), % of one core",
        col(&bb, &|s| 100.0 * s.driver_cpu / s.secs),
        1,
    ));

    let load = |v: &[&Sample]| {
        let (lo, _, hi) = stats(col(v, &Sample::rate));
        let failed: u64 = v.iter().map(|s| s.failed).sum();
        format!("{lo:.0}-{hi:.0} probes/s with {failed} failed")
    };
    t.push_str(&format!(
        "\nOffered {:.0} probes/s; achieved: sensor {}, {}blackbox_exporter {} over all windows.\n",
        o.rate,
        load(&sensor),
        if st.is_empty() {
            String::new()
        } else {
            format!("sensor (static) {}, ", load(&st))
        },
        load(&bb)
    ));
    t.push_str(&format!(
        "\n### Method\n\n\
         - **Target**: an HTTP/1.1 server inside xtask ({TARGET_THREADS} threads blocking in accept on one loopback \
         listener) that reads the request head and answers `200`, a 3-byte body and `Connection: close`, then closes. \
         Both probers open a fresh TCP connection per probe. Its CPU (per-thread /proc/self/task/TID/stat) and request \
         count are recorded per window: at most {tmax:.1}% of one core, and its requests differ from the probes \
         counted by at most {tdiff} per window (probes in flight at the window edges).\n\
         - **sensor**: `sensor run --config FILE --listen 127.0.0.1:PORT` with every kernel probe disabled (no \
         privileges needed) and {checks} HTTP checks of that target, `interval: {interval:?}`, `timeout: 2s`. Probes \
         are the delta of `sensor_check_runs_total{{result=\"success\"}}` summed over checks, scraped just outside the \
         CPU readings so the two scrapes are (mostly) not billed to the sensor. Its cost includes scheduling, timing \
         every phase, the per-check histograms, the result ring used for availability windows and alerting.\n{static_}\
         - **blackbox_exporter**: Debian's `{BLACKBOX}` with one module (`prober: http`, `timeout: 2s`, \
         `valid_status_codes: [200]`, `preferred_ip_protocol: ip4`), driven by {checks} worker threads in xtask, \
         each one keep-alive connection issuing `GET /probe?target=http://TARGET/&module=http_2xx` every {period:.1} ms \
         (a slow answer delays that worker's next request instead of bursting), i.e. the same offered rate. Probes are \
         answers containing `probe_success 1`. The driver's CPU is not counted (it is shown above). Part of the \
         exporter's real per-probe cost is that each probe is an HTTP request to it that it parses, plus a fresh \
         registry whose metrics it renders in the text format; that is how blackbox_exporter is used by Prometheus.\n\
         - CPU is utime + stime in clock ticks (sysconf(_SC_CLK_TCK) = {tck}), i.e. {res:.0} ms resolution; nothing \
         is pinned. Both probers run on the same {cpus}-CPU machine as the target (and, in blackbox rounds, the driver).\n\n",
        checks = o.checks,
        static_ = if st.is_empty() {
            ""
        } else {
            "- **sensor (static)**: the same, run from `target/dist/amd64/sensor` as `cargo xtask dist` builds it for the \
             image: x86_64-unknown-linux-musl, fully static, stripped, mimalloc as its allocator (musl's own malloc \
             takes one global lock). \"sensor\" is `cargo build --release` for the host (glibc, glibc's malloc).\n"
        },
        tmax = samples
            .iter()
            .map(|s| 100.0 * s.target_cpu / s.secs)
            .fold(0.0, f64::max),
        tdiff = samples
            .iter()
            .map(|s| (s.ok + s.failed).abs_diff(s.target_requests))
            .max()
            .unwrap_or(0),
        period = 1000.0 * o.checks as f64 / o.rate,
        tck = clk_tck(),
        res = 1000.0 / clk_tck(),
    ));

    t.push_str("### Raw rounds\n\n");
    t.push_str(
        "| round | prober | window s | probes ok | failed | probes/s | CPU s | probes/CPU-s | target requests | \
         target CPU s | driver CPU s | RSS MiB |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for s in samples {
        t.push_str(&format!(
            "| {} | {} | {:.2} | {} | {} | {:.0} | {:.2} | {:.0} | {} | {:.2} | {} | {:.1} |\n",
            s.round,
            s.prober.name(),
            s.secs,
            s.ok,
            s.failed,
            s.rate(),
            s.cpu,
            s.per_cpu(),
            s.target_requests,
            s.target_cpu,
            if s.prober == Prober::Blackbox {
                format!("{:.2}", s.driver_cpu)
            } else {
                "-".into()
            },
            mib(s.rss_kib)
        ));
    }

    t.push_str(&format!("\n## Daemon memory with {} checks\n\n", o.rss_checks));
    t.push_str(&format!(
        "`sensor run` checks-only (kernel probes disabled) with N HTTP checks of the same target, `interval: 10s` \
         (each check's first run is offset within its interval), read {:.0} s after start{}; VmRSS and VmHWM from \
         /proc/PID/status, read before the one /metrics scrape that counts the runs. Checks-only needs at least one \
         check, so the baseline is 1 check. CPU is the average since start.\n\n\
         | build | checks | VmRSS MiB | VmHWM MiB | runs ok | runs failed | CPU, % of one core |\n\
         |---|---|---|---|---|---|---|\n",
        o.rss_wait,
        if o.rss_wait >= 20.0 {
            ", so every check has run at least twice"
        } else {
            ""
        }
    ));
    for r in rss {
        t.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {} | {} | {:.2} |\n",
            r.prober.name(),
            r.checks,
            mib(r.rss_kib),
            mib(r.hwm_kib),
            r.ok,
            r.failed,
            100.0 * r.cpu / r.secs
        ));
    }
    t.push('\n');
    for pair in rss.chunks(2) {
        if let [base, big] = pair {
            if big.checks > base.checks {
                let per = |a: u64, b: u64| (b as f64 - a as f64) / (big.checks - base.checks) as f64;
                t.push_str(&format!(
                    "Per additional check ({}): {:.1} KiB of RSS ({:.1} KiB of peak RSS).\n",
                    base.prober.name(),
                    per(base.rss_kib, big.rss_kib),
                    per(base.hwm_kib, big.hwm_kib)
                ));
            }
        }
    }

    t.push_str(&format!(
        "\n## Reproduce\n\n\
         As root on Debian (installs `{BLACKBOX}` with apt-get when it is missing; the sensor needs no privileges \
         here):\n\n```\ncargo xtask bench checks --checks-rounds {} --checks-seconds {} --checks {} --checks-rate {} \
         --rss-checks {} --rss-wait {}{}\n```\n\nConfigs and logs of the last run are left in `target/bench-checks/`.\n",
        o.rounds,
        o.seconds,
        o.checks,
        o.rate,
        o.rss_checks,
        o.rss_wait,
        if o.with_static { " --static" } else { "" }
    ));
    t
}
