//! Kills handled off the ring reader (on blocking threads, some waiting for their names): the
//! daemon waits for them at shutdown so none is lost before the journal closes.

use std::{
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use crate::sync::Lock as _;

#[derive(Debug, Default)]
pub struct Pending(Arc<(Mutex<usize>, Condvar)>);

/// One kill in hand; dropping it (handled, or its thread gone) releases it.
#[derive(Debug)]
pub struct Held(Arc<(Mutex<usize>, Condvar)>);

impl Pending {
    pub fn hold(&self) -> Held {
        *self.0 .0.locked() += 1;
        Held(Arc::clone(&self.0))
    }

    /// Waits until nothing is held, at most `limit`; false when some still is.
    pub fn wait(&self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        let (count, cv) = &*self.0;
        let mut n = count.locked();
        while *n > 0 {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            n = cv.wait_timeout(n, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let (count, cv) = &*self.0;
        let mut n = count.locked();
        *n = n.saturating_sub(1);
        cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_what_is_held() {
        let p = Pending::default();
        assert!(p.wait(Duration::ZERO));
        let h = p.hold();
        assert!(!p.wait(Duration::from_millis(20)));
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(h);
        });
        assert!(p.wait(Duration::from_secs(5)));
        t.join().unwrap();
    }
}
