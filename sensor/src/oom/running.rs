//! The running OOM probe: each kill attributed, explained (lead-up, verdict, the limit that
//! fired) and counted; the cross-check against the kernel's own counters; the history and the
//! warnings before a kill.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use prometheus::{GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use sensor_common::oom::{field, OomKillRecord};

use super::{
    config, down,
    event::{AsJson, OomKill, UNKNOWN_CGROUP},
    history,
    history::History,
    imminent, limit, pending,
    scope::{Scope, ScopeResolver},
    series::Series,
    verdict,
};
use crate::{
    activity::ReclaimTimes,
    cgroup::{with_names, Discovery, Hierarchies, WorkloadSet, WORKLOAD_LABELS},
    events::EventHub,
    kernel::clock,
    probe::Running,
    sync::Lock as _,
};

/// Kernel-side OOM kill counts the sensor checks itself against.
pub(super) fn vmstat_oom_kill() -> Option<u64> {
    procfs::vmstat()
        .ok()?
        .get("oom_kill")
        .and_then(|v| u64::try_from(*v).ok())
}

/// A memory cgroup's own (non-hierarchical) kill count: `memory.events.local` on v2,
/// `memory.oom_control` on v1 (local there).
pub(super) fn cgroup_oom_kills(h: &Hierarchies, cgroup: &str) -> Option<u64> {
    let dir = h.memory_dir(cgroup)?;
    let file = if h.memory_is_v1() {
        "memory.oom_control"
    } else {
        "memory.events.local"
    };
    let text = std::fs::read_to_string(dir.join(file)).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

pub(super) struct CrossCheck {
    pub(super) vmstat_base: Option<u64>,
    /// Kernel counter at the sensor's start for cgroups that existed then.
    pub(super) cgroup_base: HashMap<String, u64>,
    /// Kills the sensor attributed per cgroup.
    pub(super) seen: HashMap<String, u64>,
    /// Every kill the sensor saw (`seen` loses the cgroups that vanish).
    pub(super) seen_total: u64,
    /// Last computed differences; a positive one is only published when it persists.
    pub(super) last: HashMap<String, i64>,
    /// The labels each cgroup's gauge carries (its names may arrive after its first refresh).
    pub(super) labelled: HashMap<String, crate::cgroup::WorkloadLabels>,
    /// What the last refresh set the discrepancy gauges to: `(source, cgroup, value)`.
    pub(super) shown: Vec<(&'static str, String, i64)>,
}

/// Userspace half of the OOM slice: turns records into metrics, events and log lines.
pub struct OomSlice {
    pub(super) kills: IntCounterVec,
    pub(super) victim_rss: HistogramVec,
    pub(super) last_kill: GaugeVec,
    pub(super) discrepancy: GaugeVec,
    pub(super) scopes: Option<ScopeResolver>,
    pub(super) cgroups: Hierarchies,
    /// The kill series' bounded set, held through the registry (whose rescans release it).
    pub(super) workloads: Arc<Mutex<WorkloadSet>>,
    /// The label values of each workload's series (see `series`).
    pub(super) series: Mutex<Series>,
    /// Reclaim time per workload, from the memcg probe (a kill's lead-up).
    pub(super) reclaim: Arc<ReclaimTimes>,
    pub(super) cross: Mutex<CrossCheck>,
    pub(super) host_seen: AtomicU64,
    pub(super) hub: Arc<EventHub>,
    pub(super) disc: Arc<Discovery>,
    pub(super) history_cfg: config::HistoryConfig,
    pub(super) history: Mutex<History>,
    /// When the history was last sampled and the cross-check last refreshed (upkeep runs at the
    /// shorter of the two intervals).
    pub(super) due: Mutex<(Option<Instant>, Option<Instant>)>,
    /// When the host's largest memory users were last read, and them.
    pub(super) host_top: Mutex<(Option<Instant>, Vec<history::MemUser>)>,
    /// Itself, for the task that counts a kill once its container is named.
    pub(super) me: std::sync::OnceLock<std::sync::Weak<OomSlice>>,
    pub(super) boot_id: String,
    /// The kernel counters last saved in the journal (kills while down, see `down`).
    pub(super) saved: Mutex<down::Expected>,
    /// Limit counters of every memory cgroup as last seen (which limit a kill hit).
    pub(super) limits: Mutex<limit::Baselines>,
    /// Kills being handled off the reader, waited for at shutdown.
    pub(super) pending: pending::Pending,
    /// `oom_imminent` warnings (see `imminent`): state, `sensor_oom_imminent`, the horizon.
    pub(super) warnings: Mutex<imminent::Warnings>,
    pub(super) imminent_gauge: GaugeVec,
    pub(super) imminent_horizon: Duration,
}

impl OomSlice {
    /// `scopes` classifies kills from their stacks where the context hook is missing (read from
    /// kallsyms before the programs attach, so starting is quick).
    pub fn new(
        registry: &Registry,
        hub: Arc<EventHub>,
        workloads_per_metric: usize,
        scopes: Option<ScopeResolver>,
        disc: Arc<Discovery>,
        history_cfg: config::HistoryConfig,
        reclaim: Arc<ReclaimTimes>,
    ) -> prometheus::Result<OomSlice> {
        let mut labels = vec!["scope", "reason"];
        labels.extend(WORKLOAD_LABELS);
        labels.extend(OWNER_LABELS);
        let kills = IntCounterVec::new(
            Opts::new("sensor_oom_kills_total", "OOM kills by scope (memcg: a memory cgroup hit its limit; global: the host ran out), the verdict of the kill's lead-up (reason: growth, spike, limit, host, repeat, unknown), victim workload and its pod's owner (owner_kind, owner)."),
            &labels,
        )?;
        let victim_rss = HistogramVec::new(
            HistogramOpts::new(
                "sensor_oom_kill_victim_rss_bytes",
                "Resident memory (anon + file + shmem) of OOM-killed tasks.",
            )
            .buckets(prometheus::exponential_buckets(1024.0 * 1024.0, 4.0, 10)?),
            &WORKLOAD_LABELS,
        )?;
        let last_kill = GaugeVec::new(
            Opts::new(
                "sensor_oom_kill_last_timestamp_seconds",
                "Time of the last OOM kill in the workload.",
            ),
            &WORKLOAD_LABELS,
        )?;
        let mut dlabels = vec!["source"];
        dlabels.extend(WORKLOAD_LABELS);
        let discrepancy = GaugeVec::new(
            Opts::new(
                "sensor_oom_kills_unseen",
                "Kernel-counted OOM kills minus kills the sensor saw since it started: source=vmstat for the host (/proc/vmstat oom_kill), source=memcg per cgroup (memory.events.local / memory.oom_control). 0 when they agree.",
            ),
            &dlabels,
        )?;
        registry.register(Box::new(kills.clone()))?;
        registry.register(Box::new(victim_rss.clone()))?;
        registry.register(Box::new(last_kill.clone()))?;
        registry.register(Box::new(discrepancy.clone()))?;
        let imminent_gauge = GaugeVec::new(
            Opts::new(
                "sensor_oom_imminent",
                "1 while the workload's steady memory growth would reach the limit that binds it within probes.oom.imminent_horizon (see the oom_imminent event); absent otherwise.",
            ),
            &WORKLOAD_LABELS,
        )?;
        registry.register(Box::new(imminent_gauge.clone()))?;
        discrepancy
            .with_label_values(&["vmstat", "", "", "", "", "", ""])
            .set(0.0);
        // The discovery's view of the hierarchies, read once at start.
        let cgroups = disc.hier.clone();
        let cross = CrossCheck {
            vmstat_base: vmstat_oom_kill(),
            cgroup_base: snapshot_cgroup_counters(&cgroups, 20_000),
            seen: HashMap::new(),
            seen_total: 0,
            last: HashMap::new(),
            labelled: HashMap::new(),
            shown: Vec::new(),
        };
        let history = History::with_left_out(
            history_cfg.capacity(),
            workloads_per_metric,
            disc.left_out_metrics().for_set("oom_history"),
        );
        let boot_id = down::boot_id();
        let saved = down::on_start(&hub, &cross, &boot_id);
        let limits = limit::Baselines::snapshot(&cgroups, limit::KEPT);
        Ok(OomSlice {
            kills,
            victim_rss,
            last_kill,
            discrepancy,
            scopes,
            cgroups,
            workloads: disc.bounded_set("oom_kills"),
            series: Mutex::new(Series::default()),
            reclaim,
            cross: Mutex::new(cross),
            host_seen: AtomicU64::new(0),
            hub,
            disc,
            history: Mutex::new(history),
            history_cfg,
            due: Mutex::new((None, None)),
            host_top: Mutex::new((None, Vec::new())),
            me: std::sync::OnceLock::new(),
            boot_id,
            saved: Mutex::new(saved),
            limits: Mutex::new(limits),
            pending: pending::Pending::default(),
            warnings: Mutex::new(imminent::Warnings::default()),
            imminent_gauge,
            imminent_horizon: config::IMMINENT_HORIZON,
        })
    }

    /// Saves the kernel counters as they should read now, if they changed.
    fn save_counters(&self) {
        let c = self.cross.locked();
        let mut saved = self.saved.locked();
        down::checkpoint(&self.hub, &c, &self.boot_id, &mut saved);
    }

    /// Handles a kill on a blocking thread (it reads cgroup files: the victim's path by id,
    /// the limit that fired, the lead-up), never on the ring reader.
    pub fn handle_kill(&self, rec: &OomKillRecord) {
        if let (Some(me), Ok(rt)) = (
            self.me.get().and_then(std::sync::Weak::upgrade),
            tokio::runtime::Handle::try_current(),
        ) {
            let rec = *rec;
            let held = self.pending.hold();
            rt.spawn_blocking(move || me.process_kill(&rec, held));
            return;
        }
        self.process_kill(rec, self.pending.hold());
    }

    fn process_kill(&self, rec: &OomKillRecord, held: pending::Held) {
        let frames = (rec.stack_bytes as usize / 8).min(rec.stack.len());
        let stack = if rec.present & field::STACK != 0 {
            &rec.stack[..frames]
        } else {
            &[][..]
        };
        if let Some(s) = &self.scopes {
            if !s.is_kill(stack) {
                tracing::info!(
                    victim_pid = rec.victim_pid,
                    "task already exiting was marked as OOM victim; not a kill"
                );
                return;
            }
        }
        let mut kill = OomKill::from_record(rec, self.scopes.as_ref(), Some(&self.cgroups));
        let cg = kill.cgroup.clone().unwrap_or_else(|| UNKNOWN_CGROUP.to_string());
        let binding = limit::find_binding(
            &self.cgroups,
            &self.limits,
            kill.cgroup.as_deref(),
            kill.oom_memcg_id,
            kill.scope == Scope::Global || kill.constraint.is_some_and(|c| c != "memcg"),
            kill.scope == Scope::Memcg,
        );
        kill.limit_cgroup = binding.as_ref().and_then(|b| b.cgroup.clone());
        kill.limit_scope = binding.as_ref().map(|b| b.scope);
        if self.history_cfg.enabled {
            let l = self.lead_up(&kill, &cg, binding.as_ref());
            kill.reason = l.reason;
            kill.lead_up = Some(l);
        }
        // A kill is activity: its workload outranks idle members of the kill series' set.
        self.disc.note_active(&cg);
        let rank = self.disc.rank(&cg);
        let (base, displaced) = self.workloads.locked().labels_ranked(&cg, rank);
        if let Some(d) = displaced {
            self.drop_series(&d);
        }
        // A container never seen before (it started and was killed between two rescans):
        // its names are looked up first, on a task, never here on the reader. The kill is
        // counted once they come, or after NAME_WAIT without them.
        let unseen = self
            .disc
            .resolver()
            .filter(|r| !base[1].is_empty() && r.cached(&base[1]).is_none());
        if let (Some(r), Some(me), Ok(rt)) = (
            unseen,
            self.me.get().and_then(std::sync::Weak::upgrade),
            tokio::runtime::Handle::try_current(),
        ) {
            let r = Arc::clone(r);
            rt.spawn(async move {
                let names = r.resolve(&base[1], NAME_WAIT).await;
                me.count_kill(kill, cg, base, &names);
                drop(held);
            });
            return;
        }
        let names = self.disc.names(&base[1]);
        self.count_kill(kill, cg, base, &names);
        drop(held);
    }

    /// Counts, logs and publishes a kill with its workload's names.
    fn count_kill(&self, mut kill: OomKill, cg: String, base: [String; 3], names: &crate::workloads::Names) {
        kill.names = names.clone();
        let wl = with_names(base, names);
        let wl_ref: [&str; 6] = std::array::from_fn(|i| wl[i].as_str());
        let mut kill_labels = vec![kill.scope.label(), kill.reason.label()];
        kill_labels.extend(wl_ref);
        kill_labels.extend([names.owner_kind.as_str(), names.owner.as_str()]);
        self.kills.with_label_values(&kill_labels).inc();
        {
            let mut s = self.series.locked();
            s.note_kill(&kill_labels);
            s.note_workload(&wl);
        }
        if let Some(rss) = kill.rss_bytes() {
            self.victim_rss.with_label_values(&wl_ref).observe(rss as f64);
        }
        self.host_seen.fetch_add(1, Ordering::Relaxed);
        // Held until the event is published: a saved expectation (`down`) counts a kill
        // exactly when the event comes before it in the journal.
        let mut cross = self.cross.locked();
        {
            let c = &mut *cross;
            *c.seen.entry(cg).or_insert(0) += 1;
            c.seen_total += 1;
            // Rings of different CPUs may deliver kills out of time order: keep the latest.
            // Under the lock, so two readers cannot interleave the compare and the set.
            let last = self.last_kill.with_label_values(&wl_ref);
            if kill.time > last.get() {
                last.set(kill.time);
            }
        }
        // The kill as the event API serves it: a field added to `OomKill` is logged with it.
        tracing::info!(target: "sensor::oom", event = "oom_kill", kill = %AsJson(&kill), "OOM kill");
        self.hub.publish_as("oom_kill", &kill);
        drop(cross);
    }

    /// The kill's lead-up from the bounded history plus one fresh read of the victim cgroup's
    /// counters (a handful of small files; the kill path walks nothing).
    fn lead_up(&self, kill: &OomKill, cg: &str, binding: Option<&limit::Binding>) -> verdict::LeadUp {
        let (samples, earlier) = {
            let mut h = self.history.locked();
            (h.before(cg, kill.time), h.note_kill(cg, kill.time))
        };
        let after = (kill.cgroup.is_some())
            .then(|| {
                let now = clock::unix_seconds(std::time::SystemTime::now());
                history::read_sample(&self.cgroups, cg, now, self.reclaim.of(cg))
            })
            .flatten();
        let global = kill.scope == Scope::Global;
        let host_available = global.then(history::host_memory).flatten().map(|(_, a)| a);
        let host_top = if global {
            self.host_top.locked().1.clone()
        } else {
            Vec::new()
        };
        verdict::lead_up(&verdict::Input {
            time: kill.time,
            scope: kill.scope,
            interval: self.history_cfg.interval.as_secs_f64(),
            samples: &samples,
            after,
            limit: binding.and_then(|b| b.limit_bytes).or(kill.memory_limit_bytes),
            victim_rss: kill.rss_bytes(),
            earlier_kills: &earlier,
            host_available,
            host_top: &host_top,
            binding,
        })
    }

    /// Samples every watched memory cgroup into the history: at most
    /// `limits.workloads_per_metric`, the most active first (see `admission`); vanished
    /// cgroups leave it.
    pub fn sample_history(&self) {
        let ranked = self.disc.ranked();
        let watched: Vec<&str> = {
            let mut h = self.history.locked();
            let live: std::collections::HashSet<&str> = ranked.iter().map(|(c, _)| c.as_str()).collect();
            h.retain(|c| live.contains(c));
            ranked
                .iter()
                .filter(|(c, r)| h.admit(c, *r))
                .map(|(c, _)| c.as_str())
                .collect()
        };
        let now = clock::unix_seconds(std::time::SystemTime::now());
        let read: Vec<(&str, history::Sample)> = watched
            .into_iter()
            .filter_map(|cg| history::read_sample(&self.cgroups, cg, now, self.reclaim.of(cg)).map(|s| (cg, s)))
            .collect();
        self.sample_host();
        let mut h = self.history.locked();
        for (cg, s) in read {
            h.record(cg, s);
        }
    }

    /// The host's largest memory users for global kills: every tick while `MemAvailable` is
    /// under a quarter of `MemTotal` (when a global kill is near), else every [`HOST_TOP_EVERY`].
    fn sample_host(&self) {
        let low = history::host_memory().is_some_and(|(total, avail)| avail < total / 4);
        let mut t = self.host_top.locked();
        if low || t.0.is_none_or(|at| at.elapsed() >= HOST_TOP_EVERY) {
            t.1 = history::top_users(HOST_TOP_USERS);
            t.0 = Some(Instant::now());
        }
    }

    /// Recomputes the cross-check gauges and drops series of cgroups gone past the grace period.
    pub fn refresh(&self) {
        let mut c = self.cross.locked();
        let host = match (vmstat_oom_kill(), c.vmstat_base) {
            (Some(now), Some(base)) => now.saturating_sub(base) as i64 - self.host_seen.load(Ordering::Relaxed) as i64,
            _ => 0,
        };
        let mut diffs: Vec<(String, i64)> = vec![(String::new(), host)];
        let keys: Vec<String> = c.seen.keys().cloned().collect();
        for cg in keys {
            let Some(now) = cgroup_oom_kills(&self.cgroups, &cg) else {
                continue;
            };
            let base = c.cgroup_base.get(&cg).copied().unwrap_or(0);
            let seen = c.seen.get(&cg).copied().unwrap_or(0);
            diffs.push((cg, now.saturating_sub(base) as i64 - seen as i64));
        }
        c.shown.clear();
        for (cg, d) in diffs {
            // The kernel bumps its counters just before the tracepoint fires; a difference that
            // is still there one refresh later is real.
            let prev = c.last.insert(cg.clone(), d).unwrap_or(0);
            let shown = if d > 0 { d.min(prev.max(0)) } else { d };
            let source = if cg.is_empty() { "vmstat" } else { "memcg" };
            c.shown.push((source, cg.clone(), shown));
            if cg.is_empty() {
                self.discrepancy
                    .with_label_values(&["vmstat", "", "", "", "", "", ""])
                    .set(shown as f64);
            } else {
                let mut w = self.workloads.locked();
                let l = self.disc.named(w.labels(&cg));
                drop(w);
                if let Some(old) = c.labelled.get(&cg).filter(|old| **old != l) {
                    let _ = self
                        .discrepancy
                        .remove_label_values(&["memcg", &old[0], &old[1], &old[2], &old[3], &old[4], &old[5]]);
                }
                self.discrepancy
                    .with_label_values(&["memcg", &l[0], &l[1], &l[2], &l[3], &l[4], &l[5]])
                    .set(shown as f64);
                self.series.locked().note_workload(&l);
                c.labelled.insert(cg, l);
            }
        }
        drop(c);
        // Members the registry's rescans found gone past the grace period.
        let expired = self.workloads.locked().take_expired();
        for cg in expired {
            self.drop_series(&cg);
        }
    }

    /// Drops the series of a workload that vanished or was displaced from the kill series' set.
    fn drop_series(&self, cg: &str) {
        // Whatever names its series carried (empty before the lookup ended, then named).
        let (kills, workloads) = self.series.locked().take(cg);
        for l in &kills {
            let l: Vec<&str> = l.iter().map(String::as_str).collect();
            let _ = self.kills.remove_label_values(&l);
        }
        for l in &workloads {
            let l: [&str; 6] = std::array::from_fn(|i| l[i].as_str());
            let _ = self.victim_rss.remove_label_values(&l);
            let _ = self.last_kill.remove_label_values(&l);
            let _ = self
                .discrepancy
                .remove_label_values(&["memcg", l[0], l[1], l[2], l[3], l[4], l[5]]);
        }
        {
            let mut c = self.cross.locked();
            c.labelled.remove(cg);
            c.seen.remove(cg);
            c.last.remove(cg);
            c.shown.retain(|(_, shown, _)| shown != cg);
        }
    }
}

/// The pod owner's labels on `sensor_oom_kills_total` (one owner has many pods: bounded by the
/// workload labels before them).
pub(super) const OWNER_LABELS: [&str; 2] = ["owner_kind", "owner"];

/// Longest a kill of a container never seen before waits for its names before it is counted
/// (without them).
pub(super) const NAME_WAIT: Duration = Duration::from_millis(750);

/// How often the cross-check against the kernel's counters is recomputed.
pub(super) const REFRESH: Duration = Duration::from_secs(2);

/// Largest memory users named in a global kill's lead-up.
pub(super) const HOST_TOP_USERS: usize = 5;
/// How often they are read while the host has memory to spare.
pub(super) const HOST_TOP_EVERY: Duration = Duration::from_secs(30);

impl Running for OomSlice {
    /// Kills still being handled are published before the journal closes.
    fn finish(&self) {
        if !self.pending.wait(Duration::from_secs(5)) {
            tracing::warn!("OOM kills still being handled at shutdown were not all published");
        }
    }

    fn handle(&self, _kind: u16, bytes: &[u8]) {
        match crate::decode::read::<OomKillRecord>(bytes) {
            Some(r) => self.handle_kill(&r),
            // The dispatcher checked the length; this cannot happen, but must not panic.
            None => tracing::error!(len = bytes.len(), "OOM record shorter than checked"),
        }
    }

    fn view(&self) -> Option<crate::probe::View> {
        Some(self.summary())
    }

    fn upkeep_interval(&self) -> Option<Duration> {
        if self.history_cfg.enabled {
            Some(REFRESH.min(self.history_cfg.interval))
        } else {
            Some(REFRESH)
        }
    }

    /// Samples the history and refreshes the cross-check, each when its own interval is due.
    fn upkeep(&self) {
        let now = Instant::now();
        // A little early counts as due: upkeep ticks jitter around the interval.
        let due =
            |last: Option<Instant>, every: Duration| last.is_none_or(|t| now.duration_since(t) + every / 10 >= every);
        let (sample, refresh) = {
            let mut d = self.due.locked();
            let sample = self.history_cfg.enabled && due(d.0, self.history_cfg.interval);
            let refresh = due(d.1, REFRESH);
            if sample {
                d.0 = Some(now);
            }
            if refresh {
                d.1 = Some(now);
            }
            (sample, refresh)
        };
        if sample {
            self.sample_history();
            self.assess_imminent();
        }
        if refresh {
            self.refresh();
            self.save_counters();
        }
    }
}

/// Every existing memory cgroup's own kill counter at start, so per-cgroup cross-checks count
/// only kills since the sensor started.
pub(super) fn snapshot_cgroup_counters(h: &Hierarchies, limit: usize) -> HashMap<String, u64> {
    crate::cgroup::walk(h, limit)
        .into_iter()
        .filter_map(|(rel, _)| cgroup_oom_kills(h, &rel).map(|n| (rel, n)))
        .collect()
}
