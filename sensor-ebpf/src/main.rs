//! Kernel programs of the sensor. One module per signal; `transport` and `agg` are shared.
#![no_std]
#![no_main]
// `core::intrinsics::atomic_cxchg`: the BPF target has no `AtomicU64::compare_exchange`
// (`atomic_cas` is off for it), yet LLVM emits BPF_CMPXCHG (kernel 5.12+).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod agg;
mod memcg;
mod oom;
mod task;
mod tcp;
mod transport;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible: `bpf_probe_read_kernel`, `bpf_get_stack` and perf output are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
