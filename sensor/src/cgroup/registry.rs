//! The registry of workloads: the cgroups a rescan finds, their kernfs ids, the bounded label
//! set and its label text, activity ranks, and names from the runtimes.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use super::{
    hierarchies::{read_activity, walk, Hierarchies},
    identity::{render_labels, with_names, workload, WorkloadLabels, OTHER},
    retirement::{track_containers, Retirement},
    set::WorkloadSet,
};
use crate::{
    activity::{Reading, ReclaimTimes, Tracker},
    admission::{LeftOutMetrics, Rank},
    sync::Lock as _,
    workloads::{Names, Resolver},
};

/// The one registry of workloads, shared by every probe: the cgroups of the memory hierarchy,
/// their kernfs ids (what the kernel programs report), the bounded label set and the sets it
/// holds for probes, and the lifetime of vanished ids: its scheduled rescans retire each id
/// once, for every probe (see [`Self::retired`]).
pub struct Discovery {
    pub hier: Hierarchies,
    state: Mutex<Discovered>,
    workloads: Mutex<WorkloadSet>,
    /// The bounded sets probes hold through the registry (see [`Self::bounded_set`]).
    held: Mutex<Vec<Arc<Mutex<WorkloadSet>>>>,
    /// `limits.workloads_per_metric`.
    per_metric: usize,
    /// Reclaim times the activity ranks count, once the pipeline gave them.
    reclaim: OnceLock<Arc<ReclaimTimes>>,
    /// Names from the container runtimes, once the daemon set them up.
    resolver: OnceLock<Arc<Resolver>>,
    grace: Duration,
    /// `sensor_workload_keys_retired_total{map}` (registered by the daemon).
    retired: prometheus::IntCounterVec,
    /// Which cgroups are doing something (the bounded sets admit by it), from scheduled scans.
    activity: Mutex<Tracker>,
    /// `sensor_workloads_left_out{,_total}{set}` (registered by the daemon).
    left_out: LeftOutMetrics,
    /// Label text of each workload with series of its own, rendered once and kept until its
    /// names change or it leaves the set (see [`Self::label_text`]).
    label_texts: Mutex<HashMap<String, LabelText>>,
    /// The label text of every workload folded into `other`.
    other_text: Arc<str>,
}

/// A workload's label text and the names it was rendered with.
struct LabelText {
    container_id: String,
    names: Arc<Names>,
    text: Arc<str>,
}

#[derive(Default)]
struct Discovered {
    /// Paths relative to the hierarchy root, in walk order.
    cgroups: Vec<String>,
    /// kernfs id (= directory inode) -> path. Ids of vanished cgroups stay until retired (see
    /// [`Retirement`]).
    by_id: HashMap<u64, Known>,
    retirement: Retirement,
    live: HashSet<u64>,
    last_scan: Option<Instant>,
    /// Container ids of the cgroups seen, with when they were first seen gone.
    containers: HashMap<String, Option<Instant>>,
}

/// A cgroup id's path; once a rescan found it gone, when, and whether it had series of its own
/// then.
pub(super) struct Known {
    pub(super) path: String,
    pub(super) gone: Option<(Instant, bool)>,
}

fn retired_counter() -> prometheus::IntCounterVec {
    let opts = prometheus::Opts::new(
        "sensor_workload_keys_retired_total",
        "Kernel map keys of vanished workloads folded into cgroup=\"other\" (over limits.workloads_per_metric), deleted at the next rescan rather than after limits.vanished_grace; their counts stay in the other series.",
    );
    match prometheus::IntCounterVec::new(opts, &["map"]) {
        Ok(c) => c,
        // A static definition; a failure is a programming error the tests catch.
        Err(e) => panic!("sensor_workload_keys_retired_total: {e}"),
    }
}

/// Cgroups walked at most per scan.
const WALK_LIMIT: usize = 20_000;

