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

/// The value for `key`, created from `zero` when absent. A full map counts as
/// `LOST_MAP_FULL` for `probe`, so no observation disappears uncounted.
#[inline(always)]
pub fn value_for<K, V>(map: &PerCpuHashMap<K, V>, zero: &PerCpuArray<V>, probe: u32, key: &K) -> Option<*mut V> {
    if let Some(v) = map.get_ptr_mut(key) {
        return Some(v);
    }
    let Some(z) = zero.get(0) else {
        bump(probe, sensor_common::record::counter::LOST_NO_SCRATCH);
        return None;
    };
    // BPF_NOEXIST: another CPU may have inserted it meanwhile; then we just look up again.
    let _ = map.insert(key, z, u64::from(aya_ebpf::bindings::BPF_NOEXIST));
    let v = map.get_ptr_mut(key);
    if v.is_none() {
        bump(probe, sensor_common::record::counter::LOST_MAP_FULL);
    }
    v
}

/// Records `value` in the histogram at `hist`.
#[inline(always)]
pub fn record(hist: *mut Log2Hist, value: u64) {
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

/// Records `value` in the histogram for `key`, creating it when absent.
#[inline(always)]
pub fn observe<K>(map: &PerCpuHashMap<K, Log2Hist>, probe: u32, key: &K, value: u64) {
    if let Some(h) = value_for(map, &ZERO_HIST, probe, key) {
        record(h, value);
    }
}
