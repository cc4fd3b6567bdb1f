//! The TCP probe's part of the web summary: connects by result (and their rates over the last
//! 10 minutes), connect latency, and the destinations and workloads with most failures, read
//! from the same kernel maps its metrics export.

use std::collections::{BTreeMap, VecDeque};

use serde_json::{json, Map, Value};

use super::running::TcpSlice;
use crate::{
    cgroup::WorkloadLabels,
    probe::{View, ViewSpec},
    sync::Lock as _,
};

pub(super) const VIEW: ViewSpec = ViewSpec {
    key: "tcp",
    recent: &[("recent_failures", "tcp_connect_failure")],
    timeline: None,
    holding: None,
    idle: || section(&Connects::new(), Vec::new(), Vec::new()),
};

/// Rows in each top-N list.
const TOP: usize = 10;
/// Totals kept for the rate chart: 10 minutes and a little more, one a second at most.
const RATE_WINDOW: f64 = 610.0;
const RATE_SAMPLES: usize = 1000;

/// Connect counts: `(result, destination, workload) -> count`.
pub(super) type Connects = BTreeMap<(&'static str, String, WorkloadLabels), u64>;

/// Connect totals by result at each summary, for the rates.
#[derive(Default)]
pub(super) struct Rates(std::sync::Mutex<VecDeque<(f64, BTreeMap<String, f64>)>>);

impl Rates {
    /// Keeps `totals` (at most once a second) and returns the connects per second by result
    /// between consecutive samples: `[unix time, {result: rate}]`.
    pub(super) fn add(&self, at: f64, totals: &BTreeMap<String, f64>) -> Vec<(f64, BTreeMap<String, f64>)> {
        let mut q = self.0.locked();
        if !q.back().is_some_and(|b| at - b.0 < 1.0) {
            while q.front().is_some_and(|f| f.0 < at - RATE_WINDOW) || q.len() >= RATE_SAMPLES {
                q.pop_front();
            }
            q.push_back((at, totals.clone()));
        }
        q.iter()
            .zip(q.iter().skip(1))
            .filter(|(a, b)| b.0 > a.0)
            .map(|(a, b)| {
                let dt = b.0 - a.0;
                let by =
                    b.1.iter()
                        .map(|(k, v)| (k.clone(), ((v - a.1.get(k).copied().unwrap_or(0.0)) / dt).max(0.0)))
                        .collect();
                (b.0, by)
            })
            .collect()
    }
}

fn top(mut rows: Vec<(f64, Value)>) -> Value {
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    rows.truncate(TOP);
    Value::Array(rows.into_iter().map(|(_, v)| v).collect())
}

/// The connect totals by result.
pub(super) fn totals(connects: &Connects) -> BTreeMap<String, f64> {
    let mut totals = BTreeMap::new();
    for ((r, _, _), n) in connects {
        *totals.entry((*r).to_string()).or_default() += *n as f64;
    }
    totals
}

/// The section from the connect counts, the latency buckets (`[upper bound, null for +Inf;
/// connects in the bucket]`) and the rates.
pub(super) fn section(
    connects: &Connects,
    latency: Vec<(Option<f64>, u64)>,
    rate: Vec<(f64, BTreeMap<String, f64>)>,
) -> View {
    let mut dests: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    let mut wls: BTreeMap<&WorkloadLabels, (f64, f64)> = BTreeMap::new();
    for ((r, dest, wl), n) in connects {
        let n = *n as f64;
        let failed = if *r == "success" { 0.0 } else { n };
        for e in [dests.entry(dest.as_str()).or_default(), wls.entry(wl).or_default()] {
            e.0 += failed;
            e.1 += n;
        }
    }
    let dests = dests
        .into_iter()
        .filter(|(_, (f, _))| *f > 0.0)
        .map(|(d, (f, n))| (f, json!({"destination": d, "failures": f, "connects": n})))
        .collect();
    let wls = wls
        .into_iter()
        .filter(|(_, (f, _))| *f > 0.0)
        .map(|(l, (f, n))| {
            let row = json!({"cgroup": l[0], "container_id": l[1], "pod_uid": l[2], "failures": f, "connects": n});
            (f, row)
        })
        .collect();
    let mut fields = Map::new();
    fields.insert("totals".into(), json!(totals(connects)));
    fields.insert("rate".into(), json!(rate));
    fields.insert("latency".into(), json!(latency));
    fields.insert("top_destinations".into(), top(dests));
    fields.insert("top_workloads".into(), top(wls));
    View {
        fields,
        ..View::default()
    }
}

impl TcpSlice {
    /// Its part of the web summary (see [`section`]).
    pub(super) fn summary(&self) -> View {
        let connects = self.counts.connects();
        let now = crate::kernel::clock::unix_seconds(std::time::SystemTime::now());
        let rate = self.rates.add(now, &totals(&connects));
        section(&connects, self.latency(), rate)
    }

    /// Connect latency summed over every flow (live and retired) at the exported bounds.
    fn latency(&self) -> Vec<(Option<f64>, u64)> {
        let snap = self.hists.snapshot();
        let retired = self.hists.retired();
        let live = snap.iter().map(|(_, [h, _])| h);
        let all = crate::agg::sum_percpu(live.chain(retired.iter().map(|(_, [h, _])| h)));
        let layout = self.hists.layout(0);
        let mut cumulative = Vec::new();
        crate::agg::cumulative(&all, layout, &mut cumulative);
        let total: u64 = all.buckets.iter().sum();
        let mut prev = 0;
        let mut out: Vec<(Option<f64>, u64)> = layout
            .bounds()
            .zip(cumulative)
            .map(|(le, c)| {
                let n = c.saturating_sub(prev);
                prev = c;
                (Some(le), n)
            })
            .collect();
        out.push((None, total.saturating_sub(prev)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wl(cg: &str) -> WorkloadLabels {
        std::array::from_fn(|i| if i == 0 { cg.to_string() } else { String::new() })
    }

    #[test]
    fn connects_rank_destinations_and_workloads_by_failures() {
        let mut c = Connects::new();
        c.insert(("success", "db".into(), wl("/a")), 10);
        c.insert(("refused", "db".into(), wl("/a")), 3);
        c.insert(("refused", "other".into(), wl("/b")), 5);
        let v = section(&c, vec![(Some(0.001), 1), (None, 2)], Vec::new());
        assert_eq!(v.fields["totals"]["refused"], 8.0);
        assert_eq!(v.fields["top_destinations"][0]["destination"], "other");
        assert_eq!(v.fields["top_destinations"][1]["connects"], 13.0);
        assert_eq!(v.fields["top_workloads"][0]["cgroup"], "/b");
        assert_eq!(v.fields["latency"], json!([[0.001, 1], [null, 2]]));
    }

    #[test]
    fn rates_between_summaries_at_most_once_a_second() {
        let r = Rates::default();
        let t = |n: f64| BTreeMap::from([("success".to_string(), n)]);
        assert!(r.add(100.0, &t(0.0)).is_empty());
        assert!(r.add(100.5, &t(5.0)).is_empty(), "kept at most once a second");
        let rate = r.add(102.0, &t(10.0));
        assert_eq!(rate, vec![(102.0, t(5.0))]);
        let rate = r.add(2000.0, &t(10.0));
        assert!(rate.is_empty(), "older samples dropped: {rate:?}");
    }
}
