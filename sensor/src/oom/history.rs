//! A short memory history per workload, so a kill can be explained by what led up to it.
//!
//! The OOM probe's upkeep samples each watched memory cgroup at `probes.oom.history.interval`
//! and keeps `window / interval` samples per cgroup, for at most `limits.workloads_per_metric`
//! cgroups. The kill path only reads this memory (plus one fresh read of the victim cgroup's
//! counters): it never walks files.

use std::collections::{HashMap, VecDeque};

use serde::Serialize;

use crate::{
    admission::{Admission, Admit, LeftOut, Rank},
    cgroup::Hierarchies,
};

/// One reading of a memory cgroup. Counters are the kernel's cumulative values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Wall-clock time (Unix seconds).
    pub at: f64,
    pub usage: u64,
    /// 0 when unlimited or unknown.
    pub limit: u64,
    /// Times the limit was hit: v2 `memory.events` max, v1 `memory.failcnt` (+ memsw).
    pub limit_hits: Option<u64>,
    /// PSI memory totals of the cgroup in microseconds (cgroup v2 only).
    pub psi_some_us: Option<u64>,
    pub psi_full_us: Option<u64>,
    /// Cumulative time tasks of the cgroup spent in reclaim, in nanoseconds (the memcg probe's
    /// kernel histograms, where it runs).
    pub reclaim_ns: Option<u64>,
}

/// A sample as kept in the rings: `None` as [`NONE`], so one is 56 bytes rather than 88.
#[derive(Debug, Clone, Copy)]
struct Stored {
    at: f64,
    usage: u64,
    limit: u64,
    limit_hits: u64,
    psi_some_us: u64,
    psi_full_us: u64,
    reclaim_ns: u64,
}

const NONE: u64 = u64::MAX;

/// Bytes one kept sample costs (the README's memory figure).
pub const SAMPLE_BYTES: usize = std::mem::size_of::<Stored>();

impl From<Sample> for Stored {
    fn from(s: Sample) -> Stored {
        Stored {
            at: s.at,
            usage: s.usage,
            limit: s.limit,
            limit_hits: s.limit_hits.unwrap_or(NONE),
            psi_some_us: s.psi_some_us.unwrap_or(NONE),
            psi_full_us: s.psi_full_us.unwrap_or(NONE),
            reclaim_ns: s.reclaim_ns.unwrap_or(NONE),
        }
    }
}

impl From<Stored> for Sample {
    fn from(s: Stored) -> Sample {
        let opt = |v: u64| (v != NONE).then_some(v);
        Sample {
            at: s.at,
            usage: s.usage,
            limit: s.limit,
            limit_hits: opt(s.limit_hits),
            psi_some_us: opt(s.psi_some_us),
            psi_full_us: opt(s.psi_full_us),
            reclaim_ns: opt(s.reclaim_ns),
        }
    }
}

/// Kills older than this no longer count as earlier kills of a workload.
pub const KILL_MEMORY_SECS: f64 = 3600.0;
/// Earlier kills remembered per workload (enough for any verdict).
const KILLS_KEPT: usize = 64;

/// Bounded per-cgroup sample rings and recent kill times. Which cgroups get a ring follows the
/// admission rule (`admission`): active ones before idle ones before empty ones.
#[derive(Debug)]
pub struct History {
    capacity: usize,
    max_workloads: usize,
    watched: Admission,
    samples: HashMap<String, VecDeque<Stored>>,
    kills: HashMap<String, VecDeque<f64>>,
}

impl History {
    pub fn new(capacity: usize, max_workloads: usize) -> History {
        History::with_left_out(capacity, max_workloads, LeftOut::detached())
    }

    pub fn with_left_out(capacity: usize, max_workloads: usize, left_out: LeftOut) -> History {
        History {
            capacity: capacity.max(2),
            max_workloads: max_workloads.max(1),
            watched: Admission::new(max_workloads, left_out),
            samples: HashMap::new(),
            kills: HashMap::new(),
        }
    }

    /// Whether `cgroup` is (now) watched: a more active cgroup displaces the least active
    /// member, whose samples go.
    pub fn admit(&mut self, cgroup: &str, rank: Rank) -> bool {
        match self.watched.admit(cgroup, rank) {
            Admit::LeftOut => false,
            Admit::Member | Admit::Admitted(None) => true,
            Admit::Admitted(Some(d)) => {
                self.samples.remove(&d);
                true
            }
        }
    }

