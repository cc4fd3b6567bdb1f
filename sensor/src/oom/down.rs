//! Kills while the sensor was down: the kernel keeps counting OOM kills (`/proc/vmstat`
//! oom_kill, each memory cgroup's own count) when no sensor runs. The slice saves in the
//! journal what those counters should read given the kills it saw; on start, the difference
//! to what they read now (less kills the last run published after its last save) is
//! published as one `kills_while_down` event, so a restart never hides kills.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::{running::CrossCheck, UNKNOWN_CGROUP};
use crate::{cgroup::workload, events::EventHub, kernel::clock};

/// Name of the slice's state in the journal.
pub const STATE: &str = "oom_kill_counters";

/// What the kernel's counters read when every kill since was seen.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Expected {
    /// `/proc/sys/kernel/random/boot_id`: counters restart at boot.
    pub boot_id: String,
    /// Unix seconds when saved.
    pub time: f64,
    /// `/proc/vmstat` oom_kill.
    pub vmstat: Option<u64>,
    /// Each memory cgroup's own kill count (cgroups at 0 left out).
    pub cgroups: BTreeMap<String, u64>,
}

/// One workload's kills while no sensor ran.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkloadKills {
    pub cgroup: String,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    pub kills: u64,
}

/// The `kills_while_down` event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KillsWhileDown {
    pub time: f64,
    /// When the last run last saved its counters (Unix seconds).
    pub down_since: f64,
    /// Host-wide kills (`/proc/vmstat`), where readable.
    pub kills: Option<u64>,
    /// Per memory cgroup, from each cgroup's own counter.
    pub workloads: Vec<WorkloadKills>,
    /// The host rebooted in between: every kill since boot counts.
    pub rebooted: bool,
}

pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Kills while down: `now` less `prev` less the kills the last run published after saving
/// `prev` (`after`: per cgroup, `unknown` included; `after_total`: all of them).
pub fn compute(
    prev: &Expected,
    after: &HashMap<String, u64>,
    after_total: u64,
    now: &Expected,
) -> Option<KillsWhileDown> {
    let rebooted = !prev.boot_id.is_empty() && !now.boot_id.is_empty() && prev.boot_id != now.boot_id;
    let empty = Expected::default();
    let no_after = HashMap::new();
    let (prev, after, after_total) = if rebooted {
        (&empty, &no_after, 0)
    } else {
        (prev, after, after_total)
    };
    let kills = match (now.vmstat, prev.vmstat) {
        (Some(n), Some(p)) => Some(n.saturating_sub(p).saturating_sub(after_total)),
        (Some(n), None) if rebooted => Some(n),
        _ => None,
    };
    let workloads: Vec<WorkloadKills> = now
        .cgroups
        .iter()
        .filter_map(|(cg, n)| {
            let expected = prev.cgroups.get(cg).copied().unwrap_or(0) + after.get(cg).copied().unwrap_or(0);
            let kills = n.saturating_sub(expected);
            (kills > 0).then(|| {
                let w = workload(cg);
                let nonempty = |s: String| (!s.is_empty()).then_some(s);
                WorkloadKills {
                    cgroup: cg.clone(),
                    container_id: nonempty(w.container_id),
                    pod_uid: nonempty(w.pod_uid),
                    kills,
                }
            })
        })
        .collect();
    (kills.unwrap_or(0) > 0 || !workloads.is_empty()).then(|| KillsWhileDown {
        time: clock::unix_seconds(std::time::SystemTime::now()),
        down_since: prev.time,
        kills,
        workloads,
        rebooted,
    })
}

/// The counters as they should read now: the start's snapshot plus the kills seen since.
pub(super) fn expected(c: &CrossCheck, boot_id: &str) -> Expected {
    let mut cgroups: BTreeMap<String, u64> = c.cgroup_base.iter().map(|(k, v)| (k.clone(), *v)).collect();
    for (cg, n) in &c.seen {
        if cg != UNKNOWN_CGROUP {
            *cgroups.entry(cg.clone()).or_insert(0) += n;
        }
    }
    cgroups.retain(|_, n| *n > 0);
    Expected {
        boot_id: boot_id.to_string(),
        time: clock::unix_seconds(std::time::SystemTime::now()),
        vmstat: c.vmstat_base.map(|b| b + c.seen_total),
        cgroups,
    }
}

