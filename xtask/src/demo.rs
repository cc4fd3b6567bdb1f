//! `cargo xtask demo`: the sensor plus a real Prometheus (Debian's package) with the fleet
//! rules, a real OOM kill in a child memory cgroup and a synthetic check against a closed port,
//! then the fleet rule results as Prometheus computes them.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    net::{free_port, http_get, loopback},
    step,
};

/// Children and the cgroup, cleaned up on drop so an error or Ctrl-C path leaves nothing.
struct Running {
    children: Vec<Child>,
    cgroup: Option<PathBuf>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for c in &mut self.children {
            // SIGTERM first: the sensor detaches its probes cleanly on it.
            // SAFETY: kill(2) on our own child's pid with a valid signal number.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        for c in &mut self.children {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(cg) = &self.cgroup {
            for _ in 0..50 {
                if std::fs::remove_dir(cg).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn wait_http(port: u16, path: &str, what: &str, child: &mut Child, log: &Path) -> Result<()> {
    let start = Instant::now();
    loop {
        if let Ok((200, _)) = http_get(loopback(port), path) {
            return Ok(());
        }
        if let Some(st) = child.try_wait()? {
            bail!(
                "{what} exited with {st}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!(
                "{what} not ready after 30s:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A query-string value (spaces as `+`, which Prometheus decodes like `%20`).
fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Instant query: one `labels value` line per series.
fn query(port: u16, expr: &str) -> Result<Vec<String>> {
    let (code, body) = http_get(loopback(port), &format!("/api/v1/query?query={}", urlencode(expr)))?;
    let v: serde_json::Value = serde_json::from_str(&body).with_context(|| format!("query {expr}: {body}"))?;
    if code != 200 || v["status"] != "success" {
        bail!("query {expr} failed: {body}");
    }
    let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
    Ok(result
        .iter()
        .map(|s| {
            let labels = s["metric"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter(|(k, v)| !matches!(k.as_str(), "job" | "__name__") && v.as_str() != Some(""))
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            format!("{labels} => {}", s["value"][1].as_str().unwrap_or("?"))
        })
        .collect())
}

/// A fresh memory cgroup for the OOM victim: under our own on v1 and hybrid hosts, at the root
/// of the unified hierarchy on v2 (a non-root v2 cgroup holding processes cannot enable the
/// memory controller for children). Returns (directory, path relative to the hierarchy root).
fn make_cgroup() -> Result<(PathBuf, String)> {
    let name = format!("sensor-demo-{}", std::process::id());
    let own = std::fs::read_to_string("/proc/self/cgroup").context("read /proc/self/cgroup")?;
    let v1 = Path::new("/sys/fs/cgroup/memory");
    let (dir, rel, v2) = if v1.join("memory.limit_in_bytes").exists() {
        let mine = own
            .lines()
            .find_map(|l| {
                let mut p = l.splitn(3, ':');
                let (_, ctrls, path) = (p.next()?, p.next()?, p.next()?);
                ctrls.split(',').any(|c| c == "memory").then(|| path.to_string())
            })
            .context("no v1 memory cgroup in /proc/self/cgroup")?;
        let rel = format!("{}/{name}", mine.trim_end_matches('/'));
        (v1.join(rel.trim_start_matches('/')), rel, false)
    } else {
        let root = Path::new("/sys/fs/cgroup");
        let ctl = std::fs::read_to_string(root.join("cgroup.subtree_control")).unwrap_or_default();
        if !ctl.split_whitespace().any(|c| c == "memory") {
            std::fs::write(root.join("cgroup.subtree_control"), "+memory")
                .context("enable the memory controller at the cgroup v2 root")?;
        }
        (root.join(&name), format!("/{name}"), true)
    };
    std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let limit = (24u64 << 20).to_string();
    if v2 {
        std::fs::write(dir.join("memory.max"), &limit)?;
        let _ = std::fs::write(dir.join("memory.swap.max"), "0");
    } else {
        std::fs::write(dir.join("memory.limit_in_bytes"), &limit)?;
        let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), &limit);
    }
    Ok((dir, rel))
}

pub fn run(root: &Path, sensor: &Path, keep: bool) -> Result<()> {
    if Command::new("prometheus").arg("--version").output().is_err() {
        bail!("prometheus not found: apt-get install prometheus");
    }
    let dir = root.join("target/demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data"))?;
    let (sport, pport) = (free_port()?, free_port()?);
    // Bound then released: nothing listens there, so the check fails with "connection refused".
    let closed = free_port()?;
    let mut running = Running {
        children: Vec::new(),
        cgroup: None,
    };

    step(&format!(
        "starting the sensor on 127.0.0.1:{sport} with check demo-down -> 127.0.0.1:{closed} (closed)"
    ));
    let cfg = dir.join("sensor.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen: 127.0.0.1:{sport}\nalerting: {{window: 6s, min_samples: 2}}\nchecks:\n  - {{name: demo-down, type: http, url: \"http://127.0.0.1:{closed}/\", interval: 2s, timeout: 1s}}\n"
        ),
    )?;
    let slog = dir.join("sensor.log");
    running.children.push(
        Command::new(sensor)
            .args(["run", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&slog)?)
            .spawn()
            .with_context(|| format!("start {}", sensor.display()))?,
    );
    if let Some(c) = running.children.last_mut() {
        wait_http(sport, "/readyz", "the sensor", c, &slog)?;
    }

    step(&format!(
        "starting Prometheus on 127.0.0.1:{pport} (scrape and rule evaluation every second)"
    ));
    let rules = std::fs::read_to_string(root.join("deploy/prometheus/sensor-rules.yml"))?
        // The shipped rules evaluate every minute; the demo wants answers in seconds.
        .replace("interval: 1m", "interval: 1s");
    std::fs::write(dir.join("sensor-rules.yml"), rules)?;
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [sensor-rules.yml]\n\
             scrape_configs:\n  - job_name: sensor\n    static_configs: [{{targets: ['127.0.0.1:{sport}']}}]\n"
        ),
    )?;
    let plog = dir.join("prometheus.log");
    running.children.push(
        Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{pport}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&plog)?)
            .spawn()
            .context("start prometheus")?,
    );
    if let Some(c) = running.children.last_mut() {
        wait_http(pport, "/-/ready", "prometheus", c, &plog)?;
    }