impl Discovery {
    pub fn new(hier: Hierarchies, workloads_per_metric: usize, grace: Duration) -> Discovery {
        let left_out = LeftOutMetrics::new();
        let d = Discovery {
            hier,
            state: Mutex::new(Discovered::default()),
            held: Mutex::new(Vec::new()),
            per_metric: workloads_per_metric,
            reclaim: OnceLock::new(),
            workloads: Mutex::new(WorkloadSet::with_left_out(
                workloads_per_metric,
                grace,
                left_out.for_set("workload_labels"),
            )),
            activity: Mutex::new(Tracker::default()),
            left_out,
            resolver: OnceLock::new(),
            grace,
            retired: retired_counter(),
            label_texts: Mutex::new(HashMap::new()),
            other_text: render_labels(&with_names(
                [OTHER.to_string(), String::new(), String::new()],
                &Names::default(),
            )),
        };
        d.rescan();
        d
    }

    /// Names workloads through `r` from now on: every container already seen is looked up
    /// (in the background), and each new one as a rescan finds it.
    pub fn set_resolver(&self, r: Arc<Resolver>) {
        let ids: Vec<String> = self.state.locked().containers.keys().cloned().collect();
        for id in &ids {
            r.request(id);
        }
        let _ = self.resolver.set(r);
    }

    pub fn resolver(&self) -> Option<&Arc<Resolver>> {
        self.resolver.get()
    }

    /// The cached names of a container id, never waiting (a lookup starts for an id not seen
    /// before; empty names until it ends).
    pub fn names(&self, container_id: &str) -> Arc<Names> {
        match self.resolver.get() {
            Some(r) => r.names(container_id),
            None => Arc::default(),
        }
    }

    /// Path-derived labels plus the cached names of their container.
    pub fn named(&self, base: [String; 3]) -> WorkloadLabels {
        let n = self.names(&base[1]);
        with_names(base, &n)
    }

    /// Label values for a cgroup path (bounded: `other` when left out of the set).
    pub fn labels(&self, cgroup: &str) -> WorkloadLabels {
        let rank = self.rank(cgroup);
        let base = self.workloads.locked().labels_ranked(cgroup, rank).0;
        self.named(base)
    }

    /// Whether `cgroup` has series of its own in the label set (not folded into `other`).
    pub fn is_labelled(&self, cgroup: &str) -> bool {
        self.workloads.locked().contains(cgroup)
    }

    /// How much `cgroup` is worth watching now (see `admission`).
    pub fn rank(&self, cgroup: &str) -> Rank {
        self.activity.locked().rank(cgroup, Instant::now())
    }

    /// Every cgroup but the root with its rank, most worth watching first (walk order among
    /// equals).
    pub fn ranked(&self) -> Vec<(String, Rank)> {
        let cgroups = self.cgroups();
        let now = Instant::now();
        let mut out: Vec<(String, Rank)> = {
            let a = self.activity.locked();
            cgroups
                .into_iter()
                .filter(|c| c.as_str() != "/")
                .map(|c| {
                    let r = a.rank(&c, now);
                    (c, r)
                })
                .collect()
        };
        out.sort_by_key(|(_, r)| std::cmp::Reverse(*r));
        out
    }

    /// Marks `cgroup` active now (an OOM kill in it).
    pub fn note_active(&self, cgroup: &str) {
        {
            let mut a = self.activity.locked();
            a.note_active(cgroup, Instant::now());
        }
    }

    /// `sensor_workloads_left_out{,_total}`, for the daemon's registry and the other sets.
    pub fn left_out_metrics(&self) -> &LeftOutMetrics {
        &self.left_out
    }

    /// Label values for a kernfs id: `""` for 0 (not attributed), the path when known, else
    /// `unknown` (after one forced rescan at most per second).
    pub fn labels_for_id(&self, id: u64) -> WorkloadLabels {
        match self.path_for_id(id) {
            None => Default::default(),
            Some(path) => self.labels(&path),
        }
    }

    /// The path labels of `id` are taken from: `None` for 0, `unknown` when not found.
    fn path_for_id(&self, id: u64) -> Option<String> {
        if id == 0 {
            return None;
        }
        let path = self.path_of(id).or_else(|| {
            self.rescan_if_older(Duration::from_secs(1));
            self.path_of(id)
        });
        if path.is_none() {
            // Its keys are retired like a vanished cgroup's (see `Retirement`).
            self.state.locked().retirement.note_unknown(id, Instant::now());
        }
        Some(path.unwrap_or_else(|| "unknown".to_string()))
    }

