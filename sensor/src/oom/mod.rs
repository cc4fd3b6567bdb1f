//! OOM kills: probe declaration, kernel layouts, record handling and metrics.

pub mod scope;

use std::sync::Arc;

use aya::EbpfLoader;
use prometheus::{IntCounterVec, Opts, Registry};
use sensor_common::oom::{field, hook, MarkVictimLayout, OomControlLayout, OomKillRecord, TpField};
use serde::Serialize;

use crate::{
    events::{Event, EventHub},
    kernel::clock,
    loader::KernelContext,
    probe::{HookKind, HookSpec, ProbeSpec},
};
pub use scope::{Scope, ScopeResolver};

/// fentry/kprobe on `oom_kill_process` see the `oom_control` (constraint, memcg, trigger);
/// the tracepoint is the stable fallback present on every kernel that matters.
pub const SPEC: ProbeSpec = ProbeSpec {
    name: "oom",
    hooks: &[
        HookSpec {
            kind: HookKind::Fentry,
            program: "oom_kill_fentry",
            target: "oom_kill_process",
        },
        HookSpec {
            kind: HookKind::Kprobe,
            program: "oom_kill_kprobe",
            target: "oom_kill_process",
        },
        HookSpec {
            kind: HookKind::Tracepoint,
            program: "oom_mark_victim",
            target: "oom/mark_victim",
        },
    ],
};

/// Kernel layouts the OOM programs need, found at load time.
#[derive(Debug, Clone)]
pub struct Layouts {
    pub mark_victim: MarkVictimLayout,
    pub oom_control: OomControlLayout,
    /// Why a layout is partial, for doctor and logs.
    pub notes: Vec<String>,
}

impl Layouts {
    pub fn discover(kctx: &KernelContext) -> Layouts {
        let mut notes = Vec::new();
        let mark_victim = match &kctx.tracefs {
            Ok(t) => match t.format("oom", "mark_victim") {
                Ok(f) => mark_victim_layout(&f),
                Err(e) => {
                    notes.push(format!("oom/mark_victim format: {e}"));
                    MarkVictimLayout::ABSENT
                }
            },
            Err(e) => {
                notes.push(format!("tracefs: {e}"));
                MarkVictimLayout::ABSENT
            }
        };
        let oom_control = match &kctx.btf {
            Ok(btf) => {
                let r = (|| -> Result<OomControlLayout, crate::kernel::btf::BtfError> {
                    Ok(OomControlLayout {
                        valid: 1,
                        oc_chosen: btf.member_offset("oom_control", "chosen")?,
                        task_pid: btf.member_offset("task_struct", "pid")?,
                        task_tgid: btf.member_offset("task_struct", "tgid")?,
                        task_comm: btf.member_offset("task_struct", "comm")?,
                        _pad: 0,
                    })
                })();
                r.unwrap_or_else(|e| {
                    notes.push(format!("oom_control layout: {e}"));
                    OomControlLayout::INVALID
                })
            }
            Err(e) => {
                notes.push(format!("BTF: {e}"));
                OomControlLayout::INVALID
            }
        };
        Layouts {
            mark_victim,
            oom_control,
            notes,
        }
    }

    pub fn apply<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        loader.override_global("MARK_VICTIM_LAYOUT", &self.mark_victim, true);
        loader.override_global("OOM_CONTROL_LAYOUT", &self.oom_control, true);
    }
}

/// Offsets of the fields we read, each accepted only with the size we expect.
pub fn mark_victim_layout(f: &crate::kernel::tracefs::TracepointFormat) -> MarkVictimLayout {
    let off = |name: &str, sizes: &[u16]| f.offset_if(name, sizes).unwrap_or(TpField::ABSENT);
    let (comm, comm_is_data_loc) = match f.field("comm") {
        Some(c) if c.is_data_loc() && c.size == 4 => (c.offset, 1),
        Some(c) if !c.is_data_loc() && c.size == 16 => (c.offset, 0),
        _ => (TpField::ABSENT, 0),
    };
    MarkVictimLayout {
        pid: off("pid", &[4]),
        comm,
        total_vm: off("total_vm", &[8]),
        anon_rss: off("anon_rss", &[8]),
        file_rss: off("file_rss", &[8]),
        shmem_rss: off("shmem_rss", &[8]),
        uid: off("uid", &[4]),
        pgtables: off("pgtables", &[8]),
        oom_score_adj: off("oom_score_adj", &[2]),
        comm_is_data_loc,
    }
}

/// One OOM kill as exported in events and logs. Absent fields are `null`, never zero.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OomKill {
    pub time: f64,
    pub hook: &'static str,
    pub scope: Scope,
    pub victim_pid: Option<i32>,
    pub victim_comm: Option<String>,
    pub victim_uid: Option<u32>,
    pub total_vm_bytes: Option<u64>,
    pub anon_rss_bytes: Option<u64>,
    pub file_rss_bytes: Option<u64>,
    pub shmem_rss_bytes: Option<u64>,
    pub pgtables_bytes: Option<u64>,
    pub oom_score_adj: Option<i16>,
    pub trigger_pid: u32,
    pub trigger_tgid: u32,
    pub trigger_comm: String,
}

