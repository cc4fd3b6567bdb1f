//! Project tasks: `cargo xtask setup | deps | build-ebpf | dist | image | run | test | lint |
//! bench [tcp|checks|memory|scrape|events|oom-latency|workloads|all] | demo | fuzz | soak`.
//!
//! `run` and `test` call `setup` themselves, and `test` also `deps`, so a fresh machine needs
//! nothing else.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

mod apt;
mod bench;
mod demo;
mod deps;
mod first_run;
mod fuzz;
mod image;
mod kernels;
/// The test kit's shared part: the kernel lock and host facts, one copy for tests and xtask.
#[path = "../../sensor/tests/common/kit/mod.rs"]
mod kit;
#[cfg(test)]
#[path = "../../sensor/tests/common/kit/tests.rs"]
mod kit_tests;
mod net;
mod soak;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13";
const BPF_TARGET: &str = "bpfel-unknown-none";

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install rust-src for nightly, bpf-linker built against nightly's LLVM and the musl target
    /// of the static build, and check for musl-gcc (Debian's musl-tools); idempotent.
    Setup,
    /// Install what the tests use beyond Rust (Debian packages as root, the manifest
    /// validator's venv under target/); idempotent. `test` and `.ci/run` run it.
    Deps {
        /// Also what the benchmarks compare against (bpftrace, node_exporter, blackbox_exporter);
        /// `cargo xtask bench` installs these itself.
        #[arg(long)]
        bench: bool,
    },
    /// Build the kernel programs for bpfel-unknown-none and print the object's path.
    BuildEbpf,
    /// Fetch the kernels of the QEMU matrix (sensor/tests/qemu/kernels.tsv) that are not cached
    /// in target/qemu/<suite> yet (`test` does this too); prints each kernel's image.
    Kernels,
    /// Build the fully static (musl), stripped release daemon (eBPF object embedded) and write it
    /// and Debian's CA bundle to `--out`, what the container image ships; prints one
    /// `file<TAB>PATH` line per file written.
    Dist {
        #[arg(long, default_value = "target/dist")]
        out: PathBuf,
        /// The architecture to build for (both build on this x86_64 machine).
        #[arg(long, value_enum, default_value = "amd64")]
        arch: image::Arch,
    },
    /// `dist` for amd64 and arm64, then deploy/Dockerfile per platform, joined in the manifest
    /// lists `localhost/sensor:<version>` and `:latest` with podman; prints `image<TAB>NAME`
    /// lines and `size<TAB>ARCH<TAB>BYTES`.
    Image,
    /// Build and run the daemon with the embedded default config; extra args go to `sensor run`.
    Run {
        /// Stop once it is ready: wait for `/readyz` 200, send SIGTERM, require exit 0 (what CI
        /// checks first, on the newcomer's path).
        #[arg(long)]
        until_ready: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run every test: unit tests and privileged integration tests against the real kernel,
    /// after `setup` and `deps`; the last line counts tests that could not run as skipped.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// rustfmt --check and clippy -D warnings, for the host crates and the eBPF crate.
    Lint,
    /// The fleet OOM rules on a real Prometheus TSDB backfilled with simulated hosts; writes
    /// docs/scale-check.md.
    ScaleCheck {
        #[arg(long, default_value_t = 10_000)]
        hosts: u32,
        #[arg(long, default_value_t = 4)]
        hours: u32,
    },
    /// Sensor + Prometheus with the fleet rules, a real OOM kill and a failing check; prints
    /// the fleet rule results (needs root and Debian's prometheus package).
    Demo {
        /// Keep both running until Enter is pressed.
        #[arg(long)]
        keep: bool,
    },
    /// Benchmarks with real load, each against an anchor measured in the same run where one
    /// exists; installs the anchors first (bpftrace, node_exporter, blackbox_exporter) and writes
    /// one report, docs/benchmarks.md (from docs/bench-results.json: a partial run updates only
    /// its own section and summary rows).
    Bench(bench::BenchArgs),
    /// One loopback connect-rate measurement; `bench` runs it in a fresh network namespace.
    #[command(hide = true)]
    BenchLoad {
        #[arg(long)]
        threads: usize,
        #[arg(long)]
        seconds: f64,
        /// Abortive close (RST) instead of FIN.
        #[arg(long)]
        rst: bool,
    },
    /// Build the cargo-fuzz targets (sensor/fuzz) and run each for `--seconds`; prints
    /// executions, coverage and crashes per target and fails on any crash.
    Fuzz(fuzz::Opts),
    /// The release daemon under cgroup churn, OOM kills, connect storms, a flapping check and
    /// scrapes every second; asserts exact counts and flat RSS/fds/threads, writes docs/soak.md.
    /// Takes the machine-wide kernel lock.
    Soak(soak::Opts),
    /// The soak's connect load (run by `soak` inside its network namespace and cgroup).
    #[command(hide = true)]
    SoakLoad,
    /// The events benchmark's load generator: refused connects to a closed loopback port (run in
    /// a fresh network namespace); prints `refused other`.
    #[command(hide = true)]
    BenchRefuse {
        #[arg(long)]
        threads: usize,
        #[arg(long)]
        seconds: f64,
    },
}

