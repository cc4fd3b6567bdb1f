//! TCP connects: destination groups, per-workload counters and histograms read from the
//! kernel's aggregation maps, connect-failure events.

pub mod coalesce;
pub mod config;
pub mod hooks;
pub mod kfunc;

pub use hooks::SPEC;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    MapData, PerCpuArray, PerCpuHashMap,
};
use prometheus::{
    core::{Collector, Desc},
    proto::{MetricFamily, MetricType},
    IntCounter, IntCounterVec, Opts, Registry,
};
use sensor_common::{
    agg::Log2Hist,
    tcp::{
        kind, result, DestAnyKey, DestPortKey, FlowCountKey, FlowKey, SockLayout, TcpFailureRecord, TcpTpLayout,
        AF_INET, AF_INET6,
    },
};
use serde::Serialize;

use self::{
    coalesce::{Admit, Coalescer, FailureKey},
    config::{Destination, TcpConfig},
};
use crate::sync::Lock as _;
use crate::{
    agg::{DefaultPer, HistFamily, HistLayout, HistogramConfig, HistogramMapCollector},
    cgroup::{Discovery, Janitor, WorkloadLabels, WORKLOAD_LABELS},
    events::EventHub,
    kernel::{btf::KernelBtf, clock, tracefs::Tracefs},
    metrics::{counter_metric, family, Shared},
    probe::{HookKind, KernelContext, LoadPlan, Probe, ProbeSpec, RecordKind, Running, StartContext, StartError},
};
use sensor_common::names::{globals, maps};

/// Tracepoint offsets from tracefs; a missing required field leaves the layout invalid (the
/// program then does nothing and the attach still reports the tracepoint).
pub fn tp_layout(t: &Tracefs) -> Result<TcpTpLayout, String> {
    let ss = t.format("sock", "inet_sock_set_state").map_err(|e| e.to_string())?;
    let need = |name: &str, sizes: &[u16]| {
        ss.offset_if(name, sizes)
            .ok_or_else(|| format!("inet_sock_set_state has no usable {name}"))
    };
    let skaddr = |cat: &str, tp: &str| {
        t.format(cat, tp)
            .ok()
            .and_then(|f| f.offset_if("skaddr", &[8]))
            .unwrap_or(0)
    };
    Ok(TcpTpLayout {
        ss_skaddr: need("skaddr", &[8])?,
        ss_oldstate: need("oldstate", &[4])?,
        ss_newstate: need("newstate", &[4])?,
        ss_dport: need("dport", &[2])?,
        ss_family: need("family", &[2])?,
        ss_protocol: need("protocol", &[2])?,
        ss_daddr: need("daddr", &[4])?,
        ss_daddr_v6: need("daddr_v6", &[16])?,
        rx_reset_skaddr: skaddr("tcp", "tcp_receive_reset"),
        tx_reset_skaddr: skaddr("tcp", "tcp_send_reset"),
        retrans_skaddr: skaddr("tcp", "tcp_retransmit_skb"),
        valid: 1,
    })
}

/// Socket offsets from BTF plus the load-time switches (`dest_groups`: bits of
/// `SockLayout::DEST_*`; `memory_on_v2`: the v2 cgroup id is the memory cgroup's id).
pub fn sock_layout(btf: &KernelBtf, dest_groups: u32, memory_on_v2: bool) -> Result<SockLayout, String> {
    let off = |s: &str, m: &str| btf.member_offset(s, m).map_err(|e| e.to_string());
    let mut l = SockLayout::INVALID;
    l.sk_err = off("sock", "sk_err")?;
    l.srtt_us = off("tcp_sock", "srtt_us")?;
    l.skc_state = off("sock", "__sk_common")? + off("sock_common", "skc_state")?;
    // Only the error-report entry needs it (its check asks for it again).
    l.rcv_nxt = off("tcp_sock", "rcv_nxt").unwrap_or(0);
    l.valid = 1;
    l.dest_groups = dest_groups;
    l.cgroup_id_from_helper = u32::from(memory_on_v2);
    // `sk_protocol` was a bitfield before 5.6: then only the classic tracepoints work.
    let raw = (|| -> Result<(), String> {
        let common = off("sock", "__sk_common")?;
        l.skc_family = common + off("sock_common", "skc_family")?;
        l.skc_dport = common + off("sock_common", "skc_dport")?;
        l.skc_daddr = common + off("sock_common", "skc_daddr")?;
        l.skc_v6_daddr = common + off("sock_common", "skc_v6_daddr")?;
        l.sk_protocol = off("sock", "sk_protocol")?;
        Ok(())
    })();
    if raw.is_ok() {
        l.raw_valid = 1;
    }
    Ok(l)
}

