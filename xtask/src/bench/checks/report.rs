//! The report: summary rows, ratios and the markdown section.

use super::*;
// ---------------------------------------------------------------------------------------------
// Report.

pub(super) fn row(label: &str, v: Vec<f64>, decimals: usize) -> String {
    let (a, b, c) = stats(v);
    format!("| {label} | {a:.decimals$} | {b:.decimals$} | {c:.decimals$} |\n")
}

/// The report's summary rows: probes per CPU-second against blackbox_exporter, RSS with many checks.
pub(super) fn summary_rows(samples: &[Sample], rss: &[RssResult]) -> Vec<Row> {
    let med = |p: Prober| stats(samples.iter().filter(|s| s.prober == p).map(Sample::per_cpu).collect()).1;
    let ratio = stats(ratios(samples, Prober::Sensor, Prober::Blackbox)).1;
    let mut rows = vec![Row::measured(
        "HTTP check probes per CPU-second (same target, same offered rate)",
        med(Prober::Sensor),
        "",
        0,
        &format!(
            "blackbox_exporter {:.0} (sensor / blackbox_exporter {ratio:.2})",
            med(Prober::Blackbox)
        ),
        Goal::None,
        "-",
    )];
    if let Some(r) = rss
        .iter()
        .filter(|r| r.prober == Prober::Sensor)
        .max_by_key(|r| r.checks)
    {
        rows.push(Row::measured(
            &format!("RSS with {} HTTP checks (kernel probes off)", r.checks),
            mib(r.rss_kib),
            " MiB",
            1,
            "-",
            Goal::None,
            "-",
        ));
    }
    rows
}

/// The headline numbers, and a warning when either prober fell short of the offered rate.
/// Probes per CPU-second of `num` over `den`, one ratio per round that has both.
pub(super) fn ratios(samples: &[Sample], num: Prober, den: Prober) -> Vec<f64> {
    samples
        .iter()
        .filter(|s| s.prober == num)
        .filter_map(|s| {
            samples
                .iter()
                .find(|b| b.prober == den && b.round == s.round)
                .map(|b| s.per_cpu() / b.per_cpu())
        })
        .collect()
}

/// The probers that ran, in report order.
pub(super) fn probers(samples: &[Sample]) -> Vec<Prober> {
    [Prober::Sensor, Prober::SensorStatic, Prober::Blackbox]
        .into_iter()
        .filter(|p| samples.iter().any(|s| s.prober == *p))
        .collect()
}

pub(super) fn summary(o: &Opts, samples: &[Sample], rss: &[RssResult]) {
    let med =
        |p: Prober, f: &dyn Fn(&Sample) -> f64| stats(samples.iter().filter(|s| s.prober == p).map(f).collect()).1;
    let ratio = stats(ratios(samples, Prober::Sensor, Prober::Blackbox));
    for p in probers(samples) {
        eprintln!(
            "==> {:<17} median {:>6.0} probes/CPU-s at {:>5.0} probes/s ({:.1}% of one core)",
            p.name(),
            med(p, &Sample::per_cpu),
            med(p, &Sample::rate),
            med(p, &Sample::cpu_pct)
        );
        let short = med(p, &Sample::rate) < 0.95 * o.rate;
        let failed: u64 = samples.iter().filter(|s| s.prober == p).map(|s| s.failed).sum();
        if short || failed > 0 {
            eprintln!(
                "==> note: {} achieved a median {:.0} of {:.0} offered probes/s, {failed} failed probes in all",
                p.name(),
                med(p, &Sample::rate),
                o.rate
            );
        }
    }
    eprintln!(
        "==> sensor / blackbox_exporter probes per CPU-second: min {:.2}, median {:.2}, max {:.2}",
        ratio.0, ratio.1, ratio.2
    );
    let st = ratios(samples, Prober::SensorStatic, Prober::Sensor);
    if !st.is_empty() {
        let st = stats(st);
        eprintln!(
            "==> sensor (static) / sensor (glibc) probes per CPU-second: min {:.2}, median {:.2}, max {:.2}",
            st.0, st.1, st.2
        );
    }
    for pair in rss.chunks(2) {
        if let [base, big] = pair {
            eprintln!(
                "==> RSS {}: {} check {:.1} MiB, {} checks {:.1} MiB ({:.1} KiB per check)",
                base.prober.name(),
                base.checks,
                mib(base.rss_kib),
                big.checks,
                mib(big.rss_kib),
                (big.rss_kib as f64 - base.rss_kib as f64) / (big.checks.saturating_sub(base.checks).max(1)) as f64
            );
        }
    }
}