/// One benchmark of `cargo xtask bench`.
fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    env::set_current_dir(&root).with_context(|| format!("cd {}", root.display()))?;
    add_cargo_bin_to_path();
    match cli.cmd {
        Cmd::Setup => {
            setup()?;
            image::setup_static(&root, image::Arch::Amd64).map(|_| ())
        }
        Cmd::Deps { bench } => {
            deps::install()?;
            if bench {
                deps::install_bench()?;
            }
            Ok(())
        }
        Cmd::BuildEbpf => build_ebpf(&root),
        Cmd::Kernels => kernels::prepare_and_list(&root),
        Cmd::Dist { out, arch } => image::dist(&root, &out, arch).map(|_| ()),
        Cmd::Image => image::image(&root),
        Cmd::Run { until_ready, args } => {
            setup()?;
            let bin = build_release(&root)?;
            if until_ready {
                return first_run::until_ready(&bin, &args);
            }
            step(&format!("starting {} run", bin.display()));
            run(Command::new(bin).arg("run").args(args))
        }
        Cmd::Test { args } => {
            setup()?;
            if let Err(e) = deps::install() {
                // CI must not go green without them; elsewhere the tests that need them say so
                // and are counted as skipped.
                if kit::host::ci() {
                    return Err(e.context("installing the test dependencies"));
                }
                eprintln!("==> could not install every test dependency ({e:#}); tests that need them will be skipped");
            }
            kernels::prepare(&root);
            step("running the test suite (unit + privileged integration tests)");
            let skip_log = root.join("target/xtask/test-skips.log");
            if let Some(dir) = skip_log.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&skip_log, "").with_context(|| format!("truncate {}", skip_log.display()))?;
            run_tests(
                cargo()
                    .args(["test", "--no-fail-fast", "--workspace", "--exclude", "sensor-ebpf"])
                    .args(args)
                    .env("SENSOR_SKIP_LOG", &skip_log),
                &skip_log,
            )
        }
        Cmd::Bench(args) => bench::run(&root, args),
        Cmd::BenchLoad { threads, seconds, rst } => {
            let close = if rst {
                bench::tcp::Close::Rst
            } else {
                bench::tcp::Close::Fin
            };
            println!("{}", bench::tcp::connect_rate(threads.max(1), seconds, close)?);
            Ok(())
        }
        Cmd::BenchRefuse { threads, seconds } => {
            let (refused, other) = bench::events::refuse_storm(threads.max(1), seconds)?;
            println!("{refused} {other}");
            Ok(())
        }
        Cmd::Fuzz(opts) => {
            setup()?;
            fuzz::run_all(&root, &opts)
        }
        Cmd::Soak(opts) => {
            setup()?;
            deps::need(deps::SOAK, "the soak")?;
            let bin = build_release(&root)?;
            soak::run(&root, &bin, &opts)
        }
        Cmd::SoakLoad => soak::load(),
        Cmd::Demo { keep } => {
            setup()?;
            deps::need(deps::DEMO, "the demo")?;
            let bin = build_release(&root)?;
            demo::run(&root, &bin, keep)
        }
        Cmd::ScaleCheck { hosts, hours } => {
            step(&format!("scale check: {hosts} hosts, {hours} hours"));
            run(Command::new("python3")
                .arg(root.join("deploy/prometheus/scale/scale_check.py"))
                .args(["--hosts", &hosts.to_string(), "--hours", &hours.to_string()])
                .arg("--report")
                .arg(root.join("docs/scale-check.md")))?;
            step("wrote docs/scale-check.md");
            Ok(())
        }
        Cmd::Lint => {
            setup()?;
            step("rustfmt --check");
            run(cargo().args(["fmt", "--all", "--check"]))?;
            step("clippy (host crates)");
            run(cargo().args([
                "clippy",
                "--workspace",
                "--exclude",
                "sensor-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            step("clippy (eBPF crate, bpfel-unknown-none)");
            run(bpf_cargo("clippy").args(["--", "-D", "warnings"]))
        }
    }
}

/// `cargo build --release --locked -p sensor`; returns the binary's path.
fn build_release(root: &Path) -> Result<PathBuf> {
    step("building the sensor (release)");
    run(cargo().args(["build", "--release", "--locked", "-p", "sensor"]))?;
    Ok(root.join("target/release/sensor"))
}

fn workspace_root() -> PathBuf {
    // xtask/Cargo.toml lives one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// `cargo install` puts bpf-linker here; the eBPF build must find it even if PATH lacks it.
fn add_cargo_bin_to_path() {
    let bin = cargo_home().join("bin");
    let mut paths: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    if !paths.contains(&bin) {
        paths.insert(0, bin);
        if let Ok(joined) = env::join_paths(paths) {
            // Still single-threaded here, so changing the environment races with nothing.
            env::set_var("PATH", joined);
        }
    }
}

fn step(msg: &str) {
    eprintln!("==> {msg}");
}

fn cargo() -> Command {
    let mut c = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // .cargo/config.toml quiets aya-build's nested eBPF build; this cargo and the test
    // harness it runs should still name every test in CI logs.
    c.env_remove("CARGO_TERM_QUIET");
    remove_cargo_run_env(&mut c);
    c
}

/// Drops what cargo sets for a process it runs (xtask under `cargo xtask`, or a test that runs
/// `cargo xtask image`). Build scripts that read such a variable register it for reruns (ring
/// does, for CARGO_MANIFEST_DIR and CARGO_PKG_*), so a build started from a shell, from xtask
/// and from a test would each rebuild ring, rustls and the sensor.
fn remove_cargo_run_env(c: &mut Command) {
    for (k, _) in env::vars_os() {
        let Some(k) = k.to_str() else { continue };
        let injected = k.starts_with("CARGO_PKG_")
            || matches!(
                k,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
                    | "OUT_DIR"
            );
        if injected {
            c.env_remove(k);
        }
    }
}

/// `rustup run nightly cargo`: the eBPF crate needs nightly's build-std.
fn cargo_nightly() -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", NIGHTLY, "cargo"]);
    // The outer cargo's toolchain variables would pin the stable compiler.
    for k in [
        "RUSTC",
        "RUSTDOC",
        "CARGO",
        "RUSTUP_TOOLCHAIN",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        c.env_remove(k);
    }
    c
}

/// `cargo <subcommand>` for the eBPF crate on its target (nightly, build-std).
fn bpf_cargo(subcommand: &str) -> Command {
    let mut c = cargo_nightly();
    c.args([
        subcommand,
        "-p",
        "sensor-ebpf",
        "--bins",
        "--release",
        "--target",
        BPF_TARGET,
        "-Z",
        "build-std=core",
    ]);
    c
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and ends with one totals line over every test binary
/// (cargo's own last lines are those of crates without tests, which say `0 passed`). A test
/// that passed only because it skipped itself (it wrote `<test>\t<reason>` to `skip_log`) is
/// counted as skipped, not passed, and listed with its reason.
fn run_tests(cmd: &mut Command, skip_log: &Path) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let mut totals = Totals::default();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            totals.line(&line);
        }
    }
    let status = child.wait()?;
    let skips = std::fs::read_to_string(skip_log).unwrap_or_default();
    let summary = totals.finish(&skips);
    for (name, reason) in &summary.skipped {
        println!("skipped: {name}: {reason}");
    }
    println!("{}", summary.line());
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    if summary.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// What libtest printed, summed over every test binary.
#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
    /// Names of tests that reported `ok` (a name may repeat across binaries).
    ok: Vec<String>,
    /// `#[ignore]`d tests, with the reason given in the attribute when there is one.
    ignored_tests: Vec<(String, String)>,
}

