//! The one YAML loader behind every file the sensor reads as configuration (`sensor run`'s
//! config, `sensor remediate`'s, the exporter-toolkit web config): an empty or comments-only
//! file is all defaults; unknown keys and bad values fail naming the key's path. Errors name the
//! kind of file, the file and the key ([`ConfigError`], one type for every configuration file).

use std::path::Path;

use serde::de::DeserializeOwned;

/// A configuration file that cannot be used. `what` is the kind of file ("config", "remediate
/// config"): a DaemonSet that crash-loops must say which of its files is wrong, where.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{what} {file}: cannot read: {source}")]
    Read {
        what: &'static str,
        file: String,
        source: std::io::Error,
    },
    #[error("{what} {file}: key '{key}': {reason}")]
    Key {
        what: &'static str,
        file: String,
        key: String,
        reason: String,
    },
    #[error("{what} {file}: {reason}")]
    Syntax {
        what: &'static str,
        file: String,
        reason: String,
    },
}

/// One configuration file (or the command line), for the errors about it.
#[derive(Debug, Clone, Copy)]
pub struct Named<'a> {
    pub what: &'static str,
    pub file: &'a str,
}

impl Named<'_> {
    pub fn key(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Key {
            what: self.what,
            file: self.file.to_string(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    pub fn syntax(&self, reason: impl Into<String>) -> ConfigError {
        ConfigError::Syntax {
            what: self.what,
            file: self.file.to_string(),
            reason: reason.into(),
        }
    }

    pub fn fault(&self, fault: Fault) -> ConfigError {
        match fault {
            Fault::Syntax(reason) => self.syntax(reason),
            Fault::Key { key, reason } => self.key(key, reason),
        }
    }
}

/// The text of the configuration file at `path`, a [`ConfigError::Read`] naming it when it
/// cannot be read.
pub fn read(what: &'static str, path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        what,
        file: path.display().to_string(),
        source,
    })
}

/// What is wrong with a document, before the caller names the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Not YAML, or wrong at the document's top level.
    Syntax(String),
    /// A value (or an unknown key) at `key`, e.g. `probes.tcp.destinations[2].port`.
    Key { key: String, reason: String },
}

/// Parses `text` as a `T`, whose missing keys take their defaults.
pub fn parse<T: DeserializeOwned + Default>(text: &str) -> Result<T, Fault> {
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|e| Fault::Syntax(e.to_string()))?;
    if doc.is_null() {
        return Ok(T::default());
    }
    let de = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let reason = e.into_inner().to_string();
        if key.is_empty() || key == "." {
            Fault::Syntax(reason)
        } else {
            Fault::Key { key, reason }
        }
    })
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Doc {
        port: u16,
        inner: Inner,
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Inner {
        names: Vec<String>,
    }

    #[test]
    fn empty_and_comment_only_documents_are_defaults() {
        assert_eq!(parse::<Doc>(""), Ok(Doc::default()));
        assert_eq!(parse::<Doc>("# nothing set\n\n"), Ok(Doc::default()));
    }

    #[test]
    fn faults_name_the_key_path() {
        let want = Doc {
            port: 9,
            inner: Inner {
                names: vec!["a".into()],
            },
        };
        assert_eq!(parse::<Doc>("port: 9\ninner: {names: [a]}"), Ok(want));
        match parse::<Doc>("inner: {names: [a], nmaes: [b]}") {
            Err(Fault::Key { key, reason }) => {
                assert_eq!(key, "inner.nmaes");
                assert!(reason.contains("unknown field `nmaes`"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        match parse::<Doc>("port: 70000") {
            Err(Fault::Key { key, .. }) => assert_eq!(key, "port"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse::<Doc>("port: [unclosed"), Err(Fault::Syntax(_))));
        assert!(matches!(parse::<Doc>("- a list"), Err(Fault::Syntax(_))));
    }
}
