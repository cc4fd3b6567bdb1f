//! Per-workload cgroup file values (`memory.events` or its v1 equivalents, and `memory.pressure`
//! on v2), read in the background after each rescan so that a scrape reads no cgroup file.
//!
//! With 1,000 workloads a scrape used to open, read and close ~3,000 files (on v1 `memory.failcnt`,
//! `memory.memsw.failcnt`, `memory.oom_control` per workload): over half its time. The discovery
//! loop (a blocking thread, every `probes.memcg.discovery_interval` at most) now reads them into
//! a snapshot the scrape renders; `sensor_memcg_cache_age_seconds` says how old it is.
//! Descriptors are not kept open: three per workload would put 15,000 descriptors in the
//! daemon at 5,000 workloads (past the usual soft limit of 1,024) and make every
//! `process_open_fds` a walk of them, for a saving only in the background.

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Instant,
};

use prometheus::IntCounterVec;

use super::psi;
use crate::{
    cgroup::{Discovery, Hierarchies},
    sync::Lock as _,
};

/// Reads a small cgroup file into `buf`: open, one read (the kernel hands a small seq file over
/// whole), close; no size query and no read to see the end unless the buffer filled up.
fn read_small<'a>(path: &Path, buf: &'a mut Vec<u8>) -> std::io::Result<&'a str> {
    use std::io::Read;
    buf.clear();
    buf.resize(512, 0);
    let mut f = std::fs::File::open(path)?;
    let n = f.read(buf)?;
    buf.truncate(n);
    if n == 512 {
        f.read_to_end(buf)?;
    }
    std::str::from_utf8(buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// `key value` lines.
fn kv_lines(text: &str) -> impl Iterator<Item = (&str, u64)> {
    text.lines().filter_map(|l| {
        let (k, v) = l.split_once(' ')?;
        Some((k, v.trim().parse().ok()?))
    })
}

/// Why a cgroup's main file (`memory.events`, v1 `memory.failcnt`) gave no values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The cgroup was removed between the rescan and the read.
    Vanished,
    /// Any other failure (the file exists but could not be read or parsed).
    Error,
}

impl Failure {
    pub const ALL: [Failure; 2] = [Failure::Vanished, Failure::Error];

    pub fn label(self) -> &'static str {
        match self {
            Failure::Vanished => "vanished",
            Failure::Error => "error",
        }
    }
}

/// Classifies a failed read of a file in `dir`. On v2 a cgroup without the memory controller
/// has no `memory.events`: that is no failure (`None`).
fn failure(e: &std::io::Error, dir: &Path) -> Option<Failure> {
    if e.kind() != std::io::ErrorKind::NotFound {
        Some(Failure::Error)
    } else if dir.exists() {
        None
    } else {
        Some(Failure::Vanished)
    }
}

/// `memory.events` counters of one cgroup (v1: the nearest equivalents); `Err` when the main
/// file could not be read for a reason worth counting.
pub fn memory_events(hier: &Hierarchies, cgroup: &str, buf: &mut Vec<u8>) -> Result<Vec<(&'static str, u64)>, Failure> {
    let Some(dir) = hier.memory_dir(cgroup) else {
        return Ok(Vec::new());
    };
    let absent = |e: std::io::Error| match failure(&e, &dir) {
        Some(f) => Err(f),
        None => Ok(Vec::new()),
    };
    if hier.memory_is_v1() {
        let mut out = Vec::new();
        // A charge fails on the memory+swap counter first when swap accounting is on, so the
        // times the limit was hit are spread over both failure counters.
        let failcnt = match read_small(&dir.join("memory.failcnt"), buf) {
            Ok(t) => t.trim().parse::<u64>().map_err(|_| Failure::Error)?,
            Err(e) => return absent(e),
        };
        // Absent without swap accounting: no failures there.
        let memsw = read_small(&dir.join("memory.memsw.failcnt"), buf)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        out.push(("max", failcnt + memsw.unwrap_or(0)));
        let oom = read_small(&dir.join("memory.oom_control"), buf)
            .ok()
            .and_then(|t| kv_lines(t).find(|(k, _)| *k == "oom_kill").map(|(_, v)| v));
        if let Some(v) = oom {
            out.push(("oom_kill", v));
        }
        Ok(out)
    } else {
        const EVENTS: [&str; 6] = ["low", "high", "max", "oom", "oom_kill", "oom_group_kill"];
        match read_small(&dir.join("memory.events"), buf) {
            Ok(t) => Ok(kv_lines(t)
                .filter_map(|(k, v)| EVENTS.iter().find(|e| **e == k).map(|e| (*e, v)))
                .collect()),
            Err(e) => absent(e),
        }
    }
}

/// One cgroup's values as of the last refresh.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Values {
    /// `(event, count)` in `memory.events` order (v1: `max`, then `oom_kill`).
    pub events: Vec<(&'static str, u64)>,
    /// PSI `some` and `full` totals in µs (cgroup v2 only).
    pub psi: Option<(u64, u64)>,
}

