//! TCP connects: destination groups, per-workload counters and histograms read from the
//! kernel's aggregation maps, connect-failure events. The probe's parts: `hooks` (programs and
//! their fallbacks), `layout` (kernel offsets), `config`, `destinations`, `event`, `metrics`,
//! `running` (the attached probe's state), `view` (its part of the web summary), `coalesce`
//! and `kfunc`.

pub mod coalesce;
pub mod config;
pub mod destinations;
pub mod event;
pub mod hooks;
pub mod kfunc;
pub mod layout;
pub mod metrics;
pub mod running;

mod view;

pub use event::TcpFailure;
pub use hooks::SPEC;

use std::{sync::Arc, time::Duration};

use aya::maps::{lpm_trie::LpmTrie, MapData};
use sensor_common::{
    names::{globals, maps},
    tcp::{DestAnyKey, DestPortKey},
};

use self::{
    config::TcpConfig,
    destinations::{dest_group_bits, load_destinations},
    layout::layouts,
    running::{TcpMaps, TcpSlice},
};
use crate::probe::{KernelContext, LoadPlan, Probe, ProbeSpec, Running, Section, StartContext, StartError};

/// The TCP probe: connects tracked from SYN_SENT to their outcome in the kernel, counted and
/// timed per workload and destination group there; failures as events.
pub struct TcpProbe {
    cfg: TcpConfig,
}

impl TcpProbe {
    pub fn new(cfg: TcpConfig) -> TcpProbe {
        TcpProbe { cfg }
    }
}

/// Entries of the connect table a kernel does not use (an LRU hash hands its entries out to
/// CPUs in batches; a few hundred keep it valid everywhere at little cost).
const UNUSED_TABLE: u32 = 256;

/// How often workloads are rescanned for this probe (labels of new cgroups, vanished series).
const DISCOVERY: Duration = Duration::from_secs(5);

impl Probe for TcpProbe {
    fn spec(&self) -> &'static ProbeSpec {
        &SPEC
    }

    fn section(&self) -> &dyn Section {
        &self.cfg
    }

    fn prepare(&self, kctx: &KernelContext, plan: &mut LoadPlan) {
        let memory_on_v2 = !crate::cgroup::Hierarchies::discover().memory_is_v1();
        let (tp, mut sock, notes) = layouts(kctx, dest_group_bits(&self.cfg.destinations), memory_on_v2);
        let slots = self.cfg.conn_slots();
        sock.conn_mask = slots.saturating_sub(1);
        sock.conn_max_age_ns = u64::try_from(self.cfg.connect_max_age.as_nanos()).unwrap_or(u64::MAX);
        for n in &notes {
            tracing::warn!(note = %n, "TCP layout is partial");
        }
        // Socket fields as direct loads where the running kernel has `bpf_rdonly_cast` (its BTF
        // ids are only meaningful for the running kernel's own BTF, not a `--btf-path` file).
        let kfunc = match (&kctx.btf, kctx.btf_path.is_none()) {
            (Ok(b), true) if sock.raw_valid != 0 => b
                .type_id("bpf_rdonly_cast", true)
                .and_then(|f| Some((f, b.type_id("sock", false)?, b.type_id("tcp_sock", false)?))),
            _ => None,
        };
        if let Some((_, sock_id, tcp_id)) = kfunc {
            sock.direct = 1;
            sock.sock_btf_id = sock_id;
            sock.tcp_sock_btf_id = tcp_id;
        }
        tracing::debug!(
            direct = kfunc.is_some(),
            "TCP socket fields: direct loads through bpf_rdonly_cast, else bpf_probe_read_kernel"
        );
        plan.global(globals::TCP_TP_LAYOUT, &tp);
        plan.global(globals::SOCK_LAYOUT, &sock);
        // One connect table runs (see `hooks`): the other is created at its smallest.
        let (slots_array, slots_hash) = if kctx.features.atomics() {
            (slots, UNUSED_TABLE)
        } else {
            (1, slots)
        };
        plan.map_size(maps::TCP_CONNS, slots_array);
        plan.map_size(maps::TCP_CONNS_NX, slots_hash);
        plan.map_size(maps::TCP_COUNTS, self.cfg.max_series);
        plan.map_size(maps::TCP_HISTS, self.cfg.max_series);
        let id = kfunc.map(|k| k.0);
        plan.patch(Box::new(move |object: &mut Vec<u8>| {
            *object = kfunc::patch_rdonly_cast(object, id);
        }));
    }

    fn start(&self, ctx: &mut StartContext<'_>) -> Result<Arc<dyn Running>, StartError> {
        if !ctx.report.state.running() {
            return Ok(Arc::new(crate::probe::Idle));
        }
        let mut with_port: LpmTrie<MapData, DestPortKey, u16> = ctx.take_map(maps::TCP_DEST_PORT)?;
        let mut any_port: LpmTrie<MapData, DestAnyKey, u16> = ctx.take_map(maps::TCP_DEST_ANY)?;
        load_destinations(&self.cfg.destinations, &mut with_port, &mut any_port)
            .map_err(|e| StartError::Other(format!("probes.tcp.destinations: {e}")))?;
        let maps = TcpMaps {
            counts: ctx.take_map(maps::TCP_COUNTS)?,
            host_counts: ctx.take_map(maps::TCP_HOST_COUNTS)?,
            recovered: ctx.take_map(maps::TCP_RECOVERED)?,
            hists: ctx.take_map(maps::TCP_HISTS)?,
        };
        // The loaded program references both tries, so they outlive these handles.
        let slice = TcpSlice::new(
            ctx.registry,
            ctx.sources,
            Arc::clone(ctx.hub),
            &self.cfg,
            Arc::clone(ctx.discovery),
            maps,
        )?;
        Ok(slice)
    }

    fn discovery_interval(&self) -> Option<Duration> {
        Some(DISCOVERY)
    }
}

