//! The Alertmanager config: amtool, the routes, grouping and inhibition in a real Alertmanager.

use super::*;

fn alertmanager_file() -> PathBuf {
    root().join("deploy/alertmanager/alertmanager.yml")
}

#[test]
fn alertmanager_config_passes_amtool_and_routes_the_sensor_alerts() {
    if !require_tool(
        "amtool",
        "apt-get install prometheus-alertmanager; `cargo xtask deps` does it",
    ) {
        return;
    }
    let file = alertmanager_file();
    let out = Command::new("amtool").arg("check-config").arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("SUCCESS"), "{}", text(&out));
    // (labels, receivers in routing order)
    let cases: &[(&str, &str)] = &[
        ("alertname=SensorOOMKillStorm target=host severity=warning instance=h1", "ticket"),
        ("alertname=SensorDown target=host severity=critical instance=h1", "page"),
        ("alertname=SensorEventsLost target=host severity=warning instance=h1", "ticket"),
        (
            "alertname=SensorWorkloadOOMKillStorm target=workload severity=warning instance=h1 namespace=shop pod=web-1",
            "remediation,ticket",
        ),
        ("alertname=SensorOOMOutlierHost target=host severity=warning instance=h1", "remediation,ticket"),
        (
            "alertname=SensorOOMOutlierOwner target=workload severity=warning namespace=shop owner_kind=Deployment owner=ledger",
            "ticket",
        ),
        ("alertname=SensorGlobalOOMKills target=host severity=critical instance=h1", "remediation,page"),
        ("alertname=SensorFleetOOMHostRatioHigh target=fleet severity=warning", "page"),
        ("alertname=SensorCheckDown target=check severity=critical check=shop", "page"),
        (
            "alertname=SensorCheckUnreachableFromHost target=host severity=warning instance=h1 check=shop",
            "ticket",
        ),
        (
            "alertname=SensorCheckDownFromLocation target=check severity=warning location=zone-b check=shop",
            "ticket",
        ),
        ("alertname=SomethingElse severity=critical", "ticket"),
    ];
    for (labels, want) in cases {
        let out = Command::new("amtool")
            .args(["config", "routes", "test", "--config.file"])
            .arg(&file)
            .arg(format!("--verify.receivers={want}"))
            .args(labels.split(' '))
            .output()
            .unwrap();
        assert!(out.status.success(), "{labels} -> want {want}: {}", text(&out));
    }
    // And a wrong expectation fails, so the cases above really are checked.
    let out = Command::new("amtool")
        .args(["config", "routes", "test", "--config.file"])
        .arg(&file)
        .args([
            "--verify.receivers=page",
            "alertname=SensorOOMKillStorm",
            "target=host",
            "severity=warning",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    // Every alert of the rules carries the labels the routes use.
    let rules: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(prometheus_dir().join("sensor-rules.yml")).unwrap()).unwrap();
    for g in rules["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            if let Some(a) = r["alert"].as_str() {
                let sev = r["labels"]["severity"].as_str().unwrap_or_default();
                let target = r["labels"]["target"].as_str().unwrap_or_default();
                assert!(["critical", "warning"].contains(&sev), "{a}: severity {sev:?}");
                assert!(
                    ["host", "workload", "fleet", "check"].contains(&target),
                    "{a}: target {target:?}"
                );
            }
        }
    }
}

