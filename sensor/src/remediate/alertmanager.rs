//! Alertmanager's webhook payload (version 4), the only format the runner accepts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One notification: a group of alerts sharing the route's `group_by` labels.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Notification {
    pub version: String,
    #[serde(default)]
    pub group_key: String,
    #[serde(default)]
    pub receiver: String,
    pub status: Status,
    pub alerts: Vec<Alert>,
    #[serde(default)]
    pub external_url: String,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Firing,
    Resolved,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Firing => "firing",
            Status::Resolved => "resolved",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    pub status: Status,
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub starts_at: String,
    #[serde(default)]
    pub ends_at: String,
    #[serde(default, rename = "generatorURL")]
    pub generator_url: String,
    #[serde(default)]
    pub fingerprint: String,
}

impl Alert {
    pub fn name(&self) -> &str {
        self.labels.get("alertname").map(String::as_str).unwrap_or("")
    }
}

/// Why a request body is refused (each a `result` of `sensor_remediation_webhooks_total`).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PayloadError {
    #[error("body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("not an Alertmanager webhook payload: {0}")]
    BadJson(String),
    #[error("webhook payload version '{0}' is not supported (Alertmanager sends version 4)")]
    BadVersion(String),
    #[error("alert {index} has no alertname label")]
    NoAlertName { index: usize },
}

impl PayloadError {
    pub fn result(&self) -> &'static str {
        match self {
            PayloadError::TooLarge { .. } => "too_large",
            PayloadError::BadJson(_) => "bad_json",
            PayloadError::BadVersion(_) => "bad_version",
            PayloadError::NoAlertName { .. } => "bad_alert",
        }
    }
}

/// Parses and checks a webhook body.
pub fn parse(body: &[u8]) -> Result<Notification, PayloadError> {
    // The version first, so an Alertmanager of another generation hears "version", not a
    // field-level complaint.
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| PayloadError::BadJson(e.to_string()))?;
    match v.get("version").and_then(|v| v.as_str()) {
        Some("4") => {}
        Some(other) => return Err(PayloadError::BadVersion(other.to_string())),
        None => return Err(PayloadError::BadJson("missing field `version`".into())),
    }
    let n: Notification = serde_json::from_value(v).map_err(|e| PayloadError::BadJson(e.to_string()))?;
    if let Some(index) = n.alerts.iter().position(|a| a.name().is_empty()) {
        return Err(PayloadError::NoAlertName { index });
    }
    Ok(n)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A payload as Alertmanager 0.25 sends it.
    pub fn payload(status: &str, alerts: &[(&str, &[(&str, &str)])]) -> String {
        let alerts: Vec<serde_json::Value> = alerts
            .iter()
            .map(|(name, labels)| {
                let mut l: BTreeMap<String, String> =
                    labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
                l.insert("alertname".into(), name.to_string());
                serde_json::json!({
                    "status": status, "labels": l, "annotations": {"summary": "s"},
                    "startsAt": "2024-01-01T00:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
                    "generatorURL": "http://prom/graph", "fingerprint": "abc"
                })
            })
            .collect();
        serde_json::json!({
            "version": "4", "groupKey": "{}:{}", "truncatedAlerts": 0, "status": status,
            "receiver": "remediation", "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
            "externalURL": "http://am", "alerts": alerts
        })
        .to_string()
    }

    #[test]
    fn alertmanager_payload_parses() {
        let n = parse(payload("firing", &[("A", &[("instance", "h1")])]).as_bytes()).unwrap();
        assert_eq!(n.alerts.len(), 1);
        assert_eq!(n.alerts[0].name(), "A");
        assert_eq!(n.alerts[0].status, Status::Firing);
        assert_eq!(n.alerts[0].fingerprint, "abc");
    }

    #[test]
    fn bad_payloads_say_why() {
        assert!(matches!(parse(b"{not json"), Err(PayloadError::BadJson(_))));
        assert_eq!(
            parse(br#"{"version":"3","status":"firing","alerts":[]}"#).unwrap_err(),
            PayloadError::BadVersion("3".into())
        );
        let e = parse(br#"{"version":"4","status":"firing"}"#).unwrap_err();
        assert!(e.to_string().contains("alerts"), "{e}");
        let e = parse(br#"{"version":"4","status":"burning","alerts":[]}"#).unwrap_err();
        assert_eq!(e.result(), "bad_json");
        let e = parse(br#"{"version":"4","status":"firing","alerts":[{"status":"firing","labels":{}}]}"#).unwrap_err();
        assert_eq!(e, PayloadError::NoAlertName { index: 0 });
    }
}
