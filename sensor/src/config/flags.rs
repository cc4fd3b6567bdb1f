//! Flags with the config's own names (`--probes.tcp.enabled false`, `--web.config.file F`):
//! each becomes an override of its key in the YAML document before it is parsed, so a flag and
//! a file say the same thing the same way.

use super::{Config, ConfigError};

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
        let named = crate::yaml::Named {
            what: super::WHAT,
            file: COMMAND_LINE,
        };
        let key_err = |key: &str, reason: String| named.key(key, reason);
        let mut doc = serde_yaml_ng::to_value(&self).map_err(|e| named.syntax(e.to_string()))?;
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
