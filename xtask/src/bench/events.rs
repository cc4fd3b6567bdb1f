//! `cargo xtask bench events` (userspace CPU per kernel event, measured with a connect-failure
//! storm in a network namespace of its own) and `bench oom-latency` (real OOM kills in a memory
//! cgroup: the kill's kernel timestamp against when it shows in /api/v1/events, on
//! `sensor events` stdout and in /metrics).

use std::{
    io::{BufRead as _, BufReader},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    bench::kit::{cpu_split, metric_sum, oom_victim, pid_cpu, Served},
    bench::kit::{in_fresh_netns, stats},
    bench::report::Bench,
    bench::report::{store, Goal, Row},
    net::http_get,
};

#[derive(clap::Args, Debug, Clone)]
#[group(id = "bench_events_opts")]
pub struct Opts {
    /// Connect-failure storm rounds.
    #[arg(long, default_value_t = 5)]
    pub event_rounds: usize,
    /// Seconds per storm.
    #[arg(long, default_value_t = 5.0)]
    pub event_seconds: f64,
    /// Load generator threads (one leaves the other CPU to the daemon on a 2-CPU host).
    #[arg(long, default_value_t = 1)]
    pub event_threads: usize,
    /// No CPU profile of the daemon during an extra storm (bpftrace).
    #[arg(long)]
    pub no_profile: bool,
    /// OOM kills caused, one after another.
    #[arg(long, default_value_t = 100)]
    pub kills: usize,
}

impl Opts {
    pub fn quick(&mut self) {
        self.event_rounds = 2;
        self.event_seconds = 2.0;
        self.kills = 10;
    }
}

/// The load generator (`cargo xtask bench-refuse`, run inside a fresh network namespace):
/// connects to a closed loopback port for `secs`; prints `refused other`.
pub fn refuse_storm(threads: usize, secs: f64) -> Result<(u64, u64)> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let refused = AtomicU64::new(0);
    let other = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while Instant::now() < deadline {
                    match TcpStream::connect(addr) {
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            other.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    Ok((refused.into_inner(), other.into_inner()))
}

/// Kernel-event counters of the daemon: (records decoded, records lost, refused connects,
/// events written to the journal, records summed into another event's count).
fn counters(sensor: &Served) -> Result<[f64; 5]> {
    let m = sensor.metrics()?;
    Ok([
        metric_sum(&m, "sensor_events_total", &[("probe", "tcp")]),
        metric_sum(&m, "sensor_events_lost_total", &[("probe", "tcp")]),
        metric_sum(&m, "sensor_tcp_connects_total", &[("result", "refused")]),
        metric_sum(&m, "sensor_journal_events_written_total", &[]),
        metric_sum(&m, "sensor_events_coalesced_total", &[("probe", "tcp")]),
    ])
}

struct Storm {
    generated: u64,
    other: u64,
    events: f64,
    lost: f64,
    refused: f64,
    /// Events the journal wrote during the storm (each interval's sums, not a record each).
    journaled: f64,
    coalesced: f64,
    cpu: f64,
    /// The part of `cpu` spent in the kernel (system time: ring reads, wake-ups, HTTP).
    sys: f64,
    secs: f64,
}

/// The head of the rounds' table ([`Storm::row`]).
const ROUND_HEADER: &str = "| round | refused (generator) | other results | events decoded | events lost | refusals counted | coalesced | journal records | daemon CPU s | µs/event |\n|---|---|---|---|---|---|---|---|---|---|\n";

impl Storm {
    fn us_per_event(&self) -> f64 {
        1e6 * self.cpu / self.events.max(1.0)
    }

    /// Round `n`'s line of the report's table (also its progress line).
    fn row(&self, n: usize) -> String {
        format!(
            "| {n} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.3} |",
            self.generated,
            self.other,
            self.events,
            self.lost,
            self.refused,
            self.coalesced,
            self.journaled,
            self.cpu,
            self.us_per_event()
        )
    }
}

fn storm_round(sensor: &Served, o: &Opts) -> Result<Storm> {
    let before = counters(sensor)?;
    let (c0, t0) = (pid_cpu(sensor.pid())?, Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let idle_rate = (pid_cpu(sensor.pid())? - c0) / t0.elapsed().as_secs_f64();
    let stat = format!("/proc/{}/stat", sensor.pid());
    let (c1, t1) = (pid_cpu(sensor.pid())?, Instant::now());
    let (_, s1) = cpu_split(&stat)?;
    let out = in_fresh_netns(&[
        "bench-refuse".into(),
        "--threads".into(),
        o.event_threads.to_string(),
        "--seconds".into(),
        o.event_seconds.to_string(),
    ])?;
    let secs = t1.elapsed().as_secs_f64();
    // The reader drains what the storm left in the rings and the last interval's sums are
    // published (1 s); the CPU for that belongs here.
    std::thread::sleep(Duration::from_millis(1200));
    let cpu = (pid_cpu(sensor.pid())? - c1 - idle_rate * t1.elapsed().as_secs_f64()).max(0.0);
    let sys = cpu_split(&stat)?.1 - s1;
    let after = counters(sensor)?;
    let mut it = out.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(generated)), Some(Ok(other))) = (it.next(), it.next()) else {
        bail!("load generator printed {out:?}");
    };
    Ok(Storm {
        generated,
        other,
        events: after[0] - before[0],
        lost: after[1] - before[1],
        refused: after[2] - before[2],
        journaled: after[3] - before[3],
        coalesced: after[4] - before[4],
        cpu,
        sys,
        secs,
    })
}

