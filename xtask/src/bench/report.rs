//! One report, docs/benchmarks.md, regenerated from a machine-readable results file
//! (docs/bench-results.json): each benchmark stores its summary rows and its section there, so a
//! partial run (`cargo xtask bench memory`) replaces only its own section and rows.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result};
use serde_json::{json, Map, Value};

pub const RESULTS: &str = "docs/bench-results.json";
pub const REPORT: &str = "docs/benchmarks.md";

/// Every benchmark in report order: (key, section title). `workloads` is the hook for a later
/// benchmark (xtask/src/bench/workloads.rs): its section and rows appear once it stores them.
pub const ORDER: &[(&str, &str)] = &[
    ("memory", "Daemon memory: idle, peak and workload churn"),
    ("scrape", "Scrape cost with active workloads"),
    ("events", "Userspace CPU per kernel event"),
    ("oom-latency", "OOM kill to event and counter"),
    ("workloads", "Workloads"),
    ("tcp", "TCP connect overhead"),
    ("checks", "Synthetic checks"),
    ("oom-imminent", "OOM imminent: warning lead time and false warnings"),
];

/// A goal from issue 17, as a bound on one figure.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Goal {
    AtMost(f64),
    AtLeast(f64),
    /// No goal: the row only reports.
    None,
}

/// "met", or "missed by X (Y%)" in the row's unit; "-" without a goal or a figure.
pub fn verdict(value: f64, goal: Goal, unit: &str, digits: usize) -> String {
    let missed = |by: f64, limit: f64| {
        let pct = if limit != 0.0 {
            format!(" ({:.0}%)", 100.0 * by / limit.abs())
        } else {
            String::new()
        };
        format!("**missed** by {by:.digits$}{unit}{pct}")
    };
    if !value.is_finite() {
        return "not measured".into();
    }
    match goal {
        Goal::None => "-".into(),
        Goal::AtMost(g) if value <= g => "met".into(),
        Goal::AtMost(g) => missed(value - g, g),
        Goal::AtLeast(g) if value >= g => "met".into(),
        Goal::AtLeast(g) => missed(g - value, g),
    }
}

/// One summary row: what, our figure, the anchor measured in the same run, the goal, verdict.
#[derive(Clone, Debug)]
pub struct Row {
    pub what: String,
    pub ours: String,
    pub anchor: String,
    pub goal: String,
    pub verdict: String,
}

impl Row {
    /// A row whose figure is `value` in `unit`, judged against `goal` (shown as `goal_text`).
    pub fn measured(
        what: &str,
        value: f64,
        unit: &str,
        digits: usize,
        anchor: &str,
        goal: Goal,
        goal_text: &str,
    ) -> Row {
        Row {
            what: what.into(),
            ours: format!("{value:.digits$}{unit}"),
            anchor: anchor.into(),
            goal: goal_text.into(),
            verdict: verdict(value, goal, unit, digits),
        }
    }

    fn to_json(&self) -> Value {
        json!({"what": self.what, "ours": self.ours, "anchor": self.anchor, "goal": self.goal, "verdict": self.verdict})
    }
}

/// What a benchmark on the kernel holds while it runs: the machine it describes, the kernel lock
/// (benchmarks and privileged tests must not share the kernel), and target/bench for its logs.
pub struct Bench {
    pub machine: String,
    pub dir: std::path::PathBuf,
    _lock: crate::bench::kit::KernelLock,
}

impl Bench {
    pub fn start(root: &Path, name: &str) -> Result<Bench> {
        let machine = machine();
        eprintln!("==> bench {name} on {machine}");
        let lock = crate::bench::kit::KernelLock::acquire(&format!("bench {name}"))?;
        let dir = root.join("target/bench");
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Ok(Bench {
            machine,
            dir,
            _lock: lock,
        })
    }
}

