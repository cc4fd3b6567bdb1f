//! `sensor doctor`: what this kernel supports and which hook each probe would use, and why.

use std::{collections::BTreeMap, sync::Arc};

use serde::Serialize;

use crate::{
    kernel::{self, features::Support, privileges::Caps, seccomp},
    loader::{self, LoadOptions},
    probe::{DoctorSection, GroupReport, HookAttempt, Probe, ProbeReport, ProbeState},
};

#[derive(Debug, Serialize)]
pub struct Report {
    pub kernel_release: String,
    pub btf: Component,
    pub tracefs: Component,
    pub privileged: bool,
    pub seccomp: SeccompReport,
    pub program_types: Vec<Support>,
    pub map_types: Vec<Support>,
    pub attach: Vec<Support>,
    /// Instruction-set features (BPF atomics) that pick between program variants.
    pub instructions: Vec<Support>,
    pub probes: Vec<ProbeReport>,
    /// True when `probes` come from real load+attach attempts, false when only prechecked.
    pub attach_tested: bool,
    pub cgroups: crate::cgroup::Hierarchies,
    /// The container runtimes that name workloads: found, not found or error, and why.
    pub runtimes: Vec<crate::workloads::RuntimeReport>,
    /// Each probe's own section (e.g. `memory_pressure`), under its key.
    #[serde(flatten)]
    pub sections: BTreeMap<&'static str, serde_json::Value>,
    #[serde(skip)]
    pub section_text: Vec<DoctorSection>,
}

