//! Feature probes: what this kernel lets us load and attach, asked of the kernel itself
//! (never inferred from its version).

use std::path::Path;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_map_supported, is_program_supported},
};
use serde::Serialize;

use super::seccomp::{errno, ProcessSecurity};

/// One yes/no answer with the reason when it is no.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Support {
    pub name: &'static str,
    pub supported: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Support {
    pub(crate) fn yes(name: &'static str) -> Support {
        Support {
            name,
            supported: true,
            detail: None,
        }
    }
    pub(crate) fn no(name: &'static str, detail: impl Into<String>) -> Support {
        Support {
            name,
            supported: false,
            detail: Some(detail.into()),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct KernelFeatures {
    pub program_types: Vec<Support>,
    pub map_types: Vec<Support>,
    /// Attach mechanisms that a loadable program type still needs (kprobe PMU, BTF, ...).
    pub attach: Vec<Support>,
    /// Instruction-set features the programs choose between (`atomics`).
    pub instructions: Vec<Support>,
    /// `Some(why)` when a seccomp filter, not the kernel, refused the probes' `bpf()` calls:
    /// loading cannot work then, and the reason names the fix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bpf_denied_by_seccomp: Option<String>,
}

impl KernelFeatures {
    /// What the kernel accepts (the BTF entry comes with [`KernelFeatures::with_btf`]).
    pub fn probe() -> KernelFeatures {
        /// One probe's answer: supported or not, or the call failed (errno, message).
        type Answer = Result<bool, (Option<i32>, String)>;
        let programs: Vec<(&'static str, Answer)> = [
            ("tracepoint", ProgramType::TracePoint),
            ("raw_tracepoint", ProgramType::RawTracePoint),
            ("kprobe", ProgramType::KProbe),
            ("tracing (fentry/fexit)", ProgramType::Tracing),
        ]
        .into_iter()
        .map(|(name, t)| (name, is_program_supported(t).map_err(|e| (errno(&e), error_chain(&e)))))
        .collect();
        let maps: Vec<(&'static str, Answer)> = [
            ("perf_event_array", MapType::PerfEventArray),
            ("ringbuf", MapType::RingBuf),
            ("percpu_array", MapType::PerCpuArray),
            ("percpu_hash", MapType::PerCpuHash),
            ("hash", MapType::Hash),
            ("lru_hash", MapType::LruHash),
        ]
        .into_iter()
        .map(|(name, t)| (name, is_map_supported(t).map_err(|e| (errno(&e), error_chain(&e)))))
        .collect();
        // Only when every call was refused with EPERM under a filter is seccomp the cause: one
        // call that got through means bpf() passes the filter.
        let errnos: Vec<Option<i32>> = programs
            .iter()
            .chain(&maps)
            .map(|(_, a)| a.as_ref().err().and_then(|(e, _)| *e))
            .collect();
        let bpf_denied_by_seccomp = ProcessSecurity::current().diagnose_bpf(&errnos);
        let support = |(name, answer): (&'static str, Answer), kind: &str, failed: &str| match answer {
            Ok(true) => Support::yes(name),
            Ok(false) => Support::no(name, format!("the kernel refuses this {kind}")),
            Err((_, msg)) => Support::no(
                name,
                bpf_denied_by_seccomp
                    .clone()
                    .unwrap_or_else(|| format!("{failed}: {msg}")),
            ),
        };
        let program_types = programs
            .into_iter()
            .map(|a| support(a, "program type", "probing this program type failed"))
            .collect();
        let map_types = maps
            .into_iter()
            .map(|a| support(a, "map type", "probe failed"))
            .collect();
        KernelFeatures {
            program_types,
            map_types,
            attach: vec![kprobe_attach_support()],
            instructions: vec![super::insn::atomics()],
            bpf_denied_by_seccomp,
        }
    }

    /// Adds whether kernel BTF could be read.
    pub fn with_btf(mut self, btf_available: bool) -> KernelFeatures {
        self.attach.push(if btf_available {
            Support::yes("btf")
        } else {
            Support::no("btf", "no kernel BTF (/sys/kernel/btf/vmlinux or --btf-path)")
        });
        self
    }

    pub fn program(&self, name: &str) -> Option<&Support> {
        self.program_types.iter().find(|s| s.name.starts_with(name))
    }

    /// Whether BPF atomics (compare-and-swap) load: else the programs without them are used.
    pub fn atomics(&self) -> bool {
        self.instructions.iter().any(|s| s.name == "atomics" && s.supported)
    }

    pub fn attach(&self, name: &str) -> Option<&Support> {
        self.attach.iter().find(|s| s.name == name)
    }
}

/// `e` and its sources, joined: aya's top-level messages omit the errno.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// kprobes attach through the `kprobe` perf PMU, or through tracefs `kprobe_events` on old
/// kernels; with neither, a loadable kprobe program still cannot attach.
fn kprobe_attach_support() -> Support {
    let pmu = Path::new("/sys/bus/event_source/devices/kprobe/type");
    if pmu.exists() {
        return Support::yes("kprobe_attach");
    }
    for t in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if Path::new(t).join("kprobe_events").exists() {
            return Support::yes("kprobe_attach");
        }
    }
    Support::no(
        "kprobe_attach",
        "no kprobe PMU (/sys/bus/event_source/devices/kprobe) and no tracefs kprobe_events: this kernel was built without CONFIG_KPROBE_EVENTS",
    )
}
