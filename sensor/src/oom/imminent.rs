//! `oom_imminent`: a warning before the kill. After each history sample, a watched workload
//! whose memory grows steadily (the growth run and least-squares rate the kill verdict uses:
//! [`growth_run`], [`slope`]) is projected onto the limit that binds it (its own or an
//! ancestor's, whichever has the least room; the host's memory when none has one). A warning
//! starts when the projection reaches the limit within `probes.oom.imminent_horizon`, and only
//! for a steady fit: at least [`MIN_SAMPLES`] samples over [`FIT_MIN_SECS`], a good straight
//! line (R² >= [`MIN_R2`]), a new high (a sawtooth returning to its former peaks is not a leak),
//! a run that lasted at least [`MIN_SEEN_SHARE`] of the time it projects, and anonymous memory
//! (anon + shmem) growing at least half as fast as usage on a second look one sample later (page
//! cache filling up to the limit is reclaimed, not OOM-killed). It holds while the projection
//! stays within [`CLEAR_FACTOR`] times the horizon and clears when the growth stops.

use std::collections::HashMap;

use serde::Serialize;

use super::{
    history::{host_memory, Sample},
    verdict::{growth_run, slope},
};
use crate::cgroup::Hierarchies;
use crate::sync::Lock as _;

pub const MIN_SAMPLES: usize = 5;
/// The shortest run a warning is fitted over: the verdict calls a faster ramp growth after the
/// kill, but a warning before it needs a trend long enough not to be a batch's first rise.
pub const FIT_MIN_SECS: f64 = 10.0;
pub const MIN_R2: f64 = 0.9;
/// The run must have lasted at least this share of the time it projects to the limit.
pub const MIN_SEEN_SHARE: f64 = 0.5;
/// A warning holds until the projection is this many horizons away.
pub const CLEAR_FACTOR: f64 = 2.0;
/// Anonymous memory must grow at least this share of the usage rate.
pub const MIN_ANON_SHARE: f64 = 0.5;

/// A steady fit over the trailing growth run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fit {
    /// Bytes per second.
    pub rate: f64,
    pub samples: usize,
    pub seconds: f64,
    pub r2: f64,
    /// The newest sample's usage.
    pub usage: u64,
}

/// Dips up to this much do not end a growth run (as in the kill's lead-up).
pub fn tolerance(limit: u64) -> u64 {
    (limit / 50).max(1 << 20)
}

/// Cheap pre-filter on the newest samples: non-decreasing (within `tol`) and risen by more
/// than `tol`.
pub fn rising(tail: &[Sample], tol: u64) -> bool {
    match (tail.first(), tail.last()) {
        (Some(a), Some(b)) if tail.len() >= MIN_SAMPLES => {
            tail.windows(2).all(|w| w[1].usage.saturating_add(tol) >= w[0].usage)
                && b.usage > a.usage.saturating_add(tol)
        }
        _ => false,
    }
}

/// The steady fit of the trailing growth run of `samples` (oldest first), if there is one.
pub fn steady_fit(samples: &[Sample], tol: u64) -> Option<Fit> {
    let run = growth_run(samples, tol);
    let (first, last) = (run.first()?, run.last()?);
    let seconds = last.at - first.at;
    if run.len() < MIN_SAMPLES || seconds < FIT_MIN_SECS {
        return None;
    }
    let rate = slope(run).filter(|r| *r > 0.0)?;
    let r2 = r_squared(run, rate)?;
    if r2 < MIN_R2 {
        return None;
    }
    let before = &samples[..samples.len() - run.len()];
    if before
        .iter()
        .map(|s| s.usage)
        .max()
        .is_some_and(|peak| last.usage <= peak.saturating_add(tol))
    {
        return None;
    }
    Some(Fit {
        rate,
        samples: run.len(),
        seconds,
        r2,
        usage: last.usage,
    })
}

