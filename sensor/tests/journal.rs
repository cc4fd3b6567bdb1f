//! The event journal on a real kernel: `kill -9` mid-storm and restart (no program or link of
//! the dead daemon left, history intact, torn tail cut and counted, kills while down counted
//! per workload), the disk bound, `sensor events --since` across a restart, and
//! `journal.enabled: false`.

mod common;

use std::{
    collections::BTreeSet,
    net::TcpStream,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use common::{free_port, Daemon, MemCgroup};
use sensor::journal::format;
use serde_json::Value;

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sensor-journal-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn seq(e: &Value) -> u64 {
    e["seq"].as_u64().expect("seq")
}

/// Every event of `/api/v1/events` with `since < seq <= upto`, paging with `?since=`.
fn history(d: &Daemon, since: u64, upto: u64) -> Vec<Value> {
    let mut out = Vec::new();
    let mut s = since;
    loop {
        let page = d.events(s);
        if page.is_empty() {
            return out;
        }
        for e in page {
            let q = seq(&e);
            assert!(q > s, "ids increase: {q} after {s}");
            if q > upto {
                return out;
            }
            s = q;
            out.push(e);
        }
    }
}

/// `bpftool -j <what> show`.
fn bpf(what: &str) -> Vec<Value> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", what, "show"])
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "bpftool {what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Vec::new();
    }
    serde_json::from_slice(&out.stdout).expect("bpftool JSON")
}

fn ids(v: &[Value]) -> BTreeSet<u64> {
    v.iter().filter_map(|p| p["id"].as_u64()).collect()
}

/// `n` refused connects to `port` from inside `cg`.
fn refused_connects(cg: &MemCgroup, port: u16, n: u32) {
    let st = cg.run(&format!(
        "bash -c 'for i in $(seq {n}); do {{ : </dev/tcp/127.0.0.1/{port}; }} 2>/dev/null; done; true'"
    ));
    assert!(st.success(), "connects from {}: {st}", cg.rel);
}

fn sensor_events(args: &[&str]) -> std::process::Output {
    common::run_sensor(&[&["events"], args].concat())
}

fn newest_segment(dir: &Path) -> PathBuf {
    sensor::journal::list_segments(dir)
        .expect("segments")
        .pop()
        .expect("a segment")
        .1
}

fn oom_kills_in(events: &[Value], cg: &MemCgroup) -> u64 {
    events
        .iter()
        .filter(|e| e["type"] == "oom_kill" && e["cgroup"] == cg.rel.as_str())
        .count() as u64
}

