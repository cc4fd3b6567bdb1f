//! The kernel matrix: Debian's 5.10, 6.1 and 6.12 cloud kernels under QEMU and Debian's arm64
//! 6.1 under qemu-system-aarch64 with the static aarch64 binary (the host's kernel is the
//! privileged tests' own), one row each in sensor/tests/qemu/kernels.tsv, one script
//! (sensor/tests/qemu/init.sh) for all. On each: every probe attached or degraded with a
//! reason, its state, `/api/v1/probes` and `sensor_probe_attached` in agreement, a memcg OOM
//! kill counted exactly (against `memory.events`), a growth kill's verdict, connects that
//! succeed, are refused and time out counted exactly, and a host-wide kill. 6.1 runs twice (its
//! fentry and kprobe paths, which the CI kernel lacks). `cargo xtask test` fetches the kernels
//! into target/qemu/<suite>; .ci/run installs qemu-system-x86 and busybox-static. Under CI=true
//! a missing piece fails the test instead of skipping it.

mod common;
#[path = "qemu/vm.rs"]
mod vm;

use common::metric;
use serde_json::Value;
use vm::{part, samples_part, section};

/// Workload labels of a cgroup outside any container.
fn workload(cgroup: &str) -> Vec<(&'static str, String)> {
    vec![
        ("cgroup", cgroup.to_string()),
        ("container_id", String::new()),
        ("pod_uid", String::new()),
        ("namespace", String::new()),
        ("pod", String::new()),
        ("container", String::new()),
    ]
}

fn labels<'a>(wl: &'a [(&'static str, String)], more: &[(&'static str, &'a str)]) -> Vec<(&'static str, &'a str)> {
    wl.iter()
        .map(|(k, v)| (*k, v.as_str()))
        .chain(more.iter().copied())
        .collect()
}

fn oom_kills(events: &str) -> Vec<Value> {
    let all: Vec<Value> = serde_json::from_str(events).expect("events JSON");
    all.into_iter().filter(|e| e["type"] == "oom_kill").collect()
}

/// Every probe runs (attached, or degraded with a reason), and `/api/v1/probes`,
/// `sensor_probe_state` and `sensor_probe_attached` say the same for each.
fn states_agree(probes: &Value, m: &str, sec: &str) {
    for p in probes.as_array().expect("probe list") {
        let name = p["probe"].as_str().unwrap();
        let state = p["state"].as_str().unwrap();
        assert!(state == "attached" || state == "degraded", "{name} does not run: {p}");
        if state == "degraded" {
            assert!(p["reason"].as_str().is_some_and(|r| !r.is_empty()), "{p}");
        }
        for s in ["attached", "degraded", "unsupported", "disabled"] {
            let want = f64::from(u8::from(s == state));
            let got = metric(m, "sensor_probe_state", &[("probe", name), ("state", s)]).unwrap_or(0.0);
            assert_eq!(got, want, "sensor_probe_state of {name}/{s}:\n{sec}");
        }
        let used: Vec<&str> = p["groups"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|g| g["hook"].as_str())
            .collect();
        for hook in ["tracepoint", "raw_tracepoint", "kprobe", "fentry"] {
            let got = metric(m, "sensor_probe_attached", &[("probe", name), ("hook", hook)]);
            if used.contains(&hook) {
                assert_eq!(got, Some(1.0), "{name} uses {hook}:\n{sec}");
            } else {
                assert!(got != Some(1.0), "{name} does not use {hook}:\n{sec}");
            }
        }
    }
}

/// The root cgroup's TCP counts in a `tcp_root` scrape: (successes, refused, timeouts, the
/// successes' summed connect latency in seconds).
fn tcp_counts(scrape: &str) -> (f64, f64, f64, f64) {
    let root = workload("/");
    let by = |result: &'static str| {
        metric(
            scrape,
            "sensor_tcp_connects_total",
            &labels(&root, &[("destination", "other"), ("result", result)]),
        )
        .unwrap_or(0.0)
    };
    let ok = metric(
        scrape,
        "sensor_tcp_connect_duration_seconds_count",
        &labels(&root, &[("destination", "other")]),
    )
    .unwrap_or_else(|| panic!("no root-cgroup connect count in:\n{scrape}"));
    let sum = metric(
        scrape,
        "sensor_tcp_connect_duration_seconds_sum",
        &labels(&root, &[("destination", "other")]),
    )
    .unwrap_or_else(|| panic!("no root-cgroup connect latency in:\n{scrape}"));
    (ok, by("refused"), by("timeout"), sum)
}

