//! Where this kernel keeps what the TCP programs read: tracepoint field offsets from tracefs,
//! `struct sock` offsets from BTF.

use sensor_common::tcp::{SockLayout, TcpTpLayout};

use crate::{
    kernel::{btf::KernelBtf, tracefs::Tracefs},
    probe::KernelContext,
};

/// Tracepoint offsets from tracefs; a missing required field leaves the layout invalid (the
/// program then does nothing and the attach still reports the tracepoint).
pub fn tp_layout(t: &Tracefs) -> Result<TcpTpLayout, String> {
    let ss = t.format("sock", "inet_sock_set_state").map_err(|e| e.to_string())?;
    let need = |name: &str, sizes: &[u16]| {
        ss.offset_if(name, sizes)
            .ok_or_else(|| format!("inet_sock_set_state has no usable {name}"))
    };
    let skaddr = |cat: &str, tp: &str| {
        t.format(cat, tp)
            .ok()
            .and_then(|f| f.offset_if("skaddr", &[8]))
            .unwrap_or(0)
    };
    Ok(TcpTpLayout {
        ss_skaddr: need("skaddr", &[8])?,
        ss_oldstate: need("oldstate", &[4])?,
        ss_newstate: need("newstate", &[4])?,
        ss_dport: need("dport", &[2])?,
        ss_family: need("family", &[2])?,
        ss_protocol: need("protocol", &[2])?,
        ss_daddr: need("daddr", &[4])?,
        ss_daddr_v6: need("daddr_v6", &[16])?,
        rx_reset_skaddr: skaddr("tcp", "tcp_receive_reset"),
        tx_reset_skaddr: skaddr("tcp", "tcp_send_reset"),
        retrans_skaddr: skaddr("tcp", "tcp_retransmit_skb"),
        valid: 1,
    })
}

/// Socket offsets from BTF plus the load-time switches (`dest_groups`: bits of
/// `SockLayout::DEST_*`; `memory_on_v2`: the v2 cgroup id is the memory cgroup's id).
pub fn sock_layout(btf: &KernelBtf, dest_groups: u32, memory_on_v2: bool) -> Result<SockLayout, String> {
    let off = |s: &str, m: &str| btf.member_offset(s, m).map_err(|e| e.to_string());
    let mut l = SockLayout::INVALID;
    l.sk_err = off("sock", "sk_err")?;
    l.srtt_us = off("tcp_sock", "srtt_us")?;
    l.skc_state = off("sock", "__sk_common")? + off("sock_common", "skc_state")?;
    // Only the error-report entry needs it (its check asks for it again).
    l.rcv_nxt = off("tcp_sock", "rcv_nxt").unwrap_or(0);
    l.valid = 1;
    l.dest_groups = dest_groups;
    l.cgroup_id_from_helper = u32::from(memory_on_v2);
    // `sk_protocol` was a bitfield before 5.6: then only the classic tracepoints work.
    let raw = (|| -> Result<(), String> {
        let common = off("sock", "__sk_common")?;
        l.skc_family = common + off("sock_common", "skc_family")?;
        l.skc_dport = common + off("sock_common", "skc_dport")?;
        l.skc_daddr = common + off("sock_common", "skc_daddr")?;
        l.skc_v6_daddr = common + off("sock_common", "skc_v6_daddr")?;
        l.sk_protocol = off("sock", "sk_protocol")?;
        Ok(())
    })();
    if raw.is_ok() {
        l.raw_valid = 1;
    }
    Ok(l)
}

/// Both layouts for the loader, with notes on what is missing.
pub fn layouts(k: &KernelContext, dest_groups: u32, memory_on_v2: bool) -> (TcpTpLayout, SockLayout, Vec<String>) {
    let mut notes = Vec::new();
    let tp = match &k.tracefs {
        Ok(t) => tp_layout(t).unwrap_or_else(|e| {
            notes.push(e);
            TcpTpLayout::INVALID
        }),
        Err(e) => {
            notes.push(format!("tracefs: {e}"));
            TcpTpLayout::INVALID
        }
    };
    let sock = match &k.btf {
        Ok(b) => sock_layout(b, dest_groups, memory_on_v2).unwrap_or_else(|e| {
            notes.push(format!("sock layout (RTT, failure reasons): {e}"));
            SockLayout {
                dest_groups,
                cgroup_id_from_helper: u32::from(memory_on_v2),
                ..SockLayout::INVALID
            }
        }),
        Err(e) => {
            notes.push(format!("BTF: {e}"));
            SockLayout {
                dest_groups,
                cgroup_id_from_helper: u32::from(memory_on_v2),
                ..SockLayout::INVALID
            }
        }
    };
    (tp, sock, notes)
}
