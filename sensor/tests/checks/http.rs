//! HTTP checks: phases, statuses, refusals, and a hanging target delaying no other check.

use super::*;

#[test]
fn http_phases_status_and_refused() {
    let slow = http_server(200, Duration::from_millis(300), "ok");
    let broken = http_server(500, Duration::ZERO, "boom");
    let closed = free_port();
    let cfg = write_config(
        "http.yaml",
        &format!(
            "checks:
  - {{name: slow, type: http, url: 'http://{slow}/health', timeout: 3s, expect: {{status: [200], body_regex: '^ok$'}}}}
  - {{name: broken, type: http, url: 'http://{broken}/', timeout: 3s}}
  - {{name: refused, type: http, url: 'http://127.0.0.1:{closed}/', timeout: 3s}}
  - {{name: wrongbody, type: http, url: 'http://{slow}/', timeout: 3s, expect: {{body_regex: 'healthy'}}}}
"
        ),
    );
    let results = sensor_check(&cfg);
    assert_eq!(results.len(), 4, "{results:?}");

    let s = by_name(&results, "slow");
    assert_eq!(s["success"], true, "{s}");
    assert_eq!(s["status"], 200);
    let ttfb = s["phases"]["ttfb"].as_f64().unwrap();
    assert!(
        (0.3..0.3 + 0.2).contains(&ttfb),
        "ttfb {ttfb} for a 300 ms header delay"
    );
    assert!(s["phases"]["connect"].as_f64().unwrap() < 0.05, "{s}");
    assert!(
        s["phases"]["dns"].is_null() && s["phases"]["tls"].is_null(),
        "IP literal, plain HTTP: {s}"
    );
    assert!(s["phases"]["total"].as_f64().unwrap() >= ttfb);

    let b = by_name(&results, "broken");
    assert_eq!(
        (b["success"].as_bool(), b["status"].as_u64()),
        (Some(false), Some(500)),
        "{b}"
    );
    assert_eq!(b["error"], "status 500 is not 2xx or 3xx");

    let r = by_name(&results, "refused");
    assert_eq!(r["success"], false);
    assert!(
        r["error"].as_str().unwrap().starts_with("connect: Connection refused"),
        "{r}"
    );
    let p = &r["phases"];
    assert!(p["connect"].is_number(), "{r}");
    for phase in ["dns", "tls", "ttfb", "transfer", "handshake", "first_message"] {
        assert!(p[phase].is_null(), "refused run must have the connect phase only: {r}");
    }

    let w = by_name(&results, "wrongbody");
    assert_eq!(w["error"], "body does not match /healthy/", "{w}");

    // The same checks in the daemon: counters by result and by code.
    let d = daemon_with(
        "http-daemon.yaml",
        &format!(
            "checks:
  - {{name: broken, type: http, url: 'http://{broken}/', interval: 200ms, timeout: 1s}}
  - {{name: refused, type: http, url: 'http://127.0.0.1:{closed}/', interval: 200ms, timeout: 1s}}
"
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = d.metrics();
        let runs = metric(
            &m,
            "sensor_check_runs_total",
            &[("check", "broken"), ("type", "http"), ("result", "failure")],
        );
        if runs.unwrap_or(0.0) >= 3.0 || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let failures = metric(
        &m,
        "sensor_check_runs_total",
        &[("check", "broken"), ("type", "http"), ("result", "failure")],
    )
    .unwrap();
    assert!(failures >= 3.0, "{m}");
    assert_eq!(
        metric(
            &m,
            "sensor_check_http_responses_total",
            &[("check", "broken"), ("code", "500")]
        ),
        Some(failures),
        "every failed run of 'broken' got a 500\n{m}"
    );
    assert_eq!(
        metric(
            &m,
            "sensor_check_runs_total",
            &[("check", "broken"), ("type", "http"), ("result", "success")]
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(&m, "sensor_check_up", &[("check", "refused"), ("type", "http")]),
        Some(0.0)
    );
    assert!(metric(
        &m,
        "sensor_check_http_responses_total",
        &[("check", "refused"), ("code", "500")]
    )
    .is_none());
    assert_eq!(
        metric(
            &m,
            "sensor_check_duration_seconds_count",
            &[("check", "refused"), ("type", "http"), ("phase", "ttfb")]
        ),
        None,
        "no ttfb observed for refused connections\n{m}"
    );
    assert_eq!(d.stop().code(), Some(0));
}

/// A server that accepts and never answers.
pub(crate) fn hanging_server() -> SocketAddr {
    let l = rt().block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = l.local_addr().unwrap();
    rt().spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            held.push(s);
        }
    });
    addr
}

#[test]
fn a_hanging_target_delays_no_other_check() {
    let hang = hanging_server();
    let fast = http_server(200, Duration::ZERO, "ok");
    let d = daemon_with(
        "hang.yaml",
        &format!(
            "checks:
  - {{name: hang, type: http, url: 'http://{hang}/', interval: 1s, timeout: 3s}}
  - {{name: fast, type: http, url: 'http://{fast}/', interval: 100ms, timeout: 1s}}
"
        ),
    );
    let runs = |m: &str, c: &str, r: &str| {
        metric(
            m,
            "sensor_check_runs_total",
            &[("check", c), ("type", "http"), ("result", r)],
        )
        .unwrap_or(0.0)
    };
    // Wait for the first timeout of the hanging check, then count the fast one's runs over
    // 2 s while the hanging one is stuck in its next 3 s timeout.
    let start = Instant::now();
    while runs(&d.metrics(), "hang", "failure") < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", d.metrics());
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = runs(&d.metrics(), "fast", "success");
    std::thread::sleep(Duration::from_secs(2));
    let m = d.metrics();
    let during = runs(&m, "fast", "success") - before;
    // 20 at 100 ms; a busy CI machine may lose a few ticks, a delayed check would lose them all.
    assert!(
        (12.0..=21.0).contains(&during),
        "fast check ran {during} times in 2 s at 100 ms\n{m}"
    );
    assert_eq!(runs(&m, "fast", "failure"), 0.0);
    let (_, body) = d.get("/api/v1/checks");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let hang = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "hang")
        .unwrap()
        .clone();
    assert_eq!(hang["last"]["error"], "timeout after 3s during ttfb", "{hang}");
    assert!(hang["last"]["phases"]["total"].as_f64().unwrap() >= 3.0, "{hang}");
    assert_eq!(d.stop().code(), Some(0));
}
