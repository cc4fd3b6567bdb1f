//! Memory-cgroup pressure: PSI (host and, on cgroup v2, per workload) with kernel triggers,
//! reclaim stalls from the vmscan tracepoints (aggregated in the kernel), and `memory.events`
//! (or the nearest v1 equivalents) per workload.

pub mod config;

pub mod files;

pub mod psi;

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{MapData, PerCpuHashMap};
use prometheus::{
    core::{Collector, Desc},
    proto::{self, MetricFamily, MetricType},
    IntCounterVec, Opts, Registry,
};
use serde::Serialize;
use tokio::sync::watch;

use self::config::{MemcgConfig, PsiTrigger};
use crate::{
    agg::{HistFamily, HistLayout, HistogramMapCollector},
    cgroup::{Discovery, Hierarchies, Janitor, WorkloadLabels, OTHER, WORKLOAD_LABELS},
    events::EventHub,
    kernel::clock,
    metrics::{counter_metric, family, Shared},
    probe::{
        DoctorSection, HookGroup, HookKind, HookSpec, KernelContext, LoadPlan, Probe, ProbeSpec, Running, StartContext,
        StartError,
    },
    sync::Lock as _,
};
use sensor_common::names::maps;

/// Reclaim stalls need both ends of each reclaim; each end is its own hook group.
pub const SPEC: ProbeSpec = ProbeSpec {
    name: "memcg",
    counter_id: sensor_common::record::probe_id::MEMCG,
    groups: &[
        HookGroup {
            purpose: "memcg reclaim start",
            required: true,
            hooks: &[HookSpec {
                kind: HookKind::Tracepoint,
                program: "memcg_reclaim_begin",
                target: "vmscan/mm_vmscan_memcg_reclaim_begin",
                check: None,
            }],
        },
        HookGroup {
            purpose: "memcg reclaim end",
            required: true,
            hooks: &[HookSpec {
                kind: HookKind::Tracepoint,
                program: "memcg_reclaim_end",
                target: "vmscan/mm_vmscan_memcg_reclaim_end",
                check: None,
            }],
        },
        HookGroup {
            purpose: "direct reclaim start",
            required: true,
            hooks: &[HookSpec {
                kind: HookKind::Tracepoint,
                program: "direct_reclaim_begin",
                target: "vmscan/mm_vmscan_direct_reclaim_begin",
                check: None,
            }],
        },
        HookGroup {
            purpose: "direct reclaim end",
            required: true,
            hooks: &[HookSpec {
                kind: HookKind::Tracepoint,
                program: "direct_reclaim_end",
                target: "vmscan/mm_vmscan_direct_reclaim_end",
                check: None,
            }],
        },
    ],
    configure: None,
};

pub const HOST_PSI: &str = "/proc/pressure/memory";

/// What this host offers for memory pressure, for `doctor`.
#[derive(Debug, Clone, Serialize)]
pub struct Sources {
    pub host_psi: bool,
    pub cgroup_psi: bool,
    pub memory_events: &'static str,
    pub notes: Vec<String>,
}

pub fn sources(h: &Hierarchies) -> Sources {
    let mut notes = Vec::new();
    let host_psi = psi::read(Path::new(HOST_PSI)).is_some();
    if !host_psi {
        notes.push(format!(
            "{HOST_PSI} unreadable: the kernel lacks CONFIG_PSI or booted with psi=0"
        ));
    }
    let cgroup_psi = !h.memory_is_v1() && h.memory_root().is_some() && host_psi;
    if h.memory_is_v1() {
        notes.push(
            "the memory controller is on cgroup v1 (v1 or hybrid host): per-cgroup PSI does not exist there; host PSI and the eBPF reclaim histograms still work, and memory.events comes from memory.failcnt and memory.oom_control"
                .to_string(),
        );
    }
    let memory_events = if h.memory_root().is_none() {
        "unavailable (no memory cgroup hierarchy mounted)"
    } else if h.memory_is_v1() {
        "cgroup v1: memory.failcnt + memory.memsw.failcnt (as event=\"max\") and memory.oom_control oom_kill"
    } else {
        "cgroup v2: memory.events"
    };
    Sources {
        host_psi,
        cgroup_psi,
        memory_events,
        notes,
    }
}

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

const WAITING: &str = "sensor_memory_pressure_waiting_seconds_total";
const WAITING_HELP: &str =
    "Time some tasks waited on memory (PSI some total); host without workload labels, per workload on cgroup v2.";
