//! When vanished cgroups are forgotten: their ids, their container ids, kernel map keys.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use super::registry::Known;

/// Forgets the paths of vanished cgroup ids no series needs any more. The first rescan that
/// finds an id gone keeps it: the slices' upkeep after that rescan still labels (and, for a
/// workload folded into `other`, retires) its kernel map keys. A workload with series of its
/// own (`named` when it vanished) keeps its path for twice the grace period, so its series keep
/// their labels until the slices drop them (after the grace period); a folded one is forgotten
/// at the next rescan.
pub(super) fn forget_vanished(
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
