//! Availability alerting: one check, one state (up or down), one message per transition.
//!
//! Pure logic over a [`History`], so every rule is unit-tested without a network.

use serde::Serialize;

use super::history::History;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    Firing,
    Resolved,
}

/// One alert or recovery, as kept in the history and sent to the webhook.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    pub check: String,
    pub state: AlertState,
    pub message: String,
    pub availability: f64,
    /// Unix seconds.
    pub time: f64,
    pub time_rfc3339: String,
}

#[derive(Debug, Clone)]
pub struct Evaluator {
    pub threshold: f64,
    pub window: f64,
    pub min_samples: usize,
    down: bool,
}

pub fn rfc3339(unix: f64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(unix.max(0.0));
    humantime::format_rfc3339_seconds(t).to_string()
}

impl Evaluator {
    pub fn new(threshold: f64, window: f64, min_samples: usize) -> Evaluator {
        Evaluator {
            threshold,
            window,
            min_samples,
            down: false,
        }
    }

    pub fn is_down(&self) -> bool {
        self.down
    }

    /// Looks at the window ending `now`; returns the alert when the state changes.
    pub fn evaluate(&mut self, check: &str, history: &History, now: f64) -> Option<Alert> {
        let st = history.stats(now, self.window);
        if (st.runs as usize) < self.min_samples {
            return None;
        }
        let availability = st.availability?;
        let time = rfc3339(now);
        let state = if availability <= self.threshold && !self.down {
            self.down = true;
            AlertState::Firing
        } else if availability > self.threshold && self.down {
            self.down = false;
            AlertState::Resolved
        } else {
            return None;
        };
        let message = match state {
            AlertState::Firing => format!("Website {check} is down. availability={availability:.2}, time={time}"),
            AlertState::Resolved => format!("Website {check} is up again. availability={availability:.2}, time={time}"),
        };
        Some(Alert {
            check: check.to_string(),
            state,
            message,
            availability,
            time: now,
            time_rfc3339: time,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::history::Sample;

    fn history(results: &[bool], start: f64) -> History {
        let mut h = History::new(3600.0, 1000);
        for (i, ok) in results.iter().enumerate() {
            h.push(Sample {
                at: start + i as f64 * 10.0,
                success: *ok,
                total: 0.1,
                ttfb: None,
                code: None,
                split: [0.0; 5],
            });
        }
        h
    }

    fn eval() -> Evaluator {
        Evaluator::new(0.8, 120.0, 3)
    }

    #[test]
    fn no_records_no_alert() {
        let mut e = eval();
        assert_eq!(e.evaluate("shop", &History::new(3600.0, 10), 1000.0), None);
        assert!(!e.is_down());
    }

    #[test]
    fn too_few_records_in_the_window_no_decision() {
        let mut e = eval();
        // Two failures in the window, plenty of older failures outside it.
        let mut h = history(&[false; 10], 0.0);
        h.push(Sample {
            at: 500.0,
            success: false,
            total: 0.1,
            ttfb: None,
            code: None,
            split: [0.0; 5],
        });
        h.push(Sample {
            at: 510.0,
            success: false,
            total: 0.1,
            ttfb: None,
            code: None,
            split: [0.0; 5],
        });
        assert_eq!(e.evaluate("shop", &h, 515.0), None);
        assert!(!e.is_down());
    }

    #[test]
    fn above_threshold_while_up_stays_quiet() {
        let mut e = eval();
        // 9 of 10 = 0.9 > 0.8
        let h = history(&[true, true, true, false, true, true, true, true, true, true], 0.0);
        assert_eq!(e.evaluate("shop", &h, 95.0), None);
        assert!(!e.is_down());
    }

    #[test]
    fn at_or_below_threshold_while_up_fires_once() {
        let mut e = eval();
        // 8 of 10 = 0.8: "at" the threshold counts as down.
        let h = history(&[true, true, false, true, true, true, false, true, true, true], 0.0);
        let a = e.evaluate("shop", &h, 95.0).expect("alert");
        assert_eq!(a.state, AlertState::Firing);
        assert_eq!(a.availability, 0.8);
        assert_eq!(
            a.message,
            format!("Website shop is down. availability=0.80, time={}", rfc3339(95.0))
        );
        assert!(e.is_down());
        // Below while already down: no duplicate.
        let h = history(&[false; 10], 0.0);
        assert_eq!(e.evaluate("shop", &h, 95.0), None);
        assert!(e.is_down());
    }

    #[test]
    fn above_threshold_while_down_recovers() {
        let mut e = eval();
        assert!(e.evaluate("shop", &history(&[false; 5], 0.0), 45.0).is_some());
        let h = history(&[true; 12], 100.0);
        let a = e.evaluate("shop", &h, 215.0).expect("recovery");
        assert_eq!(a.state, AlertState::Resolved);
        assert!(
            a.message
                .starts_with("Website shop is up again. availability=1.00, time="),
            "{}",
            a.message
        );
        assert!(!e.is_down());
        assert_eq!(e.evaluate("shop", &h, 215.0), None, "no second recovery");
    }
}
