//! The TCP families: connect, retransmit, reset and recovery counters per workload and
//! destination group, and the flow histograms, read from the kernel's maps at scrape.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
};

use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};
use prometheus::{
    core::{Collector, Desc},
    proto::{MetricFamily, MetricType},
};
use sensor_common::tcp::{kind, result, FlowCountKey, FlowKey};

use super::event::result_label;
use crate::{
    agg::{DefaultPer, HistFamily, HistLayout, HistogramConfig, HistogramMapCollector},
    cgroup::{Discovery, WorkloadLabels, WORKLOAD_LABELS},
    metrics::{counter_metric, family},
    sync::Lock as _,
};

pub(super) const HIST_LABELS: [&str; 7] = [
    "destination",
    WORKLOAD_LABELS[0],
    WORKLOAD_LABELS[1],
    WORKLOAD_LABELS[2],
    WORKLOAD_LABELS[3],
    WORKLOAD_LABELS[4],
    WORKLOAD_LABELS[5],
];

pub(super) const COALESCED: &str = "sensor_events_coalesced_total";
pub(super) const COALESCED_HELP: &str = "Kernel records not published as an event of their own but summed into a later event's count: reason interval (the same workload, destination and result within probes.tcp.failure_events.interval), key_limit (more keys than failure_events.max_keys: summed into the interval's overflow event).";
pub(super) const CONNECTS: &str = "sensor_tcp_connects_total";
pub(super) const CONNECTS_HELP: &str = "TCP active opens by result (success, refused, timeout, reset, unreachable, error), destination group and workload.";
pub(super) const RETRANS: &str = "sensor_tcp_retransmits_total";
pub(super) const RETRANS_HELP: &str = "TCP segments retransmitted (tcp:tcp_retransmit_skb); by destination group and workload while the connection is being opened (SYN retransmits), else host-level (destination other, empty workload).";
pub(super) const RECOVERED: &str = "sensor_tcp_recovered_total";
pub(super) const RECOVERED_HELP: &str = "TCP connect ends the kernel skipped in the inet_sock_set_state program (recursion) and the inet_sk_error_report program recovered, by result: failures are counted in sensor_tcp_connects_total and sent as events like any other; result=success are connects established unseen, whose table slot was freed (the success itself is not counted).";
pub(super) const RESETS: &str = "sensor_tcp_resets_total";
pub(super) const RESETS_HELP: &str =
    "TCP resets sent and received; by destination group and workload while the connection is being opened (refused connects), else host-level (destination other, empty workload).";

pub(super) struct CountCollector {
    pub(super) map: Mutex<PerCpuHashMap<MapData, FlowCountKey, u64>>,
    /// Host-level resets and retransmits (sockets not connecting), by `kind - RETRANSMIT`.
    pub(super) host: Mutex<PerCpuArray<MapData, u64>>,
    /// Connect ends recovered by the error-report program, by result.
    pub(super) recovered: Mutex<PerCpuArray<MapData, u64>>,
    /// Each success is observed once in the latency histogram (part 0): its count is the
    /// success count.
    pub(super) hists: Arc<HistogramMapCollector<FlowKey, 2>>,
    pub(super) disc: Arc<Discovery>,
    pub(super) names: Vec<String>,
    pub(super) dest_frags: Vec<Arc<str>>,
    pub(super) descs: Vec<Desc>,
    /// Counts of retired keys (vanished workloads folded into `other`) by destination group,
    /// kind and workload labels, still exported.
    pub(super) retired: Mutex<BTreeMap<(u16, u16, WorkloadLabels), u64>>,
}

impl CountCollector {
    /// Moves the counts of `ids`' keys into userspace under their current labels and deletes
    /// the keys (see [`HistogramMapCollector::retire`]). Returns the keys retired.
    pub(super) fn retire(&self, ids: &HashSet<u64>) -> usize {
        let mut m = self.map.locked();
        let keys: Vec<FlowCountKey> = m
            .keys()
            .filter_map(Result::ok)
            .filter(|k| ids.contains(&k.cgroup_id))
            .collect();
        let mut retired = self.retired.locked();
        let mut n = 0;
        for k in keys {
            let Ok(v) = m.get(&k, 0) else { continue };
            let total = v.iter().copied().fold(0u64, u64::wrapping_add);
            let e = retired
                .entry((k.dest, k.kind, self.disc.labels_for_id(k.cgroup_id)))
                .or_default();
            *e = e.wrapping_add(total);
            if m.remove(&k).is_ok() {
                n += 1;
            }
        }
        n
    }

