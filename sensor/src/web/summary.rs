//! `/api/v1/summary`: what the page's header and probe sections and `sensor top`'s kernel
//! lines show. Each probe's section is its own view (the numbers its metrics export) plus what
//! the web view's rings keep of the events its spec names; losses are the exported counters.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;
use serde_json::{Map, Value};

use super::{checks::Counts, Live, Rings};
use crate::probe::{ProbeReport, ProbeState, View, ViewSpec};

/// Recent events listed.
const RECENT_ROWS: usize = 50;

#[derive(Debug, Serialize)]
pub struct Summary {
    pub generated_at: f64,
    pub host: Host,
    pub ready: bool,
    /// Parts of the daemon that are down (`/readyz`).
    pub down: Vec<String>,
    pub probes: Vec<ProbeView>,
    pub lost: Lost,
    pub checks: Counts,
    /// Why the page shows its red banner: losses, degraded probes, firing alerts. Empty when
    /// all is well.
    pub problems: Vec<String>,
    /// Each probe's section by its key (`oom`, `memory`, `tcp`), `running` false and empty when
    /// the probe did not start.
    #[serde(flatten)]
    pub sections: BTreeMap<&'static str, Map<String, Value>>,
}

/// What a summary is built from.
pub struct Inputs {
    /// Each probe with a section: its name, spec and view (its spec's `idle` one when it has
    /// nothing to show).
    pub sections: Vec<(&'static str, &'static ViewSpec, View)>,
    /// `(probe, reason, count)`, as `sensor_events_lost_total` exports them.
    pub lost: Vec<(&'static str, &'static str, u64)>,
    pub reports: Vec<ProbeReport>,
    /// Ready, and what is down.
    pub ready: (bool, Vec<String>),
    pub checks: Counts,
}

