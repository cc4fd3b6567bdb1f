//! Integration tests against the real kernel: real BPF programs, real OOM kills.
//! Under CI=true they fail (never skip) when BPF cannot be loaded.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn oom_kill_flows_to_metrics_and_events() {
    let Some(_k) = privileged("oom_kill_flows_to_metrics_and_events") else {
        return;
    };
    let cg = MemCgroup::new("sensor-it-oom", 32 << 20);
    let d = Daemon::start(&[]);

    let m = d.metrics();
    assert_eq!(metric_sum(&m, "sensor_oom_kills_total", &[]), 0.0, "{m}");
    assert_eq!(metric(&m, "sensor_events_total", &[("probe", "oom")]), Some(0.0));
    for reason in ["buffer_full", "map_full", "no_scratch"] {
        assert_eq!(
            metric(&m, "sensor_events_lost_total", &[("probe", "oom"), ("reason", reason)]),
            Some(0.0)
        );
    }
    assert_eq!(metric(&m, "sensor_decode_errors_total", &[("probe", "oom")]), Some(0.0));
    let kernel = kernel_release();
    assert_eq!(
        metric(
            &m,
            "sensor_build_info",
            &[("version", env!("CARGO_PKG_VERSION")), ("kernel", &kernel)]
        ),
        Some(1.0)
    );

    let pid = cg.cause_oom_kill();
    assert_eq!(cg.kernel_oom_kills(), 1, "the kernel itself counted one kill");
    let labels = cg.kill_labels();
    let m = d.wait_metric_sum("sensor_oom_kills_total", &labels, 1.0, Duration::from_secs(5));
    assert_eq!(metric_sum(&m, "sensor_oom_kills_total", &[]), 1.0);
    assert_eq!(metric(&m, "sensor_events_total", &[("probe", "oom")]), Some(1.0));
    assert_eq!(metric(&m, "sensor_decode_errors_total", &[("probe", "oom")]), Some(0.0));

    let events = d.oom_events(0);
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e["type"], "oom_kill");
    assert_eq!(e["victim_pid"], pid);
    assert_eq!(e["victim_comm"], "tail");
    assert!(d.oom_events(e["seq"].as_u64().unwrap()).is_empty());

    let st = d.stop();
    assert_eq!(st.code(), Some(0), "SIGTERM must exit 0");
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[test]
fn doctor_json_agrees_with_metrics() {
    let Some(_k) = privileged("doctor_json_agrees_with_metrics") else {
        return;
    };
    let out = run_sensor(&["doctor", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor JSON");
    assert_eq!(doc["attach_tested"], true);
    assert_eq!(doc["kernel_release"], kernel_release());
    let probes = doc["probes"].as_array().expect("probes");
    assert!(!probes.is_empty());

    let d = Daemon::start(&[]);
    let m = d.metrics();
    for p in probes {
        let name = p["probe"].as_str().unwrap();
        let mut any = false;
        for g in p["groups"].as_array().unwrap() {
            for a in g["attempts"].as_array().unwrap() {
                let hook = a["hook"].as_str().unwrap();
                let ok = a["ok"] == true;
                any |= ok;
                let want = if ok { 1.0 } else { 0.0 };
                let got = metric(&m, "sensor_probe_attached", &[("probe", name), ("hook", hook)]);
                assert_eq!(got, Some(want), "{name} {hook}:\n{m}");
            }
        }
        if !any {
            assert_eq!(
                metric(&m, "sensor_probe_attached", &[("probe", name), ("hook", "none")]),
                Some(0.0)
            );
        }
        let state = p["state"].as_str().unwrap();
        assert_eq!(
            metric(&m, "sensor_probe_state", &[("probe", name), ("state", state)]),
            Some(1.0)
        );
    }
    let (code, body) = d.get("/api/v1/probes");
    assert_eq!(code, 200);
    let api: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(&api, &doc["probes"], "daemon and doctor report the same attach results");
    assert_eq!(d.stop().code(), Some(0));

    // Whatever this kernel offers, the text says plainly which hook each OOM part uses.
    let text = String::from_utf8(run_sensor(&["doctor"]).stdout).unwrap();
    let oom = probes.iter().find(|p| p["probe"] == "oom").expect("oom probe");
    for g in oom["groups"].as_array().unwrap() {
        if let Some(a) = g["attempts"].as_array().unwrap().iter().find(|a| a["ok"] == true) {
            let purpose = g["purpose"].as_str().unwrap();
            let line = format!("uses {} {}", a["hook"].as_str().unwrap(), a["target"].as_str().unwrap());
            assert!(
                text.contains(&format!("{purpose} (")) && text.contains(&line),
                "missing '{line}' in:\n{text}"
            );
        }
    }
    let unsupported = |name: &str| {
        let lists = [
            doc["program_types"].as_array().unwrap(),
            doc["attach"].as_array().unwrap(),
        ];
        lists
            .iter()
            .flat_map(|l| l.iter())
            .any(|s| s["name"].as_str().unwrap().starts_with(name) && s["supported"] == false)
    };
    if unsupported("tracing") && unsupported("kprobe_attach") {
        // This project's CI kernel: no fentry, no kprobes; the victim comes from tracepoints.
        assert_eq!(oom["state"], "degraded");
        assert!(
            text.contains("kill context (optional): NOT ATTACHED: fentry and kprobe unavailable on this kernel"),
            "{text}"
        );
        assert!(
            text.contains("victim fields (required): uses tracepoint oom/mark_victim"),
            "{text}"
        );
    }
}

#[test]
fn readiness_and_health_endpoints() {
    let Some(_k) = privileged("readiness_and_health_endpoints") else {
        return;
    };
    let d = Daemon::start(&[]);
    assert_eq!(d.get("/healthz"), (200, "ok\n".to_string()));
    let (code, body) = d.get("/readyz");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], true);
    assert_eq!(d.get("/nope").0, 404);
    assert_eq!(d.get("/api/v1/events?since=notanumber").0, 400);
    assert_eq!(d.stop().code(), Some(0));
}

