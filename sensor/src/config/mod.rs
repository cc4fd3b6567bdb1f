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
    probes::Probes,
    tcp::config::{Destination, TcpConfig},
    workloads::config::{RuntimeConfig, RuntimeKind, WorkloadsConfig},
};

mod flags;
#[cfg(test)]
mod tests;

pub use flags::*;

/// The configuration `sensor run` uses when no `--config` is given.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../default-config.yaml");

pub use crate::yaml::ConfigError;
use crate::yaml::Named;

/// The kind of file in `sensor run`'s config errors.
const WHAT: &str = "config";

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
        let named = Named { what: WHAT, file };
        let cfg: Config = crate::yaml::parse(text).map_err(|f| match f {
            f @ crate::yaml::Fault::Syntax(_) => named.fault(f),
            crate::yaml::Fault::Key { key, reason } => {
                // Serde knows the index of a bad check, people know its name.
                let check = serde_yaml_ng::from_str(text)
                    .ok()
                    .and_then(|doc| check_name(&doc, &key));
                let reason = match check {
                    Some(name) => format!("check '{name}': {reason}"),
                    None => reason,
                };
                named.key(key, reason)
            }
        })?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = crate::yaml::read(WHAT, path)?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Checks that serde cannot express: ranges and cross-field rules.
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let named = Named { what: WHAT, file };
        let key_err = |key: &str, reason: String| named.key(key, reason);
        if self.limits.workloads_per_metric == 0 {
            return Err(key_err("limits.workloads_per_metric", "must be at least 1".into()));
        }
        for (name, section) in self.probes.sections() {
            section
                .validate()
                .map_err(|(k, r)| key_err(&format!("probes.{name}{k}"), r))?;
        }
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
