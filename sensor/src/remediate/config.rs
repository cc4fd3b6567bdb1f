//! `sensor remediate --config FILE`: YAML, every key defaulted, unknown keys an error naming
//! the key (like `sensor run`'s config).

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::serde_duration as duration;

pub use crate::yaml::ConfigError;
use crate::yaml::Named;

/// The kind of file in `sensor remediate`'s config errors.
const WHAT: &str = "remediate config";

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Loopback by default: the runner executes commands on request, so exposing it is a
    /// decision (with authentication, see `remediate::auth`), never a default.
    pub listen: SocketAddr,
    /// TLS, client certificates and basic auth, the same exporter-toolkit file as
    /// `sensor run --web.config.file`.
    pub web_config_file: Option<PathBuf>,
    /// A file holding the token requests must carry as `Authorization: Bearer <token>`
    /// (Alertmanager: `http_config.authorization.credentials_file`).
    pub bearer_token_file: Option<PathBuf>,
    /// Act off loopback without authenticating requests, for a proxy in front that does; logged
    /// as insecure at every start.
    pub insecure_allow_unauthenticated: bool,
    /// Decide and record everything, run nothing. On unless switched off.
    pub dry_run: bool,
    /// Largest webhook body accepted (bytes); bigger ones get 413.
    pub max_body_bytes: usize,
    /// Decisions kept for `/api/v1/remediations` (oldest dropped first).
    pub audit_size: usize,
    pub limits: Limits,
    /// The HTTP server's bounds, as in `sensor run` (for bodies the smaller of
    /// `http.max_body_bytes` and `max_body_bytes` applies).
    pub http: crate::config::HttpLimits,
    pub rules: Vec<Rule>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 9443)),
            web_config_file: None,
            bearer_token_file: None,
            insecure_allow_unauthenticated: false,
            dry_run: true,
            max_body_bytes: 1 << 20,
            audit_size: 1000,
            limits: Limits::default(),
            http: crate::config::HttpLimits::default(),
            rules: Vec::new(),
        }
    }
}

/// Limits over every rule together, in a sliding `window`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    #[serde(with = "duration")]
    pub window: Duration,
    /// Remediations (alerts acted on, each running its rule's actions) per window.
    pub max_actions: usize,
    /// Blast radius: distinct hosts acted on per window, as a share of `fleet_hosts`; at least
    /// one host is always allowed (as load balancers' outlier ejection caps do).
    pub max_hosts_percent: f64,
    /// Hosts in the fleet (e.g. `count(count by (instance) (sensor_build_info))`).
    pub fleet_hosts: usize,
    /// The label naming an alert's host.
    pub host_label: String,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            window: Duration::from_secs(3600),
            max_actions: 10,
            max_hosts_percent: 1.0,
            fleet_hosts: 0,
            host_label: "instance".into(),
        }
    }
}

impl Limits {
    /// Distinct hosts allowed per window: `max_hosts_percent` of the fleet, at least 1.
    pub fn max_hosts(&self) -> usize {
        ((self.fleet_hosts as f64 * self.max_hosts_percent / 100.0).floor() as usize).max(1)
    }
}

/// What to do when an alert named `alert` fires.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub alert: String,
    /// Labels that name what the actions act on (cooldown key), e.g. `[instance]` for a host,
    /// `[namespace, pod]` for a workload.
    #[serde(default = "default_target_labels")]
    pub target_labels: Vec<String>,
    /// After acting on a target, further alerts for it are skipped this long.
    #[serde(default = "default_cooldown", with = "duration")]
    pub cooldown: Duration,
    /// Label name -> regexes (anchored, as in PromQL) its value must match one of before
    /// anything runs, e.g. `namespace: [shop, "payments-.*"]`; an alert without the label is
    /// refused too. Empty: any target.
    #[serde(default)]
    pub allowed_targets: BTreeMap<String, Vec<LabelRegex>>,
    pub actions: Vec<Action>,
}

/// A fully anchored regex over a label value, written and printed as the user wrote it.
#[derive(Debug, Clone)]
pub struct LabelRegex {
    source: String,
    re: regex::Regex,
}