const STALLED: &str = "sensor_memory_pressure_stalled_seconds_total";
const STALLED_HELP: &str = "Time all non-idle tasks were stalled on memory at once (PSI full total); host without workload labels, per workload on cgroup v2.";
const EVENTS: &str = "sensor_memcg_events_total";
const EVENTS_HELP: &str = "memory.events counters per workload (low, high, max, oom, oom_kill, oom_group_kill); on cgroup v1 max = memory.failcnt + memory.memsw.failcnt and oom_kill from memory.oom_control.";

/// Renders PSI totals and memory.events per workload from the background refresh's snapshot
/// (see [`files`]); only the host's PSI file is read at scrape time.
struct FileCollector {
    disc: Arc<Discovery>,
    cache: Arc<files::FileCache>,
    descs: Vec<Desc>,
}

fn labelled(labels: Vec<(&str, String)>, mut m: proto::Metric) -> proto::Metric {
    m.set_label(
        labels
            .into_iter()
            .map(|(k, v)| {
                let mut lp = proto::LabelPair::default();
                lp.set_name(k.to_string());
                lp.set_value(v);
                lp
            })
            .collect(),
    );
    m
}

/// PSI totals per label key and event counts per `(label key, event)`: workloads folded into
/// `other` share a key, so their values add up.
type Sums<K> = (
    foldhash::HashMap<K, (u64, u64)>,
    foldhash::HashMap<(K, &'static str), u64>,
);

fn sums<K: std::hash::Hash + Eq + Clone>(snap: &files::Snapshot, key: impl Fn(&str) -> K) -> Sums<K> {
    let mut psi_sum: foldhash::HashMap<K, (u64, u64)> = foldhash::HashMap::default();
    let mut ev_sum: foldhash::HashMap<(K, &'static str), u64> = foldhash::HashMap::default();
    for (cg, v) in &snap.values {
        let l = key(cg);
        if let Some((some, full)) = v.psi {
            let e = psi_sum.entry(l.clone()).or_default();
            e.0 += some;
            e.1 += full;
        }
        for (event, n) in &v.events {
            *ev_sum.entry((l.clone(), event)).or_default() += n;
        }
    }
    (psi_sum, ev_sum)
}

/// Seconds since the snapshot's refresh started.
fn age(snap: &files::Snapshot) -> f64 {
    snap.at.map_or(0.0, |t| t.elapsed().as_secs_f64())
}

impl Collector for FileCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if crate::expo::write(|w| self.write_text(w)) {
            return Vec::new();
        }
        let mut waiting = Vec::new();
        let mut stalled = Vec::new();
        if let Some(p) = psi::read(Path::new(HOST_PSI)) {
            waiting.push(labelled(vec![], counter_metric(p.some.total_us as f64 / 1e6)));
            if let Some(f) = p.full {
                stalled.push(labelled(vec![], counter_metric(f.total_us as f64 / 1e6)));
            }
        }
        let snap = self.cache.snapshot();
        let (psi_sum, ev_sum) = sums(&snap, |cg| self.disc.labels(cg));
        let wl = |l: &WorkloadLabels| {
            WORKLOAD_LABELS
                .iter()
                .zip(l.iter())
                .map(|(k, v)| (*k, v.clone()))
                .collect::<Vec<_>>()
        };
        for (l, (some, full)) in psi_sum {
            waiting.push(labelled(wl(&l), counter_metric(some as f64 / 1e6)));
            stalled.push(labelled(wl(&l), counter_metric(full as f64 / 1e6)));
        }
        let mut events = Vec::new();
        for ((l, event), v) in ev_sum {
            let mut labels = vec![("event", event.to_string())];
            labels.extend(wl(&l));
            events.push(labelled(labels, counter_metric(v as f64)));
        }
        let mk = |name: &str, help: &str, metrics: Vec<proto::Metric>| {
            let mut mf = family(name, help, MetricType::COUNTER, &[], Vec::new());
            mf.set_metric(metrics);
            mf
        };
        let age = family(
            files::AGE,
            files::AGE_HELP,
            MetricType::GAUGE,
            &[],
            vec![(vec![], crate::metrics::gauge_metric(age(&snap)))],
        );
        vec![
            mk(WAITING, WAITING_HELP, waiting),
            mk(STALLED, STALLED_HELP, stalled),
            mk(EVENTS, EVENTS_HELP, events),
            age,
        ]
    }
}

