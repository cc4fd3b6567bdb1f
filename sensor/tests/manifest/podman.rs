//! The DaemonSet under Podman: its seccomp profile, the overlays, each added capability needed.

use super::*;

#[test]
fn seccomp_profile_is_the_runtime_default_plus_bpf() {
    // deploy/seccomp/sensor.json is generated from Podman's default profile for the
    // DaemonSet's capabilities; regenerate it where that default is installed and compare.
    let profile: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("deploy/seccomp/sensor.json")).unwrap()).unwrap();
    let rules = profile["syscalls"].as_array().unwrap();
    let allowed = |name: &str| {
        rules.iter().any(|r| {
            r["action"] == "SCMP_ACT_ALLOW"
                && r.get("args").is_none()
                && r["names"].as_array().unwrap().iter().any(|n| n == name)
        })
    };
    assert!(allowed("bpf") && allowed("perf_event_open"), "{profile}");
    for r in rules {
        assert!(
            r.get("includes").is_none() && r.get("excludes").is_none(),
            "plain OCI rules only: {r}"
        );
    }
    assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
    // One profile for the multi-arch image: both native architectures are listed.
    let arches = profile["architectures"].as_array().unwrap();
    for a in ["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"] {
        assert!(arches.iter().any(|x| x == a), "{a} missing: {arches:?}");
    }
    let source = Path::new("/usr/share/containers/seccomp.json");
    if !require(
        "",
        source.is_file(),
        &format!("{} is missing (podman)", source.display()),
    ) {
        return;
    }
    let out = Command::new("python3")
        .arg(root().join("deploy/seccomp/generate.py"))
        .arg("--check")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn podman_default_seccomp_denies_bpf_and_the_sensor_says_why() {
    let Some(_k) = require_runtime_bits("podman_default_seccomp_denies_bpf_and_the_sensor_says_why") else {
        return;
    };
    let run = PodRun::from_daemonset(&daemonset(None), &tag());
    assert!(matches!(run.seccomp, Seccomp::RuntimeDefault), "{:?}", run.seccomp);
    let pod = PodmanPod::start(&run, &format!("sensor-{}-default", tag()), &[]);
    let code = pod.wait_exit();
    let logs = pod.logs();
    assert_eq!(code, 1, "a clear failure, not a crash:\n{logs}");
    assert!(
        logs.contains(
            "sensor: cannot load the sensor's eBPF programs: seccomp filter denies bpf() (Seccomp: 2 in /proc/self/status; EPERM for every bpf() call although CAP_BPF is effective): run the container with the sensor's seccomp profile deploy/seccomp/sensor.json"
        ),
        "{logs}"
    );
    assert!(!logs.contains("the kernel refuses"), "{logs}");

    // doctor in the same container says so for every probe.
    let name = format!("sensor-{}-doctor", tag());
    runtimes::podman_rm(&[&name]);
    let out = podman()
        .args(["run", "--rm", "--name", &name])
        .args(run.podman_args())
        .args(["--entrypoint", "/sensor", IMAGE, "doctor", "--json"])
        .args(["--tracefs-path", &configmap_tracefs()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor JSON");
    assert_eq!(r["seccomp"]["mode"], "filter", "{r}");
    let why = r["seccomp"]["denies_bpf"].as_str().expect("denies_bpf");
    assert!(why.starts_with("seccomp filter denies bpf()"), "{why}");
    for p in r["probes"].as_array().unwrap() {
        assert_eq!(p["state"], "unsupported", "{p}");
        assert_eq!(p["reason"].as_str(), Some(why), "{p}");
    }
    for t in r["program_types"].as_array().unwrap() {
        assert!(
            t["detail"].as_str().unwrap().starts_with("seccomp filter denies bpf()"),
            "{t}"
        );
    }
}

#[test]
fn daemonset_runs_under_podman_with_the_seccomp_overlay() {
    let Some(_k) = require_runtime_bits("daemonset_runs_under_podman_with_the_seccomp_overlay") else {
        return;
    };
    let run = PodRun::from_daemonset(&daemonset(Some("seccomp")), &tag());
    assert!(matches!(run.seccomp, Seccomp::Localhost(_)), "{:?}", run.seccomp);
    let check = self_check_flag(run.ready_port);
    let pod = PodmanPod::start(&run, &format!("sensor-{}-seccomp", tag()), &["--checks", &check]);
    wait_ready(&pod, &run);
    let pid = pod.pid().unwrap();
    let start = footprint(pid);
    let t0 = Instant::now();

    // Exactly the template's capabilities, seccomp filter on, no new privileges.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap()
            .trim()
            .to_string()
    };
    let cap_bit = |c: &str| {
        CAPS.iter()
            .position(|k| *k == c)
            .unwrap_or_else(|| panic!("capability {c}"))
    };
    let want: u64 = run.cap_add.iter().map(|c| 1u64 << cap_bit(c)).sum();
    assert_eq!(field("CapEff:"), format!("{want:016x}"));
    assert_eq!(field("CapBnd:"), format!("{want:016x}"));
    assert_eq!(field("Seccomp:"), "2");
    assert_eq!(field("NoNewPrivs:"), "1");

    assert_probes_match_host(&pod);

    let oom_id = podman_oom_victim(&format!("victim-{}-oom", tag()));
    assert_oom_counted(&pod, &oom_id, "memcg");

    podman_connect_counted(&pod, &format!("victim-{}-tcp", tag()));

    let m = pod.wait_sum("sensor_check_up", &[("check", "pod-self")], 1.0);
    assert!(
        metric_sum(
            &m,
            "sensor_check_runs_total",
            &[("check", "pod-self"), ("result", "success")]
        ) >= 1.0,
        "{m}"
    );

    // Footprint over the run (resources in the YAML are checked against it).
    std::thread::sleep(Duration::from_secs(5));
    let end = footprint(pid);
    let cpu = (end.cpu_s - start.cpu_s) / t0.elapsed().as_secs_f64();
    eprintln!(
        "footprint: charge {:.1} MiB (peak {:.1} MiB), RSS {:.1} MiB (peak {:.1} MiB), CPU {:.4} cores over {:.0} s; requests {:.0} MiB / {} cores, limits {:.0} MiB / {} cores",
        mib(end.charge),
        mib(end.charge_peak),
        mib(end.rss),
        mib(end.rss_peak),
        cpu,
        t0.elapsed().as_secs_f64(),
        mib(run.memory_request),
        run.cpu_request,
        mib(run.memory_limit),
        run.cpu_limit
    );
    assert!(
        end.charge <= run.memory_request,
        "steady charge above the memory request"
    );
    assert!(
        end.charge_peak * 2 <= run.memory_limit,
        "the limit keeps 2x headroom over the peak"
    );
    assert!(cpu <= run.cpu_limit, "CPU above the limit");

    // A clean stop within the grace period.
    let st = podman()
        .args(["stop", "-t", &run.stop_timeout.to_string(), &pod.name])
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", text(&st));
    assert_eq!(pod.wait_exit(), 0, "{}", pod.logs());
}

#[test]
fn each_added_capability_removed_fails_clearly_or_degrades_under_podman() {
    let Some(_k) = require_runtime_bits("each_added_capability_removed_fails_clearly_or_degrades_under_podman") else {
        return;
    };
    let full = PodRun::from_daemonset(&daemonset(Some("seccomp")), &tag());
    for missing in full.cap_add.clone() {
        let mut run = full.clone();
        run.cap_add.retain(|c| *c != missing);
        let pod = PodmanPod::start(&run, &format!("sensor-{}-no-{}", tag(), missing.to_lowercase()), &[]);
        match missing.as_str() {
            "BPF" | "PERFMON" => {
                let code = pod.wait_exit();
                let logs = pod.logs();
                assert_eq!(code, 1, "without {missing}: exit 1, not a crash:\n{logs}");
                assert_eq!(logs, "sensor: the sensor needs CAP_BPF and CAP_PERFMON, or root\n");
            }
            "SYSLOG" => {
                // /proc/kallsyms hides addresses: where the kill-context hook (fentry/kprobe)
                // is unavailable the scope is "unknown", never a wrong one.
                wait_ready(&pod, &run);
                let m = pod.metrics();
                let degraded =
                    metric(&m, "sensor_probe_state", &[("probe", "oom"), ("state", "degraded")]) == Some(1.0);
                let id = podman_oom_victim(&format!("victim-{}-nosyslog", tag()));
                assert_oom_counted(&pod, &id, if degraded { "unknown" } else { "memcg" });
            }
            other => panic!("capability {other} added by the template: say what happens without it"),
        }
    }
}

#[test]
fn privileged_overlay_runs_under_podman() {
    // The fallback for kernels < 5.8 / < 5.11 with a low memlock: privileged (podman then
    // applies no seccomp filter and every capability).
    let Some(_k) = require_runtime_bits("privileged_overlay_runs_under_podman") else {
        return;
    };
    let run = PodRun::from_daemonset(&daemonset(Some("privileged")), &tag());
    assert!(run.privileged);
    let pod = PodmanPod::start(&run, &format!("sensor-{}-privileged", tag()), &[]);
    let status = ready_status(&pod, &run);
    assert!(
        status.lines().any(|l| l == "Seccomp:\t0"),
        "privileged: no filter\n{status}"
    );
    assert_probes_match_host(&pod);
    let id = podman_oom_victim(&format!("victim-{}-priv", tag()));
    assert_oom_counted(&pod, &id, "memcg");
}
