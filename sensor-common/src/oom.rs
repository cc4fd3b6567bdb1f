//! OOM-kill records and the kernel layouts the daemon hands to the kernel programs.
//!
//! One kill is one record, merged in the kernel from up to three parts so that
//! "kills caused = kills seen + events lost" holds exactly:
//! - `FIELDS`: `oom:mark_victim` tracepoint, fields at offsets from the tracefs format file;
//! - `CGROUP`: raw tracepoint `mark_victim`, the victim `task_struct` -> memory cgroup id and path;
//! - `CONTEXT`: fentry/kprobe `oom_kill_process`, the `oom_control` (constraint, OOMing memcg).

use crate::record::RecordHeader;

pub const COMM_LEN: usize = 16;
/// Kernel stack frames captured with each kill; enough to reach the OOM entry point
/// (`mem_cgroup_out_of_memory` vs `out_of_memory`) from `mark_victim`.
pub const STACK_DEPTH: usize = 24;
/// Bytes for the victim's cgroup path: kernfs names, leaf first, each NUL-terminated.
pub const PATH_BUF: usize = 640;
/// Longest kernfs name copied (container scopes are ~90 bytes).
pub const NAME_MAX: usize = 128;
/// Ancestors walked; deeper paths are marked truncated and resolved from cgroupfs by id.
pub const PATH_MAX_DEPTH: usize = 12;
const _: () = assert!(
    (PATH_BUF - NAME_MAX).is_power_of_two(),
    "the kernel masks path offsets with it"
);
pub const RECORD_VERSION: u16 = 2;

/// Which hook produced the `CONTEXT` part.
pub mod hook {
    pub const NONE: u8 = 0;
    pub const KPROBE: u8 = 2;
    pub const FENTRY: u8 = 3;
}

/// Parts of a kill record (bits of [`OomKillRecord::parts`] and of the expected-parts config).
pub mod part {
    pub const FIELDS: u32 = 1 << 0;
    pub const CGROUP: u32 = 1 << 1;
    pub const CONTEXT: u32 = 1 << 2;
}

/// Bits of [`OomKillRecord::present`]: a field is only meaningful when its bit is set,
/// because tracepoint fields differ across kernel versions and parts may be missing.
pub mod field {
    pub const PID: u32 = 1 << 0;
    pub const COMM: u32 = 1 << 1;
    pub const TOTAL_VM: u32 = 1 << 2;
    pub const ANON_RSS: u32 = 1 << 3;
    pub const FILE_RSS: u32 = 1 << 4;
    pub const SHMEM_RSS: u32 = 1 << 5;
    pub const UID: u32 = 1 << 6;
    pub const PGTABLES: u32 = 1 << 7;
    pub const OOM_SCORE_ADJ: u32 = 1 << 8;
    pub const STACK: u32 = 1 << 9;
    pub const TGID: u32 = 1 << 10;
    pub const MEMCG_ID: u32 = 1 << 11;
    pub const DFL_CGROUP_ID: u32 = 1 << 12;
    pub const CGROUP_PATH: u32 = 1 << 13;
    pub const OC_MEMCG_ID: u32 = 1 << 14;
    pub const TOTALPAGES: u32 = 1 << 15;
    pub const CONSTRAINT: u32 = 1 << 16;
}

/// One OOM kill. Memory sizes are in kB, as the tracepoint reports them.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct OomKillRecord {
    pub header: RecordHeader,
    pub present: u32,
    pub parts: u32,
    /// Victim thread id (`task->pid`), the key the parts merge on.
    pub victim_pid: i32,
    pub victim_tgid: i32,
    pub victim_uid: u32,
    pub oom_score_adj: i16,
    /// Hook of the `CONTEXT` part ([`hook`]).
    pub context_hook: u8,
    pub _pad0: u8,
    pub victim_comm: [u8; COMM_LEN],
    pub total_vm_kb: u64,
    pub anon_rss_kb: u64,
    pub file_rss_kb: u64,
    pub shmem_rss_kb: u64,
    pub pgtables_kb: u64,
    /// The task whose allocation triggered the OOM (`current` at `mark_victim`).
    pub trigger_pid: u32,
    pub trigger_tgid: u32,
    pub trigger_comm: [u8; COMM_LEN],
    /// cgroup v2 id of the triggering task (0 where v2 is not mounted).
    pub trigger_cgroup_id: u64,
    /// kernfs id of the memory cgroup that ran out (`oom_control.memcg`; 0 for a global OOM).
    pub oc_memcg_id: u64,
    /// `oom_control.totalpages`: the limit the OOM was computed against, in pages.
    pub totalpages: u64,
    /// `enum oom_constraint`: 0 none, 1 cpuset, 2 mempolicy, 3 memcg.
    pub constraint: u32,
    /// Bytes of `stack` that hold frames, as returned by `bpf_get_stack`.
    pub stack_bytes: u32,
    pub stack: [u64; STACK_DEPTH],
    pub cgroup: VictimCgroup,
}
crate::assert_size!(OomKillRecord, 152 + 8 * STACK_DEPTH + VictimCgroup::SIZE);

