//! TCP active opens from `sock:inet_sock_set_state`: CLOSE -> SYN_SENT stamps the start (in the
//! connecting task's context, where its cgroup is known), SYN_SENT -> ESTABLISHED is a success,
//! SYN_SENT -> CLOSE a failure. Counts and latency/RTT histograms are aggregated in the kernel
//! by (workload, destination group); failures also go out as events.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_task},
    },
    macros::{map, tracepoint},
    maps::{lpm_trie::Key, LpmTrie, LruHashMap, PerCpuHashMap},
    programs::TracePointContext,
};
use sensor_common::{
    agg::Log2Hist,
    record::{counter, kind as rkind, probe_id, RecordHeader},
    tcp::{
        kind, result, state, ConnStart, DestAnyKey, DestPortKey, Established, FlowCountKey, FlowKey, SockLayout,
        TcpFailureRecord, TcpTpLayout, AF_INET, AF_INET6, DEFAULT_SERIES, DEFAULT_TRACKED_CONNECTS,
        DEFAULT_TRACKED_ESTABLISHED, DEST_OTHER, FAILURE_VERSION, IPPROTO_TCP, MAX_DEST_GROUPS,
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

/// `struct sock` / `struct tcp_sock` offsets, set by the daemon from BTF.
#[unsafe(no_mangle)]
static SOCK_LAYOUT: SockLayout = SockLayout::INVALID;

#[map]
static TCP_CONNECTING: LruHashMap<u64, ConnStart> = LruHashMap::with_max_entries(DEFAULT_TRACKED_CONNECTS, 0);

#[map]
static TCP_ESTABLISHED: LruHashMap<u64, Established> = LruHashMap::with_max_entries(DEFAULT_TRACKED_ESTABLISHED, 0);

#[map]
static TCP_COUNTS: PerCpuHashMap<FlowCountKey, u64> = PerCpuHashMap::with_max_entries(DEFAULT_SERIES, 0);

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
fn dest_group(family: u16, dport: u16, daddr: &[u8; 16]) -> u16 {
    let bits = if family == AF_INET6 { 128 } else { 32 };
    let fam = family.to_be_bytes();
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
    let k = Key::new(
        16 + bits,
        DestAnyKey {
            family: fam,
            addr: *daddr,
        },
    );
    TCP_DEST_ANY.get(&k).copied().unwrap_or(DEST_OTHER)
}

/// The memory cgroup of the current task (or its v2 cgroup where BTF offsets are missing).
#[inline(always)]
fn current_cgroup() -> u64 {
    let l = task::layout();
    if l.valid != 0 {
        // SAFETY: helper without arguments; the pointer is only read through probe_read.
        let t = unsafe { bpf_get_current_task() };
        let id = task::task_memcg_id(&l, t);
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
    match (old, new) {
        (state::CLOSE, state::SYN_SENT) => connect_start(&ctx, &l, sk),
        (state::SYN_SENT, state::ESTABLISHED) => connect_done(sk),
        (state::SYN_SENT, state::CLOSE) => connect_failed(&ctx, sk),
        (state::ESTABLISHED, _) => established_end(sk),
        _ => {}
    }
    0
}

#[inline(always)]
fn connect_start(ctx: &TracePointContext, l: &TcpTpLayout, sk: u64) {
    let family = tp::<u16>(ctx, l.ss_family).unwrap_or(0);
    let dport = tp::<u16>(ctx, l.ss_dport).unwrap_or(0);
    let mut daddr = [0u8; 16];
    if family == AF_INET {
        if let Some(a) = tp::<[u8; 4]>(ctx, l.ss_daddr) {
            daddr[..4].copy_from_slice(&a);
        }
    } else if family == AF_INET6 {
        if let Some(a) = tp::<[u8; 16]>(ctx, l.ss_daddr_v6) {
            daddr = a;
        }
    } else {
        return;
    }
    let s = ConnStart {
        // SAFETY: helper without arguments.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: current_cgroup(),
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        dest: dest_group(family, dport, &daddr),
        dport,
        family,
        reset_received: 0,
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        daddr,
    };
    // LRU: a full map evicts the oldest start; its end is then counted as `untracked`.
    let _ = TCP_CONNECTING.insert(sk, s, 0);
}

#[inline(always)]
fn take_start(sk: u64) -> Option<ConnStart> {
    // SAFETY: the value is copied out before the entry is removed.
    let s = unsafe { TCP_CONNECTING.get(sk) }.copied();
    if s.is_some() {
        let _ = TCP_CONNECTING.remove(sk);
    } else {
        bump(probe_id::TCP, counter::LOST_UNTRACKED);
    }
    s
}

#[inline(always)]
fn connect_done(sk: u64) {
    let Some(s) = take_start(sk) else { return };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    count(&FlowCountKey {
        cgroup_id: s.cgroup_id,
        dest: s.dest,
        kind: result::SUCCESS,
        _pad: 0,
    });
    let fk = FlowKey {
        cgroup_id: s.cgroup_id,
        dest: s.dest,
        _pad: [0; 3],
    };
    observe(&TCP_CONNECT_HIST, probe_id::TCP, &fk, now.saturating_sub(s.ktime_ns));
    let _ = TCP_ESTABLISHED.insert(
        sk,
        Established {
            cgroup_id: s.cgroup_id,
            dest: s.dest,
            _pad: [0; 3],
        },
        0,
    );
}

#[inline(always)]
fn sk_err(sk: u64) -> i32 {
    // SAFETY: read of a plain global in .rodata that the loader may have rewritten.
    let l = unsafe { core::ptr::read_volatile(&SOCK_LAYOUT) };
    if l.valid == 0 || sk == 0 {
        return 0;
    }
    // SAFETY: offset from BTF; bpf_probe_read_kernel cannot fault.
    unsafe { bpf_probe_read_kernel((sk + u64::from(l.sk_err)) as *const i32) }.unwrap_or(0)
}

#[inline(always)]
fn connect_failed(ctx: &TracePointContext, sk: u64) {
    let Some(s) = take_start(sk) else { return };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let err = sk_err(sk);
    let res = classify(s.reset_received != 0, err);
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

#[inline(always)]
fn established_end(sk: u64) {
    // SAFETY: the value is copied out before the entry is removed.
    let Some(e) = (unsafe { TCP_ESTABLISHED.get(sk) }).copied() else {
        return;
    };
    let _ = TCP_ESTABLISHED.remove(sk);
    // SAFETY: read of a plain global in .rodata that the loader may have rewritten.
    let l = unsafe { core::ptr::read_volatile(&SOCK_LAYOUT) };
    if l.valid == 0 {
        return;
    }
    // SAFETY: offset from BTF; bpf_probe_read_kernel cannot fault.
    let Ok(srtt) = (unsafe { bpf_probe_read_kernel((sk + u64::from(l.srtt_us)) as *const u32) }) else {
        return;
    };
    if srtt == 0 {
        return;
    }
    // srtt_us holds the smoothed RTT in microseconds, times 8.
    let fk = FlowKey {
        cgroup_id: e.cgroup_id,
        dest: e.dest,
        _pad: [0; 3],
    };
    observe(&TCP_RTT_HIST, probe_id::TCP, &fk, u64::from(srtt >> 3) * 1000);
}

/// The flow a socket belongs to: established active open, connect in progress, or unknown.
#[inline(always)]
fn flow_of(sk: u64) -> (u64, u16) {
    if sk != 0 {
        // SAFETY: values are copied out immediately.
        if let Some(e) = unsafe { TCP_ESTABLISHED.get(sk) } {
            return (e.cgroup_id, e.dest);
        }
        // SAFETY: as above.
        if let Some(s) = unsafe { TCP_CONNECTING.get(sk) } {
            return (s.cgroup_id, s.dest);
        }
    }
    (0, DEST_OTHER)
}

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let l = tp_layout();
    let Some(sk) = tp::<u64>(&ctx, l.rx_reset_skaddr) else {
        return 0;
    };
    if let Some(p) = TCP_CONNECTING.get_ptr_mut(sk) {
        // SAFETY: a map value, valid during the program run.
        unsafe { (*p).reset_received = 1 };
    }
    let (cgroup_id, dest) = flow_of(sk);
    count(&FlowCountKey {
        cgroup_id,
        dest,
        kind: kind::RESET_RECEIVED,
        _pad: 0,
    });
    0
}

#[tracepoint(category = "tcp", name = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let l = tp_layout();
    let sk = tp::<u64>(&ctx, l.tx_reset_skaddr).unwrap_or(0);
    let (cgroup_id, dest) = flow_of(sk);
    count(&FlowCountKey {
        cgroup_id,
        dest,
        kind: kind::RESET_SENT,
        _pad: 0,
    });
    0
}

#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub fn tcp_retransmit(ctx: TracePointContext) -> u32 {
    let l = tp_layout();
    let sk = tp::<u64>(&ctx, l.retrans_skaddr).unwrap_or(0);
    let (cgroup_id, dest) = flow_of(sk);
    count(&FlowCountKey {
        cgroup_id,
        dest,
        kind: kind::RETRANSMIT,
        _pad: 0,
    });
    0
}
