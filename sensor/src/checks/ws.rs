//! Websocket checks: a probe (connect, optionally send and expect, close) or a stream (stay
//! connected, consume messages, reconnect with backoff, up while connected).

use std::{sync::Arc, time::Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::watch;
use tokio_tungstenite::{
    tungstenite::{
        client::IntoClientRequest as _,
        protocol::{frame::coding::CloseCode, CloseFrame},
        Message,
    },
    WebSocketStream,
};

use super::{
    conn::{self, CheckError, Progress, Stream},
    now_unix, CheckRuntime, Engine, Prepared, RunResult, WsStats,
};

/// Close codes that mean "the server ended the session normally".
fn normal_close(code: CloseCode) -> bool {
    matches!(code, CloseCode::Normal | CloseCode::Away)
}

async fn handshake(p: &Prepared, progress: &mut Progress) -> Result<WebSocketStream<Stream>, CheckError> {
    let stream = conn::connect(&p.target, p.tls.as_ref(), progress).await?;
    let mut req = p
        .cfg
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| CheckError::new("handshake", e))?;
    for (k, v) in &p.headers {
        req.headers_mut().insert(k.clone(), v.clone());
    }
    let (ws, _resp) = progress
        .phase("handshake", tokio_tungstenite::client_async(req, stream))
        .await?;
    Ok(ws)
}

/// Counts a message and feeds the check's gauges.
fn on_message(engine: &Engine, rt: &CheckRuntime, msg: &Message) {
    engine.metrics.ws_messages.with_label_values(&[rt.name()]).inc();
    if rt.extractors.is_empty() {
        return;
    }
    let text = match msg {
        Message::Text(t) => t.as_str(),
        Message::Binary(b) => match std::str::from_utf8(b) {
            Ok(t) => t,
            Err(_) => return engine.extract_error(rt.name(), "not_json"),
        },
        _ => return,
    };
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) => {
            for x in &rt.extractors {
                for e in x.apply(&v) {
                    engine.extract_error(rt.name(), e.label());
                }
            }
        }
        Err(_) => engine.extract_error(rt.name(), "not_json"),
    }
}

/// One probe run: handshake, optional send + expected reply, close handshake. With
/// `wait_first` (a stream check run once by `sensor check`) any first message will do.
pub async fn probe(engine: &Engine, rt: &CheckRuntime, wait_first: bool) -> RunResult {
    let p = &rt.prepared;
    let at = now_unix();
    let start = Instant::now();
    let mut progress = Progress::default();
    let mut stats = WsStats::default();
    let outcome = tokio::time::timeout(p.cfg.timeout, async {
        let mut ws = handshake(p, &mut progress).await?;
        stats.connected = true;
        let after_handshake = Instant::now();
        if let Some(m) = &p.cfg.websocket.send {
            ws.send(Message::text(m.clone()))
                .await
                .map_err(|e| CheckError::new("send", e))?;
        }
        progress.current = "first_message";
        let mut matched = p.ws_expect.is_none() && !wait_first;
        if !matched {
            // Read until a text message matches the expectation.
            while let Some(msg) = ws.next().await {
                let msg = msg.map_err(|e| CheckError::new("first_message", e))?;
                if let Message::Close(f) = &msg {
                    return Err(close_error(f.as_ref(), &mut stats));
                }
                if matches!(msg, Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) {
                    continue;
                }
                stats.messages += 1;
                on_message(engine, rt, &msg);
                if stats.messages == 1 {
                    progress.phases.first_message = Some(after_handshake.elapsed().as_secs_f64());
                }
                matched = match (&msg, &p.ws_expect) {
                    (Message::Text(t), Some(re)) => re.is_match(t.as_str()),
                    (_, Some(_)) => false,
                    (_, None) => true,
                };
                if matched {
                    break;
                }
            }
        }
        if !matched {
            return Err(CheckError::new(
                "first_message",
                "connection ended before a matching message",
            ));
        }
        progress.current = "close";
        let _ = ws
            .close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }))
            .await;
        // Drain to the server's close reply: a server that had already closed with an error
        // code is a failure even when the probe got what it expected.
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Close(f) = &msg {
                if let Some(f) = f {
                    stats.close_code = Some(u16::from(f.code));
                    if !normal_close(f.code) {
                        return Err(close_error(Some(f), &mut stats));
                    }
                }
                break;
            }
            if matches!(msg, Message::Text(_) | Message::Binary(_)) {
                stats.messages += 1;
                on_message(engine, rt, &msg);
            }
        }
        Ok(())
    })
    .await;
    let error = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(progress.timeout_error(p.cfg.timeout)),
    };
    progress.phases.total = start.elapsed().as_secs_f64();
    RunResult {
        check: rt.name().to_string(),
        kind: "websocket",
        at,
        success: error.is_none(),
        error,
        phases: progress.phases,
        status: None,
        ws: Some(stats),
    }
}

