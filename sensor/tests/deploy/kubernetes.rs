//! The Kubernetes manifests: offline schema validation, and the DaemonSet's capabilities running the real sensor.

use super::*;

#[test]
fn kubernetes_manifests_validate_offline() {
    let Some(py) = deploy_python() else { return };
    let dir = root().join("deploy/kubernetes");
    let (ok, t) = validate_manifests(&py, &dir);
    assert!(ok, "{t}");
    // 5 built-in kinds x 2 Kubernetes versions + the ServiceMonitor, for the base and for each
    // overlay (privileged; seccomp: the Localhost profile).
    let trees = ["base", "overlays/privileged", "overlays/seccomp"];
    for tree in trees {
        for kind in [
            "Namespace/sensor",
            "ServiceAccount/sensor",
            "ConfigMap/sensor-config",
            "DaemonSet/sensor",
            "Service/sensor",
        ] {
            for v in ["1.25", "1.37"] {
                let line = format!("OK {tree} {kind} (Kubernetes {v}, strict)");
                assert!(t.lines().any(|l| l == line), "missing `{line}` in\n{t}");
            }
        }
        let sm = format!("OK {tree} ServiceMonitor/sensor (schemas/ CRD subset)");
        assert!(t.lines().any(|l| l == sm), "missing `{sm}` in\n{t}");
    }
    assert_eq!(t.lines().count(), 11 * trees.len(), "{t}");

    // The validator must catch what it is for: a misspelt field in the DaemonSet and a bad
    // duration in the ServiceMonitor.
    let tmp = std::env::temp_dir().join(format!("sensor-k8s-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let st = Command::new("cp").arg("-r").arg(&dir).arg(&tmp).status().unwrap();
    assert!(st.success());
    let edit = |f: &str, from: &str, to: &str| {
        let p = tmp.join(f);
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(s.contains(from), "{f} has no `{from}`");
        std::fs::write(&p, s.replacen(from, to, 1)).unwrap();
    };
    edit(
        "daemonset.yaml",
        "readOnlyRootFilesystem: true",
        "readOnlyRootFileSystem: true",
    );
    edit("servicemonitor.yaml", "interval: 15s", "interval: 15 seconds");
    let (ok, t) = validate_manifests(&py, &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(!ok, "{t}");
    assert!(
        t.contains("FAIL base DaemonSet/sensor (Kubernetes 1.37): spec.template.spec.containers.0.securityContext: Additional properties are not allowed ('readOnlyRootFileSystem' was unexpected)"),
        "{t}"
    );
    assert!(
        t.contains("FAIL base ServiceMonitor/sensor: spec.endpoints.0.interval"),
        "{t}"
    );
}

#[test]
fn daemonset_schedules_on_every_architecture() {
    // The image is a manifest list for linux/amd64 and linux/arm64 (`cargo xtask image`), so a
    // mixed cluster runs one DaemonSet: nothing in it or its overlays may pin an architecture.
    let dir = root().join("deploy/kubernetes");
    let mut files = vec![dir.join("daemonset.yaml")];
    for e in std::fs::read_dir(dir.join("overlays")).unwrap().flatten() {
        for f in std::fs::read_dir(e.path()).unwrap().flatten() {
            files.push(f.path());
        }
    }
    assert!(files.len() > 1, "overlays read: {files:?}");
    for f in files {
        let t = std::fs::read_to_string(&f).unwrap();
        for pin in ["kubernetes.io/arch", "amd64", "arm64", "x86_64", "aarch64"] {
            assert!(!t.contains(pin), "{} pins an architecture ({pin})", f.display());
        }
    }
}

/// The DaemonSet container's `capabilities.add`, read from the manifest.
fn daemonset_caps() -> Vec<String> {
    let y = std::fs::read_to_string(root().join("deploy/kubernetes/daemonset.yaml")).unwrap();
    let mut caps = Vec::new();
    let mut in_add = false;
    for line in y.lines() {
        let l = line.trim();
        if l == "add:" {
            in_add = true;
            continue;
        }
        if in_add {
            if l.starts_with('#') {
                continue;
            }
            match l.strip_prefix("- ") {
                Some(c) => caps.push(c.trim().to_string()),
                None => break,
            }
        }
    }
    assert!(y.contains("drop: [ALL]"), "the DaemonSet drops every capability first");
    caps
}

/// `setpriv` arguments that leave uid 0 with exactly `caps` and no way to gain more, as the
/// DaemonSet's securityContext does (allowPrivilegeEscalation: false = no_new_privs).
fn with_caps(caps: &[String]) -> Vec<String> {
    let list: String = caps.iter().map(|c| format!(",+{}", c.to_lowercase())).collect();
    vec![
        format!("--inh-caps=-all{list}"),
        format!("--ambient-caps=-all{list}"),
        format!("--bounding-set=-all{list}"),
        "--no-new-privs".into(),
    ]
}

/// Starts the sensor under setpriv with `caps` and the DaemonSet's ConfigMap config.
fn start_with_caps(caps: &[String], config: &Path) -> (std::process::Child, u16, PathBuf) {
    let port = free_port();
    let log = std::env::temp_dir().join(format!("sensor-caps-{}-{port}.log", std::process::id()));
    let child = Command::new("setpriv")
        .args(with_caps(caps))
        .arg(SENSOR)
        .args(["run", "--config"])
        .arg(config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        // Its own journal, never the host's /var/lib/sensor/journal.
        .arg("--journal.path")
        .arg(common::journal_dir(port))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (child, port, log)
}

fn wait_ready(port: u16, child: &mut std::process::Child, log: &Path) {
    let start = std::time::Instant::now();
    loop {
        if let Ok((200, _)) = http_get(port, "/readyz") {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "sensor exited with {st}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(start.elapsed() < Duration::from_secs(30), "not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The ConfigMap's sensor.yaml, as a file.
fn configmap_config() -> PathBuf {
    let y = std::fs::read_to_string(root().join("deploy/kubernetes/configmap.yaml")).unwrap();
    let body: String = y
        .split_once("sensor.yaml: |\n")
        .unwrap()
        .1
        .lines()
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    let p = std::env::temp_dir().join(format!("sensor-configmap-{}.yaml", std::process::id()));
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn daemonset_capabilities_are_sufficient_and_each_needed() {
    let Some(_k) = privileged("daemonset_capabilities_are_sufficient_and_each_needed") else {
        return;
    };
    if Command::new("setpriv").arg("--version").output().is_err() {
        tool_missing("setpriv", "apt-get install util-linux");
        return;
    }
    let caps = daemonset_caps();
    assert_eq!(caps, ["BPF", "PERFMON", "SYSLOG"]);
    let config = configmap_config();

    // Exactly the DaemonSet's set, with its ConfigMap: an OOM kill is counted, attributed and
    // scoped.
    let cg = MemCgroup::new("sensor-it-caps", 24 << 20);
    let (mut child, port, log) = start_with_caps(&caps, &config);
    wait_ready(port, &mut child, &log);
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim()
        .to_string();
    // CAP_SYSLOG 34, CAP_PERFMON 38, CAP_BPF 39.
    assert_eq!(eff, format!("{:016x}", (1u64 << 34) | (1 << 38) | (1 << 39)));
    cg.cause_oom_kill();
    let labels = cg.kill_labels();
    let mut m = String::new();
    for _ in 0..100 {
        m = http_get(port, "/metrics").unwrap().1;
        if metric_sum(&m, "sensor_oom_kills_total", &labels) == 1.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        metric_sum(&m, "sensor_oom_kills_total", &labels),
        1.0,
        "{m}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let oom_degraded = metric(&m, "sensor_probe_state", &[("probe", "oom"), ("state", "degraded")]) == Some(1.0);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(common::journal_dir(port));

    // Without BPF or PERFMON the sensor refuses to start, with its one sentence.
    for missing in ["BPF", "PERFMON"] {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let out = Command::new("setpriv")
            .args(with_caps(&fewer))
            .arg(SENSOR)
            .args(["run", "--listen", "127.0.0.1:0"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "without {missing}: {}", text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "sensor: the sensor needs CAP_BPF and CAP_PERFMON, or root\n"
        );
    }

    // Without SYSLOG, /proc/kallsyms shows no addresses: where the kill-context hook (fentry /
    // kprobe) is unavailable, as on this kind of kernel, the scope becomes "unknown".
    if !oom_degraded {
        eprintln!("kill-context hook attached: SYSLOG is not needed for the scope on this kernel");
        return;
    }
    let fewer: Vec<String> = caps.iter().filter(|c| *c != "SYSLOG").cloned().collect();
    let (mut child, port, log) = start_with_caps(&fewer, &config);
    wait_ready(port, &mut child, &log);
    cg.cause_oom_kill();
    let unknown = plain(&[("scope", "unknown")], cg.rel.as_str());
    let mut got = None;
    for _ in 0..100 {
        let sum = metric_sum(
            &http_get(port, "/metrics").unwrap().1,
            "sensor_oom_kills_total",
            &unknown,
        );
        got = (sum > 0.0).then_some(sum);
        if got.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(common::journal_dir(port));
    assert_eq!(got, Some(1.0), "{}", std::fs::read_to_string(&log).unwrap_or_default());
}
