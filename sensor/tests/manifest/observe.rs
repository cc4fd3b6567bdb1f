//! What a test asserts of a running pod: probes as on the host, kills and connects counted, its footprint.

use super::*;

/// Exactly what `sensor doctor --json` says on the host, per probe: state, reason and every
/// hook attempt (its outcome and error).
pub(crate) fn host_doctor_probes(tracefs: &str) -> Vec<serde_json::Value> {
    let out = Command::new(SENSOR)
        .args(["doctor", "--json", "--tracefs-path", tracefs])
        .output()
        .unwrap();
    assert!(out.status.success(), "doctor: {}", text(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor JSON");
    assert_eq!(r["attach_tested"], true, "doctor on the host must really attach");
    r["probes"].as_array().expect("probes").clone()
}

/// The ConfigMap's `tracefs_path`, which the host's doctor is given too.
pub(crate) fn configmap_tracefs() -> String {
    let cm = read_yaml("deploy/kubernetes/configmap.yaml");
    let cfg: Value = serde_yaml_ng::from_str(cm["data"]["sensor.yaml"].as_str().unwrap()).unwrap();
    cfg["tracefs_path"]
        .as_str()
        .unwrap_or("/sys/kernel/tracing")
        .to_string()
}

pub(crate) fn assert_probes_match_host(pod: &dyn Pod) {
    let (code, body) = pod.get("/api/v1/probes");
    assert_eq!(code, 200, "{body}");
    let in_pod: Vec<serde_json::Value> = serde_json::from_str(&body).expect("probes JSON");
    let host = host_doctor_probes(&configmap_tracefs());
    assert_eq!(in_pod.len(), host.len(), "pod {body}\nhost {host:?}");
    for h in &host {
        let p = probe_report(&serde_json::Value::Array(in_pod.clone()), h["probe"].as_str().unwrap()).clone();
        assert_eq!(p, *h, "probe {} in the pod vs. doctor on the host", h["probe"]);
    }
}

/// A check the test adds to the template's args: the pod's own /healthz, from inside the pod.
pub(crate) fn self_check_flag(port: u16) -> String {
    format!("[{{name: pod-self, type: http, url: \"http://127.0.0.1:{port}/healthz\", interval: 1s, timeout: 1s}}]")
}

/// `sensor_oom_kills_total` of the victim container `id` is exactly 1 after it was OOM-killed.
pub(crate) fn assert_oom_counted(pod: &dyn Pod, id: &str, scope: &str) {
    pod.wait_sum("sensor_oom_kills_total", &[("container_id", id)], 1.0);
    let m = pod.metrics();
    assert_eq!(
        metric_sum(&m, "sensor_oom_kills_total", &[("container_id", id), ("scope", scope)]),
        1.0,
        "scope {scope}:\n{m}"
    );
}

/// A podman victim (FROM scratch busybox) OOM-killed under a 16 MiB limit; its container id.
pub(crate) fn podman_oom_victim(name: &str) -> String {
    runtimes::podman_rm(&[name]);
    let before = vmstat_oom_kill();
    let mem = (16u64 << 20).to_string();
    // From a scratch directory: conmon leaves a file named `oom` in its working directory when
    // the container is OOM-killed (seen with runtimes::podman_run, whose cwd is sensor/).
    let out = podman()
        .args(["run", "--name", name, "--memory", &mem, "--memory-swap", &mem])
        .args([runtimes::VICTIM_IMAGE, runtimes::BUSYBOX, "tail", "/dev/zero"])
        .current_dir(std::env::temp_dir())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(137),
        "victim should be OOM-killed: {}",
        text(&out)
    );
    // podman's State.OOMKilled stays false on cgroup v1 here: the kernel's count says it.
    assert_eq!(
        vmstat_oom_kill() - before,
        1,
        "exactly one OOM kill (the kernel lock is held)"
    );
    let id = runtimes::podman_id(name);
    runtimes::podman_rm(&[name]);
    id
}

/// One TCP connect inside a podman container of its own (loopback of its network namespace:
/// busybox nc to busybox nc), counted by the sensor for that container. The container stays
/// until then: the sensor names a cgroup it has seen alive.
pub(crate) fn podman_connect_counted(pod: &dyn Pod, name: &str) {
    runtimes::podman_rm(&[name]);
    let bb = runtimes::BUSYBOX;
    let script =
        format!("{bb} nc -l -p 7007 >/dev/null & {bb} sleep 1; echo x | {bb} nc 127.0.0.1 7007; {bb} sleep 120");
    let id = run_ok(podman().args([
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "none",
        runtimes::VICTIM_IMAGE,
        bb,
        "sh",
        "-c",
        &script,
    ]));
    pod.wait_sum(
        "sensor_tcp_connects_total",
        &[("container_id", id.as_str()), ("result", "success")],
        1.0,
    );
    runtimes::podman_rm(&[name]);
}

/// The sensor container's memory-cgroup charge (now, peak) and RSS (now, peak) in bytes, and
/// its CPU seconds so far.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Footprint {
    pub(crate) charge: u64,
    pub(crate) charge_peak: u64,
    pub(crate) rss: u64,
    pub(crate) rss_peak: u64,
    pub(crate) cpu_s: f64,
}

pub(crate) fn footprint(pid: u32) -> Footprint {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = |k: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
            * 1024
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu_s = (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / tick;
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let v1 = cg.lines().find_map(|l| {
        let mut p = l.splitn(3, ':');
        let (_, c, path) = (p.next()?, p.next()?, p.next()?);
        c.split(',').any(|x| x == "memory").then(|| path.to_string())
    });
    let read = |p: PathBuf| -> u64 {
        std::fs::read_to_string(&p)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let (charge, charge_peak) = match v1 {
        Some(path) => {
            let d = Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
            (
                read(d.join("memory.usage_in_bytes")),
                read(d.join("memory.max_usage_in_bytes")),
            )
        }
        None => {
            let path = cg.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/");
            let d = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
            (read(d.join("memory.current")), read(d.join("memory.peak")))
        }
    };
    Footprint {
        charge,
        charge_peak,
        rss: kb("VmRSS:"),
        rss_peak: kb("VmHWM:"),
        cpu_s,
    }
}

pub(crate) fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

pub(crate) fn require_runtime_bits(test: &str) -> Option<KernelGuard> {
    let guard = privileged(test)?;
    if !runtimes::require_podman() {
        return None;
    }
    runtimes::victim_image()?;
    image()?;
    Some(guard)
}

pub(crate) fn tag() -> String {
    format!("manifest-{}", std::process::id())
}
