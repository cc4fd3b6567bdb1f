//! `cargo xtask bench memory` and `bench scrape`: the daemon's RSS idle, its peak, and with
//! 1,000 real workload cgroups under churn; the cost of a /metrics scrape with 1,000 active
//! workloads. node_exporter runs alongside as the anchor, measured at the same moments.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::{
    bench::stats,
    bench_kit::{
        mib, pid_cpu, rss_kib, series_count, smaps_breakdown, CgroupParent, KernelLock, Listener, Served, Workloads,
    },
    bench_report::{machine, spread, store, Goal, Row},
    net::http_get,
};

/// Bytes of anonymous memory each workload process touches (its memcg activity, with the
/// reclaim it then asks the kernel for).
const TOUCH: usize = 2 << 20;
/// The default discovery interval is 5 s: a new cgroup has a name after at most this long.
const DISCOVERY_WAIT: Duration = Duration::from_secs(6);

#[derive(clap::Args, Debug, Clone)]
#[group(id = "bench_memory_opts")]
pub struct Opts {
    /// Seconds the daemon idles before its steady RSS is read (the goal says 10 min).
    #[arg(long, default_value_t = 240.0)]
    pub idle: f64,
    /// Workload cgroups alive at once in the memory and scrape benchmarks.
    #[arg(long, default_value_t = 1000)]
    pub workloads: usize,
    /// Churn batches of `--workloads` cgroups created and removed before the last 1,000.
    #[arg(long, default_value_t = 10)]
    pub batches: usize,
    /// Scrape rounds (sensor, then node_exporter, each round).
    #[arg(long, default_value_t = 5)]
    pub scrape_rounds: usize,
    /// Scrapes per round and target.
    #[arg(long, default_value_t = 20)]
    pub scrapes: usize,
}

impl Opts {
    pub fn quick(&mut self) {
        self.idle = 15.0;
        self.workloads = 100;
        self.batches = 2;
        self.scrape_rounds = 2;
        self.scrapes = 5;
    }
}

struct Sample {
    sensor_rss: u64,
    sensor_hwm: u64,
    node_rss: u64,
}

fn sample(sensor: &Served, node: &Served) -> Result<Sample> {
    let (sensor_rss, sensor_hwm) = rss_kib(sensor.pid())?;
    Ok(Sample {
        sensor_rss,
        sensor_hwm,
        node_rss: rss_kib(node.pid())?.0,
    })
}

/// Distinct workload cgroups under `parent` that have TCP series in `metrics`.
fn workloads_seen(metrics: &str, parent: &CgroupParent) -> usize {
    let needle = format!("cgroup=\"{}/", parent.rel);
    let mut seen: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("sensor_tcp_connects_total{"))
        .filter_map(|l| {
            let i = l.find(&needle)?;
            let rest = &l[i + needle.len()..];
            rest.split('"').next()
        })
        .collect();
    seen.sort_unstable();
    seen.dedup();
    seen.len()
}

