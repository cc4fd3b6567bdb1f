//! The web view in a real browser: Debian's headless `chromium`, driven over the DevTools
//! protocol (a small client on the websocket crate the daemon already uses), against a real
//! daemon after real OOM kills, with a failing and a healthy check and real connects. The test
//! reads the DOM and the SVG the page drew, every console message and every request the page
//! made; screenshots (desktop and phone width) go to `target/web/`.

mod common;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{free_port, Daemon, MemCgroup, SENSOR};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio_tungstenite::{tungstenite::Message, WebSocketStream};

/// Debian's chromium; under CI=true its absence fails the test (`cargo xtask deps` installs it).
fn chromium(test: &str) -> Option<PathBuf> {
    for p in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(p).exists() {
            return Some(PathBuf::from(p));
        }
    }
    common::require(
        test,
        false,
        "chromium is missing (`cargo xtask deps` installs Debian's chromium package)",
    );
    None
}

fn out_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is target/tmp.
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map_or_else(|| PathBuf::from("target"), Path::to_path_buf)
        .join("web");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn b64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    } as u32;
    let bytes: Vec<u8> = s.bytes().filter(|c| *c != b'=' && !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c) << (18 - 6 * i);
        }
        let b = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&b[..chunk.len().saturating_sub(1)]);
    }
    out
}

type Ws = WebSocketStream<tokio::net::TcpStream>;

