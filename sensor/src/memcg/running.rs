//! The running memcg probe: the files' snapshot refreshed after each rescan, PSI triggers per
//! workload, reclaim time handed to the OOM probe's lead-up.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::maps::{MapData, PerCpuHashMap};
use prometheus::{IntCounterVec, Opts, Registry};
use tokio::sync::watch;

use super::{
    config,
    config::{MemcgConfig, PsiTrigger},
    event::PressureEvent,
    files,
    metrics::{reclaim_text_labels, FileCollector, ReclaimTotals},
    psi,
    psi::HOST_PSI,
};
use crate::{
    activity::ReclaimTimes,
    agg::{HistFamily, HistLayout, HistogramMapCollector},
    cgroup::{Discovery, OTHER, WORKLOAD_LABELS},
    events::EventHub,
    expo::{Source, Sources},
    kernel::clock,
    probe::Running,
    sync::Lock as _,
};

/// The userspace half of the memcg probe.
pub struct MemcgSlice {
    pub(super) disc: Arc<Discovery>,
    /// Per-workload cgroup file values, refreshed after each rescan.
    pub(super) files: Arc<files::FileCache>,
    cfg: MemcgConfig,
    pressure_events: IntCounterVec,
    hub: Arc<EventHub>,
    pub(super) reclaim: Option<Arc<HistogramMapCollector<u64>>>,
    /// Host PSI of the last 10 minutes, for the web summary.
    pub(super) psi: super::view::PsiHistory,
    /// Per-cgroup trigger stoppers (cgroup v2 only).
    triggers: Mutex<HashMap<String, watch::Sender<bool>>>,
    /// Each workload's reclaim time, published for other probes after each rescan.
    reclaim_times: Arc<ReclaimTimes>,
}

impl MemcgSlice {
    pub fn new(
        registry: &Registry,
        sources: &Sources,
        hub: Arc<EventHub>,
        cfg: MemcgConfig,
        disc: Arc<Discovery>,
        reclaim_times: Arc<ReclaimTimes>,
        reclaim_map: Option<PerCpuHashMap<MapData, u64, [sensor_common::agg::Log2Hist; 1]>>,
    ) -> prometheus::Result<Arc<MemcgSlice>> {
        let cache = Arc::new(files::FileCache::new(Arc::clone(&disc))?);
        registry.register(Box::new(cache.failures_metric()))?;
        sources.add(Arc::new(FileCollector {
            disc: Arc::clone(&disc),
            cache: Arc::clone(&cache),
        }));
        let pressure_events = IntCounterVec::new(
            Opts::new(
                "sensor_memory_pressure_events_total",
                "PSI threshold crossings (one per pressure episode), host and workloads, by level.",
            ),
            &["level"],
        )?;
        registry.register(Box::new(pressure_events.clone()))?;
        for l in ["some", "full"] {
            pressure_events.with_label_values(&[l]).reset();
        }
        let reclaim = match reclaim_map {
            Some(map) => {
                let d = Arc::clone(&disc);
                let c = Arc::new(HistogramMapCollector::new(
                    [HistFamily {
                        name: "sensor_memcg_reclaim_duration_seconds",
                        help: "Time tasks spent in direct or memcg reclaim, by the stalled task's memory cgroup (aggregated in the kernel; labels and buckets per probes.memcg.reclaim_duration).",
                        layout: HistLayout::nanos_as_seconds(&cfg.reclaim_duration.buckets)
                            .map_err(prometheus::Error::Msg)?,
                        labels: cfg.reclaim_duration.kept_labels(&WORKLOAD_LABELS, false),
                    }],
                    &WORKLOAD_LABELS,
                    map,
                    Box::new(move |id: &u64| Some(d.labels_for_id(*id).to_vec())),
                )
                .with_text_labels(reclaim_text_labels(Arc::clone(&disc))));
                sources.add(Arc::clone(&c) as Arc<dyn Source>);
                sources.add(Arc::new(ReclaimTotals {
                    hist: Arc::clone(&c),
                    disc: Arc::clone(&disc),
                }));
                disc.note_retired("memcg_reclaim", 0);
                Some(c)
            }
            None => None,
        };
        Ok(Arc::new(MemcgSlice {
            disc,
            files: cache,
            cfg,
            pressure_events,
            hub,
            reclaim,
            triggers: Mutex::new(HashMap::new()),
            reclaim_times,
            psi: Default::default(),
        }))
    }

