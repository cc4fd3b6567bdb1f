//! Daemon configuration: YAML file, embedded default, and flags with the same names.
//!
//! Every key has a default and an empty file is valid. Errors name the file, the key path
//! and what is wrong, because a DaemonSet that crash-loops on "invalid type" helps nobody.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer, Serialize};

pub use crate::checks::config::{Alerting, Check, CheckType};

/// The configuration `sensor run` uses when no `--config` is given.
pub const EMBEDDED_DEFAULT: &str = include_str!("../default-config.yaml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {file}: cannot read: {source}")]
    Read { file: String, source: std::io::Error },
    #[error("config {file}: key '{key}': {reason}")]
    Key { file: String, key: String, reason: String },
    #[error("config {file}: {reason}")]
    Syntax { file: String, reason: String },
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    /// Fail startup unless every enabled probe attaches with its preferred hook.
    pub strict: bool,
    /// Kernel BTF to read struct offsets from (default /sys/kernel/btf/vmlinux).
    pub btf_path: Option<PathBuf>,
    /// Tracefs root; found or mounted automatically when unset.
    pub tracefs_path: Option<PathBuf>,
    /// Pages per CPU of each perf ring (power of two).
    pub perf_ring_pages: usize,
    /// TLS and basic auth for the HTTP endpoints, in Prometheus exporter-toolkit's format
    /// (flag `--web.config.file`, as in the Prometheus exporters).
    pub web_config_file: Option<PathBuf>,
    pub probes: Probes,
    pub limits: Limits,
    pub alerting: Alerting,
    pub checks: Vec<Check>,
    pub events: EventsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:9442".parse().expect("static address parses"),
            strict: false,
            btf_path: None,
            tracefs_path: None,
            perf_ring_pages: 64,
            web_config_file: None,
            probes: Probes::default(),
            limits: Limits::default(),
            alerting: Alerting::default(),
            checks: Vec::new(),
            events: EventsConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Probes {
    pub oom: ProbeToggle,
    pub memcg: MemcgProbe,
    pub tcp: TcpProbe,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProbeToggle {
    pub enabled: bool,
    /// Hooks never to use for this probe (e.g. `[fentry]` on a kernel with a trampoline bug).
    pub exclude_hooks: Vec<crate::probe::HookKind>,
}

impl Default for ProbeToggle {
    fn default() -> Self {
        ProbeToggle {
            enabled: true,
            exclude_hooks: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MemcgProbe {
    pub enabled: bool,
    pub exclude_hooks: Vec<crate::probe::HookKind>,
    /// PSI thresholds: crossing one raises a pressure event for the host and, on cgroup v2,
    /// for each workload.
    pub psi_triggers: Vec<PsiTrigger>,
    /// How often the memory cgroup hierarchy is rescanned for new and vanished workloads.
    #[serde(with = "duration")]
    pub discovery_interval: Duration,
}

impl Default for MemcgProbe {
    fn default() -> Self {
        MemcgProbe {
            enabled: true,
            exclude_hooks: Vec::new(),
            psi_triggers: vec![
                PsiTrigger {
                    level: PsiLevel::Some,
                    stall: Duration::from_secs(1),
                    window: Duration::from_secs(10),
                },
                PsiTrigger {
                    level: PsiLevel::Full,
                    stall: Duration::from_millis(500),
                    window: Duration::from_secs(10),
                },
            ],
            discovery_interval: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum PsiLevel {
    /// Some tasks stalled on memory.
    Some,
    /// All non-idle tasks stalled at once.
    Full,
}

impl PsiLevel {
    pub fn label(self) -> &'static str {
        match self {
            PsiLevel::Some => "some",
            PsiLevel::Full => "full",
        }
    }
}

/// Fires when tasks stalled for `stall` within a `window` (the kernel allows 500ms..10s windows).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PsiTrigger {
    pub level: PsiLevel,
    #[serde(with = "duration")]
    pub stall: Duration,
    #[serde(with = "duration")]
    pub window: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TcpProbe {
    pub enabled: bool,
    pub exclude_hooks: Vec<crate::probe::HookKind>,
    /// Destination groups: name -> `CIDR[:port]`; everything else is `other`.
    pub destinations: BTreeMap<String, Destination>,
    /// Sockets tracked between SYN_SENT and the outcome (slots of an array in the kernel,
    /// rounded up to a power of two).
    pub max_tracked_connects: u32,
    /// Series per in-kernel aggregation map (workload x destination x result).
    pub max_series: u32,
    /// A connect whose outcome was not seen after this long may give its slot to a new connect;
    /// should its outcome still come, it counts as lost (`untracked`). Keep it above the longest
    /// SYN retry time (127 s with the default `tcp_syn_retries` of 6).
    #[serde(with = "duration")]
    pub connect_max_age: Duration,
}

impl TcpProbe {
    /// Slots of the kernel's connect table: `max_tracked_connects` rounded up to a power of two.
    pub fn conn_slots(&self) -> u32 {
        self.max_tracked_connects
            .clamp(64, sensor_common::tcp::ConnSlot::MAX_SLOTS)
            .next_power_of_two()
    }
}

impl Default for TcpProbe {
    fn default() -> Self {
        TcpProbe {
            enabled: true,
            exclude_hooks: Vec::new(),
            destinations: BTreeMap::new(),
            max_tracked_connects: sensor_common::tcp::DEFAULT_TRACKED_CONNECTS,
            max_series: sensor_common::tcp::DEFAULT_SERIES,
            connect_max_age: Duration::from_secs(300),
        }
    }
}

/// `10.0.0.0/8:5432`, `0.0.0.0/0:53`, `[fd00::/8]:443`, or a CIDR without port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct Destination {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
    pub port: Option<u16>,
}

impl From<Destination> for String {
    fn from(d: Destination) -> String {
        let net = format!("{}/{}", d.addr, d.prefix);
        match (d.port, d.addr.is_ipv6()) {
            (Some(p), true) => format!("[{net}]:{p}"),
            (Some(p), false) => format!("{net}:{p}"),
            (None, _) => net,
        }
    }
}

impl std::str::FromStr for Destination {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (net, port) = if let Some(rest) = s.strip_prefix('[') {
            let (net, tail) = rest.split_once(']').ok_or("missing ']' after IPv6 network")?;
            let port = match tail.strip_prefix(':') {
                Some(p) => Some(p),
                None if tail.is_empty() => None,
                None => return Err(format!("unexpected '{tail}' after ']'")),
            };
            (net, port)
        } else {
            match s.rsplit_once(':') {
                Some((n, p)) if !n.contains(':') => (n, Some(p)),
                _ => (s, None),
            }
        };
        let (addr, prefix) = net.split_once('/').ok_or("expected CIDR such as 10.0.0.0/8")?;
        let addr: std::net::IpAddr = addr.parse().map_err(|e| format!("bad address '{addr}': {e}"))?;
        let prefix: u8 = prefix.parse().map_err(|_| format!("bad prefix length '{prefix}'"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("prefix /{prefix} is longer than {max}"));
        }
        let port = match port {
            Some(p) => Some(p.parse::<u16>().map_err(|_| format!("bad port '{p}'"))?),
            None => None,
        };
        Ok(Destination { addr, prefix, port })
    }
}

impl<'de> Deserialize<'de> for Destination {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// At most this many workloads per metric family; the rest fold into `cgroup="other"`.
    pub workloads_per_metric: usize,
    /// Series of a cgroup whose directory is gone are dropped this long after it vanished.
    #[serde(with = "duration")]
    pub vanished_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            workloads_per_metric: 1000,
            vanished_grace: Duration::from_secs(15 * 60),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// Recent events kept for `/api/v1/events`.
    pub history: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig { history: 1000 }
    }
}

/// The `name` of the check a key path like `checks[3].tls` points into.
fn check_name(doc: &serde_yaml_ng::Value, key: &str) -> Option<String> {
    let idx: usize = key.strip_prefix("checks[")?.split(']').next()?.parse().ok()?;
    doc.get("checks")?.get(idx)?.get("name")?.as_str().map(str::to_string)
}

/// Durations as `10s`, `2m`, `1h` (humantime syntax).
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(format!("bad duration '{s}' ({e}); use e.g. 10s, 2m, 1h")))
    }
}