/// A headless chromium and one page of it, attached over the DevTools protocol.
struct Browser {
    child: Child,
    rt: tokio::runtime::Runtime,
    ws: Ws,
    session: String,
    next_id: u64,
    /// Every event seen, in order.
    events: Vec<Value>,
    /// Basic-auth credentials given when the browser asks (Fetch.authRequired).
    credentials: Option<(String, String)>,
    _profile: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Browser {
    fn launch(chromium: &Path) -> Browser {
        let profile = std::env::temp_dir().join(format!("sensor-web-chromium-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&profile).unwrap();
        let mut child = Command::new(chromium)
            .args([
                "--headless",
                // Root in a container: the sandbox needs user namespaces the test may not have.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                // Loopback only: no background services, and no host name resolves.
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-domain-reliability",
                "--disable-client-side-phishing-detection",
                "--no-pings",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn chromium");
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(url.trim().to_string());
                    }
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("chromium's DevTools URL");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ws = rt.block_on(async {
            let hostport = url.trim_start_matches("ws://").split('/').next().unwrap().to_string();
            let tcp = tokio::net::TcpStream::connect(&hostport).await.unwrap();
            let (ws, _) = tokio_tungstenite::client_async(url.as_str(), tcp)
                .await
                .expect("DevTools websocket");
            ws
        });
        let mut b = Browser {
            child,
            rt,
            ws,
            session: String::new(),
            next_id: 0,
            events: Vec::new(),
            credentials: None,
            _profile: TempDir(profile),
        };
        let target = b.call_browser("Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"].as_str().unwrap().to_string();
        let att = b.call_browser("Target.attachToTarget", json!({"targetId": target_id, "flatten": true}));
        b.session = att["sessionId"].as_str().unwrap().to_string();
        for m in ["Runtime.enable", "Log.enable", "Network.enable", "Page.enable"] {
            b.call(m, json!({}));
        }
        b
    }

    fn call_browser(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params, None)
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        let s = self.session.clone();
        self.send(method, params, Some(s))
    }

    /// Sends one command without waiting for its answer; returns its id.
    fn post(&mut self, method: &str, params: Value, session: Option<String>) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.rt
            .block_on(self.ws.send(Message::text(msg.to_string())))
            .expect("DevTools send");
        id
    }

    /// Sends one command and reads until its answer, keeping events (and answering the
    /// browser's auth and paused-request events on the way).
    fn send(&mut self, method: &str, params: Value, session: Option<String>) -> Value {
        let id = self.post(method, params, session);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.read(deadline).unwrap_or_else(|| panic!("no answer to {method}"));
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    panic!("{method}: {e}");
                }
                return v["result"].clone();
            }
            if v.get("id").is_none() {
                self.on_event(v);
            } else if let Some(e) = v.get("error") {
                eprintln!("DevTools command {} failed: {e}", v["id"]);
            }
        }
    }

    fn read(&mut self, deadline: Instant) -> Option<Value> {
        let left = deadline.saturating_duration_since(Instant::now());
        let next = self
            .rt
            .block_on(async { tokio::time::timeout(left, self.ws.next()).await });
        match next {
            Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str(t.as_str()).ok(),
            Ok(Some(Ok(_))) => Some(Value::Null),
            _ => None,
        }
    }

    fn on_event(&mut self, v: Value) {
        let params = v["params"].clone();
        match v["method"].as_str() {
            Some("Fetch.requestPaused") => {
                let id = params["requestId"].clone();
                let s = Some(self.session.clone());
                self.post("Fetch.continueRequest", json!({"requestId": id}), s);
            }
            Some("Fetch.authRequired") => {
                let id = params["requestId"].clone();
                let resp = match &self.credentials {
                    Some((u, p)) => json!({"response": "ProvideCredentials", "username": u, "password": p}),
                    None => json!({"response": "CancelAuth"}),
                };
                let s = Some(self.session.clone());
                self.post(
                    "Fetch.continueWithAuth",
                    json!({"requestId": id, "authChallengeResponse": resp}),
                    s,
                );
            }
            _ => {}
        }
        self.events.push(v);
    }

    /// Lets events arrive for `d`, answering paused requests.
    fn pump(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        loop {
            match self.read(deadline) {
                Some(Value::Null) => {}
                Some(v) if v.get("id").is_none() => self.on_event(v),
                Some(v) => {
                    if let Some(e) = v.get("error") {
                        eprintln!("DevTools command {} failed: {e}", v["id"]);
                    }
                }
                None => return,
            }
        }
    }

    /// Evaluates `expr` in the page and returns its value (JSON).
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("evaluating {expr}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it is true.
    fn wait_true(&mut self, expr: &str, limit: Duration, what: &str) {
        let start = Instant::now();
        loop {
            if self.eval(expr) == json!(true) {
                return;
            }
            if start.elapsed() > limit {
                let text = self.eval("document.body ? document.body.innerText : ''");
                panic!(
                    "{what}: `{expr}` still false after {limit:?}\n--- page text ---\n{}\n--- console ---\n{:#?}",
                    text.as_str().unwrap_or(""),
                    self.console()
                );
            }
            self.pump(Duration::from_millis(250));
        }
    }

    fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
        self.pump(Duration::from_millis(300));
    }

    /// Console errors and warnings, uncaught exceptions and log entries of level error.
    fn console(&self) -> Vec<String> {
        let mut out = Vec::new();
        for e in &self.events {
            let p = &e["params"];
            match e["method"].as_str() {
                Some("Runtime.consoleAPICalled") if p["type"] == "error" || p["type"] == "warning" => {
                    out.push(format!("console.{}: {}", p["type"], p["args"]))
                }
                Some("Runtime.exceptionThrown") => out.push(format!("exception: {}", p["exceptionDetails"])),
                Some("Log.entryAdded") if p["entry"]["level"] == "error" => {
                    out.push(format!("log: {} {}", p["entry"]["text"], p["entry"]["url"]))
                }
                _ => {}
            }
        }
        out
    }

    /// URLs of every request the page made.
    fn requests(&self) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| e["method"] == "Network.requestWillBeSent")
            .filter_map(|e| e["params"]["request"]["url"].as_str().map(str::to_string))
            .collect()
    }

    /// The page (its top `max_height` CSS pixels) as a PNG of `width` CSS pixels.
    fn screenshot(&mut self, width: u32, mobile: bool, max_height: f64, path: &Path) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": mobile}),
        );
        self.pump(Duration::from_millis(500));
        let m = self.call("Page.getLayoutMetrics", json!({}));
        let h = m["cssContentSize"]["height"].as_f64().unwrap_or(900.0).min(max_height);
        let shot = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true,
                   "clip": {"x": 0, "y": 0, "width": width, "height": h, "scale": 1}}),
        );
        let png = b64_decode(shot["data"].as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tiny HTTP server on loopback that answers 200 "ok" to everything.
fn healthy_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
            });
        }
    });
    port
}