    fn dest(&self, id: u16) -> String {
        self.names
            .get(usize::from(id))
            .cloned()
            .unwrap_or_else(|| "other".to_string())
    }

    /// Every result, at 0 until something is recovered (also where the hook is not attached).
    fn recovered_series(&self) -> BTreeMap<Vec<String>, u64> {
        let map = self.recovered.locked();
        (0..result::COUNT)
            .map(|r| {
                let v = map
                    .get(&u32::from(r), 0)
                    .map(|v| v.iter().copied().fold(0u64, u64::wrapping_add))
                    .unwrap_or(0);
                (vec![result_label(r).to_string()], v)
            })
            .collect()
    }

    /// Every key's total over the CPUs, plus the host-level resets and retransmits.
    fn entries(&self) -> Vec<(FlowCountKey, u64)> {
        let mut entries: Vec<(FlowCountKey, u64)> = {
            let m = self.map.locked();
            m.iter()
                .filter_map(Result::ok)
                .map(|(k, v)| (k, v.iter().copied().fold(0u64, u64::wrapping_add)))
                .collect()
        };
        {
            let host = self.host.locked();
            for what in [kind::RETRANSMIT, kind::RESET_RECEIVED, kind::RESET_SENT] {
                if let Ok(v) = host.get(&u32::from(what - kind::RETRANSMIT), 0) {
                    let key = FlowCountKey {
                        cgroup_id: 0,
                        dest: sensor_common::tcp::DEST_OTHER,
                        kind: what,
                        _pad: 0,
                    };
                    entries.push((key, v.iter().copied().fold(0u64, u64::wrapping_add)));
                }
            }
        }
        entries
    }

    /// Connects by result, destination and workload, as `sensor_tcp_connects_total` counts
    /// them (for the web summary).
    pub(super) fn connects(&self) -> super::view::Connects {
        let mut out = super::view::Connects::new();
        let success = result_label(result::SUCCESS);
        for (k, [h, _]) in self.hists.snapshot_shared().iter() {
            let key = (success, self.dest(k.dest), self.disc.labels_for_id(k.cgroup_id));
            *out.entry(key).or_default() += h.buckets.iter().sum::<u64>();
        }
        // Retired histograms are labelled destination first, then the workload.
        for (l, [h, _]) in self.hists.retired() {
            let dest = l.first().cloned().unwrap_or_default();
            let wl = crate::cgroup::workload_labels_from(l.get(1..).unwrap_or_default());
            *out.entry((success, dest, wl)).or_default() += h.buckets.iter().sum::<u64>();
        }
        let live = self
            .entries()
            .into_iter()
            .map(|(k, v)| ((k.dest, k.kind, self.disc.labels_for_id(k.cgroup_id)), v));
        for ((d, k, wl), v) in live.chain(self.retired_counts()) {
            if k < result::COUNT {
                *out.entry((result_label(k), self.dest(d), wl)).or_default() += v;
            }
        }
        out
    }