fn close_error(f: Option<&CloseFrame>, stats: &mut WsStats) -> CheckError {
    match f {
        Some(f) => {
            stats.close_code = Some(u16::from(f.code));
            CheckError::new(
                "close",
                format!("server closed with code {} {}", u16::from(f.code), f.reason.as_str()),
            )
        }
        None => CheckError::new("close", "server closed without a code"),
    }
}

/// Stream mode: keeps one connection; the tick task records a run per interval from the
/// connection state this loop maintains.
pub async fn stream(engine: Arc<Engine>, rt: Arc<CheckRuntime>, mut stop: watch::Receiver<bool>) {
    let p = &rt.prepared;
    let (min, max) = (p.cfg.websocket.reconnect_min, p.cfg.websocket.reconnect_max);
    let mut backoff = min;
    loop {
        let start = Instant::now();
        let mut progress = Progress::default();
        let attempt = tokio::select! {
            r = tokio::time::timeout(p.cfg.timeout, handshake(p, &mut progress)) => r,
            _ = stop.changed() => return,
        };
        progress.phases.total = start.elapsed().as_secs_f64();
        let mut ws = match attempt {
            Ok(Ok(ws)) => ws,
            failed => {
                let e = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => progress.timeout_error(p.cfg.timeout),
                };
                engine.stream_down(&rt, e, None, progress.phases);
                if sleep_or_stop(backoff, &mut stop).await {
                    return;
                }
                backoff = (backoff * 2).min(max);
                continue;
            }
        };
        let connected_at = Instant::now();
        engine.stream_up(&rt, progress.phases);
        let mut first = true;
        let reason: (String, Option<u16>) = loop {
            let msg = tokio::select! {
                m = ws.next() => m,
                _ = stop.changed() => {
                    let _ = ws.close(Some(CloseFrame { code: CloseCode::Away, reason: "sensor stopping".into() })).await;
                    return;
                }
            };
            match msg {
                None => break ("connection ended".into(), None),
                Some(Err(e)) => break (format!("read: {e}"), None),
                Some(Ok(Message::Close(f))) => {
                    let code = f.as_ref().map(|f| u16::from(f.code));
                    let err = match &f {
                        Some(f) if normal_close(f.code) => {
                            format!("server closed the stream (code {})", u16::from(f.code))
                        }
                        Some(f) => format!("server closed with code {} {}", u16::from(f.code), f.reason.as_str()),
                        None => "server closed without a code".into(),
                    };
                    break (err, code);
                }
                Some(Ok(m)) => {
                    if matches!(m, Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) {
                        continue;
                    }
                    if first {
                        first = false;
                        engine.stream_first_message(&rt, connected_at.elapsed().as_secs_f64());
                    }
                    engine.stream_message(&rt);
                    on_message(&engine, &rt, &m);
                }
            }
        };
        engine.stream_down(&rt, reason.0, reason.1, Default::default());
        // A connection that held for a while resets the backoff: the server is flapping, not
        // down.
        if connected_at.elapsed() > max {
            backoff = min;
        }
        if sleep_or_stop(backoff, &mut stop).await {
            return;
        }
        backoff = (backoff * 2).min(max);
    }
}

/// True when asked to stop.
async fn sleep_or_stop(d: std::time::Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}
