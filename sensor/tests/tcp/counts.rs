//! Successes and refusals counted exactly, v4 and v6, on every connect hook and table kind; the exposition's shape.

use super::*;

#[test]
fn successes_and_refusals_are_counted_exactly_v4_and_v6() {
    let Some(_k) = privileged("successes_and_refusals_are_counted_exactly_v4_and_v6") else {
        return;
    };
    successes_and_refusals(&[], "raw_tracepoint");
}

/// The classic-tracepoint entry (for kernels where the raw one does not load: no BTF, or no
/// `bpf_get_current_task_btf`) reads the task through helpers instead: the same exact counts.
#[test]
fn classic_tracepoint_fallback_counts_the_same() {
    let Some(_k) = privileged("classic_tracepoint_fallback_counts_the_same") else {
        return;
    };
    // Also the per-workload RTT of `probes.tcp.rtt.per: workload` (the default is per
    // destination group).
    successes_and_refusals(
        &[
            "--probes.tcp.exclude-hooks",
            "raw_tracepoint",
            "--probes.tcp.rtt.per",
            "workload",
        ],
        "tracepoint",
    );
}

/// The programs for kernels without BPF atomics (5.10, 5.11: the connect table in a hash map
/// instead of the compare-and-swap array), forced here on a kernel that has them: the same
/// exact counts, RTTs, resets and events. Kernels without atomics pick them by feature probe
/// (the QEMU 5.10 test).
#[test]
fn the_hash_map_connect_table_counts_the_same() {
    let Some(_k) = privileged("the_hash_map_connect_table_counts_the_same") else {
        return;
    };
    successes_and_refusals_with(&[], &[("SENSOR_FORCE_NO_BPF_ATOMICS", "1")], "raw_tracepoint");
}

pub(crate) fn successes_and_refusals(extra: &[&str], hook: &str) {
    successes_and_refusals_with(extra, &[], hook);
}

