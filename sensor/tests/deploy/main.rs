//! The deployment files in deploy/: the Prometheus rules (`promtool check rules`, `promtool
//! test rules`, including 1,000 hosts of which 1% OOM within the hour -> exactly 0.01), the
//! Prometheus configs, the container image (built with `cargo xtask image` and run with
//! podman), and the Kubernetes manifests (offline schema validation, and the DaemonSet's
//! capability set really running the sensor). Under CI=true a missing tool fails the test
//! instead of skipping it.

#[path = "../common/mod.rs"]
mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::{manifests::*, *};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn prometheus_dir() -> PathBuf {
    root().join("deploy/prometheus")
}

/// Fails under CI, else prints why the test is skipped; returns false to skip.
fn tool_missing(what: &str, how: &str) -> bool {
    common::require("", false, &format!("{what} is missing ({how})"))
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn promtool() -> Option<Command> {
    common::require_tool("promtool", "`cargo xtask deps` installs Debian's prometheus package")
        .then(|| Command::new("promtool"))
}

mod alertmanager;
mod image;
mod kubernetes;
mod live;
mod rules;