#[derive(Debug, Serialize)]
pub struct Host {
    pub hostname: String,
    pub kernel: String,
    pub version: &'static str,
    pub started_at: f64,
    pub uptime_seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct ProbeView {
    pub probe: &'static str,
    pub state: &'static str,
    pub reason: Option<String>,
    /// `(purpose, hook)` per hook group, `hook` null when the group has none.
    pub hooks: Vec<(&'static str, Option<&'static str>)>,
}

#[derive(Debug, Default, Serialize)]
pub struct Lost {
    pub total: f64,
    /// Non-zero `sensor_events_lost_total` series.
    pub by: Vec<LostRow>,
}

#[derive(Debug, Serialize)]
pub struct LostRow {
    pub probe: String,
    pub reason: String,
    pub count: f64,
}

fn probe_view(r: &ProbeReport) -> ProbeView {
    let reason = match &r.state {
        ProbeState::Degraded { reason } | ProbeState::Unsupported { reason } => Some(reason.clone()),
        _ => None,
    };
    ProbeView {
        probe: r.probe,
        state: r.state.label(),
        reason,
        hooks: r
            .groups
            .iter()
            .map(|g| (g.purpose, g.hook.map(|h| h.label())))
            .collect(),
    }
}

/// Counts of `times` in `n` slots of `width` seconds ending at `now` (oldest first).
pub fn buckets(times: impl Iterator<Item = f64>, now: f64, width: f64, n: usize) -> Vec<u32> {
    let mut out = vec![0u32; n];
    // The last slot is the current minute / hour / day (aligned to the clock).
    let end = (now / width).floor() * width + width;
    let start = end - width * n as f64;
    for t in times {
        if t >= start && t < end {
            let i = ((t - start) / width) as usize;
            if let Some(c) = out.get_mut(i) {
                *c += 1;
            }
        }
    }
    out
}

/// An event as listed; one with resident memory parts (an OOM kill's victim) also gets their
/// sum, `rss_bytes`.
fn event_json(ev: &crate::events::Sequenced) -> Value {
    let mut v = serde_json::to_value(ev).unwrap_or(Value::Null);
    let parts: Vec<u64> = ["anon_rss_bytes", "file_rss_bytes", "shmem_rss_bytes"]
        .iter()
        .filter_map(|k| ev.event.fields.get(*k).and_then(Value::as_u64))
        .collect();
    if let (false, Some(o)) = (parts.is_empty(), v.as_object_mut()) {
        o.insert("rss_bytes".into(), serde_json::json!(parts.iter().sum::<u64>()));
    }
    v
}

fn running(reports: &[ProbeReport], probe: &str) -> bool {
    reports.iter().any(|r| r.probe == probe && r.state.running())
}

/// A probe's section: its view's fields, `running`, and the events its spec names.
fn section(rings: &Rings, spec: &ViewSpec, view: View, running: bool, now: f64) -> Map<String, Value> {
    let mut m = view.fields;
    m.insert("running".into(), Value::Bool(running));
    let newest = |kind: &str| rings.recent.get(kind).into_iter().flat_map(|q| q.iter().rev());
    for (field, kind) in spec.recent {
        let rows: Vec<Value> = newest(kind).take(RECENT_ROWS).map(|e| event_json(e)).collect();
        m.insert((*field).into(), Value::Array(rows));
    }
    if let Some(kind) = spec.timeline {
        let times = || rings.times.get(kind).into_iter().flat_map(|q| q.iter().copied());
        m.insert("per_minute".into(), serde_json::json!(buckets(times(), now, 60.0, 60)));
        m.insert("per_hour".into(), serde_json::json!(buckets(times(), now, 3600.0, 24)));
        m.insert("per_day".into(), serde_json::json!(buckets(times(), now, 86400.0, 30)));
    }
    if let Some((field, kind)) = spec.holding {
        // The newest event of each cgroup the probe says holds now.
        let holding: HashSet<&str> = view.holding.iter().map(String::as_str).collect();
        let mut seen = HashSet::new();
        let rows: Vec<Value> = newest(kind)
            .filter(|e| {
                let cg = e.event.fields.get("cgroup").and_then(Value::as_str).unwrap_or_default();
                holding.contains(cg) && seen.insert(cg.to_string())
            })
            .map(|e| event_json(e))
            .collect();
        m.insert(field.into(), Value::Array(rows));
    }
    m
}

fn lost(rows: Vec<(&'static str, &'static str, u64)>) -> Lost {
    let by: Vec<LostRow> = rows
        .into_iter()
        .filter(|(_, _, n)| *n > 0)
        .map(|(probe, reason, n)| LostRow {
            probe: probe.to_string(),
            reason: reason.to_string(),
            count: n as f64,
        })
        .collect();
    Lost {
        total: by.iter().map(|l| l.count).sum(),
        by,
    }
}

pub fn build(live: &Live, inputs: Inputs, now: f64) -> Summary {
    let Inputs {
        sections: parts,
        lost: lost_rows,
        reports,
        ready: (ready, down),
        checks,
    } = inputs;
    let lost = lost(lost_rows);
    let mut problems = Vec::new();
    if lost.total > 0.0 {
        let by: Vec<String> = lost
            .by
            .iter()
            .map(|l| format!("{} {} {}", l.probe, l.reason, l.count))
            .collect();
        problems.push(format!("{} events lost ({})", lost.total, by.join(", ")));
    }
    let mut sections = BTreeMap::new();
    {
        let rings = live.rings();
        for (probe, spec, view) in parts {
            problems.extend(view.problems.iter().cloned());
            sections.insert(spec.key, section(&rings, spec, view, running(&reports, probe), now));
        }
    }
    let probes: Vec<ProbeView> = reports.iter().map(probe_view).collect();
    for p in probes
        .iter()
        .filter(|p| p.state == "degraded" || p.state == "unsupported")
    {
        problems.push(format!("probe {} is {}", p.probe, p.state));
    }
    if !ready {
        problems.push(format!("not ready: {}", down.join(", ")));
    }
    if checks.firing > 0 {
        problems.push(format!("{} check alert(s) firing", checks.firing));
    }
    Summary {
        generated_at: now,
        host: Host {
            hostname: live.hostname.clone(),
            kernel: live.kernel.clone(),
            version: crate::metrics::VERSION,
            started_at: live.started_unix,
            uptime_seconds: live.started.elapsed().as_secs_f64(),
        },
        ready,
        down,
        probes,
        lost,
        checks,
        problems,
        sections,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kills_fall_in_clock_aligned_buckets() {
        let now = 1_000_000.0 * 60.0 + 30.0; // 30 s into a minute
                                             // The 60 slots cover this minute and the 59 before it: 3,570 s back, not 3,600.
        let times = [
            now - 5.0,
            now - 29.0,
            now - 31.0,
            now - 3560.0,
            now - 3599.0,
            now - 4000.0,
        ];
        let m = buckets(times.iter().copied(), now, 60.0, 60);
        assert_eq!(m.len(), 60);
        assert_eq!(m[59], 2, "this minute");
        assert_eq!(m[58], 1, "the previous minute");
        assert_eq!(m[0], 1, "59 minutes ago");
        assert_eq!(m.iter().sum::<u32>(), 4, "{m:?}");
        let h = buckets(times.iter().copied(), now, 3600.0, 24);
        assert_eq!(h.iter().sum::<u32>(), 6);
    }

    #[test]
    fn sections_from_views_and_rings() {
        const SPEC: ViewSpec = ViewSpec {
            key: "k",
            recent: &[("recent", "kill")],
            timeline: Some("kill"),
            holding: Some(("warnings", "warn")),
            idle: View::default,
        };
        let ev = |seq: u64, kind: &'static str, cgroup: &str| {
            let body = serde_json::json!({"time": 100.0, "cgroup": cgroup, "anon_rss_bytes": 3, "file_rss_bytes": 4});
            std::sync::Arc::new(crate::events::Sequenced {
                seq,
                event: crate::events::Event::new(kind, &body).expect("an object"),
            })
        };
        let live = Live {
            started: std::time::Instant::now(),
            started_unix: 0.0,
            hostname: "h".into(),
            kernel: "k".into(),
            sources: Default::default(),
            rings: std::sync::Mutex::new(Rings::for_specs([&SPEC])),
            cache: Default::default(),
        };
        for (seq, kind, cg) in [
            (1, "kill", "/a"),
            (2, "warn", "/a"),
            (3, "warn", "/b"),
            (4, "warn", "/a"),
        ] {
            live.rings().add(&ev(seq, kind, cg));
        }
        let mut fields = Map::new();
        fields.insert("kills_total".into(), serde_json::json!(1));
        let view = View {
            fields,
            problems: vec!["p".into()],
            holding: vec!["/a".into()],
        };
        let reports = vec![ProbeReport {
            probe: "probe",
            state: ProbeState::Attached,
            groups: vec![],
        }];
        let inputs = Inputs {
            sections: vec![("probe", &SPEC, view)],
            lost: vec![("probe", "buffer_full", 2), ("probe", "map_full", 0)],
            reports,
            ready: (true, vec![]),
            checks: Counts::default(),
        };
        let s = build(&live, inputs, 130.0);
        let k = &s.sections["k"];
        assert_eq!(k["running"], true);
        assert_eq!(k["kills_total"], 1);
        assert_eq!(k["recent"][0]["rss_bytes"], 7);
        assert_eq!(k["per_minute"][59], 0, "100 s is in the previous minute");
        assert_eq!(k["per_minute"][58], 1);
        let warnings = k["warnings"].as_array().cloned().unwrap_or_default();
        assert_eq!(warnings.len(), 1, "the newest of the holding cgroup only: {warnings:?}");
        assert_eq!(warnings[0]["seq"], 4);
        assert_eq!(s.lost.total, 2.0);
        assert_eq!(
            s.problems,
            vec!["2 events lost (probe buffer_full 2)".to_string(), "p".into()]
        );
        let json = serde_json::to_value(&s).unwrap_or_default();
        assert_eq!(json["k"]["running"], true, "sections are top-level keys");
    }
}
