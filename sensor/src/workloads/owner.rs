//! A pod's owner (its Deployment, StatefulSet, DaemonSet, Job, CronJob, ReplicaSet, or the pod
//! itself) from what the node knows without the Kubernetes API: the labels kubelet gives the
//! pod sandbox (the pod's own labels, controllers' included) and the structure of the pod name
//! the controllers generate. Fleet-wide, pod names are noise; owners are what kills are
//! counted by. The rules, in order (README "Owners"):
//!
//! 1. `batch.kubernetes.io/job-name` (or the older `job-name`) label: a Job of that name; a
//!    CronJob when the job name is `<cronjob>-<scheduled time in Unix minutes>` (digits,
//!    within [`CRON_MINUTES`]: the CronJob controller's naming since Kubernetes 1.21).
//! 2. `statefulset.kubernetes.io/pod-name` (or `apps.kubernetes.io/pod-index`) label and a pod
//!    name `<sts>-<ordinal>`: a StatefulSet.
//! 3. `pod-template-generation` and `controller-revision-hash` labels and a pod name
//!    `<ds>-<5 random chars>`: a DaemonSet.
//! 4. `pod-template-hash` label `H` and a pod name `<rs>-<5 random chars>`: a Deployment when
//!    `<rs>` is `<deploy>-H` (the hash stripped exactly as the label says, never guessed), else
//!    the ReplicaSet `<rs>` (the label is the evidence of a ReplicaSet; without it a
//!    ReplicaSet's pod cannot be told from a bare pod and is named as one).
//! 5. A static pod (annotation `kubernetes.io/config.source` = `file` or `http`, or kubelet's
//!    32-hex-digit uid of a static pod): `Pod`, named without kubelet's `-<node name>` suffix so
//!    the same manifest on every node is one owner.
//! 6. Any other pod: `Pod`, its own name.
//!
//! Off Kubernetes (no pod name) both are empty.

use std::collections::HashMap;

/// A pod's owner: `kind` is one of the `owner_kind` values, `name` its name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owner {
    pub kind: &'static str,
    pub name: String,
}

/// What the node knows about a pod: from its sandbox.
#[derive(Debug, Clone, Copy)]
pub struct Pod<'a> {
    pub name: &'a str,
    pub uid: &'a str,
    pub labels: &'a HashMap<String, String>,
    pub annotations: &'a HashMap<String, String>,
}

/// The random suffix of a generated name (`k8s.io/apiserver` names.SimpleNameGenerator): five
/// characters from this alphabet (no vowels, no 0/1/3).
const SUFFIX_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
const SUFFIX_LEN: usize = 5;
/// A generated name's base is cut to this length (63 minus the suffix), dash included.
const MAX_BASE: usize = 58;
/// A CronJob's job name ends in its scheduled time in Unix minutes: from 2013-09 to 2160.
/// Dates (`backup-20240101`) and seconds (the old controller's) fall outside it.
pub const CRON_MINUTES: std::ops::Range<u64> = 23_000_000..100_000_000;

impl Pod<'_> {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str).filter(|v| !v.is_empty())
    }
}

/// The owner of `pod` on the node named `node` (lowercase, as kubelet appends it to static
/// pods' names; empty when unknown).
pub fn resolve(pod: &Pod<'_>, node: &str) -> Owner {
    let owner = |kind, name: &str| Owner {
        kind,
        name: name.to_string(),
    };
    let name = pod.name;
    if name.is_empty() {
        return Owner::default();
    }
    if let Some(job) = pod
        .label("batch.kubernetes.io/job-name")
        .or_else(|| pod.label("job-name"))
    {
        return match cronjob_of(job) {
            Some(cj) => owner("CronJob", cj),
            None => owner("Job", job),
        };
    }
    let sts = pod.label("statefulset.kubernetes.io/pod-name").is_some()
        || pod.label("apps.kubernetes.io/pod-index").is_some();
    if let (true, Some(base)) = (sts, strip_ordinal(name)) {
        return owner("StatefulSet", base);
    }
    let ds = pod.label("pod-template-generation").is_some() && pod.label("controller-revision-hash").is_some();
    if let (true, Some(base)) = (ds, strip_generated(name)) {
        return owner("DaemonSet", base);
    }
    if let (Some(hash), Some(rs)) = (pod.label("pod-template-hash"), strip_generated(name)) {
        return match deployment_of(rs, hash, name.len() == MAX_BASE + SUFFIX_LEN) {
            Some(d) => owner("Deployment", d),
            None => owner("ReplicaSet", rs),
        };
    }
    if is_static(pod) {
        let base = name
            .strip_suffix(node)
            .and_then(|b| b.strip_suffix('-'))
            .filter(|b| !node.is_empty() && !b.is_empty());
        return owner("Pod", base.unwrap_or(name));
    }
    owner("Pod", name)
}

