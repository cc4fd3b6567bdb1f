//! The daemon's own web view: one page (`/`) per host, drawn in the browser from the same JSON
//! endpoints `sensor top` reads (`/api/v1/summary`, `/api/v1/checks`), so the console and the
//! page never disagree.
//!
//! Everything the page needs is embedded in the binary (`assets/`: HTML, CSS and a small
//! hand-written script that draws its charts as SVG); no request ever leaves the daemon. The
//! module keeps a few bounded rings the metrics registry cannot answer: recent kills and
//! connect failures (newest 100 each), kill times (30 days) for kills per minute / hour / day,
//! host PSI every 5 s for 10 minutes, and TCP connect totals at each summary (for rates).

mod assets;
mod checks;
mod summary;

use std::{
    collections::{BTreeMap, VecDeque},
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
    sync::{Lock as _, ReadWrite as _},
};

pub use summary::Summary;

/// Recent kills and failures kept for the page.
const RECENT: usize = 100;
/// Kill times kept for the per-day chart.
const KILL_DAYS: f64 = 30.0 * 86400.0;
const KILL_TIMES: usize = 100_000;
/// Host PSI sampling.
const PSI_EVERY: Duration = Duration::from_secs(5);
/// Samples kept for the 10-minute charts.
const SAMPLE_WINDOW: f64 = 600.0;
/// A summary is computed at most this often, however many pages and consoles ask.
const SUMMARY_CACHE: Duration = Duration::from_secs(2);

/// One host PSI reading: totals of stalled time (microseconds), as read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PsiSample {
    pub at: f64,
    pub some_us: u64,
    pub full_us: Option<u64>,
}

/// TCP connect totals by result at one summary.
#[derive(Debug, Clone, PartialEq)]
pub struct TcpSample {
    pub at: f64,
    pub totals: BTreeMap<String, f64>,
}

/// What the rings hold; every one is bounded.
#[derive(Default)]
pub struct Rings {
    pub kills: VecDeque<Arc<Sequenced>>,
    pub kill_times: VecDeque<f64>,
    pub tcp_failures: VecDeque<Arc<Sequenced>>,
    pub psi: VecDeque<PsiSample>,
    pub tcp: VecDeque<TcpSample>,
    /// Events the page's subscriber fell behind on and could not recover from the history.
    pub missed: u64,
    last_seq: u64,
}

impl Rings {
    /// Files one event from the hub (once: events at or below the last seen `seq` are skipped).
    pub fn add(&mut self, ev: &Arc<Sequenced>) {
        if ev.seq <= self.last_seq {
            return;
        }
        if self.last_seq != 0 && ev.seq > self.last_seq + 1 {
            self.missed += ev.seq - self.last_seq - 1;
        }
        self.last_seq = ev.seq;
        match ev.event.kind {
            "oom_kill" => {
                let time = ev
                    .event
                    .fields
                    .get("time")
                    .and_then(serde_json::Value::as_f64)
                    .unwrap_or(0.0);
                push_bounded(&mut self.kills, Arc::clone(ev), RECENT);
                push_bounded(&mut self.kill_times, time, KILL_TIMES);
                let oldest = time - KILL_DAYS;
                while self.kill_times.front().is_some_and(|t| *t < oldest) {
                    self.kill_times.pop_front();
                }
            }
            "tcp_connect_failure" => push_bounded(&mut self.tcp_failures, Arc::clone(ev), RECENT),
            _ => {}
        }
    }

    pub fn add_psi(&mut self, s: PsiSample) {
        push_bounded(&mut self.psi, s, 2 + (SAMPLE_WINDOW / PSI_EVERY.as_secs_f64()) as usize);
    }

