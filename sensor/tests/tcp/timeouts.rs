//! Dropped SYNs time out in a namespace and are counted once, alone and in a connect storm.

use super::*;

/// A namespace whose peer drops SYNs to the blackhole groups (10.201.0.0/24, fd00:201::/64),
/// a daemon with those groups, and whether the recovery program attached: it must exactly
/// where the kernel ends connects with `tcp_done_with_error()`.
pub(crate) fn blackhole_daemon() -> (Netns, Daemon, bool) {
    let ns = Netns::new();
    let cfg = config(&[
        ("blackhole4", "10.201.0.0/24".into()),
        ("blackhole6", "[fd00:201::/64]".into()),
    ]);
    let d = daemon(&cfg, &[]);
    let recovery = recovery_hook(&d) == "raw_tracepoint";
    assert_eq!(recovery, kernel_orders_connect_ends(), "{}", recovery_hook(&d));
    (ns, d, recovery)
}

#[test]
fn dropped_syns_time_out_in_a_namespace_v4_and_v6() {
    let Some(_k) = privileged("dropped_syns_time_out_in_a_namespace_v4_and_v6") else {
        return;
    };
    let (ns, d, recovery) = blackhole_daemon();
    let recursion_before = lost(&d.metrics(), "recursion");
    let cg = MemCgroup::new("sensor-it-tcp-timeout", 1 << 30);
    let t4: SocketAddr = "10.201.0.5:5432".parse().unwrap();
    let t6: SocketAddr = "[fd00:201::5]:5432".parse().unwrap();
    let (r4, r6) = std::thread::scope(|s| {
        let a = s.spawn(|| connect(&cg, Some(&ns.client), t4, 3, 3, None));
        let b = s.spawn(|| connect(&cg, Some(&ns.client), t6, 3, 3, None));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(r4, [0, 0, 3, 0], "the kernel timed the connects out");
    assert_eq!(r6, [0, 0, 3, 0]);
    for (dest, target) in [("blackhole4", t4), ("blackhole6", t6)] {
        let counted = wait_timeouts(&d, &series("timeout", dest, &cg), 3, Duration::from_secs(5));
        let left = occupied_slots(target);
        let skipped = lost(&d.metrics(), "recursion") - recursion_before;
        if recovery {
            // A timeout's end runs in the write timer's softirq; when that interrupts the
            // set_state program on its CPU (any TCP state change of the host in process
            // context), the kernel skips the end's run, and the error-report program, which
            // runs right after it, counts the connect instead. None is lost.
            assert_eq!(
                (counted, left),
                (3, 0),
                "every timeout counted, nothing left in the table ({skipped} runs skipped, {} recovered)\n{}",
                recovered(&d.metrics(), "timeout"),
                kernel_tcp_state()
            );
        } else if counted < 3 {
            // Without the recovery program each skipped end leaves the connect in the table:
            // each missing count must be such a slot and such a skipped run.
            eprintln!(
                "{dest}: {counted} timeouts counted, {left} slots left occupied, {skipped} runs skipped by the kernel"
            );
            assert_eq!(
                counted + left,
                3,
                "every connect counted or left in the table\n{}",
                kernel_tcp_state()
            );
            assert!(
                skipped >= left,
                "a slot left without a skipped run: {skipped} < {left}\n{}",
                kernel_tcp_state()
            );
        }
        let ev: Vec<_> = wait_failures(&d, target.port(), counted)
            .into_iter()
            .filter(|e| e["destination"] == dest)
            .collect();
        assert_eq!(
            ev.iter().map(count).sum::<u64>(),
            counted,
            "every counted timeout in an event's count"
        );
        for e in &ev {
            assert_eq!(e["result"], "timeout");
            assert_eq!(e["errno"], 110, "ETIMEDOUT: {e}");
            assert_eq!(e["address"], target.ip().to_string());
            let took = e["duration_seconds"].as_f64().unwrap();
            assert!((2.0..30.0).contains(&took), "one SYN retry takes about 3s, got {took}");
        }
    }
    let m = d.metrics();
    eprintln!(
        "DIAG timeouts: recursion_skipped={} recovered_timeouts={} recovered_unseen_successes={}",
        lost(&m, "recursion") - recursion_before,
        recovered(&m, "timeout"),
        recovered(&m, "success")
    );
    assert_eq!(d.stop().code(), Some(0));
}

/// Timeouts while a loopback connect storm runs in another namespace (state changes in process
/// context on both CPUs, which the timeouts' softirq can interrupt): every timeout is counted
/// once, nothing stays in the table, one event each, however many ends the kernel skipped and
/// the error-report program recovered; the storm's successes are never counted twice.
#[test]
fn timeouts_during_a_connect_storm_are_all_counted_once() {
    let Some(_k) = privileged("timeouts_during_a_connect_storm_are_all_counted_once") else {
        return;
    };
    let (ns, d, recovery) = blackhole_daemon();
    if !recovery {
        skip_named(
            "timeouts_during_a_connect_storm_are_all_counted_once",
            "this kernel reports a connect's error before its state change: no recovery",
        );
        return;
    }
    let m = d.metrics();
    let (recursion_before, untracked_before) = (lost(&m, "recursion"), lost(&m, "untracked"));
    let cg = MemCgroup::new("sensor-it-tcp-storm-timeout", 1 << 30);
    let storm_cg = MemCgroup::new("sensor-it-tcp-storm-load", 1 << 30);
    const EACH: u64 = 60;
    let t4: SocketAddr = "10.201.0.5:5432".parse().unwrap();
    let t6: SocketAddr = "[fd00:201::5]:5432".parse().unwrap();
    // The storm: successful connects (closed with RST, no events) on the peer namespace's own
    // loopback.
    let (srv, stop) = server_in(&ns.peer, "127.0.0.1:0");
    let (storm, r4, r6) = std::thread::scope(|s| {
        let storm = s.spawn(|| connect_for(&storm_cg, Some(&ns.peer), srv, 7.0, 2));
        std::thread::sleep(Duration::from_millis(500));
        let a = s.spawn(|| connect(&cg, Some(&ns.client), t4, EACH, EACH, None));
        let b = s.spawn(|| connect(&cg, Some(&ns.client), t6, EACH, EACH, None));
        (storm.join().unwrap(), a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(r4, [0, 0, EACH, 0], "the kernel timed the connects out");
    assert_eq!(r6, [0, 0, EACH, 0]);
    stop.store(true, Ordering::Relaxed);
    assert!(storm[0] > 1000 && storm[1] + storm[2] + storm[3] == 0, "{storm:?}");
    for (dest, target) in [("blackhole4", t4), ("blackhole6", t6)] {
        let counted = wait_timeouts(&d, &series("timeout", dest, &cg), EACH, Duration::from_secs(5));
        assert_eq!(
            (counted, occupied_slots(target)),
            (EACH, 0),
            "every timeout counted, nothing left in the table\n{}",
            kernel_tcp_state()
        );
        // Coalesced: the first timeout on its own, the rest summed in `count` at the end of the
        // interval. Both families' timeouts go to the same port.
        let in_events: u64 = wait_failures(&d, target.port(), 2 * EACH)
            .iter()
            .filter(|e| e["destination"] == dest && e["result"] == "timeout" && e["errno"] == 110)
            .map(count)
            .sum();
        assert_eq!(in_events, EACH, "every timeout in exactly one event's count");
    }
    std::thread::sleep(Duration::from_millis(500));
    let m = d.metrics();
    let success = metric(&m, "sensor_tcp_connects_total", &series("success", "other", &storm_cg)).unwrap_or(0.0) as u64;
    let untracked = lost(&m, "untracked") - untracked_before;
    let skipped = lost(&m, "recursion") - recursion_before;
    eprintln!(
        "DIAG storm: connects {} counted {success} untracked {untracked}; recursion_skipped={skipped} recovered timeouts={} refused={} unseen_successes={}",
        storm[0],
        recovered(&m, "timeout"),
        recovered(&m, "refused"),
        recovered(&m, "success")
    );
    // Never more than caused; a shortfall is an end without its start (`untracked`) or a
    // success whose run the kernel skipped (no error report follows a success).
    assert!(
        success <= storm[0] && success + untracked + skipped >= storm[0],
        "storm: {success} counted, {untracked} untracked, {skipped} skipped, {} caused",
        storm[0]
    );
    // Each recovery is an end whose run the kernel skipped.
    let rec_all: u64 = ["success", "refused", "timeout", "reset", "unreachable", "error"]
        .iter()
        .map(|r| recovered(&m, r))
        .sum();
    assert!(rec_all <= skipped, "{rec_all} recovered > {skipped} skipped");
    assert_eq!(d.stop().code(), Some(0));
}