/// Both layouts for the loader, with notes on what is missing.
pub fn layouts(k: &KernelContext, dest_groups: u32, memory_on_v2: bool) -> (TcpTpLayout, SockLayout, Vec<String>) {
    let mut notes = Vec::new();
    let tp = match &k.tracefs {
        Ok(t) => tp_layout(t).unwrap_or_else(|e| {
            notes.push(e);
            TcpTpLayout::INVALID
        }),
        Err(e) => {
            notes.push(format!("tracefs: {e}"));
            TcpTpLayout::INVALID
        }
    };
    let sock = match &k.btf {
        Ok(b) => sock_layout(b, dest_groups, memory_on_v2).unwrap_or_else(|e| {
            notes.push(format!("sock layout (RTT, failure reasons): {e}"));
            SockLayout {
                dest_groups,
                cgroup_id_from_helper: u32::from(memory_on_v2),
                ..SockLayout::INVALID
            }
        }),
        Err(e) => {
            notes.push(format!("BTF: {e}"));
            SockLayout {
                dest_groups,
                cgroup_id_from_helper: u32::from(memory_on_v2),
                ..SockLayout::INVALID
            }
        }
    };
    (tp, sock, notes)
}

/// `SockLayout::DEST_*` bits for a destination configuration.
pub fn dest_group_bits(dests: &BTreeMap<String, Destination>) -> u32 {
    let mut bits = 0;
    if dests.values().any(|d| d.port.is_some()) {
        bits |= SockLayout::DEST_WITH_PORT;
    }
    if dests.values().any(|d| d.port.is_none()) {
        bits |= SockLayout::DEST_ANY_PORT;
    }
    bits
}

/// Destination groups: id 0 is `other`, configured groups follow in name order.
pub fn group_names(dests: &BTreeMap<String, Destination>) -> Vec<String> {
    std::iter::once("other".to_string())
        .chain(dests.keys().cloned())
        .collect()
}

fn addr_bytes(a: IpAddr) -> ([u8; 2], [u8; 16], u32) {
    let mut out = [0u8; 16];
    match a {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            (AF_INET.to_be_bytes(), out, 32)
        }
        IpAddr::V6(v6) => (AF_INET6.to_be_bytes(), v6.octets(), 128),
    }
}

/// Writes the configured groups into the kernel's two tries.
pub fn load_destinations(
    dests: &BTreeMap<String, Destination>,
    with_port: &mut LpmTrie<MapData, DestPortKey, u16>,
    any_port: &mut LpmTrie<MapData, DestAnyKey, u16>,
) -> Result<(), String> {
    for (i, (name, d)) in dests.iter().enumerate() {
        let id = (i + 1) as u16;
        let (family, addr, _) = addr_bytes(d.addr);
        let bits = u32::from(d.prefix);
        let res = match d.port {
            Some(p) => with_port.insert(
                &Key::new(
                    32 + bits,
                    DestPortKey {
                        port: p.to_be_bytes(),
                        family,
                        addr,
                    },
                ),
                id,
                0,
            ),
            None => any_port.insert(&Key::new(16 + bits, DestAnyKey { family, addr }), id, 0),
        };
        res.map_err(|e| format!("destination {name}: {e}"))?;
    }
    Ok(())
}

pub fn result_label(r: u16) -> &'static str {
    match r {
        result::SUCCESS => "success",
        result::REFUSED => "refused",
        result::TIMEOUT => "timeout",
        result::RESET => "reset",
        result::UNREACHABLE => "unreachable",
        _ => "error",
    }
}

