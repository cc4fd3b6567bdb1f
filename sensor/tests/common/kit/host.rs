//! Facts about the host the tests and benches run on.

/// True under CI (`CI=true` or `CI=1`): what a test needs and lacks fails it there instead of
/// skipping it.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The kernel's count of OOM kills since boot (`oom_kill` in /proc/vmstat; 0 where missing).
pub fn vmstat_oom_kill() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// This process's effective capabilities (a bit per capability number).
pub fn cap_eff() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}
