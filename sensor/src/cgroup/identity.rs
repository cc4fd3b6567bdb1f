//! Who a cgroup path belongs to (container id, pod uid), the workload label set, and its text.

use std::sync::Arc;

use serde::Serialize;

use crate::workloads::Names;

/// The workload a cgroup path belongs to. Fields are empty when the path does not say.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub container_id: String,
    pub pod_uid: String,
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A container id in one path segment: `cri-containerd-<id>.scope`, `crio-<id>.scope`,
/// `docker-<id>.scope`, `libpod-<id>.scope` (systemd driver) or a bare `<id>` (cgroupfs driver).
fn container_id(seg: &str) -> Option<&str> {
    let s = seg.strip_suffix(".scope").unwrap_or(seg);
    if s.starts_with("crio-conmon-") {
        return None;
    }
    let id = ["cri-containerd-", "crio-", "docker-", "libpod-"]
        .iter()
        .find_map(|p| s.strip_prefix(p))
        .unwrap_or(s);
    (id.len() == 64 && is_hex(id)).then_some(id)
}

/// A pod uid in one segment: `kubepods-burstable-pod<uid with _>.slice` (systemd) or
/// `pod<uid>` (cgroupfs). Uids are UUIDs, or 32 hex digits for static pods.
fn pod_uid(seg: &str) -> Option<String> {
    let s = seg.strip_suffix(".slice").unwrap_or(seg);
    let i = s.rfind("pod")?;
    let before = &s[..i];
    if !(before.is_empty() || before.ends_with('-')) {
        return None;
    }
    let raw = &s[i + 3..];
    // Systemd writes the uid's dashes as underscores, the cgroupfs driver keeps them; a segment
    // mixing both is neither (found by the `cgroup_workload` fuzz target).
    if raw.contains('_') && raw.contains('-') {
        return None;
    }
    let uid = raw.replace('_', "-");
    let parts: Vec<&str> = uid.split('-').collect();
    let uuid = parts.len() == 5
        && [8, 4, 4, 4, 12]
            .iter()
            .zip(&parts)
            .all(|(n, p)| p.len() == *n && is_hex(p));
    let static_pod = parts.len() == 1 && uid.len() == 32 && is_hex(&uid);
    (uuid || static_pod).then_some(uid)
}

/// Attribution from a cgroup path; the innermost container and pod segments win.
pub fn workload(path: &str) -> Workload {
    let mut w = Workload::default();
    for seg in path.split('/').rev() {
        if w.container_id.is_empty() {
            if let Some(id) = container_id(seg) {
                w.container_id = id.to_string();
            }
        }
        if w.pod_uid.is_empty() {
            if let Some(uid) = pod_uid(seg) {
                w.pod_uid = uid;
            }
        }
    }
    w
}

/// Label names of one workload: from the cgroup path (`cgroup`, `container_id`, `pod_uid`),
/// then the runtime's names (`namespace`, `pod`, `container`; empty when unknown).
pub const WORKLOAD_LABELS: [&str; 6] = ["cgroup", "container_id", "pod_uid", "namespace", "pod", "container"];

/// Label values in [`WORKLOAD_LABELS`] order.
pub type WorkloadLabels = [String; 6];

/// Workload labels from a label list that starts with them (a retired key's labels after its
/// other labels are cut off); missing values are empty.
pub fn workload_labels_from(l: &[String]) -> WorkloadLabels {
    std::array::from_fn(|i| l.get(i).cloned().unwrap_or_default())
}

/// The path-derived labels followed by the names.
pub fn with_names(base: [String; 3], n: &Names) -> WorkloadLabels {
    let [cgroup, container_id, pod_uid] = base;
    [
        cgroup,
        container_id,
        pod_uid,
        n.namespace.clone(),
        n.pod.clone(),
        n.container.clone(),
    ]
}

