//! Synthetic HTTP and websocket checks: the outside view next to the kernel's inside view.
//!
//! Each check runs in its own tokio task (a hanging target only ever delays itself), starts at
//! a per-check offset inside its interval (1,000 checks do not fire at once), and feeds a ring of
//! recent results from which windows, alerts and `/api/v1/checks` are computed.

pub mod alert;
pub mod config;
pub mod conn;
pub mod history;
pub mod http;
pub mod metrics;
pub mod vantage;
pub mod ws;

use std::{
    collections::{BTreeMap, VecDeque},
    hash::{Hash as _, Hasher as _},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use prometheus::Registry;
use serde::Serialize;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use self::{
    alert::{Alert, AlertState, Evaluator},
    config::{Alerting, Check, CheckType, WebsocketMode},
    conn::{Phases, Progress, Target, Tls},
    history::{History, Sample, WindowStats},
    metrics::{CheckMetrics, Extractor, WindowCollector},
    vantage::VantageView,
};

use crate::sync::Lock as _;

pub fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The short and long windows of the dashboard and `sensor_check_availability_ratio`.
pub const SHORT_WINDOW: f64 = 600.0;
pub const LONG_WINDOW: f64 = 3600.0;

/// A check with everything parsed that can be parsed once.
pub struct Prepared {
    pub cfg: Check,
    pub target: Target,
    pub tls: Option<Tls>,
    pub method: ::http::Method,
    pub headers: Vec<(::http::HeaderName, ::http::HeaderValue)>,
    pub body_regex: Option<regex::Regex>,
    pub ws_expect: Option<regex::Regex>,
}

impl Prepared {
    pub fn new(cfg: &Check) -> Result<Prepared, String> {
        let ctx = |e: String| format!("check '{}': {e}", cfg.name);
        let target = Target::parse(&cfg.url).map_err(ctx)?;
        let tls = if target.tls {
            let alpn: &[&[u8]] = &[b"http/1.1"];
            Some(conn::tls_client(&cfg.tls, alpn).map_err(ctx)?)
        } else {
            None
        };
        let method = ::http::Method::from_bytes(cfg.method.as_bytes()).map_err(|e| ctx(e.to_string()))?;
        let mut headers = Vec::new();
        for (k, v) in &cfg.headers {
            let k = ::http::HeaderName::from_bytes(k.as_bytes()).map_err(|e| ctx(e.to_string()))?;
            let v = ::http::HeaderValue::from_str(v).map_err(|e| ctx(e.to_string()))?;
            headers.push((k, v));
        }
        let re = |r: &Option<String>| -> Result<Option<regex::Regex>, String> {
            r.as_deref()
                .map(regex::Regex::new)
                .transpose()
                .map_err(|e| ctx(e.to_string()))
        };
        Ok(Prepared {
            target,
            tls,
            method,
            headers,
            body_regex: re(&cfg.expect.body_regex)?,
            ws_expect: re(&cfg.websocket.expect_regex)?,
            cfg: cfg.clone(),
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WsStats {
    pub connected: bool,
    pub messages: u64,
    pub close_code: Option<u16>,
}

/// One run of one check.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunResult {
    pub check: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Unix seconds at the start of the run.
    pub at: f64,
    pub success: bool,
    pub error: Option<String>,
    pub phases: Phases,
    pub status: Option<u16>,
    pub ws: Option<WsStats>,
}

/// Live state of a stream-mode websocket check.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamState {
    pub connected: bool,
    /// Unix seconds of the last connect or disconnect.
    pub since: f64,
    pub connects: u64,
    pub messages: u64,
    /// Why the last connection ended or the last attempt failed (kept after reconnecting).
    pub last_error: Option<String>,
    /// Close code of the last connection the server closed.
    pub close_code: Option<u16>,
    #[serde(skip)]
    dropped_since_tick: bool,
    #[serde(skip)]
    messages_at_tick: u64,
}

struct State {
    history: History,
    evaluator: Evaluator,
    last: Option<RunResult>,
    stream: StreamState,
}

pub struct CheckRuntime {
    pub prepared: Prepared,
    pub extractors: Vec<Extractor>,
    state: Mutex<State>,
}

pub struct WindowSnapshot {
    pub short: WindowStats,
    pub long: WindowStats,
    pub alert: WindowStats,
    pub alert_firing: bool,
}

impl CheckRuntime {
    pub fn name(&self) -> &str {
        &self.prepared.cfg.name
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.locked()
    }

    pub fn windows(&self, now: f64) -> WindowSnapshot {
        let s = self.lock();
        WindowSnapshot {
            short: s.history.stats(now, SHORT_WINDOW),
            long: s.history.stats(now, LONG_WINDOW),
            alert: s.history.stats(now, s.evaluator.window),
            alert_firing: s.evaluator.is_down(),
        }
    }

    /// Up (last run; stream: connected now) and alert firing, without computing windows.
    pub fn state(&self) -> (Option<bool>, bool) {
        let s = self.lock();
        let up = if self.is_stream() {
            Some(s.stream.connected)
        } else {
            s.last.as_ref().map(|l| l.success)
        };
        (up, s.evaluator.is_down())
    }

    /// The runs of the last `window` seconds, oldest first (for the web view's charts).
    pub fn points(&self, now: f64, window: f64) -> Vec<Sample> {
        self.lock().history.in_window(now, window).copied().collect()
    }

    fn is_stream(&self) -> bool {
        self.prepared.cfg.kind == CheckType::Websocket && self.prepared.cfg.ws_mode() == WebsocketMode::Stream
    }
}

/// What `/api/v1/checks` serves and `sensor top` shows.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ChecksReport {
    pub generated_at: f64,
    /// Where this sensor probes from and what it leaves to others (absent from older sensors).
    #[serde(default)]
    pub vantage: VantageView,
    pub alerting: AlertingView,
    pub checks: Vec<CheckView>,
    /// Oldest first, bounded by `alerting.history`.
    pub alerts: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct AlertingView {
    pub availability_threshold: f64,
    pub window_seconds: f64,
    pub min_samples: usize,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct CheckView {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub url: String,
    pub interval_seconds: f64,
    pub up: Option<bool>,
    pub alert_firing: bool,
    pub last: Option<serde_json::Value>,
    /// "10m", "1h" and "alert" (the alerting window).
    pub windows: BTreeMap<String, serde_json::Value>,
    pub stream: Option<serde_json::Value>,
}

pub struct Engine {
    pub metrics: CheckMetrics,
    pub checks: Vec<Arc<CheckRuntime>>,
    alerting: Alerting,
    vantage: VantageView,
    alerts: Mutex<VecDeque<Alert>>,
    webhook: Option<mpsc::Sender<Alert>>,
    /// Where alerts are also published as `check_alert` events (and so journaled).
    events: std::sync::OnceLock<Arc<crate::events::EventHub>>,
}

/// The phases of one run as the web view stacks them (see [`Sample::split`]).
fn split(p: &Phases) -> history::PhaseSplit {
    let f = |v: Option<f64>| v.unwrap_or(0.0) as f32;
    [
        f(p.dns),
        f(p.connect),
        f(p.tls),
        f(p.ttfb.or(p.handshake)),
        f(p.transfer.or(p.first_message)),
    ]
}

/// A stable offset in `[0, interval)` per check name, so restarts keep the spread.
fn jitter(name: &str, interval: Duration) -> Duration {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    let frac = (h.finish() % 10_000) as f64 / 10_000.0;
    interval.mul_f64(frac)
}

impl Engine {
    /// Prepares every check and registers its metrics (labelled with the vantage point's
    /// location when it has one); errors name the check.
    pub fn new(
        registry: &Registry,
        checks: &[Check],
        alerting: &Alerting,
        vantage: VantageView,
    ) -> anyhow::Result<Arc<Engine>> {
        let metrics = CheckMetrics::new(registry, checks, &vantage.location)?;
        let keep = LONG_WINDOW.max(alerting.window.as_secs_f64());
        let mut runtimes = Vec::with_capacity(checks.len());
        for c in checks {
            let prepared = Prepared::new(c).map_err(anyhow::Error::msg)?;
            let extractors = c
                .gauges
                .iter()
                .map(|g| Extractor::new(registry, &c.name, g))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!("check '{}': gauges: {e}", c.name))?;
            let cap = ((keep / c.interval.as_secs_f64().max(0.001)) as usize * 2 + 16).min(100_000);
            runtimes.push(Arc::new(CheckRuntime {
                prepared,
                extractors,
                state: Mutex::new(State {
                    history: History::new(keep, cap),
                    evaluator: Evaluator::new(
                        alerting.availability_threshold,
                        alerting.window.as_secs_f64(),
                        alerting.min_samples,
                    ),
                    last: None,
                    stream: StreamState::default(),
                }),
            }));
        }
        registry.register(Box::new(WindowCollector::new(runtimes.clone(), &vantage.location)?))?;
        let (webhook, rx) = match &alerting.webhook {
            Some(_) => {
                let (tx, rx) = mpsc::channel(1024);
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let engine = Arc::new(Engine {
            metrics,
            checks: runtimes,
            alerting: alerting.clone(),
            vantage,
            alerts: Mutex::new(VecDeque::new()),
            webhook,
            events: std::sync::OnceLock::new(),
        });
        if let (Some(rx), Some(url)) = (rx, alerting.webhook.clone()) {
            tokio::spawn(webhook_sender(Arc::clone(&engine), url, rx));
        }
        Ok(engine)
    }

    pub fn extract_error(&self, check: &str, reason: &str) {
        self.metrics.extract_errors.with_label_values(&[check, reason]).inc();
    }

    /// Files one run: metrics, history, alert evaluation.
    pub fn record(&self, rt: &CheckRuntime, r: RunResult, timed: bool) {
        if timed {
            self.metrics.record(&r);
        } else {
            self.metrics.record_untimed(&r);
        }
        let alert = {
            let mut s = rt.lock();
            s.history.push(Sample {
                at: r.at,
                success: r.success,
                total: r.phases.total,
                ttfb: r.phases.ttfb.or(r.phases.handshake),
                code: r.status,
                split: split(&r.phases),
            });
            s.last = Some(r);
            let State { history, evaluator, .. } = &mut *s;
            evaluator.evaluate(rt.name(), history, now_unix())
        };
        if let Some(a) = alert {
            self.raise(a);
        }
    }

    /// Publishes every alert and recovery from now on as a `check_alert` event on `hub`.
    pub fn publish_alerts_to(&self, hub: Arc<crate::events::EventHub>) {
        if self.events.set(hub).is_err() {
            tracing::warn!("check alerts already go to an event hub");
        }
    }

    fn raise(&self, a: Alert) {
        if let Some(hub) = self.events.get() {
            hub.publish_as("check_alert", &a);
        }
        match a.state {
            AlertState::Firing => tracing::warn!(check = %a.check, availability = a.availability, "{}", a.message),
            AlertState::Resolved => tracing::info!(check = %a.check, availability = a.availability, "{}", a.message),
        }
        {
            let mut q = self.alerts.locked();
            if q.len() >= self.alerting.history.max(1) {
                q.pop_front();
            }
            q.push_back(a.clone());
        }
        if let Some(tx) = &self.webhook {
            if tx.try_send(a).is_err() {
                self.metrics.notifications.with_label_values(&["failed"]).inc();
            }
        }
    }

    pub fn stream_up(&self, rt: &CheckRuntime, phases: Phases) {
        {
            let mut s = rt.lock();
            s.stream.connected = true;
            s.stream.since = now_unix();
            s.stream.connects += 1;
        }
        self.metrics.set_up(rt.name(), "websocket", true);
        self.observe_connect(rt, phases);
    }

    pub fn stream_down(&self, rt: &CheckRuntime, error: String, close_code: Option<u16>, phases: Phases) {
        let was_connected = {
            let mut s = rt.lock();
            let was = s.stream.connected;
            s.stream.connected = false;
            s.stream.dropped_since_tick |= was;
            s.stream.since = now_unix();
            s.stream.last_error = Some(error.clone());
            s.stream.close_code = close_code;
            was
        };
        self.metrics.set_up(rt.name(), "websocket", false);
        if phases.total > 0.0 {
            self.observe_connect(rt, phases);
        }
        if was_connected {
            tracing::warn!(check = rt.name(), %error, "websocket stream disconnected");
        } else {
            tracing::debug!(check = rt.name(), %error, "websocket connect failed");
        }
    }

    fn observe_connect(&self, rt: &CheckRuntime, phases: Phases) {
        self.metrics.observe_phases(rt.name(), "websocket", &phases);
    }

    pub fn stream_first_message(&self, rt: &CheckRuntime, secs: f64) {
        self.metrics
            .observe_phase(rt.name(), "websocket", "first_message", secs);
    }

    pub fn stream_message(&self, rt: &CheckRuntime) {
        rt.lock().stream.messages += 1;
    }

    /// The per-interval result of a stream check: up iff connected now and not dropped since
    /// the previous tick.
    fn stream_tick(&self, rt: &CheckRuntime) {
        let r = {
            let mut s = rt.lock();
            let st = &mut s.stream;
            let success = st.connected && !st.dropped_since_tick;
            let messages = st.messages - st.messages_at_tick;
            st.messages_at_tick = st.messages;
            st.dropped_since_tick = false;
            RunResult {
                check: rt.name().to_string(),
                kind: "websocket",
                at: now_unix(),
                success,
                error: if success {
                    None
                } else {
                    Some(st.last_error.clone().unwrap_or_else(|| "not connected".into()))
                },
                phases: Phases::default(),
                status: None,
                ws: Some(WsStats {
                    connected: st.connected,
                    messages,
                    close_code: st.close_code,
                }),
            }
        };
        self.record(rt, r, false);
    }

    /// Starts every check's task; they end when `stop` turns true.
    pub fn spawn(self: &Arc<Self>, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        for rt in &self.checks {
            let interval = rt.prepared.cfg.interval;
            let first = tokio::time::Instant::now() + jitter(rt.name(), interval);
            if rt.is_stream() {
                tasks.push(tokio::spawn(ws::stream(Arc::clone(self), Arc::clone(rt), stop.clone())));
            }
            let (engine, rt, mut stop) = (Arc::clone(self), Arc::clone(rt), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(first, interval);
                // A run longer than the interval delays the next one rather than bursting.
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.changed() => return,
                    }
                    if rt.is_stream() {
                        engine.stream_tick(&rt);
                        continue;
                    }
                    let r = tokio::select! {
                        r = run_once(&engine, &rt) => r,
                        _ = stop.changed() => return,
                    };
                    if !r.success {
                        tracing::debug!(check = rt.name(), error = ?r.error, "check failed");
                    }
                    engine.record(&rt, r, true);
                }
            }));
        }
        tasks
    }

    pub fn report(&self) -> ChecksReport {
        self.report_of(self.checks.iter(), now_unix())
    }

    /// [`Engine::report`] for some of the checks (a page of the web view).
    pub fn report_of<'a>(&self, runtimes: impl Iterator<Item = &'a Arc<CheckRuntime>>, now: f64) -> ChecksReport {
        let checks = runtimes
            .map(|rt| {
                let w = rt.windows(now);
                let s = rt.lock();
                let mut windows = BTreeMap::new();
                windows.insert("10m".to_string(), to_json(&w.short));
                windows.insert("1h".to_string(), to_json(&w.long));
                windows.insert("alert".to_string(), to_json(&w.alert));
                let up = if rt.is_stream() {
                    Some(s.stream.connected)
                } else {
                    s.last.as_ref().map(|l| l.success)
                };
                CheckView {
                    name: rt.name().to_string(),
                    kind: rt.prepared.cfg.kind.label().to_string(),
                    url: rt.prepared.cfg.url.clone(),
                    interval_seconds: rt.prepared.cfg.interval.as_secs_f64(),
                    up,
                    alert_firing: w.alert_firing,
                    last: s.last.as_ref().map(to_json),
                    windows,
                    stream: rt.is_stream().then(|| to_json(&s.stream)),
                }
            })
            .collect();
        let alerts = self.alerts.locked().iter().map(to_json).collect();
        ChecksReport {
            generated_at: now,
            vantage: self.vantage.clone(),
            alerting: AlertingView {
                availability_threshold: self.alerting.availability_threshold,
                window_seconds: self.alerting.window.as_secs_f64(),
                min_samples: self.alerting.min_samples,
            },
            checks,
            alerts,
        }
    }
}

