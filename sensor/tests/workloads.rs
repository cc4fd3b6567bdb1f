//! Workload identity from the real container runtimes: podman (its Docker Engine API service)
//! and a private containerd running kubelet-style containers. Privileged tests: real kernel,
//! real OOM kills, real runtimes (sensor/tests/common/runtimes.rs starts them). Under CI=true a
//! missing runtime or BPF fails instead of skipping.

mod common;

use std::{
    net::TcpListener,
    os::unix::{net::UnixListener, process::ExitStatusExt},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use common::{
    runtimes::{self, Containerd, KubeContainer, KubePod, PodmanService},
    *,
};

/// A config file naming workloads through `runtimes` (YAML flow list entries).
fn config(runtimes: &[String], lookup_timeout: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!(
        "sensor-workloads-{}-{}.yaml",
        runtimes::tag(),
        runtimes::random_hex(4)
    ));
    let list: String = runtimes.iter().map(|r| format!("    - {r}\n")).collect();
    std::fs::write(
        &p,
        format!("workloads:\n  runtimes:\n{list}  lookup_timeout: {lookup_timeout}\n  cache_size: 1000\n"),
    )
    .unwrap();
    p
}

fn docker(socket: &Path) -> String {
    format!("{{kind: docker, socket: {}}}", socket.display())
}

fn containerd(socket: &Path) -> String {
    format!(
        "{{kind: containerd, socket: {}, namespaces: [k8s.io]}}",
        socket.display()
    )
}

/// A private containerd holding the busybox victim image (and its name); `None` (after `skip`) when podman or
/// containerd is missing.
fn containerd_with_victim() -> Option<(Containerd, &'static str)> {
    let image = runtimes::victim_image()?;
    let ctrd = Containerd::start()?;
    ctrd.import(image);
    Some((ctrd, image))
}

fn daemon(cfg: &Path) -> Daemon {
    Daemon::start(&["--config", cfg.to_str().unwrap()])
}

