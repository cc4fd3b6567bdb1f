//! Cgroups: where the hierarchies are mounted, workload attribution from a cgroup path
//! (container id, pod uid; names from the runtimes through `workloads`), best-effort reads of
//! memory limits, and bounded workload label sets.

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    activity::{Reading, Tracker},
    admission::{Admission, Admit, LeftOut, LeftOutMetrics, Rank},
    sync::Lock as _,
    workloads::{Names, Resolver},
};

/// Where the memory controller lives on this host.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Hierarchies {
    /// Root of the cgroup v1 hierarchy carrying the memory controller (v1 and hybrid hosts).
    pub memory_v1: Option<PathBuf>,
    /// Root of the cgroup v2 (unified) hierarchy, if mounted.
    pub unified: Option<PathBuf>,
}

impl Hierarchies {
    /// From this process's mount table; none found when it cannot be read (logged).
    pub fn discover() -> Hierarchies {
        match procfs::process::Process::myself().and_then(|p| p.mountinfo()) {
            Ok(m) => Hierarchies::from_mounts(&m.0),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read /proc/self/mountinfo; no cgroup hierarchy found");
                Hierarchies::from_mounts(&[])
            }
        }
    }

    /// Parses mountinfo text (tests and callers holding the text).
    pub fn parse_mountinfo(text: &str) -> Hierarchies {
        use procfs::FromBufRead as _;
        let mounts = procfs::process::MountInfos::from_buf_read(text.as_bytes())
            .map(|m| m.0)
            .unwrap_or_default();
        Hierarchies::from_mounts(&mounts)
    }

    /// The first cgroup2 mount, and the first v1 mount with the memory controller.
    fn from_mounts(mounts: &[procfs::process::MountInfo]) -> Hierarchies {
        let mut h = Hierarchies {
            memory_v1: None,
            unified: None,
        };
        for m in mounts {
            match m.fs_type.as_str() {
                "cgroup2" if h.unified.is_none() => h.unified = Some(m.mount_point.clone()),
                "cgroup" if h.memory_v1.is_none() && m.super_options.contains_key("memory") => {
                    h.memory_v1 = Some(m.mount_point.clone())
                }
                _ => {}
            }
        }
        h
    }

    /// Root of the hierarchy memory cgroup paths are relative to.
    pub fn memory_root(&self) -> Option<&Path> {
        self.memory_v1.as_deref().or(self.unified.as_deref())
    }

    pub fn memory_is_v1(&self) -> bool {
        self.memory_v1.is_some()
    }

    /// Directory of a memory cgroup given its path relative to the root (`/a/b`).
    pub fn memory_dir(&self, rel: &str) -> Option<PathBuf> {
        self.memory_root().map(|r| r.join(rel.trim_start_matches('/')))
    }

    /// Finds a memory cgroup by kernfs id (= directory inode), for paths the kernel could not
    /// capture whole. Walks at most `limit` directories.
    pub fn find_memory_cgroup(&self, id: u64, limit: usize) -> Option<String> {
        walk(self, limit)
            .into_iter()
            .find(|(_, ino)| *ino == id)
            .map(|(path, _)| path)
    }

    /// Limit and usage of a memory cgroup right now, in bytes (`None` where unknown or unlimited).
    pub fn memory_limit_usage(&self, rel: &str) -> (Option<u64>, Option<u64>) {
        let Some(dir) = self.memory_dir(rel) else {
            return (None, None);
        };
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
        };
        if self.memory_is_v1() {
            // v1 reports "no limit" as a huge page-aligned number.
            let limit = read("memory.limit_in_bytes").filter(|l| *l < (1 << 62));
            (limit, read("memory.usage_in_bytes"))
        } else {
            (read("memory.max"), read("memory.current"))
        }
    }
}

/// The workload a cgroup path belongs to. Fields are empty when the path does not say.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub container_id: String,
    pub pod_uid: String,
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A container id in one path segment: `cri-containerd-<id>.scope`, `crio-<id>.scope`,
/// `docker-<id>.scope`, `libpod-<id>.scope` (systemd driver) or a bare `<id>` (cgroupfs driver).
fn container_id(seg: &str) -> Option<&str> {
    let s = seg.strip_suffix(".scope").unwrap_or(seg);
    if s.starts_with("crio-conmon-") {
        return None;
    }
    let id = ["cri-containerd-", "crio-", "docker-", "libpod-"]
        .iter()
        .find_map(|p| s.strip_prefix(p))
        .unwrap_or(s);
    (id.len() == 64 && is_hex(id)).then_some(id)
}

