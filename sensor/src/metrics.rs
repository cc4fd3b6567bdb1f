//! The daemon's own metrics (`sensor_*` self series) and helpers to build metric families
//! from values read out of kernel maps at scrape time.

use std::sync::{Arc, Mutex};

use prometheus::{
    core::Collector,
    proto::{MetricFamily, MetricType},
    IntCounterVec, IntGaugeVec, Opts, Registry,
};

use crate::{
    expo::{self, Scrape, Source, Type},
    probe::{ProbeReport, ProbeSpec},
    sync::Lock as _,
    transport::{KernelCounters, LOST_REASONS},
};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Self metrics shared by every slice.
pub struct SelfMetrics {
    pub registry: Registry,
    build_info: IntGaugeVec,
    probe_attached: IntGaugeVec,
    probe_state: IntGaugeVec,
    pub events_total: IntCounterVec,
    pub decode_errors_total: IntCounterVec,
    /// `sensor_internal_errors_total{task}`: background tasks that failed (and were restarted).
    pub internal_errors: IntCounterVec,
    /// Records lost inside the daemon, exported with the kernel's losses.
    pub daemon_lost: Arc<DaemonLosses>,
    /// The collectors that write their own text at each scrape (map readers), rendered with
    /// the registry.
    pub sources: expo::Sources,
}

