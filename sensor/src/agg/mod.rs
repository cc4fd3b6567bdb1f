//! Userspace half of in-kernel aggregation: sums per-CPU log2 histograms read from a map and
//! turns them into Prometheus histograms at scrape time. `buckets.rs`: the configured bounds;
//! `batch.rs`: reading a per-CPU map in batches; `hist.rs`: the map collector.

mod batch;
mod buckets;
mod hist;

use sensor_common::agg::{Log2Hist, LOG2_BUCKETS};
use serde::{Deserialize, Serialize};

pub use buckets::Buckets;
pub use hist::{HistFamily, HistogramMapCollector, Snapshot, TextLabelFn};

/// Which slots of a kernel log2 histogram are exported as `le` buckets, and how to convert
/// units: slot `i` holds integer values in `[2^i, 2^(i+1))`, so its inclusive upper bound is
/// `(2^(i+1) - 1) / divisor` (a division, so `le` prints as the exact decimal, 0.000131071). Every exported bound is a slot edge, so each bucket's count is
/// exact; slots between two exported ones add to the upper one, slots above the last only to
/// `+Inf`.
#[derive(Debug, Clone, PartialEq)]
pub struct HistLayout {
    pub divisor: f64,
    /// Exported slots, increasing.
    pub slots: Vec<usize>,
}

impl HistLayout {
    /// Nanosecond values exported in seconds at the configured bucket bounds.
    pub fn nanos_as_seconds(buckets: &Buckets) -> Result<HistLayout, String> {
        Ok(HistLayout {
            divisor: 1e9,
            slots: buckets.slots()?,
        })
    }
}

/// Which labels a histogram family keeps: every label, only the destination group (TCP), or
/// none (one host-level series). Keys that differ only in the dropped labels are summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    Workload,
    Destination,
    Host,
}

/// The default `per` of a histogram family's config section.
pub trait DefaultPer {
    const PER: Per;
}

/// Families exported per workload unless configured otherwise.
#[derive(Debug, Clone, PartialEq)]
pub struct ByWorkload;
impl DefaultPer for ByWorkload {
    const PER: Per = Per::Workload;
}

/// Families exported per destination group unless configured otherwise.
#[derive(Debug, Clone, PartialEq)]
pub struct ByDestination;
impl DefaultPer for ByDestination {
    const PER: Per = Per::Destination;
}

/// Families exported per host unless configured otherwise.
#[derive(Debug, Clone, PartialEq)]
pub struct ByHost;
impl DefaultPer for ByHost {
    const PER: Per = Per::Host;
}

fn default_per<D: DefaultPer>() -> Per {
    D::PER
}

/// A histogram family's config section: `{per: workload, buckets: ...}`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HistogramConfig<D: DefaultPer> {
    /// Labels kept: `workload` (all), `destination` (TCP only) or `host` (none).
    #[serde(default = "default_per::<D>")]
    pub per: Per,
    #[serde(default)]
    pub buckets: Buckets,
    #[serde(skip)]
    _default: std::marker::PhantomData<D>,
}

impl<D: DefaultPer> Default for HistogramConfig<D> {
    fn default() -> Self {
        HistogramConfig {
            per: D::PER,
            buckets: Buckets::default(),
            _default: std::marker::PhantomData,
        }
    }
}

impl<D: DefaultPer> HistogramConfig<D> {
    /// Checks serde cannot express; the error is (key path below the section, reason).
    /// `allowed` lists the `per` values the family supports.
    pub fn validate(&self, allowed: &[Per]) -> Result<(), (String, String)> {
        if !allowed.contains(&self.per) {
            let names: Vec<String> = allowed.iter().map(|p| format!("{p:?}").to_lowercase()).collect();
            return Err((".per".into(), format!("must be one of {}", names.join(", "))));
        }
        self.buckets.slots().map(drop).map_err(|e| (".buckets".into(), e))
    }

    /// How many of `label_names` (the family's full label list, the destination first where
    /// there is one, then the workload labels) are kept.
    pub fn kept_labels(&self, label_names: &[&str], has_destination: bool) -> usize {
        match self.per {
            Per::Workload => label_names.len(),
            Per::Destination => usize::from(has_destination),
            Per::Host => 0,
        }
    }
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

/// Cumulative counts at the layout's exported slots (above the last: only in `+Inf`), into `out`.
pub fn cumulative(h: &Log2Hist, layout: &HistLayout, out: &mut Vec<u64>) {
    out.clear();
    let mut sum = 0u64;
    let mut next = 0usize;
    for &slot in layout.slots.iter().filter(|s| **s < LOG2_BUCKETS) {
        sum += h.buckets[next..=slot].iter().sum::<u64>();
        next = slot + 1;
        out.push(sum);
    }
}

impl HistLayout {
    /// The exported upper bounds, in the unit of the family.
    pub fn bounds(&self) -> impl Iterator<Item = f64> + '_ {
        self.slots
            .iter()
            .filter(|s| **s < LOG2_BUCKETS)
            .map(|&slot| ((1u64 << (slot + 1)) - 1) as f64 / self.divisor)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use sensor_common::agg::log2_bucket;

    pub(super) fn hist(values: &[u64]) -> Log2Hist {
        let mut h = Log2Hist::ZERO;
        for v in values {
            h.buckets[log2_bucket(*v)] += 1;
            h.sum += v;
            h.count += 1;
        }
        h
    }

    /// `(le, cumulative count)` of `h` at the layout's bounds.
    pub(super) fn buckets(h: &Log2Hist, layout: &HistLayout) -> Vec<(f64, u64)> {
        let mut cum = Vec::new();
        cumulative(h, layout, &mut cum);
        layout.bounds().zip(cum).collect()
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
        let every = HistLayout {
            divisor: 1e9,
            slots: (9..=36).collect(),
        };
        let b = buckets(&h, &every);
        assert_eq!(b.len(), 36 - 9 + 1);
        assert_eq!(b[0], (1023e-9, 1));
        assert_eq!(b[1], (2047e-9, 2));
        // 3 ms = 3e6 ns lies in bucket 21: [2^21, 2^22).
        let idx = 21 - 9;
        assert_eq!(b[idx - 1].1, 2);
        assert_eq!(b[idx].1, 3);
        assert_eq!(b.last().unwrap().1, 3);
        assert_eq!(h.buckets.iter().sum::<u64>(), 4);
        assert!((h.sum as f64 / every.divisor - 200.0030020).abs() < 1e-9);
    }

    /// The default separates loopback, same-zone and cross-region connects, in at most 12
    /// buckets, every bound on a slot edge.
    #[test]
    fn default_buckets_separate_latency_classes() {
        let layout = HistLayout::nanos_as_seconds(&Buckets::default()).unwrap();
        assert_eq!(layout.slots, vec![13, 16, 19, 22, 25, 28, 31, 34]);
        assert!(layout.slots.len() < 12);
        let h = hist(&[40_000, 90_000, 300_000, 900_000, 50_000_000, 150_000_000]);
        let b = buckets(&h, &layout);
        let le: Vec<f64> = b.iter().map(|b| b.0).collect();
        assert_eq!(le[1], 131071e-9);
        assert_eq!(le[2], 1048575e-9);
        assert_eq!(le.last().copied(), Some(34359738367e-9));
        let counts: Vec<u64> = b.iter().map(|b| b.1).collect();
        // loopback <= 131 us; same zone in (131 us, 1.05 ms]; cross region above 8.4 ms.
        assert_eq!(counts, vec![0, 2, 4, 4, 5, 6, 6, 6]);
    }
}
