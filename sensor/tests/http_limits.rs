//! The HTTP server's bounds against hostile clients, on the real daemon (every kernel probe off
//! and one loopback check, so no privileges are needed): slow clients, oversized heads, long
//! queries, large bodies, garbage, 1,000 idle connections and the connection limit, while a
//! normal scrape still answers within a second.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    time::{Duration, Instant},
};

use common::{http_get, metric, Daemon};

const NO_PROBES: &str = "probes: {oom: {enabled: false}, memcg: {enabled: false}, tcp: {enabled: false}}\n";

/// A config of no probes, one loopback check and `http` limits, written to a temp file.
fn config(name: &str, http: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sensor-http-limits-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join(name);
    std::fs::write(
        &p,
        format!(
            "{NO_PROBES}http: {http}\nchecks: [{{name: loop, type: http, url: 'http://127.0.0.1:9/', interval: 1s, timeout: 500ms}}]\n"
        ),
    )
    .unwrap();
    p
}

/// One test at a time: each measures time (scrapes within a second, closes after a timeout)
/// on shared CPUs, and the others' load would blur it.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn start(name: &str, http: &str) -> (Daemon, std::sync::MutexGuard<'static, ()>) {
    let guard = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let cfg = config(name, http);
    (Daemon::start(&["--config", cfg.to_str().unwrap()]), guard)
}

/// A normal scrape must answer within a second whatever else the server is being put through.
fn scrape_within_a_second(d: &Daemon) -> String {
    let t = Instant::now();
    let (code, body) = http_get(d.port, "/metrics").expect("scrape");
    let took = t.elapsed();
    assert_eq!(code, 200, "{body}");
    assert!(took < Duration::from_secs(1), "scrape took {took:?}");
    body
}

fn rejected(d: &Daemon, reason: &str) -> f64 {
    metric(&d.metrics(), "sensor_http_rejected_total", &[("reason", reason)]).unwrap_or(-1.0)
}

fn connect(d: &Daemon) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", d.port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s
}

/// Sends `raw` and returns everything the server answers until it closes.
fn exchange(d: &Daemon, raw: &[u8]) -> String {
    let mut s = connect(d);
    // The server may answer and close before taking all of an oversized request.
    let _ = s.write_all(raw);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn status(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// True once the server has closed `s` (EOF or reset), waiting at most `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut b = [0u8; 512];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn slow_client_is_closed_after_the_header_timeout() {
    let (d, _serial) = start("slow.yaml", "{header_read_timeout: 2s}");
    let before = rejected(&d, "header_timeout");
    let port = d.port;
    let started = Instant::now();
    // One byte per second: the request line alone would take 40 s.
    let writer = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let req = b"GET /metrics?name=a-rather-long-query HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
        let mut reader = s.try_clone().expect("clone");
        let closer = std::thread::spawn(move || {
            let mut b = [0u8; 64];
            reader.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let _ = reader.read(&mut b);
            Instant::now()
        });
        for byte in req {
            if s.write_all(&[*byte]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        closer.join().expect("reader")
    });
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(700));
        scrape_within_a_second(&d);
    }
    let closed_at = writer.join().expect("writer");
    let after = closed_at - started;
    assert!(
        after >= Duration::from_millis(1500) && after < Duration::from_secs(6),
        "slow client closed after {after:?}, want about 2 s"
    );
    assert_eq!(rejected(&d, "header_timeout"), before + 1.0);
}

#[test]
fn oversized_heads_long_queries_large_bodies_and_garbage_are_refused() {
    let (d, _serial) = start(
        "sizes.yaml",
        "{max_header_bytes: 8192, max_query_bytes: 256, max_body_bytes: 1024}",
    );
    let big = "a".repeat(32 * 1024);
    let answer = exchange(
        &d,
        format!("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes(),
    );
    assert!(
        status(&answer) == 431 || answer.is_empty(),
        "oversized head answered {answer:?}"
    );
    scrape_within_a_second(&d);

    let q = "q".repeat(1000);
    let answer = exchange(
        &d,
        format!("GET /api/v1/events?since=0&x={q} HTTP/1.0\r\n\r\n").as_bytes(),
    );
    assert_eq!(status(&answer), 414, "{answer}");
    let answer = exchange(&d, b"GET /api/v1/events?since=0 HTTP/1.0\r\n\r\n");
    assert_eq!(status(&answer), 200, "a short query still works: {answer}");

    let answer = exchange(
        &d,
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2000000\r\n\r\nxxxx",
    );
    assert_eq!(status(&answer), 413, "{answer}");

    let answer = exchange(&d, b"\x16\x03\x01\x02\x00garbage \x00\xff\r\n\r\n");
    assert_eq!(status(&answer), 400, "{answer:?}");
    let answer = exchange(&d, b"HELLO\r\n\r\n");
    assert_eq!(status(&answer), 400, "{answer:?}");

    scrape_within_a_second(&d);
    for (reason, want) in [
        ("header_size", 1.0),
        ("query_size", 1.0),
        ("body_size", 1.0),
        ("bad_request", 2.0),
    ] {
        assert_eq!(rejected(&d, reason), want, "reason {reason}");
    }
}

/// How many idle connections this process can open: 1,000, or fewer under a low fd limit
/// (the daemon inherits the same limit).
fn idle_connections() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    let soft = if ok { lim.rlim_cur as usize } else { 1024 };
    1000.min(soft.saturating_sub(200))
}

