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

/// A memory cgroup under the soak's parent (v1 memory controller, or v2), removed on drop.
struct Cg {
    dir: PathBuf,
    v2: bool,
    /// As the sensor labels it: the path below the memory hierarchy's root.
    rel: String,
}

impl Cg {
    /// The soak's parent, under this process's own memory cgroup.
    fn parent(name: &str) -> Result<Cg> {
        let own = crate::kit::host::own_memory_cgroup().context("this process's memory cgroup")?;
        let base = Cg {
            dir: own.dir,
            v2: own.v2,
            rel: own.rel,
        };
        let p = base.child(name, None)?;
        let v2 = base.v2;
        std::mem::forget(base);
        if v2 {
            fs::write(p.dir.join("cgroup.subtree_control"), "+memory")
                .context("enable memory below the soak's cgroup")?;
        }
        Ok(p)
    }

    fn child(&self, name: &str, limit: Option<u64>) -> Result<Cg> {
        let dir = self.dir.join(name);
        let _ = fs::remove_dir(&dir);
        fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let cg = Cg {
            dir,
            v2: self.v2,
            rel: format!("{}/{name}", self.rel),
        };
        if let Some(l) = limit {
            let (file, swap) = if self.v2 {
                ("memory.max", "memory.swap.max")
            } else {
                ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")
            };
            fs::write(cg.dir.join(file), l.to_string()).with_context(|| format!("limit {}", cg.dir.display()))?;
            let _ = fs::write(cg.dir.join(swap), if self.v2 { "0".to_string() } else { l.to_string() });
        }
        Ok(cg)
    }

    /// `sh -c 'join; exec argv'` in this cgroup.
    fn command(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("echo $$ > \"$1\" && shift && exec \"$@\"")
            .arg("sh")
            .arg(self.dir.join("cgroup.procs"))
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    }

    /// The kernel's count of OOM kills in this cgroup.
    fn kernel_oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events.local"
        } else {
            "memory.oom_control"
        };
        fs::read_to_string(self.dir.join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Cg {
    fn drop(&mut self) {
        for _ in 0..100 {
            if fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("==> could not remove {}", self.dir.display());
    }
}

/// One sample of the daemon's footprint.
#[derive(Clone, Copy, Debug)]
struct Sample {
    secs: f64,
    rss_kib: u64,
    fds: u64,
    threads: u64,
}

fn sample(pid: u32, secs: f64) -> Option<Sample> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    Some(Sample {
        secs,
        rss_kib: field("VmRSS:")?,
        threads: field("Threads:")?,
        fds: fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64,
    })
}

/// Least-squares slope of `y` over `x`; 0 for fewer than two distinct points.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx
    }
}

use crate::kit::promtext::sum as metric_sum;

/// What the load generator reported: connects that succeeded, were refused, failed otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Connects {
    pub ok: u64,
    pub refused: u64,
    pub other: u64,
}

impl Connects {
    fn parse(line: &str) -> Option<Connects> {
        let rest = line.strip_prefix("CONNECTS ")?;
        let get = |k: &str| {
            rest.split_whitespace()
                .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
        };
        Some(Connects {
            ok: get("ok")?,
            refused: get("refused")?,
            other: get("other")?,
        })
    }
}

