//! TCP active opens from `inet_sock_set_state`: CLOSE -> SYN_SENT stamps the start (in the
//! connecting task's context, where its cgroup is known), SYN_SENT -> ESTABLISHED is a success,
//! SYN_SENT -> CLOSE a failure. Counts and latency/RTT histograms are aggregated in the kernel
//! by (workload, destination group); failures also go out as events.
//!
//! A socket is tracked only while it connects: the entry goes at ESTABLISHED, where the
//! handshake's RTT sample is already in `srtt_us`. Every later state change, reset and
//! retransmit of an established connection then costs no map lookup at all (a per-CPU array
//! slot), which is what keeps the per-connection cost low on busy hosts, and long-lived
//! connections never occupy the map.
//!
//! Every hook has a raw tracepoint entry (preferred: no trace record is formatted, socket fields
//! are read at BTF offsets only where needed) and a classic tracepoint entry (fallback: fields
//! at tracefs offsets). Both feed the same bodies. The exception is `inet_sk_error_report`,
//! which recovers connect ends the kernel skipped (see `error_report`): raw only, since its
//! classic tracepoint has no socket address to find the connect by.
//!
//! The connect table comes in two forms (see `conn`): an array claimed by compare-and-swap
//! where the kernel has BPF atomics (5.12+), a hash map without them; each hook has a program
//! per form (see `entries`), and the loader attaches one form's.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_task},
    },
    macros::map,
    maps::{lpm_trie::Key, LpmTrie, PerCpuArray, PerCpuHashMap},
    programs::{RawTracePointContext, TracePointContext},
    EbpfContext,
};
use sensor_common::{
    agg::Log2Hist,
    record::{counter, kind as rkind, probe_id, RecordHeader},
    tcp::{
        kind, result, state, ConnSlot, DestAnyKey, DestPortKey, FlowCountKey, FlowKey, SockLayout, TcpFailureRecord,
        TcpTpLayout, AF_INET, AF_INET6, DEFAULT_SERIES, DEST_OTHER, FAILURE_VERSION, HOST_COUNT_SLOTS, IPPROTO_TCP,
        MAX_DEST_GROUPS, RECOVERED_SLOTS,
    },
};

use crate::{
    agg::{record, value_for},
    task,
    transport::{bump, output},
};

/// Tracepoint field offsets, set by the daemon from tracefs.
#[unsafe(no_mangle)]
static TCP_TP_LAYOUT: TcpTpLayout = TcpTpLayout::INVALID;

/// `struct sock` / `struct tcp_sock` offsets from BTF and load-time switches.
#[unsafe(no_mangle)]
pub(crate) static SOCK_LAYOUT: SockLayout = SockLayout::INVALID;

#[map]
static TCP_COUNTS: PerCpuHashMap<FlowCountKey, u64> = PerCpuHashMap::with_max_entries(DEFAULT_SERIES, 0);

/// Resets and retransmits of sockets that are not connecting (no workload known without a
/// lookup), by `kind - kind::RETRANSMIT`.
#[map]
static TCP_HOST_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(HOST_COUNT_SLOTS, 0);

/// Connect ends recovered by the error-report program, by result (see `RECOVERED_SLOTS`).
#[map]
static TCP_RECOVERED: PerCpuArray<u64> = PerCpuArray::with_max_entries(RECOVERED_SLOTS, 0);

/// Per flow: [connect latency, handshake RTT], so a success costs one lookup.
#[map]
static TCP_HISTS: PerCpuHashMap<FlowKey, [Log2Hist; 2]> = PerCpuHashMap::with_max_entries(DEFAULT_SERIES, 0);

