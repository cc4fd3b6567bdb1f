//! The OOM probe's part of the web summary: kills counted, kills the kernel counted that the
//! sensor did not see, and the workloads an `oom_imminent` warning holds for, read from the
//! state its metrics export.

use serde_json::{json, Map, Value};

use super::running::OomSlice;
use crate::{
    probe::{View, ViewSpec},
    sync::Lock as _,
};

pub(super) const VIEW: ViewSpec = ViewSpec {
    key: "oom",
    recent: &[("recent", "oom_kill")],
    timeline: Some("oom_kill"),
    holding: Some(("imminent", "oom_imminent")),
    idle: || section(0, &[], Vec::new()),
};

/// The section from the counted kills, the cross-check's `(source, cgroup, difference)` rows
/// and the cgroups with a warning holding.
pub(super) fn section(kills: u64, shown: &[(&'static str, String, i64)], holding: Vec<String>) -> View {
    let unseen: Vec<Value> = shown
        .iter()
        .filter(|(_, _, d)| *d != 0)
        .map(|(source, cgroup, d)| json!({"source": source, "cgroup": cgroup, "count": d}))
        .collect();
    let unseen_total: i64 = shown.iter().map(|(_, _, d)| (*d).max(0)).sum();
    let mut fields = Map::new();
    fields.insert("kills_total".into(), json!(kills));
    fields.insert("unseen".into(), Value::Array(unseen));
    fields.insert("unseen_total".into(), json!(unseen_total));
    let problems = (unseen_total > 0)
        .then(|| format!("{unseen_total} OOM kills the kernel counted were not seen by the sensor"))
        .into_iter()
        .collect();
    View {
        fields,
        problems,
        holding,
    }
}

impl OomSlice {
    /// Its part of the web summary (see [`section`]).
    pub(super) fn summary(&self) -> View {
        let kills = self.host_seen.load(std::sync::atomic::Ordering::Relaxed);
        let shown = self.cross.locked().shown.clone();
        let holding = self.warnings.locked().holding.keys().cloned().collect();
        section(kills, &shown, holding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kills_unseen_and_warnings_make_the_section() {
        let shown = vec![
            ("vmstat", String::new(), 2),
            ("memcg", "/a".to_string(), 0),
            ("memcg", "/b".to_string(), -1),
        ];
        let v = section(5, &shown, vec!["/c".into()]);
        assert_eq!(v.fields["kills_total"], json!(5));
        assert_eq!(
            v.fields["unseen_total"],
            json!(2),
            "negative differences are not unseen kills"
        );
        assert_eq!(
            v.fields["unseen"].as_array().map(Vec::len),
            Some(2),
            "zero rows left out"
        );
        assert_eq!(v.problems.len(), 1);
        assert_eq!(v.holding, vec!["/c".to_string()]);
        assert!(section(0, &[], Vec::new()).problems.is_empty());
    }
}
