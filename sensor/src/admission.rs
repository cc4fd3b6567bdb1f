//! One admission rule for every bounded workload set (the OOM history's sampled cgroups, the
//! workload labels of the TCP and memcg series, the OOM kill series): cgroups with recent
//! activity come before idle ones with processes, which come before empty ones. A full set
//! admits a candidate by displacing its least recently active member of a lower level; a
//! candidate that outranks no member is left out. Every cgroup left out (refused, or displaced
//! by a more active one) is counted once per exclusion in `sensor_workloads_left_out_total{set}`,
//! and `sensor_workloads_left_out{set}` says how many are out now.
//!
//! Levels, not fine-grained scores: two active workloads never displace each other, so a set
//! does not churn while the host is busy (a member's series keep their labels).

use std::collections::{HashMap, HashSet};

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// How much a cgroup is worth watching, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Level {
    /// No processes and no recent change.
    #[default]
    Empty = 0,
    /// Processes, but no recent change.
    Idle = 1,
    /// Created, grown, shrunk, hit its limit or reclaimed recently (or OOM-killed).
    Active = 2,
}

const LEVELS: usize = 3;

/// A cgroup's rank: its level, then when it was last active (larger is more recent), which
/// picks the member a newcomer displaces within the lowest level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Rank {
    pub level: Level,
    pub recent: u64,
}

impl Rank {
    pub const EMPTY: Rank = Rank {
        level: Level::Empty,
        recent: 0,
    };

    pub fn new(level: Level, recent: u64) -> Rank {
        Rank { level, recent }
    }
}

/// What [`Admission::admit`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Already a member (its rank is updated).
    Member,
    /// Admitted now; `Some` names the member it displaced (the caller drops what it kept for it).
    Admitted(Option<String>),
    /// The set is full of members at least as active.
    LeftOut,
}

impl Admit {
    pub fn is_in(&self) -> bool {
        !matches!(self, Admit::LeftOut)
    }
}

/// `sensor_workloads_left_out_total{set}` and `sensor_workloads_left_out{set}`, shared by every
/// bounded set (registered once by the daemon).
#[derive(Clone)]
pub struct LeftOutMetrics {
    total: IntCounterVec,
    now: IntGaugeVec,
}

impl Default for LeftOutMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl LeftOutMetrics {
    pub fn new() -> LeftOutMetrics {
        let total = IntCounterVec::new(
            Opts::new(
                "sensor_workloads_left_out_total",
                "Cgroups left out of a bounded workload set (limits.workloads_per_metric): refused, or displaced by a more active one; counted once per exclusion. set=oom_history (sampled for kill lead-ups), workload_labels (TCP and memcg series), oom_kills (kill series).",
            ),
            &["set"],
        );
        let now = IntGaugeVec::new(
            Opts::new(
                "sensor_workloads_left_out",
                "Live cgroups currently left out of a bounded workload set (see sensor_workloads_left_out_total).",
            ),
            &["set"],
        );
        match (total, now) {
            (Ok(total), Ok(now)) => LeftOutMetrics { total, now },
            // Static definitions; a failure is a programming error the tests catch.
            (Err(e), _) | (_, Err(e)) => panic!("sensor_workloads_left_out: {e}"),
        }
    }

    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.total.clone()))?;
        registry.register(Box::new(self.now.clone()))
    }

    /// The series of one set (created at 0, so they exist from the start).
    pub fn for_set(&self, set: &str) -> LeftOut {
        LeftOut {
            total: self.total.with_label_values(&[set]),
            now: self.now.with_label_values(&[set]),
        }
    }
}

/// One set's left-out series.
#[derive(Clone)]
pub struct LeftOut {
    total: IntCounter,
    now: IntGauge,
}

impl LeftOut {
    /// Series registered nowhere (unit tests, sets nobody scrapes).
    pub fn detached() -> LeftOut {
        LeftOutMetrics::new().for_set("detached")
    }

    pub fn total(&self) -> u64 {
        self.total.get()
    }
}

