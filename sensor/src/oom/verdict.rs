//! A kill's lead-up (what its workload's memory did before it) and the one-line verdict, as pure
//! functions of the history, so every rule is unit-tested. The rules, in the order they are
//! tried (the README's "Why was it killed?" explains them to users):
//!
//! 1. `host`: the kill's scope is global (the host ran out, not the cgroup's limit).
//! 2. `repeat`: the workload was killed at least [`REPEAT_EARLIER`] times before in the last hour.
//! 3. `spike`: the last sample before the kill, at most [`SPIKE_MAX_GAP_INTERVALS`] intervals
//!    old, was at least [`SPIKE_MIN_RISE`] of the limit below it.
//! 4. `limit`: usage was within [`NEAR_LIMIT`] of the limit for at least [`LIMIT_MIN_SAMPLES`]
//!    sampling intervals (60 s at the default 2 s) and the limit was hit (or memory stalled).
//! 5. `growth`: usage rose steadily (a non-decreasing run of at least [`GROWTH_MIN_SAMPLES`]
//!    samples over [`GROWTH_MIN_SECS`]) by at least [`GROWTH_MIN_RISE`] of the limit; the rate is
//!    the least-squares slope over that run.
//! 6. `unknown`: none of these, or no history.

use serde::Serialize;

use super::{
    history::{MemUser, Sample},
    Scope,
};

/// Earlier kills in the last hour that make a kill a `repeat` (this one is then the third).
pub const REPEAT_EARLIER: usize = 2;
/// A spike's rise, as a fraction of the limit.
pub const SPIKE_MIN_RISE: f64 = 0.5;
/// How old (in sampling intervals) the last sample may be for a spike to be measured.
pub const SPIKE_MAX_GAP_INTERVALS: f64 = 3.0;
/// "At the limit" means usage within this fraction of it.
pub const NEAR_LIMIT: f64 = 0.05;
/// How long (in sampling intervals) a workload must have been at its limit for `limit`.
pub const LIMIT_MIN_SAMPLES: f64 = 30.0;
pub const GROWTH_MIN_SAMPLES: usize = 4;
pub const GROWTH_MIN_SECS: f64 = 10.0;
/// A growth's rise over its run, as a fraction of the limit.
pub const GROWTH_MIN_RISE: f64 = 0.25;

/// The verdict's class: the bounded `reason` label of `sensor_oom_kills_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    Growth,
    Spike,
    Limit,
    Host,
    Repeat,
    Unknown,
}

impl Reason {
    pub const ALL: [Reason; 6] = [
        Reason::Growth,
        Reason::Spike,
        Reason::Limit,
        Reason::Host,
        Reason::Repeat,
        Reason::Unknown,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::Growth => "growth",
            Reason::Spike => "spike",
            Reason::Limit => "limit",
            Reason::Host => "host",
            Reason::Repeat => "repeat",
            Reason::Unknown => "unknown",
        }
    }
}

/// What the kill path knows: the history before the kill and a fresh read right after it.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    pub time: f64,
    pub scope: Scope,
    /// The sampling interval (seconds), to judge how fresh the last sample is.
    pub interval: f64,
    /// Samples before the kill, oldest first.
    pub samples: &'a [Sample],
    /// The cgroup's counters read right after the kill (usage is then already freed).
    pub after: Option<Sample>,
    pub limit: Option<u64>,
    pub victim_rss: Option<u64>,
    pub earlier_kills: &'a [f64],
    pub host_available: Option<u64>,
    /// The host's largest memory users, as last sampled (global kills only).
    pub host_top: &'a [MemUser],
}

