//! The OOM event: one kill as exported in events, the journal and the log.

use sensor_common::oom::{field, hook, part, OomKillRecord};
use serde::Serialize;

use super::{
    limit,
    scope::{Scope, ScopeResolver},
    verdict,
};
use crate::{
    cgroup::{workload, Hierarchies},
    kernel::clock,
};

/// `cgroup` label of a kill whose victim cgroup could not be determined.
pub const UNKNOWN_CGROUP: &str = "unknown";

/// One OOM kill as exported in events and logs. Absent fields are `null`, never zero.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OomKill {
    /// Wall-clock time of the kill (Unix seconds).
    pub time: f64,
    pub scope: Scope,
    pub victim_pid: Option<i32>,
    pub victim_tgid: Option<i32>,
    pub victim_comm: Option<String>,
    pub victim_uid: Option<u32>,
    pub total_vm_bytes: Option<u64>,
    pub anon_rss_bytes: Option<u64>,
    pub file_rss_bytes: Option<u64>,
    pub shmem_rss_bytes: Option<u64>,
    pub pgtables_bytes: Option<u64>,
    pub oom_score_adj: Option<i16>,
    /// The victim's memory cgroup, relative to the memory controller's hierarchy root (the v1
    /// memory hierarchy on v1 and hybrid hosts, the v2 hierarchy otherwise).
    pub cgroup: Option<String>,
    pub memcg_id: Option<u64>,
    pub cgroup_v2_id: Option<u64>,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    /// Names from the container runtime (`namespace`, `pod`, `container`, `image`,
    /// `runtime`); empty when unknown.
    #[serde(flatten)]
    pub names: crate::workloads::Names,
    /// Read from cgroupfs right after the kill: best effort, absent if the cgroup is gone.
    pub memory_limit_bytes: Option<u64>,
    pub memory_usage_bytes: Option<u64>,
    /// The cgroup whose limit the kill hit (`null` for the host, or when it cannot be told) and
    /// whose it is: `self`, `ancestor` or `host` (see `limit`).
    pub limit_cgroup: Option<String>,
    pub limit_scope: Option<limit::LimitScope>,
    pub trigger_pid: u32,
    pub trigger_tgid: u32,
    pub trigger_comm: String,
    /// From the fentry/kprobe hook where the kernel allows it.
    pub context_hook: Option<&'static str>,
    pub constraint: Option<&'static str>,
    pub oom_memcg_id: Option<u64>,
    pub totalpages: Option<u64>,
    /// The verdict's class (`reason` on `sensor_oom_kills_total`) and the kill's lead-up.
    pub reason: verdict::Reason,
    pub lead_up: Option<verdict::LeadUp>,
}

pub(super) fn comm(raw: &[u8]) -> String {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// Joins the kernel's leaf-first NUL-separated kernfs names into `/a/b/c`.
pub fn cgroup_path(buf: &[u8], len: usize) -> String {
    let used = &buf[..len.min(buf.len())];
    let mut names: Vec<String> = used
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    names.reverse();
    format!("/{}", names.join("/"))
}

/// `oom_control.constraint` names.
pub(super) fn constraint_name(c: u32) -> &'static str {
    match c {
        0 => "none",
        1 => "cpuset",
        2 => "memory_policy",
        3 => "memcg",
        _ => "unknown",
    }
}

impl OomKill {
    /// Converts a record; `cgroups` resolves truncated paths and reads limits (skipped in tests).
    pub fn from_record(r: &OomKillRecord, scopes: Option<&ScopeResolver>, cgroups: Option<&Hierarchies>) -> OomKill {
        let has = |bit: u32| r.present & bit != 0;
        let kb = |bit: u32, v: u64| has(bit).then(|| v.saturating_mul(1024));
        let frames = (r.stack_bytes as usize / 8).min(r.stack.len());
        let stack = if has(field::STACK) { &r.stack[..frames] } else { &[][..] };
        let context = r.parts & part::CONTEXT != 0;
        let scope = if context && has(field::CONSTRAINT) {
            if r.constraint == 3 {
                Scope::Memcg
            } else {
                Scope::Global
            }
        } else {
            scopes.map_or(Scope::Unknown, |s| s.classify(stack))
        };
        let mut cgroup = has(field::CGROUP_PATH).then(|| cgroup_path(&r.cgroup.path, usize::from(r.cgroup.path_len)));
        if r.cgroup.path_truncated != 0 || cgroup.is_none() {
            if let (Some(h), true) = (cgroups, has(field::MEMCG_ID)) {
                if let Some(p) = h.find_memory_cgroup(r.cgroup.memcg_id, 20_000) {
                    cgroup = Some(p);
                }
            }
        }
        let (limit, usage) = match (&cgroup, cgroups) {
            (Some(p), Some(h)) => h.memory_limit_usage(p),
            _ => (None, None),
        };
        let w = cgroup.as_deref().map(workload);
        let nonempty = |s: String| (!s.is_empty()).then_some(s);
        OomKill {
            time: clock::unix_seconds(clock::ktime_to_wall(r.header.ktime_ns)),
            scope,
            victim_pid: has(field::PID).then_some(r.victim_pid),
            victim_tgid: has(field::TGID).then_some(r.victim_tgid),
            victim_comm: has(field::COMM).then(|| comm(&r.victim_comm)),
            victim_uid: has(field::UID).then_some(r.victim_uid),
            total_vm_bytes: kb(field::TOTAL_VM, r.total_vm_kb),
            anon_rss_bytes: kb(field::ANON_RSS, r.anon_rss_kb),
            file_rss_bytes: kb(field::FILE_RSS, r.file_rss_kb),
            shmem_rss_bytes: kb(field::SHMEM_RSS, r.shmem_rss_kb),
            pgtables_bytes: kb(field::PGTABLES, r.pgtables_kb),
            oom_score_adj: has(field::OOM_SCORE_ADJ).then_some(r.oom_score_adj),
            cgroup,
            memcg_id: has(field::MEMCG_ID).then_some(r.cgroup.memcg_id),
            cgroup_v2_id: (has(field::DFL_CGROUP_ID) && r.cgroup.dfl_cgroup_id != 0).then_some(r.cgroup.dfl_cgroup_id),
            container_id: w.clone().and_then(|w| nonempty(w.container_id)),
            pod_uid: w.and_then(|w| nonempty(w.pod_uid)),
            names: Default::default(),
            memory_limit_bytes: limit,
            memory_usage_bytes: usage,
            limit_cgroup: None,
            limit_scope: None,
            trigger_pid: r.trigger_pid,
            trigger_tgid: r.trigger_tgid,
            trigger_comm: comm(&r.trigger_comm),
            context_hook: context.then_some(match r.context_hook {
                hook::FENTRY => "fentry",
                hook::KPROBE => "kprobe",
                _ => "unknown",
            }),
            constraint: (context && has(field::CONSTRAINT)).then(|| constraint_name(r.constraint)),
            oom_memcg_id: (context && has(field::OC_MEMCG_ID)).then_some(r.oc_memcg_id),
            totalpages: (context && has(field::TOTALPAGES)).then_some(r.totalpages),
            reason: verdict::Reason::Unknown,
            lead_up: None,
        }
    }

