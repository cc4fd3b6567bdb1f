//! The TCP families: connect, retransmit, reset and recovery counters per workload and
//! destination group, and the flow histograms, read from the kernel's maps at scrape.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
};

use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};
use sensor_common::tcp::{kind, result, FlowCountKey, FlowKey};

use super::event::result_label;
use crate::{
    agg::{DefaultPer, HistFamily, HistLayout, HistogramConfig, HistogramMapCollector},
    cgroup::{Discovery, WorkloadLabels, WORKLOAD_LABELS},
    expo::{Scrape, Source, Type},
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
/// A counter family of the flow counts.
pub(super) struct CountFamily {
    pub(super) name: &'static str,
    pub(super) help: &'static str,
    pub(super) kind: Type,
}

/// The counter families the flow count map's record kinds go to (see [`counted_in`]).
pub(super) const COUNT_FAMILIES: [CountFamily; 3] = [
    CountFamily {
        name: "sensor_tcp_connects_total",
        help: "TCP active opens by result (success, refused, timeout, reset, unreachable, error), destination group and workload.",
        kind: Type::Counter,
    },
    CountFamily {
        name: "sensor_tcp_retransmits_total",
        help: "TCP segments retransmitted (tcp:tcp_retransmit_skb); by destination group and workload while the connection is being opened (SYN retransmits), else host-level (destination other, empty workload).",
        kind: Type::Counter,
    },
    CountFamily {
        name: "sensor_tcp_resets_total",
        help: "TCP resets sent and received; by destination group and workload while the connection is being opened (refused connects), else host-level (destination other, empty workload).",
        kind: Type::Counter,
    },
];

pub(super) const RECOVERED: CountFamily = CountFamily {
    name: "sensor_tcp_recovered_total",
    help: "TCP connect ends the kernel skipped in the inet_sock_set_state program (recursion) and the inet_sk_error_report program recovered, by result: failures are counted in sensor_tcp_connects_total and sent as events like any other; result=success are connects established unseen, whose table slot was freed (the success itself is not counted).",
    kind: Type::Counter,
};

/// [`COUNT_FAMILIES`]' `sensor_tcp_connects_total`.
pub(super) const CONNECTS: usize = 0;

/// Where a count of record kind `kind` is exported: the family (an index into
/// [`COUNT_FAMILIES`]) and its first label's value and fragment; `None` for kinds not counted.
/// The one table every writer uses.
pub(super) fn counted_in(kind: u16) -> Option<(usize, Option<(&'static str, &'static str)>)> {
    match kind {
        r if r < result::COUNT => Some((CONNECTS, Some((result_label(r), result_frag(r))))),
        kind::RETRANSMIT => Some((1, None)),
        kind::RESET_RECEIVED => Some((2, Some(("received", "direction=\"received\"")))),
        kind::RESET_SENT => Some((2, Some(("sent", "direction=\"sent\"")))),
        _ => None,
    }
}

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

    /// Every result's count, at 0 until something is recovered (also where the hook is not
    /// attached).
    fn recovered_counts(&self) -> [u64; result::COUNT as usize] {
        let map = self.recovered.locked();
        std::array::from_fn(|r| {
            map.get(&(r as u32), 0)
                .map(|v| v.iter().copied().fold(0u64, u64::wrapping_add))
                .unwrap_or(0)
        })
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
        for (k, [h, _]) in self.hists.snapshot().iter() {
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
            if let Some((CONNECTS, Some((result, _)))) = counted_in(k) {
                *out.entry((result, self.dest(d), wl)).or_default() += v;
            }
        }
        out
    }

    /// Counts of retired keys by destination group, kind and the workload labels they had.
    fn retired_counts(&self) -> Vec<((u16, u16, WorkloadLabels), u64)> {
        let r = self.retired.locked();
        r.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

/// A series of the counter families by its label fragments: the first label's, the
/// destination's, the workload's.
type Key = (&'static str, Arc<str>, Arc<str>);

/// The counter families' totals as one scrape sums them (keys folded into `other` share a
/// series).
#[derive(Default)]
struct Totals([HashMap<Key, u64>; 3]);

impl Totals {
    fn add(&mut self, kind: u16, dest: Arc<str>, workload: Arc<str>, v: u64) {
        if let Some((family, first)) = counted_in(kind) {
            let first = first.map_or("", |(_, frag)| frag);
            *self.0[family].entry((first, dest, workload)).or_default() += v;
        }
    }

    /// The three families, series sorted by their label text.
    fn write(self, scrape: &mut Scrape) {
        for (f, m) in COUNT_FAMILIES.iter().zip(self.0) {
            let mut rows: Vec<(Key, u64)> = m.into_iter().collect();
            rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            let mut fam = scrape.family(f.name, f.help, f.kind);
            for ((first, dest, wl), v) in rows {
                fam.int(&[first, &dest, &wl], v);
            }
        }
    }
}

/// `sensor_tcp_recovered_total`, every result, in label order (as the registry's encoder
/// orders series).
fn write_recovered(scrape: &mut Scrape, counts: &[u64]) {
    let mut rows: Vec<(&str, u64)> = counts
        .iter()
        .enumerate()
        .map(|(r, v)| (result_frag(r as u16), *v))
        .collect();
    rows.sort_unstable();
    let mut fam = scrape.family(RECOVERED.name, RECOVERED.help, RECOVERED.kind);
    for (frag, v) in rows {
        fam.int(&[frag], v);
    }
}

impl Source for CountCollector {
    /// The counter families from label fragments rendered once per workload and scrape.
    fn write(&self, scrape: &mut Scrape) {
        let mut totals = Totals::default();
        let dest = |id: u16| Arc::clone(dest_frag(&self.dest_frags, id));
        for (k, [h, _]) in self.hists.snapshot_shared(scrape).iter() {
            let wl = self.disc.label_text_for_id(k.cgroup_id, scrape);
            totals.add(result::SUCCESS, dest(k.dest), wl, h.buckets.iter().sum::<u64>());
        }
        for (k, v) in self.entries() {
            let wl = self.disc.label_text_for_id(k.cgroup_id, scrape);
            totals.add(k.kind, dest(k.dest), wl, v);
        }
        // Retired keys (vanished workloads folded into `other`), under the labels they had.
        for (l, [h, _]) in self.hists.retired() {
            let Some((d, wl)) = l.split_first() else { continue };
            let dest = Arc::from(crate::expo::labels([("destination", d.as_str())]));
            let wl = crate::cgroup::render_labels(&crate::cgroup::workload_labels_from(wl));
            totals.add(result::SUCCESS, dest, wl, h.buckets.iter().sum::<u64>());
        }
        for ((d, k, wl), v) in self.retired_counts() {
            totals.add(k, dest(d), crate::cgroup::render_labels(&wl), v);
        }
        totals.write(scrape);
        write_recovered(scrape, &self.recovered_counts());
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

/// The flow histograms' label fragments: none, the destination group, or it and the workload.
pub(super) fn text_label_fn(disc: Arc<Discovery>, frags: Vec<Arc<str>>) -> crate::agg::TextLabelFn<FlowKey> {
    let empty: Arc<str> = Arc::from("");
    Box::new(move |k: &FlowKey, kept: usize, scrape: &mut Scrape| {
        let dest = Arc::clone(dest_frag(&frags, k.dest));
        Some(match kept {
            0 => [Arc::clone(&empty), Arc::clone(&empty)],
            1 => [dest, Arc::clone(&empty)],
            _ => [dest, disc.label_text_for_id(k.cgroup_id, scrape)],
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

    /// Kinds sum into their table's family with their first label; keys of one label set
    /// (a workload folded into `other`) share a series; unknown kinds are left out.
    #[test]
    fn counts_write_one_family_per_table_row() {
        let frags = dest_frags(&["db".into()]);
        let wl = |cg: &str| crate::cgroup::render_labels(&crate::cgroup::workload_labels_from(&[cg.to_string()]));
        let mut t = Totals::default();
        t.add(result::SUCCESS, Arc::clone(&frags[0]), wl("/a"), 5);
        t.add(result::REFUSED, Arc::clone(&frags[0]), wl("/a"), 2);
        t.add(result::REFUSED, Arc::clone(&frags[0]), wl("/a"), 1);
        t.add(kind::RETRANSMIT, Arc::clone(&frags[1]), wl(""), 7);
        t.add(kind::RESET_SENT, Arc::clone(&frags[1]), wl("other"), 4);
        t.add(kind::RESET_RECEIVED, Arc::clone(&frags[1]), wl("other"), 3);
        t.add(99, Arc::clone(&frags[1]), wl("/a"), 100);
        let mut scrape = Scrape::new();
        t.write(&mut scrape);
        write_recovered(&mut scrape, &[0, 1, 0, 0, 0, 0]);
        let text = scrape.text();
        let samples = crate::expo::valid(&text);
        let v = |name: &str, labels: &[(&str, &str)]| crate::expo::promtext::value(&text, name, labels);
        let plain = crate::expo::promtext::plain;
        let (connects, retrans, resets) = (
            "sensor_tcp_connects_total",
            "sensor_tcp_retransmits_total",
            "sensor_tcp_resets_total",
        );
        let db = ("destination", "db");
        let other = ("destination", "other");
        assert_eq!(v(connects, &plain(&[("result", "success"), db], "/a")), Some(5.0));
        assert_eq!(v(connects, &plain(&[("result", "refused"), db], "/a")), Some(3.0));
        assert_eq!(v(retrans, &plain(&[other], "")), Some(7.0));
        assert_eq!(v(resets, &plain(&[("direction", "sent"), other], "other")), Some(4.0));
        assert_eq!(
            v(resets, &plain(&[("direction", "received"), other], "other")),
            Some(3.0)
        );
        assert_eq!(v("sensor_tcp_recovered_total", &[("result", "refused")]), Some(1.0));
        // Series in label order, as the registry's encoder wrote them (byte-for-byte scrapes).
        let results: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("sensor_tcp_recovered_total{result=\""))
            .filter_map(|l| l.split('"').next())
            .collect();
        assert_eq!(
            results,
            ["error", "refused", "reset", "success", "timeout", "unreachable"]
        );
        assert_eq!(v("sensor_tcp_recovered_total", &[("result", "error")]), Some(0.0));
        assert_eq!(samples.len(), 2 + 1 + 2 + 6, "{text}");
        assert!(text.contains("# TYPE sensor_tcp_resets_total counter\n"), "{text}");
    }

    #[test]
    fn every_counted_kind_has_a_family_and_its_label() {
        let first = ["result", "", "direction"];
        for k in (0..result::COUNT).chain([kind::RETRANSMIT, kind::RESET_RECEIVED, kind::RESET_SENT]) {
            let (family, label) = counted_in(k).expect("counted");
            match label {
                Some((value, frag)) => assert_eq!(frag, format!("{}=\"{value}\"", first[family])),
                None => assert_eq!(first[family], "", "{k}"),
            }
        }
        assert!(counted_in(kind::RETRANSMIT - 1).is_none());
    }
}
