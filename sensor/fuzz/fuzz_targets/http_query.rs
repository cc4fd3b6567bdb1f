//! Query strings of `/api/v1/events`, `/api/v1/checks` and the other routes, through the
//! daemon's real router: 200 with JSON or 400, never a 500 or a panic.
#![no_main]

use std::sync::{Arc, OnceLock, RwLock};

use axum::{body::Body, Router};
use http_body_util::BodyExt as _;
use libfuzzer_sys::fuzz_target;
use sensor::{
    checks::Engine,
    config::Config,
    events::EventHub,
    health::Health,
    http::{router, AppState},
    web,
};
use tower::ServiceExt as _;

const CHECKS: &str = "
checks:
  - name: api
    type: http
    url: http://127.0.0.1:1/health
  - name: feed
    type: websocket
    url: ws://127.0.0.1:1/feed
";

const PATHS: &[&str] = &[
    "/api/v1/events",
    "/api/v1/checks",
    "/api/v1/summary",
    "/api/v1/probes",
    "/metrics",
    "/healthz",
];

struct Fixture {
    rt: tokio::runtime::Runtime,
    app: Router,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let cfg = Config::parse(CHECKS, "checks.yaml").expect("the fixture's checks parse");
        let registry = prometheus::Registry::new();
        let hub = Arc::new(EventHub::new(100));
        for i in 0..20 {
            hub.publish_as("test", &serde_json::json!({ "i": i }));
        }
        let errors =
            prometheus::IntCounterVec::new(prometheus::Opts::new("e_total", "e"), &["task"]).expect("a counter");
        let app = rt.block_on(async {
            let sources = sensor::expo::Sources::default();
            let engine = Engine::new(&registry, &sources, &cfg.checks, &cfg.alerting, Default::default())
                .expect("the engine starts");
            let state = AppState {
                registry,
                sources,
                hub: Arc::clone(&hub),
                reports: Arc::new(RwLock::new(Vec::new())),
                health: Arc::new(Health::new(errors)),
                checks: Some(engine),
            };
            // Never stopped: the fixture lives as long as the process.
            let (_tx, stop) = tokio::sync::watch::channel(false);
            std::mem::forget(_tx);
            let live = web::Live::start(&hub, "fuzz", web::Sources::default(), stop);
            router(state.clone(), web::routes(state, live), None)
        });
        Fixture { rt, app }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((pick, query)) = data.split_first() else {
        return;
    };
    let path = PATHS[usize::from(*pick) % PATHS.len()];
    let Ok(query) = std::str::from_utf8(query) else { return };
    let Ok(req) = axum::http::Request::get(format!("{path}?{query}")).body(Body::empty()) else {
        return;
    };
    let f = fixture();
    let (status, body) = f.rt.block_on(async {
        let resp = f.app.clone().oneshot(req).await.expect("the router is infallible");
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("the body is readable")
            .to_bytes();
        (status, body)
    });
    assert!(status == 200 || status == 400, "{path}?{query}: {status} {body:?}");
    if status == 200 && path.starts_with("/api/") {
        let v: serde_json::Value = serde_json::from_slice(&body).expect("a 200 answer is JSON");
        if path == "/api/v1/events" {
            let events = v.as_array().expect("events are an array");
            assert!(events.len() <= 20);
            let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
            assert_eq!(seqs.len(), events.len(), "every event has a seq");
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        }
        if path == "/api/v1/checks" {
            let shown = v["checks"].as_array().map_or(0, Vec::len);
            assert!(shown <= 3);
        }
    }
});