/// Records the daemon received but could not handle (handling panicked), per probe; exported
/// as `sensor_events_lost_total{reason="internal_error"}`.
#[derive(Default)]
pub struct DaemonLosses {
    internal: Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl DaemonLosses {
    pub fn add(&self, probe: &'static str) {
        let mut m = self.internal.locked();
        *m.entry(probe).or_insert(0) += 1;
    }

    pub fn get(&self, probe: &str) -> u64 {
        let m = self.internal.locked();
        m.get(probe).copied().unwrap_or(0)
    }
}

/// `sensor_log_lines_dropped_total`, read from the logger at scrape time.
struct LogDrops;

impl Source for LogDrops {
    fn write(&self, scrape: &mut Scrape) {
        scrape
            .family(
                "sensor_log_lines_dropped_total",
                "Log lines not written: the queue to the log writer was full (stderr's reader too slow or stalled) or the write failed.",
                Type::Counter,
            )
            .int(&[], crate::logging::lines_dropped());
    }
}

fn must<T>(r: prometheus::Result<T>, what: &str) -> T {
    match r {
        Ok(v) => v,
        // Metric definitions are static; a failure here is a programming error caught by tests.
        Err(e) => panic!("metric definition {what} is invalid: {e}"),
    }
}

impl SelfMetrics {
    pub fn new(kernel: &str, probes: &[&'static str]) -> SelfMetrics {
        let registry = Registry::new();
        let build_info = must(
            IntGaugeVec::new(
                Opts::new("sensor_build_info", "Sensor version and kernel release; always 1."),
                &["version", "kernel"],
            ),
            "sensor_build_info",
        );
        let probe_attached = must(
            IntGaugeVec::new(
                Opts::new(
                    "sensor_probe_attached",
                    "1 for each hook a probe uses, 0 for candidate hooks that did not attach (hook=\"none\" when the probe has none).",
                ),
                &["probe", "hook"],
            ),
            "sensor_probe_attached",
        );
        let probe_state = must(
            IntGaugeVec::new(
                Opts::new(
                    "sensor_probe_state",
                    "1 for the probe's state: attached, degraded (fallback hook), unsupported or disabled.",
                ),
                &["probe", "state"],
            ),
            "sensor_probe_state",
        );
        let events_total = must(
            IntCounterVec::new(
                Opts::new("sensor_events_total", "Records received from the kernel and decoded."),
                &["probe"],
            ),
            "sensor_events_total",
        );
        let decode_errors_total = must(
            IntCounterVec::new(
                Opts::new(
                    "sensor_decode_errors_total",
                    "Records that failed validation (bad kind, length or version) and were skipped.",
                ),
                &["probe"],
            ),
            "sensor_decode_errors_total",
        );
        let internal_errors = must(
            IntCounterVec::new(
                Opts::new(
                    "sensor_internal_errors_total",
                    "Failures of the daemon's background tasks (each is logged and the task restarted).",
                ),
                &["task"],
            ),
            "sensor_internal_errors_total",
        );
        for c in [
            Box::new(build_info.clone()) as Box<dyn Collector>,
            Box::new(probe_attached.clone()),
            Box::new(probe_state.clone()),
            Box::new(events_total.clone()),
            Box::new(decode_errors_total.clone()),
            Box::new(internal_errors.clone()),
            // The sensor's own footprint (process_resident_memory_bytes, CPU, fds, threads), so
            // fleet dashboards can show what it costs per host.
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ] {
            must(registry.register(c), "registration");
        }
        let sources = expo::Sources::default();
        sources.add(Arc::new(LogDrops));
        build_info.with_label_values(&[VERSION, kernel]).set(1);
        for p in probes {
            events_total.with_label_values(&[*p]).reset();
            decode_errors_total.with_label_values(&[*p]).reset();
        }
        decode_errors_total.with_label_values(&["unknown"]).reset();
        internal_errors.with_label_values(&["ring_reader"]).reset();
        SelfMetrics {
            registry,
            build_info,
            probe_attached,
            probe_state,
            events_total,
            decode_errors_total,
            internal_errors,
            daemon_lost: Arc::default(),
            sources,
        }
    }

    pub fn set_probe_reports(&self, specs: &[&ProbeSpec], reports: &[ProbeReport]) {
        self.probe_attached.reset();
        self.probe_state.reset();
        for r in reports {
            // 0 for every declared candidate (tried or not), then 1 for the hooks in use.
            let spec = specs.iter().find(|s| s.name == r.probe);
            for h in spec.iter().flat_map(|s| s.groups.iter()).flat_map(|g| g.hooks.iter()) {
                self.probe_attached.with_label_values(&[r.probe, h.kind.label()]).set(0);
            }
            for h in r.hooks() {
                self.probe_attached.with_label_values(&[r.probe, h.label()]).set(1);
            }
            if r.hooks().is_empty() {
                self.probe_attached.with_label_values(&[r.probe, "none"]).set(0);
            }
            self.probe_state.with_label_values(&[r.probe, r.state.label()]).set(1);
        }
    }

    pub fn build_info(&self) -> &IntGaugeVec {
        &self.build_info
    }
}

/// `sensor_series{family}`: what each family costs the Prometheus that scrapes this host.
pub const SERIES: &str = "sensor_series";
const SERIES_HELP: &str = "Series this scrape exposes per metric family, as Prometheus stores them (a histogram: one per bucket including +Inf, plus _sum and _count; a summary: one per quantile plus _sum and _count); includes itself.";

/// Series of one family in the text exposition.
fn series_of(mf: &MetricFamily) -> usize {
    mf.get_metric()
        .iter()
        .map(|m| match mf.get_field_type() {
            MetricType::HISTOGRAM => {
                let b = m.get_histogram().get_bucket();
                let inf = b.last().is_some_and(|b| b.upper_bound() == f64::INFINITY);
                b.len() + usize::from(!inf) + 2
            }
            MetricType::SUMMARY => m.get_summary().get_quantile().len() + 2,
            _ => 1,
        })
        .sum()
}

/// The `sensor_series` family for families of the given `(name, series)` (computed at scrape,
/// so it is exact for it).
fn series_chunk<'a>(families: impl IntoIterator<Item = (&'a str, usize)>) -> Option<expo::Chunk> {
    let mut rows: Vec<(&str, usize)> = families.into_iter().filter(|(name, _)| *name != SERIES).collect();
    rows.push((SERIES, rows.len() + 1));
    rows.sort_unstable();
    let mut scrape = Scrape::new();
    let mut f = scrape.family(SERIES, SERIES_HELP, Type::Gauge);
    for (name, n) in rows {
        f.int(&[&expo::labels([("family", name)])], n as u64);
    }
    scrape.into_chunks().pop()
}

/// `sensor_events_lost_total{probe,reason}` read from the kernel's per-CPU counters at scrape
/// time, so the exported value is exactly what the kernel counted. Present at 0 from the start.
pub struct LostCollector {
    counters: Arc<Mutex<KernelCounters>>,
    probes: Vec<(&'static str, u32)>,
    misses: Arc<crate::progstats::ProgramMisses>,
    daemon: Arc<DaemonLosses>,
}

impl LostCollector {
    pub const NAME: &'static str = "sensor_events_lost_total";
    const HELP: &'static str = "What could not be counted or delivered: buffer_full (perf ring full), map_full (aggregation map full), untracked (an end without its start), recursion (program runs the kernel skipped because the program was already running on that CPU), no_scratch, internal_error (received by the daemon but its handling failed).";