pub fn run_memory(root: &Path, sensor_bin: &Path, o: &Opts) -> Result<()> {
    // SENSOR_BENCH_SENSOR measures another build (e.g. the one before a change), as `bench tcp`.
    let other = std::env::var_os("SENSOR_BENCH_SENSOR").map(std::path::PathBuf::from);
    let sensor_bin = other.as_deref().unwrap_or(sensor_bin);
    let m = machine();
    eprintln!("==> bench memory on {m}");
    let _lock = KernelLock::acquire("bench memory")?;
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let started = Instant::now();
    let node = Served::node_exporter(&dir.join("node-exporter-memory.log"))?;
    let sensor = Served::sensor(sensor_bin, &[], &dir.join("sensor-memory.log"))?;
    let ready_after = started.elapsed().as_secs_f64();
    eprintln!(
        "==> idle {:.0} s: sensor (default config, all probes) pid {}, node_exporter pid {}",
        o.idle,
        sensor.pid(),
        node.pid()
    );
    // Idle: read every 10 s over the last third, so the steady figure is a median.
    let mut idle = Vec::new();
    let t = Instant::now();
    let mut next_print = 30.0;
    while t.elapsed().as_secs_f64() < o.idle {
        std::thread::sleep(Duration::from_secs_f64(10.0f64.min(o.idle / 3.0)));
        let e = t.elapsed().as_secs_f64();
        if e >= o.idle * 2.0 / 3.0 {
            idle.push(sample(&sensor, &node)?);
        }
        if e >= next_print {
            let s = sample(&sensor, &node)?;
            eprintln!(
                "    idle {e:.0}/{:.0} s: sensor RSS {:.1} MiB (peak {:.1}), node_exporter {:.1} MiB",
                o.idle,
                mib(s.sensor_rss),
                mib(s.sensor_hwm),
                mib(s.node_rss)
            );
            next_print += 30.0;
        }
    }
    let idle_cpu = pid_cpu(sensor.pid())?;
    let idle_maps = smaps_breakdown(sensor.pid());
    let idle_hwm = sample(&sensor, &node)?.sensor_hwm;

    let parent = CgroupParent::new("memory")?;
    let listener = Listener::start()?;
    let mut batches = Vec::new();
    let mut end_maps = Vec::new();
    for b in 1..=o.batches + 1 {
        let bt = Instant::now();
        let w = Workloads::start(&parent, &format!("b{b:02}w"), o.workloads, listener.addr, TOUCH)?;
        std::thread::sleep(DISCOVERY_WAIT);
        // A scrape, as Prometheus would make: the daemon builds the series of every workload.
        let metrics = sensor.metrics()?;
        let s = sample(&sensor, &node)?;
        if b == o.batches + 1 {
            end_maps = smaps_breakdown(sensor.pid());
        }
        let seen = workloads_seen(&metrics, &parent);
        w.remove();
        eprintln!(
            "    batch {b}/{}: {} workloads ({seen} named in TCP series), {} series; sensor RSS {:.1} MiB, node_exporter {:.1} MiB; {:.1} s",
            o.batches + 1,
            o.workloads,
            series_count(&metrics),
            mib(s.sensor_rss),
            mib(s.node_rss),
            bt.elapsed().as_secs_f64()
        );
        batches.push((s, seen, series_count(&metrics)));
    }
    drop(listener);
    drop(parent);
    let end_hwm = sample(&sensor, &node)?.sensor_hwm;
    drop(sensor);
    drop(node);

    let rows = memory_rows(o, &idle, idle_hwm, &batches);
    let mut body = memory_body(o, &idle, idle_hwm, end_hwm, idle_cpu, ready_after, &batches);
    body.push_str(&maps_table(&idle_maps, &end_maps, o.workloads));
    for r in &rows {
        eprintln!(
            "==> {}: {} (anchor {}; goal {}: {})",
            r.what, r.ours, r.anchor, r.goal, r.verdict
        );
    }
    store(root, "memory", &m, &rows, &body)
}

type Batch = (Sample, usize, usize);

