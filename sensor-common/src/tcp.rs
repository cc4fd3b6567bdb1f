//! TCP connects: layouts, aggregation keys and the connect-failure record.

use crate::record::RecordHeader;

/// Connect outcomes; also the `kind` of a [`FlowCountKey`] for connect counters (successes are
/// not counted there: each one is observed once in the connect-latency histogram, whose count
/// is the success count).
pub mod result {
    pub const SUCCESS: u16 = 0;
    pub const REFUSED: u16 = 1;
    pub const TIMEOUT: u16 = 2;
    pub const RESET: u16 = 3;
    pub const UNREACHABLE: u16 = 4;
    pub const ERROR: u16 = 5;
    pub const COUNT: u16 = 6;
}

/// Other counter kinds in the same map as the connect results.
pub mod kind {
    pub const RETRANSMIT: u16 = 8;
    pub const RESET_RECEIVED: u16 = 9;
    pub const RESET_SENT: u16 = 10;
}

/// Slots of the host-level reset/retransmit counters: `kind - kind::RETRANSMIT`.
pub const HOST_COUNT_SLOTS: u32 = 3;

/// Slots of the recovery counters (`TCP_RECOVERED`), by [`result`]: connect ends the
/// `inet_sock_set_state` program missed (the kernel skipped its run) and the
/// `inet_sk_error_report` program counted instead. `result::SUCCESS` counts connects that got
/// established unseen: their slot is freed, the success itself is not counted (its time is
/// unknown).
pub const RECOVERED_SLOTS: u32 = result::COUNT as u32;

/// Destination group of traffic that matches no configured group.
pub const DEST_OTHER: u16 = 0;

/// Key of the per-CPU counter map: workload, destination group, what is counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowCountKey {
    /// Kernfs id of the memory cgroup of the task that opened the connection (0: unknown).
    pub cgroup_id: u64,
    pub dest: u16,
    pub kind: u16,
    pub _pad: u32,
}
crate::assert_size!(FlowCountKey, 16);

/// Key of the histogram maps (connect latency, RTT).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub cgroup_id: u64,
    pub dest: u16,
    /// Two fields, not `[u16; 3]`: zeroing that array compiles to a call of a BPF `memset`.
    pub _pad: u16,
    pub _pad2: u32,
}
crate::assert_size!(FlowKey, 16);

/// One slot of the connect table: an active open from CLOSE -> SYN_SENT until its outcome.
///
/// The table is an array, not a hash map: a socket's slots are two short windows at hashes of its
/// address, found with plain loads (the verifier inlines array lookups), and owners change only
/// through a compare-and-swap on `state`, so the hot path takes no lock and calls no helper.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnSlot {
    /// The lock word: [`ConnSlot::FREE`], [`ConnSlot::BUSY`] (being written by its claimer), else
    /// the start time (CLOCK_MONOTONIC ns), unique per start, so a compare-and-swap on it cannot
    /// succeed on a slot that changed owner in between.
    pub state: u64,
    /// The socket (`struct sock *`).
    pub sk: u64,
    pub cgroup_id: u64,
    pub tgid: u32,
    /// Host byte order.
    pub dport: u16,
    /// `AF_INET` or `AF_INET6` (both fit a byte).
    pub family: u8,
    /// [`ConnSlot::RESET_RECEIVED`].
    pub flags: u8,
    pub comm: [u8; 16],
    /// IPv4 in the first 4 bytes, or IPv6.
    pub daddr: [u8; 16],
}
// One cache line: the table is page-aligned (`BPF_F_MMAPABLE`), so a claim touches one line.
crate::assert_size!(ConnSlot, 64);

