//! What the running kernel offers: release, privileges, tracefs, BTF and BPF feature probes.

pub mod btf;
pub mod clock;
pub mod context;
pub mod features;
pub mod insn;
pub mod privileges;
pub mod reasons;
pub mod seccomp;
pub mod task;
pub mod tracefs;

/// `uname -r` of the running kernel.
pub fn release() -> String {
    // procfs parses this into numbers only; the string (with its distribution suffix) is
    // what users recognise.
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}
