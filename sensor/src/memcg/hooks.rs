//! The memcg probe's hooks: both ends of memcg and direct reclaim, each its own group.

use crate::probe::{HookGroup, HookKind, HookSpec, ProbeSpec};

/// Reclaim stalls need both ends of each reclaim; each end is its own hook group.
pub const SPEC: ProbeSpec = ProbeSpec {
    name: "memcg",
    counter_id: sensor_common::record::probe_id::MEMCG,
    groups: &[
        HookGroup {
            purpose: "memcg reclaim start",
            required: true,
            hooks: &[HookSpec {
                kind: HookKind::Tracepoint,
                program: "memcg_reclaim_begin",
                target: "vmscan/mm_vmscan_memcg_reclaim_begin",
                check: None,
            }],
        },
        HookGroup {
            purpose: "memcg reclaim end",
            required: true,
            hooks: &[HookSpec {
                kind: HookKind::Tracepoint,
                program: "memcg_reclaim_end",
                target: "vmscan/mm_vmscan_memcg_reclaim_end",
                check: None,
            }],
        },
        HookGroup {
            purpose: "direct reclaim start",
            required: true,
            hooks: &[HookSpec {
                kind: HookKind::Tracepoint,
                program: "direct_reclaim_begin",
                target: "vmscan/mm_vmscan_direct_reclaim_begin",
                check: None,
            }],
        },
        HookGroup {
            purpose: "direct reclaim end",
            required: true,
            hooks: &[HookSpec {
                kind: HookKind::Tracepoint,
                program: "direct_reclaim_end",
                target: "vmscan/mm_vmscan_direct_reclaim_end",
                check: None,
            }],
        },
    ],
    configure: None,
    records: &[],
    view: Some(&super::view::VIEW),
};
