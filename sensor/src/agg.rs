//! Userspace half of in-kernel aggregation: sums per-CPU log2 histograms read from a map and
//! turns them into Prometheus histograms at scrape time.

use std::sync::Mutex;

use aya::maps::{MapData, PerCpuHashMap};
use prometheus::{
    core::{Collector, Desc},
    proto::{self, MetricFamily, MetricType},
};
use sensor_common::agg::{Log2Hist, LOG2_BUCKETS};

/// Which log2 buckets to export and how to convert units: bucket `i` holds integer values in
/// `[2^i, 2^(i+1))`, so its inclusive upper bound is `(2^(i+1) - 1) * scale`. Buckets below
/// `first` fold into `first`; those above `last` only appear in `+Inf`.
#[derive(Debug, Clone, Copy)]
pub struct HistLayout {
    pub scale: f64,
    pub first: usize,
    pub last: usize,
}

impl HistLayout {
    /// Nanosecond values exported in seconds, from ~1 µs to ~137 s.
    pub const NANOS_AS_SECONDS: HistLayout = HistLayout {
        scale: 1e-9,
        first: 9,
        last: 36,
    };
}

/// Adds per-CPU copies into one histogram.
pub fn sum_percpu<'a>(values: impl IntoIterator<Item = &'a Log2Hist>) -> Log2Hist {
    let mut out = Log2Hist::ZERO;
    for v in values {
        for (o, b) in out.buckets.iter_mut().zip(v.buckets.iter()) {
            *o = o.wrapping_add(*b);
        }
        out.sum = out.sum.wrapping_add(v.sum);
        out.count = out.count.wrapping_add(v.count);
    }
    out
}

/// Converts to a Prometheus histogram with cumulative buckets.
pub fn to_prometheus(h: &Log2Hist, layout: HistLayout) -> proto::Histogram {
    let last = layout.last.min(LOG2_BUCKETS - 1);
    let first = layout.first.min(last);
    let mut cumulative = 0u64;
    let mut buckets = Vec::with_capacity(last - first + 1);
    for (i, n) in h.buckets.iter().enumerate().take(last + 1) {
        cumulative += n;
        if i < first {
            continue;
        }
        let mut b = proto::Bucket::default();
        b.set_cumulative_count(cumulative);
        b.set_upper_bound(((1u64 << (i + 1)) - 1) as f64 * layout.scale);
        buckets.push(b);
    }
    let mut out = proto::Histogram::default();
    // The bucket total, not `count`, so +Inf always equals the sum of buckets even if the two
    // per-CPU fields were read between updates.
    out.set_sample_count(h.buckets.iter().sum());
    out.set_sample_sum(h.sum as f64 * layout.scale);
    out.set_bucket(buckets);
    out
}

type LabelFn<K> = Box<dyn Fn(&K) -> Option<Vec<String>> + Send + Sync>;

/// One exported histogram family: part `i` of the map's values.
#[derive(Debug, Clone, Copy)]
pub struct HistFamily {
    pub name: &'static str,
    pub help: &'static str,
    pub layout: HistLayout,
}

/// Exports every key of a per-CPU map of `N` log2 histograms as one series in each of `N`
/// histogram families (one map lookup in the kernel updates all of a key's histograms). A
/// part that never counted anything for a key is left out.
pub struct HistogramMapCollector<K: aya::Pod, const N: usize = 1> {
    families: [HistFamily; N],
    label_names: &'static [&'static str],
    map: Mutex<PerCpuHashMap<MapData, K, [Log2Hist; N]>>,
    labels: LabelFn<K>,
    desc: Vec<Desc>,
}

