//! The part of the test kit that xtask shares (its benches, soak and test runner include this
//! folder with `#[path]`): the kernel lock and facts about the host, std and libc only, nothing
//! of a test harness, so one copy serves both.
#![allow(dead_code)]

pub mod host;
pub mod lock;
