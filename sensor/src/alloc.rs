//! The process's allocator is mimalloc (the `#[global_allocator]` of `main.rs`), tuned for a
//! daemon that is idle most of the time. Measurements: docs/footprint.md.

use std::ffi::c_long;

// Links mimalloc's C library into every binary of this crate (tests included), which the
// declarations below need.
extern crate mimalloc as _;

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (the same index in v2 and v3; the
/// crate's bindings leave this one out).
const MI_OPTION_PURGE_DELAY: i32 = 15;

extern "C" {
    fn mi_option_set(option: i32, value: c_long);
    fn mi_option_get(option: i32) -> c_long;
    fn mi_collect(force: bool);
}

/// Freed memory goes back to the kernel at once. mimalloc's default delay (1 s) only expires
/// on a later allocation, which an idle daemon does not make: the memory start-up freed (the
/// parsed kernel BTF) stayed resident, 7 MB more RSS (measured). Call before anything else.
pub fn configure() {
    // SAFETY: sets an integer option of mimalloc's; valid at any time, from any thread.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
}

/// The purge delay in force (for tests and the footprint note).
pub fn purge_delay_ms() -> i64 {
    // SAFETY: reads an integer option of mimalloc's.
    #[allow(clippy::useless_conversion)] // c_long is i32 on some targets
    i64::from(unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) })
}

/// Hands what is free inside the allocator back to the kernel, e.g. once start-up is over.
pub fn release_free_memory() {
    // SAFETY: mi_collect only walks mimalloc's own heaps and touches no memory of ours.
    unsafe { mi_collect(true) }
}

#[cfg(test)]
mod tests {
    /// The index names the purge delay: its default (unless MIMALLOC_PURGE_DELAY is set) is
    /// mimalloc v3's 1000 ms, and setting it reads back.
    #[test]
    fn purge_delay_option_is_the_purge_delay() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(super::purge_delay_ms(), 1000);
        }
        super::configure();
        assert_eq!(super::purge_delay_ms(), 0);
    }
}