fn comm(raw: &[u8]) -> String {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

impl OomKill {
    pub fn from_record(r: &OomKillRecord, scopes: Option<&ScopeResolver>) -> OomKill {
        let has = |bit: u32| r.present & bit != 0;
        let kb = |bit: u32, v: u64| has(bit).then(|| v.saturating_mul(1024));
        let frames = (r.stack_bytes as usize / 8).min(r.stack.len());
        let stack = if has(field::STACK) { &r.stack[..frames] } else { &[][..] };
        OomKill {
            time: clock::unix_seconds(clock::ktime_to_wall(r.header.ktime_ns)),
            hook: match r.hook {
                hook::FENTRY => "fentry",
                hook::KPROBE => "kprobe",
                _ => "tracepoint",
            },
            scope: scopes.map_or(Scope::Unknown, |s| s.classify(stack)),
            victim_pid: has(field::PID).then_some(r.victim_pid),
            victim_comm: has(field::COMM).then(|| comm(&r.victim_comm)),
            victim_uid: has(field::UID).then_some(r.victim_uid),
            total_vm_bytes: kb(field::TOTAL_VM, r.total_vm_kb),
            anon_rss_bytes: kb(field::ANON_RSS, r.anon_rss_kb),
            file_rss_bytes: kb(field::FILE_RSS, r.file_rss_kb),
            shmem_rss_bytes: kb(field::SHMEM_RSS, r.shmem_rss_kb),
            pgtables_bytes: kb(field::PGTABLES, r.pgtables_kb),
            oom_score_adj: has(field::OOM_SCORE_ADJ).then_some(r.oom_score_adj),
            trigger_pid: r.trigger_pid,
            trigger_tgid: r.trigger_tgid,
            trigger_comm: comm(&r.trigger_comm),
        }
    }
}

/// Userspace half of the OOM slice: turns records into metrics, events and log lines.
pub struct OomSlice {
    kills: IntCounterVec,
    scopes: Option<ScopeResolver>,
    hub: Arc<EventHub>,
}

impl OomSlice {
    pub fn new(registry: &Registry, hub: Arc<EventHub>) -> prometheus::Result<OomSlice> {
        let kills = IntCounterVec::new(
            Opts::new(
                "sensor_oom_kills_total",
                "OOM kills seen by the kernel probe, by scope (memcg or global).",
            ),
            &["scope"],
        )?;
        registry.register(Box::new(kills.clone()))?;
        for s in ["memcg", "global"] {
            kills.with_label_values(&[s]).reset();
        }
        let scopes = match ScopeResolver::from_kallsyms() {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "OOM scope classification unavailable; kills are labelled scope=\"unknown\"");
                None
            }
        };
        Ok(OomSlice { kills, scopes, hub })
    }

    pub fn handle(&self, rec: &OomKillRecord) {
        let kill = OomKill::from_record(rec, self.scopes.as_ref());
        self.kills.with_label_values(&[kill.scope.label()]).inc();
        tracing::info!(
            target: "sensor::oom",
            event = "oom_kill",
            hook = kill.hook,
            scope = kill.scope.label(),
            victim_pid = ?kill.victim_pid,
            victim_comm = ?kill.victim_comm,
            victim_uid = ?kill.victim_uid,
            total_vm_bytes = ?kill.total_vm_bytes,
            anon_rss_bytes = ?kill.anon_rss_bytes,
            file_rss_bytes = ?kill.file_rss_bytes,
            shmem_rss_bytes = ?kill.shmem_rss_bytes,
            pgtables_bytes = ?kill.pgtables_bytes,
            oom_score_adj = ?kill.oom_score_adj,
            trigger_pid = kill.trigger_pid,
            trigger_comm = %kill.trigger_comm,
            "OOM kill"
        );
        self.hub.publish(Event::OomKill(kill));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::tracefs::TracepointFormat;

    #[test]
    fn layout_from_6_18_and_6_1_formats() {
        let l = mark_victim_layout(&TracepointFormat::parse(
            "\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;\n\tfield:__data_loc char[] comm;\toffset:12;\tsize:4;\tsigned:0;\n\tfield:unsigned long total_vm;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:short oom_score_adj;\toffset:64;\tsize:2;\tsigned:1;\n",
        ));
        assert_eq!(
            (l.pid, l.comm, l.comm_is_data_loc, l.total_vm, l.oom_score_adj),
            (8, 12, 1, 16, 64)
        );
        assert_eq!(l.anon_rss, TpField::ABSENT);
        let old = mark_victim_layout(&TracepointFormat::parse(
            "\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;\n",
        ));
        assert_eq!(
            old,
            MarkVictimLayout {
                pid: 8,
                ..MarkVictimLayout::ABSENT
            }
        );
    }

    #[test]
    fn absent_fields_are_none() {
        // SAFETY: all-zero is a valid OomKillRecord (Pod).
        let mut r: OomKillRecord = unsafe { std::mem::zeroed() };
        r.present = field::PID | field::ANON_RSS;
        r.victim_pid = 7;
        r.anon_rss_kb = 3;
        r.hook = hook::TRACEPOINT;
        r.trigger_comm[..4].copy_from_slice(b"tail");
        let k = OomKill::from_record(&r, None);
        assert_eq!(k.victim_pid, Some(7));
        assert_eq!(k.anon_rss_bytes, Some(3072));
        assert_eq!(k.victim_comm, None);
        assert_eq!(k.total_vm_bytes, None);
        assert_eq!(k.trigger_comm, "tail");
        assert_eq!(k.scope, Scope::Unknown);
    }
}
