//! One run of a check (HTTP or websocket), and `sensor check`: every check once.

use std::{sync::Arc, time::Instant};

use bytes::Bytes;
use prometheus::Registry;

use super::{
    config::{Alerting, Check, CheckType},
    conn::Progress,
    engine::Engine,
    http, now_unix,
    runtime::{CheckRuntime, Prepared, RunResult},
    vantage::VantageView,
    ws,
};

/// One run of a check (HTTP request or websocket probe; a stream check waits for its first
/// message), bounded by its timeout.
pub async fn run_once(engine: &Engine, rt: &CheckRuntime) -> RunResult {
    match rt.prepared.cfg.kind {
        CheckType::Http => run_http(&rt.prepared).await,
        CheckType::Websocket => ws::probe(engine, rt, rt.is_stream()).await,
    }
}

pub(super) async fn run_http(p: &Prepared) -> RunResult {
    let at = now_unix();
    let start = Instant::now();
    let mut progress = Progress::default();
    let req = http::Request {
        target: &p.target,
        tls: p.tls.as_ref(),
        method: &p.method,
        headers: &p.headers,
        body: p.cfg.body.clone().map(Bytes::from),
        keep_body: if p.body_regex.is_some() { http::MAX_KEPT_BODY } else { 0 },
    };
    let outcome = tokio::time::timeout(p.cfg.timeout, http::request(req, &mut progress)).await;
    progress.phases.total = start.elapsed().as_secs_f64();
    let (status, error) = match outcome {
        Err(_) => (None, Some(progress.timeout_error(p.cfg.timeout))),
        Ok(Err(e)) => (None, Some(e.to_string())),
        Ok(Ok(resp)) => {
            let want = &p.cfg.expect.status;
            let status_ok = if want.is_empty() {
                (200..400).contains(&resp.status)
            } else {
                want.contains(&resp.status)
            };
            let error = if !status_ok {
                Some(if want.is_empty() {
                    format!("status {} is not 2xx or 3xx", resp.status)
                } else {
                    format!("status {} is not one of {want:?}", resp.status)
                })
            } else if let Some(re) = &p.body_regex {
                let body = String::from_utf8_lossy(&resp.body);
                (!re.is_match(&body)).then(|| format!("body does not match /{}/", re.as_str()))
            } else {
                None
            };
            (Some(resp.status), error)
        }
    };
    RunResult {
        check: p.cfg.name.clone(),
        kind: "http",
        at,
        success: error.is_none(),
        error,
        phases: progress.phases,
        status,
        ws: None,
    }
}

/// `sensor check`: every configured check (or the named ones) once, concurrently.
pub async fn run_all_once(checks: &[Check], alerting: &Alerting, names: &[String]) -> anyhow::Result<Vec<RunResult>> {
    for n in names {
        if !checks.iter().any(|c| &c.name == n) {
            anyhow::bail!("no check named '{n}' in the configuration");
        }
    }
    let selected: Vec<Check> = checks
        .iter()
        .filter(|c| names.is_empty() || names.contains(&c.name))
        .cloned()
        .collect();
    if selected.is_empty() {
        anyhow::bail!("no checks configured (add a `checks:` list to the config file)");
    }
    let mut alerting = alerting.clone();
    alerting.webhook = None;
    let engine = Engine::new(
        &Registry::new(),
        &crate::expo::Sources::default(),
        &selected,
        &alerting,
        VantageView::default(),
    )?;
    let runs = engine.checks.iter().map(|rt| {
        let engine = Arc::clone(&engine);
        let rt = Arc::clone(rt);
        tokio::spawn(async move { run_once(&engine, &rt).await })
    });
    let mut out = Vec::new();
    for r in runs.collect::<Vec<_>>() {
        out.push(r.await?);
    }
    Ok(out)
}

/// A table of results for people.
pub fn render_results(results: &[RunResult]) -> String {
    let ms = |v: Option<f64>| v.map(|s| format!("{:.1}", s * 1000.0)).unwrap_or_else(|| "-".into());
    let mut rows = vec![[
        "CHECK", "TYPE", "RESULT", "CODE", "DNS", "CONNECT", "TLS", "TTFB", "TRANSFER", "TOTAL ms", "ERROR",
    ]
    .map(String::from)
    .to_vec()];
    for r in results {
        let p = &r.phases;
        let code = match (&r.status, &r.ws) {
            (Some(s), _) => s.to_string(),
            (None, Some(w)) => w.close_code.map(|c| format!("ws {c}")).unwrap_or_else(|| "-".into()),
            _ => "-".into(),
        };
        rows.push(vec![
            r.check.clone(),
            r.kind.to_string(),
            if r.success { "ok" } else { "FAIL" }.to_string(),
            code,
            ms(p.dns),
            ms(p.connect),
            ms(p.tls),
            ms(p.ttfb.or(p.handshake)),
            ms(p.transfer.or(p.first_message)),
            ms(Some(p.total)),
            r.error.clone().unwrap_or_default(),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