#[test]
fn alertmanager_groups_by_host_namespace_and_fleet_and_sensor_down_inhibits() {
    // The shipped file on a real Alertmanager (Debian's 0.25), alerts posted through its API.
    if !require_tool("prometheus-alertmanager", "apt-get install prometheus-alertmanager") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("sensor-am-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    // The remediation receiver's credential files (the Kubernetes Secret's mount) put here: a
    // real Alertmanager refuses to start without its CA file.
    let secrets = "/etc/alertmanager/secrets/sensor-remediate-alertmanager/";
    let shipped = std::fs::read_to_string(alertmanager_file()).unwrap();
    assert!(shipped.contains(secrets), "the remediation receiver reads {secrets}");
    let pki = tls::Pki::new(&dir.join("secrets"));
    std::fs::copy(&pki.ca, dir.join("secrets/ca.crt")).unwrap();
    std::fs::write(dir.join("secrets/token"), "0123456789abcdef0123456789abcdef\n").unwrap();
    let config = dir.join("alertmanager.yml");
    std::fs::write(
        &config,
        shipped.replace(secrets, &format!("{}/secrets/", dir.display())),
    )
    .unwrap();
    let mut cmd = Command::new("prometheus-alertmanager");
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.path={}", dir.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=");
    let am = Service::start("alertmanager", cmd, port, "/-/ready", dir.join("am.log"));
    let alert = |name: &str, target: &str, sev: &str, extra: &[(&str, &str)]| {
        let mut l = serde_json::json!({"alertname": name, "target": target, "severity": sev, "cluster": "c1"});
        for (k, v) in extra {
            l[*k] = serde_json::json!(v);
        }
        serde_json::json!({"labels": l, "annotations": {"summary": "test"}})
    };
    let alerts = serde_json::json!([
        alert(
            "SensorDown",
            "host",
            "critical",
            &[("instance", "h1"), ("job", "sensor")]
        ),
        alert("SensorOOMKillStorm", "host", "warning", &[("instance", "h1")]),
        alert("SensorOOMKillStorm", "host", "warning", &[("instance", "h2")]),
        alert(
            "SensorWorkloadOOMKillStorm",
            "workload",
            "warning",
            &[("instance", "h2"), ("namespace", "shop"), ("pod", "a")]
        ),
        alert(
            "SensorWorkloadOOMKillStorm",
            "workload",
            "warning",
            &[("instance", "h3"), ("namespace", "shop"), ("pod", "b")]
        ),
        alert(
            "SensorWorkloadOOMKillStorm",
            "workload",
            "warning",
            &[("instance", "h1"), ("namespace", "cart"), ("pod", "c")]
        ),
        alert("SensorFleetOOMHostRatioHigh", "fleet", "warning", &[]),
        // A check down for a quorum of the fleet (no instance), and two hosts that fail a check
        // alone: the one failing the check that is down anyway is inhibited.
        alert("SensorCheckDown", "check", "critical", &[("check", "shop")]),
        alert(
            "SensorCheckUnreachableFromHost",
            "host",
            "warning",
            &[("instance", "h4"), ("check", "shop")]
        ),
        alert(
            "SensorCheckUnreachableFromHost",
            "host",
            "warning",
            &[("instance", "h5"), ("check", "cart")]
        ),
        alert(
            "SensorCheckDownFromLocation",
            "check",
            "warning",
            &[("location", "zone-b"), ("check", "shop")]
        ),
    ]);
    let (code, body) = http_request(
        port,
        "POST",
        "/api/v2/alerts",
        &["Content-Type: application/json"],
        Some(&alerts.to_string()),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");

    // Inhibition: SensorDown on h1 suppresses h1's other alerts, and nothing on h2/h3.
    let start = std::time::Instant::now();
    let state = |a: &serde_json::Value| a["status"]["state"].as_str().unwrap_or("").to_string();
    loop {
        let (_, body) = http_get(port, "/api/v2/alerts").unwrap();
        let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        let on = |inst: &str| -> Vec<(String, String)> {
            list.iter()
                .filter(|a| a["labels"]["instance"] == inst)
                .map(|a| (a["labels"]["alertname"].as_str().unwrap().to_string(), state(a)))
                .collect()
        };
        let h1 = on("h1");
        let location = list
            .iter()
            .find(|a| a["labels"]["alertname"] == "SensorCheckDownFromLocation")
            .map(state);
        let ok = list.len() == 11
            && location.as_deref() == Some("suppressed")
            && h1.iter().all(|(n, s)| (n == "SensorDown") == (s == "active"))
            && on("h2").iter().chain(on("h3").iter()).all(|(_, s)| s == "active")
            && on("h4") == [("SensorCheckUnreachableFromHost".to_string(), "suppressed".to_string())]
            && on("h5") == [("SensorCheckUnreachableFromHost".to_string(), "active".to_string())];
        if ok {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "inhibition not as expected: h1 {h1:?}, h2 {:?}\n{body}\n{}",
            on("h2"),
            am.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Groups: per receiver, the labels each notification is grouped by, and its size. The
    // dispatcher takes alerts in asynchronously: poll until every group is there.
    let want: Vec<(String, String, usize)> = [
        // The fleet alert: one notification for the fleet.
        ("page", "alertname=SensorFleetOOMHostRatioHigh", 1),
        // SensorDown pages by host.
        ("page", "alertname=SensorDown,cluster=c1,instance=h1", 1),
        // A check pages once, whatever the hosts and clusters; a host failing a check alone
        // is a ticket for that host.
        ("page", "alertname=SensorCheckDown,check=shop", 1),
        ("ticket", "alertname=SensorCheckDownFromLocation,check=shop", 1),
        ("ticket", "alertname=SensorCheckUnreachableFromHost,cluster=c1,instance=h4", 1),
        ("ticket", "alertname=SensorCheckUnreachableFromHost,cluster=c1,instance=h5", 1),
        // Host alerts: by host.
        ("ticket", "alertname=SensorOOMKillStorm,cluster=c1,instance=h1", 1),
        ("ticket", "alertname=SensorOOMKillStorm,cluster=c1,instance=h2", 1),
        // Workload alerts: by namespace, across hosts (h2 and h3 in one notification).
        ("ticket", "alertname=SensorWorkloadOOMKillStorm,cluster=c1,namespace=cart", 1),
        ("ticket", "alertname=SensorWorkloadOOMKillStorm,cluster=c1,namespace=shop", 2),
        // The remediation receiver gets each of its alerts in a notification of its own.
        ("remediation", "alertname=SensorWorkloadOOMKillStorm,cluster=c1,instance=h1,namespace=cart,pod=c,severity=warning,target=workload", 1),
        ("remediation", "alertname=SensorWorkloadOOMKillStorm,cluster=c1,instance=h2,namespace=shop,pod=a,severity=warning,target=workload", 1),
        ("remediation", "alertname=SensorWorkloadOOMKillStorm,cluster=c1,instance=h3,namespace=shop,pod=b,severity=warning,target=workload", 1),
    ]
    .iter()
    .map(|(r, l, n)| (r.to_string(), l.to_string(), *n))
    .collect();
    let mut want = want;
    want.sort();
    let start = std::time::Instant::now();
    loop {
        let (_, body) = http_get(port, "/api/v2/alerts/groups").unwrap();
        let groups: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
        let mut got: Vec<(String, String, usize)> = groups
            .iter()
            .map(|g| {
                let labels: std::collections::BTreeMap<String, String> =
                    serde_json::from_value(g["labels"].clone()).unwrap_or_default();
                let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                (
                    g["receiver"]["name"].as_str().unwrap_or_default().to_string(),
                    labels.join(","),
                    g["alerts"].as_array().map_or(0, Vec::len),
                )
            })
            .collect();
        got.sort();
        if got == want {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "groups:\n{got:#?}\nwant:\n{want:#?}\n{body}\n{}",
            am.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(am);
    let _ = std::fs::remove_dir_all(&dir);
}
