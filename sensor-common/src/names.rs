//! The names of the eBPF object's maps and of the read-only globals the daemon sets before
//! loading. The kernel side declares statics of exactly these names (`#[map]` takes the
//! static's name); the daemon refers to them only through these constants, and a test of the
//! daemon checks both lists against the embedded object, both ways: a misspelt or renamed map
//! fails the tests, not a start in production.

/// Maps (each a `#[map]` static of sensor-ebpf).
pub mod maps {
    pub const EVENTS: &str = "EVENTS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const ZERO_HIST: &str = "ZERO_HIST";
    pub const OOM_CONFIG: &str = "OOM_CONFIG";
    pub const OOM_CTX: &str = "OOM_CTX";
    pub const OOM_CTX_SCRATCH: &str = "OOM_CTX_SCRATCH";
    pub const OOM_SCRATCH: &str = "OOM_SCRATCH";
    pub const RECLAIM_HIST: &str = "RECLAIM_HIST";
    pub const RECLAIM_START: &str = "RECLAIM_START";
    pub const TCP_CONNS: &str = "TCP_CONNS";
    pub const TCP_CONNS_NX: &str = "TCP_CONNS_NX";
    pub const TCP_COUNTS: &str = "TCP_COUNTS";
    pub const TCP_DEST_ANY: &str = "TCP_DEST_ANY";
    pub const TCP_DEST_PORT: &str = "TCP_DEST_PORT";
    pub const TCP_HISTS: &str = "TCP_HISTS";
    pub const TCP_HOST_COUNTS: &str = "TCP_HOST_COUNTS";
    pub const TCP_RECOVERED: &str = "TCP_RECOVERED";
    pub const TCP_ZERO_HISTS: &str = "TCP_ZERO_HISTS";
    /// aya-log's ring (the kernel-side log, `kernel_log: true`).
    pub const AYA_LOGS: &str = "AYA_LOGS";

    /// Every map of the object.
    pub const ALL: &[&str] = &[
        EVENTS,
        COUNTERS,
        ZERO_HIST,
        OOM_CONFIG,
        OOM_CTX,
        OOM_CTX_SCRATCH,
        OOM_SCRATCH,
        RECLAIM_HIST,
        RECLAIM_START,
        TCP_CONNS,
        TCP_CONNS_NX,
        TCP_COUNTS,
        TCP_DEST_ANY,
        TCP_DEST_PORT,
        TCP_HISTS,
        TCP_HOST_COUNTS,
        TCP_RECOVERED,
        TCP_ZERO_HISTS,
        AYA_LOGS,
    ];
}

/// Read-only globals the daemon overrides at load (layouts read from this kernel's BTF or
/// tracefs, the log level).
pub mod globals {
    pub const TASK_LAYOUT: &str = "TASK_LAYOUT";
    pub const MARK_VICTIM_LAYOUT: &str = "MARK_VICTIM_LAYOUT";
    pub const OOM_CONTROL_LAYOUT: &str = "OOM_CONTROL_LAYOUT";
    pub const TCP_TP_LAYOUT: &str = "TCP_TP_LAYOUT";
    pub const SOCK_LAYOUT: &str = "SOCK_LAYOUT";
    /// aya-log's level switch.
    pub const AYA_LOG_LEVEL: &str = "AYA_LOG_LEVEL";

    /// Every global the daemon sets.
    pub const ALL: &[&str] = &[
        TASK_LAYOUT,
        MARK_VICTIM_LAYOUT,
        OOM_CONTROL_LAYOUT,
        TCP_TP_LAYOUT,
        SOCK_LAYOUT,
        AYA_LOG_LEVEL,
    ];
}
