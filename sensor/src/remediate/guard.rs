//! The guard rails, as pure logic over a clock the caller passes in: no action on a resolved
//! alert or one without a rule, only on allowed targets, a cooldown per target, at most `max_actions` remediations and
//! `max_hosts()` distinct hosts per sliding window. Dry-run is decided by the caller, after the
//! guards, so a dry run shows exactly what would have run.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::{Duration, Instant},
};

use super::{
    alertmanager::{Alert, Status},
    config::{Limits, Rule},
};

/// Why an alert was not acted on; `result` is `skipped_<label>`.
#[derive(Debug, Clone, PartialEq)]
pub enum Skip {
    Resolved,
    NoRule,
    /// The target was acted on `ago` ago; the cooldown ends in `left`.
    Cooldown {
        ago: Duration,
        left: Duration,
    },
    /// `max_actions` remediations already ran in the window.
    RateLimit {
        max: usize,
        window: Duration,
    },
    /// Acting would touch more than `max` distinct hosts in the window.
    BlastRadius {
        max: usize,
        window: Duration,
    },
    /// A referenced target label is missing on the alert.
    MissingLabel(String),
    /// The alert's `label` (`value`, empty when absent) matches none of the rule's
    /// `allowed_targets` for it.
    NotAllowed {
        label: String,
        value: Option<String>,
        allowed: Vec<String>,
    },
}