    /// Adds a sample of a watched cgroup (one not watched yet is admitted without a rank: it
    /// takes a free slot, never a member's).
    pub fn record(&mut self, cgroup: &str, s: Sample) {
        if !self.watched.contains(cgroup) && !self.admit(cgroup, Rank::EMPTY) {
            return;
        }
        let ring = self.samples.entry(cgroup.to_string()).or_default();
        if ring.len() >= self.capacity {
            ring.pop_front();
        }
        ring.push_back(s.into());
    }

    /// The newest `n` samples of `cgroup`, oldest first.
    pub fn last(&self, cgroup: &str, n: usize) -> Vec<Sample> {
        self.samples
            .get(cgroup)
            .map(|r| {
                r.iter()
                    .skip(r.len().saturating_sub(n))
                    .map(|s| Sample::from(*s))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The cgroups watched now.
    pub fn watched(&self) -> impl Iterator<Item = &str> {
        self.watched.members()
    }

    /// Samples of `cgroup` taken before `t`, oldest first.
    pub fn before(&self, cgroup: &str, t: f64) -> Vec<Sample> {
        self.samples
            .get(cgroup)
            .map(|r| r.iter().filter(|s| s.at <= t).map(|s| Sample::from(*s)).collect())
            .unwrap_or_default()
    }

    /// Records a kill and returns the times of the workload's earlier kills in the last hour.
    pub fn note_kill(&mut self, cgroup: &str, t: f64) -> Vec<f64> {
        if !self.kills.contains_key(cgroup) && self.kills.len() >= self.max_workloads {
            return Vec::new();
        }
        let k = self.kills.entry(cgroup.to_string()).or_default();
        k.retain(|x| *x > t - KILL_MEMORY_SECS);
        let earlier: Vec<f64> = k.iter().copied().filter(|x| *x < t).collect();
        if k.len() >= KILLS_KEPT {
            k.pop_front();
        }
        k.push_back(t);
        earlier
    }

    /// Drops cgroups `keep` rejects (vanished ones), freeing their slots.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.watched.retain(&keep);
        self.samples.retain(|c, _| keep(c));
        self.kills.retain(|c, _| keep(c));
    }

    pub fn len(&self) -> usize {
        self.watched.len()
    }

    /// Cgroups left out now.
    pub fn left_out(&self) -> usize {
        self.watched.left_out()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

fn read_u64(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `total=` of the `some` and `full` lines of a pressure file.
pub fn parse_psi_totals(text: &str) -> (Option<u64>, Option<u64>) {
    let total = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("total=")))
            .and_then(|v| v.parse().ok())
    };
    (total("some "), total("full "))
}

/// Reads one sample of a memory cgroup (four small files) with its last published reclaim
/// time; `None` when it is gone.
pub fn read_sample(h: &Hierarchies, cgroup: &str, at: f64, reclaim_ns: Option<u64>) -> Option<Sample> {
    let dir = h.memory_dir(cgroup)?;
    let (limit, usage) = h.memory_limit_usage(cgroup);
    let usage = usage?;
    let (limit_hits, psi) = if h.memory_is_v1() {
        let hits =
            read_u64(&dir.join("memory.failcnt")).map(|f| f + read_u64(&dir.join("memory.memsw.failcnt")).unwrap_or(0));
        (hits, (None, None))
    } else {
        let hits = std::fs::read_to_string(dir.join("memory.events")).ok().and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("max "))
                .and_then(|v| v.trim().parse().ok())
        });
        let psi = std::fs::read_to_string(dir.join("memory.pressure"))
            .map(|t| parse_psi_totals(&t))
            .unwrap_or((None, None));
        (hits, psi)
    };
    Some(Sample {
        at,
        usage,
        limit: limit.unwrap_or(0),
        limit_hits,
        psi_some_us: psi.0,
        psi_full_us: psi.1,
        reclaim_ns,
    })
}

/// `(MemTotal, MemAvailable)` from /proc/meminfo in bytes.
pub fn host_memory() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb.saturating_mul(1024))
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

/// One of the host's largest memory users, for the lead-up of a global kill.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemUser {
    pub pid: i32,
    pub comm: String,
    pub rss_bytes: u64,
}

