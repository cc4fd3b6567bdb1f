//! The map collector: every key of a per-CPU map of log2 histograms as series of histogram
//! families, read at scrape; keys of vanished workloads retired into userspace.

use std::{
    collections::{hash_map::Entry, BTreeMap},
    rc::Rc,
    sync::{Arc, Mutex},
};

use aya::maps::{MapData, PerCpuHashMap};
use sensor_common::agg::Log2Hist;

use super::{batch::lookup_batch, cumulative, sum_percpu, HistLayout};
use crate::{
    expo::{Scrape, Source, Type},
    sync::Lock as _,
};

type LabelFn<K> = Box<dyn Fn(&K) -> Option<Vec<String>> + Send + Sync>;

/// A key's labels for the direct text exposition, given how many of the collector's label
/// names the family keeps: up to two pre-rendered fragments (see `expo::labels`),
/// empty ones skipped. Keys with equal fragments are summed.
/// The scrape carries the label text rendered once per workload and scrape.
pub type TextLabelFn<K> = Box<dyn Fn(&K, usize, &mut Scrape) -> Option<[Arc<str>; 2]> + Send + Sync>;

/// Per-key totals of a map: `[histogram part]` per key.
pub type Snapshot<K, const N: usize> = Vec<(K, [Log2Hist; N])>;

/// One exported histogram family: part `i` of the map's values.
#[derive(Debug, Clone)]
pub struct HistFamily {
    pub name: &'static str,
    pub help: &'static str,
    pub layout: HistLayout,
    /// The collector's first `labels` label names are kept (see [`HistogramConfig::kept_labels`]).
    pub labels: usize,
}

/// Exports every key of a per-CPU map of `N` log2 histograms as one series in each of `N`
/// histogram families (one map lookup in the kernel updates all of a key's histograms). A
/// part that never counted anything for a key is left out.
pub struct HistogramMapCollector<K: aya::Pod, const N: usize = 1> {
    families: [HistFamily; N],
    label_names: &'static [&'static str],
    map: Mutex<PerCpuHashMap<MapData, K, [Log2Hist; N]>>,
    labels: LabelFn<K>,
    text_labels: Option<TextLabelFn<K>>,
    /// Whether the kernel took `BPF_MAP_LOOKUP_BATCH` (5.6+); cleared at its first refusal.
    batch: std::sync::atomic::AtomicBool,
    /// Keys read at the last snapshot: the next one is collected without regrowing.
    last_len: std::sync::atomic::AtomicUsize,
    /// Each family's `le` values, as text.
    les: [Vec<String>; N],
    /// Totals of retired keys (see [`Self::retire`]) by their labels, still exported.
    retired: Mutex<BTreeMap<Vec<String>, [Log2Hist; N]>>,
}