#[test]
fn a_thousand_idle_connections_are_closed_and_the_fds_come_back() {
    let n = idle_connections();
    eprintln!("opening {n} idle connections");
    let (d, _serial) = start("idle.yaml", "{header_read_timeout: 5s, max_connections: 1500}");
    let pid = d.pid();
    let baseline = open_fds(pid);
    let mut conns: Vec<TcpStream> = (0..n)
        .map(|i| {
            let mut s = connect(&d);
            // Half of them send half a request, the rest nothing at all.
            if i % 2 == 0 {
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                    .expect("write");
            }
            s
        })
        .collect();
    let opened = Instant::now();
    let mut held = open_fds(pid);
    while held < baseline + n * 9 / 10 && opened.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(100));
        held = open_fds(pid);
    }
    assert!(
        held >= baseline + n * 9 / 10,
        "daemon holds {held} fds, baseline {baseline}, {n} clients"
    );
    scrape_within_a_second(&d);
    let started = Instant::now();
    let mut still_open = 0;
    for s in &mut conns {
        let left = Duration::from_secs(15).saturating_sub(started.elapsed());
        if !closed_within(s, left.max(Duration::from_millis(10))) {
            still_open += 1;
        }
    }
    assert_eq!(still_open, 0, "connections the daemon kept open");
    drop(conns);
    std::thread::sleep(Duration::from_millis(300));
    let after = open_fds(pid);
    assert!(
        after <= baseline + 10,
        "daemon holds {after} fds after the timeout, baseline {baseline}"
    );
    scrape_within_a_second(&d);
    assert_eq!(rejected(&d, "header_timeout"), n as f64);
}

#[test]
fn connections_over_the_limit_are_closed_at_once() {
    let (d, _serial) = start("limit.yaml", "{max_connections: 8, header_read_timeout: 2s}");
    let held: Vec<TcpStream> = (0..8).map(|_| connect(&d)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = connect(&d);
    let t = Instant::now();
    assert!(
        closed_within(&mut extra, Duration::from_secs(1)),
        "9th connection was kept"
    );
    assert!(t.elapsed() < Duration::from_secs(1));
    drop(held);
    // The slots come back when the server sees the clients go.
    std::thread::sleep(Duration::from_millis(300));
    scrape_within_a_second(&d);
    assert_eq!(rejected(&d, "connections"), 1.0);
}

#[test]
fn a_client_that_never_reads_is_closed_after_the_write_timeout() {
    let (d, _serial) = start("stalled.yaml", "{write_timeout: 2s, header_read_timeout: 2s}");
    let mut s = connect(&d);
    s.set_nonblocking(true).unwrap();
    // Pipelined scrapes whose answers nobody reads: they fill both socket buffers.
    let req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(4000);
    let mut sent = 0;
    let t = Instant::now();
    while sent < req.len() && t.elapsed() < Duration::from_secs(5) {
        match s.write(&req[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => break,
        }
    }
    let started = Instant::now();
    let mut closed = false;
    while started.elapsed() < Duration::from_secs(15) {
        scrape_within_a_second(&d);
        if rejected(&d, "write_timeout") >= 1.0 {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(closed, "a connection nobody reads stayed open");
    // Everything left in the buffers is readable, then the connection ends.
    s.set_nonblocking(false).unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(5)), "connection still open");
}

#[test]
fn a_webhook_body_sent_one_byte_per_second_gets_408() {
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let port = common::free_port();
    let cfg = std::env::temp_dir().join(format!("sensor-http-limits-remediate-{}.yaml", std::process::id()));
    std::fs::write(
        &cfg,
        format!("listen: 127.0.0.1:{port}\nhttp: {{request_timeout: 2s}}\n"),
    )
    .unwrap();
    let child = std::process::Command::new(common::SENSOR)
        .args(["remediate", "--config"])
        .arg(&cfg)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn sensor remediate");
    // Reuses the daemon helpers (scrapes, counters) for the runner's own /metrics.
    let d = Daemon {
        child: Some(child),
        port,
        stderr_path: std::env::temp_dir().join("sensor-http-limits-remediate.log"),
    };
    let ready = Instant::now();
    while http_get(port, "/healthz").is_err() {
        assert!(
            ready.elapsed() < Duration::from_secs(20),
            "sensor remediate did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut s = connect(&d);
    s.write_all(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        .unwrap();
    let started = Instant::now();
    let mut writer = s.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        for _ in 0..20 {
            std::thread::sleep(Duration::from_secs(1));
            if writer.write_all(b" ").is_err() {
                break;
            }
        }
    });
    scrape_within_a_second(&d);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let took = started.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(status(&answer), 408, "{answer}");
    assert!(took < Duration::from_secs(6), "answered after {took:?}");
    let _ = trickle.join();
    assert_eq!(rejected(&d, "request_timeout"), 1.0);
}
