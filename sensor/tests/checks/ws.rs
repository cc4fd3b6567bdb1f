//! Websocket checks: stream gauges and error closes.

use super::*;

/// A websocket server: each connection gets `messages`, then either stays open (`close`
/// None) or closes with the given code.
pub(crate) fn ws_server(
    messages: Vec<String>,
    close: Option<(u16, &'static str)>,
    pause: Duration,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = rt().block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = l.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&connections);
    rt().spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            count.fetch_add(1, Ordering::SeqCst);
            let messages = messages.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                for m in messages {
                    if ws.send(Message::text(m)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(pause).await;
                }
                match close {
                    Some((code, reason)) => {
                        let _ = ws
                            .send(Message::Close(Some(CloseFrame {
                                code: CloseCode::from(code),
                                reason: reason.into(),
                            })))
                            .await;
                        while let Some(Ok(_)) = ws.next().await {}
                    }
                    None => {
                        // Answer probes (echo) and keep the stream open.
                        while let Some(Ok(m)) = ws.next().await {
                            if m.is_text() && ws.send(m).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, connections)
}

#[test]
fn websocket_stream_gauges_and_error_close() {
    let inventory = vec![
        r#"{"store": "berlin", "model": "x1", "inventory": 10}"#.to_string(),
        r#"{"store": "paris", "model": "x2", "inventory": 3}"#.to_string(),
        r#"[{"store": "berlin", "model": "x2", "inventory": 7.5}, {"store": "rome", "model": "x1"}]"#.to_string(),
        "not json".to_string(),
        r#"{"store": "berlin", "model": "x1", "inventory": 12}"#.to_string(),
    ];
    let (stream_addr, _) = ws_server(inventory, None, Duration::from_millis(20));
    let (failing, failing_conns) = ws_server(
        vec![r#"{"store": "oslo", "model": "x9", "inventory": 1}"#.into()],
        Some((1011, "internal error")),
        Duration::from_millis(20),
    );
    let (echo, _) = ws_server(vec![], None, Duration::ZERO);
    let d = daemon_with(
        "ws.yaml",
        &format!(
            "checks:
  - name: inventory
    type: websocket
    url: 'ws://{stream_addr}/feed'
    interval: 300ms
    gauges: [{{name: inventory, labels: [store, model], value: inventory}}]
  - name: flaky
    type: websocket
    url: 'ws://{failing}/'
    interval: 300ms
    websocket: {{mode: stream, reconnect_min: 100ms, reconnect_max: 200ms}}
  - name: echo
    type: websocket
    url: 'ws://{echo}/'
    interval: 300ms
    websocket: {{send: ping-42, expect_regex: '^ping-\\d+$'}}
  - name: erroring
    type: websocket
    url: 'ws://{failing}/'
    interval: 300ms
    websocket: {{mode: probe, expect_regex: 'oslo'}}
"
        ),
    );
    let m = d.wait_metric(
        "inventory",
        &[("store", "berlin"), ("model", "x1")],
        12.0,
        Duration::from_secs(10),
    );
    assert_eq!(
        metric(&m, "inventory", &[("store", "paris"), ("model", "x2")]),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "inventory", &[("store", "berlin"), ("model", "x2")]),
        Some(7.5),
        "{m}"
    );
    assert!(metric(&m, "inventory", &[("store", "rome"), ("model", "x1")]).is_none());
    assert_eq!(
        metric(&m, "sensor_check_ws_messages_total", &[("check", "inventory")]),
        Some(5.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "sensor_check_ws_extract_errors_total",
            &[("check", "inventory"), ("reason", "missing_field")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "sensor_check_ws_extract_errors_total",
            &[("check", "inventory"), ("reason", "not_json")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "sensor_check_up", &[("check", "inventory"), ("type", "websocket")]),
        Some(1.0)
    );
    // Stream ticks: up while connected.
    let m = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = d.metrics();
            let ok = |c: &str, r: &str| {
                metric(
                    &m,
                    "sensor_check_runs_total",
                    &[("check", c), ("type", "websocket"), ("result", r)],
                )
                .unwrap_or(0.0)
            };
            if (ok("inventory", "success") >= 3.0
                && ok("flaky", "failure") >= 3.0
                && ok("echo", "success") >= 3.0
                && ok("erroring", "failure") >= 3.0)
                || Instant::now() > deadline
            {
                break m;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let runs = |c: &str, r: &str| {
        metric(
            &m,
            "sensor_check_runs_total",
            &[("check", c), ("type", "websocket"), ("result", r)],
        )
        .unwrap()
    };
    assert_eq!(runs("inventory", "failure"), 0.0, "{m}");
    assert!(runs("inventory", "success") >= 3.0, "{m}");
    assert_eq!(
        runs("flaky", "success"),
        0.0,
        "a stream closed with 1011 is never up at a tick\n{m}"
    );
    assert!(runs("flaky", "failure") >= 3.0, "{m}");
    assert!(
        failing_conns.load(Ordering::SeqCst) >= 3,
        "stream reconnects with backoff"
    );
    assert!(runs("echo", "success") >= 3.0 && runs("echo", "failure") == 0.0, "{m}");
    assert!(
        runs("erroring", "failure") >= 3.0 && runs("erroring", "success") == 0.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "sensor_check_up", &[("check", "erroring"), ("type", "websocket")]),
        Some(0.0)
    );
    assert!(
        metric(
            &m,
            "sensor_check_duration_seconds_count",
            &[("check", "inventory"), ("type", "websocket"), ("phase", "handshake")]
        )
        .unwrap()
            >= 1.0,
        "{m}"
    );
    let (_, body) = d.get("/api/v1/checks");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let check = |n: &str| {
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == n)
            .unwrap()
            .clone()
    };
    let flaky = check("flaky");
    assert_eq!(flaky["stream"]["close_code"], 1011, "{flaky}");
    assert!(
        flaky["stream"]["last_error"]
            .as_str()
            .unwrap()
            .contains("1011 internal error"),
        "{flaky}"
    );
    let erroring = check("erroring");
    assert_eq!(erroring["last"]["ws"]["close_code"], 1011, "{erroring}");
    assert_eq!(
        erroring["last"]["error"], "close: server closed with code 1011 internal error",
        "{erroring}"
    );
    assert_eq!(check("inventory")["stream"]["connected"], true);
    assert_eq!(d.stop().code(), Some(0));
}
