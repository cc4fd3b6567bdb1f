//! Synthetic HTTP and websocket checks: the outside view next to the kernel's inside view.
//!
//! Each check runs in its own tokio task (a hanging target only ever delays itself), starts at
//! a per-check offset inside its interval (1,000 checks do not fire at once), and feeds a ring of
//! recent results from which windows, alerts and `/api/v1/checks` are computed.

pub mod alert;
pub mod config;
pub mod conn;
pub mod engine;
pub mod history;
pub mod http;
pub mod metrics;
pub mod once;
pub mod report;
pub mod runtime;
pub mod vantage;
pub mod ws;

pub use engine::Engine;
pub use once::{render_results, run_all_once, run_once};
pub use report::{AlertingView, CheckView, ChecksReport};
pub use runtime::{CheckRuntime, Prepared, RunResult, StreamState, WindowSnapshot, WsStats};

pub fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The short and long windows of the dashboard and `sensor_check_availability_ratio`.
pub const SHORT_WINDOW: f64 = 600.0;
pub const LONG_WINDOW: f64 = 3600.0;
