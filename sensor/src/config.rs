//! Daemon configuration: YAML file, embedded default, and flags with the same names.
//!
//! Every key has a default and an empty file is valid. Errors name the file, the key path
//! and what is wrong, because a DaemonSet that crash-loops on "invalid type" helps nobody.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::serde_duration as duration;
pub use crate::{
    checks::{
        config::{Alerting, Check, CheckType},
        vantage::Vantage,
    },
    journal::{Fsync, JournalConfig},
    memcg::config::{MemcgConfig, PsiLevel, PsiTrigger},
    oom::config::OomConfig,
    tcp::config::{Destination, TcpConfig},
    workloads::config::{RuntimeConfig, RuntimeKind, WorkloadsConfig},
};

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
    /// Kernel-side diagnostics on rare paths (connect table full, a record that could not be
    /// sent, an OOM record sent without its other part) in the log, with the probe's name. Off
    /// by default, and free when off.
    pub kernel_log: bool,
    pub probes: Probes,
    pub limits: Limits,
    /// Names of workloads from the container runtimes.
    pub workloads: WorkloadsConfig,
    /// Bounds on the HTTP server (connections, header size and time, body and query size).
    pub http: HttpLimits,
    pub alerting: Alerting,
    pub checks: Vec<Check>,
    /// Where this sensor probes from and which share of the fleet runs each check.
    pub vantage: Vantage,
    pub events: EventsConfig,
    /// The on-disk event journal: history across restarts, bounded on disk.
    pub journal: JournalConfig,
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
            kernel_log: false,
            probes: Probes::default(),
            limits: Limits::default(),
            workloads: WorkloadsConfig::default(),
            http: HttpLimits::default(),
            alerting: Alerting::default(),
            checks: Vec::new(),
            vantage: Vantage::default(),
            events: EventsConfig::default(),
            journal: JournalConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Probes {
    pub oom: OomConfig,
    pub memcg: MemcgConfig,
    pub tcp: TcpConfig,
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

/// Bounds on the HTTP server of `sensor run` and `sensor remediate`: without them a thousand
/// clients that open a connection and send half a request hold a thousand fds for ever.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpLimits {
    /// Connections served at once; one more is accepted and closed at once.
    pub max_connections: usize,
    /// Time to receive a complete request head, counted from the connection's start or the end
    /// of the previous response (so it is also the keep-alive idle timeout); TLS handshakes get
    /// the same time.
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    /// From a complete request head to the response head: bounds a body that trickles in and
    /// a handler that hangs (408).
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// Longest a response write may make no progress (a client that asks and never reads);
    /// the connection is then closed.
    #[serde(with = "duration")]
    pub write_timeout: Duration,
    /// Request line plus headers; larger heads get 431.
    pub max_header_bytes: usize,
    /// Request bodies; larger ones get 413.
    pub max_body_bytes: usize,
    /// The query string of the URL; longer ones get 414.
    pub max_query_bytes: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            max_header_bytes: 16 * 1024,
            max_body_bytes: 1 << 20,
            max_query_bytes: 4096,
        }
    }
}

