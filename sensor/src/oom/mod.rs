//! OOM kills: the probe. Its parts: `hooks` (the ladder), `layout` (kernel offsets), `config`,
//! `event` (a kill as published), `running` (attribution, explanation, counting), `history`
//! (the bounded lead-up), `verdict` (why), `limit` (which limit fired), `imminent` (the warning
//! before a kill), `down` (kills while the sensor was down), `view` (its part of the web summary), `scope`,
//! `pending`, `series` (each workload's series, dropped when it leaves the kill series' set).

pub mod config;

pub mod down;

pub mod event;

pub mod hooks;

pub mod history;

pub mod layout;

pub mod limit;

pub mod imminent;
mod pending;

pub mod running;

pub mod scope;

mod series;

pub mod verdict;

mod view;

pub use event::{OomKill, UNKNOWN_CGROUP};
pub use hooks::SPEC;
pub use layout::{mark_victim_layout, oom_control_layout, Layouts};
pub use running::OomSlice;
pub use scope::{Scope, ScopeResolver};

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{
    probe::{KernelContext, LoadPlan, Probe, ProbeSpec, Running, Section, StartContext, StartError},
    sync::Lock as _,
};

/// The OOM probe: victim fields from `oom:mark_victim`, its cgroup from the raw tracepoint, the
/// kill's context from `oom_kill_process`; one record per kill.
pub struct OomProbe {
    cfg: config::OomConfig,
    /// Read in `prepare` (before attaching), taken by `start`.
    scopes: Mutex<Option<ScopeResolver>>,
}

impl OomProbe {
    pub fn new(cfg: config::OomConfig) -> OomProbe {
        OomProbe {
            cfg,
            scopes: Mutex::new(None),
        }
    }
}

/// How often the history asks for a rescan of the memory hierarchy (new workloads).
const HISTORY_DISCOVERY: Duration = Duration::from_secs(10);

impl Probe for OomProbe {
    fn spec(&self) -> &'static ProbeSpec {
        &SPEC
    }

    fn section(&self) -> &dyn Section {
        &self.cfg
    }

    fn prepare(&self, kctx: &KernelContext, plan: &mut LoadPlan) {
        let mut layouts = Layouts::discover(kctx);
        layouts.notes.extend(plan.task_note.clone());

        for n in &layouts.notes {
            tracing::warn!(note = %n, "OOM layout is partial");
        }
        layouts.apply(plan);
        if self.cfg.enabled {
            let scopes = ScopeResolver::from_kallsyms()
                .map_err(|e| tracing::warn!(error = %e, "OOM scope classification from stacks unavailable"))
                .ok();
            *self.scopes.locked() = scopes;
        }
    }

    /// The history follows new and vanished workloads, and the registry's rescans release the
    /// kill series' vanished workloads (history or not).
    fn discovery_interval(&self) -> Option<Duration> {
        Some(HISTORY_DISCOVERY)
    }

    fn start(&self, ctx: &mut StartContext<'_>) -> Result<Arc<dyn Running>, StartError> {
        let scopes = self.scopes.locked().take();
        let slice = OomSlice::new(
            ctx.registry,
            Arc::clone(ctx.hub),
            ctx.workloads_per_metric,
            scopes,
            Arc::clone(ctx.discovery),
            self.cfg.history.clone(),
            Arc::clone(ctx.reclaim),
        )?;
        let slice = Arc::new(OomSlice {
            imminent_horizon: self.cfg.imminent_horizon,
            ..slice
        });
        let _ = slice.me.set(Arc::downgrade(&slice));
        Ok(slice)
    }
}