/// The `n` processes with the most resident memory, from /proc/<pid>/statm (a walk of /proc:
/// done in the upkeep, never on the kill path).
pub fn top_users(n: usize) -> Vec<MemUser> {
    let page = procfs::page_size();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut all: Vec<MemUser> = rd
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter_map(|pid| {
            let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
            let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            Some(MemUser {
                pid,
                comm: comm.trim().to_string(),
                rss_bytes: pages.saturating_mul(page),
            })
        })
        .collect();
    largest(&mut all, n);
    all
}

/// Keeps the `n` largest users, largest first.
pub fn largest(users: &mut Vec<MemUser>, n: usize) {
    users.sort_by(|a, b| b.rss_bytes.cmp(&a.rss_bytes).then(a.pid.cmp(&b.pid)));
    users.truncate(n);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(at: f64, usage: u64) -> Sample {
        Sample {
            at,
            usage,
            ..Sample::default()
        }
    }

    #[test]
    fn rings_and_workloads_are_bounded() {
        let mut h = History::new(3, 2);
        for i in 0..5 {
            h.record("/a", s(f64::from(i), 1));
        }
        h.record("/b", s(0.0, 1));
        h.record("/c", s(0.0, 1));
        assert_eq!(
            h.before("/a", 10.0).iter().map(|x| x.at).collect::<Vec<_>>(),
            [2.0, 3.0, 4.0]
        );
        assert_eq!(h.before("/a", 3.0).len(), 2);
        assert!(h.before("/c", 10.0).is_empty(), "third workload not admitted");
        h.retain(|c| c != "/a");
        h.record("/c", s(0.0, 1));
        assert_eq!(h.len(), 2, "slot freed by the vanished cgroup");
    }

    #[test]
    fn an_active_cgroup_displaces_an_idle_one_and_its_samples() {
        use crate::admission::Level;
        let mut h = History::new(3, 2);
        assert!(h.admit("/idle", Rank::new(Level::Idle, 0)));
        assert!(h.admit("/empty", Rank::EMPTY));
        h.record("/idle", s(0.0, 1));
        h.record("/empty", s(0.0, 1));
        assert!(!h.admit("/empty2", Rank::EMPTY));
        assert!(h.admit("/grow", Rank::new(Level::Active, 3)));
        assert!(h.before("/empty", 10.0).is_empty(), "displaced: its samples went");
        h.record("/grow", s(1.0, 5));
        assert!(h.admit("/grow2", Rank::new(Level::Active, 4)));
        assert_eq!(h.before("/grow", 10.0).len(), 1);
        assert!(!h.admit("/grow3", Rank::new(Level::Active, 5)), "members as active");
        assert_eq!((h.len(), h.left_out()), (2, 4));
        h.record("/grow3", s(1.0, 5));
        assert!(h.before("/grow3", 10.0).is_empty(), "a left-out cgroup gets no ring");
    }

    #[test]
    fn samples_are_kept_compact_and_whole() {
        assert_eq!(SAMPLE_BYTES, 56, "the README's memory figure");
        let full = Sample {
            at: 1.5,
            usage: 2,
            limit: 3,
            limit_hits: Some(4),
            psi_some_us: Some(5),
            psi_full_us: None,
            reclaim_ns: Some(6),
        };
        assert_eq!(Sample::from(Stored::from(full)), full);
    }

    #[test]
    fn earlier_kills_within_the_hour() {
        let mut h = History::new(3, 10);
        assert!(h.note_kill("/a", 100.0).is_empty());
        assert_eq!(h.note_kill("/a", 200.0), [100.0]);
        assert_eq!(h.note_kill("/a", 100.0 + KILL_MEMORY_SECS + 1.0), [200.0]);
        assert!(h.note_kill("/b", 300.0).is_empty());
    }

    #[test]
    fn largest_users_first() {
        let u = |pid, rss| MemUser {
            pid,
            comm: format!("p{pid}"),
            rss_bytes: rss,
        };
        let mut v = vec![u(1, 10), u(2, 30), u(3, 20), u(4, 30)];
        largest(&mut v, 3);
        assert_eq!(v, [u(2, 30), u(4, 30), u(3, 20)]);
        assert!(host_memory().is_some_and(|(t, a)| t >= a && t > 0));
        assert!(!top_users(3).is_empty(), "this process at least");
    }

    #[test]
    fn psi_totals() {
        let t = "some avg10=0.00 avg60=0.00 avg300=0.00 total=1234\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=56\n";
        assert_eq!(parse_psi_totals(t), (Some(1234), Some(56)));
        assert_eq!(parse_psi_totals(""), (None, None));
    }
}