/// `xtask soak-load`: runs inside the soak's network namespace and cgroup until its stdin
/// closes: a steady trickle of connects to a local listener and to a port nothing listens on,
/// with a storm every 20 s; prints its totals once a second and when it ends.
pub fn load() -> Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", PORT_OK)).context("bind the soak listener")?;
    // SAFETY: listen(2) on a valid listening socket: a deep backlog so storms are not dropped.
    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096) };
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            stop.store(true, Ordering::Relaxed);
        });
    }
    let counts = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
    let one = |port: u16| {
        let slot = match TcpStream::connect_timeout(&loopback(port), Duration::from_secs(5)) {
            Ok(_) => 0,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => 1,
            Err(_) => 2,
        };
        counts[slot].fetch_add(1, Ordering::Relaxed);
    };
    let print = || {
        println!(
            "CONNECTS ok={} refused={} other={}",
            counts[0].load(Ordering::Relaxed),
            counts[1].load(Ordering::Relaxed),
            counts[2].load(Ordering::Relaxed)
        );
    };
    let started = Instant::now();
    let mut last_storm = Instant::now();
    let mut last_print = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if last_storm.elapsed() >= Duration::from_secs(20) {
            last_storm = Instant::now();
            // A storm: 4 threads, 1,500 successes and 300 refusals as fast as they go.
            std::thread::scope(|s| {
                for t in 0..4 {
                    s.spawn(move || {
                        for i in 0..450 {
                            one(if (i + t) % 6 == 0 { PORT_REFUSED } else { PORT_OK });
                        }
                    });
                }
            });
        }
        for _ in 0..4 {
            one(PORT_OK);
        }
        one(PORT_REFUSED);
        std::thread::sleep(Duration::from_millis(100));
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            print();
        }
    }
    print();
    eprintln!("soak load ran {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// A local HTTP server whose answer flips between 200 and 503 every `FLAP_EVERY`.
fn flapping_server(stop: Arc<AtomicBool>) -> Result<(u16, std::thread::JoinHandle<u64>)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    l.set_nonblocking(true)?;
    let h = std::thread::spawn(move || {
        let t0 = Instant::now();
        let mut served = 0;
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf);
                    let up = (t0.elapsed().as_secs() / FLAP_EVERY.as_secs()).is_multiple_of(2);
                    let status = if up { "200 OK" } else { "503 Service Unavailable" };
                    let _ = write!(
                        s,
                        "HTTP/1.1 {status}\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
                    );
                    served += 1;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        served
    });
    Ok((port, h))
}

/// Creates a cgroup with a sleeping process every `CHURN_EVERY`, removing the oldest beyond
/// `CHURN_LIVE`; returns how many it created and removed.
fn churn(parent: &Cg, stop: &AtomicBool, made: &AtomicU64) -> Result<()> {
    let mut live: std::collections::VecDeque<(Cg, Child)> = std::collections::VecDeque::new();
    let mut n = 0u64;
    let end = |(cg, mut child): (Cg, Child)| {
        let _ = child.kill();
        let _ = child.wait();
        drop(cg);
    };
    while !stop.load(Ordering::Relaxed) {
        let cg = parent.child(&format!("churn-{n}"), Some(64 << 20))?;
        n += 1;
        let child = cg.command(&["sleep", "3600"]).spawn().context("spawn sleep")?;
        live.push_back((cg, child));
        made.fetch_add(1, Ordering::Relaxed);
        while live.len() > CHURN_LIVE {
            if let Some(x) = live.pop_front() {
                end(x);
            }
        }
        std::thread::sleep(CHURN_EVERY);
    }
    live.into_iter().for_each(end);
    Ok(())
}

/// An OOM kill every `OOM_EVERY`, round robin over `cgs`; returns the kills whose victim died
/// of SIGKILL.
fn oom_kills(cgs: &[Cg], stop: &AtomicBool, done: &AtomicU64) -> Result<()> {
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let st = cgs[i % cgs.len()]
            .command(&["tail", "/dev/zero"])
            .status()
            .context("run tail /dev/zero")?;
        if st.signal() == Some(libc::SIGKILL) {
            done.fetch_add(1, Ordering::Relaxed);
        }
        i += 1;
        std::thread::sleep(OOM_EVERY.saturating_sub(t.elapsed()));
    }
    Ok(())
}

/// The load generator, in the cgroup `cg` and a new network namespace; its stdout lines go to
/// `last`.
fn start_load(cg: &Cg, last: Arc<Mutex<Connects>>) -> Result<(Child, std::thread::JoinHandle<()>)> {
    let exe = std::env::current_exe().context("xtask's own path")?;
    let exe = exe.to_str().context("xtask's path is not UTF-8")?;
    let mut cmd = cg.command(&[
        "unshare",
        "--net",
        "--",
        "sh",
        "-c",
        "ip link set lo up && exec \"$0\" soak-load",
        exe,
    ]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().context("start the connect load (unshare, ip)")?;
    let out = child.stdout.take().context("load stdout")?;
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(c) = Connects::parse(&line) {
                *last.lock().unwrap_or_else(|p| p.into_inner()) = c;
            }
        }
    });
    Ok((child, reader))
}

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