    let (cg, rel) = make_cgroup()?;
    running.cgroup = Some(cg.clone());
    step(&format!(
        "causing an OOM kill in memory cgroup {rel} (24 MiB limit, `tail /dev/zero`)"
    ));
    let st = Command::new("sh")
        .arg("-c")
        .arg("echo $$ > \"$1\" && exec tail /dev/zero")
        .arg("sh")
        .arg(cg.join("cgroup.procs"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    use std::os::unix::process::ExitStatusExt as _;
    if st.signal() != Some(libc::SIGKILL) {
        bail!("the allocator was not OOM-killed: {st}");
    }

    step("waiting for Prometheus to scrape the kill and evaluate the fleet rules");
    let start = Instant::now();
    while query(pport, "instance:sensor_oom_kills:increase1h")?.is_empty() {
        if start.elapsed() > Duration::from_secs(30) {
            bail!(
                "the recording rules did not see the kill in 30s; see {}",
                plog.display()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // A few check runs (every 2 s): sensor_check_up, and the availability alert fires.
    std::thread::sleep(Duration::from_secs(7));

    for expr in [
        "sensor_oom_kills_total",
        "instance:sensor_oom_kills:increase1h",
        "fleet:sensor_oom_kills:rate1h",
        "fleet:sensor_hosts_with_oom_kills:ratio1h",
        "namespace:sensor_oom_kills:increase1h",
        "sensor_check_up",
        "sensor_check_runs_total",
        "ALERTS",
    ] {
        let rows = query(pport, expr)?;
        println!("\n{expr}");
        if rows.is_empty() {
            println!("  (no series)");
        }
        for r in rows {
            println!("  {r}");
        }
    }
    // The sensor's own availability alert (window shortened to 6 s for the demo).
    let (_, body) = http_get(loopback(sport), "/api/v1/checks")?;
    let checks: serde_json::Value = serde_json::from_str(&body).context("/api/v1/checks")?;
    println!("\nsensor alerts (/api/v1/checks)");
    let alerts = checks["alerts"].as_array().cloned().unwrap_or_default();
    if alerts.is_empty() {
        println!("  (none yet)");
    }
    for a in alerts {
        println!("  {}", a["message"].as_str().unwrap_or_default());
    }
    println!(
        "\nsensor:     http://127.0.0.1:{sport}/metrics  (log {})\nprometheus: http://127.0.0.1:{pport}/  (log {})",
        slog.display(),
        plog.display()
    );
    if keep {
        step("running; press Enter to stop");
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
    step("stopping the sensor and Prometheus, removing the cgroup");
    drop(running);
    Ok(())
}
