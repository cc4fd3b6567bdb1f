//! The probe registry: each probe declares candidate hooks in order of preference, and the
//! loader records which one attached (attached / degraded / unsupported) and why.

use serde::Serialize;

/// How a kernel program is hooked. The string form is the `hook` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HookKind {
    Fentry,
    Kprobe,
    RawTracepoint,
    Tracepoint,
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

/// One way to attach a probe: which program in the object, and where.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct HookSpec {
    pub kind: HookKind,
    /// Program name in the eBPF object.
    pub program: &'static str,
    /// Kernel function (`oom_kill_process`) or tracepoint (`oom/mark_victim`).
    pub target: &'static str,
}

#[derive(Debug, Clone, Copy)]
pub struct ProbeSpec {
    pub name: &'static str,
    /// Most preferred first.
    pub hooks: &'static [HookSpec],
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ProbeState {
    /// The preferred hook is attached.
    Attached { hook: HookKind },
    /// A fallback hook is attached; `reason` says why the better ones were not.
    Degraded { hook: HookKind, reason: String },
    /// No hook could be attached.
    Unsupported { reason: String },
    /// Turned off in the configuration.
    Disabled,
}

impl ProbeState {
    pub fn hook(&self) -> Option<HookKind> {
        match self {
            ProbeState::Attached { hook } | ProbeState::Degraded { hook, .. } => Some(*hook),
            _ => None,
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            ProbeState::Attached { .. } => "attached",
            ProbeState::Degraded { .. } => "degraded",
            ProbeState::Unsupported { .. } => "unsupported",
            ProbeState::Disabled => "disabled",
        }
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
pub struct ProbeReport {
    pub probe: &'static str,
    #[serde(flatten)]
    pub state: ProbeState,
    pub attempts: Vec<HookAttempt>,
}

impl ProbeReport {
    /// Derives the state from the attempts, in preference order.
    pub fn from_attempts(probe: &'static str, attempts: Vec<HookAttempt>) -> ProbeReport {
        let failures = |upto: usize| {
            attempts[..upto]
                .iter()
                .map(|a| format!("{}: {}", a.hook.label(), a.error.as_deref().unwrap_or("failed")))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let state = match attempts.iter().position(|a| a.ok) {
            Some(0) => ProbeState::Attached { hook: attempts[0].hook },
            Some(i) => ProbeState::Degraded {
                hook: attempts[i].hook,
                reason: failures(i),
            },
            None if attempts.is_empty() => ProbeState::Unsupported {
                reason: "no hooks declared".into(),
            },
            None => ProbeState::Unsupported {
                reason: failures(attempts.len()),
            },
        };
        ProbeReport { probe, state, attempts }
    }

    pub fn disabled(probe: &'static str) -> ProbeReport {
        ProbeReport {
            probe,
            state: ProbeState::Disabled,
            attempts: Vec::new(),
        }
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
            error: (!ok).then(|| format!("{} refused", hook.label())),
        }
    }

    #[test]
    fn state_follows_preference() {
        let r = ProbeReport::from_attempts("oom", vec![attempt(HookKind::Fentry, true)]);
        assert_eq!(r.state, ProbeState::Attached { hook: HookKind::Fentry });
        let r = ProbeReport::from_attempts(
            "oom",
            vec![
                attempt(HookKind::Fentry, false),
                attempt(HookKind::Kprobe, false),
                attempt(HookKind::Tracepoint, true),
            ],
        );
        assert_eq!(
            r.state,
            ProbeState::Degraded {
                hook: HookKind::Tracepoint,
                reason: "fentry: fentry refused; kprobe: kprobe refused".into()
            }
        );
        let r = ProbeReport::from_attempts("oom", vec![attempt(HookKind::Tracepoint, false)]);
        assert!(matches!(r.state, ProbeState::Unsupported { .. }));
        assert_eq!(r.state.hook(), None);
    }
}