/// A pod uid in one segment: `kubepods-burstable-pod<uid with _>.slice` (systemd) or
/// `pod<uid>` (cgroupfs). Uids are UUIDs, or 32 hex digits for static pods.
fn pod_uid(seg: &str) -> Option<String> {
    let s = seg.strip_suffix(".slice").unwrap_or(seg);
    let i = s.rfind("pod")?;
    let before = &s[..i];
    if !(before.is_empty() || before.ends_with('-')) {
        return None;
    }
    let raw = &s[i + 3..];
    // Systemd writes the uid's dashes as underscores, the cgroupfs driver keeps them; a segment
    // mixing both is neither (found by the `cgroup_workload` fuzz target).
    if raw.contains('_') && raw.contains('-') {
        return None;
    }
    let uid = raw.replace('_', "-");
    let parts: Vec<&str> = uid.split('-').collect();
    let uuid = parts.len() == 5
        && [8, 4, 4, 4, 12]
            .iter()
            .zip(&parts)
            .all(|(n, p)| p.len() == *n && is_hex(p));
    let static_pod = parts.len() == 1 && uid.len() == 32 && is_hex(&uid);
    (uuid || static_pod).then_some(uid)
}

/// Attribution from a cgroup path; the innermost container and pod segments win.
pub fn workload(path: &str) -> Workload {
    let mut w = Workload::default();
    for seg in path.split('/').rev() {
        if w.container_id.is_empty() {
            if let Some(id) = container_id(seg) {
                w.container_id = id.to_string();
            }
        }
        if w.pod_uid.is_empty() {
            if let Some(uid) = pod_uid(seg) {
                w.pod_uid = uid;
            }
        }
    }
    w
}

/// Label names of one workload: from the cgroup path (`cgroup`, `container_id`, `pod_uid`),
/// then the runtime's names (`namespace`, `pod`, `container`; empty when unknown).
pub const WORKLOAD_LABELS: [&str; 6] = ["cgroup", "container_id", "pod_uid", "namespace", "pod", "container"];

/// Label values in [`WORKLOAD_LABELS`] order.
pub type WorkloadLabels = [String; 6];

/// Workload labels from a label list that starts with them (a retired key's labels after its
/// other labels are cut off); missing values are empty.
pub fn workload_labels_from(l: &[String]) -> WorkloadLabels {
    std::array::from_fn(|i| l.get(i).cloned().unwrap_or_default())
}

/// The path-derived labels followed by the names.
pub fn with_names(base: [String; 3], n: &Names) -> WorkloadLabels {
    let [cgroup, container_id, pod_uid] = base;
    [
        cgroup,
        container_id,
        pod_uid,
        n.namespace.clone(),
        n.pod.clone(),
        n.container.clone(),
    ]
}

/// Workload labels as a fragment of the text exposition.
pub(crate) fn render_labels(l: &WorkloadLabels) -> Arc<str> {
    crate::expo::labels(WORKLOAD_LABELS.iter().copied().zip(l.iter().map(String::as_str))).into()
}

/// Bounds the workloads one metric family may label under the admission rule (see
/// `admission`): members get their own series, the rest fold into `cgroup="other"`; a more
/// active cgroup displaces an idle member. Cgroups whose directory is gone are released after
/// `grace`, and the caller drops their series.
#[derive(Debug)]
pub struct WorkloadSet {
    grace: Duration,
    admission: Admission,
    /// Members whose directory vanished, since when.
    gone: HashMap<String, Instant>,
}

/// The `cgroup` label of workloads left out of a set.
pub const OTHER: &str = "other";

impl WorkloadSet {
    /// A set whose left-out count is exported nowhere (tests).
    pub fn new(max: usize, grace: Duration) -> WorkloadSet {
        WorkloadSet::with_left_out(max, grace, LeftOut::detached())
    }