/// A task's memory cgroup as captured in the kernel: ids and the path, so a kill is attributed
/// even when the cgroup is gone by the time userspace looks.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VictimCgroup {
    /// kernfs id (= inode) of the memory cgroup, in the memory controller's hierarchy.
    pub memcg_id: u64,
    /// kernfs id of the cgroup v2 (default hierarchy) cgroup.
    pub dfl_cgroup_id: u64,
    /// Bytes of `path` in use.
    pub path_len: u16,
    pub path_depth: u8,
    /// Non-zero when the walk stopped before the root (too deep or buffer full).
    pub path_truncated: u8,
    pub _pad: u32,
    /// Kernfs names from the memory cgroup up to (not including) the root, leaf first, each
    /// followed by a NUL.
    pub path: [u8; PATH_BUF],
}

impl VictimCgroup {
    pub const SIZE: usize = 24 + PATH_BUF;
}
crate::assert_size!(VictimCgroup, VictimCgroup::SIZE);

impl OomKillRecord {
    pub const LEN: u16 = core::mem::size_of::<OomKillRecord>() as u16;
}

/// Offsets of the `oom:mark_victim` fields in the tracepoint record, read from tracefs at load
/// time. [`TpField::ABSENT`] marks a field this kernel's tracepoint does not have.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkVictimLayout {
    pub pid: u16,
    /// Either an inline `char[16]` or a `__data_loc char[]` (see `comm_is_data_loc`).
    pub comm: u16,
    pub total_vm: u16,
    pub anon_rss: u16,
    pub file_rss: u16,
    pub shmem_rss: u16,
    pub uid: u16,
    pub pgtables: u16,
    pub oom_score_adj: u16,
    pub comm_is_data_loc: u16,
}
crate::assert_size!(MarkVictimLayout, 20);

/// Namespace for the absent-field marker.
pub struct TpField;
impl TpField {
    pub const ABSENT: u16 = u16::MAX;
}

impl MarkVictimLayout {
    /// Every field absent: the program then emits only what it reads from `current`.
    pub const ABSENT: MarkVictimLayout = MarkVictimLayout {
        pid: TpField::ABSENT,
        comm: TpField::ABSENT,
        total_vm: TpField::ABSENT,
        anon_rss: TpField::ABSENT,
        file_rss: TpField::ABSENT,
        shmem_rss: TpField::ABSENT,
        uid: TpField::ABSENT,
        pgtables: TpField::ABSENT,
        oom_score_adj: TpField::ABSENT,
        comm_is_data_loc: 0,
    };
}

pub use crate::task::TaskLayout;

/// Offsets into `struct oom_control` for the fentry/kprobe hooks, from BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OomControlLayout {
    pub valid: u32,
    pub oc_memcg: u32,
    pub oc_totalpages: u32,
    pub oc_chosen: u32,
    pub oc_constraint: u32,
    /// `mem_cgroup.css` (a `struct cgroup_subsys_state`, normally at offset 0).
    pub memcg_css: u32,
}
crate::assert_size!(OomControlLayout, 24);

impl OomControlLayout {
    /// All offsets zero and `valid == 0`: the programs skip what needs this layout.
    // SAFETY: `#[repr(C)]` and made only of integers, so all-zero is a valid value.
    pub const INVALID: OomControlLayout = unsafe { core::mem::zeroed() };
}

/// What the `oom_kill_process` hook saw, kept until `mark_victim` of the same OOM merges it.
/// It also carries the chosen victim's cgroup, for kernels whose `mark_victim` raw tracepoint
/// does not pass the victim task (before 6.8).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct OomContext {
    pub oc_memcg_id: u64,
    pub totalpages: u64,
    pub ktime_ns: u64,
    pub constraint: u32,
    pub chosen_pid: i32,
    pub chosen_tgid: i32,
    pub present: u32,
    pub hook: u32,
    pub _pad: u32,
    pub chosen_comm: [u8; COMM_LEN],
    pub cgroup: VictimCgroup,
}
crate::assert_size!(OomContext, 64 + VictimCgroup::SIZE);

/// Index of the expected-parts mask in the `OOM_CONFIG` array map.
pub const CONFIG_EXPECTED_PARTS: u32 = 0;

#[cfg(feature = "user")]
mod user {
    // SAFETY (all of them): `#[repr(C)]`, made only of integers and integer arrays with explicit
    // padding fields, so every bit pattern is valid and there are no implicit holes.
    unsafe impl aya::Pod for super::MarkVictimLayout {}
    unsafe impl aya::Pod for super::OomKillRecord {}
    unsafe impl aya::Pod for super::OomControlLayout {}
    unsafe impl aya::Pod for super::OomContext {}
    unsafe impl aya::Pod for super::VictimCgroup {}
}
