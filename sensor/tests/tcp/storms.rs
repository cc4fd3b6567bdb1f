//! Storms: failures counted exactly in few events, nothing lost while the daemon starts, successes plus losses add up.

use super::*;

/// A storm of refused connects from one workload to one destination group: every refusal is
/// counted in the metrics and in the events' `count`, yet it takes a handful of events (the
/// first at once, then one per `failure_events.interval`), not one journal record per failure.
#[test]
fn a_connect_failure_storm_is_counted_exactly_in_few_events() {
    let Some(_k) = privileged("a_connect_failure_storm_is_counted_exactly_in_few_events") else {
        return;
    };
    let closed = closed_port("127.0.0.1");
    let cfg = config_with(
        &[("storm", format!("127.0.0.1/32:{}", closed.port()))],
        "    failure_events: {interval: 500ms, max_keys: 64}\n",
    );
    // A large ring: the test is about coalescing, not about a debug build keeping up.
    let d = daemon(&cfg, &["--perf-ring-pages", "512"]);
    let cg = MemCgroup::new("sensor-it-tcp-storm", 1 << 30);
    let coalesced = |m: &str, reason: &str| {
        metric(
            m,
            "sensor_events_coalesced_total",
            &[("probe", "tcp"), ("reason", reason)],
        )
        .unwrap_or(-1.0) as u64
    };
    // One refusal elsewhere first, until its series carries the cgroup: the daemon's workload
    // discovery knows the new cgroup before the storm (else its events name no cgroup).
    assert_eq!(connect(&cg, None, closed_port("127.0.0.1"), 1, 1, None), [0, 1, 0, 0]);
    d.wait_metric(
        "sensor_tcp_connects_total",
        &series("refused", "other", &cg),
        1.0,
        Duration::from_secs(10),
    );
    let m0 = d.metrics();
    for reason in ["interval", "key_limit"] {
        assert!(
            metric(
                &m0,
                "sensor_events_coalesced_total",
                &[("probe", "tcp"), ("reason", reason)]
            )
            .is_some(),
            "{reason} exported from the start"
        );
    }
    const N: u64 = 20_000;
    let started = std::time::Instant::now();
    assert_eq!(connect(&cg, None, closed, N, 1, None), [0, N, 0, 0]);
    let secs = started.elapsed().as_secs_f64();
    let m = d.wait_metric(
        "sensor_tcp_connects_total",
        &series("refused", "storm", &cg),
        N as f64,
        Duration::from_secs(10),
    );
    assert_eq!(
        lost(&m, "buffer_full"),
        lost(&m0, "buffer_full"),
        "no record lost at the ring"
    );
    let ev = wait_failures(&d, closed.port(), N);
    assert_eq!(
        ev.iter().map(count).sum::<u64>(),
        N,
        "every refusal in an event's count"
    );
    // The first at once, then at most one sum per 500 ms interval (plus the one the storm's end
    // straddles).
    let most = 2 + (secs / 0.5).ceil() as usize;
    eprintln!(
        "storm: {N} refusals in {secs:.2} s -> {} events (at most {most})",
        ev.len()
    );
    assert!(ev.len() <= most, "{} events for {N} refusals in {secs:.2} s", ev.len());
    let immediate: Vec<_> = ev.iter().filter(|e| e["interval_seconds"] == 0.0).collect();
    assert_eq!(immediate.len(), 1, "only the key's first failure is published at once");
    assert_eq!(count(immediate[0]), 1);
    assert!(
        ev.iter().all(|e| e["result"] == "refused"
            && e["destination"] == "storm"
            && e["cgroup"] == cg.rel.as_str()
            && e["overflow"] == false),
        "{ev:?}"
    );
    assert!(ev[1..]
        .iter()
        .all(|e| e["interval_seconds"] == 0.5 && e["first_time"].as_f64().unwrap() <= e["time"].as_f64().unwrap()));
    let m = d.metrics();
    // Other refused connects on the host may add to the probe-wide counter, never take away.
    assert!(coalesced(&m, "interval") - coalesced(&m0, "interval") >= N - 1);
    assert_eq!(coalesced(&m, "key_limit"), 0);
    assert_eq!(d.stop().code(), Some(0));
}

