//! The one lock policy. Every lock in the daemon guards state that a panicking holder leaves
//! whole (critical sections assign complete values and neither await nor block), so a lock
//! poisoned by a panic is taken as it is: the work goes on with the state as the panic left
//! it, instead of being skipped on every later call or taking the daemon down. Each recovery
//! is logged (the panic itself is logged where it happened).

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

fn recovered<G>(p: PoisonError<G>, what: &'static str) -> G {
    tracing::warn!(
        lock = what,
        "a lock's holder panicked; carrying on with the state it left"
    );
    p.into_inner()
}

/// [`Mutex::lock`] under the policy.
pub trait Lock<T: ?Sized> {
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> Lock<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|p| recovered(p, std::any::type_name::<T>()))
    }
}

/// [`RwLock::read`] and [`RwLock::write`] under the policy.
pub trait ReadWrite<T: ?Sized> {
    fn read_locked(&self) -> RwLockReadGuard<'_, T>;
    fn write_locked(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> ReadWrite<T> for RwLock<T> {
    fn read_locked(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(|p| recovered(p, std::any::type_name::<T>()))
    }

    fn write_locked(&self) -> RwLockWriteGuard<'_, T> {
        self.write()
            .unwrap_or_else(|p| recovered(p, std::any::type_name::<T>()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_panicking_holder_leaves_the_lock_usable() {
        let m = Arc::new(Mutex::new(vec![1]));
        let m2 = Arc::clone(&m);
        let r = std::thread::spawn(move || {
            let mut g = m2.locked();
            g.push(2);
            panic!("holder panics");
        })
        .join();
        assert!(r.is_err());
        assert!(m.is_poisoned());
        assert_eq!(*m.locked(), vec![1, 2], "the state the holder left");
        m.locked().push(3);
        assert_eq!(m.locked().len(), 3);

        let rw = Arc::new(RwLock::new(0));
        let rw2 = Arc::clone(&rw);
        let _ = std::thread::spawn(move || {
            *rw2.write_locked() = 5;
            panic!("writer panics");
        })
        .join();
        assert_eq!(*rw.read_locked(), 5);
        *rw.write_locked() += 1;
        assert_eq!(*rw.read_locked(), 6);
    }
}
