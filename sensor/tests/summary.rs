//! The web view's summary (what the page and `sensor top` show) says what `/metrics` says: the
//! kills it counts and the events lost are the scrape's, on the real kernel. Under CI=true
//! these fail (never skip) when BPF cannot be loaded.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Kills caused in the test's cgroup.
const KILLS: u64 = 3;

fn summary(d: &Daemon) -> Value {
    let (code, body) = d.get("/api/v1/summary");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("summary JSON")
}

#[test]
fn summary_counts_what_the_scrape_counts() {
    let Some(_k) = privileged("summary_counts_what_the_scrape_counts") else {
        return;
    };
    let cg = MemCgroup::new("sensor-summary", 24 << 20);
    let d = Daemon::start(&[]);
    for _ in 0..KILLS {
        cg.cause_oom_kill();
    }
    let n = KILLS as f64;
    let m = d.wait_metric_sum("sensor_oom_kills_total", &cg.kill_labels(), n, Duration::from_secs(10));
    assert_eq!(cg.kernel_oom_kills(), KILLS, "the kernel's own count for the cgroup");
    let scraped = metric_sum(&m, "sensor_oom_kills_total", &[]);
    // The summary is cached for 2 s.
    let start = Instant::now();
    let sum = loop {
        let sum = summary(&d);
        if sum["oom"]["kills_total"].as_f64() == Some(scraped) || start.elapsed() > Duration::from_secs(5) {
            break sum;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let oom = &sum["oom"];
    assert_eq!(oom["running"], true, "{oom}");
    assert_eq!(oom["kills_total"].as_f64(), Some(scraped), "summary = scrape: {oom}");
    let listed = oom["recent"]
        .as_array()
        .map_or(0, |r| r.iter().filter(|k| k["cgroup"] == cg.rel.as_str()).count());
    assert_eq!(listed as u64, KILLS, "each kill listed once: {oom}");
    let per_day: u64 = oom["per_day"]
        .as_array()
        .map_or(0, |d| d.iter().filter_map(Value::as_u64).sum());
    assert!(per_day >= KILLS, "kills per day: {oom}");
    assert!(oom["recent"][0]["rss_bytes"].as_u64().unwrap_or(0) > 0, "{oom}");
    assert_eq!(oom["unseen_total"], 0, "{oom}");

    // Losses: the summary's are the exported counters.
    let m = d.metrics();
    assert_eq!(
        sum["lost"]["total"].as_f64(),
        Some(metric_sum(&m, "sensor_events_lost_total", &[])),
        "{}",
        sum["lost"]
    );
    // Every started probe has its section.
    for key in ["memory", "tcp"] {
        assert_eq!(sum[key]["running"], true, "{key}: {}", sum[key]);
    }
    assert!(
        sum["tcp"]["latency"].as_array().is_some_and(|l| !l.is_empty()),
        "{}",
        sum["tcp"]
    );
    assert_eq!(d.stop().code(), Some(0));
}

/// A probe that is not started keeps its section, empty and `running: false`: the summary's
/// shape does not depend on the configuration (the page and `sensor top` read the same keys).
#[test]
fn a_disabled_probe_keeps_its_section_empty() {
    let Some(_k) = privileged("a_disabled_probe_keeps_its_section_empty") else {
        return;
    };
    let d = Daemon::start(&["--probes.tcp.enabled", "false", "--probes.memcg.enabled", "false"]);
    let sum = summary(&d);
    assert_eq!(sum["oom"]["running"], true, "{}", sum["oom"]);
    let tcp = &sum["tcp"];
    assert_eq!(tcp["running"], false, "{tcp}");
    for key in [
        "rate",
        "latency",
        "top_destinations",
        "top_workloads",
        "recent_failures",
    ] {
        assert_eq!(tcp[key], serde_json::json!([]), "tcp.{key}: {tcp}");
    }
    assert_eq!(tcp["totals"], serde_json::json!({}), "{tcp}");
    let memory = &sum["memory"];
    assert_eq!(memory["running"], false, "{memory}");
    for key in ["psi", "top_reclaim", "top_max_events"] {
        assert_eq!(memory[key], serde_json::json!([]), "memory.{key}: {memory}");
    }
    assert_eq!(memory["workloads"], 0, "{memory}");
    assert_eq!(d.stop().code(), Some(0));
}