/// What the run measured.
struct Findings {
    minutes: f64,
    warmup_secs: f64,
    kills_caused: u64,
    kills_seen_by_load: u64,
    kills_counted: u64,
    kills_journaled: Option<u64>,
    host_kills: u64,
    made: Connects,
    counted: Connects,
    recursion_misses: u64,
    untracked: u64,
    cgroups_churned: u64,
    scrapes: u64,
    scrape_failures: u64,
    flaps: u64,
    samples: Vec<Sample>,
    exit: Option<i32>,
}

impl Findings {
    fn measured(&self) -> Vec<Sample> {
        self.samples
            .iter()
            .copied()
            .filter(|s| s.secs >= self.warmup_secs)
            .collect()
    }

    /// The RSS slope allowed: [`MAX_RSS_GROWTH_MIB_PER_MIN`], or [`RSS_NOISE_MIB`] over the
    /// measured window when that is larger (windows under two minutes).
    fn rss_limit(&self) -> f64 {
        let m = self.measured();
        let minutes = match (m.first(), m.last()) {
            (Some(a), Some(b)) => (b.secs - a.secs) / 60.0,
            _ => 0.0,
        };
        if minutes <= 0.0 {
            return MAX_RSS_GROWTH_MIB_PER_MIN;
        }
        MAX_RSS_GROWTH_MIB_PER_MIN.max(RSS_NOISE_MIB / minutes)
    }

    /// Per-minute slopes of RSS (MiB), fds and threads after warm-up.
    fn slopes(&self) -> (f64, f64, f64) {
        let m = self.measured();
        let fit = |f: fn(&Sample) -> f64| slope(&m.iter().map(|s| (s.secs / 60.0, f(s))).collect::<Vec<_>>());
        (
            fit(|s| s.rss_kib as f64 / 1024.0),
            fit(|s| s.fds as f64),
            fit(|s| s.threads as f64),
        )
    }

    /// Threads at the end of warm-up and the most seen afterwards.
    fn threads(&self) -> (u64, u64) {
        let m = self.measured();
        let first = m.first().map_or(0, |s| s.threads);
        (first, m.iter().map(|s| s.threads).max().unwrap_or(0))
    }

