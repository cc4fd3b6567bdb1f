//! OOM kills: probe declaration, kernel layouts, record handling, attribution and metrics.

pub mod config;

pub mod down;

pub mod history;

pub mod limit;

pub mod imminent;
mod pending;

pub mod scope;

pub mod verdict;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use aya::maps::Array;
use prometheus::{GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use sensor_common::oom::{
    field, hook, part, MarkVictimLayout, OomControlLayout, OomKillRecord, TpField, CONFIG_EXPECTED_PARTS,
};
use serde::Serialize;

use history::History;
pub use scope::{Scope, ScopeResolver};
use sensor_common::names::{globals, maps};

use crate::{
    cgroup::{with_names, workload, Discovery, Hierarchies, WorkloadSet, WORKLOAD_LABELS},
    events::EventHub,
    kernel::{btf::KernelBtf, clock},
    probe::{
        GroupReport, HookGroup, HookKind, HookSpec, KernelContext, LoadPlan, Probe, ProbeSpec, RecordKind, Running,
        StartContext, StartError,
    },
    sync::Lock as _,
};

/// `cgroup` label of a kill whose victim cgroup could not be determined.
pub const UNKNOWN_CGROUP: &str = "unknown";

const GROUP_CONTEXT: &str = "kill context";
const GROUP_CGROUP: &str = "victim cgroup";
const GROUP_FIELDS: &str = "victim fields";

/// Groups are attached in this order; the last one (the required tracepoint) completes records,
/// so the expected-parts mask is right before it can fire.
pub const SPEC: ProbeSpec = ProbeSpec {
    name: "oom",
    counter_id: sensor_common::record::probe_id::OOM,
    groups: &[
        HookGroup {
            purpose: GROUP_CONTEXT,
            required: false,
            hooks: &[
                HookSpec {
                    kind: HookKind::Fentry,
                    program: "oom_kill_fentry",
                    target: "oom_kill_process",
                    check: Some(check_oom_control),
                },
                HookSpec {
                    kind: HookKind::Kprobe,
                    program: "oom_kill_kprobe",
                    target: "oom_kill_process",
                    check: Some(check_oom_control),
                },
            ],
        },
        HookGroup {
            purpose: GROUP_CGROUP,
            required: false,
            hooks: &[HookSpec {
                kind: HookKind::RawTracepoint,
                program: "oom_mark_victim_raw",
                target: "mark_victim",
                check: Some(check_raw_victim),
            }],
        },
        HookGroup {
            purpose: GROUP_FIELDS,
            required: true,
            hooks: &[HookSpec {
                kind: HookKind::Tracepoint,
                program: "oom_mark_victim",
                target: "oom/mark_victim",
                check: None,
            }],
        },
    ],
    configure: Some(configure),
};

fn check_oom_control(k: &KernelContext) -> Result<(), String> {
    let btf = k.btf.as_ref().map_err(|e| format!("needs kernel BTF: {e}"))?;
    oom_control_layout(btf)
        .map(drop)
        .map_err(|e| format!("struct oom_control layout: {e}"))
}

/// The raw tracepoint is only useful where its first argument is the victim `task_struct *`
/// (6.8+; before that `mark_victim` passed only a pid).
fn check_raw_victim(k: &KernelContext) -> Result<(), String> {
    let btf = k.btf.as_ref().map_err(|e| format!("needs kernel BTF: {e}"))?;
    match btf.raw_tp_arg_is_struct_ptr("mark_victim", 0, "task_struct") {
        Ok(true) => {}
        Ok(false) => {
            return Err("raw tracepoint mark_victim without task: the victim task comes with 6.8+ (or a backport, e.g. Debian's 6.1); 5.x passes its pid".into())
        }
        Err(e) => return Err(format!("mark_victim prototype: {e}")),
    }
    crate::kernel::task::layout(btf)
        .map(drop)
        .map_err(|e| format!("task/cgroup layout: {e}"))
}

/// Writes which `mark_victim` parts complete a record.
fn configure(ebpf: &mut aya::Ebpf, groups: &[GroupReport]) -> Result<(), String> {
    let attached = |purpose: &str| groups.iter().any(|g| g.purpose == purpose && g.hook.is_some());
    let failed = |purpose: &str| groups.iter().any(|g| g.purpose == purpose && g.hook.is_none());
    let mut expected = 0;
    if !failed(GROUP_FIELDS) {
        expected |= part::FIELDS;
    }
    if attached(GROUP_CGROUP) {
        expected |= part::CGROUP;
    }
    if expected == 0 {
        expected = part::FIELDS;
    }
    let map = ebpf.map_mut(maps::OOM_CONFIG).ok_or("OOM_CONFIG map missing")?;
    let mut arr: Array<_, u32> = Array::try_from(map).map_err(|e| e.to_string())?;
    arr.set(CONFIG_EXPECTED_PARTS, expected, 0).map_err(|e| e.to_string())
}

pub fn oom_control_layout(btf: &KernelBtf) -> Result<OomControlLayout, crate::kernel::btf::BtfError> {
    Ok(OomControlLayout {
        valid: 1,
        oc_memcg: btf.member_offset("oom_control", "memcg")?,
        oc_totalpages: btf.member_offset("oom_control", "totalpages")?,
        oc_chosen: btf.member_offset("oom_control", "chosen")?,
        oc_constraint: btf.member_offset("oom_control", "constraint")?,
        memcg_css: btf.member_offset("mem_cgroup", "css")?,
    })
}

/// Kernel layouts the OOM programs need, found at load time.
#[derive(Debug, Clone)]
pub struct Layouts {
    pub mark_victim: MarkVictimLayout,
    pub oom_control: OomControlLayout,
    /// Why a layout is partial, for logs.
    pub notes: Vec<String>,
}

impl Layouts {
    pub fn discover(kctx: &KernelContext) -> Layouts {
        let mut notes = Vec::new();
        let mark_victim = match &kctx.tracefs {
            Ok(t) => match t.format("oom", "mark_victim") {
                Ok(f) => mark_victim_layout(&f),
                Err(e) => {
                    notes.push(format!("oom/mark_victim format: {e}"));
                    MarkVictimLayout::ABSENT
                }
            },
            Err(e) => {
                notes.push(format!("tracefs: {e}"));
                MarkVictimLayout::ABSENT
            }
        };
        let oom_control = match &kctx.btf {
            Ok(btf) => oom_control_layout(btf).unwrap_or_else(|e| {
                notes.push(format!("oom_control layout: {e}"));
                OomControlLayout::INVALID
            }),
            Err(e) => {
                notes.push(format!("BTF: {e}"));
                OomControlLayout::INVALID
            }
        };
        Layouts {
            mark_victim,
            oom_control,
            notes,
        }
    }

    /// Sets the OOM programs' globals (`TASK_LAYOUT`, shared by every slice that attributes to
    /// cgroups, comes from `LoadPlan::task_layout`).
    pub fn apply(&self, plan: &mut LoadPlan) {
        plan.global(globals::MARK_VICTIM_LAYOUT, &self.mark_victim);
        plan.global(globals::OOM_CONTROL_LAYOUT, &self.oom_control);
    }
}

/// Offsets of the fields we read, each accepted only with the size we expect.
pub fn mark_victim_layout(f: &crate::kernel::tracefs::TracepointFormat) -> MarkVictimLayout {
    let off = |name: &str, sizes: &[u16]| f.offset_if(name, sizes).unwrap_or(TpField::ABSENT);
    let (comm, comm_is_data_loc) = match f.field("comm") {
        Some(c) if c.is_data_loc() && c.size == 4 => (c.offset, 1),
        Some(c) if !c.is_data_loc() && c.size == 16 => (c.offset, 0),
        _ => (TpField::ABSENT, 0),
    };
    MarkVictimLayout {
        pid: off("pid", &[4]),
        comm,
        total_vm: off("total_vm", &[8]),
        anon_rss: off("anon_rss", &[8]),
        file_rss: off("file_rss", &[8]),
        shmem_rss: off("shmem_rss", &[8]),
        uid: off("uid", &[4]),
        pgtables: off("pgtables", &[8]),
        oom_score_adj: off("oom_score_adj", &[2]),
        comm_is_data_loc,
    }
}

/// One OOM kill as exported in events and logs. Absent fields are `null`, never zero.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OomKill {
    /// Wall-clock time of the kill (Unix seconds).
    pub time: f64,
    pub scope: Scope,
    pub victim_pid: Option<i32>,
    pub victim_tgid: Option<i32>,
    pub victim_comm: Option<String>,
    pub victim_uid: Option<u32>,
    pub total_vm_bytes: Option<u64>,
    pub anon_rss_bytes: Option<u64>,
    pub file_rss_bytes: Option<u64>,
    pub shmem_rss_bytes: Option<u64>,
    pub pgtables_bytes: Option<u64>,
    pub oom_score_adj: Option<i16>,
    /// The victim's memory cgroup, relative to the memory controller's hierarchy root (the v1
    /// memory hierarchy on v1 and hybrid hosts, the v2 hierarchy otherwise).
    pub cgroup: Option<String>,
    pub memcg_id: Option<u64>,
    pub cgroup_v2_id: Option<u64>,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    /// Names from the container runtime (`namespace`, `pod`, `container`, `image`,
    /// `runtime`); empty when unknown.
    #[serde(flatten)]
    pub names: crate::workloads::Names,
    /// Read from cgroupfs right after the kill: best effort, absent if the cgroup is gone.
    pub memory_limit_bytes: Option<u64>,
    pub memory_usage_bytes: Option<u64>,
    /// The cgroup whose limit the kill hit (`null` for the host, or when it cannot be told) and
    /// whose it is: `self`, `ancestor` or `host` (see `limit`).
    pub limit_cgroup: Option<String>,
    pub limit_scope: Option<limit::LimitScope>,
    pub trigger_pid: u32,
    pub trigger_tgid: u32,
    pub trigger_comm: String,
    /// From the fentry/kprobe hook where the kernel allows it.
    pub context_hook: Option<&'static str>,
    pub constraint: Option<&'static str>,
    pub oom_memcg_id: Option<u64>,
    pub totalpages: Option<u64>,
    /// The verdict's class (`reason` on `sensor_oom_kills_total`) and the kill's lead-up.
    pub reason: verdict::Reason,
    pub lead_up: Option<verdict::LeadUp>,
}

