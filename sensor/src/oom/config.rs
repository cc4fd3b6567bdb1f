//! The OOM probe's configuration section (`probes.oom`).

use serde::{Deserialize, Serialize};

use crate::probe::HookKind;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OomConfig {
    pub enabled: bool,
    /// Hooks never to use for this probe (e.g. `[fentry]` on a kernel with a trampoline bug).
    pub exclude_hooks: Vec<HookKind>,
}

impl Default for OomConfig {
    fn default() -> Self {
        OomConfig {
            enabled: true,
            exclude_hooks: Vec::new(),
        }
    }
}

impl OomConfig {
    /// Nothing beyond what serde checks; here for symmetry with the other probes.
    pub fn validate(&self) -> Result<(), (String, String)> {
        Ok(())
    }
}
