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
//! at tracefs offsets). Both feed the same bodies.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_task},
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{lpm_trie::Key, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap},
    programs::{RawTracePointContext, TracePointContext},
    EbpfContext,
};
use sensor_common::{
    agg::Log2Hist,
    record::{counter, kind as rkind, probe_id, RecordHeader},
    tcp::{
        kind, result, state, ConnStart, DestAnyKey, DestPortKey, FlowCountKey, FlowKey, SockLayout, TcpFailureRecord,
        TcpTpLayout, AF_INET, AF_INET6, DEFAULT_SERIES, DEFAULT_TRACKED_CONNECTS, DEST_OTHER, FAILURE_VERSION,
        HOST_COUNT_SLOTS, IPPROTO_TCP, MAX_DEST_GROUPS,
    },
};

use crate::{
    agg::observe,
    task,
    transport::{bump, output},
};

/// Tracepoint field offsets, set by the daemon from tracefs.
#[unsafe(no_mangle)]
static TCP_TP_LAYOUT: TcpTpLayout = TcpTpLayout::INVALID;

/// `struct sock` / `struct tcp_sock` offsets from BTF and load-time switches.
#[unsafe(no_mangle)]
static SOCK_LAYOUT: SockLayout = SockLayout::INVALID;

/// Active opens from SYN_SENT until they end (ESTABLISHED or CLOSE). A plain hash: cheaper than
/// LRU on this hot path; a full map counts as `map_full`, and connects whose outcome never
/// comes are aged out by the daemon.
#[map]
static TCP_SOCKS: HashMap<u64, ConnStart> = HashMap::with_max_entries(DEFAULT_TRACKED_CONNECTS, 0);

#[map]
static TCP_COUNTS: PerCpuHashMap<FlowCountKey, u64> = PerCpuHashMap::with_max_entries(DEFAULT_SERIES, 0);

/// Resets and retransmits of sockets that are not connecting (no workload known without a
/// lookup), by `kind - kind::RETRANSMIT`.
#[map]
static TCP_HOST_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(HOST_COUNT_SLOTS, 0);

#[map]
static TCP_CONNECT_HIST: PerCpuHashMap<FlowKey, Log2Hist> = PerCpuHashMap::with_max_entries(DEFAULT_SERIES, 0);

#[map]
static TCP_RTT_HIST: PerCpuHashMap<FlowKey, Log2Hist> = PerCpuHashMap::with_max_entries(DEFAULT_SERIES, 0);

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

#[inline(always)]
fn sock_layout() -> SockLayout {
    // SAFETY: read of a plain global in .rodata that the loader may have rewritten.
    unsafe { core::ptr::read_volatile(&SOCK_LAYOUT) }
}

