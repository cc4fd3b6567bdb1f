//! Memory-cgroup pressure on the real kernel: reclaim time per cgroup (and histograms), PSI totals and
//! triggers, memory.events. Under CI=true these fail (never skip) when BPF cannot be loaded.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn wl(cg: &MemCgroup) -> [(&'static str, &str); 6] {
    cg.workload_labels()
}

#[test]
fn reclaim_is_attributed_to_the_stalled_cgroup_only() {
    let Some(_k) = privileged("reclaim_is_attributed_to_the_stalled_cgroup_only") else {
        return;
    };
    let d = Daemon::start(&["--probes.memcg.discovery-interval", "200ms"]);
    // Created after the daemon started: discovery picks them up without a restart.
    let busy = MemCgroup::new("sensor-it-reclaim-busy", 48 << 20);
    let idle = MemCgroup::new("sensor-it-reclaim-idle", 48 << 20);
    let mut sleeper = std::process::Command::new("sh")
        .arg("-c")
        .arg("echo $$ > \"$1\" && exec sleep 30")
        .arg("sh")
        .arg(idle.dir.join("cgroup.procs"))
        .spawn()
        .expect("idle sleeper");
    busy.churn_page_cache(300);
    let start = Instant::now();
    // By default each workload has its reclaim time, the bucketed histogram is the host's.
    let total = |m: &str, cg: &MemCgroup| metric(m, "sensor_memcg_reclaim_seconds_total", &wl(cg));
    let m = loop {
        let m = d.metrics();
        if total(&m, &busy).is_some_and(|c| c > 0.0) || start.elapsed() > Duration::from_secs(10) {
            break m;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let busy_s = total(&m, &busy).unwrap_or(0.0);
    assert!(
        busy_s > 0.0 && busy_s < 60.0,
        "busy cgroup's reclaim time {busy_s}s:\n{m}"
    );
    let n = metric(&m, "sensor_memcg_reclaim_duration_seconds_count", &[]).unwrap_or(0.0);
    assert!(n > 0.0, "no host-level reclaim histogram:\n{m}");
    let sum = metric(&m, "sensor_memcg_reclaim_duration_seconds_sum", &[]).unwrap();
    assert!(
        sum >= busy_s,
        "host reclaim time {sum}s below the busy cgroup's {busy_s}s"
    );
    let inf = metric(&m, "sensor_memcg_reclaim_duration_seconds_bucket", &[("le", "+Inf")]);
    assert_eq!(inf, Some(n), "+Inf bucket equals the count");
    assert_eq!(
        metric(&m, "sensor_memcg_reclaim_duration_seconds_count", &wl(&busy)),
        None,
        "no per-workload buckets by default"
    );
    assert!(
        total(&m, &idle).unwrap_or(0.0) == 0.0,
        "the idle sibling must show no reclaim:\n{m}"
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    // Nothing was dropped on the way.
    assert_eq!(
        metric(
            &m,
            "sensor_events_lost_total",
            &[("probe", "memcg"), ("reason", "map_full")]
        ),
        Some(0.0)
    );
    assert_eq!(d.stop().code(), Some(0));
}

#[test]
fn memory_events_equal_the_cgroup_files() {
    let Some(_k) = privileged("memory_events_equal_the_cgroup_files") else {
        return;
    };
    let d = Daemon::start(&["--probes.memcg.discovery-interval", "200ms"]);
    let cg = MemCgroup::new("sensor-it-events", 32 << 20);
    if !cg.v2 {
        // Let the memory counter (which tracks failcnt) be the one that fails: with a memsw limit
        // equal to it, recent kernels fail the charge on memsw, which counts nothing.
        let _ = std::fs::write(cg.dir.join("memory.memsw.limit_in_bytes"), "-1");
    }
    cg.churn_page_cache(100);
    cg.cause_oom_kill();
    std::thread::sleep(Duration::from_millis(600));
    let m = d.metrics();
    let w = wl(&cg);
    let get = |event: &str| {
        metric(
            &m,
            "sensor_memcg_events_total",
            &[&[("event", event)], w.as_slice()].concat(),
        )
    };
    if cg.v2 {
        for e in ["low", "high", "max", "oom", "oom_kill", "oom_group_kill"] {
            assert_eq!(
                get(e),
                Some(cg.read_value("memory.events", Some(e)) as f64),
                "{e}:\n{m}"
            );
        }
    } else {
        let failcnt = cg.read_value("memory.failcnt", None) + cg.read_value("memory.memsw.failcnt", None);
        assert!(failcnt > 0, "the churn must hit the limit");
        assert_eq!(
            get("max"),
            Some(failcnt as f64),
            "max = memory.failcnt + memory.memsw.failcnt:\n{m}"
        );
        assert_eq!(get("oom_kill"), Some(1.0));
        assert_eq!(cg.read_value("memory.oom_control", Some("oom_kill")), 1);
    }
    assert_eq!(d.stop().code(), Some(0));
}

fn psi_totals() -> (f64, f64) {
    let text = std::fs::read_to_string("/proc/pressure/memory").unwrap();
    let total = |kind: &str| {
        let line = text.lines().find(|l| l.starts_with(kind)).unwrap();
        let t = line
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("total="))
            .unwrap();
        t.parse::<f64>().unwrap() / 1e6
    };
    (total("some"), total("full"))
}

#[test]
fn host_psi_totals_equal_the_file() {
    let Some(_k) = privileged("host_psi_totals_equal_the_file") else {
        return;
    };
    let d = Daemon::start(&[]);
    let cg = MemCgroup::new("sensor-it-psi", 32 << 20);
    cg.churn_page_cache(150);
    // Read the file, scrape, read again: the exported value lies between (PSI only grows).
    let before = psi_totals();
    let m = d.metrics();
    let after = psi_totals();
    let some = metric(&m, "sensor_memory_pressure_waiting_seconds_total", &[]).expect("host some");
    let full = metric(&m, "sensor_memory_pressure_stalled_seconds_total", &[]).expect("host full");
    assert!(
        before.0 <= some && some <= after.0,
        "some {some} not in [{}, {}]",
        before.0,
        after.0
    );
    assert!(
        before.1 <= full && full <= after.1,
        "full {full} not in [{}, {}]",
        before.1,
        after.1
    );
    assert!(some > 0.0);
    assert_eq!(d.stop().code(), Some(0));
}

#[test]
fn psi_trigger_fires_once_per_crossing() {
    let Some(_k) = privileged("psi_trigger_fires_once_per_crossing") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("sensor-psi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("psi.yaml");
    // A low threshold with the shortest window the kernel allows without CAP_SYS_RESOURCE (2 s),
    // so a few seconds of reclaim cross it.
    std::fs::write(
        &cfg,
        "probes:\n  memcg:\n    psi_triggers: [{level: some, stall: 50ms, window: 2s}]\n",
    )
    .unwrap();
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let cg = MemCgroup::new("sensor-it-trigger", 16 << 20);
    let host_events = |d: &Daemon| {
        d.events(0)
            .into_iter()
            .filter(|e| e["type"] == "memory_pressure" && e["cgroup"].is_null())
            .collect::<Vec<_>>()
    };
    // Pressure left by an earlier test (or anything else on the host) can open an episode that
    // would swallow the first crossing: start once the host has been quiet for three windows.
    let settle = Instant::now();
    let base = loop {
        let n = host_events(&d).len();
        std::thread::sleep(Duration::from_secs(6));
        if host_events(&d).len() == n || settle.elapsed() > Duration::from_secs(60) {
            break host_events(&d).len();
        }
    };
    for episode in 1..=2 {
        // Several seconds of sustained pressure: the kernel fires about once per window, the
        // sensor reports one event for the whole episode.
        let stall_before = psi_totals().0;
        let until = Instant::now() + Duration::from_secs(8);
        while Instant::now() < until {
            cg.churn_page_cache(120);
        }
        let stalled = psi_totals().0 - stall_before;
        // Quiet for a few windows ends the episode.
        std::thread::sleep(Duration::from_secs(6));
        let ev = host_events(&d);
        assert_eq!(
            ev.len() - base,
            episode,
            "one event per crossing, not a flood ({stalled:.3}s of stall in 8s): {ev:?}"
        );
        let last = ev.last().unwrap();
        assert_eq!(last["level"], "some");
        assert_eq!(last["window_seconds"], 2.0);
        assert!(last["time"].as_f64().unwrap() > 0.0);
    }
    let m = d.metrics();
    assert!(metric(&m, "sensor_memory_pressure_events_total", &[("level", "some")]).unwrap() >= 2.0);
    assert_eq!(d.stop().code(), Some(0));
}

#[test]
fn vanished_cgroups_are_dropped_after_the_grace_period() {
    let Some(_k) = privileged("vanished_cgroups_are_dropped_after_the_grace_period") else {
        return;
    };
    // The per-workload histogram of `per: workload`, and the reclaim-time counter.
    let d = Daemon::start(&[
        "--probes.memcg.discovery-interval",
        "200ms",
        "--limits.vanished-grace",
        "1s",
        "--probes.memcg.reclaim-duration.per",
        "workload",
    ]);
    let cg = MemCgroup::new("sensor-it-vanish", 48 << 20);
    cg.churn_page_cache(200);
    let rel = cg.rel.clone();
    let labels = plain(&[], rel.as_str());
    let start = Instant::now();
    let m = loop {
        let m = d.metrics();
        if metric(&m, "sensor_memcg_reclaim_duration_seconds_count", &labels).is_some() {
            break m;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no reclaim series appeared");
        std::thread::sleep(Duration::from_millis(100));
    };
    let sum = metric(&m, "sensor_memcg_reclaim_duration_seconds_sum", &labels).unwrap();
    assert_eq!(
        metric(&m, "sensor_memcg_reclaim_seconds_total", &labels),
        Some(sum),
        "the counter is the histogram's sum"
    );
    drop(cg);
    let start = Instant::now();
    loop {
        let m = d.metrics();
        let gone = metric(&m, "sensor_memcg_reclaim_duration_seconds_count", &labels).is_none()
            && !m.contains(&format!("cgroup=\"{rel}\""));
        if gone {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "series of the vanished cgroup still there:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(d.stop().code(), Some(0));
}
