//! The two probers: the sensor running the checks itself, and blackbox_exporter driven at the
//! same rate.

use super::*;
// ---------------------------------------------------------------------------------------------
// The two probers.

pub(super) fn sensor_config(target: &str, checks: usize, interval: Duration) -> String {
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
pub(super) struct Sensor(Served);

impl Sensor {
    pub(super) fn start(bin: &Path, config: &Path, log: &Path) -> Result<Sensor> {
        let config = config.to_str().context("config path is not UTF-8")?;
        Served::sensor(bin, &["--config", config], log).map(Sensor)
    }

    pub(super) fn pid(&self) -> u32 {
        self.0.pid()
    }

    /// `sensor_check_runs_total` summed over checks: (success, failure).
    pub(super) fn runs(&self) -> Result<(u64, u64)> {
        let body = self.0.metrics()?;
        let ok = metric_sum(&body, "sensor_check_runs_total", &[("result", "success")]);
        let failed = metric_sum(&body, "sensor_check_runs_total", &[("result", "failure")]);
        Ok((ok as u64, failed as u64))
    }
}

#[derive(Default)]
pub(super) struct DriverCounts {
    pub(super) ok: AtomicU64,
    /// probe_success 0.
    pub(super) failed: AtomicU64,
    /// No answer from the exporter, or not a 200.
    pub(super) errors: AtomicU64,
}

impl DriverCounts {
    pub(super) fn snapshot(&self) -> [u64; 3] {
        [
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        ]
    }
}

pub(super) struct Blackbox {
    pub(super) child: Option<Child>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) counts: Arc<DriverCounts>,
    pub(super) workers: Vec<JoinHandle<()>>,
}

impl Blackbox {
    /// Starts the exporter and `workers` driver threads that together ask for `rate` probes/s.
    pub(super) fn start(
        bin: &Path,
        config: &Path,
        log: &Path,
        target: &str,
        workers: usize,
        rate: f64,
    ) -> Result<Blackbox> {
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

    pub(super) fn pid(&self) -> u32 {
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