#[test]
fn strict_fails_when_a_probe_is_degraded() {
    let Some(_k) = privileged("strict_fails_when_a_probe_is_degraded") else {
        return;
    };
    let doc: serde_json::Value = serde_json::from_slice(&run_sensor(&["doctor", "--json"]).stdout).unwrap();
    let degraded = doc["probes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["state"] == "degraded");
    if degraded {
        let out = run_sensor(&["run", "--strict", "--listen", &format!("127.0.0.1:{}", free_port())]);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--strict: oom is degraded"), "{err}");
    } else {
        // Every probe has its preferred hook: strict mode starts (and would run forever).
        let d = Daemon::start(&["--strict"]);
        assert_eq!(d.stop().code(), Some(0));
    }
}

#[test]
fn unprivileged_run_says_one_sentence() {
    // Needs root only to drop privileges; unprivileged runners are already in that state.
    let mut cmd = if can_setpriv() {
        let mut c = std::process::Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            SENSOR,
        ]);
        c
    } else {
        std::process::Command::new(SENSOR)
    };
    let out = cmd.args(["run", "--listen", "127.0.0.1:0"]).output().expect("run");
    if out.status.success() {
        panic!("unprivileged sensor must not start");
    }
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err, "sensor: the sensor needs CAP_BPF and CAP_PERFMON, or root\n");
}

fn can_setpriv() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && std::process::Command::new("setpriv").arg("--version").output().is_ok()
}

#[test]
fn bad_config_names_file_key_and_reason() {
    let dir = std::env::temp_dir().join(format!("sensor-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bad.yaml");
    std::fs::write(&f, "probes:\n  oom:\n    enabled: maybe\n").unwrap();
    let out = run_sensor(&["run", "--config", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!("sensor: config {}: key 'probes.oom.enabled': ", f.display())),
        "{err}"
    );
    assert!(!err.contains("panicked") && !err.contains("stack backtrace"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let out = run_sensor(&["run", "--config", "/nonexistent/sensor.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("config /nonexistent/sensor.yaml: cannot read"));

    // Flags are validated like the file.
    let out = run_sensor(&["run", "--alerting.availability-threshold", "7", "--print-config"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("key 'alerting.availability_threshold'"));
    let out = run_sensor(&["run", "--probes.oom.enabled", "false", "--print-config"]);
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("oom:\n    enabled: false"), "{printed}");
}

/// A probe whose required part cannot attach runs nothing: the OOM probe without its
/// `oom/mark_victim` tracepoint (excluded here) unloads the raw tracepoint it had attached, and
/// `/api/v1/probes`, `sensor_probe_state` and `sensor_probe_attached` all say so.
#[test]
fn a_probe_without_its_required_part_attaches_nothing() {
    let Some(_k) = privileged("a_probe_without_its_required_part_attaches_nothing") else {
        return;
    };
    let d = Daemon::start(&["--probes.oom.exclude-hooks", "tracepoint"]);
    let (code, body) = d.get("/api/v1/probes");
    assert_eq!(code, 200);
    let probes: serde_json::Value = serde_json::from_str(&body).unwrap();
    let oom = probe_report(&probes, "oom");
    assert_eq!(oom["state"], "unsupported", "{oom}");
    let groups = oom["groups"].as_array().unwrap();
    assert!(groups.iter().all(|g| g["hook"].is_null()), "nothing runs: {oom}");
    // This kernel's raw mark_victim passes the task: that part attached, then was unloaded.
    let raw = groups.iter().find(|g| g["purpose"] == "victim cgroup").unwrap();
    assert_eq!(
        raw["attempts"][0]["error"], "detached: the required part 'victim fields' could not attach",
        "{oom}"
    );
    let m = d.metrics();
    for hook in ["fentry", "kprobe", "raw_tracepoint", "tracepoint"] {
        assert_eq!(
            metric(&m, "sensor_probe_attached", &[("probe", "oom"), ("hook", hook)]),
            Some(0.0),
            "{hook}:\n{m}"
        );
    }
    assert_eq!(
        metric(&m, "sensor_probe_state", &[("probe", "oom"), ("state", "unsupported")]),
        Some(1.0),
        "{m}"
    );
    // The kernel agrees: this daemon holds its other probes' programs, and no OOM program.
    let ours = program_names(d.pid());
    assert!(ours.iter().any(|n| n.starts_with("tcp_")), "{ours:?}");
    assert!(!ours.iter().any(|n| n.starts_with("oom_")), "{ours:?}");
    assert_eq!(d.stop().code(), Some(0));
}

/// Names of the BPF programs process `pid` holds (its fds' `prog_id`, named by bpftool).
fn program_names(pid: i32) -> Vec<String> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids: Vec<String> = std::fs::read_dir(&dir)
        .expect("fdinfo")
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("prog_id:").map(|v| v.trim().to_string()))
        })
        .collect();
    ids.sort();
    ids.dedup();
    ids.iter()
        .filter_map(|id| {
            let out = std::process::Command::new("bpftool")
                .args(["-j", "prog", "show", "id", id])
                .output()
                .expect("bpftool (installed by cargo xtask deps)");
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            v["name"].as_str().map(str::to_string)
        })
        .collect()
}
