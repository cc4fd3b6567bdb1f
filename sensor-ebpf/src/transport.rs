//! Kernel-to-user transport: a per-CPU perf event array plus per-CPU counters.
//!
//! Every output is counted either as emitted or as lost, so userspace can prove that
//! `caused == seen + lost` for every probe.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_F_CURRENT_CPU,
    helpers::generated::bpf_perf_event_output,
    macros::map,
    maps::{PerCpuArray, PerfEventByteArray},
    EbpfContext,
};
use sensor_common::record::{counter, COUNTER_ENTRIES};

/// One perf ring per CPU; userspace opens one buffer per online CPU.
#[map]
pub static EVENTS: PerfEventByteArray = PerfEventByteArray::new(0);

/// Per-probe counters (see `sensor_common::record::counter`).
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_ENTRIES, 0);

/// Adds one to a per-probe counter. Per-CPU slot, so no atomics are needed.
#[inline(always)]
pub fn bump(probe: u32, which: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter::index(probe, which)) {
        // SAFETY: the pointer is this CPU's slot of an array map value, valid for the whole
        // program run; programs do not migrate CPUs while running.
        unsafe { *slot += 1 };
    }
}

/// Sends `len` bytes at `data` to this CPU's ring and counts the outcome.
///
/// # Safety
/// `data` must point to at least `len` readable bytes (a map value or stack buffer).
#[inline(always)]
pub unsafe fn output<C: EbpfContext>(ctx: &C, probe: u32, data: *const u8, len: usize) {
    // `PerfEventByteArray` is `#[repr(transparent)]` over the map definition, so its address is
    // the map pointer the helper expects. The safe wrapper discards the helper's return value,
    // which we need to count drops.
    let map = core::ptr::from_ref(&EVENTS).cast_mut().cast::<c_void>();
    // SAFETY: ctx is the program's context, map is a perf event array, data/len per the caller.
    let ret = unsafe {
        bpf_perf_event_output(
            ctx.as_ptr(),
            map,
            BPF_F_CURRENT_CPU,
            data.cast_mut().cast::<c_void>(),
            len as u64,
        )
    };
    if ret == 0 {
        bump(probe, counter::EMITTED);
    } else {
        bump(probe, counter::LOST_BUFFER_FULL);
        // Off unless `kernel_log` is set (the macro checks `AYA_LOG_LEVEL` first).
        aya_log_ebpf::warn!(ctx, "record of probe {} not sent: perf output failed ({})", probe, ret);
    }
}