/// What every pass on every kernel must show; returns the pass's probe report.
fn check_pass(out: &str, pass: &str, first: bool) -> Value {
    let sec = section(out, &format!("PASS {pass}"), pass);
    assert_eq!(part(sec, "victim exit"), "137", "the allocator was OOM-killed:\n{sec}");
    assert_eq!(part(sec, "kernel"), "oom_kill 1", "{sec}");
    assert_eq!(part(sec, "sensor exit"), "0", "{sec}");
    let m = &samples_part(sec, "metrics");
    let probes: Value = serde_json::from_str(part(sec, "probes")).expect("probes JSON");
    states_agree(&probes, m, sec);

    // memory.events per workload, on pure cgroup v2, and per-cgroup PSI.
    let victim = format!("/victim-{pass}");
    let wl = workload(&victim);
    for line in part(sec, "memory.events").lines() {
        let (event, value) = line.split_once(' ').unwrap();
        let got = metric(m, "sensor_memcg_events_total", &labels(&wl, &[("event", event)]));
        assert_eq!(
            got,
            value.trim().parse().ok(),
            "memory.events {event} of {victim}:\n{m}"
        );
    }
    assert!(
        metric(m, "sensor_memory_pressure_waiting_seconds_total", &labels(&wl, &[])).is_some(),
        "per-cgroup PSI on v2:\n{m}"
    );

    // The memcg kill: one event, counted once in its cgroup as a memcg kill.
    let kills = oom_kills(part(sec, "events"));
    assert_eq!(kills.len(), 1, "{sec}");
    let e = &kills[0];
    let oom = common::probe_report(&probes, "oom");
    let ctx = oom["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["purpose"] == "kill context")
        .unwrap();
    assert_eq!(e["context_hook"], ctx["hook"], "{e}\n{oom}");
    assert_eq!(e["scope"], "memcg", "{e}");
    assert_eq!(e["cgroup"], victim.as_str(), "{e}");
    assert_eq!(e["victim_comm"], "tail", "{e}");
    assert!(e["victim_pid"].as_i64().unwrap() > 1, "{e}");
    // Its own limit fired (the kernel's memcg where the kill context runs, else the counters).
    assert_eq!(e["limit_scope"], "self", "{e}");
    assert_eq!(e["limit_cgroup"], victim.as_str(), "{e}");
    let counted = common::metric_sum(m, "sensor_oom_kills_total", &labels(&wl, &[("scope", "memcg")]));
    assert_eq!(counted, 1.0, "{m}");
    assert_eq!(metric(m, "sensor_events_total", &[("probe", "oom")]), Some(1.0), "{m}");

    // 20 connects + the second scrape's own succeed, 5 are refused, 3 time out.
    let (ok0, refused0, timeout0, sum0) = tcp_counts(&samples_part(sec, "tcp before"));
    let (ok1, refused1, timeout1, sum1) = tcp_counts(&samples_part(sec, "tcp after"));
    // Loopback handshakes, timed in the kernel: more than nothing, far less than a second each.
    assert!(
        sum1 > sum0 && sum1 - sum0 < 21.0,
        "latency of the 21 successes: {} s\n{sec}",
        sum1 - sum0
    );
    assert_eq!(
        (ok1 - ok0, refused1 - refused0, timeout1 - timeout0),
        (21.0, 5.0, 3.0),
        "successes, refused, timeouts:\n{sec}"
    );

    if first {
        assert_eq!(part(sec, "growth kernel"), "oom_kill 1", "{sec}");
        let kills = oom_kills(part(sec, "growth events"));
        let parent = format!("/grower-{pass}");
        let g = kills
            .iter()
            .find(|e| e["cgroup"] == format!("{parent}/job"))
            .unwrap_or_else(|| panic!("no kill of the grower:\n{sec}"));
        assert_eq!(g["reason"], "growth", "2 MiB/s for 16 s: {g}");
        // The child has no limit: its parent's fired, and the verdict says so.
        assert_eq!(g["limit_scope"], "ancestor", "{g}");
        assert_eq!(g["limit_cgroup"], parent.as_str(), "{g}");
        assert_eq!(g["memory_limit_bytes"], Value::Null, "{g}");
        assert_eq!(g["lead_up"]["limit_bytes"], 32u64 << 20, "{g}");
        let verdict = g["lead_up"]["verdict"].as_str().unwrap_or("");
        assert!(
            verdict.ends_with(&format!(
                "until the 32 MiB limit of ancestor {parent}, the cgroup has none (leak-like)"
            )),
            "{g}"
        );
    }

    // The host-wide kill: global scope, the "host" verdict.
    assert_eq!(part(sec, "host victim exit"), "137", "{sec}");
    let host = oom_kills(part(sec, "host events"));
    let h = host.last().expect("the host kill");
    assert_eq!(h["scope"], "global", "{h}");
    if h["context_hook"].is_string() {
        assert_eq!(h["constraint"], "none", "{h}");
    }
    assert_eq!(h["victim_comm"], "tail", "{h}");
    assert_eq!(h["reason"], "host", "{h}");
    assert_eq!(h["limit_scope"], "host", "{h}");
    assert_eq!(h["limit_cgroup"], Value::Null, "{h}");
    let hm = &samples_part(sec, "host metrics");
    assert_eq!(
        common::metric_sum(hm, "sensor_oom_kills_total", &[("scope", "global"), ("reason", "host")]),
        1.0,
        "{hm}"
    );
    probes
}

/// Doctor's human output names reasons, one line each, never a verifier log (`--json` and
/// `--verbose` keep the logs).
fn check_doctor(out: &str) -> &str {
    let doctor = section(out, "DOCTOR", "DOCTOR");
    for l in doctor.lines() {
        let verifier_line = l
            .trim_start()
            .split_once(": (")
            .is_some_and(|(n, _)| n.parse::<u32>().is_ok());
        assert!(
            !verifier_line && !l.contains("Verifier output") && !l.contains("processed "),
            "a verifier log line in doctor: {l}\n{doctor}"
        );
    }
    doctor
}

/// The `split` pass: the OOM probe without its required tracepoint attaches nothing (its
/// fentry kill context, attached first, is unloaded again), and its report, state and
/// `sensor_probe_attached` all say so; the other probes run.
fn nothing_without_the_required_part(out: &str) {
    let sec = section(out, "PASS split", "split");
    assert_eq!(part(sec, "sensor exit"), "0", "{sec}");
    let probes: Value = serde_json::from_str(part(sec, "probes")).expect("probes JSON");
    let m = &samples_part(sec, "metrics");
    let oom = common::probe_report(&probes, "oom");
    assert_eq!(oom["state"], "unsupported", "{oom}");
    let groups = oom["groups"].as_array().unwrap();
    assert!(groups.iter().all(|g| g["hook"].is_null()), "{oom}");
    let ctx = groups.iter().find(|g| g["purpose"] == "kill context").unwrap();
    assert_eq!(
        ctx["attempts"][0]["error"], "detached: the required part 'victim fields' could not attach",
        "{oom}"
    );
    for hook in ["fentry", "kprobe", "raw_tracepoint", "tracepoint"] {
        let got = metric(m, "sensor_probe_attached", &[("probe", "oom"), ("hook", hook)]);
        assert_eq!(got, Some(0.0), "oom {hook}:\n{m}");
    }
    let state = metric(m, "sensor_probe_state", &[("probe", "oom"), ("state", "unsupported")]);
    assert_eq!(state, Some(1.0), "{m}");
    for p in ["memcg", "tcp"] {
        let r = common::probe_report(&probes, p);
        assert!(r["state"] == "attached" || r["state"] == "degraded", "{r}");
    }
}

/// The TCP probe's connect state group runs the program of `table` ("slots": compare-and-swap
/// array; "hash": the hash map of kernels without BPF atomics).
fn tcp_table(probes: &Value) -> &'static str {
    let tcp = common::probe_report(probes, "tcp");
    let first = &tcp["groups"][0];
    assert_eq!(first["purpose"], "connect state", "{tcp}");
    let refused = first["attempts"][0]["error"].as_str().unwrap_or("");
    if refused.starts_with("BPF atomics: kernel 5.12+") {
        "hash"
    } else {
        "slots"
    }
}

