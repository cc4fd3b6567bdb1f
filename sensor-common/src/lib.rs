//! Types shared by the kernel programs (`sensor-ebpf`) and the daemon (`sensor`).
//!
//! Everything here is `#[repr(C)]` with explicit padding so both sides agree on the
//! byte layout; the size asserts fail the build if a field change breaks that.
#![no_std]

pub mod agg;
pub mod memcg;
pub mod names;
pub mod oom;
pub mod record;
pub mod task;
pub mod tcp;

/// Asserts at compile time that a shared type has the size the other side expects.
#[macro_export]
macro_rules! assert_size {
    ($t:ty, $n:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $n);
    };
}
