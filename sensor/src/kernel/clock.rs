//! Converts kernel monotonic timestamps (`bpf_ktime_get_ns`) to wall time, once, in userspace.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Wall-clock time of a `bpf_ktime_get_ns()` value.
pub fn ktime_to_wall(ktime_ns: u64) -> SystemTime {
    let now_mono = monotonic_ns();
    let now_wall = SystemTime::now();
    if ktime_ns <= now_mono {
        now_wall - Duration::from_nanos(now_mono - ktime_ns)
    } else {
        now_wall + Duration::from_nanos(ktime_ns - now_mono)
    }
}

/// Seconds since the epoch as f64 (for JSON and `_timestamp_seconds` gauges).
pub fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}