impl ConnSlot {
    pub const FREE: u64 = 0;
    pub const BUSY: u64 = 1;
    /// `tcp:tcp_receive_reset` fired while connecting.
    pub const RESET_RECEIVED: u8 = 1;
    /// Consecutive slots a window has; a connect may use two windows (see [`ConnSlot::index`]).
    pub const WINDOW: u32 = 4;
    /// Slots a connect may use: [`ConnSlot::WINDOW`] in the hot region, then as many anywhere.
    pub const SLOTS_PER_CONNECT: u32 = 2 * Self::WINDOW;
    /// The hot region: the table's first 256 slots (16 KiB, 4 pages). Connect starts find
    /// their slot there while few connects are pending, which is nearly always, so the slots
    /// they touch stay in the cache and the TLB; over the whole 4 MiB default table nearly
    /// every start missed both.
    pub const HOT_SLOTS: u32 = 256;
    /// The largest table (slots), so a slot index fits the hash's 32 bits with room to spare.
    pub const MAX_SLOTS: u32 = 1 << 24;

    /// Slot `i` (< [`ConnSlot::SLOTS_PER_CONNECT`]) of `sk`'s windows in a table of `mask + 1`
    /// slots (a power of two): the first window at a hash of `sk` in the hot region, the second
    /// at another hash in the rest of the table (in a table no larger than the hot region, the
    /// whole table again). The second window must avoid the hot region: when the hot region is
    /// full, which is when the second window is needed, a second window inside it would be
    /// full too. The hash is the high half of a multiplicative (Fibonacci) hash, since socket
    /// addresses share their low bits.
    #[inline(always)]
    pub fn index(sk: u64, i: u32, mask: u32) -> u32 {
        let h = (sk.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32;
        if i < Self::WINDOW {
            return h.wrapping_add(i) & (mask & (Self::HOT_SLOTS - 1));
        }
        // Both second-window formulas use the hash's high bits, the first window its low ones,
        // so sockets that share a first window rarely share the second.
        let j = i - Self::WINDOW;
        if mask < Self::HOT_SLOTS {
            return h.rotate_right(16).wrapping_add(j) & mask;
        }
        // Windows starting in [HOT_SLOTS, slots - WINDOW]: multiply-shift maps the hash onto
        // that range evenly, and the window never wraps.
        let starts = u64::from(mask - Self::HOT_SLOTS - Self::WINDOW + 2);
        Self::HOT_SLOTS + ((u64::from(h) * starts) >> 32) as u32 + j
    }
}

pub const FAILURE_VERSION: u16 = 1;

/// A failed connect, sent to userspace as an event.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TcpFailureRecord {
    pub header: RecordHeader,
    pub cgroup_id: u64,
    /// Time from SYN_SENT to the failure.
    pub duration_ns: u64,
    pub tgid: u32,
    pub sk_err: i32,
    pub result: u16,
    pub dest: u16,
    pub dport: u16,
    pub family: u16,
    pub comm: [u8; 16],
    pub daddr: [u8; 16],
}
crate::assert_size!(TcpFailureRecord, 80);

impl TcpFailureRecord {
    pub const LEN: u16 = core::mem::size_of::<TcpFailureRecord>() as u16;
}

/// Destination-group trie key for groups with a port: port (big endian), family (big endian),
/// address. The prefix covers port and family fully, then the CIDR bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestPortKey {
    pub port: [u8; 2],
    pub family: [u8; 2],
    pub addr: [u8; 16],
}
crate::assert_size!(DestPortKey, 20);

/// Destination-group trie key for groups without a port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestAnyKey {
    pub family: [u8; 2],
    pub addr: [u8; 16],
}
crate::assert_size!(DestAnyKey, 18);

/// Offsets of the tracepoint fields the TCP programs read, from tracefs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpTpLayout {
    /// `sock:inet_sock_set_state`
    pub ss_skaddr: u16,
    pub ss_oldstate: u16,
    pub ss_newstate: u16,
    pub ss_dport: u16,
    pub ss_family: u16,
    pub ss_protocol: u16,
    pub ss_daddr: u16,
    pub ss_daddr_v6: u16,
    /// `skaddr` of `tcp:tcp_receive_reset`, `tcp:tcp_send_reset`, `tcp:tcp_retransmit_skb`.
    pub rx_reset_skaddr: u16,
    pub tx_reset_skaddr: u16,
    pub retrans_skaddr: u16,
    /// Non-zero once the daemon filled the layout.
    pub valid: u16,
}
crate::assert_size!(TcpTpLayout, 24);

