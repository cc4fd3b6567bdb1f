//! The label values of each workload's series in the OOM families, so a workload that leaves
//! the kill series' set has exactly its own series dropped (no scan of every family).

use std::collections::{HashMap, HashSet};

use crate::cgroup::WorkloadLabels;

/// Label values by the `cgroup` label they carry.
#[derive(Debug, Default)]
pub(super) struct Series {
    /// `sensor_oom_kills_total`'s: scope, reason, the workload's, owner.
    kills: HashMap<String, HashSet<Vec<String>>>,
    /// Those of the families labelled by the workload alone (victim RSS, last kill, and after
    /// `memcg` the discrepancy).
    workloads: HashMap<String, HashSet<WorkloadLabels>>,
}

impl Series {
    /// Notes a kill series' label values (the workload's from the third on).
    pub(super) fn note_kill(&mut self, labels: &[&str]) {
        let Some(cg) = labels.get(2) else { return };
        let values = labels.iter().map(|l| (*l).to_string()).collect();
        self.kills.entry((*cg).to_string()).or_default().insert(values);
    }

    /// Notes workload labels a series carries.
    pub(super) fn note_workload(&mut self, l: &WorkloadLabels) {
        self.workloads.entry(l[0].clone()).or_default().insert(l.clone());
    }

    /// Forgets the series labelled `cgroup="<cg>"` and returns their label values: the kill
    /// series', and the workload labels of the others.
    pub(super) fn take(&mut self, cg: &str) -> (Vec<Vec<String>>, Vec<WorkloadLabels>) {
        let kills = self.kills.remove(cg).unwrap_or_default();
        let workloads = self.workloads.remove(cg).unwrap_or_default();
        (kills.into_iter().collect(), workloads.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workloads_series_are_taken_once_and_no_others() {
        let mut s = Series::default();
        let wl = |cg: &str, pod: &str| -> WorkloadLabels {
            std::array::from_fn(|i| [cg, "", "", "", pod, ""][i].to_string())
        };
        s.note_kill(&["memcg", "growth", "/a", "", "", "", "", "", "", ""]);
        s.note_kill(&["memcg", "limit", "/a", "", "", "", "", "", "", ""]);
        s.note_kill(&["memcg", "growth", "/b", "", "", "", "", "", "", ""]);
        s.note_workload(&wl("/a", ""));
        s.note_workload(&wl("/a", "named-later"));
        s.note_workload(&wl("/b", ""));
        let (kills, workloads) = s.take("/a");
        assert_eq!((kills.len(), workloads.len()), (2, 2));
        assert_eq!(s.take("/a"), (vec![], vec![]));
        assert_eq!(s.take("/b").0.len(), 1);
    }
}
