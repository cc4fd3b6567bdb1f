//! The DaemonSet run for real: the pod template of deploy/kubernetes/daemonset.yaml (the file
//! itself, with an overlay's patches where a test says so) and the ConfigMap it mounts, turned
//! into a container of the image `deploy/Dockerfile` builds, under Podman 4.3 and under a
//! private containerd 1.6, each with its own default seccomp profile.
//!
//! Nothing of the template is restated here: capabilities, securityContext, hostPath mounts,
//! env, host namespaces, resources, args and the readiness probe are read from the YAML, and
//! every field the template has is either mapped onto the runtime or named below as not
//! applicable to one node's container (scheduling, API access), so a new field fails the test
//! until it is handled. `podman kube play` (4.3) is not used: it drops `mountPropagation` and
//! `allowPrivilegeEscalation`, and cannot run a hostPath-mounted, capability-dropped container
//! without a CNI network; `podman run` takes each field exactly.
//!
//! The readiness probe's `httpGet` is sent the way kubelet sends it, from outside the
//! container to the pod's network namespace and the probe's port (the test enters the pod's
//! netns on one thread; the pod has no CNI network here, only its loopback).

mod common;

use std::{
    collections::BTreeMap,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
    time::{Duration, Instant},
};

use common::{
    runtimes::{self, podman, run_ok, Containerd, KubeContainer},
    *,
};
use serde_yaml_ng::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn read_yaml(rel: &str) -> Value {
    let p = root().join(rel);
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_yaml_ng::from_str(&s).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The DaemonSet, with the JSON patches (RFC 6902 `add` / `replace`) of
/// `deploy/kubernetes/overlays/<overlay>` applied when one is named.
fn daemonset(overlay: Option<&str>) -> Value {
    let mut ds = read_yaml("deploy/kubernetes/daemonset.yaml");
    let Some(o) = overlay else { return ds };
    let k = read_yaml(&format!("deploy/kubernetes/overlays/{o}/kustomization.yaml"));
    let patches = k["patches"].as_sequence().expect("overlay patches");
    assert!(!patches.is_empty(), "{o}: no patches");
    for p in patches {
        assert_eq!(p["target"]["kind"].as_str(), Some("DaemonSet"), "{o}: {p:?}");
        let ops: Value = serde_yaml_ng::from_str(p["patch"].as_str().expect("patch text")).expect("patch YAML");
        for op in ops.as_sequence().expect("patch ops") {
            let kind = op["op"].as_str().expect("op");
            assert!(kind == "add" || kind == "replace", "{o}: unsupported op {kind}");
            let path = op["path"].as_str().expect("path");
            let mut cur = &mut ds;
            let toks: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            for t in &toks[..toks.len() - 1] {
                cur = match t.parse::<usize>() {
                    Ok(i) => &mut cur[i],
                    Err(_) => &mut cur[*t],
                };
            }
            let last = toks[toks.len() - 1];
            let value = op["value"].clone();
            match cur {
                Value::Mapping(m) => {
                    if kind == "replace" {
                        assert!(m.contains_key(last), "{o}: replace of missing {path}");
                    }
                    m.insert(Value::from(last), value);
                }
                Value::Sequence(s) => {
                    let i: usize = last.parse().expect("index");
                    if kind == "replace" {
                        s[i] = value;
                    } else {
                        s.insert(i, value);
                    }
                }
                _ => panic!("{o}: {path} does not lead to an object or a list"),
            }
        }
    }
    ds
}

/// Fails on any key of `v` that is not in `known`: every field of the template is handled.
fn only_keys(v: &Value, known: &[&str], what: &str) {
    if let Some(m) = v.as_mapping() {
        for k in m.keys() {
            let k = k.as_str().unwrap_or_default();
            assert!(
                known.contains(&k),
                "{what}.{k}: a field this test does not map onto the container runtime; map it (or name it as not applicable) in sensor/tests/manifest.rs"
            );
        }
    }
}

/// Kubernetes quantities: `256Mi`, `80Mi`, `1Gi`, `500m` (CPU), plain numbers.
fn quantity(v: &Value) -> f64 {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => panic!("quantity {v:?}"),
    };
    for (suffix, mult) in [
        ("Ki", 1024f64),
        ("Mi", 1024f64 * 1024.0),
        ("Gi", 1024f64 * 1024.0 * 1024.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("m", 1e-3),
    ] {
        if let Some(n) = s.strip_suffix(suffix) {
            return n.parse::<f64>().expect("quantity number") * mult;
        }
    }
    s.parse().expect("quantity")
}

#[derive(Debug, Clone)]
enum Seccomp {
    RuntimeDefault,
    Unconfined,
    /// A Localhost profile: `localhostProfile` resolved against deploy/seccomp/ (the directory
    /// the README has the user copy into the kubelet's seccomp root).
    Localhost(PathBuf),
}

#[derive(Debug, Clone)]
struct Mount {
    src: PathBuf,
    dst: String,
    read_only: bool,
    /// `rslave` for HostToContainer, `rshared` for Bidirectional.
    propagation: Option<&'static str>,
}

/// The pod template's one container, as a runtime needs it.
#[derive(Debug, Clone)]
struct PodRun {
    privileged: bool,
    no_new_privs: bool,
    read_only_root: bool,
    user: (u64, u64),
    cap_drop: Vec<String>,
    cap_add: Vec<String>,
    seccomp: Seccomp,
    host_pid: bool,
    host_network: bool,
    mounts: Vec<Mount>,
    env: Vec<(String, String)>,
    args: Vec<String>,
    ready_path: String,
    ready_port: u16,
    /// The startup probe's budget (periodSeconds x failureThreshold).
    startup: Duration,
    stop_timeout: u64,
    memory_limit: u64,
    memory_request: u64,
    cpu_limit: f64,
    cpu_request: f64,
    /// Keeps the ConfigMap's files alive while the container runs.
    _config_dir: PathBuf,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The ConfigMap `name`'s data, written as files into a fresh directory.
fn configmap_dir(name: &str, tag: &str) -> PathBuf {
    let cm = read_yaml("deploy/kubernetes/configmap.yaml");
    assert_eq!(
        cm["metadata"]["name"].as_str(),
        Some(name),
        "the DaemonSet mounts ConfigMap {name}"
    );
    let dir = std::env::temp_dir().join(format!("sensor-manifest-cm-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (k, v) in cm["data"].as_mapping().expect("ConfigMap data") {
        std::fs::write(dir.join(k.as_str().unwrap()), v.as_str().unwrap()).unwrap();
    }
    dir
}

impl PodRun {
    fn from_daemonset(ds: &Value, tag: &str) -> PodRun {
        let spec = &ds["spec"]["template"]["spec"];
        only_keys(
            spec,
            &[
                // Not applicable to one node's container: API access and scheduling.
                "serviceAccountName",
                "automountServiceAccountToken",
                "tolerations",
                "priorityClassName",
                // Mapped:
                "terminationGracePeriodSeconds",
                "hostPID",
                "hostNetwork",
                "containers",
                "volumes",
            ],
            "spec.template.spec",
        );
        let containers = spec["containers"].as_sequence().expect("containers");
        assert_eq!(containers.len(), 1, "one container");
        let c = &containers[0];
        only_keys(
            c,
            &[
                "name",
                // Replaced by the image deploy/Dockerfile builds.
                "image",
                "args",
                "env",
                // Only named ports of the probes matter: there is no Service here.
                "ports",
                // The readiness probe is sent; liveness asks /healthz of the same server, and
                // the startup probe's budget is how long the test waits for readiness.
                "livenessProbe",
                "readinessProbe",
                "startupProbe",
                "resources",
                "securityContext",
                "volumeMounts",
            ],
            "containers[0]",
        );
        let sc = &c["securityContext"];
        only_keys(
            sc,
            &[
                "privileged",
                "allowPrivilegeEscalation",
                "readOnlyRootFilesystem",
                "runAsUser",
                "runAsGroup",
                "runAsNonRoot",
                "seccompProfile",
                "capabilities",
            ],
            "securityContext",
        );
        let privileged = sc["privileged"].as_bool().unwrap_or(false);
        let uid = sc["runAsUser"].as_u64().unwrap_or(0);
        let gid = sc["runAsGroup"].as_u64().unwrap_or(0);
        if sc["runAsNonRoot"].as_bool() == Some(true) {
            assert_ne!(uid, 0, "runAsNonRoot with runAsUser 0 never starts");
        }
        let caps = |k: &str| -> Vec<String> {
            sc["capabilities"][k]
                .as_sequence()
                .map(|s| s.iter().map(|c| c.as_str().unwrap().to_string()).collect())
                .unwrap_or_default()
        };
        let seccomp = match sc["seccompProfile"]["type"].as_str() {
            None | Some("RuntimeDefault") => Seccomp::RuntimeDefault,
            Some("Unconfined") => Seccomp::Unconfined,
            Some("Localhost") => {
                let f = sc["seccompProfile"]["localhostProfile"]
                    .as_str()
                    .expect("localhostProfile");
                let p = root().join("deploy/seccomp").join(f);
                assert!(p.is_file(), "Localhost profile {} missing", p.display());
                Seccomp::Localhost(p)
            }
            Some(t) => panic!("seccompProfile type {t}"),
        };

        let ports: BTreeMap<String, u16> = c["ports"]
            .as_sequence()
            .map(|ps| {
                ps.iter()
                    .map(|p| {
                        (
                            p["name"].as_str().unwrap_or_default().to_string(),
                            p["containerPort"].as_u64().unwrap() as u16,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let rp = &c["readinessProbe"]["httpGet"];
        let ready_port = match &rp["port"] {
            Value::Number(n) => n.as_u64().unwrap() as u16,
            Value::String(name) => ports[name],
            p => panic!("readinessProbe port {p:?}"),
        };
        let sp = &c["startupProbe"];
        let startup = Duration::from_secs(
            sp["periodSeconds"].as_u64().unwrap_or(10) * sp["failureThreshold"].as_u64().unwrap_or(3),
        );

        let mut env = Vec::new();
        for e in c["env"].as_sequence().into_iter().flatten() {
            let name = e["name"].as_str().unwrap().to_string();
            let value = match (&e["value"], e["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
                (Value::String(v), _) => v.clone(),
                (_, Some("spec.nodeName")) => hostname(),
                // This host is no Kubernetes node: no zone label, as on a cluster that does
                // not copy it onto pods.
                (_, Some("metadata.labels['topology.kubernetes.io/zone']")) => String::new(),
                (v, f) => panic!("env {name}: value {v:?} / fieldRef {f:?} not mapped"),
            };
            env.push((name, value));
        }

        // $(VAR) expanded from the container's env, as Kubernetes does.
        let args: Vec<String> = c["args"]
            .as_sequence()
            .map(|s| {
                s.iter()
                    .map(|a| {
                        env.iter().fold(a.as_str().unwrap().to_string(), |a, (k, v)| {
                            a.replace(&format!("$({k})"), v)
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();

        let volumes: BTreeMap<String, &Value> = spec["volumes"]
            .as_sequence()
            .map(|vs| {
                vs.iter()
                    .map(|v| (v["name"].as_str().unwrap().to_string(), v))
                    .collect()
            })
            .unwrap_or_default();
        let mut mounts = Vec::new();
        let mut config_dir = PathBuf::new();
        for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
            only_keys(
                m,
                &["name", "mountPath", "readOnly", "mountPropagation"],
                "volumeMounts[]",
            );
            let name = m["name"].as_str().unwrap();
            let vol = volumes[name];
            only_keys(vol, &["name", "configMap", "hostPath"], "volumes[]");
            let src = if let Some(cm) = vol["configMap"]["name"].as_str() {
                config_dir = configmap_dir(cm, tag);
                config_dir.clone()
            } else {
                let path = vol["hostPath"]["path"].as_str().expect("hostPath.path");
                let p = PathBuf::from(path);
                match vol["hostPath"]["type"].as_str().unwrap_or("") {
                    "Directory" => {
                        assert!(p.is_dir(), "hostPath {path} (type Directory) missing on this host");
                        p
                    }
                    // kubelet creates a missing directory empty; a fresh empty directory of
                    // the test's is the same to the container and leaves no state on the host.
                    "DirectoryOrCreate" if !p.is_dir() => {
                        let d = std::env::temp_dir()
                            .join(format!("sensor-manifest-host-{}-{tag}", std::process::id()))
                            .join(path.trim_start_matches('/'));
                        let _ = std::fs::remove_dir_all(&d);
                        std::fs::create_dir_all(&d).unwrap();
                        d
                    }
                    "DirectoryOrCreate" | "" => p,
                    t => panic!("hostPath type {t} not mapped"),
                }
            };
            mounts.push(Mount {
                src,
                dst: m["mountPath"].as_str().unwrap().to_string(),
                read_only: m["readOnly"].as_bool().unwrap_or(false),
                propagation: match m["mountPropagation"].as_str() {
                    None | Some("None") => None,
                    Some("HostToContainer") => Some("rslave"),
                    Some("Bidirectional") => Some("rshared"),
                    Some(p) => panic!("mountPropagation {p}"),
                },
            });
        }
        let res = &c["resources"];
        PodRun {
            privileged,
            no_new_privs: sc["allowPrivilegeEscalation"].as_bool() == Some(false),
            read_only_root: sc["readOnlyRootFilesystem"].as_bool().unwrap_or(false),
            user: (uid, gid),
            cap_drop: caps("drop"),
            cap_add: caps("add"),
            seccomp,
            host_pid: spec["hostPID"].as_bool().unwrap_or(false),
            host_network: spec["hostNetwork"].as_bool().unwrap_or(false),
            mounts,
            env,
            args,
            ready_path: rp["path"].as_str().expect("readinessProbe path").to_string(),
            ready_port,
            startup,
            stop_timeout: spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30),
            memory_limit: quantity(&res["limits"]["memory"]) as u64,
            memory_request: quantity(&res["requests"]["memory"]) as u64,
            cpu_limit: quantity(&res["limits"]["cpu"]),
            cpu_request: quantity(&res["requests"]["cpu"]),
            _config_dir: config_dir,
        }
    }

    /// `podman run` options for exactly this container (before the image).
    fn podman_args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
        if self.privileged {
            push(&["--privileged"]);
        }
        for c in &self.cap_drop {
            push(&["--cap-drop", c]);
        }
        for c in &self.cap_add {
            push(&["--cap-add", c]);
        }
        if self.no_new_privs {
            push(&["--security-opt", "no-new-privileges"]);
        }
        if self.read_only_root {
            // Kubernetes adds no tmpfs to a read-only root; podman would (/tmp, /run, ...).
            push(&["--read-only", "--read-only-tmpfs=false"]);
        }
        push(&["--user", &format!("{}:{}", self.user.0, self.user.1)]);
        match &self.seccomp {
            Seccomp::RuntimeDefault => {}
            Seccomp::Unconfined => push(&["--security-opt", "seccomp=unconfined"]),
            Seccomp::Localhost(p) => push(&["--security-opt", &format!("seccomp={}", p.display())]),
        }
        if self.host_pid {
            push(&["--pid", "host"]);
        }
        // No CNI network here: the pod's own network namespace with its loopback.
        push(&["--network", if self.host_network { "host" } else { "none" }]);
        for m in &self.mounts {
            let mut opts = vec![if m.read_only { "ro" } else { "rw" }];
            opts.extend(m.propagation);
            push(&["-v", &format!("{}:{}:{}", m.src.display(), m.dst, opts.join(","))]);
        }
        for (k, v) in &self.env {
            push(&["-e", &format!("{k}={v}")]);
        }
        let mem = self.memory_limit.to_string();
        push(&["--memory", &mem, "--memory-swap", &mem]);
        push(&["--cpus", &format!("{}", self.cpu_limit)]);
        push(&["--stop-timeout", &self.stop_timeout.to_string()]);
        a
    }
}

/// The image deploy/Dockerfile builds from target/dist/amd64 (what `cargo xtask dist --out
/// target/dist/amd64` wrote; CI runs it before the tests; the builder's TARGETARCH is the
/// host's), under a tag of its own so other checkouts' images are not touched.
const IMAGE: &str = "localhost/sensor:manifest-test";

fn image() -> Option<&'static str> {
    static BUILT: OnceLock<()> = OnceLock::new();
    let dist = root().join("target/dist/amd64/sensor");
    let missing = format!(
        "{} is missing (`cargo xtask dist --out target/dist/amd64` builds it; .ci/run does)",
        dist.display()
    );
    if !require("", dist.is_file(), &missing) {
        return None;
    }
    BUILT.get_or_init(|| {
        run_ok(
            podman()
                .args(["build", "-q", "-f", "deploy/Dockerfile", "-t", IMAGE, "."])
                .current_dir(root()),
        );
    });
    Some(IMAGE)
}

/// `(status, body)` of GET `path` on `port` inside the network namespace of `pid` (one thread
/// enters it for the request and ends).
fn http_in_netns(pid: u32, port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    let path = path.to_string();
    std::thread::spawn(move || {
        // SAFETY: setns(2) with a descriptor we own; it moves only this thread, which ends
        // after the request.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        http_get(port, &path)
    })
    .join()
    .expect("netns thread")
}

/// One running sensor container, whichever runtime started it.
trait Pod {
    /// The container's init pid on the host, `None` once it has exited.
    fn pid(&self) -> Option<u32>;
    fn logs(&self) -> String;
    fn port(&self) -> u16;

    fn get(&self, path: &str) -> (u16, String) {
        let pid = self
            .pid()
            .unwrap_or_else(|| panic!("the sensor container is gone:\n{}", self.logs()));
        http_in_netns(pid, self.port(), path).unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.logs()))
    }

    fn metrics(&self) -> String {
        let (code, body) = self.get("/metrics");
        assert_eq!(code, 200, "{body}");
        body
    }

    /// Polls `/metrics` until the sum of `name` over series with `labels` is `want`.
    fn wait_sum(&self, name: &str, labels: &[(&str, &str)], want: f64) -> String {
        let start = Instant::now();
        loop {
            let m = self.metrics();
            if metric_sum(&m, name, labels) == want {
                return m;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{name}{labels:?} = {}, want {want}\n--- metrics ---\n{m}\n--- logs ---\n{}",
                metric_sum(&m, name, labels),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Waits for the readiness probe within the startup probe's budget; panics with the logs when
/// the container exits first.
/// A kubelet-style container (pod shop/cart-7f9c, container cart) with a 16 MiB limit that
/// reads /dev/zero into memory until the kernel kills it.
fn cart_victim() -> KubeContainer {
    KubeContainer::new(
        "shop",
        "cart-7f9c",
        "cart",
        16 << 20,
        &[runtimes::BUSYBOX, "tail", "/dev/zero"],
    )
}

/// `/proc/<pid>/status` of the pod's sensor once it is ready: its seccomp and privilege state.
fn ready_status(pod: &dyn Pod, run: &PodRun) -> String {
    wait_ready(pod, run);
    let pid = pod.pid().expect("a ready pod has a process");
    std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the sensor's /proc status")
}

fn wait_ready(pod: &dyn Pod, run: &PodRun) {
    let start = Instant::now();
    loop {
        let Some(pid) = pod.pid() else {
            panic!("the sensor container exited before it was ready:\n{}", pod.logs());
        };
        if let Ok((200, _)) = http_in_netns(pid, run.ready_port, &run.ready_path) {
            return;
        }
        assert!(
            start.elapsed() < run.startup,
            "not ready within the startup probe's {:?}:\n{}",
            run.startup,
            pod.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct PodmanPod {
    name: String,
    port: u16,
}

impl PodmanPod {
    /// `podman run -d` of the image with the template's options and args, plus `extra` args.
    fn start(run: &PodRun, name: &str, extra: &[&str]) -> PodmanPod {
        runtimes::podman_rm(&[name]);
        run_ok(
            podman()
                .args(["run", "-d", "--name", name])
                .args(run.podman_args())
                .arg(IMAGE)
                .args(&run.args)
                .args(extra),
        );
        PodmanPod {
            name: name.to_string(),
            port: run.ready_port,
        }
    }

    /// Waits for the container to exit; its exit code.
    fn wait_exit(&self) -> i32 {
        let out = run_ok(podman().args(["wait", &self.name]));
        out.trim().parse().unwrap_or_else(|_| panic!("podman wait: {out}"))
    }

    fn inspect(&self, format: &str) -> String {
        let out = podman()
            .args(["inspect", "--format", format, &self.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Pod for PodmanPod {
    fn pid(&self) -> Option<u32> {
        self.inspect("{{.State.Pid}}").parse().ok().filter(|p| *p != 0)
    }
    fn logs(&self) -> String {
        podman()
            .args(["logs", &self.name])
            .output()
            .map(|o| text(&o))
            .unwrap_or_default()
    }
    fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for PodmanPod {
    fn drop(&mut self) {
        let _ = podman().args(["stop", "-t", "20", &self.name]).output();
        runtimes::podman_rm(&[&self.name]);
    }
}

/// Exactly what `sensor doctor --json` says on the host, per probe: state, reason and every
/// hook attempt (its outcome and error).
fn host_doctor_probes(tracefs: &str) -> Vec<serde_json::Value> {
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
fn configmap_tracefs() -> String {
    let cm = read_yaml("deploy/kubernetes/configmap.yaml");
    let cfg: Value = serde_yaml_ng::from_str(cm["data"]["sensor.yaml"].as_str().unwrap()).unwrap();
    cfg["tracefs_path"]
        .as_str()
        .unwrap_or("/sys/kernel/tracing")
        .to_string()
}

fn assert_probes_match_host(pod: &dyn Pod) {
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
fn self_check_flag(port: u16) -> String {
    format!("[{{name: pod-self, type: http, url: \"http://127.0.0.1:{port}/healthz\", interval: 1s, timeout: 1s}}]")
}

/// `sensor_oom_kills_total` of the victim container `id` is exactly 1 after it was OOM-killed.
fn assert_oom_counted(pod: &dyn Pod, id: &str, scope: &str) {
    pod.wait_sum("sensor_oom_kills_total", &[("container_id", id)], 1.0);
    let m = pod.metrics();
    assert_eq!(
        metric_sum(&m, "sensor_oom_kills_total", &[("container_id", id), ("scope", scope)]),
        1.0,
        "scope {scope}:\n{m}"
    );
}

/// A podman victim (FROM scratch busybox) OOM-killed under a 16 MiB limit; its container id.
fn podman_oom_victim(name: &str) -> String {
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
fn podman_connect_counted(pod: &dyn Pod, name: &str) {
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
struct Footprint {
    charge: u64,
    charge_peak: u64,
    rss: u64,
    rss_peak: u64,
    cpu_s: f64,
}

fn footprint(pid: u32) -> Footprint {
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

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn require_runtime_bits(test: &str) -> Option<KernelGuard> {
    let guard = privileged(test)?;
    if !runtimes::require_podman() {
        return None;
    }
    runtimes::victim_image()?;
    image()?;
    Some(guard)
}

fn tag() -> String {
    format!("manifest-{}", std::process::id())
}

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

/// The sensor as a container of a private containerd, run with `ctr run` from the template
/// the way kubelet's CRI would set it up (cgroup under `kubepods`, the template's options).
struct CtrPod<'a> {
    ctd: &'a Containerd,
    id: String,
    port: u16,
    pid_file: PathBuf,
    log: PathBuf,
}

impl<'a> CtrPod<'a> {
    /// `ctr run` of the image with the template's options: detached (output to `<id>.log`) or
    /// in the foreground (output to ctr's own stdout / stderr).
    fn command(ctd: &Containerd, run: &PodRun, extra: &[&str], id: &str, detach: bool) -> Command {
        let cgroup = format!("{}/kubepods/burstable/pod{}/{id}", ctd.cgroup_root, runtimes::pod_uid());
        let mut cmd = ctd.ctr();
        cmd.args(["run", "--runtime", "io.containerd.runc.v2", "--cgroup", &cgroup])
            .arg("--pid-file")
            .arg(ctd.dir.join(format!("{id}.pid")));
        if detach {
            cmd.arg("-d")
                .arg("--log-uri")
                .arg(format!("file://{}", ctd.dir.join(format!("{id}.log")).display()));
        }
        assert_eq!(
            run.user,
            (0, 0),
            "ctr run has no --user: the image's USER 0:0 must be the template's"
        );
        if run.privileged {
            cmd.arg("--privileged");
        }
        // Kubernetes: the runtime's default set, minus `drop`, plus `add`. ctr applies its
        // drops after its adds and knows no `ALL`: drop every other capability by name.
        let drop: Vec<String> = if run.cap_drop.iter().any(|c| c == "ALL") {
            CAPS.iter().map(|c| c.to_string()).collect()
        } else {
            run.cap_drop.clone()
        };
        for c in drop.iter().filter(|c| !run.cap_add.contains(c)) {
            cmd.args(["--cap-drop", &format!("CAP_{c}")]);
        }
        for c in &run.cap_add {
            cmd.args(["--cap-add", &format!("CAP_{c}")]);
        }
        if !run.no_new_privs {
            cmd.arg("--allow-new-privs");
        }
        if run.read_only_root {
            cmd.arg("--read-only");
        }
        match &run.seccomp {
            Seccomp::RuntimeDefault => {
                cmd.arg("--seccomp");
            }
            Seccomp::Localhost(p) => {
                cmd.arg("--seccomp").arg("--seccomp-profile").arg(p);
            }
            Seccomp::Unconfined => {}
        }
        if run.host_pid {
            cmd.args(["--with-ns", "pid:/proc/1/ns/pid"]);
        }
        if run.host_network {
            cmd.arg("--net-host");
        }
        for m in &run.mounts {
            let mut opts = vec!["rbind", if m.read_only { "ro" } else { "rw" }];
            opts.extend(m.propagation);
            cmd.arg("--mount").arg(format!(
                "type=bind,src={},dst={},options={}",
                m.src.display(),
                m.dst,
                opts.join(":")
            ));
        }
        for (k, v) in &run.env {
            cmd.args(["--env", &format!("{k}={v}")]);
        }
        cmd.args(["--memory-limit", &run.memory_limit.to_string()])
            .args(["--cpus", &run.cpu_limit.to_string()]);
        cmd.arg(IMAGE)
            .arg(id)
            .args(["/sensor", "run"])
            .args(&run.args)
            .args(extra);
        cmd
    }

    fn start(ctd: &'a Containerd, run: &PodRun, extra: &[&str]) -> CtrPod<'a> {
        let id = format!("sensor-{}", runtimes::random_hex(8));
        run_ok(&mut CtrPod::command(ctd, run, extra, &id, true));
        let pod = CtrPod {
            ctd,
            port: run.ready_port,
            pid_file: ctd.dir.join(format!("{id}.pid")),
            log: ctd.dir.join(format!("{id}.log")),
            id,
        };
        // What the CNI loopback plugin does for every pod: the netns's `lo` up (runc leaves a
        // new network namespace's loopback down).
        if !run.host_network {
            let pid = pod.pid().expect("sensor task pid");
            run_ok(
                Command::new("nsenter")
                    .arg(format!("--net=/proc/{pid}/ns/net"))
                    .args(["ip", "link", "set", "lo", "up"]),
            );
        }
        pod
    }

    /// Runs the container in the foreground to its end (for starts that must fail); its output.
    fn run_to_exit(ctd: &'a Containerd, run: &PodRun) -> Output {
        let id = format!("sensor-{}", runtimes::random_hex(8));
        let out = CtrPod::command(ctd, run, &[], &id, false)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("ctr run");
        drop(CtrPod {
            ctd,
            port: run.ready_port,
            pid_file: PathBuf::new(),
            log: PathBuf::new(),
            id,
        });
        out
    }
}

/// Every Linux capability (0..=40), by its name without `CAP_`.
const CAPS: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

impl Pod for CtrPod<'_> {
    fn pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(&self.pid_file).ok()?.trim().parse().ok()?;
        // A zombie or a reused pid is not the task: its cgroup must be ours.
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        cg.contains(&self.id).then_some(pid)
    }
    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for CtrPod<'_> {
    fn drop(&mut self) {
        let _ = self
            .ctd
            .ctr()
            .args(["tasks", "kill", "-s", "SIGKILL", &self.id])
            .output();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let _ = self.ctd.ctr().args(["tasks", "delete", "-f", &self.id]).output();
            if self
                .ctd
                .ctr()
                .args(["containers", "delete", &self.id])
                .output()
                .is_ok_and(|o| o.status.success())
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn daemonset_runs_under_containerd_with_its_default_seccomp() {
    // containerd 1.6's default profile (what Kubernetes' RuntimeDefault means there) allows
    // bpf and perf_event_open with CAP_BPF / CAP_PERFMON: the base template, unchanged, loads.
    let test = "daemonset_runs_under_containerd_with_its_default_seccomp";
    let Some(_k) = require_runtime_bits(test) else {
        return;
    };
    let Some(ctd) = Containerd::start() else {
        return;
    };
    ctd.import(IMAGE);
    ctd.import(runtimes::VICTIM_IMAGE);
    for overlay in [None, Some("seccomp")] {
        let run = PodRun::from_daemonset(&daemonset(overlay), &tag());
        let check = self_check_flag(run.ready_port);
        let pod = CtrPod::start(&ctd, &run, &["--checks", &check]);
        let status = ready_status(&pod, &run);
        assert!(
            status.lines().any(|l| l == "Seccomp:\t2"),
            "{overlay:?}: a filter is on\n{status}"
        );
        assert!(status.lines().any(|l| l == "NoNewPrivs:\t1"), "{status}");
        assert_probes_match_host(&pod);

        // An OOM kill in a kubelet-style container of the same containerd.
        let mut victim = cart_victim();
        let before = vmstat_oom_kill();
        let out = ctd.run(&mut victim, runtimes::VICTIM_IMAGE);
        assert_eq!(out.status.code(), Some(137), "{}", text(&out));
        assert_eq!(vmstat_oom_kill() - before, 1);
        pod.wait_sum(
            "sensor_oom_kills_total",
            &[
                ("container_id", victim.id.as_str()),
                ("pod_uid", victim.pod_uid.as_str()),
                ("scope", "memcg"),
            ],
            1.0,
        );

        // A TCP connect from another kubelet-style container (host network, to a listener of
        // this test on loopback).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port().to_string();
        // It stays until counted: the sensor names a cgroup it has seen alive.
        let script = format!(
            "{bb} nc 127.0.0.1 {port} </dev/null; {bb} sleep 120",
            bb = runtimes::BUSYBOX
        );
        let mut client = KubeContainer::new(
            "shop",
            "cart-7f9c",
            "client",
            64 << 20,
            &[runtimes::BUSYBOX, "sh", "-c", &script],
        );
        client.net_host = true;
        let accept = std::thread::spawn(move || listener.accept().map(drop));
        let mut ctr = ctd.spawn(&mut client, runtimes::VICTIM_IMAGE);
        accept.join().unwrap().expect("accepted");
        pod.wait_sum(
            "sensor_tcp_connects_total",
            &[("container_id", client.id.as_str()), ("result", "success")],
            1.0,
        );
        pod.wait_sum("sensor_check_up", &[("check", "pod-self")], 1.0);
        ctd.remove_all();
        let _ = ctr.wait();
        eprintln!("containerd, overlay {overlay:?}: ready, probes as on the host, OOM kill, connect and check counted");
    }

    // Each added capability removed in turn, under containerd's default profile.
    let full = PodRun::from_daemonset(&daemonset(None), &tag());
    for missing in full.cap_add.clone() {
        let mut run = full.clone();
        run.cap_add.retain(|c| *c != missing);
        match missing.as_str() {
            "BPF" | "PERFMON" => {
                let out = CtrPod::run_to_exit(&ctd, &run);
                assert_eq!(
                    out.status.code(),
                    Some(1),
                    "without {missing}: exit 1, not a crash: {}",
                    text(&out)
                );
                assert_eq!(
                    String::from_utf8_lossy(&out.stderr),
                    "sensor: the sensor needs CAP_BPF and CAP_PERFMON, or root\n"
                );
            }
            "SYSLOG" => {
                let pod = CtrPod::start(&ctd, &run, &[]);
                wait_ready(&pod, &run);
                let m = pod.metrics();
                let degraded =
                    metric(&m, "sensor_probe_state", &[("probe", "oom"), ("state", "degraded")]) == Some(1.0);
                let mut victim = cart_victim();
                let out = ctd.run(&mut victim, runtimes::VICTIM_IMAGE);
                assert_eq!(out.status.code(), Some(137), "{}", text(&out));
                assert_oom_counted(&pod, &victim.id, if degraded { "unknown" } else { "memcg" });
            }
            other => panic!("capability {other} added by the template: say what happens without it"),
        }
    }
}

#[test]
fn every_template_field_maps_onto_podman_and_ctr() {
    // Without privileges: the base template and every overlay parse into runtime options
    // (an unmapped field fails here first), and the options carry each capability, mount and
    // env entry of the template.
    let mut trees = vec![None];
    let overlays = std::fs::read_dir(root().join("deploy/kubernetes/overlays")).unwrap();
    let mut names: Vec<String> = overlays
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    trees.extend(names.iter().map(|n| Some(n.as_str())));
    for tree in trees {
        let run = PodRun::from_daemonset(&daemonset(tree), &format!("{}-parse", tag()));
        let args = run.podman_args().join(" ");
        for c in &run.cap_add {
            assert!(args.contains(&format!("--cap-add {c}")), "{tree:?}: {args}");
        }
        for m in &run.mounts {
            assert!(
                args.contains(&format!(":{}:", m.dst)),
                "{tree:?}: {} not mounted: {args}",
                m.dst
            );
        }
        for (k, _) in &run.env {
            assert!(args.contains(&format!("-e {k}=")), "{tree:?}: {args}");
        }
        assert!(run.args.iter().any(|a| a == "--config"), "{tree:?}: {:?}", run.args);
        // The vantage point's node name and zone come from the downward API through $(VAR).
        assert!(
            run.args.contains(&format!("--vantage.node={}", hostname()))
                && run.args.iter().any(|a| a == "--vantage.location=")
                && !run.args.iter().any(|a| a.contains("$(")),
            "{tree:?}: {:?}",
            run.args
        );
        assert_eq!(run.privileged, tree == Some("privileged"), "{tree:?}");
        if tree == Some("seccomp") {
            assert!(matches!(run.seccomp, Seccomp::Localhost(_)), "{:?}", run.seccomp);
        }
    }
}