/// Coefficient of determination of the least-squares line with slope `rate`.
fn r_squared(run: &[Sample], rate: f64) -> Option<f64> {
    let n = run.len() as f64;
    let mt = run.iter().map(|s| s.at).sum::<f64>() / n;
    let mu = run.iter().map(|s| s.usage as f64).sum::<f64>() / n;
    let (mut tot, mut res) = (0.0, 0.0);
    for s in run {
        let u = s.usage as f64;
        let fitted = mu + rate * (s.at - mt);
        tot += (u - mu) * (u - mu);
        res += (u - fitted) * (u - fitted);
    }
    (tot > 0.0).then(|| 1.0 - res / tot)
}

pub use super::limit::LimitScope;

/// The limit that binds a workload, with the usage counted against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub cgroup: String,
    pub scope: LimitScope,
    pub usage: u64,
    pub limit: u64,
}

impl Binding {
    pub fn room(&self) -> u64 {
        self.limit.saturating_sub(self.usage)
    }
}

/// The level with the least room among `levels` (`(cgroup, limit, usage)`, the workload's own
/// first), else the host's memory.
pub fn binding_of(levels: &[(String, Option<u64>, Option<u64>)], host: Option<(u64, u64)>) -> Option<Binding> {
    let limited = levels.iter().enumerate().filter_map(|(i, (cg, l, u))| {
        Some(Binding {
            cgroup: cg.clone(),
            scope: if i == 0 { LimitScope::Own } else { LimitScope::Ancestor },
            usage: (*u)?,
            limit: (*l)?,
        })
    });
    limited.min_by_key(Binding::room).or_else(|| {
        host.map(|(total, avail)| Binding {
            cgroup: "/".into(),
            scope: LimitScope::Host,
            usage: total.saturating_sub(avail),
            limit: total,
        })
    })
}

/// [`binding_of`] read from cgroupfs: `cgroup` and each ancestor below the root.
pub fn binding(h: &Hierarchies, cgroup: &str) -> Option<Binding> {
    let mut levels = Vec::new();
    let mut cg = cgroup.trim_end_matches('/').to_string();
    while !cg.is_empty() {
        let (l, u) = h.memory_limit_usage(&cg);
        levels.push((cg.clone(), l, u));
        cg = match cg.rfind('/') {
            Some(i) => cg[..i].to_string(),
            None => String::new(),
        };
    }
    binding_of(&levels, host_memory())
}

/// Whether a warning starts (`holding` false) or holds, given the projected seconds.
pub fn warns(fit: &Fit, projected: f64, horizon: f64, holding: bool) -> bool {
    if holding {
        projected <= horizon * CLEAR_FACTOR
    } else {
        projected <= horizon && fit.seconds >= MIN_SEEN_SHARE * projected
    }
}

/// Anonymous and shmem bytes of a memory cgroup (`memory.stat`, hierarchical on v1).
pub fn anon_bytes(h: &Hierarchies, cgroup: &str) -> Option<u64> {
    let text = std::fs::read_to_string(h.memory_dir(cgroup)?.join("memory.stat")).ok()?;
    let keys: &[&str] = if h.memory_is_v1() {
        &["total_rss", "total_shmem"]
    } else {
        &["anon", "shmem"]
    };
    let mut sum = None;
    for line in text.lines() {
        let mut f = line.split_whitespace();
        if let (Some(k), Some(v)) = (f.next(), f.next()) {
            if keys.contains(&k) {
                *sum.get_or_insert(0) += v.parse::<u64>().ok()?;
            }
        }
    }
    sum
}

/// Whether anonymous memory grew at least [`MIN_ANON_SHARE`] of the usage rate between two
/// looks `(time, anon bytes)`.
pub fn anon_driven(first: (f64, u64), now: (f64, u64), rate: f64) -> bool {
    let dt = now.0 - first.0;
    dt > 0.0 && (now.1 as f64 - first.1 as f64) / dt >= MIN_ANON_SHARE * rate
}

