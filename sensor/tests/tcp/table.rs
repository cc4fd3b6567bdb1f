//! The connect table: full, stale slots reused, connects beyond the hot region tracked.

use super::*;

/// A 64-slot connect table and 200 connects that hang in SYN_SENT (dropped SYNs, about 3 s
/// each): 100 at once, then 100 more a second later. The table holds at most 64 at a time;
/// every connect is still counted exactly once (as a timeout or as untracked), and the second
/// wave takes over the first wave's slots once those are older than `connect_max_age`.
#[test]
fn a_full_connect_table_counts_every_connect_once_and_reuses_stale_slots() {
    let Some(_k) = privileged("a_full_connect_table_counts_every_connect_once_and_reuses_stale_slots") else {
        return;
    };
    let ns = Netns::new();
    // An event per failure (no coalescing): each one's time tells its wave.
    let cfg = config_with(
        &[("table", "10.201.0.0/24".into())],
        "    max_tracked_connects: 64\n    connect_max_age: 500ms\n    failure_events: {interval: 0s}\n",
    );
    // Kernel diagnostics on: a full table says so in the log, with the probe's name.
    let d = daemon(&cfg, &["--kernel-log"]);
    let cg = MemCgroup::new("sensor-it-tcp-table", 1 << 30);
    let lost_before = connect_losses(&d.metrics());
    let target: SocketAddr = "10.201.0.7:5432".parse().unwrap();
    const WAVE: u64 = 100;
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let (first, second) = std::thread::scope(|s| {
        let a = s.spawn(|| connect(&cg, Some(&ns.client), target, WAVE, WAVE, None));
        let b = s.spawn(|| {
            std::thread::sleep(Duration::from_secs(1));
            connect(&cg, Some(&ns.client), target, WAVE, WAVE, None)
        });
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(first, [0, 0, WAVE, 0], "the kernel timed the first wave out");
    assert_eq!(second, [0, 0, WAVE, 0], "and the second");
    std::thread::sleep(Duration::from_millis(500));
    let m = d.metrics();
    let counted = metric(&m, "sensor_tcp_connects_total", &series("timeout", "table", &cg)).unwrap_or(0.0) as u64;
    let lost = connect_losses(&m) - lost_before;
    eprintln!("table: {counted} timeouts counted, {lost} untracked");
    assert_eq!(
        counted + lost,
        2 * WAVE,
        "each connect counted once: {counted} + {lost}"
    );
    assert!(
        counted <= 64,
        "at most one tracked connect per slot at a time: {counted}"
    );
    let log = d.log();
    assert!(
        log.lines()
            .any(|l| l.contains("connect table full") && l.contains("port 5432") && l.contains("probe=\"tcp\"")),
        "the kernel's diagnostic reaches the log:\n{log}"
    );
    assert!(lost >= 2 * WAVE - 64, "the rest did not fit: {lost}");
    // Which wave each counted timeout came from, by when it started (the second wave started
    // a second after the first).
    let ev = tcp_failures(&d, target.port());
    assert_eq!(ev.len() as u64, counted, "one event per counted failure");
    assert!(ev.iter().all(|e| count(e) == 1 && e["interval_seconds"] == 0.0));
    let split = t0 + 0.6;
    let n1 = ev
        .iter()
        .filter(|e| e["time"].as_f64().unwrap() - e["duration_seconds"].as_f64().unwrap() < split)
        .count();
    let n2 = ev.len() - n1;
    eprintln!("table: counted per wave: first {n1}, second {n2}");
    assert!(
        n2 > n1,
        "the second wave took over the first wave's stale slots: first {n1}, second {n2}"
    );
    assert_eq!(d.stop().code(), Some(0));
}

/// More connects pending at once than the hot region of the connect table has slots (256):
/// those whose hot window is full take a slot in their second window, in the rest of the
/// default 65,536-slot table, so all 600 are tracked and none is lost. (With second windows
/// allowed into the hot region, about one connect per run found both windows full.)
#[test]
fn connects_beyond_the_hot_region_are_all_tracked() {
    let Some(_k) = privileged("connects_beyond_the_hot_region_are_all_tracked") else {
        return;
    };
    let ns = Netns::new();
    let cfg = config_with(&[("spill", "10.201.0.9/32:5433".into())], "");
    let d = daemon(&cfg, &[]);
    let cg = MemCgroup::new("sensor-it-tcp-spill", 1 << 30);
    let lost_before = connect_losses(&d.metrics());
    let target: SocketAddr = "10.201.0.9:5433".parse().unwrap();
    const N: u64 = 600;
    let r = connect(&cg, Some(&ns.client), target, N, N, None);
    assert_eq!(r, [0, 0, N, 0], "the kernel timed all {N} out");
    std::thread::sleep(Duration::from_millis(500));
    let m = d.metrics();
    let counted = metric(&m, "sensor_tcp_connects_total", &series("timeout", "spill", &cg)).unwrap_or(0.0) as u64;
    let lost = connect_losses(&m) - lost_before;
    assert_eq!((counted, lost), (N, 0), "every pending connect tracked");
    let ev = wait_failures(&d, target.port(), N);
    assert_eq!(ev.iter().map(count).sum::<u64>(), N, "each in an event's count");
    assert_eq!(d.stop().code(), Some(0));
}