impl Skip {
    pub fn label(&self) -> &'static str {
        match self {
            Skip::Resolved => "resolved",
            Skip::NoRule => "no_rule",
            Skip::Cooldown { .. } => "cooldown",
            Skip::RateLimit { .. } => "rate_limit",
            Skip::BlastRadius { .. } => "blast_radius",
            Skip::MissingLabel(_) => "missing_label",
            Skip::NotAllowed { .. } => "not_allowed",
        }
    }

    pub fn reason(&self) -> String {
        let d = |d: &Duration| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string();
        match self {
            Skip::Resolved => "the alert is resolved: nothing runs on a resolved alert".into(),
            Skip::NoRule => "no rule for this alert".into(),
            Skip::Cooldown { ago, left } => {
                format!("cooldown: this target was acted on {} ago, {} left", d(ago), d(left))
            }
            Skip::RateLimit { max, window } => {
                format!("rate limit: {max} remediations already in the last {}", d(window))
            }
            Skip::BlastRadius { max, window } => format!(
                "blast radius: {max} distinct hosts already acted on in the last {} (limits.max_hosts_percent of limits.fleet_hosts)",
                d(window)
            ),
            Skip::MissingLabel(l) => format!("the alert has no '{l}' label, which names the target"),
            Skip::NotAllowed { label, value, allowed } => {
                let list = allowed.join(", ");
                match value {
                    Some(v) => format!(
                        "target not allowed: {label}=\"{v}\" matches none of allowed_targets.{label} [{list}]"
                    ),
                    None => format!("target not allowed: the alert has no '{label}' label, allowed_targets.{label} [{list}] needs one"),
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Act,
    Skip(Skip),
}

/// `alertname` plus the rule's target labels, e.g. `SensorOOMOutlierHost{instance="h1"}`.
pub fn target_key(rule: &Rule, alert: &Alert) -> Result<String, Skip> {
    let mut parts = Vec::new();
    for l in &rule.target_labels {
        match alert.labels.get(l) {
            Some(v) => parts.push(format!("{l}=\"{v}\"")),
            None => return Err(Skip::MissingLabel(l.clone())),
        }
    }
    Ok(format!("{}{{{}}}", rule.alert, parts.join(",")))
}

/// Checks the alert's labels against the rule's `allowed_targets`.
pub fn allowed(rule: &Rule, alert: &Alert) -> Result<(), Skip> {
    for (label, res) in &rule.allowed_targets {
        let value = alert.labels.get(label);
        if !value.is_some_and(|v| res.iter().any(|r| r.is_match(v))) {
            return Err(Skip::NotAllowed {
                label: label.clone(),
                value: value.cloned(),
                allowed: res.iter().map(|r| r.as_str().to_string()).collect(),
            });
        }
    }
    Ok(())
}

pub struct Guard {
    limits: Limits,
    /// Remediations in the window: (when, host).
    acted: VecDeque<(Instant, Option<String>)>,
    /// Target key -> when it was last acted on.
    last_acted: HashMap<String, Instant>,
}

impl Guard {
    pub fn new(limits: Limits) -> Guard {
        Guard {
            limits,
            acted: VecDeque::new(),
            last_acted: HashMap::new(),
        }
    }

    /// Decides one alert; an `Act` is recorded at once (before any action runs), so concurrent
    /// notifications of the same alert cannot both act.
    pub fn decide(&mut self, now: Instant, alert: &Alert, rule: Option<&Rule>) -> Verdict {
        while let Some((t, _)) = self.acted.front() {
            if now.saturating_duration_since(*t) >= self.limits.window {
                self.acted.pop_front();
            } else {
                break;
            }
        }
        if alert.status == Status::Resolved {
            return Verdict::Skip(Skip::Resolved);
        }
        let Some(rule) = rule else {
            return Verdict::Skip(Skip::NoRule);
        };
        let key = match target_key(rule, alert) {
            Ok(k) => k,
            Err(s) => return Verdict::Skip(s),
        };
        // Before cooldowns and limits: a refused target uses up none of them.
        if let Err(s) = allowed(rule, alert) {
            return Verdict::Skip(s);
        }
        if let Some(t) = self.last_acted.get(&key) {
            let ago = now.saturating_duration_since(*t);
            if ago < rule.cooldown {
                return Verdict::Skip(Skip::Cooldown {
                    ago,
                    left: rule.cooldown - ago,
                });
            }
        }
        if self.acted.len() >= self.limits.max_actions {
            return Verdict::Skip(Skip::RateLimit {
                max: self.limits.max_actions,
                window: self.limits.window,
            });
        }
        let host = alert.labels.get(&self.limits.host_label).cloned();
        if let Some(h) = &host {
            let hosts: std::collections::HashSet<&str> = self.acted.iter().filter_map(|(_, h)| h.as_deref()).collect();
            if !hosts.contains(h.as_str()) && hosts.len() >= self.limits.max_hosts() {
                return Verdict::Skip(Skip::BlastRadius {
                    max: self.limits.max_hosts(),
                    window: self.limits.window,
                });
            }
        }
        self.acted.push_back((now, host));
        self.last_acted.insert(key, now);
        // Bounded: targets whose cooldown is long over are forgotten.
        if self.last_acted.len() > 10_000 {
            let keep = Duration::from_secs(24 * 3600).max(self.limits.window);
            self.last_acted.retain(|_, t| now.saturating_duration_since(*t) < keep);
        }
        Verdict::Act
    }
}

/// The labels of an alert as the audit shows them (everything but `alertname`).
pub fn labels_without_name(alert: &Alert) -> BTreeMap<String, String> {
    alert
        .labels
        .iter()
        .filter(|(k, _)| k.as_str() != "alertname")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remediate::config::{Action, ActionType};

    fn rule(alert: &str, targets: &[&str], cooldown: u64) -> Rule {
        Rule {
            alert: alert.into(),
            target_labels: targets.iter().map(|s| s.to_string()).collect(),
            cooldown: Duration::from_secs(cooldown),
            allowed_targets: Default::default(),
            actions: vec![Action {
                name: None,
                kind: ActionType::Log,
                command: vec![],
                shell: false,
                url: None,
                retries: 0,
                timeout: Duration::from_secs(1),
            }],
        }
    }

    fn alert(name: &str, status: Status, labels: &[(&str, &str)]) -> Alert {
        let mut l: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        l.insert("alertname".into(), name.into());
        Alert {
            status,
            labels: l,
            annotations: BTreeMap::new(),
            starts_at: String::new(),
            ends_at: String::new(),
            generator_url: String::new(),
            fingerprint: String::new(),
        }
    }

    fn limits(max_actions: usize, fleet: usize, pct: f64) -> Limits {
        Limits {
            window: Duration::from_secs(3600),
            max_actions,
            max_hosts_percent: pct,
            fleet_hosts: fleet,
            host_label: "instance".into(),
        }
    }

    #[test]
    fn resolved_and_unruled_alerts_never_act() {
        let mut g = Guard::new(limits(10, 100, 100.0));
        let r = rule("A", &["instance"], 60);
        let t = Instant::now();
        let a = alert("A", Status::Resolved, &[("instance", "h1")]);
        assert_eq!(g.decide(t, &a, Some(&r)), Verdict::Skip(Skip::Resolved));
        let a = alert("B", Status::Firing, &[("instance", "h1")]);
        assert_eq!(g.decide(t, &a, None), Verdict::Skip(Skip::NoRule));
        // Neither used up anything: the firing alert acts.
        let a = alert("A", Status::Firing, &[("instance", "h1")]);
        assert_eq!(g.decide(t, &a, Some(&r)), Verdict::Act);
    }

    #[test]
    fn cooldown_is_per_target() {
        let mut g = Guard::new(limits(10, 100, 100.0));
        let r = rule("A", &["namespace", "pod"], 600);
        let t = Instant::now();
        let p1 = alert(
            "A",
            Status::Firing,
            &[("namespace", "shop"), ("pod", "p1"), ("instance", "h1")],
        );
        let p2 = alert(
            "A",
            Status::Firing,
            &[("namespace", "shop"), ("pod", "p2"), ("instance", "h1")],
        );
        assert_eq!(g.decide(t, &p1, Some(&r)), Verdict::Act);
        assert_eq!(
            g.decide(t, &p2, Some(&r)),
            Verdict::Act,
            "another pod is another target"
        );
        let v = g.decide(t + Duration::from_secs(120), &p1, Some(&r));
        assert_eq!(
            v,
            Verdict::Skip(Skip::Cooldown {
                ago: Duration::from_secs(120),
                left: Duration::from_secs(480)
            })
        );
        if let Verdict::Skip(s) = v {
            assert_eq!(s.reason(), "cooldown: this target was acted on 2m ago, 8m left");
        }
        assert_eq!(g.decide(t + Duration::from_secs(600), &p1, Some(&r)), Verdict::Act);
        let nopod = alert("A", Status::Firing, &[("namespace", "shop")]);
        assert_eq!(
            g.decide(t, &nopod, Some(&r)),
            Verdict::Skip(Skip::MissingLabel("pod".into()))
        );
    }

    #[test]
    fn at_most_max_actions_per_window() {
        let mut g = Guard::new(limits(2, 100, 100.0));
        let r = rule("A", &["instance"], 1);
        let t = Instant::now();
        for h in ["h1", "h2"] {
            assert_eq!(
                g.decide(t, &alert("A", Status::Firing, &[("instance", h)]), Some(&r)),
                Verdict::Act
            );
        }
        let a3 = alert("A", Status::Firing, &[("instance", "h3")]);
        assert!(matches!(
            g.decide(t, &a3, Some(&r)),
            Verdict::Skip(Skip::RateLimit { max: 2, .. })
        ));
        // The window slides: an hour after the first two, there is room again.
        assert_eq!(g.decide(t + Duration::from_secs(3600), &a3, Some(&r)), Verdict::Act);
    }

    #[test]
    fn blast_radius_caps_distinct_hosts_per_window() {
        // 200 hosts, 1% -> 2 hosts an hour.
        let mut g = Guard::new(limits(100, 200, 1.0));
        let host = rule("Host", &["instance"], 1);
        let pod = rule("Pod", &["instance", "pod"], 1);
        let t = Instant::now();
        let on = |h: &str| alert("Host", Status::Firing, &[("instance", h)]);
        assert_eq!(g.decide(t, &on("h1"), Some(&host)), Verdict::Act);
        assert_eq!(g.decide(t, &on("h2"), Some(&host)), Verdict::Act);
        let v = g.decide(t, &on("h3"), Some(&host));
        assert!(matches!(v, Verdict::Skip(Skip::BlastRadius { max: 2, .. })), "{v:?}");
        // A host already acted on in the window does not widen the radius.
        let p = alert("Pod", Status::Firing, &[("instance", "h1"), ("pod", "x")]);
        assert_eq!(g.decide(t, &p, Some(&pod)), Verdict::Act);
        assert!(matches!(
            g.decide(t + Duration::from_secs(3599), &on("h3"), Some(&host)),
            Verdict::Skip(Skip::BlastRadius { .. })
        ));
        assert_eq!(
            g.decide(t + Duration::from_secs(3600), &on("h3"), Some(&host)),
            Verdict::Act
        );
    }

    #[test]
    fn a_small_fleet_may_still_act_on_one_host() {
        let mut g = Guard::new(limits(100, 10, 1.0));
        let r = rule("Host", &["instance"], 1);
        let t = Instant::now();
        assert_eq!(
            g.decide(t, &alert("Host", Status::Firing, &[("instance", "a")]), Some(&r)),
            Verdict::Act
        );
        assert!(matches!(
            g.decide(t, &alert("Host", Status::Firing, &[("instance", "b")]), Some(&r)),
            Verdict::Skip(Skip::BlastRadius { max: 1, .. })
        ));
    }

    #[test]
    fn only_allowed_targets_act_and_refusals_use_up_nothing() {
        use crate::remediate::config::LabelRegex;
        let mut g = Guard::new(limits(1, 100, 100.0));
        let mut r = rule("A", &["namespace", "pod"], 600);
        r.allowed_targets.insert(
            "namespace".into(),
            vec![
                LabelRegex::new("shop").unwrap(),
                LabelRegex::new("payments-.*").unwrap(),
            ],
        );
        let t = Instant::now();
        let on = |ns: &str| alert("A", Status::Firing, &[("namespace", ns), ("pod", "p1")]);
        let v = g.decide(t, &on("kube-system"), Some(&r));
        let Verdict::Skip(s) = v else { panic!("{v:?}") };
        assert_eq!(s.label(), "not_allowed");
        assert_eq!(
            s.reason(),
            "target not allowed: namespace=\"kube-system\" matches none of allowed_targets.namespace [shop, payments-.*]"
        );
        // The label is checked whether or not it names the target.
        r.target_labels = vec!["pod".into()];
        let nons = alert("A", Status::Firing, &[("pod", "p1")]);
        let Verdict::Skip(s) = g.decide(t, &nons, Some(&r)) else {
            panic!()
        };
        assert_eq!(
            s.reason(),
            "target not allowed: the alert has no 'namespace' label, allowed_targets.namespace [shop, payments-.*] needs one"
        );
        // Neither refusal counted against max_actions (1) or a cooldown.
        assert_eq!(g.decide(t, &on("payments-eu"), Some(&r)), Verdict::Act);
    }
}
