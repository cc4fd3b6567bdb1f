//! `/api/v1/summary`: what the page's header, OOM, memory and TCP sections and `sensor top`'s
//! kernel lines show, computed from the metrics registry (the numbers Prometheus scrapes), the
//! probe reports and the web view's rings.

use std::collections::BTreeMap;

use prometheus::proto::{Metric, MetricFamily};
use serde::Serialize;
use serde_json::Value;

use super::{checks::Counts, Live, Rings, TcpSample};
use crate::probe::{ProbeReport, ProbeState};

/// Rows in each top-N list.
const TOP: usize = 10;
/// Recent kills and failures listed.
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
    pub oom: Oom,
    pub memory: Memory,
    pub tcp: Tcp,
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

#[derive(Debug, Default, Serialize)]
pub struct Oom {
    pub running: bool,
    /// `sensor_oom_kills_total`, every series.
    pub kills_total: f64,
    /// Newest first.
    pub recent: Vec<Value>,
    /// Kills per minute over the last hour, per hour over the last day, per day over the last
    /// 30 days; oldest first, the last entry is the current minute / hour / day.
    pub per_minute: Vec<u32>,
    pub per_hour: Vec<u32>,
    pub per_day: Vec<u32>,
    /// Non-zero `sensor_oom_kills_unseen` series (kills the kernel counted, the sensor did not).
    pub unseen: Vec<UnseenRow>,
    pub unseen_total: f64,
    /// `oom_imminent` warnings that hold now (their workload has a `sensor_oom_imminent`
    /// series), newest first.
    pub imminent: Vec<Value>,
}