impl HttpLimits {
    /// Zero would refuse every request; the key path comes back with the reason.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let zero = |k: &str| Err((format!(".{k}"), "must be greater than 0".to_string()));
        if self.max_connections == 0 {
            return zero("max_connections");
        }
        if self.header_read_timeout.is_zero() {
            return zero("header_read_timeout");
        }
        if self.request_timeout.is_zero() {
            return zero("request_timeout");
        }
        if self.write_timeout.is_zero() {
            return zero("write_timeout");
        }
        if self.max_header_bytes == 0 {
            return zero("max_header_bytes");
        }
        if self.max_query_bytes == 0 {
            return zero("max_query_bytes");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// Recent events kept in memory; also the most one `/api/v1/events` answer returns (page
    /// with `?since=` the last `seq`).
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

impl Config {
    /// Parses YAML text; `file` is only used in error messages.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let cfg: Config = crate::yaml::parse(text).map_err(|f| match f {
            crate::yaml::Fault::Syntax(reason) => ConfigError::Syntax {
                file: file.to_string(),
                reason,
            },
            crate::yaml::Fault::Key { key, reason } => {
                // Serde knows the index of a bad check, people know its name.
                let named = serde_yaml_ng::from_str(text)
                    .ok()
                    .and_then(|doc| check_name(&doc, &key));
                let reason = match named {
                    Some(name) => format!("check '{name}': {reason}"),
                    None => reason,
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
        self.probes
            .oom
            .validate()
            .map_err(|(k, r)| key_err(&format!("probes.oom{k}"), r))?;
        self.probes
            .memcg
            .validate()
            .map_err(|(k, r)| key_err(&format!("probes.memcg{k}"), r))?;
        self.probes
            .tcp
            .validate()
            .map_err(|(k, r)| key_err(&format!("probes.tcp{k}"), r))?;
        self.http.validate().map_err(|(k, r)| key_err(&format!("http{k}"), r))?;
        self.workloads
            .validate()
            .map_err(|(k, r)| key_err(&format!("workloads{k}"), r))?;
        self.journal
            .validate()
            .map_err(|(k, r)| key_err(&format!("journal{k}"), r))?;
        if !self.perf_ring_pages.is_power_of_two() {
            return Err(key_err(
                "perf_ring_pages",
                format!("{} is not a power of two", self.perf_ring_pages),
            ));
        }
        crate::checks::config::validate(&self.checks, &self.alerting).map_err(|(k, r)| key_err(&k, r))?;
        crate::checks::vantage::validate(&self.vantage, &self.checks).map_err(|(k, r)| key_err(&k, r))?;
        Ok(())
    }
}

/// How a flag's text becomes the value of its config key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagKind {
    /// `--a` alone means true; `--a false` sets false.
    Bool,
    /// Taken as text (durations, addresses, names).
    Text,
    /// Comma-separated list of words (`--probes.oom.exclude-hooks fentry,kprobe`), or a YAML
    /// list (`--checks '[{name: shop, ...}]'`).
    List,
    /// YAML (numbers, paths, and whole structures: `--probes.tcp.destinations '{pg: "10.0.0.0/8:5432"}'`).
    Yaml,
}

/// A config key and its flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagKey {
    /// `probes.memcg.discovery_interval`
    pub key: String,
    /// `probes.memcg.discovery-interval` (without the dashes in front)
    pub flag: String,
    pub kind: FlagKind,
}

/// Keys whose flag keeps the name other tools give it (exporter-toolkit's `--web.config.file`).
const FLAG_NAMES: &[(&str, &str)] = &[("web_config_file", "web.config.file")];

/// Every config key that has a flag: each leaf of the default configuration (a list or an
/// empty map counts as a leaf), so a new key gets its flag without anyone writing one.
pub fn flag_keys() -> Vec<FlagKey> {
    fn walk(prefix: &str, v: &serde_yaml_ng::Value, out: &mut Vec<FlagKey>) {
        use serde_yaml_ng::Value;
        if let Value::Mapping(m) = v {
            if !m.is_empty() || prefix.is_empty() {
                for (k, child) in m {
                    if let Some(k) = k.as_str() {
                        let key = if prefix.is_empty() {
                            k.to_string()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&key, child, out);
                    }
                }
                return;
            }
        }
        let kind = match v {
            Value::Bool(_) => FlagKind::Bool,
            Value::String(_) => FlagKind::Text,
            Value::Sequence(_) => FlagKind::List,
            _ => FlagKind::Yaml,
        };
        let flag = FLAG_NAMES
            .iter()
            .find(|(k, _)| *k == prefix)
            .map_or_else(|| prefix.replace('_', "-"), |(_, f)| (*f).to_string());
        out.push(FlagKey {
            key: prefix.to_string(),
            flag,
            kind,
        });
    }
    let mut out = Vec::new();
    if let Ok(v) = serde_yaml_ng::to_value(Config::default()) {
        walk("", &v, &mut out);
    }
    out
}

/// A flag given on the command line: the key and its raw text (several for lists).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    pub key: FlagKey,
    pub values: Vec<String>,
}

