//! Real OOM storms (`stress-ng --vm` in a small memory cgroup) and stalled consumers: every kill
//! is counted or counted as lost, whatever happens to the daemon's logs, and no stalled consumer
//! (stderr, stdout of `sensor events`, an alert webhook, HTTP clients) slows anything else.
//! Under CI=true these fail (never skip) when BPF or stress-ng is missing.

mod common;

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use common::*;

fn stress_ng_present(test: &str) -> bool {
    let ok = Command::new("stress-ng").arg("--version").output().is_ok();
    require(test, ok, "stress-ng is missing (`cargo xtask deps` installs it)")
}

/// A `stress-ng --vm` OOM storm inside `cg` (64 MiB) in rounds of `secs` seconds: six workers
/// keep 60 MiB each, the kernel kills them over and over and stress-ng restarts them. A loaded
/// machine kills more slowly, so rounds go on (four at most) until this storm made `at_least`
/// kills. Returns the host's kills since `vm0` (its `oom_kill` count before) and the storm's
/// length in seconds, after checking they were all in `cg`.
fn storm(cg: &MemCgroup, secs: u32, vm0: u64, at_least: u64) -> (u64, f64) {
    let started = Instant::now();
    let before = vmstat_oom_kill();
    let t = format!("{secs}s");
    for _ in 0..4 {
        let out = cg.exec(
            None,
            &[
                "stress-ng",
                "--vm",
                "6",
                "--vm-bytes",
                "60M",
                "--vm-keep",
                "-t",
                &t,
                "--quiet",
            ],
            &[],
        );
        // stress-ng reports its killed workers as failures; the kills are what we want.
        let _ = out;
        if vmstat_oom_kill() - before >= at_least {
            break;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let caused = vmstat_oom_kill() - vm0;
    assert_eq!(
        cg.kernel_oom_kills(),
        caused,
        "every kill on the host was in the storm's cgroup"
    );
    (caused, secs)
}

/// (write end, read end) of a new pipe.
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just created by pipe2 and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[1]), OwnedFd::from_raw_fd(fds[0])) }
}

/// Shrinks a pipe to one page, so a few log lines fill it.
fn shrink_pipe(end: &OwnedFd) -> i32 {
    // SAFETY: F_SETPIPE_SZ takes an int argument; the fd is a pipe we own.
    unsafe { libc::fcntl(end.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) }
}

/// Bytes waiting in a pipe.
fn pipe_fill(read_end: &OwnedFd) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer we pass.
    unsafe { libc::ioctl(read_end.as_raw_fd(), libc::FIONREAD, &mut n) };
    n
}

/// Scrapes `/metrics` every 500 ms with a 1 s limit, until stopped; keeps each answer's time.
struct Scraper {
    stop: Arc<AtomicBool>,
    results: Arc<Mutex<Vec<Result<Duration, String>>>>,
    thread: Option<JoinHandle<()>>,
}

fn scrape_within(port: u16, limit: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, limit).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).map_err(|e| format!("read: {e}"))?;
    let took = start.elapsed();
    if !body.starts_with(b"HTTP/1.0 200") && !body.starts_with(b"HTTP/1.1 200") {
        return Err(format!(
            "answer: {}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        ));
    }
    if took > limit {
        return Err(format!("took {took:?}"));
    }
    Ok(took)
}

impl Scraper {
    fn start(port: u16) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (Arc::clone(&stop), Arc::clone(&results));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let next = Instant::now() + Duration::from_millis(500);
                let res = scrape_within(port, Duration::from_secs(1));
                r.lock().unwrap().push(res);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        });
        Scraper {
            stop,
            results,
            thread: Some(thread),
        }
    }

    /// Stops and checks that every scrape answered within a second; returns (scrapes, slowest).
    fn finish(mut self) -> (usize, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let results = self.results.lock().unwrap();
        let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(
            failed.is_empty(),
            "{} of {} scrapes failed: {failed:?}",
            failed.len(),
            results.len()
        );
        let slowest = results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .max()
            .copied()
            .unwrap_or_default();
        (results.len(), slowest)
    }
}

/// Kills counted (every `sensor_oom_kills_total` series) and OOM records lost (every reason).
fn counted_and_lost(d: &Daemon) -> (u64, u64) {
    let m = d.metrics();
    (
        metric_sum(&m, "sensor_oom_kills_total", &[]) as u64,
        metric_sum(&m, "sensor_events_lost_total", &[("probe", "oom")]) as u64,
    )
}

