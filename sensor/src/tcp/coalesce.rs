//! Coalescing of connect-failure events: one event per key (workload, destination group,
//! result) and interval instead of one per failure. A key's first failure is published at once
//! (a lone failure stays immediate); the key's further failures in the interval are summed and
//! published as one event at the interval's end. Keys with nothing new at an interval's end are
//! forgotten, so the next failure of that key is immediate again. At most `max_keys` keys are
//! held; failures of further keys are summed into one overflow event per interval.

use std::collections::HashMap;

/// What identifies a stream of failures: the workload (cgroup id), destination group and result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FailureKey {
    pub cgroup_id: u64,
    pub dest: u16,
    pub result: u16,
}

/// Failures summed since a key's last event.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending<S> {
    /// Failures summed (at least 1).
    pub count: u64,
    /// Kernel time of the first failure summed.
    pub first_ktime_ns: u64,
    /// The latest failure summed: its details stand for the event.
    pub last: S,
}

impl<S> Pending<S> {
    fn new(ktime_ns: u64, sample: S) -> Pending<S> {
        Pending {
            count: 1,
            first_ktime_ns: ktime_ns,
            last: sample,
        }
    }

    fn add(&mut self, sample: S) {
        self.count += 1;
        self.last = sample;
    }
}

/// What to do with a failure just admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// The key's first failure: publish it now (count 1).
    Publish,
    /// Summed into the key's next event.
    Interval,
    /// The key table is full: summed into the interval's overflow event.
    KeyLimit,
}

/// The events due at an interval's end.
#[derive(Debug, PartialEq)]
pub struct Flushed<S> {
    pub keyed: Vec<(FailureKey, Pending<S>)>,
    pub overflow: Option<Pending<S>>,
}

pub struct Coalescer<S> {
    /// Keys published in this or the last interval, with what was summed since.
    keys: HashMap<FailureKey, Option<Pending<S>>>,
    max_keys: usize,
    overflow: Option<Pending<S>>,
}

impl<S> Coalescer<S> {
    pub fn new(max_keys: usize) -> Coalescer<S> {
        Coalescer {
            keys: HashMap::new(),
            max_keys: max_keys.max(1),
            overflow: None,
        }
    }

    pub fn admit(&mut self, key: FailureKey, ktime_ns: u64, sample: S) -> Admit {
        if let Some(slot) = self.keys.get_mut(&key) {
            match slot {
                Some(p) => p.add(sample),
                None => *slot = Some(Pending::new(ktime_ns, sample)),
            }
            return Admit::Interval;
        }
        if self.keys.len() < self.max_keys {
            self.keys.insert(key, None);
            return Admit::Publish;
        }
        match &mut self.overflow {
            Some(p) => p.add(sample),
            None => self.overflow = Some(Pending::new(ktime_ns, sample)),
        }
        Admit::KeyLimit
    }

    /// Ends the interval: the sums to publish; keys without new failures are forgotten.
    pub fn flush(&mut self) -> Flushed<S> {
        let mut keyed = Vec::new();
        self.keys.retain(|k, slot| match slot.take() {
            Some(p) => {
                keyed.push((*k, p));
                true
            }
            None => false,
        });
        if self.keys.is_empty() && self.keys.capacity() > 64 {
            // A storm over many keys has ended: give its table back.
            self.keys.shrink_to(64);
        }
        Flushed {
            keyed,
            overflow: self.overflow.take(),
        }
    }

    /// Keys held now (at most `max_keys`).
    pub fn keys(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(cgroup_id: u64) -> FailureKey {
        FailureKey {
            cgroup_id,
            dest: 1,
            result: 2,
        }
    }

    #[test]
    fn a_storm_is_one_event_now_and_one_per_interval_with_exact_counts() {
        let mut c = Coalescer::new(16);
        assert_eq!(c.admit(key(1), 10, "a"), Admit::Publish);
        for i in 0..999u64 {
            assert_eq!(c.admit(key(1), 11 + i, "b"), Admit::Interval);
        }
        let f = c.flush();
        assert_eq!(f.overflow, None);
        assert_eq!(
            f.keyed,
            vec![(
                key(1),
                Pending {
                    count: 999,
                    first_ktime_ns: 11,
                    last: "b"
                }
            )]
        );
        // Still active: the next interval's failures are summed too, none published at once.
        assert_eq!(c.admit(key(1), 5000, "c"), Admit::Interval);
        assert_eq!(c.flush().keyed[0].1.count, 1);
        // A quiet interval forgets the key: its next failure is immediate again.
        assert_eq!(
            c.flush(),
            Flushed {
                keyed: vec![],
                overflow: None
            }
        );
        assert_eq!(c.keys(), 0);
        assert_eq!(c.admit(key(1), 9000, "d"), Admit::Publish);
    }

    #[test]
    fn keys_are_apart_and_bounded_and_the_rest_is_one_overflow_sum() {
        let mut c = Coalescer::new(2);
        assert_eq!(c.admit(key(1), 1, 1), Admit::Publish);
        assert_eq!(c.admit(key(2), 2, 2), Admit::Publish);
        assert_eq!(c.admit(FailureKey { result: 3, ..key(1) }, 3, 3), Admit::KeyLimit);
        assert_eq!(c.admit(key(4), 4, 4), Admit::KeyLimit);
        assert_eq!(c.admit(key(2), 5, 5), Admit::Interval);
        assert_eq!(c.keys(), 2);
        let f = c.flush();
        assert_eq!(
            f.keyed,
            vec![(
                key(2),
                Pending {
                    count: 1,
                    first_ktime_ns: 5,
                    last: 5
                }
            )]
        );
        assert_eq!(
            f.overflow,
            Some(Pending {
                count: 2,
                first_ktime_ns: 3,
                last: 4
            })
        );
        // Key 1 had nothing new: forgotten, so there is room for key 4 now.
        assert_eq!(c.keys(), 1);
        assert_eq!(c.admit(key(4), 6, 6), Admit::Publish);
    }

    /// Whatever the order, every failure is in exactly one event: published at once (1) or in
    /// a sum.
    #[test]
    fn every_failure_is_counted_once() {
        let mut c = Coalescer::new(5);
        let mut published = 0u64;
        let mut summed = 0u64;
        let mut x = 12345u64;
        for round in 0..50 {
            for _ in 0..200 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let k = key((x >> 33) % 9);
                if c.admit(k, round, ()) == Admit::Publish {
                    published += 1;
                }
            }
            let f = c.flush();
            summed += f.keyed.iter().map(|(_, p)| p.count).sum::<u64>();
            summed += f.overflow.map_or(0, |p| p.count);
        }
        assert_eq!(published + summed, 50 * 200);
    }
}
