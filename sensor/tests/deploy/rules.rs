//! The Prometheus rules and configs under promtool, and the generated fleet test kept current.

use super::*;

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
        .args([
            "test",
            "rules",
            "fleet.test.yml",
            "alerts.test.yml",
            "outliers.test.yml",
            "workloads.test.yml",
            "owners.test.yml",
            "checks.test.yml",
            "imminent.test.yml",
        ])
        .current_dir(dir.join("tests"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches("SUCCESS").count(), 7, "{text}");
}

/// The kube-state-metrics join deploy/README.md documents is, word for word, the expression
/// promtool tests in deploy/prometheus/tests/workloads.test.yml.
#[test]
fn documented_kube_pod_info_join_is_the_tested_one() {
    let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let test = std::fs::read_to_string(prometheus_dir().join("tests/workloads.test.yml")).unwrap();
    // The last `expr: |` block of the file is the join.
    let block = test
        .split("      - expr: |\n")
        .last()
        .and_then(|t| t.split("        eval_time:").next())
        .unwrap();
    let tested = words(block);
    assert!(tested.contains("kube_pod_info"), "{tested}");
    let readme = std::fs::read_to_string(root().join("deploy/README.md")).unwrap();
    let block = readme
        .split("```promql")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .find(|b| b.contains("kube_pod_info"))
        .expect("a ```promql block with the join in deploy/README.md");
    assert_eq!(words(block), tested);
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
        common::skip("no python3");
        return;
    };
    assert!(st.success());
    for f in ["fleet.test.yml", "outliers.test.yml"] {
        let fresh = std::fs::read_to_string(tmp.join(f)).unwrap();
        let committed = std::fs::read_to_string(dir.join(f)).unwrap();
        assert!(
            fresh == committed,
            "deploy/prometheus/tests/{f} is stale: run generate.py there"
        );
    }
}

/// Debian's Prometheus is built without Kubernetes service discovery, so its promtool rejects
/// `kubernetes_sd_configs`. Then the rest of the file (relabelling, remote_write, rule files)
/// is checked with that block swapped for `file_sd_configs`; an upstream promtool checks the
/// file as it is.
fn check_config(dir: &Path, file: &str) {
    check_config_with(dir, file, &[]);
}

/// [`check_config`] with extra `promtool check config` flags (`--agent`).
fn check_config_with(dir: &Path, file: &str, flags: &[&str]) {
    let Some(mut cmd) = promtool() else { return };
    let out = cmd
        .args(["check", "config"])
        .args(flags)
        .arg(dir.join(file))
        .output()
        .unwrap();
    let t = text(&out);
    if out.status.success() {
        assert!(t.contains("SUCCESS"), "{file}: {t}");
        return;
    }
    assert!(t.contains("field kubernetes_sd_configs not found"), "{file}: {t}");
    let src = std::fs::read_to_string(dir.join(file)).unwrap();
    let mut swapped = String::new();
    let mut skipping = false;
    for line in src.lines() {
        if line.trim() == "kubernetes_sd_configs:" {
            let indent = &line[..line.len() - line.trim_start().len()];
            swapped.push_str(&format!("{indent}file_sd_configs: [{{files: [targets.json]}}]\n"));
            skipping = true;
            continue;
        }
        // The block's own lines (`- role: pod`, `namespaces: ...`) are indented deeper.
        if skipping && (line.trim_start().starts_with("- role:") || line.starts_with("        ")) {
            continue;
        }
        skipping = false;
        swapped.push_str(line);
        swapped.push('\n');
    }
    assert!(!swapped.contains("kubernetes_sd"), "{swapped}");
    let tmp = std::env::temp_dir().join(format!("sensor-promcfg-{}-{file}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(dir.join("sensor-rules.yml"), tmp.join("sensor-rules.yml")).unwrap();
    std::fs::write(tmp.join(file), &swapped).unwrap();
    let Some(mut cmd) = promtool() else { return };
    let out = cmd
        .args(["check", "config"])
        .args(flags)
        .arg(tmp.join(file))
        .output()
        .unwrap();
    let t = text(&out);
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(
        out.status.success(),
        "{file} (kubernetes_sd swapped for file_sd): {t}\n{swapped}"
    );
    assert!(t.contains("SUCCESS"), "{t}");
}

#[test]
fn prometheus_configs_pass_promtool() {
    // The in-cluster scrape config and the scaling configs (remote_write, federation) in
    // deploy/prometheus are complete configs; promtool also checks the rule files they load.
    for c in [
        "kubernetes-scrape.yml",
        "remote-write.yml",
        "federation.yml",
        "central.yml",
    ] {
        check_config(&prometheus_dir(), c);
    }
    // The per-cluster tier runs in agent mode: no rules, remote_write only.
    check_config_with(&prometheus_dir(), "agent.yml", &["--agent"]);
    let agent = std::fs::read_to_string(prometheus_dir().join("agent.yml")).unwrap();
    assert!(!agent.contains("rule_files"), "an agent evaluates no rules");
    let central = std::fs::read_to_string(prometheus_dir().join("central.yml")).unwrap();
    assert!(central.contains("- sensor-rules.yml") && central.contains("alertmanagers:"));
}