    pub fn with_left_out(max: usize, grace: Duration, left_out: LeftOut) -> WorkloadSet {
        WorkloadSet {
            grace,
            admission: Admission::new(max, left_out),
            gone: HashMap::new(),
        }
    }

    /// Path-derived label values for `cgroup` without a rank (it displaces no member).
    pub fn labels(&mut self, cgroup: &str) -> [String; 3] {
        self.labels_ranked(cgroup, Rank::EMPTY).0
    }

    /// Whether `cgroup` has series of its own (admitted now if its rank earns it a place), and
    /// the member it displaced, whose series the caller drops or folds.
    pub fn admit(&mut self, cgroup: &str, rank: Rank) -> (bool, Option<String>) {
        // A member's grace runs from when `sweep` first found it gone: labelling it again (a
        // scrape of its kernel keys) does not restart it, nor keeps it ranked.
        let rank = if self.gone.contains_key(cgroup) {
            Rank::EMPTY
        } else {
            rank
        };
        let displaced = match self.admission.admit(cgroup, rank) {
            Admit::LeftOut => return (false, None),
            Admit::Member => None,
            Admit::Admitted(d) => d,
        };
        if let Some(d) = &displaced {
            self.gone.remove(d);
        }
        (true, displaced)
    }

    /// Path-derived label values for `cgroup`: its own, or the `other` bucket when it is left
    /// out; and the member it displaced (see [`Self::admit`]).
    pub fn labels_ranked(&mut self, cgroup: &str, rank: Rank) -> ([String; 3], Option<String>) {
        let (admitted, displaced) = self.admit(cgroup, rank);
        if !admitted {
            return ([OTHER.to_string(), String::new(), String::new()], None);
        }
        let w = workload(cgroup);
        ([cgroup.to_string(), w.container_id, w.pod_uid], displaced)
    }

    /// Re-ranks every member (vanished ones rank lowest).
    pub fn refresh(&mut self, rank_of: impl Fn(&str) -> Rank) {
        let gone = &self.gone;
        self.admission
            .refresh(|c| if gone.contains_key(c) { Rank::EMPTY } else { rank_of(c) });
    }

    /// Marks cgroups whose directory vanished and returns those gone for longer than the grace
    /// period (removed from the set, so their slots free up).
    pub fn sweep(&mut self, exists: impl Fn(&str) -> bool, now: Instant) -> Vec<String> {
        let mut expired = Vec::new();
        let members: Vec<String> = self.admission.members().map(str::to_string).collect();
        for cg in members {
            if exists(&cg) {
                self.gone.remove(&cg);
            } else {
                let since = *self.gone.entry(cg.clone()).or_insert(now);
                if now.duration_since(since) >= self.grace {
                    expired.push(cg);
                }
            }
        }
        for cg in &expired {
            self.gone.remove(cg);
            self.admission.remove(cg);
        }
        // Left-out cgroups that vanished are no longer left out.
        let members: HashSet<String> = self.admission.members().map(str::to_string).collect();
        self.admission.retain(|c| members.contains(c) || exists(c));
        expired
    }

    pub fn len(&self) -> usize {
        self.admission.len()
    }

    /// Whether `cgroup` has series of its own (not folded into `other`).
    pub fn contains(&self, cgroup: &str) -> bool {
        self.admission.contains(cgroup)
    }

    pub fn is_empty(&self) -> bool {
        self.admission.is_empty()
    }
}

/// Cgroups of the memory hierarchy, shared by every slice that labels workloads: paths,
/// kernfs ids (what the kernel programs report) and the bounded workload set.
pub struct Discovery {
    pub hier: Hierarchies,
    state: Mutex<Discovered>,
    workloads: Mutex<WorkloadSet>,
    /// Cumulative reclaim time (ns) per cgroup path, as the probe that measures it last
    /// published it (`None` until it does); read by others (an OOM kill's lead-up).
    reclaim_ns: Mutex<Option<HashMap<String, u64>>>,
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
    /// kernfs id (= directory inode) -> path. Ids of vanished cgroups stay while kernel map keys
    /// may still name them (see [`forget_vanished`]).
    by_id: HashMap<u64, Known>,
    live: HashSet<u64>,
    last_scan: Option<Instant>,
    /// Container ids of the cgroups seen, with when they were first seen gone.
    containers: HashMap<String, Option<Instant>>,
}