impl Config {
    /// Parses YAML text; `file` is only used in error messages.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        // An empty file, or one with only comments, is a valid config of all defaults.
        let probe: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file.to_string(),
            reason: e.to_string(),
        })?;
        if probe.is_null() {
            return Ok(Config::default());
        }
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner().to_string();
            if key.is_empty() || key == "." {
                ConfigError::Syntax {
                    file: file.to_string(),
                    reason: inner,
                }
            } else {
                // Serde knows the index of a bad check, people know its name.
                let reason = match check_name(&probe, &key) {
                    Some(name) => format!("check '{name}': {inner}"),
                    None => inner,
                };
                ConfigError::Key {
                    file: file.to_string(),
                    key,
                    reason,
                }
            }
        })?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Config::parse(&text, &file)
    }

    /// Checks that serde cannot express: ranges and cross-field rules.
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let key_err = |key: &str, reason: String| ConfigError::Key {
            file: file.to_string(),
            key: key.to_string(),
            reason,
        };
        if self.limits.workloads_per_metric == 0 {
            return Err(key_err("limits.workloads_per_metric", "must be at least 1".into()));
        }
        for (i, t) in self.probes.memcg.psi_triggers.iter().enumerate() {
            let key = format!("probes.memcg.psi_triggers[{i}]");
            if t.window < Duration::from_millis(500) || t.window > Duration::from_secs(10) {
                return Err(key_err(
                    &key,
                    "window must be between 500ms and 10s (a kernel limit)".into(),
                ));
            }
            if t.stall.is_zero() || t.stall >= t.window {
                return Err(key_err(
                    &key,
                    "stall must be positive and shorter than the window".into(),
                ));
            }
        }
        let tcp = &self.probes.tcp;
        if tcp.destinations.len() >= sensor_common::tcp::MAX_DEST_GROUPS as usize {
            return Err(key_err(
                "probes.tcp.destinations",
                format!("at most {} groups", sensor_common::tcp::MAX_DEST_GROUPS - 1),
            ));
        }
        if tcp.max_tracked_connects < 64 || tcp.max_series < 64 {
            return Err(key_err(
                "probes.tcp",
                "max_tracked_connects and max_series must be at least 64".into(),
            ));
        }
        if tcp.connect_max_age < Duration::from_millis(100) {
            return Err(key_err("probes.tcp.connect_max_age", "must be at least 100ms".into()));
        }
        if tcp.max_tracked_connects > sensor_common::tcp::ConnSlot::MAX_SLOTS {
            return Err(key_err(
                "probes.tcp.max_tracked_connects",
                format!("at most {}", sensor_common::tcp::ConnSlot::MAX_SLOTS),
            ));
        }
        if self.probes.memcg.discovery_interval < Duration::from_millis(100) {
            return Err(key_err(
                "probes.memcg.discovery_interval",
                "must be at least 100ms".into(),
            ));
        }
        if !self.perf_ring_pages.is_power_of_two() {
            return Err(key_err(
                "perf_ring_pages",
                format!("{} is not a power of two", self.perf_ring_pages),
            ));
        }
        crate::checks::config::validate(&self.checks, &self.alerting).map_err(|(k, r)| key_err(&k, r))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text, "test.yaml").unwrap_err().to_string()
    }

    #[test]
    fn empty_and_comment_only_are_defaults() {
        assert_eq!(Config::parse("", "x").unwrap(), Config::default());
        assert_eq!(Config::parse("# nothing\n", "x").unwrap(), Config::default());
    }

    #[test]
    fn embedded_default_parses() {
        let c = Config::parse(EMBEDDED_DEFAULT, "embedded").unwrap();
        assert!(c.probes.oom.enabled);
        assert_eq!(c.listen.port(), 9442);
    }

    #[test]
    fn conventions_example_parses() {
        let text = r#"
listen: 0.0.0.0:9442
probes:
  oom: {enabled: true}
  memcg: {enabled: true}
  tcp:
    enabled: true
    destinations: {postgres: "10.0.0.0/8:5432", dns: "0.0.0.0/0:53"}
limits: {workloads_per_metric: 1000}
alerting: {availability_threshold: 0.8, window: 2m, webhook: null}
checks:
  - {name: shop, type: http, url: "https://shop.example/health", interval: 10s, timeout: 5s,
     expect: {status: [200], body_regex: "ok"}}
  - name: inventory
    type: websocket
    url: "ws://127.0.0.1:8080/"
    interval: 30s
    gauges: [{name: inventory, labels: [store, model], value: inventory}]
"#;
        let c = Config::parse(text, "x").unwrap();
        assert_eq!(c.alerting.window, Duration::from_secs(120));
        assert_eq!(c.checks.len(), 2);
        assert_eq!(c.checks[1].timeout, Duration::from_secs(5));
        let pg = &c.probes.tcp.destinations["postgres"];
        assert_eq!((pg.prefix, pg.port), (8, Some(5432)));
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let e = err("probes:\n  oom:\n    enabeld: true\n");
        assert!(e.starts_with("config test.yaml: key 'probes.oom"), "{e}");
        assert!(e.contains("unknown field `enabeld`"), "{e}");
        let e = err("lisen: 1.2.3.4:5\n");
        assert!(e.contains("unknown field `lisen`"), "{e}");
    }

    #[test]
    fn wrong_type_names_key() {
        let e = err("probes:\n  oom: {enabled: maybe}\n");
        assert!(e.contains("key 'probes.oom.enabled'"), "{e}");
        let e = err("listen: not-an-address\n");
        assert!(e.contains("key 'listen'"), "{e}");
    }

    #[test]
    fn bad_duration_and_ranges() {
        let e = err("alerting: {window: 2 fortnights}\n");
        assert!(e.contains("key 'alerting.window'") && e.contains("bad duration"), "{e}");
        let e = err("alerting: {availability_threshold: 1.5}\n");
        assert!(
            e.contains("alerting.availability_threshold") && e.contains("outside 0..1"),
            "{e}"
        );
        let e = err("perf_ring_pages: 3\n");
        assert!(e.contains("power of two"), "{e}");
        let e = err("probes: {tcp: {connect_max_age: 10ms}}\n");
        assert!(
            e.contains("probes.tcp.connect_max_age") && e.contains("at least 100ms"),
            "{e}"
        );
        let e = err("probes: {tcp: {max_tracked_connects: 100000000}}\n");
        assert!(
            e.contains("probes.tcp.max_tracked_connects") && e.contains("at most 16777216"),
            "{e}"
        );
    }

    #[test]
    fn connect_table_rounds_up_to_a_power_of_two() {
        let t = |n| TcpProbe {
            max_tracked_connects: n,
            ..TcpProbe::default()
        };
        assert_eq!(t(64).conn_slots(), 64);
        assert_eq!(t(100).conn_slots(), 128);
        assert_eq!(t(65536).conn_slots(), 65536);
        assert_eq!(t(65537).conn_slots(), 131072);
    }

    #[test]
    fn psi_triggers_validated() {
        let c = Config::parse(
            "probes: {memcg: {psi_triggers: [{level: full, stall: 200ms, window: 2s}]}}\n",
            "x",
        )
        .unwrap();
        assert_eq!(c.probes.memcg.psi_triggers[0].level, PsiLevel::Full);
        let e = err("probes: {memcg: {psi_triggers: [{level: some, stall: 1s, window: 30s}]}}\n");
        assert!(
            e.contains("probes.memcg.psi_triggers[0]") && e.contains("between 500ms and 10s"),
            "{e}"
        );
        let e = err("probes: {memcg: {psi_triggers: [{level: some, stall: 3s, window: 2s}]}}\n");
        assert!(e.contains("shorter than the window"), "{e}");
        let e = err("probes: {memcg: {psi_triggers: [{level: most, stall: 1s, window: 2s}]}}\n");
        assert!(e.contains("probes.memcg.psi_triggers[0].level"), "{e}");
    }

    #[test]
    fn bad_destination() {
        let e = err("probes: {tcp: {destinations: {pg: \"10.0.0.0/33:5432\"}}}\n");
        assert!(
            e.contains("probes.tcp.destinations.pg") && e.contains("longer than 32"),
            "{e}"
        );
        let e = err("probes: {tcp: {destinations: {pg: \"10.0.0.0/8:99999\"}}}\n");
        assert!(e.contains("bad port"), "{e}");
        let d: Destination = "[fd00::/8]:443".parse().unwrap();
        assert_eq!((d.prefix, d.port), (8, Some(443)));
        let d: Destination = "::1/128".parse().unwrap();
        assert_eq!(d.port, None);
    }

    #[test]
    fn checks_validated_by_name() {
        let e = err("checks: [{name: a, type: http, url: 'ftp://x'}]\n");
        assert!(e.contains("checks[0].url") && e.contains("check 'a'"), "{e}");
        let e = err("checks: [{name: a, type: http, url: 'http://x'}, {name: a, type: http, url: 'http://y'}]\n");
        assert!(e.contains("defined twice"), "{e}");
        let e = err("checks: [{name: a, type: gopher, url: 'http://x'}]\n");
        assert!(e.contains("checks[0].type"), "{e}");
    }

    #[test]
    fn syntax_error_has_location() {
        let e = err("probes: [unclosed\n");
        assert!(e.starts_with("config test.yaml:") && e.contains("line"), "{e}");
    }
}