    /// [`Self::labels_for_id`] rendered as a label fragment for the text exposition
    /// (`cgroup="...",container_id="...",...`), once per id and scrape (and once per path).
    pub fn label_text_for_id(&self, id: u64, scrape: &mut crate::expo::Scrape) -> Arc<str> {
        self.memo_text(scrape, "label_text_for_id", id, |d, id| match d.path_for_id(*id) {
            None => render_labels(&WorkloadLabels::default()),
            Some(path) => d.label_text(&path),
        })
    }

    /// [`Self::labels`] rendered as a label fragment, once per workload: kept across scrapes
    /// and rendered again only when the runtime's names for it change.
    pub fn label_text(&self, cgroup: &str) -> Arc<str> {
        let rank = self.rank(cgroup);
        // Admission only: the label values are rendered below, once per workload.
        let (admitted, _) = self.workloads.locked().admit(cgroup, rank);
        if !admitted {
            return Arc::clone(&self.other_text);
        }
        let kept = self
            .label_texts
            .locked()
            .get(cgroup)
            .map(|e| (e.container_id.clone(), Arc::clone(&e.names), Arc::clone(&e.text)));
        if let Some((container_id, names, text)) = kept {
            if *self.names(&container_id) == *names {
                return text;
            }
        }
        let w = workload(cgroup);
        let names = self.names(&w.container_id);
        let text = render_labels(&with_names(
            [cgroup.to_string(), w.container_id.clone(), w.pod_uid],
            &names,
        ));
        let e = LabelText {
            container_id: w.container_id,
            names,
            text: Arc::clone(&text),
        };
        self.label_texts.locked().insert(cgroup.to_string(), e);
        text
    }

