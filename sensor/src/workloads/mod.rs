//! Workload names from the container runtimes: container id -> Kubernetes namespace, pod and
//! container (or the runtime's container name), image and runtime. Lookups run on the async
//! runtime, off every record path; callers read a bounded cache and, for an id never seen,
//! ask for a lookup (or await one with a deadline where waiting is allowed).

pub mod api;
pub mod config;
pub mod containerd;
pub mod owner;
mod sandbox;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use serde::Serialize;
use tokio::{runtime::Handle, sync::watch};

use self::config::{RuntimeConfig, RuntimeKind, WorkloadsConfig};

use crate::sync::Lock as _;

/// Names of one container; empty strings where unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Names {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub image: String,
    pub runtime: String,
    /// The pod's owner (`owner::resolve`): kind and name, empty off Kubernetes or when the
    /// pod's sandbox could not be read.
    pub owner_kind: String,
    pub owner: String,
}

impl Names {
    /// `sensor_workload_info`'s label values for container `id`, in [`INFO_LABELS`] order.
    fn info_labels<'a>(&'a self, id: &'a str) -> [&'a str; 8] {
        [
            id,
            &self.namespace,
            &self.pod,
            &self.container,
            &self.image,
            &self.runtime,
            &self.owner_kind,
            &self.owner,
        ]
    }
}

/// `sensor_workload_info`'s labels.
const INFO_LABELS: [&str; 8] = [
    "container_id",
    "namespace",
    "pod",
    "container",
    "image",
    "runtime",
    "owner_kind",
    "owner",
];

/// How long an id no runtime could name stays unnamed before it is asked about again.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// Lookups in flight at once: a node that starts with thousands of containers asks its
/// runtime a few at a time, not all at once.
const CONCURRENT_LOOKUPS: usize = 16;

/// The `result` label values.
pub const RESULTS: [&str; 4] = ["ok", "not_found", "error", "timeout"];

enum Entry {
    Named(Arc<Names>),
    /// No runtime named it; asked again after this instant.
    Unnamed(Instant),
}

/// Bounded cache: the oldest entry leaves first when full.
struct Cache<V> {
    map: HashMap<String, V>,
    order: VecDeque<String>,
    cap: usize,
}