/// A cgroup id's path; once a rescan found it gone, when, and whether it had series of its own
/// then.
struct Known {
    path: String,
    gone: Option<(Instant, bool)>,
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
            reclaim_ns: Mutex::new(None),
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
        Some(path.unwrap_or_else(|| "unknown".to_string()))
    }

    /// [`Self::labels_for_id`] rendered as a label fragment for the text exposition
    /// (`cgroup="...",container_id="...",...`), once per id and scrape (and once per path).
    pub fn label_text_for_id(&self, id: u64) -> Arc<str> {
        self.memo_text("label_text_for_id", id, |d, id| match d.path_for_id(*id) {
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
        what: &'static str,
        key: Q,
        render: impl Fn(&Self, &Q) -> Arc<str>,
    ) -> Arc<str> {
        let owner = self as *const Self as usize;
        let Some(memo) = crate::expo::memo(owner, what, || std::cell::RefCell::new(HashMap::<Q, Arc<str>>::new()))
        else {
            return render(self, &key);
        };
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

    /// A walk; `scheduled` for the discovery loop's. Only those age vanished ids (see
    /// [`forget_vanished`]): a walk forced by a scrape between two of them is followed by no
    /// slice's upkeep, so it must not count as one.
    fn scan(&self, scheduled: bool) {
        let found = walk(&self.hier, WALK_LIMIT);
        let live: HashSet<u64> = found.iter().map(|(_, id)| *id).collect();
        let paths: HashSet<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
        {
            let mut w = self.workloads.locked();
            w.sweep(|cg| paths.contains(cg), Instant::now());
            self.label_texts.locked().retain(|cg, _| w.contains(cg));
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
                forget_vanished(&mut s.by_id, &live, now, self.grace, |p| w.contains(p));
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
            .map(|(p, _)| (p.clone(), read_activity(&self.hier, p, self.reclaim_ns(p))))
            .collect();
        let now = Instant::now();
        {
            let mut a = self.activity.locked();
            a.scan(readings, now);
        }
        let mut w = self.workloads.locked();
        let a = self.activity.locked();
        w.refresh(|c| a.rank(c, now));
    }

    /// Publishes cumulative reclaim time per cgroup id (ns); ids without a known path are left
    /// out.
    pub fn set_reclaim_ns(&self, totals: impl IntoIterator<Item = (u64, u64)>) {
        let by_path: HashMap<String, u64> = {
            let st = self.state.locked();
            totals
                .into_iter()
                .filter(|(id, _)| st.live.contains(id))
                .filter_map(|(id, ns)| st.by_id.get(&id).map(|k| (k.path.clone(), ns)))
                .collect()
        };
        *self.reclaim_ns.locked() = Some(by_path);
    }

    /// The last published cumulative reclaim time of `cgroup` (ns): 0 for a cgroup that has not
    /// reclaimed yet, `None` while nothing measures it.
    pub fn reclaim_ns(&self, cgroup: &str) -> Option<u64> {
        self.reclaim_ns
            .locked()
            .as_ref()
            .map(|m| m.get(cgroup).copied().unwrap_or(0))
    }

    /// Forgets the path of an id whose kernel entries were dropped.
    pub fn forget(&self, id: u64) {
        {
            let mut s = self.state.locked();
            if !s.live.contains(&id) {
                s.by_id.remove(&id);
            }
        }
    }
}

/// Reads a cgroup's activity signals (missing files read as `None` / not populated).
pub fn read_activity(h: &Hierarchies, cgroup: &str, reclaim_ns: Option<u64>) -> Reading {
    let Some(dir) = h.memory_dir(cgroup) else {
        return Reading::default();
    };
    let text = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let populated = if h.memory_is_v1() {
        // The first bytes say whether there is a pid (a busy cgroup's list can be long).
        let mut first = [0u8; 16];
        std::fs::File::open(dir.join("cgroup.procs"))
            .and_then(|mut f| std::io::Read::read(&mut f, &mut first))
            .is_ok_and(|n| first[..n].iter().any(u8::is_ascii_digit))
    } else {
        text("cgroup.events").is_some_and(|t| t.lines().any(|l| l.trim() == "populated 1"))
    };
    let (usage, limit_hits) = if h.memory_is_v1() {
        let n = |f: &str| text(f).and_then(|t| t.trim().parse::<u64>().ok());
        (n("memory.usage_in_bytes"), n("memory.failcnt"))
    } else {
        let usage = text("memory.current").and_then(|t| t.trim().parse().ok());
        let hits = text("memory.events").and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("max "))
                .and_then(|v| v.trim().parse().ok())
        });
        (usage, hits)
    };
    Reading {
        populated,
        usage,
        limit_hits,
        reclaim_ns,
    }
}