/// One `oom_imminent` event (and its log line).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OomImminent {
    pub time: f64,
    pub cgroup: String,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    #[serde(flatten)]
    pub names: crate::workloads::Names,
    /// The cgroup whose limit the growth would reach, and whose it is.
    pub limit_cgroup: String,
    pub limit_scope: LimitScope,
    /// Usage counted against that limit, and the limit.
    pub usage_bytes: u64,
    pub limit_bytes: u64,
    /// The workload's own usage.
    pub workload_usage_bytes: u64,
    pub growth_bytes_per_minute: f64,
    pub projected_seconds: f64,
    pub fit_samples: usize,
    pub fit_seconds: f64,
    pub fit_r2: f64,
    pub horizon_seconds: f64,
}

/// Per-workload warning state: candidates seen once (their first anonymous-memory look) and
/// warnings holding.
#[derive(Debug, Default)]
pub struct Warnings {
    pub candidates: HashMap<String, (f64, u64)>,
    pub holding: HashMap<String, crate::cgroup::WorkloadLabels>,
}

impl super::OomSlice {
    /// After a history sample: starts, holds and clears warnings, and sets
    /// `sensor_oom_imminent` to match (file reads only for rising workloads; on the upkeep's
    /// blocking thread).
    pub(super) fn assess_imminent(&self) {
        let horizon = self.imminent_horizon.as_secs_f64();
        if horizon <= 0.0 {
            return;
        }
        let rising_now: Vec<(String, Vec<Sample>)> = {
            let h = self.history.locked();
            h.watched()
                .filter_map(|cg| {
                    let tail = h.last(cg, MIN_SAMPLES);
                    let tol = tolerance(tail.last()?.limit);
                    rising(&tail, tol).then(|| (cg.to_string(), h.before(cg, f64::INFINITY)))
                })
                .collect()
        };
        let now = crate::kernel::clock::unix_seconds(std::time::SystemTime::now());
        let mut w = self.warnings.locked();
        let mut still = std::collections::HashSet::new();
        for (cg, samples) in rising_now {
            let tol = tolerance(samples.last().map_or(0, |s| s.limit));
            let holding = w.holding.contains_key(&cg);
            let Some(fit) = steady_fit(&samples, tol) else {
                // Still rising, the fit bent (reclaim near the limit): a warning holds.
                if holding {
                    still.insert(cg);
                }
                continue;
            };
            if !holding && !w.candidates.contains_key(&cg) {
                // The first look at its anonymous memory; the warning can start at the next.
                if let Some(anon) = anon_bytes(&self.cgroups, &cg) {
                    w.candidates.insert(cg.clone(), (now, anon));
                    still.insert(cg);
                }
                continue;
            }
            let Some(b) = binding(&self.cgroups, &cg) else { continue };
            let projected = b.room() as f64 / fit.rate;
            if !warns(&fit, projected, horizon, holding) {
                still.insert(cg);
                continue;
            }
            if !holding {
                let first = w.candidates.get(&cg).copied();
                let anon = anon_bytes(&self.cgroups, &cg);
                match (first, anon) {
                    (Some(f), Some(a)) if anon_driven(f, (now, a), fit.rate) => {}
                    _ => {
                        still.insert(cg);
                        continue;
                    }
                }
                let labels = self.disc.labels(&cg);
                self.warn(&cg, &labels, &fit, &b, projected, now, horizon);
                w.holding.insert(cg.clone(), labels);
            }
            still.insert(cg);
        }
        w.candidates.retain(|c, _| still.contains(c));
        let cleared: Vec<String> = w.holding.keys().filter(|c| !still.contains(*c)).cloned().collect();
        for cg in cleared {
            w.holding.remove(&cg);
            tracing::info!(target: "sensor::oom", event = "oom_imminent_cleared", cgroup = %cg, "OOM no longer imminent");
        }
        self.set_imminent_gauge(&w);
    }