    fn memo_text<Q: std::hash::Hash + Eq + 'static>(
        &self,
        scrape: &mut crate::expo::Scrape,
        what: &'static str,
        key: Q,
        render: impl Fn(&Self, &Q) -> Arc<str>,
    ) -> Arc<str> {
        let owner = self as *const Self as usize;
        let memo = scrape.memo(owner, what, || std::cell::RefCell::new(HashMap::<Q, Arc<str>>::new()));
        if let Some(t) = memo.borrow().get(&key) {
            return Arc::clone(t);
        }
        let t = render(self, &key);
        memo.borrow_mut().insert(key, Arc::clone(&t));
        t
    }

    pub fn path_of(&self, id: u64) -> Option<String> {
        self.state.locked().by_id.get(&id).map(|k| k.path.clone())
    }

    /// Counts kernel map keys of folded vanished workloads whose totals a slice moved into
    /// userspace (see [`crate::agg::HistogramMapCollector::retire`]).
    /// (A slice notes 0 at start, so its series exists from then on.)
    pub fn note_retired(&self, map: &str, keys: usize) {
        self.retired.with_label_values(&[map]).inc_by(keys as u64);
    }

    /// `sensor_workload_keys_retired_total`, for the daemon's registry.
    pub fn retired_metric(&self) -> prometheus::IntCounterVec {
        self.retired.clone()
    }

    /// Whether `id` is a cgroup a rescan found gone whose series are folded into `other`
    /// (over `limits.workloads_per_metric`): nothing about it needs to be kept apart any more.
    /// An id no walk ever found (it came and went between two) counts as gone too.
    pub fn is_folded_vanished(&self, id: u64) -> bool {
        // Labelling an unknown id first walks again (at most once a second): a cgroup created
        // since the last walk is then live.
        let folded = self.labels_for_id(id)[0] == OTHER;
        let s = self.state.locked();
        folded && !s.live.contains(&id) && s.by_id.get(&id).is_none_or(|k| k.gone.is_some())
    }

    /// Cgroup ids whose path is kept (live or vanished).
    pub fn known_ids(&self) -> usize {
        self.state.locked().by_id.len()
    }

    pub fn is_live(&self, id: u64) -> bool {
        self.state.locked().live.contains(&id)
    }

    pub fn cgroups(&self) -> Vec<String> {
        self.state.locked().cgroups.clone()
    }

    fn rescan_if_older(&self, age: Duration) {
        let stale = self.state.locked().last_scan.is_none_or(|t| t.elapsed() >= age);
        if stale {
            self.scan(false);
        }
    }

    /// Walks the hierarchy: new cgroups appear, vanished ones start their grace period. The
    /// discovery loop calls it, then each slice's upkeep.
    pub fn rescan(&self) {
        self.scan(true);
    }

    /// A walk; `scheduled` for the discovery loop's. Only those retire vanished ids (see
    /// [`Retirement::step`]): a walk forced by a scrape between two of them is followed by no
    /// probe's `after_discovery`, so it must not count as one.
    fn scan(&self, scheduled: bool) {
        let found = walk(&self.hier, WALK_LIMIT);
        let live: HashSet<u64> = found.iter().map(|(_, id)| *id).collect();
        let paths: HashSet<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
        {
            let mut w = self.workloads.locked();
            w.sweep(|cg| paths.contains(cg), Instant::now());
            self.label_texts.locked().retain(|cg, _| w.contains(cg));
        }
        for set in self.held.locked().iter() {
            set.locked().sweep_for_owner(|cg| paths.contains(cg), Instant::now());
        }
        let ids: HashSet<String> = found
            .iter()
            .map(|(p, _)| workload(p).container_id)
            .filter(|id| !id.is_empty())
            .collect();
        let expired;
        {
            let mut s = self.state.locked();
            for (p, id) in &found {
                match s.by_id.get_mut(id) {
                    Some(k) if k.path == *p => k.gone = None,
                    _ => {
                        s.by_id.insert(
                            *id,
                            Known {
                                path: p.clone(),
                                gone: None,
                            },
                        );
                    }
                }
            }
            s.cgroups = found.iter().map(|(p, _)| p.clone()).collect();
            {
                let mut a = self.activity.locked();
                a.walked(s.cgroups.iter().cloned());
            }
            let now = Instant::now();
            if scheduled {
                let w = self.workloads.locked();
                let s = &mut *s;
                let retired = s
                    .retirement
                    .step(&mut s.by_id, &live, now, self.grace, |p| w.contains(p));
                if !retired.is_empty() {
                    tracing::debug!(ids = retired.len(), "vanished cgroup ids retired");
                }
            }
            // After a burst of removals the table gives its room back.
            let keep = s.by_id.len() * 2;
            s.by_id.shrink_to(keep);
            s.live = live;
            s.last_scan = Some(now);
            expired = track_containers(&mut s.containers, &ids, now, self.grace);
        }
        if scheduled {
            self.scan_activity(&found);
        }
        if let Some(r) = self.resolver.get() {
            // A workload is named when its cgroup first appears: its container may be gone by
            // the time it is OOM-killed.
            for id in &ids {
                r.request(id);
            }
            r.forget(expired.iter().map(String::as_str));
        }
    }

    /// Reads every cgroup's activity signals (a few small files each; this runs on the
    /// discovery's blocking thread) and re-ranks the label set's members.
    fn scan_activity(&self, found: &[(String, u64)]) {
        let readings: Vec<(String, Reading)> = found
            .iter()
            .filter(|(p, _)| p.as_str() != "/")
            .map(|(p, _)| {
                let reclaim_ns = self.reclaim.get().and_then(|r| r.of(p));
                (p.clone(), read_activity(&self.hier, p, reclaim_ns))
            })
            .collect();
        let now = Instant::now();
        {
            let mut a = self.activity.locked();
            a.scan(readings, now);
        }
        let held = self.held.locked().clone();
        let mut w = self.workloads.locked();
        let a = self.activity.locked();
        w.refresh(|c| a.rank(c, now));
        for set in held {
            set.locked().refresh(|c| a.rank(c, now));
        }
    }

    /// Counts the reclaim times the pipeline shares among probes in the activity ranks.
    pub fn rank_by_reclaim(&self, times: Arc<ReclaimTimes>) {
        let _ = self.reclaim.set(times);
    }

    /// The paths of the live ids among `items`, with their values (ids without a known path are
    /// left out).
    pub fn by_live_path<V>(&self, items: impl IntoIterator<Item = (u64, V)>) -> HashMap<String, V> {
        let s = self.state.locked();
        items
            .into_iter()
            .filter(|(id, _)| s.live.contains(id))
            .filter_map(|(id, v)| s.by_id.get(&id).map(|k| (k.path.clone(), v)))
            .collect()
    }

    /// The cgroup ids the last scheduled rescan retired: gone long enough (see
    /// [`Retirement::step`]), or never found. Each probe drops its kernel map keys and state for
    /// them in `Running::after_discovery`, which follows every scheduled rescan: all probes see
    /// the same ids, once, and their paths stay known until the next rescan.
    pub fn retired(&self) -> Arc<[u64]> {
        self.state.locked().retirement.retired()
    }

    /// A bounded set of `limits.workloads_per_metric` workloads for a probe's own series (what is
    /// left out counted under `set`). The registry's rescans rank its members and release those
    /// gone past the grace period; the probe takes them (`WorkloadSet::take_expired`) and drops
    /// their series.
    pub fn bounded_set(&self, set: &str) -> Arc<Mutex<WorkloadSet>> {
        let s = Arc::new(Mutex::new(WorkloadSet::with_left_out(
            self.per_metric,
            self.grace,
            self.left_out.for_set(set),
        )));
        self.held.locked().push(Arc::clone(&s));
        s
    }
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::MetadataExt, path::PathBuf};

    use super::*;

    /// A directory tree standing in for a memory hierarchy (discovery only reads directory
    /// names and inode numbers).
    struct FakeHierarchy(PathBuf);

    impl FakeHierarchy {
        fn new(name: &str, dirs: &[&str]) -> FakeHierarchy {
            let root = std::env::temp_dir().join(format!("sensor-cgroup-unit-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            for d in dirs {
                std::fs::create_dir_all(root.join(d)).unwrap();
            }
            FakeHierarchy(root)
        }

        fn hier(&self) -> Hierarchies {
            Hierarchies {
                memory_v1: Some(self.0.clone()),
                unified: None,
            }
        }

        fn id(&self, d: &str) -> u64 {
            std::fs::metadata(self.0.join(d)).unwrap().ino()
        }

        fn remove(&self, d: &str) {
            std::fs::remove_dir(self.0.join(d)).unwrap();
        }
    }

    impl Drop for FakeHierarchy {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_vanished_workload_over_the_cap_keeps_no_state() {
        let h = FakeHierarchy::new("folded", &["a", "b", "c"]);
        let (a, b, c) = (h.id("a"), h.id("b"), h.id("c"));
        let d = Discovery::new(h.hier(), 2, Duration::from_secs(600));
        assert_eq!(d.labels_for_id(a)[0], "/a");
        assert_eq!(d.labels_for_id(b)[0], "/b");
        assert_eq!(d.labels_for_id(c)[0], OTHER, "over the cap of 2");
        h.remove("b");
        h.remove("c");
        d.rescan();
        // The first rescan that finds them gone keeps their paths: the slices' upkeep after it
        // still labels their kernel keys, and retires the folded one's.
        assert!(d.is_folded_vanished(c));
        assert!(!d.is_folded_vanished(b), "has series of its own for the grace period");
        assert!(!d.is_folded_vanished(a), "live");
        assert_eq!(d.path_of(c).as_deref(), Some("/c"));
        assert_eq!(d.known_ids(), 4);
        assert!(d.retired().is_empty(), "first found gone");
        d.rescan();
        // Retired once, for every probe: their upkeep after this rescan still labels its keys.
        assert_eq!(&*d.retired(), [c]);
        assert_eq!(d.path_of(c).as_deref(), Some("/c"));
        d.rescan();
        assert!(d.retired().is_empty(), "retired once");
        assert_eq!(d.path_of(c), None, "folded and gone: forgotten");
        assert_eq!(d.path_of(b).as_deref(), Some("/b"), "named: kept for the grace period");
        assert_eq!(d.known_ids(), 3, "root, a and b");
        assert_eq!(d.labels_for_id(b)[0], "/b");
    }

    #[test]
    fn a_set_held_for_a_probe_is_bounded_and_released_by_the_rescan() {
        let h = FakeHierarchy::new("held", &["a", "b"]);
        let d = Discovery::new(h.hier(), 1, Duration::ZERO);
        let set = d.bounded_set("test");
        assert_eq!(set.locked().labels("/a")[0], "/a");
        assert_eq!(
            set.locked().labels("/b")[0],
            OTHER,
            "bounded by limits.workloads_per_metric"
        );
        d.rescan();
        assert!(set.locked().take_expired().is_empty(), "live");
        h.remove("a");
        d.rescan();
        assert_eq!(set.locked().take_expired(), ["/a"]);
        assert_eq!(set.locked().labels("/b")[0], "/b", "slot freed");
    }
}
