//! OOM kills. One kill becomes one record, merged in a per-CPU slot from the parts that are
//! attached (see `sensor_common::oom`): the `mark_victim` tracepoint and raw tracepoint run back
//! to back on the same CPU with preemption disabled, so whichever runs second completes the
//! record; the `oom_kill_process` context (fentry/kprobe) is joined through a hash keyed by the
//! OOM-ing task, because it runs earlier and may have migrated CPUs since.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes,
        generated::{bpf_get_current_cgroup_id, bpf_get_stack},
    },
    macros::{fentry, kprobe, map, raw_tracepoint, tracepoint},
    maps::{Array, LruHashMap, PerCpuArray},
    programs::{FEntryContext, ProbeContext, RawTracePointContext, TracePointContext},
    EbpfContext,
};
use sensor_common::{
    oom::{
        field, hook, part, MarkVictimLayout, OomContext, OomControlLayout, OomKillRecord, TpField, VictimCgroup,
        CONFIG_EXPECTED_PARTS, RECORD_VERSION,
    },
    record::{counter, kind, probe_id},
};

use crate::{
    task::{self, read_i32, read_u64, task_cgroup},
    transport::{bump, output},
};

/// Field offsets of `oom:mark_victim`, set by the daemon from the tracefs format file.
#[unsafe(no_mangle)]
static MARK_VICTIM_LAYOUT: MarkVictimLayout = MarkVictimLayout::ABSENT;

/// `struct oom_control` offsets, set by the daemon from BTF.
#[unsafe(no_mangle)]
static OOM_CONTROL_LAYOUT: OomControlLayout = OomControlLayout::INVALID;

/// `[CONFIG_EXPECTED_PARTS]`: which `mark_victim` parts are attached, written by the daemon.
#[map]
static OOM_CONFIG: Array<u32> = Array::with_max_entries(1, 0);

/// The record under construction on this CPU (too large for the BPF stack).
#[map]
static OOM_SCRATCH: PerCpuArray<OomKillRecord> = PerCpuArray::with_max_entries(1, 0);

/// The context under construction on this CPU (too large for the BPF stack).
#[map]
static OOM_CTX_SCRATCH: PerCpuArray<OomContext> = PerCpuArray::with_max_entries(1, 0);

/// `oom_kill_process` context by OOM-ing thread id, merged and removed at `mark_victim`.
#[map]
static OOM_CTX: LruHashMap<u32, OomContext> = LruHashMap::with_max_entries(256, 0);

#[inline(always)]
fn expected_parts() -> u32 {
    match OOM_CONFIG.get(CONFIG_EXPECTED_PARTS) {
        Some(v) if *v != 0 => *v,
        _ => part::FIELDS,
    }
}

#[inline(always)]
fn emit<C: EbpfContext>(ctx: &C, rec: &mut OomKillRecord) {
    // SAFETY: `rec` is a live map value of `OomKillRecord::LEN` bytes.
    unsafe {
        output(
            ctx,
            probe_id::OOM,
            core::ptr::from_ref(rec).cast::<u8>(),
            OomKillRecord::LEN as usize,
        )
    };
    rec.parts = 0;
}

/// Returns this CPU's record ready for a part about `victim_pid`. A leftover partial record of a
/// different victim (its other part is not attached yet or failed) is sent first, so every kill
/// still yields exactly one record.
#[inline(always)]
fn begin_part<C: EbpfContext>(ctx: &C, victim_pid: Option<i32>) -> Option<&'static mut OomKillRecord> {
    let Some(p) = OOM_SCRATCH.get_ptr_mut(0) else {
        bump(probe_id::OOM, counter::LOST_NO_SCRATCH);
        return None;
    };
    // SAFETY: this CPU's slot of a per-CPU array value; valid and unaliased for the program run.
    let rec = unsafe { &mut *p };
    if rec.parts != 0 {
        if let Some(pid) = victim_pid {
            if rec.present & field::PID != 0 && rec.victim_pid != pid {
                aya_log_ebpf::warn!(
                    ctx,
                    "partial record of victim {} (parts {}) sent alone: its other part never came",
                    rec.victim_pid,
                    rec.parts
                );
                emit(ctx, rec);
            }
        }
    }
    if rec.parts == 0 {
        start_record(ctx, rec);
    }
    Some(rec)
}