    /// Counts of retired keys by destination group, kind and the workload labels they had.
    fn retired_counts(&self) -> Vec<((u16, u16, WorkloadLabels), u64)> {
        let r = self.retired.locked();
        r.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// The three counter families as exposition text (see `expo`), from label
    /// fragments rendered once per workload and scrape.
    fn write_text(&self, w: &mut crate::expo::Writer) {
        type Key = (&'static str, Arc<str>, Arc<str>);
        let mut connects: HashMap<Key, u64> = HashMap::new();
        let mut retrans: HashMap<Key, u64> = HashMap::new();
        let mut resets: HashMap<Key, u64> = HashMap::new();
        let dest = |id: u16| Arc::clone(dest_frag(&self.dest_frags, id));
        for (k, [h, _]) in self.hists.snapshot_shared().iter() {
            let key = (RESULT_FRAGS[0], dest(k.dest), self.disc.label_text_for_id(k.cgroup_id));
            *connects.entry(key).or_default() += h.buckets.iter().sum::<u64>();
        }
        for (k, v) in self.entries() {
            let (target, first) = match k.kind {
                r if r < result::COUNT => (&mut connects, result_frag(r)),
                kind::RETRANSMIT => (&mut retrans, ""),
                kind::RESET_RECEIVED => (&mut resets, "direction=\"received\""),
                kind::RESET_SENT => (&mut resets, "direction=\"sent\""),
                _ => continue,
            };
            let key = (first, dest(k.dest), self.disc.label_text_for_id(k.cgroup_id));
            *target.entry(key).or_default() += v;
        }
        // Retired keys (vanished workloads folded into `other`), under the labels they had.
        for (l, [h, _]) in self.hists.retired() {
            let Some((d, wl)) = l.split_first() else { continue };
            let key = (
                RESULT_FRAGS[0],
                Arc::from(crate::expo::labels([("destination", d.as_str())])),
                crate::cgroup::render_labels(&crate::cgroup::workload_labels_from(wl)),
            );
            *connects.entry(key).or_default() += h.buckets.iter().sum::<u64>();
        }
        for ((d, k, wl), v) in self.retired_counts() {
            let (target, first) = match k {
                r if r < result::COUNT => (&mut connects, result_frag(r)),
                kind::RETRANSMIT => (&mut retrans, ""),
                kind::RESET_RECEIVED => (&mut resets, "direction=\"received\""),
                kind::RESET_SENT => (&mut resets, "direction=\"sent\""),
                _ => continue,
            };
            *target
                .entry((first, dest(d), crate::cgroup::render_labels(&wl)))
                .or_default() += v;
        }
        for (name, help, m) in [
            (CONNECTS, CONNECTS_HELP, connects),
            (RETRANS, RETRANS_HELP, retrans),
            (RESETS, RESETS_HELP, resets),
        ] {
            let mut rows: Vec<(Key, u64)> = m.into_iter().collect();
            rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            let mut f = w.family(name, help, "counter");
            for ((first, dest, wl), v) in rows {
                f.int(&[first, &dest, &wl], v);
            }
        }
        let mut f = w.family(RECOVERED, RECOVERED_HELP, "counter");
        for (labels, v) in self.recovered_series() {
            let text = crate::expo::labels(["result"].into_iter().zip(labels.iter().map(String::as_str)));
            f.int(&[&text], v);
        }
    }
}

/// `result="..."` fragments in `result::*` order (`result_label`).
pub(super) const RESULT_FRAGS: [&str; 6] = [
    "result=\"success\"",
    "result=\"refused\"",
    "result=\"timeout\"",
    "result=\"reset\"",
    "result=\"unreachable\"",
    "result=\"error\"",
];

pub(super) fn result_frag(r: u16) -> &'static str {
    RESULT_FRAGS.get(usize::from(r)).copied().unwrap_or(RESULT_FRAGS[5])
}

/// `destination="..."` fragments by group id; the last is `other`, for ids not configured.
pub(super) fn dest_frags(names: &[String]) -> Vec<Arc<str>> {
    names
        .iter()
        .map(String::as_str)
        .chain(["other"])
        .map(|n| Arc::from(crate::expo::labels([("destination", n)])))
        .collect()
}

pub(super) fn dest_frag(frags: &[Arc<str>], id: u16) -> &Arc<str> {
    let last = frags.len() - 1;
    &frags[usize::from(id).min(last)]
}

impl Collector for CountCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if crate::expo::write(|w| self.write_text(w)) {
            return Vec::new();
        }
        let mut connects: BTreeMap<Vec<String>, u64> = BTreeMap::new();
        let mut retrans: BTreeMap<Vec<String>, u64> = BTreeMap::new();
        let mut resets: BTreeMap<Vec<String>, u64> = BTreeMap::new();
        let entries = self.entries();
        for (k, [h, _]) in self.hists.snapshot_shared().iter() {
            let mut labels = vec![result_label(result::SUCCESS).to_string(), self.dest(k.dest)];
            labels.extend(self.disc.labels_for_id(k.cgroup_id));
            *connects.entry(labels).or_default() += h.buckets.iter().sum::<u64>();
        }
        // Retired histograms are labelled destination first, then the workload.
        for (l, [h, _]) in self.hists.retired() {
            let mut labels = vec![result_label(result::SUCCESS).to_string()];
            labels.extend(l);
            *connects.entry(labels).or_default() += h.buckets.iter().sum::<u64>();
        }
        let live = entries
            .into_iter()
            .map(|(k, v)| ((k.dest, k.kind, self.disc.labels_for_id(k.cgroup_id)), v));
        for ((d, k, wl), v) in live.chain(self.retired_counts()) {
            let dest = self.dest(d);
            let (target, first) = match k {
                r if r < result::COUNT => (&mut connects, Some(result_label(r).to_string())),
                kind::RETRANSMIT => (&mut retrans, None),
                kind::RESET_RECEIVED => (&mut resets, Some("received".to_string())),
                kind::RESET_SENT => (&mut resets, Some("sent".to_string())),
                _ => continue,
            };
            let mut labels: Vec<String> = first.into_iter().collect();
            labels.push(dest);
            labels.extend(wl);
            *target.entry(labels).or_default() += v;
        }
        let recovered = self.recovered_series();
        let series =
            |m: BTreeMap<Vec<String>, u64>| m.into_iter().map(|(l, v)| (l, counter_metric(v as f64))).collect();
        let wl = WORKLOAD_LABELS;
        vec![
            family(
                CONNECTS,
                CONNECTS_HELP,
                MetricType::COUNTER,
                &["result", "destination", wl[0], wl[1], wl[2], wl[3], wl[4], wl[5]],
                series(connects),
            ),
            family(
                RETRANS,
                RETRANS_HELP,
                MetricType::COUNTER,
                &["destination", wl[0], wl[1], wl[2], wl[3], wl[4], wl[5]],
                series(retrans),
            ),
            family(
                RESETS,
                RESETS_HELP,
                MetricType::COUNTER,
                &["direction", "destination", wl[0], wl[1], wl[2], wl[3], wl[4], wl[5]],
                series(resets),
            ),
            family(
                RECOVERED,
                RECOVERED_HELP,
                MetricType::COUNTER,
                &["result"],
                series(recovered),
            ),
        ]
    }
}

