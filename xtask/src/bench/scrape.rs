//! `cargo xtask bench scrape`: the cost of a /metrics scrape with 1,000 (and 5,000) live
//! workloads, side by side with node_exporter in the same run (issues 17 and 29).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::{
    bench::kit::stats,
    bench::kit::{pid_cpu, series_count, Listener, Served, Workloads},
    bench::memory::{workloads_seen, Opts, DISCOVERY_WAIT, TOUCH},
    bench::report::Bench,
    bench::report::{store, Goal, Row},
    net::http_get,
};

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

/// Bytes of anonymous memory each workload of the scrape benchmark's second phase touches:
/// thousands of processes at 2 MiB each would crowd a shared machine; the scrape does not
/// depend on it.
const SCALE_TOUCH: usize = 64 << 10;

/// `rounds` rounds of `n` scrapes of each target, sensor first.
fn scrape_rounds(
    sensor: &Served,
    node: &Served,
    rounds: usize,
    n: usize,
    what: &str,
) -> Result<Vec<(Scrapes, Scrapes)>> {
    let mut out = Vec::new();
    for r in 1..=rounds {
        let s = scrape_round(sensor, n)?;
        let nd = scrape_round(node, n)?;
        eprintln!(
            "    {what} round {r}/{rounds}: sensor {} series, median {:.1} ms, {:.3} µs CPU/series; node_exporter {} series, {:.1} ms, {:.3} µs/series",
            s.series,
            1e3 * stats(s.latencies.clone()).1,
            s.per_series_us(),
            nd.series,
            1e3 * stats(nd.latencies.clone()).1,
            nd.per_series_us()
        );
        out.push((s, nd));
    }
    Ok(out)
}

pub fn run_scrape(root: &Path, sensor_bin: &Path, o: &Opts) -> Result<()> {
    // Held to the end: the kernel lock.
    let bench = Bench::start(root, "scrape")?;
    let (m, dir) = (bench.machine.clone(), bench.dir.clone());
    let node = Served::node_exporter(&dir.join("node-exporter-scrape.log"))?;
    let sensor = Served::sensor(sensor_bin, &[], &dir.join("sensor-scrape.log"))?;
    std::thread::sleep(DISCOVERY_WAIT);
    let before = series_count(&sensor.metrics()?);
    let parent = crate::bench::kit::bench_cgroup("scrape")?;
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
    let gz = gzip_cost(&warm)?;
    let rounds = scrape_rounds(&sensor, &node, o.scrape_rounds, o.scrapes, "")?;
    // Where a scrape's time goes: one more round of back-to-back scrapes, profiled.
    let profile = crate::bench::events::profile_during(sensor.pid(), || scrape_round(&sensor, o.scrapes).map(|_| ()));
    let scaled = if o.scale_workloads > o.workloads {
        let more = o.scale_workloads - o.workloads;
        eprintln!("==> starting {more} more workloads");
        let x = Workloads::start(&parent, "x", more, listener.addr, SCALE_TOUCH)?;
        std::thread::sleep(DISCOVERY_WAIT);
        let r = scrape_rounds(&sensor, &node, o.scrape_rounds.min(3), o.scrapes, "scaled")?;
        let removed = x.remove();
        anyhow::ensure!(
            removed == more,
            "{removed} of {more} workload processes were still alive"
        );
        Some(r)
    } else {
        None
    };
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
    let (mut rows, mut body) = scrape_report(o, &rounds, before, after, seen, per_workload);
    if let Some(r) = &scaled {
        let (more_rows, t) = scaled_report(o, r);
        rows.extend(more_rows);
        body.push_str(&t);
    }
    body.push_str(&families_table(&families, o.workloads));
    match profile {
        Ok(p) => body.push_str(&crate::bench::events::profile_table_during(
            &p,
            "in a scrape",
            &format!("during {} more back-to-back scrapes", o.scrapes),
        )),
        Err(e) => eprintln!("==> no scrape profile: {e:#}"),
    }
    body.push_str(SCRAPE_PATH);
    body.push_str(&format!(
        "\ngzip: the {}-byte exposition with {} workloads compresses to {} bytes ({:.0}x) in {:.2} ms at flate2's \
         fastest level (as `/metrics` does it; best of 5, in xtask). On loopback that would save only the copy into \
         the socket (`__writev` in the profile above), so the sensor answers gzip only to clients on other hosts, \
         where it cuts the bytes on the wire; the rounds above are uncompressed.\n",
        gz.0,
        o.workloads,
        gz.1,
        gz.0 as f64 / gz.1.max(1) as f64,
        gz.2 * 1e3
    ));
    for r in &rows {
        eprintln!(
            "==> {}: {} (anchor {}; goal {}: {})",
            r.what, r.ours, r.anchor, r.goal, r.verdict
        );
    }
    store(root, "scrape", &m, &rows, &body)
}