pub(crate) fn successes_and_refusals_with(extra: &[&str], env: &[(&str, &str)], hook: &str) {
    let no_atomics = !env.is_empty();
    let rtt_per_workload = extra.windows(2).any(|w| w == ["--probes.tcp.rtt.per", "workload"]);
    let (srv4, stop4) = server("127.0.0.1:0");
    let (srv6, stop6) = server("[::1]:0");
    let (closed4, closed6) = (closed_port("127.0.0.1"), closed_port("[::1]"));
    let cfg = config(&[
        ("srv4", format!("127.0.0.1/32:{}", srv4.port())),
        ("srv6", format!("[::1/128]:{}", srv6.port())),
        ("closed4", format!("127.0.0.1/32:{}", closed4.port())),
        ("closed6", format!("[::1/128]:{}", closed6.port())),
    ]);
    let d = daemon_with(&cfg, extra, env);
    let (code, body) = d.get("/api/v1/probes");
    assert_eq!(code, 200);
    let probes: serde_json::Value = serde_json::from_str(&body).unwrap();
    let tcp = probe_report(&probes, "tcp");
    assert_eq!(tcp["groups"][0]["purpose"], "connect state");
    assert_eq!(tcp["groups"][0]["hook"], hook, "{tcp}");
    // Which table: the first candidate (the array's raw entry) refused for want of atomics.
    let first = &tcp["groups"][0]["attempts"][0];
    if hook == "raw_tracepoint" {
        assert_eq!(first["ok"], !no_atomics, "{tcp}");
    }
    if no_atomics {
        assert!(
            first["error"]
                .as_str()
                .unwrap()
                .starts_with("BPF atomics: kernel 5.12+"),
            "{tcp}"
        );
        assert_eq!(tcp["state"], "degraded", "{tcp}");
    }
    // The error-report program runs right after every refused connect's end here (this
    // kernel changes the state first): with it attached, each refusal still counts once.
    let recovery = if hook == "raw_tracepoint" && kernel_orders_connect_ends() {
        serde_json::json!("raw_tracepoint")
    } else {
        serde_json::Value::Null
    };
    assert_eq!(recovery_hook(&d), recovery, "{tcp}");
    let cg = MemCgroup::new("sensor-it-tcp", 1 << 30);
    // Losses before the connects (the readiness polls racing the attach) are not theirs.
    let lost_before = connect_losses(&d.metrics());

    for (srv, dest) in [(srv4, "srv4"), (srv6, "srv6")] {
        assert_eq!(connect(&cg, None, srv, 1000, 1, None), [1000, 0, 0, 0]);
        let m = d.wait_metric(
            "sensor_tcp_connects_total",
            &series("success", dest, &cg),
            1000.0,
            Duration::from_secs(5),
        );
        let wl = plain(&[("destination", dest)], cg.rel.as_str());
        assert_eq!(
            metric(&m, "sensor_tcp_connect_duration_seconds_count", &wl),
            Some(1000.0)
        );
        let sum = metric(&m, "sensor_tcp_connect_duration_seconds_sum", &wl).unwrap();
        // Loopback handshakes take microseconds: the total is positive and far below a second.
        assert!(
            sum > 0.0 && sum < 1.0,
            "{dest}: 1000 loopback connects took {sum}s in total"
        );
        let rtt_wl: &[(&str, &str)] = if rtt_per_workload { &wl } else { &wl[..1] };
        assert_eq!(
            metric(&m, "sensor_tcp_rtt_seconds_count", rtt_wl),
            Some(1000.0),
            "RTT sampled once per connection"
        );
    }
    // Series counts: each histogram series is 8 bounds (the default buckets), +Inf, _sum and
    // _count; sensor_series counts exactly what this scrape exposes.
    let m = d.metrics();
    let lines = |family: &str, label: &str| {
        m.lines()
            .filter(|l| l.starts_with(&format!("{family}_")) && l.contains(label))
            .count()
    };
    let own = format!("cgroup=\"{}\"", cg.rel);
    let dur = "sensor_tcp_connect_duration_seconds";
    assert_eq!(
        lines(dur, &own),
        2 * 11,
        "two destinations x (8 + 1 + 2) for this workload"
    );
    assert_eq!(
        lines("sensor_tcp_rtt_seconds", &own),
        if rtt_per_workload { 22 } else { 0 }
    );
    assert_eq!(lines("sensor_tcp_rtt_seconds", "destination=\"srv4\""), 11);
    for family in [dur, "sensor_tcp_rtt_seconds", "sensor_tcp_connects_total"] {
        let exposed = m
            .lines()
            .filter(|l| !l.starts_with('#') && l.split(['{', ' ']).next().is_some_and(|n| n.starts_with(family)))
            .count();
        assert_eq!(
            metric(&m, "sensor_series", &[("family", family)]),
            Some(exposed as f64),
            "sensor_series{{family={family}}}"
        );
    }
    for (closed, dest) in [(closed4, "closed4"), (closed6, "closed6")] {
        assert_eq!(connect(&cg, None, closed, 200, 1, None), [0, 200, 0, 0]);
        let m = d.wait_metric(
            "sensor_tcp_connects_total",
            &series("refused", dest, &cg),
            200.0,
            Duration::from_secs(5),
        );
        assert_eq!(
            metric(&m, "sensor_tcp_connects_total", &series("success", dest, &cg)),
            None
        );
        // Not 400: an end the set_state program counted frees its slot before the error
        // report, which then finds nothing to recover.
        std::thread::sleep(Duration::from_millis(300));
        let m = d.metrics();
        assert_eq!(
            metric(&m, "sensor_tcp_connects_total", &series("refused", dest, &cg)),
            Some(200.0),
            "each refusal counted once (recovered: {})",
            recovered(&m, "refused")
        );
        let wl = plain(&[("direction", "received"), ("destination", dest)], cg.rel.as_str());
        assert_eq!(metric(&m, "sensor_tcp_resets_total", &wl), Some(200.0));
        // Coalesced: the first at once, the rest summed per interval, every refusal counted.
        let ev = wait_failures(&d, closed.port(), 200);
        assert_eq!(ev.iter().map(count).sum::<u64>(), 200, "{ev:?}");
        assert!(ev.len() < 20, "{} events for 200 refusals", ev.len());
        assert_eq!((count(&ev[0]), ev[0]["interval_seconds"].as_f64()), (1, Some(0.0)));
        assert!(ev[1..]
            .iter()
            .all(|e| e["interval_seconds"] == 1.0 && e["overflow"] == false));
        assert!(ev
            .iter()
            .all(|e| e["result"] == "refused" && e["errno"] == 111 && e["destination"] == dest));
        assert_eq!(ev[0]["address"], closed.ip().to_string());
        // pid and comm are the connecting task's, taken at SYN_SENT: one helper process made
        // all 200.
        let pid = ev[0]["pid"].as_u64().unwrap();
        assert!(pid > 0 && pid != u64::from(std::process::id()), "{}", ev[0]);
        assert!(
            ev.iter()
                .all(|e| e["pid"] == pid && !e["comm"].as_str().unwrap().is_empty()),
            "{:?}",
            ev[0]
        );
        assert_eq!(ev[0]["cgroup"], cg.rel.as_str());
    }
    let m = d.metrics();
    assert_eq!(connect_losses(&m), lost_before);
    valid_exposition(&m);
    stop4.store(true, Ordering::Relaxed);
    stop6.store(true, Ordering::Relaxed);
    assert_eq!(d.stop().code(), Some(0));
}

/// The scrape (per-workload families written as text directly, the rest by the prometheus
/// crate's encoder) is valid exposition text: `promtool check metrics` finds no problem, and
/// every family has its HELP and TYPE once, its samples together, families sorted by name.
pub(crate) fn valid_exposition(m: &str) {
    use std::io::Write as _;
    let mut types: Vec<&str> = Vec::new();
    for l in m.lines().filter(|l| l.starts_with("# TYPE ")) {
        types.push(l.split(' ').nth(2).unwrap());
    }
    let mut sorted = types.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(types, sorted, "families once each, sorted by name");
    let mut family = "";
    for l in m.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            family = rest.split(' ').next().unwrap();
        } else if !l.starts_with('#') {
            let name = l.split(['{', ' ']).next().unwrap();
            assert!(name.starts_with(family), "{name} outside its family {family}");
        }
    }
    let promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match promtool {
        Ok(c) => c,
        Err(e) => {
            // CI installs it (`cargo xtask deps`: Debian's prometheus package).
            common::skip(&format!("promtool not available ({e}): exposition not linted"));
            return;
        }
    };
    child.stdin.take().unwrap().write_all(m.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