/// What every record knows regardless of parts: header, `current` and the kernel stack.
#[inline(always)]
fn start_record<C: EbpfContext>(ctx: &C, rec: &mut OomKillRecord) {
    rec.header.kind = kind::OOM_KILL;
    rec.header.len = OomKillRecord::LEN;
    rec.header.version = RECORD_VERSION;
    rec.header._pad = 0;
    // SAFETY: helper without arguments.
    rec.header.ktime_ns = unsafe { bpf_ktime_get_ns() };
    rec.present = 0;
    rec.context_hook = hook::NONE;
    rec.cgroup.path_len = 0;
    rec.cgroup.path_depth = 0;
    rec.cgroup.path_truncated = 0;
    let pid_tgid = bpf_get_current_pid_tgid();
    rec.trigger_pid = pid_tgid as u32;
    rec.trigger_tgid = (pid_tgid >> 32) as u32;
    rec.trigger_comm = bpf_get_current_comm().unwrap_or([0; 16]);
    // SAFETY: helper without arguments.
    rec.trigger_cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let size = core::mem::size_of_val(&rec.stack) as u32;
    // SAFETY: `stack` is a writable buffer of exactly `size` bytes inside the map value.
    let got = unsafe { bpf_get_stack(ctx.as_ptr(), rec.stack.as_mut_ptr().cast(), size, 0) };
    if got > 0 {
        rec.stack_bytes = got as u32;
        rec.present |= field::STACK;
    } else {
        rec.stack_bytes = 0;
    }
}

/// Marks `p` done; when every expected part is in, joins the `oom_kill_process` context and sends.
#[inline(always)]
fn end_part<C: EbpfContext>(ctx: &C, rec: &mut OomKillRecord, p: u32) {
    rec.parts |= p;
    let expected = expected_parts();
    if rec.parts & expected != expected {
        return;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: a map value pointer, valid until the entry is removed below.
    if let Some(c) = unsafe { OOM_CTX.get(tid) } {
        merge_context(rec, c);
        let _ = OOM_CTX.remove(tid);
    }
    emit(ctx, rec);
}

/// Joins what `oom_kill_process` saw; victim fields only fill gaps, and only for the same victim.
#[inline(always)]
fn merge_context(rec: &mut OomKillRecord, c: &OomContext) {
    rec.oc_memcg_id = c.oc_memcg_id;
    rec.totalpages = c.totalpages;
    rec.constraint = c.constraint;
    rec.context_hook = c.hook as u8;
    rec.present |= c.present & (field::OC_MEMCG_ID | field::TOTALPAGES | field::CONSTRAINT);
    rec.parts |= part::CONTEXT;
    let same = rec.present & field::PID == 0 || (c.present & field::PID != 0 && c.chosen_pid == rec.victim_pid);
    if !same {
        return;
    }
    if rec.present & field::PID == 0 && c.present & field::PID != 0 {
        rec.victim_pid = c.chosen_pid;
        rec.present |= field::PID;
    }
    if rec.present & field::TGID == 0 && c.present & field::TGID != 0 {
        rec.victim_tgid = c.chosen_tgid;
        rec.present |= field::TGID;
    }
    if rec.present & field::COMM == 0 && c.present & field::COMM != 0 {
        rec.victim_comm = c.chosen_comm;
        rec.present |= field::COMM;
    }
    // The victim's cgroup as one unit, where the raw tracepoint part did not provide it.
    let cg_bits = field::MEMCG_ID | field::DFL_CGROUP_ID | field::CGROUP_PATH;
    if rec.present & cg_bits == 0 && c.present & cg_bits != 0 {
        let size = core::mem::size_of::<VictimCgroup>();
        // SAFETY: both are `VictimCgroup`s inside map values; the helper is a bounded copy.
        let dst = unsafe { core::slice::from_raw_parts_mut(core::ptr::from_mut(&mut rec.cgroup).cast::<u8>(), size) };
        // SAFETY: as above.
        if unsafe { bpf_probe_read_kernel_buf(core::ptr::from_ref(&c.cgroup).cast::<u8>(), dst) } {
            rec.present |= c.present & cg_bits;
        }
    }
}

/// Copies `dst.len()` bytes of kernel memory at `src` into `dst`.
///
/// # Safety
/// `src` must be a kernel address; the helper itself cannot fault.
#[inline(always)]
unsafe fn bpf_probe_read_kernel_buf(src: *const u8, dst: &mut [u8]) -> bool {
    // SAFETY: per the caller; `dst` is writable for its length.
    unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_kernel(dst.as_mut_ptr().cast(), dst.len() as u32, src.cast()) == 0
    }
}