/// Forgets the paths of vanished cgroup ids no series needs any more. The first rescan that
/// finds an id gone keeps it: the slices' upkeep after that rescan still labels (and, for a
/// workload folded into `other`, retires) its kernel map keys. A workload with series of its
/// own (`named` when it vanished) keeps its path for twice the grace period, so its series keep
/// their labels until the slices drop them (after the grace period); a folded one is forgotten
/// at the next rescan.
fn forget_vanished(
    by_id: &mut HashMap<u64, Known>,
    live: &HashSet<u64>,
    now: Instant,
    grace: Duration,
    named: impl Fn(&str) -> bool,
) {
    by_id.retain(|id, k| {
        if live.contains(id) {
            k.gone = None;
            return true;
        }
        match k.gone {
            None => {
                k.gone = Some((now, named(&k.path)));
                true
            }
            Some((since, ref mut was_named)) => {
                // Admitted after it vanished (its kernel keys labelled it first): named too.
                *was_named = *was_named || named(&k.path);
                *was_named && now.duration_since(since) < grace.saturating_mul(2)
            }
        }
    });
}

/// Notes which container ids are live; returns those gone for `grace` (then forgotten).
fn track_containers(
    seen: &mut HashMap<String, Option<Instant>>,
    live: &HashSet<String>,
    now: Instant,
    grace: Duration,
) -> Vec<String> {
    for id in live {
        seen.insert(id.clone(), None);
    }
    let mut expired = Vec::new();
    for (id, gone) in seen.iter_mut() {
        if !live.contains(id) && now.duration_since(*gone.get_or_insert(now)) >= grace {
            expired.push(id.clone());
        }
    }
    for id in &expired {
        seen.remove(id);
    }
    expired
}

/// Walks the memory hierarchy (bounded) and returns `(path, kernfs id)` of every cgroup.
pub fn walk(hier: &Hierarchies, limit: usize) -> Vec<(String, u64)> {
    let Some(root) = hier.memory_root().map(Path::to_path_buf) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        if out.len() >= limit {
            break;
        }
        // A cgroup may vanish mid-walk: skip it.
        let Ok(meta) = std::fs::metadata(&dir) else { continue };
        let rel = dir
            .strip_prefix(&root)
            .map(|p| format!("/{}", p.display()))
            .unwrap_or_else(|_| "/".into());
        out.push((rel, meta.ino()));
        if let Ok(rd) = std::fs::read_dir(&dir) {
            let mut subs: Vec<PathBuf> = rd
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect();
            subs.sort();
            stack.extend(subs.into_iter().rev());
        }
    }
    out
}

/// Decides when kernel map keys of vanished cgroups are deleted: `grace` after the cgroup was
/// first seen gone.
#[derive(Debug, Default)]
pub struct Janitor<K: std::hash::Hash + Eq + Clone> {
    gone: HashMap<K, Instant>,
}

