//! The probe registry. A probe is made of hook groups, each serving one purpose (e.g. OOM's
//! "victim fields" and "kill context"); each group lists candidate hooks in order of preference
//! and attaches the first that works. The probe is `attached` when every group got its
//! preferred hook, `degraded` when a fallback was used or an optional group is missing, and
//! `unsupported` when a required group could not attach.

use aya::Ebpf;
use serde::Serialize;

use crate::loader::KernelContext;

/// How a kernel program is hooked. The string form is the `hook` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookKind {
    Fentry,
    Kprobe,
    RawTracepoint,
    Tracepoint,
}

impl std::str::FromStr for HookKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fentry" => Ok(HookKind::Fentry),
            "kprobe" => Ok(HookKind::Kprobe),
            "raw_tracepoint" => Ok(HookKind::RawTracepoint),
            "tracepoint" => Ok(HookKind::Tracepoint),
            _ => Err(format!(
                "unknown hook '{s}' (fentry, kprobe, raw_tracepoint, tracepoint)"
            )),
        }
    }
}

impl HookKind {
    pub fn label(self) -> &'static str {
        match self {
            HookKind::Fentry => "fentry",
            HookKind::Kprobe => "kprobe",
            HookKind::RawTracepoint => "raw_tracepoint",
            HookKind::Tracepoint => "tracepoint",
        }
    }
}

/// Extra precondition of a hook beyond its kind (e.g. the raw tracepoint's argument types).
pub type HookCheck = fn(&KernelContext) -> Result<(), String>;

/// One way to attach: which program in the object, and where.
#[derive(Debug, Clone, Copy)]
pub struct HookSpec {
    pub kind: HookKind,
    /// Program name in the eBPF object.
    pub program: &'static str,
    /// Kernel function (`oom_kill_process`), tracepoint (`oom/mark_victim`) or raw tracepoint.
    pub target: &'static str,
    pub check: Option<HookCheck>,
}

#[derive(Debug, Clone, Copy)]
pub struct HookGroup {
    pub purpose: &'static str,
    pub required: bool,
    /// Most preferred first.
    pub hooks: &'static [HookSpec],
}

/// Tells the programs which groups ended up attached; called before each group is attached and
/// once after all of them.
pub type Configure = fn(&mut Ebpf, &[GroupReport]) -> Result<(), String>;

#[derive(Debug, Clone, Copy)]
pub struct ProbeSpec {
    pub name: &'static str,
    pub groups: &'static [HookGroup],
    pub configure: Option<Configure>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ProbeState {
    /// Every group attached with its preferred hook.
    Attached,
    /// Running, but with a fallback hook or without an optional group; `reason` says why.
    Degraded { reason: String },
    /// A required group could not attach.
    Unsupported { reason: String },
    /// Turned off in the configuration.
    Disabled,
}

impl ProbeState {
    pub fn label(&self) -> &'static str {
        match self {
            ProbeState::Attached => "attached",
            ProbeState::Degraded { .. } => "degraded",
            ProbeState::Unsupported { .. } => "unsupported",
            ProbeState::Disabled => "disabled",
        }
    }

    pub fn running(&self) -> bool {
        matches!(self, ProbeState::Attached | ProbeState::Degraded { .. })
    }
}

/// What happened to one candidate hook.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HookAttempt {
    pub hook: HookKind,
    pub target: &'static str,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GroupReport {
    pub purpose: &'static str,
    pub required: bool,
    /// The hook in use, if any.
    pub hook: Option<HookKind>,
    pub attempts: Vec<HookAttempt>,
}

impl GroupReport {
    pub fn from_attempts(g: &HookGroup, attempts: Vec<HookAttempt>) -> GroupReport {
        let hook = attempts.iter().find(|a| a.ok).map(|a| a.hook);
        GroupReport {
            purpose: g.purpose,
            required: g.required,
            hook,
            attempts,
        }
    }

