//! OOM kills. One kill becomes one record, merged in a per-CPU slot from the parts that are
//! attached (see `sensor_common::oom`): the `mark_victim` tracepoint and raw tracepoint run back
//! to back on the same CPU with preemption disabled, so whichever runs second completes the
//! record; the `oom_kill_process` context (fentry/kprobe) is joined through a hash keyed by the
//! OOM-ing task, because it runs earlier and may have migrated CPUs since.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes,
        generated::{bpf_get_current_cgroup_id, bpf_get_stack, bpf_probe_read_kernel_str},
    },
    macros::{fentry, kprobe, map, raw_tracepoint, tracepoint},
    maps::{Array, LruHashMap, PerCpuArray},
    programs::{FEntryContext, ProbeContext, RawTracePointContext, TracePointContext},
    EbpfContext,
};
use sensor_common::{
    oom::{
        field, hook, part, MarkVictimLayout, OomContext, OomControlLayout, OomKillRecord, TaskLayout, TpField,
        CONFIG_EXPECTED_PARTS, NAME_MAX, PATH_BUF, PATH_MAX_DEPTH, RECORD_VERSION,
    },
    record::{counter, kind, probe_id},
};

use crate::transport::{bump, output};

/// Field offsets of `oom:mark_victim`, set by the daemon from the tracefs format file.
#[unsafe(no_mangle)]
static MARK_VICTIM_LAYOUT: MarkVictimLayout = MarkVictimLayout::ABSENT;

/// `task_struct` / cgroup / kernfs offsets, set by the daemon from BTF.
#[unsafe(no_mangle)]
static TASK_LAYOUT: TaskLayout = TaskLayout::INVALID;

/// `struct oom_control` offsets, set by the daemon from BTF.
#[unsafe(no_mangle)]
static OOM_CONTROL_LAYOUT: OomControlLayout = OomControlLayout::INVALID;

/// `[CONFIG_EXPECTED_PARTS]`: which `mark_victim` parts are attached, written by the daemon.
#[map]
static OOM_CONFIG: Array<u32> = Array::with_max_entries(1, 0);

/// The record under construction on this CPU (too large for the BPF stack).
#[map]
static OOM_SCRATCH: PerCpuArray<OomKillRecord> = PerCpuArray::with_max_entries(1, 0);

/// `oom_kill_process` context by OOM-ing thread id, merged and removed at `mark_victim`.
#[map]
static OOM_CTX: LruHashMap<u32, OomContext> = LruHashMap::with_max_entries(256, 0);

#[inline(always)]
fn read_u64(addr: u64) -> u64 {
    if addr == 0 {
        return 0;
    }
    // SAFETY: bpf_probe_read_kernel validates the address and cannot fault.
    unsafe { bpf_probe_read_kernel(addr as *const u64) }.unwrap_or(0)
}

#[inline(always)]
fn read_i32(addr: u64) -> Option<i32> {
    if addr == 0 {
        return None;
    }
    // SAFETY: as above.
    unsafe { bpf_probe_read_kernel(addr as *const i32) }.ok()
}

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
    rec.path_len = 0;
    rec.path_depth = 0;
    rec.path_truncated = 0;
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
    // SAFETY: the value is copied out before the entry is removed.
    if let Some(c) = unsafe { OOM_CTX.get(tid) } {
        let c = *c;
        let _ = OOM_CTX.remove(tid);
        rec.oc_memcg_id = c.oc_memcg_id;
        rec.totalpages = c.totalpages;
        rec.constraint = c.constraint;
        rec.context_hook = c.hook as u8;
        rec.present |= c.present;
        rec.parts |= part::CONTEXT;
    }
    emit(ctx, rec);
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
    // SAFETY: read of a plain global in .rodata that the loader may have rewritten.
    let l = unsafe { core::ptr::read_volatile(&TASK_LAYOUT) };
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
    let cset = read_u64(task + u64::from(l.task_cgroups));
    let css = read_u64(cset + u64::from(l.cset_subsys) + 8 * u64::from(l.memory_cgrp_id));
    let cgrp = read_u64(css + u64::from(l.css_cgroup));
    let kn = read_u64(cgrp + u64::from(l.cgroup_kn));
    if kn != 0 {
        rec.memcg_id = read_u64(kn + u64::from(l.kn_id));
        rec.present |= field::MEMCG_ID;
        walk_path(rec, &l, kn);
    }
    let dfl = read_u64(cset + u64::from(l.cset_dfl_cgrp));
    let dfl_kn = read_u64(dfl + u64::from(l.cgroup_kn));
    if dfl_kn != 0 {
        rec.dfl_cgroup_id = read_u64(dfl_kn + u64::from(l.kn_id));
        rec.present |= field::DFL_CGROUP_ID;
    }
    end_part(&ctx, rec, part::CGROUP);
    0
}

/// Copies kernfs names from `kn` up to (not including) the hierarchy root, leaf first.
#[inline(always)]
fn walk_path(rec: &mut OomKillRecord, l: &TaskLayout, kn: u64) {
    let mut node = kn;
    let mut off: usize = 0;
    let mut depth: u8 = 0;
    let mut reached_root = false;
    for _ in 0..PATH_MAX_DEPTH {
        let parent = read_u64(node + u64::from(l.kn_parent));
        if parent == 0 {
            reached_root = true;
            break;
        }
        if off > PATH_BUF - NAME_MAX {
            break;
        }
        let name = read_u64(node + u64::from(l.kn_name));
        // SAFETY: `off <= PATH_BUF - NAME_MAX`, so the destination range lies inside `path`;
        // the helper copies at most NAME_MAX bytes and always NUL-terminates.
        let n = unsafe {
            bpf_probe_read_kernel_str(
                rec.path.as_mut_ptr().add(off).cast(),
                NAME_MAX as u32,
                name as *const core::ffi::c_void,
            )
        };
        if n <= 0 {
            break;
        }
        off += (n as usize) & (NAME_MAX * 2 - 1);
        depth += 1;
        node = parent;
    }
    rec.path_len = off as u16;
    rec.path_depth = depth;
    rec.path_truncated = u8::from(!reached_root);
    rec.present |= field::CGROUP_PATH;
}

/// `CONTEXT` part body for `oom_kill_process(struct oom_control *oc, const char *message)`.
#[inline(always)]
fn oom_kill_process(oc: u64, hook_id: u8) -> u32 {
    // SAFETY: read of a plain global in .rodata that the loader may have rewritten.
    let l = unsafe { core::ptr::read_volatile(&OOM_CONTROL_LAYOUT) };
    if l.valid == 0 || oc == 0 {
        return 0;
    }
    // SAFETY: as above.
    let t = unsafe { core::ptr::read_volatile(&TASK_LAYOUT) };
    let mut c = OomContext {
        oc_memcg_id: 0,
        // SAFETY: helper without arguments.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        totalpages: read_u64(oc + u64::from(l.oc_totalpages)),
        constraint: read_i32(oc + u64::from(l.oc_constraint)).unwrap_or(0) as u32,
        chosen_pid: 0,
        present: field::TOTALPAGES | field::CONSTRAINT,
        hook: u32::from(hook_id),
    };
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
    if t.valid != 0 {
        c.chosen_pid = read_i32(chosen + u64::from(t.task_pid)).unwrap_or(0);
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    if OOM_CTX.insert(tid, c, 0).is_err() {
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