#[test]
fn kernel_5_10() {
    let Some(out) = vm::boot(&vm::kernel("5.10"), "default,split") else {
        return;
    };
    let probes = check_pass(&out, "default", true);
    nothing_without_the_required_part(&out);
    // No BPF atomics before 5.12: the feature probe picks the hash-map connect table by itself,
    // and the counts above are exact with it.
    assert_eq!(tcp_table(&probes), "hash", "{probes}");
    let tcp = common::probe_report(&probes, "tcp");
    assert_eq!(tcp["groups"][0]["hook"], "raw_tracepoint", "{tcp}");
    let doctor = check_doctor(&out);
    assert!(
        doctor.contains("atomics                  NO   BPF atomics: kernel 5.12+"),
        "{doctor}"
    );
    assert!(
        doctor.contains(
            "raw_tracepoint inet_sock_set_state: BPF atomics: kernel 5.12+ (the hash-map connect table is used)"
        ),
        "{doctor}"
    );
}

/// 6.12 twice: first without the OOM kill context (the kills' scope from their stacks, the limit
/// that fired from the cgroup v2 counters, `memory.events.local`, with the growth kill under its
/// parent's limit), then with every part on its preferred hook.
#[test]
fn kernel_6_12() {
    let Some(out) = vm::boot(&vm::kernel("6.12"), "counters,default") else {
        return;
    };
    check_pass(&out, "counters", true);
    let sec = section(&out, "PASS counters", "counters");
    for e in oom_kills(part(sec, "host events")) {
        assert_eq!(
            (&e["context_hook"], &e["oom_memcg_id"]),
            (&Value::Null, &Value::Null),
            "{e}"
        );
    }
    let probes = check_pass(&out, "default", false);
    assert_eq!(tcp_table(&probes), "slots", "{probes}");
    for p in ["oom", "memcg", "tcp"] {
        let r = common::probe_report(&probes, p);
        assert_eq!(r["state"], "attached", "every part with its preferred hook: {r}");
    }
    check_doctor(&out);
}

