//! Loads the embedded eBPF object and attaches each enabled probe with the best hook this
//! kernel accepts, recording every attempt so `doctor`, `/metrics` and logs agree.

use std::{path::PathBuf, sync::Arc};

use aya::{
    programs::{FEntry, KProbe, RawTracePoint, TracePoint},
    Ebpf, EbpfLoader,
};
use sensor_common::names::{globals, maps};

use crate::probe::{
    GroupReport, HookAttempt, HookKind, HookSpec, KernelContext, LoadPlan, Probe, ProbeReport, ProbeSpec,
};

/// The kernel programs, built by `build.rs` and embedded so the binary is self-contained.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sensor"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the eBPF object failed: {0}")]
    Object(#[from] aya::EbpfError),
    #[error("opening the event rings failed: {0}")]
    Rings(#[from] crate::transport::TransportError),
    #[error("{0}")]
    Btf(String),
    #[error("kernel log ring: {0}")]
    KernelLog(#[source] aya_log::Error),
    /// A seccomp filter refuses `bpf()` (the reason names the fix).
    #[error("{0}")]
    Seccomp(String),
    /// A probe sized a map the object does not have (aya would keep the default silently).
    #[error("a probe sizes map {0}, which the eBPF object does not have")]
    UnknownMap(&'static str),
}

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub btf_path: Option<PathBuf>,
    pub tracefs_path: Option<PathBuf>,
    /// Open the event rings (pages per CPU) before the programs attach; `None` (a dry run,
    /// as in `sensor doctor`) leaves them closed.
    pub perf_ring_pages: Option<usize>,
    /// Kernel-side diagnostics (`kernel_log`): enabled in the programs and read back.
    pub kernel_log: bool,
}

impl LoadOptions {
    /// What the kernel offers (blocking: probes the kernel, reads tracefs and BTF).
    pub fn kernel_context(&self) -> KernelContext {
        KernelContext::discover(self.btf_path.as_deref(), self.tracefs_path.as_deref())
    }
}

pub struct Loaded {
    pub ebpf: Ebpf,
    pub reports: Vec<ProbeReport>,
    /// Every CPU's event ring, open since before the first program attached.
    pub rings: Vec<crate::transport::OpenRing>,
    /// The kernel diagnostics' ring, when `kernel_log` is on.
    pub kernel_log: Option<crate::kernel_log::Logger>,
}

/// Each hook's precondition per probe and group (see `precheck`).
type Prechecks = Vec<Vec<Vec<Result<(), String>>>>;

/// Loads the object with what every probe asked for (layouts for this kernel, map sizes,
/// patches), opens the event rings, then attaches every enabled probe. Blocking. The parsed
/// BTF in `kctx` is released once the probes took what they need from it.
pub fn load(kctx: &mut KernelContext, probes: &[Arc<dyn Probe>], opts: &LoadOptions) -> Result<Loaded, LoadError> {
    if let Some(why) = &kctx.features.bpf_denied_by_seccomp {
        return Err(LoadError::Seccomp(why.clone()));
    }
    let mut plan = LoadPlan::default();
    plan.task_note = plan.task_layout(kctx);
    if let Some(note) = &plan.task_note {
        tracing::warn!(%note, "programs that find a task's cgroup attribute without the task layout");
    }
    for p in probes {
        p.prepare(kctx, &mut plan);
    }
    let prechecks: Prechecks = probes
        .iter()
        .map(|p| {
            let groups = p.spec().groups.iter();
            groups
                .map(|g| g.hooks.iter().map(|h| precheck(kctx, h)).collect())
                .collect()
        })
        .collect();
    kctx.release_btf();
    let LoadPlan {
        globals,
        map_sizes,
        patches,
        task_note: _,
    } = plan;
    // Only a `--btf-path` file is handed to aya. aya parses the running kernel's BTF in
    // `EbpfLoader::new` for CO-RE relocations, which the object has none of (Rust eBPF has no
    // CO-RE; a test checks the object): that copy is dropped at once, never held while loading.
    let custom_btf = match &kctx.btf_path {
        Some(_) => Some(kctx.aya_btf().map_err(LoadError::Btf)?),
        None => None,
    };
    let mut loader = EbpfLoader::new();
    loader.btf(custom_btf.as_ref());
    for (name, bytes) in &globals {
        loader.override_global(name, bytes.as_slice(), true);
    }
    let log_level = if opts.kernel_log {
        crate::kernel_log::LEVEL_ALL
    } else {
        crate::kernel_log::LEVEL_OFF
    };
    loader.override_global(globals::AYA_LOG_LEVEL, &log_level, true);
    for (name, size) in &map_sizes {
        if !maps::ALL.contains(name) {
            return Err(LoadError::UnknownMap(name));
        }
        loader.map_max_entries(name, *size);
    }
    let mut object = EBPF_OBJECT.to_vec();
    for patch in patches {
        patch(&mut object);
    }
    let mut ebpf = loader.load(&object)?;
    drop(object);
    let kernel_log = if opts.kernel_log {
        Some(
            crate::kernel_log::Logger::init_with_logger(&mut ebpf, crate::kernel_log::KernelLog)
                .map_err(LoadError::KernelLog)?,
        )
    } else {
        None
    };
    let rings = match opts.perf_ring_pages {
        Some(pages) => {
            let events = ebpf
                .take_map(maps::EVENTS)
                .ok_or(crate::transport::TransportError::MissingMap(maps::EVENTS))?;
            crate::transport::open_rings(events, pages)?
        }
        None => Vec::new(),
    };
    let mut reports = Vec::new();
    for (p, checks) in probes.iter().zip(&prechecks) {
        let spec = p.spec();
        if !p.section().enabled() {
            reports.push(ProbeReport::disabled(spec.name));
            continue;
        }
        reports.push(attach_probe(&mut ebpf, kctx, spec, p.section().exclude_hooks(), checks));
    }
    Ok(Loaded {
        ebpf,
        reports,
        rings,
        kernel_log,
    })
}

/// Names of the programs in the embedded object (for the registry's consistency test).
pub fn object() -> &'static [u8] {
    EBPF_OBJECT
}

fn attach_probe(
    ebpf: &mut Ebpf,
    kctx: &KernelContext,
    spec: &ProbeSpec,
    excluded: &[HookKind],
    prechecks: &[Vec<Result<(), String>>],
) -> ProbeReport {
    let mut groups: Vec<GroupReport> = Vec::new();
    for (group, checks) in spec.groups.iter().zip(prechecks) {
        configure(ebpf, spec, &groups);
        let mut attempts = Vec::new();
        for (hook, check) in group.hooks.iter().zip(checks) {
            let res = if excluded.contains(&hook.kind) {
                Err(Failure::reason(format!(
                    "excluded by configuration (probes.{}.exclude_hooks)",
                    spec.name
                )))
            } else {
                check
                    .clone()
                    .map_err(Failure::reason)
                    .and_then(|()| attach_hook(ebpf, kctx, hook))
            };
            let ok = res.is_ok();
            let (error, log) = match res {
                Ok(()) => (None, None),
                Err(f) => (Some(f.reason), f.log),
            };
            attempts.push(HookAttempt {
                hook: hook.kind,
                target: hook.target,
                ok,
                error,
                log,
            });
            if ok {
                break;
            }
        }
        groups.push(GroupReport::from_attempts(group, attempts));
    }
    detach_if_required_missing(ebpf, spec, &mut groups);
    configure(ebpf, spec, &groups);
    ProbeReport::from_groups(spec.name, groups)
}

/// A probe whose required part is missing runs nothing: its attached optional parts (e.g.
/// resets without the connects they belong to) are unloaded, so the report, the state and
/// `sensor_probe_attached` all say "nothing runs" instead of "unsupported, yet attached".
fn detach_if_required_missing(ebpf: &mut Ebpf, spec: &ProbeSpec, groups: &mut [GroupReport]) {
    let Some(missing) = groups
        .iter()
        .find(|g| g.required && g.hook.is_none())
        .map(|g| g.purpose)
    else {
        return;
    };
    for (g, hg) in groups.iter_mut().zip(spec.groups) {
        let Some(i) = g.attempts.iter().position(|a| a.ok) else {
            continue;
        };
        let Some(hook) = hg.hooks.get(i) else { continue };
        let why = match unload(ebpf, hook) {
            Ok(()) => format!("detached: the required part '{missing}' could not attach"),
            Err(e) => {
                tracing::error!(probe = spec.name, program = hook.program, error = %e, "unloading failed");
                format!("the required part '{missing}' could not attach; unloading failed: {e}")
            }
        };
        g.attempts[i].ok = false;
        g.attempts[i].error = Some(why);
        g.hook = None;
    }
}

fn unload(ebpf: &mut Ebpf, hook: &HookSpec) -> Result<(), String> {
    let prog = ebpf
        .program_mut(hook.program)
        .ok_or_else(|| format!("program {} missing", hook.program))?;
    let r = match hook.kind {
        HookKind::Tracepoint => <&mut TracePoint>::try_from(prog).and_then(TracePoint::unload),
        HookKind::RawTracepoint => <&mut RawTracePoint>::try_from(prog).and_then(RawTracePoint::unload),
        HookKind::Kprobe => <&mut KProbe>::try_from(prog).and_then(KProbe::unload),
        HookKind::Fentry => <&mut FEntry>::try_from(prog).and_then(FEntry::unload),
    };
    r.map_err(|e| crate::kernel::features::error_chain(&e))
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

/// Why a hook could not attach: a reason for people, and the verifier's log when the kernel
/// refused the program (kept for `doctor --json` and `--verbose`, never in the reason).
#[derive(Debug)]
struct Failure {
    reason: String,
    log: Option<String>,
}

impl Failure {
    fn reason(reason: String) -> Failure {
        Failure { reason, log: None }
    }
}

/// An attach-time error with its source chain, bounded.
fn short(e: impl std::error::Error) -> Failure {
    Failure::reason(bounded(crate::kernel::features::error_chain(&e)))
}

/// Keeps strings bounded (a verifier log can be megabytes): the end is kept, where the
/// verifier says why it stopped.
fn bounded(s: String) -> String {
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

/// A load error as a reason: the missing kernel feature when the verifier's log names one (see
/// `crate::kernel::reasons`), else its last line; the whole log goes aside.
fn load_failure(e: aya::programs::ProgramError) -> Failure {
    match e {
        aya::programs::ProgramError::LoadError { io_error, verifier_log } => {
            let log = verifier_log.to_string();
            Failure {
                reason: crate::kernel::reasons::from_verifier(&log, &io_error),
                log: Some(bounded(log)),
            }
        }
        e => short(e),
    }
}

fn attach_hook(ebpf: &mut Ebpf, kctx: &KernelContext, hook: &HookSpec) -> Result<(), Failure> {
    let prog = ebpf
        .program_mut(hook.program)
        .ok_or_else(|| Failure::reason(format!("program {} missing from the eBPF object", hook.program)))?;
    match hook.kind {
        HookKind::Tracepoint => {
            let (cat, name) = split_tp(hook.target).map_err(Failure::reason)?;
            let p: &mut TracePoint = prog.try_into().map_err(short)?;
            p.load().map_err(load_failure)?;
            p.attach(cat, name).map(drop).map_err(short)
        }
        HookKind::RawTracepoint => {
            let p: &mut RawTracePoint = prog.try_into().map_err(short)?;
            p.load().map_err(load_failure)?;
            p.attach(hook.target).map(drop).map_err(short)
        }
        HookKind::Kprobe => {
            let p: &mut KProbe = prog.try_into().map_err(short)?;
            p.load().map_err(load_failure)?;
            p.attach(hook.target, 0).map(drop).map_err(short)
        }
        HookKind::Fentry => {
            let btf = kctx.aya_btf().map_err(Failure::reason)?;
            let p: &mut FEntry = prog.try_into().map_err(short)?;
            p.load(hook.target, &btf).map_err(load_failure)?;
            p.attach().map(drop).map_err(short)
        }
    }
}