pub(super) fn render(
    o: &Opts,
    bb_version: &str,
    interval: Duration,
    samples: &[Sample],
    rss: &[RssResult],
    load: [f64; 2],
) -> String {
    let of = |p: Prober| samples.iter().filter(move |s| s.prober == p);
    let sensor: Vec<&Sample> = of(Prober::Sensor).collect();
    let st: Vec<&Sample> = of(Prober::SensorStatic).collect();
    let bb: Vec<&Sample> = of(Prober::Blackbox).collect();
    let bb_ratios = ratios(samples, Prober::Sensor, Prober::Blackbox);
    let col = |v: &[&Sample], f: &dyn Fn(&Sample) -> f64| v.iter().map(|s| f(s)).collect::<Vec<f64>>();

    // Machine, kernel, OS, commit and time as every benchmark prints them.
    let machine = crate::bench::report::machine();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());

    let mut t = String::new();
    t.push_str("# Benchmarks: synthetic checks\n\n");
    t.push_str(
        "Generated by `cargo xtask bench checks`; numbers from the last run on the machine named. \
         This is a benchmark, not a test: nothing here fails a build.\n\n",
    );
    t.push_str(&format!(
        "Machine: {machine}; {bb_version}. Load average (1 min) {:.1} before the rounds and {:.1} after \
         them{}.\n\n",
        load[0],
        load[1],
        // The rounds themselves keep about one CPU busy.
        if load.iter().any(|l| *l > cpus as f64) {
            ": other work shared the machine, which widens the spread between rounds"
        } else {
            ""
        }
    ));

    t.push_str("## Probes per CPU-second: sensor vs. blackbox_exporter\n\n");
    t.push_str(&format!(
        "Both probe the same local HTTP target at the same offered rate, {:.0} probes/s, in {} rounds that \
         alternate sensor / blackbox_exporter in one run; each prober is started fresh, runs {:.0} s of warm-up, then \
         a {:.1} s window. Probes per CPU-second = successful probes in the window / (utime + stime of the prober's \
         process over the window, from /proc/PID/stat). The ratio is sensor over blackbox_exporter within a round.{}\n\n",
        o.rate,
        o.rounds,
        WARMUP.as_secs_f64(),
        o.seconds,
        if st.is_empty() {
            ""
        } else {
            " Each round also runs the static build (sensor (static), `cargo xtask dist`) between the two; \
             \"sensor\" is the glibc release build."
        }
    ));
    t.push_str("| | min | median | max |\n|---|---|---|---|\n");
    t.push_str(&row(
        "**sensor / blackbox_exporter, probes per CPU-second**",
        bb_ratios,
        2,
    ));
    if !st.is_empty() {
        t.push_str(&row(
            "**sensor (static) / sensor, probes per CPU-second**",
            ratios(samples, Prober::SensorStatic, Prober::Sensor),
            3,
        ));
    }
    for (name, v) in [
        ("sensor", &sensor),
        ("sensor (static)", &st),
        ("blackbox_exporter", &bb),
    ] {
        if v.is_empty() {
            continue;
        }
        t.push_str(&row(
            &format!("{name}: probes per CPU-second"),
            col(v, &Sample::per_cpu),
            0,
        ));
        t.push_str(&row(
            &format!("{name}: CPU per probe, µs"),
            col(v, &|s| 1e6 / s.per_cpu()),
            0,
        ));
        t.push_str(&row(&format!("{name}: achieved probes/s"), col(v, &Sample::rate), 0));
        t.push_str(&row(
            &format!("{name}: CPU, % of one core"),
            col(v, &Sample::cpu_pct),
            1,
        ));
        t.push_str(&row(
            &format!("{name}: failed probes per window"),
            col(v, &|s| s.failed as f64),
            0,
        ));
        t.push_str(&row(
            &format!("{name}: RSS at window end, MiB"),
            col(v, &|s| mib(s.rss_kib)),
            1,
        ));
        t.push_str(&row(
            &format!("target CPU during {name} windows, % of one core"),
            col(v, &|s| 100.0 * s.target_cpu / s.secs),
            1,
        ));
    }
    t.push_str(&row(
        "blackbox driver CPU (not counted), % of one core",
        col(&bb, &|s| 100.0 * s.driver_cpu / s.secs),
        1,
    ));

    let load = |v: &[&Sample]| {
        let (lo, _, hi) = stats(col(v, &Sample::rate));
        let failed: u64 = v.iter().map(|s| s.failed).sum();
        format!("{lo:.0}-{hi:.0} probes/s with {failed} failed")
    };
    t.push_str(&format!(
        "\nOffered {:.0} probes/s; achieved: sensor {}, {}blackbox_exporter {} over all windows.\n",
        o.rate,
        load(&sensor),
        if st.is_empty() {
            String::new()
        } else {
            format!("sensor (static) {}, ", load(&st))
        },
        load(&bb)
    ));
    t.push_str(&format!(
        "\n### Method\n\n\
         - **Target**: an HTTP/1.1 server inside xtask ({TARGET_THREADS} threads blocking in accept on one loopback \
         listener) that reads the request head and answers `200`, a 3-byte body and `Connection: close`, then closes. \
         Both probers open a fresh TCP connection per probe. Its CPU (per-thread /proc/self/task/TID/stat) and request \
         count are recorded per window: at most {tmax:.1}% of one core, and its requests differ from the probes \
         counted by at most {tdiff} per window (probes in flight at the window edges).\n\
         - **sensor**: `sensor run --config FILE --listen 127.0.0.1:PORT` with every kernel probe disabled (no \
         privileges needed) and {checks} HTTP checks of that target, `interval: {interval:?}`, `timeout: 2s`. Probes \
         are the delta of `sensor_check_runs_total{{result=\"success\"}}` summed over checks, scraped just outside the \
         CPU readings so the two scrapes are (mostly) not billed to the sensor. Its cost includes scheduling, timing \
         every phase, the per-check histograms, the result ring used for availability windows and alerting.\n{static_}\
         - **blackbox_exporter**: Debian's `{BLACKBOX}` with one module (`prober: http`, `timeout: 2s`, \
         `valid_status_codes: [200]`, `preferred_ip_protocol: ip4`), driven by {checks} worker threads in xtask, \
         each one keep-alive connection issuing `GET /probe?target=http://TARGET/&module=http_2xx` every {period:.1} ms \
         (a slow answer delays that worker's next request instead of bursting), i.e. the same offered rate. Probes are \
         answers containing `probe_success 1`. The driver's CPU is not counted (it is shown above). Part of the \
         exporter's real per-probe cost is that each probe is an HTTP request to it that it parses, plus a fresh \
         registry whose metrics it renders in the text format; that is how blackbox_exporter is used by Prometheus.\n\
         - CPU is utime + stime in clock ticks (sysconf(_SC_CLK_TCK) = {tck}), i.e. {res:.0} ms resolution; nothing \
         is pinned. Both probers run on the same {cpus}-CPU machine as the target (and, in blackbox rounds, the driver).\n\n",
        checks = o.checks,
        static_ = if st.is_empty() {
            ""
        } else {
            "- **sensor (static)**: the same, run from `target/dist/amd64/sensor` as `cargo xtask dist` builds it for the \
             image: x86_64-unknown-linux-musl, fully static, stripped, mimalloc as its allocator (musl's own malloc \
             takes one global lock). \"sensor\" is `cargo build --release` for the host (glibc, glibc's malloc).\n"
        },
        tmax = samples
            .iter()
            .map(|s| 100.0 * s.target_cpu / s.secs)
            .fold(0.0, f64::max),
        tdiff = samples
            .iter()
            .map(|s| (s.ok + s.failed).abs_diff(s.target_requests))
            .max()
            .unwrap_or(0),
        period = 1000.0 * o.checks as f64 / o.rate,
        tck = clk_tck(),
        res = 1000.0 / clk_tck(),
    ));

    t.push_str("### Raw rounds\n\n");
    t.push_str(
        "| round | prober | window s | probes ok | failed | probes/s | CPU s | probes/CPU-s | target requests | \
         target CPU s | driver CPU s | RSS MiB |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for s in samples {
        t.push_str(&format!(
            "| {} | {} | {:.2} | {} | {} | {:.0} | {:.2} | {:.0} | {} | {:.2} | {} | {:.1} |\n",
            s.round,
            s.prober.name(),
            s.secs,
            s.ok,
            s.failed,
            s.rate(),
            s.cpu,
            s.per_cpu(),
            s.target_requests,
            s.target_cpu,
            if s.prober == Prober::Blackbox {
                format!("{:.2}", s.driver_cpu)
            } else {
                "-".into()
            },
            mib(s.rss_kib)
        ));
    }

    t.push_str(&format!("\n## Daemon memory with {} checks\n\n", o.rss_checks));
    t.push_str(&format!(
        "`sensor run` checks-only (kernel probes disabled) with N HTTP checks of the same target, `interval: 10s` \
         (each check's first run is offset within its interval), read {:.0} s after start{}; VmRSS and VmHWM from \
         /proc/PID/status, read before the one /metrics scrape that counts the runs. Checks-only needs at least one \
         check, so the baseline is 1 check. CPU is the average since start.\n\n\
         | build | checks | VmRSS MiB | VmHWM MiB | runs ok | runs failed | CPU, % of one core |\n\
         |---|---|---|---|---|---|---|\n",
        o.rss_wait,
        if o.rss_wait >= 20.0 {
            ", so every check has run at least twice"
        } else {
            ""
        }
    ));
    for r in rss {
        t.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {} | {} | {:.2} |\n",
            r.prober.name(),
            r.checks,
            mib(r.rss_kib),
            mib(r.hwm_kib),
            r.ok,
            r.failed,
            100.0 * r.cpu / r.secs
        ));
    }
    t.push('\n');
    for pair in rss.chunks(2) {
        if let [base, big] = pair {
            if big.checks > base.checks {
                let per = |a: u64, b: u64| (b as f64 - a as f64) / (big.checks - base.checks) as f64;
                t.push_str(&format!(
                    "Per additional check ({}): {:.1} KiB of RSS ({:.1} KiB of peak RSS).\n",
                    base.prober.name(),
                    per(base.rss_kib, big.rss_kib),
                    per(base.hwm_kib, big.hwm_kib)
                ));
            }
        }
    }

    t.push_str(&format!(
        "\n## Reproduce\n\n\
         As root on Debian (installs `{BLACKBOX}` with apt-get when it is missing; the sensor needs no privileges \
         here):\n\n```\ncargo xtask bench checks --checks-rounds {} --checks-seconds {} --checks {} --checks-rate {} \
         --rss-checks {} --rss-wait {}{}\n```\n\nConfigs and logs of the last run are left in `target/bench-checks/`.\n",
        o.rounds,
        o.seconds,
        o.checks,
        o.rate,
        o.rss_checks,
        o.rss_wait,
        if o.with_static { " --static" } else { "" }
    ));
    t
}