/// The reclaim histogram's label fragment: none (per host) or the workload's.
fn reclaim_text_labels(disc: Arc<Discovery>) -> crate::agg::TextLabelFn<u64> {
    let empty: Arc<str> = Arc::from("");
    Box::new(move |id: &u64, kept: usize| {
        let wl = if kept == 0 {
            Arc::clone(&empty)
        } else {
            disc.label_text_for_id(*id)
        };
        Some([wl, Arc::clone(&empty)])
    })
}

impl FileCollector {
    /// The families as exposition text (see `expo`): label fragments rendered once per
    /// workload, values summed per fragment (workloads folded into `other` share one).
    fn write_text(&self, w: &mut crate::expo::Writer) {
        let host = psi::read(Path::new(HOST_PSI));
        let snap = self.cache.snapshot();
        let (psi_sum, ev_sum) = sums(&snap, |cg| self.disc.label_text(cg));
        let mut psi_rows: Vec<(Arc<str>, (u64, u64))> = psi_sum.into_iter().collect();
        psi_rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut f = w.family(WAITING, WAITING_HELP, "counter");
        if let Some(p) = host {
            f.float(&[], p.some.total_us as f64 / 1e6);
        }
        for (l, (some, _)) in &psi_rows {
            f.float(&[l], *some as f64 / 1e6);
        }
        let mut f = w.family(STALLED, STALLED_HELP, "counter");
        if let Some(full) = host.and_then(|p| p.full) {
            f.float(&[], full.total_us as f64 / 1e6);
        }
        for (l, (_, full)) in &psi_rows {
            f.float(&[l], *full as f64 / 1e6);
        }
        let mut rows: Vec<((&'static str, Arc<str>), u64)> =
            ev_sum.into_iter().map(|((l, event), v)| ((event, l), v)).collect();
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut f = w.family(EVENTS, EVENTS_HELP, "counter");
        for ((event, l), v) in rows {
            f.int(&[event_frag(event), &l], v);
        }
        w.family(files::AGE, files::AGE_HELP, "gauge").float(&[], age(&snap));
    }
}

/// `event="..."` fragments of `memory_events`' names.
fn event_frag(event: &str) -> &'static str {
    match event {
        "low" => "event=\"low\"",
        "high" => "event=\"high\"",
        "max" => "event=\"max\"",
        "oom" => "event=\"oom\"",
        "oom_kill" => "event=\"oom_kill\"",
        _ => "event=\"oom_group_kill\"",
    }
}

const RECLAIM_TOTAL: &str = "sensor_memcg_reclaim_seconds_total";
const RECLAIM_TOTAL_HELP: &str = "Time tasks spent in direct or memcg reclaim, by the stalled task's workload: the _sum of sensor_memcg_reclaim_duration_seconds per workload (whose buckets are per host by default; probes.memcg.reclaim_duration.per: workload keeps them per workload).";

/// `sensor_memcg_reclaim_seconds_total{<workload labels>}`: one series per workload that went
/// through reclaim, from the same kernel map (read once per scrape) as the histogram.
struct ReclaimTotals {
    hist: Arc<HistogramMapCollector<u64>>,
    disc: Arc<Discovery>,
    desc: Vec<Desc>,
}

impl ReclaimTotals {
    /// Nanoseconds per key, for keys that counted something.
    fn totals(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let snap = self.hist.snapshot_shared();
        let totals: Vec<(u64, u64)> = snap
            .iter()
            .filter(|(_, [h])| h.buckets.iter().any(|&b| b != 0))
            .map(|(id, [h])| (*id, h.sum))
            .collect();
        totals.into_iter()
    }

    /// Nanoseconds of retired keys (vanished workloads folded into `other`) by the labels they
    /// had: the counter never goes down when their kernel keys are deleted.
    fn retired(&self) -> Vec<(WorkloadLabels, u64)> {
        self.hist
            .retired()
            .into_iter()
            .filter(|(_, [h])| h.buckets.iter().any(|&b| b != 0))
            .map(|(l, [h])| (crate::cgroup::workload_labels_from(&l), h.sum))
            .collect()
    }

