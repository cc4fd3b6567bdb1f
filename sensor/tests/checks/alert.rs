//! Availability alerts fire and recover on a real daemon, sent to a real webhook.

use super::*;

/// A target that can be taken down and brought back on the same port.
pub(crate) struct Switchable {
    pub(crate) addr: SocketAddr,
    pub(crate) up: Arc<AtomicBool>,
}

pub(crate) fn switchable() -> Switchable {
    let l = rt().block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = l.local_addr().unwrap();
    let up = Arc::new(AtomicBool::new(true));
    let flag = Arc::clone(&up);
    rt().spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            let up = flag.load(Ordering::SeqCst);
            tokio::spawn(async move {
                read_head(&mut s).await;
                let resp: &[u8] = if up {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                } else {
                    b"HTTP/1.1 503 Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\ndown"
                };
                let _ = s.write_all(resp).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Switchable { addr, up }
}

/// A webhook receiver that refuses the first delivery (500) and records the rest.
pub(crate) fn webhook() -> (SocketAddr, Arc<Mutex<Vec<serde_json::Value>>>, Arc<AtomicUsize>) {
    let l = rt().block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = l.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let attempts = Arc::new(AtomicUsize::new(0));
    let (g, a) = (Arc::clone(&got), Arc::clone(&attempts));
    rt().spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            let n = a.fetch_add(1, Ordering::SeqCst);
            let g = Arc::clone(&g);
            tokio::spawn(async move {
                let head = read_head(&mut s).await;
                let (h, rest) = head.split_once("\r\n\r\n").unwrap_or((&head, ""));
                let len: usize = h
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().to_string())
                    })
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mut body = rest.as_bytes().to_vec();
                while body.len() < len {
                    let mut b = [0u8; 4096];
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => body.extend_from_slice(&b[..k]),
                    }
                }
                let resp: &[u8] = if n == 0 {
                    b"HTTP/1.1 500 X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                } else {
                    g.lock().unwrap().push(serde_json::from_slice(&body).unwrap());
                    b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
                };
                let _ = s.write_all(resp).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, got, attempts)
}

#[test]
fn availability_alert_fires_and_recovers_on_a_real_daemon() {
    let target = switchable();
    let (hook, delivered, attempts) = webhook();
    let d = daemon_with(
        "alert.yaml",
        &format!(
            "alerting: {{availability_threshold: 0.8, window: 2s, min_samples: 4, webhook: 'http://{hook}/alerts'}}
checks:
  - {{name: shop, type: http, url: 'http://{}/', interval: 200ms, timeout: 1s}}
",
            target.addr
        ),
    );
    let alerts = |d: &Daemon| -> Vec<serde_json::Value> {
        let (_, body) = d.get("/api/v1/checks");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["alerts"].as_array().cloned().unwrap_or_default()
    };
    let wait_alerts = |d: &Daemon, n: usize, limit: Duration| -> Vec<serde_json::Value> {
        let start = Instant::now();
        loop {
            let a = alerts(d);
            if a.len() >= n || start.elapsed() > limit {
                return a;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // Healthy for a full window: no alert.
    std::thread::sleep(Duration::from_secs(3));
    assert!(alerts(&d).is_empty(), "{:?}", alerts(&d));
    assert_eq!(
        metric(&d.metrics(), "sensor_check_alert_firing", &[("check", "shop")]),
        Some(0.0)
    );

    target.up.store(false, Ordering::SeqCst);
    let down_at = Instant::now();
    let a = wait_alerts(&d, 1, Duration::from_secs(4));
    let took = down_at.elapsed();
    assert_eq!(a.len(), 1, "{a:?}\n{}", d.log());
    assert_eq!(a[0]["state"], "firing");
    let msg = a[0]["message"].as_str().unwrap();
    let avail = a[0]["availability"].as_f64().unwrap();
    assert!(avail <= 0.8, "{msg}");
    assert_eq!(
        msg,
        format!(
            "Website shop is down. availability={avail:.2}, time={}",
            a[0]["time_rfc3339"].as_str().unwrap()
        )
    );
    assert!(
        took <= Duration::from_secs(2) + Duration::from_millis(500),
        "down seen after {took:?}, window is 2s"
    );
    assert_eq!(
        metric(&d.metrics(), "sensor_check_alert_firing", &[("check", "shop")]),
        Some(1.0)
    );
    assert!(d.log().contains("Website shop is down."), "{}", d.log());
    // Still down for another window: no duplicate.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(alerts(&d).len(), 1);

    target.up.store(true, Ordering::SeqCst);
    let a = wait_alerts(&d, 2, Duration::from_secs(4));
    assert_eq!(a.len(), 2, "{a:?}");
    assert_eq!(a[1]["state"], "resolved");
    assert!(
        a[1]["message"]
            .as_str()
            .unwrap()
            .starts_with("Website shop is up again. availability="),
        "{a:?}"
    );
    assert_eq!(
        metric(&d.metrics(), "sensor_check_alert_firing", &[("check", "shop")]),
        Some(0.0)
    );
    let m = d.metrics();
    assert!(
        metric(
            &m,
            "sensor_check_http_responses_total",
            &[("check", "shop"), ("code", "503")]
        )
        .unwrap()
            >= 4.0,
        "{m}"
    );

    // The webhook got both (the first delivery was refused with 500 and retried).
    let start = Instant::now();
    while delivered.lock().unwrap().len() < 2 && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let got = delivered.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0]["message"], a[0]["message"]);
    assert_eq!(got[1]["state"], "resolved");
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        3,
        "one refused attempt + two deliveries"
    );
    let m = d.metrics();
    assert_eq!(
        metric(&m, "sensor_check_alert_notifications_total", &[("result", "sent")]),
        Some(2.0)
    );
    assert_eq!(
        metric(&m, "sensor_check_alert_notifications_total", &[("result", "failed")]),
        Some(0.0)
    );
    assert_eq!(d.stop().code(), Some(0));
}
