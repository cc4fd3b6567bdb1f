//! The probe registry. A probe is made of hook groups, each serving one purpose (e.g. OOM's
//! "victim fields" and "kill context"); each group lists candidate hooks in order of preference
//! and attaches the first that works. The probe is `attached` when every group got its
//! preferred hook, `degraded` when a fallback was used or an optional group is missing, and
//! `unsupported` when a required group could not attach.

use std::{sync::Arc, time::Duration};

use aya::Ebpf;
use prometheus::Registry;
use serde::Serialize;
use tokio::{sync::watch, task::JoinHandle};

pub use crate::kernel::context::KernelContext;
use crate::{
    activity::ReclaimTimes,
    cgroup::{Discovery, Hierarchies},
    events::EventHub,
};
use sensor_common::names::globals;

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
    /// The probe's slot in the kernel's shared `COUNTERS` map (`sensor_common::record::probe_id`).
    pub counter_id: u32,
    pub groups: &'static [HookGroup],
    pub configure: Option<Configure>,
    /// The kernel record kinds its running half handles, with the length and version each must
    /// have.
    pub records: &'static [RecordKind],
    /// Its section of the web summary, if it has one.
    pub view: Option<&'static ViewSpec>,
}

/// What every probe's configuration section (`probes.<name>`) has besides its own keys.
pub trait Section: Send + Sync {
    /// `probes.<name>.enabled`.
    fn enabled(&self) -> bool;
    /// `probes.<name>.exclude_hooks`.
    fn exclude_hooks(&self) -> &[HookKind];
    /// Checks serde cannot express: `Err((key below the section, e.g. ".history.window",
    /// reason))`.
    fn validate(&self) -> Result<(), (String, String)>;
}

/// [`Section::enabled`] and [`Section::exclude_hooks`] read from the fields of those names,
/// which every section has.
#[macro_export]
macro_rules! section_switches {
    () => {
        fn enabled(&self) -> bool {
            self.enabled
        }
        fn exclude_hooks(&self) -> &[$crate::probe::HookKind] {
            &self.exclude_hooks
        }
    };
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
    /// Why not, in one line: the missing kernel feature and what brings it where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The verifier's log when the kernel refused the program (`doctor --json`, `--verbose`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
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

/// One kernel probe's whole life. Each slice (`oom`, `memcg`, `tcp`) implements it; generic
/// code (loader, run, dispatch, doctor) only ever sees this trait, and the `probes` module is the one
/// list that registers them.
pub trait Probe: Send + Sync {
    /// Name, hook ladder and record kinds.
    fn spec(&self) -> &'static ProbeSpec;
    /// Its configuration section.
    fn section(&self) -> &dyn Section;
    /// What the programs need before the object loads on this kernel: globals (layouts from
    /// tracefs and BTF), map sizes, object patches. Called for every probe, enabled or not (one
    /// object holds them all). Blocking: reads tracefs, BTF and cgroupfs.
    fn prepare(&self, _kctx: &KernelContext, _plan: &mut LoadPlan) {}
    /// The running half, built once the programs are attached (for enabled probes; `ctx.report`
    /// says whether its kernel part runs). Blocking: may read /proc and cgroupfs.
    fn start(&self, ctx: &mut StartContext<'_>) -> Result<Arc<dyn Running>, StartError>;
    /// How often this probe needs workloads (cgroups) rescanned; `None` when it does not.
    fn discovery_interval(&self) -> Option<Duration> {
        None
    }
    /// Facts of this host for `sensor doctor` beyond the hook report.
    fn doctor(&self, _hier: &Hierarchies) -> Option<DoctorSection> {
        None
    }
}

/// A started probe: the records it handles and its periodic work.
pub trait Running: Send + Sync {
    /// One record of a kind from [`ProbeSpec::records`], already checked against it.
    fn handle(&self, _kind: u16, _bytes: &[u8]) {}
    /// How often [`Running::upkeep`] runs; `None` for never.
    fn upkeep_interval(&self) -> Option<Duration> {
        None
    }
    /// Periodic work (blocking; run off the async threads).
    fn upkeep(&self) {}
    /// Called after each workload rescan (blocking; may spawn tasks that end with `stop`).
    fn after_discovery(&self, _stop: &watch::Receiver<bool>) {}
    /// The probe's own long-running tasks; they end when `stop` turns true.
    fn spawn(&self, _stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        Vec::new()
    }
    /// At shutdown, after the readers' final drain: publish what is still held (blocking).
    fn finish(&self) {}
    /// Its part of the web view's summary, read from the same state its collectors export
    /// (blocking: may read kernel maps); `None` when it shows nothing.
    fn view(&self) -> Option<View> {
        None
    }
}

/// What a probe's section of the web view's summary (`/api/v1/summary`) holds besides its
/// [`View`]: what the web view keeps of the probe's events. The web view never names a probe.
#[derive(Debug, Clone, Copy)]
pub struct ViewSpec {
    /// The section's key in the summary (`oom`, `memory`, `tcp`).
    pub key: &'static str,
    /// `(field, event kind)`: the kind's recent events listed under `field`, newest first.
    pub recent: &'static [(&'static str, &'static str)],
    /// An event kind counted per minute, hour and day (`per_minute`, `per_hour`, `per_day`).
    pub timeline: Option<&'static str>,
    /// `(field, event kind)`: the newest event of the kind for each cgroup in
    /// [`View::holding`].
    pub holding: Option<(&'static str, &'static str)>,
    /// The section's fields when the probe has nothing to show (not started, or its kernel part
    /// did not attach): the same keys, empty, so the summary's shape never depends on them.
    pub idle: fn() -> View,
}

/// A probe's numbers in its section of the web summary, read from the same running state its
/// collectors export.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// The section's fields.
    pub fields: serde_json::Map<String, serde_json::Value>,
    /// Lines for the page's red banner.
    pub problems: Vec<String>,
    /// The cgroups whose newest event of [`ViewSpec::holding`]'s kind is listed.
    pub holding: Vec<String>,
}

/// A kernel record kind: its header must carry exactly this length and version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordKind {
    pub kind: u16,
    pub len: u16,
    pub version: u16,
}

