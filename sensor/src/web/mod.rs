//! The daemon's own web view: one page (`/`) per host, drawn in the browser from the same JSON
//! endpoints `sensor top` reads (`/api/v1/summary`, `/api/v1/checks`), so the console and the
//! page never disagree.
//!
//! Everything the page needs is embedded in the binary (`assets/`: HTML, CSS and a small
//! hand-written script that draws its charts as SVG); no request ever leaves the daemon. Each
//! probe gives its own section (`Running::view`, from the state its metrics export) and says
//! in its `ViewSpec` which of its events the section lists; this module keeps those in bounded
//! rings (newest 100 of each kind, and 30 days of times of the kinds counted per minute / hour
//! / day) and never names a probe.

mod assets;
mod checks;
mod summary;

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::{Query, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use tokio::sync::{broadcast::error::RecvError, watch};

use crate::{
    events::{EventHub, Sequenced},
    http::AppState,
    metrics::LostCollector,
    probe::{Running, ViewSpec},
    sync::{Lock as _, ReadWrite as _},
};

pub use summary::Summary;

/// Recent events of each listed kind kept for the page.
const RECENT: usize = 100;
/// Event times kept for the per-day chart.
const TIMELINE_DAYS: f64 = 30.0 * 86400.0;
const TIMELINE_TIMES: usize = 100_000;
/// A summary is computed at most this often, however many pages and consoles ask.
const SUMMARY_CACHE: Duration = Duration::from_secs(2);

/// A probe with a section in the summary, started or not.
#[derive(Clone)]
pub struct Part {
    pub probe: &'static str,
    pub spec: &'static ViewSpec,
    /// `None` when the probe did not start.
    pub running: Option<Arc<dyn Running>>,
}

/// Where the summary's probe sections and lost-event totals come from.
#[derive(Clone, Default)]
pub struct Sources {
    pub parts: Vec<Part>,
    /// The lost-event counters, as exported (none in a checks-only daemon).
    pub lost: Option<Arc<LostCollector>>,
}

/// What the rings hold; every one is bounded.
#[derive(Default)]
pub struct Rings {
    /// The newest events of each kind a section lists, newest last.
    pub recent: HashMap<&'static str, VecDeque<Arc<Sequenced>>>,
    /// The times of each timeline kind's events (30 days at most), oldest first.
    pub times: HashMap<&'static str, VecDeque<f64>>,
    /// Events the page's subscriber fell behind on and could not recover from the history.
    pub missed: u64,
    last_seq: u64,
}

impl Rings {
    /// Rings for the kinds the sections list and count.
    pub fn for_specs<'a>(specs: impl IntoIterator<Item = &'a ViewSpec>) -> Rings {
        let mut r = Rings::default();
        for s in specs {
            let listed = s.recent.iter().map(|(_, k)| *k).chain(s.holding.map(|(_, k)| k));
            for k in listed {
                r.recent.entry(k).or_default();
            }
            if let Some(k) = s.timeline {
                r.times.entry(k).or_default();
            }
        }
        r
    }

    /// Files one event from the hub (once: events at or below the last seen `seq` are skipped).
    pub fn add(&mut self, ev: &Arc<Sequenced>) {
        if ev.seq <= self.last_seq {
            return;
        }
        if self.last_seq != 0 && ev.seq > self.last_seq + 1 {
            self.missed += ev.seq - self.last_seq - 1;
        }
        self.last_seq = ev.seq;
        let kind = ev.event.kind;
        if let Some(q) = self.recent.get_mut(kind) {
            push_bounded(q, Arc::clone(ev), RECENT);
        }
        if let Some(q) = self.times.get_mut(kind) {
            let time = ev
                .event
                .fields
                .get("time")
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(0.0);
            push_bounded(q, time, TIMELINE_TIMES);
            let oldest = time - TIMELINE_DAYS;
            while q.front().is_some_and(|t| *t < oldest) {
                q.pop_front();
            }
        }
    }
}

fn push_bounded<T>(q: &mut VecDeque<T>, v: T, cap: usize) {
    if q.len() >= cap {
        q.pop_front();
    }
    q.push_back(v);
}

/// The web view's live state, shared by its handlers.
pub struct Live {
    pub started: Instant,
    pub started_unix: f64,
    pub hostname: String,
    pub kernel: String,
    sources: Sources,
    rings: Mutex<Rings>,
    cache: Mutex<Option<(Instant, bytes::Bytes)>>,
}

fn now_unix() -> f64 {
    crate::checks::now_unix()
}

impl Live {
    /// Starts the event subscriber; it ends when `stop` turns true.
    pub fn start(hub: &Arc<EventHub>, kernel: &str, sources: Sources, stop: watch::Receiver<bool>) -> Arc<Live> {
        let live = Arc::new(Live {
            started: Instant::now(),
            started_unix: now_unix(),
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            kernel: kernel.to_string(),
            rings: Mutex::new(Rings::for_specs(sources.parts.iter().map(|p| p.spec))),
            sources,
            cache: Mutex::new(None),
        });
        // Subscribe before reading the history, so nothing falls between the two.
        let rx = hub.subscribe();
        live.catch_up(hub);
        tokio::spawn(subscriber(Arc::clone(&live), Arc::clone(hub), rx, stop));
        live
    }

    fn rings(&self) -> std::sync::MutexGuard<'_, Rings> {
        self.rings.locked()
    }

    fn catch_up(&self, hub: &EventHub) {
        let mut r = self.rings();
        let since = r.last_seq;
        for ev in hub.since(since) {
            r.add(&ev);
        }
    }
}

