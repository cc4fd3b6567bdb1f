//! `cargo xtask fuzz`: builds the cargo-fuzz targets of sensor/fuzz and runs each for a bounded
//! time, with a progress line every few seconds and a summary (executions, coverage gained,
//! crashes). Exits non-zero when any target crashed; the input is kept for a regression test.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo_nightly, run, step};

/// Every fuzz target, in the order they run (`sensor/fuzz/fuzz_targets/<name>.rs`, seeds in
/// `sensor/fuzz/corpus/<name>/`).
pub const TARGETS: &[&str] = &[
    "decode_record",
    "config_yaml",
    "web_config",
    "ws_gauges",
    "http_query",
    "tracefs_format",
    "cgroup_workload",
    "journal_reader",
];

const FUZZ_DIR: &str = "sensor/fuzz";
/// Inside the workspace's target dir (no second tree elsewhere); nightly + coverage
/// instrumentation makes it a build of its own.
const TARGET_DIR: &str = "target/fuzz";
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

#[derive(clap::Args)]
pub struct Opts {
    /// Seconds each target runs.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Run only these targets (repeatable); default: all.
    #[arg(long = "target")]
    pub targets: Vec<String>,
    /// Libfuzzer's per-input time limit in seconds: a slower input counts as a crash (a hang).
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    /// Only build the targets (CI builds them in the background while the tests run).
    #[arg(long)]
    pub build_only: bool,
    /// Targets fuzzed at once (each is one single-threaded libFuzzer process); default: one per
    /// CPU.
    #[arg(long)]
    pub jobs: Option<usize>,
}

/// What one target's run showed.
#[derive(Debug, Default, Clone, PartialEq)]
struct Outcome {
    execs: u64,
    cov_start: Option<u64>,
    cov_end: Option<u64>,
    new_units: u64,
    /// libFuzzer's executions per second.
    rate: u64,
    /// How long it ran (less than asked when it crashed).
    secs: u64,
    /// The input that crashed it (libFuzzer's artifact), with the kind of crash.
    crash: Option<(String, String)>,
    last_status: Option<String>,
}

pub fn run_all(root: &Path, opts: &Opts) -> Result<()> {
    let targets: Vec<&str> = if opts.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in &opts.targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!("unknown fuzz target {t} (known: {})", TARGETS.join(", "));
            }
        }
        TARGETS
            .iter()
            .copied()
            .filter(|t| opts.targets.iter().any(|o| o == t))
            .collect()
    };
    crate::deps::cargo_fuzz()?;
    build(&targets)?;
    if opts.build_only {
        return Ok(());
    }
    let jobs = opts
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let mut results = Vec::new();
    for batch in targets.chunks(jobs) {
        step(&format!("fuzzing {} for {} s", batch.join(", "), opts.seconds));
        let outcomes: Vec<Result<Outcome>> = std::thread::scope(|s| {
            let runs: Vec<_> = batch.iter().map(|t| s.spawn(move || fuzz_one(root, t, opts))).collect();
            runs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("the fuzzing thread panicked")))
                })
                .collect()
        });
        for (t, o) in batch.iter().zip(outcomes) {
            let o = o?;
            if let Some((kind, input)) = &o.crash {
                eprintln!("==> {t}: {kind}, input kept at {input}");
            }
            results.push((*t, o));
        }
    }
    println!(
        "{:<16} {:>6} {:>12} {:>9} {:>14} {:>9}  crash",
        "target", "secs", "execs", "exec/s", "coverage", "new"
    );
    let mut crashed = Vec::new();
    for (t, o) in &results {
        let cov = match (o.cov_start, o.cov_end) {
            (Some(a), Some(b)) => format!("{a}->{b}"),
            _ => "-".into(),
        };
        let crash = o
            .crash
            .as_ref()
            .map_or_else(|| "none".to_string(), |(k, p)| format!("{k} {p}"));
        println!(
            "{t:<16} {:>6} {:>12} {:>9} {cov:>14} {:>9}  {crash}",
            o.secs, o.execs, o.rate, o.new_units
        );
        if o.crash.is_some() {
            crashed.push(*t);
        }
    }
    if !crashed.is_empty() {
        bail!("fuzz targets crashed: {} (replay an input with the target binary in {TARGET_DIR}/{TRIPLE}/release/, then add a regression test)", crashed.join(", "));
    }
    Ok(())
}

/// `cargo fuzz build` of the targets: release with debug assertions (overflow checks on), no
/// sanitizer: the crate's unsafe code is a few checked Pod reads, and on a small machine ASan's
/// halved throughput and std rebuild cost more than they find in safe Rust.
fn build(targets: &[&str]) -> Result<()> {
    step("building the fuzz targets (nightly, cargo fuzz)");
    let all = targets.len() == TARGETS.len();
    let mut cmd = cargo_nightly();
    // As for every cargo xtask starts: cargo's own variables would make build scripts rerun.
    crate::remove_cargo_run_env(&mut cmd);
    cmd.args(["fuzz", "build", "--fuzz-dir", FUZZ_DIR, "--target-dir", TARGET_DIR])
        .args(["--sanitizer", "none", "--codegen-units", "16"]);
    if all || targets.len() > 1 {
        run(&mut cmd)
    } else {
        run(cmd.arg(targets[0]))
    }
}