pub fn run_events(root: &Path, sensor_bin: &Path, o: &Opts) -> Result<()> {
    // Held to the end: the kernel lock.
    let bench = Bench::start(root, "events")?;
    let (m, dir) = (bench.machine.clone(), bench.dir.clone());
    let sensor = Served::sensor(sensor_bin, &[], &dir.join("sensor-events.log"))?;
    std::thread::sleep(Duration::from_secs(1));
    let mut rounds = Vec::new();
    eprintln!("    {}", ROUND_HEADER.lines().next().unwrap_or_default());
    for r in 1..=o.event_rounds {
        let s = storm_round(&sensor, o)?;
        eprintln!(
            "    round {r}/{} ({} refused connects/s): {}",
            o.event_rounds,
            (s.generated as f64 / s.secs) as u64,
            s.row(r)
        );
        rounds.push(s);
    }
    let profile = if o.no_profile {
        None
    } else {
        eprintln!("==> one more storm with a CPU profile of the daemon (bpftrace, 997 Hz, twice as long)");
        Some(profile_storm(&sensor, o)?)
    };
    drop(sensor);
    let per: Vec<f64> = rounds.iter().map(Storm::us_per_event).collect();
    let rate: Vec<f64> = rounds.iter().map(|s| s.events / s.secs).collect();
    let rows = vec![Row::measured(
        "userspace CPU per kernel event (connect-failure storm)",
        stats(per.clone()).1,
        " µs",
        2,
        "-",
        Goal::AtMost(1.0),
        "≤ 1 µs",
    )];
    let line = |label: &str, v: Vec<f64>, d: usize| {
        let (a, b, c) = stats(v);
        format!("| {label} | {a:.d$} | {b:.d$} | {c:.d$} |\n")
    };
    let mut t = format!(
        "`sensor run` with its default configuration (every probe; a refused connect is one TCP failure record \
         through the ring, read, decoded, counted and either published as an event, attributed to its workload, \
         or summed into its key's next event: `probes.tcp.failure_events`, one event per workload, destination \
         and result per second). The load \
         generator (`cargo xtask bench-refuse`, {th} thread) runs in a network namespace it creates (`unshare \
         --net`, loopback up) and connects to a closed port on 127.0.0.1 for {secs} s: each connect is refused by \
         the kernel. {r} rounds. Kernel events = the delta of the daemon's own `sensor_events_total{{probe=\"tcp\"}}`; \
         daemon CPU = utime + stime of its process (/proc/PID/stat) from the storm's start until 1.2 s after its \
         end (ring drained, last sums published), minus the daemon's idle rate measured in the second before. CPU per event = CPU / \
         events. Nothing is pinned; the generator and the kernel's side of each connect share the 2 CPUs with the \
         daemon.\n\n\
         | | min | median | max |\n|---|---|---|---|\n",
        th = o.event_threads,
        secs = o.event_seconds,
        r = o.event_rounds,
    );
    t.push_str(&line("**daemon CPU per kernel event, µs**", per, 3));
    t.push_str(&line("kernel events decoded per second", rate, 0));
    t.push_str(&line(
        "of which in the kernel (system time), %",
        rounds.iter().map(|s| 100.0 * s.sys / s.cpu.max(1e-9)).collect(),
        0,
    ));
    t.push_str(&line(
        "daemon CPU, % of one core",
        rounds.iter().map(|s| 100.0 * s.cpu / s.secs).collect(),
        1,
    ));
    t.push('\n');
    t.push_str(ROUND_HEADER);
    for (i, s) in rounds.iter().enumerate() {
        t.push_str(&s.row(i + 1));
        t.push('\n');
    }
    if let Some(p) = &profile {
        t.push_str(&profile_table(p));
    }
    t.push_str(&format!(
        "\nReproduce: `cargo xtask bench events --event-rounds {} --event-seconds {} --event-threads {}`.\n",
        o.event_rounds, o.event_seconds, o.event_threads
    ));
    store(root, "events", &m, &rows, &t)
}