/// The lead-up attached to a kill event. Absent values are `null`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LeadUp {
    pub reason: Reason,
    pub verdict: String,
    pub samples: usize,
    /// The limit for a memcg kill (the charge failed there), else the last sample's usage.
    pub usage_at_kill_bytes: Option<u64>,
    pub limit_bytes: Option<u64>,
    /// Least-squares slope over the growth run before the kill, and the run's length.
    pub growth_bytes_per_minute: Option<f64>,
    pub growth_seconds: Option<f64>,
    pub growth_samples: usize,
    /// How long usage had been within 5% of the limit before the kill.
    pub near_limit_seconds: Option<f64>,
    pub limit_hits_1m: Option<u64>,
    pub limit_hits_10m: Option<u64>,
    /// Share of time some / all tasks of the cgroup stalled on memory in the last minute (PSI).
    pub psi_some_ratio_1m: Option<f64>,
    pub psi_full_ratio_1m: Option<f64>,
    /// Time the cgroup's tasks spent in reclaim in the last 1 and 10 minutes (summed over
    /// tasks; the memcg probe's kernel histograms, where it runs).
    pub reclaim_seconds_1m: Option<f64>,
    pub reclaim_seconds_10m: Option<f64>,
    /// Rise from the last sample to the kill, and the time it took.
    pub last_rise_bytes: Option<u64>,
    pub last_rise_seconds: Option<f64>,
    pub earlier_kills_1h: usize,
    /// Victim RSS / usage at the kill.
    pub victim_share: Option<f64>,
    pub host_available_bytes: Option<u64>,
    pub host_top_users: Vec<MemUser>,
}

/// `12 MiB`, `1.5 GiB`, `800 KiB`.
pub fn bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.0} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}

/// `45 s`, `9 min`.
pub fn span(secs: f64) -> String {
    if secs >= 120.0 {
        format!("{:.0} min", secs / 60.0)
    } else {
        format!("{secs:.0} s")
    }
}

/// Least-squares slope (bytes per second) of usage over time.
pub fn slope(samples: &[Sample]) -> Option<f64> {
    if samples.len() < 2 {
        return None;
    }
    let n = samples.len() as f64;
    let mt = samples.iter().map(|s| s.at).sum::<f64>() / n;
    let mu = samples.iter().map(|s| s.usage as f64).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for s in samples {
        num += (s.at - mt) * (s.usage as f64 - mu);
        den += (s.at - mt) * (s.at - mt);
    }
    (den > 0.0).then(|| num / den)
}

/// The trailing run of samples over which usage grew: non-decreasing (dips up to `tol`), without
/// the flat stretch before the growth started (the first sample of the run is the first one
/// clearly above it, so a start-up jump does not bend the fit).
pub fn growth_run(samples: &[Sample], tol: u64) -> &[Sample] {
    let Some(last) = samples.len().checked_sub(1) else {
        return samples;
    };
    let mut start = last;
    while start > 0 && samples[start - 1].usage <= samples[start].usage.saturating_add(tol) {
        start -= 1;
    }
    let base = samples[start].usage;
    while start < last && samples[start + 1].usage <= base.saturating_add(tol) {
        start += 1;
    }
    if start < last && samples[start].usage <= base.saturating_add(tol) {
        start += 1;
    }
    &samples[start..]
}

/// The newest sample at least `secs` older than `t` (else the oldest): the base of a delta.
fn base_before(samples: &[Sample], t: f64, secs: f64) -> Option<&Sample> {
    samples.iter().rev().find(|s| s.at <= t - secs).or(samples.first())
}

fn counter_delta(now: Option<u64>, base: Option<u64>) -> Option<u64> {
    Some(now?.saturating_sub(base?))
}