/// The totals line's numbers and every skipped test with its reason.
struct Summary {
    passed: u64,
    failed: u64,
    skipped: Vec<(String, String)>,
}

impl Summary {
    /// The closing line CI parses: `tests: N passed, N failed, N skipped`.
    fn line(&self) -> String {
        format!(
            "tests: {} passed, {} failed, {} skipped",
            self.passed,
            self.failed,
            self.skipped.len()
        )
    }
}

impl Totals {
    fn line(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix("test result: ") {
            let num = |key: &str| {
                rest.split(';')
                    .find_map(|p| p.trim().strip_suffix(key).map(str::trim))
                    .and_then(|n| n.rsplit(' ').next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            self.passed += num("passed");
            self.failed += num("failed");
            self.ignored += num("ignored");
        } else if let Some(rest) = line.strip_prefix("test ") {
            if let Some(name) = rest.strip_suffix(" ... ok") {
                self.ok.push(name.to_string());
            } else if let Some((name, verdict)) = rest.split_once(" ... ignored") {
                let reason = verdict.trim_start_matches(',').trim();
                let reason = if reason.is_empty() { "#[ignore]" } else { reason };
                self.ignored_tests.push((name.to_string(), reason.to_string()));
            }
        }
    }

    /// Moves the tests that passed after skipping themselves (lines `<test>\t<reason>` of the
    /// skip log) from passed to skipped; a test that skipped and then failed stays failed.
    fn finish(mut self, skip_log: &str) -> Summary {
        let mut skipped = std::mem::take(&mut self.ignored_tests);
        // libtest prints ignored tests by name; count any it did not name all the same.
        for i in skipped.len() as u64..self.ignored {
            skipped.push((format!("ignored test {}", i + 1), "#[ignore]".to_string()));
        }
        let mut seen = std::collections::HashSet::new();
        for l in skip_log.lines() {
            let Some((name, reason)) = l.split_once('\t') else {
                continue;
            };
            if !seen.insert(name.to_string()) {
                continue;
            }
            if let Some(i) = self.ok.iter().position(|n| n == name) {
                self.ok.swap_remove(i);
                self.passed = self.passed.saturating_sub(1);
                skipped.push((name.to_string(), reason.to_string()));
            }
        }
        Summary {
            passed: self.passed,
            failed: self.failed,
            skipped,
        }
    }
}

fn output(cmd: &mut Command) -> Option<String> {
    let o = cmd.output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn setup() -> Result<()> {
    let started = Instant::now();
    // 1. The nightly toolchain itself (present on this machine kind; installed otherwise).
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        step("installing the nightly toolchain (needed to build eBPF with build-std)");
        run(Command::new("rustup").args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))?;
    }
    // 2. rust-src for nightly.
    let comps = output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", NIGHTLY]))
        .unwrap_or_default();
    if !comps.lines().any(|l| l.starts_with("rust-src")) {
        step("installing rust-src for nightly");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
    }
    // 3. bpf-linker, linked against nightly's own libLLVM, which only resolves inside the
    //    nightly toolchain's environment (where aya-build runs it).
    let linker_ok = output(Command::new("rustup").args(["run", NIGHTLY, "bpf-linker", "--version"]))
        .is_some_and(|v| v.split_whitespace().any(|w| w.starts_with(BPF_LINKER_VERSION)));
    if !linker_ok {
        install_bpf_linker()?;
    }
    step(&format!("setup complete in {:.1}s", started.elapsed().as_secs_f64()));
    Ok(())
}

fn install_bpf_linker() -> Result<()> {
    let sysroot = output(cargo_nightly_rustc().args(["--print", "sysroot"]))
        .context("cannot ask nightly rustc for its sysroot")?;
    let lib = PathBuf::from(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("read {}", lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let major = llvm
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("libLLVM.so."))
        .and_then(|v| v.split('.').next())
        .context("cannot read the LLVM major version from the library name")?
        .to_string();
    let prefix = workspace_root().join("target/xtask/llvm-prefix");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    let link = prefix_lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link).with_context(|| format!("symlink {}", link.display()))?;
    step(&format!(
        "installing bpf-linker {BPF_LINKER_VERSION} against {} (LLVM {major}); about a minute",
        llvm.display()
    ));
    run(cargo_nightly()
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            &format!("^{BPF_LINKER_VERSION}"),
        ])
        .args(["--no-default-features", "--features", &format!("llvm-{major}")])
        .env("LLVM_PREFIX", &prefix))
}

