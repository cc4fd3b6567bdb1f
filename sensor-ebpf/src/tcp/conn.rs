//! The connect table: where an active open waits from SYN_SENT to its end. Two forms with one
//! interface ([`Conns`]), each compiled into its own set of programs:
//!
//! - [`Slots`] (kernels with BPF atomics, 5.12+): an array whose slots change owner by
//!   compare-and-swap; the hot path takes no lock and calls no map helper.
//! - [`Hashed`] (kernels without them, e.g. 5.10): an LRU hash map keyed by the socket. A
//!   socket's own state changes are serialized by its lock, so its entry needs no
//!   compare-and-swap: a start inserts (replacing a stale entry of the same socket), an end
//!   copies the entry and deletes it, and only the deletion that succeeds counts the end. A full
//!   map evicts its least recently used entry, whose end then counts as untracked.
//!
//! The loader picks the form by feature probe (a program with a compare-and-swap either loads
//! or not), never by kernel version. No program of the hashed form contains an atomic
//! instruction: kernels before 5.12 refuse such a program whole, even in dead code.

use core::intrinsics::{atomic_cxchg, atomic_xchg, AtomicOrdering::SeqCst};

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_MMAPABLE},
    macros::map,
    maps::{Array, LruHashMap},
};
use sensor_common::tcp::{ConnSlot, DEFAULT_TRACKED_CONNECTS};

/// Active opens from SYN_SENT until they end (ESTABLISHED or CLOSE): see [`ConnSlot`]. A
/// connect that finds no slot in its windows is not tracked; its end counts it as `untracked`.
/// `BPF_F_MMAPABLE` (5.5+) only for its page-aligned values: each 64-byte slot is then exactly
/// one cache line, and a connect start, which usually finds its slot out of the cache, waits for
/// one line instead of two.
#[map]
static TCP_CONNS: Array<ConnSlot> = Array::with_max_entries(DEFAULT_TRACKED_CONNECTS, BPF_F_MMAPABLE);

/// The same for kernels without BPF atomics, keyed by the socket; `state` holds the start time.
/// The loader shrinks whichever table its kernel does not use to one entry.
#[map]
static TCP_CONNS_NX: LruHashMap<u64, ConnSlot> = LruHashMap::with_max_entries(DEFAULT_TRACKED_CONNECTS, 0);

/// A connect table.
pub trait Conns {
    /// Called first at a connect start, before the socket and task are read: brings what the
    /// claim will touch into the cache.
    #[inline(always)]
    fn warm(_sk: u64) {}
    /// Claims an entry for `sk`'s connect started at `now`, has `fill` write its fields (all
    /// but `state`) and publishes it. False when no entry could be claimed.
    fn start(sk: u64, now: u64, fill: impl FnOnce(&mut ConnSlot)) -> bool;
    /// `sk`'s entry and its lock word (the start time); null when `sk` holds none. Plain
    /// values rather than an `Option`: LLVM may spill the payload of a `None` from any
    /// register, even one a helper call clobbered, which the verifier refuses.
    fn find(sk: u64) -> (*mut ConnSlot, u64);
    /// Frees `sk`'s entry `p` if its lock word is still `seen`; true for the one caller that
    /// did (the others must not count the end).
    fn release(sk: u64, p: *mut ConnSlot, seen: u64) -> bool;
}

#[inline(always)]
fn load(p: *const u64) -> u64 {
    // SAFETY: `p` points into a live map value; a volatile load is never elided or merged.
    unsafe { core::ptr::read_volatile(p) }
}

/// The array with compare-and-swap ownership.
pub struct Slots;

/// The slot at position `i` of `sk`'s windows (hot region first, see [`ConnSlot::index`]).
#[inline(always)]
fn conn_slot(sk: u64, i: u32) -> Option<*mut ConnSlot> {
    TCP_CONNS.get_ptr_mut(ConnSlot::index(sk, i, sl!(conn_mask)))
}

/// Compare-and-swap of a slot's lock word from `seen` to `to`.
#[inline(always)]
fn swap_state(p: *mut ConnSlot, seen: u64, to: u64) -> bool {
    // SAFETY: `p` is a live map value; the BPF atomic is fully ordered.
    unsafe { atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(&raw mut (*p).state, seen, to).1 }
}

/// Stores a slot's lock word with a fully ordered exchange, so the slot's other stores are
/// visible before it on weakly ordered CPUs too.
#[inline(always)]
fn publish(p: *mut ConnSlot, state: u64) {
    // SAFETY: as in `swap_state`.
    unsafe { atomic_xchg::<u64, { SeqCst }>(&raw mut (*p).state, state) };
}

impl Conns for Slots {
    /// This socket's first slot may still be out of this CPU's cache (the other CPU used it
    /// last, or the network stack evicted it): load it now, so that a miss overlaps with
    /// reading the socket and the task instead of stalling the claim (the value is read again
    /// there). After the clock, whose `rdtsc` is fenced and would wait for the miss.
    #[inline(always)]
    fn warm(sk: u64) {
        if let Some(q) = conn_slot(sk, 0) {
            // SAFETY: `q` is a live map value.
            let _ = unsafe { load(&raw const (*q).state) };
        }
    }

