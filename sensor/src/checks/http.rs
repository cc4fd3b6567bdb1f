//! One HTTP request with every phase timed: what an HTTP check runs, and the client the
//! webhook sender and `sensor top` reuse.

use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;

use super::conn::{self, CheckError, Progress, Target, Tls};

/// Bytes of the body an HTTP check keeps for its regex.
pub const MAX_KEPT_BODY: usize = 1 << 20;

pub struct Request<'a> {
    pub target: &'a Target,
    pub tls: Option<&'a Tls>,
    pub method: &'a http::Method,
    pub headers: &'a [(http::HeaderName, http::HeaderValue)],
    pub body: Option<Bytes>,
    /// Bytes of the response body to keep (the rest is read and counted).
    pub keep_body: usize,
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// The first `keep_body` bytes.
    pub body: Bytes,
    pub body_len: u64,
}

/// Sends one request on a fresh connection (what a prober measures: no pooling).
pub async fn request(req: Request<'_>, progress: &mut Progress) -> Result<Response, CheckError> {
    let keep = req.keep_body;
    let stream = conn::connect(req.target, req.tls, progress).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| CheckError::new("ttfb", e))?;
    // The connection task ends when the exchange does; aborting it on every exit path keeps a
    // timed-out run from leaving a socket behind.
    let conn_task = AbortOnDrop(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let mut builder = http::Request::builder()
        .method(req.method.clone())
        .uri(req.target.path_and_query.as_str())
        .header(http::header::HOST, req.target.authority.as_str())
        .header(http::header::USER_AGENT, concat!("sensor/", env!("CARGO_PKG_VERSION")));
    for (k, v) in req.headers {
        builder = builder.header(k, v);
    }
    let request = builder
        .body(Full::new(req.body.unwrap_or_default()))
        .map_err(|e| CheckError::new("ttfb", e))?;
    let response = progress.phase("ttfb", sender.send_request(request)).await?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut kept = Vec::new();
    let mut len = 0u64;
    progress.current = "transfer";
    let t = Instant::now();
    let r: Result<(), hyper::Error> = async {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                len += data.len() as u64;
                let room = keep.saturating_sub(kept.len());
                kept.extend_from_slice(&data[..room.min(data.len())]);
            }
        }
        Ok(())
    }
    .await;
    progress.phases.transfer = Some(t.elapsed().as_secs_f64());
    r.map_err(|e| CheckError::new("transfer", e))?;
    drop(conn_task);
    Ok(Response {
        status,
        body: Bytes::from(kept),
        body_len: len,
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The client of local tools (`sensor top`): TLS when the URL says https (with the tool's CA or
/// skip-verify), plus fixed headers such as basic auth.
#[derive(Clone, Default)]
pub struct ToolClient {
    pub tls: Option<conn::Tls>,
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl ToolClient {
    /// GET with the whole body, bounded by `timeout`.
    pub async fn get(&self, url: &str, timeout: std::time::Duration) -> Result<(u16, Bytes), String> {
        let target = Target::parse(url)?;
        if target.tls && self.tls.is_none() {
            return Err(format!("{url}: https needs TLS settings"));
        }
        let mut p = Progress::default();
        let req = Request {
            target: &target,
            tls: self.tls.as_ref(),
            method: &http::Method::GET,
            headers: &self.headers,
            body: None,
            keep_body: 64 << 20,
        };
        match tokio::time::timeout(timeout, request(req, &mut p)).await {
            Ok(Ok(r)) => Ok((r.status, r.body)),
            Ok(Err(e)) => Err(format!("{url}: {e}")),
            Err(_) => Err(format!("{url}: no answer within {timeout:?}")),
        }
    }
}
