//! `sensor remediate` as a new user would expose it: a real runner process, real HTTP (and
//! HTTPS) requests on loopback, a real exec action whose side effect (a line appended to a file)
//! is checked. An acting runner reachable from other hosts refuses to start without
//! authentication; with it, forged webhooks get 401 and run nothing, authenticated ones run
//! (basic auth, bearer token, TLS client certificate), and only allowed targets are acted on.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{tls::Pki, *};

/// A scratch directory for one test, and the file its exec action appends to.
struct Case {
    dir: PathBuf,
    out: PathBuf,
}

impl Case {
    fn new(name: &str) -> Case {
        let dir = std::env::temp_dir().join(format!("sensor-remediate-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("actions.log");
        Case { dir, out }
    }

    /// A config acting (`dry_run: false`) on `listen` with `extra` keys, and one rule: the storm
    /// alert's namespace and pod, as argv elements, appended to `out`; only namespace `shop`.
    fn config(&self, listen: &str, extra: &str) -> PathBuf {
        let text = format!(
            "listen: {listen}\ndry_run: false\n{extra}\nrules:
  - alert: Storm
    target_labels: [namespace, pod]
    allowed_targets: {{namespace: [shop]}}
    actions:
      - name: record
        type: exec
        command: [/bin/sh, -c, 'printf \"%s %s\\n\" \"$0\" \"$1\" >> {}', '${{labels.namespace}}', '${{labels.pod}}']
",
            self.out.display()
        );
        let p = self.dir.join("remediate.yaml");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// [`Case::config`] on 0.0.0.0:`port` with HTTPS (the PKI's server certificate) and client
    /// certificates of the PKI's CA as `client_auth_type` says.
    fn tls_config(&self, port: u16, pki: &Pki, client_auth_type: &str) -> PathBuf {
        let web = self.file(
            "web.yml",
            &format!(
                "tls_server_config: {{cert_file: {}, key_file: {}, client_auth_type: {client_auth_type}, client_ca_file: {}}}\n",
                pki.server_cert.display(),
                pki.server_key.display(),
                pki.ca.display()
            ),
        );
        self.config(
            &format!("0.0.0.0:{port}"),
            &format!("web_config_file: {}", web.display()),
        )
    }

    fn lines(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Starts `sensor remediate --config CONFIG`; ready once `ready(port)`.
    fn start(&self, config: &Path, port: u16, ready: impl Fn(u16) -> bool) -> Service {
        let mut cmd = Command::new(SENSOR);
        cmd.args(["remediate", "--config"]).arg(config);
        let mut s = Service::spawn("sensor remediate", cmd, port, self.dir.join("remediate.log"));
        s.wait_until(ready);
        s
    }

    /// Waits until the action appended `want` (10 s at most).
    fn wait_lines(&self, want: &str, log: impl Fn() -> String) {
        let start = Instant::now();
        while self.lines() != want {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "actions {:?}, want {want:?}\n{}",
                self.lines(),
                log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An Alertmanager (version 4) notification of one firing `Storm` alert.
fn storm(namespace: &str, pod: &str) -> String {
    serde_json::json!({
        "version": "4", "status": "firing", "receiver": "remediation", "groupKey": "{}:{}",
        "alerts": [{
            "status": "firing",
            "labels": {"alertname": "Storm", "namespace": namespace, "pod": pod},
            "annotations": {"summary": "FORGED-BODY-MARKER"},
            "startsAt": "2026-01-01T00:00:00Z", "fingerprint": "f1"
        }]
    })
    .to_string()
}

const JSON: &str = "Content-Type: application/json";
const TOKEN: &str = "6f1c0e4a9b7d2e85c3a1f0d9b8e7c6a5";

/// `sensor remediate` run to its end (for configs it refuses): (exit code, stderr). A runner
/// still up after 10 s started instead of refusing: killed, and the test fails.
fn run_to_end(config: &Path) -> (Option<i32>, String) {
    let err = config.with_extension("stderr");
    let mut child = Command::new(SENSOR)
        .args(["remediate", "--config"])
        .arg(config)
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the runner started instead of refusing:\n{}",
                std::fs::read_to_string(&err).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.code(), std::fs::read_to_string(&err).unwrap())
}

/// `/api/v1/remediations` once it holds `n` entries (10 s at most): an action's outcome is
/// recorded when the command has exited, a moment after its side effect.
fn audit_with(port: u16, auth: &str, n: usize) -> Vec<serde_json::Value> {
    let start = Instant::now();
    loop {
        let (_, body) = http_request(port, "GET", "/api/v1/remediations", &[auth], None).unwrap();
        let audit: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        if audit.len() >= n || start.elapsed() > Duration::from_secs(10) {
            return audit;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn counted(metrics: &str, result: &str) -> Option<f64> {
    metric(metrics, "sensor_remediation_webhooks_total", &[("result", result)])
}

#[test]
fn exposed_acting_runner_without_authentication_refuses_to_start() {
    let c = Case::new("refuse");
    let port = free_port();
    let (code, err) = run_to_end(&c.config(&format!("0.0.0.0:{port}"), ""));
    assert_eq!(code, Some(1), "{err}");
    let want = format!(
        "sensor: refusing to start: listen 0.0.0.0:{port} is reachable from other hosts and dry_run is false, but requests are not authenticated: set basic_auth_users, or tls_server_config with client_auth_type: RequireAndVerifyClientCert and client_ca_file, in web_config_file, or bearer_token_file (or insecure_allow_unauthenticated: true when a proxy in front authenticates)"
    );
    assert_eq!(
        err.lines().filter(|l| l.starts_with("sensor: ")).collect::<Vec<_>>(),
        [want.as_str()],
        "{err}"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens on the refused port, so no forged webhook can reach it"
    );

    // Client certificates that are only verified if given are no authentication.
    let pki = Pki::new(&c.dir.join("pki"));
    let cfg = c.tls_config(port, &pki, "VerifyClientCertIfGiven");
    let (code, err) = run_to_end(&cfg);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("refusing to start"), "{err}");

    // A bearer token too short to be secret is refused with the reason.
    let short = c.file("short-token", "abc123\n");
    let cfg = c.config(
        &format!("0.0.0.0:{port}"),
        &format!("bearer_token_file: {}", short.display()),
    );
    let (code, err) = run_to_end(&cfg);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("the token has 6 characters, at least 16 are needed"),
        "{err}"
    );
}

#[test]
fn old_configs_still_start_and_the_opt_out_is_loud() {
    let c = Case::new("compat");
    // Exposed but dry run: starts, warns, a forged webhook runs nothing.
    let port = free_port();
    let cfg = c.config(&format!("0.0.0.0:{port}"), "").with_file_name("dry.yaml");
    let text = std::fs::read_to_string(c.dir.join("remediate.yaml")).unwrap();
    std::fs::write(&cfg, text.replace("dry_run: false", "dry_run: true")).unwrap();
    let mut s = c.start(&cfg, port, |p| matches!(http_get(p, "/healthz"), Ok((200, _))));
    let (code, body) = http_request(port, "POST", "/webhook", &[JSON], Some(&storm("shop", "web-1"))).unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"decision\":\"dry_run\""), "{body}");
    s.stop();
    assert!(
        s.log().contains("anyone can fill the audit"),
        "the exposed dry run says so:\n{}",
        s.log()
    );
    assert_eq!(c.lines(), "", "a dry run runs nothing");

    // Loopback and acting, as before: only local processes reach it.
    let port = free_port();
    let cfg = c.config(&format!("127.0.0.1:{port}"), "");
    let mut s = c.start(&cfg, port, |p| matches!(http_get(p, "/healthz"), Ok((200, _))));
    let (code, _) = http_request(port, "POST", "/webhook", &[JSON], Some(&storm("shop", "web-1"))).unwrap();
    assert_eq!(code, 200);
    c.wait_lines("shop web-1\n", || s.log());
    s.stop();
    assert!(
        s.log().contains("only processes on this host can connect"),
        "{}",
        s.log()
    );

    // The explicit opt-out starts exposed and acting, and says INSECURE.
    let port = free_port();
    let cfg = c.config(&format!("0.0.0.0:{port}"), "insecure_allow_unauthenticated: true");
    let mut s = c.start(&cfg, port, |p| matches!(http_get(p, "/healthz"), Ok((200, _))));
    s.stop();
    let insecure: Vec<String> = s
        .log()
        .lines()
        .filter(|l| l.contains("INSECURE"))
        .map(String::from)
        .collect();
    assert_eq!(insecure.len(), 1, "{}", s.log());
    assert!(insecure[0].contains("WARN"), "{}", insecure[0]);
}

#[test]
fn basic_auth_refuses_forged_webhooks_and_runs_authenticated_ones() {
    let c = Case::new("basic");
    let port = free_port();
    let web = c.file(
        "web.yml",
        &format!(
            "basic_auth_users:\n  alertmanager: {}\n",
            bcrypt::hash("s3cret-pw", 4).unwrap()
        ),
    );
    let cfg = c.config(
        &format!("0.0.0.0:{port}"),
        &format!("web_config_file: {}", web.display()),
    );
    const AUTH: &str = "Authorization: Basic YWxlcnRtYW5hZ2VyOnMzY3JldC1wdw=="; // alertmanager:s3cret-pw
    let mut s = c.start(&cfg, port, |p| {
        matches!(http_request(p, "GET", "/healthz", &[AUTH], None), Ok((200, _)))
    });
    // The forged webhook of the issue, then wrong credentials: 401, nothing decided or run.
    let forged = storm("kube-system", "coredns-1");
    for headers in [
        vec![JSON],
        vec![JSON, "Authorization: Basic YWxlcnRtYW5hZ2VyOndyb25n"], // alertmanager:wrong
        vec![JSON, "Authorization: Basic bWFsbG9yeTpzM2NyZXQtcHc="], // mallory:s3cret-pw
        vec![JSON, "Authorization: Bearer 6f1c0e4a9b7d2e85c3a1f0d9b8e7c6a5"],
    ] {
        let (code, body) = http_request(port, "POST", "/webhook", &headers, Some(&forged)).unwrap();
        assert_eq!(code, 401, "{headers:?}: {body}");
    }
    let (code, _) = http_get(port, "/api/v1/remediations").unwrap();
    assert_eq!(code, 401, "the audit is not readable without credentials either");

    // Authenticated: decided and run, with the alert's labels as the command's arguments.
    let (code, body) = http_request(port, "POST", "/webhook", &[JSON, AUTH], Some(&storm("shop", "web-1"))).unwrap();
    assert_eq!(code, 200, "{body}");
    c.wait_lines("shop web-1\n", || s.log());
    let audit = audit_with(port, AUTH, 1);
    assert_eq!(
        audit.len(),
        1,
        "only the authenticated webhook reached the runner: {audit:?}"
    );
    assert_eq!(audit[0]["result"], "success");
    let (_, m) = http_request(port, "GET", "/metrics", &[AUTH], None).unwrap();
    assert_eq!(counted(&m, "unauthorized"), Some(5.0), "{m}");
    assert_eq!(counted(&m, "ok"), Some(1.0), "{m}");
    s.stop();
    let log = s.log();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("request refused: unauthorized"))
        .collect();
    assert_eq!(refused.len(), 5, "{log}");
    assert!(
        refused[0].contains("no credentials") && refused[0].contains("/webhook"),
        "{}",
        refused[0]
    );
    assert!(refused[1].contains("wrong user or password"), "{}", refused[1]);
    assert!(
        refused[3].contains("scheme this server does not accept"),
        "{}",
        refused[3]
    );
    assert!(
        !log.contains("FORGED-BODY-MARKER"),
        "refused bodies are never logged:\n{log}"
    );
    assert!(!log.contains("kube-system"), "{log}");
    assert!(
        !log.contains("bWFsbG9yeTpzM2NyZXQtcHc="),
        "credentials are never logged:\n{log}"
    );
}

#[test]
fn bearer_token_from_a_file_authenticates() {
    let c = Case::new("bearer");
    let port = free_port();
    let token = c.file("token", &format!("{TOKEN}\n"));
    let cfg = c.config(
        &format!("0.0.0.0:{port}"),
        &format!("bearer_token_file: {}", token.display()),
    );
    let auth = format!("Authorization: Bearer {TOKEN}");
    let mut s = c.start(&cfg, port, |p| {
        matches!(http_request(p, "GET", "/healthz", &[&auth], None), Ok((200, _)))
    });
    for bad in [
        "Authorization: Bearer 6f1c0e4a9b7d2e85c3a1f0d9b8e7c6a", // one character short
        "Authorization: Bearer 6f1c0e4a9b7d2e85c3a1f0d9b8e7c6a50", // one too many
        "Authorization: Basic YWxlcnRtYW5hZ2VyOnMzY3JldA==",
    ] {
        let (code, _) = http_request(port, "POST", "/webhook", &[JSON, bad], Some(&storm("shop", "x"))).unwrap();
        assert_eq!(code, 401, "{bad}");
    }
    let (code, body) = http_request(port, "POST", "/webhook", &[JSON, &auth], Some(&storm("shop", "web-2"))).unwrap();
    assert_eq!(code, 200, "{body}");
    c.wait_lines("shop web-2\n", || s.log());
    let (_, m) = http_request(port, "GET", "/metrics", &[&auth], None).unwrap();
    assert_eq!(counted(&m, "unauthorized"), Some(3.0), "{m}");
    s.stop();
    assert!(s.log().contains("auth=bearer_token"), "{}", s.log());
    assert!(
        s.log()
            .contains("without TLS (tls_server_config) the credentials cross the network in clear text"),
        "a token over plain HTTP off loopback is warned about:\n{}",
        s.log()
    );
    assert!(!s.log().contains(&TOKEN[..16]), "the token is never logged");
}

#[test]
fn tls_client_certificate_verified_against_the_ca_authenticates() {
    let c = Case::new("mtls");
    let port = free_port();
    let pki = Pki::new(&c.dir.join("pki"));
    let cfg = c.tls_config(port, &pki, "RequireAndVerifyClientCert");
    let good = Some((pki.client_cert.as_path(), pki.client_key.as_path()));
    let req = |client: Option<(&Path, &Path)>, method: &str, path: &str, body: Option<&str>| {
        tls::https_request(port, &pki.ca, client, method, path, &[JSON], body)
    };
    let mut s = c.start(&cfg, port, |_| {
        matches!(req(good, "GET", "/healthz", None), Ok((200, _)))
    });
    // Without a certificate, or with one of another CA, the handshake fails: no HTTP at all.
    let forged = storm("shop", "forged");
    let e = req(None, "POST", "/webhook", Some(&forged)).unwrap_err();
    eprintln!("without a client certificate: {e}");
    let rogue = Some((pki.rogue_cert.as_path(), pki.rogue_key.as_path()));
    let e = req(rogue, "POST", "/webhook", Some(&forged)).unwrap_err();
    eprintln!("with another CA's certificate: {e}");
    // Plain HTTP to the TLS port is no way around it.
    let r = http_request(port, "POST", "/webhook", &[JSON], Some(&forged));
    assert!(!matches!(r, Ok((200, _))), "{r:?}");

    // A TCP probe (the Deployment's liveness probe) that closes without a word is no refusal.
    drop(std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());

    let (code, body) = req(good, "POST", "/webhook", Some(&storm("shop", "web-3"))).unwrap();
    assert_eq!(code, 200, "{body}");
    c.wait_lines("shop web-3\n", || s.log());
    let (_, m) = req(good, "GET", "/metrics", None).unwrap();
    assert_eq!(
        metric(&m, "sensor_http_rejected_total", &[("reason", "tls_handshake")]),
        Some(3.0),
        "no certificate, another CA's, plain HTTP: {m}"
    );
    assert_eq!(counted(&m, "ok"), Some(1.0), "{m}");
    s.stop();
    assert!(s.log().contains("auth=client_certificate"), "{}", s.log());
}

#[test]
fn target_outside_the_allow_list_is_refused_with_its_reason() {
    let c = Case::new("allow");
    let port = free_port();
    let token = c.file("token", TOKEN);
    let cfg = c.config(
        &format!("127.0.0.1:{port}"),
        &format!("bearer_token_file: {}", token.display()),
    );
    let auth = format!("Authorization: Bearer {TOKEN}");
    let mut s = c.start(&cfg, port, |p| {
        matches!(http_request(p, "GET", "/healthz", &[&auth], None), Ok((200, _)))
    });
    // Authenticated, but the namespace is not one the rule may touch.
    let (code, body) = http_request(
        port,
        "POST",
        "/webhook",
        &[JSON, &auth],
        Some(&storm("kube-system", "coredns-1")),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["decisions"][0]["decision"], "skipped_not_allowed", "{v}");
    let reason = "target not allowed: namespace=\"kube-system\" matches none of allowed_targets.namespace [shop]";
    assert_eq!(v["decisions"][0]["reason"], reason, "{v}");
    // An allowed one still acts: the refusal used up no rate limit or cooldown.
    let (code, _) = http_request(
        port,
        "POST",
        "/webhook",
        &[JSON, &auth],
        Some(&storm("shop", "coredns-1")),
    )
    .unwrap();
    assert_eq!(code, 200);
    c.wait_lines("shop coredns-1\n", || s.log());
    let audit = audit_with(port, &auth, 2);
    let results: Vec<(&str, &str)> = audit
        .iter()
        .map(|e| (e["result"].as_str().unwrap(), e["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(results, [("skipped_not_allowed", reason), ("success", "")], "{audit:?}");
    assert_eq!(audit[0]["labels"]["namespace"], "kube-system");
    let (_, m) = http_request(port, "GET", "/metrics", &[&auth], None).unwrap();
    let acted = |result: &str| {
        metric(
            &m,
            "sensor_remediation_actions_total",
            &[("alert", "Storm"), ("action", "record"), ("result", result)],
        )
    };
    assert_eq!(acted("skipped_not_allowed"), Some(1.0), "{m}");
    assert_eq!(acted("success"), Some(1.0), "{m}");
    s.stop();
}
