//! The TCP programs: each hook once per connect table. The plain names use the array with
//! compare-and-swap ([`Slots`], kernels with BPF atomics); the `_nx` names the hash map
//! ([`Hashed`]), and find the connecting task by helpers (`bpf_get_current_task_btf` is 5.11+,
//! and kernels without atomics are older than 5.12).

use aya_ebpf::{
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use sensor_common::tcp::{kind, ConnSlot};

use super::{
    conn::{Hashed, Slots},
    counted, error_report, raw_set_state, tp_set_state, tp_sk, who_by_btf, who_by_helpers,
};

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn tcp_set_state_raw(ctx: RawTracePointContext) -> u32 {
    raw_set_state::<Slots>(&ctx, who_by_btf);
    0
}

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn tcp_set_state_raw_nx(ctx: RawTracePointContext) -> u32 {
    raw_set_state::<Hashed>(&ctx, who_by_helpers);
    0
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn tcp_set_state(ctx: TracePointContext) -> u32 {
    tp_set_state::<Slots>(&ctx);
    0
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn tcp_set_state_nx(ctx: TracePointContext) -> u32 {
    tp_set_state::<Hashed>(&ctx);
    0
}

#[raw_tracepoint(tracepoint = "inet_sk_error_report")]
pub fn tcp_error_report_raw(ctx: RawTracePointContext) -> u32 {
    error_report::<Slots, _>(&ctx, ctx.arg(0));
    0
}

#[raw_tracepoint(tracepoint = "inet_sk_error_report")]
pub fn tcp_error_report_raw_nx(ctx: RawTracePointContext) -> u32 {
    error_report::<Hashed, _>(&ctx, ctx.arg(0));
    0
}

#[raw_tracepoint(tracepoint = "tcp_receive_reset")]
pub fn tcp_receive_reset_raw(ctx: RawTracePointContext) -> u32 {
    counted::<Slots>(ctx.arg(0), kind::RESET_RECEIVED, ConnSlot::RESET_RECEIVED);
    0
}

#[raw_tracepoint(tracepoint = "tcp_receive_reset")]
pub fn tcp_receive_reset_raw_nx(ctx: RawTracePointContext) -> u32 {
    counted::<Hashed>(ctx.arg(0), kind::RESET_RECEIVED, ConnSlot::RESET_RECEIVED);
    0
}

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    counted::<Slots>(
        tp_sk(&ctx, |l| l.rx_reset_skaddr),
        kind::RESET_RECEIVED,
        ConnSlot::RESET_RECEIVED,
    );
    0
}

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub fn tcp_receive_reset_nx(ctx: TracePointContext) -> u32 {
    counted::<Hashed>(
        tp_sk(&ctx, |l| l.rx_reset_skaddr),
        kind::RESET_RECEIVED,
        ConnSlot::RESET_RECEIVED,
    );
    0
}

#[raw_tracepoint(tracepoint = "tcp_send_reset")]
pub fn tcp_send_reset_raw(ctx: RawTracePointContext) -> u32 {
    counted::<Slots>(ctx.arg(0), kind::RESET_SENT, 0);
    0
}

#[raw_tracepoint(tracepoint = "tcp_send_reset")]
pub fn tcp_send_reset_raw_nx(ctx: RawTracePointContext) -> u32 {
    counted::<Hashed>(ctx.arg(0), kind::RESET_SENT, 0);
    0
}

#[tracepoint(category = "tcp", name = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    counted::<Slots>(tp_sk(&ctx, |l| l.tx_reset_skaddr), kind::RESET_SENT, 0);
    0
}

#[tracepoint(category = "tcp", name = "tcp_send_reset")]
pub fn tcp_send_reset_nx(ctx: TracePointContext) -> u32 {
    counted::<Hashed>(tp_sk(&ctx, |l| l.tx_reset_skaddr), kind::RESET_SENT, 0);
    0
}

#[raw_tracepoint(tracepoint = "tcp_retransmit_skb")]
pub fn tcp_retransmit_raw(ctx: RawTracePointContext) -> u32 {
    counted::<Slots>(ctx.arg(0), kind::RETRANSMIT, 0);
    0
}

#[raw_tracepoint(tracepoint = "tcp_retransmit_skb")]
pub fn tcp_retransmit_raw_nx(ctx: RawTracePointContext) -> u32 {
    counted::<Hashed>(ctx.arg(0), kind::RETRANSMIT, 0);
    0
}

#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub fn tcp_retransmit(ctx: TracePointContext) -> u32 {
    counted::<Slots>(tp_sk(&ctx, |l| l.retrans_skaddr), kind::RETRANSMIT, 0);
    0
}

#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub fn tcp_retransmit_nx(ctx: TracePointContext) -> u32 {
    counted::<Hashed>(tp_sk(&ctx, |l| l.retrans_skaddr), kind::RETRANSMIT, 0);
    0
}