impl Override {
    fn value(&self) -> Result<serde_yaml_ng::Value, String> {
        use serde_yaml_ng::Value;
        let one = self.values.last().cloned().unwrap_or_default();
        Ok(match self.key.kind {
            FlagKind::Bool => match one.as_str() {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                _ => Value::String(one),
            },
            FlagKind::Text => Value::String(one),
            FlagKind::List if one.trim_start().starts_with('[') => {
                serde_yaml_ng::from_str(&one).map_err(|e| format!("not valid YAML: {e}"))?
            }
            FlagKind::List => Value::Sequence(
                self.values
                    .iter()
                    .flat_map(|v| v.split(','))
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(|v| Value::String(v.to_string()))
                    .collect(),
            ),
            FlagKind::Yaml => serde_yaml_ng::from_str(&one).map_err(|e| format!("not valid YAML: {e}"))?,
        })
    }
}

/// The command line's name in config errors about flags.
pub const COMMAND_LINE: &str = "<command line>";

impl Config {
    /// The file's (or the embedded default's) configuration with `overrides` applied, checked
    /// as a whole; errors about a flag name `<command line>` and the key.
    pub fn with_overrides(self, overrides: &[Override]) -> Result<Config, ConfigError> {
        if overrides.is_empty() {
            return Ok(self);
        }
        let key_err = |key: &str, reason: String| ConfigError::Key {
            file: COMMAND_LINE.to_string(),
            key: key.to_string(),
            reason,
        };
        let mut doc = serde_yaml_ng::to_value(&self).map_err(|e| ConfigError::Syntax {
            file: COMMAND_LINE.to_string(),
            reason: e.to_string(),
        })?;
        for o in overrides {
            let value = o.value().map_err(|r| key_err(&o.key.key, r))?;
            set_path(&mut doc, &o.key.key, value);
        }
        let cfg: Config = serde_path_to_error::deserialize(doc).map_err(|e| {
            let key = e.path().to_string();
            key_err(&key, e.into_inner().to_string())
        })?;
        cfg.validate(COMMAND_LINE)?;
        Ok(cfg)
    }
}