/// The OOM-kill event of a container id (waits for it).
fn kill_event(d: &Daemon, id: &str) -> serde_json::Value {
    let start = Instant::now();
    loop {
        if let Some(e) = d.oom_events(0).into_iter().find(|e| e["container_id"] == id) {
            return e;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no kill event for {id}:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn exited_by_oom(out: &std::process::Output) -> bool {
    // podman and ctr report the container's SIGKILL as exit status 137.
    out.status.code() == Some(137) || out.status.signal() == Some(libc::SIGKILL)
}

/// Kills the container and measures: the kill (its event `time`) is counted under its
/// container id within `limit`. Returns the delay.
fn counted_within(d: &Daemon, id: &str, limit: Duration) -> f64 {
    let start = Instant::now();
    loop {
        let m = d.metrics();
        if metric_sum(&m, "sensor_oom_kills_total", &[("container_id", id)]) == 1.0 {
            let seen = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64();
            let e = kill_event(d, id);
            let delay = seen - e["time"].as_f64().unwrap();
            assert!(
                delay <= limit.as_secs_f64(),
                "kill counted {delay:.3}s after it happened: {e}"
            );
            return delay;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "kill of {id} not counted:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The harness itself: a kubelet-style container lands in the cgroup the test asked for, and
/// podman's service answers the Docker API for a container the CLI ran.
#[test]
fn harness_runs_kubelet_style_and_podman_containers() {
    let Some((ctrd, image)) = containerd_with_victim() else {
        return;
    };
    let mut c = KubeContainer::new(
        "shop",
        "cart-7f9c",
        "cart",
        64 << 20,
        &["/bin/busybox", "cat", "/proc/self/cgroup"],
    );
    let out = ctrd.run(&mut c, image);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}\n{}", ctrd.log());
    assert!(
        text.lines().any(|l| l.contains(":memory:") && l.ends_with(&c.cgroup))
            || text.contains(&format!("0::{}", c.cgroup)),
        "container not in {}: {text}",
        c.cgroup
    );
    let info = runtimes::run_ok(ctrd.ctr().args(["containers", "info", &c.id]));
    assert!(info.contains("\"io.kubernetes.pod.name\": \"cart-7f9c\""), "{info}");

    let Some(svc) = PodmanService::start() else { return };
    let name = format!("sensor-harness-{}", runtimes::tag());
    runtimes::podman_rm(&[&name]);
    let out = runtimes::podman_run(&name, 64 << 20, &["/bin/busybox", "true"]);
    assert!(out.status.success(), "{out:?}");
    let id = runtimes::podman_id(&name);
    let (code, body) = runtimes::unix_http_get(&svc.socket, &format!("/containers/{id}/json")).unwrap();
    runtimes::podman_rm(&[&name]);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["Name"].as_str().map(|n| n.trim_start_matches('/')),
        Some(name.as_str()),
        "{body}"
    );
    assert_eq!(v["Config"]["Image"], runtimes::VICTIM_IMAGE, "{body}");
}

#[test]
fn podman_container_oom_kill_is_named_with_its_image() {
    let Some(_k) = privileged("podman_container_oom_kill_is_named_with_its_image") else {
        return;
    };
    let Some(_image) = runtimes::victim_image() else { return };
    let Some(svc) = PodmanService::start() else { return };
    let cfg = config(&[docker(&svc.socket)], "2s");
    let d = daemon(&cfg);
    let name = format!("sensor-oom-{}", runtimes::tag());
    runtimes::podman_rm(&[&name]);
    let out = runtimes::podman_run(&name, 48 << 20, &["/bin/busybox", "tail", "/dev/zero"]);
    let id = runtimes::podman_id(&name);
    assert!(exited_by_oom(&out), "{out:?}");

    let m = d.wait_metric_sum(
        "sensor_oom_kills_total",
        &[("container", &name), ("container_id", &id)],
        1.0,
        Duration::from_secs(10),
    );
    assert_eq!(
        metric_sum(&m, "sensor_oom_kills_total", &[("container_id", &id)]),
        1.0,
        "exactly one kill"
    );
    let e = kill_event(&d, &id);
    assert_eq!(e["container"], name.as_str(), "{e}");
    assert_eq!(e["image"], runtimes::VICTIM_IMAGE, "{e}");
    assert_eq!(e["runtime"], "docker", "{e}");
    assert_eq!(
        (e["namespace"].as_str(), e["pod"].as_str()),
        (Some(""), Some("")),
        "{e}"
    );
    assert!(
        e["cgroup"]
            .as_str()
            .is_some_and(|c| c.contains(&format!("libpod-{id}"))),
        "podman's cgroup: {e}"
    );
    assert_eq!(
        metric(
            &m,
            "sensor_workload_info",
            &[
                ("container_id", &id),
                ("namespace", ""),
                ("pod", ""),
                ("container", &name),
                ("image", runtimes::VICTIM_IMAGE),
                ("runtime", "docker"),
                // Outside Kubernetes: no owner.
                ("owner_kind", ""),
                ("owner", ""),
            ]
        ),
        Some(1.0)
    );
    assert!(
        metric(
            &m,
            "sensor_workload_lookups_total",
            &[("runtime", "docker"), ("result", "ok")]
        ) >= Some(1.0)
    );
    runtimes::podman_rm(&[&name]);
}

/// Accepts one connection on a loopback listener and holds it open until dropped.
struct Listener {
    port: u16,
    conn: std::sync::mpsc::Receiver<std::net::TcpStream>,
}

impl Listener {
    fn start() -> Listener {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            if let Ok((s, _)) = l.accept() {
                let _ = tx.send(s);
            }
        });
        Listener { port, conn: rx }
    }
}

#[test]
fn kubelet_style_containerd_container_oom_and_connect_carry_pod_names() {
    let Some(_k) = privileged("kubelet_style_containerd_container_oom_and_connect_carry_pod_names") else {
        return;
    };
    let Some((ctrd, image)) = containerd_with_victim() else {
        return;
    };
    let cfg = config(&[containerd(&ctrd.socket)], "2s");
    let d = daemon(&cfg);
    let listener = Listener::start();
    // Connects from inside the container and waits for an answer that never comes until the
    // test closes the connection, then allocates past its limit.
    let script = format!(
        "/bin/busybox wget -q -O /dev/null http://127.0.0.1:{}/ ; exec /bin/busybox tail /dev/zero",
        listener.port
    );
    let mut c = KubeContainer::new(
        "shop",
        "cart-7f9c",
        "cart",
        48 << 20,
        &["/bin/busybox", "sh", "-c", &script],
    );
    c.net_host = true;
    let mut child = ctrd.spawn(&mut c, image);
    let conn = listener
        .conn
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("no connect from the container\n{}", ctrd.log()));
    let names = [("namespace", "shop"), ("pod", "cart-7f9c"), ("container", "cart")];
    let mut connect = vec![("result", "success"), ("container_id", c.id.as_str())];
    connect.extend(names);
    d.wait_metric_sum("sensor_tcp_connects_total", &connect, 1.0, Duration::from_secs(10));
    drop(conn);
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(137), "the container's task should be OOM-killed: {st}");

    let mut kill = vec![
        ("container_id", c.id.as_str()),
        ("pod_uid", c.pod_uid.as_str()),
        ("cgroup", c.cgroup.as_str()),
    ];
    kill.extend(names);
    let m = d.wait_metric_sum("sensor_oom_kills_total", &kill, 1.0, Duration::from_secs(10));
    assert_eq!(
        metric_sum(&m, "sensor_oom_kills_total", &[("container_id", &c.id)]),
        1.0
    );
    assert_eq!(
        metric_sum(&m, "sensor_tcp_connects_total", &connect),
        1.0,
        "still one connect"
    );
    let e = kill_event(&d, &c.id);
    for (k, v) in names
        .iter()
        .chain(&[("image", runtimes::VICTIM_IMAGE), ("runtime", "containerd")])
    {
        assert_eq!(e[*k], *v, "{k} in {e}");
    }
}

