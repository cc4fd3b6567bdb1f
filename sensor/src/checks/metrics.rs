//! The checks' Prometheus series (names from the conventions) and the user-named gauges
//! extracted from websocket JSON messages.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use prometheus::{GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use super::{
    config::{Check, GaugeSpec},
    CheckRuntime, RunResult,
};

use crate::{
    expo::{self, Scrape, Source, Type},
    sync::Lock as _,
};

/// Seconds: 5 ms .. 30 s, enough resolution around typical SLOs (100 ms .. 1 s).
const BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

pub struct CheckMetrics {
    up: IntGaugeVec,
    runs: IntCounterVec,
    duration: HistogramVec,
    responses: IntCounterVec,
    pub ws_messages: IntCounterVec,
    pub extract_errors: IntCounterVec,
    pub notifications: IntCounterVec,
}

/// Options of a check series: `location` as a constant label when this sensor has one.
fn opts(name: &str, help: &str, location: &str) -> Opts {
    let o = Opts::new(name, help);
    if location.is_empty() {
        o
    } else {
        o.const_label("location", location)
    }
}

impl CheckMetrics {
    /// The check series; with a `location` (`vantage.location`), every one carries it.
    pub fn new(registry: &Registry, checks: &[Check], location: &str) -> prometheus::Result<CheckMetrics> {
        let up = IntGaugeVec::new(
            opts(
                "sensor_check_up",
                "1 if the check's last run succeeded (stream: connected), else 0.",
                location,
            ),
            &["check", "type"],
        )?;
        let runs = IntCounterVec::new(
            opts("sensor_check_runs_total", "Synthetic check runs by result.", location),
            &["check", "type", "result"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::from(opts(
                "sensor_check_duration_seconds",
                "Time spent in each phase of a check run (dns, connect, tls, ttfb, transfer, handshake, first_message, total).",
                location,
            ))
            .buckets(BUCKETS.to_vec()),
            &["check", "type", "phase"],
        )?;
        let responses = IntCounterVec::new(
            opts(
                "sensor_check_http_responses_total",
                "HTTP responses received by status code.",
                location,
            ),
            &["check", "code"],
        )?;
        let ws_messages = IntCounterVec::new(
            opts(
                "sensor_check_ws_messages_total",
                "Websocket messages received.",
                location,
            ),
            &["check"],
        )?;
        let extract_errors = IntCounterVec::new(
            opts(
                "sensor_check_ws_extract_errors_total",
                "Websocket messages (or entries) not turned into gauges, by reason.",
                location,
            ),
            &["check", "reason"],
        )?;
        let notifications = IntCounterVec::new(
            opts(
                "sensor_check_alert_notifications_total",
                "Alert webhook deliveries by result (failed = every retry failed).",
                location,
            ),
            &["result"],
        )?;
        for c in [&runs, &responses, &ws_messages, &extract_errors, &notifications] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(up.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        for c in checks {
            let t = c.kind.label();
            up.with_label_values(&[c.name.as_str(), t]).set(0);
            for r in ["success", "failure"] {
                runs.with_label_values(&[c.name.as_str(), t, r]);
            }
            if c.kind == super::config::CheckType::Websocket {
                ws_messages.with_label_values(&[c.name.as_str()]);
            }
        }
        for r in ["sent", "failed"] {
            notifications.with_label_values(&[r]);
        }
        Ok(CheckMetrics {
            up,
            runs,
            duration,
            responses,
            ws_messages,
            extract_errors,
            notifications,
        })
    }

    pub fn record(&self, r: &RunResult) {
        self.up
            .with_label_values(&[r.check.as_str(), r.kind])
            .set(i64::from(r.success));
        self.record_untimed(r);
        self.observe_phases(&r.check, r.kind, &r.phases);
    }

    /// Counts a run whose phases were observed elsewhere (stream ticks; `up` is live there).
    pub fn record_untimed(&self, r: &RunResult) {
        let result = if r.success { "success" } else { "failure" };
        self.runs.with_label_values(&[r.check.as_str(), r.kind, result]).inc();
        if let Some(code) = r.status {
            self.responses
                .with_label_values(&[r.check.as_str(), &code.to_string()])
                .inc();
        }
    }

    pub fn observe_phases(&self, check: &str, kind: &str, phases: &super::conn::Phases) {
        for (phase, secs) in phases.labelled() {
            self.observe_phase(check, kind, phase, secs);
        }
    }

    pub fn observe_phase(&self, check: &str, kind: &str, phase: &str, secs: f64) {
        self.duration.with_label_values(&[check, kind, phase]).observe(secs);
    }

    pub fn set_up(&self, check: &str, kind: &str, up: bool) {
        self.up.with_label_values(&[check, kind]).set(i64::from(up));
    }
}

/// `sensor_check_availability_ratio{check,window}` and `sensor_check_alert_firing{check}`,
/// computed from the result rings at scrape time so the windows slide even between runs.
pub struct WindowCollector {
    pub checks: Vec<Arc<CheckRuntime>>,
    /// `location="..."` (`vantage.location`) when it is set, a label of every series; else empty.
    location: String,
}

impl WindowCollector {
    pub fn new(checks: Vec<Arc<CheckRuntime>>, location: &str) -> WindowCollector {
        let location = if location.is_empty() {
            String::new()
        } else {
            expo::labels([("location", location)])
        };
        WindowCollector { checks, location }
    }
}

impl Source for WindowCollector {
    fn write(&self, scrape: &mut Scrape) {
        let now = super::now_unix();
        let mut rows: Vec<(String, super::runtime::WindowSnapshot)> = self
            .checks
            .iter()
            .map(|rt| (expo::labels([("check", rt.name())]), rt.windows(now)))
            .collect();
        // In label order, as the registry's encoder orders series.
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let mut f = scrape.family(
            "sensor_check_availability_ratio",
            "Share of successful runs over the window (10m, 1h); absent without runs.",
            Type::Gauge,
        );
        for (check, snap) in &rows {
            for (window, st) in [("window=\"10m\"", &snap.short), ("window=\"1h\"", &snap.long)] {
                if let Some(a) = st.availability {
                    f.float(&[&self.location, check, window], a);
                }
            }
        }
        let mut f = scrape.family(
            "sensor_check_alert_firing",
            "1 while the check's availability alert fires.",
            Type::Gauge,
        );
        for (check, snap) in &rows {
            f.int(&[&self.location, check], u64::from(snap.alert_firing));
        }
    }
}

/// Why a message (or one entry of an array message) gave no gauge value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtractError {
    NotJson,
    MissingField,
    NotANumber,
    SeriesLimit,
}

impl ExtractError {
    pub fn label(self) -> &'static str {
        match self {
            ExtractError::NotJson => "not_json",
            ExtractError::MissingField => "missing_field",
            ExtractError::NotANumber => "not_a_number",
            ExtractError::SeriesLimit => "series_limit",
        }
    }
}

