//! The memcg families: pressure and memory.events per workload from the cgroup files'
//! snapshot (`files`), reclaim time per workload from the kernel's histogram map.

use std::{path::Path, sync::Arc};

use super::{files, psi, psi::HOST_PSI};
use crate::{
    agg::HistogramMapCollector,
    cgroup::{Discovery, WorkloadLabels},
    expo::{Scrape, Source, Type},
};

pub(super) const WAITING: &str = "sensor_memory_pressure_waiting_seconds_total";
pub(super) const WAITING_HELP: &str =
    "Time some tasks waited on memory (PSI some total); host without workload labels, per workload on cgroup v2.";
pub(super) const STALLED: &str = "sensor_memory_pressure_stalled_seconds_total";
pub(super) const STALLED_HELP: &str = "Time all non-idle tasks were stalled on memory at once (PSI full total); host without workload labels, per workload on cgroup v2.";
pub(super) const EVENTS: &str = "sensor_memcg_events_total";
pub(super) const EVENTS_HELP: &str = "memory.events counters per workload (low, high, max, oom, oom_kill, oom_group_kill); on cgroup v1 max = memory.failcnt + memory.memsw.failcnt and oom_kill from memory.oom_control.";

/// Renders PSI totals and memory.events per workload from the background refresh's snapshot
/// (see [`files`]); only the host's PSI file is read at scrape time.
pub(super) struct FileCollector {
    pub(super) disc: Arc<Discovery>,
    pub(super) cache: Arc<files::FileCache>,
}

