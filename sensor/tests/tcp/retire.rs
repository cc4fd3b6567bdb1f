//! A vanished workload over the cap is retired into cgroup="other", its connects still counted.

use super::*;

/// A vanished workload over `limits.workloads_per_metric`: its kernel keys are retired at the
/// next rescan (not after the 10-minute grace period), and its connects stay counted, exactly,
/// in `cgroup="other"`.
#[test]
fn a_vanished_workload_over_the_cap_is_retired_into_other() {
    let Some(_k) = privileged("a_vanished_workload_over_the_cap_is_retired_into_other") else {
        return;
    };
    let (srv, stop) = server("127.0.0.1:0");
    let closed = closed_port("127.0.0.1");
    let cfg = config(&[
        ("retire_srv", format!("127.0.0.1/32:{}", srv.port())),
        ("retire_closed", format!("127.0.0.1/32:{}", closed.port())),
    ]);
    let text = std::fs::read_to_string(&cfg).unwrap();
    let cfg = cfg.with_file_name("tcp-retire.yaml");
    std::fs::write(
        &cfg,
        format!("limits: {{workloads_per_metric: 1, vanished_grace: 10m}}\n{text}"),
    )
    .unwrap();
    let d = daemon(&cfg, &[]);
    // An active workload (a new cgroup with a process) takes the one slot once a scrape labels
    // every memory cgroup; the connecting one, no more active, does not displace it.
    let holder = MemCgroup::new("sensor-it-tcp-retire-holder", 1 << 30);
    let mut sleeper = holder.spawn_python("import time; time.sleep(600)");
    std::thread::sleep(Duration::from_secs(1));
    let _ = d.metrics();
    let retired = |m: &str, map: &str| metric(m, "sensor_workload_keys_retired_total", &[("map", map)]);
    let m = d.metrics();
    let (hists0, counts0) = (retired(&m, "tcp_hists").unwrap(), retired(&m, "tcp_counts").unwrap());
    let other = |result: &'static str, dest: &'static str| plain(&[("result", result), ("destination", dest)], "other");
    let cg = MemCgroup::new("sensor-it-tcp-retire", 1 << 30);
    assert_eq!(connect(&cg, None, srv, 100, 1, None), [100, 0, 0, 0]);
    assert_eq!(connect(&cg, None, closed, 30, 1, None), [0, 30, 0, 0]);
    d.wait_metric(
        "sensor_tcp_connects_total",
        &other("success", "retire_srv"),
        100.0,
        Duration::from_secs(5),
    );
    d.wait_metric(
        "sensor_tcp_connects_total",
        &other("refused", "retire_closed"),
        30.0,
        Duration::from_secs(5),
    );
    drop(cg);
    let start = Instant::now();
    let m = loop {
        let m = d.metrics();
        if retired(&m, "tcp_hists") > Some(hists0) && retired(&m, "tcp_counts") > Some(counts0) {
            break m;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "keys of the removed cgroup not retired:\n{m}\n--- log ---\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Retired, yet still counted: the same totals under `other`, and nothing lost.
    assert_eq!(
        metric(&m, "sensor_tcp_connects_total", &other("success", "retire_srv")),
        Some(100.0)
    );
    assert_eq!(
        metric(&m, "sensor_tcp_connects_total", &other("refused", "retire_closed")),
        Some(30.0)
    );
    let wl = &other("", "retire_srv")[1..];
    assert_eq!(metric(&m, "sensor_tcp_connect_duration_seconds_count", wl), Some(100.0));
    stop.store(true, Ordering::Relaxed);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_eq!(d.stop().code(), Some(0));
}
