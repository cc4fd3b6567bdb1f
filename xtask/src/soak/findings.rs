//! What the run measured (footprint samples, their least-squares slope) and the verdict.

use super::*;

/// One sample of the daemon's footprint.
#[derive(Clone, Copy, Debug)]
pub(super) struct Sample {
    pub(super) secs: f64,
    pub(super) rss_kib: u64,
    pub(super) fds: u64,
    pub(super) threads: u64,
}

pub(super) fn sample(pid: u32, secs: f64) -> Option<Sample> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    Some(Sample {
        secs,
        rss_kib: field("VmRSS:")?,
        threads: field("Threads:")?,
        fds: fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64,
    })
}

/// Least-squares slope of `y` over `x`; 0 for fewer than two distinct points.
pub(super) fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx
    }
}

/// What the run measured.
pub(super) struct Findings {
    pub(super) minutes: f64,
    pub(super) warmup_secs: f64,
    pub(super) kills_caused: u64,
    pub(super) kills_seen_by_load: u64,
    pub(super) kills_counted: u64,
    pub(super) kills_journaled: Option<u64>,
    pub(super) host_kills: u64,
    pub(super) made: Connects,
    pub(super) counted: Connects,
    pub(super) recursion_misses: u64,
    pub(super) untracked: u64,
    pub(super) cgroups_churned: u64,
    pub(super) scrapes: u64,
    pub(super) scrape_failures: u64,
    pub(super) flaps: u64,
    pub(super) samples: Vec<Sample>,
    pub(super) exit: Option<i32>,
}

impl Findings {
    pub(super) fn measured(&self) -> Vec<Sample> {
        self.samples
            .iter()
            .copied()
            .filter(|s| s.secs >= self.warmup_secs)
            .collect()
    }

    /// The RSS slope allowed: [`MAX_RSS_GROWTH_MIB_PER_MIN`], or [`RSS_NOISE_MIB`] over the
    /// measured window when that is larger (windows under two minutes).
    pub(super) fn rss_limit(&self) -> f64 {
        let m = self.measured();
        let minutes = match (m.first(), m.last()) {
            (Some(a), Some(b)) => (b.secs - a.secs) / 60.0,
            _ => 0.0,
        };
        if minutes <= 0.0 {
            return MAX_RSS_GROWTH_MIB_PER_MIN;
        }
        MAX_RSS_GROWTH_MIB_PER_MIN.max(RSS_NOISE_MIB / minutes)
    }

    /// Per-minute slopes of RSS (MiB), fds and threads after warm-up.
    pub(super) fn slopes(&self) -> (f64, f64, f64) {
        let m = self.measured();
        let fit = |f: fn(&Sample) -> f64| slope(&m.iter().map(|s| (s.secs / 60.0, f(s))).collect::<Vec<_>>());
        (
            fit(|s| s.rss_kib as f64 / 1024.0),
            fit(|s| s.fds as f64),
            fit(|s| s.threads as f64),
        )
    }

    /// Threads at the end of warm-up and the most seen afterwards.
    pub(super) fn threads(&self) -> (u64, u64) {
        let m = self.measured();
        let first = m.first().map_or(0, |s| s.threads);
        (first, m.iter().map(|s| s.threads).max().unwrap_or(0))
    }

