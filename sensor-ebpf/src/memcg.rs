//! Reclaim stalls: how long tasks wait in direct or memcg reclaim, per memory cgroup of the
//! stalled task, aggregated in the kernel (a record per reclaim would be far too many).

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated::bpf_get_current_task},
    macros::{map, tracepoint},
    maps::{LruHashMap, PerCpuHashMap},
    programs::TracePointContext,
};
use sensor_common::{agg::Log2Hist, memcg::RECLAIM_CGROUPS, record::probe_id};

use crate::{agg::observe, task};

/// Reclaim start time by thread id. LRU: a begin whose end was never seen ages out.
#[map]
static RECLAIM_START: LruHashMap<u32, u64> = LruHashMap::with_max_entries(16384, 0);

/// Reclaim latency (ns) by the stalled task's memory cgroup kernfs id.
#[map]
static RECLAIM_HIST: PerCpuHashMap<u64, Log2Hist> = PerCpuHashMap::with_max_entries(RECLAIM_CGROUPS, 0);

#[inline(always)]
fn begin() -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // An LRU map makes room by evicting; a failure here only loses this one sample's start.
    let _ = RECLAIM_START.insert(tid, now, 0);
    0
}

#[inline(always)]
fn end() -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: the value is copied out before the entry is removed.
    let Some(start) = (unsafe { RECLAIM_START.get(tid) }).copied() else {
        return 0;
    };
    let _ = RECLAIM_START.remove(tid);
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let l = task::layout();
    let cgroup = if l.valid != 0 {
        // SAFETY: helper without arguments; the pointer is only read through probe_read.
        let task = unsafe { bpf_get_current_task() };
        task::task_memcg_id(&l, task)
    } else {
        0
    };
    observe(&RECLAIM_HIST, probe_id::MEMCG, &cgroup, now.saturating_sub(start));
    0
}

#[tracepoint(category = "vmscan", name = "mm_vmscan_memcg_reclaim_begin")]
pub fn memcg_reclaim_begin(_ctx: TracePointContext) -> u32 {
    begin()
}

#[tracepoint(category = "vmscan", name = "mm_vmscan_memcg_reclaim_end")]
pub fn memcg_reclaim_end(_ctx: TracePointContext) -> u32 {
    end()
}

#[tracepoint(category = "vmscan", name = "mm_vmscan_direct_reclaim_begin")]
pub fn direct_reclaim_begin(_ctx: TracePointContext) -> u32 {
    begin()
}

#[tracepoint(category = "vmscan", name = "mm_vmscan_direct_reclaim_end")]
pub fn direct_reclaim_end(_ctx: TracePointContext) -> u32 {
    end()
}
