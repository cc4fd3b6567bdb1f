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
    /// The collectors that write their own text, rendered with the registry.
    pub sources: crate::expo::Sources,
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
    match crate::gate::Gate::new(web, None, None, "sensor") {
        Some(g) => r.layer(axum::middleware::from_fn_with_state(g, crate::gate::require)),
        None => r,
    }
}

/// Whether to answer gzip: the client asks for it and is not on this host. Compressing the
/// 1,000-workload exposition (3.3 MB) at the fastest level costs more CPU than the whole rest of
/// the scrape and saves only a local copy on loopback; across a network it shrinks the answer
/// 38x for the fleet's Prometheus (docs/benchmarks.md, issue 29).
fn wants_gzip(headers: &axum::http::HeaderMap, peer: Option<&Peer>) -> bool {
    let remote = peer.is_some_and(|p| !p.0.ip().is_loopback());
    remote
        && headers
            .get_all(header::ACCEPT_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|e| {
                let mut parts = e.split(';');
                let name = parts.next().unwrap_or("").trim();
                // `gzip;q=0` refuses it.
                let refused =
                    parts.any(|p| p.trim().strip_prefix("q=").and_then(|q| q.parse::<f32>().ok()) == Some(0.0));
                name.eq_ignore_ascii_case("gzip") && !refused
            })
}

/// The exposition gzipped at the fastest level.
fn gzip(text: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write as _;
    let mut e = flate2::write::GzEncoder::new(Vec::with_capacity(text.len() / 16), flate2::Compression::fast());
    e.write_all(text)?;
    e.finish()
}

async fn metrics(
    State(s): State<AppState>,
    peer: Option<axum::Extension<Peer>>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
    let gz = wants_gzip(&headers, peer.as_deref());
    // Gathering reads kernel maps; keep it off the async workers (and the compression too).
    let answer = tokio::task::spawn_blocking(move || {
        let text = crate::metrics::render_pooled(&s.registry, &s.sources);
        if gz {
            match gzip(text.as_ref()) {
                Ok(z) => return (Some(z), text),
                Err(e) => tracing::warn!(error = %e, "gzip failed; answering uncompressed"),
            }
        }
        (None, text)
    })
    .await;
    match answer {
        Ok((Some(z), _)) => ([(header::CONTENT_TYPE, TEXT), (header::CONTENT_ENCODING, "gzip")], z).into_response(),
        Ok((None, text)) => (
            [(header::CONTENT_TYPE, TEXT)],
            axum::body::Body::from(bytes::Bytes::from_owner(text)),
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
    since: Option<u64>,
}

/// Without `since`: the newest `events.history` events. With it: the next page of events
/// after it, oldest first. From memory, or from the journal's files for what memory no longer
/// holds (off the async threads).
async fn events(State(s): State<AppState>, Query(q): Query<Since>) -> axum::response::Response {
    let hub = Arc::clone(&s.hub);
    let read = move || match q.since {
        Some(since) => hub.history(since),
        None => hub.newest(),
    };
    match tokio::task::spawn_blocking(read).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "reading event history failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "reading event history failed\n").into_response()
        }
    }
}

async fn probes(State(s): State<AppState>) -> impl IntoResponse {
    Json(s.reports.read().map(|r| r.clone()).unwrap_or_default())
}

/// Every `reason` of `sensor_http_rejected_total`, all exported from the start at 0.
pub const REJECT_REASONS: &[&str] = &[
    "connections",
    "header_timeout",
    "header_size",
    "bad_request",
    "body_size",
    "query_size",
    "write_timeout",
    "request_timeout",
    "tls_handshake",
];

pub use crate::gate::Peer;

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
    let stalled = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut);
    if stalled {
        Some("write_timeout")
    } else if e.is_parse_too_large() {
        Some("header_size")
    } else if e.is_parse() {
        Some("bad_request")
    } else if e.is_timeout() && !served {
        Some("header_timeout")
    } else {
        None
    }
}

