//! Which cgroups are doing something: the rank the bounded workload sets admit by (see
//! `admission`). Each scheduled rescan reads a few small files per cgroup
//! (`cgroup::read_activity`), on the rescan's blocking thread: whether it has processes (v1 `cgroup.procs`, v2 `cgroup.events`
//! populated), its usage, and its limit hits; the memcg probe's reclaim time comes for free.
//! A change since the last activity (usage by [`USAGE_STEP`] or more, a limit hit, reclaim) or
//! the cgroup's creation makes it active for [`ACTIVE_FOR`].

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::{
    admission::{Level, Rank},
    sync::Lock as _,
};

/// How long a change keeps a cgroup active.
pub const ACTIVE_FOR: Duration = Duration::from_secs(300);
/// A usage change this large since the last activity is activity (idle noise stays below).
pub const USAGE_STEP: u64 = 1 << 20;

/// One read of a cgroup's activity signals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reading {
    pub populated: bool,
    pub usage: Option<u64>,
    pub limit_hits: Option<u64>,
    pub reclaim_ns: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct State {
    /// The reading at the last activity (or the first one): changes are measured from it, so a
    /// slow leak adds up to a step.
    base: Reading,
    populated: bool,
    last_active: Option<Instant>,
}

/// Cumulative reclaim time (ns) per cgroup path, as the probe that measures it (memcg) last
/// published it; read by others (an OOM kill's lead-up, the registry's ranks). The pipeline
/// makes one and gives it to every probe in their start context.
#[derive(Debug, Default)]
pub struct ReclaimTimes(Mutex<Option<HashMap<String, u64>>>);

impl ReclaimTimes {
    /// Replaces the published times.
    pub fn publish(&self, by_path: HashMap<String, u64>) {
        *self.0.locked() = Some(by_path);
    }

    /// The last published time of `cgroup` (ns): 0 for a cgroup that has not reclaimed yet,
    /// `None` while nothing measures it.
    pub fn of(&self, cgroup: &str) -> Option<u64> {
        self.0.locked().as_ref().map(|m| m.get(cgroup).copied().unwrap_or(0))
    }
}

/// Activity per cgroup path, from successive scans.
#[derive(Debug)]
pub struct Tracker {
    origin: Instant,
    scans: u64,
    seen: HashMap<String, State>,
    /// Paths the latest walk found (any walk, also one forced between two scans).
    live: HashSet<String>,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker::new(Instant::now())
    }
}

impl Tracker {
    pub fn new(origin: Instant) -> Tracker {
        Tracker {
            origin,
            scans: 0,
            seen: HashMap::new(),
            live: HashSet::new(),
        }
    }

    /// Records one scan: `readings` of every live cgroup at `now`; cgroups missing from it are
    /// forgotten. Cgroups that appear after the first scan were just created: active.
    pub fn scan(&mut self, readings: impl IntoIterator<Item = (String, Reading)>, now: Instant) {
        let first = self.scans == 0;
        self.scans += 1;
        let mut next = HashMap::with_capacity(self.seen.len());
        for (cg, r) in readings {
            let st = match self.seen.remove(&cg) {
                None => State {
                    base: r,
                    populated: r.populated,
                    last_active: (!first && r.populated).then_some(now),
                },
                Some(mut st) => {
                    st.populated = r.populated;
                    if changed(&st.base, &r) {
                        st.base = r;
                        st.last_active = Some(now);
                    }
                    st
                }
            };
            next.insert(cg, st);
        }
        self.seen = next;
    }

    /// The paths a walk found: one without a scan yet is new, one missing is gone.
    pub fn walked(&mut self, paths: impl IntoIterator<Item = String>) {
        self.live = paths.into_iter().collect();
    }

    /// Marks a cgroup active now (an OOM kill in it).
    pub fn note_active(&mut self, cgroup: &str, now: Instant) {
        if let Some(st) = self.seen.get_mut(cgroup) {
            st.last_active = Some(now);
        }
    }

    /// A cgroup's rank at `now`. One the latest walk found but no scan read yet is new, hence
    /// active (after the first scan); one the walk did not find is gone: lowest.
    pub fn rank(&self, cgroup: &str, now: Instant) -> Rank {
        if !self.live.contains(cgroup) {
            return Rank::EMPTY;
        }
        let Some(st) = self.seen.get(cgroup) else {
            return if self.scans == 0 {
                Rank::EMPTY
            } else {
                Rank::new(Level::Active, self.secs(now))
            };
        };
        let recent = st.last_active.map_or(0, |t| self.secs(t));
        let level = match st.last_active {
            Some(t) if now.saturating_duration_since(t) < ACTIVE_FOR => Level::Active,
            _ if st.populated => Level::Idle,
            _ => Level::Empty,
        };
        Rank::new(level, recent)
    }

