//! The running TCP probe: its maps, failure events (coalesced per interval), series upkeep.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use sensor_common::{
    agg::Log2Hist,
    tcp::{FlowCountKey, FlowKey, TcpFailureRecord},
};

use super::{
    coalesce::{Admit, Coalescer, FailureKey},
    config::TcpConfig,
    destinations::group_names,
    event::TcpFailure,
    metrics::{dest_frags, hist_family, text_label_fn, CountCollector, COALESCED, COALESCED_HELP, HIST_LABELS},
};
use crate::{
    agg::HistogramMapCollector,
    cgroup::Discovery,
    events::EventHub,
    expo::{Source, Sources},
    probe::Running,
    sync::Lock as _,
};

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
    pub(super) counts: Arc<CountCollector>,
    pub(super) hists: Arc<HistogramMapCollector<FlowKey, 2>>,
    /// Connect totals at each web summary, for its rates.
    pub(super) rates: super::view::Rates,
}

impl TcpSlice {
    pub fn new(
        registry: &Registry,
        sources: &Sources,
        hub: Arc<EventHub>,
        cfg: &TcpConfig,
        disc: Arc<Discovery>,
        maps: TcpMaps,
    ) -> prometheus::Result<Arc<TcpSlice>> {
        let names = group_names(&cfg.destinations);
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
        )
        .with_text_labels(text_label_fn(Arc::clone(&disc), dest_frags(&names))));
        let counts = Arc::new(CountCollector {
            map: Mutex::new(maps.counts),
            host: Mutex::new(maps.host_counts),
            recovered: Mutex::new(maps.recovered),
            hists: Arc::clone(&hists),
            disc: Arc::clone(&disc),
            names: names.clone(),
            dest_frags: dest_frags(&names),
            retired: Mutex::new(BTreeMap::new()),
        });
        sources.add(Arc::clone(&counts) as Arc<dyn Source>);
        sources.add(Arc::clone(&hists) as Arc<dyn Source>);
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
            rates: Default::default(),
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
    /// into userspace, still in `other`), every other when the registry retires its id.
    /// (Connects whose outcome was missed age in the kernel: a new connect takes over their
    /// slot after `connect_max_age`.)
    pub fn maintain(&self) {
        let mut keys: Vec<FlowKey> = self.hists.keys();
        let count_ids: HashSet<u64> = self
            .counts
            .map
            .locked()
            .keys()
            .filter_map(Result::ok)
            .map(|k| k.cgroup_id)
            .collect();
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
        // Ids the registry retired (gone past the grace period, for every probe) lose their keys.
        let retired: HashSet<u64> = self.disc.retired().iter().copied().collect();
        if retired.is_empty() {
            return;
        }
        for k in keys.iter().filter(|k| retired.contains(&k.cgroup_id)) {
            self.hists.remove(k);
        }
        {
            let mut m = self.counts.map.locked();
            let keys: Vec<FlowCountKey> = m
                .keys()
                .filter_map(Result::ok)
                .filter(|k| retired.contains(&k.cgroup_id))
                .collect();
            for k in keys {
                let _ = m.remove(&k);
            }
        }
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

    fn view(&self) -> Option<crate::probe::View> {
        Some(self.summary())
    }
}