/// A failed connect, as exported in events and logs.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TcpFailure {
    pub time: f64,
    pub result: &'static str,
    /// The socket error the kernel recorded (errno), 0 when the application gave up first.
    pub errno: i32,
    pub address: String,
    pub port: u16,
    pub destination: String,
    pub duration_seconds: f64,
    pub pid: u32,
    pub comm: String,
    pub cgroup: Option<String>,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    /// Names from the container runtime; empty when unknown (not looked up on this path).
    #[serde(flatten)]
    pub names: crate::workloads::Names,
    /// Failures this event stands for: 1 for a key's first (published at once), else the
    /// failures of the same workload, destination group and result summed over the interval;
    /// the other fields are the latest one's.
    pub count: u64,
    /// Time of the first failure summed (`time` for a single one).
    pub first_time: f64,
    /// `probes.tcp.failure_events.interval` for a sum, 0 for a failure published at once.
    pub interval_seconds: f64,
    /// A sum over keys that did not fit in `failure_events.max_keys` (the other fields are the
    /// latest failure's, of any key).
    pub overflow: bool,
}

impl TcpFailure {
    /// Converts a record; `names` are the destination groups by id, `cgroup` and `workload`
    /// (the `WORKLOAD_LABELS` values) the attribution of its cgroup id.
    pub fn from_record(
        r: &TcpFailureRecord,
        names: &[String],
        cgroup: Option<String>,
        workload: &crate::cgroup::WorkloadLabels,
        workload_names: crate::workloads::Names,
    ) -> TcpFailure {
        let nonempty = |s: &String| (!s.is_empty()).then(|| s.clone());
        let end = r.comm.iter().position(|b| *b == 0).unwrap_or(r.comm.len());
        let time = clock::unix_seconds(clock::ktime_to_wall(r.header.ktime_ns));
        TcpFailure {
            time,
            result: result_label(r.result),
            errno: r.sk_err,
            address: address(r.family, &r.daddr),
            port: r.dport,
            destination: names
                .get(usize::from(r.dest))
                .cloned()
                .unwrap_or_else(|| "other".into()),
            duration_seconds: r.duration_ns as f64 / 1e9,
            pid: r.tgid,
            comm: String::from_utf8_lossy(&r.comm[..end]).into_owned(),
            cgroup,
            container_id: nonempty(&workload[1]),
            pod_uid: nonempty(&workload[2]),
            names: workload_names,
            count: 1,
            first_time: time,
            interval_seconds: 0.0,
            overflow: false,
        }
    }

    /// This (latest) failure standing for `p`'s sum over `interval`.
    fn summing<S>(mut self, p: &coalesce::Pending<S>, interval: Duration, overflow: bool) -> TcpFailure {
        self.count = p.count;
        self.first_time = clock::unix_seconds(clock::ktime_to_wall(p.first_ktime_ns));
        self.interval_seconds = interval.as_secs_f64();
        self.overflow = overflow;
        self
    }
}

fn address(family: u16, a: &[u8; 16]) -> String {
    match family {
        AF_INET => Ipv4Addr::new(a[0], a[1], a[2], a[3]).to_string(),
        _ => Ipv6Addr::from(*a).to_string(),
    }
}

const HIST_LABELS: [&str; 7] = [
    "destination",
    WORKLOAD_LABELS[0],
    WORKLOAD_LABELS[1],
    WORKLOAD_LABELS[2],
    WORKLOAD_LABELS[3],
    WORKLOAD_LABELS[4],
    WORKLOAD_LABELS[5],
];

const COALESCED: &str = "sensor_events_coalesced_total";
const COALESCED_HELP: &str = "Kernel records not published as an event of their own but summed into a later event's count: reason interval (the same workload, destination and result within probes.tcp.failure_events.interval), key_limit (more keys than failure_events.max_keys: summed into the interval's overflow event).";
const CONNECTS: &str = "sensor_tcp_connects_total";
const CONNECTS_HELP: &str = "TCP active opens by result (success, refused, timeout, reset, unreachable, error), destination group and workload.";
const RETRANS: &str = "sensor_tcp_retransmits_total";
const RETRANS_HELP: &str = "TCP segments retransmitted (tcp:tcp_retransmit_skb); by destination group and workload while the connection is being opened (SYN retransmits), else host-level (destination other, empty workload).";
const RECOVERED: &str = "sensor_tcp_recovered_total";
const RECOVERED_HELP: &str = "TCP connect ends the kernel skipped in the inet_sock_set_state program (recursion) and the inet_sk_error_report program recovered, by result: failures are counted in sensor_tcp_connects_total and sent as events like any other; result=success are connects established unseen, whose table slot was freed (the success itself is not counted).";
const RESETS: &str = "sensor_tcp_resets_total";
const RESETS_HELP: &str =
    "TCP resets sent and received; by destination group and workload while the connection is being opened (refused connects), else host-level (destination other, empty workload).";