    fn secs(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.origin).as_secs() + 1
    }
}

/// Whether `r` differs from `base` by activity: usage moved by a step (an empty cgroup only
/// counts a rise: its cache shrinking under reclaim is not its doing), a limit hit, reclaim.
fn changed(base: &Reading, r: &Reading) -> bool {
    let grew = |a: Option<u64>, b: Option<u64>| matches!((a, b), (Some(a), Some(b)) if b > a);
    let usage = match (base.usage, r.usage) {
        (Some(a), Some(b)) if r.populated => a.abs_diff(b) >= USAGE_STEP,
        (Some(a), Some(b)) => b >= a.saturating_add(USAGE_STEP),
        _ => false,
    };
    usage || grew(base.limit_hits, r.limit_hits) || grew(base.reclaim_ns, r.reclaim_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn rd(populated: bool, usage: u64) -> Reading {
        Reading {
            populated,
            usage: Some(usage),
            ..Reading::default()
        }
    }

    #[test]
    fn levels_from_successive_scans() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        assert_eq!(t.rank("/x", t0), Rank::EMPTY, "nothing scanned yet");
        t.walked(["/empty", "/idle", "/new", "/new-empty", "/unseen"].map(String::from));
        t.scan(
            [("/empty".into(), rd(false, 0)), ("/idle".into(), rd(true, 10 * MIB))],
            t0,
        );
        // The first scan knows nothing about change: empty or idle.
        assert_eq!(t.rank("/empty", t0).level, Level::Empty);
        assert_eq!(t.rank("/idle", t0).level, Level::Idle);
        let t1 = t0 + Duration::from_secs(10);
        t.scan(
            [
                ("/empty".into(), rd(false, 0)),
                ("/idle".into(), rd(true, 10 * MIB + MIB / 2)),
                ("/new".into(), rd(true, MIB)),
                ("/new-empty".into(), rd(false, 0)),
            ],
            t1,
        );
        assert_eq!(t.rank("/idle", t1).level, Level::Idle, "half a MiB is noise");
        assert_eq!(t.rank("/new", t1).level, Level::Active, "created after the first scan");
        assert_eq!(t.rank("/new-empty", t1).level, Level::Empty);
        assert_eq!(t.rank("/unseen", t1).level, Level::Active, "walked, not read yet: new");
        assert_eq!(t.rank("/elsewhere", t1), Rank::EMPTY, "not walked: gone");
        // Noise adds up to a step from the last activity (a slow leak is seen).
        let t2 = t1 + Duration::from_secs(10);
        t.scan(
            [("/idle".into(), rd(true, 11 * MIB)), ("/new".into(), rd(true, MIB))],
            t2,
        );
        assert_eq!(t.rank("/idle", t2).level, Level::Active);
        assert!(t.rank("/idle", t2) > t.rank("/new", t2), "more recently active");
        // Activity wears off after ACTIVE_FOR.
        let later = t2 + ACTIVE_FOR;
        assert_eq!(t.rank("/idle", later).level, Level::Idle);
        t.note_active("/idle", later);
        assert_eq!(t.rank("/idle", later).level, Level::Active, "an OOM kill");
    }

    #[test]
    fn limit_hits_and_reclaim_are_activity_and_empty_cgroups_only_grow() {
        let base = Reading {
            populated: true,
            usage: Some(50 * MIB),
            limit_hits: Some(3),
            reclaim_ns: Some(100),
        };
        assert!(!changed(&base, &base));
        assert!(changed(
            &base,
            &Reading {
                limit_hits: Some(4),
                ..base
            }
        ));
        assert!(changed(
            &base,
            &Reading {
                reclaim_ns: Some(101),
                ..base
            }
        ));
        assert!(changed(
            &base,
            &Reading {
                usage: Some(49 * MIB),
                ..base
            }
        ));
        let empty = Reading {
            populated: false,
            ..base
        };
        assert!(!changed(
            &empty,
            &Reading {
                usage: Some(40 * MIB),
                ..empty
            }
        ));
        assert!(changed(
            &empty,
            &Reading {
                usage: Some(51 * MIB),
                ..empty
            }
        ));
    }
}
