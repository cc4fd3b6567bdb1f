//! When vanished cgroups are forgotten: their ids (and with them every probe's kernel map keys
//! and state), their container ids.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use super::registry::Known;

/// The one lifetime of cgroup ids after they vanish, for every probe: an id is retired once, by
/// the scheduled rescan that finds it gone long enough, and every probe drops its state for the
/// ids of that rescan's batch (`Running::after_discovery`); no probe keeps a clock of its own.
#[derive(Default)]
pub(super) struct Retirement {
    /// Ids asked for that no walk found (they came and went between two), since when.
    unknown: HashMap<u64, Instant>,
    /// The ids the last scheduled rescan retired; their paths are forgotten at the next one, so
    /// the probes' upkeep after the retiring rescan still labels their keys.
    retired: Arc<[u64]>,
}

/// Ids asked for but never found that are tracked at most (beyond, they are not retired).
const UNKNOWN_MAX: usize = 20_000;

impl Retirement {
    /// The ids the last scheduled rescan retired.
    pub(super) fn retired(&self) -> Arc<[u64]> {
        Arc::clone(&self.retired)
    }

    /// Notes an id a probe asked for that no walk found.
    pub(super) fn note_unknown(&mut self, id: u64, now: Instant) {
        if self.unknown.len() < UNKNOWN_MAX {
            self.unknown.entry(id).or_insert(now);
        }
    }

    /// One scheduled rescan's step. Forgets the paths of the ids the previous step retired,
    /// then retires: an id whose workload is folded into `other` at the second rescan that finds
    /// it gone (the upkeep after the first moved its keys' counts into `other`); one with series
    /// of its own (`named` when it vanished, or since) `grace` after it was first found gone, so
    /// its series keep their labels until then; an id no walk found `grace` after it was first
    /// asked for. A live id is never retired.
    pub(super) fn step(
        &mut self,
        by_id: &mut HashMap<u64, Known>,
        live: &HashSet<u64>,
        now: Instant,
        grace: Duration,
        named: impl Fn(&str) -> bool,
    ) -> Arc<[u64]> {
        for id in self.retired.iter() {
            if !live.contains(id) {
                by_id.remove(id);
            }
        }
        let mut retired = Vec::new();
        for (id, k) in by_id.iter_mut() {
            if live.contains(id) {
                k.gone = None;
                continue;
            }
            match k.gone {
                None => k.gone = Some((now, named(&k.path))),
                Some((since, ref mut was_named)) => {
                    // Admitted after it vanished (its kernel keys labelled it first): named too.
                    *was_named = *was_named || named(&k.path);
                    if !*was_named || now.duration_since(since) >= grace {
                        retired.push(*id);
                    }
                }
            }
        }
        self.unknown.retain(|id, since| {
            if live.contains(id) || by_id.contains_key(id) {
                return false;
            }
            let due = now.duration_since(*since) >= grace;
            if due {
                retired.push(*id);
            }
            !due
        });
        self.retired = retired.into();
        Arc::clone(&self.retired)
    }
}

/// Notes which container ids are live; returns those gone for `grace` (then forgotten).
pub(super) fn track_containers(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn known(p: &str) -> Known {
        Known {
            path: p.into(),
            gone: None,
        }
    }

    #[test]
    fn an_id_is_retired_once_then_forgotten() {
        let mut r = Retirement::default();
        let mut by_id: HashMap<u64, Known> = [(1, known("/named")), (2, known("/folded")), (3, known("/live"))].into();
        let live: HashSet<u64> = [3].into();
        let g = Duration::from_secs(60);
        let t0 = Instant::now();
        let named = |p: &str| p == "/named";
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(r.step(&mut by_id, &live, t0, g, named).is_empty(), "first seen gone");
        assert_eq!(by_id.len(), 3);
        // Folded into `other`: retired at the next rescan, its path kept one more.
        assert_eq!(&*r.step(&mut by_id, &live, at(5), g, named), [2]);
        assert!(by_id.contains_key(&2), "its keys are still labelled after this rescan");
        assert!(r.step(&mut by_id, &live, at(10), g, named).is_empty(), "retired once");
        assert!(!by_id.contains_key(&2), "then forgotten");
        // Named: after the grace period, whatever its set says by then.
        assert!(r.step(&mut by_id, &live, at(59), g, |_| false).is_empty());
        assert_eq!(&*r.step(&mut by_id, &live, at(60), g, |_| false), [1]);
        assert_eq!(r.retired().len(), 1, "every probe reads the same batch");
        assert!(r.step(&mut by_id, &live, at(65), g, |_| false).is_empty());
        assert_eq!(by_id.keys().copied().collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn a_live_id_is_never_retired() {
        let mut r = Retirement::default();
        let mut by_id: HashMap<u64, Known> = [(3, known("/live"))].into();
        let live: HashSet<u64> = [3].into();
        let t0 = Instant::now();
        for s in [0, 100, 10_000] {
            let retired = r.step(&mut by_id, &live, t0 + Duration::from_secs(s), Duration::ZERO, |_| {
                false
            });
            assert!(retired.is_empty());
        }
        // Asked for while unknown, then found by a walk: live, not retired.
        r.note_unknown(3, t0);
        assert!(r
            .step(&mut by_id, &live, t0 + Duration::from_secs(99), Duration::ZERO, |_| {
                false
            })
            .is_empty());
        assert!(by_id.contains_key(&3));
    }

    #[test]
    fn an_id_no_walk_found_is_retired_after_the_grace_period() {
        let mut r = Retirement::default();
        let mut by_id = HashMap::new();
        let live = HashSet::new();
        let (t0, g) = (Instant::now(), Duration::from_secs(60));
        r.note_unknown(7, t0);
        r.note_unknown(7, t0 + Duration::from_secs(30));
        assert!(r
            .step(&mut by_id, &live, t0 + Duration::from_secs(59), g, |_| false)
            .is_empty());
        assert_eq!(
            &*r.step(&mut by_id, &live, t0 + Duration::from_secs(60), g, |_| false),
            [7]
        );
        assert!(r
            .step(&mut by_id, &live, t0 + Duration::from_secs(120), g, |_| false)
            .is_empty());
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