/// arm64: Debian's arm64 6.1 cloud kernel under qemu-system-aarch64 (TCG, `-M virt -cpu max`)
/// running the static aarch64 binary the image ships (`cargo xtask dist --arch arm64`), with
/// the same exact checks as every row (memcg kill against `memory.events`, growth verdict,
/// connects ok / refused / timed out, host-wide kill, probe states) and doctor's reasons.
#[test]
fn arm64_on_debian_6_1() {
    let Some(out) = vm::boot(&vm::kernel("6.1-arm64"), "default") else {
        return;
    };
    let probes = check_pass(&out, "default", true);
    // arm64 has BPF atomics: the compare-and-swap connect table.
    assert_eq!(tcp_table(&probes), "slots", "{probes}");
    let doctor = check_doctor(&out);
    assert!(doctor.contains("kernel       6.1.0-"), "{doctor}");
    assert!(doctor.contains("-cloud-arm64"), "the arm64 kernel ran: {doctor}");
}

/// Debian's 6.1, twice: the fentry and the kprobe path of the OOM kill context (the CI kernel
/// has neither), the second time also on the TCP probe's classic-tracepoint entry.
#[test]
fn fentry_and_kprobe_paths_on_debian_6_1() {
    let Some(out) = vm::boot(&vm::kernel("6.1"), "fentry,kprobe") else {
        return;
    };
    for (pass, hook, other) in [("fentry", "fentry", "kprobe"), ("kprobe", "kprobe", "fentry")] {
        let probes = check_pass(&out, pass, pass == "fentry");
        let sec = section(&out, &format!("PASS {pass}"), pass);
        let m = &samples_part(sec, "metrics");
        let oom = &probes[0];
        let groups = oom["groups"].as_array().unwrap();
        let ctx = groups.iter().find(|g| g["purpose"] == "kill context").unwrap();
        assert_eq!(ctx["hook"], hook, "{sec}");
        let fields = groups.iter().find(|g| g["purpose"] == "victim fields").unwrap();
        assert_eq!(fields["hook"], "tracepoint");
        // Debian's 6.1 backports the mark_victim fields and task argument: all parts attach,
        // and the 6.1 verifier accepts the same programs as the CI kernel's.
        let raw = groups.iter().find(|g| g["purpose"] == "victim cgroup").unwrap();
        assert_eq!(raw["hook"], "raw_tracepoint", "{sec}");
        assert_eq!(
            oom["state"],
            if hook == "fentry" { "attached" } else { "degraded" },
            "{sec}"
        );
        assert_eq!(
            metric(m, "sensor_probe_attached", &[("probe", "oom"), ("hook", hook)]),
            Some(1.0)
        );
        assert_eq!(
            metric(m, "sensor_probe_attached", &[("probe", "oom"), ("hook", other)]),
            Some(0.0)
        );

        // TCP on 6.1: the raw entry (compare-and-swap slots, BTF task pointer) in the first
        // pass, the classic-tracepoint entry in the second.
        assert_eq!(tcp_table(&probes), "slots", "{probes}");
        let tcp = common::probe_report(&probes, "tcp");
        let tcp_hook = if pass == "fentry" {
            "raw_tracepoint"
        } else {
            "tracepoint"
        };
        assert_eq!(tcp["groups"][0]["hook"], tcp_hook, "{tcp}");
        // The connect-end recovery program: a raw tracepoint only (excluded in the second
        // pass). Debian's 6.1 backports `tcp_done_with_error()` (state change before the error
        // report), so it attaches; a 6.1 without it must say so instead.
        let rec = tcp["groups"]
            .as_array()
            .and_then(|g| g.iter().find(|g| g["purpose"] == "connect end recovery"))
            .unwrap_or_else(|| panic!("no connect end recovery group: {tcp}"));
        if pass == "fentry" {
            let why = rec["attempts"][0]["error"].as_str().unwrap_or("");
            assert!(
                rec["hook"] == "raw_tracepoint" || why.contains("no tcp_done_with_error in BTF"),
                "{tcp}"
            );
        } else {
            assert_eq!(rec["hook"], Value::Null, "{tcp}");
            assert_eq!(tcp["state"], "degraded", "{tcp}");
        }

        let e = &oom_kills(part(sec, "events"))[0];
        assert_eq!(e["constraint"], "memcg", "{e}");
        assert_eq!(e["totalpages"], 8192, "32 MiB limit in 4 KiB pages: {e}");
        assert_eq!(e["oom_memcg_id"], e["memcg_id"], "the victim's own memcg ran out: {e}");
        assert_eq!(e["memory_limit_bytes"], 33554432u64, "{e}");
        assert_eq!(e["victim_tgid"], e["victim_pid"], "{e}");
        let anon = e["anon_rss_bytes"].as_u64().expect("anon rss");
        assert!((24 << 20..=32 << 20).contains(&anon), "{e}");
        let h = oom_kills(part(sec, "host events")).pop().unwrap();
        assert!(
            h["lead_up"]["verdict"]
                .as_str()
                .is_some_and(|v| v.starts_with("host out of memory")),
            "{h}"
        );
        let unseen = [
            ("cgroup", ""),
            ("container", ""),
            ("container_id", ""),
            ("namespace", ""),
            ("pod", ""),
            ("pod_uid", ""),
            ("source", "vmstat"),
        ];
        assert_eq!(metric(m, "sensor_oom_kills_unseen", &unseen), Some(0.0), "{m}");
    }
    let doctor = section(&out, "DOCTOR", "DOCTOR");
    assert!(
        doctor.contains("kill context (optional): uses fentry oom_kill_process"),
        "{doctor}"
    );
    check_doctor(&out);
}