/// Failure events from the moment the programs attach reach the reader: the event rings are
/// open before the first program attaches. (Opened afterwards, a connect-refused loop running
/// while the daemon started lost hundreds of events, counted as `buffer_full`.)
#[test]
fn no_event_is_lost_while_the_daemon_starts() {
    let Some(_k) = privileged("no_event_is_lost_while_the_daemon_starts") else {
        return;
    };
    let closed = TcpListener::bind("127.0.0.5:0").unwrap();
    let target = closed.local_addr().unwrap();
    drop(closed);
    let stop = AtomicBool::new(false);
    let refused = AtomicU64::new(0);
    let m = std::thread::scope(|s| {
        s.spawn(|| {
            // A few thousand a second: enough to overlap the attach, few enough for any reader
            // (tests run a debug build) to keep up, so a full ring cannot pass for the race.
            while !stop.load(Ordering::Relaxed) {
                if matches!(TcpStream::connect(target), Err(e) if e.kind() == ErrorKind::ConnectionRefused) {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        });
        std::thread::sleep(Duration::from_millis(100));
        let d = Daemon::start(&["--probes.memcg.discovery-interval", "200ms"]);
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(300));
        let m = d.metrics();
        assert_eq!(d.stop().code(), Some(0));
        m
    });
    let counted = metric_sum(&m, "sensor_tcp_connects_total", &[("result", "refused")]);
    eprintln!(
        "refused connects: {} made, {counted} counted",
        refused.load(Ordering::Relaxed)
    );
    assert!(counted >= 100.0, "the loop ran while the probes attached: {counted}");
    let lost = metric(
        &m,
        "sensor_events_lost_total",
        &[("probe", "tcp"), ("reason", "buffer_full")],
    );
    assert_eq!(lost, Some(0.0), "no failure event lost");
}

#[test]
fn connect_storm_successes_plus_losses_add_up() {
    let Some(_k) = privileged("connect_storm_successes_plus_losses_add_up") else {
        return;
    };
    let (srv, stop) = server("127.0.0.3:0");
    let cfg = config(&[("storm", format!("127.0.0.3/32:{}", srv.port()))]);
    let d = daemon(&cfg, &[]);
    let cg = MemCgroup::new("sensor-it-tcp-storm", 1 << 30);
    // Losses before the storm (e.g. the readiness polls racing the attach) are not the storm's.
    let lost_before = connect_losses(&d.metrics());
    const TOTAL: u64 = 50_000;
    let results = std::thread::scope(|s| {
        let a = s.spawn(|| connect(&cg, None, srv, TOTAL / 2, 2, Some(0)));
        let b = s.spawn(|| connect(&cg, None, srv, TOTAL / 2, 2, Some(1)));
        [a.join().unwrap(), b.join().unwrap()]
    });
    let ok: u64 = results.iter().map(|r| r[0]).sum();
    assert_eq!(ok, TOTAL, "every connect of the storm succeeded: {results:?}");
    std::thread::sleep(Duration::from_millis(500));
    let m = d.metrics();
    let success = metric(&m, "sensor_tcp_connects_total", &series("success", "storm", &cg)).unwrap_or(0.0) as u64;
    let lost = connect_losses(&m) - lost_before;
    for r in ["refused", "timeout", "reset", "unreachable", "error"] {
        assert_eq!(
            metric(&m, "sensor_tcp_connects_total", &series(r, "storm", &cg)),
            None,
            "{r}"
        );
    }
    let skipped = metric(
        &m,
        "sensor_events_lost_total",
        &[("probe", "tcp"), ("reason", "recursion")],
    )
    .unwrap_or(0.0);
    eprintln!("storm: success {success}, lost {lost}, kernel-skipped runs {skipped}");
    assert_eq!(
        success + lost,
        TOTAL,
        "success {success} + lost {lost} (kernel-skipped runs: {skipped})"
    );
    stop.store(true, Ordering::Relaxed);
    assert_eq!(d.stop().code(), Some(0));
}

/// A measurement, not a check (docs/benchmarks.md): the loopback connect rate (2 threads, RST
/// close) with no sensor, the sensor's array table and its hash-map table (forced), on this
/// kernel, 2 s each, in rounds that rotate the order; prints each mode's median over the
/// baseline of its round.
#[test]
#[ignore = "a measurement (docs/benchmarks.md), not a check"]
fn hash_map_table_overhead_against_the_array() {
    let Some(_k) = privileged("hash_map_table_overhead_against_the_array") else {
        return;
    };
    const ROUNDS: usize = 7;
    let (srv, stop) = server("127.0.0.1:0");
    let cg = MemCgroup::new("sensor-it-tcp-bench", 1 << 30);
    let rate = || connect_for(&cg, None, srv, 2.0, 2)[0] as f64 / 2.0;
    let with = |env: &[(&str, &str)]| {
        let d = Daemon::start_with(&[], None, env);
        std::thread::sleep(Duration::from_millis(500));
        let r = rate();
        assert_eq!(d.stop().code(), Some(0));
        r
    };
    let mut ratios: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..ROUNDS {
        let base = rate();
        let mut got = [0.0; 2];
        for i in [round % 2, 1 - round % 2] {
            got[i] = if i == 0 {
                with(&[])
            } else {
                with(&[("SENSOR_FORCE_NO_BPF_ATOMICS", "1")])
            };
        }
        println!(
            "round {round}: baseline {base:.0}/s, array {:.0}/s, hash map {:.0}/s",
            got[0], got[1]
        );
        for i in 0..2 {
            ratios[i].push(got[i] / base);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (array, hash) = (median(&mut ratios[0]), median(&mut ratios[1]));
    println!(
        "median over {ROUNDS} rounds: array / baseline {array:.3}, hash map / baseline {hash:.3}, hash map / array {:.3}",
        hash / array
    );
}