impl<V> Cache<V> {
    fn new(cap: usize) -> Self {
        Cache {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    /// Returns the entries that left to make room (and the one replaced, if any).
    fn insert(&mut self, id: &str, e: V) -> Vec<(String, V)> {
        let mut gone = Vec::new();
        match self.map.insert(id.to_string(), e) {
            Some(old) => gone.push((id.to_string(), old)),
            None => self.order.push_back(id.to_string()),
        }
        while self.map.len() > self.cap {
            let Some(old) = self.order.pop_front() else { break };
            if let Some(e) = self.map.remove(&old) {
                gone.push((old, e));
            }
        }
        gone
    }

    fn remove(&mut self, id: &str) -> Option<V> {
        let e = self.map.remove(id)?;
        self.order.retain(|x| x != id);
        Some(e)
    }
}

/// Lookups under way by id (containers' or sandboxes'): one at a time per id, the others wait
/// for it.
#[derive(Default)]
struct Inflight(Mutex<HashMap<String, watch::Receiver<bool>>>);

impl Inflight {
    /// Marks `id` as under way; `None` when it already is.
    fn begin(&self, id: &str) -> Option<watch::Sender<bool>> {
        let mut inflight = self.0.locked();
        if inflight.contains_key(id) {
            return None;
        }
        let (tx, rx) = watch::channel(false);
        inflight.insert(id.to_string(), rx);
        Some(tx)
    }

    /// Until the lookup of `id` under way (if any) ends.
    async fn wait(&self, id: &str) {
        let rx = self.0.locked().get(id).cloned();
        if let Some(mut rx) = rx {
            let _ = rx.wait_for(|done| *done).await;
        }
    }

    /// The lookup of `id` ended: its waiters wake.
    fn end(&self, id: &str, done: watch::Sender<bool>) {
        self.0.locked().remove(id);
        let _ = done.send(true);
    }
}

/// Resolves container ids through the configured runtimes and keeps the answers.
pub struct Resolver {
    runtimes: Vec<RuntimeConfig>,
    timeout: Duration,
    cache: Mutex<Cache<Entry>>,
    /// Owners of the pods whose sandboxes were read.
    sandboxes: sandbox::Sandboxes,
    inflight: Inflight,
    lookups: IntCounterVec,
    info: IntGaugeVec,
    handle: Handle,
    permits: tokio::sync::Semaphore,
}

impl Resolver {
    /// Registers `sensor_workload_lookups_total`, `sensor_workload_sandbox_lookups_total` and
    /// `sensor_workload_info`; lookups run on `handle`.
    pub fn new(cfg: &WorkloadsConfig, registry: &Registry, handle: Handle) -> prometheus::Result<Resolver> {
        let lookups = IntCounterVec::new(
            Opts::new(
                "sensor_workload_lookups_total",
                "Container id lookups by runtime and result (ok, not_found, error: absent, refused or garbage answer, timeout).",
            ),
            &["runtime", "result"],
        )?;
        let info = IntGaugeVec::new(
            Opts::new(
                "sensor_workload_info",
                "Names of a container the runtimes named (1 per container id); join on container_id for the image.",
            ),
            &INFO_LABELS,
        )?;
        registry.register(Box::new(lookups.clone()))?;
        registry.register(Box::new(info.clone()))?;
        let sandboxes = sandbox::Sandboxes::new(cfg, registry, owner::node_name())?;
        for r in &cfg.runtimes {
            for res in RESULTS {
                lookups.with_label_values(&[r.kind.label(), res]);
            }
        }
        Ok(Resolver {
            runtimes: cfg.runtimes.clone(),
            timeout: cfg.lookup_timeout,
            cache: Mutex::new(Cache::new(cfg.cache_size)),
            sandboxes,
            inflight: Inflight::default(),
            lookups,
            info,
            handle,
            permits: tokio::sync::Semaphore::new(CONCURRENT_LOOKUPS),
        })
    }

    /// The cached names of `id`: `Some(names)` when named, `Some(empty)` while a failed lookup
    /// is fresh, `None` when nothing is known yet.
    pub fn cached(&self, id: &str) -> Option<Arc<Names>> {
        let c = self.cache.locked();
        match c.map.get(id)? {
            Entry::Named(n) => Some(Arc::clone(n)),
            Entry::Unnamed(until) if Instant::now() < *until => Some(Arc::default()),
            Entry::Unnamed(_) => None,
        }
    }

    /// Names from the cache, never waiting; an id not known yet is looked up in the
    /// background (empty names until then).
    pub fn names(self: &Arc<Self>, id: &str) -> Arc<Names> {
        if id.is_empty() {
            return Arc::default();
        }
        match self.cached(id) {
            Some(n) => n,
            None => {
                self.request(id);
                Arc::default()
            }
        }
    }

    /// Starts a background lookup of `id` unless it is cached or under way.
    pub fn request(self: &Arc<Self>, id: &str) {
        if id.is_empty() || self.cached(id).is_some() {
            return;
        }
        if let Some(done) = self.inflight.begin(id) {
            let (me, id) = (Arc::clone(self), id.to_string());
            self.handle.spawn(async move { me.lookup_and_store(&id, done).await });
        }
    }

    /// The names of `id`, waiting for a lookup at most `wait` (empty names past it; the
    /// lookup goes on and fills the cache).
    pub async fn resolve(self: &Arc<Self>, id: &str, wait: Duration) -> Arc<Names> {
        if id.is_empty() {
            return Arc::default();
        }
        if let Some(n) = self.cached(id) {
            return n;
        }
        self.request(id);
        let _ = tokio::time::timeout(wait, self.inflight.wait(id)).await;
        self.cached(id).unwrap_or_default()
    }

    async fn lookup_and_store(&self, id: &str, done: watch::Sender<bool>) {
        let named = match self.permits.acquire().await {
            Ok(_permit) => self.lookup(id).await.map(Arc::new),
            Err(_) => None,
        };
        let entry = match &named {
            Some(n) => Entry::Named(Arc::clone(n)),
            None => Entry::Unnamed(Instant::now() + RETRY_AFTER),
        };
        let gone = self.cache.locked().insert(id, entry);
        for (old, e) in gone {
            self.drop_info(&old, &e);
        }
        if let Some(n) = named {
            self.info.with_label_values(&n.info_labels(id)).set(1);
        }
        self.inflight.end(id, done);
    }

    /// Asks each runtime in order; the first that knows `id` names it, and owns the pod's
    /// sandbox (read once per pod). Every answer is counted.
    async fn lookup(&self, id: &str) -> Option<Names> {
        for rt in &self.runtimes {
            if rt.optional && !rt.socket.exists() {
                continue;
            }
            if let Some(found) = ask_counted(rt, id, self.timeout, &self.lookups, "container").await {
                let mut names = api::names(&found, rt.kind);
                let owner = self.sandboxes.owner(rt, &found, &names.pod).await;
                names.owner_kind = owner.kind.to_string();
                names.owner = owner.name;
                return Some(names);
            }
        }
        None
    }

    /// Forgets ids (their workloads vanished past the grace period): cache and info series.
    pub fn forget<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        for id in ids {
            let e = self.cache.locked().remove(id);
            // A pod's sandbox container goes with its pod: so does the pod's owner.
            self.sandboxes.forget(id);
            if let Some(e) = e {
                self.drop_info(id, &e);
            }
        }
    }

    fn drop_info(&self, id: &str, e: &Entry) {
        if let Entry::Named(n) = e {
            let _ = self.info.remove_label_values(&n.info_labels(id));
        }
    }

    /// Ids cached now (tests, benchmarks).
    pub fn cached_ids(&self) -> HashSet<String> {
        self.cache.locked().map.keys().cloned().collect()
    }
}

/// One runtime's answer for `id` (a container or a sandbox: `of`) within `timeout`, counted
/// in `counter` by its result.
async fn ask_counted(
    rt: &RuntimeConfig,
    id: &str,
    timeout: Duration,
    counter: &IntCounterVec,
    of: &'static str,
) -> Option<api::Found> {
    let start = Instant::now();
    let result = tokio::time::timeout(timeout, ask(rt, id)).await;
    let label = match &result {
        Ok(Ok(Some(_))) => "ok",
        Ok(Ok(None)) => "not_found",
        Ok(Err(e)) => {
            tracing::debug!(runtime = rt.kind.label(), socket = %rt.socket.display(), error = %e, id, of, "workload lookup failed");
            "error"
        }
        Err(_) => "timeout",
    };
    counter.with_label_values(&[rt.kind.label(), label]).inc();
    // One line per answer with its latency (`cargo xtask bench workloads` reads them).
    tracing::debug!(
        target: "sensor::workloads::lookup",
        runtime = rt.kind.label(),
        result = label,
        of,
        seconds = start.elapsed().as_secs_f64(),
        "workload lookup"
    );
    result.ok()?.ok()?
}

/// One runtime's answer for one id.
async fn ask(rt: &RuntimeConfig, id: &str) -> Result<Option<api::Found>, api::LookupError> {
    if !is_container_id(id) {
        return Ok(None);
    }
    match rt.kind {
        RuntimeKind::Containerd => api::containerd_lookup(&rt.socket, &rt.namespaces, id).await,
        RuntimeKind::Docker => {
            let (status, body) = api::unix_get(&rt.socket, &format!("/containers/{id}/json")).await?;
            api::docker_answer(status, &body)
        }
        RuntimeKind::Crio => {
            let (status, body) = api::unix_get(&rt.socket, &format!("/containers/{id}")).await?;
            api::crio_answer(status, &body)
        }
    }
}

/// Only ids as the cgroup parser yields them (64 hex digits) go into a request path.
fn is_container_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// One runtime's state for `sensor doctor`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RuntimeReport {
    pub kind: &'static str,
    pub socket: String,
    /// `found`, `not_found` (no socket) or `error`.
    pub state: &'static str,
    pub detail: String,
}

