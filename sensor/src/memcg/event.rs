//! The memcg event: a pressure crossing (a PSI trigger that fired).

use serde::Serialize;

/// A pressure crossing, as exported in events.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PressureEvent {
    pub time: f64,
    /// `null` for the host.
    pub cgroup: Option<String>,
    pub level: &'static str,
    pub stall_seconds: f64,
    pub window_seconds: f64,
    /// The file's averages right after the crossing.
    pub avg10: Option<f64>,
    pub avg60: Option<f64>,
}
