//! The OOM probe's hook ladder: victim fields, the victim's cgroup, the kill's context, each
//! with its fallbacks, and what the loaded programs are told about the parts attached.

use aya::maps::Array;
use sensor_common::{
    names::maps,
    oom::{part, CONFIG_EXPECTED_PARTS},
};

use super::layout::oom_control_layout;
use crate::probe::{GroupReport, HookGroup, HookKind, HookSpec, KernelContext, ProbeSpec, RecordKind};

pub(super) const GROUP_CONTEXT: &str = "kill context";
pub(super) const GROUP_CGROUP: &str = "victim cgroup";
pub(super) const GROUP_FIELDS: &str = "victim fields";

/// Groups are attached in this order; the last one (the required tracepoint) completes records,
/// so the expected-parts mask is right before it can fire.
pub const SPEC: ProbeSpec = ProbeSpec {
    name: "oom",
    counter_id: sensor_common::record::probe_id::OOM,
    groups: &[
        HookGroup {
            purpose: GROUP_CONTEXT,
            required: false,
            hooks: &[
                HookSpec {
                    kind: HookKind::Fentry,
                    program: "oom_kill_fentry",
                    target: "oom_kill_process",
                    check: Some(check_oom_control),
                },
                HookSpec {
                    kind: HookKind::Kprobe,
                    program: "oom_kill_kprobe",
                    target: "oom_kill_process",
                    check: Some(check_oom_control),
                },
            ],
        },
        HookGroup {
            purpose: GROUP_CGROUP,
            required: false,
            hooks: &[HookSpec {
                kind: HookKind::RawTracepoint,
                program: "oom_mark_victim_raw",
                target: "mark_victim",
                check: Some(check_raw_victim),
            }],
        },
        HookGroup {
            purpose: GROUP_FIELDS,
            required: true,
            hooks: &[HookSpec {
                kind: HookKind::Tracepoint,
                program: "oom_mark_victim",
                target: "oom/mark_victim",
                check: None,
            }],
        },
    ],
    configure: Some(configure),
    records: &[RecordKind {
        kind: sensor_common::record::kind::OOM_KILL,
        len: sensor_common::oom::OomKillRecord::LEN,
        version: sensor_common::oom::RECORD_VERSION,
    }],
    view: Some(&super::view::VIEW),
};

pub(super) fn check_oom_control(k: &KernelContext) -> Result<(), String> {
    let btf = k.btf.as_ref().map_err(|e| format!("needs kernel BTF: {e}"))?;
    oom_control_layout(btf)
        .map(drop)
        .map_err(|e| format!("struct oom_control layout: {e}"))
}

/// The raw tracepoint is only useful where its first argument is the victim `task_struct *`
/// (6.8+; before that `mark_victim` passed only a pid).
pub(super) fn check_raw_victim(k: &KernelContext) -> Result<(), String> {
    let btf = k.btf.as_ref().map_err(|e| format!("needs kernel BTF: {e}"))?;
    match btf.raw_tp_arg_is_struct_ptr("mark_victim", 0, "task_struct") {
        Ok(true) => {}
        Ok(false) => {
            return Err("raw tracepoint mark_victim without task: the victim task comes with 6.8+ (or a backport, e.g. Debian's 6.1); 5.x passes its pid".into())
        }
        Err(e) => return Err(format!("mark_victim prototype: {e}")),
    }
    crate::kernel::task::layout(btf)
        .map(drop)
        .map_err(|e| format!("task/cgroup layout: {e}"))
}

/// Writes which `mark_victim` parts complete a record.
pub(super) fn configure(ebpf: &mut aya::Ebpf, groups: &[GroupReport]) -> Result<(), String> {
    let attached = |purpose: &str| groups.iter().any(|g| g.purpose == purpose && g.hook.is_some());
    let failed = |purpose: &str| groups.iter().any(|g| g.purpose == purpose && g.hook.is_none());
    let mut expected = 0;
    if !failed(GROUP_FIELDS) {
        expected |= part::FIELDS;
    }
    if attached(GROUP_CGROUP) {
        expected |= part::CGROUP;
    }
    if expected == 0 {
        expected = part::FIELDS;
    }
    let map = ebpf.map_mut(maps::OOM_CONFIG).ok_or("OOM_CONFIG map missing")?;
    let mut arr: Array<_, u32> = Array::try_from(map).map_err(|e| e.to_string())?;
    arr.set(CONFIG_EXPECTED_PARTS, expected, 0).map_err(|e| e.to_string())
}