struct CountCollector {
    map: Mutex<PerCpuHashMap<MapData, FlowCountKey, u64>>,
    /// Host-level resets and retransmits (sockets not connecting), by `kind - RETRANSMIT`.
    host: Mutex<PerCpuArray<MapData, u64>>,
    /// Connect ends recovered by the error-report program, by result.
    recovered: Mutex<PerCpuArray<MapData, u64>>,
    /// Each success is observed once in the latency histogram (part 0): its count is the
    /// success count.
    hists: Arc<HistogramMapCollector<FlowKey, 2>>,
    disc: Arc<Discovery>,
    names: Vec<String>,
    dest_frags: Vec<Arc<str>>,
    descs: Vec<Desc>,
    /// Counts of retired keys (vanished workloads folded into `other`) by destination group,
    /// kind and workload labels, still exported.
    retired: Mutex<BTreeMap<(u16, u16, WorkloadLabels), u64>>,
}

impl CountCollector {
    /// Moves the counts of `ids`' keys into userspace under their current labels and deletes
    /// the keys (see [`HistogramMapCollector::retire`]). Returns the keys retired.
    fn retire(&self, ids: &HashSet<u64>) -> usize {
        let Ok(mut m) = self.map.lock() else { return 0 };
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
        let Ok(map) = self.recovered.lock() else {
            return BTreeMap::new();
        };
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
        let mut entries: Vec<(FlowCountKey, u64)> = match self.map.lock() {
            Ok(m) => m
                .iter()
                .filter_map(Result::ok)
                .map(|(k, v)| (k, v.iter().copied().fold(0u64, u64::wrapping_add)))
                .collect(),
            Err(_) => Vec::new(),
        };
        if let Ok(host) = self.host.lock() {
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
const RESULT_FRAGS: [&str; 6] = [
    "result=\"success\"",
    "result=\"refused\"",
    "result=\"timeout\"",
    "result=\"reset\"",
    "result=\"unreachable\"",
    "result=\"error\"",
];

fn result_frag(r: u16) -> &'static str {
    RESULT_FRAGS.get(usize::from(r)).copied().unwrap_or(RESULT_FRAGS[5])
}

/// `destination="..."` fragments by group id; the last is `other`, for ids not configured.
fn dest_frags(names: &[String]) -> Vec<Arc<str>> {
    names
        .iter()
        .map(String::as_str)
        .chain(["other"])
        .map(|n| Arc::from(crate::expo::labels([("destination", n)])))
        .collect()
}

fn dest_frag(frags: &[Arc<str>], id: u16) -> &Arc<str> {
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
fn text_label_fn(disc: Arc<Discovery>, frags: Vec<Arc<str>>) -> crate::agg::TextLabelFn<FlowKey> {
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
fn hist_family<D: DefaultPer>(
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

/// The kernel maps the TCP slice reads.
pub struct TcpMaps {
    pub counts: PerCpuHashMap<MapData, FlowCountKey, u64>,
    pub host_counts: PerCpuArray<MapData, u64>,
    /// Connect ends recovered by the error-report program, by result.
    pub recovered: PerCpuArray<MapData, u64>,
    /// Connect latency and handshake RTT per flow, in one value.
    pub hists: PerCpuHashMap<MapData, FlowKey, [Log2Hist; 2]>,
}

pub struct TcpSlice {
    disc: Arc<Discovery>,
    names: Vec<String>,
    hub: Arc<EventHub>,
    /// Failures waiting for their interval's event; `None`: an event per failure.
    coalescer: Option<Mutex<Coalescer<TcpFailureRecord>>>,
    /// `probes.tcp.failure_events.interval`.
    interval: Duration,
    /// `sensor_events_coalesced_total{probe="tcp",reason}`: `interval`, `key_limit`.
    coalesced: [IntCounter; 2],
    counts: Arc<CountCollector>,
    hists: Arc<HistogramMapCollector<FlowKey, 2>>,
    janitor: Mutex<Janitor<u64>>,
    grace: Duration,
}

impl TcpSlice {
    pub fn new(
        registry: &Registry,
        hub: Arc<EventHub>,
        cfg: &TcpConfig,
        disc: Arc<Discovery>,
        maps: TcpMaps,
        grace: Duration,
    ) -> prometheus::Result<Arc<TcpSlice>> {
        let names = group_names(&cfg.destinations);
        let descs = [
            (CONNECTS, CONNECTS_HELP),
            (RETRANS, RETRANS_HELP),
            (RESETS, RESETS_HELP),
            (RECOVERED, RECOVERED_HELP),
        ]
        .into_iter()
        .map(|(n, h)| Desc::new(n.into(), h.into(), vec![], Default::default()))
        .collect::<prometheus::Result<Vec<_>>>()?;
        let label_fn = |disc: Arc<Discovery>, names: Vec<String>| {
            Box::new(move |k: &FlowKey| {
                let mut l = vec![names
                    .get(usize::from(k.dest))
                    .cloned()
                    .unwrap_or_else(|| "other".into())];
                l.extend(disc.labels_for_id(k.cgroup_id));
                Some(l)
            })
        };
        let hists = Arc::new(HistogramMapCollector::new(
            [
                hist_family(
                    "sensor_tcp_connect_duration_seconds",
                    "Time from SYN sent to connection established, by destination group and workload (aggregated in the kernel; labels and buckets per probes.tcp.connect_duration).",
                    &cfg.connect_duration,
                )?,
                hist_family(
                    "sensor_tcp_rtt_seconds",
                    "RTT of active opens, the handshake's sample (srtt_us when the connection becomes ESTABLISHED), by destination group (and workload with probes.tcp.rtt.per: workload).",
                    &cfg.rtt,
                )?,
            ],
            &HIST_LABELS,
            maps.hists,
            label_fn(Arc::clone(&disc), names.clone()),
        )?
        .with_text_labels(text_label_fn(Arc::clone(&disc), dest_frags(&names))));
        let counts = Arc::new(CountCollector {
            map: Mutex::new(maps.counts),
            host: Mutex::new(maps.host_counts),
            recovered: Mutex::new(maps.recovered),
            hists: Arc::clone(&hists),
            disc: Arc::clone(&disc),
            names: names.clone(),
            dest_frags: dest_frags(&names),
            descs,
            retired: Mutex::new(BTreeMap::new()),
        });
        registry.register(Box::new(Shared(Arc::clone(&counts))))?;
        registry.register(Box::new(Shared(Arc::clone(&hists))))?;
        disc.note_retired("tcp_hists", 0);
        disc.note_retired("tcp_counts", 0);
        let coalesced = IntCounterVec::new(Opts::new(COALESCED, COALESCED_HELP), &["probe", "reason"])?;
        registry.register(Box::new(coalesced.clone()))?;
        let fe = &cfg.failure_events;
        Ok(Arc::new(TcpSlice {
            disc,
            names,
            hub,
            coalescer: (!fe.interval.is_zero()).then(|| Mutex::new(Coalescer::new(fe.max_keys))),
            interval: fe.interval,
            coalesced: ["interval", "key_limit"].map(|r| coalesced.with_label_values(&["tcp", r])),
            counts,
            hists,
            janitor: Mutex::new(Janitor::default()),
            grace,
        }))
    }

    /// A failure record: published now when it is its key's first (or without coalescing),
    /// else summed into its key's next event and counted as coalesced.
    pub fn handle_failure(&self, r: &TcpFailureRecord) {
        if let Some(c) = &self.coalescer {
            let key = FailureKey {
                cgroup_id: r.cgroup_id,
                dest: r.dest,
                result: r.result,
            };
            let admit = c.locked().admit(key, r.header.ktime_ns, *r);
            match admit {
                Admit::Publish => {}
                Admit::Interval => return self.coalesced[0].inc(),
                Admit::KeyLimit => return self.coalesced[1].inc(),
            }
        }
        self.publish_failure(self.failure(r));
    }

    /// Ends a coalescing interval: publishes each key's sum and the overflow's.
    pub fn flush_failures(&self) {
        let Some(c) = &self.coalescer else {
            return;
        };
        let due = c.locked().flush();
        for (_, p) in &due.keyed {
            self.publish_failure(self.failure(&p.last).summing(p, self.interval, false));
        }
        if let Some(p) = &due.overflow {
            self.publish_failure(self.failure(&p.last).summing(p, self.interval, true));
        }
    }

    /// The record attributed to its workload and destination group.
    fn failure(&self, r: &TcpFailureRecord) -> TcpFailure {
        let path = self.disc.path_of(r.cgroup_id);
        let wl = self.disc.labels_for_id(r.cgroup_id);
        let names = (*self.disc.names(&wl[1])).clone();
        TcpFailure::from_record(r, &self.names, path, &wl, names)
    }

    fn publish_failure(&self, f: TcpFailure) {
        tracing::debug!(
            target: "sensor::tcp",
            event = "tcp_connect_failure",
            result = f.result,
            address = %f.address,
            port = f.port,
            destination = %f.destination,
            pid = f.pid,
            comm = %f.comm,
            count = f.count,
            "connect failed"
        );
        self.hub.publish_as("tcp_connect_failure", &f);
    }

    /// Drops vanished cgroups' series: a workload folded into `other` at once (its counts move
    /// into userspace, still in `other`), one with series of its own after the grace period.
    /// (Connects whose outcome was missed age in the kernel: a new connect takes over their
    /// slot after `connect_max_age`.)
    pub fn maintain(&self) {
        let mut keys: Vec<FlowKey> = self.hists.keys();
        let count_ids: HashSet<u64> = match self.counts.map.lock() {
            Ok(m) => m.keys().filter_map(Result::ok).map(|k| k.cgroup_id).collect(),
            Err(_) => HashSet::new(),
        };
        let all: HashSet<u64> = keys
            .iter()
            .map(|k| k.cgroup_id)
            .chain(count_ids.iter().copied())
            .collect();
        let folded: HashSet<u64> = all
            .iter()
            .copied()
            .filter(|id| *id != 0 && self.disc.is_folded_vanished(*id))
            .collect();
        tracing::debug!(
            keys = keys.len(),
            ids = all.len(),
            gone = all.iter().filter(|id| !self.disc.is_live(**id)).count(),
            folded = folded.len(),
            "tcp upkeep"
        );
        if !folded.is_empty() {
            let (out, kept): (Vec<FlowKey>, Vec<FlowKey>) =
                keys.into_iter().partition(|k| folded.contains(&k.cgroup_id));
            self.disc.note_retired("tcp_hists", self.hists.retire(&out));
            self.disc.note_retired("tcp_counts", self.counts.retire(&folded));
            keys = kept;
        }
        // Ids with failure counts but no success have keys in the count map only.
        let ids: Vec<u64> = keys
            .iter()
            .map(|k| k.cgroup_id)
            .chain(count_ids.into_iter().filter(|id| !folded.contains(id)))
            .collect::<HashSet<u64>>()
            .into_iter()
            .collect();
        let expired = match self.janitor.lock() {
            Ok(mut j) => j.sweep(ids, |id| *id == 0 || self.disc.is_live(*id), self.grace),
            Err(_) => Vec::new(),
        };
        if expired.is_empty() {
            return;
        }
        for k in keys.iter().filter(|k| expired.contains(&k.cgroup_id)) {
            self.hists.remove(k);
        }
        if let Ok(mut m) = self.counts.map.lock() {
            let keys: Vec<FlowCountKey> = m
                .keys()
                .filter_map(Result::ok)
                .filter(|k| expired.contains(&k.cgroup_id))
                .collect();
            for k in keys {
                let _ = m.remove(&k);
            }
        }
    }
}

/// The TCP probe: connects tracked from SYN_SENT to their outcome in the kernel, counted and
/// timed per workload and destination group there; failures as events.
pub struct TcpProbe {
    cfg: TcpConfig,
}

impl TcpProbe {
    pub fn new(cfg: TcpConfig) -> TcpProbe {
        TcpProbe { cfg }
    }
}

/// Entries of the connect table a kernel does not use (an LRU hash hands its entries out to
/// CPUs in batches; a few hundred keep it valid everywhere at little cost).
const UNUSED_TABLE: u32 = 256;

/// How often workloads are rescanned for this probe (labels of new cgroups, vanished series).
const DISCOVERY: Duration = Duration::from_secs(5);

const RECORDS: &[RecordKind] = &[RecordKind {
    kind: sensor_common::record::kind::TCP_CONNECT_FAILURE,
    len: TcpFailureRecord::LEN,
    version: sensor_common::tcp::FAILURE_VERSION,
}];

impl Probe for TcpProbe {
    fn spec(&self) -> &'static ProbeSpec {
        &SPEC
    }

    fn enabled(&self) -> bool {
        self.cfg.enabled
    }

    fn excluded_hooks(&self) -> &[HookKind] {
        &self.cfg.exclude_hooks
    }

    fn records(&self) -> &'static [RecordKind] {
        RECORDS
    }

    fn prepare(&self, kctx: &KernelContext, plan: &mut LoadPlan) {
        if let Some(note) = plan.task_layout(kctx) {
            tracing::debug!(%note, "tcp: connects are attributed without the task layout");
        }
        let memory_on_v2 = !crate::cgroup::Hierarchies::discover().memory_is_v1();
        let (tp, mut sock, notes) = layouts(kctx, dest_group_bits(&self.cfg.destinations), memory_on_v2);
        let slots = self.cfg.conn_slots();
        sock.conn_mask = slots.saturating_sub(1);
        sock.conn_max_age_ns = u64::try_from(self.cfg.connect_max_age.as_nanos()).unwrap_or(u64::MAX);
        for n in &notes {
            tracing::warn!(note = %n, "TCP layout is partial");
        }
        // Socket fields as direct loads where the running kernel has `bpf_rdonly_cast` (its BTF
        // ids are only meaningful for the running kernel's own BTF, not a `--btf-path` file).
        let kfunc = match (&kctx.btf, kctx.btf_path.is_none()) {
            (Ok(b), true) if sock.raw_valid != 0 => b
                .type_id("bpf_rdonly_cast", true)
                .and_then(|f| Some((f, b.type_id("sock", false)?, b.type_id("tcp_sock", false)?))),
            _ => None,
        };
        if let Some((_, sock_id, tcp_id)) = kfunc {
            sock.direct = 1;
            sock.sock_btf_id = sock_id;
            sock.tcp_sock_btf_id = tcp_id;
        }
        tracing::debug!(
            direct = kfunc.is_some(),
            "TCP socket fields: direct loads through bpf_rdonly_cast, else bpf_probe_read_kernel"
        );
        plan.global(globals::TCP_TP_LAYOUT, &tp);
        plan.global(globals::SOCK_LAYOUT, &sock);
        // One connect table runs (see `hooks`): the other is created at its smallest.
        let (slots_array, slots_hash) = if kctx.features.atomics() {
            (slots, UNUSED_TABLE)
        } else {
            (1, slots)
        };
        plan.map_size(maps::TCP_CONNS, slots_array);
        plan.map_size(maps::TCP_CONNS_NX, slots_hash);
        plan.map_size(maps::TCP_COUNTS, self.cfg.max_series);
        plan.map_size(maps::TCP_HISTS, self.cfg.max_series);
        let id = kfunc.map(|k| k.0);
        plan.patch(Box::new(move |object: &mut Vec<u8>| {
            *object = kfunc::patch_rdonly_cast(object, id);
        }));
    }

    fn start(&self, ctx: &mut StartContext<'_>) -> Result<Arc<dyn Running>, StartError> {
        if !ctx.report.state.running() {
            return Ok(Arc::new(crate::probe::Idle));
        }
        let mut with_port: LpmTrie<MapData, DestPortKey, u16> = ctx.take_map(maps::TCP_DEST_PORT)?;
        let mut any_port: LpmTrie<MapData, DestAnyKey, u16> = ctx.take_map(maps::TCP_DEST_ANY)?;
        load_destinations(&self.cfg.destinations, &mut with_port, &mut any_port)
            .map_err(|e| StartError::Other(format!("probes.tcp.destinations: {e}")))?;
        let maps = TcpMaps {
            counts: ctx.take_map(maps::TCP_COUNTS)?,
            host_counts: ctx.take_map(maps::TCP_HOST_COUNTS)?,
            recovered: ctx.take_map(maps::TCP_RECOVERED)?,
            hists: ctx.take_map(maps::TCP_HISTS)?,
        };
        // The loaded program references both tries, so they outlive these handles.
        let slice = TcpSlice::new(
            ctx.registry,
            Arc::clone(ctx.hub),
            &self.cfg,
            Arc::clone(ctx.discovery),
            maps,
            ctx.vanished_grace,
        )?;
        Ok(slice)
    }

    fn discovery_interval(&self) -> Option<Duration> {
        Some(DISCOVERY)
    }
}

impl Running for TcpSlice {
    fn handle(&self, _kind: u16, bytes: &[u8]) {
        match crate::decode::read::<TcpFailureRecord>(bytes) {
            Some(r) => self.handle_failure(&r),
            None => tracing::error!(len = bytes.len(), "TCP record shorter than checked"),
        }
    }

    fn after_discovery(&self, _stop: &tokio::sync::watch::Receiver<bool>) {
        self.maintain();
    }

    fn upkeep_interval(&self) -> Option<Duration> {
        self.coalescer.as_ref().map(|_| self.interval)
    }

    fn upkeep(&self) {
        self.flush_failures();
    }

    fn finish(&self) {
        self.flush_failures();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_ids_follow_name_order() {
        let mut d = BTreeMap::new();
        d.insert("postgres".to_string(), "10.0.0.0/8:5432".parse().unwrap());
        d.insert("dns".to_string(), "0.0.0.0/0:53".parse().unwrap());
        assert_eq!(group_names(&d), vec!["other", "dns", "postgres"]);
    }

    /// Socket addresses are slab objects a fixed size apart: their slots must still spread, in
    /// the hot region and over the whole table.
    #[test]
    fn connect_slots_spread_slab_addresses() {
        use sensor_common::tcp::ConnSlot;
        let sk = |i: u64| 0xffff_8881_0a00_0000u64 + i * 2368;
        let mask = 65535;
        // The first window lies in the hot region: 512 sockets, no slot anyone's first more
        // than a few times.
        let mut hot = vec![0u32; ConnSlot::HOT_SLOTS as usize];
        for i in 0..512 {
            let x = ConnSlot::index(sk(i), 0, mask);
            assert!(x < ConnSlot::HOT_SLOTS, "{x}");
            hot[x as usize] += 1;
        }
        assert!(hot.iter().all(|&h| h <= 4), "max {:?}", hot.iter().max());
        // The second spreads over the rest of the table, never into the hot region (full when
        // the second window is needed) nor past the end: 4096 sockets in 65536 slots.
        let mut hits = vec![0u32; 65536];
        for i in 0..4096 {
            for j in 0..ConnSlot::WINDOW {
                let x = ConnSlot::index(sk(i), ConnSlot::WINDOW + j, mask);
                assert!((ConnSlot::HOT_SLOTS..=mask).contains(&x), "{x}");
                hits[x as usize] += u32::from(j == 0);
            }
        }
        assert!(hits.iter().all(|&h| h <= 3), "max {:?}", hits.iter().max());
        // The smallest table with a region beyond the hot one: second windows fill it, up to
        // its last slot.
        let mut last = 0;
        for i in 0..4096 {
            let x = ConnSlot::index(sk(i), ConnSlot::SLOTS_PER_CONNECT - 1, 511);
            assert!((ConnSlot::HOT_SLOTS + ConnSlot::WINDOW - 1..=511).contains(&x), "{x}");
            last = last.max(x);
        }
        assert_eq!(last, 511);
        // 64 sockets in 64 slots: about 1 - 1/e of the slots are somebody's first.
        let mut first = [false; 64];
        for i in 0..64 {
            first[ConnSlot::index(sk(i), 0, 63) as usize] = true;
        }
        let used = first.iter().filter(|&&u| u).count();
        assert!((30..=56).contains(&used), "{used} of 64 slots");
        // Both windows wrap around the end of their region.
        let s = (0..)
            .map(sk)
            .find(|&s| ConnSlot::index(s, 0, mask) == ConnSlot::HOT_SLOTS - 1)
            .unwrap();
        assert_eq!(ConnSlot::index(s, 1, mask), 0);
        // In a table no larger than the hot region the second window wraps too.
        let s = (0..)
            .map(sk)
            .find(|&s| ConnSlot::index(s, ConnSlot::WINDOW, 63) == 63)
            .unwrap();
        assert_eq!(ConnSlot::index(s, ConnSlot::WINDOW + 1, 63), 0);
    }

    #[test]
    fn addresses_format() {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(address(AF_INET, &a), "127.0.0.1");
        assert_eq!(address(AF_INET6, &Ipv6Addr::LOCALHOST.octets()), "::1");
        assert_eq!(result_label(result::TIMEOUT), "timeout");
        assert_eq!(result_label(99), "error");
        for r in 0..8 {
            assert_eq!(result_frag(r), format!("result=\"{}\"", result_label(r)));
        }
        let frags = dest_frags(&["other".into(), "db".into()]);
        assert_eq!(&**dest_frag(&frags, 1), "destination=\"db\"");
        assert_eq!(&**dest_frag(&frags, 9), "destination=\"other\"");
    }
}
