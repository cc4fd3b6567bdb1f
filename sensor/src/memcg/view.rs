//! The memcg probe's part of the web summary: host PSI over the last 10 minutes (sampled
//! here every 5 s), the workloads with most reclaim time and most `max` events, read from the
//! state its metrics export (the reclaim map, the files' snapshot).

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{json, Map, Value};
use tokio::sync::watch;

use super::{psi, running::MemcgSlice, HOST_PSI};
use crate::{
    cgroup::WorkloadLabels,
    probe::{View, ViewSpec},
    sync::Lock as _,
};

pub(super) const VIEW: ViewSpec = ViewSpec {
    key: "memory",
    recent: &[],
    timeline: None,
    holding: None,
    idle: || section(&Workloads::default(), Vec::new()),
};

/// Host PSI sampling.
const PSI_EVERY: Duration = Duration::from_secs(5);
/// Samples kept: 10 minutes and two more.
const PSI_SAMPLES: usize = 122;
/// Rows in each top-N list.
const TOP: usize = 10;

/// One host PSI reading: totals of stalled time (microseconds), as read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct PsiSample {
    pub at: f64,
    pub some_us: u64,
    pub full_us: Option<u64>,
}

/// The host PSI readings of the last 10 minutes.
#[derive(Default)]
pub(super) struct PsiHistory(Mutex<VecDeque<PsiSample>>);

impl PsiHistory {
    pub(super) fn add(&self, s: PsiSample) {
        let mut q = self.0.locked();
        if q.len() >= PSI_SAMPLES {
            q.pop_front();
        }
        q.push_back(s);
    }

    /// `[unix time, some, full]` per sample, as the share of time stalled since the previous
    /// sample (0..1); `full` null where the kernel has none.
    pub(super) fn shares(&self) -> Vec<(f64, f64, Option<f64>)> {
        let q = self.0.locked();
        q.iter()
            .zip(q.iter().skip(1))
            .filter_map(|(a, b)| {
                let dt_us = (b.at - a.at) * 1e6;
                if dt_us <= 0.0 {
                    return None;
                }
                let share = |x: u64, y: u64| (y.saturating_sub(x) as f64 / dt_us).clamp(0.0, 1.0);
                let full = match (a.full_us, b.full_us) {
                    (Some(x), Some(y)) => Some(share(x, y)),
                    _ => None,
                };
                Some((b.at, share(a.some_us, b.some_us), full))
            })
            .collect()
    }
}

/// Samples host PSI every 5 s until `stop`.
pub(super) fn spawn_sampler(slice: Arc<MemcgSlice>, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PSI_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            // A procfs read of a few hundred bytes: no need to leave the async worker.
            if let Some(p) = psi::read(Path::new(HOST_PSI)) {
                slice.psi.add(PsiSample {
                    at: crate::kernel::clock::unix_seconds(std::time::SystemTime::now()),
                    some_us: p.some.total_us,
                    full_us: p.full.map(|f| f.total_us),
                });
            }
        }
    })
}

/// Per workload: reclaim `(seconds, stalls)`, and its `max` events.
#[derive(Default)]
pub(super) struct Workloads {
    pub reclaim: BTreeMap<WorkloadLabels, (f64, f64)>,
    pub max_events: BTreeMap<WorkloadLabels, f64>,
    /// Workloads with reclaim or memory.events values.
    pub seen: BTreeSet<WorkloadLabels>,
}

fn row(l: &WorkloadLabels, value: f64, count: f64) -> Value {
    json!({"cgroup": l[0], "container_id": l[1], "pod_uid": l[2], "value": value, "count": count})
}

fn top(mut rows: Vec<(f64, Value)>) -> Value {
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    rows.truncate(TOP);
    Value::Array(rows.into_iter().map(|(_, v)| v).collect())
}