    fn failures(&self) -> String {
        self.attempts
            .iter()
            .filter(|a| !a.ok)
            .map(|a| {
                format!(
                    "{} {}: {}",
                    a.hook.label(),
                    a.target,
                    a.error.as_deref().unwrap_or("failed")
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn preferred(&self) -> bool {
        self.attempts.first().is_some_and(|a| a.ok)
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ProbeReport {
    pub probe: &'static str,
    #[serde(flatten)]
    pub state: ProbeState,
    pub groups: Vec<GroupReport>,
}

impl ProbeReport {
    pub fn from_groups(probe: &'static str, groups: Vec<GroupReport>) -> ProbeReport {
        let missing_required: Vec<String> = groups
            .iter()
            .filter(|g| g.required && g.hook.is_none())
            .map(|g| format!("{}: {}", g.purpose, g.failures()))
            .collect();
        let state = if groups.is_empty() {
            ProbeState::Unsupported {
                reason: "no hooks declared".into(),
            }
        } else if !missing_required.is_empty() {
            ProbeState::Unsupported {
                reason: missing_required.join("; "),
            }
        } else if groups.iter().all(GroupReport::preferred) {
            ProbeState::Attached
        } else {
            let why: Vec<String> = groups
                .iter()
                .filter(|g| !g.preferred())
                .map(|g| match g.hook {
                    Some(h) => format!("{} uses fallback {} ({})", g.purpose, h.label(), g.failures()),
                    None => format!("{} unavailable ({})", g.purpose, g.failures()),
                })
                .collect();
            ProbeState::Degraded { reason: why.join("; ") }
        };
        ProbeReport { probe, state, groups }
    }

    pub fn disabled(probe: &'static str) -> ProbeReport {
        ProbeReport {
            probe,
            state: ProbeState::Disabled,
            groups: Vec::new(),
        }
    }

    /// Hooks in use, in group order.
    pub fn hooks(&self) -> Vec<HookKind> {
        self.groups.iter().filter_map(|g| g.hook).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(hook: HookKind, ok: bool) -> HookAttempt {
        HookAttempt {
            hook,
            target: "t",
            ok,
            error: (!ok).then(|| "refused".to_string()),
        }
    }

    fn group(purpose: &'static str, required: bool, attempts: Vec<HookAttempt>) -> GroupReport {
        let hook = attempts.iter().find(|a| a.ok).map(|a| a.hook);
        GroupReport {
            purpose,
            required,
            hook,
            attempts,
        }
    }

    #[test]
    fn state_follows_groups() {
        let r = ProbeReport::from_groups(
            "oom",
            vec![group("fields", true, vec![attempt(HookKind::Tracepoint, true)])],
        );
        assert_eq!(r.state, ProbeState::Attached);
        let r = ProbeReport::from_groups(
            "oom",
            vec![
                group(
                    "context",
                    false,
                    vec![attempt(HookKind::Fentry, false), attempt(HookKind::Kprobe, false)],
                ),
                group("fields", true, vec![attempt(HookKind::Tracepoint, true)]),
            ],
        );
        assert_eq!(
            r.state,
            ProbeState::Degraded {
                reason: "context unavailable (fentry t: refused; kprobe t: refused)".into()
            }
        );
        assert_eq!(r.hooks(), vec![HookKind::Tracepoint]);
        let r = ProbeReport::from_groups(
            "oom",
            vec![group(
                "context",
                false,
                vec![attempt(HookKind::Fentry, false), attempt(HookKind::Kprobe, true)],
            )],
        );
        assert!(
            matches!(&r.state, ProbeState::Degraded { reason } if reason.starts_with("context uses fallback kprobe"))
        );
        let r = ProbeReport::from_groups(
            "oom",
            vec![group("fields", true, vec![attempt(HookKind::Tracepoint, false)])],
        );
        assert!(matches!(r.state, ProbeState::Unsupported { .. }));
        assert!(!r.state.running());
    }
}
