//! The daemon's HTTP surface: `/metrics`, `/healthz`, `/readyz`, `/api/v1/*`, and the web view
//! (`/`, `/api/v1/checks`, `/api/v1/summary`, added by `run` from the `web` module).

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
/// `extra`: routes of other parts (the web view), with their own state, behind the same auth.
pub fn router(state: AppState, extra: Router, web: Option<Arc<crate::webconfig::Web>>) -> Router {
    let r = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/events", get(events))
        .route("/api/v1/probes", get(probes))
        .with_state(state)
        .merge(extra);
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

/// Serves `app` on `listener` until `stop` turns true: HTTPS with `tls`, else plain HTTP.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    match tls {
        Some(acceptor) => serve_tls(listener, acceptor, app, stop).await,
        None => {
            let mut stop = stop;
            let r = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "HTTP server failed");
            }
        }
    }
}

/// HTTPS: each connection's handshake runs in its own task (a slow client delays nobody), then
/// HTTP/1.1 on the TLS stream; returns when `stop` turns true.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => return,
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let svc = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
        });
    }
}

/// Resolves once `stop` is true (the guard `wait_for` returns is not `Send`).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
