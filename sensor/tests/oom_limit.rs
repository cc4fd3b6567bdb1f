//! Which limit an OOM kill hit, on the real kernel: a kill in a child memory cgroup without a
//! limit under a parent that has one names the parent (`ancestor`); with both limited and the
//! child's smaller, the child (`self`). Checked on every surface the kill reaches: the event,
//! the journal (`sensor events --since`), the log line and the verdict; and a kubelet-style pod
//! under containerd with a pod-level limit over a container without one. On this host (hybrid:
//! memory on v1, no kill context hook) from the path's counters and limits; on cgroup v2 with
//! the kernel's memcg in the QEMU matrix (tests/qemu.rs). Under CI=true these fail (never skip)
//! when BPF cannot be loaded.

mod common;

use std::time::{Duration, Instant};

use common::{
    runtimes::{self, Containerd, KubePod},
    *,
};
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
        // The log line is the kill's event JSON.
        log.contains(&format!(
            "\"limit_cgroup\":\"{}\",\"limit_scope\":\"ancestor\"",
            parent.rel
        )),
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
        // The log line is the kill's event JSON.
        log.contains(&format!("\"limit_cgroup\":\"{}\",\"limit_scope\":\"self\"", child.rel)),
        "{log}"
    );
    drop(child);
}

/// Sets a memory limit on the cgroup `rel` (relative to the hierarchies' roots) in whichever
/// hierarchy holds the memory controller, as kubelet does on a pod's cgroup.
fn limit_cgroup(rel: &str, bytes: u64) {
    let rel = rel.trim_start_matches('/');
    let v1 = std::path::Path::new("/sys/fs/cgroup/memory").join(rel);
    if v1.join("memory.limit_in_bytes").exists() {
        std::fs::write(v1.join("memory.limit_in_bytes"), bytes.to_string()).expect("pod limit");
        let _ = std::fs::write(v1.join("memory.memsw.limit_in_bytes"), bytes.to_string());
    } else {
        let v2 = std::path::Path::new("/sys/fs/cgroup").join(rel);
        std::fs::write(v2.join("memory.max"), bytes.to_string()).expect("pod limit");
        let _ = std::fs::write(v2.join("memory.swap.max"), "0");
    }
}

/// containerd#12133, kubernetes#114142: a container without a memory limit in a pod whose
/// cgroup has one (32 MiB) is killed by the pod's limit: the kill names the pod's cgroup, and
/// its verdict says whose limit it was.
#[test]
fn a_pod_limit_over_a_container_without_one_is_the_pods() {
    let Some(_k) = privileged("a_pod_limit_over_a_container_without_one_is_the_pods") else {
        return;
    };
    let Some(image) = runtimes::victim_image() else {
        return;
    };
    let Some(ctrd) = Containerd::start() else {
        return;
    };
    ctrd.import(image);
    let runtimes = format!(
        "[{{kind: containerd, socket: {}, namespaces: [k8s.io]}}]",
        ctrd.socket.display()
    );
    let d = Daemon::start(&["--workloads.runtimes", &runtimes]);
    let mut pod = KubePod::new("shop", "cart-7f9c", &[]);
    ctrd.start_sandbox(&mut pod, image);
    let pod_cgroup = pod.sandbox.cgroup.rsplit_once('/').unwrap().0.to_string();
    limit_cgroup(&pod_cgroup, 32 * MIB);
    // No limit of its own (`ctr run --memory-limit 0` sets none).
    let mut c = pod.container("cart", 0, &["/bin/busybox", "tail", "/dev/zero"]);
    let out = ctrd.run(&mut c, image);
    assert_eq!(out.status.code(), Some(137), "OOM-killed: {out:?}\n{}", ctrd.log());
    let start = Instant::now();
    let e = loop {
        if let Some(e) = d.oom_events(0).into_iter().find(|e| e["container_id"] == c.id.as_str()) {
            break e;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no kill event:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("{}: {}", e["reason"], e["lead_up"]["verdict"]);
    assert_eq!(e["cgroup"], c.cgroup.as_str(), "{e}");
    assert_eq!(
        (&e["namespace"], &e["pod"], &e["container"]),
        (&"shop".into(), &"cart-7f9c".into(), &"cart".into()),
        "{e}"
    );
    assert_eq!(e["limit_scope"], "ancestor", "{e}");
    assert_eq!(e["limit_cgroup"], pod_cgroup.as_str(), "{e}");
    assert_eq!(e["memory_limit_bytes"], Value::Null, "the container has none: {e}");
    assert_eq!(e["lead_up"]["limit_bytes"], 32 * MIB, "{e}");
    let verdict = e["lead_up"]["verdict"].as_str().unwrap();
    assert!(
        verdict.ends_with("the pod's 32 MiB limit, the container has none"),
        "{e}"
    );
    assert_eq!(d.stop().code(), Some(0));
}