#[test]
fn kill_9_mid_storm_then_restart_loses_nothing() {
    let Some(_g) = common::privileged("kill_9_mid_storm_then_restart_loses_nothing") else {
        return;
    };
    if !common::require_tool("bpftool", "cargo xtask deps installs it") {
        return;
    }
    let jdir = tmp_dir("restart");
    let jpath = jdir.display().to_string();
    let args = ["--journal.path", jpath.as_str(), "--journal.fsync", "batch"];
    let a = MemCgroup::new("journal-restart-a", 32 << 20);
    let b = MemCgroup::new("journal-restart-b", 32 << 20);
    let (base_progs, base_links) = (ids(&bpf("prog")), ids(&bpf("link")));

    let mut d1 = Daemon::start(&args);
    let progs = bpf("prog");
    let ours: BTreeSet<u64> = ids(&progs).difference(&base_progs).copied().collect();
    let names: BTreeSet<String> = progs
        .iter()
        .filter(|p| p["id"].as_u64().is_some_and(|i| ours.contains(&i)))
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect();
    let our_links: BTreeSet<u64> = ids(&bpf("link")).difference(&base_links).copied().collect();
    assert!(
        !ours.is_empty() && !our_links.is_empty(),
        "the daemon attached programs and links"
    );

    // Kills seen live.
    for _ in 0..3 {
        a.cause_oom_kill();
    }
    d1.wait_metric_sum(
        "sensor_oom_kills_total",
        &[("cgroup", &a.rel)],
        3.0,
        Duration::from_secs(30),
    );

    // A connect storm and OOM kills going on while the daemon is killed.
    let stop = AtomicBool::new(false);
    let storm_kills = AtomicU64::new(0);
    let closed = free_port();
    let (w, e1, dropped) = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let _ = TcpStream::connect(("127.0.0.1", closed));
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                a.cause_oom_kill();
                storm_kills.fetch_add(1, Ordering::Relaxed);
            }
        });
        std::thread::sleep(Duration::from_millis(1500));
        // What the journal holds for sure: every event up to its last written id.
        let m = d1.metrics();
        let w = common::metric(&m, "sensor_journal_last_written_seq", &[]).unwrap_or(0.0) as u64;
        let dropped = common::metric_sum(&m, "sensor_journal_records_dropped_total", &[]);
        let e1 = history(&d1, 0, w);
        std::thread::sleep(Duration::from_millis(300));
        d1.signal(libc::SIGKILL);
        let st = d1.child.as_mut().unwrap().wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGKILL));
        stop.store(true, Ordering::Relaxed);
        (w, e1, dropped)
    });
    assert_eq!(dropped, 0.0, "the journal kept up with the storm");
    assert!(storm_kills.load(Ordering::Relaxed) > 0);
    assert!(
        e1.len() as u64 >= 3 && seq(e1.last().unwrap()) == w,
        "{} events up to {w}",
        e1.len()
    );
    assert!(oom_kills_in(&e1, &a) >= 3);
    assert!(e1.iter().any(|e| e["type"] == "tcp_connect_failure"));

    // Nothing of the dead daemon stays in the kernel.
    let start = Instant::now();
    loop {
        let (p, l) = (bpf("prog"), ids(&bpf("link")));
        let left: Vec<u64> = ids(&p).intersection(&ours).copied().collect();
        let left_links: Vec<u64> = l.intersection(&our_links).copied().collect();
        let strangers: Vec<&Value> = p
            .iter()
            .filter(|x| !base_progs.contains(&x["id"].as_u64().unwrap_or(0)))
            .filter(|x| x["name"].as_str().is_some_and(|n| names.contains(n)))
            .collect();
        if left.is_empty() && left_links.is_empty() && strangers.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "left after kill -9: programs {left:?}, links {left_links:?}, {strangers:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Kills while no daemon runs.
    for _ in 0..2 {
        a.cause_oom_kill();
    }
    for _ in 0..4 {
        b.cause_oom_kill();
    }
    // A torn append (power loss mid-write) on top of whatever the kill left.
    let seg = newest_segment(&jdir);
    let bytes = std::fs::read(&seg).unwrap();
    let scan = format::scan(&bytes);
    let natural_tear = scan.tail.cut_at();
    let keep = natural_tear.unwrap_or(bytes.len());
    let mut torn = bytes.clone();
    torn.extend_from_slice(b"\x30\x00\x00\x00\x01");
    std::fs::write(&seg, &torn).unwrap();
    let journal_max = scan
        .records
        .iter()
        .filter_map(|r| match format::decode(r) {
            Ok(format::Entry::Event { seq, .. }) => Some(seq),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let (a_kernel, b_kernel) = (a.kernel_oom_kills(), b.kernel_oom_kills());
    assert_eq!(b_kernel, 4);

    let d2 = Daemon::start(&args);
    let m = d2.metrics();
    assert_eq!(
        common::metric(&m, "sensor_journal_tail_cuts_total", &[]),
        Some(1.0),
        "natural tear: {natural_tear:?}"
    );
    assert_eq!(
        common::metric(&m, "sensor_journal_tail_cut_bytes_total", &[]),
        Some((torn.len() - keep) as f64)
    );
    assert!(d2.log().contains("tail cut"), "{}", d2.log());
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), keep as u64, "cut on disk");
    // It attached again.
    let now = ids(&bpf("prog"));
    assert!(
        now.difference(&base_progs).count() >= ours.len(),
        "programs attached again"
    );
    // Counters restart at zero.
    assert_eq!(d2.metric_sum("sensor_oom_kills_total", &[("cgroup", &a.rel)]), 0.0);

    // Every event the first daemon wrote, exactly.
    let e2 = history(&d2, 0, w);
    assert_eq!(e2.len(), e1.len());
    for (x, y) in e1.iter().zip(&e2) {
        assert_eq!(x, y);
    }
    let all = history(&d2, 0, u64::MAX);
    let down: Vec<&Value> = all.iter().filter(|e| e["type"] == "kills_while_down").collect();
    assert_eq!(down.len(), 1, "{down:?}");
    let down = down[0];
    let run1: Vec<Value> = all.iter().filter(|e| seq(e) < seq(down)).cloned().collect();
    // Without `since`: the newest events, across the restart.
    let (code, body) = d2.get("/api/v1/events");
    assert_eq!(code, 200);
    let newest: Vec<Value> = serde_json::from_str(&body).unwrap();
    if all.len() <= 1000 {
        assert_eq!(newest, all);
    }
    assert!(seq(down) > journal_max, "ids stay monotonic across the restart");
    assert!(all.windows(2).all(|p| seq(&p[1]) > seq(&p[0])));
    let per = |cg: &MemCgroup| {
        down["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["cgroup"] == cg.rel.as_str())
            .map_or(0, |w| w["kills"].as_u64().unwrap())
    };
    assert_eq!(per(&b), 4, "{down}");
    let a_published = oom_kills_in(&run1, &a);
    assert_eq!(per(&a), a_kernel - a_published, "{down}");
    assert!(per(&a) >= 2);
    assert_eq!(down["kills"].as_u64(), Some(per(&a) + per(&b)), "{down}");
    eprintln!(
        "journal restart: {} events up to id {w} intact ({} OOM kills of A), storm kills {}, natural tear {natural_tear:?}, kills while down A={} B={}, first id after restart {} (last written {journal_max})",
        e1.len(),
        oom_kills_in(&e1, &a),
        storm_kills.load(Ordering::Relaxed),
        per(&a),
        per(&b),
        seq(down)
    );

    // Live counting goes on from zero.
    a.cause_oom_kill();
    d2.wait_metric_sum(
        "sensor_oom_kills_total",
        &[("cgroup", &a.rel)],
        1.0,
        Duration::from_secs(30),
    );
    let port = free_port();
    refused_connects(&b, port, 20);
    d2.wait_metric_sum(
        "sensor_tcp_connects_total",
        &[("result", "refused"), ("cgroup", &b.rel)],
        20.0,
        Duration::from_secs(30),
    );
    let tail = history(&d2, seq(down), u64::MAX);
    assert_eq!(oom_kills_in(&tail, &a), 1);
    assert_eq!(d2.stop().code(), Some(0));

    // `sensor events --since` reads the same history without a daemon.
    let out = sensor_events(&["--since", &w.to_string(), "--journal.path", &jpath]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.iter().all(|e| seq(e) > w));
    assert!(lines.windows(2).all(|p| seq(&p[1]) > seq(&p[0])));
    assert_eq!(lines.iter().filter(|e| e["type"] == "kills_while_down").count(), 1);
    let _ = std::fs::remove_dir_all(&jdir);
}

#[test]
fn journal_stays_within_max_bytes_and_history_crosses_a_restart() {
    let Some(_g) = common::privileged("journal_stays_within_max_bytes_and_history_crosses_a_restart") else {
        return;
    };
    let jdir = tmp_dir("bound");
    let jpath = jdir.display().to_string();
    // An event per connect failure (no coalescing): they are what fills the journal.
    let args = [
        "--journal.path",
        jpath.as_str(),
        "--journal.max-bytes",
        "64KiB",
        "--probes.tcp.failure-events.interval",
        "0s",
    ];
    let cg = MemCgroup::new("journal-bound", 64 << 20);
    let d = Daemon::start(&args);
    let port = free_port();
    let n = 1500;
    refused_connects(&cg, port, n);
    d.wait_metric_sum(
        "sensor_tcp_connects_total",
        &[("result", "refused"), ("cgroup", &cg.rel)],
        f64::from(n),
        Duration::from_secs(60),
    );
    // Wait until the journal wrote the last event.
    let last = history(&d, 0, u64::MAX).last().map(seq).unwrap();
    let start = Instant::now();
    while common::metric(&d.metrics(), "sensor_journal_last_written_seq", &[]).unwrap_or(0.0) < last as f64 {
        assert!(start.elapsed() < Duration::from_secs(10), "journal behind");
        std::thread::sleep(Duration::from_millis(50));
    }
    let m = d.metrics();
    assert!(common::metric(&m, "sensor_journal_segments_removed_total", &[]).unwrap() > 0.0);
    assert!(common::metric(&m, "sensor_journal_bytes", &[]).unwrap() <= 65536.0);
    let on_disk: u64 = sensor::journal::list_segments(&jdir)
        .unwrap()
        .iter()
        .map(|(_, p)| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(on_disk <= 65536, "{on_disk} bytes on disk");
    assert_eq!(
        common::metric(&m, "sensor_journal_records_dropped_total", &[("reason", "queue_full")]),
        Some(0.0)
    );
    assert_eq!(d.stop().code(), Some(0));

    // History without a daemon: a contiguous, newest part of the events.
    let out = sensor_events(&["--since", "0", "--journal.path", &jpath]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let kept: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!kept.is_empty() && kept.len() < n as usize, "{} kept", kept.len());
    eprintln!(
        "journal bound: {n} connect failures, {} kept in {on_disk} bytes, {} segments removed",
        kept.len(),
        common::metric(&m, "sensor_journal_segments_removed_total", &[]).unwrap()
    );
    // Events of other cgroups (pressure, the host's own connects) may come after `last`.
    assert!(seq(kept.last().unwrap()) >= last);
    assert!(kept.windows(2).all(|p| seq(&p[1]) > seq(&p[0])));
    let last = seq(kept.last().unwrap());

    // After a clean restart ids continue exactly; old and new history read as one.
    let d = Daemon::start(&args);
    refused_connects(&cg, port, 5);
    d.wait_metric_sum(
        "sensor_tcp_connects_total",
        &[("result", "refused"), ("cgroup", &cg.rel)],
        5.0,
        Duration::from_secs(30),
    );
    let new = history(&d, last, u64::MAX);
    assert_eq!(seq(&new[0]), last + 1, "a clean shutdown takes no ids");
    let ours = new
        .iter()
        .filter(|e| e["type"] == "tcp_connect_failure" && e["cgroup"] == cg.rel.as_str())
        .count();
    assert_eq!(ours, 5);
    // The API reads the journal where memory has nothing. The journal is at its bound, so the
    // events written since the restart may have removed the oldest segment: the first event is
    // then a later one of `kept`, never one of this run.
    let first_page = d.events(0);
    let first = &first_page[0];
    assert!(seq(first) <= last, "the first page starts before the restart: {first}");
    let same = kept.iter().find(|e| seq(e) == seq(first));
    assert_eq!(
        Some(first),
        same,
        "the journal's oldest event is one read before the restart"
    );
    let last_new = seq(new.last().unwrap());
    let start = Instant::now();
    while common::metric(&d.metrics(), "sensor_journal_last_written_seq", &[]).unwrap_or(0.0) < last_new as f64 {
        assert!(start.elapsed() < Duration::from_secs(10), "journal behind");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = sensor_events(&["--since", &last.to_string(), "--journal.path", &jpath]);
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.first().map(seq), Some(last + 1));
    assert!(lines.len() >= new.len());
    assert_eq!(d.stop().code(), Some(0));
    let _ = std::fs::remove_dir_all(&jdir);
}

#[test]
fn journal_disabled_keeps_history_in_memory_only() {
    let Some(_g) = common::privileged("journal_disabled_keeps_history_in_memory_only") else {
        return;
    };
    let jdir = tmp_dir("disabled");
    let jpath = jdir.display().to_string();
    let args = [
        "--journal.enabled",
        "false",
        "--journal.path",
        jpath.as_str(),
        "--probes.tcp.failure-events.interval",
        "0s",
    ];
    let cg = MemCgroup::new("journal-disabled", 64 << 20);
    let port = free_port();
    let d = Daemon::start(&args);
    refused_connects(&cg, port, 3);
    d.wait_metric_sum(
        "sensor_tcp_connects_total",
        &[("result", "refused"), ("cgroup", &cg.rel)],
        3.0,
        Duration::from_secs(30),
    );
    let before = d.events(0);
    assert!(before.len() >= 3);
    assert_eq!(seq(&before[0]), 1);
    assert_eq!(common::metric(&d.metrics(), "sensor_journal_up", &[]), Some(0.0));
    assert_eq!(d.stop().code(), Some(0));
    assert!(!jdir.exists(), "nothing written to disk");

    let d = Daemon::start(&args);
    let after = d.events(0);
    assert!(
        after.iter().all(|e| e["cgroup"] != cg.rel.as_str()),
        "history does not survive the restart"
    );
    assert!(after.first().is_none_or(|e| seq(e) == 1), "ids start over");
    assert_eq!(d.stop().code(), Some(0));
    let out = sensor_events(&["--since", "0", "--journal.enabled", "false"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("journal.enabled is false"));
}

#[test]
fn check_alerts_are_journaled() {
    let Some(_g) = common::privileged("check_alerts_are_journaled") else {
        return;
    };
    // With the probes, and checks only (every probe disabled: no pipeline, same journal).
    for probes_off in [false, true] {
        let jdir = tmp_dir(if probes_off { "alerts-checks-only" } else { "alerts" });
        let jpath = jdir.display().to_string();
        let checks = format!(
            "[{{name: gone, type: http, url: \"http://127.0.0.1:{}/\", interval: 1s, timeout: 1s}}]",
            free_port()
        );
        let mut args = vec![
            "--journal.path",
            &jpath,
            "--checks",
            &checks,
            "--alerting.window",
            "3s",
            "--alerting.min-samples",
            "2",
        ];
        if probes_off {
            args.extend([
                "--probes.oom.enabled",
                "false",
                "--probes.memcg.enabled",
                "false",
                "--probes.tcp.enabled",
                "false",
            ]);
        }
        let d = Daemon::start(&args);
        d.wait_metric(
            "sensor_check_alert_firing",
            &[("check", "gone")],
            1.0,
            Duration::from_secs(30),
        );
        assert_eq!(d.stop().code(), Some(0));
        let out = sensor_events(&["--since", "0", "--journal.path", &jpath]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let alerts: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|e| e["type"] == "check_alert")
            .collect();
        assert_eq!(alerts.len(), 1, "probes off: {probes_off}: {alerts:?}");
        assert_eq!(
            (alerts[0]["check"].as_str(), alerts[0]["state"].as_str()),
            (Some("gone"), Some("firing"))
        );
        let _ = std::fs::remove_dir_all(&jdir);
    }
}