/// Not a test: the connect loop the overhead measurement runs inside the VM
/// (`SENSOR_LOOP_SECONDS` set): loopback connects closed with RST, to a listener in this process,
/// for that long; prints `RATE <connects per second>`.
#[test]
#[ignore = "helper process run inside the VM"]
fn connect_loop_helper() {
    use std::net::TcpListener;
    let Some(secs) = std::env::var("SENSOR_LOOP_SECONDS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
    else {
        return;
    };
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            drop(c);
        }
    });
    let until = std::time::Instant::now() + std::time::Duration::from_secs_f64(secs);
    let mut n = 0u64;
    while std::time::Instant::now() < until {
        let c = std::net::TcpStream::connect(addr).expect("connect");
        common::close_with_rst(&c);
        n += 1;
    }
    println!("RATE {}", n as f64 / secs);
}

/// Median connect rate of the `mode` rounds (`base`: 8, before and after; `sensor`: 5) of a
/// bench pass.
fn median_rate(out: &str, mode: &str) -> f64 {
    let sec = section(out, "PASS bench", "bench");
    let mut rates: Vec<f64> = sec
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("--- rate {mode} ")))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    assert!(rates.len() >= 5, "{sec}");
    rates.sort_by(f64::total_cmp);
    let n = rates.len();
    (rates[(n - 1) / 2] + rates[n / 2]) / 2.0
}

