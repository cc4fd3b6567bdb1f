//! The OOM probe's configuration section (`probes.oom`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{probe::HookKind, serde_duration as duration};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OomConfig {
    pub enabled: bool,
    /// Hooks never to use for this probe (e.g. `[fentry]` on a kernel with a trampoline bug).
    pub exclude_hooks: Vec<HookKind>,
    /// The per-workload memory history each kill's lead-up and verdict are computed from.
    pub history: HistoryConfig,
    /// `oom_imminent` warns when a workload's steady growth would reach the limit that binds
    /// it within this time (0s: never).
    #[serde(with = "duration")]
    pub imminent_horizon: Duration,
}

/// Default `probes.oom.imminent_horizon`.
pub const IMMINENT_HORIZON: Duration = Duration::from_secs(60);

/// `probes.oom.history`: how often each watched memory cgroup is sampled and for how long the
/// samples are kept (memory: about 56 bytes per sample, `window / interval` samples per workload).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    pub enabled: bool,
    #[serde(with = "duration")]
    pub interval: Duration,
    #[serde(with = "duration")]
    pub window: Duration,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            enabled: true,
            interval: Duration::from_secs(2),
            window: Duration::from_secs(600),
        }
    }
}

impl HistoryConfig {
    /// Samples kept per workload.
    pub fn capacity(&self) -> usize {
        let n = self.window.as_secs_f64() / self.interval.as_secs_f64().max(1e-3);
        (n.ceil() as usize).saturating_add(1)
    }
}

impl Default for OomConfig {
    fn default() -> Self {
        OomConfig {
            enabled: true,
            exclude_hooks: Vec::new(),
            history: HistoryConfig::default(),
            imminent_horizon: IMMINENT_HORIZON,
        }
    }
}

/// Most samples one workload may keep (bounds memory whatever the configuration says).
pub const MAX_SAMPLES: usize = 10_000;

impl crate::probe::Section for OomConfig {
    crate::section_switches!();

    /// The history must sample at least every 100 ms apart and keep a bounded number of samples.
    fn validate(&self) -> Result<(), (String, String)> {
        let h = &self.history;
        if h.interval < Duration::from_millis(100) {
            return Err((".history.interval".into(), "must be at least 100ms".into()));
        }
        if h.window < h.interval {
            return Err((".history.window".into(), "must be at least the interval".into()));
        }
        if h.capacity() > MAX_SAMPLES {
            return Err((
                ".history.window".into(),
                format!("window / interval must be at most {MAX_SAMPLES} samples"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::Section as _;

    #[test]
    fn history_bounds() {
        let mut c = OomConfig::default();
        assert_eq!(c.history.capacity(), 301);
        assert!(c.validate().is_ok());
        c.history.interval = Duration::from_millis(10);
        assert_eq!(c.validate().unwrap_err().0, ".history.interval");
        c.history.interval = Duration::from_secs(1);
        c.history.window = Duration::from_secs(100_000);
        assert_eq!(c.validate().unwrap_err().0, ".history.window");
    }
}