/// `<cronjob>` of a job named `<cronjob>-<minutes>`.
fn cronjob_of(job: &str) -> Option<&str> {
    let (base, minutes) = job.rsplit_once('-')?;
    let valid = !base.is_empty()
        && minutes.bytes().all(|b| b.is_ascii_digit())
        && minutes.parse::<u64>().is_ok_and(|m| CRON_MINUTES.contains(&m));
    valid.then_some(base)
}

/// `<sts>` of `<sts>-<ordinal>`.
fn strip_ordinal(name: &str) -> Option<&str> {
    let (base, ordinal) = name.rsplit_once('-')?;
    let valid = !base.is_empty() && !ordinal.is_empty() && ordinal.bytes().all(|b| b.is_ascii_digit());
    valid.then_some(base)
}

/// The base of a generated name: without its random suffix and the dash before it (a base cut
/// to [`MAX_BASE`] has lost its dash, or more).
fn strip_generated(name: &str) -> Option<&str> {
    let cut = name.len().checked_sub(SUFFIX_LEN)?;
    let (base, suffix) = (name.get(..cut)?, name.get(cut..)?);
    if !suffix.bytes().all(|b| SUFFIX_ALPHABET.contains(&b)) {
        return None;
    }
    match base.strip_suffix('-') {
        Some(b) if !b.is_empty() => Some(b),
        // Cut: kept whole up to MAX_BASE, so the name is exactly 63 characters.
        None if base.len() == MAX_BASE => Some(base),
        _ => None,
    }
}

/// `<deploy>` of a ReplicaSet named `<deploy>-<hash>`; of a base `cut` to [`MAX_BASE`], the
/// part before whatever of `-<hash>` survived (a Deployment name of 57 characters or more is
/// then its first 57 or 58).
fn deployment_of<'a>(rs: &'a str, hash: &str, cut: bool) -> Option<&'a str> {
    let tail = format!("-{hash}");
    if let Some(d) = rs.strip_suffix(tail.as_str()).filter(|d| !d.is_empty()) {
        return Some(d);
    }
    if !cut {
        return None;
    }
    // The longest start of `-<hash>` the cut base ends with (at least the dash and one char).
    (2..tail.len())
        .rev()
        .find_map(|n| rs.strip_suffix(&tail[..n]).filter(|d| !d.is_empty()))
        .or(Some(rs))
}