    pub fn new(
        counters: Arc<Mutex<KernelCounters>>,
        probes: Vec<(&'static str, u32)>,
        misses: Arc<crate::progstats::ProgramMisses>,
        daemon: Arc<DaemonLosses>,
    ) -> LostCollector {
        LostCollector {
            counters,
            probes,
            misses,
            daemon,
        }
    }

    /// Every `(probe, reason, count)` series, zeros included: what is exported and what the
    /// web summary shows.
    pub fn rows(&self) -> Vec<(&'static str, &'static str, u64)> {
        // Reading counters cannot leave them inconsistent: a poisoned lock is still usable,
        // and the family never silently disappears.
        let counters = self.counters.locked();
        let mut rows = Vec::new();
        for (probe, id) in &self.probes {
            for (which, reason) in LOST_REASONS {
                rows.push((*probe, *reason, counters.get(*id, *which)));
            }
            rows.push((*probe, "recursion", self.misses.misses(probe)));
            rows.push((*probe, "internal_error", self.daemon.get(probe)));
        }
        let unknown = self.daemon.get("unknown");
        if unknown > 0 {
            rows.push(("unknown", "internal_error", unknown));
        }
        // In label order, as the registry's encoder orders series.
        rows.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        rows
    }
}

impl Source for LostCollector {
    fn write(&self, scrape: &mut Scrape) {
        let rows = self.rows();
        let mut f = scrape.family(Self::NAME, Self::HELP, Type::Counter);
        for (probe, reason, v) in rows {
            f.int(&[&expo::labels([("probe", probe), ("reason", reason)])], v);
        }
    }
}

/// Renders the registry (through the crate's encoder) and every source (as they write
/// themselves) in the Prometheus text format, with `sensor_series` computed from this very
/// scrape. Families come out sorted by name, each with its HELP and TYPE once.
pub fn render(registry: &Registry, sources: &expo::Sources) -> String {
    let mut out = String::with_capacity(expo::size_hint());
    render_into(registry, sources, &mut out);
    expo::note_size(out.len());
    out
}

/// The exposition in a buffer kept from one scrape to the next (see [`Exposition`]).
pub fn render_pooled(registry: &Registry, sources: &expo::Sources) -> Exposition {
    let mut out = OUT.locked().take().unwrap_or_default();
    out.clear();
    render_into(registry, sources, &mut out);
    Exposition(out)
}

/// The one output buffer kept between scrapes (a second scrape at the same time gets its own).
static OUT: Mutex<Option<String>> = Mutex::new(None);

/// A rendered exposition; its buffer goes back for the next scrape when the response that
/// carries it (`bytes::Bytes::from_owner`) is dropped: no copy, and no fresh pages to fault in.
pub struct Exposition(String);

impl AsRef<[u8]> for Exposition {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl Drop for Exposition {
    fn drop(&mut self) {
        let mut kept = OUT.locked();
        if kept.is_none() {
            *kept = Some(std::mem::take(&mut self.0));
        }
    }
}

/// [`render`] into `out` (appended).
fn render_into(registry: &Registry, sources: &expo::Sources, out: &mut String) {
    let families = registry.gather();
    let mut scrape = expo::Scrape::new();
    sources.write(&mut scrape);
    let chunks = scrape.into_chunks();
    enum Part<'a> {
        Proto(&'a MetricFamily),
        Text(&'a expo::Chunk),
    }
    let mut parts: Vec<(&str, usize, Part)> = families
        .iter()
        .filter(|mf| mf.name() != SERIES)
        .map(|mf| (mf.name(), series_of(mf), Part::Proto(mf)))
        .chain(
            chunks
                .iter()
                .filter(|c| c.series > 0 && c.name != SERIES)
                // A family is the registry's or a source's; never written twice.
                .filter(|c| !registered(&families, c.name))
                .map(|c| (c.name, c.series, Part::Text(c))),
        )
        .collect();
    let series = series_chunk(parts.iter().map(|(n, s, _)| (*n, *s)));
    if let Some(c) = &series {
        parts.push((SERIES, 0, Part::Text(c)));
    }
    parts.sort_by(|a, b| a.0.cmp(b.0));
    let encoder = prometheus::TextEncoder::new();
    for (_, _, part) in parts {
        match part {
            Part::Proto(mf) => {
                if let Err(e) = encoder.encode_utf8(std::slice::from_ref(mf), out) {
                    tracing::error!(error = %e, family = mf.name(), "encoding metrics failed");
                }
            }
            Part::Text(c) => {
                out.push_str(&c.header);
                out.push_str(&c.body);
            }
        }
    }
    expo::recycle(chunks);
    expo::recycle(series.into_iter().collect());
}

/// Whether the registry has family `name` (`families` sorted by name, as `gather` returns them).
fn registered(families: &[MetricFamily], name: &str) -> bool {
    let found = families.binary_search_by(|f| f.name().cmp(name)).is_ok();
    if found {
        tracing::error!(
            family = name,
            "a family both registered and written by a source; the source's is left out"
        );
    }
    found
}

#[cfg(test)]
mod tests {
    use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

    /// Three workloads with a counter, two with a two-bound histogram, one host gauge: the
    /// exact series counts, equal to the lines of the exposition.
    #[test]
    fn sensor_series_counts_each_family_exactly() {
        let reg = Registry::new();
        let c = IntCounterVec::new(Opts::new("t_connects_total", "h"), &["cgroup"]).unwrap();
        let h = HistogramVec::new(
            HistogramOpts::new("t_duration_seconds", "h").buckets(vec![0.1, 1.0]),
            &["cgroup"],
        )
        .unwrap();
        let g = IntGauge::new("t_up", "h").unwrap();
        reg.register(Box::new(c.clone())).unwrap();
        reg.register(Box::new(h.clone())).unwrap();
        reg.register(Box::new(g.clone())).unwrap();
        for w in ["/a", "/b", "/c"] {
            c.with_label_values(&[w]).inc();
        }
        for w in ["/a", "/b"] {
            h.with_label_values(&[w]).observe(0.5);
        }
        g.set(1);
        let text = super::render(&reg, &crate::expo::Sources::default());
        let value = |family: &str| super::tests_support::metric(&text, family);
        assert_eq!(value("t_connects_total"), Some(3.0));
        assert_eq!(value("t_duration_seconds"), Some(2.0 * (2.0 + 1.0 + 2.0)));
        assert_eq!(value("t_up"), Some(1.0));
        assert_eq!(value(super::SERIES), Some(4.0), "three families and itself");
        let samples = text.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(samples, 3 + 10 + 1 + 4, "{text}");
    }
}

#[cfg(test)]
mod source_tests {
    use std::sync::Arc;

    use prometheus::{IntCounter, Registry};

    use crate::expo::{Scrape, Source, Sources, Type};

    struct Fixed(&'static str);

    impl Source for Fixed {
        fn write(&self, scrape: &mut Scrape) {
            let mut f = scrape.family(self.0, "h", Type::Gauge);
            f.int(&["w=\"a\""], 1);
            f.int(&["w=\"b\""], 2);
        }
    }

    /// Registry and sources in one exposition: families sorted by name, each once (a source's
    /// family also in the registry is left out), `sensor_series` counting the sources' too.
    #[test]
    fn sources_render_with_the_registry() {
        let reg = Registry::new();
        let c = IntCounter::new("m_total", "h").unwrap();
        reg.register(Box::new(c.clone())).unwrap();
        c.inc();
        let sources = Sources::default();
        sources.add(Arc::new(Fixed("z_gauge")));
        sources.add(Arc::new(Fixed("a_gauge")));
        sources.add(Arc::new(Fixed("m_total")));
        let text = super::render(&reg, &sources);
        let samples = crate::expo::valid(&text);
        let names: Vec<&str> = samples.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "a_gauge",
                "a_gauge",
                "m_total",
                "sensor_series",
                "sensor_series",
                "sensor_series",
                "sensor_series",
                "z_gauge",
                "z_gauge"
            ],
            "{text}"
        );
        let v = |name: &str, l: &[(&str, &str)]| crate::expo::promtext::value(&text, name, l);
        assert_eq!(v("m_total", &[]), Some(1.0));
        assert_eq!(v("z_gauge", &[("w", "b")]), Some(2.0));
        assert_eq!(v(super::SERIES, &[("family", "a_gauge")]), Some(2.0));
        assert_eq!(v(super::SERIES, &[("family", "m_total")]), Some(1.0));
    }
}

#[cfg(test)]
mod tests_support {
    /// `sensor_series{family="..."}` from an exposition.
    pub fn metric(text: &str, family: &str) -> Option<f64> {
        let prefix = format!("{}{{family=\"{family}\"}} ", super::SERIES);
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
    }
}