/// What a scrape renders: every admitted cgroup's values, in walk order, and when they were read.
#[derive(Default)]
pub struct Snapshot {
    pub at: Option<Instant>,
    pub values: Vec<(String, Values)>,
}

/// The values of the last refresh, shared with the scrape.
pub struct FileCache {
    disc: Arc<Discovery>,
    snap: Mutex<Arc<Snapshot>>,
    /// `sensor_memcg_file_read_failures_total{reason}`.
    failures: IntCounterVec,
    /// Serializes refreshes (the discovery loop's and a first scrape's).
    refreshing: Mutex<()>,
}

pub const FAILURES: &str = "sensor_memcg_file_read_failures_total";
pub const FAILURES_HELP: &str = "Cgroups whose memory.events (cgroup v1: memory.failcnt) the background refresh could not read: vanished (removed since the rescan that found them; their series go as they would have) or error.";
pub const AGE: &str = "sensor_memcg_cache_age_seconds";
pub const AGE_HELP: &str = "Age of the per-workload memory.events (v1: memory.failcnt, memory.memsw.failcnt, memory.oom_control) and memory.pressure values this scrape shows: seconds since the background refresh that read them started (at most probes.memcg.discovery_interval plus one refresh).";

impl FileCache {
    pub fn new(disc: Arc<Discovery>) -> prometheus::Result<FileCache> {
        let failures = IntCounterVec::new(prometheus::Opts::new(FAILURES, FAILURES_HELP), &["reason"])?;
        for f in Failure::ALL {
            failures.with_label_values(&[f.label()]).reset();
        }
        Ok(FileCache {
            disc,
            snap: Mutex::new(Arc::new(Snapshot::default())),
            failures,
            refreshing: Mutex::new(()),
        })
    }

    /// `sensor_memcg_file_read_failures_total`, for the registry.
    pub fn failures_metric(&self) -> IntCounterVec {
        self.failures.clone()
    }

    /// Reads every admitted cgroup's files (blocking file I/O: call it off the async threads).
    pub fn refresh(&self) {
        let _one = self.refreshing.locked();
        let at = Instant::now();
        let hier = &self.disc.hier;
        let mut buf = Vec::with_capacity(512);
        let cgroups = self.disc.cgroups();
        let mut values = Vec::with_capacity(cgroups.len());
        for cg in cgroups.into_iter().filter(|c| c.as_str() != "/") {
            let events = match memory_events(hier, &cg, &mut buf) {
                Ok(e) => e,
                Err(f) => {
                    self.failures.with_label_values(&[f.label()]).inc();
                    continue;
                }
            };
            let psi = if hier.memory_is_v1() {
                None
            } else {
                hier.memory_dir(&cg)
                    .and_then(|d| psi::read(&d.join("memory.pressure")))
                    .map(|p| (p.some.total_us, p.full.map_or(0, |f| f.total_us)))
            };
            values.push((cg, Values { events, psi }));
        }
        let snap = Arc::new(Snapshot { at: Some(at), values });
        *self.snap.locked() = snap;
    }

    /// The last refresh's values; the first call before any refresh reads the files itself (a
    /// scrape right at start), once.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        let current = || Arc::clone(&self.snap.locked());
        let s = current();
        if s.at.is_some() {
            return s;
        }
        self.refresh();
        current()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cgroup removed between the rescan and the refresh is counted as vanished and leaves
    /// the snapshot; the others keep their values.
    #[test]
    fn vanished_cgroups_are_counted_and_dropped() {
        let root = std::env::temp_dir().join(format!("sensor-files-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (cg, failcnt) in [("a", 3), ("b", 5)] {
            let d = root.join(cg);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("memory.failcnt"), format!("{failcnt}\n")).unwrap();
            std::fs::write(d.join("memory.memsw.failcnt"), "2\n").unwrap();
            std::fs::write(d.join("memory.oom_control"), "oom_kill_disable 0\noom_kill 1\n").unwrap();
        }
        let hier = Hierarchies {
            memory_v1: Some(root.clone()),
            unified: None,
        };
        let disc = Arc::new(Discovery::new(hier, 10, std::time::Duration::from_secs(60)));
        let cache = FileCache::new(disc).unwrap();
        let first = cache.snapshot();
        assert!(first.at.is_some());
        let got: Vec<(&str, &[(&str, u64)])> = first
            .values
            .iter()
            .map(|(c, v)| (c.as_str(), v.events.as_slice()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("/a", &[("max", 5), ("oom_kill", 1)][..]),
                ("/b", &[("max", 7), ("oom_kill", 1)][..])
            ]
        );
        // Gone before the next refresh; discovery still lists it.
        std::fs::remove_dir_all(root.join("b")).unwrap();
        cache.refresh();
        let second = cache.snapshot();
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(second.values.len(), 1);
        assert_eq!(second.values[0].0, "/a");
        let failures = cache.failures_metric();
        assert_eq!(failures.with_label_values(&["vanished"]).get(), 1);
        assert_eq!(failures.with_label_values(&["error"]).get(), 0);
        assert!(second.at > first.at);
    }
}
