//! Checks from every node, live: four sensors, each in a network namespace of its own standing
//! for a location (zone-a, zone-b, zone-c, and one without a location, as a sensor of an older
//! version), probe one HTTP target in a hub namespace. In the hub: a per-cluster Prometheus in
//! agent mode (deploy/prometheus/agent.yml) scraping the four, the central Prometheus with the
//! shipped rules (central.yml, sensor-rules.yml) and a real Alertmanager
//! (deploy/alertmanager/alertmanager.yml) whose receivers are a webhook recorder.
//!
//! A broken route on one node gives one host alert (SensorCheckUnreachableFromHost) and no
//! check alert; a target down for every node gives exactly one SensorCheckDown notification,
//! and its recovery resolves it. Test timings (documented in deploy/README.md): checks every
//! 500 ms with a 3 s alert window, scrapes and rule evaluations every second, Alertmanager
//! groups after 1 s, and the host alert's `for: 5m` shortened to 5 s. Nothing leaves the
//! namespaces the test creates. Under CI=true a missing tool or privilege fails the test.

mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use common::{netns::*, prom::*, *};
use serde_json::Value as Json;
use serde_yaml_ng::Value;

/// The four vantage points: (node name, location; "" = none).
const NODES: [(&str, &str); 4] = [
    ("node-a", "zone-a"),
    ("node-b", "zone-b"),
    ("node-c", "zone-c"),
    ("node-d", ""),
];
const SENSOR_PORT: u16 = 9442;

/// An HTTP/1.1 server on `addr` answering every request with 200 "ok" while `healthy`, else
/// 503; one connection at a time (four probers, two requests a second each).
fn target(addr: &str, healthy: Arc<AtomicBool>) -> u16 {
    let l = TcpListener::bind(addr).unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            if read_request(&mut s).is_none() {
                continue;
            }
            let resp: &[u8] = if healthy.load(Ordering::SeqCst) {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            } else {
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\ndown"
            };
            let _ = s.write_all(resp);
        }
    });
    port
}

/// One request on `s`: (path, body); None when it is cut short.
fn read_request(s: &mut TcpStream) -> Option<(String, String)> {
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let path = line.split_whitespace().nth(1)?.to_string();
    let mut len = 0;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some((path, String::from_utf8_lossy(&body).into_owned()))
}

/// A notification Alertmanager sent: the receiver's path (`/page`, `/ticket`) and the payload.
#[derive(Clone, Debug)]
struct Notification {
    receiver: String,
    body: Json,
}

impl Notification {
    fn status(&self) -> &str {
        self.body["status"].as_str().unwrap_or_default()
    }