impl<K: aya::Pod + Send + Sync, const N: usize> HistogramMapCollector<K, N> {
    pub fn new(
        families: [HistFamily; N],
        label_names: &'static [&'static str],
        map: PerCpuHashMap<MapData, K, [Log2Hist; N]>,
        labels: LabelFn<K>,
    ) -> Self {
        let les = std::array::from_fn(|i| crate::expo::le_values(families[i].layout.bounds()));
        HistogramMapCollector {
            families,
            label_names,
            map: Mutex::new(map),
            labels,
            text_labels: None,
            batch: std::sync::atomic::AtomicBool::new(true),
            last_len: std::sync::atomic::AtomicUsize::new(0),
            les,
            retired: Mutex::new(BTreeMap::new()),
        }
    }

    /// Label fragments for the text exposition, rendered (and cached) by the caller; without
    /// them they are rendered from `labels` at each scrape.
    pub fn with_text_labels(mut self, f: TextLabelFn<K>) -> Self {
        self.text_labels = Some(f);
        self
    }

    /// The map's keys.
    pub fn keys(&self) -> Vec<K> {
        {
            let map = self.map.locked();
            map.keys().filter_map(Result::ok).collect()
        }
    }

    /// Moves the totals of `keys` out of the kernel map into userspace, under the labels they
    /// have now, and deletes the keys: for keys whose labels no longer change (a vanished
    /// workload folded into `other`), so the kernel map and each scrape stop carrying them while
    /// their counts stay in the exported series. Returns the keys retired.
    pub fn retire(&self, keys: &[K]) -> usize {
        let mut map = self.map.locked();
        let mut retired = self.retired.locked();
        let mut n = 0;
        for k in keys {
            let Ok(per_cpu) = map.get(k, 0) else { continue };
            let Some(labels) = (self.labels)(k) else { continue };
            let e = retired.entry(labels).or_insert([Log2Hist::ZERO; N]);
            for (i, total) in e.iter_mut().enumerate() {
                *total = sum_percpu(std::iter::once(&*total).chain(per_cpu.iter().map(|v| &v[i])));
            }
            if map.remove(k).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Part `i`'s bucket layout.
    pub fn layout(&self, i: usize) -> &HistLayout {
        &self.families[i].layout
    }

    /// The totals of retired keys by their labels.
    pub fn retired(&self) -> Vec<(Vec<String>, [Log2Hist; N])> {
        let r = self.retired.locked();
        r.iter().map(|(l, h)| (l.clone(), *h)).collect()
    }

    /// Deletes a key from the kernel map (its cgroup is gone).
    pub fn remove(&self, key: &K) {
        {
            let mut map = self.map.locked();
            let _ = map.remove(key);
        }
    }

    /// Current per-key totals (also used by tests and the API). Read with
    /// `BPF_MAP_LOOKUP_BATCH` (a syscall per 128 keys instead of two per key), or key by key
    /// where the kernel has no batch operations.
    pub fn snapshot(&self) -> Vec<(K, [Log2Hist; N])> {
        let map = self.map.locked();
        let total =
            |k: K, per_cpu: &[[Log2Hist; N]]| (k, std::array::from_fn(|i| sum_percpu(per_cpu.iter().map(|v| &v[i]))));
        if self.batch.load(std::sync::atomic::Ordering::Relaxed) {
            let mut out = Vec::with_capacity(self.last_len.load(std::sync::atomic::Ordering::Relaxed));
            match lookup_batch::<K, [Log2Hist; N]>(&map, |k, v| out.push(total(k, v))) {
                Ok(()) => {
                    self.last_len.store(out.len(), std::sync::atomic::Ordering::Relaxed);
                    return out;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "batched map lookup unavailable; reading key by key");
                    self.batch.store(false, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        map.iter()
            .filter_map(Result::ok)
            .map(|(k, per_cpu)| total(k, &per_cpu))
            .collect()
    }

    /// Calls `f` with each key's current totals, one key at a time: a scrape holds one key's
    /// values, not a copy of the whole map (1 KiB per key for the TCP map).
    pub fn for_each(&self, mut f: impl FnMut(K, [Log2Hist; N])) {
        let map = self.map.locked();
        for (k, per_cpu) in map.iter().filter_map(Result::ok) {
            f(k, std::array::from_fn(|i| sum_percpu(per_cpu.iter().map(|v| &v[i]))));
        }
    }

    /// [`Self::snapshot`], read from the kernel once per scrape however many collectors ask
    /// (the TCP counters read the connect histogram's counts).
    pub fn snapshot_shared(&self, scrape: &mut Scrape) -> Rc<Snapshot<K, N>>
    where
        K: 'static,
    {
        let owner = self as *const Self as usize;
        scrape.memo(owner, "snapshot", || self.snapshot())
    }

    fn text_key(&self, k: &K, kept: usize, empty: &Arc<str>, scrape: &mut Scrape) -> Option<[Arc<str>; 2]> {
        if let Some(f) = &self.text_labels {
            return f(k, kept, scrape);
        }
        let values = (self.labels)(k)?;
        let pairs = self.label_names.iter().copied().zip(values.iter().map(String::as_str));
        Some([crate::expo::labels(pairs.take(kept)).into(), Arc::clone(empty)])
    }

    /// Adds the retired keys' totals of family `i` to the live series with the same labels (a
    /// live key's fragments joined are its label text), or as series of their own.
    fn merge_retired_text(
        &self,
        i: usize,
        kept: usize,
        merged: &mut foldhash::HashMap<[Arc<str>; 2], Log2Hist>,
        empty: &Arc<str>,
    ) {
        let retired = self.retired();
        if retired.is_empty() {
            return;
        }
        let mut by_text: foldhash::HashMap<String, [Arc<str>; 2]> = merged
            .keys()
            .map(|k| {
                let text = k
                    .iter()
                    .filter(|f| !f.is_empty())
                    .map(|f| &**f)
                    .collect::<Vec<_>>()
                    .join(",");
                (text, k.clone())
            })
            .collect();
        for (labels, parts) in retired {
            let h = &parts[i];
            if h.buckets.iter().all(|&b| b == 0) {
                continue;
            }
            let pairs = self.label_names.iter().copied().zip(labels.iter().map(String::as_str));
            let text = crate::expo::labels(pairs.take(kept));
            let key = by_text
                .entry(text)
                .or_insert_with_key(|t| [Arc::from(t.as_str()), Arc::clone(empty)])
                .clone();
            match merged.entry(key) {
                Entry::Occupied(mut e) => {
                    let s = sum_percpu([e.get(), h]);
                    *e.get_mut() = s;
                }
                Entry::Vacant(e) => {
                    e.insert(*h);
                }
            }
        }
    }
}

impl<K: aya::Pod + Send + Sync + 'static, const N: usize> Source for HistogramMapCollector<K, N> {
    /// Every family as exposition text, series sorted by their label text.
    fn write(&self, scrape: &mut Scrape) {
        let snap = self.snapshot_shared(scrape);
        let empty: Arc<str> = Arc::from("");
        let mut cum = Vec::new();
        for (i, f) in self.families.iter().enumerate() {
            let kept = f.labels.min(self.label_names.len());
            let mut merged: foldhash::HashMap<[Arc<str>; 2], Log2Hist> = foldhash::HashMap::default();
            for (k, parts) in snap.iter() {
                let h = &parts[i];
                if h.buckets.iter().all(|&b| b == 0) {
                    continue;
                }
                let Some(key) = self.text_key(k, kept, &empty, scrape) else {
                    continue;
                };
                match merged.entry(key) {
                    Entry::Occupied(mut e) => {
                        let s = sum_percpu([e.get(), h]);
                        *e.get_mut() = s;
                    }
                    Entry::Vacant(e) => {
                        e.insert(*h);
                    }
                }
            }
            self.merge_retired_text(i, kept, &mut merged, &empty);
            let mut rows: Vec<([Arc<str>; 2], Log2Hist)> = merged.into_iter().collect();
            rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            let mut fam = scrape.family(f.name, f.help, Type::Histogram);
            for (key, h) in rows {
                cumulative(&h, &f.layout, &mut cum);
                let count = h.buckets.iter().sum();
                fam.histogram(
                    &[&key[0], &key[1]],
                    &self.les[i],
                    &cum,
                    count,
                    h.sum as f64 / f.layout.divisor,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agg::{tests::hist, Buckets};

    /// A histogram series as text: cumulative buckets at the slot edges, `+Inf` the total,
    /// `_sum` in seconds; the kit's reader takes it.
    #[test]
    fn text_histogram_is_exact() {
        let layout = HistLayout::nanos_as_seconds(&Buckets::default()).unwrap();
        let h = hist(&[500, 40_000, 90_000, 3_000_000, 200_000_000_000]);
        let mut scrape = Scrape::new();
        let frag = crate::expo::labels([("cgroup", "/a\"b"), ("pod", "")]);
        let mut cum = Vec::new();
        cumulative(&h, &layout, &mut cum);
        let les = crate::expo::le_values(layout.bounds());
        let sum = h.sum as f64 / layout.divisor;
        scrape
            .family("t_seconds", "h", Type::Histogram)
            .histogram(&[&frag, ""], &les, &cum, 5, sum);
        let text = scrape.text();
        let l = "cgroup=\"/a\\\"b\",pod=\"\"";
        let want: String = [
            "# HELP t_seconds h\n# TYPE t_seconds histogram\n".to_string(),
            format!("t_seconds_bucket{{{l},le=\"0.000016383\"}} 1\n"),
            format!("t_seconds_bucket{{{l},le=\"0.000131071\"}} 3\n"),
            format!("t_seconds_bucket{{{l},le=\"0.001048575\"}} 3\n"),
            format!("t_seconds_bucket{{{l},le=\"0.008388607\"}} 4\n"),
            format!("t_seconds_bucket{{{l},le=\"0.067108863\"}} 4\n"),
            format!("t_seconds_bucket{{{l},le=\"0.536870911\"}} 4\n"),
            format!("t_seconds_bucket{{{l},le=\"4.294967295\"}} 4\n"),
            format!("t_seconds_bucket{{{l},le=\"34.359738367\"}} 4\n"),
            format!("t_seconds_bucket{{{l},le=\"+Inf\"}} 5\n"),
            format!("t_seconds_sum{{{l}}} 200.0031305\n"),
            format!("t_seconds_count{{{l}}} 5\n"),
        ]
        .concat();
        assert_eq!(text, want);
        let samples = crate::expo::valid(&text);
        assert_eq!(samples.len(), 8 + 3);
        assert_eq!(samples[0].label("cgroup"), Some("/a\"b"));
    }
}