/// Asks every configured runtime for its version (at most `lookup_timeout` each).
pub async fn doctor(cfg: &WorkloadsConfig) -> Vec<RuntimeReport> {
    let mut out = Vec::new();
    for rt in &cfg.runtimes {
        let socket = rt.socket.display().to_string();
        let (state, detail) = if !rt.socket.exists() {
            ("not_found", format!("no socket at {socket}"))
        } else {
            match tokio::time::timeout(cfg.lookup_timeout, api::ping(rt.kind, &rt.socket)).await {
                Ok(Ok(v)) => ("found", v),
                Ok(Err(e)) => ("error", e.to_string()),
                Err(_) => (
                    "error",
                    format!("no answer within {}", humantime::format_duration(cfg.lookup_timeout)),
                ),
            }
        };
        out.push(RuntimeReport {
            kind: rt.kind.label(),
            socket,
            state,
            detail,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_is_bounded_oldest_first() {
        let mut c = Cache::new(2);
        let ids = |v: Vec<(String, Entry)>| v.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
        assert!(c.insert("a", Entry::Named(Arc::default())).is_empty());
        assert!(c.insert("b", Entry::Named(Arc::default())).is_empty());
        assert_eq!(
            ids(c.insert("a", Entry::Named(Arc::default()))),
            ["a"],
            "replaced, no growth"
        );
        assert_eq!(ids(c.insert("c", Entry::Named(Arc::default()))), ["a"]);
        assert_eq!(c.map.len(), 2);
        assert!(c.remove("b").is_some());
        assert_eq!(c.order, ["c"]);
    }

    #[tokio::test]
    async fn absent_optional_runtime_is_skipped_and_required_counted() {
        let registry = Registry::new();
        let mut cfg = WorkloadsConfig {
            runtimes: vec![RuntimeConfig {
                kind: RuntimeKind::Docker,
                socket: "/nonexistent/docker.sock".into(),
                namespaces: vec![],
                optional: true,
            }],
            ..WorkloadsConfig::default()
        };
        let id = "ab".repeat(32);
        let r = Arc::new(Resolver::new(&cfg, &registry, Handle::current()).unwrap());
        assert_eq!(*r.resolve(&id, Duration::from_secs(5)).await, Names::default());
        assert_eq!(r.lookups.with_label_values(&["docker", "error"]).get(), 0);
        cfg.runtimes[0].optional = false;
        let registry = Registry::new();
        let r = Arc::new(Resolver::new(&cfg, &registry, Handle::current()).unwrap());
        assert_eq!(*r.resolve(&id, Duration::from_secs(5)).await, Names::default());
        assert_eq!(r.lookups.with_label_values(&["docker", "error"]).get(), 1);
        // Cached as unnamed: no second lookup.
        r.request(&id);
        assert_eq!(*r.resolve(&id, Duration::from_secs(5)).await, Names::default());
        assert_eq!(r.lookups.with_label_values(&["docker", "error"]).get(), 1);
    }
}
