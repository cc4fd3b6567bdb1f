//! `/api/v1/checks`: every check as `sensor top` reads it, or one page of them for the web view
//! (failing first, filtered by name, with each check's recent runs for its chart).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::checks::{history::Sample, CheckRuntime, Engine, LONG_WINDOW, SHORT_WINDOW};

#[derive(Debug, Default, Deserialize)]
pub struct PageQuery {
    pub offset: Option<usize>,
    pub limit: Option<usize>,
    /// Case-insensitive part of the name or URL.
    pub q: Option<String>,
    /// `10m` or `1h`: each check gets `points`, its runs over that window.
    pub series: Option<String>,
    /// Newest alerts to include (default 50).
    pub alerts: Option<usize>,
}

impl PageQuery {
    fn paged(&self) -> bool {
        self.offset.is_some()
            || self.limit.is_some()
            || self.q.is_some()
            || self.series.is_some()
            || self.alerts.is_some()
    }
}

/// How many checks are in each state.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Counts {
    pub total: usize,
    pub up: usize,
    pub down: usize,
    /// No run yet.
    pub pending: usize,
    pub firing: usize,
}

pub fn counts(engine: &Engine) -> Counts {
    let mut c = Counts::default();
    for rt in &engine.checks {
        let (up, firing) = rt.state();
        c.total += 1;
        match up {
            Some(true) => c.up += 1,
            Some(false) => c.down += 1,
            None => c.pending += 1,
        }
        c.firing += usize::from(firing);
    }
    c
}

/// At most this many points per chart: runs are grouped into equal slices of the window and
/// each slice shows its slowest run (failed if any run in it failed).
const CHART_POINTS: usize = 120;
const DEFAULT_LIMIT: usize = 25;
const MAX_LIMIT: usize = 500;
const DEFAULT_ALERTS: usize = 50;

pub fn page(engine: &Engine, q: &PageQuery, now: f64) -> Value {
    if !q.paged() {
        return serde_json::to_value(engine.report()).unwrap_or(Value::Null);
    }
    let needle = q.q.as_deref().unwrap_or("").trim().to_lowercase();
    let mut order: Vec<(u8, &Arc<CheckRuntime>)> = engine
        .checks
        .iter()
        .filter(|rt| {
            needle.is_empty()
                || rt.name().to_lowercase().contains(&needle)
                || rt.prepared.cfg.url.to_lowercase().contains(&needle)
        })
        .map(|rt| {
            let rank = match rt.state() {
                (_, true) => 0,
                (Some(false), _) => 1,
                (None, _) => 2,
                (Some(true), _) => 3,
            };
            (rank, rt)
        })
        .collect();
    order.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name().cmp(b.1.name())));
    let matched = order.len();
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let offset = q.offset.unwrap_or(0).min(matched);
    let shown: Vec<&Arc<CheckRuntime>> = order.iter().skip(offset).take(limit).map(|(_, rt)| *rt).collect();
    let mut report = engine.report_of(shown.iter().copied(), now);
    let alerts_total = report.alerts.len();
    let keep = q.alerts.unwrap_or(DEFAULT_ALERTS).min(1000);
    report.alerts.drain(..alerts_total.saturating_sub(keep));
    let mut v = serde_json::to_value(&report).unwrap_or(Value::Null);
    let window = match q.series.as_deref() {
        Some("1h") => Some(LONG_WINDOW),
        Some(_) => Some(SHORT_WINDOW),
        None => None,
    };
    if let (Some(w), Some(list)) = (window, v.get_mut("checks").and_then(Value::as_array_mut)) {
        for (c, rt) in list.iter_mut().zip(&shown) {
            c["points"] = points(&rt.points(now, w), now, w);
        }
    }
    v["alerts_total"] = json!(alerts_total);
    v["page"] = json!({
        "offset": offset,
        "limit": limit,
        "matched": matched,
        "counts": counts(engine),
        "series_window_seconds": window,
    });
    v
}

fn r5(v: f64) -> f64 {
    (v * 1e5).round() / 1e5
}

/// `[at, ok, total, dns, connect, tls, ttfb, transfer]` per point, oldest first.
pub fn points(samples: &[Sample], now: f64, window: f64) -> Value {
    let width = window / CHART_POINTS as f64;
    let mut slots: Vec<Option<(Sample, bool)>> = vec![None; CHART_POINTS];
    for s in samples {
        let i = ((s.at - (now - window)) / width).floor();
        if !(0.0..CHART_POINTS as f64).contains(&i) {
            continue;
        }
        let slot = &mut slots[i as usize];
        *slot = Some(match slot.take() {
            None => (*s, s.success),
            Some((best, ok)) => (if s.total > best.total { *s } else { best }, ok && s.success),
        });
    }
    let pts: Vec<Value> = slots
        .into_iter()
        .flatten()
        .map(|(s, ok)| {
            let mut p = vec![json!(r5(s.at)), json!(u8::from(ok)), json!(r5(s.total))];
            p.extend(s.split.iter().map(|v| json!(r5(f64::from(*v)))));
            Value::Array(p)
        })
        .collect();
    Value::Array(pts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(at: f64, success: bool, total: f64) -> Sample {
        Sample {
            at,
            success,
            total,
            ttfb: None,
            code: None,
            split: [0.0, 0.001, 0.0, (total / 2.0) as f32, 0.0],
        }
    }

    #[test]
    fn points_are_bounded_and_keep_failures() {
        // 3,000 runs in 10 minutes (a 200 ms interval) become at most 120 points.
        let now = 10_000.0;
        let runs: Vec<Sample> = (0..3000)
            .map(|i| {
                s(
                    now - 600.0 + 0.2 * i as f64 + 0.1,
                    i != 1500,
                    0.01 + (i % 7) as f64 * 0.001,
                )
            })
            .collect();
        let v = points(&runs, now, 600.0);
        let a = v.as_array().cloned().unwrap_or_default();
        assert_eq!(a.len(), 120);
        let failed: Vec<&Value> = a.iter().filter(|p| p[1] == 0).collect();
        assert_eq!(failed.len(), 1, "the slice holding the failed run is marked");
        assert!(a.iter().all(|p| p[2].as_f64() == Some(0.016)), "slowest run per slice");
        assert_eq!(a[0].as_array().map(Vec::len), Some(8));
        // Runs outside the window are left out.
        let old = points(&[s(now - 700.0, true, 0.1)], now, 600.0);
        assert_eq!(old, json!([]));
    }
}