/// Waits until counted + lost reaches `caused` (the kernel's count); returns (counted, lost).
fn settle(d: &Daemon, caused: u64) -> (u64, u64) {
    let start = Instant::now();
    loop {
        let (counted, lost) = counted_and_lost(d);
        if counted + lost >= caused || start.elapsed() > Duration::from_secs(15) {
            return (counted, lost);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn log_lines_dropped(d: &Daemon) -> u64 {
    metric(&d.metrics(), "sensor_log_lines_dropped_total", &[]).expect("sensor_log_lines_dropped_total") as u64
}

fn internal_errors(d: &Daemon) -> f64 {
    d.metric_sum("sensor_internal_errors_total", &[])
}

#[test]
fn oom_storm_every_kill_counted() {
    let Some(_k) = privileged("oom_storm_every_kill_counted") else {
        return;
    };
    if !stress_ng_present("oom_storm_every_kill_counted") {
        return;
    }
    let cg = MemCgroup::new("sensor-it-storm", 64 << 20);
    let d = Daemon::start(&[]);
    let scraper = Scraper::start(d.port);
    let vm0 = vmstat_oom_kill();
    let (caused, secs) = storm(&cg, 10, vm0, 50);
    assert!(caused >= 50, "a storm: only {caused} kills in {secs:.1} s");
    let (counted, lost) = settle(&d, caused);
    let (scrapes, slowest) = scraper.finish();
    eprintln!(
        "storm (logs flowing): {caused} kills in {secs:.1} s ({:.0}/s), counted {counted}, lost {lost}; {scrapes} scrapes, slowest {slowest:?}",
        caused as f64 / secs
    );
    assert_eq!(
        (counted, lost),
        (caused, 0),
        "kills caused = counted, none lost\n{}",
        d.log()
    );
    let m = d.metrics();
    assert_eq!(
        metric_sum(&m, "sensor_oom_kills_total", &[("cgroup", cg.rel.as_str())]) as u64,
        caused,
        "every kill attributed to the storm's cgroup"
    );
    assert_eq!(metric(&m, "sensor_log_lines_dropped_total", &[]), Some(0.0));
    assert_eq!(d.oom_events(0).len() as u64, caused.min(1000), "events history");
    assert_eq!(d.stop().code(), Some(0));
}

#[test]
fn oom_storm_with_a_stalled_then_closed_log_pipe() {
    let test = "oom_storm_with_a_stalled_then_closed_log_pipe";
    let Some(_k) = privileged(test) else {
        return;
    };
    if !stress_ng_present(test) {
        return;
    }
    let cg = MemCgroup::new("sensor-it-storm-pipe", 64 << 20);
    // stderr into a pipe nobody reads: a stalled log shim or journald. One page of pipe and a
    // short log queue, so a few dozen kill lines stall the writer and drop (and count) lines
    // however fast the storm runs.
    let (write_end, read_end) = pipe();
    assert_eq!(shrink_pipe(&read_end), 4096);
    let d = Daemon::start_with_stderr(&["--log-queue-lines", "16"], Some(Stdio::from(write_end)));
    let scraper = Scraper::start(d.port);
    let vm0 = vmstat_oom_kill();

    let (caused, secs) = storm(&cg, 10, vm0, 50);
    assert!(caused >= 50, "a storm: only {caused} kills in {secs:.1} s");
    assert!(
        pipe_fill(&read_end) > 2048,
        "the log pipe should be full (the daemon stalled on stderr); it holds {} bytes",
        pipe_fill(&read_end)
    );
    let (counted, lost) = settle(&d, caused);
    eprintln!(
        "storm (stderr stalled): {caused} kills in {secs:.1} s ({:.0}/s), counted {counted}, lost {lost}",
        caused as f64 / secs
    );
    assert_eq!(counted + lost, caused, "during the stall: caused = counted + lost");
    let dropped_stalled = log_lines_dropped(&d);
    assert!(dropped_stalled > 0, "a full log queue drops lines and counts them");

    // The log reader goes away: writes now fail (EPIPE), and the next storm is counted as well.
    drop(read_end);
    let (caused_all, secs2) = storm(&cg, 5, vm0, 20);
    let (counted_all, lost_all) = settle(&d, caused_all);
    let (scrapes, slowest) = scraper.finish();
    eprintln!(
        "storm (stderr closed): {} kills in {secs2:.1} s, counted {}, lost {}; {scrapes} scrapes, slowest {slowest:?}; log lines dropped {}",
        caused_all - caused,
        counted_all - counted,
        lost_all - lost,
        log_lines_dropped(&d)
    );
    assert!(caused_all - caused >= 20, "second storm: {} kills", caused_all - caused);
    assert_eq!(
        counted_all + lost_all,
        caused_all,
        "after the close: caused = counted + lost"
    );
    assert!(
        log_lines_dropped(&d) > dropped_stalled,
        "lines that fail to write (EPIPE) are counted"
    );
    assert_eq!(internal_errors(&d), 0.0, "no reader failed");
    assert_eq!(d.get("/readyz").0, 200);
    assert_eq!(d.stop().code(), Some(0));
}

/// A listener that accepts connections and never answers (kept open until the test ends).
fn hanging_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            held.push(s);
        }
    });
    addr
}