async fn subscriber(
    live: Arc<Live>,
    hub: Arc<EventHub>,
    mut rx: tokio::sync::broadcast::Receiver<Arc<Sequenced>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            _ = stop.changed() => return,
        };
        match ev {
            Ok(ev) => live.rings().add(&ev),
            // Behind: what is still in the hub's history is taken from there.
            Err(RecvError::Lagged(_)) => live.catch_up(&hub),
            Err(RecvError::Closed) => return,
        }
    }
}

/// What the web view's handlers read: the daemon's state and the view's own rings.
#[derive(Clone)]
pub struct WebState {
    pub app: AppState,
    pub live: Arc<Live>,
}

/// The web view's routes, with their state (merged into the daemon's router, behind the same
/// auth).
pub fn routes(app: AppState, live: Arc<Live>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/assets/{name}", get(asset))
        .route("/api/v1/summary", get(summary_handler))
        .route("/api/v1/checks", get(checks_handler))
        .with_state(WebState { app, live })
}

async fn page(headers: HeaderMap) -> Response {
    assets::serve(&headers, assets::PAGE)
}

async fn asset(axum::extract::Path(name): axum::extract::Path<String>, headers: HeaderMap) -> Response {
    match assets::find(&name) {
        Some(a) => assets::serve(&headers, a),
        None => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
}

fn json_response(body: bytes::Bytes) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

fn internal(what: &str, e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "{what} failed");
    (StatusCode::INTERNAL_SERVER_ERROR, format!("{what} failed: {e}\n")).into_response()
}

/// `/api/v1/summary`: host, probes, losses, OOM kills, memory pressure and TCP, in one object.
async fn summary_handler(State(WebState { app: s, live }): State<WebState>) -> Response {
    {
        let c = live.cache.locked();
        if let Some((at, body)) = c.as_ref() {
            if at.elapsed() < SUMMARY_CACHE {
                return json_response(body.clone());
            }
        }
    }
    // The probes' views read kernel maps; keep them off the async workers.
    let built = tokio::task::spawn_blocking(move || {
        let sections = live
            .sources
            .parts
            .iter()
            .map(|p| {
                let view = p.running.as_ref().and_then(|r| r.view());
                (p.probe, p.spec, view.unwrap_or_else(p.spec.idle))
            })
            .collect();
        let lost = live.sources.lost.as_ref().map(|l| l.rows()).unwrap_or_default();
        let reports = s.reports.read_locked().clone();
        let (ready, down) = s.health.status();
        let checks = s.checks.as_deref().map(checks::counts).unwrap_or_default();
        let inputs = summary::Inputs {
            sections,
            lost,
            reports,
            ready: (ready, down),
            checks,
        };
        let sum = summary::build(&live, inputs, now_unix());
        let body = serde_json::to_vec(&sum).map(bytes::Bytes::from);
        if let Ok(b) = &body {
            *live.cache.locked() = Some((Instant::now(), b.clone()));
        }
        body
    })
    .await;
    match built {
        Ok(Ok(body)) => json_response(body),
        Ok(Err(e)) => internal("encoding the summary", e),
        Err(e) => internal("building the summary", e),
    }
}

/// `/api/v1/checks`: every check (as `sensor top` reads it), or with `limit` one page of them,
/// failing first, with each check's recent runs for the charts.
async fn checks_handler(
    State(WebState { app: s, .. }): State<WebState>,
    Query(q): Query<checks::PageQuery>,
) -> Response {
    let Some(engine) = s.checks.clone() else {
        return json_response(bytes::Bytes::from_static(br#"{"checks":[],"alerts":[]}"#));
    };
    let built = tokio::task::spawn_blocking(move || {
        let v = checks::page(&engine, &q, now_unix());
        serde_json::to_vec(&v).map(bytes::Bytes::from)
    })
    .await;
    match built {
        Ok(Ok(body)) => json_response(body),
        Ok(Err(e)) => internal("encoding the checks", e),
        Err(e) => internal("building the checks", e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: ViewSpec = ViewSpec {
        key: "s",
        recent: &[("recent", "failure")],
        timeline: Some("kill"),
        holding: None,
        idle: crate::probe::View::default,
    };

    fn event(seq: u64, kind: &'static str) -> Arc<Sequenced> {
        Arc::new(Sequenced {
            seq,
            event: crate::events::Event::new(kind, &serde_json::json!({"time": seq as f64})).expect("an object"),
        })
    }

    #[test]
    fn rings_take_each_listed_event_once_and_stay_bounded() {
        let mut r = Rings::for_specs([&SPEC]);
        for seq in 1..=150 {
            r.add(&event(seq, "failure"));
        }
        // Replayed from the history after a lag: already seen, skipped.
        r.add(&event(120, "failure"));
        assert_eq!(r.recent["failure"].len(), RECENT);
        assert_eq!(r.recent["failure"].back().map(|e| e.seq), Some(150));
        assert_eq!(r.missed, 0);
        // A gap the history could not fill is counted.
        r.add(&event(160, "other"));
        assert_eq!(r.missed, 9);
        assert!(!r.recent.contains_key("other"), "kinds no section lists are not kept");
        r.add(&event(161, "kill"));
        r.add(&event(161 + 31 * 86400, "kill"));
        assert_eq!(r.times["kill"].len(), 1, "30 days of times");
    }
}
