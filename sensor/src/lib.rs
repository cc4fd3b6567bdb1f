//! The sensor daemon: kernel probes in, Prometheus metrics and events out.
//!
//! Layout follows the data path: `kernel` (what the host offers) -> `loader` (attach with the
//! best hook) -> `transport` (per-CPU rings) -> `decode` -> `dispatch` -> per-signal slices
//! (`oom`, ...) -> `metrics` / `events` -> `http`.

pub mod agg;
pub mod alloc;
pub mod cgroup;
pub mod checks;
pub mod config;
pub mod decode;
pub mod dispatch;
pub mod doctor;
pub mod events;
pub mod expo;
pub mod gate;
pub mod health;
pub mod http;
pub mod journal;
pub mod kernel;
pub mod kernel_log;
pub mod loader;
pub mod logging;
pub mod memcg;
pub mod metrics;
pub mod oom;
pub mod probe;
pub mod probes;
pub mod progstats;
pub mod remediate;
pub mod run;
pub mod serde_duration;
pub mod sync;
pub mod tcp;
pub mod top;
pub mod transport;
pub mod web;
pub mod webconfig;
pub mod workloads;
pub mod yaml;
