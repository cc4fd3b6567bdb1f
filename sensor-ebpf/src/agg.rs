//! In-kernel aggregation helpers: log2 histograms in per-CPU hash maps.
//!
//! Hot-path signals call [`observe`] instead of emitting a record per event; the daemon reads
//! the map periodically and sums the per-CPU copies.

use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, PerCpuHashMap},
};
use sensor_common::agg::{log2_bucket, Log2Hist};

use crate::transport::bump;

/// A zeroed histogram to insert from: a `Log2Hist` does not fit on the 512-byte BPF stack.
#[map]
static ZERO_HIST: PerCpuArray<Log2Hist> = PerCpuArray::with_max_entries(1, 0);

/// Records `value` in the histogram for `key`, creating it when absent. A full map counts as
/// `LOST_MAP_FULL` for `probe`, so no observation disappears uncounted.
#[inline(always)]
pub fn observe<K>(map: &PerCpuHashMap<K, Log2Hist>, probe: u32, key: &K, value: u64) {
    let hist = match map.get_ptr_mut(key) {
        Some(h) => h,
        None => {
            let Some(zero) = ZERO_HIST.get(0) else {
                bump(probe, sensor_common::record::counter::LOST_NO_SCRATCH);
                return;
            };
            // BPF_NOEXIST: another CPU may have inserted it meanwhile; then we just look up again.
            let _ = map.insert(key, zero, u64::from(aya_ebpf::bindings::BPF_NOEXIST));
            match map.get_ptr_mut(key) {
                Some(h) => h,
                None => {
                    bump(probe, sensor_common::record::counter::LOST_MAP_FULL);
                    return;
                }
            }
        }
    };
    // BPF has no clz: LLVM expands `leading_zeros` into arithmetic the verifier can only bound
    // to 255, and drops a clamp it can prove redundant. The volatile read keeps the mask.
    let b = log2_bucket(value);
    // SAFETY: a plain read of a local.
    let b = unsafe { core::ptr::read_volatile(&b) } & (sensor_common::agg::LOG2_BUCKETS - 1);
    // SAFETY: `hist` points to this CPU's copy of a map value that stays valid during the
    // program run; `b < LOG2_BUCKETS` by construction of `log2_bucket`.
    unsafe {
        if let Some(slot) = (*hist).buckets.get_mut(b) {
            *slot += 1;
        }
        (*hist).sum = (*hist).sum.wrapping_add(value);
        (*hist).count += 1;
    }
}
