//! Routes decoded records to their slice and counts what arrives and what fails to decode.

use std::sync::Arc;

use crate::{
    decode::{decode, Record},
    metrics::SelfMetrics,
    oom::OomSlice,
    tcp::TcpSlice,
    transport::Sink,
};

pub struct Dispatcher {
    pub metrics: Arc<SelfMetrics>,
    pub oom: Arc<OomSlice>,
    pub tcp: Option<Arc<TcpSlice>>,
}

impl Sink for Dispatcher {
    fn sample(&self, bytes: &[u8]) {
        match decode(bytes) {
            Ok(Record::OomKill(r)) => {
                self.metrics.events_total.with_label_values(&["oom"]).inc();
                self.oom.handle(&r);
            }
            Ok(Record::TcpFailure(r)) => {
                self.metrics.events_total.with_label_values(&["tcp"]).inc();
                if let Some(t) = &self.tcp {
                    t.handle_failure(&r);
                }
            }
            Err(e) => {
                self.metrics.decode_errors_total.with_label_values(&[e.probe()]).inc();
                tracing::debug!(error = %e, len = bytes.len(), "skipped undecodable record");
            }
        }
    }

    fn sample_failed(&self, bytes: &[u8]) {
        let probe = crate::decode::probe_of_record(bytes);
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