/// Samples per function of the daemon during one more storm (not a measured round).
fn profile_storm(sensor: &Served, o: &Opts) -> Result<Vec<(String, u64)>> {
    profile_during(sensor.pid(), || {
        in_fresh_netns(&[
            "bench-refuse".into(),
            "--threads".into(),
            o.event_threads.to_string(),
            "--seconds".into(),
            (2.0 * o.event_seconds).to_string(),
        ])
        .map(|_| ())
    })
}

/// Samples per function of process `pid` while `load` runs: bpftrace's `profile` at 997 Hz on
/// every thread of it, keyed by the innermost user-space frame, which for samples in the kernel
/// is the function that made the system call.
pub fn profile_during(pid: u32, load: impl FnOnce() -> Result<()>) -> Result<Vec<(String, u64)>> {
    let script = format!("profile:hz:997 /pid == {pid}/ {{ @[ustack(1)] = count(); }}");
    let mut bt = Command::new("bpftrace")
        .args(["-e", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("start bpftrace")?;
    let mut out = BufReader::new(bt.stdout.take().context("bpftrace stdout")?);
    let mut first = String::new();
    out.read_line(&mut first)?;
    if !first.contains("Attaching") {
        crate::net::stop_child(bt, libc::SIGKILL);
        bail!("bpftrace did not attach: {first}");
    }
    let loaded = load();
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on our own child; bpftrace prints its maps on SIGINT.
    unsafe { libc::kill(bt.id() as i32, libc::SIGINT) };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut out, &mut text)?;
    let _ = bt.wait();
    loaded?;
    Ok(parse_profile(&text))
}

/// bpftrace's `@[ustack(1)]` map (`@[\n    sym+off\n]: N`) as (demangled function, samples),
/// largest first.
fn parse_profile(text: &str) -> Vec<(String, u64)> {
    let mut by: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    let mut frame = String::new();
    for l in text.lines().map(str::trim) {
        if let Some(n) = l.strip_prefix("]: ").or_else(|| l.strip_prefix("@[]: ")) {
            let name = if frame.is_empty() {
                "(no user frame)".to_string()
            } else {
                std::mem::take(&mut frame)
            };
            *by.entry(name).or_default() += n.trim().parse::<u64>().unwrap_or(0);
        } else if !l.is_empty() && !l.starts_with('@') {
            let sym = l.split('+').next().unwrap_or(l);
            frame = tidy(&format!("{:#}", rustc_demangle::demangle(sym)));
        }
    }
    let mut v: Vec<(String, u64)> = by.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// A function name as bpftrace's own demangler may leave a legacy Rust symbol
/// (`_$LT$a..B$GT$::f::h0123456789abcdef`) in Rust's spelling, without the hash.
fn tidy(name: &str) -> String {
    let mut n = name.to_string();
    if let Some((head, hash)) = n.rsplit_once("::h") {
        if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            n = head.to_string();
        }
    }
    for (from, to) in [
        ("$LT$", "<"),
        ("$GT$", ">"),
        ("$C$", ","),
        ("$u20$", " "),
        ("$RF$", "&"),
        ("$BP$", "*"),
        ("$u7b$", "{"),
        ("$u7d$", "}"),
        ("$u27$", "'"),
        ("..", "::"),
    ] {
        n = n.replace(from, to);
    }
    n.strip_prefix('_')
        .filter(|r| r.starts_with('<'))
        .map_or(n.clone(), str::to_string)
}

fn profile_table(p: &[(String, u64)]) -> String {
    profile_table_during(p, "during a storm", "during one more storm")
}

/// The 15 largest functions of a profile (`profile_during`) as a table, with a sentence saying
/// when it was taken (`what`: during what; `when`: the run it comes from).
pub fn profile_table_during(p: &[(String, u64)], what: &str, when: &str) -> String {
    let total: u64 = p.iter().map(|x| x.1).sum();
    let mut t = format!(
        "\nWhere the daemon's CPU goes {what}: {total} samples of bpftrace's `profile:hz:997` on the \
         daemon's threads {when} (not a measured round), by innermost user-space frame (for a \
         sample in the kernel, the function that made the system call); the 15 largest:\n\n\
         | function | samples | share |\n|---|---|---|\n"
    );
    for (f, n) in p.iter().take(15) {
        t.push_str(&format!(
            "| `{}` | {n} | {:.1}% |\n",
            f.replace('|', "\\|"),
            100.0 * *n as f64 / total.max(1) as f64
        ));
    }
    t
}

// ---------------------------------------------------------------------------------------------
// OOM latency

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// What the three observers saw, in the order they saw it.
#[derive(Default)]
struct Seen {
    /// (kill time from the event, seen at) from /api/v1/events.
    api: Vec<(f64, f64)>,
    /// The same from `sensor events` stdout.
    stdout: Vec<(f64, f64)>,
    /// When the counter reached 1, 2, ... for our cgroup in /metrics.
    metrics: Vec<f64>,
}

const POLL: Duration = Duration::from_millis(2);

fn poll_api(addr: std::net::SocketAddr, cgroup: &str, seen: &Mutex<Seen>, stop: &AtomicBool) {
    let mut since = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if let Ok((200, body)) = http_get(addr, &format!("/api/v1/events?since={since}")) {
            let t = now();
            if let Ok(serde_json::Value::Array(evs)) = serde_json::from_str(&body) {
                for e in evs {
                    since = since.max(e["seq"].as_u64().unwrap_or(0));
                    if e["type"] == "oom_kill" && e["cgroup"] == cgroup {
                        let kill = e["time"].as_f64().unwrap_or(f64::NAN);
                        seen.lock().unwrap_or_else(|p| p.into_inner()).api.push((kill, t));
                    }
                }
            }
        }
        std::thread::sleep(POLL);
    }
}

