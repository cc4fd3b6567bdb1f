//! The pod template read from the YAML (with an overlay's patches) and mapped onto a runtime's options.

use super::*;

pub(crate) fn read_yaml(rel: &str) -> Value {
    let p = root().join(rel);
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_yaml_ng::from_str(&s).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The DaemonSet, with the JSON patches (RFC 6902 `add` / `replace`) of
/// `deploy/kubernetes/overlays/<overlay>` applied when one is named.
pub(crate) fn daemonset(overlay: Option<&str>) -> Value {
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
pub(crate) fn only_keys(v: &Value, known: &[&str], what: &str) {
    if let Some(m) = v.as_mapping() {
        for k in m.keys() {
            let k = k.as_str().unwrap_or_default();
            assert!(
                known.contains(&k),
                "{what}.{k}: a field this test does not map onto the container runtime; map it (or name it as not applicable) in sensor/tests/manifest/template.rs"
            );
        }
    }
}

/// Kubernetes quantities: `256Mi`, `80Mi`, `1Gi`, `500m` (CPU), plain numbers.
pub(crate) fn quantity(v: &Value) -> f64 {
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
pub(crate) enum Seccomp {
    RuntimeDefault,
    Unconfined,
    /// A Localhost profile: `localhostProfile` resolved against deploy/seccomp/ (the directory
    /// the README has the user copy into the kubelet's seccomp root).
    Localhost(PathBuf),
}

#[derive(Debug, Clone)]
pub(crate) struct Mount {
    pub(crate) src: PathBuf,
    pub(crate) dst: String,
    pub(crate) read_only: bool,
    /// `rslave` for HostToContainer, `rshared` for Bidirectional.
    pub(crate) propagation: Option<&'static str>,
}

/// The pod template's one container, as a runtime needs it.
#[derive(Debug, Clone)]
pub(crate) struct PodRun {
    pub(crate) privileged: bool,
    pub(crate) no_new_privs: bool,
    pub(crate) read_only_root: bool,
    pub(crate) user: (u64, u64),
    pub(crate) cap_drop: Vec<String>,
    pub(crate) cap_add: Vec<String>,
    pub(crate) seccomp: Seccomp,
    pub(crate) host_pid: bool,
    pub(crate) host_network: bool,
    pub(crate) mounts: Vec<Mount>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) args: Vec<String>,
    pub(crate) ready_path: String,
    pub(crate) ready_port: u16,
    /// The startup probe's budget (periodSeconds x failureThreshold).
    pub(crate) startup: Duration,
    pub(crate) stop_timeout: u64,
    pub(crate) memory_limit: u64,
    pub(crate) memory_request: u64,
    pub(crate) cpu_limit: f64,
    pub(crate) cpu_request: f64,
    /// Keeps the ConfigMap's files alive while the container runs.
    pub(crate) _config_dir: PathBuf,
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The ConfigMap `name`'s data, written as files into a fresh directory.
pub(crate) fn configmap_dir(name: &str, tag: &str) -> PathBuf {
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
    pub(crate) fn from_daemonset(ds: &Value, tag: &str) -> PodRun {
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
    pub(crate) fn podman_args(&self) -> Vec<String> {
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
