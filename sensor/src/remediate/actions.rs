//! The actions: `exec` (tokio::process, never on a worker thread's blocking path), `webhook`
//! (the checks' HTTP client, retried) and `log`.

use std::{process::Stdio, time::Duration};

use bytes::Bytes;
use tokio::io::AsyncReadExt as _;

use super::{
    alertmanager::Alert,
    config::{Action, ActionType},
};
use crate::checks::{conn, http as client};

/// Bytes of an exec's output kept in the audit.
pub const MAX_OUTPUT: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ActionError {
    #[error("${{{0}}} is not set on the alert: refusing to run")]
    MissingValue(String),
    #[error("${{{0}}} = '{1}' starts with '-' and would be read as an option: refusing to run")]
    OptionLike(String, String),
    #[error("cannot start {0}: {1}")]
    Spawn(String, String),
    #[error("killed after {0:?} (timeout)")]
    Timeout(Duration),
    #[error("exited with {0}")]
    Exit(String),
    #[error("{0}")]
    Webhook(String),
}

/// What an action did: its output (bounded) or why it failed.
pub type Outcome = Result<String, ActionError>;

/// Replaces `${labels.NAME}`, `${annotations.NAME}` and `${alertname}` in one argv element.
pub fn expand(arg: &str, alert: &Alert) -> Result<String, ActionError> {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let name = &after[..end];
        let value = if name == "alertname" {
            Some(alert.name().to_string())
        } else if let Some(l) = name.strip_prefix("labels.") {
            alert.labels.get(l).cloned()
        } else if let Some(a) = name.strip_prefix("annotations.") {
            alert.annotations.get(a).cloned()
        } else {
            None
        };
        let value = value
            .filter(|v| !v.is_empty())
            .ok_or_else(|| ActionError::MissingValue(name.to_string()))?;
        if value.starts_with('-') {
            return Err(ActionError::OptionLike(name.to_string(), value));
        }
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `ALERT_LABEL_<NAME>`, `ALERT_ANNOTATION_<NAME>` (upper case, other characters as `_`), plus
/// `ALERT_NAME`, `ALERT_STATUS`, `ALERT_STARTS_AT`, `ALERT_FINGERPRINT`, `ALERT_GENERATOR_URL`.
pub fn environment(alert: &Alert) -> Vec<(String, String)> {
    let var = |prefix: &str, k: &str| {
        let k: String = k
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        format!("{prefix}{k}")
    };
    let mut env = vec![
        ("ALERT_NAME".to_string(), alert.name().to_string()),
        ("ALERT_STATUS".to_string(), alert.status.label().to_string()),
        ("ALERT_STARTS_AT".to_string(), alert.starts_at.clone()),
        ("ALERT_FINGERPRINT".to_string(), alert.fingerprint.clone()),
        ("ALERT_GENERATOR_URL".to_string(), alert.generator_url.clone()),
    ];
    env.extend(alert.labels.iter().map(|(k, v)| (var("ALERT_LABEL_", k), v.clone())));
    env.extend(
        alert
            .annotations
            .iter()
            .map(|(k, v)| (var("ALERT_ANNOTATION_", k), v.clone())),
    );
    env
}

pub async fn run(action: &Action, alert: &Alert) -> Outcome {
    match action.kind {
        ActionType::Exec => exec(action, alert).await,
        ActionType::Webhook => webhook(action, alert).await,
        ActionType::Log => {
            tracing::warn!(alert = alert.name(), labels = ?alert.labels, "remediation: log action");
            Ok(String::new())
        }
    }
}

async fn exec(action: &Action, alert: &Alert) -> Outcome {
    let mut cmd = if action.shell {
        let mut c = tokio::process::Command::new("sh");
        c.arg("-c").args(&action.command);
        c
    } else {
        let argv = action
            .command
            .iter()
            .map(|a| expand(a, alert))
            .collect::<Result<Vec<_>, _>>()?;
        let mut c = tokio::process::Command::new(&argv[0]);
        c.args(&argv[1..]);
        c
    };
    cmd.envs(environment(alert))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let program = action.command.first().cloned().unwrap_or_default();
    let mut child = cmd.spawn().map_err(|e| ActionError::Spawn(program, e.to_string()))?;
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let collect = async {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        // Read to the end (a full pipe would block the child), keep the first MAX_OUTPUT.
        let (ra, rb) = tokio::join!(
            async {
                match out.as_mut() {
                    Some(o) => o.read_to_end(&mut a).await.map(|_| ()),
                    None => Ok(()),
                }
            },
            async {
                match err.as_mut() {
                    Some(e) => e.read_to_end(&mut b).await.map(|_| ()),
                    None => Ok(()),
                }
            }
        );
        let _ = (ra, rb);
        let status = child.wait().await;
        (a, b, status)
    };
    let (stdout, stderr, status) = tokio::time::timeout(action.timeout, collect)
        .await
        .map_err(|_| ActionError::Timeout(action.timeout))?;
    let mut text = String::from_utf8_lossy(&stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&stderr));
    if text.len() > MAX_OUTPUT {
        let mut cut = MAX_OUTPUT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    match status {
        Ok(s) if s.success() => Ok(text),
        Ok(s) => Err(ActionError::Exit(format!("{s}: {}", text.trim()))),
        Err(e) => Err(ActionError::Exit(e.to_string())),
    }
}

async fn webhook(action: &Action, alert: &Alert) -> Outcome {
    let url = action.url.as_deref().unwrap_or_default();
    let target = conn::Target::parse(url).map_err(ActionError::Webhook)?;
    let tls = if target.tls {
        Some(conn::tls_client(&Default::default(), &[b"http/1.1"]).map_err(ActionError::Webhook)?)
    } else {
        None
    };
    let body = serde_json::to_vec(&serde_json::json!({ "alert": alert })).unwrap_or_default();
    let body = Bytes::from(body);
    let headers = [(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    )];
    let mut delay = Duration::from_millis(500);
    let mut last = String::new();
    for attempt in 0..=action.retries {
        if attempt > 0 {
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        let mut p = conn::Progress::default();
        let req = client::Request {
            target: &target,
            tls: tls.as_ref(),
            method: &http::Method::POST,
            headers: &headers,
            body: Some(body.clone()),
            keep_body: 1024,
        };
        match tokio::time::timeout(action.timeout, client::request(req, &mut p)).await {
            Ok(Ok(r)) if (200..300).contains(&r.status) => return Ok(format!("HTTP {}", r.status)),
            Ok(Ok(r)) => last = format!("HTTP {}", r.status),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = format!("no answer within {:?}", action.timeout),
        }
        tracing::warn!(attempt, url, error = %last, "remediation webhook failed");
    }
    Err(ActionError::Webhook(format!(
        "{url}: {} attempts failed, last: {last}",
        action.retries + 1
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remediate::alertmanager::Status;

    fn alert(labels: &[(&str, &str)]) -> Alert {
        let mut l: std::collections::BTreeMap<String, String> =
            labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        l.insert("alertname".into(), "A".into());
        Alert {
            status: Status::Firing,
            labels: l,
            annotations: [("summary".to_string(), "x; rm -rf /".to_string())].into(),
            starts_at: "t".into(),
            ends_at: String::new(),
            generator_url: String::new(),
            fingerprint: "f".into(),
        }
    }

    fn exec_action(command: &[&str], shell: bool, timeout: Duration) -> Action {
        Action {
            name: None,
            kind: ActionType::Exec,
            command: command.iter().map(|s| s.to_string()).collect(),
            shell,
            url: None,
            retries: 0,
            timeout,
        }
    }

    #[test]
    fn expansion_is_per_argument_and_refuses_missing_or_option_like_values() {
        let a = alert(&[
            ("namespace", "shop"),
            ("pod", "web-1"),
            ("evil", "--all"),
            ("empty", ""),
        ]);
        assert_eq!(expand("${labels.namespace}/${labels.pod}", &a).unwrap(), "shop/web-1");
        assert_eq!(expand("${alertname}", &a).unwrap(), "A");
        assert_eq!(expand("${annotations.summary}", &a).unwrap(), "x; rm -rf /");
        assert_eq!(expand("plain", &a).unwrap(), "plain");
        assert_eq!(
            expand("${labels.node}", &a),
            Err(ActionError::MissingValue("labels.node".into()))
        );
        assert_eq!(
            expand("${labels.empty}", &a),
            Err(ActionError::MissingValue("labels.empty".into()))
        );
        assert!(matches!(expand("${labels.evil}", &a), Err(ActionError::OptionLike(..))));
    }

    #[test]
    fn environment_names() {
        let env = environment(&alert(&[("k8s-node", "n1")]));
        assert!(env.contains(&("ALERT_LABEL_K8S_NODE".into(), "n1".into())));
        assert!(env.contains(&("ALERT_NAME".into(), "A".into())));
        assert!(env.contains(&("ALERT_STATUS".into(), "firing".into())));
        assert!(env.contains(&("ALERT_ANNOTATION_SUMMARY".into(), "x; rm -rf /".into())));
    }

    #[tokio::test]
    async fn exec_runs_without_a_shell_and_with_the_alert_in_its_environment() {
        let a = alert(&[("pod", "web-1")]);
        // No shell: the annotation's `;` is one argument of echo, not a second command.
        let act = exec_action(
            &["echo", "${labels.pod}", "${annotations.summary}"],
            false,
            Duration::from_secs(5),
        );
        assert_eq!(run(&act, &a).await.unwrap(), "web-1 x; rm -rf /\n");
        let act = exec_action(
            &["echo \"$ALERT_LABEL_POD\" \"$ALERT_NAME\""],
            true,
            Duration::from_secs(5),
        );
        assert_eq!(run(&act, &a).await.unwrap(), "web-1 A\n");
        let act = exec_action(&["sh", "-c", "echo oops >&2; exit 3"], false, Duration::from_secs(5));
        let e = run(&act, &a).await.unwrap_err();
        assert!(
            e.to_string().contains("exit status: 3") && e.to_string().contains("oops"),
            "{e}"
        );
        let act = exec_action(&["sleep", "5"], false, Duration::from_millis(200));
        assert_eq!(
            run(&act, &a).await,
            Err(ActionError::Timeout(Duration::from_millis(200)))
        );
        let act = exec_action(&["/nonexistent/kubectl"], false, Duration::from_secs(1));
        assert!(matches!(run(&act, &a).await, Err(ActionError::Spawn(..))));
    }

    #[tokio::test]
    async fn webhook_retries_until_accepted() {
        use tokio::io::AsyncWriteExt as _;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", l.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let mut bodies = Vec::new();
            for i in 0..3 {
                let (mut s, _) = l.accept().await.unwrap();
                let mut got = Vec::new();
                let mut buf = vec![0u8; 65536];
                // Headers and body may come in separate segments: read to the JSON's end.
                while !got.ends_with(b"}") {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                bodies.push(String::from_utf8_lossy(&got).into_owned());
                let status = if i < 2 { "503 Service Unavailable" } else { "200 OK" };
                let _ = s
                    .write_all(
                        format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
                    )
                    .await;
            }
            bodies
        });
        let act = Action {
            name: None,
            kind: ActionType::Webhook,
            command: vec![],
            shell: false,
            url: Some(url),
            retries: 3,
            timeout: Duration::from_secs(5),
        };
        assert_eq!(run(&act, &alert(&[("pod", "p")])).await.unwrap(), "HTTP 200");
        let bodies = server.await.unwrap();
        assert!(bodies[2].contains("\"pod\":\"p\""), "{}", bodies[2]);
    }
}