impl<K: aya::Pod + Send + Sync, const N: usize> HistogramMapCollector<K, N> {
    pub fn new(
        families: [HistFamily; N],
        label_names: &'static [&'static str],
        map: PerCpuHashMap<MapData, K, [Log2Hist; N]>,
        labels: LabelFn<K>,
    ) -> prometheus::Result<Self> {
        let desc = families
            .iter()
            .map(|f| {
                Desc::new(
                    f.name.into(),
                    f.help.into(),
                    label_names.iter().map(|s| (*s).to_string()).collect(),
                    Default::default(),
                )
            })
            .collect::<prometheus::Result<Vec<_>>>()?;
        Ok(HistogramMapCollector {
            families,
            label_names,
            map: Mutex::new(map),
            labels,
            desc,
        })
    }

    /// Deletes a key from the kernel map (its cgroup is gone).
    pub fn remove(&self, key: &K) {
        if let Ok(mut map) = self.map.lock() {
            let _ = map.remove(key);
        }
    }

    /// Current per-key totals (also used by tests and the API).
    pub fn snapshot(&self) -> Vec<(K, [Log2Hist; N])> {
        let Ok(map) = self.map.lock() else {
            return Vec::new();
        };
        map.iter()
            .filter_map(Result::ok)
            .map(|(k, per_cpu)| (k, std::array::from_fn(|i| sum_percpu(per_cpu.iter().map(|v| &v[i])))))
            .collect()
    }
}

impl<K: aya::Pod + Send + Sync, const N: usize> Collector for HistogramMapCollector<K, N> {
    fn desc(&self) -> Vec<&Desc> {
        self.desc.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut merged: [std::collections::BTreeMap<Vec<String>, Log2Hist>; N] =
            std::array::from_fn(|_| Default::default());
        for (k, parts) in self.snapshot() {
            // Several keys may map to the same labels (e.g. folded into "other").
            let Some(labels) = (self.labels)(&k) else { continue };
            for (m, h) in merged.iter_mut().zip(parts.iter()) {
                if h.buckets.iter().all(|&b| b == 0) {
                    continue;
                }
                let e = m.entry(labels.clone()).or_insert(Log2Hist::ZERO);
                *e = sum_percpu([&*e, h]);
            }
        }
        merged
            .into_iter()
            .zip(self.families.iter())
            .map(|(m, f)| {
                let series = m
                    .into_iter()
                    .map(|(labels, h)| {
                        let mut metric = proto::Metric::default();
                        metric.set_histogram(to_prometheus(&h, f.layout));
                        (labels, metric)
                    })
                    .collect();
                crate::metrics::family(f.name, f.help, MetricType::HISTOGRAM, self.label_names, series)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sensor_common::agg::log2_bucket;

    fn hist(values: &[u64]) -> Log2Hist {
        let mut h = Log2Hist::ZERO;
        for v in values {
            h.buckets[log2_bucket(*v)] += 1;
            h.sum += v;
            h.count += 1;
        }
        h
    }

    #[test]
    fn log2_bucket_edges() {
        assert_eq!(log2_bucket(0), 0);
        assert_eq!(log2_bucket(1), 0);
        assert_eq!(log2_bucket(2), 1);
        assert_eq!(log2_bucket(3), 1);
        assert_eq!(log2_bucket(1023), 9);
        assert_eq!(log2_bucket(1024), 10);
        assert_eq!(log2_bucket(u64::MAX), LOG2_BUCKETS - 1);
    }

    #[test]
    fn sums_cpus() {
        let a = hist(&[1, 1000]);
        let b = hist(&[1000, 1_000_000]);
        let s = sum_percpu([&a, &b]);
        assert_eq!(s.count, 4);
        assert_eq!(s.sum, 1 + 1000 + 1000 + 1_000_000);
        assert_eq!(s.buckets[9], 2);
    }

    #[test]
    fn converts_to_cumulative_seconds() {
        // 500 ns folds into the first exported bucket; 3 ms and 200 s (above last) only in +Inf.
        let h = hist(&[500, 1500, 3_000_000, 200_000_000_000]);
        let p = to_prometheus(&h, HistLayout::NANOS_AS_SECONDS);
        let b = p.get_bucket();
        assert_eq!(b.len(), 36 - 9 + 1);
        assert_eq!(b[0].upper_bound(), 1023e-9);
        assert_eq!(b[0].cumulative_count(), 1);
        assert_eq!(b[1].upper_bound(), 2047e-9);
        assert_eq!(b[1].cumulative_count(), 2);
        // 3 ms = 3e6 ns lies in bucket 21: [2^21, 2^22).
        let idx = 21 - 9;
        assert_eq!(b[idx - 1].cumulative_count(), 2);
        assert_eq!(b[idx].cumulative_count(), 3);
        assert_eq!(b.last().unwrap().cumulative_count(), 3);
        assert_eq!(p.get_sample_count(), 4);
        assert!((p.get_sample_sum() - 200.0030020).abs() < 1e-9);
    }
}
