//! Userspace half of in-kernel aggregation: sums per-CPU log2 histograms read from a map and
//! turns them into Prometheus histograms at scrape time.

use std::{
    collections::{hash_map::Entry, BTreeMap},
    rc::Rc,
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{MapData, PerCpuHashMap};
use prometheus::{
    core::{Collector, Desc},
    proto::{self, MetricFamily, MetricType},
};
use sensor_common::agg::{Log2Hist, LOG2_BUCKETS};
use serde::{Deserialize, Serialize};

use crate::sync::Lock as _;

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

/// Histogram bucket bounds of a duration family. The kernel counts in log2 slots of
/// nanoseconds, so every bound is rounded up to a power of two nanoseconds; the exported `le`
/// is that power of two minus 1 ns (the kernel counts whole nanoseconds), e.g. `1ms` is
/// exported as `le="0.001048575"`. Either a list of bounds, or a range: every slot edge from
/// `min` to `max`, `factor` (a power of two) apart.
#[derive(Debug, Clone, PartialEq)]
pub enum Buckets {
    List(Vec<Duration>),
    Log2 { min: Duration, max: Duration, factor: u32 },
}

impl Default for Buckets {
    /// 16 µs to 34 s, 8x apart: 8 bounds and `+Inf`. Loopback connects (10-100 µs) land at or
    /// below 131 µs, same-zone ones (0.2-1 ms) between 131 µs and 1.05 ms, cross-region ones
    /// (50-200 ms) between 8.4 ms and 537 ms.
    fn default() -> Self {
        Buckets::Log2 {
            min: Duration::from_micros(16),
            max: Duration::from_secs(34),
            factor: 8,
        }
    }
}

/// Largest bound: slot 62 ends at 2^63 - 1 ns (292 years); slot 63 also holds larger values.
const MAX_SLOT: usize = LOG2_BUCKETS - 2;

/// The slot whose inclusive upper edge is the smallest `2^(i+1) - 1` ns at or above `d - 1 ns`.
fn slot_of(d: Duration) -> Result<usize, String> {
    let ns = u64::try_from(d.as_nanos()).map_err(|_| format!("{} is too large", fmt_dur(d)))?;
    if ns == 0 {
        return Err("a bound must be greater than 0".into());
    }
    let slot = match ns.max(2).checked_next_power_of_two() {
        Some(p) => p.trailing_zeros() as usize - 1,
        None => usize::MAX,
    };
    if slot > MAX_SLOT {
        return Err(format!("{} is too large", fmt_dur(d)));
    }
    Ok(slot)
}

fn fmt_dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl Buckets {
    /// The exported slots, increasing; an error names the bound that does not work.
    pub fn slots(&self) -> Result<Vec<usize>, String> {
        match self {
            Buckets::List(bounds) => {
                if bounds.is_empty() {
                    return Err("at least one bound is needed".into());
                }
                let mut out: Vec<usize> = Vec::with_capacity(bounds.len());
                for (i, b) in bounds.iter().enumerate() {
                    let s = slot_of(*b)?;
                    if let Some(&prev) = out.last() {
                        if s <= prev {
                            return Err(format!(
                                "{} and {} must increase and fall in different log2 slots (each bound is rounded up to a power of two nanoseconds)",
                                fmt_dur(bounds[i - 1]),
                                fmt_dur(*b)
                            ));
                        }
                    }
                    out.push(s);
                }
                Ok(out)
            }
            Buckets::Log2 { min, max, factor } => {
                if *factor < 2 || !factor.is_power_of_two() {
                    return Err(format!("factor {factor} is not a power of two of at least 2"));
                }
                let (lo, hi) = (slot_of(*min)?, slot_of(*max)?);
                if hi < lo {
                    return Err("max must not be below min".into());
                }
                let step = factor.trailing_zeros() as usize;
                Ok((lo..=hi).step_by(step).collect())
            }
        }
    }
}

impl Serialize for Buckets {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self {
            Buckets::List(bounds) => {
                let mut seq = s.serialize_seq(Some(bounds.len()))?;
                for b in bounds {
                    seq.serialize_element(&fmt_dur(*b))?;
                }
                seq.end()
            }
            Buckets::Log2 { min, max, factor } => {
                let mut m = s.serialize_map(Some(3))?;
                m.serialize_entry("min", &fmt_dur(*min))?;
                m.serialize_entry("max", &fmt_dur(*max))?;
                m.serialize_entry("factor", factor)?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Buckets {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(BucketsVisitor)
    }
}

struct BucketsVisitor;

fn parse_dur<E: serde::de::Error>(s: &str) -> Result<Duration, E> {
    humantime::parse_duration(s).map_err(|e| E::custom(format!("bad duration '{s}' ({e}); use e.g. 100us, 1ms, 2s")))
}

impl<'de> serde::de::Visitor<'de> for BucketsVisitor {
    type Value = Buckets;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of bounds such as [100us, 1ms, 10ms], or {min: 16us, max: 34s, factor: 8}")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Buckets, A::Error> {
        let mut out = Vec::new();
        while let Some(s) = seq.next_element::<String>()? {
            out.push(parse_dur(&s)?);
        }
        Ok(Buckets::List(out))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Buckets, A::Error> {
        use serde::de::Error;
        let (mut min, mut max, mut factor) = (None, None, None);
        while let Some(k) = map.next_key::<String>()? {
            match k.as_str() {
                "min" => min = Some(parse_dur(&map.next_value::<String>()?)?),
                "max" => max = Some(parse_dur(&map.next_value::<String>()?)?),
                "factor" => factor = Some(map.next_value::<u32>()?),
                other => return Err(A::Error::unknown_field(other, &["min", "max", "factor"])),
            }
        }
        Ok(Buckets::Log2 {
            min: min.ok_or_else(|| A::Error::missing_field("min"))?,
            max: max.ok_or_else(|| A::Error::missing_field("max"))?,
            factor: factor.ok_or_else(|| A::Error::missing_field("factor"))?,
        })
    }
}

/// `union bpf_attr` as the `BPF_MAP_*_BATCH` commands read it.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `enum bpf_cmd`'s `BPF_MAP_LOOKUP_BATCH`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Every entry of a per-CPU hash map with its per-CPU values, read with `BPF_MAP_LOOKUP_BATCH`
/// 128 keys at a time: at a scrape of 1,000 workloads that is 8 syscalls instead of 2,000.
/// Like the key-by-key walk it is not atomic: entries updated meanwhile are read as they are.
/// `f` gets each entry's key and per-CPU values as they come: no copy of the map is kept.
fn lookup_batch<K: aya::Pod, V: aya::Pod>(
    map: &PerCpuHashMap<MapData, K, V>,
    mut f: impl FnMut(K, &[V]),
) -> std::io::Result<()> {
    use std::os::fd::{AsFd, AsRawFd};

    use aya::maps::IterableMap;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    let (ksz, vsz) = (std::mem::size_of::<K>(), std::mem::size_of::<V>().next_multiple_of(8));
    let fd = map.map().fd().as_fd().as_raw_fd();
    let mut count = 128usize;
    let (mut keys, mut values) = (vec![0u8; count * ksz], vec![0u8; count * cpus * vsz]);
    let mut per_cpu: Vec<V> = Vec::with_capacity(cpus);
    // The kernel's position token (4 bytes for hash maps), kept in 8 for any map type.
    let (mut token, mut next) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &token as *const u64 as u64 },
            out_batch: &mut next as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: count as u32,
            map_fd: fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` points at buffers of `count` keys and `count` x `cpus` values of the
        // map's sizes (per-CPU values are 8-byte aligned per CPU) and at two 8-byte tokens, all
        // alive for the call; the kernel writes only within them.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as u32,
            )
        };
        let err = (r < 0).then(std::io::Error::last_os_error);
        let end = match err.as_ref().and_then(std::io::Error::raw_os_error) {
            None if err.is_none() => false,
            Some(libc::ENOENT) => true,
            // One hash bucket holds more keys than asked for: ask for more.
            Some(libc::ENOSPC) if count < 1 << 16 => {
                count *= 2;
                keys.resize(count * ksz, 0);
                values.resize(count * cpus * vsz, 0);
                continue;
            }
            _ => return Err(err.unwrap_or_else(|| std::io::Error::other("bpf() failed"))),
        };
        let got = (attr.count as usize).min(count);
        for i in 0..got {
            // SAFETY: `i` < `count`: the reads stay within the buffers; K and V are Pod (any
            // bytes are a valid value), read unaligned from the byte buffers.
            let k = unsafe { std::ptr::read_unaligned(keys.as_ptr().add(i * ksz) as *const K) };
            per_cpu.clear();
            per_cpu.extend(
                (0..cpus)
                    // SAFETY: as above, `(i * cpus + c) * vsz + size_of::<V>()` <= the buffer's length.
                    .map(|c| unsafe {
                        std::ptr::read_unaligned(values.as_ptr().add((i * cpus + c) * vsz) as *const V)
                    }),
            );
            f(k, &per_cpu);
        }
        if end {
            return Ok(());
        }
        token = next;
        first = false;
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

/// Converts to a Prometheus histogram with cumulative buckets at the layout's slots.
pub fn to_prometheus(h: &Log2Hist, layout: &HistLayout) -> proto::Histogram {
    let mut cumulative = 0u64;
    let mut next = 0usize;
    let mut buckets = Vec::with_capacity(layout.slots.len());
    for &slot in layout.slots.iter().filter(|s| **s < LOG2_BUCKETS) {
        cumulative += h.buckets[next..=slot].iter().sum::<u64>();
        next = slot + 1;
        let mut b = proto::Bucket::default();
        b.set_cumulative_count(cumulative);
        b.set_upper_bound(((1u64 << (slot + 1)) - 1) as f64 / layout.divisor);
        buckets.push(b);
    }
    let mut out = proto::Histogram::default();
    // The bucket total, not `count`, so +Inf always equals the sum of buckets even if the two
    // per-CPU fields were read between updates.
    out.set_sample_count(h.buckets.iter().sum());
    out.set_sample_sum(h.sum as f64 / layout.divisor);
    out.set_bucket(buckets);
    out
}

type LabelFn<K> = Box<dyn Fn(&K) -> Option<Vec<String>> + Send + Sync>;

/// A key's labels for the direct text exposition, given how many of the collector's label
/// names the family keeps: up to two pre-rendered fragments (see `expo::labels`),
/// empty ones skipped. Keys with equal fragments are summed.
pub type TextLabelFn<K> = Box<dyn Fn(&K, usize) -> Option<[Arc<str>; 2]> + Send + Sync>;

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
    desc: Vec<Desc>,
    /// Totals of retired keys (see [`Self::retire`]) by their labels, still exported.
    retired: Mutex<BTreeMap<Vec<String>, [Log2Hist; N]>>,
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
                    label_names[..f.labels.min(label_names.len())]
                        .iter()
                        .map(|s| (*s).to_string())
                        .collect(),
                    Default::default(),
                )
            })
            .collect::<prometheus::Result<Vec<_>>>()?;
        let les = std::array::from_fn(|i| crate::expo::le_values(families[i].layout.bounds()));
        Ok(HistogramMapCollector {
            families,
            label_names,
            map: Mutex::new(map),
            labels,
            text_labels: None,
            batch: std::sync::atomic::AtomicBool::new(true),
            last_len: std::sync::atomic::AtomicUsize::new(0),
            les,
            desc,
            retired: Mutex::new(BTreeMap::new()),
        })
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
    pub fn snapshot_shared(&self) -> Rc<Snapshot<K, N>>
    where
        K: 'static,
    {
        let owner = self as *const Self as usize;
        crate::expo::memo(owner, "snapshot", || self.snapshot()).unwrap_or_else(|| Rc::new(self.snapshot()))
    }

    fn text_key(&self, k: &K, kept: usize, empty: &Arc<str>) -> Option<[Arc<str>; 2]> {
        if let Some(f) = &self.text_labels {
            return f(k, kept);
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

    /// Writes every family as exposition text (see `expo`).
    fn write_text(&self, w: &mut crate::expo::Writer)
    where
        K: 'static,
    {
        let snap = self.snapshot_shared();
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
                let Some(key) = self.text_key(k, kept, &empty) else {
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
            let mut fam = w.family(f.name, f.help, "histogram");
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

impl<K: aya::Pod + Send + Sync + 'static, const N: usize> Collector for HistogramMapCollector<K, N> {
    fn desc(&self) -> Vec<&Desc> {
        self.desc.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if crate::expo::write(|w| self.write_text(w)) {
            return Vec::new();
        }
        let mut merged: [std::collections::BTreeMap<Vec<String>, Log2Hist>; N] =
            std::array::from_fn(|_| Default::default());
        let families = &self.families;
        let mut add = |labels: &[String], parts: &[Log2Hist; N]| {
            // Several keys may map to the same labels (e.g. folded into "other").
            for ((m, h), f) in merged.iter_mut().zip(parts.iter()).zip(families.iter()) {
                if h.buckets.iter().all(|&b| b == 0) {
                    continue;
                }
                let kept = &labels[..f.labels.min(labels.len())];
                match m.get_mut(kept) {
                    Some(e) => *e = sum_percpu([&*e, h]),
                    None => {
                        m.insert(kept.to_vec(), *h);
                    }
                }
            }
        };
        self.for_each(|k, parts| {
            if let Some(labels) = (self.labels)(&k) {
                add(&labels, &parts);
            }
        });
        for (labels, parts) in self.retired() {
            add(&labels, &parts);
        }
        merged
            .into_iter()
            .zip(self.families.iter())
            .map(|(m, f)| {
                let series = m
                    .into_iter()
                    .map(|(labels, h)| {
                        let mut metric = proto::Metric::default();
                        metric.set_histogram(to_prometheus(&h, &f.layout));
                        (labels, metric)
                    })
                    .collect();
                let names = &self.label_names[..f.labels.min(self.label_names.len())];
                crate::metrics::family(f.name, f.help, MetricType::HISTOGRAM, names, series)
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
        let every = HistLayout {
            divisor: 1e9,
            slots: (9..=36).collect(),
        };
        let p = to_prometheus(&h, &every);
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

    /// The direct text of a histogram equals what the crate's encoder writes for the same
    /// protobuf family, byte for byte.
    #[test]
    fn text_histogram_equals_the_encoders() {
        let layout = HistLayout::nanos_as_seconds(&Buckets::default()).unwrap();
        let h = hist(&[500, 40_000, 90_000, 3_000_000, 200_000_000_000]);
        let labels = vec!["/a\"b".to_string(), String::new()];
        let mut m = proto::Metric::default();
        m.set_histogram(to_prometheus(&h, &layout));
        let mf = crate::metrics::family(
            "t_seconds",
            "h",
            MetricType::HISTOGRAM,
            &["cgroup", "pod"],
            vec![(labels, m)],
        );
        let mut want = String::new();
        prometheus::TextEncoder::new().encode_utf8(&[mf], &mut want).unwrap();
        let ((), chunks) = crate::expo::capture(|| {
            crate::expo::write(|w| {
                let frag = crate::expo::labels([("cgroup", "/a\"b"), ("pod", "")]);
                let mut cum = Vec::new();
                cumulative(&h, &layout, &mut cum);
                let les = crate::expo::le_values(layout.bounds());
                let sum = h.sum as f64 / layout.divisor;
                w.family("t_seconds", "h", "histogram")
                    .histogram(&[&frag, ""], &les, &cum, 5, sum);
            });
        });
        assert_eq!(format!("{}{}", chunks[0].header, chunks[0].body), want);
        assert_eq!(chunks[0].series, 8 + 3);
    }

    fn dur(s: &str) -> Duration {
        humantime::parse_duration(s).unwrap()
    }

    /// The default separates loopback, same-zone and cross-region connects, in at most 12
    /// buckets, every bound on a slot edge.
    #[test]
    fn default_buckets_separate_latency_classes() {
        let layout = HistLayout::nanos_as_seconds(&Buckets::default()).unwrap();
        assert_eq!(layout.slots, vec![13, 16, 19, 22, 25, 28, 31, 34]);
        assert!(layout.slots.len() < 12);
        let h = hist(&[40_000, 90_000, 300_000, 900_000, 50_000_000, 150_000_000]);
        let p = to_prometheus(&h, &layout);
        let le: Vec<f64> = p.get_bucket().iter().map(|b| b.upper_bound()).collect();
        assert_eq!(le[1], 131071e-9);
        assert_eq!(le[2], 1048575e-9);
        assert_eq!(le.last().copied(), Some(34359738367e-9));
        let counts: Vec<u64> = p.get_bucket().iter().map(|b| b.cumulative_count()).collect();
        // loopback <= 131 us; same zone in (131 us, 1.05 ms]; cross region above 8.4 ms.
        assert_eq!(counts, vec![0, 2, 4, 4, 5, 6, 6, 6]);
    }

    #[test]
    fn bucket_lists_round_up_to_slot_edges() {
        let b = Buckets::List(vec![dur("100us"), dur("1ms"), dur("1024ns"), dur("1s")]);
        // 1024 ns is a power of two: its slot ends at 1023 ns, below 100 us, so out of order.
        assert!(b.slots().unwrap_err().contains("must increase"), "{:?}", b.slots());
        let b = Buckets::List(vec![dur("1024ns"), dur("100us"), dur("1ms"), dur("1s")]);
        assert_eq!(b.slots().unwrap(), vec![9, 16, 19, 29]);
        let p = to_prometheus(
            &hist(&[1023, 1024, 999_999, 2_000_000_000]),
            &HistLayout::nanos_as_seconds(&b).unwrap(),
        );
        let got: Vec<(f64, u64)> = p
            .get_bucket()
            .iter()
            .map(|b| (b.upper_bound(), b.cumulative_count()))
            .collect();
        assert_eq!(
            got,
            vec![(1023e-9, 1), (131071e-9, 2), (1048575e-9, 3), (1073741823e-9, 3)]
        );
        assert_eq!(p.get_sample_count(), 4);
        // Two bounds in one slot cannot be told apart by the kernel.
        let b = Buckets::List(vec![dur("600us"), dur("1ms")]);
        assert!(b.slots().is_err());
        assert!(Buckets::List(vec![]).slots().is_err());
        assert!(Buckets::List(vec![Duration::ZERO]).slots().is_err());
    }

    #[test]
    fn log2_ranges_step_by_factor() {
        let r = |min: &str, max: &str, factor| Buckets::Log2 {
            min: dur(min),
            max: dur(max),
            factor,
        };
        assert_eq!(r("1us", "137s", 2).slots().unwrap(), (9..=36).collect::<Vec<_>>());
        assert_eq!(
            r("16us", "1s", 4).slots().unwrap(),
            vec![13, 15, 17, 19, 21, 23, 25, 27, 29]
        );
        assert!(r("1ms", "1us", 2).slots().is_err());
        assert!(r("1us", "1s", 3).slots().is_err());
        assert!(r("1us", "1s", 1).slots().is_err());
    }

    #[test]
    fn histogram_config_parses_both_forms_and_names_errors() {
        type H = HistogramConfig<ByDestination>;
        let h: H = serde_yaml_ng::from_str("{buckets: [100us, 1ms, 100ms]}").unwrap();
        assert_eq!(h.per, Per::Destination, "the family's default per");
        assert_eq!(h.buckets.slots().unwrap(), vec![16, 19, 26]);
        let h: H = serde_yaml_ng::from_str("{per: workload, buckets: {min: 1us, max: 1s, factor: 2}}").unwrap();
        assert_eq!(h.per, Per::Workload);
        assert_eq!(h.buckets.slots().unwrap().len(), 21);
        let back: H = serde_yaml_ng::from_str(&serde_yaml_ng::to_string(&h).unwrap()).unwrap();
        assert_eq!(back, h);
        let h: H = serde_yaml_ng::from_str("{}").unwrap();
        assert_eq!(h, H::default());
        assert!(serde_yaml_ng::from_str::<H>("{buckets: {min: 1us, max: 1s}}")
            .unwrap_err()
            .to_string()
            .contains("factor"));
        assert!(serde_yaml_ng::from_str::<H>("{buckets: [soon]}")
            .unwrap_err()
            .to_string()
            .contains("bad duration"));
        assert!(serde_yaml_ng::from_str::<H>("{per: pod}").is_err());
        let h: H = serde_yaml_ng::from_str("{per: destination, buckets: [1ms, 1ms]}").unwrap();
        assert_eq!(
            h.validate(&[Per::Workload, Per::Destination]).unwrap_err().0,
            ".buckets"
        );
        assert_eq!(h.validate(&[Per::Workload, Per::Host]).unwrap_err().0, ".per");
        assert_eq!(h.kept_labels(&["destination", "cgroup"], true), 1);
    }
}