/// Globals, map sizes and object patches the probes ask for before the object is loaded.
#[derive(Default)]
pub struct LoadPlan {
    pub(crate) globals: Vec<(&'static str, Vec<u8>)>,
    pub(crate) map_sizes: Vec<(&'static str, u32)>,
    pub(crate) patches: Vec<ObjectPatch>,
    /// Why `TASK_LAYOUT` is unusable on this kernel, if it is (set by the loader before any
    /// probe prepares).
    pub task_note: Option<String>,
}

/// Rewrites the eBPF object's bytes before loading (e.g. kfunc call placeholders).
pub type ObjectPatch = Box<dyn FnOnce(&mut Vec<u8>) + Send>;

impl LoadPlan {
    /// Sets the read-only global `name` to `value`.
    pub fn global<T: aya::Pod>(&mut self, name: &'static str, value: &T) {
        // SAFETY: `T: Pod` is plain data valid to view as bytes for its whole size, and the
        // slice borrows `value` only for the copy.
        let bytes =
            unsafe { std::slice::from_raw_parts(std::ptr::from_ref(value).cast::<u8>(), std::mem::size_of::<T>()) };
        self.globals.retain(|(n, _)| *n != name);
        self.globals.push((name, bytes.to_vec()));
    }

    /// Creates map `name` with `entries` entries instead of the object's default.
    pub fn map_size(&mut self, name: &'static str, entries: u32) {
        self.map_sizes.push((name, entries));
    }

    pub fn patch(&mut self, f: ObjectPatch) {
        self.patches.push(f);
    }

    /// Sets `TASK_LAYOUT`, shared by every program that finds a task's cgroup; returns why
    /// it is unusable, if it is.
    pub(crate) fn task_layout(&mut self, kctx: &KernelContext) -> Option<String> {
        let (layout, note) = match &kctx.btf {
            Ok(btf) => match crate::kernel::task::layout(btf) {
                Ok(l) => (l, None),
                Err(e) => (
                    sensor_common::task::TaskLayout::INVALID,
                    Some(format!("task/cgroup layout: {e}")),
                ),
            },
            Err(e) => (sensor_common::task::TaskLayout::INVALID, Some(format!("BTF: {e}"))),
        };
        self.global(globals::TASK_LAYOUT, &layout);
        note
    }
}

/// What a probe gets to start its running half.
pub struct StartContext<'a> {
    pub ebpf: &'a mut Ebpf,
    pub report: &'a ProbeReport,
    /// Where plain metrics (counters, gauges, histograms observed in userspace) go.
    pub registry: &'a Registry,
    /// Where collectors that write their families at each scrape go (map readers).
    pub sources: &'a crate::expo::Sources,
    pub hub: &'a Arc<EventHub>,
    pub discovery: &'a Arc<Discovery>,
    /// `limits.workloads_per_metric`.
    pub workloads_per_metric: usize,
    /// `limits.vanished_grace`.
    pub vanished_grace: Duration,
    /// Reclaim time per workload: the memcg probe publishes it, others read it (an OOM kill's
    /// lead-up).
    pub reclaim: &'a Arc<ReclaimTimes>,
}

impl StartContext<'_> {
    /// Takes map `name` out of the loaded object, converted to its typed form.
    pub fn take_map<M>(&mut self, name: &'static str) -> Result<M, StartError>
    where
        M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self.ebpf.take_map(name).ok_or(StartError::MissingMap(name))?;
        M::try_from(map).map_err(|source| StartError::Map { name, source })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("{0}")]
    Other(String),
}

/// The running half of a probe that has nothing to run (e.g. its kernel part is unsupported).
pub struct Idle;

impl Running for Idle {}

/// A probe's part of `sensor doctor`: `key` in the JSON report, `title` and lines in the text.
#[derive(Debug, Clone)]
pub struct DoctorSection {
    pub key: &'static str,
    pub title: &'static str,
    pub json: serde_json::Value,
    /// (label, value) lines.
    pub lines: Vec<(String, String)>,
    pub notes: Vec<String>,
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
            log: None,
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