/// A listener answering every connection with `200 ok`.
fn healthy_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 2048];
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
        }
    });
    addr
}

/// Connections that ask for `/metrics` over and over and never read an answer, and connections
/// that send half a request: a stalled scraper and slow clients.
fn stalled_http_clients(port: u16) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for i in 0..40 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        if i % 2 == 0 {
            s.set_nonblocking(true).unwrap();
            let req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(200);
            match s.write(&req) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("stalled client: {e}"),
            }
        } else {
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost:").unwrap();
        }
        held.push(s);
    }
    held
}

/// Refused connects from this process to `addr`; returns how many were refused.
fn refused_connects(addr: SocketAddr, n: u64) -> u64 {
    (0..n)
        .filter(|_| matches!(TcpStream::connect(addr), Err(e) if e.kind() == ErrorKind::ConnectionRefused))
        .count() as u64
}

#[test]
fn stalled_consumers_slow_nothing_else() {
    let test = "stalled_consumers_slow_nothing_else";
    let Some(_k) = privileged(test) else {
        return;
    };
    let cg = MemCgroup::new("sensor-it-stalled", 24 << 20);
    let webhook = hanging_server();
    let ok = healthy_server();
    let down = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let refused_target = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let dir = std::env::temp_dir().join(format!("sensor-stalled-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "probes:\n  tcp:\n    destinations: {{storm: \"127.0.0.1/32:{}\"}}\n\
             alerting: {{availability_threshold: 0.8, window: 10s, min_samples: 2, webhook: \"http://{webhook}/hook\", webhook_retries: 0}}\n\
             checks:\n  - {{name: ok, type: http, url: \"http://{ok}/\", interval: 1s, timeout: 1s}}\n  - {{name: down, type: http, url: \"http://{down}/\", interval: 1s, timeout: 1s}}\n",
            refused_target.port()
        ),
    )
    .unwrap();
    let (write_end, read_end) = pipe();
    assert_eq!(shrink_pipe(&read_end), 4096);
    // Debug logging (a few lines per scrape and check run) fills the page of pipe and the
    // short queue within the first seconds.
    let d = Daemon::start_with(
        &["--config", cfg.to_str().unwrap(), "--log-queue-lines", "16"],
        Some(Stdio::from(write_end)),
        &[("RUST_LOG", "debug")],
    );
    let scraper = Scraper::start(d.port);
    let started = Instant::now();
    let clients = stalled_http_clients(d.port);

    const KILLS: usize = 5;
    const CONNECTS: u64 = 500;
    let pids: Vec<u32> = (0..KILLS).map(|_| cg.cause_oom_kill()).collect();
    assert_eq!(refused_connects(refused_target, CONNECTS), CONNECTS);

    let kill_labels = plain(&[("scope", "memcg")], cg.rel.as_str());
    d.wait_metric_sum(
        "sensor_oom_kills_total",
        &kill_labels,
        KILLS as f64,
        Duration::from_secs(5),
    );
    let refused = || {
        d.metric_sum(
            "sensor_tcp_connects_total",
            &[("result", "refused"), ("destination", "storm")],
        )
    };
    let start = Instant::now();
    while refused() < CONNECTS as f64 && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(refused(), CONNECTS as f64, "every refused connect counted");
    // The down check's alert fires (and waits for the hanging webhook) while everything runs.
    d.wait_metric(
        "sensor_check_alert_firing",
        &[("check", "down")],
        1.0,
        Duration::from_secs(15),
    );
    // The webhook's own loss is counted once its one attempt times out (10 s).
    d.wait_metric(
        "sensor_check_alert_notifications_total",
        &[("result", "failed")],
        1.0,
        Duration::from_secs(20),
    );
    let elapsed = started.elapsed().as_secs_f64();
    let runs = d.metric_sum("sensor_check_runs_total", &[("check", "ok"), ("result", "success")]);
    assert!(
        runs >= elapsed - 3.0,
        "the ok check runs every second regardless: {runs} runs in {elapsed:.1} s"
    );
    let events = d.events(0);
    let kills: Vec<u64> = events
        .iter()
        .filter(|e| e["type"] == "oom_kill")
        .filter_map(|e| e["victim_pid"].as_u64())
        .collect();
    assert_eq!(kills.len(), KILLS, "kills in the events history");
    assert!(pids.iter().all(|p| kills.contains(&u64::from(*p))));
    // Coalesced per interval: the events' counts add up to every refusal.
    let failures: u64 = events
        .iter()
        .filter(|e| e["type"] == "tcp_connect_failure" && e["port"] == refused_target.port())
        .map(|e| e["count"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(failures, CONNECTS, "connect failures in the events history");
    let (scrapes, slowest) = scraper.finish();
    eprintln!(
        "{scrapes} scrapes during the stalls, slowest {slowest:?}; log pipe holds {} bytes",
        pipe_fill(&read_end)
    );
    assert!(pipe_fill(&read_end) > 2048, "stderr really stalled");
    assert!(log_lines_dropped(&d) > 0, "the stalled log's losses are counted");
    assert_eq!(internal_errors(&d), 0.0);
    assert_eq!(d.get("/readyz").0, 200);
    drop(clients);
    drop(read_end);
    assert_eq!(d.stop().code(), Some(0));
}

#[test]
fn sensor_events_with_a_stalled_stdout_counts_what_it_skips() {
    let test = "sensor_events_with_a_stalled_stdout_counts_what_it_skips";
    let Some(_k) = privileged(test) else {
        return;
    };
    let target = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (write_end, read_end) = pipe();
    let log = std::env::temp_dir().join(format!("sensor-events-stalled-{}.log", std::process::id()));
    // Only TCP: every event is one of this test's refused connects.
    let mut child = Command::new(SENSOR)
        .args([
            "events",
            "--probes.oom.enabled",
            "false",
            "--probes.memcg.enabled",
            "false",
            // An event per failure (no coalescing): enough lines to fill the pipe.
            "--probes.tcp.failure-events.interval",
            "0s",
        ])
        .stdout(Stdio::from(write_end))
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn sensor events");
    let start = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("streaming events")
    {
        assert!(start.elapsed() < Duration::from_secs(30), "sensor events did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    // More events than the pipe (64 KiB, ~250 lines) and the hub's queue (1024) hold.
    const CONNECTS: u64 = 3000;
    assert_eq!(refused_connects(target, CONNECTS), CONNECTS);
    std::thread::sleep(Duration::from_millis(500));
    // Now read everything: what was printed plus what was skipped is every event.
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::from(read_end);
        let mut all = String::new();
        let _ = f.read_to_string(&mut all);
        all
    });
    std::thread::sleep(Duration::from_millis(1000));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let st = child.wait().unwrap();
    let printed = reader.join().unwrap();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let lines: Vec<&str> = printed.lines().collect();
    for l in &lines {
        let e: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert_eq!(e["type"], "tcp_connect_failure", "{l}");
    }
    // The summary at the end: what it printed and what it skipped.
    let summary = text
        .lines()
        .find(|l| l.contains("event stream ended"))
        .unwrap_or_else(|| panic!("no summary line\n{text}"));
    let field = |k: &str| -> u64 {
        summary
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {summary}"))
    };
    let (printed, skipped) = (field("printed"), field("skipped"));
    let ours = lines
        .iter()
        .filter(|l| l.contains(&format!("\"port\":{}", target.port())))
        .count() as u64;
    eprintln!(
        "sensor events: {} lines ({ours} of this test's connects), {skipped} skipped, of {CONNECTS} connects",
        lines.len()
    );
    assert_eq!(
        printed,
        lines.len() as u64,
        "the summary counts every line written\n{text}"
    );
    assert!(
        skipped > 0,
        "a stalled stdout makes the printer skip (and count) events\n{text}"
    );
    // Other processes on the host may fail connects too: every one of ours is printed or
    // skipped, and nothing is both.
    assert!(
        ours + skipped >= CONNECTS && ours <= CONNECTS,
        "printed {ours} of ours + skipped {skipped} must cover the {CONNECTS} connects\n{text}"
    );
    assert_eq!(st.code(), Some(0), "{text}");
}