/// A bounded set of cgroups under the admission rule (see the module doc).
pub struct Admission {
    max: usize,
    members: HashMap<String, Rank>,
    /// Members per level, so a refusal costs no walk of the members.
    per_level: [usize; LEVELS],
    out: HashSet<String>,
    left_out: LeftOut,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("max", &self.max)
            .field("members", &self.members.len())
            .field("out", &self.out.len())
            .finish()
    }
}

impl Admission {
    pub fn new(max: usize, left_out: LeftOut) -> Admission {
        Admission {
            max: max.max(1),
            members: HashMap::new(),
            per_level: [0; LEVELS],
            out: HashSet::new(),
            left_out,
        }
    }

    /// Admits `cgroup` with `rank` if it is a member, there is room, or it outranks the least
    /// active member (which it displaces); else leaves it out.
    pub fn admit(&mut self, cgroup: &str, rank: Rank) -> Admit {
        if let Some(r) = self.members.get_mut(cgroup) {
            self.per_level[r.level as usize] -= 1;
            self.per_level[rank.level as usize] += 1;
            *r = rank;
            return Admit::Member;
        }
        if self.members.len() < self.max {
            self.insert(cgroup, rank);
            return Admit::Admitted(None);
        }
        let Some(lowest) = (0..rank.level as usize).find(|l| self.per_level[*l] > 0) else {
            self.exclude(cgroup);
            return Admit::LeftOut;
        };
        let victim = self
            .members
            .iter()
            .filter(|(_, r)| r.level as usize == lowest)
            .min_by(|a, b| a.1.recent.cmp(&b.1.recent).then_with(|| a.0.cmp(b.0)))
            .map(|(c, _)| c.clone());
        let Some(victim) = victim else {
            // per_level said there is one; an inconsistency must not admit past the bound.
            self.exclude(cgroup);
            return Admit::LeftOut;
        };
        self.remove_member(&victim);
        self.exclude(&victim);
        self.insert(cgroup, rank);
        Admit::Admitted(Some(victim))
    }

    /// Updates members' ranks (cgroups asked about rarely keep an up-to-date level).
    pub fn refresh(&mut self, rank_of: impl Fn(&str) -> Rank) {
        let mut per_level = [0; LEVELS];
        for (cg, r) in self.members.iter_mut() {
            *r = rank_of(cg);
            per_level[r.level as usize] += 1;
        }
        self.per_level = per_level;
    }