/// On start (`c` holds this start's snapshot and nothing seen yet): publishes the kills the
/// last run missed, if any, and saves this run's first expectation. Blocking (reads the
/// journal).
pub(super) fn on_start(hub: &EventHub, c: &CrossCheck, boot_id: &str) -> Expected {
    let now = expected(c, boot_id);
    if let Some(saved) = hub.saved_state(STATE) {
        match serde_json::from_value::<Expected>(saved.state) {
            Ok(prev) => {
                let (mut after, mut total) = (HashMap::new(), 0u64);
                hub.each_journaled_before_start(saved.after_seq, |ev| {
                    if ev.get("type").and_then(|t| t.as_str()) == Some("oom_kill") {
                        let cg = ev.get("cgroup").and_then(|c| c.as_str()).unwrap_or(UNKNOWN_CGROUP);
                        *after.entry(cg.to_string()).or_insert(0) += 1;
                        total += 1;
                    }
                });
                if let Some(k) = compute(&prev, &after, total, &now) {
                    let per: Vec<String> = k
                        .workloads
                        .iter()
                        .map(|w| format!("{}={}", w.cgroup, w.kills))
                        .collect();
                    tracing::warn!(
                        target: "sensor::oom",
                        event = "kills_while_down",
                        kills = ?k.kills,
                        workloads = %per.join(","),
                        down_since = k.down_since,
                        rebooted = k.rebooted,
                        "OOM kills while the sensor was down"
                    );
                    hub.publish_as("kills_while_down", &k);
                }
            }
            Err(e) => tracing::warn!(error = %e, "saved OOM kill counters unreadable; kills while down unknown"),
        }
    }
    hub.save_state(STATE, serde_json::to_value(&now).unwrap_or_default());
    now
}

/// Saves the expectation when it changed (the caller holds the cross-check lock, so no kill
/// is half-counted: seen and published happen under that lock too).
pub(super) fn checkpoint(hub: &EventHub, c: &CrossCheck, boot_id: &str, last: &mut Expected) {
    let mut now = expected(c, boot_id);
    now.time = last.time;
    if now != *last {
        now.time = clock::unix_seconds(std::time::SystemTime::now());
        match serde_json::to_value(&now) {
            Ok(v) => hub.save_state(STATE, v),
            Err(e) => tracing::error!(error = %e, "OOM kill counters not saved"),
        }
        *last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exp(boot: &str, vmstat: u64, cgs: &[(&str, u64)]) -> Expected {
        Expected {
            boot_id: boot.into(),
            time: 100.0,
            vmstat: Some(vmstat),
            cgroups: cgs.iter().map(|(k, v)| ((*k).to_string(), *v)).collect(),
        }
    }

    #[test]
    fn difference_less_what_was_published_after_the_save() {
        let prev = exp("b", 10, &[("/a", 4), ("/b", 1)]);
        let now = exp("b", 17, &[("/a", 7), ("/b", 1), ("/new", 2)]);
        let after: HashMap<String, u64> = [("/a".to_string(), 1), ("unknown".to_string(), 1)].into();
        let k = compute(&prev, &after, 2, &now).unwrap();
        assert_eq!(k.kills, Some(5));
        let w: Vec<(&str, u64)> = k.workloads.iter().map(|w| (w.cgroup.as_str(), w.kills)).collect();
        assert_eq!(w, [("/a", 2), ("/new", 2)]);
        assert!(!k.rebooted);
        assert_eq!(k.down_since, 100.0);
    }

    #[test]
    fn nothing_missed_is_no_event_and_resets_never_go_negative() {
        let prev = exp("b", 10, &[("/a", 4)]);
        let after: HashMap<String, u64> = [("/a".to_string(), 2)].into();
        assert_eq!(compute(&prev, &after, 2, &exp("b", 12, &[("/a", 6)])), None);
        // A cgroup removed and created again starts at 0.
        assert_eq!(compute(&prev, &HashMap::new(), 0, &exp("b", 10, &[("/a", 1)])), None);
    }

    #[test]
    fn a_reboot_counts_everything_since_boot() {
        let prev = exp("old", 50, &[("/a", 40)]);
        let after: HashMap<String, u64> = [("/a".to_string(), 3)].into();
        let k = compute(&prev, &after, 3, &exp("new", 2, &[("/a", 1)])).unwrap();
        assert!(k.rebooted);
        assert_eq!(k.kills, Some(2));
        assert_eq!(k.workloads[0].kills, 1);
    }

    #[test]
    fn workload_ids_come_from_the_path() {
        let id = "a".repeat(64);
        let cg = format!("/kubepods/burstable/pod12345678-1234-1234-1234-123456789abc/{id}");
        let k = compute(&exp("b", 0, &[]), &HashMap::new(), 0, &exp("b", 1, &[(&cg, 1)])).unwrap();
        assert_eq!(k.workloads[0].container_id.as_deref(), Some(id.as_str()));
        assert_eq!(
            k.workloads[0].pod_uid.as_deref(),
            Some("12345678-1234-1234-1234-123456789abc")
        );
    }
}