    /// Every failed check, as a sentence.
    fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        if self.kills_caused == 0 {
            f.push("no OOM kill was caused".into());
        }
        if self.kills_counted != self.kills_caused {
            f.push(format!(
                "kills caused {} != kills counted {}",
                self.kills_caused, self.kills_counted
            ));
        }
        match self.kills_journaled {
            Some(j) if j != self.kills_caused => f.push(format!(
                "kills caused {} != kills in the journal {j}",
                self.kills_caused
            )),
            Some(_) => {}
            None => f.push("the journal could not be read back".into()),
        }
        if self.made.ok == 0 || self.made.refused == 0 {
            f.push(format!("the load made no connects of some kind: {:?}", self.made));
        }
        if (self.made.ok, self.made.refused) != (self.counted.ok, self.counted.refused) {
            f.push(format!(
                "connects made {:?} != counted {:?} (recursion misses {}, untracked {})",
                self.made, self.counted, self.recursion_misses, self.untracked
            ));
        }
        if self.scrape_failures > 0 {
            f.push(format!("{} of {} scrapes failed", self.scrape_failures, self.scrapes));
        }
        let (rss, fds, _) = self.slopes();
        if rss > self.rss_limit() {
            f.push(format!(
                "RSS grows {rss:.3} MiB/min after warm-up (limit {:.3})",
                self.rss_limit()
            ));
        }
        if fds > MAX_FD_GROWTH_PER_MIN {
            f.push(format!("open fds grow {fds:.3}/min after warm-up"));
        }
        let (t0, tmax) = self.threads();
        // Tokio's blocking pool grows on demand and shrinks after 10 s idle: allow its
        // headroom, not a trend.
        if tmax > t0 + 8 {
            f.push(format!("threads grew from {t0} to {tmax} after warm-up"));
        }
        if self.exit != Some(0) {
            f.push(format!("the daemon exited with {:?} on SIGINT", self.exit));
        }
        f
    }

    fn report(&self) -> String {
        let (rss, fds, thr) = self.slopes();
        let limit = self.rss_limit();
        let (t0, tmax) = self.threads();
        let m = self.measured();
        let range = |f: fn(&Sample) -> u64| {
            let v: Vec<u64> = m.iter().map(f).collect();
            (
                v.iter().min().copied().unwrap_or(0),
                v.iter().max().copied().unwrap_or(0),
            )
        };
        let (rmin, rmax) = range(|s| s.rss_kib);
        let (fmin, fmax) = range(|s| s.fds);
        let failures = self.failures();
        let verdict = if failures.is_empty() {
            "PASS".to_string()
        } else {
            format!("FAIL: {}", failures.join("; "))
        };
        let journal = self
            .kills_journaled
            .map_or_else(|| "not checked (journal not merged yet)".into(), |j| j.to_string());
        format!(
            "## Soak: {:.0} minutes\n\n\
             `cargo xtask soak --minutes {}` on kernel {}, {} CPUs. Warm-up: first {:.0} s (not in the \
             slopes).\n\n\
             | | value |\n|---|---|\n\
             | OOM kills caused (kernel counters of the soak's cgroups) | {} |\n\
             | victims that died of SIGKILL (load generator) | {} |\n\
             | OOM kills counted (`sensor_oom_kills_total`) | {} |\n\
             | OOM kills in the journal | {journal} |\n\
             | OOM kills host-wide during the run (`/proc/vmstat`) | {} |\n\
             | connects made: ok / refused / other | {} / {} / {} |\n\
             | connects counted: success / refused | {} / {} |\n\
             | TCP runs skipped by the kernel (`recursion`) / ends without a start (`untracked`) | {} / {} |\n\
             | cgroups created and removed (each with a process) | {} |\n\
             | `/metrics` scrapes (failed) | {} ({}) |\n\
             | check target status flips | {} |\n\
             | RSS after warm-up, min..max | {:.1}..{:.1} MiB |\n\
             | RSS slope (limit) | {rss:+.3} MiB/min ({limit:.3}) |\n\
             | open fds after warm-up, min..max | {fmin}..{fmax} |\n\
             | open fds slope | {fds:+.3}/min |\n\
             | threads: at end of warm-up, max after | {t0}, {tmax} (slope {thr:+.3}/min) |\n\
             | exit on SIGINT | {:?} |\n\n\
             Verdict: {verdict}\n",
            self.minutes,
            self.minutes,
            fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim(),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            self.warmup_secs,
            self.kills_caused,
            self.kills_seen_by_load,
            self.kills_counted,
            self.host_kills,
            self.made.ok,
            self.made.refused,
            self.made.other,
            self.counted.ok,
            self.counted.refused,
            self.recursion_misses,
            self.untracked,
            self.cgroups_churned,
            self.scrapes,
            self.scrape_failures,
            self.flaps,
            rmin as f64 / 1024.0,
            rmax as f64 / 1024.0,
            self.exit,
        )
    }
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
    let parent = Cg::parent(&format!("sensor-soak-{}-{}", branch(), std::process::id()))?;
    let oom: Vec<Cg> = (0..OOM_CGROUPS)
        .map(|i| parent.child(&format!("oom-{i}"), Some(OOM_LIMIT)))
        .collect::<Result<_>>()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_squares_slope() {
        assert_eq!(slope(&[]), 0.0);
        assert_eq!(slope(&[(1.0, 5.0)]), 0.0);
        let s = slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0), (3.0, 7.0)]);
        assert!((s - 2.0).abs() < 1e-12, "{s}");
        let flat = slope(&[(0.0, 10.0), (1.0, 11.0), (2.0, 10.0), (3.0, 11.0), (4.0, 10.0)]);
        assert!(flat.abs() < 0.11, "{flat}");
    }

    #[test]
    fn load_totals_line() {
        assert_eq!(
            Connects::parse("CONNECTS ok=10 refused=2 other=0"),
            Some(Connects {
                ok: 10,
                refused: 2,
                other: 0
            })
        );
        assert_eq!(Connects::parse("CONNECTS ok=1"), None);
    }
}