/// The flow histograms' label fragments: none, the destination group, or it and the workload.
pub(super) fn text_label_fn(disc: Arc<Discovery>, frags: Vec<Arc<str>>) -> crate::agg::TextLabelFn<FlowKey> {
    let empty: Arc<str> = Arc::from("");
    Box::new(move |k: &FlowKey, kept: usize| {
        let dest = Arc::clone(dest_frag(&frags, k.dest));
        Some(match kept {
            0 => [Arc::clone(&empty), Arc::clone(&empty)],
            1 => [dest, Arc::clone(&empty)],
            _ => [dest, disc.label_text_for_id(k.cgroup_id)],
        })
    })
}

/// A histogram family of the TCP flow map, as configured.
pub(super) fn hist_family<D: DefaultPer>(
    name: &'static str,
    help: &'static str,
    h: &HistogramConfig<D>,
) -> prometheus::Result<HistFamily> {
    Ok(HistFamily {
        name,
        help,
        layout: HistLayout::nanos_as_seconds(&h.buckets).map_err(prometheus::Error::Msg)?,
        labels: h.kept_labels(&HIST_LABELS, true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_fragments() {
        for r in 0..8 {
            assert_eq!(result_frag(r), format!("result=\"{}\"", result_label(r)));
        }
        let frags = dest_frags(&["other".into(), "db".into()]);
        assert_eq!(&**dest_frag(&frags, 1), "destination=\"db\"");
        assert_eq!(&**dest_frag(&frags, 9), "destination=\"other\"");
    }
}