#[derive(Debug, Serialize)]
pub struct UnseenRow {
    pub source: String,
    pub cgroup: String,
    pub count: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Memory {
    pub running: bool,
    /// Host PSI: `[unix time, some, full]` per sample, as the share of time stalled since the
    /// previous sample (0..1); `full` null where the kernel has none.
    pub psi: Vec<(f64, f64, Option<f64>)>,
    pub top_reclaim: Vec<WorkloadRow>,
    pub top_max_events: Vec<WorkloadRow>,
    /// Workloads with reclaim or memory.events series.
    pub workloads: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WorkloadRow {
    pub cgroup: String,
    pub container_id: String,
    pub pod_uid: String,
    /// Reclaim: seconds in reclaim; max events: the count.
    pub value: f64,
    /// Reclaim: stalls (0 unless the reclaim histogram is kept per workload); max events:
    /// unused (0).
    pub count: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Tcp {
    pub running: bool,
    /// `sensor_tcp_connects_total` by result.
    pub totals: BTreeMap<String, f64>,
    /// Connects per second by result between consecutive summaries: `[unix time, {result: rate}]`.
    pub rate: Vec<(f64, BTreeMap<String, f64>)>,
    /// Connect latency: `[upper bound (null = +Inf), connects in this bucket]`.
    pub latency: Vec<(Option<f64>, f64)>,
    pub top_destinations: Vec<DestRow>,
    pub top_workloads: Vec<TcpWorkloadRow>,
    /// Newest first.
    pub recent_failures: Vec<Value>,
}

#[derive(Debug, Serialize)]
pub struct DestRow {
    pub destination: String,
    pub failures: f64,
    pub connects: f64,
}

#[derive(Debug, Serialize)]
pub struct TcpWorkloadRow {
    pub cgroup: String,
    pub container_id: String,
    pub pod_uid: String,
    pub failures: f64,
    pub connects: f64,
}

fn label<'a>(m: &'a Metric, name: &str) -> &'a str {
    m.get_label()
        .iter()
        .find(|l| l.name() == name)
        .map_or("", |l| l.value())
}

/// A counter's or gauge's value (a metric has one of them; the other reads 0).
fn value(m: &Metric) -> f64 {
    m.get_counter().get_value() + m.get_gauge().get_value()
}

fn series<'a>(families: &'a [MetricFamily], name: &'a str) -> impl Iterator<Item = &'a Metric> {
    families
        .iter()
        .filter(move |f| f.name() == name)
        .flat_map(|f| f.get_metric().iter())
}

fn workload_key(m: &Metric) -> (String, String, String) {
    (
        label(m, "cgroup").to_string(),
        label(m, "container_id").to_string(),
        label(m, "pod_uid").to_string(),
    )
}

fn top_n<T>(mut rows: Vec<T>, key: impl Fn(&T) -> f64) -> Vec<T> {
    rows.sort_by(|a, b| key(b).total_cmp(&key(a)));
    rows.truncate(TOP);
    rows
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

fn event_json(ev: &crate::events::Sequenced) -> Value {
    let mut v = serde_json::to_value(ev).unwrap_or(Value::Null);
    if ev.event.kind == "oom_kill" {
        // Resident memory (anon + file + shmem), where the kernel gave any of them.
        let parts: Vec<u64> = ["anon_rss_bytes", "file_rss_bytes", "shmem_rss_bytes"]
            .iter()
            .filter_map(|k| ev.event.fields.get(*k).and_then(Value::as_u64))
            .collect();
        if let Some(o) = v.as_object_mut() {
            let rss = (!parts.is_empty()).then(|| parts.iter().sum::<u64>());
            o.insert("rss_bytes".into(), serde_json::json!(rss));
        }
    }
    v
}

fn running(reports: &[ProbeReport], probe: &str) -> bool {
    reports.iter().any(|r| r.probe == probe && r.state.running())
}

pub fn build(
    live: &Live,
    families: &[MetricFamily],
    reports: &[ProbeReport],
    (ready, down): (bool, Vec<String>),
    checks: Counts,
    now: f64,
) -> Summary {
    let mut rings = live.rings();
    let tcp_totals = tcp_totals(families);
    if running(reports, "tcp") {
        rings.add_tcp(TcpSample {
            at: now,
            totals: tcp_totals.clone(),
        });
    }
    let lost = lost(families);
    let oom = oom(&rings, families, running(reports, "oom"), now);
    let memory = memory(&rings, families, running(reports, "memcg"));
    let tcp = tcp(&rings, families, tcp_totals, running(reports, "tcp"));
    drop(rings);
    let probes: Vec<ProbeView> = reports.iter().map(probe_view).collect();
    let mut problems = Vec::new();
    if lost.total > 0.0 {
        let by: Vec<String> = lost
            .by
            .iter()
            .map(|l| format!("{} {} {}", l.probe, l.reason, l.count))
            .collect();
        problems.push(format!("{} events lost ({})", lost.total, by.join(", ")));
    }
    if oom.unseen_total > 0.0 {
        problems.push(format!(
            "{} OOM kills the kernel counted were not seen by the sensor",
            oom.unseen_total
        ));
    }
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
        oom,
        memory,
        tcp,
    }
}

fn lost(families: &[MetricFamily]) -> Lost {
    let by: Vec<LostRow> = series(families, "sensor_events_lost_total")
        .filter(|m| value(m) > 0.0)
        .map(|m| LostRow {
            probe: label(m, "probe").to_string(),
            reason: label(m, "reason").to_string(),
            count: value(m),
        })
        .collect();
    Lost {
        total: by.iter().map(|l| l.count).fold(0.0, |a, b| a + b),
        by,
    }
}

fn oom(rings: &Rings, families: &[MetricFamily], running: bool, now: f64) -> Oom {
    let unseen: Vec<UnseenRow> = series(families, "sensor_oom_kills_unseen")
        .filter(|m| value(m) != 0.0)
        .map(|m| UnseenRow {
            source: label(m, "source").to_string(),
            cgroup: label(m, "cgroup").to_string(),
            count: value(m),
        })
        .collect();
    let times = || rings.kill_times.iter().copied();
    Oom {
        running,
        kills_total: series(families, "sensor_oom_kills_total")
            .map(value)
            .fold(0.0, |a, b| a + b),
        recent: rings
            .kills
            .iter()
            .rev()
            .take(RECENT_ROWS)
            .map(|e| event_json(e))
            .collect(),
        per_minute: buckets(times(), now, 60.0, 60),
        per_hour: buckets(times(), now, 3600.0, 24),
        per_day: buckets(times(), now, 86400.0, 30),
        unseen_total: unseen.iter().map(|u| u.count.max(0.0)).fold(0.0, |a, b| a + b),
        unseen,
        imminent: imminent(rings, families),
    }
}

/// The newest warning of each workload whose `sensor_oom_imminent` series exists now.
fn imminent(rings: &Rings, families: &[MetricFamily]) -> Vec<Value> {
    let holding: std::collections::HashSet<&str> = series(families, "sensor_oom_imminent")
        .map(|m| label(m, "cgroup"))
        .collect();
    let mut seen = std::collections::HashSet::new();
    rings
        .imminent
        .iter()
        .rev()
        .filter(|e| {
            let cg = e.event.fields.get("cgroup").and_then(Value::as_str).unwrap_or_default();
            holding.contains(cg) && seen.insert(cg.to_string())
        })
        .map(|e| event_json(e))
        .collect()
}

fn memory(rings: &Rings, families: &[MetricFamily], running: bool) -> Memory {
    let psi = rings
        .psi
        .iter()
        .zip(rings.psi.iter().skip(1))
        .filter_map(|(a, b)| {
            let dt_us = (b.at - a.at) * 1e6;
            if dt_us <= 0.0 {
                return None;
            }
            let share = |x: u64, y: u64| (y.saturating_sub(x) as f64 / dt_us).clamp(0.0, 1.0);
            let full = match (a.full_us, b.full_us) {
                (Some(x), Some(y)) => Some(share(x, y)),
                _ => None,
            };
            Some((b.at, share(a.some_us, b.some_us), full))
        })
        .collect();
    let mut reclaim: BTreeMap<(String, String, String), (f64, f64)> = BTreeMap::new();
    // Each workload's reclaim time; its number of stalls where the histogram is kept per
    // workload (`probes.memcg.reclaim_duration.per: workload`; per host by default).
    for m in series(families, "sensor_memcg_reclaim_seconds_total") {
        reclaim.entry(workload_key(m)).or_default().0 += value(m);
    }
    for m in series(families, "sensor_memcg_reclaim_duration_seconds") {
        let key = workload_key(m);
        if key.0.is_empty() {
            continue;
        }
        reclaim.entry(key).or_default().1 += m.get_histogram().get_sample_count() as f64;
    }
    let mut max_events: BTreeMap<(String, String, String), f64> = BTreeMap::new();
    let mut workloads = std::collections::BTreeSet::new();
    for m in series(families, "sensor_memcg_events_total") {
        workloads.insert(workload_key(m));
        if label(m, "event") == "max" {
            *max_events.entry(workload_key(m)).or_default() += value(m);
        }
    }
    workloads.extend(reclaim.keys().cloned());
    let row = |(cgroup, container_id, pod_uid): (String, String, String), value: f64, count: f64| WorkloadRow {
        cgroup,
        container_id,
        pod_uid,
        value,
        count,
    };
    Memory {
        running,
        psi,
        top_reclaim: top_n(
            reclaim
                .into_iter()
                .filter(|(_, (s, n))| *s > 0.0 || *n > 0.0)
                .map(|(k, (s, n))| row(k, s, n))
                .collect(),
            |r| r.value,
        ),
        top_max_events: top_n(
            max_events
                .into_iter()
                .filter(|(_, v)| *v > 0.0)
                .map(|(k, v)| row(k, v, 0.0))
                .collect(),
            |r| r.value,
        ),
        workloads: workloads.len(),
    }
}

fn tcp_totals(families: &[MetricFamily]) -> BTreeMap<String, f64> {
    let mut totals = BTreeMap::new();
    for m in series(families, "sensor_tcp_connects_total") {
        *totals.entry(label(m, "result").to_string()).or_default() += value(m);
    }
    totals
}

fn tcp(rings: &Rings, families: &[MetricFamily], totals: BTreeMap<String, f64>, running: bool) -> Tcp {
    let rate = rings
        .tcp
        .iter()
        .zip(rings.tcp.iter().skip(1))
        .filter(|(a, b)| b.at > a.at)
        .map(|(a, b)| {
            let dt = b.at - a.at;
            let by = b
                .totals
                .iter()
                .map(|(k, v)| {
                    let before = a.totals.get(k).copied().unwrap_or(0.0);
                    (k.clone(), ((v - before) / dt).max(0.0))
                })
                .collect();
            (b.at, by)
        })
        .collect();
    // The histogram summed over every series; cumulative counts become per-bucket counts.
    let mut cumulative: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for m in series(families, "sensor_tcp_connect_duration_seconds") {
        let h = m.get_histogram();
        for b in h.get_bucket() {
            let e = cumulative.entry(b.upper_bound().to_bits()).or_default();
            e.0 = b.upper_bound();
            e.1 += b.cumulative_count() as f64;
        }
        let inf = cumulative.entry(f64::INFINITY.to_bits()).or_default();
        inf.0 = f64::INFINITY;
        inf.1 += h.get_sample_count() as f64;
    }
    let mut bounds: Vec<(f64, f64)> = cumulative.into_values().collect();
    bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut prev = 0.0;
    let latency = bounds
        .into_iter()
        .map(|(le, c)| {
            let n = (c - prev).max(0.0);
            prev = c;
            (le.is_finite().then_some(le), n)
        })
        .collect();
    let mut dests: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let mut wl: BTreeMap<(String, String, String), (f64, f64)> = BTreeMap::new();
    for m in series(families, "sensor_tcp_connects_total") {
        let v = value(m);
        let failed = if label(m, "result") == "success" { 0.0 } else { v };
        let d = dests.entry(label(m, "destination").to_string()).or_default();
        d.0 += failed;
        d.1 += v;
        let w = wl.entry(workload_key(m)).or_default();
        w.0 += failed;
        w.1 += v;
    }
    Tcp {
        running,
        totals,
        rate,
        latency,
        top_destinations: top_n(
            dests
                .into_iter()
                .filter(|(_, (f, _))| *f > 0.0)
                .map(|(destination, (failures, connects))| DestRow {
                    destination,
                    failures,
                    connects,
                })
                .collect(),
            |r| r.failures,
        ),
        top_workloads: top_n(
            wl.into_iter()
                .filter(|(_, (f, _))| *f > 0.0)
                .map(
                    |((cgroup, container_id, pod_uid), (failures, connects))| TcpWorkloadRow {
                        cgroup,
                        container_id,
                        pod_uid,
                        failures,
                        connects,
                    },
                )
                .collect(),
            |r| r.failures,
        ),
        recent_failures: rings
            .tcp_failures
            .iter()
            .rev()
            .take(RECENT_ROWS)
            .map(|e| event_json(e))
            .collect(),
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
    fn summary_from_a_registry() {
        use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
        let reg = Registry::new();
        let connects = IntCounterVec::new(
            Opts::new("sensor_tcp_connects_total", "x"),
            &["result", "destination", "cgroup", "container_id", "pod_uid"],
        )
        .unwrap();
        connects.with_label_values(&["success", "db", "/a", "", ""]).inc_by(10);
        connects.with_label_values(&["refused", "db", "/a", "", ""]).inc_by(3);
        connects
            .with_label_values(&["refused", "other", "/b", "", ""])
            .inc_by(5);
        reg.register(Box::new(connects)).unwrap();
        let lat = HistogramVec::new(
            HistogramOpts::new("sensor_tcp_connect_duration_seconds", "x").buckets(vec![0.001, 0.01]),
            &["destination"],
        )
        .unwrap();
        for (d, v) in [("db", 0.0005), ("db", 0.005), ("other", 0.5)] {
            lat.with_label_values(&[d]).observe(v);
        }
        reg.register(Box::new(lat)).unwrap();
        let live = Live {
            started: std::time::Instant::now(),
            started_unix: 0.0,
            hostname: "h".into(),
            kernel: "k".into(),
            rings: Default::default(),
            cache: Default::default(),
        };
        let reports = vec![ProbeReport {
            probe: "tcp",
            state: ProbeState::Attached,
            groups: vec![],
        }];
        let s = build(&live, &reg.gather(), &reports, (true, vec![]), Counts::default(), 100.0);
        assert_eq!(s.tcp.totals.get("refused"), Some(&8.0));
        assert_eq!(s.tcp.top_destinations[0].destination, "other");
        assert_eq!(s.tcp.top_workloads[0].cgroup, "/b");
        assert_eq!(s.tcp.latency, vec![(Some(0.001), 1.0), (Some(0.01), 1.0), (None, 1.0)]);
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        // A second summary a second later gives a rate.
        let s2 = build(&live, &reg.gather(), &reports, (true, vec![]), Counts::default(), 102.0);
        assert_eq!(s2.tcp.rate.len(), 1);
        assert_eq!(s2.tcp.rate[0].1.get("success"), Some(&0.0));
    }
}