    /// In window order (the hot window first): the first free slot, or a slot still holding
    /// this socket (its last connect's outcome was missed), whichever comes first and can be
    /// claimed; else a slot whose connect outlived `conn_max_age_ns` (also missed). Ends search
    /// in the same order, so a stale entry for this socket behind the slot taken here stays
    /// hidden until it is reclaimed. A slot lost to another CPU's claim (bursts of connects
    /// meet in the small hot region) sends the search on to the next one.
    #[inline(always)]
    fn start(sk: u64, now: u64, fill: impl FnOnce(&mut ConnSlot)) -> bool {
        let mut p: *mut ConnSlot = core::ptr::null_mut();
        let mut stale: *mut ConnSlot = core::ptr::null_mut();
        let mut stale_seen = 0u64;
        for i in 0..ConnSlot::SLOTS_PER_CONNECT {
            let Some(q) = conn_slot(sk, i) else { continue };
            // SAFETY: `q` is a live map value.
            let st = unsafe { load(&raw const (*q).state) };
            if st == ConnSlot::BUSY {
                continue;
            }
            // SAFETY: as above.
            if st == ConnSlot::FREE || unsafe { load(&raw const (*q).sk) } == sk {
                if swap_state(q, st, ConnSlot::BUSY) {
                    p = q;
                    break;
                }
                continue;
            }
            if stale.is_null() && now.saturating_sub(st) > sl!(conn_max_age_ns) {
                stale = q;
                stale_seen = st;
            }
        }
        // A stale slot is reused without counting: the end its connect missed was a program
        // run the kernel skipped (counted as `recursion`), or, if that connect does end after
        // all, its end finds no slot and counts it as untracked. Either way each connect is
        // counted once.
        if p.is_null() && !stale.is_null() && swap_state(stale, stale_seen, ConnSlot::BUSY) {
            p = stale;
        }
        if p.is_null() {
            return false;
        }
        // SAFETY: the slot is ours (BUSY) until `publish`; `p` is a live map value.
        fill(unsafe { &mut *p });
        publish(p, now);
        true
    }

    #[inline(always)]
    fn find(sk: u64) -> (*mut ConnSlot, u64) {
        for i in 0..ConnSlot::SLOTS_PER_CONNECT {
            let Some(p) = conn_slot(sk, i) else { continue };
            // The lock word first, then the owner: a claimer writes `sk` before it publishes
            // its start time, so an owner read after a start time is that start's. Read the
            // other way round, a free slot's stale `sk` (this address's previous socket) could
            // pair with the start time of a connect that claimed the slot in between, and the
            // compare-and-swap on that start time would end the wrong connect. (x86 keeps two
            // loads in order; arm64 may not, and BPF has load-acquire only from 6.15, so there
            // the window is the few nanoseconds between the loads, on a slot last owned by a
            // socket at this address.)
            // SAFETY: `p` is a live map value.
            let st = unsafe { load(&raw const (*p).state) };
            // SAFETY: as above.
            if st > ConnSlot::BUSY && unsafe { load(&raw const (*p).sk) } == sk {
                return (p, st);
            }
        }
        (core::ptr::null_mut(), 0)
    }

    /// The lock word is unique per start, so the compare-and-swap cannot free a slot that
    /// changed owner meanwhile. Its stale `sk` is harmless: a free slot is never anyone's
    /// (`find` wants a start time in `state`).
    #[inline(always)]
    fn release(_sk: u64, p: *mut ConnSlot, seen: u64) -> bool {
        swap_state(p, seen, ConnSlot::FREE)
    }
}

/// The LRU hash map keyed by the socket, without atomic instructions.
pub struct Hashed;

impl Conns for Hashed {
    /// A stale entry of the same socket (its last connect's end was missed) is replaced, as the
    /// array reuses it: that connect is not counted, and its end, if it comes, finds the new
    /// start's entry only if it is the new connect's own end.
    #[inline(always)]
    fn start(sk: u64, now: u64, fill: impl FnOnce(&mut ConnSlot)) -> bool {
        let mut s = ConnSlot {
            state: now,
            sk,
            cgroup_id: 0,
            tgid: 0,
            dport: 0,
            family: 0,
            flags: 0,
            comm: [0; 16],
            daddr: [0; 16],
        };
        fill(&mut s);
        TCP_CONNS_NX.insert(sk, s, u64::from(BPF_ANY)).is_ok()
    }

    #[inline(always)]
    fn find(sk: u64) -> (*mut ConnSlot, u64) {
        match TCP_CONNS_NX.get_ptr_mut(sk) {
            // SAFETY: a live map value, valid during the program run.
            Some(p) => (p, unsafe { load(&raw const (*p).state) }),
            None => (core::ptr::null_mut(), 0),
        }
    }

    /// The deletion is the map's own (under its bucket lock): of two ends racing for one entry,
    /// one deletes it. The lock word check keeps an end from taking a newer start's entry.
    #[inline(always)]
    fn release(sk: u64, p: *mut ConnSlot, seen: u64) -> bool {
        // SAFETY: `p` is the map value `find` returned in this program run (map values stay
        // valid memory for the whole run).
        if unsafe { load(&raw const (*p).state) } != seen {
            return false;
        }
        TCP_CONNS_NX.remove(sk).is_ok()
    }
}
