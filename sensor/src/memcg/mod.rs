//! Memory-cgroup pressure: PSI (host and, on cgroup v2, per workload) with kernel triggers,
//! reclaim stalls from the vmscan tracepoints (aggregated in the kernel), and `memory.events`
//! (or the nearest v1 equivalents) per workload.

pub mod config;

pub mod event;

pub mod files;

pub mod hooks;

pub mod metrics;

pub mod psi;

pub mod running;

mod view;

pub use event::PressureEvent;
pub use hooks::SPEC;
pub use psi::{sources, Sources, HOST_PSI};
pub use running::MemcgSlice;

use std::{sync::Arc, time::Duration};

use aya::maps::{MapData, PerCpuHashMap};
use sensor_common::names::maps;

use self::{config::MemcgConfig, running::MemcgRunning};
use crate::{
    cgroup::Hierarchies,
    probe::{DoctorSection, Probe, ProbeSpec, Running, Section, StartContext, StartError},
};

/// The memcg probe: reclaim stalls from the vmscan tracepoints, PSI triggers, memory.events.
pub struct MemcgProbe {
    cfg: MemcgConfig,
}

impl MemcgProbe {
    pub fn new(cfg: MemcgConfig) -> MemcgProbe {
        MemcgProbe { cfg }
    }
}

impl Probe for MemcgProbe {
    fn spec(&self) -> &'static ProbeSpec {
        &SPEC
    }

    fn section(&self) -> &dyn Section {
        &self.cfg
    }

    /// The cgroupfs half (memory.events, PSI) runs whether or not the reclaim programs attached.
    fn start(&self, ctx: &mut StartContext<'_>) -> Result<Arc<dyn Running>, StartError> {
        let reclaim = if ctx.report.state.running() {
            Some(ctx.take_map::<PerCpuHashMap<MapData, u64, [sensor_common::agg::Log2Hist; 1]>>(maps::RECLAIM_HIST)?)
        } else {
            None
        };
        let slice = MemcgSlice::new(
            ctx.registry,
            ctx.sources,
            Arc::clone(ctx.hub),
            self.cfg.clone(),
            Arc::clone(ctx.discovery),
            Arc::clone(ctx.reclaim),
            reclaim,
        )?;
        Ok(Arc::new(MemcgRunning(slice)))
    }

    fn discovery_interval(&self) -> Option<Duration> {
        Some(self.cfg.discovery_interval)
    }

    fn doctor(&self, hier: &Hierarchies) -> Option<DoctorSection> {
        let m = sources(hier);
        let yes_no = |ok: bool, what: &str| if ok { format!("yes ({what})") } else { "NO".to_string() };
        Some(DoctorSection {
            key: "memory_pressure",
            title: "memory pressure",
            json: serde_json::to_value(&m).unwrap_or_default(),
            lines: vec![
                ("host PSI".into(), yes_no(m.host_psi, HOST_PSI)),
                ("per-cgroup PSI".into(), yes_no(m.cgroup_psi, "memory.pressure")),
                ("memory.events".into(), m.memory_events.to_string()),
            ],
            notes: m.notes,
        })
    }
}