#[cfg(test)]
mod tests {
    /// Socket addresses are slab objects a fixed size apart: their slots must still spread, in
    /// the hot region and over the whole table.
    #[test]
    fn connect_slots_spread_slab_addresses() {
        use sensor_common::tcp::ConnSlot;
        let sk = |i: u64| 0xffff_8881_0a00_0000u64 + i * 2368;
        let mask = 65535;
        // The first window lies in the hot region: 512 sockets, no slot anyone's first more
        // than a few times.
        let mut hot = vec![0u32; ConnSlot::HOT_SLOTS as usize];
        for i in 0..512 {
            let x = ConnSlot::index(sk(i), 0, mask);
            assert!(x < ConnSlot::HOT_SLOTS, "{x}");
            hot[x as usize] += 1;
        }
        assert!(hot.iter().all(|&h| h <= 4), "max {:?}", hot.iter().max());
        // The second spreads over the rest of the table, never into the hot region (full when
        // the second window is needed) nor past the end: 4096 sockets in 65536 slots.
        let mut hits = vec![0u32; 65536];
        for i in 0..4096 {
            for j in 0..ConnSlot::WINDOW {
                let x = ConnSlot::index(sk(i), ConnSlot::WINDOW + j, mask);
                assert!((ConnSlot::HOT_SLOTS..=mask).contains(&x), "{x}");
                hits[x as usize] += u32::from(j == 0);
            }
        }
        assert!(hits.iter().all(|&h| h <= 3), "max {:?}", hits.iter().max());
        // The smallest table with a region beyond the hot one: second windows fill it, up to
        // its last slot.
        let mut last = 0;
        for i in 0..4096 {
            let x = ConnSlot::index(sk(i), ConnSlot::SLOTS_PER_CONNECT - 1, 511);
            assert!((ConnSlot::HOT_SLOTS + ConnSlot::WINDOW - 1..=511).contains(&x), "{x}");
            last = last.max(x);
        }
        assert_eq!(last, 511);
        // 64 sockets in 64 slots: about 1 - 1/e of the slots are somebody's first.
        let mut first = [false; 64];
        for i in 0..64 {
            first[ConnSlot::index(sk(i), 0, 63) as usize] = true;
        }
        let used = first.iter().filter(|&&u| u).count();
        assert!((30..=56).contains(&used), "{used} of 64 slots");
        // Both windows wrap around the end of their region.
        let s = (0..)
            .map(sk)
            .find(|&s| ConnSlot::index(s, 0, mask) == ConnSlot::HOT_SLOTS - 1)
            .unwrap();
        assert_eq!(ConnSlot::index(s, 1, mask), 0);
        // In a table no larger than the hot region the second window wraps too.
        let s = (0..)
            .map(sk)
            .find(|&s| ConnSlot::index(s, ConnSlot::WINDOW, 63) == 63)
            .unwrap();
        assert_eq!(ConnSlot::index(s, ConnSlot::WINDOW + 1, 63), 0);
    }
}