impl TcpTpLayout {
    /// All offsets zero and `valid == 0`: the programs skip what needs this layout.
    // SAFETY: `#[repr(C)]` and made only of integers, so all-zero is a valid value.
    pub const INVALID: TcpTpLayout = unsafe { core::mem::zeroed() };
}

/// Offsets into `struct sock` / `struct tcp_sock` from BTF, plus how to find cgroups and
/// whether destination groups exist (both known at load time).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockLayout {
    /// `sk_err` and `srtt_us` are valid.
    pub valid: u32,
    pub sk_err: u32,
    pub srtt_us: u32,
    /// The fields below are valid: the raw tracepoints can read the socket themselves.
    pub raw_valid: u32,
    pub skc_family: u32,
    pub skc_dport: u32,
    pub skc_daddr: u32,
    pub skc_v6_daddr: u32,
    pub sk_protocol: u32,
    /// 1: the memory controller is on cgroup v2, so `bpf_get_current_cgroup_id()` is the memory
    /// cgroup's id; 0: walk `task_struct` (v1 and hybrid hosts).
    pub cgroup_id_from_helper: u32,
    /// Bit 0: groups with a port exist; bit 1: groups without a port exist.
    pub dest_groups: u32,
    /// `sock_common.skc_state` (one byte); valid with `valid`.
    pub skc_state: u32,
    /// Slots in the connect table minus one (a power of two minus one); set by the loader
    /// whatever else is known.
    pub conn_mask: u32,
    /// `tcp_sock.rcv_nxt` (0: unknown): still 0 on a connect that never got a SYN-ACK
    /// (`tcp_connect_init` zeroes it), which tells the error-report program a failed connect
    /// from one that got established unseen.
    pub rcv_nxt: u32,
    /// A slot whose connect started longer ago than this may be taken over by a new connect:
    /// its outcome was missed (or, if it still comes, counts as untracked).
    pub conn_max_age_ns: u64,
    /// Non-zero: the loader turned the programs' `bpf_rdonly_cast` placeholder into the kfunc
    /// (kernel 6.2+), so socket fields are direct loads checked against these BTF ids instead
    /// of `bpf_probe_read_kernel` calls.
    pub direct: u32,
    pub sock_btf_id: u32,
    pub tcp_sock_btf_id: u32,
    pub _pad2: u32,
}
crate::assert_size!(SockLayout, 80);

impl SockLayout {
    /// All offsets zero and `valid == 0`: the programs skip what needs this layout.
    // SAFETY: `#[repr(C)]` and made only of integers, so all-zero is a valid value.
    pub const INVALID: SockLayout = unsafe { core::mem::zeroed() };
    pub const DEST_WITH_PORT: u32 = 1;
    pub const DEST_ANY_PORT: u32 = 2;
    /// The helper id the programs call in place of the kfunc `bpf_rdonly_cast`; the loader
    /// rewrites each such call (see `sensor::loader::patch_rdonly_cast`).
    pub const RDONLY_CAST_PLACEHOLDER: u32 = 0x0bad_ca57;
}

/// TCP states as the tracepoint reports them.
pub mod state {
    pub const ESTABLISHED: i32 = 1;
    pub const SYN_SENT: i32 = 2;
    pub const SYN_RECV: i32 = 3;
    pub const CLOSE: i32 = 7;
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// Default sizes (configurable): active opens tracked from SYN_SENT until they end, and series
/// in each aggregation map.
pub const DEFAULT_TRACKED_CONNECTS: u32 = 65536;
pub const DEFAULT_SERIES: u32 = 16384;
pub const MAX_DEST_GROUPS: u32 = 1024;

#[cfg(feature = "user")]
mod user {
    // SAFETY (all): `#[repr(C)]`, only integers and integer arrays with explicit padding, so
    // every bit pattern is valid and there are no implicit holes.
    unsafe impl aya::Pod for super::FlowCountKey {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::ConnSlot {}
    unsafe impl aya::Pod for super::TcpFailureRecord {}
    unsafe impl aya::Pod for super::DestPortKey {}
    unsafe impl aya::Pod for super::DestAnyKey {}
    unsafe impl aya::Pod for super::TcpTpLayout {}
    unsafe impl aya::Pod for super::SockLayout {}
}
