//! The bounded workload sets watch what matters: on a host with more memory cgroups than
//! `limits.workloads_per_metric` (many empty leftovers, some idle, created before the sensor),
//! workloads that start growing or connecting later displace idle members: the growing ones
//! get a history and their kill a lead-up, the connecting ones their own TCP series, and the
//! number left out is exported exactly. Under CI=true this fails (never skips) without BPF.

mod common;

use std::{
    io::Read,
    net::TcpListener,
    os::unix::process::ExitStatusExt,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::*;

const MIB: u64 = 1 << 20;

/// Every memory cgroup on the host but the root, as the sensor walks them.
fn memory_cgroups() -> usize {
    fn count(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| 1 + count(&e.path()))
                    .sum()
            })
            .unwrap_or(0)
    }
    let v1 = Path::new("/sys/fs/cgroup/memory");
    if v1.join("memory.limit_in_bytes").exists() {
        count(v1)
    } else {
        count(Path::new("/sys/fs/cgroup"))
    }
}

/// A process in `cg` that sleeps (an idle workload); killed by the caller.
fn idle_in(cg: &MemCgroup) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg("echo $$ > \"$1\" && exec sleep 600")
        .arg("sh")
        .arg(cg.dir.join("cgroup.procs"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sleep")
}

/// Grows 3 MiB/s in `cg` until the kernel kills it; returns its status.
fn grow_until_killed(cg: &MemCgroup) -> std::process::ExitStatus {
    cg.spawn_python(&leak_script(3.0)).wait().expect("wait python3")
}

/// Polls until `sensor_workloads_left_out{set}` equals the host's cgroups minus the bound
/// (other sessions may create or remove cgroups meanwhile: both sides are read each round).
fn wait_left_out(d: &Daemon, set: &str, bound: usize) -> f64 {
    let start = Instant::now();
    loop {
        let before = memory_cgroups();
        let m = d.metrics();
        let got = metric(&m, "sensor_workloads_left_out", &[("set", set)]);
        let after = memory_cgroups();
        let want = before.saturating_sub(bound) as f64;
        if before == after && got == Some(want) {
            return want;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "left out of {set}: {got:?}, want {want} ({before} cgroups, bound {bound})\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn active_workloads_displace_idle_and_empty_ones_and_the_rest_is_counted() {
    let Some(_k) = privileged("active_workloads_displace_idle_and_empty_ones_and_the_rest_is_counted") else {
        return;
    };
    // Leftovers first: 60 empty cgroups and 6 idle ones, all older than the sensor.
    let host = memory_cgroups();
    let empty: Vec<MemCgroup> = (0..60)
        .map(|i| MemCgroup::new(&format!("sensor-it-watch-empty{i}"), 1 << 30))
        .collect();
    let idle: Vec<MemCgroup> = (0..6)
        .map(|i| MemCgroup::new(&format!("sensor-it-watch-idle{i}"), 1 << 30))
        .collect();
    let mut sleepers: Vec<Child> = idle.iter().map(idle_in).collect();
    // Room for every cgroup the host had, the five workloads that start later and two more:
    // the set starts full of host, idle and empty cgroups.
    let (n_grow, n_conn) = (3, 2);
    let bound = host + n_grow + n_conn + 2;
    assert!(memory_cgroups() >= bound + 59, "more cgroups than the bound");
    let bound_s = bound.to_string();
    let d = Daemon::start(&[
        "--limits.workloads-per-metric",
        &bound_s,
        "--probes.oom.history.interval",
        "1s",
        "--probes.memcg.discovery-interval",
        "200ms",
    ]);
    let left_history = wait_left_out(&d, "oom_history", bound);
    let left_labels = wait_left_out(&d, "workload_labels", bound);
    eprintln!("bound {bound}: left out {left_history} (history), {left_labels} (labels)");

    // Now the workloads that matter start, each in a new cgroup.
    let growing: Vec<MemCgroup> = (0..n_grow)
        .map(|i| MemCgroup::new(&format!("sensor-it-watch-grow{i}"), 64 * MIB))
        .collect();
    let connecting: Vec<MemCgroup> = (0..n_conn)
        .map(|i| MemCgroup::new(&format!("sensor-it-watch-conn{i}"), 1 << 30))
        .collect();
    // The connecting workloads: 5 loopback connects each, then they stay in their cgroup.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let stop = Arc::clone(&stop);
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.read(&mut [0; 1]);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        })
    };
    let script = format!(
        "import socket, time\nfor _ in range(5): socket.create_connection(('127.0.0.1', {port})).close()\ntime.sleep(120)"
    );
    for cg in &connecting {
        sleepers.push(cg.spawn_python(&script));
    }
    // The growing workloads, all at once: each is OOM-killed after about 20 s.
    let statuses: Vec<std::process::ExitStatus> = std::thread::scope(|s| {
        let hs: Vec<_> = growing.iter().map(|cg| s.spawn(|| grow_until_killed(cg))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for st in &statuses {
        assert_eq!(
            st.signal(),
            Some(libc::SIGKILL),
            "grower should be OOM-killed, got {st}"
        );
    }
    for cg in &growing {
        let start = Instant::now();
        let e = loop {
            let kills: Vec<_> = d
                .oom_events(0)
                .into_iter()
                .filter(|e| e["cgroup"] == cg.rel.as_str())
                .collect();
            if let Some(e) = kills.last() {
                break e.clone();
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "no kill of {}:\n{}",
                cg.rel,
                d.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let l = &e["lead_up"];
        eprintln!("{}: {} samples, {}", cg.rel, l["samples"], l["verdict"]);
        assert!(
            l["samples"].as_u64().unwrap() >= 10,
            "history of a growing workload: {e}"
        );
        assert_ne!(e["reason"], "unknown", "{e}");
    }
    for cg in &connecting {
        let labels = [("cgroup", cg.rel.as_str()), ("result", "success")];
        d.wait_metric_sum("sensor_tcp_connects_total", &labels, 5.0, Duration::from_secs(10));
    }
    // Every cgroup not watched is counted, exactly; the active ones displaced idle or empty
    // members, each counted once more when it left.
    wait_left_out(&d, "oom_history", bound);
    wait_left_out(&d, "workload_labels", bound);
    let m = d.metrics();
    let total = metric(&m, "sensor_workloads_left_out_total", &[("set", "oom_history")]).unwrap();
    assert!(
        total >= left_history + (n_grow + n_conn) as f64,
        "each displacement counted: {total}"
    );
    stop.store(true, Ordering::Relaxed);
    acceptor.join().unwrap();
    for s in &mut sleepers {
        let _ = s.kill();
        let _ = s.wait();
    }
    assert_eq!(d.stop().code(), Some(0));
    drop((empty, idle, growing, connecting));
}