fn binary(root: &Path, target: &str) -> PathBuf {
    root.join(TARGET_DIR).join(TRIPLE).join("release").join(target)
}

fn fuzz_one(root: &Path, target: &str, opts: &Opts) -> Result<Outcome> {
    // New inputs go to a scratch corpus under target/; the seeds in the repo stay as they are.
    let work = root.join(TARGET_DIR).join("corpus").join(target);
    let artifacts = root.join(TARGET_DIR).join("artifacts").join(target);
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(&artifacts)?;
    let seeds = root.join(FUZZ_DIR).join("corpus").join(target);
    let mut cmd = Command::new(binary(root, target));
    cmd.arg(format!("-max_total_time={}", opts.seconds))
        .arg(format!("-timeout={}", opts.timeout))
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&work);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let mut o = Outcome::default();
    let started = Instant::now();
    let mut shown = Instant::now();
    let mut tail: Vec<String> = Vec::new();
    let mut panic_lines = 0;
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).lines() {
            let line = line?;
            o.line(&line);
            if shown.elapsed() >= Duration::from_secs(10) {
                shown = Instant::now();
                if let Some(s) = &o.last_status {
                    eprintln!("    {target} {:>4}s  {s}", started.elapsed().as_secs());
                }
            }
            if line.contains("panicked at") {
                panic_lines = 3;
            }
            if panic_lines > 0 {
                panic_lines -= 1;
                eprintln!("    {target}: {line}");
            }
            tail.push(line);
            if tail.len() > 60 {
                tail.remove(0);
            }
        }
    }
    let status = child.wait()?;
    o.secs = started.elapsed().as_secs();
    if !status.success() && o.crash.is_none() {
        // Died without naming an input (e.g. the harness could not start): show why.
        eprintln!("{}", tail.join("\n"));
        o.crash = Some((format!("exit {status}"), "no input written".into()));
    } else if o.crash.is_some() {
        eprintln!("{}", tail.join("\n"));
    }
    Ok(o)
}

impl Outcome {
    /// Reads one line of libFuzzer's stderr.
    fn line(&mut self, line: &str) {
        let num_after = |key: &str| {
            line.split_once(key)
                .and_then(|(_, r)| r.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
        };
        if let Some(rest) = line.strip_prefix("stat::number_of_executed_units:") {
            self.execs = rest.trim().parse().unwrap_or(self.execs);
        } else if let Some(rest) = line.strip_prefix("stat::average_exec_per_sec:") {
            self.rate = rest.trim().parse().unwrap_or(self.rate);
        } else if let Some(rest) = line.strip_prefix("stat::new_units_added:") {
            self.new_units = rest.trim().parse().unwrap_or(self.new_units);
        } else if line.starts_with('#') && line.contains(" cov: ") {
            let cov = num_after(" cov: ");
            if line.contains("INITED") {
                self.cov_start = cov;
            }
            if cov.is_some() {
                self.cov_end = cov;
            }
            if let Some(n) = line[1..].split_whitespace().next().and_then(|n| n.parse().ok()) {
                self.execs = n;
            }
            self.last_status = line.split_once(' ').map(|(n, r)| format!("{n} {}", r.trim()));
        } else if let Some((_, path)) = line.split_once("Test unit written to ") {
            let kind = if path.contains("/timeout-") {
                "timeout"
            } else if path.contains("/oom-") {
                "out of memory"
            } else {
                "crash"
            };
            self.crash = Some((kind.to_string(), path.trim().to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzers_progress_and_stats() {
        let mut o = Outcome::default();
        for l in [
            "INFO: Seed: 42",
            "#2\tINITED cov: 120 ft: 130 corp: 3/1Kb exec/s: 0 rss: 40Mb",
            "#1024\tpulse  cov: 150 ft: 200 corp: 9/3Kb lim: 14 exec/s: 512 rss: 41Mb",
            "#4096\tNEW    cov: 155 ft: 210 corp: 10/3Kb lim: 38 exec/s: 600 rss: 41Mb L: 5/9 MS: 1 ChangeBit-",
            "stat::number_of_executed_units: 5000",
            "stat::average_exec_per_sec: 900",
            "stat::new_units_added: 7",
        ] {
            o.line(l);
        }
        assert_eq!(
            (o.cov_start, o.cov_end, o.execs, o.new_units),
            (Some(120), Some(155), 5000, 7)
        );
        assert_eq!(o.crash, None);
        o.line("artifact_prefix='/t/'; Test unit written to /t/crash-abc");
        assert_eq!(o.crash, Some(("crash".into(), "/t/crash-abc".into())));
        o.line("artifact_prefix='/t/'; Test unit written to /t/timeout-abc");
        assert_eq!(o.crash.map(|c| c.0), Some("timeout".into()));
    }

    #[test]
    fn every_target_has_a_source_and_seeds() {
        let root = crate::workspace_root();
        for t in TARGETS {
            assert!(
                root.join(FUZZ_DIR)
                    .join("fuzz_targets")
                    .join(format!("{t}.rs"))
                    .is_file(),
                "{t}"
            );
            let seeds = std::fs::read_dir(root.join(FUZZ_DIR).join("corpus").join(t)).map_or(0, Iterator::count);
            assert!(seeds > 0, "{t} has no seed corpus");
        }
    }
}