/// Computes the lead-up and the verdict.
pub fn lead_up(i: &Input<'_>) -> LeadUp {
    let last = i.samples.last();
    let limit = i.limit.or(last.map(|s| s.limit).filter(|l| *l > 0));
    let usage_at_kill = match (i.scope, limit) {
        (Scope::Memcg, Some(l)) => Some(l),
        _ => last.map(|s| s.usage),
    };
    // Counters right after the kill, else the last sample's.
    let newest = i.after.or(last.copied());
    let delta = |secs: f64, f: fn(&Sample) -> Option<u64>| {
        let now = newest.as_ref()?;
        // The base is the newest sample old enough that has the counter (a counter can start
        // being measured after the first samples, e.g. reclaim time once the memcg probe has
        // published it), else the oldest that has it.
        let measured: Vec<Sample> = i.samples.iter().filter(|s| f(s).is_some()).copied().collect();
        let base = base_before(&measured, now.at, secs)?;
        counter_delta(f(now), f(base))
    };
    let ratio = |f: fn(&Sample) -> Option<u64>| {
        let now = newest.as_ref()?;
        let base = base_before(i.samples, now.at, 60.0)?;
        let dt = now.at - base.at;
        let d = counter_delta(f(now), f(base))?;
        (dt > 0.0).then(|| (d as f64 / 1e6 / dt).min(1.0))
    };
    let tol = limit.map_or(1 << 20, |l| (l / 50).max(1 << 20));
    let run = growth_run(i.samples, tol);
    let growth_secs = match (run.first(), run.last()) {
        (Some(a), Some(b)) if run.len() >= 2 => Some(b.at - a.at),
        _ => None,
    };
    let growth = slope(run).map(|s| s * 60.0);
    let near_limit = limit.map(|l| {
        let floor = l as f64 * (1.0 - NEAR_LIMIT);
        let since = i
            .samples
            .iter()
            .rev()
            .take_while(|s| s.usage as f64 >= floor)
            .last()
            .map(|s| s.at);
        since.map_or(0.0, |t| (i.time - t).max(0.0))
    });
    let (rise, rise_secs) = match (last, usage_at_kill) {
        (Some(s), Some(u)) => (Some(u.saturating_sub(s.usage)), Some((i.time - s.at).max(0.0))),
        _ => (None, None),
    };
    let mut l = LeadUp {
        reason: Reason::Unknown,
        verdict: String::new(),
        samples: i.samples.len(),
        usage_at_kill_bytes: usage_at_kill,
        limit_bytes: limit,
        growth_bytes_per_minute: growth,
        growth_seconds: growth_secs,
        growth_samples: run.len(),
        near_limit_seconds: near_limit,
        limit_hits_1m: delta(60.0, |s| s.limit_hits),
        limit_hits_10m: delta(600.0, |s| s.limit_hits),
        psi_some_ratio_1m: ratio(|s| s.psi_some_us),
        psi_full_ratio_1m: ratio(|s| s.psi_full_us),
        reclaim_seconds_1m: delta(60.0, |s| s.reclaim_ns).map(|ns| ns as f64 / 1e9),
        reclaim_seconds_10m: delta(600.0, |s| s.reclaim_ns).map(|ns| ns as f64 / 1e9),
        last_rise_bytes: rise,
        last_rise_seconds: rise_secs,
        earlier_kills_1h: i.earlier_kills.len(),
        victim_share: match (i.victim_rss, usage_at_kill) {
            (Some(r), Some(u)) if u > 0 => Some((r as f64 / u as f64).min(1.0)),
            _ => None,
        },
        host_available_bytes: if i.scope == Scope::Global {
            i.host_available
        } else {
            None
        },
        host_top_users: if i.scope == Scope::Global {
            i.host_top.to_vec()
        } else {
            Vec::new()
        },
    };
    let (reason, verdict) = decide(&l, i.scope, i.interval);
    l.reason = reason;
    l.verdict = verdict;
    l
}