fn write(name: &str, body: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("sensor-web-{}-{name}", std::process::id()));
    std::fs::write(&p, body).unwrap();
    p
}

fn kills(d: &Daemon) -> usize {
    d.oom_events(0).len()
}

#[test]
fn web_view_in_a_real_browser() {
    let test = "web_view_in_a_real_browser";
    let Some(chrome) = chromium(test) else { return };
    let Some(_kernel) = common::privileged(test) else {
        return;
    };
    let up = healthy_server();
    let closed = free_port();
    let cfg = write(
        "browser.yaml",
        &format!(
            "alerting: {{window: 3s, min_samples: 2}}
vantage: {{location: eu-west-1a, node: web-node}}
checks:
  - {{name: shop, type: http, url: 'http://127.0.0.1:{up}/health', interval: 500ms, timeout: 2s}}
  - {{name: payments, type: http, url: 'http://127.0.0.1:{closed}/', interval: 500ms, timeout: 2s}}
  - {{name: elsewhere, type: http, url: 'http://127.0.0.1:{closed}/', sample: 0.000001}}
"
        ),
    );
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let base = format!("http://127.0.0.1:{}", d.port);

    let cg = MemCgroup::new("sensor-web", 48 << 20);
    cg.cause_oom_kill();
    let start = Instant::now();
    while kills(&d) < 1 {
        assert!(start.elapsed() < Duration::from_secs(10), "kill not seen:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    d.wait_metric(
        "sensor_check_alert_firing",
        &[("check", "payments"), ("location", "eu-west-1a")],
        1.0,
        Duration::from_secs(15),
    );

    let mut b = Browser::launch(&chrome);
    b.navigate(&format!("{base}/"));
    b.wait_true(
        "Number(document.body.dataset.refreshes || 0) >= 1",
        Duration::from_secs(20),
        "first refresh",
    );
    // A marker that a reload would lose.
    b.eval("window.__sensorMarker = 42; true");

    // Header: host, kernel, probes; the banner (the failing check's alert fires).
    let header = b.eval("document.querySelector('header').innerText");
    let header = header.as_str().unwrap_or("");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(header.contains(kernel.trim()) && header.contains("oom"), "{header}");
    let banner = b.eval("document.getElementById('banner').hidden ? '' : document.getElementById('banner').innerText");
    assert!(banner.as_str().unwrap_or("").contains("alert(s) firing"), "{banner}");
    let title = b.eval("document.title");
    assert!(title.as_str().unwrap_or("").contains("sensor"), "{title}");

    // The kill's row shows its workload (the cgroup the sensor labels it with) and victim.
    let row = b.eval("(document.querySelector('#oom-recent tr[data-seq]') || {}).innerText || ''");
    let row = row.as_str().unwrap_or("");
    assert!(
        row.contains(&cg.rel) && row.contains("tail"),
        "kill row: {row:?}, want {}",
        cg.rel
    );

    // The failing check shows DOWN with its alert; the healthy one is up.
    let down = b.eval("document.querySelector('#checks-10m tr[data-check=\"payments\"]').innerText");
    let down = down.as_str().unwrap_or("");
    assert!(
        down.contains("DOWN") && down.contains("ALERT") && down.contains("Connection refused"),
        "{down}"
    );
    let ok = b.eval("document.querySelector('#checks-10m tr[data-check=\"shop\"]').innerText");
    assert!(ok.as_str().unwrap_or("").contains("up"), "{ok}");
    // Whose view it is: this sensor's location, and the check the fleet's sampling left to
    // other nodes (not shown as a row).
    let vantage = b.eval("document.getElementById('check-vantage').innerText");
    assert_eq!(
        vantage.as_str().unwrap_or(""),
        "Availability from location eu-west-1a, node web-node. Run by other nodes (sampled out here): elsewhere."
    );
    let rows = b.eval("document.querySelectorAll('#checks-10m tr[data-check]').length");
    assert_eq!(rows, json!(2), "the sampled-out check has no row");
    let alerts = b.eval("document.getElementById('alerts').innerText");
    assert!(
        alerts.as_str().unwrap_or("").contains("Website payments is down."),
        "{alerts}"
    );

    // Charts have data points: the checks' runs (failures marked), kills per minute, TCP
    // latency, and, after a few refreshes, connect rates and host PSI.
    let points = |b: &mut Browser, sel: &str| -> u64 {
        b.eval(&format!(
            "Number((document.querySelector('{sel}') || {{getAttribute: () => 0}}).getAttribute('data-points'))"
        ))
        .as_u64()
        .unwrap_or(0)
    };
    assert!(points(&mut b, "#check-charts figure[data-check=\"shop\"] svg") > 0);
    assert!(points(&mut b, "#check-charts figure[data-check=\"payments\"] svg") > 0);
    let failed_runs =
        b.eval("document.querySelectorAll('#check-charts figure[data-check=\"payments\"] g.run.failed').length");
    assert!(failed_runs.as_u64().unwrap_or(0) > 0, "failures marked");
    assert!(points(&mut b, "#oom-minute svg") >= 1, "kills per minute");
    let bars = b.eval("[...document.querySelectorAll('#oom-minute rect.bar')].filter(r => Number(r.getAttribute('height')) > 0).length");
    assert!(bars.as_u64().unwrap_or(0) >= 1, "{bars}");
    assert!(points(&mut b, "#tcp-latency svg") >= 1, "connect latency");
    b.wait_true(
        "Number(document.querySelector('#tcp-rate svg').getAttribute('data-points')) > 0 \
         && Number(document.querySelector('#psi svg').getAttribute('data-points')) > 0",
        Duration::from_secs(30),
        "rate and PSI charts",
    );
    let failures = b.eval("document.querySelector('#tcp-failures tbody').innerText");
    let failures = failures.as_str().unwrap_or("");
    assert!(
        failures.contains("refused") && failures.contains(&closed.to_string()),
        "{failures}"
    );

    // A second kill appears without a reload.
    cg.cause_oom_kill();
    b.wait_true(
        "document.querySelectorAll('#oom-recent tr[data-seq]').length >= 2",
        Duration::from_secs(20),
        "second kill",
    );
    assert_eq!(b.eval("window.__sensorMarker"), json!(42), "the page was reloaded");

    let dir = out_dir();
    b.screenshot(1280, false, 8000.0, &dir.join("desktop.png"));
    // The README's picture: the header, the checks and the OOM section.
    b.screenshot(1100, false, 1450.0, &dir.join("desktop-top.png"));
    b.screenshot(390, true, 8000.0, &dir.join("phone.png"));
    // On a phone the page is no wider than the screen (tables scroll inside their box).
    let width = b.eval("document.documentElement.scrollWidth");
    assert!(
        width.as_u64().unwrap_or(9999) <= 390,
        "page {width} px wide on a 390 px phone"
    );

    let console = b.console();
    assert!(console.is_empty(), "console: {console:#?}");
    let requests = b.requests();
    assert!(requests.len() >= 5, "{requests:?}");
    let outside: Vec<&String> = requests.iter().filter(|u| !u.starts_with(&base)).collect();
    assert!(outside.is_empty(), "requests outside the daemon: {outside:?}");
    drop(b);
    assert_eq!(d.stop().code(), Some(0));
}

/// A kill in a Deployment's pod (kubelet-style, through a private containerd) shows its owner
/// in the recent kills' OWNER column.
#[test]
fn web_view_names_the_owner_of_a_pods_kill() {
    let test = "web_view_names_the_owner_of_a_pods_kill";
    let Some(chrome) = chromium(test) else { return };
    let Some(_kernel) = common::privileged(test) else {
        return;
    };
    let Some(image) = common::runtimes::victim_image() else {
        return;
    };
    let Some(ctrd) = common::runtimes::Containerd::start() else {
        return;
    };
    ctrd.import(image);
    let cfg = write(
        "owner.yaml",
        &format!(
            "workloads:\n  runtimes:\n    - {{kind: containerd, socket: {}, namespaces: [k8s.io]}}\n",
            ctrd.socket.display()
        ),
    );
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let mut pod = common::runtimes::KubePod::new(
        "shop",
        "ledger-api-5d8f6c7b9-x2x4k",
        &[("pod-template-hash", "5d8f6c7b9")],
    );
    ctrd.start_sandbox(&mut pod, image);
    let mut c = pod.container("ledger", 32 << 20, &["/bin/busybox", "tail", "/dev/zero"]);
    let out = ctrd.run(&mut c, image);
    assert_eq!(out.status.code(), Some(137), "{out:?}");
    d.wait_metric_sum(
        "sensor_oom_kills_total",
        &[("container_id", &c.id), ("owner", "ledger-api")],
        1.0,
        Duration::from_secs(10),
    );

    let mut b = Browser::launch(&chrome);
    b.navigate(&format!("http://127.0.0.1:{}/", d.port));
    b.wait_true(
        "!!document.querySelector('#oom-recent tr[data-seq] td.owner')",
        Duration::from_secs(20),
        "the kill's row",
    );
    let head = b.eval("document.querySelector('#oom-recent thead').innerText");
    assert!(head.as_str().unwrap_or("").contains("OWNER"), "{head}");
    let owner = b.eval("document.querySelector('#oom-recent tr[data-seq] td.owner').innerText");
    assert_eq!(owner.as_str(), Some("Deployment ledger-api"));
    let row = b.eval("document.querySelector('#oom-recent tr[data-seq]').innerText");
    assert!(
        row.as_str()
            .unwrap_or("")
            .contains("shop/ledger-api-5d8f6c7b9-x2x4k/ledger"),
        "{row}"
    );
    drop(b);
    assert_eq!(d.stop().code(), Some(0));
}

#[test]
fn web_view_asks_for_basic_auth() {
    let test = "web_view_asks_for_basic_auth";
    let Some(chrome) = chromium(test) else { return };
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let web = write("auth-web.yml", &format!("basic_auth_users:\n  alice: '{hash}'\n"));
    let cfg = write(
        "auth.yaml",
        "probes: {oom: {enabled: false}, memcg: {enabled: false}, tcp: {enabled: false}}
checks: [{name: lonely, type: http, url: 'http://127.0.0.1:9/', interval: 1s}]
",
    );
    let port = free_port();
    let _daemon = KillOnDrop(
        Command::new(SENSOR)
            .args(["run", "--listen", &format!("127.0.0.1:{port}"), "--config"])
            .arg(&cfg)
            .arg("--web.config.file")
            .arg(&web)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    while common::http_get(port, "/healthz").map(|r| r.0).ok() != Some(401) {
        assert!(start.elapsed() < Duration::from_secs(15), "daemon did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut b = Browser::launch(&chrome);
    b.call(
        "Fetch.enable",
        json!({"handleAuthRequests": true, "patterns": [{"urlPattern": "*"}]}),
    );

    // Without credentials the browser is asked and the page stays closed.
    b.navigate(&format!("{base}/"));
    b.pump(Duration::from_secs(2));
    let challenges = |b: &Browser| -> Vec<Value> {
        b.events
            .iter()
            .filter(|e| e["method"] == "Fetch.authRequired")
            .map(|e| e["params"]["authChallenge"].clone())
            .collect()
    };
    let asked = challenges(&b);
    assert!(
        asked
            .iter()
            .any(|c| c["scheme"].as_str().is_some_and(|s| s.eq_ignore_ascii_case("basic"))),
        "no basic auth challenge: {:?}",
        b.events
            .iter()
            .filter(|e| e["method"]
                .as_str()
                .is_some_and(|m| m.contains("Fail") || m.contains("Fetch")))
            .collect::<Vec<_>>()
    );
    let text = b.eval("document.body ? document.body.innerText : ''");
    assert!(!text.as_str().unwrap_or("").contains("Synthetic checks"), "{text}");

    // With them the page and its data load.
    b.credentials = Some(("alice".into(), "s3cret".into()));
    b.navigate(&format!("{base}/"));
    b.wait_true(
        "Number((document.body && document.body.dataset.refreshes) || 0) >= 1 \
         && !!document.querySelector('#checks-10m tr[data-check=\"lonely\"]')",
        Duration::from_secs(20),
        "page behind basic auth",
    );
    let header = b.eval("document.querySelector('header').innerText");
    assert!(header.as_str().unwrap_or("").contains("none (checks only)"), "{header}");
}

/// A child process killed when the test ends, passed or not.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
