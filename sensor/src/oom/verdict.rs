//! A kill's lead-up (what its workload's memory did before it) and the one-line verdict, as pure
//! functions of the history, so every rule is unit-tested.
//!
//! The ramp is what usage did before the kill: its rising samples after the flat stretch
//! before it, then the kill; its rise is from its first rising sample (from the flat base with
//! only one) to the usage at the kill. A ramp of less than [`RAMP_MIN_RISE`] of the limit is a
//! flat history. The rules, in the order they are tried (the README's "Why was it killed?"
//! explains them to users):
//!
//! 1. `host`: the kill's scope is global (the host ran out, not the cgroup's limit).
//! 2. `repeat`: the workload was killed at least [`REPEAT_EARLIER`] times before in the last hour.
//! 3. `spike`: the ramp rose at least [`RAMP_MIN_RISE`] of the limit and at least
//!    [`SPIKE_MIN_SHARE`] of that came after the last sample, at most
//!    [`SPIKE_MAX_GAP_INTERVALS`] intervals before the kill: a ramp within one sample gap.
//! 4. `limit`: usage was within [`NEAR_LIMIT`] of the limit for at least [`LIMIT_MIN_SAMPLES`]
//!    sampling intervals (60 s at the default 2 s) and the limit was hit (or memory stalled).
//! 5. `growth`: the ramp rose at least [`RAMP_MIN_RISE`] of the limit, less than
//!    [`SPIKE_MIN_SHARE`] of it after the last sample, at a positive rate, however short: the
//!    rate is the least-squares slope over its rising samples (from the base to the kill with
//!    one).
//! 6. `unknown`: no history, a flat one, or a last sample too old to tell a spike.

use serde::Serialize;

use super::{
    history::{MemUser, Sample},
    limit::{Binding, LimitScope},
    Scope,
};

/// Earlier kills in the last hour that make a kill a `repeat` (this one is then the third).
pub const REPEAT_EARLIER: usize = 2;
/// The share of the ramp's rise after the last sample that makes it a spike.
pub const SPIKE_MIN_SHARE: f64 = 0.5;
/// How old (in sampling intervals) the last sample may be for a spike to be measured.
pub const SPIKE_MAX_GAP_INTERVALS: f64 = 3.0;
/// "At the limit" means usage within this fraction of it.
pub const NEAR_LIMIT: f64 = 0.05;
/// How long (in sampling intervals) a workload must have been at its limit for `limit`.
pub const LIMIT_MIN_SAMPLES: f64 = 30.0;
/// The rise of the ramp before a kill, as a fraction of the limit, that makes it a shape (growth,
/// or a spike when it came within one sample gap); below it the history is flat.
pub const RAMP_MIN_RISE: f64 = 0.25;

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
    /// The limit the kill hit, where found (`limit` is then its size).
    pub binding: Option<&'a Binding>,
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
    /// Rising samples of the ramp before the kill (0: flat until the last sample).
    pub growth_samples: usize,
    /// Rise over the ramp to the kill: from its first rising sample, or from its base (the end
    /// of the flat stretch before it) when it has only one.
    pub ramp_rise_bytes: Option<u64>,
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

/// The base of the ramp before the kill: the last sample of the flat stretch at the start of the
/// trailing non-decreasing run (dips up to `tol`). The samples after it are the ramp's rising
/// ones; none when usage was flat until the last sample.
pub fn ramp_base(samples: &[Sample], tol: u64) -> Option<usize> {
    let last = samples.len().checked_sub(1)?;
    let mut start = last;
    while start > 0 && samples[start - 1].usage <= samples[start].usage.saturating_add(tol) {
        start -= 1;
    }
    let floor = samples[start].usage;
    while start < last && samples[start + 1].usage <= floor.saturating_add(tol) {
        start += 1;
    }
    Some(start)
}