/// The TCP probe's cost per connect with the hash-map table (5.10) against the array (6.1):
/// each kernel's loopback connect rate with the sensor over its rate without, under QEMU's
/// emulation (noisy: a measurement for docs/benchmarks.md, not a check).
#[test]
#[ignore = "a measurement (docs/benchmarks.md), not a check"]
fn tcp_overhead_5_10_against_6_1() {
    // One VM at a time: two would compete for the CPUs in each other's rounds.
    let runs: Vec<(&str, Option<String>)> = ["5.10", "6.1"]
        .into_iter()
        .map(|k| (k, vm::boot_with(&vm::kernel(k), "bench", true)))
        .collect();
    let mut ratios = Vec::new();
    for (k, out) in runs {
        let Some(out) = out else { return };
        let probes: Value =
            serde_json::from_str(part(section(&out, "PASS bench", "bench"), "probes")).expect("probes JSON");
        let table = tcp_table(&probes);
        let (base, sensor) = (median_rate(&out, "base"), median_rate(&out, "sensor"));
        println!(
            "kernel {k} ({table} table): {base:.0} connects/s without the sensor, {sensor:.0} with it: ratio {:.3}",
            sensor / base
        );
        ratios.push(sensor / base);
    }
    println!("rate ratio 5.10 (hash map) / 6.1 (array): {:.3}", ratios[0] / ratios[1]);
}
