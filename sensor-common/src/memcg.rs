//! Memory-cgroup pressure: the in-kernel reclaim histogram's key and size.

/// Default number of cgroups the reclaim histogram map holds (the daemon may resize it); a full
/// map counts as `map_full` for the memcg probe.
pub const RECLAIM_CGROUPS: u32 = 4096;