/// PSI totals per label key and event counts per `(label key, event)`: workloads folded into
/// `other` share a key, so their values add up.
pub(super) type Sums<K> = (
    foldhash::HashMap<K, (u64, u64)>,
    foldhash::HashMap<(K, &'static str), u64>,
);

pub(super) fn sums<K: std::hash::Hash + Eq + Clone>(snap: &files::Snapshot, key: impl Fn(&str) -> K) -> Sums<K> {
    let mut psi_sum: foldhash::HashMap<K, (u64, u64)> = foldhash::HashMap::default();
    let mut ev_sum: foldhash::HashMap<(K, &'static str), u64> = foldhash::HashMap::default();
    for (cg, v) in &snap.values {
        let l = key(cg);
        if let Some((some, full)) = v.psi {
            let e = psi_sum.entry(l.clone()).or_default();
            e.0 += some;
            e.1 += full;
        }
        for (event, n) in &v.events {
            *ev_sum.entry((l.clone(), event)).or_default() += n;
        }
    }
    (psi_sum, ev_sum)
}

/// Seconds since the snapshot's refresh started.
pub(super) fn age(snap: &files::Snapshot) -> f64 {
    snap.at.map_or(0.0, |t| t.elapsed().as_secs_f64())
}

impl Source for FileCollector {
    /// The families from label fragments rendered once per workload, values summed per
    /// fragment (workloads folded into `other` share one).
    fn write(&self, scrape: &mut Scrape) {
        self.write_text(psi::read(Path::new(HOST_PSI)), scrape);
    }
}

/// The reclaim histogram's label fragment: none (per host) or the workload's.
pub(super) fn reclaim_text_labels(disc: Arc<Discovery>) -> crate::agg::TextLabelFn<u64> {
    let empty: Arc<str> = Arc::from("");
    Box::new(move |id: &u64, kept: usize, scrape: &mut Scrape| {
        let wl = if kept == 0 {
            Arc::clone(&empty)
        } else {
            disc.label_text_for_id(*id, scrape)
        };
        Some([wl, Arc::clone(&empty)])
    })
}

impl FileCollector {
    /// The families with the host's PSI totals `host`.
    fn write_text(&self, host: Option<psi::Psi>, scrape: &mut Scrape) {
        let snap = self.cache.snapshot();
        let (psi_sum, ev_sum) = sums(&snap, |cg| self.disc.label_text(cg));
        let mut psi_rows: Vec<(Arc<str>, (u64, u64))> = psi_sum.into_iter().collect();
        psi_rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut f = scrape.family(WAITING, WAITING_HELP, Type::Counter);
        if let Some(p) = host {
            f.float(&[], p.some.total_us as f64 / 1e6);
        }
        for (l, (some, _)) in &psi_rows {
            f.float(&[l], *some as f64 / 1e6);
        }
        let mut f = scrape.family(STALLED, STALLED_HELP, Type::Counter);
        if let Some(full) = host.and_then(|p| p.full) {
            f.float(&[], full.total_us as f64 / 1e6);
        }
        for (l, (_, full)) in &psi_rows {
            f.float(&[l], *full as f64 / 1e6);
        }
        let mut rows: Vec<((&'static str, Arc<str>), u64)> =
            ev_sum.into_iter().map(|((l, event), v)| ((event, l), v)).collect();
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut f = scrape.family(EVENTS, EVENTS_HELP, Type::Counter);
        for ((event, l), v) in rows {
            f.int(&[event_frag(event), &l], v);
        }
        scrape
            .family(files::AGE, files::AGE_HELP, Type::Gauge)
            .float(&[], age(&snap));
    }
}

/// `event="..."` fragments of `memory_events`' names.
pub(super) fn event_frag(event: &str) -> &'static str {
    match event {
        "low" => "event=\"low\"",
        "high" => "event=\"high\"",
        "max" => "event=\"max\"",
        "oom" => "event=\"oom\"",
        "oom_kill" => "event=\"oom_kill\"",
        _ => "event=\"oom_group_kill\"",
    }
}

pub(super) const RECLAIM_TOTAL: &str = "sensor_memcg_reclaim_seconds_total";
pub(super) const RECLAIM_TOTAL_HELP: &str = "Time tasks spent in direct or memcg reclaim, by the stalled task's workload: the _sum of sensor_memcg_reclaim_duration_seconds per workload (whose buckets are per host by default; probes.memcg.reclaim_duration.per: workload keeps them per workload).";

/// `sensor_memcg_reclaim_seconds_total{<workload labels>}`: one series per workload that went
/// through reclaim, from the same kernel map (read once per scrape) as the histogram.
pub(super) struct ReclaimTotals {
    pub(super) hist: Arc<HistogramMapCollector<u64>>,
    pub(super) disc: Arc<Discovery>,
}

impl ReclaimTotals {
    /// Nanoseconds per key, for keys that counted something.
    fn totals(&self, snap: &crate::agg::Snapshot<u64, 1>) -> Vec<(u64, u64)> {
        let totals: Vec<(u64, u64)> = snap
            .iter()
            .filter(|(_, [h])| h.buckets.iter().any(|&b| b != 0))
            .map(|(id, [h])| (*id, h.sum))
            .collect();
        totals
    }

    /// Nanoseconds of retired keys (vanished workloads folded into `other`) by the labels they
    /// had: the counter never goes down when their kernel keys are deleted.
    fn retired(&self) -> Vec<(WorkloadLabels, u64)> {
        self.hist
            .retired()
            .into_iter()
            .filter(|(_, [h])| h.buckets.iter().any(|&b| b != 0))
            .map(|(l, [h])| (crate::cgroup::workload_labels_from(&l), h.sum))
            .collect()
    }
}

impl Source for ReclaimTotals {
    /// One series per workload, from the map read once per scrape with the histogram.
    fn write(&self, scrape: &mut Scrape) {
        let mut sums: foldhash::HashMap<Arc<str>, u64> = foldhash::HashMap::default();
        let snap = self.hist.snapshot_shared(scrape);
        for (id, ns) in self.totals(&snap) {
            *sums.entry(self.disc.label_text_for_id(id, scrape)).or_default() += ns;
        }
        for (l, ns) in self.retired() {
            *sums.entry(crate::cgroup::render_labels(&l)).or_default() += ns;
        }
        let mut rows: Vec<(Arc<str>, u64)> = sums.into_iter().collect();
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut f = scrape.family(RECLAIM_TOTAL, RECLAIM_TOTAL_HELP, Type::Counter);
        for (l, ns) in rows {
            f.float(&[&l], ns as f64 / 1e9);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cgroup::Hierarchies;

    #[test]
    fn file_values_are_written_per_workload() {
        let root = std::env::temp_dir().join(format!("sensor-scrape-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (cg, failcnt, kills) in [("a", 3, 1), ("b\"q", 5, 0), ("c", 7, 2)] {
            let d = root.join(cg);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("memory.failcnt"), format!("{failcnt}\n")).unwrap();
            std::fs::write(
                d.join("memory.oom_control"),
                format!("oom_kill_disable 0\nunder_oom 0\noom_kill {kills}\n"),
            )
            .unwrap();
        }
        let hier = Hierarchies {
            memory_v1: Some(root.clone()),
            unified: None,
        };
        // Two workloads per family: the third folds into `other`.
        let disc = Arc::new(Discovery::new(hier, 2, Duration::from_secs(60)));
        let c = FileCollector {
            cache: Arc::new(files::FileCache::new(Arc::clone(&disc)).unwrap()),
            disc,
        };
        let host = psi::Psi {
            some: psi::PsiLine {
                total_us: 1_500_000,
                ..Default::default()
            },
            full: Some(psi::PsiLine {
                total_us: 250_000,
                ..Default::default()
            }),
        };
        let mut scrape = Scrape::new();
        c.write_text(Some(host), &mut scrape);
        let got = scrape.text();
        std::fs::remove_dir_all(&root).unwrap();
        let samples = crate::expo::valid(&got);
        let plain = crate::expo::promtext::plain;
        let v = |name: &str, labels: &[(&str, &str)]| crate::expo::promtext::value(&got, name, labels);
        assert_eq!(v(EVENTS, &plain(&[("event", "max")], "/a")), Some(3.0), "{got}");
        assert_eq!(v(EVENTS, &plain(&[("event", "oom_kill")], "/a")), Some(1.0), "{got}");
        assert_eq!(
            v(EVENTS, &plain(&[("event", "max")], "/b\"q")),
            Some(5.0),
            "escaped: {got}"
        );
        // The third workload folds into `other`.
        assert_eq!(v(EVENTS, &plain(&[("event", "oom_kill")], "other")), Some(2.0), "{got}");
        assert_eq!(v(EVENTS, &plain(&[("event", "max")], "other")), Some(7.0), "{got}");
        assert_eq!(v(WAITING, &[]), Some(1.5));
        assert_eq!(v(STALLED, &[]), Some(0.25));
        assert!(v(files::AGE, &[]).is_some(), "{got}");
        // Two events each for three label sets, the host's PSI twice, the age.
        assert_eq!(samples.len(), 6 + 2 + 1, "{got}");
    }
}
