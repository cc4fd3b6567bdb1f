//! `sensor remediate`: receives Alertmanager webhooks and runs the configured actions per alert
//! name, behind guard rails (dry-run by default, per-target cooldown, a rate limit and a blast
//! radius per window, nothing on resolved alerts). Every decision is logged, counted in
//! `sensor_remediation_actions_total{alert,action,result}` and kept in `/api/v1/remediations`.
//!
//! - [`auth`]: who may drive it (refuses to act exposed without authentication);
//!   [`config`]: the YAML file; [`alertmanager`]: the webhook payload; [`guard`]: the guard
//!   rails as pure logic; [`actions`]: exec / webhook / log; this file: the runner and its HTTP
//!   surface.

pub mod actions;
pub mod alertmanager;
pub mod auth;
pub mod config;
pub mod guard;

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::Context as _;
use axum::{
    body::Body,
    extract::{Request, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use prometheus::{IntCounterVec, Opts, Registry};
use serde::Serialize;

use self::{
    alertmanager::{Alert, PayloadError},
    config::{Config, Rule},
    guard::{Guard, Verdict},
};

use crate::sync::Lock as _;

/// One decision about one action of one alert, as `/api/v1/remediations` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    /// Increasing number of the entry.
    pub id: u64,
    /// RFC 3339, when the decision (or, for an action that ran, its end) was recorded.
    pub time: String,
    pub alert: String,
    pub status: &'static str,
    pub labels: BTreeMap<String, String>,
    pub starts_at: String,
    pub fingerprint: String,
    pub action: String,
    /// `success`, `failure`, `dry_run`, or `skipped_<reason>`.
    pub result: String,
    /// Why it was skipped, or the action's error.
    pub reason: String,
    /// The action's output (bounded).
    pub output: String,
    pub duration_seconds: f64,
}

pub struct Metrics {
    pub registry: Registry,
    actions: IntCounterVec,
    webhooks: IntCounterVec,
}

impl Metrics {
    fn new() -> anyhow::Result<Metrics> {
        let registry = Registry::new();
        let actions = IntCounterVec::new(
            Opts::new(
                "sensor_remediation_actions_total",
                "Remediation decisions per alert and action: success, failure, dry_run, or skipped_<reason> (resolved, no_rule, missing_label, not_allowed, cooldown, rate_limit, blast_radius).",
            ),
            &["alert", "action", "result"],
        )?;
        let webhooks = IntCounterVec::new(
            Opts::new(
                "sensor_remediation_webhooks_total",
                "Requests received: ok, or why they were refused (unauthorized: missing or wrong credentials, on any path; too_large, bad_json, bad_version, bad_alert).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(actions.clone()))?;
        registry.register(Box::new(webhooks.clone()))?;
        for r in [
            "ok",
            "unauthorized",
            "too_large",
            "bad_json",
            "bad_version",
            "bad_alert",
        ] {
            webhooks.with_label_values(&[r]);
        }
        Ok(Metrics {
            registry,
            actions,
            webhooks,
        })
    }
}

/// One decision to record (see [`AuditEntry`]).
struct Rec<'a> {
    action: &'a str,
    result: &'a str,
    reason: String,
    output: String,
    secs: f64,
}

/// The runner: configuration, guard state, audit list, metrics.
pub struct Runner {
    pub cfg: Config,
    guard: Mutex<Guard>,
    audit: Mutex<(u64, VecDeque<AuditEntry>)>,
    pub metrics: Metrics,
}

/// What the webhook answers for each alert.
#[derive(Debug, Serialize)]
pub struct Decision {
    pub alert: String,
    pub status: &'static str,
    /// `act`, `dry_run`, or `skipped_<reason>`.
    pub decision: String,
    pub reason: String,
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

impl Runner {
    pub fn new(cfg: Config) -> anyhow::Result<Arc<Runner>> {
        let guard = Mutex::new(Guard::new(cfg.limits.clone()));
        for r in &cfg.rules {
            for a in &r.actions {
                tracing::info!(alert = %r.alert, action = a.name(), kind = a.kind.label(), "remediation rule");
            }
            let acts = r.actions.iter().any(|a| a.kind != config::ActionType::Log);
            if acts && !cfg.dry_run && r.allowed_targets.is_empty() {
                tracing::warn!(alert = %r.alert, "rule has no allowed_targets: it acts on whatever target its alerts name");
            }
        }
        Ok(Arc::new(Runner {
            guard,
            audit: Mutex::new((0, VecDeque::new())),
            metrics: Metrics::new()?,
            cfg,
        }))
    }

    fn record(&self, alert: &Alert, label: &str, rec: Rec<'_>) {
        let Rec {
            action,
            result,
            reason,
            output,
            secs,
        } = rec;
        self.metrics.actions.with_label_values(&[label, action, result]).inc();
        tracing::info!(
            alert = alert.name(),
            labels = ?guard::labels_without_name(alert),
            action,
            result,
            reason = %reason,
            "remediation decision"
        );
        let mut a = self.audit.locked();
        a.0 += 1;
        let entry = AuditEntry {
            id: a.0,
            time: now_rfc3339(),
            alert: alert.name().to_string(),
            status: alert.status.label(),
            labels: guard::labels_without_name(alert),
            starts_at: alert.starts_at.clone(),
            fingerprint: alert.fingerprint.clone(),
            action: action.to_string(),
            result: result.to_string(),
            reason,
            output,
            duration_seconds: secs,
        };
        a.1.push_back(entry);
        while a.1.len() > self.cfg.audit_size {
            a.1.pop_front();
        }
    }

    pub fn audit(&self) -> Vec<AuditEntry> {
        let a = self.audit.locked();
        a.1.iter().cloned().collect()
    }

    /// Decides every alert of a notification; actions that are to run are spawned (their
    /// outcome is recorded when they end). Returns the decisions.
    pub fn handle(self: &Arc<Self>, alerts: Vec<Alert>) -> Vec<Decision> {
        let mut out = Vec::new();
        for alert in alerts {
            let rule = self.cfg.rule(alert.name()).cloned();
            // Only configured alert names become label values (bounded cardinality).
            let label = rule.as_ref().map_or("other".to_string(), |r| r.alert.clone());
            let verdict = self.guard.locked().decide(Instant::now(), &alert, rule.as_ref());
            let status = alert.status.label();
            match (verdict, rule) {
                (Verdict::Skip(skip), rule) => {
                    let result = format!("skipped_{}", skip.label());
                    let names: Vec<String> = match &rule {
                        Some(r) => r.actions.iter().map(|a| a.name().to_string()).collect(),
                        None => vec!["none".to_string()],
                    };
                    for n in &names {
                        self.record(
                            &alert,
                            &label,
                            Rec {
                                action: n,
                                result: &result,
                                reason: skip.reason(),
                                output: String::new(),
                                secs: 0.0,
                            },
                        );
                    }
                    out.push(Decision {
                        alert: alert.name().to_string(),
                        status,
                        decision: result,
                        reason: skip.reason(),
                    });
                }
                (Verdict::Act, Some(rule)) if self.cfg.dry_run => {
                    for a in &rule.actions {
                        let what = describe(a, &alert);
                        self.record(
                            &alert,
                            &label,
                            Rec {
                                action: a.name(),
                                result: "dry_run",
                                reason: format!("dry run: would {what}"),
                                output: String::new(),
                                secs: 0.0,
                            },
                        );
                    }
                    out.push(Decision {
                        alert: alert.name().to_string(),
                        status,
                        decision: "dry_run".into(),
                        reason: "dry_run is on: nothing was run".into(),
                    });
                }
                (Verdict::Act, Some(rule)) => {
                    out.push(Decision {
                        alert: alert.name().to_string(),
                        status,
                        decision: "act".into(),
                        reason: format!("running {} action(s)", rule.actions.len()),
                    });
                    let me = Arc::clone(self);
                    tokio::spawn(async move { me.act(rule, alert, label).await });
                }
                (Verdict::Act, None) => {} // the guard never acts without a rule
            }
        }
        out
    }

    /// Runs a rule's actions in order; each outcome is recorded.
    async fn act(self: Arc<Self>, rule: Rule, alert: Alert, label: String) {
        for a in &rule.actions {
            let t = Instant::now();
            let r = actions::run(a, &alert).await;
            let secs = t.elapsed().as_secs_f64();
            match r {
                Ok(output) => self.record(
                    &alert,
                    &label,
                    Rec {
                        action: a.name(),
                        result: "success",
                        reason: String::new(),
                        output,
                        secs,
                    },
                ),
                Err(e) => {
                    tracing::error!(alert = alert.name(), action = a.name(), error = %e, "remediation action failed");
                    self.record(
                        &alert,
                        &label,
                        Rec {
                            action: a.name(),
                            result: "failure",
                            reason: e.to_string(),
                            output: String::new(),
                            secs,
                        },
                    )
                }
            }
        }
    }
}

fn describe(a: &config::Action, alert: &Alert) -> String {
    match a.kind {
        config::ActionType::Exec if a.shell => format!("run sh -c {:?}", a.command.join(" ")),
        config::ActionType::Exec => {
            let argv: Vec<String> = a
                .command
                .iter()
                .map(|c| actions::expand(c, alert).unwrap_or_else(|e| format!("<{e}>")))
                .collect();
            format!("run {argv:?}")
        }
        config::ActionType::Webhook => format!("POST to {}", a.url.as_deref().unwrap_or_default()),
        config::ActionType::Log => "log the alert".into(),
    }
}

/// The routes: `POST /webhook` (Alertmanager), `GET /api/v1/remediations`, `/metrics`,
/// `/healthz`; all behind the gate (basic auth, bearer token) when there is one.
pub fn router(runner: Arc<Runner>, gate: Option<Arc<auth::Gate>>) -> Router {
    let r = Router::new()
        .route("/webhook", post(webhook))
        .route("/api/v1/remediations", get(remediations))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(runner);
    match gate {
        Some(g) => r.layer(axum::middleware::from_fn_with_state(g, crate::gate::require)),
        None => r,
    }
}

fn refuse(runner: &Runner, e: &PayloadError) -> Response {
    runner.metrics.webhooks.with_label_values(&[e.result()]).inc();
    tracing::warn!(error = %e, "webhook refused");
    let code = match e {
        PayloadError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::BAD_REQUEST,
    };
    (
        code,
        Json(serde_json::json!({ "error": e.to_string(), "result": e.result() })),
    )
        .into_response()
}

async fn webhook(State(runner): State<Arc<Runner>>, req: Request<Body>) -> Response {
    let limit = runner.cfg.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return refuse(&runner, &PayloadError::TooLarge { limit });
    }
    let body = match axum::body::to_bytes(req.into_body(), limit).await {
        Ok(b) => b,
        Err(_) => return refuse(&runner, &PayloadError::TooLarge { limit }),
    };
    let n = match alertmanager::parse(&body) {
        Ok(n) => n,
        Err(e) => return refuse(&runner, &e),
    };
    runner.metrics.webhooks.with_label_values(&["ok"]).inc();
    tracing::info!(receiver = %n.receiver, group = %n.group_key, alerts = n.alerts.len(), status = n.status.label(), "webhook");
    let decisions = runner.handle(n.alerts);
    Json(serde_json::json!({ "decisions": decisions })).into_response()
}

async fn remediations(State(runner): State<Arc<Runner>>) -> impl IntoResponse {
    Json(runner.audit())
}

async fn metrics(State(runner): State<Arc<Runner>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        crate::metrics::render(&runner.metrics.registry, &crate::expo::Sources::default()),
    )
}

/// `sensor remediate`: serves until SIGTERM/SIGINT. Refuses to start when it would act on
/// unauthenticated requests from other hosts (see [`auth::exposure`]).
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let web = match &cfg.web_config_file {
        Some(p) => Some(crate::webconfig::Web::load(p).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let bearer = cfg.bearer_token_file.as_deref().map(auth::Token::load).transpose()?;
    let methods = auth::methods(web.as_deref(), bearer.is_some());
    let posture = auth::exposure(cfg.listen, cfg.dry_run, &methods, cfg.insecure_allow_unauthenticated)?;
    let listener = crate::http::listen(cfg.listen, cfg.http.max_connections)
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let local = listener.local_addr()?;
    let dry_run = cfg.dry_run;
    let rules = cfg.rules.len();
    let limits = cfg.http.clone();
    let runner = Runner::new(cfg)?;
    let http_metrics = crate::http::HttpMetrics::new(&runner.metrics.registry)?;
    let tls = web.as_ref().and_then(|w| w.tls.clone());
    posture.log(local, tls.is_some());
    let unauthorized = runner.metrics.webhooks.with_label_values(&["unauthorized"]);
    let app = router(
        runner,
        auth::Gate::new(web, bearer, Some(unauthorized), "sensor remediate"),
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(crate::http::serve(listener, app, tls, limits, http_metrics, stop_rx));
    tracing::info!(listen = %local, dry_run, rules, "remediation runner listening");
    let which = crate::run::shutdown_signal().await?;
    tracing::info!(signal = which, "stopping");
    let _ = stop_tx.send(true);
    let _ = server.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alertmanager::tests::payload;

    fn runner(yaml: &str) -> Arc<Runner> {
        Runner::new(Config::parse(yaml, "t").unwrap()).unwrap()
    }

    async fn post(app: &Router, body: String) -> (StatusCode, serde_json::Value) {
        use tower::ServiceExt as _;
        let req = Request::builder()
            .method("POST")
            .uri("/webhook")
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let code = resp.status();
        let b = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (code, serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null))
    }

    fn count(r: &Runner, alert: &str, action: &str, result: &str) -> u64 {
        r.metrics.actions.with_label_values(&[alert, action, result]).get()
    }

    #[tokio::test]
    async fn bad_requests_get_4xx_with_the_reason_and_are_counted() {
        let r = runner("max_body_bytes: 2048\n");
        let app = router(Arc::clone(&r), None);
        let (code, v) = post(&app, "{oops".into()).await;
        assert_eq!(code, StatusCode::BAD_REQUEST);
        assert_eq!(v["result"], "bad_json");
        let (code, v) = post(&app, r#"{"version":"3","status":"firing","alerts":[]}"#.into()).await;
        assert_eq!(code, StatusCode::BAD_REQUEST);
        assert!(v["error"].as_str().unwrap().contains("version '3'"), "{v}");
        let (code, v) = post(&app, format!("{{\"pad\":\"{}\"}}", "x".repeat(4096))).await;
        assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(v["result"], "too_large");
        let (code, _) = post(&app, payload("firing", &[("A", &[])])).await;
        assert_eq!(code, StatusCode::OK);
        for (res, n) in [("bad_json", 1), ("bad_version", 1), ("too_large", 1), ("ok", 1)] {
            assert_eq!(r.metrics.webhooks.with_label_values(&[res]).get(), n, "{res}");
        }
    }

    #[tokio::test]
    async fn dry_run_by_default_records_what_would_run() {
        let r = runner(
            "rules:\n  - alert: Storm\n    target_labels: [pod]\n    actions: [{type: exec, command: [kubectl, delete, pod, '${labels.pod}']}]\n",
        );
        let app = router(Arc::clone(&r), None);
        let (_, v) = post(&app, payload("firing", &[("Storm", &[("pod", "web-1")])])).await;
        assert_eq!(v["decisions"][0]["decision"], "dry_run");
        assert_eq!(count(&r, "Storm", "exec", "dry_run"), 1);
        let audit = r.audit();
        assert_eq!(audit.len(), 1);
        assert!(
            audit[0].reason.contains(r#"["kubectl", "delete", "pod", "web-1"]"#),
            "{}",
            audit[0].reason
        );
        // Unknown alerts are counted under alert="other", not under their own name.
        post(&app, payload("firing", &[("Surprise", &[])])).await;
        assert_eq!(count(&r, "other", "none", "skipped_no_rule"), 1);
    }

    #[tokio::test]
    async fn acts_once_then_cooldown_and_nothing_on_resolved() {
        let dir = std::env::temp_dir().join(format!("sensor-remediate-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let _ = std::fs::remove_file(&out);
        let r = runner(&format!(
            "dry_run: false\nrules:\n  - alert: Storm\n    target_labels: [pod]\n    cooldown: 1h\n    actions:\n      - {{type: exec, shell: true, command: ['echo \"$ALERT_LABEL_POD\" >> {}']}}\n      - {{type: log}}\n",
            out.display()
        ));
        let app = router(Arc::clone(&r), None);
        let (_, v) = post(&app, payload("firing", &[("Storm", &[("pod", "p1")])])).await;
        assert_eq!(v["decisions"][0]["decision"], "act");
        let (_, v) = post(&app, payload("firing", &[("Storm", &[("pod", "p1")])])).await;
        assert_eq!(v["decisions"][0]["decision"], "skipped_cooldown");
        let (_, v) = post(&app, payload("resolved", &[("Storm", &[("pod", "p1")])])).await;
        assert_eq!(v["decisions"][0]["decision"], "skipped_resolved");
        for _ in 0..100 {
            if count(&r, "Storm", "log", "success") == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "p1\n");
        assert_eq!(count(&r, "Storm", "exec", "success"), 1);
        assert_eq!(count(&r, "Storm", "exec", "skipped_cooldown"), 1);
        assert_eq!(count(&r, "Storm", "exec", "skipped_resolved"), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn audit_list_is_bounded() {
        let r = runner("audit_size: 3\n");
        let app = router(Arc::clone(&r), None);
        for _ in 0..5 {
            post(&app, payload("firing", &[("X", &[])])).await;
        }
        let a = r.audit();
        assert_eq!(a.len(), 3);
        assert_eq!(a[0].id, 3);
        assert_eq!(a[2].id, 5);
    }
}
