//! Which limit an OOM kill hit, on the real kernel: a kill in a child memory cgroup without a
//! limit under a parent that has one names the parent (`ancestor`); with both limited and the
//! child's smaller, the child (`self`). Checked on every surface the kill reaches: the event,
//! the journal (`sensor events --since`), the log line and the verdict. On this host (hybrid:
//! memory on v1, no kill context hook) from the path's counters and limits; on cgroup v2 with
//! the kernel's memcg in the QEMU matrix (tests/qemu.rs). Under CI=true these fail (never skip)
//! when BPF cannot be loaded.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// The OOM event of `cg`, waiting up to 5 s for it.
fn kill_of(d: &Daemon, cg: &MemCgroup) -> Value {
    let start = Instant::now();
    loop {
        if let Some(e) = d.oom_events(0).into_iter().find(|e| e["cgroup"] == cg.rel.as_str()) {
            return e;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "no kill event:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills a `tail` in `victim`, under a daemon journaling to a directory of its own; returns the
/// event from /api/v1/events, the same kill read back from the journal, and the daemon's log.
fn kill_in(name: &str, victim: &MemCgroup) -> (Value, Value, String) {
    let journal = std::env::temp_dir().join(format!("sensor-it-{name}-journal-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&journal);
    let jpath = journal.display().to_string();
    let d = Daemon::start(&["--journal.path", &jpath]);
    let pid = victim.cause_oom_kill();
    let e = kill_of(&d, victim);
    assert_eq!(e["victim_pid"], pid, "{e}");
    assert_eq!(e["scope"], "memcg", "{e}");
    let log = d.log();
    assert_eq!(d.stop().code(), Some(0));
    let out = run_sensor(&["events", "--since", "0", "--journal.path", &jpath]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let journaled = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|j| j["type"] == "oom_kill" && j["cgroup"] == victim.rel.as_str())
        .unwrap_or_else(|| panic!("the kill is not in the journal"));
    let _ = std::fs::remove_dir_all(&journal);
    (e, journaled, log)
}

#[test]
fn a_parent_limit_over_an_unlimited_child_is_the_ancestor() {
    let Some(_k) = privileged("a_parent_limit_over_an_unlimited_child_is_the_ancestor") else {
        return;
    };
    let parent = MemCgroup::new("sensor-it-pod", 32 * MIB);
    let child = MemCgroup::child(&parent, "job", u64::MAX);
    assert!(child.limit() > 1 << 62, "the child has no limit of its own");
    let (e, journaled, log) = kill_in("ancestor", &child);
    assert_eq!(e["limit_scope"], "ancestor", "{e}");
    assert_eq!(e["limit_cgroup"], parent.rel.as_str(), "{e}");
    assert_eq!(e["memory_limit_bytes"], Value::Null, "the child's own: none: {e}");
    assert_eq!(e["lead_up"]["limit_bytes"], 32 * MIB, "the limit that fired: {e}");
    let verdict = e["lead_up"]["verdict"].as_str().unwrap();
    eprintln!("{}: {verdict}", e["reason"]);
    assert!(
        verdict.ends_with(&format!(
            "the 32 MiB limit of ancestor {}, the cgroup has none",
            parent.rel
        )),
        "{e}"
    );
    assert_eq!(
        (&journaled["limit_scope"], &journaled["limit_cgroup"]),
        (&e["limit_scope"], &e["limit_cgroup"]),
        "journal: {journaled}"
    );
    assert!(
        log.contains(&format!("limit_cgroup={} limit_scope=\"ancestor\"", parent.rel)),
        "{log}"
    );
    drop(child);
}

#[test]
fn the_smaller_own_limit_under_a_limited_parent_is_self() {
    let Some(_k) = privileged("the_smaller_own_limit_under_a_limited_parent_is_self") else {
        return;
    };
    let parent = MemCgroup::new("sensor-it-slice", 64 * MIB);
    let child = MemCgroup::child(&parent, "job", 24 * MIB);
    let (e, journaled, log) = kill_in("self", &child);
    assert_eq!(e["limit_scope"], "self", "{e}");
    assert_eq!(e["limit_cgroup"], child.rel.as_str(), "{e}");
    assert_eq!(e["memory_limit_bytes"], 24 * MIB, "{e}");
    assert_eq!(e["lead_up"]["limit_bytes"], 24 * MIB, "{e}");
    let verdict = e["lead_up"]["verdict"].as_str().unwrap();
    eprintln!("{}: {verdict}", e["reason"]);
    assert!(verdict.ends_with("its own 24 MiB limit"), "{e}");
    assert_eq!(journaled["limit_scope"], "self", "{journaled}");
    assert_eq!(journaled["limit_cgroup"], child.rel.as_str(), "{journaled}");
    assert!(
        log.contains(&format!("limit_cgroup={} limit_scope=\"self\"", child.rel)),
        "{log}"
    );
    drop(child);
}