/// Binds the HTTP listener with an accept backlog of `max_connections` (the kernel caps it at
/// `net.core.somaxconn`). The runtime's default backlog is 128 here: a burst of clients beyond it
/// has its handshakes dropped and retried after 1 s, 3 s, 7 s, so a busy server looked slow.
pub fn listen(addr: std::net::SocketAddr, max_connections: usize) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(u32::try_from(max_connections).unwrap_or(u32::MAX))
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
    let write_timeout = limits.write_timeout;
    let request_timeout = limits.request_timeout;
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
        let tcp = WriteDeadline::new(tcp, write_timeout);
        tokio::spawn(async move {
            let _slot = slot;
            let served = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let seen = Arc::clone(&served);
            let m = metrics.clone();
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                seen.store(true, std::sync::atomic::Ordering::Relaxed);
                req.extensions_mut().insert(Peer(peer));
                let answer = tower_service::Service::call(&mut app.clone(), req);
                let m = m.clone();
                async move {
                    match tokio::time::timeout(request_timeout, answer).await {
                        Ok(r) => r,
                        // A body that trickles in (or a handler that hangs) would hold the
                        // connection's slot for ever.
                        Err(_) => {
                            m.reject("request_timeout");
                            let mut r = (StatusCode::REQUEST_TIMEOUT, "request took too long\n").into_response();
                            r.headers_mut()
                                .insert(header::CONNECTION, header::HeaderValue::from_static("close"));
                            Ok(r)
                        }
                    }
                }
            });
            let r = match acceptor {
                Some(acceptor) => match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(t)) => h1.serve_connection(hyper_util::rt::TokioIo::new(t), svc).await,
                    Ok(Err(e)) => {
                        // A plain-HTTP client, a scanner, or one without the client certificate
                        // the config requires; not a TCP probe that closes without a word.
                        if e.kind() != std::io::ErrorKind::UnexpectedEof {
                            metrics.reject("tls_handshake");
                        }
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

/// A socket whose writes fail with `TimedOut` once they made no progress for `limit`: a client
/// that asks and never reads would otherwise hold its connection slot and fd for ever.
struct WriteDeadline<T> {
    inner: T,
    limit: std::time::Duration,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteDeadline<T> {
    fn new(inner: T, limit: std::time::Duration) -> Self {
        WriteDeadline {
            inner,
            limit,
            stalled: None,
        }
    }

    /// Called when a write is pending: starts the clock, or fails once it ran out.
    fn pending<R>(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<R>> {
        let limit = self.limit;
        let sleep = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match std::future::Future::poll(sleep.as_mut(), cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading",
            ))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }

    fn progress<R>(
        &mut self,
        r: std::task::Poll<std::io::Result<R>>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<R>> {
        if r.is_pending() {
            return self.pending(cx);
        }
        self.stalled = None;
        r
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteDeadline<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteDeadline<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        this.progress(r, cx)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.progress(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut this.inner).poll_flush(cx);
        this.progress(r, cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Resolves once `stop` is true (the guard `wait_for` returns is not `Send`).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use axum::http::{HeaderMap, HeaderValue, Request};
    use tower::ServiceExt as _;

    use super::*;

    fn state() -> AppState {
        let registry = Registry::new();
        let c = prometheus::IntCounterVec::new(prometheus::Opts::new("t_total", "h"), &["w"]).unwrap();
        registry.register(Box::new(c.clone())).unwrap();
        for i in 0..500 {
            c.with_label_values(&[&format!("/workload-{i}")]).inc_by(i);
        }
        let errors = prometheus::IntCounterVec::new(prometheus::Opts::new("e_total", "h"), &["task"]).unwrap();
        AppState {
            registry,
            sources: crate::expo::Sources::default(),
            hub: Arc::new(EventHub::new(4)),
            reports: Arc::default(),
            health: Arc::new(crate::health::Health::new(errors)),
            checks: None,
        }
    }

    /// `/metrics` as a client at `peer` asking with `accept` gets it: the Content-Encoding and
    /// the body, decompressed when gzipped.
    async fn scrape(peer: &str, accept: &str) -> (Option<String>, String) {
        let mut req = Request::get("/metrics")
            .header(header::ACCEPT_ENCODING, accept)
            .body(axum::body::Body::empty())
            .unwrap();
        req.extensions_mut().insert(Peer(peer.parse().unwrap()));
        let r = router(state(), Router::new(), None).oneshot(req).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let enc = r
            .headers()
            .get(header::CONTENT_ENCODING)
            .map(|v| v.to_str().unwrap().to_string());
        let body = axum::body::to_bytes(r.into_body(), usize::MAX).await.unwrap();
        let text = if enc.as_deref() == Some("gzip") {
            let mut s = String::new();
            flate2::read::GzDecoder::new(&body[..]).read_to_string(&mut s).unwrap();
            s
        } else {
            String::from_utf8(body.to_vec()).unwrap()
        };
        (enc, text)
    }

    /// A remote Prometheus asking for gzip gets the same exposition gzipped; a local client
    /// (loopback, where compressing costs more than it saves) or one that does not ask gets it
    /// as text.
    #[tokio::test]
    async fn gzip_only_for_remote_clients_that_ask() {
        let accept = "gzip, deflate;q=0.5, *;q=0.1";
        let (enc, remote) = scrape("192.0.2.7:40000", accept).await;
        assert_eq!(enc.as_deref(), Some("gzip"));
        let (enc, local) = scrape("127.0.0.1:40000", accept).await;
        assert_eq!(enc, None);
        let (enc, plain) = scrape("192.0.2.7:40000", "identity").await;
        assert_eq!(enc, None);
        let strip = |t: &str| {
            t.lines()
                .filter(|l| l.starts_with("t_total{"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(&remote).len(), 500);
        assert_eq!(strip(&remote), strip(&local));
        assert_eq!(strip(&remote), strip(&plain));
    }

    #[test]
    fn gzip_refused_with_q_zero_and_matched_case_insensitively() {
        let peer = Peer("[2001:db8::1]:1".parse().unwrap());
        let h = |v: &'static str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT_ENCODING, HeaderValue::from_static(v));
            m
        };
        assert!(wants_gzip(&h("GZIP"), Some(&peer)));
        assert!(wants_gzip(&h("br, gzip;q=0.8"), Some(&peer)));
        assert!(!wants_gzip(&h("gzip;q=0"), Some(&peer)));
        assert!(!wants_gzip(&h("br"), Some(&peer)));
        assert!(!wants_gzip(&HeaderMap::new(), Some(&peer)));
        assert!(!wants_gzip(&h("gzip"), None));
        assert!(!wants_gzip(&h("gzip"), Some(&Peer("[::1]:1".parse().unwrap()))));
    }
}
