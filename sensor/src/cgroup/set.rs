//! The bounded workload set: which cgroups get series of their own under the admission rule.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use super::identity::{workload, OTHER};
use crate::admission::{Admission, Admit, LeftOut, Rank};

/// Bounds the workloads one metric family may label under the admission rule (see
/// `admission`): members get their own series, the rest fold into `cgroup="other"`; a more
/// active cgroup displaces an idle member. Cgroups whose directory is gone are released after
/// `grace`, and the caller drops their series. Probes hold theirs through the registry
/// (`Discovery::bounded_set`), whose rescans release them.
#[derive(Debug)]
pub struct WorkloadSet {
    grace: Duration,
    admission: Admission,
    /// Members whose directory vanished, since when.
    gone: HashMap<String, Instant>,
    /// Members the registry's rescans released, for the owner to drop their series (see
    /// [`Self::take_expired`]).
    expired: Vec<String>,
}

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
            expired: Vec::new(),
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

    /// [`Self::sweep`] for a set the registry holds for a probe: the expired members are kept
    /// until the probe takes them.
    pub(super) fn sweep_for_owner(&mut self, exists: impl Fn(&str) -> bool, now: Instant) {
        let expired = self.sweep(exists, now);
        self.expired.extend(expired);
    }

    /// The members released since the last call (gone past the grace period): the owner drops
    /// their series.
    pub fn take_expired(&mut self) -> Vec<String> {
        std::mem::take(&mut self.expired)
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_held_set_keeps_its_expired_members_for_its_owner() {
        let mut s = WorkloadSet::new(1, Duration::ZERO);
        assert_eq!(s.labels("/a")[0], "/a");
        assert_eq!(s.labels("/b")[0], OTHER, "bounded at one");
        s.sweep_for_owner(|c| c == "/b", Instant::now());
        assert_eq!(s.take_expired(), ["/a"]);
        assert!(s.take_expired().is_empty(), "taken once");
        assert!(s.is_empty());
        assert_eq!(s.labels("/b")[0], "/b", "slot freed");
    }
}
