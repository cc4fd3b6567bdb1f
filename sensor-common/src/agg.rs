//! In-kernel aggregation: log2 histograms kept in per-CPU maps and summed by userspace.
//!
//! Hot paths (connect latency, reclaim stalls) must not send one record per event; the
//! kernel program bumps a bucket instead and the daemon reads the map periodically.

/// Buckets of a [`Log2Hist`]: bucket `i` counts values `v` with `floor(log2(v)) == i`
/// (bucket 0 also holds 0), so every u64 has a bucket. A power of two, so the kernel side can
/// bound the index with a mask the verifier understands.
pub const LOG2_BUCKETS: usize = 64;
const _: () = assert!(LOG2_BUCKETS.is_power_of_two());

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Log2Hist {
    pub buckets: [u64; LOG2_BUCKETS],
    /// Sum of observed values (wraps after 2^64 units; fine for rates).
    pub sum: u64,
    pub count: u64,
}
crate::assert_size!(Log2Hist, 8 * LOG2_BUCKETS + 16);

impl Log2Hist {
    pub const ZERO: Log2Hist = Log2Hist {
        buckets: [0; LOG2_BUCKETS],
        sum: 0,
        count: 0,
    };
}

/// `floor(log2(v))` clamped to the last bucket, branch-light so the verifier accepts it
/// without loops.
#[inline(always)]
pub fn log2_bucket(v: u64) -> usize {
    if v == 0 {
        return 0;
    }
    let b = 63 - v.leading_zeros() as usize;
    if b >= LOG2_BUCKETS {
        LOG2_BUCKETS - 1
    } else {
        b
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]`, only `u64` fields, no padding.
    unsafe impl aya::Pod for super::Log2Hist {}
}
