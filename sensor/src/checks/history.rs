//! Recent results of one check and the window statistics computed from them.
//!
//! A stateless prober (blackbox_exporter) only knows the last run; keeping a bounded ring of
//! results lets the daemon answer "availability over the last 10 minutes" itself, and the alert
//! evaluator decide on the same data.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

/// What the window statistics need of one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Unix time of the run's start, seconds.
    pub at: f64,
    pub success: bool,
    pub total: f64,
    pub ttfb: Option<f64>,
    pub code: Option<u16>,
    /// Seconds per phase for the web view's stacked chart: dns, connect, tls, ttfb (websocket:
    /// handshake), transfer (websocket: first message); 0 for a phase that did not happen.
    pub split: PhaseSplit,
}

/// See [`Sample::split`]; `f32` keeps 1,000 checks x an hour of runs small.
pub type PhaseSplit = [f32; 5];

#[derive(Debug)]
pub struct History {
    samples: VecDeque<Sample>,
    /// Samples older than this (seconds) are dropped.
    keep: f64,
    cap: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WindowStats {
    pub window_seconds: f64,
    pub runs: u64,
    pub successes: u64,
    /// None without runs in the window.
    pub availability: Option<f64>,
    pub avg_response_seconds: Option<f64>,
    pub max_response_seconds: Option<f64>,
    pub avg_ttfb_seconds: Option<f64>,
    pub max_ttfb_seconds: Option<f64>,
    /// Response codes seen ("200", "500"; websocket checks have none).
    pub codes: BTreeMap<String, u64>,
}

impl History {
    /// Keeps `keep_seconds` of history, at most `cap` samples.
    pub fn new(keep_seconds: f64, cap: usize) -> History {
        History {
            samples: VecDeque::new(),
            keep: keep_seconds,
            cap: cap.max(1),
        }
    }

    pub fn push(&mut self, s: Sample) {
        if self.samples.len() == self.cap {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
        let oldest = s.at - self.keep;
        while self.samples.front().is_some_and(|f| f.at < oldest) {
            self.samples.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Samples with `at` in `(now - window, now]`.
    pub fn in_window(&self, now: f64, window: f64) -> impl Iterator<Item = &Sample> {
        let from = now - window;
        self.samples.iter().filter(move |s| s.at > from && s.at <= now)
    }

    pub fn stats(&self, now: f64, window: f64) -> WindowStats {
        let mut st = WindowStats {
            window_seconds: window,
            ..Default::default()
        };
        let (mut sum, mut max) = (0.0, f64::MIN);
        let (mut tsum, mut tmax, mut tn) = (0.0, f64::MIN, 0u64);
        for s in self.in_window(now, window) {
            st.runs += 1;
            st.successes += u64::from(s.success);
            sum += s.total;
            max = max.max(s.total);
            if let Some(t) = s.ttfb {
                tsum += t;
                tmax = tmax.max(t);
                tn += 1;
            }
            if let Some(c) = s.code {
                *st.codes.entry(c.to_string()).or_default() += 1;
            }
        }
        if st.runs > 0 {
            st.availability = Some(st.successes as f64 / st.runs as f64);
            st.avg_response_seconds = Some(sum / st.runs as f64);
            st.max_response_seconds = Some(max);
        }
        if tn > 0 {
            st.avg_ttfb_seconds = Some(tsum / tn as f64);
            st.max_ttfb_seconds = Some(tmax);
        }
        st
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(at: f64, success: bool, total: f64, code: u16) -> Sample {
        Sample {
            at,
            success,
            total,
            ttfb: Some(total / 2.0),
            code: Some(code),
            split: [0.0; 5],
        }
    }

    #[test]
    fn window_stats_cover_only_the_window() {
        let mut h = History::new(3600.0, 10_000);
        h.push(s(100.0, true, 0.1, 200));
        h.push(s(700.0, false, 0.5, 500));
        h.push(s(710.0, true, 0.3, 200));
        // 10-minute window at t=720 sees the last two; the first is 620 s old... it is in.
        let w = h.stats(720.0, 600.0);
        assert_eq!((w.runs, w.successes), (2, 1));
        assert_eq!(w.availability, Some(0.5));
        assert_eq!(w.max_response_seconds, Some(0.5));
        assert!((w.avg_response_seconds.unwrap() - 0.4).abs() < 1e-9);
        assert_eq!(w.max_ttfb_seconds, Some(0.25));
        assert_eq!(w.codes.get("500"), Some(&1));
        let all = h.stats(720.0, 3600.0);
        assert_eq!(all.runs, 3);
        assert_eq!(all.codes.get("200"), Some(&2));
        let none = h.stats(5000.0, 600.0);
        assert_eq!((none.runs, none.availability), (0, None));
    }

    #[test]
    fn ring_is_bounded_by_age_and_count() {
        let mut h = History::new(60.0, 5);
        for i in 0..10 {
            h.push(s(i as f64, true, 0.1, 200));
        }
        assert_eq!(h.len(), 5);
        h.push(s(100.0, true, 0.1, 200));
        assert_eq!(h.len(), 1, "samples older than 60 s go");
    }
}