    fn alerts(&self) -> Vec<&Json> {
        self.body["alerts"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default()
    }

    /// Whether it is about `alertname` (the group's label).
    fn is(&self, alertname: &str) -> bool {
        self.body["groupLabels"]["alertname"] == alertname
    }
}

/// The webhook receiver of every Alertmanager receiver: records each notification.
fn recorder() -> (u16, Arc<Mutex<Vec<Notification>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = Arc::clone(&got);
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let Some((path, body)) = read_request(&mut s) else {
                continue;
            };
            let body: Json = serde_json::from_str(&body).unwrap_or(Json::Null);
            g.lock().unwrap().push(Notification {
                receiver: path.trim_start_matches('/').to_string(),
                body,
            });
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (port, got)
}

/// GET `path` from the sensor of spoke `i` (from the hub).
fn sensor_get(i: usize, path: &str) -> std::io::Result<(u16, String)> {
    let s = TcpStream::connect((Star::spoke_addr(i).as_str(), SENSOR_PORT))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    get_on(s, &Star::spoke_addr(i), path)
}

/// The sensor of spoke `i` (node `NODES[i-1]`) in its namespace, checking `shop` (the target
/// that goes down) and `catalog` (always up, `sample: 0.5`: run by half of the fleet).
fn start_sensor(star: &Star, i: usize, tmp: &std::path::Path, shop: &str, catalog: &str) -> Service {
    let (node, location) = NODES[i - 1];
    let cfg = tmp.join(format!("{node}.yaml"));
    std::fs::write(
        &cfg,
        format!(
            "probes: {{oom: {{enabled: false}}, memcg: {{enabled: false}}, tcp: {{enabled: false}}}}\n\
             journal: {{enabled: false}}\n\
             vantage: {{location: '{location}', node: {node}}}\n\
             alerting: {{window: 3s, min_samples: 3}}\n\
             checks:\n\
             - {{name: shop, type: http, url: 'http://{shop}/health', interval: 500ms, timeout: 1s}}\n\
             - {{name: catalog, type: http, url: 'http://{catalog}/health', interval: 500ms, timeout: 1s, sample: 0.5}}\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &star.spokes[i - 1], SENSOR, "run", "--config"])
        .arg(&cfg)
        .args(["--listen", &format!("{}:{SENSOR_PORT}", Star::spoke_addr(i))]);
    let mut s = Service::spawn(
        &format!("sensor {node}"),
        cmd,
        SENSOR_PORT,
        tmp.join(format!("{node}.log")),
    );
    s.wait_until(|_| matches!(sensor_get(i, "/readyz"), Ok((200, _))));
    s
}

#[test]
fn a_quorum_pages_once_per_check_and_a_lone_host_is_blamed_on_its_network() {
    let test = "a_quorum_pages_once_per_check_and_a_lone_host_is_blamed_on_its_network";
    if !require_netns(test)
        || !require_tool("prometheus", "apt-get install prometheus; `cargo xtask deps` does it")
        || !require_tool(
            "prometheus-alertmanager",
            "apt-get install prometheus-alertmanager; `cargo xtask deps` does it",
        )
    {
        return;
    }
    let star = Star::new("q", NODES.len());
    let hub = star.hub.clone();
    // Everything below runs in the hub: its sockets and the processes it starts live there.
    in_netns(&hub, || quorum_in_hub(&star));
}

fn quorum_in_hub(star: &Star) {
    let t0 = Instant::now();
    let tmp = std::env::temp_dir().join(format!("sensor-vantage-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let [shop_ip, catalog_ip] = Star::SERVICES;
    let healthy = Arc::new(AtomicBool::new(true));
    let shop = format!("{shop_ip}:{}", target(&format!("{shop_ip}:0"), Arc::clone(&healthy)));
    let catalog = format!(
        "{catalog_ip}:{}",
        target(&format!("{catalog_ip}:0"), Arc::new(AtomicBool::new(true)))
    );
    let sensors: Vec<Service> = (1..=NODES.len())
        .map(|i| start_sensor(star, i, &tmp, &shop, &catalog))
        .collect();

    let (rec_port, notes) = recorder();
    let (agent_port, central_port, am_port) = (free_port(), free_port(), free_port());
    let mut am = alertmanager_config();
    for r in am["receivers"].as_sequence_mut().unwrap() {
        let name = r["name"].as_str().unwrap().to_string();
        r["webhook_configs"][0] = y(&format!("{{url: 'http://127.0.0.1:{rec_port}/{name}'}}"));
    }
    let alertmanager = start_alertmanager(&tmp, &am, am_port);
    let rules = fast_rules(|r: &mut Value| {
        if r["alert"] == "SensorCheckUnreachableFromHost" {
            assert_eq!(r["for"], "5m", "the shipped delay");
            r["for"] = y("5s");
        }
    });
    let central = Service::start(
        "central prometheus",
        central_prometheus(&tmp, &rules, central_port, am_port)(),
        central_port,
        "/-/ready",
        tmp.join("central.log"),
    );
    let targets: Vec<String> = (1..=NODES.len())
        .map(|i| {
            format!(
                "{{targets: ['{}:{SENSOR_PORT}'], labels: {{instance: {}}}}}",
                Star::spoke_addr(i),
                NODES[i - 1].0
            )
        })
        .collect();
    let agent = start_agent(
        &tmp,
        y(&format!(
            "{{job_name: sensor, static_configs: [{}]}}",
            targets.join(", ")
        )),
        agent_port,
        central_port,
    );
    let mut log_files: Vec<(&str, PathBuf)> = vec![
        ("alertmanager", alertmanager.log.clone()),
        ("central", central.log.clone()),
        ("agent", agent.log.clone()),
    ];
    for s in &sensors {
        log_files.push((s.name.as_str(), s.log.clone()));
    }
    let notes_now = || notes.lock().unwrap().clone();
    let explain = || format!("notifications: {:#?}\n{}", notes_now(), logs(&log_files));
    let q = |e: &str| query(central_port, e);
    let one = |e: &str| -> Option<f64> {
        let r = q(e);
        (r.len() == 1).then(|| value(&r[0]))
    };

    // Every vantage point reports `shop`, each under its location (node-d under none).
    wait(
        "four vantage points report shop",
        Duration::from_secs(30),
        explain,
        || (one("check:sensor_check_vantage_points:count{check=\"shop\"}") == Some(4.0)).then_some(()),
    );
    let mut locations: Vec<String> = q("location_check:sensor_check_vantage_points:count{check=\"shop\"}")
        .iter()
        .map(|s| s["metric"]["location"].as_str().unwrap_or("").to_string())
        .collect();
    locations.sort();
    assert_eq!(locations, ["", "zone-a", "zone-b", "zone-c"]);
    let (_, m) = sensor_get(1, "/metrics").unwrap();
    assert_eq!(
        metric(
            &m,
            "sensor_check_up",
            &[("check", "shop"), ("type", "http"), ("location", "zone-a")]
        ),
        Some(1.0),
        "{m}"
    );
    let (_, m) = sensor_get(4, "/metrics").unwrap();
    assert_eq!(
        metric(&m, "sensor_check_up", &[("check", "shop"), ("type", "http")]),
        Some(1.0),
        "{m}"
    );

    // `catalog` (sample: 0.5) runs exactly where the node/check hash puts it: on node-b and
    // node-d (the names are chosen for a split; all or none would prove little).
    let runs_sampled: Vec<&str> = NODES
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| sensor::checks::vantage::runs(n, "catalog", 0.5))
        .collect();
    assert_eq!(runs_sampled, ["node-b", "node-d"]);
    for (i, (node, location)) in NODES.iter().enumerate() {
        let (_, body) = sensor_get(i + 1, "/api/v1/checks").unwrap();
        let rep: Json = serde_json::from_str(&body).unwrap();
        assert_eq!(rep["vantage"]["location"], *location, "{body}");
        assert_eq!(rep["vantage"]["node"], *node, "{body}");
        let out = rep["vantage"]["sampled_out"] == serde_json::json!(["catalog"]);
        assert_eq!(out, !runs_sampled.contains(node), "{node}: {body}");
    }
    let sampled_points = wait(
        "the fleet counts catalog's two",
        Duration::from_secs(10),
        explain,
        || {
            let r = q("check:sensor_check_vantage_points:count{check=\"catalog\"}");
            let n = r.first().map_or(0.0, value) as usize;
            (n == runs_sampled.len()).then_some(n)
        },
    );
    assert_eq!(sampled_points, runs_sampled.len());

    // 1. node-c's route to the target breaks: one host alert for node-c, no check alert.
    let cut_at = Instant::now();
    star.cut(3, shop_ip);
    wait(
        "zone-c's availability drops, zone-a's does not",
        Duration::from_secs(30),
        explain,
        || {
            let c = one("location_check:sensor_check_availability:ratio1m{check=\"shop\",location=\"zone-c\"}")?;
            let a = one("location_check:sensor_check_availability:ratio1m{check=\"shop\",location=\"zone-a\"}")?;
            (c < 1.0 && a == 1.0).then_some(())
        },
    );
    let host = wait("the host alert for node-c", Duration::from_secs(40), explain, || {
        notes_now()
            .into_iter()
            .find(|n| n.is("SensorCheckUnreachableFromHost") && n.status() == "firing")
    });
    eprintln!("route cut to host alert: {:.1}s", cut_at.elapsed().as_secs_f64());
    assert_eq!(host.receiver, "ticket");
    let alerts = host.alerts();
    assert_eq!(alerts.len(), 1, "{host:#?}");
    let l = &alerts[0]["labels"];
    for (k, v) in [
        ("instance", "node-c"),
        ("check", "shop"),
        ("location", "zone-c"),
        ("cluster", "test"),
    ] {
        assert_eq!(l[k], v, "{k}: {host:#?}");
    }
    assert_eq!(
        alerts[0]["annotations"]["summary"],
        "node-c cannot pass check shop, which most other vantage points pass"
    );
    let all = notes_now();
    assert_eq!(all.len(), 1, "exactly the one host alert: {all:#?}");
    // SensorCheckDown was never even pending, and one vantage point of four was down.
    assert_eq!(
        q("count_over_time(ALERTS{alertname=\"SensorCheckDown\"}[5m])"),
        Vec::<Json>::new()
    );
    assert_eq!(
        one("check:sensor_check_vantage_points_down:count{check=\"shop\"}"),
        Some(1.0)
    );

    // The route is mended: the host alert resolves.
    star.mend(3, shop_ip);
    wait("the host alert resolves", Duration::from_secs(30), explain, || {
        notes_now()
            .iter()
            .any(|n| n.is("SensorCheckUnreachableFromHost") && n.status() == "resolved")
            .then_some(())
    });
    wait(
        "every vantage point passes shop again",
        Duration::from_secs(20),
        explain,
        || (one("check:sensor_check_vantage_points_down:count{check=\"shop\"}") == Some(0.0)).then_some(()),
    );
    let before = notes_now().len();

    // 2. The target goes down for everyone: exactly one SensorCheckDown notification, paged,
    // for the check and without an instance.
    let down_at = Instant::now();
    healthy.store(false, Ordering::SeqCst);
    let page = wait("SensorCheckDown is paged", Duration::from_secs(30), explain, || {
        notes_now()
            .into_iter()
            .skip(before)
            .find(|n| n.is("SensorCheckDown") && n.status() == "firing")
    });
    eprintln!("target down to page: {:.1}s", down_at.elapsed().as_secs_f64());
    assert_eq!(page.receiver, "page");
    let alerts = page.alerts();
    assert_eq!(alerts.len(), 1, "{page:#?}");
    let labels: std::collections::BTreeMap<String, String> =
        serde_json::from_value(alerts[0]["labels"].clone()).unwrap();
    assert_eq!(
        labels.keys().map(String::as_str).collect::<Vec<_>>(),
        ["alertname", "check", "severity", "target"],
        "one alert per check, without instance or cluster: {labels:?}"
    );
    assert_eq!(labels["check"], "shop");
    let summary = alerts[0]["annotations"]["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("Synthetic check shop is down: ") && summary.ends_with(" of 4 vantage points see it down"),
        "{summary}"
    );
    wait("all four see it down", Duration::from_secs(20), explain, || {
        (one("check:sensor_check_vantage_points_down:count{check=\"shop\"}") == Some(4.0)).then_some(())
    });
    // Longer than the host alert's `for` and many Alertmanager group intervals: nothing more.
    std::thread::sleep(Duration::from_secs(7));
    let during: Vec<Notification> = notes_now().into_iter().skip(before).collect();
    assert_eq!(
        during.len(),
        1,
        "exactly one notification while the target is down: {during:#?}"
    );

    // 3. The target recovers: SensorCheckDown resolves, and no host is blamed on the way.
    let up_at = Instant::now();
    healthy.store(true, Ordering::SeqCst);
    wait("SensorCheckDown resolves", Duration::from_secs(30), explain, || {
        notes_now()
            .iter()
            .skip(before)
            .any(|n| n.is("SensorCheckDown") && n.status() == "resolved")
            .then_some(())
    });
    eprintln!("target up to resolved: {:.1}s", up_at.elapsed().as_secs_f64());
    std::thread::sleep(Duration::from_secs(7));
    let after: Vec<Notification> = notes_now().into_iter().skip(before).collect();
    let kinds: Vec<(String, String, String)> = after
        .iter()
        .map(|n| {
            (
                n.receiver.clone(),
                n.body["groupLabels"]["alertname"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                n.status().to_string(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("page".to_string(), "SensorCheckDown".to_string(), "firing".to_string()),
            (
                "page".to_string(),
                "SensorCheckDown".to_string(),
                "resolved".to_string()
            ),
        ],
        "{after:#?}"
    );
    assert_eq!(
        q("count_over_time(ALERTS{alertname=\"SensorCheckUnreachableFromHost\",alertstate=\"firing\"}[5m])").len(),
        1,
        "only node-c's host alert ever fired"
    );

    drop(agent);
    drop(central);
    drop(alertmanager);
    for mut s in sensors {
        s.stop();
    }
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!("total {:.1}s", t0.elapsed().as_secs_f64());
}