/// Workload labels as a fragment of the text exposition.
pub(crate) fn render_labels(l: &WorkloadLabels) -> Arc<str> {
    crate::expo::labels(WORKLOAD_LABELS.iter().copied().zip(l.iter().map(String::as_str))).into()
}

/// The `cgroup` label of workloads left out of a set.
pub const OTHER: &str = "other";

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const UID: &str = "1e9b4e3c-7a3f-4c8e-9d51-2b6f0a1c3d4e";

    #[test]
    fn attribution_table() {
        let u = UID.replace('-', "_");
        let cases: Vec<(String, &str, &str)> = vec![
            // containerd, systemd driver, each QoS class
            (format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{CID}.scope"), CID, UID),
            (format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope"), CID, UID),
            (format!("/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{CID}.scope"), CID, UID),
            // CRI-O, systemd driver; conmon is the pod's but no container's
            (format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/crio-{CID}.scope"), CID, UID),
            (format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/crio-conmon-{CID}.scope"), "", UID),
            // Docker (dockershim / cri-dockerd), systemd driver
            (format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/docker-{CID}.scope"), CID, UID),
            // cgroupfs driver, each QoS class
            (format!("/kubepods/burstable/pod{UID}/{CID}"), CID, UID),
            (format!("/kubepods/besteffort/pod{UID}/{CID}"), CID, UID),
            (format!("/kubepods/pod{UID}/{CID}"), CID, UID),
            // kubelet in a nested cgroup (kind), static pod with a 32-hex uid
            (format!("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{u}.slice/cri-containerd-{CID}.scope"), CID, UID),
            (format!("/kubepods/burstable/pod0123456789abcdef0123456789abcdef/{CID}"), CID, "0123456789abcdef0123456789abcdef"),
            // plain Docker and podman
            (format!("/system.slice/docker-{CID}.scope"), CID, ""),
            (format!("/docker/{CID}"), CID, ""),
            // podman: systemd driver (its scope, and the container's own sub-cgroup under
            // cgroup v2) and cgroupfs driver; conmon is podman's, no container's
            (format!("/machine.slice/libpod-{CID}.scope"), CID, ""),
            (format!("/machine.slice/libpod-{CID}.scope/container"), CID, ""),
            (format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope"), CID, ""),
            (format!("/libpod_parent/libpod-{CID}"), CID, ""),
            (format!("/libpod_parent/libpod-conmon-{CID}"), "", ""),
            (format!("/machine.slice/libpod-conmon-{CID}.scope"), "", ""),
            // a podman pod (kube play): pod cgroup, then the container
            (format!("/machine.slice/machine-libpod_pod_0123abcd.slice/libpod-{CID}.scope"), CID, ""),
            // pod-level cgroup, no container yet
            (format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"), "", UID),
            // must yield nothing
            ("/system.slice/nginx.service".into(), "", ""),
            ("/user.slice/user-1000.slice/session-3.scope".into(), "", ""),
            ("/".into(), "", ""),
            ("".into(), "", ""),
            ("/system.slice/docker-abc.scope".into(), "", ""),
            ("/kubepods/burstable/podnotauid/xyz".into(), "", ""),
            ("/my-ipod-thing.slice/nothex.scope".into(), "", ""),
            (format!("/system.slice/snapd-{CID}x.scope"), "", ""),
            // Fuzz regression (`cgroup_workload`, crash-da4e36c0): a uid mixing the systemd
            // and cgroupfs separators is no pod uid.
            ("/kubepods.slice/cri-pod1b2c3d4e_5f59_7182_96a4-b5c6d7e8f901.slice".into(), "", ""),
            ("/kubepods/pod1b2c3d4e-5f59-7182_96a4-b5c6d7e8f901".into(), "", ""),
        ];
        for (path, cid, uid) in cases {
            let w = workload(&path);
            assert_eq!((w.container_id.as_str(), w.pod_uid.as_str()), (cid, uid), "{path}");
        }
    }
}