    /// Publishes and logs a warning that starts.
    #[allow(clippy::too_many_arguments)]
    fn warn(
        &self,
        cg: &str,
        labels: &crate::cgroup::WorkloadLabels,
        fit: &Fit,
        b: &Binding,
        projected: f64,
        now: f64,
        horizon: f64,
    ) {
        let w = crate::cgroup::workload(cg);
        let nonempty = |s: String| (!s.is_empty()).then_some(s);
        let ev = OomImminent {
            time: now,
            cgroup: cg.to_string(),
            container_id: nonempty(w.container_id),
            pod_uid: nonempty(w.pod_uid),
            names: (*self.disc.names(&labels[1])).clone(),
            limit_cgroup: b.cgroup.clone(),
            limit_scope: b.scope,
            usage_bytes: b.usage,
            limit_bytes: b.limit,
            workload_usage_bytes: fit.usage,
            growth_bytes_per_minute: fit.rate * 60.0,
            projected_seconds: projected,
            fit_samples: fit.samples,
            fit_seconds: fit.seconds,
            fit_r2: fit.r2,
            horizon_seconds: horizon,
        };
        tracing::warn!(
            target: "sensor::oom",
            event = "oom_imminent",
            cgroup = %ev.cgroup,
            namespace = %ev.names.namespace,
            pod = %ev.names.pod,
            container = %ev.names.container,
            limit_cgroup = %ev.limit_cgroup,
            limit_scope = ev.limit_scope.label(),
            usage_bytes = ev.usage_bytes,
            limit_bytes = ev.limit_bytes,
            growth_bytes_per_minute = format_args!("{:.0}", ev.growth_bytes_per_minute),
            projected_seconds = format_args!("{:.1}", ev.projected_seconds),
            "OOM imminent"
        );
        self.hub.publish_as("oom_imminent", &ev);
    }

