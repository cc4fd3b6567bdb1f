//! The live Prometheus/Alertmanager tests' helpers (tests/fleet.rs, tests/vantage.rs): the
//! shipped deploy/ files loaded as YAML, overridden and written for a test; the stack's
//! processes; instant queries; polling with an explanation on timeout.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde_yaml_ng::Value;

use super::{http_get, Service};

/// The repository's root (deploy/ is there).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A shipped file of the repository, as YAML.
pub fn load(rel: &str) -> Value {
    serde_yaml_ng::from_str(&std::fs::read_to_string(root().join(rel)).unwrap()).unwrap()
}

pub fn write(path: &Path, v: &Value) {
    std::fs::write(path, serde_yaml_ng::to_string(v).unwrap()).unwrap();
}

/// YAML text as a value (`y("{a: 1}")`).
pub fn y(s: &str) -> Value {
    serde_yaml_ng::from_str(s).unwrap()
}

/// Instant query on a Prometheus; the result vector (empty on any error).
pub fn query(port: u16, expr: &str) -> Vec<serde_json::Value> {
    let q: String = form_urlencoded::byte_serialize(expr.as_bytes()).collect();
    let Ok((200, body)) = http_get(port, &format!("/api/v1/query?query={q}")) else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// The sample value of one series of a query result (NaN when absent).
pub fn value(series: &serde_json::Value) -> f64 {
    series["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Polls `f` every 200 ms until it returns Some, for at most `limit`; panics with `explain()`.
pub fn wait<T>(what: &str, limit: Duration, explain: impl Fn() -> String, f: impl Fn() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            eprintln!("{what}: after {:.1}s", start.elapsed().as_secs_f64());
            return v;
        }
        if start.elapsed() > limit {
            panic!("{what}: not within {limit:?}\n{}", explain());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The shipped Alertmanager config with test timings: every route that groups waits 1 s and
/// re-notifies a changed group after 1 s. Receivers are left to the caller.
pub fn alertmanager_config() -> Value {
    fn fast(route: &mut Value) {
        for k in ["group_wait", "group_interval"] {
            if route.get(k).is_some() {
                route[k] = y("1s");
            }
        }
        if let Some(rs) = route.get_mut("routes").and_then(Value::as_sequence_mut) {
            rs.iter_mut().for_each(fast);
        }
    }
    let mut am = load("deploy/alertmanager/alertmanager.yml");
    fast(&mut am["route"]);
    am
}

/// Alertmanager (Debian's `prometheus-alertmanager`) on `port` with the config `am`, data and
/// log in `dir`.
pub fn start_alertmanager(dir: &Path, am: &Value, port: u16) -> Service {
    write(&dir.join("alertmanager.yml"), am);
    std::fs::create_dir_all(dir.join("am")).unwrap();
    let mut cmd = Command::new("prometheus-alertmanager");
    cmd.arg(format!("--config.file={}", dir.join("alertmanager.yml").display()))
        .arg(format!("--storage.path={}", dir.join("am").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=");
    Service::start("alertmanager", cmd, port, "/-/ready", dir.join("am.log"))
}

/// The shipped rules with every group evaluated each second; `edit` changes single rules
/// (shortened windows, `for:`).
pub fn fast_rules(edit: impl Fn(&mut Value)) -> Value {
    let mut rules = load("deploy/prometheus/sensor-rules.yml");
    for g in rules["groups"].as_sequence_mut().unwrap() {
        if g.get("interval").is_some() {
            g["interval"] = y("1s");
        }
        g["rules"].as_sequence_mut().unwrap().iter_mut().for_each(&edit);
    }
    rules
}

/// Writes the central tier's files into `dir` (deploy/prometheus/central.yml evaluated each
/// second, alerting to the Alertmanager on `am_port`, and `rules`) and returns how to start it
/// on `port` (again after a stop: its TSDB stays in `dir`).
pub fn central_prometheus(dir: &Path, rules: &Value, port: u16, am_port: u16) -> impl Fn() -> Command {
    let mut central = load("deploy/prometheus/central.yml");
    central["global"]["evaluation_interval"] = y("1s");
    central["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = y(&format!("['127.0.0.1:{am_port}']"));
    write(&dir.join("central.yml"), &central);
    write(&dir.join("sensor-rules.yml"), rules);
    std::fs::create_dir_all(dir.join("central-data")).unwrap();
    let dir = dir.to_path_buf();
    move || {
        let mut c = Command::new("prometheus");
        c.arg(format!("--config.file={}", dir.join("central.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("central-data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--web.enable-remote-write-receiver");
        c
    }
}

/// The per-cluster agent (deploy/prometheus/agent.yml): cluster `test`, scraping every second
/// with `scrape` as its only scrape config, writing to the central tier on `central_port`.
pub fn start_agent(dir: &Path, scrape: Value, port: u16, central_port: u16) -> Service {
    let mut agent = load("deploy/prometheus/agent.yml");
    agent["global"]["scrape_interval"] = y("1s");
    agent["global"]["external_labels"]["cluster"] = y("test");
    agent["scrape_configs"][0] = scrape;
    agent["remote_write"][0]["url"] = y(&format!("http://127.0.0.1:{central_port}/api/v1/write"));
    agent["remote_write"][0]["queue_config"]["batch_send_deadline"] = y("500ms");
    agent["remote_write"][0]["queue_config"]["max_backoff"] = y("1s");
    write(&dir.join("agent.yml"), &agent);
    std::fs::create_dir_all(dir.join("agent-data")).unwrap();
    let mut cmd = Command::new("prometheus");
    cmd.arg("--enable-feature=agent")
        .arg(format!("--config.file={}", dir.join("agent.yml").display()))
        .arg(format!("--storage.agent.path={}", dir.join("agent-data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    Service::start("agent prometheus", cmd, port, "/-/ready", dir.join("agent.log"))
}

/// The logs of `files` (name, path), each under a header, for a failure's message.
pub fn logs(files: &[(&str, PathBuf)]) -> String {
    files
        .iter()
        .map(|(n, p)| format!("--- {n} ---\n{}\n", std::fs::read_to_string(p).unwrap_or_default()))
        .collect()
}
