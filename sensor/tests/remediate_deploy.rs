//! The remediation runner's deployment files (deploy/remediate, deploy/alertmanager): its
//! Kubernetes manifests validated offline in strict mode like the DaemonSet's; RBAC granting
//! exactly what the runbooks' kubectl commands use; a NetworkPolicy letting only Alertmanager
//! in; and the config, web config, manifests and Alertmanager receiver agreeing on ports, paths
//! and credentials. Under CI=true a missing validator fails the test.

mod common;

use std::collections::BTreeSet;

use common::{
    manifests::*,
    prom::{load, root},
};
use serde_yaml_ng::Value;

fn load_all(rel: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(root().join(rel)).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

#[test]
fn remediation_manifests_validate_offline() {
    let Some(py) = deploy_python() else { return };
    let dir = root().join("deploy/remediate");
    let (ok, t) = validate_manifests(&py, &dir);
    assert!(ok, "{t}");
    let kinds = [
        "ServiceAccount/sensor-remediate",
        "ClusterRole/sensor-remediate-nodes",
        "ClusterRoleBinding/sensor-remediate-nodes",
        "ClusterRole/sensor-remediate-pods",
        "RoleBinding/sensor-remediate-pods",
        "Deployment/sensor-remediate",
        "Service/sensor-remediate",
        "NetworkPolicy/sensor-remediate",
        "ConfigMap/sensor-remediate-config",
    ];
    for kind in kinds {
        for v in ["1.25", "1.37"] {
            let line = format!("OK base {kind} (Kubernetes {v}, strict)");
            assert!(t.lines().any(|l| l == line), "missing `{line}` in\n{t}");
        }
    }
    assert_eq!(t.lines().count(), kinds.len() * 2, "{t}");

    // It catches what it is for: a misspelt field.
    let tmp = std::env::temp_dir().join(format!("sensor-remediate-k8s-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let st = std::process::Command::new("cp")
        .arg("-r")
        .arg(&dir)
        .arg(&tmp)
        .status()
        .unwrap();
    assert!(st.success());
    let p = tmp.join("kubernetes/networkpolicy.yaml");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, text.replacen("policyTypes:", "policyType:", 1)).unwrap();
    let (ok, t) = validate_manifests(&py, &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(!ok, "{t}");
    assert!(
        t.contains("FAIL base NetworkPolicy/sensor-remediate (Kubernetes 1.37): spec: Additional properties are not allowed ('policyType' was unexpected)"),
        "{t}"
    );
}

/// The API permissions (group, resource, verb) each runbook command needs: what kubectl
/// requests for it (`delete pod --wait=false` sends one DELETE; `cordon` GETs and PATCHes the
/// node; `drain` cordons, lists the node's pods, evicts them, GETs each until it is gone, and
/// GETs a pod's DaemonSet for --ignore-daemonsets).
fn permissions(argv: &[&str]) -> Vec<(&'static str, &'static str, &'static str)> {
    let node = [("", "nodes", "get"), ("", "nodes", "patch")];
    if argv.contains(&"delete") && argv.contains(&"pod") && argv.contains(&"--wait=false") {
        vec![("", "pods", "delete")]
    } else if argv.get(1) == Some(&"cordon") {
        node.to_vec()
    } else if argv.get(1) == Some(&"drain") {
        let mut p = node.to_vec();
        p.extend([
            ("", "pods", "list"),
            ("", "pods", "get"),
            ("", "pods/eviction", "create"),
            ("apps", "daemonsets", "get"),
        ]);
        p
    } else {
        panic!("{argv:?}: a kubectl command without a permission entry here and in rbac.yaml")
    }
}

#[test]
fn rbac_grants_exactly_what_the_runbooks_commands_use() {
    let cfg = load("deploy/remediate/remediate.yaml");
    let mut needed = BTreeSet::new();
    let mut commands = 0;
    for rule in cfg["rules"].as_sequence().unwrap() {
        for a in rule["actions"].as_sequence().unwrap() {
            let argv: Vec<&str> = a["command"].as_sequence().map_or(vec![], |c| c.iter().map(s).collect());
            if argv.first() == Some(&"kubectl") {
                commands += 1;
                needed.extend(permissions(&argv));
                assert!(
                    rule["allowed_targets"].as_mapping().is_some_and(|m| !m.is_empty()),
                    "{}: acts through kubectl without allowed_targets",
                    s(&rule["alert"])
                );
            }
        }
    }
    assert_eq!(commands, 5, "delete pod, and cordon and drain in two rules");

    let docs = load_all("deploy/remediate/kubernetes/rbac.yaml");
    let of_kind = |k: &'static str| docs.iter().filter(move |d| d["kind"] == k);
    let mut granted = BTreeSet::new();
    for role in of_kind("ClusterRole") {
        for r in role["rules"].as_sequence().unwrap() {
            for g in r["apiGroups"].as_sequence().unwrap() {
                for res in r["resources"].as_sequence().unwrap() {
                    for v in r["verbs"].as_sequence().unwrap() {
                        granted.insert((s(g), s(res), s(v)));
                    }
                }
            }
        }
    }
    let needed: BTreeSet<(&str, &str, &str)> = needed.into_iter().collect();
    assert_eq!(granted, needed, "rbac.yaml grants exactly what the commands use");
    assert!(!granted.iter().any(|(g, r, v)| [*g, *r, *v].contains(&"*")));

    // Deleting pods is granted only per namespace, in namespaces the allow-list admits.
    let bindings: Vec<(&str, &str)> = of_kind("ClusterRoleBinding")
        .map(|b| ("", s(&b["roleRef"]["name"])))
        .chain(of_kind("RoleBinding").map(|b| (s(&b["metadata"]["namespace"]), s(&b["roleRef"]["name"]))))
        .collect();
    assert_eq!(
        bindings,
        [("", "sensor-remediate-nodes"), ("shop", "sensor-remediate-pods")],
        "the node role cluster-wide, pod deletion in one namespace"
    );
    for b in of_kind("ClusterRoleBinding").chain(of_kind("RoleBinding")) {
        let sub = &b["subjects"].as_sequence().unwrap()[..];
        assert_eq!(sub.len(), 1);
        assert_eq!(
            (s(&sub[0]["name"]), s(&sub[0]["namespace"])),
            ("sensor-remediate", "sensor")
        );
    }
    let config = sensor::remediate::config::Config::parse(
        &std::fs::read_to_string(root().join("deploy/remediate/remediate.yaml")).unwrap(),
        "remediate.yaml",
    )
    .unwrap();
    let storm = config.rule("SensorWorkloadOOMKillStorm").unwrap();
    let allowed = &storm.allowed_targets["namespace"];
    assert!(allowed.iter().any(|r| r.is_match("shop")));
    for ns in ["kube-system", "monitoring", "sensor", "default"] {
        assert!(!allowed.iter().any(|r| r.is_match(ns)), "{ns} must not be allowed");
    }
}

#[test]
fn only_alertmanager_reaches_the_runner_and_every_file_agrees() {
    let cfg = load("deploy/remediate/remediate.yaml");
    let port: u16 = s(&cfg["listen"]).rsplit_once(':').unwrap().1.parse().unwrap();

    let np = load("deploy/remediate/kubernetes/networkpolicy.yaml");
    assert_eq!(
        np["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "sensor-remediate"
    );
    assert_eq!(
        np["spec"]["policyTypes"],
        serde_yaml_ng::from_str::<Value>("[Ingress]").unwrap()
    );
    let ingress = np["spec"]["ingress"].as_sequence().unwrap();
    assert_eq!(ingress.len(), 1, "one way in");
    let from = ingress[0]["from"].as_sequence().unwrap();
    assert_eq!(from.len(), 1, "from one peer");
    assert_eq!(
        from[0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "alertmanager"
    );
    assert!(from[0]["namespaceSelector"]["matchLabels"].as_mapping().is_some());
    assert_eq!(ingress[0]["ports"][0]["port"].as_u64(), Some(port.into()));

    let dep = load("deploy/remediate/kubernetes/deployment.yaml");
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(
        dep["spec"]["replicas"].as_u64(),
        Some(1),
        "guard state is in memory: one runner"
    );
    assert_eq!(pod["serviceAccountName"], "sensor-remediate");
    let c = &pod["containers"][0];
    assert_eq!(c["ports"][0]["containerPort"].as_u64(), Some(port.into()));
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], Value::Bool(false));
    let mount = |name: &str| -> String {
        let m = c["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap();
        format!("{}/", s(&m["mountPath"]))
    };
    let args: Vec<&str> = c["command"].as_sequence().unwrap().iter().map(s).collect();
    assert_eq!(args[..3], ["/sensor", "remediate", "--config"]);
    assert_eq!(args[3], format!("{}remediate.yaml", mount("config")));
    assert_eq!(s(&cfg["web_config_file"]), format!("{}web.yml", mount("config")));
    assert_eq!(s(&cfg["bearer_token_file"]), format!("{}token", mount("token")));
    let web = load("deploy/remediate/web.yml");
    assert_eq!(
        s(&web["tls_server_config"]["cert_file"]),
        format!("{}tls.crt", mount("tls"))
    );
    assert_eq!(
        s(&web["tls_server_config"]["key_file"]),
        format!("{}tls.key", mount("tls"))
    );

    // Alertmanager calls the Service over HTTPS with the token, checking the runner's CA.
    let svc = load("deploy/remediate/kubernetes/service.yaml");
    let am = load("deploy/alertmanager/alertmanager.yml");
    let rx = am["receivers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "remediation")
        .unwrap();
    let wh = &rx["webhook_configs"][0];
    let url = format!(
        "https://{}.{}.svc:{}/webhook",
        s(&svc["metadata"]["name"]),
        s(&svc["metadata"]["namespace"]),
        svc["spec"]["ports"][0]["port"].as_u64().unwrap()
    );
    assert_eq!(s(&wh["url"]), url);
    assert_eq!(wh["http_config"]["authorization"]["type"], "Bearer");
    assert!(s(&wh["http_config"]["authorization"]["credentials_file"]).ends_with("/token"));
    assert!(s(&wh["http_config"]["tls_config"]["ca_file"]).ends_with("/ca.crt"));
}