/// Reads a tracepoint field of type `T` at `off` unless the layout marks it absent.
#[inline(always)]
fn tp_field<T>(ctx: &TracePointContext, off: u16) -> Option<T> {
    if off == TpField::ABSENT {
        return None;
    }
    // SAFETY: `off` comes from this kernel's format file for this tracepoint; the read goes
    // through bpf_probe_read_kernel, which cannot fault.
    unsafe { ctx.read_at::<T>(usize::from(off)).ok() }
}

/// `FIELDS` part: everything the tracepoint record carries, at this kernel's offsets.
#[tracepoint(category = "oom", name = "mark_victim")]
pub fn oom_mark_victim(ctx: TracePointContext) -> u32 {
    // SAFETY: read of a plain global in .rodata that the loader may have rewritten.
    let l = unsafe { core::ptr::read_volatile(&MARK_VICTIM_LAYOUT) };
    let pid = tp_field::<i32>(&ctx, l.pid);
    let Some(rec) = begin_part(&ctx, pid) else { return 0 };
    if let Some(pid) = pid {
        rec.victim_pid = pid;
        rec.present |= field::PID;
    }
    if l.comm != TpField::ABSENT {
        if l.comm_is_data_loc != 0 {
            if let Some(loc) = tp_field::<u32>(&ctx, l.comm) {
                let off = (loc & 0xffff) as usize;
                // SAFETY: `__data_loc` offsets are relative to the tracepoint record; the copy is
                // bounded by the destination and goes through bpf_probe_read_kernel_str.
                let src = unsafe { ctx.as_ptr().cast::<u8>().add(off) };
                // SAFETY: see above.
                if unsafe { bpf_probe_read_kernel_str_bytes(src, &mut rec.victim_comm) }.is_ok() {
                    rec.present |= field::COMM;
                }
            }
        } else if let Some(c) = tp_field::<[u8; 16]>(&ctx, l.comm) {
            rec.victim_comm = c;
            rec.present |= field::COMM;
        }
    }
    macro_rules! opt {
        ($dst:ident, $ty:ty, $off:expr, $bit:expr) => {
            if let Some(v) = tp_field::<$ty>(&ctx, $off) {
                rec.$dst = v;
                rec.present |= $bit;
            }
        };
    }
    opt!(total_vm_kb, u64, l.total_vm, field::TOTAL_VM);
    opt!(anon_rss_kb, u64, l.anon_rss, field::ANON_RSS);
    opt!(file_rss_kb, u64, l.file_rss, field::FILE_RSS);
    opt!(shmem_rss_kb, u64, l.shmem_rss, field::SHMEM_RSS);
    opt!(victim_uid, u32, l.uid, field::UID);
    opt!(pgtables_kb, u64, l.pgtables, field::PGTABLES);
    opt!(oom_score_adj, i16, l.oom_score_adj, field::OOM_SCORE_ADJ);
    end_part(&ctx, rec, part::FIELDS);
    0
}

/// `CGROUP` part: from the victim `task_struct` (first raw tracepoint argument on kernels whose
/// BTF says so) to its memory cgroup's kernfs id and path, captured now because the victim and
/// its cgroup may be gone by the time userspace looks.
#[raw_tracepoint(tracepoint = "mark_victim")]
pub fn oom_mark_victim_raw(ctx: RawTracePointContext) -> u32 {
    let l = task::layout();
    if l.valid == 0 {
        return 0;
    }
    let task: u64 = ctx.arg(0);
    let pid = read_i32(task + u64::from(l.task_pid));
    let Some(rec) = begin_part(&ctx, pid) else { return 0 };
    if let Some(pid) = pid {
        rec.victim_pid = pid;
        rec.present |= field::PID;
    }
    if let Some(tgid) = read_i32(task + u64::from(l.task_tgid)) {
        rec.victim_tgid = tgid;
        rec.present |= field::TGID;
    }
    if rec.present & field::COMM == 0 && task != 0 {
        // SAFETY: bounded kernel read of the 16-byte comm array.
        if let Ok(c) = unsafe { bpf_probe_read_kernel((task + u64::from(l.task_comm)) as *const [u8; 16]) } {
            rec.victim_comm = c;
            rec.present |= field::COMM;
        }
    }
    rec.present |= task_cgroup(&l, task, &mut rec.cgroup);
    end_part(&ctx, rec, part::CGROUP);
    0
}

