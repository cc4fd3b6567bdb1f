//! Readiness of the daemon's long-running parts and the count of their failures.
//!
//! `/readyz` answers 200 only while the daemon has started and every registered part (each
//! CPU's ring reader, ...) runs; a part that fails is counted in
//! `sensor_internal_errors_total{task}`, reported down until it runs again, and restarted by
//! its owner.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
};

use prometheus::IntCounterVec;

use crate::sync::Lock as _;

pub struct Health {
    started: AtomicBool,
    /// Part name -> running.
    parts: Mutex<BTreeMap<String, bool>>,
    internal_errors: IntCounterVec,
}

impl Health {
    pub fn new(internal_errors: IntCounterVec) -> Health {
        Health {
            started: AtomicBool::new(false),
            parts: Mutex::new(BTreeMap::new()),
            internal_errors,
        }
    }

    /// Startup finished (true) or shutdown began (false).
    pub fn set_started(&self, started: bool) {
        self.started.store(started, Ordering::Release);
    }

    /// Registers `part` or updates whether it runs.
    pub fn set_running(&self, part: &str, running: bool) {
        // A panic while holding this lock cannot leave the map half-written (one insert).
        let mut parts = self.parts.locked();
        parts.insert(part.to_string(), running);
    }

    /// Counts a failure of a task of kind `task` (a bounded name: `ring_reader`, ...).
    pub fn failed(&self, task: &str) {
        self.internal_errors.with_label_values(&[task]).inc();
    }

    /// Ready, and the parts that are down.
    pub fn status(&self) -> (bool, Vec<String>) {
        let parts = self.parts.locked();
        let down: Vec<String> = parts.iter().filter(|(_, up)| !**up).map(|(n, _)| n.clone()).collect();
        (self.started.load(Ordering::Acquire) && down.is_empty(), down)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> Health {
        let c = IntCounterVec::new(prometheus::Opts::new("t_internal_errors_total", "t"), &["task"]).unwrap();
        Health::new(c)
    }

    #[test]
    fn ready_only_when_started_and_every_part_runs() {
        let h = health();
        assert_eq!(h.status(), (false, vec![]), "not started yet");
        h.set_running("reader cpu 0", true);
        h.set_running("reader cpu 1", true);
        h.set_started(true);
        assert_eq!(h.status(), (true, vec![]));
        h.set_running("reader cpu 1", false);
        h.failed("ring_reader");
        assert_eq!(h.status(), (false, vec!["reader cpu 1".to_string()]));
        assert_eq!(h.internal_errors.with_label_values(&["ring_reader"]).get(), 1);
        h.set_running("reader cpu 1", true);
        assert_eq!(h.status(), (true, vec![]));
        h.set_started(false);
        assert!(!h.status().0, "shutting down");
    }
}