/// One user-named gauge fed from JSON messages.
pub struct Extractor {
    spec: GaugeSpec,
    gauge: GaugeVec,
    seen: Mutex<HashSet<Vec<String>>>,
}

fn field<'a>(v: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

impl Extractor {
    pub fn new(registry: &Registry, check: &str, spec: &GaugeSpec) -> prometheus::Result<Extractor> {
        let help = spec
            .help
            .clone()
            .unwrap_or_else(|| format!("Field '{}' of check {check}'s websocket messages.", spec.value));
        let labels: Vec<&str> = spec.labels.iter().map(String::as_str).collect();
        let gauge = GaugeVec::new(Opts::new(spec.name.clone(), help), &labels)?;
        registry.register(Box::new(gauge.clone()))?;
        Ok(Extractor {
            spec: spec.clone(),
            gauge,
            seen: Mutex::new(HashSet::new()),
        })
    }

    /// Applies one parsed message (an object, or an array of objects); returns the errors.
    pub fn apply(&self, msg: &serde_json::Value) -> Vec<ExtractError> {
        match msg {
            serde_json::Value::Array(items) => items.iter().filter_map(|i| self.apply_one(i).err()).collect(),
            v => self.apply_one(v).err().into_iter().collect(),
        }
    }

    fn apply_one(&self, v: &serde_json::Value) -> Result<(), ExtractError> {
        if !v.is_object() {
            return Err(ExtractError::MissingField);
        }
        let mut values = Vec::with_capacity(self.spec.labels.len());
        for l in &self.spec.labels {
            let s = match field(v, l).ok_or(ExtractError::MissingField)? {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => return Err(ExtractError::MissingField),
                other => other.to_string(),
            };
            values.push(s);
        }
        let value = match field(v, &self.spec.value).ok_or(ExtractError::MissingField)? {
            serde_json::Value::Number(n) => n.as_f64().ok_or(ExtractError::NotANumber)?,
            serde_json::Value::String(s) => s.trim().parse().map_err(|_| ExtractError::NotANumber)?,
            serde_json::Value::Bool(b) => f64::from(u8::from(*b)),
            _ => return Err(ExtractError::NotANumber),
        };
        {
            let mut seen = self.seen.locked();
            if !seen.contains(&values) {
                if seen.len() >= self.spec.max_series {
                    return Err(ExtractError::SeriesLimit);
                }
                seen.insert(values.clone());
            }
        }
        let refs: Vec<&str> = values.iter().map(String::as_str).collect();
        self.gauge.with_label_values(&refs).set(value);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_fields_become_gauges() {
        let reg = Registry::new();
        let spec = GaugeSpec {
            name: "inventory".into(),
            labels: vec!["store".into(), "model".into()],
            value: "inventory".into(),
            help: None,
            max_series: 2,
        };
        let x = Extractor::new(&reg, "inv", &spec).unwrap();
        let ok: serde_json::Value = serde_json::json!({"store": "berlin", "model": "x1", "inventory": 10});
        assert!(x.apply(&ok).is_empty());
        let arr = serde_json::json!([
            {"store": "paris", "model": 7, "inventory": "3.5"},
            {"store": "rome", "model": "x1"},
            {"store": "oslo", "model": "x1", "inventory": "many"},
            {"store": "bonn", "model": "x1", "inventory": 1}
        ]);
        assert_eq!(
            x.apply(&arr),
            vec![
                ExtractError::MissingField,
                ExtractError::NotANumber,
                ExtractError::SeriesLimit
            ]
        );
        let text = crate::metrics::render(&reg, &crate::expo::Sources::default());
        assert!(text.contains("inventory{model=\"x1\",store=\"berlin\"} 10"), "{text}");
        assert!(text.contains("inventory{model=\"7\",store=\"paris\"} 3.5"), "{text}");
        assert!(!text.contains("bonn"), "{text}");
        // An update of a known series is not limited.
        assert!(x
            .apply(&serde_json::json!({"store": "berlin", "model": "x1", "inventory": 9}))
            .is_empty());
        assert!(crate::metrics::render(&reg, &crate::expo::Sources::default())
            .contains("inventory{model=\"x1\",store=\"berlin\"} 9"));
    }

    #[test]
    fn nested_fields_by_dotted_path() {
        let reg = Registry::new();
        let spec = GaugeSpec {
            name: "depth".into(),
            labels: vec!["q".into()],
            value: "stats.depth".into(),
            help: Some("queue depth".into()),
            max_series: 10,
        };
        let x = Extractor::new(&reg, "q", &spec).unwrap();
        assert!(x
            .apply(&serde_json::json!({"q": "a", "stats": {"depth": 4}}))
            .is_empty());
        assert!(crate::metrics::render(&reg, &crate::expo::Sources::default()).contains("depth{q=\"a\"} 4"));
    }

    /// The windows' gauges as text: the location and check labels escaped, availability
    /// only once there are runs, firing always.
    #[test]
    fn window_gauges_are_written_per_check() {
        let c: Check =
            serde_yaml_ng::from_str("{name: 'shop \"eu\"', type: http, url: 'http://127.0.0.1:1/'}").unwrap();
        let sources = crate::expo::Sources::default();
        let vantage = crate::checks::vantage::VantageView {
            location: "eu-1".into(),
            ..Default::default()
        };
        let engine = super::super::Engine::new(&Registry::new(), &sources, &[c], &Default::default(), vantage).unwrap();
        let render = || crate::metrics::render(&Registry::new(), &sources);
        let text = render();
        crate::expo::valid(&text);
        let labels = [("location", "eu-1"), ("check", "shop \"eu\"")];
        let v = |text: &str, name: &str, l: &[(&str, &str)]| crate::expo::promtext::value(text, name, l);
        assert_eq!(v(&text, "sensor_check_alert_firing", &labels), Some(0.0), "{text}");
        assert!(!text.contains("sensor_check_availability_ratio{"), "{text}");
        let rt = Arc::clone(&engine.checks[0]);
        for success in [true, false] {
            let r = RunResult {
                check: rt.name().to_string(),
                kind: "http",
                at: crate::checks::now_unix(),
                success,
                error: None,
                phases: Default::default(),
                status: Some(200),
                ws: None,
            };
            engine.record(&rt, r, true);
        }
        let text = render();
        crate::expo::valid(&text);
        let window = |w| [labels[0], labels[1], ("window", w)];
        assert_eq!(
            v(&text, "sensor_check_availability_ratio", &window("10m")),
            Some(0.5),
            "{text}"
        );
        assert_eq!(
            v(&text, "sensor_check_availability_ratio", &window("1h")),
            Some(0.5),
            "{text}"
        );
    }
}
