//! `oom_imminent`: real leaks into real limits are warned about well before their kill, and
//! workloads that do not die (page cache churning at the limit, a garbage collector's
//! sawtooth, a steady workload near its limit, a batch that grows then frees) are not. Under
//! CI=true these fail (never skip) when BPF cannot be loaded.

mod common;

use std::{
    os::unix::process::ExitStatusExt,
    process::Child,
    time::{Duration, Instant, SystemTime},
};

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// One python workload in its own memory cgroup.
struct Job {
    name: String,
    cg: MemCgroup,
    child: Child,
    /// Wall-clock start (Unix seconds).
    started: f64,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn spawn(name: &str, limit: u64, script: &str) -> Job {
    let cg = MemCgroup::new(&format!("sensor-it-imm-{name}"), limit);
    let child = cg.spawn_python(script);
    Job {
        name: name.to_string(),
        cg,
        child,
        started: now(),
    }
}

/// Writes a file twice the limit through the page cache, then reads it over and over.
fn page_cache_churn(secs: u32, mib: u32) -> String {
    format!(
        r#"
import os, time
f = "/var/tmp/sensor-it-imm-churn-{{}}".format(os.getpid())
with open(f, "wb") as w:
    for _ in range({mib}):
        w.write(b"\0" * (1 << 20))
t = time.monotonic()
while time.monotonic() - t < {secs}:
    with open(f, "rb") as r:
        while r.read(1 << 20):
            pass
os.remove(f)
"#
    )
}

/// Grows to `peak` MiB over `rise` seconds from a `base` MiB heap, frees back to it, waits
/// `pause` seconds, and again, for `secs` seconds (a garbage collector, a batch).
fn sawtooth(secs: u32, base: u32, peak: u32, rise: f64, pause: f64) -> String {
    format!(
        r#"
import time
chunk = 256 * 1024
base = [b"b" * chunk for _ in range({base} * 4)]
t = time.monotonic()
while time.monotonic() - t < {secs}:
    held = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < {rise}:
        want = int((time.monotonic() - t0) / {rise} * ({peak} - {base}) * 4)
        while len(held) < want:
            held.append(b"x" * chunk)
        time.sleep(0.02)
    held = None
    time.sleep({pause})
"#
    )
}

/// Holds `mib` MiB for `secs` seconds (a steady workload near its limit).
fn steady(secs: u32, mib: u32) -> String {
    format!(
        r#"
import time
held = [b"x" * (1 << 20) for _ in range({mib})]
time.sleep({secs})
"#
    )
}

fn events_of<'a>(evs: &'a [Value], kind: &str, cg: &MemCgroup) -> Vec<&'a Value> {
    evs.iter()
        .filter(|e| e["type"] == kind && e["cgroup"] == cg.rel.as_str())
        .collect()
}

fn daemon(journal: &std::path::Path) -> Daemon {
    Daemon::start(&[
        "--probes.oom.history.interval",
        "1s",
        "--probes.memcg.discovery-interval",
        "200ms",
        "--journal.path",
        journal.to_str().unwrap(),
    ])
}