/// A zeroed value to insert into `TCP_HISTS` from (too big for the BPF stack).
#[map]
static TCP_ZERO_HISTS: PerCpuArray<[Log2Hist; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Configured destination groups (see `DestPortKey` / `DestAnyKey`), filled by the daemon.
#[map]
static TCP_DEST_PORT: LpmTrie<DestPortKey, u16> = LpmTrie::with_max_entries(MAX_DEST_GROUPS, 0);

#[map]
static TCP_DEST_ANY: LpmTrie<DestAnyKey, u16> = LpmTrie::with_max_entries(MAX_DEST_GROUPS, 0);

#[inline(always)]
fn tp<T>(ctx: &TracePointContext, off: u16) -> Option<T> {
    // SAFETY: `off` comes from this kernel's format file; bpf_probe_read_kernel cannot fault.
    unsafe { ctx.read_at::<T>(usize::from(off)).ok() }
}

#[inline(always)]
fn tp_layout() -> TcpTpLayout {
    // SAFETY: read of a plain global in .rodata that the loader may have rewritten.
    unsafe { core::ptr::read_volatile(&TCP_TP_LAYOUT) }
}

/// One field of `SOCK_LAYOUT`. Volatile, since the loader rewrites the value the compiler
/// would otherwise fold; one field at a time, since a volatile copy of the whole struct costs a
/// load per field on every run. The verifier sees these as constants (frozen .rodata).
macro_rules! sl {
    ($f:ident) => {
        // SAFETY: read of a plain global in .rodata that the loader may have rewritten.
        unsafe { core::ptr::read_volatile(&raw const $crate::tcp::SOCK_LAYOUT.$f) }
    };
}

mod conn;
use conn::Conns;

/// Reads a `T` at `off` bytes into the socket at `sk` with `bpf_probe_read_kernel`.
#[inline(always)]
fn sk_read<T>(sk: u64, off: u32) -> Option<T> {
    if sk == 0 {
        return None;
    }
    // SAFETY: offsets from BTF; bpf_probe_read_kernel cannot fault.
    unsafe { bpf_probe_read_kernel((sk + u64::from(off)) as *const T) }.ok()
}

/// `bpf_rdonly_cast(p, btf_id)`: `p` as a read-only pointer to the BTF type `btf_id`, whose
/// fields are then plain loads (the verifier checks each against the type, the JIT turns a
/// fault into 0) instead of a helper call each. Called through a placeholder helper id that the
/// loader rewrites into the kfunc call (and into a never-reached helper call on kernels
/// without the kfunc, where `SockLayout::direct` is 0).
#[inline(always)]
fn rdonly_cast(p: u64, btf_id: u32) -> *const u8 {
    // SAFETY: the placeholder id is rewritten by the loader before the program loads; the
    // signature is the kfunc's.
    unsafe {
        let f: unsafe extern "C" fn(u64, u32) -> *const u8 =
            core::mem::transmute(SockLayout::RDONLY_CAST_PLACEHOLDER as usize);
        f(p, btf_id)
    }
}

/// A `T` at `off` bytes into the socket (`struct sock`, or `struct tcp_sock` with `tcp`):
/// a direct load where the kernel has `bpf_rdonly_cast`, else a probe read. `off` must be a
/// member of the type, and a load-time constant, for the verifier.
#[inline(always)]
fn sk_field<T: Copy>(sk: u64, off: u32, tcp: bool) -> Option<T> {
    if sk == 0 {
        return None;
    }
    if sl!(direct) == 0 {
        return sk_read(sk, off);
    }
    let p = rdonly_cast(sk, if tcp { sl!(tcp_sock_btf_id) } else { sl!(sock_btf_id) });
    if p.is_null() {
        return None;
    }
    // SAFETY: a BTF pointer from `rdonly_cast`; the verifier checks the load against the type.
    Some(unsafe { core::ptr::read(p.add(off as usize).cast::<T>()) })
}

/// Adds one to a counter, creating it; a full map counts as lost.
#[inline(always)]
fn count(key: &FlowCountKey) {
    for _ in 0..2 {
        if let Some(p) = TCP_COUNTS.get_ptr_mut(key) {
            // SAFETY: this CPU's copy of the value, valid during the program run.
            unsafe { *p += 1 };
            return;
        }
        if TCP_COUNTS.insert(key, 1u64, u64::from(BPF_NOEXIST)).is_ok() {
            return;
        }
    }
    bump(probe_id::TCP, counter::LOST_MAP_FULL);
}

/// The destination group of a tracked connect, from its slot's copy of the destination. Found
/// when the connect ends rather than stored at its start, which keeps a slot in one cache line.
#[inline(always)]
fn slot_dest(family: u8, dport: u16, daddr: &[u8; 16]) -> u16 {
    dest_group(u16::from(family), dport, daddr)
}

/// The destination group of an address and port: a group with a port first, then one without.
#[inline(always)]
fn dest_group(family: u16, dport: u16, daddr: &[u8; 16]) -> u16 {
    let groups = sl!(dest_groups);
    if groups == 0 {
        return DEST_OTHER;
    }
    let bits = if family == AF_INET6 { 128 } else { 32 };
    let fam = family.to_be_bytes();
    if groups & SockLayout::DEST_WITH_PORT != 0 {
        let k = Key::new(
            32 + bits,
            DestPortKey {
                port: dport.to_be_bytes(),
                family: fam,
                addr: *daddr,
            },
        );
        if let Some(g) = TCP_DEST_PORT.get(&k) {
            return *g;
        }
    }
    if groups & SockLayout::DEST_ANY_PORT != 0 {
        let k = Key::new(
            16 + bits,
            DestAnyKey {
                family: fam,
                addr: *daddr,
            },
        );
        if let Some(g) = TCP_DEST_ANY.get(&k) {
            return *g;
        }
    }
    DEST_OTHER
}

/// The connecting task: memory cgroup id, tgid, comm (as two words).
type Who = (u64, u32, [u64; 2]);

/// Where a connect goes: family (0: neither IPv4 nor IPv6), port (host order), address words.
type Dst = (u16, u16, [u64; 2]);

/// Who connects, by helpers and probe reads: the fallback entry's way, for kernels where
/// `bpf_get_current_task_btf` is missing.
#[inline(always)]
fn who_by_helpers() -> Who {
    let cgroup_id = 'id: {
        if sl!(cgroup_id_from_helper) == 0 {
            let t = task::layout();
            if t.valid != 0 {
                // SAFETY: helper without arguments; the pointer is only read through probe_read.
                let id = task::task_memcg_id(&t, unsafe { bpf_get_current_task() });
                if id != 0 {
                    break 'id id;
                }
            }
        }
        // SAFETY: helper without arguments.
        unsafe { bpf_get_current_cgroup_id() }
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let mut comm = [0u64; 2];
    // SAFETY: `comm` is 16 writable bytes; the helper always NUL-terminates.
    if unsafe { bpf_get_current_comm(comm.as_mut_ptr().cast(), 16) } != 0 {
        comm = [0; 2];
    }
    (cgroup_id, tgid, comm)
}

/// Who connects, by direct loads on the BTF task pointer: no helper call per field.
#[inline(always)]
fn who_by_btf() -> Who {
    let t = task::layout();
    if t.valid == 0 {
        // Known at load time: the verifier drops the other branch.
        return who_by_helpers();
    }
    let task = task::current_btf();
    let cgroup_id = if sl!(cgroup_id_from_helper) != 0 {
        // SAFETY: helper without arguments.
        unsafe { bpf_get_current_cgroup_id() }
    } else {
        task::btf_memcg_id(&t, task)
    };
    let (tgid, comm) = task::btf_tgid_comm(&t, task);
    (cgroup_id, tgid, comm)
}

fn classify(reset_received: bool, sk_err: i32) -> u16 {
    const ECONNRESET: i32 = 104;
    const ENETUNREACH: i32 = 101;
    const ETIMEDOUT: i32 = 110;
    const ECONNREFUSED: i32 = 111;
    const EHOSTDOWN: i32 = 112;
    const EHOSTUNREACH: i32 = 113;
    if reset_received {
        return result::REFUSED;
    }
    match sk_err {
        ECONNREFUSED => result::REFUSED,
        // 0: the application gave up (closed the socket) before the SYN was answered.
        ETIMEDOUT | 0 => result::TIMEOUT,
        ECONNRESET => result::RESET,
        EHOSTUNREACH | ENETUNREACH | EHOSTDOWN => result::UNREACHABLE,
        _ => result::ERROR,
    }
}

/// Shared body of both `inet_sock_set_state` entries. Everything but the three transitions of
/// an active open returns at once. For a new connect, `is_tcp` checks the socket's protocol,
/// `fill` reads its destination, `who` the connecting task.
#[inline(always)]
fn set_state<T: Conns, C: EbpfContext>(
    ctx: &C,
    sk: u64,
    old: i32,
    new: i32,
    is_tcp: impl FnOnce() -> bool,
    fill: impl FnOnce() -> Dst,
    who: impl FnOnce() -> Who,
) {
    match (old, new) {
        (state::CLOSE, state::SYN_SENT) => connect_start::<T, C>(ctx, sk, is_tcp, fill, who),
        (state::SYN_SENT, state::ESTABLISHED) => connect_done::<T>(sk),
        (state::SYN_SENT, state::CLOSE) => connect_failed::<T, C>(ctx, sk),
        _ => {}
    }
}

/// An IPv4 address as the two words of a 16-byte address field (the rest zero).
#[inline(always)]
fn v4_words(a: [u8; 4]) -> [u64; 2] {
    [u64::from_ne_bytes([a[0], a[1], a[2], a[3], 0, 0, 0, 0]), 0]
}

/// Writes 16 bytes as two 8-byte stores (no byte-wise copy or out-of-line memset).
#[inline(always)]
fn set_words(dst: &mut [u8; 16], words: [u64; 2]) {
    // SAFETY: both 16-byte fields of `ConnSlot` sit at 8-aligned offsets (its layout is fixed
    // and asserted in sensor-common), so they hold two u64 exactly.
    unsafe { core::ptr::write((dst as *mut [u8; 16]).cast::<[u64; 2]>(), words) };
}

/// The raw `inet_sock_set_state` entry's body: socket fields at BTF offsets.
#[inline(always)]
fn raw_set_state<T: Conns>(ctx: &RawTracePointContext, who: impl FnOnce() -> Who) {
    let sk: u64 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    let is_tcp = || sl!(raw_valid) != 0 && sk_field::<u16>(sk, sl!(sk_protocol), false) == Some(IPPROTO_TCP);
    let fill = || -> Dst {
        let family = sk_field::<u16>(sk, sl!(skc_family), false).unwrap_or(0);
        let dport = sk_field::<u16>(sk, sl!(skc_dport), false).unwrap_or(0);
        let dport = u16::from_be(dport);
        match family {
            AF_INET => (
                family,
                dport,
                v4_words(sk_field::<[u8; 4]>(sk, sl!(skc_daddr), false).unwrap_or([0; 4])),
            ),
            AF_INET6 => (
                family,
                dport,
                sk_field::<[u64; 2]>(sk, sl!(skc_v6_daddr), false).unwrap_or([0; 2]),
            ),
            _ => (0, 0, [0; 2]),
        }
    };
    set_state::<T, _>(ctx, sk, old, new, is_tcp, fill, who);
}

/// The classic `inet_sock_set_state` entry's body: fields at tracefs offsets.
#[inline(always)]
fn tp_set_state<T: Conns>(ctx: &TracePointContext) {
    let l = tp_layout();
    if l.valid == 0 || tp::<u16>(ctx, l.ss_protocol) != Some(IPPROTO_TCP) {
        return;
    }
    let (Some(old), Some(new), Some(sk)) = (
        tp::<i32>(ctx, l.ss_oldstate),
        tp::<i32>(ctx, l.ss_newstate),
        tp::<u64>(ctx, l.ss_skaddr),
    ) else {
        return;
    };
    let fill = || -> Dst {
        let family = tp::<u16>(ctx, l.ss_family).unwrap_or(0);
        let dport = tp::<u16>(ctx, l.ss_dport).unwrap_or(0);
        match family {
            AF_INET => (
                family,
                dport,
                v4_words(tp::<[u8; 4]>(ctx, l.ss_daddr).unwrap_or([0; 4])),
            ),
            AF_INET6 => (family, dport, tp::<[u64; 2]>(ctx, l.ss_daddr_v6).unwrap_or([0; 2])),
            _ => (0, 0, [0; 2]),
        }
    };
    // The entry checked the protocol already.
    set_state::<T, _>(ctx, sk, old, new, || true, fill, who_by_helpers);
}

#[inline(always)]
fn connect_start<T: Conns, C: EbpfContext>(
    ctx: &C,
    sk: u64,
    is_tcp: impl FnOnce() -> bool,
    fill: impl FnOnce() -> Dst,
    who: impl FnOnce() -> Who,
) {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    T::warm(sk);
    if !is_tcp() {
        return;
    }
    let (family, dport, daddr) = fill();
    if family == 0 {
        return;
    }
    let (cgroup_id, tgid, comm) = who();
    let claimed = T::start(sk, now, |s| {
        s.sk = sk;
        s.cgroup_id = cgroup_id;
        s.tgid = tgid;
        s.family = family as u8;
        s.dport = dport;
        s.flags = 0;
        set_words(&mut s.comm, comm);
        set_words(&mut s.daddr, daddr);
    });
    // No entry: its end counts it as untracked.
    if !claimed {
        // Off unless `kernel_log` is set (the macro checks `AYA_LOG_LEVEL` first).
        aya_log_ebpf::warn!(ctx, "connect table full: a connect to port {} goes untracked", dport);
    }
}

/// Takes `sk`'s slot: `read` of it and the slot freed. `None` (counted as untracked) when the
/// connect was not tracked or its slot was taken over meanwhile.
#[inline(always)]
fn take_start<T: Conns, R>(sk: u64, read: impl FnOnce(u64, &ConnSlot) -> R) -> Option<R> {
    let (p, st) = T::find(sk);
    if !p.is_null() {
        // Only trusted if the entry is still this start's when it is freed (see `release`).
        // SAFETY: `p` is a live map value.
        let r = read(st, unsafe { &*p });
        if T::release(sk, p, st) {
            return Some(r);
        }
    }
    untracked();
    None
}

/// An end without its start: the connect began before the probe attached, found no slot, or
/// its slot was taken over.
#[inline(always)]
fn untracked() {
    bump(probe_id::TCP, counter::LOST_UNTRACKED);
}

#[inline(always)]
fn connect_done<T: Conns>(sk: u64) {
    let Some((started, cgroup_id, family, dport, daddr)) =
        take_start::<T, _>(sk, |st, s| (st, s.cgroup_id, s.family, s.dport, s.daddr))
    else {
        return;
    };
    let fk = FlowKey {
        cgroup_id,
        dest: slot_dest(family, dport, &daddr),
        _pad: 0,
        _pad2: 0,
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // Both histograms of the flow in one lookup.
    let Some(h) = value_for(&TCP_HISTS, &TCP_ZERO_HISTS, probe_id::TCP, &fk) else {
        return;
    };
    // SAFETY: this CPU's copy of the map value, valid during the program run.
    let [connect, rtt] = unsafe { &mut *h };
    // The latency histogram's count is the success count.
    record(connect, now.saturating_sub(started));
    // The SYN-ACK was acked (and timed) before the state changed: `srtt_us` holds the
    // handshake's RTT sample, in microseconds times 8. Without a sample (SYN retransmitted, no
    // timestamps) it is 0 and nothing is observed.
    if sl!(valid) == 0 {
        return;
    }
    if let Some(srtt) = sk_field::<u32>(sk, sl!(srtt_us), true) {
        if srtt != 0 {
            record(rtt, u64::from(srtt >> 3) * 1000);
        }
    }
}

#[inline(always)]
fn connect_failed<T: Conns, C: EbpfContext>(ctx: &C, sk: u64) {
    let Some((started, s)) = take_start::<T, _>(sk, |st, s| (st, *s)) else {
        return;
    };
    failure(ctx, sk, started, &s);
}

/// Counts and reports the failed connect of slot copy `s` (started at `started`), whose slot
/// its caller already freed: with its reason from the socket's `sk_err`. Returns the result.
#[inline(always)]
fn failure<C: EbpfContext>(ctx: &C, sk: u64, started: u64, s: &ConnSlot) -> u16 {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let err = if sl!(valid) != 0 {
        sk_field::<i32>(sk, sl!(sk_err), false).unwrap_or(0)
    } else {
        0
    };
    let res = classify(s.flags & ConnSlot::RESET_RECEIVED != 0, err);
    let dest = slot_dest(s.family, s.dport, &s.daddr);
    count(&FlowCountKey {
        cgroup_id: s.cgroup_id,
        dest,
        kind: res,
        _pad: 0,
    });
    let rec = TcpFailureRecord {
        header: RecordHeader {
            kind: rkind::TCP_CONNECT_FAILURE,
            len: TcpFailureRecord::LEN,
            version: FAILURE_VERSION,
            _pad: 0,
            ktime_ns: now,
        },
        cgroup_id: s.cgroup_id,
        duration_ns: now.saturating_sub(started),
        tgid: s.tgid,
        sk_err: err,
        result: res,
        dest,
        dport: s.dport,
        family: u16::from(s.family),
        comm: s.comm,
        daddr: s.daddr,
    };
    // SAFETY: `rec` is a live stack value of `LEN` bytes.
    unsafe {
        output(
            ctx,
            probe_id::TCP,
            core::ptr::from_ref(&rec).cast::<u8>(),
            TcpFailureRecord::LEN as usize,
        )
    };
    res
}

/// The end of a connect whose `SYN_SENT -> CLOSE` run the kernel skipped (a softirq ended it
/// on a CPU where the set_state program was running, see docs/tcp-lost-runs.md). Where
/// `tcp_done_with_error()` ends connects (the loader checks it), `sk_error_report()` follows
/// the state change in the same call, and this program has its own per-CPU `active` count, so
/// the set_state program's nesting does not skip it. A socket already CLOSE that still holds a
/// slot lost its end: counted here as the set_state program would have, slot freed. A run that
/// was not skipped freed the slot before, so nothing is counted twice; where the error is
/// reported before the state change (older kernels' timeouts), the state is still SYN_SENT here
/// and nothing happens. Runs on failures only, never on the connect hot path.
#[inline(always)]
fn error_report<T: Conns, C: EbpfContext>(ctx: &C, sk: u64) {
    if sl!(valid) == 0 || sl!(raw_valid) == 0 || sl!(rcv_nxt) == 0 {
        return;
    }
    // Every AF_INET/AF_INET6 socket's error report comes here (UDP's ICMP errors too).
    if sk_field::<u16>(sk, sl!(sk_protocol), false) != Some(IPPROTO_TCP)
        || sk_field::<u8>(sk, sl!(skc_state), false) != Some(state::CLOSE as u8)
    {
        return;
    }
    let (p, st) = T::find(sk);
    // No slot: its end was counted (or it was never tracked, which its end counted).
    if p.is_null() {
        return;
    }
    // SAFETY: `p` is a live map value; the copy is trusted only if the release below finds
    // the same lock word (unique per start).
    let s = unsafe { *p };
    // A SYN-ACK sets `rcv_nxt`: the connect got established, and that run was the one skipped.
    // Its success has no time to count; the slot is freed and the recovery counted as such.
    let established = sk_field::<u32>(sk, sl!(rcv_nxt), true).is_some_and(|v| v != 0);
    if !T::release(sk, p, st) {
        return;
    }
    let res = if established {
        result::SUCCESS
    } else {
        failure(ctx, sk, st, &s)
    };
    if let Some(c) = TCP_RECOVERED.get_ptr_mut(u32::from(res)) {
        // SAFETY: this CPU's slot of a per-CPU array, valid during the program run.
        unsafe { *c += 1 };
    }
}

/// Counts a reset or retransmit: with the workload and destination when the socket is still
/// connecting (a refused connect, a SYN retransmit), else in the host-level slot. `flag` is set
/// on a connecting socket's slot.
#[inline(always)]
fn counted<T: Conns>(sk: u64, what: u16, flag: u8) {
    // The socket is hot in the cache, the table may not be: ask the socket first.
    if sl!(valid) == 0 || sk_field::<u8>(sk, sl!(skc_state), false) == Some(state::SYN_SENT as u8) {
        let (p, _) = T::find(sk);
        if !p.is_null() {
            // SAFETY: `p` is a live map value. The socket's own state changes are serialized
            // by its lock, so nothing else writes `flags` meanwhile.
            let s = unsafe { &mut *p };
            s.flags |= flag;
            count(&FlowCountKey {
                cgroup_id: s.cgroup_id,
                dest: slot_dest(s.family, s.dport, &s.daddr),
                kind: what,
                _pad: 0,
            });
            return;
        }
    }
    if let Some(p) = TCP_HOST_COUNTS.get_ptr_mut(u32::from(what.wrapping_sub(kind::RETRANSMIT))) {
        // SAFETY: this CPU's slot of a per-CPU array, valid during the program run.
        unsafe { *p += 1 };
    }
}

/// A socket argument of a classic tracepoint (0 when its layout has none).
#[inline(always)]
fn tp_sk(ctx: &TracePointContext, off: impl FnOnce(&TcpTpLayout) -> u16) -> u64 {
    let l = tp_layout();
    if l.valid == 0 {
        return 0;
    }
    tp::<u64>(ctx, off(&l)).unwrap_or(0)
}

mod entries;