    fn fire(self: &Arc<Self>, cgroup: Option<String>, file: &Path, t: PsiTrigger) {
        self.pressure_events.with_label_values(&[t.level.label()]).inc();
        let p = psi::read(file);
        let line = p.map(|p| match t.level {
            config::PsiLevel::Some => p.some,
            config::PsiLevel::Full => p.full.unwrap_or_default(),
        });
        let ev = PressureEvent {
            time: clock::unix_seconds(std::time::SystemTime::now()),
            cgroup: cgroup.clone(),
            level: t.level.label(),
            stall_seconds: t.stall.as_secs_f64(),
            window_seconds: t.window.as_secs_f64(),
            avg10: line.map(|l| l.avg10),
            avg60: line.map(|l| l.avg60),
        };
        tracing::info!(
            target: "sensor::memcg",
            event = "memory_pressure",
            cgroup = cgroup.as_deref().unwrap_or("-"),
            level = ev.level,
            stall_seconds = ev.stall_seconds,
            window_seconds = ev.window_seconds,
            avg10 = ?ev.avg10,
            "memory pressure threshold crossed"
        );
        self.hub.publish_as("memory_pressure", &ev);
    }

    fn spawn_triggers(self: &Arc<Self>, file: PathBuf, cgroup: Option<String>, stop: watch::Receiver<bool>) {
        for t in self.cfg.psi_triggers.clone() {
            let me = Arc::clone(self);
            let cg = cgroup.clone();
            if let Err(e) = psi::spawn(file.clone(), t, stop.clone(), move |c| me.fire(cg.clone(), &c.file, t)) {
                tracing::warn!(error = %e, "PSI trigger not registered");
            }
        }
    }

    /// Starts the host triggers; per-workload ones follow discovery (see `after_rescan`).
    pub fn start(self: &Arc<Self>, stop: watch::Receiver<bool>) {
        if psi::read(Path::new(HOST_PSI)).is_some() {
            self.spawn_triggers(PathBuf::from(HOST_PSI), None, stop);
        }
    }

    /// Called after each rescan of the hierarchy (from the pipeline's maintenance task).
    pub fn after_rescan(self: &Arc<Self>, stop: &watch::Receiver<bool>) {
        // The discovery loop runs this on a blocking thread: the file reads scrapes no longer make.
        self.files.refresh();
        self.sync_cgroup_triggers(stop);
        if let Some(r) = &self.reclaim {
            // A vanished workload folded into `other`: its totals move into userspace at once.
            let folded: Vec<u64> = r
                .keys()
                .into_iter()
                .filter(|id| *id != 0 && self.disc.is_folded_vanished(*id))
                .collect();
            self.disc.note_retired("memcg_reclaim", r.retire(&folded));
            let mut totals = Vec::new();
            r.for_each(|k, h| totals.push((k, h[0].sum)));
            // Other probes read each workload's reclaim time (an OOM kill's lead-up).
            self.reclaim_times
                .publish(self.disc.by_live_path(totals.iter().copied()));
            // Ids the registry retired (gone past the grace period) lose their keys.
            let retired: HashSet<u64> = self.disc.retired().iter().copied().collect();
            for (id, _) in totals.iter().filter(|(id, _)| retired.contains(id)) {
                r.remove(id);
            }
        }
    }

    /// Per-workload triggers on cgroup v2: one set per admitted cgroup, removed when it vanishes.
    fn sync_cgroup_triggers(self: &Arc<Self>, stop: &watch::Receiver<bool>) {
        if self.disc.hier.memory_is_v1() || self.cfg.psi_triggers.is_empty() {
            return;
        }
        let cgroups = self.disc.cgroups();
        let current: HashSet<&String> = cgroups.iter().collect();
        let mut trig = self.triggers.locked();
        trig.retain(|cg, tx| {
            // Gone, or displaced from the label set by a more active cgroup.
            let keep = current.contains(cg) && self.disc.is_labelled(cg);
            if !keep {
                let _ = tx.send(true);
            }
            keep
        });
        for cg in cgroups.iter().filter(|c| c.as_str() != "/") {
            if trig.contains_key(cg) || self.disc.labels(cg)[0] == OTHER {
                continue;
            }
            let Some(file) = self.disc.hier.memory_dir(cg).map(|d| d.join("memory.pressure")) else {
                continue;
            };
            let (tx, rx) = watch::channel(false);
            // Stop with the daemon too.
            let mut global = stop.clone();
            let tx2 = tx.clone();
            tokio::spawn(async move {
                let _ = global.wait_for(|s| *s).await;
                let _ = tx2.send(true);
            });
            self.spawn_triggers(file, Some(cg.clone()), rx);
            trig.insert(cg.clone(), tx);
        }
    }
}

/// The running memcg slice: host triggers at start, per-workload ones after each rescan.
pub(super) struct MemcgRunning(pub(super) Arc<MemcgSlice>);

impl Running for MemcgRunning {
    fn spawn(&self, stop: watch::Receiver<bool>) -> Vec<tokio::task::JoinHandle<()>> {
        self.0.start(stop.clone());
        vec![super::view::spawn_sampler(Arc::clone(&self.0), stop)]
    }

    fn view(&self) -> Option<crate::probe::View> {
        Some(self.0.summary())
    }

    fn after_discovery(&self, stop: &watch::Receiver<bool>) {
        self.0.after_rescan(stop);
    }
}