/// Waits for `job` to end; returns whether the kernel killed it.
fn wait_job(job: &mut Job, limit: Duration) -> bool {
    let start = Instant::now();
    loop {
        if let Ok(Some(st)) = job.child.try_wait() {
            return st.signal() == Some(libc::SIGKILL);
        }
        if start.elapsed() > limit {
            let _ = job.child.kill();
            let _ = job.child.wait();
            panic!("{} still running after {limit:?}", job.name);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_steady_leak_is_warned_about_before_its_kill_and_churn_or_a_sawtooth_is_not() {
    let Some(_k) = privileged("a_steady_leak_is_warned_about_before_its_kill_and_churn_or_a_sawtooth_is_not") else {
        return;
    };
    let journal = std::env::temp_dir().join(format!("sensor-it-imm-journal-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&journal);
    let d = daemon(&journal);
    // 2 MiB/s into 96 MiB: about 40 s to fill. Beside it, page cache churning through a 64 MiB
    // limit and a heap sawing 24 -> 48 MiB of 64 every 7 s, both for as long.
    let mut leak_job = spawn("leak", 96 * MIB, &leak_script(2.0));
    let mut churn = spawn("churn", 64 * MIB, &page_cache_churn(45, 128));
    let mut saw = spawn("saw", 64 * MIB, &sawtooth(45, 24, 48, 5.0, 2.0));
    // The warning comes while it grows, the gauge says so, then the kill.
    let start = Instant::now();
    let warned = loop {
        let evs = d.events(0);
        if let Some(e) = events_of(&evs, "oom_imminent", &leak_job.cg).first() {
            break (*e).clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no oom_imminent for the leak:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let rel = leak_job.cg.rel.clone();
    let labels: Vec<(&str, &str)> = [("cgroup", rel.as_str())]
        .into_iter()
        .chain(["container_id", "pod_uid", "namespace", "pod", "container"].map(|k| (k, "")))
        .collect();
    let m = d.metrics();
    assert_eq!(
        metric(&m, "sensor_oom_imminent", &labels),
        Some(1.0),
        "gauge while it holds"
    );
    // The web view's summary (and `sensor top`, drawn from it) lists it while it holds.
    let sum: Value = serde_json::from_str(&d.get("/api/v1/summary").1).unwrap();
    assert_eq!(sum["oom"]["imminent"][0]["cgroup"], rel.as_str(), "{}", sum["oom"]);
    assert!(
        wait_job(&mut leak_job, Duration::from_secs(90)),
        "the leak is OOM-killed"
    );
    let kill_start = Instant::now();
    let kill = loop {
        let evs = d.events(0);
        if let Some(e) = events_of(&evs, "oom_kill", &leak_job.cg).first() {
            break (*e).clone();
        }
        assert!(kill_start.elapsed() < Duration::from_secs(5), "no kill event");
        std::thread::sleep(Duration::from_millis(50));
    };
    let kill_t = kill["time"].as_f64().unwrap();
    let fill = kill_t - leak_job.started;
    let lead = kill_t - warned["time"].as_f64().unwrap();
    eprintln!("leak 2 MiB/s into 96 MiB: filled in {fill:.1} s, warned {lead:.1} s before the kill: {warned}");
    assert!(fill >= 30.0, "the leak took {fill} s");
    assert!(
        lead >= fill / 2.0,
        "warned {lead} s before a kill {fill} s after the start"
    );
    assert_eq!(warned["limit_cgroup"], leak_job.cg.rel.as_str(), "{warned}");
    assert_eq!(warned["limit_scope"], "self", "{warned}");
    assert_eq!(warned["limit_bytes"], 96 * MIB, "{warned}");
    let rate = warned["growth_bytes_per_minute"].as_f64().unwrap();
    let real = 2.0 * 60.0 * MIB as f64;
    assert!((rate - real).abs() <= 0.15 * real, "rate {rate} vs {real}");
    let projected = warned["projected_seconds"].as_f64().unwrap();
    assert!(projected > 0.0 && projected <= 60.0, "{warned}");
    assert!(
        (projected - lead).abs() <= 0.25 * lead + 3.0,
        "projected {projected} s, came {lead} s later"
    );
    // Retired once it clears (the kill ends the growth).
    let cleared = Instant::now();
    while metric(&d.metrics(), "sensor_oom_imminent", &labels).is_some() {
        assert!(cleared.elapsed() < Duration::from_secs(10), "gauge not retired");
        std::thread::sleep(Duration::from_millis(200));
    }
    for j in [&mut churn, &mut saw] {
        assert!(!wait_job(j, Duration::from_secs(60)), "{} must not be killed", j.name);
    }
    let evs = d.events(0);
    for j in [&churn, &saw] {
        assert_eq!(
            events_of(&evs, "oom_imminent", &j.cg).len(),
            0,
            "false warning for {}",
            j.name
        );
        assert_eq!(events_of(&evs, "oom_kill", &j.cg).len(), 0);
    }
    // The log and the journal (`sensor events --since`) carry it too.
    assert!(
        d.log().contains("OOM imminent") && d.log().contains(&leak_job.cg.rel),
        "log line"
    );
    let out = run_sensor(&["events", "--since", "0", "--journal.path", journal.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    let from_journal = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["type"] == "oom_imminent" && e["cgroup"] == leak_job.cg.rel.as_str())
        .count();
    assert_eq!(from_journal, 1, "{text}");
    assert_eq!(d.stop().code(), Some(0));
    let _ = std::fs::remove_dir_all(&journal);
}

/// The benchmark table of docs/benchmarks.md: leaks at several rates into several limits (lead
/// time of the warning before the kill) and workloads that do not die (warnings: goal 0), all
/// at once under one daemon. `cargo test -p sensor --test imminent -- --ignored --nocapture`.
#[test]
#[ignore]
fn imminent_benchmark() {
    let Some(_k) = privileged("imminent_benchmark") else {
        return;
    };
    let journal = std::env::temp_dir().join(format!("sensor-it-imm-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&journal);
    let d = daemon(&journal);
    let began = Instant::now();
    let mut leaks: Vec<(f64, u64, Job)> = Vec::new();
    for (rate, limit) in [(1.0, 64), (2.0, 64), (4.0, 128), (2.0, 128), (1.0, 128), (8.0, 256)] {
        leaks.push((
            rate,
            limit,
            spawn(&format!("leak-{rate}-{limit}"), limit * MIB, &leak_script(rate)),
        ));
    }
    const RUN: u32 = 140;
    let mut quiet = vec![
        spawn("churn", 64 * MIB, &page_cache_churn(RUN, 128)),
        spawn("saw-fast", 64 * MIB, &sawtooth(RUN, 24, 48, 5.0, 2.0)),
        spawn("saw-slow", 128 * MIB, &sawtooth(RUN, 40, 100, 20.0, 3.0)),
        spawn("steady", 64 * MIB, &steady(RUN, 56)),
        spawn("batch", 128 * MIB, &sawtooth(RUN, 10, 80, 15.0, 15.0)),
    ];
    let mut rows = Vec::new();
    for (rate, limit, j) in &mut leaks {
        let killed = wait_job(j, Duration::from_secs(300));
        rows.push((*rate, *limit, killed, j.started, j.cg.rel.clone()));
    }
    for j in &mut quiet {
        wait_job(j, Duration::from_secs(300));
    }
    std::thread::sleep(Duration::from_secs(2));
    let evs = d.events(0);
    println!("ran {:.0} s", began.elapsed().as_secs_f64());
    println!("| leak rate | limit | filled in | warned before the kill | projected at the warning |");
    println!("|---|---|---|---|---|");
    for (rate, limit, killed, started, rel) in rows {
        let kill = evs
            .iter()
            .find(|e| e["type"] == "oom_kill" && e["cgroup"] == rel.as_str());
        let warn = evs
            .iter()
            .find(|e| e["type"] == "oom_imminent" && e["cgroup"] == rel.as_str());
        let kt = kill.and_then(|k| k["time"].as_f64());
        let fill = kt.map_or("-".into(), |t| format!("{:.0} s", t - started));
        let lead = match (kt, warn.and_then(|w| w["time"].as_f64())) {
            (Some(k), Some(w)) => format!("{:.0} s", k - w),
            _ => "no warning".into(),
        };
        let proj = warn
            .and_then(|w| w["projected_seconds"].as_f64())
            .map_or("-".into(), |p| format!("{p:.0} s"));
        println!(
            "| {rate} MiB/s | {limit} MiB | {fill}{} | {lead} | {proj} |",
            if killed { "" } else { " (not killed)" }
        );
    }
    println!();
    println!("| workload that does not die | limit | warnings | kills |");
    println!("|---|---|---|---|");
    for j in &quiet {
        let n = |k: &str| events_of(&evs, k, &j.cg).len();
        println!(
            "| {} | {} MiB | {} | {} |",
            j.name,
            j.cg.limit() / MIB,
            n("oom_imminent"),
            n("oom_kill")
        );
    }
    assert_eq!(d.stop().code(), Some(0));
    let _ = std::fs::remove_dir_all(&journal);
}
