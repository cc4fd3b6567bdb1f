//! What the tests need beyond the Rust toolchain: Debian packages, the manifest validator's
//! venv and cargo-fuzz. One list, installed by `cargo xtask deps`, which both `cargo xtask test` and `.ci/run`
//! run, so a fresh clone and CI cannot drift apart.

use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::{output, run, step};

/// Debian packages the tests use: setpriv (util-linux) drops privileges for the
/// unprivileged-start test; tail (coreutils) is the OOM victim; qemu-system-x86, busybox-static
/// and binutils (strip) run the fentry/kprobe test inside Debian's 6.1 kernel (fetched by
/// `cargo xtask test`); prometheus provides promtool for the rule tests and the server the
/// dashboard, scale and demo tests query; python3 regenerates the fleet rule test; python3-venv
/// holds the manifest validator (below); bpftool lets a failing TCP test show the kernel's side
/// (connect table, program statistics); stress-ng makes the real OOM storms of
/// sensor/tests/storm.rs; prometheus-alertmanager (+ amtool) checks and runs deploy/alertmanager
/// and the live remediation test (sensor/tests/fleet.rs); musl-tools (musl-gcc) compiles the C
/// code of ring and mimalloc for the static build (`cargo xtask dist`); podman and runc build
/// and run the image in the image test (runc: crun refuses hybrid cgroup hosts); ca-certificates
/// is the bundle the image ships; chromium (headless, driven over the DevTools protocol) loads
/// the web view in sensor/tests/web.rs; containerd (with podman, runc and busybox-static) runs
/// the kubelet-style containers of sensor/tests/workloads.rs (sensor/tests/common/runtimes.rs);
/// gcc-aarch64-linux-gnu builds the static aarch64 binary the image test ships (`cargo xtask
/// dist --arch arm64`).
pub const DEBIAN_PACKAGES: &[&str] = &[
    "util-linux",
    "coreutils",
    "qemu-system-x86",
    "busybox-static",
    "binutils",
    "prometheus",
    "prometheus-alertmanager",
    "python3",
    "python3-venv",
    "bpftool",
    "stress-ng",
    "musl-tools",
    "podman",
    "runc",
    "ca-certificates",
    "chromium",
    "containerd",
    "gcc-aarch64-linux-gnu",
];

/// What `cargo xtask bench` compares against and drives, installed before it runs (not by
/// `deps`, since the tests need none of it): bpftrace (the TCP benchmark's anchor),
/// prometheus-node-exporter (memory and scrape anchors), prometheus-blackbox-exporter (the checks
/// anchor), iproute2 and util-linux (`ip`, `unshare`: load in network namespaces of its own).
pub const BENCH_PACKAGES: &[&str] = &[
    "bpftrace",
    "prometheus-node-exporter",
    "prometheus-blackbox-exporter",
    "iproute2",
    "util-linux",
];

/// kubernetes-validate (PyPI) bundles the Kubernetes JSON schemas, so the manifest test
/// (sensor/tests/deploy/, deploy/kubernetes/validate.py) validates offline. Pinned, in a venv
/// under target/ so it touches neither Debian's Python nor the network once installed.
pub const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
pub const VENV: &str = "target/deploy-venv";

/// Installs whatever of [`DEBIAN_PACKAGES`], the venv and cargo-fuzz is missing; a no-op when all is there.
/// Both are tried, so one failing (not root, no network) still leaves the other installed.
pub fn install() -> Result<()> {
    let debian = debian_packages();
    let venv = validator_venv();
    let fuzz = cargo_fuzz();
    let mut errors = [debian, venv, fuzz].into_iter().filter_map(Result::err);
    match errors.next() {
        None => Ok(()),
        Some(first) => Err(errors.fold(first, |acc, e| acc.context(format!("{e:#}")))),
    }
}