fn comm(raw: &[u8]) -> String {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// Joins the kernel's leaf-first NUL-separated kernfs names into `/a/b/c`.
pub fn cgroup_path(buf: &[u8], len: usize) -> String {
    let used = &buf[..len.min(buf.len())];
    let mut names: Vec<String> = used
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    names.reverse();
    format!("/{}", names.join("/"))
}

/// `oom_control.constraint` names.
fn constraint_name(c: u32) -> &'static str {
    match c {
        0 => "none",
        1 => "cpuset",
        2 => "memory_policy",
        3 => "memcg",
        _ => "unknown",
    }
}

impl OomKill {
    /// Converts a record; `cgroups` resolves truncated paths and reads limits (skipped in tests).
    pub fn from_record(r: &OomKillRecord, scopes: Option<&ScopeResolver>, cgroups: Option<&Hierarchies>) -> OomKill {
        let has = |bit: u32| r.present & bit != 0;
        let kb = |bit: u32, v: u64| has(bit).then(|| v.saturating_mul(1024));
        let frames = (r.stack_bytes as usize / 8).min(r.stack.len());
        let stack = if has(field::STACK) { &r.stack[..frames] } else { &[][..] };
        let context = r.parts & part::CONTEXT != 0;
        let scope = if context && has(field::CONSTRAINT) {
            if r.constraint == 3 {
                Scope::Memcg
            } else {
                Scope::Global
            }
        } else {
            scopes.map_or(Scope::Unknown, |s| s.classify(stack))
        };
        let mut cgroup = has(field::CGROUP_PATH).then(|| cgroup_path(&r.cgroup.path, usize::from(r.cgroup.path_len)));
        if r.cgroup.path_truncated != 0 || cgroup.is_none() {
            if let (Some(h), true) = (cgroups, has(field::MEMCG_ID)) {
                if let Some(p) = h.find_memory_cgroup(r.cgroup.memcg_id, 20_000) {
                    cgroup = Some(p);
                }
            }
        }
        let (limit, usage) = match (&cgroup, cgroups) {
            (Some(p), Some(h)) => h.memory_limit_usage(p),
            _ => (None, None),
        };
        let w = cgroup.as_deref().map(workload);
        let nonempty = |s: String| (!s.is_empty()).then_some(s);
        OomKill {
            time: clock::unix_seconds(clock::ktime_to_wall(r.header.ktime_ns)),
            scope,
            victim_pid: has(field::PID).then_some(r.victim_pid),
            victim_tgid: has(field::TGID).then_some(r.victim_tgid),
            victim_comm: has(field::COMM).then(|| comm(&r.victim_comm)),
            victim_uid: has(field::UID).then_some(r.victim_uid),
            total_vm_bytes: kb(field::TOTAL_VM, r.total_vm_kb),
            anon_rss_bytes: kb(field::ANON_RSS, r.anon_rss_kb),
            file_rss_bytes: kb(field::FILE_RSS, r.file_rss_kb),
            shmem_rss_bytes: kb(field::SHMEM_RSS, r.shmem_rss_kb),
            pgtables_bytes: kb(field::PGTABLES, r.pgtables_kb),
            oom_score_adj: has(field::OOM_SCORE_ADJ).then_some(r.oom_score_adj),
            cgroup,
            memcg_id: has(field::MEMCG_ID).then_some(r.cgroup.memcg_id),
            cgroup_v2_id: (has(field::DFL_CGROUP_ID) && r.cgroup.dfl_cgroup_id != 0).then_some(r.cgroup.dfl_cgroup_id),
            container_id: w.clone().and_then(|w| nonempty(w.container_id)),
            pod_uid: w.and_then(|w| nonempty(w.pod_uid)),
            names: Default::default(),
            memory_limit_bytes: limit,
            memory_usage_bytes: usage,
            limit_cgroup: None,
            limit_scope: None,
            trigger_pid: r.trigger_pid,
            trigger_tgid: r.trigger_tgid,
            trigger_comm: comm(&r.trigger_comm),
            context_hook: context.then_some(match r.context_hook {
                hook::FENTRY => "fentry",
                hook::KPROBE => "kprobe",
                _ => "unknown",
            }),
            constraint: (context && has(field::CONSTRAINT)).then(|| constraint_name(r.constraint)),
            oom_memcg_id: (context && has(field::OC_MEMCG_ID)).then_some(r.oc_memcg_id),
            totalpages: (context && has(field::TOTALPAGES)).then_some(r.totalpages),
            reason: verdict::Reason::Unknown,
            lead_up: None,
        }
    }

