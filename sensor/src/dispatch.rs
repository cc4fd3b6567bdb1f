//! Routes checked records to the probe that registered their kind, and counts what arrives and
//! what fails to decode.

use std::sync::Arc;

use prometheus::IntCounter;

use crate::{decode::KindTable, metrics::SelfMetrics, probe::Running, transport::Sink};

pub struct Dispatcher {
    metrics: Arc<SelfMetrics>,
    kinds: KindTable,
    /// Running probes by name, indexed by `kinds`' owners.
    probes: Vec<(&'static str, Arc<dyn Running>)>,
    /// Each probe's `sensor_events_total` series, looked up once (not hashed per record).
    events_total: Vec<IntCounter>,
}

impl Dispatcher {
    /// `probes`: each running probe with the record kinds it registered.
    pub fn new(
        metrics: Arc<SelfMetrics>,
        probes: Vec<(&'static str, &'static [crate::probe::RecordKind], Arc<dyn Running>)>,
    ) -> Dispatcher {
        let mut kinds = KindTable::default();
        let mut named = Vec::new();
        for (i, (name, records, running)) in probes.into_iter().enumerate() {
            kinds.add(records, i);
            named.push((name, running));
        }
        let events_total = named
            .iter()
            .map(|(name, _)| metrics.events_total.with_label_values(&[*name]))
            .collect();
        Dispatcher {
            metrics,
            kinds,
            probes: named,
            events_total,
        }
    }

    fn probe_name(&self, owner: Option<usize>) -> &'static str {
        owner.and_then(|o| self.probes.get(o)).map_or("unknown", |(n, _)| *n)
    }
}

impl Sink for Dispatcher {
    fn sample(&self, bytes: &[u8]) {
        match self.kinds.check(bytes) {
            Ok((kind, owner)) => {
                if let (Some((_, probe)), Some(total)) = (self.probes.get(owner), self.events_total.get(owner)) {
                    total.inc();
                    probe.handle(kind, bytes);
                }
            }
            Err(e) => {
                let probe = self.probe_name(e.kind().and_then(|k| self.kinds.owner(k)));
                self.metrics.decode_errors_total.with_label_values(&[probe]).inc();
                tracing::debug!(error = %e, len = bytes.len(), "skipped undecodable record");
            }
        }
    }

    fn sample_failed(&self, bytes: &[u8]) {
        let probe = self.probe_name(self.kinds.owner_of(bytes));
        self.metrics.daemon_lost.add(probe);
        tracing::error!(
            probe,
            len = bytes.len(),
            "handling a record failed; counted as lost (internal_error)"
        );
    }

    fn ring_lost(&self, cpu: u32, count: u64) {
        tracing::warn!(
            cpu,
            count,
            "perf ring overflowed; the losses are in sensor_events_lost_total{{reason=\"buffer_full\"}}"
        );
    }
}
