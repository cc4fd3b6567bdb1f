//! What `/api/v1/checks` serves and `sensor top` shows.

use std::collections::BTreeMap;

use serde::Serialize;

use super::vantage::VantageView;

/// What `/api/v1/checks` serves and `sensor top` shows.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ChecksReport {
    pub generated_at: f64,
    /// Where this sensor probes from and what it leaves to others (absent from older sensors).
    #[serde(default)]
    pub vantage: VantageView,
    pub alerting: AlertingView,
    pub checks: Vec<CheckView>,
    /// Oldest first, bounded by `alerting.history`.
    pub alerts: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct AlertingView {
    pub availability_threshold: f64,
    pub window_seconds: f64,
    pub min_samples: usize,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct CheckView {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub url: String,
    pub interval_seconds: f64,
    pub up: Option<bool>,
    pub alert_firing: bool,
    pub last: Option<serde_json::Value>,
    /// "10m", "1h" and "alert" (the alerting window).
    pub windows: BTreeMap<String, serde_json::Value>,
    pub stream: Option<serde_json::Value>,
}
