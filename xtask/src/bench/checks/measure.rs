//! Measurement: a round of one prober, its CPU and probe counts, and RSS with many checks.

use super::*;
// ---------------------------------------------------------------------------------------------
// Measurement.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Prober {
    /// The glibc release build (`cargo build --release`).
    Sensor,
    /// The static musl build of `cargo xtask dist`.
    SensorStatic,
    Blackbox,
}

impl Prober {
    pub(super) fn name(self) -> &'static str {
        match self {
            Prober::Sensor => "sensor",
            Prober::SensorStatic => "sensor (static)",
            Prober::Blackbox => "blackbox_exporter",
        }
    }
}

/// One measurement window.
#[derive(Clone, Debug)]
pub(super) struct Sample {
    pub(super) prober: Prober,
    pub(super) round: usize,
    pub(super) secs: f64,
    pub(super) ok: u64,
    pub(super) failed: u64,
    pub(super) cpu: f64,
    pub(super) target_requests: u64,
    pub(super) target_cpu: f64,
    /// CPU of this process minus the target's (the blackbox driver; ~0 for sensor rounds).
    pub(super) driver_cpu: f64,
    pub(super) rss_kib: u64,
}

impl Sample {
    pub(super) fn rate(&self) -> f64 {
        self.ok as f64 / self.secs
    }
    pub(super) fn per_cpu(&self) -> f64 {
        if self.cpu > 0.0 {
            self.ok as f64 / self.cpu
        } else {
            f64::INFINITY
        }
    }
    pub(super) fn cpu_pct(&self) -> f64 {
        100.0 * self.cpu / self.secs
    }
}

pub(super) struct Env {
    pub(super) sensor: PathBuf,
    pub(super) sensor_static: Option<PathBuf>,
    pub(super) blackbox: PathBuf,
    pub(super) dir: PathBuf,
    pub(super) target: Target,
}

/// Opens a window on `pid`, sleeps `secs`, closes it; `probes` reads (ok, failed) at each edge.
pub(super) fn window(
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
    pub(super) fn bin(&self, prober: Prober) -> Result<&Path> {
        match prober {
            Prober::SensorStatic => self.sensor_static.as_deref().context("no static build given"),
            _ => Ok(&self.sensor),
        }
    }
}

pub(super) fn measure_sensor(env: &Env, o: &Opts, round: usize, prober: Prober) -> Result<Sample> {
    let s = Sensor::start(
        env.bin(prober)?,
        &env.dir.join("sensor.yaml"),
        &env.dir.join("sensor.log"),
    )?;
    std::thread::sleep(WARMUP);
    window(env, prober, round, s.pid(), o.seconds, &|| s.runs())
}

pub(super) fn measure_blackbox(env: &Env, o: &Opts, round: usize) -> Result<Sample> {
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

pub(super) struct RssResult {
    pub(super) prober: Prober,
    pub(super) checks: usize,
    pub(super) rss_kib: u64,
    pub(super) hwm_kib: u64,
    pub(super) ok: u64,
    pub(super) failed: u64,
    pub(super) cpu: f64,
    pub(super) secs: f64,
}

pub(super) fn measure_rss(env: &Env, prober: Prober, checks: usize, wait: f64) -> Result<RssResult> {
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