/// kubelet's marks of a pod from a manifest file or URL: the config source annotation (where
/// the runtime keeps it) or the uid it makes for them (an md5 as 32 hex digits, where API
/// pods have a UUID).
fn is_static(pod: &Pod<'_>) -> bool {
    let source = pod.annotations.get("kubernetes.io/config.source").map(String::as_str);
    matches!(source, Some("file" | "http")) || (pod.uid.len() == 32 && pod.uid.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The node's name as kubelet knows it: `NODE_NAME` (the DaemonSet sets it from
/// `spec.nodeName`), else the host name, lowercased.
pub fn node_name() -> String {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|n| n.trim().to_lowercase())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn of(name: &str, labels: &[(&str, &str)]) -> Owner {
        of_pod(name, "0f6c1d2e-3a4b-4c5d-8e9f-0a1b2c3d4e5f", labels, &[])
    }

    fn of_pod(name: &str, uid: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Owner {
        let (labels, annotations) = (map(labels), map(annotations));
        resolve(
            &Pod {
                name,
                uid,
                labels: &labels,
                annotations: &annotations,
            },
            "node-a1",
        )
    }

    fn is(kind: &'static str, name: &str) -> Owner {
        Owner {
            kind,
            name: name.into(),
        }
    }

    #[test]
    fn deployment_strips_exactly_the_labelled_hash() {
        let h = [("pod-template-hash", "5d8f6c7b9")];
        assert_eq!(of("ledger-5d8f6c7b9-x2x4k", &h), is("Deployment", "ledger"));
        // Dashes in the Deployment's name, and parts of it that look like hashes.
        assert_eq!(
            of("pay-api-v2-7c9d-5d8f6c7b9-x2x4k", &h),
            is("Deployment", "pay-api-v2-7c9d")
        );
        // A hash that looks like a word, and a Deployment named like a hash.
        let word = [("pod-template-hash", "bcdfg")];
        assert_eq!(of("cache-bcdfg-bcdfg-zz9x2", &word), is("Deployment", "cache-bcdfg"));
        assert_eq!(of("5d8f6c7b9-5d8f6c7b9-x2x4k", &h), is("Deployment", "5d8f6c7b9"));
    }

    #[test]
    fn a_cut_long_name_keeps_what_survived() {
        // A 60-character Deployment name: kubelet sees its first 58 characters plus the suffix.
        let deploy = "a".repeat(53) + "-batch";
        let rs = format!("{deploy}-6f4b8d9c7");
        let pod = format!("{}{}", &rs[..MAX_BASE], "q2w4z");
        assert_eq!(pod.len(), 63);
        let h = [("pod-template-hash", "6f4b8d9c7")];
        assert_eq!(of(&pod, &h), is("Deployment", &deploy[..MAX_BASE]));
        // A 50-character name: the cut falls in the hash; what is left of it is stripped.
        let deploy = "b".repeat(50);
        let pod = format!("{}{}", &format!("{deploy}-6f4b8d9c7-")[..MAX_BASE], "q2w4z");
        assert_eq!(of(&pod, &h), is("Deployment", &deploy));
        // A 57-character name: the cut leaves the dash before the hash.
        let deploy = "c".repeat(57);
        let pod = format!("{deploy}-q2w4z");
        assert_eq!(pod.len(), 63);
        assert_eq!(of(&pod, &h), is("Deployment", &deploy));
    }

    #[test]
    fn replicaset_only_with_the_hash_label() {
        // The label but not the hash in the name: a ReplicaSet (not made by a Deployment).
        assert_eq!(
            of("worker-x2x4k", &[("pod-template-hash", "5d8f6c7b9")]),
            is("ReplicaSet", "worker")
        );
        // No label: a generated-looking name is not guessed at.
        assert_eq!(of("ledger-5d8f6c7b9-x2x4k", &[]), is("Pod", "ledger-5d8f6c7b9-x2x4k"));
        // The label with a suffix that cannot be generated (vowels): not a ReplicaSet's pod.
        assert_eq!(
            of("worker-abcde", &[("pod-template-hash", "5d8f6c7b9")]),
            is("Pod", "worker-abcde")
        );
    }

    #[test]
    fn statefulset_by_ordinal() {
        let l = [
            ("statefulset.kubernetes.io/pod-name", "pg-main-12"),
            ("controller-revision-hash", "pg-main-6b9c"),
        ];
        assert_eq!(of("pg-main-12", &l), is("StatefulSet", "pg-main"));
        assert_eq!(of("db-2-0", &l), is("StatefulSet", "db-2"));
        let idx = [("apps.kubernetes.io/pod-index", "3")];
        assert_eq!(of("kafka-3", &idx), is("StatefulSet", "kafka"));
        // The label without an ordinal: no StatefulSet is made up.
        assert_eq!(of("odd-name", &l), is("Pod", "odd-name"));
    }

    #[test]
    fn daemonset_needs_both_labels() {
        let l = [
            ("pod-template-generation", "3"),
            ("controller-revision-hash", "7d9f8b6c5"),
        ];
        assert_eq!(of("node-exporter-x2x4k", &l), is("DaemonSet", "node-exporter"));
        assert_eq!(of("node-exporter-x2x4k", &l[..1]), is("Pod", "node-exporter-x2x4k"));
    }

    #[test]
    fn jobs_and_cronjobs() {
        assert_eq!(
            of(
                "migrate-db-v3-q2w4z",
                &[("batch.kubernetes.io/job-name", "migrate-db-v3")]
            ),
            is("Job", "migrate-db-v3")
        );
        assert_eq!(
            of("report-29442120-q2w4z", &[("job-name", "report-29442120")]),
            is("CronJob", "report")
        );
        let both = [
            ("batch.kubernetes.io/job-name", "nightly-etl-29442120"),
            ("job-name", "nightly-etl-29442120"),
        ];
        assert_eq!(of("nightly-etl-29442120-x2x4k", &both), is("CronJob", "nightly-etl"));
        // A date or seconds are not a CronJob's minutes.
        for job in ["backup-20240101", "backup-1765000000", "backup-", "-29442120"] {
            assert_eq!(of("p-x2x4k", &[("job-name", job)]), is("Job", job), "{job}");
        }
    }

    #[test]
    fn bare_static_and_off_kubernetes() {
        assert_eq!(of("debug-shell", &[("run", "debug-shell")]), is("Pod", "debug-shell"));
        // A static pod: kubelet's md5 uid, the node's name appended.
        let md5 = "4f2b0c8e9a1d3e5f7a9b0c1d2e3f4a5b";
        assert_eq!(
            of_pod("kube-apiserver-node-a1", md5, &[("component", "kube-apiserver")], &[]),
            is("Pod", "kube-apiserver")
        );
        // Or the config source annotation; a name not ending in the node's stays whole.
        let file = [("kubernetes.io/config.source", "file")];
        assert_eq!(
            of_pod("etcd-node-a1", "0f6c1d2e-3a4b-4c5d-8e9f-0a1b2c3d4e5f", &[], &file),
            is("Pod", "etcd")
        );
        assert_eq!(
            of_pod("etcd-other", "0f6c1d2e-3a4b-4c5d-8e9f-0a1b2c3d4e5f", &[], &file),
            is("Pod", "etcd-other")
        );
        // A bare API pod named like a static one keeps its name.
        assert_eq!(of("web-node-a1", &[]), is("Pod", "web-node-a1"));
        assert_eq!(of("node-a1", &[]), is("Pod", "node-a1"));
        assert_eq!(of("", &[("pod-template-hash", "x")]), Owner::default());
    }
}