impl<K: std::hash::Hash + Eq + Clone> Janitor<K> {
    /// Returns the keys to delete now.
    pub fn sweep(&mut self, keys: impl IntoIterator<Item = K>, live: impl Fn(&K) -> bool, grace: Duration) -> Vec<K> {
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut seen = HashSet::new();
        for k in keys {
            seen.insert(k.clone());
            if live(&k) {
                self.gone.remove(&k);
                continue;
            }
            let since = *self.gone.entry(k.clone()).or_insert(now);
            if now.duration_since(since) >= grace {
                expired.push(k);
            }
        }
        self.gone.retain(|k, _| seen.contains(k));
        for k in &expired {
            self.gone.remove(k);
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const UID: &str = "1e9b4e3c-7a3f-4c8e-9d51-2b6f0a1c3d4e";

    #[test]
    fn attribution_table() {
        let u = UID.replace('-', "_");
        let cases: Vec<(String, &str, &str)> = vec![
            // containerd, systemd driver, each QoS class
            (format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{CID}.scope"), CID, UID),
            (format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope"), CID, UID),
            (format!("/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{CID}.scope"), CID, UID),
            // CRI-O, systemd driver; conmon is the pod's but no container's
            (format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/crio-{CID}.scope"), CID, UID),
            (format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/crio-conmon-{CID}.scope"), "", UID),
            // Docker (dockershim / cri-dockerd), systemd driver
            (format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/docker-{CID}.scope"), CID, UID),
            // cgroupfs driver, each QoS class
            (format!("/kubepods/burstable/pod{UID}/{CID}"), CID, UID),
            (format!("/kubepods/besteffort/pod{UID}/{CID}"), CID, UID),
            (format!("/kubepods/pod{UID}/{CID}"), CID, UID),
            // kubelet in a nested cgroup (kind), static pod with a 32-hex uid
            (format!("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{u}.slice/cri-containerd-{CID}.scope"), CID, UID),
            (format!("/kubepods/burstable/pod0123456789abcdef0123456789abcdef/{CID}"), CID, "0123456789abcdef0123456789abcdef"),
            // plain Docker and podman
            (format!("/system.slice/docker-{CID}.scope"), CID, ""),
            (format!("/docker/{CID}"), CID, ""),
            // podman: systemd driver (its scope, and the container's own sub-cgroup under
            // cgroup v2) and cgroupfs driver; conmon is podman's, no container's
            (format!("/machine.slice/libpod-{CID}.scope"), CID, ""),
            (format!("/machine.slice/libpod-{CID}.scope/container"), CID, ""),
            (format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope"), CID, ""),
            (format!("/libpod_parent/libpod-{CID}"), CID, ""),
            (format!("/libpod_parent/libpod-conmon-{CID}"), "", ""),
            (format!("/machine.slice/libpod-conmon-{CID}.scope"), "", ""),
            // a podman pod (kube play): pod cgroup, then the container
            (format!("/machine.slice/machine-libpod_pod_0123abcd.slice/libpod-{CID}.scope"), CID, ""),
            // pod-level cgroup, no container yet
            (format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"), "", UID),
            // must yield nothing
            ("/system.slice/nginx.service".into(), "", ""),
            ("/user.slice/user-1000.slice/session-3.scope".into(), "", ""),
            ("/".into(), "", ""),
            ("".into(), "", ""),
            ("/system.slice/docker-abc.scope".into(), "", ""),
            ("/kubepods/burstable/podnotauid/xyz".into(), "", ""),
            ("/my-ipod-thing.slice/nothex.scope".into(), "", ""),
            (format!("/system.slice/snapd-{CID}x.scope"), "", ""),
            // Fuzz regression (`cgroup_workload`, crash-da4e36c0): a uid mixing the systemd
            // and cgroupfs separators is no pod uid.
            ("/kubepods.slice/cri-pod1b2c3d4e_5f59_7182_96a4-b5c6d7e8f901.slice".into(), "", ""),
            ("/kubepods/pod1b2c3d4e-5f59-7182_96a4-b5c6d7e8f901".into(), "", ""),
        ];
        for (path, cid, uid) in cases {
            let w = workload(&path);
            assert_eq!((w.container_id.as_str(), w.pod_uid.as_str()), (cid, uid), "{path}");
        }
    }

    #[test]
    fn mountinfo_hybrid_and_v2() {
        let hybrid = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu
";
        let h = Hierarchies::parse_mountinfo(hybrid);
        assert_eq!(h.memory_v1.as_deref(), Some(Path::new("/sys/fs/cgroup/memory")));
        assert_eq!(h.unified.as_deref(), Some(Path::new("/sys/fs/cgroup/unified")));
        assert!(h.memory_is_v1());
        let v2 = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let h = Hierarchies::parse_mountinfo(v2);
        assert_eq!(h.memory_root(), Some(Path::new("/sys/fs/cgroup")));
        assert!(!h.memory_is_v1());
        assert_eq!(h.memory_dir("/a/b"), Some(PathBuf::from("/sys/fs/cgroup/a/b")));
    }

    #[test]
    fn workload_set_bounds_and_expires() {
        let mut s = WorkloadSet::new(2, Duration::from_secs(60));
        assert_eq!(s.labels("/a")[0], "/a");
        assert_eq!(s.labels("/b")[0], "/b");
        assert_eq!(s.labels("/c"), [OTHER.to_string(), String::new(), String::new()]);
        assert_eq!(s.labels("/a")[0], "/a");
        let t0 = Instant::now();
        assert!(s.sweep(|c| c != "/a", t0).is_empty(), "gone, but within grace");
        assert_eq!(
            s.sweep(|c| c != "/a", t0 + Duration::from_secs(61)),
            vec!["/a".to_string()]
        );
        assert_eq!(s.len(), 1);
        assert_eq!(s.labels("/c")[0], "/c", "slot freed");
    }

    #[test]
    fn labelling_a_vanished_member_does_not_restart_its_grace() {
        let mut s = WorkloadSet::new(2, Duration::from_secs(60));
        s.labels("/a");
        let t0 = Instant::now();
        assert!(s.sweep(|_| false, t0).is_empty());
        // A scrape of its kernel keys labels it again, between every rescan.
        s.labels("/a");
        assert!(s.sweep(|_| false, t0 + Duration::from_secs(30)).is_empty());
        s.labels("/a");
        assert_eq!(s.sweep(|_| false, t0 + Duration::from_secs(60)), ["/a"]);
    }

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
        d.rescan();
        assert_eq!(d.path_of(c), None, "folded and gone: forgotten");
        assert_eq!(d.path_of(b).as_deref(), Some("/b"), "named: kept for the grace period");
        assert_eq!(d.known_ids(), 3, "root, a and b");
        assert_eq!(d.labels_for_id(b)[0], "/b");
    }

    #[test]
    fn vanished_ids_are_forgotten_after_twice_the_grace_period() {
        let mut by_id = HashMap::new();
        let known = |p: &str| Known {
            path: p.into(),
            gone: None,
        };
        by_id.insert(1, known("/named"));
        by_id.insert(2, known("/folded"));
        by_id.insert(3, known("/live"));
        let live: HashSet<u64> = [3].into();
        let g = Duration::from_secs(60);
        let t0 = Instant::now();
        let named = |p: &str| p == "/named";
        forget_vanished(&mut by_id, &live, t0, g, named);
        assert_eq!(by_id.len(), 3, "first seen gone: all kept");
        forget_vanished(&mut by_id, &live, t0 + Duration::from_secs(5), g, named);
        assert!(!by_id.contains_key(&2));
        // Still named or not (its slot expired after the grace period), the path stays twice
        // the grace period, so the slices can drop its keys with their labels.
        forget_vanished(&mut by_id, &live, t0 + Duration::from_secs(119), g, |_| false);
        assert!(by_id.contains_key(&1));
        forget_vanished(&mut by_id, &live, t0 + Duration::from_secs(120), g, |_| false);
        assert_eq!(by_id.keys().copied().collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn container_names_are_kept_for_the_grace_period() {
        let mut seen = HashMap::new();
        let t0 = Instant::now();
        let g = Duration::from_secs(60);
        let live: HashSet<String> = ["a".to_string(), "b".to_string()].into();
        assert!(track_containers(&mut seen, &live, t0, g).is_empty());
        let live: HashSet<String> = ["b".to_string()].into();
        assert!(track_containers(&mut seen, &live, t0 + Duration::from_secs(1), g).is_empty());
        assert!(track_containers(&mut seen, &live, t0 + Duration::from_secs(60), g).is_empty());
        assert_eq!(
            track_containers(&mut seen, &live, t0 + Duration::from_secs(61), g),
            ["a"]
        );
        assert_eq!(seen.len(), 1);
    }
}
