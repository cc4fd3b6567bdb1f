//! TCP connects on the real kernel: exact success/failure counts per workload and destination,
//! latency and RTT histograms, timeouts in network namespaces we create, and a connect storm
//! whose successes plus losses add up exactly. Only loopback and our own namespaces are used.
//! Under CI=true these fail (never skip) when BPF cannot be loaded.

#[path = "../common/mod.rs"]
mod common;

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    sync::Arc,
    time::{Duration, Instant},
};

use common::*;

/// Not a test: the connector process the tests start inside a cgroup (`SENSOR_TCP_TARGET` set).
#[test]
#[ignore = "helper process started by the other tests"]
fn connector_helper() {
    let Ok(target) = std::env::var("SENSOR_TCP_TARGET") else {
        return;
    };
    let addr: SocketAddr = target.parse().expect("target");
    let count: u64 = std::env::var("SENSOR_TCP_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let threads: u64 = std::env::var("SENSOR_TCP_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    // With SENSOR_TCP_SECONDS each thread connects until that time passed (a storm of a given
    // length), else `count / threads` times.
    let until = std::env::var("SENSOR_TCP_SECONDS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .map(|s| std::time::Instant::now() + Duration::from_secs_f64(s));
    let more = |i: u64| match until {
        Some(t) => std::time::Instant::now() < t,
        None => i < count / threads,
    };
    if let Some(cpu) = std::env::var("SENSOR_TCP_CPU")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it; pid 0 is this process.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
    let (ok, refused, timeout, other) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut i = 0;
                while more(i) {
                    i += 1;
                    match TcpStream::connect(addr) {
                        Ok(c) => {
                            close_with_rst(&c);
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == ErrorKind::TimedOut => {
                            timeout.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            println!("connect error: {e}");
                            other.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    println!(
        "RESULT ok={} refused={} timeout={} other={}",
        ok.into_inner(),
        refused.into_inner(),
        timeout.into_inner(),
        other.into_inner()
    );
}

/// Runs the connector in `cg` (and `netns`); returns (ok, refused, timeout, other).
fn connect(
    cg: &MemCgroup,
    netns: Option<&str>,
    target: SocketAddr,
    count: u64,
    threads: u64,
    cpu: Option<usize>,
) -> [u64; 4] {
    connector(
        cg,
        netns,
        target,
        &[("SENSOR_TCP_COUNT", count.to_string())],
        threads,
        cpu,
    )
}

/// [`connect`] for `seconds` instead of a number of connects.
fn connect_for(cg: &MemCgroup, netns: Option<&str>, target: SocketAddr, seconds: f64, threads: u64) -> [u64; 4] {
    connector(
        cg,
        netns,
        target,
        &[("SENSOR_TCP_SECONDS", seconds.to_string())],
        threads,
        None,
    )
}

fn connector(
    cg: &MemCgroup,
    netns: Option<&str>,
    target: SocketAddr,
    how: &[(&'static str, String)],
    threads: u64,
    cpu: Option<usize>,
) -> [u64; 4] {
    let exe = std::env::current_exe().unwrap();
    let exe = exe.to_str().unwrap();
    let mut env = vec![
        ("SENSOR_TCP_TARGET", target.to_string()),
        ("SENSOR_TCP_THREADS", threads.to_string()),
    ];
    env.extend(how.iter().cloned());
    if let Some(c) = cpu {
        env.push(("SENSOR_TCP_CPU", c.to_string()));
    }
    let out = cg.exec(
        netns,
        &[
            exe,
            "--ignored",
            "--exact",
            "connector_helper",
            "--nocapture",
            "--test-threads=1",
        ],
        &env,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.find("RESULT ").map(|i| &l[i..]))
        .unwrap_or_else(|| {
            panic!(
                "connector printed no result:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let get = |k: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let r = [get("ok"), get("refused"), get("timeout"), get("other")];
    if r[3] > 0 {
        eprintln!("connector errors to {target}:\n{stdout}");
    }
    r
}

/// A listener that accepts and drops connections until the returned flag is set.
fn server(addr: &str) -> (SocketAddr, Arc<AtomicBool>) {
    let l = TcpListener::bind(addr).expect("bind");
    // A deep accept queue so a storm does not overflow it (std listens with 128).
    // SAFETY: valid listening fd.
    unsafe { libc::listen(l.as_raw_fd(), 4096) };
    let local = l.local_addr().unwrap();
    l.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s = Arc::clone(&stop);
    std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            match l.accept() {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_micros(200)),
                Err(_) => {}
            }
        }
    });
    (local, stop)
}

/// [`server`] inside network namespace `ns` (the socket is created there; setns on a thread
/// of its own).
fn server_in(ns: &str, addr: &str) -> (SocketAddr, Arc<AtomicBool>) {
    common::netns::in_netns(ns, || server(addr))
}

/// A port on `ip` where nothing listens.
fn closed_port(ip: &str) -> SocketAddr {
    TcpListener::bind(format!("{ip}:0")).unwrap().local_addr().unwrap()
}

fn config(dests: &[(&str, String)]) -> std::path::PathBuf {
    config_with(dests, "")
}

/// A config file with destination groups and `tcp_keys` (lines under `probes.tcp`).
fn config_with(dests: &[(&str, String)], tcp_keys: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sensor-tcp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join(format!("tcp-{}.yaml", dests.first().map_or("none", |d| d.0)));
    let mut text = format!("probes:\n  tcp:\n{tcp_keys}    destinations:\n");
    for (name, d) in dests {
        text.push_str(&format!("      {name}: \"{d}\"\n"));
    }
    std::fs::write(&f, text).unwrap();
    f
}

/// The daemon with a TCP config file and fast cgroup discovery, plus `extra` flags.
fn daemon(cfg: &std::path::Path, extra: &[&str]) -> Daemon {
    daemon_with(cfg, extra, &[])
}

/// [`daemon`] with environment variables.
fn daemon_with(cfg: &std::path::Path, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
    let mut args = vec![
        "--config",
        cfg.to_str().unwrap(),
        "--probes.memcg.discovery-interval",
        "200ms",
    ];
    args.extend_from_slice(extra);
    Daemon::start_with(&args, None, env)
}

fn series<'a>(result: &'a str, dest: &'a str, cg: &'a MemCgroup) -> Vec<(&'a str, &'a str)> {
    plain(&[("result", result), ("destination", dest)], cg.rel.as_str())
}

/// Connects the sensor could not count: an end without its start (`untracked`), no room in a map
/// (`map_full`). Runs the kernel skipped (`recursion`)
/// are not added: their effect shows up in these, or the sensor recovers the count.
fn connect_losses(m: &str) -> u64 {
    ["untracked", "map_full"]
        .iter()
        .map(|r| metric(m, "sensor_events_lost_total", &[("probe", "tcp"), ("reason", r)]).unwrap_or(0.0) as u64)
        .sum()
}

/// `sensor_events_lost_total{probe="tcp",reason}`.
fn lost(m: &str, reason: &str) -> u64 {
    metric(m, "sensor_events_lost_total", &[("probe", "tcp"), ("reason", reason)]).unwrap_or(0.0) as u64
}

/// `sensor_tcp_recovered_total{result}`: connect ends the error-report program recovered.
fn recovered(m: &str, result: &str) -> u64 {
    metric(m, "sensor_tcp_recovered_total", &[("result", result)]).unwrap_or(0.0) as u64
}

/// Whether this kernel ends connects with `tcp_done_with_error()` (the state change before the
/// error report), where the recovery program must attach.
fn kernel_orders_connect_ends() -> bool {
    std::fs::read_to_string("/proc/kallsyms")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("tcp_done_with_error"))
}

/// The hook of the TCP probe's `connect end recovery` group (`null` when it is off).
fn recovery_hook(d: &Daemon) -> serde_json::Value {
    let (code, body) = d.get("/api/v1/probes");
    assert_eq!(code, 200);
    let probes: serde_json::Value = serde_json::from_str(&body).unwrap();
    let tcp = probe_report(&probes, "tcp");
    let g = tcp["groups"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["purpose"] == "connect end recovery"))
        .unwrap_or_else(|| panic!("no connect end recovery group: {tcp}"));
    g["hook"].clone()
}

/// Polls a counter until it reaches `want` or `limit` passes; its last value.
fn wait_timeouts(d: &Daemon, labels: &[(&str, &str)], want: u64, limit: Duration) -> u64 {
    let start = std::time::Instant::now();
    loop {
        let v = metric(&d.metrics(), "sensor_tcp_connects_total", labels).unwrap_or(0.0) as u64;
        if v >= want || start.elapsed() > limit {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Slots of `TCP_CONNS` still holding a connect to `target` (read with bpftool).
fn occupied_slots(target: SocketAddr) -> u64 {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "name", "TCP_CONNS"])
        .output()
        .expect("bpftool (installed by cargo xtask deps)");
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let want: [u8; 16] = match target.ip() {
        std::net::IpAddr::V4(a) => {
            let mut b = [0; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        std::net::IpAddr::V6(a) => a.octets(),
    };
    entries
        .iter()
        .filter(|e| {
            let v: Vec<u8> = e["value"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| u8::from_str_radix(x.as_str()?.trim_start_matches("0x"), 16).ok())
                        .collect()
                })
                .unwrap_or_default();
            // ConnSlot: state (u64) at 0, dport (u16) at 28, daddr at 48..64.
            v.len() == 64
                && u64::from_le_bytes(v[..8].try_into().unwrap()) > 1
                && u16::from_le_bytes([v[28], v[29]]) == target.port()
                && v[48..64] == want
        })
        .count() as u64
}

fn tcp_failures(d: &Daemon, port: u16) -> Vec<serde_json::Value> {
    d.events(0)
        .into_iter()
        .filter(|e| e["type"] == "tcp_connect_failure" && e["port"] == port)
        .collect()
}

/// The failures an event stands for (`count`: 1, or the sum over its interval).
fn count(e: &serde_json::Value) -> u64 {
    e["count"].as_u64().unwrap_or_else(|| panic!("no count: {e}"))
}

/// The failure events to `port` once their counts add up to `want` (sums are published at the
/// end of `probes.tcp.failure_events.interval`, 1 s by default), or after 5 s.
fn wait_failures(d: &Daemon, port: u16, want: u64) -> Vec<serde_json::Value> {
    let start = std::time::Instant::now();
    loop {
        let ev = tcp_failures(d, port);
        if ev.iter().map(count).sum::<u64>() >= want || start.elapsed() > Duration::from_secs(5) {
            return ev;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

mod counts;
mod netns;
mod retire;
mod storms;
mod table;
mod timeouts;

// Each part sees the others' helpers through `use super::*`.
#[allow(unused_imports)]
use self::{counts::*, netns::*, retire::*, storms::*, table::*, timeouts::*};
