//! Bad check configs name file, check, key and reason; the web config's TLS and basic auth on the daemon and the remediation runner.

use super::*;

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
