//! Offline validation of Kubernetes manifests (deploy/kubernetes/validate.py with the
//! kubernetes-validate package of target/deploy-venv), shared by the DaemonSet's and the
//! remediation runner's tests.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// target/deploy-venv's python when it has kubernetes-validate; else fails under CI, or skips.
pub fn deploy_python() -> Option<PathBuf> {
    let py = super::prom::root().join("target/deploy-venv/bin/python");
    let ok = Command::new(&py)
        .args(["-c", "import kubernetes_validate"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(py);
    }
    let how = "cargo xtask deps, which cargo xtask test and .ci/run run";
    super::require(
        "",
        false,
        &format!("target/deploy-venv with kubernetes-validate is missing ({how})"),
    );
    None
}

/// Runs deploy/kubernetes/validate.py on `dir`; without network when root (`unshare -n`), so
/// the test proves the schemas come from the installed package. (success, stdout + stderr)
pub fn validate_manifests(py: &Path, dir: &Path) -> (bool, String) {
    let script = super::prom::root().join("deploy/kubernetes/validate.py");
    // SAFETY: geteuid has no preconditions.
    let out = if unsafe { libc::geteuid() } == 0 {
        Command::new("unshare").arg("-n").arg(py).arg(&script).arg(dir).output()
    } else {
        Command::new(py).arg(&script).arg(dir).output()
    }
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}
