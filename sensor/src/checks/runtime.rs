//! A check as it runs: parsed once (`Prepared`), its state and window statistics.

use std::sync::Mutex;

use serde::Serialize;

use super::{
    alert::Evaluator,
    config::{Check, CheckType, WebsocketMode},
    conn,
    conn::{Phases, Target, Tls},
    history::{History, Sample, WindowStats},
    metrics::Extractor,
    LONG_WINDOW, SHORT_WINDOW,
};

use crate::sync::Lock as _;

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
    pub(super) dropped_since_tick: bool,
    #[serde(skip)]
    pub(super) messages_at_tick: u64,
}

pub(super) struct State {
    pub(super) history: History,
    pub(super) evaluator: Evaluator,
    pub(super) last: Option<RunResult>,
    pub(super) stream: StreamState,
}

pub struct CheckRuntime {
    pub prepared: Prepared,
    pub extractors: Vec<Extractor>,
    pub(super) state: Mutex<State>,
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

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
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

    pub(super) fn is_stream(&self) -> bool {
        self.prepared.cfg.kind == CheckType::Websocket && self.prepared.cfg.ws_mode() == WebsocketMode::Stream
    }
}
