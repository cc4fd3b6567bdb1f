//! Dashboards and rules evaluated in a real Prometheus scraping a real sensor, and the fleet rules on a real TSDB.

use super::*;

/// A real Prometheus (Debian's package) on a free loopback port with a temporary data dir,
/// stopped on drop.
struct Prometheus {
    child: std::process::Child,
    port: u16,
    dir: PathBuf,
}

impl Prometheus {
    /// `config` is prometheus.yml; `files` are written next to it (rule files).
    pub(crate) fn start(name: &str, config: &str, files: &[(&str, String)]) -> Option<Prometheus> {
        if Command::new("prometheus").arg("--version").output().is_err() {
            tool_missing("prometheus", "apt-get install prometheus; `cargo xtask deps` does it");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("sensor-prom-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        for (f, body) in files {
            std::fs::write(dir.join(f), body).unwrap();
        }
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .unwrap();
        let mut p = Prometheus { child, port, dir };
        let start = std::time::Instant::now();
        while !matches!(http_get(p.port, "/-/ready"), Ok((200, _))) {
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!("prometheus exited with {st}: {}", p.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "prometheus not ready: {}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(p)
    }

    /// Scraping the sensor at `instance` every second, with the rules as shipped but evaluated
    /// every second instead of every minute.
    pub(crate) fn scraping(name: &str, instance: &str) -> Option<Prometheus> {
        let rules = std::fs::read_to_string(prometheus_dir().join("sensor-rules.yml"))
            .unwrap()
            .replace("interval: 1m", "interval: 1s");
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [sensor-rules.yml]\n\
             scrape_configs:\n  - job_name: sensor\n    static_configs: [{{targets: ['{instance}']}}]\n"
        );
        Prometheus::start(name, &config, &[("sensor-rules.yml", rules)])
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// Instant query; panics unless Prometheus accepts it. Returns the result vector.
    pub(crate) fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let (code, body) = http_get(self.port, &format!("/api/v1/query?query={}", urlencode(expr))).unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert!(code == 200 && v["status"] == "success", "query `{expr}` failed: {body}");
        match v["data"]["resultType"].as_str() {
            Some("vector") | Some("matrix") => v["data"]["result"].as_array().cloned().unwrap_or_default(),
            // scalar / string: one pseudo-series without labels.
            _ => vec![serde_json::json!({"metric": {}, "value": v["data"]["result"]})],
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A query-string value (spaces as `+`, which Prometheus decodes like `%20`).
fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn sample_value(series: &serde_json::Value) -> f64 {
    series["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// A dashboard variable `label_values(expr, label)`: (name, expr, label).
type TemplateVar = (String, String, String);

/// Every PromQL expression of the dashboards in deploy/grafana/dashboards: (dashboard/panel,
/// expr), and the template variables' `label_values(expr, label)` as (name, expr, label).
fn dashboard_exprs() -> (Vec<(String, String)>, Vec<TemplateVar>) {
    let dir = root().join("deploy/grafana/dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let (mut exprs, mut vars) = (Vec::new(), Vec::new());
    fn walk(panels: &[serde_json::Value], dash: &str, out: &mut Vec<(String, String)>) {
        for p in panels {
            for t in p["targets"].as_array().into_iter().flatten() {
                let e = t["expr"].as_str().expect("every target has an expr");
                out.push((
                    format!("{dash} / {}", p["title"].as_str().unwrap_or("?")),
                    e.to_string(),
                ));
            }
            walk(p["panels"].as_array().map_or(&[], |v| v.as_slice()), dash, out);
        }
    }
    for f in files {
        let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        let name = d["title"].as_str().unwrap().to_string();
        walk(d["panels"].as_array().unwrap(), &name, &mut exprs);
        for v in d["templating"]["list"].as_array().into_iter().flatten() {
            let q = v["query"]["query"].as_str().expect("query variable");
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'))
                .expect(q);
            let (e, label) = inner.rsplit_once(',').expect(q);
            vars.push((
                v["name"].as_str().unwrap().to_string(),
                e.trim().to_string(),
                label.trim().to_string(),
            ));
        }
    }
    (exprs, vars)
}

/// Every rule of deploy/prometheus/sensor-rules.yml: (name, expr, is_recording).
fn rule_exprs() -> Vec<(String, String, bool)> {
    let y: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(prometheus_dir().join("sensor-rules.yml")).unwrap()).unwrap();
    let mut out = Vec::new();
    for g in y["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            let expr = r["expr"].as_str().unwrap().to_string();
            match (r["record"].as_str(), r["alert"].as_str()) {
                (Some(n), _) => out.push((n.to_string(), expr, true)),
                (_, Some(n)) => out.push((n.to_string(), expr, false)),
                _ => panic!("rule without record or alert"),
            }
        }
    }
    out
}

/// Grafana's variables as the dashboards use them.
fn substitute(expr: &str, instance: &str) -> String {
    expr.replace("$instance", instance)
        .replace("$check", ".*")
        .replace("$__rate_interval", "30s")
        .replace("$__range", "1h")
        .replace("$__interval", "5s")
}

#[test]
fn dashboards_and_rules_evaluate_against_live_prometheus() {
    let Some(_k) = privileged("dashboards_and_rules_evaluate_against_live_prometheus") else {
        return;
    };
    let cg = MemCgroup::new("sensor-it-dash", 24 << 20);
    // Two synthetic checks so the checks dashboard has data: one up, one refused.
    let web = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let web_addr = web.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in web.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 4096];
            let _ = std::io::Read::read(&mut s, &mut buf);
            let _ = std::io::Write::write_all(
                &mut s,
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
            );
        }
    });
    let closed = common::free_port();
    let cfg_path = std::env::temp_dir().join(format!("sensor-dash-{}.yaml", std::process::id()));
    std::fs::write(
        &cfg_path,
        format!(
            "alerting: {{window: 2s, min_samples: 2}}\nchecks:\n  - {{name: web, type: http, url: 'http://{web_addr}/', interval: 500ms}}\n  - {{name: refused, type: http, url: 'http://127.0.0.1:{closed}/', interval: 500ms}}\n"
        ),
    )
    .unwrap();
    let d = Daemon::start(&["--config", cfg_path.to_str().unwrap()]);
    let instance = format!("127.0.0.1:{}", d.port);
    let Some(prom) = Prometheus::scraping("dash", &instance) else {
        return;
    };

    // A real OOM kill and real TCP connects for the panels to show.
    cg.cause_oom_kill();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    for _ in 0..20 {
        drop(std::net::TcpStream::connect(addr).unwrap());
        let _ = listener.accept().unwrap();
    }
    let kill_labels = cg.kill_labels();
    d.wait_metric_sum("sensor_oom_kills_total", &kill_labels, 1.0, Duration::from_secs(5));

    // The recording rules see the kill once Prometheus has scraped it and evaluated them.
    let start = std::time::Instant::now();
    loop {
        let r = prom.query(&format!(
            "instance:sensor_oom_kills:increase1h{{instance=\"{instance}\"}}"
        ));
        if r.len() == 1 && sample_value(&r[0]) == 1.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "recording rule never saw the kill: {r:?}\n{}",
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Enough scrapes after the connects for rate() over 30s to have two samples.
    std::thread::sleep(Duration::from_secs(3));

    // Exact fleet numbers for a fleet of one host with one kill.
    let one = |e: &str| {
        let r = prom.query(e);
        assert_eq!(r.len(), 1, "{e}: {r:?}");
        sample_value(&r[0])
    };
    assert_eq!(one("fleet:sensor_hosts_with_oom_kills:ratio1h"), 1.0);
    assert!((one("fleet:sensor_oom_kills:rate1h") - 1.0 / 3600.0).abs() < 1e-12);
    assert_eq!(one("namespace:sensor_oom_kills:increase1h"), 1.0);

    let (exprs, vars) = dashboard_exprs();
    assert!(exprs.len() >= 30, "{} expressions", exprs.len());
    for (name, e, label) in &vars {
        let r = prom.query(&substitute(e, &instance));
        if name == "instance" {
            assert!(
                r.iter().any(|s| s["metric"][label.as_str()] == instance.as_str()),
                "variable {name}: {e} -> {r:?}"
            );
        }
    }
    let mut empty = Vec::new();
    for (panel, e) in &exprs {
        let q = substitute(e, &instance);
        assert!(!q.contains('$'), "{panel}: unsubstituted variable in {q}");
        let r = prom.query(&q);
        // Owner panels have data only for kills in Kubernetes pods: checked with kubelet-style
        // pods by owner_panels_and_rules_evaluate_against_live_prometheus.
        let oom = (e.contains("sensor_oom_kill") || e.contains(":sensor_oom_kills:") || e.contains("oom_kills:ratio"))
            && !e.contains("owner");
        if oom {
            assert!(!r.is_empty(), "OOM panel {panel} is empty: {q}");
            if r.iter().any(|s| s["metric"].get("cgroup").is_some()) {
                assert!(
                    r.iter().any(|s| s["metric"]["cgroup"] == cg.rel.as_str()),
                    "OOM panel {panel} lacks the kill's cgroup {}: {r:?}",
                    cg.rel
                );
            }
        } else if e.contains("sensor_tcp_connects_total") || e.contains("sensor_tcp_connect_duration") {
            assert!(!r.is_empty(), "TCP panel {panel} is empty: {q}");
            if e.contains("by (result") {
                assert!(r.iter().any(|s| s["metric"]["result"] == "success"), "{panel}: {r:?}");
            }
        } else if e.contains("sensor_series") {
            assert!(!r.is_empty(), "series panel {panel} is empty: {q}");
        } else if e.contains("sensor_check_") {
            assert!(!r.is_empty(), "checks panel {panel} is empty: {q}");
            if r.iter().any(|s| s["metric"].get("check").is_some()) {
                assert!(
                    r.iter().any(|s| s["metric"]["check"] == "refused")
                        || r.iter().any(|s| s["metric"]["check"] == "web"),
                    "checks panel {panel}: {r:?}"
                );
            }
        } else if r.is_empty() {
            empty.push(panel.clone());
        }
    }
    for (name, e, recording) in rule_exprs() {
        let r = prom.query(&e);
        if recording && !name.contains("owner") {
            assert!(!r.is_empty(), "recording rule {name} is empty");
        }
    }
    eprintln!(
        "{} dashboard expressions and {} rules evaluated; empty (no data of that kind on this host yet): {empty:?}",
        exprs.len(),
        rule_exprs().len()
    );
    assert_eq!(d.stop().code(), Some(0));
}

/// The fleet dashboard's owner panels and the owner rules on a live Prometheus scraping a
/// sensor that names kubelet-style pods through a private containerd: two pods of one
/// Deployment OOM-killed, a StatefulSet's pod running without kills.
#[test]
fn owner_panels_and_rules_evaluate_against_live_prometheus() {
    let Some(_k) = privileged("owner_panels_and_rules_evaluate_against_live_prometheus") else {
        return;
    };
    let Some(image) = runtimes::victim_image() else { return };
    let Some(ctrd) = runtimes::Containerd::start() else {
        return;
    };
    ctrd.import(image);
    let cfg = std::env::temp_dir().join(format!("sensor-owners-{}.yaml", std::process::id()));
    std::fs::write(
        &cfg,
        format!(
            "workloads:\n  runtimes:\n    - {{kind: containerd, socket: {}, namespaces: [k8s.io]}}\n",
            ctrd.socket.display()
        ),
    )
    .unwrap();
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let instance = format!("127.0.0.1:{}", d.port);
    let Some(prom) = Prometheus::scraping("owners", &instance) else {
        return;
    };
    let mut pg = runtimes::KubePod::new(
        "shop",
        "pg-main-0",
        &[
            ("statefulset.kubernetes.io/pod-name", "pg-main-0"),
            ("controller-revision-hash", "pg-main-6b9c8d7f5"),
        ],
    );
    ctrd.start_sandbox(&mut pg, image);
    for name in ["ledger-api-5d8f6c7b9-x2x4k", "ledger-api-5d8f6c7b9-q7z9m"] {
        let mut pod = runtimes::KubePod::new("shop", name, &[("pod-template-hash", "5d8f6c7b9")]);
        ctrd.start_sandbox(&mut pod, image);
        let mut c = pod.container("ledger", 32 << 20, &["/bin/busybox", "tail", "/dev/zero"]);
        let out = ctrd.run(&mut c, image);
        assert_eq!(out.status.code(), Some(137), "{out:?}\n{}", ctrd.log());
    }
    let ledger = [("owner_kind", "Deployment"), ("owner", "ledger-api")];
    d.wait_metric_sum("sensor_oom_kills_total", &ledger, 2.0, Duration::from_secs(10));

    // The rules see both kills under one owner, on this one host; pg-main runs without kills.
    let owner_value = |e: &str, owner: &str| {
        let r = prom.query(e);
        r.iter().find(|s| s["metric"]["owner"] == owner).map(sample_value)
    };
    let start = std::time::Instant::now();
    while owner_value("namespace_owner:sensor_oom_kills:increase1h", "ledger-api") != Some(2.0)
        || owner_value("namespace_owner:sensor_hosts_running:count", "pg-main").is_none()
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "owner rules never saw the kills: {:?}\n{}",
            prom.query("namespace_owner:sensor_oom_kills:increase1h"),
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let q = |e: &str| owner_value(e, "ledger-api");
    assert_eq!(q("instance_namespace_owner:sensor_oom_kills:increase1h"), Some(2.0));
    assert_eq!(q("namespace_owner:sensor_hosts_with_oom_kills:count1h"), Some(1.0));
    assert_eq!(q("namespace_owner:sensor_hosts_running:count"), Some(1.0));
    assert_eq!(
        owner_value("namespace_owner:sensor_hosts_running:count", "pg-main"),
        Some(1.0)
    );
    assert_eq!(
        owner_value("namespace_owner:sensor_oom_kills:increase1h", "pg-main"),
        None
    );
    // Two owners, 0 and 2 kills: p90 1.8, the threshold 3 x that (above the floor of 5).
    let one = |e: &str| prom.query(e).first().map(sample_value);
    assert_eq!(one("fleet:sensor_oom_kills_per_owner:quantile90_1h"), Some(1.8));
    assert_eq!(one("fleet:sensor_oom_kills_owner_outlier_threshold:1h"), Some(5.4));

    // Enough scrapes since the kills for increase() over 30s to have two samples.
    std::thread::sleep(Duration::from_secs(3));
    let (exprs, _) = dashboard_exprs();
    let owner_exprs: Vec<_> = exprs.iter().filter(|(_, e)| e.contains("owner")).collect();
    assert!(owner_exprs.len() >= 8, "{owner_exprs:?}");
    for (panel, e) in owner_exprs {
        let r = prom.query(&substitute(e, &instance));
        assert!(!r.is_empty(), "owner panel {panel} is empty: {e}");
        if r.iter().any(|s| s["metric"].get("owner").is_some()) {
            assert!(
                r.iter().all(|s| s["metric"]["owner"] == "ledger-api"
                    && s["metric"]["owner_kind"] == "Deployment"
                    && s["metric"]["namespace"] == "shop"),
                "owner panel {panel}: {r:?}"
            );
        }
    }
    assert_eq!(d.stop().code(), Some(0));
}

#[test]
fn fleet_rules_hold_at_10000_hosts_on_a_real_tsdb() {
    // The full scale check (deploy/prometheus/scale/scale_check.py, also `cargo xtask
    // scale-check`): 10,000 hosts x 4 hours backfilled with promtool into a real TSDB, the rule
    // expressions evaluated by a real Prometheus at the end of each hour. About 5 s.
    let Some(_) = promtool() else { return };
    if Command::new("prometheus").arg("--version").output().is_err() {
        tool_missing("prometheus", "apt-get install prometheus");
        return;
    }
    let out = Command::new("python3")
        .arg(prometheus_dir().join("scale/scale_check.py"))
        .args(["--hosts", "10000", "--hours", "4", "--json"])
        .output()
        .unwrap();
    let t = text(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {t}"));
    let hours = v["hours_checked"].as_array().unwrap();
    assert_eq!(hours.len(), 3, "{t}");
    for h in hours {
        assert_eq!(h["instance:sensor_oom_kills:increase1h (hosts > 0)"], 100.0, "{h}");
        assert_eq!(h["fleet:sensor_hosts_with_oom_kills:ratio1h"], 0.01, "{h}");
        let per_hour = h["fleet:sensor_oom_kills:rate1h"].as_f64().unwrap() * 3600.0;
        assert!((per_hour - 100.0).abs() < 5.0, "{h}");
        eprintln!("hour {}: query times (ms) {}", h["hour"], h["times_ms"]);
    }
    assert_eq!(v["samples"], 2_703_056);
    assert!(out.status.success(), "{t}");
}