fn cargo_nightly_rustc() -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", NIGHTLY, "rustc"]);
    c
}

fn build_ebpf(root: &Path) -> Result<()> {
    setup()?;
    step("building sensor-ebpf for bpfel-unknown-none");
    let arch = env::consts::ARCH;
    let flags = format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf");
    run(bpf_cargo("build").env("CARGO_ENCODED_RUSTFLAGS", flags))?;
    let obj = root.join("target").join(BPF_TARGET).join("release/sensor");
    println!("{}", obj.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "\
running 3 tests
test qemu_fentry_and_kprobe ... ok
test manifests_validate ... ok
test slow ... ignored, needs an hour
test really_passes ... ok
test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1.00s
running 1 test
test broken ... FAILED
test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.10s
";

    fn totals() -> Totals {
        let mut t = Totals::default();
        for l in OUT.lines() {
            t.line(l);
        }
        t
    }

    #[test]
    fn self_skipped_tests_are_skipped_not_passed() {
        let log = "qemu_fentry_and_kprobe\tqemu-system-x86_64 is not installed\n\
                   manifests_validate\tvenv missing\n\
                   manifests_validate\tvenv missing\n\
                   broken\tskipped, then failed\n";
        let s = totals().finish(log);
        assert_eq!(s.line(), "tests: 1 passed, 1 failed, 3 skipped");
        let names: Vec<_> = s.skipped.iter().map(|(n, r)| format!("{n}: {r}")).collect();
        assert_eq!(
            names,
            [
                "slow: needs an hour",
                "qemu_fentry_and_kprobe: qemu-system-x86_64 is not installed",
                "manifests_validate: venv missing"
            ]
        );
    }

    #[test]
    fn without_skips_the_counts_are_libtests() {
        let s = totals().finish("");
        assert_eq!(s.line(), "tests: 3 passed, 1 failed, 1 skipped");
    }

    #[test]
    fn the_package_list_has_no_duplicates() {
        for list in [deps::DEBIAN_PACKAGES, deps::BENCH_PACKAGES, deps::DEBIAN_NO_RECOMMENDS] {
            let mut p = list.to_vec();
            p.sort_unstable();
            p.dedup();
            assert_eq!(p.len(), list.len());
        }
    }
}