fn memory_rows(o: &Opts, idle: &[Sample], idle_hwm: u64, batches: &[Batch]) -> Vec<Row> {
    let med = |v: Vec<f64>| stats(v).1;
    let idle_rss = med(idle.iter().map(|s| mib(s.sensor_rss)).collect());
    let node_idle = med(idle.iter().map(|s| mib(s.node_rss)).collect());
    let last = batches.last();
    let churned = o.batches * o.workloads;
    let rss_at = |i: usize| batches.get(i).map_or(f64::NAN, |b| mib(b.0.sensor_rss));
    let growth = rss_at(o.batches.saturating_sub(1)) - rss_at(1.min(o.batches.saturating_sub(1)));
    vec![
        Row::measured(
            &format!("steady RSS, all probes, default config, after {:.0} s idle", o.idle),
            idle_rss,
            " MiB",
            1,
            &format!("node_exporter {node_idle:.1} MiB"),
            Goal::AtMost(20.0),
            "≤ 20 MB (after 10 min)",
        ),
        Row::measured(
            "peak RSS (VmHWM) from start, idle",
            mib(idle_hwm),
            " MiB",
            1,
            "-",
            Goal::AtMost(40.0),
            "≤ 40 MB",
        ),
        Row::measured(
            &format!(
                "RSS with {} workload cgroups (TCP + memcg) after {churned} created and removed",
                o.workloads
            ),
            last.map_or(f64::NAN, |b| mib(b.0.sensor_rss)),
            " MiB",
            1,
            &format!("node_exporter {:.1} MiB", last.map_or(f64::NAN, |b| mib(b.0.node_rss))),
            Goal::AtMost(30.0),
            "≤ 30 MB",
        ),
        Row::measured(
            &format!(
                "RSS growth from batch 2 to batch {} of {} workloads",
                o.batches, o.workloads
            ),
            growth,
            " MiB",
            1,
            "-",
            Goal::AtMost(1.0),
            "no growth (≤ 1 MiB)",
        ),
    ]
}

fn memory_body(
    o: &Opts,
    idle: &[Sample],
    idle_hwm: u64,
    end_hwm: u64,
    idle_cpu: f64,
    ready_after: f64,
    batches: &[Batch],
) -> String {
    let col = |f: &dyn Fn(&Sample) -> f64| idle.iter().map(f).collect::<Vec<f64>>();
    let mut t = format!(
        "The daemon runs `sensor run` with its default configuration (every probe attached, cgroup discovery \
         every 5 s), Debian's `prometheus-node-exporter` with its default collectors next to it as the anchor; \
         both were started together (the sensor was ready {ready_after:.1} s after start). VmRSS and VmHWM come from \
         /proc/PID/status.\n\n\
         **Idle.** {idle_s:.0} s without load (the issue's goal is after 10 min: `--idle 600`); RSS read every 10 s \
         over the last third: sensor {s} MiB, node_exporter {n} MiB (median, min-max). Peak (VmHWM) from start \
         {hwm:.1} MiB after the idle period, {end:.1} MiB at the end of the run. CPU over the idle period \
         (start-up included) {cpu:.2} s.\n\n\
         **Churn.** {b1} batches of {w} workload cgroups, each a memory cgroup of its own under a uniquely named \
         parent (`sensor-bench-memory-PID`) holding one live process forked by xtask that joined it, made one \
         loopback TCP connect (to a listener in xtask) and touched {touch} MiB of anonymous memory, then made the \
         kernel reclaim in its cgroup (it writes `memory.force_empty` on v1, `memory.reclaim` on v2: real memcg \
         reclaim in the workload's own context, which the memcg probe times and attributes to it). After {wait:.0} s (one discovery interval) one /metrics scrape, as \
         Prometheus would make, then RSS; then every process is killed and its cgroup removed, and the next batch \
         starts. The last batch stays while RSS is read: that is the row \"RSS with {w} workload cgroups after {c} \
         created and removed\"; growth compares batch 2 with batch {b}. Series of removed cgroups stay for the \
         default `limits.vanished_grace` (15 min), up to `limits.workloads_per_metric` (1,000) workloads per \
         family, the rest folded into `cgroup=\"other\"`: that is part of what is measured. A removed workload \
         folded into `other` keeps no state: its kernel map keys are retired into `other` at the next rescan \
         (`sensor_workload_keys_retired_total`) and discovery forgets its id at the one after.\n\n\
         | batch | workloads named in TCP series | series in the scrape | sensor VmRSS MiB | sensor VmHWM MiB | node_exporter VmRSS MiB |\n\
         |---|---|---|---|---|---|\n",
        idle_s = o.idle,
        s = spread(&col(&|s| mib(s.sensor_rss)), 1, ""),
        n = spread(&col(&|s| mib(s.node_rss)), 1, ""),
        hwm = mib(idle_hwm),
        end = mib(end_hwm),
        cpu = idle_cpu,
        b1 = o.batches + 1,
        w = o.workloads,
        touch = TOUCH >> 20,
        wait = DISCOVERY_WAIT.as_secs_f64(),
        c = o.batches * o.workloads,
        b = o.batches,
    );
    for (i, (s, seen, series)) in batches.iter().enumerate() {
        t.push_str(&format!(
            "| {}{} | {seen} | {series} | {:.1} | {:.1} | {:.1} |\n",
            i + 1,
            if i == o.batches { " (kept)" } else { "" },
            mib(s.sensor_rss),
            mib(s.sensor_hwm),
            mib(s.node_rss)
        ));
    }
    t.push_str(&format!(
        "\nReproduce: `cargo xtask bench memory --idle {} --workloads {} --batches {}` (as root; holds \
         {lock} while it runs). Logs in `target/bench/`.\n",
        o.idle,
        o.workloads,
        o.batches,
        lock = crate::bench_kit::KERNEL_LOCK_FILE
    ));
    t
}