#[test]
fn fifty_short_lived_containers_each_oom_killed_are_all_named() {
    let Some(_k) = privileged("fifty_short_lived_containers_each_oom_killed_are_all_named") else {
        return;
    };
    let Some((ctrd, image)) = containerd_with_victim() else {
        return;
    };
    let cfg = config(&[containerd(&ctrd.socket)], "2s");
    let d = daemon(&cfg);
    const N: usize = 50;
    let mut ids = Vec::new();
    for i in 0..N {
        let mut c = KubeContainer::new(
            "churn",
            &format!("victim-{i}"),
            "victim",
            32 << 20,
            &["/bin/busybox", "tail", "/dev/zero"],
        );
        let out = ctrd.run(&mut c, image);
        assert!(exited_by_oom(&out), "container {i}: {out:?}\n{}", ctrd.log());
        ids.push(c.id);
    }
    let m = d.wait_metric_sum(
        "sensor_oom_kills_total",
        &[("namespace", "churn"), ("container", "victim")],
        N as f64,
        Duration::from_secs(20),
    );
    let kills: f64 = ids
        .iter()
        .map(|id| metric_sum(&m, "sensor_oom_kills_total", &[("container_id", id)]))
        .sum();
    let named = metric_sum(
        &m,
        "sensor_oom_kills_total",
        &[("namespace", "churn"), ("container", "victim")],
    );
    eprintln!(
        "short-lived containers: {kills} kills, {named} named ({:.0}%)",
        100.0 * named / kills
    );
    assert_eq!(kills, N as f64, "every kill counted once");
    assert_eq!(named, N as f64, "every kill named");
    for (i, id) in ids.iter().enumerate() {
        let pod = format!("victim-{i}");
        assert_eq!(
            metric_sum(&m, "sensor_oom_kills_total", &[("container_id", id), ("pod", &pod)]),
            1.0,
            "{id} is {pod}"
        );
    }
}

/// (namespace, pod, the pod's labels, owner_kind, owner, app containers).
type PodCase = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
    &'static str,
    &'static [&'static str],
);

