//! `cargo xtask bench`: every benchmark in its own file, the kit they share (the kernel lock,
//! /proc readings, served daemons, statistics) and the report they write (docs/benchmarks.md,
//! docs/bench-results.json). Imports run one way: a benchmark uses `kit` and `report`; `report`
//! uses `kit`; `kit` uses neither.

pub mod checks;
pub mod events;
pub mod kit;
pub mod memory;
pub mod report;
pub mod scrape;
pub mod tcp;
pub mod workloads;

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, Result};

use crate::{build_release, deps, image, setup, step};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// Connect-rate overhead vs. baseline and bpftrace.
    Tcp,
    /// Synthetic HTTP checks vs. blackbox_exporter, RSS with 1,000 checks.
    Checks,
    /// Daemon RSS idle, peak, with 1,000 workloads after 10,000 created and removed.
    Memory,
    /// /metrics with 1,000 active workloads vs. node_exporter's per-series cost.
    Scrape,
    /// Userspace CPU per kernel event (connect-failure storm).
    Events,
    /// OOM kill -> /api/v1/events, `sensor events` stdout and /metrics.
    OomLatency,
    /// Workload names from podman and a private containerd: lookup latency per runtime, daemon
    /// CPU per lookup, memory per cached name, share of kills named in a container churn.
    Workloads,
    /// Every benchmark above, in this order.
    All,
    /// Runs nothing: writes docs/benchmarks.md again from docs/bench-results.json (after a merge
    /// of two branches' results).
    Report,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Benchmarks to run (default: all).
    #[arg(value_enum)]
    pub what: Vec<Which>,
    /// Smoke run: every duration and count cut to seconds (the numbers mean little); writes
    /// target/bench/benchmarks-quick.md, never docs/.
    #[arg(long)]
    pub quick: bool,
    #[command(flatten)]
    pub tcp: tcp::Opts,
    #[command(flatten)]
    pub checks: checks::Opts,
    #[command(flatten)]
    pub memory: memory::Opts,
    #[command(flatten)]
    pub events: events::Opts,
    #[command(flatten)]
    pub workloads: workloads::Opts,
}

/// `cargo xtask bench`: installs the anchors, builds the daemon, runs each benchmark asked for.
pub fn run(root: &Path, mut a: BenchArgs) -> Result<()> {
    if a.what == [Which::Report] {
        return report::rerender(root);
    }
    let mut what = a.what.clone();
    if what.is_empty() || what.contains(&Which::All) {
        what = vec![
            Which::Tcp,
            Which::Checks,
            Which::Memory,
            Which::Scrape,
            Which::Events,
            Which::OomLatency,
            Which::Workloads,
        ];
    }
    if a.quick {
        report::set_quick();
        a.tcp.quick();
        a.checks.quick();
        a.memory.quick();
        a.events.quick();
        a.workloads.quick();
    }
    deps::install_bench().context("installing what the benchmarks compare against")?;
    setup()?;
    // SENSOR_BENCH_SENSOR measures another build (e.g. main's, for a before/after) instead.
    let bin = match std::env::var_os("SENSOR_BENCH_SENSOR") {
        Some(b) => PathBuf::from(b),
        None => build_release(root)?,
    };
    let static_bin = if what.contains(&Which::Checks) && a.checks.with_static {
        image::dist(root, &root.join("target/dist/amd64"), image::Arch::Amd64)?
            .into_iter()
            .next()
    } else {
        None
    };
    let started = Instant::now();
    for (i, w) in what.iter().enumerate() {
        step(&format!(
            "bench {}/{}: {w:?} ({:.0} s into the run)",
            i + 1,
            what.len(),
            started.elapsed().as_secs_f64()
        ));
        match w {
            Which::Tcp => tcp::run(root, &a.tcp)?,
            // The static build (musl, what the image ships) in the same rounds, next to glibc's.
            Which::Checks => checks::run(root, &bin, static_bin.as_deref(), &a.checks)?,
            Which::Memory => memory::run_memory(root, &bin, &a.memory)?,
            Which::Scrape => scrape::run_scrape(root, &bin, &a.memory)?,
            Which::Events => events::run_events(root, &bin, &a.events)?,
            Which::OomLatency => events::run_oom(root, &bin, &a.events)?,
            Which::Workloads => workloads::run(root, &bin, &a.workloads)?,
            Which::All | Which::Report => {}
        }
    }
    step(&format!(
        "benchmarks done in {:.0} s; report: {}",
        started.elapsed().as_secs_f64(),
        if a.quick {
            "target/bench/benchmarks-quick.md"
        } else {
            report::REPORT
        }
    ));
    Ok(())
}
