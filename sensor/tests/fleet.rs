//! From a real OOM storm to a remediation, live, on loopback: a real sensor, a per-cluster
//! Prometheus in agent mode (deploy/prometheus/agent.yml), a central Prometheus receiving its
//! remote writes and running the fleet rules (central.yml, sensor-rules.yml), a real
//! Alertmanager (deploy/alertmanager/alertmanager.yml) and `sensor remediate`
//! (deploy/remediate/remediate.yaml) as shipped: TLS and a bearer token, sent by Alertmanager
//! from the shipped receiver's `http_config`. The test configs are generated from the
//! shipped files (loaded as YAML, intervals and targets overridden); the shipped files are
//! never edited. Under CI=true a missing tool fails the test.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{prom::*, *};
use serde_yaml_ng::Value;

const TOKEN: &str = "0d5e8f7a6b4c3d2e1f0a9b8c7d6e5f4a";
const AUTH: &str = "Authorization: Bearer 0d5e8f7a6b4c3d2e1f0a9b8c7d6e5f4a";

/// The runner's HTTPS, trusting the test CA, with the token.
fn runner_get(port: u16, ca: &Path, path: &str) -> std::io::Result<(u16, String)> {
    tls::https_request(port, ca, None, "GET", path, &[AUTH], None)
}