/// Pods of a Deployment, a StatefulSet, a DaemonSet, a Job and a CronJob as kubelet lays them
/// out through containerd (a sandbox with the pod's labels, app containers naming it), one app
/// container of each OOM-killed, two in the Deployment's pod: every kill, its event and
/// `sensor_workload_info` name the pod's owner exactly, and each pod's sandbox is read once.
#[test]
fn kubelet_style_pods_oom_kills_are_named_with_their_owners() {
    let Some(_k) = privileged("kubelet_style_pods_oom_kills_are_named_with_their_owners") else {
        return;
    };
    let Some((ctrd, image)) = containerd_with_victim() else {
        return;
    };
    let cfg = config(&[containerd(&ctrd.socket)], "2s");
    let d = daemon(&cfg);
    let pods: [PodCase; 5] = [
        (
            "shop",
            "ledger-api-5d8f6c7b9-x2x4k",
            &[("app", "ledger-api"), ("pod-template-hash", "5d8f6c7b9")],
            "Deployment",
            "ledger-api",
            &["ledger", "envoy"],
        ),
        (
            "shop",
            "pg-main-0",
            &[
                ("statefulset.kubernetes.io/pod-name", "pg-main-0"),
                ("controller-revision-hash", "pg-main-6b9c8d7f5"),
                ("apps.kubernetes.io/pod-index", "0"),
            ],
            "StatefulSet",
            "pg-main",
            &["postgres"],
        ),
        (
            "kube-system",
            "node-agent-q2w4z",
            &[
                ("controller-revision-hash", "7d9f8b6c5"),
                ("pod-template-generation", "3"),
            ],
            "DaemonSet",
            "node-agent",
            &["agent"],
        ),
        (
            "batch",
            "migrate-v3-b7k9p",
            &[
                ("batch.kubernetes.io/job-name", "migrate-v3"),
                ("job-name", "migrate-v3"),
            ],
            "Job",
            "migrate-v3",
            &["migrate"],
        ),
        (
            "batch",
            "report-29442120-h5n8s",
            &[
                ("batch.kubernetes.io/job-name", "report-29442120"),
                ("job-name", "report-29442120"),
            ],
            "CronJob",
            "report",
            &["report"],
        ),
    ];
    let mut killed = Vec::new();
    for (ns, name, labels, kind, owner, containers) in pods {
        let mut pod = KubePod::new(ns, name, labels);
        ctrd.start_sandbox(&mut pod, image);
        for cname in containers {
            let mut c = pod.container(cname, 32 << 20, &["/bin/busybox", "tail", "/dev/zero"]);
            let out = ctrd.run(&mut c, image);
            assert!(exited_by_oom(&out), "{ns}/{name}/{cname}: {out:?}\n{}", ctrd.log());
            killed.push((c, kind, owner));
        }
    }
    for (c, kind, owner) in &killed {
        let labels = [
            ("container_id", c.id.as_str()),
            ("namespace", c.namespace.as_str()),
            ("pod", c.pod.as_str()),
            ("container", c.container.as_str()),
            ("owner_kind", kind),
            ("owner", owner),
        ];
        let m = d.wait_metric_sum("sensor_oom_kills_total", &labels, 1.0, Duration::from_secs(10));
        assert_eq!(
            metric_sum(&m, "sensor_oom_kills_total", &[("container_id", &c.id)]),
            1.0,
            "one kill, under its owner: {m}"
        );
        assert_eq!(metric_sum(&m, "sensor_workload_info", &labels), 1.0, "{m}");
        let e = kill_event(&d, &c.id);
        assert_eq!(
            (e["owner_kind"].as_str(), e["owner"].as_str()),
            (Some(*kind), Some(*owner)),
            "{e}"
        );
    }
    // The sandboxes (found by the next rescan): named as their pod (no container), owned like
    // it from their own labels, without a sandbox lookup.
    for (c, kind, owner) in &killed {
        let sandbox = [
            ("pod", c.pod.as_str()),
            ("container", ""),
            ("owner_kind", kind),
            ("owner", owner),
        ];
        d.wait_metric_sum("sensor_workload_info", &sandbox, 1.0, Duration::from_secs(20));
    }
    let m = d.metrics();
    // Kills per owner: the two of the Deployment's pod under one owner.
    let ledger = [("owner_kind", "Deployment"), ("owner", "ledger-api")];
    assert_eq!(metric_sum(&m, "sensor_oom_kills_total", &ledger), 2.0);
    assert_eq!(metric_sum(&m, "sensor_oom_kills_total", &[]), killed.len() as f64);
    let sandbox_lookups = |result| {
        metric_sum(
            &m,
            "sensor_workload_sandbox_lookups_total",
            &[("runtime", "containerd"), ("result", result)],
        )
    };
    assert_eq!(
        sandbox_lookups("ok"),
        pods.len() as f64,
        "one sandbox read per pod: {m}"
    );
    for r in ["not_found", "error", "timeout"] {
        assert_eq!(sandbox_lookups(r), 0.0, "{r}: {m}");
    }
}

/// A unix socket that accepts connections and never answers.
struct Hang {
    path: PathBuf,
}

impl Hang {
    fn start() -> Hang {
        let path = std::env::temp_dir().join(format!(
            "sensor-hang-{}-{}.sock",
            runtimes::tag(),
            runtimes::random_hex(4)
        ));
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in l.incoming().flatten() {
                held.push(s);
            }
        });
        Hang { path }
    }
}