/// Reads a `T` at `off` bytes into the socket at `sk`.
#[inline(always)]
fn sk_read<T>(sk: u64, off: u32) -> Option<T> {
    if sk == 0 {
        return None;
    }
    // SAFETY: offsets from BTF; bpf_probe_read_kernel cannot fault.
    unsafe { bpf_probe_read_kernel((sk + u64::from(off)) as *const T) }.ok()
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

/// The destination group of an address and port: a group with a port first, then one without.
#[inline(always)]
fn dest_group(l: &SockLayout, family: u16, dport: u16, daddr: &[u8; 16]) -> u16 {
    if l.dest_groups == 0 {
        return DEST_OTHER;
    }
    let bits = if family == AF_INET6 { 128 } else { 32 };
    let fam = family.to_be_bytes();
    if l.dest_groups & SockLayout::DEST_WITH_PORT != 0 {
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
    if l.dest_groups & SockLayout::DEST_ANY_PORT != 0 {
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

/// The memory cgroup of the current task.
#[inline(always)]
fn current_cgroup(l: &SockLayout) -> u64 {
    if l.cgroup_id_from_helper != 0 {
        // SAFETY: helper without arguments.
        return unsafe { bpf_get_current_cgroup_id() };
    }
    let t = task::layout();
    if t.valid != 0 {
        // SAFETY: helper without arguments; the pointer is only read through probe_read.
        let cur = unsafe { bpf_get_current_task() };
        let id = task::task_memcg_id(&t, cur);
        if id != 0 {
            return id;
        }
    }
    // SAFETY: helper without arguments.
    unsafe { bpf_get_current_cgroup_id() }
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

/// The destination of a new connect, read by the entry point that knows where it is.
struct Dest {
    family: u16,
    dport: u16,
    daddr: [u8; 16],
}

/// Shared body of both `inet_sock_set_state` entries. Everything but the three transitions of
/// an active open returns at once.
#[inline(always)]
fn set_state<C: EbpfContext>(ctx: &C, sk: u64, old: i32, new: i32, dest: impl FnOnce() -> Option<Dest>) {
    match (old, new) {
        (state::CLOSE, state::SYN_SENT) => {
            if let Some(d) = dest() {
                connect_start(sk, d);
            }
        }
        (state::SYN_SENT, state::ESTABLISHED) => connect_done(sk),
        (state::SYN_SENT, state::CLOSE) => connect_failed(ctx, sk),
        _ => {}
    }
}

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn tcp_set_state_raw(ctx: RawTracePointContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    set_state(&ctx, sk, old, new, || {
        let l = sock_layout();
        if l.raw_valid == 0 || sk_read::<u16>(sk, l.sk_protocol) != Some(IPPROTO_TCP) {
            return None;
        }
        let family = sk_read::<u16>(sk, l.skc_family).unwrap_or(0);
        let dport = u16::from_be(sk_read::<u16>(sk, l.skc_dport).unwrap_or(0));
        let mut daddr = [0u8; 16];
        if family == AF_INET {
            daddr[..4].copy_from_slice(&sk_read::<[u8; 4]>(sk, l.skc_daddr).unwrap_or([0; 4]));
        } else if family == AF_INET6 {
            daddr = sk_read::<[u8; 16]>(sk, l.skc_v6_daddr).unwrap_or([0; 16]);
        } else {
            return None;
        }
        Some(Dest { family, dport, daddr })
    });
    0
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn tcp_set_state(ctx: TracePointContext) -> u32 {
    let l = tp_layout();
    if l.valid == 0 || tp::<u16>(&ctx, l.ss_protocol) != Some(IPPROTO_TCP) {
        return 0;
    }
    let (Some(old), Some(new), Some(sk)) = (
        tp::<i32>(&ctx, l.ss_oldstate),
        tp::<i32>(&ctx, l.ss_newstate),
        tp::<u64>(&ctx, l.ss_skaddr),
    ) else {
        return 0;
    };
    set_state(&ctx, sk, old, new, || {
        let family = tp::<u16>(&ctx, l.ss_family).unwrap_or(0);
        let dport = tp::<u16>(&ctx, l.ss_dport).unwrap_or(0);
        let mut daddr = [0u8; 16];
        if family == AF_INET {
            daddr[..4].copy_from_slice(&tp::<[u8; 4]>(&ctx, l.ss_daddr).unwrap_or([0; 4]));
        } else if family == AF_INET6 {
            daddr = tp::<[u8; 16]>(&ctx, l.ss_daddr_v6).unwrap_or([0; 16]);
        } else {
            return None;
        }
        Some(Dest { family, dport, daddr })
    });
    0
}

#[inline(always)]
fn connect_start(sk: u64, d: Dest) {
    let Dest { family, dport, daddr } = d;
    let l = sock_layout();
    let s = ConnStart {
        // SAFETY: helper without arguments.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: current_cgroup(&l),
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        dest: dest_group(&l, family, dport, &daddr),
        dport,
        family,
        flags: 0,
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        daddr,
    };
    if TCP_SOCKS.insert(sk, s, 0).is_err() {
        bump(probe_id::TCP, counter::LOST_MAP_FULL);
    }
}

#[inline(always)]
fn take_start(sk: u64) -> Option<ConnStart> {
    // SAFETY: the value is copied out before the entry is removed.
    let s = unsafe { TCP_SOCKS.get(sk) }.copied();
    if s.is_some() {
        let _ = TCP_SOCKS.remove(sk);
    } else {
        untracked();
    }
    s
}

/// An end without its start: the connect began before the probe attached, or its start did
/// not fit in the map (counted there).
#[inline(always)]
fn untracked() {
    bump(probe_id::TCP, counter::LOST_UNTRACKED);
}

#[inline(always)]
fn connect_done(sk: u64) {
    let Some(s) = take_start(sk) else { return };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let fk = FlowKey {
        cgroup_id: s.cgroup_id,
        dest: s.dest,
        _pad: [0; 3],
    };
    // The histogram's count is the success count.
    observe(&TCP_CONNECT_HIST, probe_id::TCP, &fk, now.saturating_sub(s.ktime_ns));
    // The SYN-ACK was acked (and timed) before the state changed: `srtt_us` holds the
    // handshake's RTT sample, in microseconds times 8. Without a sample (SYN retransmitted, no
    // timestamps) it is 0 and nothing is observed.
    let l = sock_layout();
    if l.valid == 0 {
        return;
    }
    if let Some(srtt) = sk_read::<u32>(sk, l.srtt_us) {
        if srtt != 0 {
            observe(&TCP_RTT_HIST, probe_id::TCP, &fk, u64::from(srtt >> 3) * 1000);
        }
    }
}

#[inline(always)]
fn connect_failed<C: EbpfContext>(ctx: &C, sk: u64) {
    let Some(s) = take_start(sk) else { return };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let l = sock_layout();
    let err = if l.valid != 0 {
        sk_read::<i32>(sk, l.sk_err).unwrap_or(0)
    } else {
        0
    };
    let res = classify(s.flags & ConnStart::RESET_RECEIVED != 0, err);
    count(&FlowCountKey {
        cgroup_id: s.cgroup_id,
        dest: s.dest,
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
        duration_ns: now.saturating_sub(s.ktime_ns),
        tgid: s.tgid,
        sk_err: err,
        result: res,
        dest: s.dest,
        dport: s.dport,
        family: s.family,
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
}

/// Counts a reset or retransmit: with the workload and destination when the socket is still
/// connecting (a refused connect, a SYN retransmit), else in the host-level slot. `flag` is set
/// on a connecting socket's entry.
#[inline(always)]
fn counted(sk: u64, what: u16, flag: u16) {
    let l = sock_layout();
    let connecting = l.valid != 0 && sk_read::<u8>(sk, l.skc_state) == Some(state::SYN_SENT as u8);
    if connecting {
        if let Some(p) = TCP_SOCKS.get_ptr_mut(sk) {
            // SAFETY: a map value, valid during the program run.
            let s = unsafe { &mut *p };
            s.flags |= flag;
            count(&FlowCountKey {
                cgroup_id: s.cgroup_id,
                dest: s.dest,
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

#[raw_tracepoint(tracepoint = "tcp_receive_reset")]
pub fn tcp_receive_reset_raw(ctx: RawTracePointContext) -> u32 {
    counted(ctx.arg(0), kind::RESET_RECEIVED, ConnStart::RESET_RECEIVED);
    0
}

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    if let Some(sk) = tp::<u64>(&ctx, tp_layout().rx_reset_skaddr) {
        counted(sk, kind::RESET_RECEIVED, ConnStart::RESET_RECEIVED);
    }
    0
}

#[raw_tracepoint(tracepoint = "tcp_send_reset")]
pub fn tcp_send_reset_raw(ctx: RawTracePointContext) -> u32 {
    counted(ctx.arg(0), kind::RESET_SENT, 0);
    0
}

#[tracepoint(category = "tcp", name = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    counted(
        tp::<u64>(&ctx, tp_layout().tx_reset_skaddr).unwrap_or(0),
        kind::RESET_SENT,
        0,
    );
    0
}

#[raw_tracepoint(tracepoint = "tcp_retransmit_skb")]
pub fn tcp_retransmit_raw(ctx: RawTracePointContext) -> u32 {
    counted(ctx.arg(0), kind::RETRANSMIT, 0);
    0
}

#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub fn tcp_retransmit(ctx: TracePointContext) -> u32 {
    counted(
        tp::<u64>(&ctx, tp_layout().retrans_skaddr).unwrap_or(0),
        kind::RETRANSMIT,
        0,
    );
    0
}