#[test]
fn oom_storm_reaches_remediation_through_agent_central_and_alertmanager() {
    let Some(_k) = privileged("oom_storm_reaches_remediation_through_agent_central_and_alertmanager") else {
        return;
    };
    if !require_tool("prometheus", "apt-get install prometheus; `cargo xtask deps` does it")
        || !require_tool(
            "prometheus-alertmanager",
            "apt-get install prometheus-alertmanager; `cargo xtask deps` does it",
        )
    {
        return;
    }
    let t0 = Instant::now();
    let tmp = std::env::temp_dir().join(format!("sensor-fleet-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let cg = MemCgroup::new("sensor-it-fleet", 24 << 20);
    let d = Daemon::start(&["--probes.tcp.enabled", "false"]);
    let instance = format!("127.0.0.1:{}", d.port);
    let (agent_port, central_port, am_port, rem_port) = (free_port(), free_port(), free_port(), free_port());

    // sensor remediate: the shipped example and web config, acting (not dry-run), with a test
    // certificate and token in place of the Kubernetes Secrets; the storm rule's action appends
    // the alert to a file.
    let actions_file = tmp.join("actions.log");
    let pki = tls::Pki::new(&tmp.join("pki"));
    std::fs::write(tmp.join("token"), format!("{TOKEN}\n")).unwrap();
    let mut web = load("deploy/remediate/web.yml");
    web["tls_server_config"]["cert_file"] = y(&pki.server_cert.display().to_string());
    web["tls_server_config"]["key_file"] = y(&pki.server_key.display().to_string());
    write(&tmp.join("web.yml"), &web);
    let mut rem = load("deploy/remediate/remediate.yaml");
    rem["listen"] = y(&format!("127.0.0.1:{rem_port}"));
    rem["dry_run"] = Value::Bool(false);
    rem["web_config_file"] = y(&tmp.join("web.yml").display().to_string());
    rem["bearer_token_file"] = y(&tmp.join("token").display().to_string());
    let rules = rem["rules"].as_sequence_mut().unwrap();
    let storm = rules
        .iter_mut()
        .find(|r| r["alert"] == "SensorWorkloadOOMKillStorm")
        .expect("the example has the storm rule");
    // A cgroup outside Kubernetes has no namespace/pod: the target is the host's cgroup, and
    // only this test's cgroup on this sensor is allowed.
    storm["target_labels"] = y("[instance, cgroup]");
    storm["allowed_targets"] = serde_yaml_ng::to_value(serde_json::json!({
        "instance": [regex::escape(&instance)],
        "cgroup": [regex::escape(&cg.rel)],
    }))
    .unwrap();
    storm["cooldown"] = y("10m");
    storm["actions"] = y(&format!(
        "[{{name: write-file, type: exec, shell: true, command: ['printf \"%s %s %s\\n\" \"$ALERT_NAME\" \"$ALERT_LABEL_CGROUP\" \"$ALERT_STATUS\" >> {}']}}]",
        actions_file.display()
    ));
    write(&tmp.join("remediate.yaml"), &rem);
    let mut cmd = Command::new(SENSOR);
    cmd.args(["remediate", "--config"]).arg(tmp.join("remediate.yaml"));
    let mut remediate = Service::spawn("sensor remediate", cmd, rem_port, tmp.join("remediate.log"));
    remediate.wait_until(|p| matches!(runner_get(p, &pki.ca, "/healthz"), Ok((200, _))));
    let (code, _) = tls::https_request(rem_port, &pki.ca, None, "GET", "/api/v1/remediations", &[], None).unwrap();
    assert_eq!(code, 401, "the runner asks for the token");

    // Alertmanager: the shipped routes, with test timings, the runner's port and credentials.
    let mut am = alertmanager_config();
    assert_eq!(am["route"]["routes"][0]["receiver"], "remediation");
    for r in am["receivers"].as_sequence_mut().unwrap() {
        if r["name"] == "remediation" {
            // The shipped http_config (token and CA from files), the files put here.
            let wh = &mut r["webhook_configs"][0];
            wh["url"] = y(&format!("https://127.0.0.1:{rem_port}/webhook"));
            let http = &mut wh["http_config"];
            assert_eq!(http["authorization"]["type"], "Bearer");
            http["authorization"]["credentials_file"] = y(&tmp.join("token").display().to_string());
            http["tls_config"]["ca_file"] = y(&pki.ca.display().to_string());
        } else {
            // People's receivers: a closed loopback port (nothing leaves the host).
            r["webhook_configs"][0]["url"] = y(&format!("http://127.0.0.1:{}/", free_port()));
        }
    }
    let alertmanager = start_alertmanager(&tmp, &am, am_port);

    // Central Prometheus: the shipped config and rules, evaluated every second, alerting to
    // this Alertmanager; the workload storm's 10-minute window shortened to 20 s.
    let rules = fast_rules(|r| {
        if r["alert"] == "SensorWorkloadOOMKillStorm" {
            let e = r["expr"].as_str().unwrap().replace("10m", "20s");
            r["expr"] = Value::String(e);
        }
    });
    let central_cmd = central_prometheus(&tmp, &rules, central_port, am_port);
    let mut central = Service::start(
        "central prometheus",
        central_cmd(),
        central_port,
        "/-/ready",
        tmp.join("central.log"),
    );

    // Agent: the shipped config, scraping this sensor every second, writing to the central.
    let agent = start_agent(
        &tmp,
        y(&format!(
            "{{job_name: sensor, static_configs: [{{targets: ['{instance}']}}]}}"
        )),
        agent_port,
        central_port,
    );

    let log_files: Vec<(&str, PathBuf)> = vec![
        ("remediate", remediate.log.clone()),
        ("alertmanager", alertmanager.log.clone()),
        ("central", tmp.join("central.log")),
        ("central after restart", tmp.join("central2.log")),
        ("agent", agent.log.clone()),
        ("sensor", d.stderr_path.clone()),
    ];
    let logs = || logs(&log_files);
    let up = format!("up{{job=\"sensor\",instance=\"{instance}\",cluster=\"test\"}}");
    wait(
        "the sensor's samples reach the central tier",
        Duration::from_secs(30),
        logs,
        || query(central_port, &up).first().filter(|s| value(s) == 1.0).map(|_| ()),
    );

    let audit = || -> Vec<serde_json::Value> {
        match runner_get(rem_port, &pki.ca, "/api/v1/remediations") {
            Ok((200, b)) => serde_json::from_str(&b).unwrap_or_default(),
            _ => Vec::new(),
        }
    };
    let storm_entries = |result: &str| -> usize {
        audit()
            .iter()
            .filter(|e| e["alert"] == "SensorWorkloadOOMKillStorm" && e["labels"]["cgroup"] == cg.rel.as_str())
            .filter(|e| e["result"] == result)
            .count()
    };
    let lines = || std::fs::read_to_string(&actions_file).unwrap_or_default();
    let kill_labels = cg.kill_labels();

    // Storm 1: five real OOM kills in the child cgroup -> the action runs, once.
    let storm = Instant::now();
    for _ in 0..5 {
        cg.cause_oom_kill();
    }
    d.wait_metric_sum("sensor_oom_kills_total", &kill_labels, 5.0, Duration::from_secs(10));
    wait("storm 1: the action ran", Duration::from_secs(60), logs, || {
        (storm_entries("success") == 1).then_some(())
    });
    eprintln!("storm 1 to action: {:.1}s", storm.elapsed().as_secs_f64());
    let firing_line = format!("SensorWorkloadOOMKillStorm {} firing\n", cg.rel);
    assert_eq!(lines(), firing_line, "the exec action ran exactly once");

    // The storm ends: the resolved notification arrives and runs nothing.
    wait("storm 1 resolved", Duration::from_secs(60), logs, || {
        (storm_entries("skipped_resolved") >= 1).then_some(())
    });
    assert_eq!(lines(), firing_line, "nothing runs on a resolved alert");

    // Storm 2 inside the cooldown: skipped, with the reason.
    for _ in 0..5 {
        cg.cause_oom_kill();
    }
    d.wait_metric_sum("sensor_oom_kills_total", &kill_labels, 10.0, Duration::from_secs(10));
    wait(
        "storm 2: skipped for the cooldown",
        Duration::from_secs(60),
        logs,
        || (storm_entries("skipped_cooldown") == 1).then_some(()),
    );
    let entry = audit().into_iter().find(|e| e["result"] == "skipped_cooldown").unwrap();
    let reason = entry["reason"].as_str().unwrap();
    assert!(reason.starts_with("cooldown: this target was acted on "), "{reason}");
    assert_eq!(lines(), firing_line, "still exactly one action");
    let (_, m) = runner_get(rem_port, &pki.ca, "/metrics").unwrap();
    let counted = |result: &str| {
        metric(
            &m,
            "sensor_remediation_actions_total",
            &[
                ("alert", "SensorWorkloadOOMKillStorm"),
                ("action", "write-file"),
                ("result", result),
            ],
        )
    };
    assert_eq!(counted("success"), Some(1.0), "{m}");
    assert_eq!(counted("skipped_cooldown"), Some(1.0), "{m}");
    assert!(counted("skipped_resolved") >= Some(1.0), "{m}");
    assert_eq!(counted("failure"), None, "{m}");
    assert_eq!(
        metric(&m, "sensor_remediation_webhooks_total", &[("result", "unauthorized")]),
        Some(1.0),
        "Alertmanager's notifications all carried the token; only the test's own tokenless GET was refused: {m}"
    );

    // The central tier goes down for a while; the agent buffers. Two more kills meanwhile.
    let down_at = std::time::SystemTime::now();
    central.stop();
    for _ in 0..2 {
        cg.cause_oom_kill();
    }
    d.wait_metric_sum("sensor_oom_kills_total", &kill_labels, 12.0, Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(6));
    let down_for = down_at.elapsed().unwrap().as_secs_f64();
    central = Service::start(
        "central prometheus",
        central_cmd(),
        central_port,
        "/-/ready",
        tmp.join("central2.log"),
    );
    let host_rule = format!("instance:sensor_oom_kills:increase1h{{instance=\"{instance}\"}}");
    wait(
        "after the restart, the fleet rule counts every kill",
        Duration::from_secs(60),
        logs,
        || {
            query(central_port, &host_rule)
                .first()
                .filter(|s| value(s) == 12.0)
                .map(|_| ())
        },
    );
    // Every scrape of the down time arrived: consecutive `up` samples at most ~1 s apart.
    let span = (down_at.elapsed().unwrap().as_secs_f64() + 5.0).ceil() as u64;
    let samples = wait(
        "the buffered samples are in the central TSDB",
        Duration::from_secs(30),
        logs,
        || {
            let r = query(central_port, &format!("{up}[{span}s]"));
            let ts: Vec<f64> = r.first()?["values"]
                .as_array()?
                .iter()
                .filter_map(|v| v[0].as_f64())
                .collect();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64();
            (ts.last().is_some_and(|l| now - l < 3.0)).then_some(ts)
        },
    );
    let down_start = down_at.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let during: Vec<f64> = samples
        .iter()
        .copied()
        .filter(|t| *t >= down_start && *t <= down_start + down_for)
        .collect();
    let max_gap = samples.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    eprintln!(
        "central down {down_for:.1}s: {} samples of `up` from that time arrived, largest gap {max_gap:.2}s",
        during.len()
    );
    assert!(max_gap < 1.6, "a scrape was lost: gap {max_gap}s in {samples:?}");
    assert!(
        during.len() as f64 >= down_for - 2.0,
        "{} samples in {down_for}s",
        during.len()
    );
    assert_eq!(lines(), firing_line, "the restart re-ran nothing");

    drop(agent);
    drop(central);
    drop(alertmanager);
    drop(remediate);
    assert_eq!(d.stop().code(), Some(0));
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!("total {:.1}s", t0.elapsed().as_secs_f64());
}
