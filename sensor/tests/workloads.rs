//! Workload identity from the real container runtimes: podman (its Docker Engine API service)
//! and a private containerd running kubelet-style containers. Privileged tests: real kernel,
//! real OOM kills, real runtimes (sensor/tests/common/runtimes.rs starts them).

mod common;

use common::runtimes::{self, Containerd, KubeContainer, PodmanService};

/// The harness itself: a kubelet-style container lands in the cgroup the test asked for, and
/// podman's service answers the Docker API for a container the CLI ran.
#[test]
fn harness_runs_kubelet_style_and_podman_containers() {
    let Some(image) = runtimes::victim_image() else { return };
    let Some(ctrd) = Containerd::start() else { return };
    ctrd.import(image);
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
