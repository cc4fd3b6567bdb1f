//! Synthetic checks against real servers on loopback: HTTP phases and failures, TLS with a CA
//! generated here, websocket streams with JSON gauges and error closes, the availability alert
//! on a real daemon (down, then recovery, delivered to a real webhook), and `sensor top` in a
//! real pseudo-terminal. The daemon runs with every probe disabled: checks need no BPF.

mod common;

use std::{
    io::{Read, Write},
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use common::{free_port, metric, Daemon, SENSOR};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};
use tokio_tungstenite::tungstenite::{
    protocol::{frame::coding::CloseCode, CloseFrame},
    Message,
};

const NO_PROBES: &str = "probes: {oom: {enabled: false}, memcg: {enabled: false}, tcp: {enabled: false}}\n";

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sensor-checks-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// `sensor check` on `cfg` until its check `authorized` succeeds (the server under test may
/// still be starting), for at most 15 s; the last results.
fn check_until_authorized(cfg: &PathBuf) -> Vec<serde_json::Value> {
    let start = Instant::now();
    loop {
        let r = sensor_check(cfg);
        if by_name(&r, "authorized")["success"] == true || start.elapsed() > Duration::from_secs(15) {
            return r;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A daemon started with the config `body` (written to `name`).
fn daemon_with(name: &str, body: &str) -> Daemon {
    let cfg = write_config(name, body);
    Daemon::start(&["--config", cfg.to_str().unwrap()])
}

fn write_config(name: &str, body: &str) -> PathBuf {
    let p = tmp(name);
    std::fs::write(&p, format!("{NO_PROBES}{body}")).unwrap();
    p
}

/// Reads one request head.
async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut buf = Vec::new();
    let mut b = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut b).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&b[..n]),
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// An HTTP server on loopback answering every request with `status`, after `delay`.
fn http_server(status: u16, delay: Duration, body: &'static str) -> SocketAddr {
    let l = rt().block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = l.local_addr().unwrap();
    rt().spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                read_head(&mut s).await;
                tokio::time::sleep(delay).await;
                let resp = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

fn sensor_check(config: &PathBuf) -> Vec<serde_json::Value> {
    let out = std::process::Command::new(SENSOR)
        .args(["check", "--json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn by_name<'a>(results: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    results
        .iter()
        .find(|r| r["check"] == name)
        .unwrap_or_else(|| panic!("no result for {name}: {results:?}"))
}

#[test]
fn http_phases_status_and_refused() {
    let slow = http_server(200, Duration::from_millis(300), "ok");
    let broken = http_server(500, Duration::ZERO, "boom");
    let closed = free_port();
    let cfg = write_config(
        "http.yaml",
        &format!(
            "checks:
  - {{name: slow, type: http, url: 'http://{slow}/health', timeout: 3s, expect: {{status: [200], body_regex: '^ok$'}}}}
  - {{name: broken, type: http, url: 'http://{broken}/', timeout: 3s}}
  - {{name: refused, type: http, url: 'http://127.0.0.1:{closed}/', timeout: 3s}}
  - {{name: wrongbody, type: http, url: 'http://{slow}/', timeout: 3s, expect: {{body_regex: 'healthy'}}}}
"
        ),
    );
    let results = sensor_check(&cfg);
    assert_eq!(results.len(), 4, "{results:?}");

    let s = by_name(&results, "slow");
    assert_eq!(s["success"], true, "{s}");
    assert_eq!(s["status"], 200);
    let ttfb = s["phases"]["ttfb"].as_f64().unwrap();
    assert!(
        (0.3..0.3 + 0.2).contains(&ttfb),
        "ttfb {ttfb} for a 300 ms header delay"
    );
    assert!(s["phases"]["connect"].as_f64().unwrap() < 0.05, "{s}");
    assert!(
        s["phases"]["dns"].is_null() && s["phases"]["tls"].is_null(),
        "IP literal, plain HTTP: {s}"
    );
    assert!(s["phases"]["total"].as_f64().unwrap() >= ttfb);

    let b = by_name(&results, "broken");
    assert_eq!(
        (b["success"].as_bool(), b["status"].as_u64()),
        (Some(false), Some(500)),
        "{b}"
    );
    assert_eq!(b["error"], "status 500 is not 2xx or 3xx");

    let r = by_name(&results, "refused");
    assert_eq!(r["success"], false);
    assert!(
        r["error"].as_str().unwrap().starts_with("connect: Connection refused"),
        "{r}"
    );
    let p = &r["phases"];
    assert!(p["connect"].is_number(), "{r}");
    for phase in ["dns", "tls", "ttfb", "transfer", "handshake", "first_message"] {
        assert!(p[phase].is_null(), "refused run must have the connect phase only: {r}");
    }

    let w = by_name(&results, "wrongbody");
    assert_eq!(w["error"], "body does not match /healthy/", "{w}");

    // The same checks in the daemon: counters by result and by code.
    let d = daemon_with(
        "http-daemon.yaml",
        &format!(
            "checks:
  - {{name: broken, type: http, url: 'http://{broken}/', interval: 200ms, timeout: 1s}}
  - {{name: refused, type: http, url: 'http://127.0.0.1:{closed}/', interval: 200ms, timeout: 1s}}
"
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = d.metrics();
        let runs = metric(
            &m,
            "sensor_check_runs_total",
            &[("check", "broken"), ("type", "http"), ("result", "failure")],
        );
        if runs.unwrap_or(0.0) >= 3.0 || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let failures = metric(
        &m,
        "sensor_check_runs_total",
        &[("check", "broken"), ("type", "http"), ("result", "failure")],
    )
    .unwrap();
    assert!(failures >= 3.0, "{m}");
    assert_eq!(
        metric(
            &m,
            "sensor_check_http_responses_total",
            &[("check", "broken"), ("code", "500")]
        ),
        Some(failures),
        "every failed run of 'broken' got a 500\n{m}"
    );
    assert_eq!(
        metric(
            &m,
            "sensor_check_runs_total",
            &[("check", "broken"), ("type", "http"), ("result", "success")]
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(&m, "sensor_check_up", &[("check", "refused"), ("type", "http")]),
        Some(0.0)
    );
    assert!(metric(
        &m,
        "sensor_check_http_responses_total",
        &[("check", "refused"), ("code", "500")]
    )
    .is_none());
    assert_eq!(
        metric(
            &m,
            "sensor_check_duration_seconds_count",
            &[("check", "refused"), ("type", "http"), ("phase", "ttfb")]
        ),
        None,
        "no ttfb observed for refused connections\n{m}"
    );
    assert_eq!(d.stop().code(), Some(0));
}

/// A server that accepts and never answers.
fn hanging_server() -> SocketAddr {
    let l = rt().block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = l.local_addr().unwrap();
    rt().spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            held.push(s);
        }
    });
    addr
}

#[test]
fn a_hanging_target_delays_no_other_check() {
    let hang = hanging_server();
    let fast = http_server(200, Duration::ZERO, "ok");
    let d = daemon_with(
        "hang.yaml",
        &format!(
            "checks:
  - {{name: hang, type: http, url: 'http://{hang}/', interval: 1s, timeout: 3s}}
  - {{name: fast, type: http, url: 'http://{fast}/', interval: 100ms, timeout: 1s}}
"
        ),
    );
    let runs = |m: &str, c: &str, r: &str| {
        metric(
            m,
            "sensor_check_runs_total",
            &[("check", c), ("type", "http"), ("result", r)],
        )
        .unwrap_or(0.0)
    };
    // Wait for the first timeout of the hanging check, then count the fast one's runs over
    // 2 s while the hanging one is stuck in its next 3 s timeout.
    let start = Instant::now();
    while runs(&d.metrics(), "hang", "failure") < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", d.metrics());
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = runs(&d.metrics(), "fast", "success");
    std::thread::sleep(Duration::from_secs(2));
    let m = d.metrics();
    let during = runs(&m, "fast", "success") - before;
    // 20 at 100 ms; a busy CI machine may lose a few ticks, a delayed check would lose them all.
    assert!(
        (12.0..=21.0).contains(&during),
        "fast check ran {during} times in 2 s at 100 ms\n{m}"
    );
    assert_eq!(runs(&m, "fast", "failure"), 0.0);
    let (_, body) = d.get("/api/v1/checks");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let hang = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "hang")
        .unwrap()
        .clone();
    assert_eq!(hang["last"]["error"], "timeout after 3s during ttfb", "{hang}");
    assert!(hang["last"]["phases"]["total"].as_f64().unwrap() >= 3.0, "{hang}");
    assert_eq!(d.stop().code(), Some(0));
}

/// A CA, a server certificate for 127.0.0.1 signed by it, and a client certificate.
struct Pki {
    ca_pem: PathBuf,
    server_pem: PathBuf,
    server_key: PathBuf,
    server: (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ),
    client_cert: PathBuf,
    client_key: PathBuf,
    ca_der: rustls::pki_types::CertificateDer<'static>,
}

/// An exporter-toolkit web config serving `p`'s server certificate, with `user` allowed in by the
/// password `s3cret`.
fn tls_web_config(p: &Pki, file: &str, user: &str) -> PathBuf {
    let web = tmp(file);
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\nbasic_auth_users:\n  {user}: '{hash}'\n",
            p.server_pem.display(),
            p.server_key.display()
        ),
    )
    .unwrap();
    web
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sensor test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let srv_key = KeyPair::generate().unwrap();
    let srv = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&srv_key, &issuer)
        .unwrap();
    let cli_key = KeyPair::generate().unwrap();
    let cli = CertificateParams::new(vec!["client".to_string()])
        .unwrap()
        .signed_by(&cli_key, &issuer)
        .unwrap();
    let ca_pem = tmp("ca.pem");
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    let server_pem = tmp("server.pem");
    std::fs::write(&server_pem, srv.pem()).unwrap();
    let server_key = tmp("server.key");
    std::fs::write(&server_key, srv_key.serialize_pem()).unwrap();
    let client_cert = tmp("client.pem");
    std::fs::write(&client_cert, cli.pem()).unwrap();
    let client_key = tmp("client.key");
    std::fs::write(&client_key, cli_key.serialize_pem()).unwrap();
    Pki {
        ca_pem,
        server_pem,
        server_key,
        server: (
            vec![srv.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(srv_key.serialize_der().into()),
        ),
        client_cert,
        client_key,
        ca_der: ca.der().clone(),
    }
}

/// An HTTPS server with the PKI's server certificate; with `require_client` it demands a
/// client certificate signed by the CA.
fn https_server(p: &Pki, require_client: bool) -> SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = if require_client {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(p.ca_der.clone()).unwrap();
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
        builder.with_client_cert_verifier(v)
    } else {
        builder.with_no_client_auth()
    };
    let cfg = builder
        .with_single_cert(p.server.0.clone(), p.server.1.clone_key())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = rt().block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = l.local_addr().unwrap();
    rt().spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(s).await else { return };
                read_head(&mut s).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nsecure")
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[test]
fn https_with_generated_ca_and_client_certificates() {
    let p = pki();
    let one_way = https_server(&p, false);
    let mutual = https_server(&p, true);
    let ca = p.ca_pem.display();
    let (cc, ck) = (p.client_cert.display(), p.client_key.display());
    let cfg = write_config(
        "tls.yaml",
        &format!(
            "checks:
  - {{name: trusted, type: http, url: 'https://{one_way}/', tls: {{ca_file: '{ca}'}}, expect: {{body_regex: secure}}}}
  - {{name: untrusted, type: http, url: 'https://{one_way}/'}}
  - {{name: skipverify, type: http, url: 'https://{one_way}/', tls: {{insecure_skip_verify: true}}}}
  - {{name: byname, type: http, url: 'https://localhost:{port}/', tls: {{ca_file: '{ca}'}}}}
  - {{name: mtls, type: http, url: 'https://{mutual}/', tls: {{ca_file: '{ca}', client_cert: '{cc}', client_key: '{ck}'}}}}
  - {{name: mtls-nocert, type: http, url: 'https://{mutual}/', tls: {{ca_file: '{ca}'}}}}
",
            port = one_way.port()
        ),
    );
    let results = sensor_check(&cfg);
    let ok = |n: &str| {
        let r = by_name(&results, n);
        assert_eq!(r["success"], true, "{n}: {r}");
        assert!(r["phases"]["tls"].as_f64().unwrap() > 0.0, "{n}: {r}");
        assert_eq!(r["status"], 200);
        r.clone()
    };
    ok("trusted");
    ok("skipverify");
    ok("mtls");
    let n = ok("byname");
    assert!(n["phases"]["dns"].is_number(), "a host name is resolved: {n}");
    let u = by_name(&results, "untrusted");
    assert_eq!(u["success"], false);
    let e = u["error"].as_str().unwrap();
    assert!(e.starts_with("tls: ") && e.contains("UnknownIssuer"), "{e}");
    assert!(u["phases"]["ttfb"].is_null(), "{u}");
    let m = by_name(&results, "mtls-nocert");
    assert_eq!(m["success"], false, "{m}");
}

/// A websocket server: each connection gets `messages`, then either stays open (`close`
/// None) or closes with the given code.
fn ws_server(
    messages: Vec<String>,
    close: Option<(u16, &'static str)>,
    pause: Duration,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = rt().block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = l.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&connections);
    rt().spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            count.fetch_add(1, Ordering::SeqCst);
            let messages = messages.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                for m in messages {
                    if ws.send(Message::text(m)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(pause).await;
                }
                match close {
                    Some((code, reason)) => {
                        let _ = ws
                            .send(Message::Close(Some(CloseFrame {
                                code: CloseCode::from(code),
                                reason: reason.into(),
                            })))
                            .await;
                        while let Some(Ok(_)) = ws.next().await {}
                    }
                    None => {
                        // Answer probes (echo) and keep the stream open.
                        while let Some(Ok(m)) = ws.next().await {
                            if m.is_text() && ws.send(m).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, connections)
}

#[test]
fn websocket_stream_gauges_and_error_close() {
    let inventory = vec![
        r#"{"store": "berlin", "model": "x1", "inventory": 10}"#.to_string(),
        r#"{"store": "paris", "model": "x2", "inventory": 3}"#.to_string(),
        r#"[{"store": "berlin", "model": "x2", "inventory": 7.5}, {"store": "rome", "model": "x1"}]"#.to_string(),
        "not json".to_string(),
        r#"{"store": "berlin", "model": "x1", "inventory": 12}"#.to_string(),
    ];
    let (stream_addr, _) = ws_server(inventory, None, Duration::from_millis(20));
    let (failing, failing_conns) = ws_server(
        vec![r#"{"store": "oslo", "model": "x9", "inventory": 1}"#.into()],
        Some((1011, "internal error")),
        Duration::from_millis(20),
    );
    let (echo, _) = ws_server(vec![], None, Duration::ZERO);
    let d = daemon_with(
        "ws.yaml",
        &format!(
            "checks:
  - name: inventory
    type: websocket
    url: 'ws://{stream_addr}/feed'
    interval: 300ms
    gauges: [{{name: inventory, labels: [store, model], value: inventory}}]
  - name: flaky
    type: websocket
    url: 'ws://{failing}/'
    interval: 300ms
    websocket: {{mode: stream, reconnect_min: 100ms, reconnect_max: 200ms}}
  - name: echo
    type: websocket
    url: 'ws://{echo}/'
    interval: 300ms
    websocket: {{send: ping-42, expect_regex: '^ping-\\d+$'}}
  - name: erroring
    type: websocket
    url: 'ws://{failing}/'
    interval: 300ms
    websocket: {{mode: probe, expect_regex: 'oslo'}}
"
        ),
    );
    let m = d.wait_metric(
        "inventory",
        &[("store", "berlin"), ("model", "x1")],
        12.0,
        Duration::from_secs(10),
    );
    assert_eq!(
        metric(&m, "inventory", &[("store", "paris"), ("model", "x2")]),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "inventory", &[("store", "berlin"), ("model", "x2")]),
        Some(7.5),
        "{m}"
    );
    assert!(metric(&m, "inventory", &[("store", "rome"), ("model", "x1")]).is_none());
    assert_eq!(
        metric(&m, "sensor_check_ws_messages_total", &[("check", "inventory")]),
        Some(5.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "sensor_check_ws_extract_errors_total",
            &[("check", "inventory"), ("reason", "missing_field")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "sensor_check_ws_extract_errors_total",
            &[("check", "inventory"), ("reason", "not_json")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "sensor_check_up", &[("check", "inventory"), ("type", "websocket")]),
        Some(1.0)
    );
    // Stream ticks: up while connected.
    let m = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = d.metrics();
            let ok = |c: &str, r: &str| {
                metric(
                    &m,
                    "sensor_check_runs_total",
                    &[("check", c), ("type", "websocket"), ("result", r)],
                )
                .unwrap_or(0.0)
            };
            if (ok("inventory", "success") >= 3.0
                && ok("flaky", "failure") >= 3.0
                && ok("echo", "success") >= 3.0
                && ok("erroring", "failure") >= 3.0)
                || Instant::now() > deadline
            {
                break m;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let runs = |c: &str, r: &str| {
        metric(
            &m,
            "sensor_check_runs_total",
            &[("check", c), ("type", "websocket"), ("result", r)],
        )
        .unwrap()
    };
    assert_eq!(runs("inventory", "failure"), 0.0, "{m}");
    assert!(runs("inventory", "success") >= 3.0, "{m}");
    assert_eq!(
        runs("flaky", "success"),
        0.0,
        "a stream closed with 1011 is never up at a tick\n{m}"
    );
    assert!(runs("flaky", "failure") >= 3.0, "{m}");
    assert!(
        failing_conns.load(Ordering::SeqCst) >= 3,
        "stream reconnects with backoff"
    );
    assert!(runs("echo", "success") >= 3.0 && runs("echo", "failure") == 0.0, "{m}");
    assert!(
        runs("erroring", "failure") >= 3.0 && runs("erroring", "success") == 0.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "sensor_check_up", &[("check", "erroring"), ("type", "websocket")]),
        Some(0.0)
    );
    assert!(
        metric(
            &m,
            "sensor_check_duration_seconds_count",
            &[("check", "inventory"), ("type", "websocket"), ("phase", "handshake")]
        )
        .unwrap()
            >= 1.0,
        "{m}"
    );
    let (_, body) = d.get("/api/v1/checks");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let check = |n: &str| {
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == n)
            .unwrap()
            .clone()
    };
    let flaky = check("flaky");
    assert_eq!(flaky["stream"]["close_code"], 1011, "{flaky}");
    assert!(
        flaky["stream"]["last_error"]
            .as_str()
            .unwrap()
            .contains("1011 internal error"),
        "{flaky}"
    );
    let erroring = check("erroring");
    assert_eq!(erroring["last"]["ws"]["close_code"], 1011, "{erroring}");
    assert_eq!(
        erroring["last"]["error"], "close: server closed with code 1011 internal error",
        "{erroring}"
    );
    assert_eq!(check("inventory")["stream"]["connected"], true);
    assert_eq!(d.stop().code(), Some(0));
}

/// A target that can be taken down and brought back on the same port.
struct Switchable {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
}

fn switchable() -> Switchable {
    let l = rt().block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = l.local_addr().unwrap();
    let up = Arc::new(AtomicBool::new(true));
    let flag = Arc::clone(&up);
    rt().spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            let up = flag.load(Ordering::SeqCst);
            tokio::spawn(async move {
                read_head(&mut s).await;
                let resp: &[u8] = if up {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                } else {
                    b"HTTP/1.1 503 Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\ndown"
                };
                let _ = s.write_all(resp).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Switchable { addr, up }
}

/// A webhook receiver that refuses the first delivery (500) and records the rest.
fn webhook() -> (SocketAddr, Arc<Mutex<Vec<serde_json::Value>>>, Arc<AtomicUsize>) {
    let l = rt().block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = l.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let attempts = Arc::new(AtomicUsize::new(0));
    let (g, a) = (Arc::clone(&got), Arc::clone(&attempts));
    rt().spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            let n = a.fetch_add(1, Ordering::SeqCst);
            let g = Arc::clone(&g);
            tokio::spawn(async move {
                let head = read_head(&mut s).await;
                let (h, rest) = head.split_once("\r\n\r\n").unwrap_or((&head, ""));
                let len: usize = h
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().to_string())
                    })
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mut body = rest.as_bytes().to_vec();
                while body.len() < len {
                    let mut b = [0u8; 4096];
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => body.extend_from_slice(&b[..k]),
                    }
                }
                let resp: &[u8] = if n == 0 {
                    b"HTTP/1.1 500 X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                } else {
                    g.lock().unwrap().push(serde_json::from_slice(&body).unwrap());
                    b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
                };
                let _ = s.write_all(resp).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, got, attempts)
}

#[test]
fn availability_alert_fires_and_recovers_on_a_real_daemon() {
    let target = switchable();
    let (hook, delivered, attempts) = webhook();
    let d = daemon_with(
        "alert.yaml",
        &format!(
            "alerting: {{availability_threshold: 0.8, window: 2s, min_samples: 4, webhook: 'http://{hook}/alerts'}}
checks:
  - {{name: shop, type: http, url: 'http://{}/', interval: 200ms, timeout: 1s}}
",
            target.addr
        ),
    );
    let alerts = |d: &Daemon| -> Vec<serde_json::Value> {
        let (_, body) = d.get("/api/v1/checks");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["alerts"].as_array().cloned().unwrap_or_default()
    };
    let wait_alerts = |d: &Daemon, n: usize, limit: Duration| -> Vec<serde_json::Value> {
        let start = Instant::now();
        loop {
            let a = alerts(d);
            if a.len() >= n || start.elapsed() > limit {
                return a;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // Healthy for a full window: no alert.
    std::thread::sleep(Duration::from_secs(3));
    assert!(alerts(&d).is_empty(), "{:?}", alerts(&d));
    assert_eq!(
        metric(&d.metrics(), "sensor_check_alert_firing", &[("check", "shop")]),
        Some(0.0)
    );

    target.up.store(false, Ordering::SeqCst);
    let down_at = Instant::now();
    let a = wait_alerts(&d, 1, Duration::from_secs(4));
    let took = down_at.elapsed();
    assert_eq!(a.len(), 1, "{a:?}\n{}", d.log());
    assert_eq!(a[0]["state"], "firing");
    let msg = a[0]["message"].as_str().unwrap();
    let avail = a[0]["availability"].as_f64().unwrap();
    assert!(avail <= 0.8, "{msg}");
    assert_eq!(
        msg,
        format!(
            "Website shop is down. availability={avail:.2}, time={}",
            a[0]["time_rfc3339"].as_str().unwrap()
        )
    );
    assert!(
        took <= Duration::from_secs(2) + Duration::from_millis(500),
        "down seen after {took:?}, window is 2s"
    );
    assert_eq!(
        metric(&d.metrics(), "sensor_check_alert_firing", &[("check", "shop")]),
        Some(1.0)
    );
    assert!(d.log().contains("Website shop is down."), "{}", d.log());
    // Still down for another window: no duplicate.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(alerts(&d).len(), 1);

    target.up.store(true, Ordering::SeqCst);
    let a = wait_alerts(&d, 2, Duration::from_secs(4));
    assert_eq!(a.len(), 2, "{a:?}");
    assert_eq!(a[1]["state"], "resolved");
    assert!(
        a[1]["message"]
            .as_str()
            .unwrap()
            .starts_with("Website shop is up again. availability="),
        "{a:?}"
    );
    assert_eq!(
        metric(&d.metrics(), "sensor_check_alert_firing", &[("check", "shop")]),
        Some(0.0)
    );
    let m = d.metrics();
    assert!(
        metric(
            &m,
            "sensor_check_http_responses_total",
            &[("check", "shop"), ("code", "503")]
        )
        .unwrap()
            >= 4.0,
        "{m}"
    );

    // The webhook got both (the first delivery was refused with 500 and retried).
    let start = Instant::now();
    while delivered.lock().unwrap().len() < 2 && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let got = delivered.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0]["message"], a[0]["message"]);
    assert_eq!(got[1]["state"], "resolved");
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        3,
        "one refused attempt + two deliveries"
    );
    let m = d.metrics();
    assert_eq!(
        metric(&m, "sensor_check_alert_notifications_total", &[("result", "sent")]),
        Some(2.0)
    );
    assert_eq!(
        metric(&m, "sensor_check_alert_notifications_total", &[("result", "failed")]),
        Some(0.0)
    );
    assert_eq!(d.stop().code(), Some(0));
}

fn nz(v: u16) -> std::num::NonZeroU16 {
    std::num::NonZeroU16::new(v).unwrap()
}

/// Runs `sensor top` on a pseudo-terminal of `cols` x `rows` and returns a handle to it.
struct Pty {
    master: std::fs::File,
    child: std::process::Child,
    parser: vt100::Parser,
}

impl Pty {
    fn spawn(args: &[&str], rows: u16, cols: u16) -> Pty {
        let (mut master, mut slave) = (0, 0);
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two fds into the provided ints; the winsize pointer is valid.
        let rc = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &ws) };
        assert_eq!(rc, 0, "openpty");
        use std::os::fd::FromRawFd;
        use std::os::unix::process::CommandExt;
        // SAFETY: the fds were just returned by openpty and are owned here.
        let (m, s) = unsafe { (std::fs::File::from_raw_fd(master), std::fs::File::from_raw_fd(slave)) };
        let mut cmd = std::process::Command::new(SENSOR);
        cmd.args(args)
            .env("TERM", "xterm-256color")
            .stdin(s.try_clone().unwrap())
            .stdout(s.try_clone().unwrap())
            .stderr(s);
        // SAFETY: setsid/ioctl are async-signal-safe; they make the pty the controlling terminal.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                libc::ioctl(0, libc::TIOCSCTTY, 0);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        // SAFETY: fcntl on our own fd.
        unsafe {
            let fl = libc::fcntl(master, libc::F_GETFL);
            libc::fcntl(master, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        Pty {
            master: m,
            child,
            parser: vt100::Parser::new(nz(rows), nz(cols), 0),
        }
    }

    fn pump(&mut self) {
        let mut b = [0u8; 65536];
        loop {
            match self.master.read(&mut b) {
                Ok(0) => return,
                Ok(n) => self.parser.process(&b[..n]),
                Err(_) => return,
            }
        }
    }

    /// Waits until the screen contains every needle; returns the screen text.
    fn wait_for(&mut self, needles: &[&str], limit: Duration) -> String {
        let start = Instant::now();
        loop {
            self.pump();
            let screen = self.parser.screen().contents();
            if needles.iter().all(|n| screen.contains(n)) {
                return screen;
            }
            assert!(
                start.elapsed() < limit,
                "screen lacks {needles:?} after {limit:?}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn resize(&mut self, rows: u16, cols: u16) {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        use std::os::fd::AsRawFd;
        // SAFETY: TIOCSWINSZ on the pty master with a valid winsize; the kernel sends SIGWINCH.
        unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        self.parser.screen_mut().set_size(nz(rows), nz(cols));
    }
}

#[test]
fn sensor_top_in_a_terminal() {
    let up = http_server(200, Duration::ZERO, "ok");
    let closed = free_port();
    let d = daemon_with(
        "top.yaml",
        &format!(
            "alerting: {{window: 1s, min_samples: 2}}
checks:
  - {{name: api-ok, type: http, url: 'http://{up}/', interval: 200ms}}
  - {{name: api-down, type: http, url: 'http://127.0.0.1:{closed}/', interval: 200ms}}
"
        ),
    );
    // Let the alert fire before the dashboard starts.
    d.wait_metric(
        "sensor_check_alert_firing",
        &[("check", "api-down")],
        1.0,
        Duration::from_secs(10),
    );
    let url = format!("http://127.0.0.1:{}", d.port);
    let mut t = Pty::spawn(
        &["top", "--url", &url, "--refresh", "500ms", "--refresh-long", "1s"],
        30,
        130,
    );
    let screen = t.wait_for(
        &[
            "Checks: last 10 minutes",
            "Checks: last hour",
            "api-ok",
            "api-down",
            "Website api-down is down.",
        ],
        Duration::from_secs(10),
    );
    let row = |name: &str, screen: &str| -> String {
        screen
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_default()
            .to_string()
    };
    let ok_row = row("api-ok", &screen);
    assert!(
        ok_row.contains(" up ") && ok_row.contains("100.0%") && ok_row.contains("200:"),
        "{ok_row}\n{screen}"
    );
    let down_row = row("api-down", &screen);
    assert!(
        down_row.contains("DOWN") && down_row.contains("0.0%") && down_row.contains("connect: Conn"),
        "{down_row}\n{screen}"
    );
    assert!(screen.contains("checks-only daemon"), "{screen}");
    assert!(screen.lines().all(|l| l.chars().count() <= 130));

    // Resize: the layout follows the new width.
    t.resize(24, 100);
    let start = Instant::now();
    loop {
        t.pump();
        let screen = t.parser.screen().contents();
        let border = screen
            .lines()
            .find(|l| l.contains("Checks: last 10 minutes"))
            .unwrap_or_default()
            .trim_end()
            .to_string();
        if border.chars().count() == 100 && border.ends_with('┐') {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "box not redrawn at 100 columns: {border:?}\n{screen}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // q quits and restores the terminal.
    t.master.write_all(b"q").unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = t.child.try_wait().unwrap() {
            break st;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "top did not quit on q");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    // `--once` prints the same dashboard without a terminal.
    let out = std::process::Command::new(SENSOR)
        .args(["top", "--once", "--url", &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("api-down") && text.contains("Alerts (1 in history"),
        "{text}"
    );
    drop(d);
}

#[test]
fn bad_check_config_names_file_check_key_and_reason() {
    let cases = [
        (
            "checks: [{name: a, type: http, url: 'http://x/', expect: {body_regex: '(unclosed'}}]",
            "checks[0].expect.body_regex",
            "check 'a': bad regex",
        ),
        (
            "checks: [{name: b, type: http, url: 'http://x/', tls: {ca_file: /nonexistent/ca.pem}}]",
            "checks[0].tls.ca_file",
            "check 'b': /nonexistent/ca.pem",
        ),
        (
            "checks: [{name: c, type: http, url: 'http://x/', expect: {status: [999]}}]",
            "checks[0].expect.status",
            "999 is not an HTTP status",
        ),
        (
            "checks: [{name: d, type: http, url: 'http://x/', gauges: [{name: g, value: v}]}]",
            "checks[0].gauges",
            "gauges need a websocket check",
        ),
        (
            "checks: [{name: e, type: websocket, url: 'ws://x/', gauges: [{name: sensor_x, value: v}]}]",
            "checks[0].gauges[0]",
            "sensor_ is reserved",
        ),
        (
            "checks: [{name: f, type: http, url: 'http://x/', timeout: soon}]",
            "checks[0].timeout",
            "bad duration 'soon'",
        ),
        (
            "checks: [{name: g, type: http, url: 'http://x/', retries: 3}]",
            "checks[0].retries",
            "check 'g': checks[0]: unknown field `retries`",
        ),
        ("alerting: {webhook: 'mailto:x'}", "alerting.webhook", "not an http"),
    ];
    for (i, (yaml, key, reason)) in cases.iter().enumerate() {
        let p = tmp(&format!("bad{i}.yaml"));
        std::fs::write(&p, yaml).unwrap();
        let out = std::process::Command::new(SENSOR)
            .args(["check", "--config"])
            .arg(&p)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{yaml}: {err}");
        assert!(
            err.contains(&format!("config {}", p.display()))
                && err.contains(&format!("key '{key}'"))
                && err.contains(reason),
            "{yaml}\n got: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn web_config_serves_tls_and_basic_auth() {
    let p = pki();
    let web = tls_web_config(&p, "web.yml", "alice");
    let port = free_port();
    let daemon_cfg = write_config(
        "web-daemon.yaml",
        "checks: [{name: self, type: http, url: 'http://127.0.0.1:9/', interval: 1s}]\n",
    );
    let mut child = std::process::Command::new(SENSOR)
        .args(["run", "--listen", &format!("127.0.0.1:{port}"), "--config"])
        .arg(&daemon_cfg)
        .arg("--web.config.file")
        .arg(&web)
        // Its own journal, never the host's /var/lib/sensor/journal.
        .arg("--journal.path")
        .arg(common::journal_dir(port))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ca = p.ca_pem.display();
    let auth = |user: &str, pw: &str| {
        format!(
            "Basic {}",
            sensor::webconfig::base64_encode(format!("{user}:{pw}").as_bytes())
        )
    };
    let probe_cfg = write_config(
        "web-probe.yaml",
        &format!(
            "checks:
  - {{name: authorized, type: http, url: 'https://127.0.0.1:{port}/metrics', tls: {{ca_file: '{ca}'}}, headers: {{Authorization: '{ok}'}}, expect: {{body_regex: 'sensor_check_up'}}}}
  - {{name: anonymous, type: http, url: 'https://127.0.0.1:{port}/metrics', tls: {{ca_file: '{ca}'}}}}
  - {{name: wrong-password, type: http, url: 'https://127.0.0.1:{port}/healthz', tls: {{ca_file: '{ca}'}}, headers: {{Authorization: '{bad}'}}}}
  - {{name: plain-http, type: http, url: 'http://127.0.0.1:{port}/healthz', timeout: 2s}}
",
            ok = auth("alice", "s3cret"),
            bad = auth("alice", "guess"),
        ),
    );
    let results = check_until_authorized(&probe_cfg);
    // `sensor top` against the protected daemon: with the CA and the user it shows the check;
    // without the password it says what is missing.
    let url = format!("https://127.0.0.1:{port}");
    let top = |with_user: bool| {
        let mut c = std::process::Command::new(SENSOR);
        c.args(["top", "--once", "--url", &url, "--ca-file"]).arg(&p.ca_pem);
        if with_user {
            c.args(["--user", "alice"]).env("SENSOR_PASSWORD", "s3cret");
        }
        c.output().unwrap()
    };
    let ok = top(true);
    let denied = top(false);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(common::journal_dir(port));
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success() && text.contains("Checks: last 10 minutes") && text.contains("self"),
        "{text}"
    );
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(
        !denied.status.success() && err.contains("HTTP 401") && err.contains("basic auth"),
        "{err}"
    );
    let a = by_name(&results, "authorized");
    assert_eq!(a["success"], true, "{a}");
    assert!(a["phases"]["tls"].is_number(), "{a}");
    for n in ["anonymous", "wrong-password"] {
        let r = by_name(&results, n);
        assert_eq!(r["status"], 401, "{r}");
    }
    let plain = by_name(&results, "plain-http");
    assert_eq!(
        plain["success"], false,
        "a TLS listener does not answer plain HTTP: {plain}"
    );
    assert!(plain["status"].is_null(), "{plain}");

    // A key exporter-toolkit has but the sensor does not implement is refused by name.
    let bad = tmp("web-bad.yml");
    std::fs::write(
        &bad,
        "tls_server_config: {cert_file: a, key_file: b, cipher_suites: [x]}\n",
    )
    .unwrap();
    let out = std::process::Command::new(SENSOR)
        .args(["run", "--listen", "127.0.0.1:0", "--config"])
        .arg(&daemon_cfg)
        .arg("--web.config.file")
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("web config {}", bad.display())) && err.contains("cipher_suites"),
        "{err}"
    );
    let nohash = tmp("web-nohash.yml");
    std::fs::write(&nohash, "basic_auth_users: {bob: plaintext}\n").unwrap();
    let out = std::process::Command::new(SENSOR)
        .args(["run", "--listen", "127.0.0.1:0", "--config"])
        .arg(&daemon_cfg)
        .arg("--web.config.file")
        .arg(&nohash)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("basic_auth_users.bob") && err.contains("not a bcrypt hash"),
        "{err}"
    );
}

#[test]
fn remediate_honours_the_web_config_tls_and_basic_auth() {
    // `sensor remediate` takes the same web config file as `sensor run`: HTTPS with the PKI's
    // certificate, and basic auth on every route.
    let p = pki();
    let web = tls_web_config(&p, "remediate-web.yml", "alertmanager");
    let port = free_port();
    let mut child = std::process::Command::new(SENSOR)
        .args([
            "remediate",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--web.config.file",
        ])
        .arg(&web)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ca = p.ca_pem.display();
    let ok = format!("Basic {}", sensor::webconfig::base64_encode(b"alertmanager:s3cret"));
    let probe_cfg = write_config(
        "remediate-probe.yaml",
        &format!(
            "checks:
  - {{name: authorized, type: http, url: 'https://127.0.0.1:{port}/metrics', tls: {{ca_file: '{ca}'}}, headers: {{Authorization: '{ok}'}}, expect: {{body_regex: 'sensor_remediation_webhooks_total'}}}}
  - {{name: audit, type: http, url: 'https://127.0.0.1:{port}/api/v1/remediations', tls: {{ca_file: '{ca}'}}, headers: {{Authorization: '{ok}'}}, expect: {{body_regex: '^\\[\\]$'}}}}
  - {{name: anonymous, type: http, url: 'https://127.0.0.1:{port}/api/v1/remediations', tls: {{ca_file: '{ca}'}}}}
  - {{name: plain-http, type: http, url: 'http://127.0.0.1:{port}/healthz', timeout: 2s}}
"
        ),
    );
    let results = check_until_authorized(&probe_cfg);
    let _ = child.kill();
    let _ = child.wait();
    for n in ["authorized", "audit"] {
        let r = by_name(&results, n);
        assert_eq!(r["success"], true, "{r}");
        assert!(r["phases"]["tls"].is_number(), "{r}");
    }
    assert_eq!(by_name(&results, "anonymous")["status"], 401);
    assert!(by_name(&results, "plain-http")["status"].is_null());
}