    /// Keeps TCP totals at most once a second, for 10 minutes.
    pub fn add_tcp(&mut self, s: TcpSample) {
        if self.tcp.back().is_some_and(|b| s.at - b.at < 1.0) {
            return;
        }
        let oldest = s.at - SAMPLE_WINDOW - 10.0;
        while self.tcp.front().is_some_and(|f| f.at < oldest) {
            self.tcp.pop_front();
        }
        push_bounded(&mut self.tcp, s, 1000);
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
    rings: Mutex<Rings>,
    cache: Mutex<Option<(Instant, bytes::Bytes)>>,
}

fn now_unix() -> f64 {
    crate::checks::now_unix()
}

impl Live {
    /// Starts the event subscriber and the PSI sampler; both end when `stop` turns true.
    pub fn start(hub: &Arc<EventHub>, kernel: &str, stop: watch::Receiver<bool>) -> Arc<Live> {
        let live = Arc::new(Live {
            started: Instant::now(),
            started_unix: now_unix(),
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            kernel: kernel.to_string(),
            rings: Mutex::new(Rings::default()),
            cache: Mutex::new(None),
        });
        // Subscribe before reading the history, so nothing falls between the two.
        let rx = hub.subscribe();
        live.catch_up(hub);
        tokio::spawn(subscriber(Arc::clone(&live), Arc::clone(hub), rx, stop.clone()));
        tokio::spawn(psi_sampler(Arc::clone(&live), stop));
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

async fn psi_sampler(live: Arc<Live>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(PSI_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        // A procfs read of a few hundred bytes: no need to leave the async worker.
        if let Some(p) = crate::memcg::psi::read(std::path::Path::new(crate::memcg::HOST_PSI)) {
            live.rings().add_psi(PsiSample {
                at: now_unix(),
                some_us: p.some.total_us,
                full_us: p.full.map(|f| f.total_us),
            });
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
    // Gathering reads kernel maps; keep it off the async workers.
    let built = tokio::task::spawn_blocking(move || {
        let families = s.registry.gather();
        let reports = s.reports.read_locked().clone();
        let (ready, down) = s.health.status();
        let checks = s.checks.as_deref().map(checks::counts).unwrap_or_default();
        let sum = summary::build(&live, &families, &reports, (ready, down), checks, now_unix());
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

    fn failure(seq: u64) -> Arc<Sequenced> {
        Arc::new(Sequenced {
            seq,
            event: crate::events::Event::new(
                "tcp_connect_failure",
                &crate::tcp::TcpFailure {
                    time: seq as f64,
                    result: "refused",
                    errno: 111,
                    address: "127.0.0.1".into(),
                    port: 9,
                    destination: "other".into(),
                    duration_seconds: 0.0,
                    pid: 1,
                    comm: "c".into(),
                    cgroup: None,
                    container_id: None,
                    pod_uid: None,
                    names: Default::default(),
                    count: 1,
                    first_time: seq as f64,
                    interval_seconds: 0.0,
                    overflow: false,
                },
            )
            .expect("a TcpFailure is a JSON object"),
        })
    }

    #[test]
    fn rings_take_each_event_once_and_stay_bounded() {
        let mut r = Rings::default();
        for seq in 1..=150 {
            r.add(&failure(seq));
        }
        // Replayed from the history after a lag: already seen, skipped.
        r.add(&failure(120));
        assert_eq!(r.tcp_failures.len(), RECENT);
        assert_eq!(r.tcp_failures.back().map(|e| e.seq), Some(150));
        assert_eq!(r.missed, 0);
        // A gap the history could not fill is counted.
        r.add(&failure(160));
        assert_eq!(r.missed, 9);
        for i in 0..500 {
            r.add_psi(PsiSample {
                at: f64::from(i) * 5.0,
                some_us: 0,
                full_us: None,
            });
            r.add_tcp(TcpSample {
                at: f64::from(i) * 0.5,
                totals: BTreeMap::new(),
            });
        }
        assert_eq!(r.psi.len(), 122, "10 minutes of 5-second samples");
        assert_eq!(r.tcp.len(), 250, "at most one a second");
        r.add_tcp(TcpSample {
            at: 2000.0,
            totals: BTreeMap::new(),
        });
        assert_eq!(r.tcp.len(), 1, "10 minutes and a little more");
    }
}