    /// Forgets cgroups `keep` rejects (vanished ones), members and left-out alike; returns the
    /// members removed.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let gone: Vec<String> = self.members.keys().filter(|c| !keep(c)).cloned().collect();
        for c in &gone {
            self.remove_member(c);
        }
        self.out.retain(|c| keep(c));
        self.publish();
        gone
    }

    /// Removes one cgroup (a member whose grace period ended).
    pub fn remove(&mut self, cgroup: &str) {
        self.remove_member(cgroup);
        self.out.remove(cgroup);
        self.publish();
    }

    pub fn contains(&self, cgroup: &str) -> bool {
        self.members.contains_key(cgroup)
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Cgroups left out now.
    pub fn left_out(&self) -> usize {
        self.out.len()
    }

    pub fn members(&self) -> impl Iterator<Item = &str> {
        self.members.keys().map(String::as_str)
    }

    fn insert(&mut self, cgroup: &str, rank: Rank) {
        self.members.insert(cgroup.to_string(), rank);
        self.per_level[rank.level as usize] += 1;
        if self.out.remove(cgroup) {
            self.publish();
        }
    }

    fn remove_member(&mut self, cgroup: &str) {
        if let Some(r) = self.members.remove(cgroup) {
            self.per_level[r.level as usize] -= 1;
        }
    }

    fn exclude(&mut self, cgroup: &str) {
        if !self.out.contains(cgroup) {
            self.out.insert(cgroup.to_string());
            self.left_out.total.inc();
            self.publish();
        }
    }

    fn publish(&self) {
        self.left_out.now.set(self.out.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(level: Level, recent: u64) -> Rank {
        Rank::new(level, recent)
    }

    #[test]
    fn active_displaces_idle_and_idle_displaces_empty_never_the_reverse() {
        let lo = LeftOut::detached();
        let mut a = Admission::new(2, lo.clone());
        assert_eq!(a.admit("/empty", r(Level::Empty, 0)), Admit::Admitted(None));
        assert_eq!(a.admit("/idle", r(Level::Idle, 0)), Admit::Admitted(None));
        // Full: another empty one is refused, an idle one displaces the empty member.
        assert_eq!(a.admit("/empty2", r(Level::Empty, 0)), Admit::LeftOut);
        assert_eq!(
            a.admit("/idle2", r(Level::Idle, 0)),
            Admit::Admitted(Some("/empty".into()))
        );
        // Now both members are idle: another idle one is refused (no churn among equals).
        assert_eq!(a.admit("/idle3", r(Level::Idle, 9)), Admit::LeftOut);
        // An active one displaces the least recently active idle member (ties by name).
        assert_eq!(
            a.admit("/grow", r(Level::Active, 5)),
            Admit::Admitted(Some("/idle".into()))
        );
        assert_eq!(
            a.admit("/grow2", r(Level::Active, 6)),
            Admit::Admitted(Some("/idle2".into()))
        );
        // Full of active members: a newly active one waits.
        assert_eq!(a.admit("/grow3", r(Level::Active, 7)), Admit::LeftOut);
        assert_eq!(a.len(), 2);
        assert!(a.contains("/grow") && a.contains("/grow2"));
        // Left out: /empty2, /idle3, /grow3, and the displaced /empty, /idle, /idle2.
        assert_eq!(a.left_out(), 6);
        assert_eq!(lo.total(), 6);
        // Asking again about one already out does not count it twice.
        assert_eq!(a.admit("/empty2", r(Level::Empty, 0)), Admit::LeftOut);
        assert_eq!(lo.total(), 6);
    }

    #[test]
    fn members_rank_updates_and_refresh_decide_who_goes() {
        let mut a = Admission::new(2, LeftOut::detached());
        a.admit("/a", r(Level::Active, 1));
        a.admit("/b", r(Level::Active, 2));
        assert_eq!(a.admit("/c", r(Level::Active, 3)), Admit::LeftOut);
        // /a went idle (seen through a refresh): the next active newcomer displaces it.
        a.refresh(|c| {
            if c == "/a" {
                r(Level::Idle, 1)
            } else {
                r(Level::Active, 2)
            }
        });
        assert_eq!(a.admit("/c", r(Level::Active, 3)), Admit::Admitted(Some("/a".into())));
        // A member's own admit updates its rank too.
        assert_eq!(a.admit("/b", r(Level::Empty, 0)), Admit::Member);
        assert_eq!(a.admit("/d", r(Level::Idle, 0)), Admit::Admitted(Some("/b".into())));
        assert_eq!(a.left_out(), 2, "/a and /b are out; /c came back in");
    }

    #[test]
    fn vanished_cgroups_leave_members_and_the_left_out_count() {
        let lo = LeftOut::detached();
        let mut a = Admission::new(1, lo.clone());
        a.admit("/a", r(Level::Idle, 0));
        assert_eq!(a.admit("/b", r(Level::Idle, 0)), Admit::LeftOut);
        assert_eq!(a.admit("/c", r(Level::Empty, 0)), Admit::LeftOut);
        assert_eq!(a.retain(|c| c != "/a" && c != "/c"), vec!["/a".to_string()]);
        assert_eq!((a.len(), a.left_out()), (0, 1));
        // The freed slot goes to whoever asks next, whatever its level.
        assert_eq!(a.admit("/b", r(Level::Empty, 0)), Admit::Admitted(None));
        assert_eq!(a.left_out(), 0);
        assert_eq!(lo.total(), 2, "the total keeps every exclusion");
        a.remove("/b");
        assert!(a.is_empty());
    }
}