    /// Victim resident memory (anon + file + shmem) in bytes, where known.
    pub fn rss_bytes(&self) -> Option<u64> {
        let parts = [self.anon_rss_bytes, self.file_rss_bytes, self.shmem_rss_bytes];
        parts.iter().any(Option::is_some).then(|| parts.iter().flatten().sum())
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_string(), ToString::to_string)
}

/// Kernel-side OOM kill counts the sensor checks itself against.
fn vmstat_oom_kill() -> Option<u64> {
    procfs::vmstat()
        .ok()?
        .get("oom_kill")
        .and_then(|v| u64::try_from(*v).ok())
}

/// A memory cgroup's own (non-hierarchical) kill count: `memory.events.local` on v2,
/// `memory.oom_control` on v1 (local there).
fn cgroup_oom_kills(h: &Hierarchies, cgroup: &str) -> Option<u64> {
    let dir = h.memory_dir(cgroup)?;
    let file = if h.memory_is_v1() {
        "memory.oom_control"
    } else {
        "memory.events.local"
    };
    let text = std::fs::read_to_string(dir.join(file)).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

struct CrossCheck {
    vmstat_base: Option<u64>,
    /// Kernel counter at the sensor's start for cgroups that existed then.
    cgroup_base: HashMap<String, u64>,
    /// Kills the sensor attributed per cgroup.
    seen: HashMap<String, u64>,
    /// Every kill the sensor saw (`seen` loses the cgroups that vanish).
    seen_total: u64,
    /// Last computed differences; a positive one is only published when it persists.
    last: HashMap<String, i64>,
    /// The labels each cgroup's gauge carries (its names may arrive after its first refresh).
    labelled: HashMap<String, crate::cgroup::WorkloadLabels>,
}

/// Userspace half of the OOM slice: turns records into metrics, events and log lines.
pub struct OomSlice {
    kills: IntCounterVec,
    victim_rss: HistogramVec,
    last_kill: GaugeVec,
    discrepancy: GaugeVec,
    scopes: Option<ScopeResolver>,
    cgroups: Hierarchies,
    workloads: Mutex<WorkloadSet>,
    cross: Mutex<CrossCheck>,
    host_seen: AtomicU64,
    hub: Arc<EventHub>,
    disc: Arc<Discovery>,
    history_cfg: config::HistoryConfig,
    history: Mutex<History>,
    /// When the history was last sampled and the cross-check last refreshed (upkeep runs at the
    /// shorter of the two intervals).
    due: Mutex<(Option<Instant>, Option<Instant>)>,
    /// When the host's largest memory users were last read, and them.
    host_top: Mutex<(Option<Instant>, Vec<history::MemUser>)>,
    /// Itself, for the task that counts a kill once its container is named.
    me: std::sync::OnceLock<std::sync::Weak<OomSlice>>,
    boot_id: String,
    /// The kernel counters last saved in the journal (kills while down, see `down`).
    saved: Mutex<down::Expected>,
    /// Limit counters of every memory cgroup as last seen (which limit a kill hit).
    limits: Mutex<limit::Baselines>,
    /// Kills being handled off the reader, waited for at shutdown.
    pending: pending::Pending,
    /// `oom_imminent` warnings (see `imminent`): state, `sensor_oom_imminent`, the horizon.
    warnings: Mutex<imminent::Warnings>,
    imminent_gauge: GaugeVec,
    imminent_horizon: Duration,
}

impl OomSlice {
    /// `scopes` classifies kills from their stacks where the context hook is missing (read from
    /// kallsyms before the programs attach, so starting is quick).
    pub fn new(
        registry: &Registry,
        hub: Arc<EventHub>,
        workloads_per_metric: usize,
        grace: Duration,
        scopes: Option<ScopeResolver>,
        disc: Arc<Discovery>,
        history_cfg: config::HistoryConfig,
    ) -> prometheus::Result<OomSlice> {
        let mut labels = vec!["scope", "reason"];
        labels.extend(WORKLOAD_LABELS);
        labels.extend(OWNER_LABELS);
        let kills = IntCounterVec::new(
            Opts::new("sensor_oom_kills_total", "OOM kills by scope (memcg: a memory cgroup hit its limit; global: the host ran out), the verdict of the kill's lead-up (reason: growth, spike, limit, host, repeat, unknown), victim workload and its pod's owner (owner_kind, owner)."),
            &labels,
        )?;
        let victim_rss = HistogramVec::new(
            HistogramOpts::new(
                "sensor_oom_kill_victim_rss_bytes",
                "Resident memory (anon + file + shmem) of OOM-killed tasks.",
            )
            .buckets(prometheus::exponential_buckets(1024.0 * 1024.0, 4.0, 10)?),
            &WORKLOAD_LABELS,
        )?;
        let last_kill = GaugeVec::new(
            Opts::new(
                "sensor_oom_kill_last_timestamp_seconds",
                "Time of the last OOM kill in the workload.",
            ),
            &WORKLOAD_LABELS,
        )?;
        let mut dlabels = vec!["source"];
        dlabels.extend(WORKLOAD_LABELS);
        let discrepancy = GaugeVec::new(
            Opts::new(
                "sensor_oom_kills_unseen",
                "Kernel-counted OOM kills minus kills the sensor saw since it started: source=vmstat for the host (/proc/vmstat oom_kill), source=memcg per cgroup (memory.events.local / memory.oom_control). 0 when they agree.",
            ),
            &dlabels,
        )?;
        registry.register(Box::new(kills.clone()))?;
        registry.register(Box::new(victim_rss.clone()))?;
        registry.register(Box::new(last_kill.clone()))?;
        registry.register(Box::new(discrepancy.clone()))?;
        let imminent_gauge = GaugeVec::new(
            Opts::new(
                "sensor_oom_imminent",
                "1 while the workload's steady memory growth would reach the limit that binds it within probes.oom.imminent_horizon (see the oom_imminent event); absent otherwise.",
            ),
            &WORKLOAD_LABELS,
        )?;
        registry.register(Box::new(imminent_gauge.clone()))?;
        discrepancy
            .with_label_values(&["vmstat", "", "", "", "", "", ""])
            .set(0.0);
        // The discovery's view of the hierarchies, read once at start.
        let cgroups = disc.hier.clone();
        let cross = CrossCheck {
            vmstat_base: vmstat_oom_kill(),
            cgroup_base: snapshot_cgroup_counters(&cgroups, 20_000),
            seen: HashMap::new(),
            seen_total: 0,
            last: HashMap::new(),
            labelled: HashMap::new(),
        };
        let history = History::with_left_out(
            history_cfg.capacity(),
            workloads_per_metric,
            disc.left_out_metrics().for_set("oom_history"),
        );
        let boot_id = down::boot_id();
        let saved = down::on_start(&hub, &cross, &boot_id);
        let limits = limit::Baselines::snapshot(&cgroups, limit::KEPT);
        Ok(OomSlice {
            kills,
            victim_rss,
            last_kill,
            discrepancy,
            scopes,
            cgroups,
            workloads: Mutex::new(WorkloadSet::with_left_out(
                workloads_per_metric,
                grace,
                disc.left_out_metrics().for_set("oom_kills"),
            )),
            cross: Mutex::new(cross),
            host_seen: AtomicU64::new(0),
            hub,
            disc,
            history: Mutex::new(history),
            history_cfg,
            due: Mutex::new((None, None)),
            host_top: Mutex::new((None, Vec::new())),
            me: std::sync::OnceLock::new(),
            boot_id,
            saved: Mutex::new(saved),
            limits: Mutex::new(limits),
            pending: pending::Pending::default(),
            warnings: Mutex::new(imminent::Warnings::default()),
            imminent_gauge,
            imminent_horizon: config::IMMINENT_HORIZON,
        })
    }

    /// Saves the kernel counters as they should read now, if they changed.
    fn save_counters(&self) {
        let c = self.cross.locked();
        let mut saved = self.saved.locked();
        down::checkpoint(&self.hub, &c, &self.boot_id, &mut saved);
    }

    /// Handles a kill on a blocking thread (it reads cgroup files: the victim's path by id,
    /// the limit that fired, the lead-up), never on the ring reader.
    pub fn handle_kill(&self, rec: &OomKillRecord) {
        if let (Some(me), Ok(rt)) = (
            self.me.get().and_then(std::sync::Weak::upgrade),
            tokio::runtime::Handle::try_current(),
        ) {
            let rec = *rec;
            let held = self.pending.hold();
            rt.spawn_blocking(move || me.process_kill(&rec, held));
            return;
        }
        self.process_kill(rec, self.pending.hold());
    }

    fn process_kill(&self, rec: &OomKillRecord, held: pending::Held) {
        let frames = (rec.stack_bytes as usize / 8).min(rec.stack.len());
        let stack = if rec.present & field::STACK != 0 {
            &rec.stack[..frames]
        } else {
            &[][..]
        };
        if let Some(s) = &self.scopes {
            if !s.is_kill(stack) {
                tracing::info!(
                    victim_pid = rec.victim_pid,
                    "task already exiting was marked as OOM victim; not a kill"
                );
                return;
            }
        }
        let mut kill = OomKill::from_record(rec, self.scopes.as_ref(), Some(&self.cgroups));
        let cg = kill.cgroup.clone().unwrap_or_else(|| UNKNOWN_CGROUP.to_string());
        let binding = limit::find_binding(
            &self.cgroups,
            &self.limits,
            kill.cgroup.as_deref(),
            kill.oom_memcg_id,
            kill.scope == Scope::Global || kill.constraint.is_some_and(|c| c != "memcg"),
            kill.scope == Scope::Memcg,
        );
        kill.limit_cgroup = binding.as_ref().and_then(|b| b.cgroup.clone());
        kill.limit_scope = binding.as_ref().map(|b| b.scope);
        if self.history_cfg.enabled {
            let l = self.lead_up(&kill, &cg, binding.as_ref());
            kill.reason = l.reason;
            kill.lead_up = Some(l);
        }
        // A kill is activity: its workload outranks idle members of the kill series' set.
        self.disc.note_active(&cg);
        let rank = self.disc.rank(&cg);
        let (base, displaced) = {
            let mut w = self.workloads.locked();
            w.labels_ranked(&cg, rank)
        };
        if let Some(d) = displaced {
            self.drop_series(&d);
        }
        // A container never seen before (it started and was killed between two rescans):
        // its names are looked up first, on a task, never here on the reader. The kill is
        // counted once they come, or after NAME_WAIT without them.
        let unseen = self
            .disc
            .resolver()
            .filter(|r| !base[1].is_empty() && r.cached(&base[1]).is_none());
        if let (Some(r), Some(me), Ok(rt)) = (
            unseen,
            self.me.get().and_then(std::sync::Weak::upgrade),
            tokio::runtime::Handle::try_current(),
        ) {
            let r = Arc::clone(r);
            rt.spawn(async move {
                let names = r.resolve(&base[1], NAME_WAIT).await;
                me.count_kill(kill, cg, base, &names);
                drop(held);
            });
            return;
        }
        let names = self.disc.names(&base[1]);
        self.count_kill(kill, cg, base, &names);
        drop(held);
    }

    /// Counts, logs and publishes a kill with its workload's names.
    fn count_kill(&self, mut kill: OomKill, cg: String, base: [String; 3], names: &crate::workloads::Names) {
        kill.names = names.clone();
        let wl = with_names(base, names);
        let wl_ref: [&str; 6] = std::array::from_fn(|i| wl[i].as_str());
        let mut kill_labels = vec![kill.scope.label(), kill.reason.label()];
        kill_labels.extend(wl_ref);
        kill_labels.extend([names.owner_kind.as_str(), names.owner.as_str()]);
        self.kills.with_label_values(&kill_labels).inc();
        if let Some(rss) = kill.rss_bytes() {
            self.victim_rss.with_label_values(&wl_ref).observe(rss as f64);
        }
        self.host_seen.fetch_add(1, Ordering::Relaxed);
        // Held until the event is published: a saved expectation (`down`) counts a kill
        // exactly when the event comes before it in the journal.
        let mut cross = self.cross.locked();
        {
            let c = &mut *cross;
            *c.seen.entry(cg).or_insert(0) += 1;
            c.seen_total += 1;
            // Rings of different CPUs may deliver kills out of time order: keep the latest.
            // Under the lock, so two readers cannot interleave the compare and the set.
            let last = self.last_kill.with_label_values(&wl_ref);
            if kill.time > last.get() {
                last.set(kill.time);
            }
        }
        tracing::info!(
            target: "sensor::oom",
            event = "oom_kill",
            scope = kill.scope.label(),
            victim_pid = %opt(&kill.victim_pid),
            victim_tgid = %opt(&kill.victim_tgid),
            victim_comm = %opt(&kill.victim_comm),
            victim_uid = %opt(&kill.victim_uid),
            cgroup = %opt(&kill.cgroup),
            container_id = %opt(&kill.container_id),
            pod_uid = %opt(&kill.pod_uid),
            namespace = %kill.names.namespace,
            pod = %kill.names.pod,
            container = %kill.names.container,
            image = %kill.names.image,
            runtime = %kill.names.runtime,
            owner_kind = %kill.names.owner_kind,
            owner = %kill.names.owner,
            memcg_id = %opt(&kill.memcg_id),
            total_vm_bytes = %opt(&kill.total_vm_bytes),
            anon_rss_bytes = %opt(&kill.anon_rss_bytes),
            file_rss_bytes = %opt(&kill.file_rss_bytes),
            shmem_rss_bytes = %opt(&kill.shmem_rss_bytes),
            pgtables_bytes = %opt(&kill.pgtables_bytes),
            oom_score_adj = %opt(&kill.oom_score_adj),
            memory_limit_bytes = %opt(&kill.memory_limit_bytes),
            memory_usage_bytes = %opt(&kill.memory_usage_bytes),
            limit_cgroup = %opt(&kill.limit_cgroup),
            limit_scope = kill.limit_scope.map_or("-", limit::LimitScope::label),
            trigger_pid = kill.trigger_pid,
            trigger_comm = %kill.trigger_comm,
            constraint = %opt(&kill.constraint),
            totalpages = %opt(&kill.totalpages),
            reason = kill.reason.label(),
            verdict = %kill.lead_up.as_ref().map_or("-", |l| l.verdict.as_str()),
            "OOM kill"
        );
        self.hub.publish_as("oom_kill", &kill);
        drop(cross);
    }

    /// The kill's lead-up from the bounded history plus one fresh read of the victim cgroup's
    /// counters (a handful of small files; the kill path walks nothing).
    fn lead_up(&self, kill: &OomKill, cg: &str, binding: Option<&limit::Binding>) -> verdict::LeadUp {
        let (samples, earlier) = {
            let mut h = self.history.locked();
            (h.before(cg, kill.time), h.note_kill(cg, kill.time))
        };
        let after = (kill.cgroup.is_some())
            .then(|| {
                let now = clock::unix_seconds(std::time::SystemTime::now());
                history::read_sample(&self.cgroups, cg, now, self.disc.reclaim_ns(cg))
            })
            .flatten();
        let global = kill.scope == Scope::Global;
        let host_available = global.then(history::host_memory).flatten().map(|(_, a)| a);
        let host_top = if global {
            self.host_top.locked().1.clone()
        } else {
            Vec::new()
        };
        verdict::lead_up(&verdict::Input {
            time: kill.time,
            scope: kill.scope,
            interval: self.history_cfg.interval.as_secs_f64(),
            samples: &samples,
            after,
            limit: binding.and_then(|b| b.limit_bytes).or(kill.memory_limit_bytes),
            victim_rss: kill.rss_bytes(),
            earlier_kills: &earlier,
            host_available,
            host_top: &host_top,
            binding,
        })
    }

    /// Samples every watched memory cgroup into the history: at most
    /// `limits.workloads_per_metric`, the most active first (see `admission`); vanished
    /// cgroups leave it.
    pub fn sample_history(&self) {
        let ranked = self.disc.ranked();
        let watched: Vec<&str> = {
            let mut h = self.history.locked();
            let live: std::collections::HashSet<&str> = ranked.iter().map(|(c, _)| c.as_str()).collect();
            h.retain(|c| live.contains(c));
            ranked
                .iter()
                .filter(|(c, r)| h.admit(c, *r))
                .map(|(c, _)| c.as_str())
                .collect()
        };
        let now = clock::unix_seconds(std::time::SystemTime::now());
        let read: Vec<(&str, history::Sample)> = watched
            .into_iter()
            .filter_map(|cg| history::read_sample(&self.cgroups, cg, now, self.disc.reclaim_ns(cg)).map(|s| (cg, s)))
            .collect();
        self.sample_host();
        let mut h = self.history.locked();
        for (cg, s) in read {
            h.record(cg, s);
        }
    }

    /// The host's largest memory users for global kills: every tick while `MemAvailable` is
    /// under a quarter of `MemTotal` (when a global kill is near), else every [`HOST_TOP_EVERY`].
    fn sample_host(&self) {
        let low = history::host_memory().is_some_and(|(total, avail)| avail < total / 4);
        let mut t = self.host_top.locked();
        if low || t.0.is_none_or(|at| at.elapsed() >= HOST_TOP_EVERY) {
            t.1 = history::top_users(HOST_TOP_USERS);
            t.0 = Some(Instant::now());
        }
    }

    /// Recomputes the cross-check gauges and drops series of cgroups gone past the grace period.
    pub fn refresh(&self) {
        let mut c = self.cross.locked();
        let host = match (vmstat_oom_kill(), c.vmstat_base) {
            (Some(now), Some(base)) => now.saturating_sub(base) as i64 - self.host_seen.load(Ordering::Relaxed) as i64,
            _ => 0,
        };
        let mut diffs: Vec<(String, i64)> = vec![(String::new(), host)];
        let keys: Vec<String> = c.seen.keys().cloned().collect();
        for cg in keys {
            let Some(now) = cgroup_oom_kills(&self.cgroups, &cg) else {
                continue;
            };
            let base = c.cgroup_base.get(&cg).copied().unwrap_or(0);
            let seen = c.seen.get(&cg).copied().unwrap_or(0);
            diffs.push((cg, now.saturating_sub(base) as i64 - seen as i64));
        }
        for (cg, d) in diffs {
            // The kernel bumps its counters just before the tracepoint fires; a difference that
            // is still there one refresh later is real.
            let prev = c.last.insert(cg.clone(), d).unwrap_or(0);
            let shown = if d > 0 { d.min(prev.max(0)) } else { d };
            if cg.is_empty() {
                self.discrepancy
                    .with_label_values(&["vmstat", "", "", "", "", "", ""])
                    .set(shown as f64);
            } else {
                let mut w = self.workloads.locked();
                let l = self.disc.named(w.labels(&cg));
                drop(w);
                if c.labelled.get(&cg).is_some_and(|old| *old != l) {
                    remove_cgroup(&self.discrepancy, &cg);
                }
                self.discrepancy
                    .with_label_values(&["memcg", &l[0], &l[1], &l[2], &l[3], &l[4], &l[5]])
                    .set(shown as f64);
                c.labelled.insert(cg, l);
            }
        }
        drop(c);
        let expired = {
            let mut w = self.workloads.locked();
            w.sweep(
                |cg| self.cgroups.memory_dir(cg).is_some_and(|d| d.exists()),
                Instant::now(),
            )
        };
        for cg in expired {
            self.drop_series(&cg);
        }
    }

    /// Drops the series of a workload that vanished or was displaced from the kill series' set.
    fn drop_series(&self, cg: &str) {
        // Whatever names its series carried (empty before the lookup ended, then named).
        remove_cgroup(&self.kills, cg);
        remove_cgroup(&self.victim_rss, cg);
        remove_cgroup(&self.last_kill, cg);
        remove_cgroup(&self.discrepancy, cg);
        {
            let mut c = self.cross.locked();
            c.labelled.remove(cg);
            c.seen.remove(cg);
            c.last.remove(cg);
        }
    }
}

/// Removes every series of `vec` labelled `cgroup="<cg>"`.
fn remove_cgroup<T: prometheus::core::MetricVecBuilder>(vec: &prometheus::core::MetricVec<T>, cg: &str) {
    use prometheus::core::Collector as _;
    for mf in vec.collect() {
        for m in mf.get_metric() {
            if m.get_label().iter().any(|l| l.name() == "cgroup" && l.value() == cg) {
                let labels: HashMap<&str, &str> = m.get_label().iter().map(|l| (l.name(), l.value())).collect();
                let _ = vec.remove(&labels);
            }
        }
    }
}

/// The pod owner's labels on `sensor_oom_kills_total` (one owner has many pods: bounded by the
/// workload labels before them).
const OWNER_LABELS: [&str; 2] = ["owner_kind", "owner"];

/// Longest a kill of a container never seen before waits for its names before it is counted
/// (without them).
const NAME_WAIT: Duration = Duration::from_millis(750);

/// The OOM probe: victim fields from `oom:mark_victim`, its cgroup from the raw tracepoint, the
/// kill's context from `oom_kill_process`; one record per kill.
pub struct OomProbe {
    cfg: config::OomConfig,
    /// Read in `prepare` (before attaching), taken by `start`.
    scopes: Mutex<Option<ScopeResolver>>,
}

impl OomProbe {
    pub fn new(cfg: config::OomConfig) -> OomProbe {
        OomProbe {
            cfg,
            scopes: Mutex::new(None),
        }
    }
}

/// How often the cross-check against the kernel's counters is recomputed.
const REFRESH: Duration = Duration::from_secs(2);

/// Largest memory users named in a global kill's lead-up.
const HOST_TOP_USERS: usize = 5;
/// How often they are read while the host has memory to spare.
const HOST_TOP_EVERY: Duration = Duration::from_secs(30);

/// How often the history asks for a rescan of the memory hierarchy (new workloads).
const HISTORY_DISCOVERY: Duration = Duration::from_secs(10);

const RECORDS: &[RecordKind] = &[RecordKind {
    kind: sensor_common::record::kind::OOM_KILL,
    len: OomKillRecord::LEN,
    version: sensor_common::oom::RECORD_VERSION,
}];

impl Probe for OomProbe {
    fn spec(&self) -> &'static ProbeSpec {
        &SPEC
    }

    fn enabled(&self) -> bool {
        self.cfg.enabled
    }

    fn excluded_hooks(&self) -> &[HookKind] {
        &self.cfg.exclude_hooks
    }

    fn records(&self) -> &'static [RecordKind] {
        RECORDS
    }

    fn prepare(&self, kctx: &KernelContext, plan: &mut LoadPlan) {
        let mut layouts = Layouts::discover(kctx);
        layouts.notes.extend(plan.task_layout(kctx));

        for n in &layouts.notes {
            tracing::warn!(note = %n, "OOM layout is partial");
        }
        layouts.apply(plan);
        if self.cfg.enabled {
            let scopes = ScopeResolver::from_kallsyms()
                .map_err(|e| tracing::warn!(error = %e, "OOM scope classification from stacks unavailable"))
                .ok();
            *self.scopes.locked() = scopes;
        }
    }

    /// The history follows new and vanished workloads.
    fn discovery_interval(&self) -> Option<Duration> {
        self.cfg.history.enabled.then_some(HISTORY_DISCOVERY)
    }

    fn start(&self, ctx: &mut StartContext<'_>) -> Result<Arc<dyn Running>, StartError> {
        let scopes = self.scopes.locked().take();
        let slice = OomSlice::new(
            ctx.registry,
            Arc::clone(ctx.hub),
            ctx.workloads_per_metric,
            ctx.vanished_grace,
            scopes,
            Arc::clone(ctx.discovery),
            self.cfg.history.clone(),
        )?;
        let slice = Arc::new(OomSlice {
            imminent_horizon: self.cfg.imminent_horizon,
            ..slice
        });
        let _ = slice.me.set(Arc::downgrade(&slice));
        Ok(slice)
    }
}

