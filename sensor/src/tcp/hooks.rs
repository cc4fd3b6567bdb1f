//! The TCP probe's hook ladder. Each hook has a program per connect table (see
//! sensor-ebpf/src/tcp/conn.rs): the array claimed by compare-and-swap where the kernel has BPF
//! atomics, the hash map where it has not. The feature probe (`KernelFeatures::atomics`)
//! decides, so each group tries one form's raw tracepoint, then its classic tracepoint.

use super::layout::sock_layout;
use crate::{
    kernel::insn::ATOMICS_NEED,
    probe::{HookCheck, HookGroup, HookKind, HookSpec, KernelContext, ProbeSpec, RecordKind},
};

/// One hook's four programs: raw tracepoint and classic tracepoint, each with and without
/// atomics (`raw` and `tp` name the programs with atomics; the others add `_nx`).
#[allow(clippy::too_many_arguments)]
const fn ladder(
    raw: &'static str,
    raw_nx: &'static str,
    raw_target: &'static str,
    tp: &'static str,
    tp_nx: &'static str,
    tp_target: &'static str,
    raw_checks: [HookCheck; 2],
) -> [HookSpec; 4] {
    [
        HookSpec {
            kind: HookKind::RawTracepoint,
            program: raw,
            target: raw_target,
            check: Some(raw_checks[0]),
        },
        HookSpec {
            kind: HookKind::RawTracepoint,
            program: raw_nx,
            target: raw_target,
            check: Some(raw_checks[1]),
        },
        HookSpec {
            kind: HookKind::Tracepoint,
            program: tp,
            target: tp_target,
            check: Some(with_atomics),
        },
        HookSpec {
            kind: HookKind::Tracepoint,
            program: tp_nx,
            target: tp_target,
            check: Some(without_atomics),
        },
    ]
}

const RAW: [HookCheck; 2] = [raw_with_atomics, raw_without_atomics];

const SET_STATE: [HookSpec; 4] = ladder(
    "tcp_set_state_raw",
    "tcp_set_state_raw_nx",
    "inet_sock_set_state",
    "tcp_set_state",
    "tcp_set_state_nx",
    "sock/inet_sock_set_state",
    RAW,
);
const RESET_RECEIVED: [HookSpec; 4] = ladder(
    "tcp_receive_reset_raw",
    "tcp_receive_reset_raw_nx",
    "tcp_receive_reset",
    "tcp_receive_reset",
    "tcp_receive_reset_nx",
    "tcp/tcp_receive_reset",
    RAW,
);
const RESET_SENT: [HookSpec; 4] = ladder(
    "tcp_send_reset_raw",
    "tcp_send_reset_raw_nx",
    "tcp_send_reset",
    "tcp_send_reset",
    "tcp_send_reset_nx",
    "tcp/tcp_send_reset",
    RAW,
);
const RETRANSMIT: [HookSpec; 4] = ladder(
    "tcp_retransmit_raw",
    "tcp_retransmit_raw_nx",
    "tcp_retransmit_skb",
    "tcp_retransmit",
    "tcp_retransmit_nx",
    "tcp/tcp_retransmit_skb",
    RAW,
);
const RECOVERY: [HookSpec; 2] = [
    HookSpec {
        kind: HookKind::RawTracepoint,
        program: "tcp_error_report_raw",
        target: "inet_sk_error_report",
        check: Some(recovery_with_atomics),
    },
    HookSpec {
        kind: HookKind::RawTracepoint,
        program: "tcp_error_report_raw_nx",
        target: "inet_sk_error_report",
        check: Some(recovery_without_atomics),
    },
];

