//! The engine: runs every check on its interval, keeps its history, evaluates alerts and
//! delivers them (events, webhook).

use std::{
    collections::{BTreeMap, VecDeque},
    hash::{Hash as _, Hasher as _},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use prometheus::Registry;
use serde::Serialize;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use super::{
    alert::{Alert, AlertState, Evaluator},
    config::{Alerting, Check},
    conn,
    conn::{Phases, Progress, Target},
    history,
    history::{History, Sample},
    http,
    metrics::{CheckMetrics, Extractor, WindowCollector},
    now_unix,
    once::run_once,
    report::{AlertingView, CheckView, ChecksReport},
    runtime::{CheckRuntime, Prepared, RunResult, State, StreamState, WsStats},
    vantage::VantageView,
    ws, LONG_WINDOW,
};
use crate::sync::Lock as _;

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
pub(super) fn split(p: &Phases) -> history::PhaseSplit {
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
pub(super) fn jitter(name: &str, interval: Duration) -> Duration {
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
        sources: &crate::expo::Sources,
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
        sources.add(Arc::new(WindowCollector::new(runtimes.clone(), &vantage.location)));
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
pub(super) fn to_json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// Delivers alerts as JSON POSTs, retrying with doubling backoff; counts the outcome.
pub(super) async fn webhook_sender(engine: Arc<Engine>, url: String, mut rx: mpsc::Receiver<Alert>) {
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
