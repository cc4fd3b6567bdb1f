//! OOM kills: `oom:mark_victim` (always preferred for the victim's memory fields) and
//! `oom_kill_process` via fentry or kprobe where the kernel allows.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes,
        generated::{bpf_get_current_cgroup_id, bpf_get_stack},
    },
    macros::{fentry, kprobe, map, tracepoint},
    maps::PerCpuArray,
    programs::{FEntryContext, ProbeContext, TracePointContext},
    EbpfContext,
};
use sensor_common::{
    oom::{field, hook, MarkVictimLayout, OomControlLayout, OomKillRecord, TpField, RECORD_VERSION},
    record::{counter, kind, probe_id},
};

use crate::transport::{bump, output};

/// Field offsets of `oom:mark_victim`, set by the daemon from the tracefs format file.
#[unsafe(no_mangle)]
static MARK_VICTIM_LAYOUT: MarkVictimLayout = MarkVictimLayout::ABSENT;

/// Offsets into `struct oom_control` / `struct task_struct`, set by the daemon from BTF.
#[unsafe(no_mangle)]
static OOM_CONTROL_LAYOUT: OomControlLayout = OomControlLayout::INVALID;

/// The record is larger than the BPF stack allows, so it is built in a per-CPU slot.
#[map]
static OOM_SCRATCH: PerCpuArray<OomKillRecord> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn scratch() -> Option<&'static mut OomKillRecord> {
    let p = OOM_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot of a per-CPU array value; valid and unaliased for the program run.
    Some(unsafe { &mut *p })
}

/// Fills what every hook knows: header, `current` (the allocating task) and the kernel stack.
#[inline(always)]
fn fill_common<C: EbpfContext>(ctx: &C, rec: &mut OomKillRecord, hook_id: u8) {
    rec.header.kind = kind::OOM_KILL;
    rec.header.len = OomKillRecord::LEN;
    rec.header.version = RECORD_VERSION;
    rec.header._pad = 0;
    // SAFETY: plain helper calls without pointer arguments.
    rec.header.ktime_ns = unsafe { bpf_ktime_get_ns() };
    rec.present = 0;
    rec.hook = hook_id;
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

#[inline(always)]
fn emit<C: EbpfContext>(ctx: &C, rec: &OomKillRecord) {
    // SAFETY: `rec` is a live map value of `OomKillRecord::LEN` bytes.
    unsafe {
        output(
            ctx,
            probe_id::OOM,
            core::ptr::from_ref(rec).cast::<u8>(),
            OomKillRecord::LEN as usize,
        )
    };
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

#[tracepoint(category = "oom", name = "mark_victim")]
pub fn oom_mark_victim(ctx: TracePointContext) -> u32 {
    let Some(rec) = scratch() else {
        bump(probe_id::OOM, counter::LOST_NO_SCRATCH);
        return 0;
    };
    fill_common(&ctx, rec, hook::TRACEPOINT);
    // SAFETY: read of a plain global in .rodata that the loader may have rewritten.
    let l = unsafe { core::ptr::read_volatile(&MARK_VICTIM_LAYOUT) };

    rec.victim_pid = tp_field::<i32>(&ctx, l.pid).map_or(0, |v| {
        rec.present |= field::PID;
        v
    });
    rec.victim_comm = [0; 16];
    if l.comm != TpField::ABSENT {
        if l.comm_is_data_loc != 0 {
            if let Some(loc) = tp_field::<u32>(&ctx, l.comm) {
                let off = (loc & 0xffff) as usize;
                // SAFETY: `__data_loc` offsets are relative to the tracepoint record; the read is
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
            rec.$dst = match tp_field::<$ty>(&ctx, $off) {
                Some(v) => {
                    rec.present |= $bit;
                    v
                }
                None => Default::default(),
            };
        };
    }
    opt!(total_vm_kb, u64, l.total_vm, field::TOTAL_VM);
    opt!(anon_rss_kb, u64, l.anon_rss, field::ANON_RSS);
    opt!(file_rss_kb, u64, l.file_rss, field::FILE_RSS);
    opt!(shmem_rss_kb, u64, l.shmem_rss, field::SHMEM_RSS);
    opt!(victim_uid, u32, l.uid, field::UID);
    opt!(pgtables_kb, u64, l.pgtables, field::PGTABLES);
    opt!(oom_score_adj, i16, l.oom_score_adj, field::OOM_SCORE_ADJ);
    emit(&ctx, rec);
    0
}

/// Shared body of the `oom_kill_process(struct oom_control *oc, const char *message)` hooks.
#[inline(always)]
fn oom_kill_process<C: EbpfContext>(ctx: &C, oc: u64, hook_id: u8) -> u32 {
    let Some(rec) = scratch() else {
        bump(probe_id::OOM, counter::LOST_NO_SCRATCH);
        return 0;
    };
    fill_common(ctx, rec, hook_id);
    rec.victim_pid = 0;
    rec.victim_comm = [0; 16];
    rec.total_vm_kb = 0;
    rec.anon_rss_kb = 0;
    rec.file_rss_kb = 0;
    rec.shmem_rss_kb = 0;
    rec.pgtables_kb = 0;
    rec.victim_uid = 0;
    rec.oom_score_adj = 0;
    // SAFETY: read of a plain global in .rodata that the loader may have rewritten.
    let l = unsafe { core::ptr::read_volatile(&OOM_CONTROL_LAYOUT) };
    if l.valid != 0 && oc != 0 {
        // SAFETY: offsets come from this kernel's BTF; all reads go through
        // bpf_probe_read_kernel, which cannot fault.
        unsafe {
            let chosen_p = (oc + u64::from(l.oc_chosen)) as *const u64;
            if let Ok(task) = bpf_probe_read_kernel(chosen_p) {
                if task != 0 {
                    if let Ok(pid) = bpf_probe_read_kernel((task + u64::from(l.task_tgid)) as *const i32) {
                        rec.victim_pid = pid;
                        rec.present |= field::PID;
                    }
                    if let Ok(comm) = bpf_probe_read_kernel((task + u64::from(l.task_comm)) as *const [u8; 16]) {
                        rec.victim_comm = comm;
                        rec.present |= field::COMM;
                    }
                }
            }
        }
    }
    emit(ctx, rec);
    0
}

#[kprobe(function = "oom_kill_process")]
pub fn oom_kill_kprobe(ctx: ProbeContext) -> u32 {
    let oc: u64 = ctx.arg(0).unwrap_or(0);
    oom_kill_process(&ctx, oc, hook::KPROBE)
}

#[fentry(function = "oom_kill_process")]
pub fn oom_kill_fentry(ctx: FEntryContext) -> u32 {
    let oc: u64 = ctx.arg(0);
    oom_kill_process(&ctx, oc, hook::FENTRY)
}