/// The rules (see the module doc), first match wins.
pub fn decide(l: &LeadUp, scope: Scope, interval: f64) -> (Reason, String) {
    let limit_text = l
        .limit_bytes
        .map_or_else(|| "its".to_string(), |b| format!("the {}", bytes(b)));
    if scope == Scope::Global {
        let avail = l
            .host_available_bytes
            .map_or_else(String::new, |a| format!(": the node had {} available", bytes(a)));
        let top: Vec<String> = l
            .host_top_users
            .iter()
            .map(|u| format!("{} {} (pid {})", u.comm, bytes(u.rss_bytes), u.pid))
            .collect();
        let top = if top.is_empty() {
            String::new()
        } else {
            format!("; largest: {}", top.join(", "))
        };
        return (Reason::Host, format!("host out of memory{avail}{top}"));
    }
    if l.earlier_kills_1h >= REPEAT_EARLIER {
        return (
            Reason::Repeat,
            format!("killed {} times in the last hour (crash loop)", l.earlier_kills_1h + 1),
        );
    }
    if let (Some(limit), Some(rise), Some(secs)) = (l.limit_bytes, l.last_rise_bytes, l.last_rise_seconds) {
        if secs <= SPIKE_MAX_GAP_INTERVALS * interval && rise as f64 >= SPIKE_MIN_RISE * limit as f64 {
            return (
                Reason::Spike,
                format!(
                    "sudden spike: {} in {} to {limit_text} limit",
                    bytes(rise),
                    span(secs.max(1.0))
                ),
            );
        }
    }
    let hits = l.limit_hits_10m.unwrap_or(0);
    let stalls = l.psi_full_ratio_1m.or(l.psi_some_ratio_1m);
    let reclaim = l.reclaim_seconds_1m.filter(|r| *r > 0.0);
    if let Some(near) = l.near_limit_seconds {
        if near >= LIMIT_MIN_SAMPLES * interval && (hits > 0 || stalls.is_some_and(|s| s > 0.0) || reclaim.is_some()) {
            // PSI exists per cgroup on v2 only: no stall figure rather than a false 0%; where it
            // is missing, the reclaim time the memcg probe measured says the same.
            let stalls = match (stalls, reclaim) {
                (Some(s), _) => format!(" and memory stalls {:.0}% of the time", s * 100.0),
                (None, Some(r)) => format!(" and {r:.1} s in reclaim in the last minute"),
                (None, None) => String::new(),
            };
            return (
                Reason::Limit,
                format!(
                    "at {limit_text} limit for {} with {hits} limit hits{stalls} (limit too small)",
                    span(near)
                ),
            );
        }
    }
    if let (Some(rate), Some(secs), Some(limit)) = (l.growth_bytes_per_minute, l.growth_seconds, l.limit_bytes) {
        let rise = rate / 60.0 * secs;
        if l.growth_samples >= GROWTH_MIN_SAMPLES && secs >= GROWTH_MIN_SECS && rise >= GROWTH_MIN_RISE * limit as f64 {
            return (
                Reason::Growth,
                format!(
                    "steady growth of {}/min for {} until {limit_text} limit (leak-like)",
                    bytes(rate.max(0.0) as u64),
                    span(secs)
                ),
            );
        }
    }
    let text = match (l.samples, l.usage_at_kill_bytes) {
        (0, _) => "no memory history for this workload".to_string(),
        (_, Some(u)) => format!("no clear lead-up: {} of {limit_text} limit", bytes(u)),
        (_, None) => "no clear lead-up".to_string(),
    };
    (Reason::Unknown, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const LIMIT: u64 = 64 * MIB;

    fn s(at: f64, usage: u64) -> Sample {
        Sample {
            at,
            usage,
            limit: LIMIT,
            ..Sample::default()
        }
    }

    fn input<'a>(samples: &'a [Sample], time: f64, earlier: &'a [f64]) -> Input<'a> {
        Input {
            time,
            scope: Scope::Memcg,
            interval: 2.0,
            samples,
            after: None,
            limit: Some(LIMIT),
            victim_rss: Some(LIMIT / 2),
            earlier_kills: earlier,
            host_available: Some(100 * MIB),
            host_top: &[],
        }
    }

    /// Idle at `base` until `t0`, then growing `rate` bytes/s, sampled every 2 s until `end`.
    fn growing(base: u64, t0: f64, rate: f64, end: f64) -> Vec<Sample> {
        let mut v = Vec::new();
        let mut t = 0.0;
        while t <= end {
            let u = if t < t0 {
                base
            } else {
                base + 10 * MIB + ((t - t0) * rate) as u64
            };
            v.push(s(t, u.min(LIMIT)));
            t += 2.0;
        }
        v
    }

    #[test]
    fn growth_rate_is_the_fit_over_the_run_only() {
        // Idle, a 10 MiB start-up jump, then 1 MiB/s: the jump and the idle part are left out.
        let v = growing(MIB, 20.0, MIB as f64, 60.0);
        let l = lead_up(&input(&v, 61.0, &[]));
        assert_eq!(l.reason, Reason::Growth, "{l:?}");
        let rate = l.growth_bytes_per_minute.unwrap();
        assert!((rate - 60.0 * MIB as f64).abs() < 0.01 * 60.0 * MIB as f64, "{rate}");
        assert_eq!(l.growth_seconds, Some(40.0));
        assert!(
            l.verdict
                .starts_with("steady growth of 60 MiB/min for 40 s until the 64 MiB limit"),
            "{}",
            l.verdict
        );
        assert_eq!(l.victim_share, Some(0.5));
        assert_eq!(l.usage_at_kill_bytes, Some(LIMIT));
    }

    /// Growth at `rate` from `t0`, ending 1 MiB below the limit at `end` (so never a spike).
    fn growing_to_limit(t0: f64, rate: f64, end: f64) -> Vec<Sample> {
        let base = LIMIT - MIB - 10 * MIB - ((end - t0) * rate) as u64;
        growing(base, t0, rate, end)
    }

    #[test]
    fn growth_boundaries() {
        // Too short a run: 3 samples over 4 s.
        let v = growing_to_limit(52.0, 2.0 * MIB as f64, 56.0);
        let l = lead_up(&input(&v, 57.0, &[]));
        assert_eq!((l.growth_samples, l.growth_seconds), (3, Some(4.0)));
        assert_eq!(l.reason, Reason::Unknown, "{l:?}");
        // Long enough but rising less than a quarter of the limit.
        let v = growing_to_limit(10.0, 0.2 * MIB as f64, 60.0);
        let l = lead_up(&input(&v, 61.0, &[]));
        assert!(l.growth_seconds.unwrap() >= GROWTH_MIN_SECS);
        assert_eq!(l.reason, Reason::Unknown, "{l:?}");
        // The same at 0.4 MiB/s (20 MiB over 50 s >= 16 MiB).
        let v = growing_to_limit(10.0, 0.4 * MIB as f64, 60.0);
        let l = lead_up(&input(&v, 61.0, &[]));
        assert_eq!(l.reason, Reason::Growth, "{l:?}");
    }

    #[test]
    fn spike_and_its_boundaries() {
        let v: Vec<Sample> = (0..10).map(|i| s(f64::from(i) * 2.0, 2 * MIB)).collect();
        let l = lead_up(&input(&v, 19.0, &[]));
        assert_eq!(l.reason, Reason::Spike);
        assert_eq!(l.verdict, "sudden spike: 62 MiB in 1 s to the 64 MiB limit");
        // Last sample too old (more than 3 intervals): no longer measurable as a spike.
        assert_eq!(lead_up(&input(&v, 18.0 + 6.1, &[])).reason, Reason::Unknown);
        assert_eq!(lead_up(&input(&v, 18.0 + 6.0, &[])).reason, Reason::Spike);
        // A rise of just under half the limit is not a spike.
        let v: Vec<Sample> = (0..10).map(|i| s(f64::from(i) * 2.0, LIMIT / 2 + 1)).collect();
        assert_eq!(lead_up(&input(&v, 19.0, &[])).reason, Reason::Unknown);
        let v: Vec<Sample> = (0..10).map(|i| s(f64::from(i) * 2.0, LIMIT / 2)).collect();
        assert_eq!(lead_up(&input(&v, 19.0, &[])).reason, Reason::Spike);
    }

    fn at_limit(secs: u32, hits_per_sample: u64) -> Vec<Sample> {
        (0..=secs / 2)
            .map(|i| Sample {
                limit_hits: Some(u64::from(i) * hits_per_sample),
                ..s(f64::from(i) * 2.0, LIMIT - MIB)
            })
            .collect()
    }

    #[test]
    fn limit_and_its_boundaries() {
        let v = at_limit(120, 3);
        let l = lead_up(&input(&v, 121.0, &[]));
        assert_eq!(l.reason, Reason::Limit, "{l:?}");
        assert_eq!(l.near_limit_seconds, Some(121.0));
        assert_eq!(l.limit_hits_1m, Some(90));
        assert_eq!(
            l.verdict,
            "at the 64 MiB limit for 2 min with 180 limit hits (limit too small)"
        );
        // Stalls alone are evidence too.
        let stalled: Vec<Sample> = at_limit(120, 0)
            .into_iter()
            .map(|x| Sample {
                psi_full_us: Some((x.at * 250_000.0) as u64),
                ..x
            })
            .collect();
        let l = lead_up(&input(&stalled, 121.0, &[]));
        assert_eq!(
            l.verdict,
            "at the 64 MiB limit for 2 min with 0 limit hits and memory stalls 25% of the time (limit too small)"
        );
        // At the limit but never hitting it, and no stalls: not this rule.
        assert_eq!(lead_up(&input(&at_limit(120, 0), 121.0, &[])).reason, Reason::Unknown);
        // Just under the minimum time at the limit.
        assert_eq!(lead_up(&input(&at_limit(58, 3), 59.9, &[])).reason, Reason::Unknown);
        assert_eq!(lead_up(&input(&at_limit(58, 3), 60.0, &[])).reason, Reason::Limit);
        // 5% below the limit still counts as at it; below that does not.
        let far: Vec<Sample> = at_limit(120, 3)
            .into_iter()
            .map(|x| Sample {
                usage: LIMIT - LIMIT / 20 - 1,
                ..x
            })
            .collect();
        assert_eq!(lead_up(&input(&far, 121.0, &[])).near_limit_seconds, Some(0.0));
    }

    #[test]
    fn repeat_host_and_unknown() {
        let v: Vec<Sample> = (0..10).map(|i| s(f64::from(i) * 2.0, 2 * MIB)).collect();
        assert_eq!(
            lead_up(&input(&v, 19.0, &[1.0])).reason,
            Reason::Spike,
            "one earlier kill"
        );
        let l = lead_up(&input(&v, 19.0, &[1.0, 5.0]));
        assert_eq!(l.reason, Reason::Repeat);
        assert_eq!(l.verdict, "killed 3 times in the last hour (crash loop)");
        let mut i = input(&v, 19.0, &[1.0, 5.0]);
        i.scope = Scope::Global;
        let l = lead_up(&i);
        assert_eq!(l.reason, Reason::Host, "host wins over everything");
        assert_eq!(l.verdict, "host out of memory: the node had 100 MiB available");
        let top = [
            MemUser {
                pid: 7,
                comm: "java".into(),
                rss_bytes: 3 << 30,
            },
            MemUser {
                pid: 9,
                comm: "redis".into(),
                rss_bytes: 200 * MIB,
            },
        ];
        i.host_top = &top;
        assert_eq!(
            lead_up(&i).verdict,
            "host out of memory: the node had 100 MiB available; largest: java 3.0 GiB (pid 7), redis 200 MiB (pid 9)"
        );
        let l = lead_up(&input(&[], 19.0, &[]));
        assert_eq!(
            (l.reason, l.verdict.as_str()),
            (Reason::Unknown, "no memory history for this workload")
        );
    }

    #[test]
    fn counters_use_the_read_after_the_kill() {
        let v: Vec<Sample> = (0..=60)
            .map(|i| Sample {
                psi_full_us: Some(0),
                psi_some_us: Some(0),
                limit_hits: Some(0),
                ..s(f64::from(i) * 2.0, MIB)
            })
            .collect();
        let mut i = input(&v, 120.5, &[]);
        i.after = Some(Sample {
            psi_some_us: Some(30_500_000),
            psi_full_us: Some(6_100_000),
            limit_hits: Some(7),
            ..s(121.0, 0)
        });
        let l = lead_up(&i);
        assert_eq!((l.limit_hits_1m, l.limit_hits_10m), (Some(7), Some(7)));
        assert_eq!(l.psi_some_ratio_1m, Some(0.5));
        assert!((l.psi_full_ratio_1m.unwrap() - 0.1).abs() < 1e-9);
    }

    #[test]
    fn formats() {
        assert_eq!(bytes(512 * MIB), "512 MiB");
        assert_eq!(bytes(3 << 29), "1.5 GiB");
        assert_eq!(bytes(800 << 10), "800 KiB");
        assert_eq!((span(45.0), span(540.0)), ("45 s".to_string(), "9 min".to_string()));
    }

    #[test]
    fn reclaim_time_is_limit_evidence_where_psi_is_missing() {
        // cgroup v1: no PSI, no limit hits counted, but the memcg probe saw 0.1 s of reclaim
        // per 2 s sample.
        let mut at_limit: Vec<Sample> = at_limit(120, 0)
            .into_iter()
            .enumerate()
            .map(|(i, s)| Sample {
                reclaim_ns: Some(i as u64 * 100_000_000),
                ..s
            })
            .collect();
        let l = lead_up(&input(&at_limit, 121.0, &[]));
        assert_eq!(l.reclaim_seconds_1m, Some(3.0));
        assert_eq!(
            l.reclaim_seconds_10m,
            Some(6.0),
            "the window holds 2 minutes of samples"
        );
        assert_eq!(l.reason, Reason::Limit, "{}", l.verdict);
        assert_eq!(
            l.verdict,
            "at the 64 MiB limit for 2 min with 0 limit hits and 3.0 s in reclaim in the last minute (limit too small)"
        );
        // Without reclaim (and without hits or PSI) the same history is not this rule.
        for s in &mut at_limit {
            s.reclaim_ns = Some(0);
        }
        assert_ne!(lead_up(&input(&at_limit, 121.0, &[])).reason, Reason::Limit);
        // Samples taken before reclaim was first published do not hide it.
        for (i, s) in at_limit.iter_mut().enumerate() {
            s.reclaim_ns = (i >= 5).then_some(i as u64 * 100_000_000);
        }
        let l = lead_up(&input(&at_limit, 121.0, &[]));
        assert_eq!(l.reclaim_seconds_1m, Some(3.0));
        assert_eq!(l.reclaim_seconds_10m, Some(5.5), "from the first sample that has it");
    }
}