/// Machine, kernel, OS, commit and time: printed by every benchmark and kept with its section.
pub fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    let os = std::fs::read_to_string("/etc/debian_version")
        .map_or_else(|_| "Linux".into(), |v| format!("Debian {}", v.trim()));
    // Other work on the machine widens the spread between rounds: say how busy it was.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "{cpus} CPUs ({model}), {mem} RAM, kernel {}, {os}; commit {}; {}; load average {} (1, 5 min) at the start",
        kernel.trim(),
        commit(),
        text(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])),
        load.split_whitespace().take(2).collect::<Vec<_>>().join(", ")
    )
}

/// The commit, `-dirty` when files other than the report and its results (which a run of
/// several benchmarks rewrites as it goes) differ from it.
fn commit() -> String {
    let rev = text(Command::new("git").args(["rev-parse", "--short", "HEAD"]));
    let changed = text(Command::new("git").args([
        "status",
        "--porcelain",
        "--",
        ".",
        &format!(":!{RESULTS}"),
        &format!(":!{REPORT}"),
    ]));
    if changed.is_empty() {
        rev
    } else {
        format!("{rev}-dirty")
    }
}

fn text(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Smoke runs (`--quick`) write their report under target/bench/ instead, so they never replace
/// measured figures in docs/.
static QUICK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn set_quick() {
    QUICK.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// (results file, report) for this run.
fn paths(root: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    if QUICK.load(std::sync::atomic::Ordering::Relaxed) {
        let dir = root.join("target/bench");
        let _ = std::fs::create_dir_all(&dir);
        (dir.join("quick-results.json"), dir.join("benchmarks-quick.md"))
    } else {
        (root.join(RESULTS), root.join(REPORT))
    }
}

/// Stores one benchmark's rows and section in the results file and regenerates the report.
pub fn store(root: &Path, key: &str, machine: &str, rows: &[Row], body: &str) -> Result<()> {
    let (path, report) = paths(root);
    let mut all: Value = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| json!({}));
    update(&mut all, key, machine, rows, body);
    std::fs::write(&path, serde_json::to_string_pretty(&all)? + "\n")
        .with_context(|| format!("write {}", path.display()))?;
    std::fs::write(&report, render(&all)).with_context(|| format!("write {}", report.display()))?;
    eprintln!("==> wrote {} and {}", path.display(), report.display());
    Ok(())
}

/// Writes the report again from the results file, running nothing.
pub fn rerender(root: &Path) -> Result<()> {
    let (path, report) = paths(root);
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let all: Value = serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    std::fs::write(&report, render(&all)).with_context(|| format!("write {}", report.display()))?;
    eprintln!("==> wrote {} from {}", report.display(), path.display());
    Ok(())
}

fn update(all: &mut Value, key: &str, machine: &str, rows: &[Row], body: &str) {
    if !all.is_object() {
        *all = json!({});
    }
    let sections = all
        .as_object_mut()
        .map(|o| o.entry("sections").or_insert_with(|| json!({})));
    if let Some(Value::Object(s)) = sections {
        s.insert(
            key.into(),
            json!({
                "machine": machine,
                "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
                "body": body,
            }),
        );
    }
}

/// The whole report from the results file: the summary table over every stored benchmark,
/// then one section each, in [`ORDER`] (unknown keys last, so a new benchmark is never lost).
pub fn render(all: &Value) -> String {
    let empty = Map::new();
    let sections = all["sections"].as_object().unwrap_or(&empty);
    let mut keys: Vec<(&str, String)> = ORDER
        .iter()
        .filter(|(k, _)| sections.contains_key(*k))
        .map(|(k, t)| (*k, (*t).to_string()))
        .collect();
    for k in sections.keys() {
        if !ORDER.iter().any(|(o, _)| o == k) {
            keys.push((k.as_str(), k.clone()));
        }
    }
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let mut out = String::from(
        "# Benchmarks\n\n\
         Generated by `cargo xtask bench [tcp|checks|memory|scrape|events|oom-latency|workloads|all]` from \
         `docs/bench-results.json`; each section comes from the last run of that benchmark, on the machine it \
         names. Benchmarks, not tests: nothing here fails a build. The goals are those of issue 17 (footprint \
         and scale); \"anchor\" is a known tool measured in the same run on the same host. MiB = 2^20 bytes. \
         The machine is a shared 2-CPU VM: other work ran during the runs, so single figures are noisy; each \
         section gives the median with its spread over rounds.\n\n\
         ## Summary\n\n\
         | benchmark | what | ours | anchor (same run) | goal | verdict |\n|---|---|---|---|---|---|\n",
    );
    for (k, _) in &keys {
        for r in sections[*k]["rows"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "| {k} | {} | {} | {} | {} | {} |\n",
                s(&r["what"]),
                s(&r["ours"]),
                s(&r["anchor"]),
                s(&r["goal"]),
                s(&r["verdict"])
            ));
        }
    }
    for (k, title) in &keys {
        let sec = &sections[*k];
        // A section measured by something other than `cargo xtask bench` names its command.
        let cmd = sec["command"]
            .as_str()
            .map_or_else(|| format!("`cargo xtask bench {k}`"), str::to_string);
        out.push_str(&format!(
            "\n## {title}\n\n{cmd} on {}.\n\n{}\n",
            s(&sec["machine"]),
            s(&sec["body"]).trim_end()
        ));
    }
    out
}