impl LabelRegex {
    pub fn new(source: &str) -> Result<LabelRegex, regex::Error> {
        Ok(LabelRegex {
            source: source.to_string(),
            re: regex::Regex::new(&format!("^(?:{source})$"))?,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn is_match(&self, value: &str) -> bool {
        self.re.is_match(value)
    }
}

impl PartialEq for LabelRegex {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Serialize for LabelRegex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for LabelRegex {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        LabelRegex::new(&s).map_err(serde::de::Error::custom)
    }
}

fn default_target_labels() -> Vec<String> {
    vec!["instance".into()]
}
fn default_cooldown() -> Duration {
    Duration::from_secs(1800)
}
fn default_action_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_retries() -> u32 {
    3
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ActionType {
    /// Runs `command` (argv, no shell) with the alert in its environment.
    Exec,
    /// POSTs the alert as JSON to `url`, retried.
    Webhook,
    /// Logs the alert (a remediation placeholder or an audit trail of its own).
    Log,
}

impl ActionType {
    pub fn label(self) -> &'static str {
        match self {
            ActionType::Exec => "exec",
            ActionType::Webhook => "webhook",
            ActionType::Log => "log",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// The `action` label of `sensor_remediation_actions_total`; defaults to the type.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(rename = "type")]
    pub kind: ActionType,
    /// exec: argv; `${labels.NAME}` and `${annotations.NAME}` in an element are replaced by
    /// the alert's value (one argv element each, never split or interpreted by a shell).
    #[serde(default)]
    pub command: Vec<String>,
    /// exec: run `command` (one element: the script) with `sh -c`; the alert's values are then
    /// only in the environment (`"$ALERT_LABEL_POD"`), never substituted into the script.
    #[serde(default)]
    pub shell: bool,
    /// webhook: http:// or https:// URL.
    #[serde(default)]
    pub url: Option<String>,
    /// webhook: retries after the first attempt (doubling backoff from 500 ms).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// exec: killed after this; webhook: per attempt.
    #[serde(default = "default_action_timeout", with = "duration")]
    pub timeout: Duration,
}

impl Action {
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(self.kind.label())
    }
}

fn valid_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Config {
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = crate::yaml::read(WHAT, path)?;
        Config::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let named = Named { what: WHAT, file };
        let cfg: Config = crate::yaml::parse(text).map_err(|f| named.fault(f))?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let named = Named { what: WHAT, file };
        let bad = |key: String, reason: String| named.key(key, reason);
        if self.max_body_bytes < 1024 {
            return Err(bad("max_body_bytes".into(), "must be at least 1024".into()));
        }
        if self.audit_size == 0 {
            return Err(bad("audit_size".into(), "must be at least 1".into()));
        }
        self.http.validate().map_err(|(k, r)| bad(format!("http{k}"), r))?;
        let l = &self.limits;
        if l.window.is_zero() {
            return Err(bad("limits.window".into(), "must be positive".into()));
        }
        if !(0.0..=100.0).contains(&l.max_hosts_percent) {
            return Err(bad(
                "limits.max_hosts_percent".into(),
                format!("{} is outside 0..100", l.max_hosts_percent),
            ));
        }
        if !valid_label_name(&l.host_label) {
            return Err(bad(
                "limits.host_label".into(),
                format!("'{}' is not a label name", l.host_label),
            ));
        }
        let mut alerts = HashSet::new();
        for (i, r) in self.rules.iter().enumerate() {
            let key = |k: &str| format!("rules[{i}]{k}");
            if r.alert.trim().is_empty() {
                return Err(bad(key(".alert"), "must not be empty".into()));
            }
            if !alerts.insert(r.alert.as_str()) {
                return Err(bad(key(".alert"), format!("alert '{}' has two rules", r.alert)));
            }
            if let Some(l) = r.target_labels.iter().find(|l| !valid_label_name(l)) {
                return Err(bad(key(".target_labels"), format!("'{l}' is not a label name")));
            }
            for (l, res) in &r.allowed_targets {
                if !valid_label_name(l) {
                    return Err(bad(key(".allowed_targets"), format!("'{l}' is not a label name")));
                }
                if res.is_empty() {
                    return Err(bad(
                        key(&format!(".allowed_targets.{l}")),
                        "needs at least one regex (an empty list would refuse every target)".into(),
                    ));
                }
            }
            if r.actions.is_empty() {
                return Err(bad(key(".actions"), "needs at least one action".into()));
            }
            let mut names = HashSet::new();
            for (j, a) in r.actions.iter().enumerate() {
                let key = |k: &str| format!("rules[{i}].actions[{j}]{k}");
                if !names.insert(a.name()) {
                    return Err(bad(key(".name"), format!("action '{}' twice in one rule", a.name())));
                }
                if a.timeout.is_zero() {
                    return Err(bad(key(".timeout"), "must be positive".into()));
                }
                match a.kind {
                    ActionType::Exec => {
                        if a.command.is_empty() || a.command[0].trim().is_empty() {
                            return Err(bad(key(".command"), "exec needs a command (argv list)".into()));
                        }
                        if a.shell && a.command.len() != 1 {
                            return Err(bad(
                                key(".command"),
                                "with shell: true, command is one element: the script".into(),
                            ));
                        }
                        if a.url.is_some() {
                            return Err(bad(key(".url"), "only for type webhook".into()));
                        }
                    }
                    ActionType::Webhook => {
                        let ok = a.url.as_deref().is_some_and(|u| {
                            (u.starts_with("http://") || u.starts_with("https://")) && u.parse::<http::Uri>().is_ok()
                        });
                        if !ok {
                            return Err(bad(key(".url"), "webhook needs an http:// or https:// url".into()));
                        }
                        if !a.command.is_empty() || a.shell {
                            return Err(bad(key(".command"), "only for type exec".into()));
                        }
                    }
                    ActionType::Log => {
                        if !a.command.is_empty() || a.shell || a.url.is_some() {
                            return Err(bad(key(""), "log takes no command or url".into()));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    pub fn rule(&self, alert: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.alert == alert)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_defaults_and_dry_run() {
        let c = Config::parse("# nothing\n", "t").unwrap();
        assert!(c.dry_run);
        assert_eq!(c.listen.to_string(), "127.0.0.1:9443");
        assert_eq!(c.max_body_bytes, 1 << 20);
        assert_eq!(c.limits.max_hosts(), 1);
    }

    #[test]
    fn shipped_example_parses() {
        let text = include_str!("../../../deploy/remediate/remediate.yaml");
        let c = Config::parse(text, "remediate.yaml").unwrap();
        assert!(c.dry_run, "the example ships in dry-run");
        assert!(c.rule("SensorWorkloadOOMKillStorm").is_some());
        assert!(c.rule("SensorOOMOutlierHost").is_some());
        // The secure set-up: exposed, TLS and a token; every acting rule has an allow-list.
        assert!(c.bearer_token_file.is_some() && c.web_config_file.is_some());
        assert!(!c.insecure_allow_unauthenticated);
        for r in &c.rules {
            assert!(!r.allowed_targets.is_empty(), "{} has no allowed_targets", r.alert);
        }
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::parse("limits: {windw: 1h}\n", "f.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key 'limits.windw'") && e.contains("unknown field"), "{e}");
        let e = Config::parse("limits: {window: soon}\n", "f.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("limits.window") && e.contains("bad duration"), "{e}");
        let e = Config::parse("rules: [{alert: A, actions: [{type: exec}]}]\n", "f.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("rules[0].actions[0].command"), "{e}");
        let e = Config::parse("rules: [{alert: A, actions: [{type: webhook, url: 'ftp://x'}]}]\n", "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("rules[0].actions[0].url"), "{e}");
        let e = Config::parse(
            "rules: [{alert: A, actions: [{type: log}]}, {alert: A, actions: [{type: log}]}]\n",
            "f",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("rules[1].alert") && e.contains("two rules"), "{e}");
        let e = Config::parse("rules: [{alert: A, actions: [{type: rm}]}]\n", "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("rules[0].actions[0].type"), "{e}");
    }

    #[test]
    fn old_configs_still_parse_and_new_keys_default_to_closed() {
        let c = Config::parse("listen: 127.0.0.1:9443\ndry_run: false\nweb_config_file: null\n", "t").unwrap();
        assert_eq!(c.bearer_token_file, None);
        assert!(!c.insecure_allow_unauthenticated);
        let c = Config::parse("rules: [{alert: A, actions: [{type: log}]}]\n", "t").unwrap();
        assert!(c.rules[0].allowed_targets.is_empty());
    }

    #[test]
    fn allowed_targets_are_anchored_regexes_per_label() {
        let c = Config::parse(
            "rules: [{alert: A, allowed_targets: {namespace: [shop, 'payments-.*']}, actions: [{type: log}]}]\n",
            "t",
        )
        .unwrap();
        let res = &c.rules[0].allowed_targets["namespace"];
        assert_eq!(
            res.iter().map(LabelRegex::as_str).collect::<Vec<_>>(),
            ["shop", "payments-.*"]
        );
        assert!(res[0].is_match("shop"));
        assert!(!res[0].is_match("shop-admin"), "anchored at the end");
        assert!(!res[0].is_match("myshop"), "anchored at the start");
        assert!(res[1].is_match("payments-eu"));
        // Printed back as written (--print-config).
        let out = serde_yaml_ng::to_string(&c).unwrap();
        assert!(out.contains("- payments-.*"), "{out}");
        let e = Config::parse(
            "rules: [{alert: A, allowed_targets: {namespace: ['(']}, actions: [{type: log}]}]\n",
            "f",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("rules[0].allowed_targets.namespace[0]"), "{e}");
        let e = Config::parse(
            "rules: [{alert: A, allowed_targets: {namespace: []}, actions: [{type: log}]}]\n",
            "f",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("rules[0].allowed_targets.namespace") && e.contains("at least one regex"),
            "{e}"
        );
        let e = Config::parse(
            "rules: [{alert: A, allowed_targets: {'a-b': [x]}, actions: [{type: log}]}]\n",
            "f",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("'a-b' is not a label name"), "{e}");
    }

    #[test]
    fn blast_radius_is_a_share_of_the_fleet_but_at_least_one_host() {
        let mut l = Limits {
            fleet_hosts: 1000,
            max_hosts_percent: 1.0,
            ..Limits::default()
        };
        assert_eq!(l.max_hosts(), 10);
        l.fleet_hosts = 50;
        assert_eq!(l.max_hosts(), 1);
        l.max_hosts_percent = 10.0;
        assert_eq!(l.max_hosts(), 5);
    }
}