/// Installs whatever of [`BENCH_PACKAGES`] is missing; a no-op when all is there.
pub fn install_bench() -> Result<()> {
    install_debian(BENCH_PACKAGES, "the benchmarks")?;
    // The benchmarks drive the same OOM storms, containers and namespaces as the tests.
    install_debian(BENCH_ALSO, "the benchmarks")
}

/// What the benchmarks use of the tests' packages (load, runtimes, namespaces).
pub const BENCH_ALSO: &[&str] = &["stress-ng", "podman", "runc", "containerd", "busybox-static"];
/// `cargo xtask dist`: musl-gcc compiles ring's and mimalloc's C code for musl; the image ships
/// Debian's CA bundle.
pub const DIST: &[&str] = &["musl-tools", "ca-certificates"];
/// `cargo xtask dist --arch arm64`: Debian's aarch64 cross gcc (compiles and links; musl's arm64
/// headers come from Debian's musl-dev for arm64, fetched into target/ by apt.rs).
pub const DIST_ARM64: &[&str] = &["gcc-aarch64-linux-gnu", "ca-certificates"];
/// `cargo xtask image`: the engine that builds the image (each `dist` it runs installs its own
/// architecture's [`DIST`] or [`DIST_ARM64`]).
pub const IMAGE: &[&str] = &["podman", "runc"];
/// `cargo xtask demo`: the Prometheus it runs the fleet rules in; `tail` is the OOM victim.
pub const DEMO: &[&str] = &["prometheus", "coreutils"];
/// `cargo xtask soak`: OOM victims (`tail`), namespaces (`unshare`), the check target's network.
pub const SOAK: &[&str] = &["coreutils", "util-linux", "iproute2"];

/// What one xtask command needs of Debian: installed when root; otherwise one line naming what
/// to install, and an error.
pub fn need(packages: &[&str], users: &str) -> Result<()> {
    install_debian(packages, users)
}

/// Installed without their recommended packages: qemu-system-arm (the arm64 row of the kernel
/// matrix) recommends qemu-utils, whose backported version in Debian 12 breaks the
/// qemu-system-common that qemu-system-x86 needs.
pub const DEBIAN_NO_RECOMMENDS: &[&str] = &["qemu-system-arm"];

fn debian_packages() -> Result<()> {
    install_debian(DEBIAN_PACKAGES, "the tests")?;
    install_debian_with(DEBIAN_NO_RECOMMENDS, "the tests", &["--no-install-recommends"])
}

fn install_debian(packages: &[&str], users: &str) -> Result<()> {
    install_debian_with(packages, users, &[])
}

fn install_debian_with(packages: &[&str], users: &str, flags: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if !missing.is_empty() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!(
                "{users} need Debian packages that are missing; not root, so install them first: apt-get install {}",
                missing.join(" ")
            );
        }
        step(&format!(
            "installing Debian packages {users} use: {}",
            missing.join(" ")
        ));
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(flags)
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

fn validator_venv() -> Result<()> {
    let python = format!("{VENV}/bin/python");
    let has_validator = Command::new(&python)
        .args(["-c", "import kubernetes_validate"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_validator {
        step(&format!("installing {KUBERNETES_VALIDATE} into {VENV}"));
        run(Command::new("python3").args(["-m", "venv", VENV]))?;
        run(Command::new(format!("{VENV}/bin/pip")).args(["install", "-q", KUBERNETES_VALIDATE]))
            .context("the manifest validator's venv")?;
    }
    Ok(())
}

/// cargo-fuzz, the runner of sensor/fuzz (`cargo xtask fuzz`, run by `.ci/run`); installed with
/// cargo when `cargo fuzz` is missing.
pub const CARGO_FUZZ: &str = "^0.13";

pub fn cargo_fuzz() -> Result<()> {
    let present = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        step(&format!("installing cargo-fuzz {CARGO_FUZZ}"));
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ]))?;
    }
    Ok(())
}

/// `dpkg -s` says the package is installed (not merely known, or removed with its config).
fn installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.trim_end().ends_with(" installed"))
}
