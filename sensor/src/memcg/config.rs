//! The memcg probe's configuration section (`probes.memcg`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{
    agg::{ByHost, HistogramConfig, Per},
    probe::HookKind,
    serde_duration as duration,
};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MemcgConfig {
    pub enabled: bool,
    pub exclude_hooks: Vec<HookKind>,
    /// PSI thresholds: crossing one raises a pressure event for the host and, on cgroup v2,
    /// for each workload.
    pub psi_triggers: Vec<PsiTrigger>,
    /// How often the memory cgroup hierarchy is rescanned for new and vanished workloads.
    #[serde(with = "duration")]
    pub discovery_interval: Duration,
    /// `sensor_memcg_reclaim_duration_seconds`: labels kept (`host`, the default, or
    /// `workload`) and buckets. Each workload's reclaim time is
    /// `sensor_memcg_reclaim_seconds_total` either way.
    pub reclaim_duration: HistogramConfig<ByHost>,
}

impl Default for MemcgConfig {
    fn default() -> Self {
        MemcgConfig {
            enabled: true,
            exclude_hooks: Vec::new(),
            psi_triggers: vec![
                PsiTrigger {
                    level: PsiLevel::Some,
                    stall: Duration::from_secs(1),
                    window: Duration::from_secs(10),
                },
                PsiTrigger {
                    level: PsiLevel::Full,
                    stall: Duration::from_millis(500),
                    window: Duration::from_secs(10),
                },
            ],
            discovery_interval: Duration::from_secs(5),
            reclaim_duration: HistogramConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum PsiLevel {
    /// Some tasks stalled on memory.
    Some,
    /// All non-idle tasks stalled at once.
    Full,
}

impl PsiLevel {
    pub fn label(self) -> &'static str {
        match self {
            PsiLevel::Some => "some",
            PsiLevel::Full => "full",
        }
    }
}

/// Fires when tasks stalled for `stall` within a `window` (the kernel allows 500ms..10s windows).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PsiTrigger {
    pub level: PsiLevel,
    #[serde(with = "duration")]
    pub stall: Duration,
    #[serde(with = "duration")]
    pub window: Duration,
}

impl crate::probe::Section for MemcgConfig {
    crate::section_switches!();

    /// Checks serde cannot express; the error is (key path below `probes.memcg`, reason).
    fn validate(&self) -> Result<(), (String, String)> {
        for (i, t) in self.psi_triggers.iter().enumerate() {
            let key = format!(".psi_triggers[{i}]");
            if t.window < Duration::from_millis(500) || t.window > Duration::from_secs(10) {
                return Err((key, "window must be between 500ms and 10s (a kernel limit)".into()));
            }
            if t.stall.is_zero() || t.stall >= t.window {
                return Err((key, "stall must be positive and shorter than the window".into()));
            }
        }
        self.reclaim_duration
            .validate(&[Per::Workload, Per::Host])
            .map_err(|(k, r)| (format!(".reclaim_duration{k}"), r))?;
        if self.discovery_interval < Duration::from_millis(100) {
            return Err((".discovery_interval".into(), "must be at least 100ms".into()));
        }
        Ok(())
    }
}
