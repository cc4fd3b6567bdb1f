//! Loads the embedded eBPF object and attaches each enabled probe with the best hook this
//! kernel accepts, recording every attempt so `doctor`, `/metrics` and logs agree.

use std::path::PathBuf;

use sensor_common::tcp::SockLayout;

use aya::{
    programs::{FEntry, KProbe, RawTracePoint, TracePoint},
    Ebpf, EbpfLoader,
};

use crate::{
    kernel::{btf::KernelBtf, features::KernelFeatures, tracefs::Tracefs},
    oom,
    probe::{GroupReport, HookAttempt, HookKind, HookSpec, ProbeReport, ProbeSpec},
};

/// The kernel programs, built by `build.rs` and embedded so the binary is self-contained.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sensor"));

/// Every probe this build knows, in registration order.
pub fn registry() -> &'static [ProbeSpec] {
    &[oom::SPEC, crate::memcg::SPEC, crate::tcp::SPEC]
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the eBPF object failed: {0}")]
    Object(#[from] aya::EbpfError),
    #[error("opening the event rings failed: {0}")]
    Rings(#[from] crate::transport::TransportError),
}

/// What the loader learned about the kernel before loading anything.
pub struct KernelContext {
    pub features: KernelFeatures,
    pub tracefs: Result<Tracefs, String>,
    pub btf: Result<KernelBtf, String>,
    /// The same BTF in aya's form, needed to load fentry programs.
    pub aya_btf: Option<aya::Btf>,
}

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub btf_path: Option<PathBuf>,
    pub tracefs_path: Option<PathBuf>,
    /// Probe names to skip (disabled in the configuration).
    pub disabled: Vec<&'static str>,
    /// Hooks a probe must not use (`probes.<name>.exclude_hooks`).
    pub excluded: Vec<(&'static str, HookKind)>,
    /// Map sizes from the configuration, applied before the maps are created.
    pub map_sizes: Vec<(&'static str, u32)>,
    /// `SockLayout::DEST_*` bits: which kinds of TCP destination groups are configured.
    pub tcp_dest_groups: u32,
    /// Slots of the TCP connect table (a power of two) and when a slot's connect counts as
    /// missed.
    pub tcp_conn_slots: u32,
    pub tcp_conn_max_age: std::time::Duration,
    /// Open the event rings (pages per CPU) before the programs attach; `None` (a dry run,
    /// as in `sensor doctor`) leaves them closed.
    pub perf_ring_pages: Option<usize>,
}

impl KernelContext {
    pub fn discover(opts: &LoadOptions) -> KernelContext {
        let btf = KernelBtf::open(opts.btf_path.as_deref()).map_err(|e| e.to_string());
        let aya_btf = match &opts.btf_path {
            Some(p) => aya::Btf::parse_file(p, aya::Endianness::default()).ok(),
            None => aya::Btf::from_sys_fs().ok(),
        };
        let features = KernelFeatures::probe(btf.is_ok());
        let tracefs = Tracefs::locate(opts.tracefs_path.as_deref()).map_err(|e| e.to_string());
        KernelContext {
            features,
            tracefs,
            btf,
            aya_btf,
        }
    }
}

pub struct Loaded {
    pub ebpf: Ebpf,
    pub reports: Vec<ProbeReport>,
    /// Every CPU's event ring, open since before the first program attached.
    pub rings: Vec<crate::transport::OpenRing>,
}

/// Rewrites every call of the `bpf_rdonly_cast` placeholder (see `SockLayout::direct`) in the
/// object: into a call of the kfunc with BTF id `kfunc` (`src_reg` 2, `BPF_PSEUDO_KFUNC_CALL`),
/// or without it into `bpf_ktime_get_ns`, valid everywhere and never reached (the programs
/// only call the placeholder when `direct` is set), so the object loads on any kernel.
pub fn patch_rdonly_cast(object: &[u8], kfunc: Option<u32>) -> Vec<u8> {
    const BPF_CALL: u8 = 0x85;
    const BPF_FUNC_KTIME_GET_NS: u32 = 5;
    let mut out = object.to_vec();
    let mut placeholder = [BPF_CALL, 0, 0, 0, 0, 0, 0, 0];
    placeholder[4..].copy_from_slice(&SockLayout::RDONLY_CAST_PLACEHOLDER.to_le_bytes());
    let (regs, imm) = match kfunc {
        Some(id) => (0x20, id),
        None => (0x00, BPF_FUNC_KTIME_GET_NS),
    };
    // Instructions are 8 bytes at 8-aligned offsets of 8-aligned sections.
    for insn in out.chunks_exact_mut(8) {
        if insn == placeholder {
            insn[1] = regs;
            insn[4..].copy_from_slice(&imm.to_le_bytes());
        }
    }
    out
}

/// Loads the object with layouts for this kernel and attaches every enabled probe.
pub fn load(kctx: &KernelContext, opts: &LoadOptions) -> Result<Loaded, LoadError> {
    let layouts = oom::Layouts::discover(kctx);
    for n in &layouts.notes {
        tracing::warn!(note = %n, "OOM layout is partial");
    }
    let memory_on_v2 = !crate::cgroup::Hierarchies::discover().memory_is_v1();
    let (tcp_tp, mut tcp_sock, tcp_notes) = crate::tcp::layouts(kctx, opts.tcp_dest_groups, memory_on_v2);
    tcp_sock.conn_mask = opts.tcp_conn_slots.saturating_sub(1);
    tcp_sock.conn_max_age_ns = u64::try_from(opts.tcp_conn_max_age.as_nanos()).unwrap_or(u64::MAX);
    for n in &tcp_notes {
        tracing::warn!(note = %n, "TCP layout is partial");
    }
    let mut loader = EbpfLoader::new();
    loader.btf(kctx.aya_btf.as_ref());
    layouts.apply(&mut loader);
    loader.override_global("TCP_TP_LAYOUT", &tcp_tp, true);
    for (name, size) in &opts.map_sizes {
        loader.map_max_entries(name, *size);
    }
    // Socket fields as direct loads where the running kernel has `bpf_rdonly_cast` (its BTF
    // ids are only meaningful for the running kernel's own BTF, not a `--btf-path` file).
    let kfunc = match (&kctx.btf, opts.btf_path.is_none()) {
        (Ok(b), true) if tcp_sock.raw_valid != 0 => b
            .type_id("bpf_rdonly_cast", true)
            .and_then(|f| Some((f, b.type_id("sock", false)?, b.type_id("tcp_sock", false)?))),
        _ => None,
    };
    if let Some((_, sock, tcp)) = kfunc {
        tcp_sock.direct = 1;
        tcp_sock.sock_btf_id = sock;
        tcp_sock.tcp_sock_btf_id = tcp;
    }
    tracing::debug!(
        direct = kfunc.is_some(),
        "TCP socket fields: direct loads through bpf_rdonly_cast, else bpf_probe_read_kernel"
    );
    loader.override_global("SOCK_LAYOUT", &tcp_sock, true);
    let object = patch_rdonly_cast(EBPF_OBJECT, kfunc.map(|k| k.0));
    let mut ebpf = loader.load(&object)?;
    let rings = match opts.perf_ring_pages {
        Some(pages) => {
            let events = ebpf
                .take_map("EVENTS")
                .ok_or(crate::transport::TransportError::MissingMap("EVENTS"))?;
            crate::transport::open_rings(events, pages)?
        }
        None => Vec::new(),
    };
    let mut reports = Vec::new();
    for spec in registry() {
        if opts.disabled.contains(&spec.name) {
            reports.push(ProbeReport::disabled(spec.name));
            continue;
        }
        reports.push(attach_probe(&mut ebpf, kctx, spec, opts));
    }
    Ok(Loaded { ebpf, reports, rings })
}

fn attach_probe(ebpf: &mut Ebpf, kctx: &KernelContext, spec: &ProbeSpec, opts: &LoadOptions) -> ProbeReport {
    let mut groups: Vec<GroupReport> = Vec::new();
    for group in spec.groups {
        configure(ebpf, spec, &groups);
        let mut attempts = Vec::new();
        for hook in group.hooks {
            let res = if opts.excluded.contains(&(spec.name, hook.kind)) {
                Err(format!(
                    "excluded by configuration (probes.{}.exclude_hooks)",
                    spec.name
                ))
            } else {
                precheck(kctx, hook).and_then(|()| attach_hook(ebpf, kctx, hook))
            };
            let ok = res.is_ok();
            attempts.push(HookAttempt {
                hook: hook.kind,
                target: hook.target,
                ok,
                error: res.err(),
            });
            if ok {
                break;
            }
        }
        groups.push(GroupReport::from_attempts(group, attempts));
    }
    configure(ebpf, spec, &groups);
    ProbeReport::from_groups(spec.name, groups)
}

fn configure(ebpf: &mut Ebpf, spec: &ProbeSpec, groups: &[GroupReport]) {
    if let Some(f) = spec.configure {
        if let Err(e) = f(ebpf, groups) {
            tracing::error!(probe = spec.name, error = %e, "configuring the probe's programs failed");
        }
    }
}

/// Cheap checks that explain a failure better than the syscall error would.
fn precheck(kctx: &KernelContext, hook: &HookSpec) -> Result<(), String> {
    if let Some(check) = hook.check {
        check(kctx)?;
    }
    let unsupported = |name: &str| -> Option<String> {
        match kctx.features.program(name) {
            Some(s) if !s.supported => Some(format!(
                "{} programs unavailable: {}",
                name,
                s.detail.as_deref().unwrap_or("unsupported")
            )),
            _ => None,
        }
    };
    match hook.kind {
        HookKind::Fentry => {
            if let Some(e) = unsupported("tracing") {
                return Err(e);
            }
            match &kctx.btf {
                Err(e) => Err(format!("fentry needs kernel BTF: {e}")),
                Ok(b) if !b.has_func(hook.target) => Err(format!("function {} not in kernel BTF", hook.target)),
                Ok(_) => Ok(()),
            }
        }
        HookKind::Kprobe => {
            if let Some(e) = unsupported("kprobe") {
                return Err(e);
            }
            match kctx.features.attach("kprobe_attach") {
                Some(s) if !s.supported => Err(format!("kprobes cannot attach: {}", s.detail.as_deref().unwrap_or(""))),
                _ => Ok(()),
            }
        }
        HookKind::Tracepoint => {
            if let Some(e) = unsupported("tracepoint") {
                return Err(e);
            }
            let tfs = kctx.tracefs.as_ref().map_err(|e| format!("tracefs unavailable: {e}"))?;
            let (cat, name) = split_tp(hook.target)?;
            if !tfs.has_event(cat, name) {
                return Err(format!("tracepoint {} does not exist on this kernel", hook.target));
            }
            Ok(())
        }
        HookKind::RawTracepoint => unsupported("raw_tracepoint").map_or(Ok(()), Err),
    }
}

fn split_tp(target: &str) -> Result<(&str, &str), String> {
    target
        .split_once('/')
        .ok_or_else(|| format!("bad tracepoint name {target}"))
}

/// Keeps error strings bounded (a verifier log can be megabytes) and includes the source chain.
fn short(e: impl std::error::Error) -> String {
    let s = crate::kernel::features::error_chain(&e);
    const MAX: usize = 2000;
    if s.len() <= MAX {
        return s;
    }
    let mut cut = s.len() - MAX;
    while !s.is_char_boundary(cut) {
        cut += 1;
    }
    format!("...{}", &s[cut..])
}

fn attach_hook(ebpf: &mut Ebpf, kctx: &KernelContext, hook: &HookSpec) -> Result<(), String> {
    let prog = ebpf
        .program_mut(hook.program)
        .ok_or_else(|| format!("program {} missing from the eBPF object", hook.program))?;
    match hook.kind {
        HookKind::Tracepoint => {
            let (cat, name) = split_tp(hook.target)?;
            let p: &mut TracePoint = prog.try_into().map_err(short)?;
            p.load().map_err(short)?;
            p.attach(cat, name).map(drop).map_err(short)
        }
        HookKind::RawTracepoint => {
            let p: &mut RawTracePoint = prog.try_into().map_err(short)?;
            p.load().map_err(short)?;
            p.attach(hook.target).map(drop).map_err(short)
        }
        HookKind::Kprobe => {
            let p: &mut KProbe = prog.try_into().map_err(short)?;
            p.load().map_err(short)?;
            p.attach(hook.target, 0).map(drop).map_err(short)
        }
        HookKind::Fentry => {
            let btf = kctx.aya_btf.as_ref().ok_or("kernel BTF could not be parsed by aya")?;
            let p: &mut FEntry = prog.try_into().map_err(short)?;
            p.load(hook.target, btf).map_err(short)?;
            p.attach().map(drop).map_err(short)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insn(code: u8, regs: u8, imm: u32) -> [u8; 8] {
        let mut i = [code, regs, 0, 0, 0, 0, 0, 0];
        i[4..].copy_from_slice(&imm.to_le_bytes());
        i
    }

    #[test]
    fn rdonly_cast_placeholder_becomes_the_kfunc_or_a_harmless_helper() {
        let call = insn(0x85, 0, SockLayout::RDONLY_CAST_PLACEHOLDER);
        let other = insn(0x85, 0, 113);
        // The placeholder's bytes at an odd offset are data, not an instruction.
        let mut object = [other, call, other, call].concat();
        object.extend_from_slice(&[0u8; 3]);
        object.extend_from_slice(&call);
        object.extend_from_slice(&[0u8; 5]);
        let kf = patch_rdonly_cast(&object, Some(77_001));
        assert_eq!(&kf[8..16], &insn(0x85, 0x20, 77_001));
        assert_eq!(&kf[24..32], &insn(0x85, 0x20, 77_001));
        assert_eq!(&kf[0..8], &other);
        assert_eq!(&kf[35..43], &call, "unaligned bytes untouched");
        let plain = patch_rdonly_cast(&object, None);
        assert_eq!(&plain[8..16], &insn(0x85, 0, 5));
        assert_eq!(plain.len(), object.len());
    }
}