/// The trailing run of samples over which usage grew: non-decreasing (dips up to `tol`), without
/// the flat stretch before the growth started (the first sample of the run is the first one
/// clearly above it, so a start-up jump does not bend the fit); the last sample when flat.
pub fn growth_run(samples: &[Sample], tol: u64) -> &[Sample] {
    match ramp_base(samples, tol) {
        Some(b) if b + 1 < samples.len() => &samples[b + 1..],
        Some(b) => &samples[b..],
        None => samples,
    }
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
    // The charge failed at the limit when it is the cgroup's own; under an ancestor's, the
    // cgroup held at least its last sample and the victim.
    let own = i
        .binding
        .map_or(i.scope == Scope::Memcg, |b| b.scope == LimitScope::Own);
    let ancestor = i.binding.is_some_and(|b| b.scope == LimitScope::Ancestor);
    let usage_at_kill = match (own, limit) {
        (true, Some(l)) => Some(l),
        _ if ancestor => last
            .map(|s| s.usage)
            .max(i.victim_rss)
            .map(|u| limit.map_or(u, |l| u.min(l))),
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
    let b = ramp_base(i.samples, tol);
    let base = b.map(|b| &i.samples[b]);
    let rising = b.map_or(&i.samples[..0], |b| &i.samples[b + 1..]);
    // From the first rising sample (a start-up step onto a plateau is no growth), or from the
    // base when there is only one.
    let ramp_from = if rising.len() >= 2 { rising.first() } else { base };
    let ramp_rise = match (ramp_from, usage_at_kill) {
        (Some(b), Some(u)) => Some(u.saturating_sub(b.usage)),
        _ => None,
    };
    // Over its rising samples; with one, from the base to the kill.
    let (growth, growth_secs) = match (rising, base, ramp_rise) {
        ([a, .., b], _, _) => (slope(rising).map(|s| s * 60.0), Some(b.at - a.at)),
        ([_], Some(b), Some(r)) if i.time > b.at => (Some(r as f64 / (i.time - b.at) * 60.0), Some(i.time - b.at)),
        _ => (None, None),
    };
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
        growth_samples: rising.len(),
        ramp_rise_bytes: ramp_rise,
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
    let (reason, verdict) = decide(&l, i.scope, i.interval, i.binding);
    l.reason = reason;
    l.verdict = verdict;
    l
}

/// The rules (see the module doc), first match wins.
pub fn decide(l: &LeadUp, scope: Scope, interval: f64, binding: Option<&Binding>) -> (Reason, String) {
    // `the 64 MiB limit`, or whose it was: `its own 64 MiB limit`, `the pod's 512 MiB limit, the
    // container has none`.
    let limit_text = match binding {
        Some(b) if b.scope != LimitScope::Host => b.phrase(),
        _ => l
            .limit_bytes
            .map_or_else(|| "its limit".to_string(), |b| format!("the {} limit", bytes(b))),
    };
    if scope == Scope::Global || binding.is_some_and(|b| b.scope == LimitScope::Host) {
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
    // The ramp's rise when it is a shape, and whether most of it came after the last sample.
    let ramp = match (l.limit_bytes, l.ramp_rise_bytes) {
        (Some(limit), Some(r)) if r as f64 >= RAMP_MIN_RISE * limit as f64 => Some(r),
        _ => None,
    };
    let sudden = |r: u64| {
        l.last_rise_bytes
            .is_some_and(|j| j as f64 >= SPIKE_MIN_SHARE * r as f64)
    };
    if let (Some(r), Some(rise), Some(secs)) = (ramp, l.last_rise_bytes, l.last_rise_seconds) {
        if secs <= SPIKE_MAX_GAP_INTERVALS * interval && sudden(r) {
            return (
                Reason::Spike,
                format!(
                    "sudden spike: {} in {} to {limit_text}",
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
                    "at {limit_text} for {} with {hits} limit hits{stalls} (limit too small)",
                    span(near)
                ),
            );
        }
    }
    if let (Some(rate), Some(secs), Some(r)) = (l.growth_bytes_per_minute, l.growth_seconds, ramp) {
        if l.growth_samples >= 1 && rate > 0.0 && !sudden(r) {
            return (
                Reason::Growth,
                format!(
                    "steady growth of {}/min for {} until {limit_text} (leak-like)",
                    bytes(rate.max(0.0) as u64),
                    span(secs)
                ),
            );
        }
    }
    let text = match (l.samples, l.usage_at_kill_bytes) {
        // Whose limit it was is known without a history.
        (0, _) => match binding {
            Some(b) if b.scope != LimitScope::Host => {
                format!("no memory history for this workload: killed at {limit_text}")
            }
            _ => "no memory history for this workload".to_string(),
        },
        (_, Some(u)) => format!("no clear lead-up: {} of {limit_text}", bytes(u)),
        (_, None) => "no clear lead-up".to_string(),
    };
    (Reason::Unknown, text)
}

#[cfg(test)]
#[path = "verdict_tests.rs"]
mod tests;
