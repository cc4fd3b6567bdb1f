//! The envelope of every record the kernel sends to userspace.

/// Every record starts with this header so the reader can validate it before
/// reinterpreting any bytes: `kind` selects the payload type, `len` is the size
/// of the whole record (header included) as the kernel program wrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: u16,
    pub len: u16,
    /// Bumped when a payload layout changes incompatibly.
    pub version: u16,
    pub _pad: u16,
    /// `bpf_ktime_get_ns()` at the event (CLOCK_MONOTONIC); userspace converts it to wall time once.
    pub ktime_ns: u64,
}
crate::assert_size!(RecordHeader, 16);

/// Record kinds. Zero is never valid so a zeroed buffer does not decode.
pub mod kind {
    pub const OOM_KILL: u16 = 1;
    pub const TCP_CONNECT_FAILURE: u16 = 2;
}

/// Probe identifiers: the index of a probe's slot in the shared counter map.
pub mod probe_id {
    pub const OOM: u32 = 0;
    pub const MEMCG: u32 = 1;
    pub const TCP: u32 = 2;
    /// Number of probe slots.
    pub const COUNT: u32 = 4;
}

/// Per-probe counters kept in the kernel (`COUNTERS` per-CPU array, index
/// `probe * counter::SLOTS + counter`).
pub mod counter {
    /// Records handed to the transport successfully.
    pub const EMITTED: u32 = 0;
    /// `bpf_perf_event_output` failed: the CPU's buffer was full.
    pub const LOST_BUFFER_FULL: u32 = 1;
    /// An in-kernel aggregation or state map had no room for a new key.
    pub const LOST_MAP_FULL: u32 = 2;
    /// A per-CPU scratch slot could not be looked up (should never happen).
    pub const LOST_NO_SCRATCH: u32 = 3;
    /// The end of something was seen without its start (e.g. a connect that found no free
    /// slot in the connect table), so it could not be counted.
    pub const LOST_UNTRACKED: u32 = 4;
    pub const SLOTS: u32 = 8;

    pub const fn index(probe: u32, counter: u32) -> u32 {
        probe * SLOTS + counter
    }
}

/// Size of the `COUNTERS` map.
pub const COUNTER_ENTRIES: u32 = probe_id::COUNT * counter::SLOTS;

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]`, integers only with an explicit padding field, so every bit pattern
    // is valid and there are no implicit holes.
    unsafe impl aya::Pod for super::RecordHeader {}
}
