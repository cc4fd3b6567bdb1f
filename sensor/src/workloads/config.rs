//! `workloads:` in the config file: which container runtimes name the workloads.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::serde_duration as duration;

/// The API a runtime speaks on its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// containerd's gRPC API (`containers.v1.Containers/Get`).
    Containerd,
    /// The Docker Engine API (`GET /containers/{id}/json`); also Podman's service.
    Docker,
    /// CRI-O's inspect endpoint (`GET /containers/{id}`).
    Crio,
}

impl RuntimeKind {
    /// The `runtime` label.
    pub fn label(self) -> &'static str {
        match self {
            RuntimeKind::Containerd => "containerd",
            RuntimeKind::Docker => "docker",
            RuntimeKind::Crio => "crio",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    pub kind: RuntimeKind,
    pub socket: PathBuf,
    /// containerd namespaces searched in order (Kubernetes uses `k8s.io`, Docker `moby`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Skipped without counting an error while its socket does not exist (the defaults: a
    /// plain host has none of them). A runtime listed without it must be there.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkloadsConfig {
    /// Asked in order; the first that knows a container id names it.
    pub runtimes: Vec<RuntimeConfig>,
    /// One runtime's answer to one lookup, at most.
    #[serde(with = "duration")]
    pub lookup_timeout: Duration,
    /// Container ids whose names (or whose failed lookup) are kept.
    pub cache_size: usize,
}

impl Default for WorkloadsConfig {
    fn default() -> Self {
        let rt = |kind, socket: &str, namespaces: &[&str]| RuntimeConfig {
            kind,
            socket: socket.into(),
            namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
            optional: true,
        };
        WorkloadsConfig {
            runtimes: vec![
                rt(
                    RuntimeKind::Containerd,
                    "/run/containerd/containerd.sock",
                    &["k8s.io", "moby", "default"],
                ),
                rt(RuntimeKind::Docker, "/var/run/docker.sock", &[]),
                rt(RuntimeKind::Crio, "/var/run/crio/crio.sock", &[]),
            ],
            lookup_timeout: Duration::from_secs(2),
            cache_size: 10_000,
        }
    }
}

impl WorkloadsConfig {
    /// Ranges serde cannot check; the key path (relative to `workloads`) and the reason.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.lookup_timeout.is_zero() {
            return Err((".lookup_timeout".into(), "must be greater than 0".into()));
        }
        if self.cache_size == 0 {
            return Err((".cache_size".into(), "must be at least 1".into()));
        }
        for (i, r) in self.runtimes.iter().enumerate() {
            if r.kind == RuntimeKind::Containerd && r.namespaces.is_empty() {
                return Err((
                    format!(".runtimes[{i}].namespaces"),
                    "containerd needs at least one namespace (e.g. [k8s.io])".into(),
                ));
            }
            if r.kind != RuntimeKind::Containerd && !r.namespaces.is_empty() {
                return Err((
                    format!(".runtimes[{i}].namespaces"),
                    format!("only containerd has namespaces, not {}", r.kind.label()),
                ));
            }
        }
        Ok(())
    }
}