impl Running for OomSlice {
    /// Kills still being handled are published before the journal closes.
    fn finish(&self) {
        if !self.pending.wait(Duration::from_secs(5)) {
            tracing::warn!("OOM kills still being handled at shutdown were not all published");
        }
    }

    fn handle(&self, _kind: u16, bytes: &[u8]) {
        match crate::decode::read::<OomKillRecord>(bytes) {
            Some(r) => self.handle_kill(&r),
            // The dispatcher checked the length; this cannot happen, but must not panic.
            None => tracing::error!(len = bytes.len(), "OOM record shorter than checked"),
        }
    }

    fn upkeep_interval(&self) -> Option<Duration> {
        if self.history_cfg.enabled {
            Some(REFRESH.min(self.history_cfg.interval))
        } else {
            Some(REFRESH)
        }
    }

    /// Samples the history and refreshes the cross-check, each when its own interval is due.
    fn upkeep(&self) {
        let now = Instant::now();
        // A little early counts as due: upkeep ticks jitter around the interval.
        let due =
            |last: Option<Instant>, every: Duration| last.is_none_or(|t| now.duration_since(t) + every / 10 >= every);
        let (sample, refresh) = {
            let mut d = self.due.locked();
            let sample = self.history_cfg.enabled && due(d.0, self.history_cfg.interval);
            let refresh = due(d.1, REFRESH);
            if sample {
                d.0 = Some(now);
            }
            if refresh {
                d.1 = Some(now);
            }
            (sample, refresh)
        };
        if sample {
            self.sample_history();
            self.assess_imminent();
        }
        if refresh {
            self.refresh();
            self.save_counters();
        }
    }
}