fn poll_metrics(addr: std::net::SocketAddr, cgroup: &str, seen: &Mutex<Seen>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        if let Ok((200, body)) = http_get(addr, "/metrics") {
            let t = now();
            let n = metric_sum(&body, "sensor_oom_kills_total", &[("cgroup", cgroup)]) as usize;
            let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
            while s.metrics.len() < n {
                s.metrics.push(t);
            }
        }
        std::thread::sleep(POLL);
    }
}

/// `p50` and `p99` (nearest rank) of `v`.
fn percentiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v[(((p * v.len() as f64).ceil() as usize).max(1) - 1).min(v.len() - 1)];
    (at(0.5), at(0.99), v[v.len() - 1])
}

pub fn run_oom(root: &Path, sensor_bin: &Path, o: &Opts) -> Result<()> {
    // Held to the end: the kernel lock.
    let bench = Bench::start(root, "oom-latency")?;
    let (m, dir) = (bench.machine.clone(), bench.dir.clone());
    let sensor = Served::sensor(sensor_bin, &[], &dir.join("sensor-oom.log"))?;
    let mut events = Command::new(sensor_bin)
        .arg("events")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start sensor events")?;
    let parent = crate::bench::kit::bench_cgroup("oom")?;
    let victim = parent.child("victim", Some(32 << 20))?;
    let victim_dir = victim.dir.clone();
    let cgroup = format!("{}/victim", parent.rel);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    {
        let err = events.stderr.take().context("stderr")?;
        let ready = Arc::clone(&ready);
        let log = dir.join("sensor-events-oom.log");
        threads.push(std::thread::spawn(move || {
            let mut f = std::fs::File::create(log).ok();
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if l.contains("streaming events") {
                    ready.store(true, Ordering::Relaxed);
                }
                if let Some(f) = f.as_mut() {
                    use std::io::Write as _;
                    let _ = writeln!(f, "{l}");
                }
            }
        }));
        let out = events.stdout.take().context("stdout")?;
        let (seen, cgroup) = (Arc::clone(&seen), cgroup.clone());
        threads.push(std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let t = now();
                if let Ok(e) = serde_json::from_str::<serde_json::Value>(&l) {
                    if e["type"] == "oom_kill" && e["cgroup"] == cgroup.as_str() {
                        let kill = e["time"].as_f64().unwrap_or(f64::NAN);
                        seen.lock().unwrap_or_else(|p| p.into_inner()).stdout.push((kill, t));
                    }
                }
            }
        }));
    }
    for poll in [poll_api as fn(_, &str, &Mutex<Seen>, &AtomicBool), poll_metrics] {
        let (seen, stop, cgroup, addr) = (Arc::clone(&seen), Arc::clone(&stop), cgroup.clone(), sensor.addr);
        threads.push(std::thread::spawn(move || poll(addr, &cgroup, &seen, &stop)));
    }
    let t = Instant::now();
    while !ready.load(Ordering::Relaxed) {
        if t.elapsed() > Duration::from_secs(30) || matches!(events.try_wait(), Ok(Some(_))) {
            bail!("`sensor events` did not start streaming (log: target/bench/sensor-events-oom.log)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let result = cause_kills(&victim_dir, o.kills, &seen);
    stop.store(true, Ordering::Relaxed);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(events.id() as i32, libc::SIGINT) };
    let _ = events.wait();
    for th in threads {
        let _ = th.join();
    }
    drop(sensor);
    drop(parent);
    result?;
    let s = std::mem::take(&mut *seen.lock().unwrap_or_else(|p| p.into_inner()));
    let (rows, body) = oom_report(o, &s);
    for r in &rows {
        eprintln!("==> {}: {} (goal {}: {})", r.what, r.ours, r.goal, r.verdict);
    }
    store(root, "oom-latency", &m, &rows, &body)
}

/// Causes `n` OOM kills one after another, each once all three observers saw the one before.
fn cause_kills(dir: &Path, n: usize, seen: &Mutex<Seen>) -> Result<()> {
    for i in 1..=n {
        let (pid, st) = oom_victim(dir, 256 << 20)?;
        if !(libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL) {
            bail!("victim {pid} was not OOM-killed (wait status {st:#x})");
        }
        let t = Instant::now();
        loop {
            let (a, b, c) = {
                let s = seen.lock().unwrap_or_else(|p| p.into_inner());
                (s.api.len(), s.stdout.len(), s.metrics.len())
            };
            if a >= i && b >= i && c >= i {
                break;
            }
            if t.elapsed() > Duration::from_secs(10) {
                bail!("kill {i}: seen {a} times in /api/v1/events, {b} on `sensor events` stdout, {c} in /metrics after 10 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if i % 10 == 0 || i == n {
            eprintln!("    {i}/{n} OOM kills seen by all three");
        }
    }
    Ok(())
}

fn oom_report(o: &Opts, s: &Seen) -> (Vec<Row>, String) {
    let ms = |v: &[(f64, f64)]| v.iter().map(|(k, t)| 1e3 * (t - k)).collect::<Vec<f64>>();
    let api = ms(&s.api);
    let out = ms(&s.stdout);
    let met: Vec<f64> = s.metrics.iter().zip(&s.api).map(|(t, (k, _))| 1e3 * (t - k)).collect();
    let (a50, a99, amax) = percentiles(api);
    let (o50, o99, omax) = percentiles(out);
    let (m50, m99, mmax) = percentiles(met);
    let row = |what: &str, p99: f64, p50: f64| {
        let mut r = Row::measured(what, p99, " ms", 1, "-", Goal::AtMost(50.0), "p99 ≤ 50 ms");
        r.ours = format!("p99 {p99:.1} ms (p50 {p50:.1} ms)");
        r
    };
    let rows = vec![
        row(&format!("OOM kill -> /api/v1/events, {} kills", o.kills), a99, a50),
        row("OOM kill -> `sensor events` stdout", o99, o50),
        row("OOM kill -> counter in /metrics", m99, m50),
    ];
    let t = format!(
        "{n} real OOM kills, one after another: xtask forks a process into a memory cgroup limited to 32 MiB (no \
         swap) under a uniquely named parent (`sensor-bench-oom-PID/victim`) that touches 256 MiB until the \
         kernel kills it; the next starts once all three observers saw the last. Kill time = the event's own \
         `time`, the kernel's timestamp of the kill (bpf_ktime_get_ns at the probe, converted to wall time by \
         the daemon). Observers, in xtask: a poller of `/api/v1/events?since=SEQ` every {p} ms; a reader of the \
         stdout of a `sensor events` process running alongside the daemon (its own probes, default config); a \
         poller of `/metrics` every {p} ms for `sensor_oom_kills_total{{cgroup=...}}`. Latency = the wall time \
         the observer got the answer minus the kill time; the pollers add up to {p} ms plus one request. \
         Percentiles are nearest-rank.\n\n\
         | | p50 ms | p99 ms | max ms |\n|---|---|---|---|\n\
         | kill -> /api/v1/events | {a50:.1} | {a99:.1} | {amax:.1} |\n\
         | kill -> `sensor events` stdout | {o50:.1} | {o99:.1} | {omax:.1} |\n\
         | kill -> counter in /metrics | {m50:.1} | {m99:.1} | {mmax:.1} |\n\n\
         Reproduce: `cargo xtask bench oom-latency --kills {n}` (as root; holds {lock}).\n",
        n = o.kills,
        p = POLL.as_millis(),
        lock = crate::bench::kit::KERNEL_LOCK_FILE,
    );
    (rows, t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bpftrace_profile_is_summed_per_demangled_function() {
        let text = "Attaching 1 probe...\n\n@[\n    _ZN4core3ptr13drop_in_place17h0123456789abcdefE+10\n]: 3\n\
                    @[\n    _ZN4core3ptr13drop_in_place17h0123456789abcdefE+22\n]: 2\n@[\n    epoll_wait+71\n]: 7\n@[]: 1\n";
        assert_eq!(
            parse_profile(text),
            [
                ("epoll_wait".to_string(), 7),
                ("core::ptr::drop_in_place".to_string(), 5),
                ("(no user frame)".to_string(), 1)
            ]
        );
    }

    #[test]
    fn legacy_names_read_as_rust() {
        assert_eq!(
            tidy("_$LT$alloc..collections..btree..map..BTreeMap$LT$K$C$V$C$A$GT$$u20$as$u20$core..ops..drop..Drop$GT$::drop::h215ca57fb1e760f7"),
            "<alloc::collections::btree::map::BTreeMap<K,V,A> as core::ops::drop::Drop>::drop"
        );
        assert_eq!(
            tidy("sensor::events::EventHub::publish::hed20586444464fa2"),
            "sensor::events::EventHub::publish"
        );
        assert_eq!(tidy("epoll_wait"), "epoll_wait");
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentiles(v), (50.0, 99.0, 100.0));
        assert_eq!(percentiles(vec![3.0]), (3.0, 3.0, 3.0));
    }
}