    /// Every failed check, as a sentence.
    pub(super) fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        if self.kills_caused == 0 {
            f.push("no OOM kill was caused".into());
        }
        if self.kills_counted != self.kills_caused {
            f.push(format!(
                "kills caused {} != kills counted {}",
                self.kills_caused, self.kills_counted
            ));
        }
        match self.kills_journaled {
            Some(j) if j != self.kills_caused => f.push(format!(
                "kills caused {} != kills in the journal {j}",
                self.kills_caused
            )),
            Some(_) => {}
            None => f.push("the journal could not be read back".into()),
        }
        if self.made.ok == 0 || self.made.refused == 0 {
            f.push(format!("the load made no connects of some kind: {:?}", self.made));
        }
        if (self.made.ok, self.made.refused) != (self.counted.ok, self.counted.refused) {
            f.push(format!(
                "connects made {:?} != counted {:?} (recursion misses {}, untracked {})",
                self.made, self.counted, self.recursion_misses, self.untracked
            ));
        }
        if self.scrape_failures > 0 {
            f.push(format!("{} of {} scrapes failed", self.scrape_failures, self.scrapes));
        }
        let (rss, fds, _) = self.slopes();
        if rss > self.rss_limit() {
            f.push(format!(
                "RSS grows {rss:.3} MiB/min after warm-up (limit {:.3})",
                self.rss_limit()
            ));
        }
        if fds > MAX_FD_GROWTH_PER_MIN {
            f.push(format!("open fds grow {fds:.3}/min after warm-up"));
        }
        let (t0, tmax) = self.threads();
        // Tokio's blocking pool grows on demand and shrinks after 10 s idle: allow its
        // headroom, not a trend.
        if tmax > t0 + 8 {
            f.push(format!("threads grew from {t0} to {tmax} after warm-up"));
        }
        if self.exit != Some(0) {
            f.push(format!("the daemon exited with {:?} on SIGINT", self.exit));
        }
        f
    }

    pub(super) fn report(&self) -> String {
        let (rss, fds, thr) = self.slopes();
        let limit = self.rss_limit();
        let (t0, tmax) = self.threads();
        let m = self.measured();
        let range = |f: fn(&Sample) -> u64| {
            let v: Vec<u64> = m.iter().map(f).collect();
            (
                v.iter().min().copied().unwrap_or(0),
                v.iter().max().copied().unwrap_or(0),
            )
        };
        let (rmin, rmax) = range(|s| s.rss_kib);
        let (fmin, fmax) = range(|s| s.fds);
        let failures = self.failures();
        let verdict = if failures.is_empty() {
            "PASS".to_string()
        } else {
            format!("FAIL: {}", failures.join("; "))
        };
        let journal = self
            .kills_journaled
            .map_or_else(|| "not checked (journal not merged yet)".into(), |j| j.to_string());
        format!(
            "## Soak: {:.0} minutes\n\n\
             `cargo xtask soak --minutes {}` on kernel {}, {} CPUs. Warm-up: first {:.0} s (not in the \
             slopes).\n\n\
             | | value |\n|---|---|\n\
             | OOM kills caused (kernel counters of the soak's cgroups) | {} |\n\
             | victims that died of SIGKILL (load generator) | {} |\n\
             | OOM kills counted (`sensor_oom_kills_total`) | {} |\n\
             | OOM kills in the journal | {journal} |\n\
             | OOM kills host-wide during the run (`/proc/vmstat`) | {} |\n\
             | connects made: ok / refused / other | {} / {} / {} |\n\
             | connects counted: success / refused | {} / {} |\n\
             | TCP runs skipped by the kernel (`recursion`) / ends without a start (`untracked`) | {} / {} |\n\
             | cgroups created and removed (each with a process) | {} |\n\
             | `/metrics` scrapes (failed) | {} ({}) |\n\
             | check target status flips | {} |\n\
             | RSS after warm-up, min..max | {:.1}..{:.1} MiB |\n\
             | RSS slope (limit) | {rss:+.3} MiB/min ({limit:.3}) |\n\
             | open fds after warm-up, min..max | {fmin}..{fmax} |\n\
             | open fds slope | {fds:+.3}/min |\n\
             | threads: at end of warm-up, max after | {t0}, {tmax} (slope {thr:+.3}/min) |\n\
             | exit on SIGINT | {:?} |\n\n\
             Verdict: {verdict}\n",
            self.minutes,
            self.minutes,
            fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim(),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            self.warmup_secs,
            self.kills_caused,
            self.kills_seen_by_load,
            self.kills_counted,
            self.host_kills,
            self.made.ok,
            self.made.refused,
            self.made.other,
            self.counted.ok,
            self.counted.refused,
            self.recursion_misses,
            self.untracked,
            self.cgroups_churned,
            self.scrapes,
            self.scrape_failures,
            self.flaps,
            rmin as f64 / 1024.0,
            rmax as f64 / 1024.0,
            self.exit,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_squares_slope() {
        assert_eq!(slope(&[]), 0.0);
        assert_eq!(slope(&[(1.0, 5.0)]), 0.0);
        let s = slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0), (3.0, 7.0)]);
        assert!((s - 2.0).abs() < 1e-12, "{s}");
        let flat = slope(&[(0.0, 10.0), (1.0, 11.0), (2.0, 10.0), (3.0, 11.0), (4.0, 10.0)]);
        assert!(flat.abs() < 0.11, "{flat}");
    }
}
