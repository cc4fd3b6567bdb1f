//! The daemon's HTTP surface: `/metrics`, `/healthz`, `/readyz`, `/api/v1/*`.

use std::sync::{Arc, RwLock};

use axum::{
    extract::{Query, State},
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Json, Router,
};
use prometheus::Registry;
use serde::Deserialize;

use crate::{events::EventHub, probe::ProbeReport};

#[derive(Clone)]
pub struct AppState {
    pub registry: Registry,
    pub hub: Arc<EventHub>,
    pub reports: Arc<RwLock<Vec<ProbeReport>>>,
    /// Ready once probes are attached, and while every reader runs.
    pub health: Arc<crate::health::Health>,
    /// The synthetic checks, when any are configured.
    pub checks: Option<Arc<crate::checks::Engine>>,
}

/// The routes; with users in the web config every route asks for basic auth (as
/// exporter-toolkit does: probes then need an Authorization header too).
pub fn router(state: AppState, web: Option<Arc<crate::webconfig::Web>>) -> Router {
    let r = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/events", get(events))
        .route("/api/v1/probes", get(probes))
        .route("/api/v1/checks", get(checks))
        .with_state(state);
    match web {
        Some(w) if w.wants_auth() => r.layer(axum::middleware::from_fn_with_state(w, crate::webconfig::require_auth)),
        _ => r,
    }
}

async fn metrics(State(s): State<AppState>) -> axum::response::Response {
    // Gathering reads kernel maps; keep it off the async workers.
    match tokio::task::spawn_blocking(move || crate::metrics::render(&s.registry)).await {
        Ok(body) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            body,
        )
            .into_response(),
        // A collector panicked: say so instead of answering 200 with an empty page.
        Err(e) => {
            tracing::error!(error = %e, "gathering metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("gathering metrics failed: {e}\n"),
            )
                .into_response()
        }
    }
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let reports = s.reports.read().map(|r| r.clone()).unwrap_or_default();
    let (ready, down) = s.health.status();
    let body = serde_json::json!({ "ready": ready, "down": down, "probes": reports });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

#[derive(Deserialize)]
struct Since {
    #[serde(default)]
    since: u64,
}

async fn events(State(s): State<AppState>, Query(q): Query<Since>) -> impl IntoResponse {
    Json(s.hub.since(q.since))
}

async fn probes(State(s): State<AppState>) -> impl IntoResponse {
    Json(s.reports.read().map(|r| r.clone()).unwrap_or_default())
}

/// Check state, windows and alert history; an empty list when no checks are configured.
async fn checks(State(s): State<AppState>) -> impl IntoResponse {
    match &s.checks {
        Some(e) => Json(serde_json::to_value(e.report()).unwrap_or_default()),
        None => Json(serde_json::json!({ "checks": [], "alerts": [] })),
    }
}

/// Every `reason` of `sensor_http_rejected_total`, all exported from the start at 0.
pub const REJECT_REASONS: &[&str] = &[
    "connections",
    "header_timeout",
    "header_size",
    "bad_request",
    "body_size",
    "query_size",
];

/// Counts clients the server turned away, so an operator sees a scan or a slowloris attack
/// instead of only its symptoms.
#[derive(Clone)]
pub struct HttpMetrics {
    rejected: prometheus::IntCounterVec,
}

impl HttpMetrics {
    /// Registers `sensor_http_rejected_total{reason}` in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let rejected = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "sensor_http_rejected_total",
                "Connections or requests the HTTP server refused or closed, by the limit they hit.",
            ),
            &["reason"],
        )?;
        for r in REJECT_REASONS {
            rejected.with_label_values(&[r]);
        }
        registry.register(Box::new(rejected.clone()))?;
        Ok(HttpMetrics { rejected })
    }

    fn reject(&self, reason: &str) {
        self.rejected.with_label_values(&[reason]).inc();
    }
}

/// What the per-request limits need.
#[derive(Clone)]
struct Bounds {
    max_query: usize,
    max_body: usize,
    metrics: HttpMetrics,
}

/// Refuses over-long queries (414) and bodies declared larger than the limit (413) before any
/// handler runs; bodies of unknown length are cut by `DefaultBodyLimit` when read.
async fn bound_request(
    State(b): State<Bounds>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if req.uri().query().map_or(0, str::len) > b.max_query {
        b.metrics.reject("query_size");
        return (StatusCode::URI_TOO_LONG, "query string too long\n").into_response();
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > b.max_body as u64) {
        b.metrics.reject("body_size");
        return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n").into_response();
    }
    next.run(req).await
}

/// The reason a connection that ended with `e` counts as rejected; `None` for ordinary ends
/// (a client that went away, a keep-alive connection left idle after its requests).
fn reject_reason(e: &hyper::Error, served: bool) -> Option<&'static str> {
    if e.is_parse_too_large() {
        Some("header_size")
    } else if e.is_parse() {
        Some("bad_request")
    } else if e.is_timeout() && !served {
        Some("header_timeout")
    } else {
        None
    }
}

/// Serves `app` on `listener` until `stop` turns true: HTTPS with `tls`, else plain HTTP, both
/// within `limits` (connections, header time and size, body and query size). Each connection
/// (and TLS handshake) runs in its own task, so a slow client delays nobody; connections still
/// open at `stop` end with the runtime.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: crate::config::HttpLimits,
    metrics: HttpMetrics,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let bounds = Bounds {
        max_query: limits.max_query_bytes,
        max_body: limits.max_body_bytes,
        metrics: metrics.clone(),
    };
    let app = app
        .layer(axum::extract::DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(bounds, bound_request));
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut h1 = hyper::server::conn::http1::Builder::new();
    h1.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes);
    let handshake_timeout = limits.header_read_timeout;
    loop {
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => return,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            // Over the limit: close at once, so the client learns and the fd comes back.
            metrics.reject("connections");
            drop(tcp);
            continue;
        };
        let (acceptor, app, h1, metrics) = (tls.clone(), app.clone(), h1.clone(), metrics.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let served = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let seen = Arc::clone(&served);
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                seen.store(true, std::sync::atomic::Ordering::Relaxed);
                tower_service::Service::call(&mut app.clone(), req)
            });
            let r = match acceptor {
                Some(acceptor) => match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(t)) => h1.serve_connection(hyper_util::rt::TokioIo::new(t), svc).await,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        metrics.reject("header_timeout");
                        return;
                    }
                },
                None => h1.serve_connection(hyper_util::rt::TokioIo::new(tcp), svc).await,
            };
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                if let Some(reason) = reject_reason(&e, served.load(std::sync::atomic::Ordering::Relaxed)) {
                    metrics.reject(reason);
                }
            }
        });
    }
}

/// Resolves once `stop` is true (the guard `wait_for` returns is not `Send`).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
