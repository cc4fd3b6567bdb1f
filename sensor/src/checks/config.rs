//! The `checks:` and `alerting:` configuration of synthetic checks, and its validation.
//!
//! Everything that can be wrong with a check is found at load time, with the check's name and
//! the key, so a typo in a regex or a missing CA file never surfaces as a failing check at 3am.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::serde_duration as duration;

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum CheckType {
    Http,
    Websocket,
}

impl CheckType {
    pub fn label(self) -> &'static str {
        match self {
            CheckType::Http => "http",
            CheckType::Websocket => "websocket",
        }
    }
}

/// One synthetic check (shape from the conventions, plus HTTP and websocket options).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Check {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: CheckType,
    pub url: String,
    #[serde(default = "default_interval", with = "duration")]
    pub interval: Duration,
    #[serde(default = "default_timeout", with = "duration")]
    pub timeout: Duration,
    /// HTTP method (HTTP checks only).
    #[serde(default = "default_method")]
    pub method: String,
    /// Extra request headers (HTTP requests and websocket handshakes).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Request body (HTTP checks only).
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub expect: Expect,
    #[serde(default)]
    pub tls: TlsOptions,
    #[serde(default)]
    pub websocket: WebsocketOptions,
    /// JSON fields of websocket messages exported as user-named gauges.
    #[serde(default)]
    pub gauges: Vec<GaugeSpec>,
    /// Share of the fleet's sensors that run this check (overrides `vantage.sample`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Expect {
    /// Accepted status codes; empty means any 2xx or 3xx.
    pub status: Vec<u16>,
    /// The body (first `max_body_bytes`) must match this regex.
    pub body_regex: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsOptions {
    /// PEM file of CA certificates to trust instead of the system store.
    pub ca_file: Option<PathBuf>,
    /// Accept any server certificate (still encrypts; never for production targets).
    pub insecure_skip_verify: bool,
    /// PEM client certificate chain and key for mutual TLS.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// SNI and verification name when it differs from the URL's host.
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WebsocketMode {
    /// Connect, optionally send and expect a reply, close: one run per interval.
    Probe,
    /// Stay connected and consume the server's messages; up while connected.
    Stream,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebsocketOptions {
    /// Default: `stream` when the check has gauges, else `probe`.
    pub mode: Option<WebsocketMode>,
    /// Text message sent after the handshake (probe mode).
    pub send: Option<String>,
    /// A received text message must match this regex (probe mode).
    pub expect_regex: Option<String>,
    /// Reconnect backoff of stream mode: doubles from min to max.
    #[serde(with = "duration")]
    pub reconnect_min: Duration,
    #[serde(with = "duration")]
    pub reconnect_max: Duration,
}

impl Default for WebsocketOptions {
    fn default() -> Self {
        WebsocketOptions {
            mode: None,
            send: None,
            expect_regex: None,
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
        }
    }
}

/// `{"store": "a", "model": "b", "inventory": 10}` with `{name: inventory, labels: [store,
/// model], value: inventory}` becomes `inventory{store="a",model="b"} 10`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GaugeSpec {
    pub name: String,
    #[serde(default)]
    pub labels: Vec<String>,
    /// Field holding the value (dotted path for nested objects, e.g. `stock.count`).
    pub value: String,
    #[serde(default)]
    pub help: Option<String>,
    /// Distinct label sets kept; further ones are counted as dropped.
    #[serde(default = "default_max_series")]
    pub max_series: usize,
}

fn default_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_method() -> String {
    "GET".into()
}
fn default_max_series() -> usize {
    1000
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Alerting {
    /// A check is down when its availability over `window` is at or below this.
    pub availability_threshold: f64,
    #[serde(with = "duration")]
    pub window: Duration,
    /// Fewer runs than this in the window: no decision either way.
    pub min_samples: usize,
    /// URL that receives each alert and recovery as a JSON POST (retried).
    pub webhook: Option<String>,
    pub webhook_retries: u32,
    /// Alerts kept for `/api/v1/checks` and `sensor top`.
    pub history: usize,
}

impl Default for Alerting {
    fn default() -> Self {
        Alerting {
            availability_threshold: 0.8,
            window: Duration::from_secs(120),
            min_samples: 3,
            webhook: None,
            webhook_retries: 3,
            history: 1000,
        }
    }
}

impl Check {
    pub fn ws_mode(&self) -> WebsocketMode {
        self.websocket.mode.unwrap_or(if self.gauges.is_empty() {
            WebsocketMode::Probe
        } else {
            WebsocketMode::Stream
        })
    }
}

fn valid_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with("__")
}

/// Validates every check; errors are `(key path, reason)` with the check's name in the reason.
pub fn validate(checks: &[Check], alerting: &Alerting) -> Result<(), (String, String)> {
    if !(0.0..=1.0).contains(&alerting.availability_threshold) {
        return Err((
            "alerting.availability_threshold".into(),
            format!("{} is outside 0..1", alerting.availability_threshold),
        ));
    }
    if alerting.window.is_zero() {
        return Err(("alerting.window".into(), "must be positive".into()));
    }
    if alerting.min_samples == 0 {
        return Err(("alerting.min_samples".into(), "must be at least 1".into()));
    }
    if let Some(w) = &alerting.webhook {
        if !(w.starts_with("http://") || w.starts_with("https://")) || w.parse::<http::Uri>().is_err() {
            return Err((
                "alerting.webhook".into(),
                format!("'{w}' is not an http:// or https:// URL"),
            ));
        }
    }
    let mut names = std::collections::HashSet::new();
    let mut gauge_names: BTreeMap<&str, &str> = BTreeMap::new();
    for (i, c) in checks.iter().enumerate() {
        let key = |k: &str| format!("checks[{i}]{k}");
        let name = &c.name;
        if name.trim().is_empty() {
            return Err((key(".name"), "must not be empty".into()));
        }
        if !names.insert(name.as_str()) {
            return Err((key(".name"), format!("check '{name}' is defined twice")));
        }
        let schemes: &[&str] = match c.kind {
            CheckType::Http => &["http://", "https://"],
            CheckType::Websocket => &["ws://", "wss://"],
        };
        if !schemes.iter().any(|s| c.url.starts_with(s)) {
            return Err((
                key(".url"),
                format!("check '{name}': '{}' must start with {}", c.url, schemes.join(" or ")),
            ));
        }
        match c.url.parse::<http::Uri>() {
            Ok(u) if u.host().is_some_and(|h| !h.is_empty()) => {}
            Ok(_) => return Err((key(".url"), format!("check '{name}': '{}' has no host", c.url))),
            Err(e) => return Err((key(".url"), format!("check '{name}': '{}': {e}", c.url))),
        }
        if c.interval.is_zero() || c.timeout.is_zero() {
            return Err((
                key(""),
                format!("check '{name}': interval and timeout must be positive"),
            ));
        }
        if http::Method::from_bytes(c.method.as_bytes()).is_err() {
            return Err((
                key(".method"),
                format!("check '{name}': '{}' is not an HTTP method", c.method),
            ));
        }
        for (h, v) in &c.headers {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() || http::HeaderValue::from_str(v).is_err() {
                return Err((key(".headers"), format!("check '{name}': invalid header '{h}'")));
            }
        }
        if let Some(s) = c.expect.status.iter().find(|s| !(100..=599).contains(*s)) {
            return Err((
                key(".expect.status"),
                format!("check '{name}': {s} is not an HTTP status"),
            ));
        }
        for (k, re) in [
            (".expect.body_regex", &c.expect.body_regex),
            (".websocket.expect_regex", &c.websocket.expect_regex),
        ] {
            if let Some(re) = re {
                if let Err(e) = regex::Regex::new(re) {
                    return Err((key(k), format!("check '{name}': bad regex: {e}")));
                }
            }
        }
        for (k, p) in [
            (".tls.ca_file", &c.tls.ca_file),
            (".tls.client_cert", &c.tls.client_cert),
            (".tls.client_key", &c.tls.client_key),
        ] {
            if let Some(p) = p {
                if let Err(e) = std::fs::metadata(p) {
                    return Err((key(k), format!("check '{name}': {}: {e}", p.display())));
                }
            }
        }
        if c.tls.client_cert.is_some() != c.tls.client_key.is_some() {
            return Err((
                key(".tls"),
                format!("check '{name}': client_cert and client_key go together"),
            ));
        }
        if c.websocket.reconnect_min.is_zero() || c.websocket.reconnect_min > c.websocket.reconnect_max {
            return Err((
                key(".websocket"),
                format!("check '{name}': need 0 < reconnect_min <= reconnect_max"),
            ));
        }
        if !c.gauges.is_empty() && c.kind != CheckType::Websocket {
            return Err((key(".gauges"), format!("check '{name}': gauges need a websocket check")));
        }
        for (j, g) in c.gauges.iter().enumerate() {
            let gk = key(&format!(".gauges[{j}]"));
            if !valid_metric_name(&g.name) || g.name.starts_with("sensor_") {
                return Err((
                    gk,
                    format!(
                        "check '{name}': '{}' is not a valid metric name of its own (sensor_ is reserved)",
                        g.name
                    ),
                ));
            }
            if let Some(other) = gauge_names.insert(&g.name, name) {
                return Err((
                    gk,
                    format!(
                        "check '{name}': gauge '{}' is already defined by check '{other}'",
                        g.name
                    ),
                ));
            }
            let mut seen = std::collections::HashSet::new();
            for l in &g.labels {
                if !valid_label_name(l) || !seen.insert(l) {
                    return Err((gk, format!("check '{name}': label '{l}' is invalid or repeated")));
                }
            }
            if g.value.is_empty() || g.max_series == 0 {
                return Err((
                    gk,
                    format!("check '{name}': value must name a field and max_series be positive"),
                ));
            }
        }
    }
    Ok(())
}