    fn write_text(&self, w: &mut crate::expo::Writer) {
        let mut sums: foldhash::HashMap<Arc<str>, u64> = foldhash::HashMap::default();
        for (id, ns) in self.totals() {
            *sums.entry(self.disc.label_text_for_id(id)).or_default() += ns;
        }
        for (l, ns) in self.retired() {
            *sums.entry(crate::cgroup::render_labels(&l)).or_default() += ns;
        }
        let mut rows: Vec<(Arc<str>, u64)> = sums.into_iter().collect();
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut f = w.family(RECLAIM_TOTAL, RECLAIM_TOTAL_HELP, "counter");
        for (l, ns) in rows {
            f.float(&[&l], ns as f64 / 1e9);
        }
    }
}

impl Collector for ReclaimTotals {
    fn desc(&self) -> Vec<&Desc> {
        self.desc.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if crate::expo::write(|w| self.write_text(w)) {
            return Vec::new();
        }
        let mut sums: HashMap<WorkloadLabels, u64> = HashMap::new();
        for (id, ns) in self.totals() {
            *sums.entry(self.disc.labels_for_id(id)).or_default() += ns;
        }
        for (l, ns) in self.retired() {
            *sums.entry(l).or_default() += ns;
        }
        let series = sums
            .into_iter()
            .map(|(l, ns)| (l.to_vec(), counter_metric(ns as f64 / 1e9)))
            .collect();
        vec![family(
            RECLAIM_TOTAL,
            RECLAIM_TOTAL_HELP,
            MetricType::COUNTER,
            &WORKLOAD_LABELS,
            series,
        )]
    }
}

/// The userspace half of the memcg probe.
pub struct MemcgSlice {
    disc: Arc<Discovery>,
    /// Per-workload cgroup file values, refreshed after each rescan.
    files: Arc<files::FileCache>,
    cfg: MemcgConfig,
    pressure_events: IntCounterVec,
    hub: Arc<EventHub>,
    reclaim: Option<Arc<HistogramMapCollector<u64>>>,
    /// Per-cgroup trigger stoppers (cgroup v2 only).
    triggers: Mutex<HashMap<String, watch::Sender<bool>>>,
    /// Deletes reclaim map keys of vanished cgroups after the grace period.
    janitor: Mutex<Janitor<u64>>,
    grace: Duration,
}

impl MemcgSlice {
    pub fn new(
        registry: &Registry,
        hub: Arc<EventHub>,
        cfg: MemcgConfig,
        disc: Arc<Discovery>,
        grace: Duration,
        reclaim_map: Option<PerCpuHashMap<MapData, u64, [sensor_common::agg::Log2Hist; 1]>>,
    ) -> prometheus::Result<Arc<MemcgSlice>> {
        let descs = [
            (WAITING, WAITING_HELP),
            (STALLED, STALLED_HELP),
            (EVENTS, EVENTS_HELP),
            (files::AGE, files::AGE_HELP),
        ]
        .into_iter()
        .map(|(n, h)| Desc::new(n.into(), h.into(), vec![], Default::default()))
        .collect::<prometheus::Result<Vec<_>>>()?;
        let cache = Arc::new(files::FileCache::new(Arc::clone(&disc))?);
        registry.register(Box::new(cache.failures_metric()))?;
        registry.register(Box::new(FileCollector {
            disc: Arc::clone(&disc),
            cache: Arc::clone(&cache),
            descs,
        }))?;
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
                )?
                .with_text_labels(reclaim_text_labels(Arc::clone(&disc))));
                registry.register(Box::new(Shared(Arc::clone(&c))))?;
                registry.register(Box::new(ReclaimTotals {
                    hist: Arc::clone(&c),
                    disc: Arc::clone(&disc),
                    desc: vec![Desc::new(
                        RECLAIM_TOTAL.into(),
                        RECLAIM_TOTAL_HELP.into(),
                        WORKLOAD_LABELS.iter().map(|l| (*l).to_string()).collect(),
                        Default::default(),
                    )?],
                }))?;
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
            janitor: Mutex::new(Janitor::default()),
            grace,
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
            self.disc.set_reclaim_ns(totals.iter().copied());
            let keys: Vec<u64> = totals.into_iter().map(|(k, _)| k).collect();
            let expired = {
                let mut j = self.janitor.locked();
                j.sweep(keys, |id| *id == 0 || self.disc.is_live(*id), self.grace)
            };
            for id in expired {
                r.remove(&id);
                self.disc.forget(id);
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

    fn enabled(&self) -> bool {
        self.cfg.enabled
    }

    fn excluded_hooks(&self) -> &[HookKind] {
        &self.cfg.exclude_hooks
    }

    fn prepare(&self, kctx: &KernelContext, plan: &mut LoadPlan) {
        if let Some(note) = plan.task_layout(kctx) {
            tracing::debug!(%note, "memcg: reclaim stalls are attributed without the task layout");
        }
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
            Arc::clone(ctx.hub),
            self.cfg.clone(),
            Arc::clone(ctx.discovery),
            ctx.vanished_grace,
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

/// The running memcg slice: host triggers at start, per-workload ones after each rescan.
struct MemcgRunning(Arc<MemcgSlice>);

impl Running for MemcgRunning {
    fn spawn(&self, stop: watch::Receiver<bool>) -> Vec<tokio::task::JoinHandle<()>> {
        self.0.start(stop);
        Vec::new()
    }

    fn after_discovery(&self, stop: &watch::Receiver<bool>) {
        self.0.after_rescan(stop);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The memory.events families written as text equal the crate encoder's output for the
    /// same files (a v1 layout in a temporary directory: pure file parsing), and two cgroups
    /// folded into `other` are one series.
    #[test]
    fn events_text_equals_the_encoders() {
        let root = std::env::temp_dir().join(format!("sensor-scrape-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (cg, failcnt, kills) in [("a", 3, 1), ("b\"q", 5, 0), ("c", 7, 2)] {
            let d = root.join(cg);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("memory.failcnt"), format!("{failcnt}\n")).unwrap();
            std::fs::write(
                d.join("memory.oom_control"),
                format!("oom_kill_disable 0\nunder_oom 0\noom_kill {kills}\n"),
            )
            .unwrap();
        }
        let hier = Hierarchies {
            memory_v1: Some(root.clone()),
            unified: None,
        };
        // Two workloads per family: the third folds into `other`.
        let disc = Arc::new(Discovery::new(hier, 2, Duration::from_secs(60)));
        let c = FileCollector {
            cache: Arc::new(files::FileCache::new(Arc::clone(&disc)).unwrap()),
            disc,
            descs: Vec::new(),
        };
        let mut want = String::new();
        // The cache's age differs between two calls: compared apart.
        let proto: Vec<MetricFamily> = c
            .collect()
            .into_iter()
            .filter(|f| !f.get_metric().is_empty() && f.name() != files::AGE)
            .collect();
        // The registry sorts series by label values; so does the text.
        let mut sorted = proto.clone();
        for f in &mut sorted {
            f.mut_metric().sort_by(|a, b| {
                let v = |m: &proto::Metric| m.get_label().iter().map(|l| l.value().to_string()).collect::<Vec<_>>();
                v(a).cmp(&v(b))
            });
        }
        prometheus::TextEncoder::new().encode_utf8(&sorted, &mut want).unwrap();
        let ((), chunks) = crate::expo::capture(|| assert!(c.collect().is_empty()));
        let got: String = chunks
            .iter()
            .filter(|c| c.series > 0 && c.name != files::AGE)
            .map(|c| format!("{}{}", c.header, c.body))
            .collect();
        let age = chunks.iter().find(|c| c.name == files::AGE).expect("the age gauge");
        assert!(age.body.starts_with("sensor_memcg_cache_age_seconds "), "{}", age.body);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(got, want);
        assert!(got.contains("sensor_memcg_events_total{event=\"max\",cgroup=\"/a\",container_id=\"\",pod_uid=\"\",namespace=\"\",pod=\"\",container=\"\"} 3\n"), "{got}");
        assert!(got.contains("cgroup=\"/b\\\"q\""), "escaped: {got}");
        assert!(
            got.contains("sensor_memcg_events_total{event=\"oom_kill\",cgroup=\"other\""),
            "{got}"
        );
    }

    #[test]
    fn v1_and_v2_sources_are_described() {
        let v1 = Hierarchies {
            memory_v1: Some("/sys/fs/cgroup/memory".into()),
            unified: Some("/sys/fs/cgroup/unified".into()),
        };
        let s = sources(&v1);
        assert!(!s.cgroup_psi);
        assert!(s.notes.iter().any(|n| n.contains("per-cgroup PSI does not exist")));
        assert!(s.memory_events.contains("memory.failcnt"));
        let v2 = Hierarchies {
            memory_v1: None,
            unified: Some("/sys/fs/cgroup".into()),
        };
        assert!(sources(&v2).memory_events.contains("memory.events"));
    }
}