/// Every existing memory cgroup's own kill counter at start, so per-cgroup cross-checks count
/// only kills since the sensor started.
fn snapshot_cgroup_counters(h: &Hierarchies, limit: usize) -> HashMap<String, u64> {
    crate::cgroup::walk(h, limit)
        .into_iter()
        .filter_map(|(rel, _)| cgroup_oom_kills(h, &rel).map(|n| (rel, n)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::tracefs::TracepointFormat;

    #[test]
    fn layout_from_6_18_and_6_1_formats() {
        let l = mark_victim_layout(&TracepointFormat::parse(
            "\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;\n\tfield:__data_loc char[] comm;\toffset:12;\tsize:4;\tsigned:0;\n\tfield:unsigned long total_vm;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:short oom_score_adj;\toffset:64;\tsize:2;\tsigned:1;\n",
        ));
        assert_eq!(
            (l.pid, l.comm, l.comm_is_data_loc, l.total_vm, l.oom_score_adj),
            (8, 12, 1, 16, 64)
        );
        assert_eq!(l.anon_rss, TpField::ABSENT);
        let old = mark_victim_layout(&TracepointFormat::parse(
            "\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;\n",
        ));
        assert_eq!(
            old,
            MarkVictimLayout {
                pid: 8,
                ..MarkVictimLayout::ABSENT
            }
        );
    }

    fn zeroed() -> OomKillRecord {
        // SAFETY: all-zero is a valid OomKillRecord (Pod).
        unsafe { std::mem::zeroed() }
    }

    #[test]
    fn absent_fields_are_none() {
        let mut r = zeroed();
        r.present = field::PID | field::ANON_RSS;
        r.parts = part::FIELDS;
        r.victim_pid = 7;
        r.anon_rss_kb = 3;
        r.trigger_comm[..4].copy_from_slice(b"tail");
        let k = OomKill::from_record(&r, None, None);
        assert_eq!(k.victim_pid, Some(7));
        assert_eq!(k.anon_rss_bytes, Some(3072));
        assert_eq!(k.rss_bytes(), Some(3072));
        assert_eq!(k.victim_comm, None);
        assert_eq!(k.total_vm_bytes, None);
        assert_eq!(k.cgroup, None);
        assert_eq!(k.trigger_comm, "tail");
        assert_eq!(k.scope, Scope::Unknown);
        assert_eq!(k.constraint, None);
    }

    #[test]
    fn path_and_context_merge() {
        let mut r = zeroed();
        let names = b"cri-containerd-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope\0kubepods-burstable-pod1e9b4e3c_7a3f_4c8e_9d51_2b6f0a1c3d4e.slice\0kubepods-burstable.slice\0kubepods.slice\0";
        r.cgroup.path[..names.len()].copy_from_slice(names);
        r.cgroup.path_len = names.len() as u16;
        r.present = field::CGROUP_PATH | field::CONSTRAINT | field::TOTALPAGES;
        r.parts = part::FIELDS | part::CGROUP | part::CONTEXT;
        r.constraint = 3;
        r.totalpages = 8192;
        r.context_hook = hook::FENTRY;
        let k = OomKill::from_record(&r, None, None);
        assert_eq!(k.scope, Scope::Memcg, "constraint from oom_control wins over the stack");
        assert_eq!(k.constraint, Some("memcg"));
        assert_eq!(k.context_hook, Some("fentry"));
        assert_eq!(k.totalpages, Some(8192));
        assert_eq!(
            k.cgroup.as_deref(),
            Some("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1e9b4e3c_7a3f_4c8e_9d51_2b6f0a1c3d4e.slice/cri-containerd-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope")
        );
        assert_eq!(k.pod_uid.as_deref(), Some("1e9b4e3c-7a3f-4c8e-9d51-2b6f0a1c3d4e"));
        assert_eq!(
            k.container_id.as_deref(),
            Some("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
        );
    }

    #[test]
    fn root_cgroup_path() {
        assert_eq!(cgroup_path(&[0; 8], 0), "/");
        assert_eq!(cgroup_path(b"leaf\0mid\0", 9), "/mid/leaf");
        assert_eq!(
            cgroup_path(b"leaf\0mid\0", 100),
            "/mid/leaf",
            "length clamps to the buffer"
        );
    }
}