/// `CONTEXT` part body for `oom_kill_process(struct oom_control *oc, const char *message)`.
#[inline(always)]
fn oom_kill_process(oc: u64, hook_id: u8) -> u32 {
    // SAFETY: read of a plain global in .rodata that the loader may have rewritten.
    let l = unsafe { core::ptr::read_volatile(&OOM_CONTROL_LAYOUT) };
    if l.valid == 0 || oc == 0 {
        return 0;
    }
    let Some(p) = OOM_CTX_SCRATCH.get_ptr_mut(0) else {
        bump(probe_id::OOM, counter::LOST_NO_SCRATCH);
        return 0;
    };
    // SAFETY: this CPU's slot of a per-CPU array value; valid and unaliased for the program run.
    let c = unsafe { &mut *p };
    let t = task::layout();
    // SAFETY: helper without arguments.
    c.ktime_ns = unsafe { bpf_ktime_get_ns() };
    c.totalpages = read_u64(oc + u64::from(l.oc_totalpages));
    c.constraint = read_i32(oc + u64::from(l.oc_constraint)).unwrap_or(0) as u32;
    c.present = field::TOTALPAGES | field::CONSTRAINT;
    c.hook = u32::from(hook_id);
    c.oc_memcg_id = 0;
    c.cgroup.memcg_id = 0;
    c.cgroup.path_len = 0;
    let memcg = read_u64(oc + u64::from(l.oc_memcg));
    if memcg != 0 && t.valid != 0 {
        let cgrp = read_u64(memcg + u64::from(l.memcg_css) + u64::from(t.css_cgroup));
        let kn = read_u64(cgrp + u64::from(t.cgroup_kn));
        if kn != 0 {
            c.oc_memcg_id = read_u64(kn + u64::from(t.kn_id));
            c.present |= field::OC_MEMCG_ID;
        }
    }
    let chosen = read_u64(oc + u64::from(l.oc_chosen));
    if chosen != 0 && t.valid != 0 {
        if let Some(pid) = read_i32(chosen + u64::from(t.task_pid)) {
            c.chosen_pid = pid;
            c.present |= field::PID;
        }
        if let Some(tgid) = read_i32(chosen + u64::from(t.task_tgid)) {
            c.chosen_tgid = tgid;
            c.present |= field::TGID;
        }
        // SAFETY: bounded kernel read of the 16-byte comm array.
        if let Ok(comm) = unsafe { bpf_probe_read_kernel((chosen + u64::from(t.task_comm)) as *const [u8; 16]) } {
            c.chosen_comm = comm;
            c.present |= field::COMM;
        }
        c.present |= task_cgroup(&t, chosen, &mut c.cgroup);
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    // Insert from the map slot by reference: a by-value `OomContext` (720 bytes) would not fit
    // on the 512-byte BPF stack.
    #[allow(clippy::needless_borrows_for_generic_args)]
    let inserted = OOM_CTX.insert(tid, &*c, 0);
    if inserted.is_err() {
        bump(probe_id::OOM, counter::LOST_MAP_FULL);
    }
    0
}

#[kprobe(function = "oom_kill_process")]
pub fn oom_kill_kprobe(ctx: ProbeContext) -> u32 {
    let oc: u64 = ctx.arg(0).unwrap_or(0);
    oom_kill_process(oc, hook::KPROBE)
}

#[fentry(function = "oom_kill_process")]
pub fn oom_kill_fentry(ctx: FEntryContext) -> u32 {
    let oc: u64 = ctx.arg(0);
    oom_kill_process(oc, hook::FENTRY)
}