/// JSON of a value that always serializes (plain data): `null` rather than a panic otherwise.
fn to_json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// One run of a check (HTTP request or websocket probe; a stream check waits for its first
/// message), bounded by its timeout.
pub async fn run_once(engine: &Engine, rt: &CheckRuntime) -> RunResult {
    match rt.prepared.cfg.kind {
        CheckType::Http => run_http(&rt.prepared).await,
        CheckType::Websocket => ws::probe(engine, rt, rt.is_stream()).await,
    }
}

async fn run_http(p: &Prepared) -> RunResult {
    let at = now_unix();
    let start = Instant::now();
    let mut progress = Progress::default();
    let req = http::Request {
        target: &p.target,
        tls: p.tls.as_ref(),
        method: &p.method,
        headers: &p.headers,
        body: p.cfg.body.clone().map(Bytes::from),
        keep_body: if p.body_regex.is_some() { http::MAX_KEPT_BODY } else { 0 },
    };
    let outcome = tokio::time::timeout(p.cfg.timeout, http::request(req, &mut progress)).await;
    progress.phases.total = start.elapsed().as_secs_f64();
    let (status, error) = match outcome {
        Err(_) => (None, Some(progress.timeout_error(p.cfg.timeout))),
        Ok(Err(e)) => (None, Some(e.to_string())),
        Ok(Ok(resp)) => {
            let want = &p.cfg.expect.status;
            let status_ok = if want.is_empty() {
                (200..400).contains(&resp.status)
            } else {
                want.contains(&resp.status)
            };
            let error = if !status_ok {
                Some(if want.is_empty() {
                    format!("status {} is not 2xx or 3xx", resp.status)
                } else {
                    format!("status {} is not one of {want:?}", resp.status)
                })
            } else if let Some(re) = &p.body_regex {
                let body = String::from_utf8_lossy(&resp.body);
                (!re.is_match(&body)).then(|| format!("body does not match /{}/", re.as_str()))
            } else {
                None
            };
            (Some(resp.status), error)
        }
    };
    RunResult {
        check: p.cfg.name.clone(),
        kind: "http",
        at,
        success: error.is_none(),
        error,
        phases: progress.phases,
        status,
        ws: None,
    }
}

