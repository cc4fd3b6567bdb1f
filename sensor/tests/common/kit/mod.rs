//! The part of the test kit that xtask shares (its benches, soak and test runner include this
//! folder with `#[path]`): the kernel lock, facts about the host and the one Prometheus-text
//! reader; std and libc only, nothing of a test harness, so one copy serves both. Its own tests
//! are in tests.rs, which only xtask compiles.
#![allow(dead_code)]

pub mod cgroup;
pub mod host;
pub mod ids;
pub mod kernels;
pub mod lock;
pub mod promtext;
