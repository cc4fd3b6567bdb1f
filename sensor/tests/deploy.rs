//! The Prometheus rules in deploy/prometheus: syntax (`promtool check rules`) and behaviour
//! (`promtool test rules`, including 1,000 hosts of which 1% OOM within the hour -> exactly
//! 0.01). Under CI=true a missing promtool fails the test instead of skipping it.

use std::{path::PathBuf, process::Command};

fn prometheus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

fn promtool() -> Option<Command> {
    if Command::new("promtool").arg("--version").output().is_ok() {
        return Some(Command::new("promtool"));
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("CI=true but promtool is missing (.ci/run installs Debian's prometheus package)");
    }
    eprintln!("SKIP: promtool not installed (apt-get install prometheus)");
    None
}

#[test]
fn prometheus_rules_pass_promtool() {
    let Some(mut check) = promtool() else { return };
    let dir = prometheus_dir();
    let out = check
        .args(["check", "rules"])
        .arg(dir.join("sensor-rules.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let Some(mut test) = promtool() else { return };
    let out = test
        .args(["test", "rules", "fleet.test.yml", "alerts.test.yml"])
        .current_dir(dir.join("tests"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches("SUCCESS").count(), 2, "{text}");
}

#[test]
fn generated_fleet_test_is_current() {
    // The committed test file must be what generate.py writes (it is data, not hand-edited).
    let dir = prometheus_dir().join("tests");
    let tmp = std::env::temp_dir().join(format!("sensor-fleet-gen-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(dir.join("generate.py"), tmp.join("generate.py")).unwrap();
    let st = Command::new("python3").arg("generate.py").current_dir(&tmp).status();
    let Ok(st) = st else {
        eprintln!("SKIP: no python3");
        return;
    };
    assert!(st.success());
    let fresh = std::fs::read_to_string(tmp.join("fleet.test.yml")).unwrap();
    let committed = std::fs::read_to_string(dir.join("fleet.test.yml")).unwrap();
    assert!(
        fresh == committed,
        "deploy/prometheus/tests/fleet.test.yml is stale: run generate.py there"
    );
}