    /// Victim resident memory (anon + file + shmem) in bytes, where known.
    pub fn rss_bytes(&self) -> Option<u64> {
        let parts = [self.anon_rss_bytes, self.file_rss_bytes, self.shmem_rss_bytes];
        parts.iter().any(Option::is_some).then(|| parts.iter().flatten().sum())
    }
}

/// Displays a value as its JSON: the OOM log line carries the kill exactly as the event API
/// serves it, so a field added to [`OomKill`] is logged without being written a second time.
pub(super) struct AsJson<'a, T>(pub &'a T);

impl<T: Serialize> std::fmt::Display for AsJson<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match serde_json::to_string(self.0) {
            Ok(s) => f.write_str(&s),
            Err(e) => write!(f, "(not serializable: {e})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zeroed() -> OomKillRecord {
        // SAFETY: all-zero is a valid OomKillRecord (Pod).
        unsafe { std::mem::zeroed() }
    }

    #[test]
    fn absent_fields_are_none() {
        let mut r = zeroed();
        r.present = field::PID | field::ANON_RSS;
        r.parts = part::FIELDS;
        r.victim_pid = 7;
        r.anon_rss_kb = 3;
        r.trigger_comm[..4].copy_from_slice(b"tail");
        let k = OomKill::from_record(&r, None, None);
        assert_eq!(k.victim_pid, Some(7));
        assert_eq!(k.anon_rss_bytes, Some(3072));
        assert_eq!(k.rss_bytes(), Some(3072));
        assert_eq!(k.victim_comm, None);
        assert_eq!(k.total_vm_bytes, None);
        assert_eq!(k.cgroup, None);
        assert_eq!(k.trigger_comm, "tail");
        assert_eq!(k.scope, Scope::Unknown);
        assert_eq!(k.constraint, None);
    }

    #[test]
    fn path_and_context_merge() {
        let mut r = zeroed();
        let names = b"cri-containerd-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope\0kubepods-burstable-pod1e9b4e3c_7a3f_4c8e_9d51_2b6f0a1c3d4e.slice\0kubepods-burstable.slice\0kubepods.slice\0";
        r.cgroup.path[..names.len()].copy_from_slice(names);
        r.cgroup.path_len = names.len() as u16;
        r.present = field::CGROUP_PATH | field::CONSTRAINT | field::TOTALPAGES;
        r.parts = part::FIELDS | part::CGROUP | part::CONTEXT;
        r.constraint = 3;
        r.totalpages = 8192;
        r.context_hook = hook::FENTRY;
        let k = OomKill::from_record(&r, None, None);
        assert_eq!(k.scope, Scope::Memcg, "constraint from oom_control wins over the stack");
        assert_eq!(k.constraint, Some("memcg"));
        assert_eq!(k.context_hook, Some("fentry"));
        assert_eq!(k.totalpages, Some(8192));
        assert_eq!(
            k.cgroup.as_deref(),
            Some("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1e9b4e3c_7a3f_4c8e_9d51_2b6f0a1c3d4e.slice/cri-containerd-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope")
        );
        assert_eq!(k.pod_uid.as_deref(), Some("1e9b4e3c-7a3f-4c8e-9d51-2b6f0a1c3d4e"));
        assert_eq!(
            k.container_id.as_deref(),
            Some("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
        );
    }

    #[test]
    fn root_cgroup_path() {
        assert_eq!(cgroup_path(&[0; 8], 0), "/");
        assert_eq!(cgroup_path(b"leaf\0mid\0", 9), "/mid/leaf");
        assert_eq!(
            cgroup_path(b"leaf\0mid\0", 100),
            "/mid/leaf",
            "length clamps to the buffer"
        );
    }
}