/// Raw tracepoints first (no trace record is formatted for them, which matters on a path that
/// fires several times per connection), classic tracepoints as the fallback.
pub const SPEC: ProbeSpec = ProbeSpec {
    name: "tcp",
    counter_id: sensor_common::record::probe_id::TCP,
    groups: &[
        HookGroup {
            purpose: "connect state",
            required: true,
            hooks: &SET_STATE,
        },
        HookGroup {
            purpose: "resets received",
            required: false,
            hooks: &RESET_RECEIVED,
        },
        HookGroup {
            purpose: "resets sent",
            required: false,
            hooks: &RESET_SENT,
        },
        HookGroup {
            purpose: "retransmits",
            required: false,
            hooks: &RETRANSMIT,
        },
        HookGroup {
            purpose: "connect end recovery",
            required: false,
            hooks: &RECOVERY,
        },
    ],
    configure: None,
    records: &[RecordKind {
        kind: sensor_common::record::kind::TCP_CONNECT_FAILURE,
        len: sensor_common::tcp::TcpFailureRecord::LEN,
        version: sensor_common::tcp::FAILURE_VERSION,
    }],
    view: Some(&super::view::VIEW),
};

/// The programs with the compare-and-swap connect table.
fn with_atomics(k: &KernelContext) -> Result<(), String> {
    if k.features.atomics() {
        Ok(())
    } else {
        Err(format!("{ATOMICS_NEED} (the hash-map connect table is used)"))
    }
}

/// The programs with the hash-map connect table: only where atomics are missing.
fn without_atomics(k: &KernelContext) -> Result<(), String> {
    if k.features.atomics() {
        Err("not needed: this kernel has BPF atomics".into())
    } else {
        Ok(())
    }
}

fn raw_with_atomics(k: &KernelContext) -> Result<(), String> {
    with_atomics(k).and_then(|()| check_raw(k))
}

fn raw_without_atomics(k: &KernelContext) -> Result<(), String> {
    without_atomics(k).and_then(|()| check_raw(k))
}

fn recovery_with_atomics(k: &KernelContext) -> Result<(), String> {
    with_atomics(k).and_then(|()| check_recovery(k))
}

fn recovery_without_atomics(k: &KernelContext) -> Result<(), String> {
    without_atomics(k).and_then(|()| check_recovery(k))
}

/// The kernel function whose presence says a connect's `-> CLOSE` state change comes before its
/// `sk_error_report()` (6.10, and stable kernels it was backported to, e.g. Debian's 6.1).
const ORDERED_END: &str = "tcp_done_with_error";

/// The error-report entry recovers connect ends the set_state program missed (docs/
/// tcp-lost-runs.md). It needs the raw entries' socket fields, `tcp_sock.rcv_nxt`, a socket
/// argument, and a kernel that changes the state before it reports the error: where the error
/// comes first (timeouts, ICMP errors on older kernels) a skipped end cannot be recognised.
fn check_recovery(k: &KernelContext) -> Result<(), String> {
    check_raw(k)?;
    let btf = k.btf.as_ref().map_err(|e| format!("needs kernel BTF: {e}"))?;
    match btf.raw_tp_arg_is_struct_ptr("inet_sk_error_report", 0, "sock") {
        Ok(true) => {}
        Ok(false) => return Err("inet_sk_error_report's argument is not a struct sock pointer".into()),
        Err(e) => return Err(format!("no inet_sk_error_report raw tracepoint in BTF ({e})")),
    }
    btf.member_offset("tcp_sock", "rcv_nxt").map_err(|e| e.to_string())?;
    if !btf.has_func(ORDERED_END) {
        return Err(format!(
            "this kernel reports a failed connect's error before its state change (no {ORDERED_END} in BTF): a skipped end cannot be recognised"
        ));
    }
    Ok(())
}

/// The raw entries read the socket themselves: they need its field offsets from BTF.
fn check_raw(k: &KernelContext) -> Result<(), String> {
    let btf = k.btf.as_ref().map_err(|e| format!("needs kernel BTF: {e}"))?;
    sock_layout(btf, 0, false).and_then(|l| {
        if l.raw_valid != 0 {
            Ok(())
        } else {
            Err("socket fields missing".into())
        }
    })
}
