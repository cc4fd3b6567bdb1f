//! The DaemonSet run for real: the pod template of deploy/kubernetes/daemonset.yaml (the file
//! itself, with an overlay's patches where a test says so) and the ConfigMap it mounts, turned
//! into a container of the image `deploy/Dockerfile` builds, under Podman 4.3 and under a
//! private containerd 1.6, each with its own default seccomp profile.
//!
//! Nothing of the template is restated here: capabilities, securityContext, hostPath mounts,
//! env, host namespaces, resources, args and the readiness probe are read from the YAML, and
//! every field the template has is either mapped onto the runtime or named below as not
//! applicable to one node's container (scheduling, API access), so a new field fails the test
//! until it is handled. `podman kube play` (4.3) is not used: it drops `mountPropagation` and
//! `allowPrivilegeEscalation`, and cannot run a hostPath-mounted, capability-dropped container
//! without a CNI network; `podman run` takes each field exactly.
//!
//! The readiness probe's `httpGet` is sent the way kubelet sends it, from outside the
//! container to the pod's network namespace and the probe's port (the test enters the pod's
//! netns on one thread; the pod has no CNI network here, only its loopback).

#[path = "../common/mod.rs"]
mod common;

use std::{
    collections::BTreeMap,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
    time::{Duration, Instant},
};

use common::{
    runtimes::{self, podman, run_ok, Containerd, KubeContainer},
    *,
};
use serde_yaml_ng::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

mod containerd;
mod fields;
mod observe;
mod podman;
mod pods;
mod template;

// Each part sees the others' helpers through `use super::*`.
#[allow(unused_imports)]
use self::{containerd::*, fields::*, observe::*, podman::*, pods::*, template::*};