/// The section from the workloads' values and the PSI shares.
pub(super) fn section(w: &Workloads, psi: Vec<(f64, f64, Option<f64>)>) -> View {
    let reclaim = w
        .reclaim
        .iter()
        .filter(|(_, (s, n))| *s > 0.0 || *n > 0.0)
        .map(|(l, (s, n))| (*s, row(l, *s, *n)))
        .collect();
    let max = w
        .max_events
        .iter()
        .filter(|(_, v)| **v > 0.0)
        .map(|(l, v)| (*v, row(l, *v, 0.0)))
        .collect();
    let mut fields = Map::new();
    fields.insert("psi".into(), json!(psi));
    fields.insert("top_reclaim".into(), top(reclaim));
    fields.insert("top_max_events".into(), top(max));
    fields.insert("workloads".into(), json!(w.seen.len()));
    View {
        fields,
        ..View::default()
    }
}

impl MemcgSlice {
    /// Reclaim per workload from the kernel map (live keys and retired ones), `max` events
    /// from the files' snapshot.
    pub(super) fn workloads(&self) -> Workloads {
        let mut w = Workloads::default();
        if let Some(hist) = &self.reclaim {
            for (id, [h]) in hist.snapshot().iter() {
                if h.buckets.iter().all(|&b| b == 0) {
                    continue;
                }
                let e = w.reclaim.entry(self.disc.labels_for_id(*id)).or_default();
                e.0 += h.sum as f64 / 1e9;
                e.1 += h.buckets.iter().sum::<u64>() as f64;
            }
            for (l, [h]) in hist.retired() {
                let e = w.reclaim.entry(crate::cgroup::workload_labels_from(&l)).or_default();
                e.0 += h.sum as f64 / 1e9;
                e.1 += h.buckets.iter().sum::<u64>() as f64;
            }
        }
        let snap = self.files.snapshot();
        let (_, ev_sum) = super::metrics::sums(&snap, |cg| self.disc.labels(cg));
        for ((l, event), n) in ev_sum {
            if event == "max" {
                *w.max_events.entry(l.clone()).or_default() += n as f64;
            }
            w.seen.insert(l);
        }
        w.seen.extend(w.reclaim.keys().cloned());
        w
    }

    pub(super) fn summary(&self) -> View {
        section(&self.workloads(), self.psi.shares())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wl(cg: &str) -> WorkloadLabels {
        std::array::from_fn(|i| if i == 0 { cg.to_string() } else { String::new() })
    }

    #[test]
    fn psi_shares_between_samples() {
        let h = PsiHistory::default();
        for (at, some, full) in [(0.0, 0, Some(0)), (5.0, 500_000, Some(0)), (5.0, 600_000, None)] {
            h.add(PsiSample {
                at,
                some_us: some,
                full_us: full,
            });
        }
        assert_eq!(h.shares(), vec![(5.0, 0.1, Some(0.0))], "no time between the last two");
        for i in 0..500 {
            h.add(PsiSample {
                at: f64::from(i),
                some_us: 0,
                full_us: None,
            });
        }
        assert_eq!(h.0.locked().len(), PSI_SAMPLES);
    }

    #[test]
    fn workloads_rank_by_reclaim_and_max_events() {
        let mut w = Workloads::default();
        w.reclaim.insert(wl("/a"), (0.5, 3.0));
        w.reclaim.insert(wl("/b"), (2.0, 1.0));
        w.reclaim.insert(wl("/idle"), (0.0, 0.0));
        w.max_events.insert(wl("/a"), 4.0);
        w.max_events.insert(wl("/c"), 0.0);
        w.seen.extend([wl("/a"), wl("/b"), wl("/c"), wl("/idle")]);
        let v = section(&w, Vec::new());
        let reclaim = v.fields["top_reclaim"].as_array().cloned().unwrap_or_default();
        assert_eq!(reclaim.len(), 2);
        assert_eq!(reclaim[0]["cgroup"], "/b");
        assert_eq!(reclaim[1]["count"], 3.0);
        assert_eq!(v.fields["top_max_events"][0]["value"], 4.0);
        assert_eq!(v.fields["top_max_events"].as_array().map(Vec::len), Some(1));
        assert_eq!(v.fields["workloads"], 4);
    }
}