/// Markdown headings one level deeper, so a report written as a document fits in a section.
pub fn demote_headings(md: &str) -> String {
    md.lines()
        .map(|l| {
            if l.starts_with('#') {
                format!("#{l}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A summary row for a distribution: "median (min-max)".
pub fn spread(v: &[f64], digits: usize, unit: &str) -> String {
    let (lo, med, hi) = crate::bench::kit::stats(v.to_vec());
    format!("{med:.digits$}{unit} ({lo:.digits$}-{hi:.digits$})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_say_by_how_much() {
        assert_eq!(verdict(18.0, Goal::AtMost(20.0), " MiB", 1), "met");
        assert_eq!(
            verdict(30.0, Goal::AtMost(20.0), " MiB", 1),
            "**missed** by 10.0 MiB (50%)"
        );
        assert_eq!(verdict(0.9, Goal::AtLeast(0.97), "", 3), "**missed** by 0.070 (7%)");
        assert_eq!(verdict(1.0, Goal::AtLeast(0.97), "", 3), "met");
        assert_eq!(verdict(5.0, Goal::None, "", 0), "-");
        assert_eq!(verdict(f64::NAN, Goal::AtMost(1.0), "", 0), "not measured");
    }

    #[test]
    fn a_partial_run_replaces_only_its_own_section_and_rows() {
        let mut all = json!({});
        let row = |w: &str, v: f64| Row::measured(w, v, " ms", 1, "-", Goal::AtMost(20.0), "≤ 20 ms");
        update(
            &mut all,
            "tcp",
            "m1",
            &[row("tcp row", 1.0)],
            "## Old heading\ntcp body",
        );
        update(&mut all, "memory", "m1", &[row("mem row", 25.0)], "memory body");
        update(&mut all, "memory", "m2", &[row("mem row 2", 5.0)], "memory body 2");
        let r = render(&all);
        // Summary rows follow ORDER (memory before tcp), the replaced rows are gone.
        let mem = r.find("| memory | mem row 2 | 5.0 ms | - | ≤ 20 ms | met |").expect(&r);
        let tcp = r.find("| tcp | tcp row | 1.0 ms |").expect(&r);
        assert!(mem < tcp, "{r}");
        assert!(!r.contains("| mem row |") && !r.contains("memory body\n"), "{r}");
        assert!(r.contains("## Daemon memory: idle, peak and workload churn\n\n`cargo xtask bench memory` on m2."));
        assert!(r.contains("tcp body"));
        // An unknown key still shows, after the known ones.
        update(&mut all, "future", "m3", &[], "future body");
        let r = render(&all);
        assert!(r.find("## future").expect(&r) > r.find("## TCP connect overhead").expect(&r));
    }

    #[test]
    fn headings_move_one_level_down() {
        assert_eq!(demote_headings("# A\ntext\n## B"), "## A\ntext\n### B");
    }
}