impl Drop for Hang {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn lookups(m: &str, result: &str) -> f64 {
    metric_sum(
        m,
        "sensor_workload_lookups_total",
        &[("runtime", "docker"), ("result", result)],
    )
}

#[test]
fn runtime_faults_leave_names_empty_and_kills_counted_on_time() {
    let Some(_k) = privileged("runtime_faults_leave_names_empty_and_kills_counted_on_time") else {
        return;
    };
    let Some(_image) = runtimes::victim_image() else { return };
    let Some(mut svc) = PodmanService::start() else { return };
    let hang = Hang::start();
    let absent = std::env::temp_dir().join(format!("sensor-absent-{}.sock", runtimes::tag()));
    // Each lookup asks all three in turn: the service, the one that never answers (timeout),
    // the absent one (error).
    let cfg = config(&[docker(&svc.socket), docker(&hang.path), docker(&absent)], "300ms");
    let d = daemon(&cfg);

    // 1. A container id no runtime knows (a cgroup named like one): not_found, timeout, error.
    let parent = MemCgroup::new("sensor-identity-faults", 64 << 20);
    let unknown = runtimes::container_id();
    let cg = MemCgroup::child(&parent, &unknown, 24 << 20);
    cg.cause_oom_kill();
    let delay_unknown = counted_within(&d, &unknown, Duration::from_secs(1));
    let m = d.metrics();
    assert_eq!(
        metric_sum(
            &m,
            "sensor_oom_kills_total",
            &[
                ("container_id", &unknown),
                ("container", ""),
                ("namespace", ""),
                ("pod", "")
            ]
        ),
        1.0
    );
    // At least: containers elsewhere on this host may be looked up too.
    assert!(lookups(&m, "not_found") >= 1.0, "the service does not know it: {m}");
    assert!(lookups(&m, "timeout") >= 1.0, "the silent socket: {m}");
    assert!(lookups(&m, "error") >= 1.0, "the absent socket: {m}");
    drop(cg);

    // 2. The podman service stops mid-run: a podman container's kill stays unnamed and on time.
    svc.stop();
    let name = format!("sensor-fault-{}", runtimes::tag());
    runtimes::podman_rm(&[&name]);
    let out = runtimes::podman_run(&name, 48 << 20, &["/bin/busybox", "tail", "/dev/zero"]);
    let id = runtimes::podman_id(&name);
    runtimes::podman_rm(&[&name]);
    assert!(exited_by_oom(&out), "{out:?}");
    let delay_stopped = counted_within(&d, &id, Duration::from_secs(1));
    let m = d.metrics();
    assert_eq!(
        metric_sum(
            &m,
            "sensor_oom_kills_total",
            &[("container_id", &id), ("container", ""), ("namespace", ""), ("pod", "")]
        ),
        1.0
    );
    let e = kill_event(&d, &id);
    assert_eq!(
        (e["container"].as_str(), e["image"].as_str()),
        (Some(""), Some("")),
        "{e}"
    );
    assert!(lookups(&m, "error") >= 3.0, "service down and absent socket: {m}");
    assert!(lookups(&m, "timeout") >= 2.0, "the silent socket: {m}");
    assert_eq!(metric_sum(&m, "sensor_workload_info", &[("container_id", &id)]), 0.0);
    eprintln!("kill counted {delay_unknown:.3}s (unknown id), {delay_stopped:.3}s (service stopped) after it happened");
}

#[test]
fn doctor_lists_each_runtime_found_not_found_or_error() {
    // Doctor loads and attaches when it can: hold the kernel like the other privileged tests.
    let _k = privileged("doctor_lists_each_runtime_found_not_found_or_error");
    let Some(ctrd) = Containerd::start() else { return };
    let Some(svc) = PodmanService::start() else { return };
    let hang = Hang::start();
    let absent = std::env::temp_dir().join(format!("sensor-absent-{}.sock", runtimes::tag()));
    let cfg = config(
        &[
            containerd(&ctrd.socket),
            docker(&svc.socket),
            docker(&hang.path),
            docker(&absent),
        ],
        "300ms",
    );
    let out = run_sensor(&["doctor", "--json", "--config", cfg.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rts = v["runtimes"].as_array().unwrap();
    let states: Vec<(&str, &str)> = rts
        .iter()
        .map(|r| (r["kind"].as_str().unwrap(), r["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [
            ("containerd", "found"),
            ("docker", "found"),
            ("docker", "error"),
            ("docker", "not_found")
        ],
        "{rts:?}"
    );
    assert!(rts[0]["detail"].as_str().unwrap().starts_with("containerd "), "{rts:?}");
    assert!(rts[1]["detail"].as_str().unwrap().contains("/_ping"), "{rts:?}");
    assert!(
        rts[2]["detail"].as_str().unwrap().contains("no answer within 300ms"),
        "{rts:?}"
    );
    let text = run_sensor(&["doctor", "--config", cfg.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("container runtimes"), "{text}");
}
