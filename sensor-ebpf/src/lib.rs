//! Exists so that `sensor`'s build script can depend on this crate (cargo then rebuilds the
//! daemon when the kernel programs change). The programs themselves live in the `sensor` binary
//! target, built for `bpfel-unknown-none`.
#![no_std]