/// Bytes in, bytes out and the best of 5 times (s) to gzip `text` as `/metrics` does.
fn gzip_cost(text: &str) -> Result<(usize, usize, f64)> {
    use std::io::Write as _;
    let mut best = f64::INFINITY;
    let mut out = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(text.as_bytes())?;
        out = e.finish()?.len();
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok((text.len(), out, best))
}

/// What a scrape does since issue 29, for the report.
const SCRAPE_PATH: &str = "\nWhat a scrape does (issue 29): it reads no per-workload file. The memcg probe's \
     memory.events values (cgroup v1: memory.failcnt, memory.memsw.failcnt, memory.oom_control; v2 also \
     memory.pressure) are read by the discovery loop on a blocking thread after each rescan and rendered from \
     that snapshot (`sensor_memcg_cache_age_seconds`, at most `probes.memcg.discovery_interval` (5 s) plus one \
     refresh old); that background work is in the CPU figures above when it fell inside a round. The files a \
     scrape still reads are /proc/pressure/memory (the host's PSI totals, exact at scrape time) and the \
     process collector's /proc/self files, as node_exporter's own process metrics do. Exposition text is \
     written into buffers kept from one scrape to the next, with each workload's label text rendered once and \
     kept until its names change.\n";

/// The ratios to node_exporter (issue 29's goals) and the figures with `--scale-workloads`.
fn ratio_rows(label: &str, rounds: &[(Scrapes, Scrapes)], goals: bool) -> Vec<Row> {
    let lat = |f: &dyn Fn(&(Scrapes, Scrapes)) -> &Scrapes| {
        stats(
            rounds
                .iter()
                .flat_map(|r| f(r).latencies.iter().map(|l| l * 1e3))
                .collect(),
        )
        .1
    };
    let (s_lat, n_lat) = (lat(&|r| &r.0), lat(&|r| &r.1));
    let cpu_ratio = stats(
        rounds
            .iter()
            .map(|(s, n)| s.per_series_us() / n.per_series_us())
            .collect(),
    )
    .1;
    let (lat_goal, cpu_goal) = if goals {
        (Goal::AtMost(2.0), Goal::AtMost(0.05))
    } else {
        (Goal::None, Goal::None)
    };
    let series = rounds.last().map_or((0, 0), |r| (r.0.series, r.1.series));
    vec![
        Row::measured(
            &format!("{label}: median scrape latency, sensor / node_exporter"),
            s_lat / n_lat,
            "",
            2,
            &format!(
                "sensor {s_lat:.1} ms ({} series), node_exporter {n_lat:.1} ms ({} series)",
                series.0, series.1
            ),
            lat_goal,
            if goals { "≤ 2 (issue 29)" } else { "-" },
        ),
        Row::measured(
            &format!("{label}: CPU per series per scrape, sensor / node_exporter"),
            cpu_ratio,
            "",
            3,
            &format!(
                "sensor {:.3} µs, node_exporter {:.3} µs",
                stats(rounds.iter().map(|r| r.0.per_series_us()).collect()).1,
                stats(rounds.iter().map(|r| r.1.per_series_us()).collect()).1
            ),
            cpu_goal,
            if goals { "≤ 0.05 (issue 29)" } else { "-" },
        ),
    ]
}

/// The second phase's rows and table: more workloads than `limits.workloads_per_metric` names.
fn scaled_report(o: &Opts, rounds: &[(Scrapes, Scrapes)]) -> (Vec<Row>, String) {
    let rows = ratio_rows(&format!("{} workloads", o.scale_workloads), rounds, false);
    let mut t = format!(
        "\nWith {} workloads ({} more started after the rounds above, each a process in its own cgroup that made \
         one loopback connect and touched {} KiB; past `limits.workloads_per_metric` (1,000) their series fold into \
         `cgroup=\"other\"`, but discovery, labels and the memcg refresh still see every one), {} rounds of {} \
         scrapes of each target (medians):\n\n| | sensor / node_exporter | figures |\n|---|---|---|\n",
        o.scale_workloads,
        o.scale_workloads - o.workloads,
        SCALE_TOUCH >> 10,
        rounds.len(),
        o.scrapes
    );
    for r in &rows {
        t.push_str(&format!("| {} | {} | {} |\n", r.what, r.ours, r.anchor));
    }
    (rows, t)
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
    ]
    .into_iter()
    .chain(ratio_rows(&format!("{} workloads", o.workloads), rounds, true))
    .collect();
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
