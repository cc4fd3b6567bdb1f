//! OOM-kill records and the tracepoint layout the daemon hands to the kernel program.

use crate::record::RecordHeader;

pub const COMM_LEN: usize = 16;
/// Kernel stack frames captured with each kill; enough to reach the OOM entry point
/// (`mem_cgroup_out_of_memory` vs `out_of_memory`) from `mark_victim`.
pub const STACK_DEPTH: usize = 24;
pub const RECORD_VERSION: u16 = 1;

/// Which hook produced a record.
pub mod hook {
    pub const TRACEPOINT: u8 = 1;
    pub const KPROBE: u8 = 2;
    pub const FENTRY: u8 = 3;
}

/// Bits of [`OomKillRecord::present`]: a field is only meaningful when its bit is set,
/// because tracepoint fields differ across kernel versions.
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
}

/// One OOM kill as seen by a hook. Memory sizes are in kB, as the tracepoint reports them.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct OomKillRecord {
    pub header: RecordHeader,
    pub present: u32,
    pub hook: u8,
    pub _pad0: [u8; 1],
    pub oom_score_adj: i16,
    pub victim_pid: i32,
    pub victim_uid: u32,
    pub victim_comm: [u8; COMM_LEN],
    pub total_vm_kb: u64,
    pub anon_rss_kb: u64,
    pub file_rss_kb: u64,
    pub shmem_rss_kb: u64,
    pub pgtables_kb: u64,
    /// The task whose allocation triggered the OOM (`current` at the hook).
    pub trigger_pid: u32,
    pub trigger_tgid: u32,
    pub trigger_comm: [u8; COMM_LEN],
    /// cgroup v2 id of the triggering task (0 where v2 is not mounted).
    pub trigger_cgroup_id: u64,
    /// Bytes of `stack` that hold frames, as returned by `bpf_get_stack`.
    pub stack_bytes: u32,
    pub _pad1: u32,
    pub stack: [u64; STACK_DEPTH],
}
crate::assert_size!(OomKillRecord, 128 + 8 * STACK_DEPTH);

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

/// Offsets into kernel structs used by the `oom_kill_process` hooks (kprobe, fentry), taken
/// from the running kernel's BTF at load time. `valid == 0` makes the programs skip reading
/// through `struct oom_control` and report only `current`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OomControlLayout {
    pub valid: u32,
    /// `struct oom_control::chosen` (the victim `struct task_struct *`).
    pub oc_chosen: u32,
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_comm: u32,
    pub _pad: u32,
}
crate::assert_size!(OomControlLayout, 24);

impl OomControlLayout {
    pub const INVALID: OomControlLayout = OomControlLayout {
        valid: 0,
        oc_chosen: 0,
        task_pid: 0,
        task_tgid: 0,
        task_comm: 0,
        _pad: 0,
    };
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]`, only `u32` fields, no implicit padding.
    unsafe impl aya::Pod for super::OomControlLayout {}
    // SAFETY: both types are `#[repr(C)]`, made only of integers and integer arrays with
    // explicit padding fields, so every bit pattern is valid and there are no implicit holes.
    unsafe impl aya::Pod for super::MarkVictimLayout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OomKillRecord {}
}