    /// `sensor_oom_imminent` is 1 for each workload label set holding a warning (left-out
    /// workloads share `cgroup="other"`); series that no longer hold are removed.
    fn set_imminent_gauge(&self, w: &Warnings) {
        use prometheus::core::Collector as _;
        let want: std::collections::HashSet<&crate::cgroup::WorkloadLabels> = w.holding.values().collect();
        for l in &want {
            let refs: Vec<&str> = l.iter().map(String::as_str).collect();
            self.imminent_gauge.with_label_values(&refs).set(1.0);
        }
        for mf in self.imminent_gauge.collect() {
            for m in mf.get_metric() {
                let vals: Vec<String> = crate::cgroup::WORKLOAD_LABELS
                    .iter()
                    .map(|n| {
                        m.get_label()
                            .iter()
                            .find(|l| l.name() == *n)
                            .map_or(String::new(), |l| l.value().to_string())
                    })
                    .collect();
                let l = crate::cgroup::workload_labels_from(&vals);
                if !want.contains(&l) {
                    let refs: Vec<&str> = l.iter().map(String::as_str).collect();
                    let _ = self.imminent_gauge.remove_label_values(&refs);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn series(f: impl Fn(f64) -> f64, secs: u32, every: f64) -> Vec<Sample> {
        (0..=(f64::from(secs) / every) as u32)
            .map(|i| {
                let t = f64::from(i) * every;
                Sample {
                    at: t,
                    usage: f(t) as u64,
                    limit: 256 * MIB,
                    ..Sample::default()
                }
            })
            .collect()
    }

    #[test]
    fn a_steady_leak_fits_with_its_rate() {
        // Idle at 20 MiB for 20 s, then 2 MiB/s.
        let v = series(
            |t| if t < 20.0 { 20.0 } else { 20.0 + 2.0 * (t - 20.0) } * MIB as f64,
            40,
            2.0,
        );
        let f = steady_fit(&v, tolerance(256 * MIB)).expect("fit");
        assert!((f.rate - 2.0 * MIB as f64).abs() < 0.01 * MIB as f64, "{f:?}");
        assert!(f.r2 > 0.999, "{f:?}");
        assert_eq!(f.usage, 60 * MIB);
        assert!(rising(&v[v.len() - MIN_SAMPLES..], tolerance(256 * MIB)));
        // Too short a run: 4 samples, or under 10 s.
        let v = series(|t| (20.0 + 2.0 * t) * MIB as f64, 6, 2.0);
        assert_eq!(steady_fit(&v, MIB), None);
        let v = series(|t| (20.0 + 2.0 * t) * MIB as f64, 8, 1.0);
        assert_eq!(steady_fit(&v, MIB), None, "9 samples over 8 s");
    }

    #[test]
    fn a_sawtooth_back_at_its_old_peak_and_a_flat_line_do_not_fit() {
        // A garbage collector's heap: 40 -> 100 MiB over 30 s, then back to 40, and again.
        let saw = |t: f64| (40.0 + 2.0 * (t % 30.0)) * MIB as f64;
        let v = series(saw, 88, 2.0);
        assert_eq!(steady_fit(&v, tolerance(256 * MIB)), None, "not a new high");
        // Its first cycle alone cannot be told from a leak.
        assert!(steady_fit(&series(saw, 28, 2.0), tolerance(256 * MIB)).is_some());
        let flat = series(|_| 200.0 * MIB as f64, 60, 2.0);
        assert_eq!(steady_fit(&flat, tolerance(256 * MIB)), None);
        // Steps (a batch allocating in bursts) fit badly.
        let steps = series(|t| if t < 20.0 { 10.0 } else { 100.0 } * MIB as f64, 40, 2.0);
        assert_eq!(steady_fit(&steps, MIB), None);
    }

    #[test]
    fn the_binding_limit_is_the_one_with_least_room() {
        let lv = |cg: &str, l: Option<u64>, u: u64| (cg.to_string(), l, Some(u));
        let own = lv("/pod/c", Some(512 * MIB), 100 * MIB);
        let pod = lv("/pod", Some(300 * MIB), 250 * MIB);
        let b = binding_of(&[own.clone(), pod], None).unwrap();
        assert_eq!(
            (b.cgroup.as_str(), b.scope, b.room()),
            ("/pod", LimitScope::Ancestor, 50 * MIB)
        );
        let b = binding_of(&[own, lv("/pod", None, 250 * MIB)], None).unwrap();
        assert_eq!((b.cgroup.as_str(), b.scope), ("/pod/c", LimitScope::Own));
        let b = binding_of(&[lv("/a", None, MIB)], Some((8 << 30, 6 << 30))).unwrap();
        assert_eq!((b.scope, b.usage, b.limit), (LimitScope::Host, 2 << 30, 8 << 30));
        assert_eq!(binding_of(&[], None), None);
        for s in [LimitScope::Own, LimitScope::Ancestor, LimitScope::Host] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.label(), "event and log agree");
        }
    }

    #[test]
    fn warning_starts_within_the_horizon_after_a_long_enough_run_and_holds_with_slack() {
        let f = Fit {
            rate: MIB as f64,
            samples: 6,
            seconds: 10.0,
            r2: 1.0,
            usage: 0,
        };
        assert!(warns(&f, 20.0, 60.0, false));
        assert!(!warns(&f, 20.1, 60.0, false), "seen for less than half the projection");
        assert!(
            !warns(&Fit { seconds: 100.0, ..f }, 61.0, 60.0, false),
            "beyond the horizon"
        );
        assert!(warns(&f, 120.0, 60.0, true), "holds up to twice the horizon");
        assert!(!warns(&f, 121.0, 60.0, true));
        // Page cache filling: usage grows 1 MiB/s, anonymous memory does not.
        assert!(!anon_driven((0.0, 5 * MIB), (2.0, 5 * MIB), MIB as f64));
        assert!(anon_driven((0.0, 5 * MIB), (2.0, 7 * MIB), MIB as f64));
    }
}