/// Sets `a.b.c` in a YAML document, creating the maps on the way.
fn set_path(doc: &mut serde_yaml_ng::Value, path: &str, value: serde_yaml_ng::Value) {
    use serde_yaml_ng::{Mapping, Value};
    let mut cur = doc;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        if !cur.is_mapping() {
            *cur = Value::Mapping(Mapping::new());
        }
        let Value::Mapping(m) = cur else { return };
        let k = Value::String((*p).to_string());
        if i + 1 == parts.len() {
            m.insert(k, value);
            return;
        }
        cur = m.entry(k).or_insert_with(|| Value::Mapping(Mapping::new()));
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
    fn http_limits_parse_and_are_checked() {
        let c = Config::parse(EMBEDDED_DEFAULT, "embedded").unwrap();
        assert_eq!(c.http, HttpLimits::default(), "default-config.yaml and the code agree");
        let c = Config::parse("http: {max_connections: 10, header_read_timeout: 2s}\n", "t").unwrap();
        assert_eq!(c.http.max_connections, 10);
        assert_eq!(c.http.header_read_timeout, Duration::from_secs(2));
        assert_eq!(c.http.max_body_bytes, 1 << 20);
        let e = err("http: {max_connections: 0}\n");
        assert!(
            e.contains("key 'http.max_connections'") && e.contains("greater than 0"),
            "{e}"
        );
        let e = err("http: {header_read_timeout: 0s}\n");
        assert!(e.contains("key 'http.header_read_timeout'"), "{e}");
        let e = err("http: {max_header_size: 1}\n");
        assert!(e.contains("max_header_size"), "{e}");
    }

    #[test]
    fn journal_keys_parse_and_are_checked() {
        let c = Config::parse(EMBEDDED_DEFAULT, "embedded").unwrap();
        assert_eq!(
            c.journal,
            JournalConfig::default(),
            "default-config.yaml and the code agree"
        );
        assert_eq!(c.journal.max_bytes, 64 << 20);
        let c = Config::parse(
            "journal: {path: /tmp/j, max_bytes: 1MiB, fsync: batch, fsync_interval: 5s}\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.journal.max_bytes, 1 << 20);
        assert_eq!(c.journal.segment_bytes(), 128 << 10);
        assert_eq!(c.journal.fsync, Fsync::Batch);
        assert_eq!(c.journal.path, std::path::PathBuf::from("/tmp/j"));
        let c = Config::parse("journal: {max_bytes: 131072}\n", "t").unwrap();
        assert_eq!(c.journal.max_bytes, 131072);
        let e = err("journal: {max_bytes: 1KiB}\n");
        assert!(e.contains("key 'journal.max_bytes'") && e.contains("at least"), "{e}");
        let e = err("journal: {max_bytes: lots}\n");
        assert!(e.contains("journal.max_bytes") && e.contains("bad size"), "{e}");
        let e = err("journal: {fsync: sometimes}\n");
        assert!(e.contains("journal.fsync"), "{e}");
        let o = |key: &str, v: &str| Override {
            key: flag(key),
            values: vec![v.to_string()],
        };
        let c = Config::default()
            .with_overrides(&[
                o("journal.path", "/tmp/x"),
                o("journal.max_bytes", "2MiB"),
                o("journal.enabled", "false"),
                o("journal.fsync", "never"),
            ])
            .unwrap();
        assert_eq!(c.journal.max_bytes, 2 << 20);
        assert!(!c.journal.enabled);
        assert_eq!(c.journal.fsync, Fsync::Never);
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
        let t = |n| TcpConfig {
            max_tracked_connects: n,
            ..TcpConfig::default()
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
    fn vantage_keys_parse_and_are_checked() {
        let c = Config::parse(
            "vantage: {location: eu-west-1a, node: n1, sample: 0.1}\nchecks: [{name: a, type: http, url: 'http://x', sample: 0.5}]\n",
            "f",
        )
        .unwrap();
        assert_eq!(
            (c.vantage.location.as_str(), c.vantage.node.as_str(), c.vantage.sample),
            ("eu-west-1a", "n1", 0.1)
        );
        assert_eq!(c.checks[0].sample, Some(0.5));
        let e = err("vantage: {sample: 2}\n");
        assert!(
            e.contains("key 'vantage.sample'") && e.contains("outside (0, 1]"),
            "{e}"
        );
        let e = err("checks: [{name: a, type: http, url: 'http://x', sample: 0}]\n");
        assert!(e.contains("key 'checks[0].sample'") && e.contains("check 'a'"), "{e}");
        let e = err("vantage: {zone: x}\n");
        assert!(e.contains("vantage") && e.contains("zone"), "{e}");
    }

    #[test]
    fn syntax_error_has_location() {
        let e = err("probes: [unclosed\n");
        assert!(e.starts_with("config test.yaml:") && e.contains("line"), "{e}");
    }

    fn flag(key: &str) -> FlagKey {
        flag_keys()
            .into_iter()
            .find(|k| k.key == key)
            .unwrap_or_else(|| panic!("no flag for {key}"))
    }

    #[test]
    fn every_key_has_a_flag_named_after_it() {
        let keys = flag_keys();
        for (key, name, kind) in [
            ("listen", "listen", FlagKind::Text),
            ("strict", "strict", FlagKind::Bool),
            ("perf_ring_pages", "perf-ring-pages", FlagKind::Yaml),
            ("btf_path", "btf-path", FlagKind::Yaml),
            ("web_config_file", "web.config.file", FlagKind::Yaml),
            ("probes.oom.enabled", "probes.oom.enabled", FlagKind::Bool),
            ("probes.oom.exclude_hooks", "probes.oom.exclude-hooks", FlagKind::List),
            (
                "probes.memcg.exclude_hooks",
                "probes.memcg.exclude-hooks",
                FlagKind::List,
            ),
            (
                "probes.memcg.discovery_interval",
                "probes.memcg.discovery-interval",
                FlagKind::Text,
            ),
            ("probes.memcg.psi_triggers", "probes.memcg.psi-triggers", FlagKind::List),
            ("probes.tcp.destinations", "probes.tcp.destinations", FlagKind::Yaml),
            ("probes.tcp.max_series", "probes.tcp.max-series", FlagKind::Yaml),
            ("limits.vanished_grace", "limits.vanished-grace", FlagKind::Text),
            ("workloads.runtimes", "workloads.runtimes", FlagKind::List),
            ("workloads.lookup_timeout", "workloads.lookup-timeout", FlagKind::Text),
            ("workloads.cache_size", "workloads.cache-size", FlagKind::Yaml),
            ("alerting.webhook", "alerting.webhook", FlagKind::Yaml),
            ("events.history", "events.history", FlagKind::Yaml),
            ("journal.enabled", "journal.enabled", FlagKind::Bool),
            ("journal.path", "journal.path", FlagKind::Text),
            ("journal.max_bytes", "journal.max-bytes", FlagKind::Text),
            ("journal.fsync", "journal.fsync", FlagKind::Text),
            ("journal.fsync_interval", "journal.fsync-interval", FlagKind::Text),
            ("journal.queue", "journal.queue", FlagKind::Yaml),
            ("checks", "checks", FlagKind::List),
            ("vantage.location", "vantage.location", FlagKind::Text),
            ("vantage.node", "vantage.node", FlagKind::Text),
            ("vantage.sample", "vantage.sample", FlagKind::Yaml),
        ] {
            let k = keys
                .iter()
                .find(|k| k.key == key)
                .unwrap_or_else(|| panic!("no flag for {key}"));
            assert_eq!((k.flag.as_str(), k.kind), (name, kind), "{key}");
        }
        // Every leaf of the default config has exactly one flag.
        let mut flags: Vec<&str> = keys.iter().map(|k| k.flag.as_str()).collect();
        flags.sort_unstable();
        flags.dedup();
        assert_eq!(flags.len(), keys.len());
    }

    #[test]
    fn overrides_apply_to_the_file_and_are_checked() {
        let base = Config::parse("probes:\n  tcp:\n    max_series: 128\n", "f.yaml").unwrap();
        let o = |key: &str, v: &[&str]| Override {
            key: flag(key),
            values: v.iter().map(|s| (*s).to_string()).collect(),
        };
        let c = base
            .clone()
            .with_overrides(&[
                o("strict", &["true"]),
                o("probes.oom.enabled", &["false"]),
                o("probes.memcg.exclude_hooks", &["tracepoint"]),
                o("probes.oom.exclude_hooks", &["fentry,kprobe"]),
                o("checks", &["[{name: a, type: http, url: \"http://127.0.0.1:1/\"}]"]),
                o("probes.memcg.discovery_interval", &["200ms"]),
                o("probes.tcp.destinations", &["{pg: \"10.0.0.0/8:5432\"}"]),
                o("perf_ring_pages", &["8"]),
                o("alerting.webhook", &["http://127.0.0.1:9/hook"]),
            ])
            .unwrap();
        assert!(c.strict && !c.probes.oom.enabled);
        assert_eq!(c.probes.memcg.exclude_hooks, vec![crate::probe::HookKind::Tracepoint]);
        use crate::probe::HookKind::{Fentry, Kprobe};
        assert_eq!(c.probes.oom.exclude_hooks, vec![Fentry, Kprobe]);
        assert_eq!(c.checks.len(), 1);
        assert_eq!(c.probes.memcg.discovery_interval, Duration::from_millis(200));
        assert_eq!(c.probes.tcp.max_series, 128, "the file's value stays");
        assert_eq!(c.probes.tcp.destinations.len(), 1);
        assert_eq!(c.perf_ring_pages, 8);
        assert_eq!(c.alerting.webhook.as_deref(), Some("http://127.0.0.1:9/hook"));
        let e = base
            .clone()
            .with_overrides(&[o("probes.oom.enabled", &["maybe"])])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("config <command line>: key 'probes.oom.enabled': invalid type"),
            "{e}"
        );
        let e = base
            .clone()
            .with_overrides(&[o("perf_ring_pages", &["3"])])
            .unwrap_err()
            .to_string();
        assert!(e.contains("key 'perf_ring_pages': 3 is not a power of two"), "{e}");
        let e = base
            .with_overrides(&[o("probes.tcp.destinations", &["{pg: [unclosed"])])
            .unwrap_err()
            .to_string();
        assert!(e.contains("key 'probes.tcp.destinations': not valid YAML"), "{e}");
    }

    #[test]
    fn workloads_defaults_flags_and_errors() {
        let c = Config::parse(EMBEDDED_DEFAULT, "embedded").unwrap();
        assert_eq!(
            c.workloads,
            WorkloadsConfig::default(),
            "embedded default = built-in default"
        );
        let kinds: Vec<(RuntimeKind, bool)> = c.workloads.runtimes.iter().map(|r| (r.kind, r.optional)).collect();
        assert_eq!(
            kinds,
            [
                (RuntimeKind::Containerd, true),
                (RuntimeKind::Docker, true),
                (RuntimeKind::Crio, true)
            ]
        );
        let o = |key: &str, v: &str| Override {
            key: flag(key),
            values: vec![v.to_string()],
        };
        let c = Config::default()
            .with_overrides(&[
                o(
                    "workloads.runtimes",
                    "[{kind: docker, socket: /run/podman/podman.sock}]",
                ),
                o("workloads.lookup_timeout", "500ms"),
                o("workloads.cache_size", "50"),
            ])
            .unwrap();
        assert_eq!(c.workloads.runtimes.len(), 1);
        assert_eq!(c.workloads.runtimes[0].socket, Path::new("/run/podman/podman.sock"));
        assert!(!c.workloads.runtimes[0].optional, "listed by hand: must be there");
        assert_eq!(c.workloads.lookup_timeout, Duration::from_millis(500));
        assert_eq!(c.workloads.cache_size, 50);
        for (yaml, key) in [
            ("workloads: {cache_size: 0}", "workloads.cache_size"),
            ("workloads: {lookup_timeout: 0s}", "workloads.lookup_timeout"),
            (
                "workloads: {runtimes: [{kind: containerd, socket: /x}]}",
                "workloads.runtimes[0].namespaces",
            ),
            (
                "workloads: {runtimes: [{kind: docker, socket: /x, namespaces: [a]}]}",
                "workloads.runtimes[0].namespaces",
            ),
            (
                "workloads: {runtimes: [{kind: rkt, socket: /x}]}",
                "workloads.runtimes[0].kind",
            ),
            (
                "workloads: {runtimes: [{kind: docker, sock: /x}]}",
                "workloads.runtimes[0]",
            ),
        ] {
            let e = Config::parse(yaml, "f.yaml").unwrap_err().to_string();
            assert!(e.contains(&format!("key '{key}")), "{yaml}: {e}");
        }
    }
}