/// Delivers alerts as JSON POSTs, retrying with doubling backoff; counts the outcome.
async fn webhook_sender(engine: Arc<Engine>, url: String, mut rx: mpsc::Receiver<Alert>) {
    let target = match Target::parse(&url) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "alerting.webhook unusable");
            return;
        }
    };
    let tls = if target.tls {
        match conn::tls_client(&Default::default(), &[b"http/1.1"]) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(error = %e, "alerting.webhook: TLS setup failed");
                return;
            }
        }
    } else {
        None
    };
    let headers = [(
        ::http::header::CONTENT_TYPE,
        ::http::HeaderValue::from_static("application/json"),
    )];
    while let Some(alert) = rx.recv().await {
        let body = Bytes::from(serde_json::to_vec(&alert).unwrap_or_default());
        let mut delay = Duration::from_millis(500);
        let mut sent = false;
        for attempt in 0..=engine.alerting.webhook_retries {
            let mut p = Progress::default();
            let req = http::Request {
                target: &target,
                tls: tls.as_ref(),
                method: &::http::Method::POST,
                headers: &headers,
                body: Some(body.clone()),
                keep_body: 0,
            };
            match tokio::time::timeout(Duration::from_secs(10), http::request(req, &mut p)).await {
                Ok(Ok(r)) if (200..300).contains(&r.status) => {
                    sent = true;
                    break;
                }
                Ok(Ok(r)) => tracing::warn!(attempt, status = r.status, "alert webhook refused the alert"),
                Ok(Err(e)) => tracing::warn!(attempt, error = %e, "alert webhook failed"),
                Err(_) => tracing::warn!(attempt, "alert webhook timed out"),
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        let result = if sent { "sent" } else { "failed" };
        engine.metrics.notifications.with_label_values(&[result]).inc();
    }
}

/// `sensor check`: every configured check (or the named ones) once, concurrently.
pub async fn run_all_once(checks: &[Check], alerting: &Alerting, names: &[String]) -> anyhow::Result<Vec<RunResult>> {
    for n in names {
        if !checks.iter().any(|c| &c.name == n) {
            anyhow::bail!("no check named '{n}' in the configuration");
        }
    }
    let selected: Vec<Check> = checks
        .iter()
        .filter(|c| names.is_empty() || names.contains(&c.name))
        .cloned()
        .collect();
    if selected.is_empty() {
        anyhow::bail!("no checks configured (add a `checks:` list to the config file)");
    }
    let mut alerting = alerting.clone();
    alerting.webhook = None;
    let engine = Engine::new(&Registry::new(), &selected, &alerting, VantageView::default())?;
    let runs = engine.checks.iter().map(|rt| {
        let engine = Arc::clone(&engine);
        let rt = Arc::clone(rt);
        tokio::spawn(async move { run_once(&engine, &rt).await })
    });
    let mut out = Vec::new();
    for r in runs.collect::<Vec<_>>() {
        out.push(r.await?);
    }
    Ok(out)
}

/// A table of results for people.
pub fn render_results(results: &[RunResult]) -> String {
    let ms = |v: Option<f64>| v.map(|s| format!("{:.1}", s * 1000.0)).unwrap_or_else(|| "-".into());
    let mut rows = vec![[
        "CHECK", "TYPE", "RESULT", "CODE", "DNS", "CONNECT", "TLS", "TTFB", "TRANSFER", "TOTAL ms", "ERROR",
    ]
    .map(String::from)
    .to_vec()];
    for r in results {
        let p = &r.phases;
        let code = match (&r.status, &r.ws) {
            (Some(s), _) => s.to_string(),
            (None, Some(w)) => w.close_code.map(|c| format!("ws {c}")).unwrap_or_else(|| "-".into()),
            _ => "-".into(),
        };
        rows.push(vec![
            r.check.clone(),
            r.kind.to_string(),
            if r.success { "ok" } else { "FAIL" }.to_string(),
            code,
            ms(p.dns),
            ms(p.connect),
            ms(p.tls),
            ms(p.ttfb.or(p.handshake)),
            ms(p.transfer.or(p.first_message)),
            ms(Some(p.total)),
            r.error.clone().unwrap_or_default(),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_offsets_spread_a_thousand_checks_over_the_interval() {
        let interval = Duration::from_secs(10);
        let mut buckets = [0u32; 100]; // 100 ms each
        for i in 0..1000 {
            let j = jitter(&format!("check-{i}"), interval);
            assert!(j < interval);
            buckets[(j.as_millis() / 100) as usize] += 1;
        }
        // Uniform would be 10 per bucket; no 100 ms slot may hold a burst.
        let max = buckets.iter().max().copied().unwrap_or(0);
        let empty = buckets.iter().filter(|b| **b == 0).count();
        assert!(max <= 25, "burst of {max} checks in one 100 ms slot: {buckets:?}");
        assert!(empty <= 2, "{empty} empty slots: {buckets:?}");
        assert_eq!(
            jitter("same", interval),
            jitter("same", interval),
            "stable across restarts"
        );
    }
}