// ---------------------------------------------------------------------------------------------
// Scrape

/// One round's scrapes of one target: latencies (s), CPU of the target's process net of its
/// idle rate, series and bytes of the last body.
struct Scrapes {
    latencies: Vec<f64>,
    cpu: f64,
    series: usize,
    bytes: usize,
}

impl Scrapes {
    fn per_series_us(&self) -> f64 {
        1e6 * self.cpu / (self.latencies.len() * self.series.max(1)) as f64
    }
}

fn scrape_round(target: &Served, n: usize) -> Result<Scrapes> {
    // The target's idle CPU rate over one second, subtracted from the scrape window.
    let (c0, t0) = (pid_cpu(target.pid())?, Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let idle_rate = (pid_cpu(target.pid())? - c0) / t0.elapsed().as_secs_f64();
    let (c1, t1) = (pid_cpu(target.pid())?, Instant::now());
    let mut latencies = Vec::with_capacity(n);
    let mut body = String::new();
    for _ in 0..n {
        let t = Instant::now();
        let (status, b) = http_get(target.addr, "/metrics")?;
        latencies.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(status == 200, "/metrics answered {status}");
        body = b;
    }
    let cpu = (pid_cpu(target.pid())? - c1 - idle_rate * t1.elapsed().as_secs_f64()).max(0.0);
    Ok(Scrapes {
        latencies,
        cpu,
        series: series_count(&body),
        bytes: body.len(),
    })
}

pub fn run_scrape(root: &Path, sensor_bin: &Path, o: &Opts) -> Result<()> {
    let m = machine();
    eprintln!("==> bench scrape on {m}");
    let _lock = KernelLock::acquire("bench scrape")?;
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let node = Served::node_exporter(&dir.join("node-exporter-scrape.log"))?;
    let sensor = Served::sensor(sensor_bin, &[], &dir.join("sensor-scrape.log"))?;
    std::thread::sleep(DISCOVERY_WAIT);
    let before = series_count(&sensor.metrics()?);
    let parent = CgroupParent::new("scrape")?;
    let listener = Listener::start()?;
    eprintln!("==> starting {} workloads", o.workloads);
    let w = Workloads::start(&parent, "w", o.workloads, listener.addr, TOUCH)?;
    std::thread::sleep(DISCOVERY_WAIT);
    let warm = sensor.metrics()?;
    // Kept for a closer look at what the series are made of.
    let _ = std::fs::write(dir.join("scrape-sensor.txt"), &warm);
    let families = families(&warm);
    let seen = workloads_seen(&warm, &parent);
    let after = series_count(&warm);
    eprintln!(
        "==> {seen} of {} workloads named in TCP series; {before} series before, {after} with them",
        o.workloads
    );
    let mut rounds = Vec::new();
    for r in 1..=o.scrape_rounds {
        let s = scrape_round(&sensor, o.scrapes)?;
        let n = scrape_round(&node, o.scrapes)?;
        eprintln!(
            "    round {r}/{}: sensor {} series, median {:.1} ms, {:.3} µs CPU/series; node_exporter {} series, {:.1} ms, {:.3} µs/series",
            o.scrape_rounds,
            s.series,
            1e3 * stats(s.latencies.clone()).1,
            s.per_series_us(),
            n.series,
            1e3 * stats(n.latencies.clone()).1,
            n.per_series_us()
        );
        rounds.push((s, n));
    }
    // Where a scrape's time goes: one more round of back-to-back scrapes, profiled.
    let profile = crate::bench_events::profile_during(sensor.pid(), || scrape_round(&sensor, o.scrapes).map(|_| ()));
    let removed = w.remove();
    drop(listener);
    drop(parent);
    drop(sensor);
    drop(node);
    anyhow::ensure!(
        removed == o.workloads,
        "{removed} of {} workload processes were still alive",
        o.workloads
    );

    let per_workload = (after as f64 - before as f64) / o.workloads as f64;
    let (rows, mut body) = scrape_report(o, &rounds, before, after, seen, per_workload);
    body.push_str(&families_table(&families, o.workloads));
    match profile {
        Ok(p) => body.push_str(&crate::bench_events::profile_table_during(
            &p,
            "in a scrape",
            &format!("during {} more back-to-back scrapes", o.scrapes),
        )),
        Err(e) => eprintln!("==> no scrape profile: {e:#}"),
    }
    for r in &rows {
        eprintln!(
            "==> {}: {} (anchor {}; goal {}: {})",
            r.what, r.ours, r.anchor, r.goal, r.verdict
        );
    }
    store(root, "scrape", &m, &rows, &body)
}

fn scrape_report(
    o: &Opts,
    rounds: &[(Scrapes, Scrapes)],
    before: usize,
    after: usize,
    seen: usize,
    per_workload: f64,
) -> (Vec<Row>, String) {
    let all = |f: &dyn Fn(&(Scrapes, Scrapes)) -> &Scrapes| {
        rounds
            .iter()
            .flat_map(|r| f(r).latencies.iter().map(|l| l * 1e3))
            .collect::<Vec<f64>>()
    };
    let per =
        |f: &dyn Fn(&(Scrapes, Scrapes)) -> &Scrapes| rounds.iter().map(|r| f(r).per_series_us()).collect::<Vec<f64>>();
    let (s_lat, n_lat) = (all(&|r| &r.0), all(&|r| &r.1));
    let (s_per, n_per) = (per(&|r| &r.0), per(&|r| &r.1));
    let ratio: Vec<f64> = rounds
        .iter()
        .map(|(s, n)| s.per_series_us() / n.per_series_us())
        .collect();
    let s_series = rounds.last().map_or(0, |r| r.0.series);
    let n_series = rounds.last().map_or(0, |r| r.1.series);
    let rows = vec![
        Row::measured(
            &format!(
                "series per workload with TCP and memcg activity ({after} - {before}) / {}",
                o.workloads
            ),
            per_workload,
            "",
            1,
            "-",
            Goal::AtMost(20.0),
            "≤ 20",
        ),
        Row::measured(
            &format!("/metrics scrape, {} active workloads, median latency", o.workloads),
            stats(s_lat.clone()).1,
            " ms",
            1,
            &format!("node_exporter {:.1} ms ({n_series} series)", stats(n_lat.clone()).1),
            Goal::AtMost(20.0),
            "≤ 20 ms",
        ),
        Row::measured(
            "daemon CPU per series per scrape",
            stats(s_per.clone()).1,
            " µs",
            3,
            &format!(
                "node_exporter {:.3} µs (sensor/node_exporter {:.2})",
                stats(n_per.clone()).1,
                stats(ratio.clone()).1
            ),
            Goal::AtMost(0.5),
            "≤ 0.5 µs",
        ),
    ];
    let mut t = format!(
        "Sensor (default configuration, all probes) and node_exporter (default collectors) on the same host. \
         {w} workload cgroups as in the memory benchmark (each: a live process that made one loopback connect, \
         2 MiB of anonymous memory, memcg reclaim in its own context), {seen} of them named in the sensor's TCP series \
         after one discovery interval. Series = non-comment lines of the exposition: {before} before the \
         workloads, {after} with them ({s_series} at the last round, {bytes} bytes).\n\n\
         {r} rounds; each round scrapes the sensor {n} times back to back, then node_exporter {n} times. \
         Latency = request to last byte (HTTP/1.0, loopback, no compression). CPU per series = utime + stime \
         of the target's process over the round (/proc/PID/stat, 10 ms ticks) minus its idle rate measured in the \
         second before, / (scrapes × series). The ratio is taken per round.\n\n\
         | | min | median | max |\n|---|---|---|---|\n",
        w = o.workloads,
        bytes = rounds.last().map_or(0, |r| r.0.bytes),
        r = o.scrape_rounds,
        n = o.scrapes,
    );
    let line = |label: &str, v: Vec<f64>, d: usize| {
        let (a, b, c) = stats(v);
        format!("| {label} | {a:.d$} | {b:.d$} | {c:.d$} |\n")
    };
    t.push_str(&line("sensor: scrape latency, ms (all scrapes)", s_lat, 1));
    t.push_str(&line("node_exporter: scrape latency, ms (all scrapes)", n_lat, 1));
    t.push_str(&line("sensor: CPU per series, µs (per round)", s_per, 3));
    t.push_str(&line("node_exporter: CPU per series, µs (per round)", n_per, 3));
    t.push_str(&line("**sensor / node_exporter, CPU per series**", ratio, 2));
    t.push_str(&format!(
        "\nnode_exporter exposes {n_series} series here. Reproduce: `cargo xtask bench scrape --workloads {} \
         --scrape-rounds {} --scrapes {}`.\n",
        o.workloads, o.scrape_rounds, o.scrapes
    ));
    (rows, t)
}

/// Series per metric family (histogram `_bucket`, `_sum` and `_count` count for their family),
/// largest first.
fn families(text: &str) -> Vec<(String, usize)> {
    let mut m: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for l in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let name = l.split(['{', ' ']).next().unwrap_or("");
        let fam = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        *m.entry(fam.to_string()).or_default() += 1;
    }
    let mut v: Vec<(String, usize)> = m.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// What the series are made of: the families with the most series.
fn families_table(f: &[(String, usize)], workloads: usize) -> String {
    let total: usize = f.iter().map(|x| x.1).sum();
    let mut t = format!(
        "\nWhat the {total} series of the sensor's scrape with {workloads} workloads are (families with at least 10 \
         series; a histogram's buckets, sum and count count for its family):\n\n\
         | family | series | share |\n|---|---|---|\n"
    );
    for (name, n) in f.iter().filter(|x| x.1 >= 10) {
        t.push_str(&format!(
            "| `{name}` | {n} | {:.1}% |\n",
            100.0 * *n as f64 / total.max(1) as f64
        ));
    }
    t
}

/// Where the resident memory is, idle and with the last batch of workloads.
fn maps_table(idle: &[(String, u64)], end: &[(String, u64)], workloads: usize) -> String {
    let mut t = format!(
        "\nWhere the sensor's resident memory is (/proc/PID/smaps, Rss summed per mapping kind), idle and with the \
         last {workloads} workloads:\n\n| mapping | idle MiB | with workloads MiB |\n|---|---|---|\n"
    );
    let mut names: Vec<&str> = idle
        .iter()
        .chain(end)
        .filter(|x| x.1 >= 256)
        .map(|x| x.0.as_str())
        .collect();
    names.dedup();
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(*n));
    let get = |v: &[(String, u64)], n: &str| v.iter().find(|x| x.0 == n).map_or(0, |x| x.1);
    for n in names {
        t.push_str(&format!(
            "| {n} | {:.1} | {:.1} |\n",
            mib(get(idle, n)),
            mib(get(end, n))
        ));
    }
    t
}