#[derive(Debug, Serialize)]
pub struct Component {
    pub available: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// This process's seccomp mode, and the diagnosis when the filter refuses `bpf()`.
#[derive(Debug, Serialize)]
pub struct SeccompReport {
    pub mode: seccomp::Mode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denies_bpf: Option<String>,
}

/// Builds the report; when privileged it really loads and attaches (then detaches), so what
/// doctor says is what `run` will do.
pub fn report(opts: &LoadOptions, registered: &[Arc<dyn Probe>]) -> Report {
    let mut kctx = opts.kernel_context();
    let cgroups = crate::cgroup::Hierarchies::discover();
    let privileged = Caps::current().map(|c| c.can_trace()).unwrap_or(false);
    let not_tested = |reason: String| -> Vec<ProbeReport> {
        registered
            .iter()
            .map(|p| p.spec())
            .map(|s| ProbeReport {
                probe: s.name,
                state: ProbeState::Unsupported { reason: reason.clone() },
                groups: s
                    .groups
                    .iter()
                    .map(|g| GroupReport {
                        purpose: g.purpose,
                        required: g.required,
                        hook: None,
                        attempts: g
                            .hooks
                            .iter()
                            .map(|h| HookAttempt {
                                hook: h.kind,
                                target: h.target,
                                ok: false,
                                error: Some(reason.clone()),
                                log: None,
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect()
    };
    let (probes, attach_tested) = if privileged {
        match loader::load(&mut kctx, registered, opts) {
            Ok(l) => (l.reports, true),
            Err(e) => (not_tested(crate::kernel::features::error_chain(&e)), true),
        }
    } else {
        (
            not_tested(format!("not tested: {}", crate::kernel::privileges::NEEDS)),
            false,
        )
    };
    let section_text: Vec<DoctorSection> = registered.iter().filter_map(|p| p.doctor(&cgroups)).collect();
    Report {
        kernel_release: kernel::release(),
        btf: match &kctx.btf_source {
            Ok(path) => Component {
                available: true,
                path: Some(path.display().to_string()),
                error: None,
            },
            Err(e) => Component {
                available: false,
                path: None,
                error: Some(e.clone()),
            },
        },
        tracefs: match &kctx.tracefs {
            Ok(t) => Component {
                available: true,
                path: Some(t.root.display().to_string()),
                error: t
                    .mounted_by_sensor
                    .then(|| "was not mounted; mounted by the sensor".to_string()),
            },
            Err(e) => Component {
                available: false,
                path: None,
                error: Some(e.clone()),
            },
        },
        privileged,
        seccomp: SeccompReport {
            mode: seccomp::ProcessSecurity::current().seccomp,
            denies_bpf: kctx.features.bpf_denied_by_seccomp.clone(),
        },
        program_types: kctx.features.program_types.clone(),
        map_types: kctx.features.map_types.clone(),
        attach: kctx.features.attach.clone(),
        instructions: kctx.features.instructions.clone(),
        probes,
        attach_tested,
        sections: section_text.iter().map(|d| (d.key, d.json.clone())).collect(),
        section_text,
        cgroups,
        runtimes: Vec::new(),
    }
}

fn yn(s: &Support) -> String {
    if s.supported {
        "yes".to_string()
    } else {
        format!("NO   {}", s.detail.as_deref().unwrap_or(""))
    }
}

/// The human report: one line of reason per hook that could not attach; with `verbose`, the
/// verifier's log under it where the kernel refused the program.
pub fn render_text(r: &Report, verbose: bool) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let comp = |c: &Component| match (&c.path, &c.error, c.available) {
        (Some(p), Some(note), true) => format!("{p} ({note})"),
        (Some(p), None, true) => p.clone(),
        (_, Some(e), false) => format!("UNAVAILABLE: {e}"),
        _ => "unavailable".to_string(),
    };
    let _ = writeln!(o, "kernel       {}", r.kernel_release);
    let _ = writeln!(o, "btf          {}", comp(&r.btf));
    let _ = writeln!(o, "tracefs      {}", comp(&r.tracefs));
    let _ = writeln!(
        o,
        "privileges   {}",
        if r.privileged {
            "ok (CAP_BPF + CAP_PERFMON, or root)"
        } else {
            "MISSING: the sensor needs CAP_BPF and CAP_PERFMON, or root; attachment not tested"
        }
    );
    let mode = match r.seccomp.mode {
        seccomp::Mode::Disabled => "none",
        seccomp::Mode::Strict => "strict",
        seccomp::Mode::Filter => "filter",
        seccomp::Mode::Unknown => "unknown",
    };
    let _ = match &r.seccomp.denies_bpf {
        Some(why) => writeln!(o, "seccomp      {mode}: {why}"),
        None => writeln!(o, "seccomp      {mode}"),
    };
    for (title, list) in [
        ("program types", &r.program_types),
        ("map types", &r.map_types),
        ("attach mechanisms", &r.attach),
        ("instructions", &r.instructions),
    ] {
        let _ = writeln!(o, "\n{title}");
        for s in list.iter() {
            let _ = writeln!(o, "  {:<24} {}", s.name, yn(s));
        }
    }
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map_or("-".to_string(), |p| p.display().to_string());
    let _ = writeln!(o, "\ncgroups");
    let _ = writeln!(
        o,
        "  memory controller        {}",
        if r.cgroups.memory_is_v1() {
            "cgroup v1"
        } else {
            "cgroup v2"
        }
    );
    let _ = writeln!(o, "  v1 memory hierarchy      {}", path(&r.cgroups.memory_v1));
    let _ = writeln!(o, "  v2 hierarchy             {}", path(&r.cgroups.unified));
    let _ = writeln!(o, "\ncontainer runtimes (workload names)");
    for rt in &r.runtimes {
        let state = match rt.state {
            "found" => "FOUND",
            "not_found" => "not found",
            _ => "ERROR",
        };
        let _ = writeln!(o, "  {:<11} {:<9} {}: {}", rt.kind, state, rt.socket, rt.detail);
    }
    for d in &r.section_text {
        let _ = writeln!(o, "\n{}", d.title);
        for (label, value) in &d.lines {
            let _ = writeln!(o, "  {label:<24} {value}");
        }
        for n in &d.notes {
            let _ = writeln!(o, "  note: {n}");
        }
    }
    let _ = writeln!(o, "\nprobes");
    for p in &r.probes {
        let summary = match &p.state {
            ProbeState::Attached => "ATTACHED (every part with its preferred hook)".to_string(),
            ProbeState::Degraded { .. } => "DEGRADED (running with fallbacks or without optional parts)".to_string(),
            ProbeState::Unsupported { reason } => format!("UNSUPPORTED: {reason}"),
            ProbeState::Disabled => "DISABLED by configuration".to_string(),
        };
        let _ = writeln!(o, "  {}  {summary}", p.probe);
        for g in &p.groups {
            let kind = if g.required { "required" } else { "optional" };
            let uses = match g.attempts.iter().find(|a| a.ok) {
                Some(a) => format!("uses {} {}", a.hook.label(), a.target),
                None => "NOT ATTACHED".to_string(),
            };
            let used = g.attempts.iter().find(|a| a.ok).map(|a| a.hook);
            let mut unavailable: Vec<&str> = g
                .attempts
                .iter()
                .filter(|a| !a.ok && Some(a.hook) != used)
                .map(|a| a.hook.label())
                .collect();
            unavailable.dedup();
            let why = if unavailable.is_empty() {
                String::new()
            } else {
                format!(": {} unavailable on this kernel", unavailable.join(" and "))
            };
            let _ = writeln!(o, "    {} ({kind}): {uses}{why}", g.purpose);
            for a in g.attempts.iter().filter(|a| !a.ok) {
                let _ = writeln!(
                    o,
                    "      {} {}: {}",
                    a.hook.label(),
                    a.target,
                    a.error.as_deref().unwrap_or("")
                );
                if let (true, Some(log)) = (verbose, &a.log) {
                    for l in log.lines() {
                        let _ = writeln!(o, "        | {l}");
                    }
                }
            }
        }
    }
    o
}
