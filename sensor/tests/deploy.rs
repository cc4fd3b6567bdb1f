//! The deployment files in deploy/: the Prometheus rules (`promtool check rules`, `promtool
//! test rules`, including 1,000 hosts of which 1% OOM within the hour -> exactly 0.01), the
//! Prometheus configs, the container image (built with `cargo xtask image` and run with
//! podman), and the Kubernetes manifests (offline schema validation, and the DaemonSet's
//! capability set really running the sensor). Under CI=true a missing tool fails the test
//! instead of skipping it.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::{manifests::*, *};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn prometheus_dir() -> PathBuf {
    root().join("deploy/prometheus")
}

/// Fails under CI, else prints why the test is skipped; returns false to skip.
fn tool_missing(what: &str, how: &str) -> bool {
    common::require("", false, &format!("{what} is missing ({how})"))
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn promtool() -> Option<Command> {
    common::require_tool("promtool", "`cargo xtask deps` installs Debian's prometheus package")
        .then(|| Command::new("promtool"))
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

/// One Dockerfile instruction with its continuation lines joined.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with('#') || (l.is_empty() && cur.is_empty()) {
            continue;
        }
        match l.strip_suffix('\\') {
            Some(part) => {
                cur.push_str(part.trim());
                cur.push(' ');
            }
            None => {
                cur.push_str(l);
                let (k, v) = cur.split_once(' ').unwrap_or((cur.as_str(), ""));
                out.push((k.to_uppercase(), v.trim().to_string()));
                cur.clear();
            }
        }
    }
    out
}

/// The image's files as the Dockerfile copies them: (source in the build context, path in the
/// image).
fn dockerfile_copies(ins: &[(String, String)]) -> Vec<(String, String)> {
    ins.iter()
        .filter(|(k, _)| k == "COPY")
        .map(|(_, v)| {
            let parts: Vec<&str> = v.split_whitespace().collect();
            assert_eq!(parts.len(), 2, "COPY SRC DEST without flags: {v}");
            (parts[0].to_string(), parts[1].to_string())
        })
        .collect()
}

#[test]
fn image_ships_exactly_the_dist_output_and_runs() {
    // deploy/Dockerfile is FROM scratch around what `cargo xtask dist` writes. Checked as text,
    // then (podman installed; required under CI=true) built with `cargo xtask image` itself,
    // inspected and run. CI ran dist before the tests, so the build here is a no-op.
    let df = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let ins = dockerfile_instructions(&df);
    let get = |kind: &str| -> Vec<String> { ins.iter().filter(|(k, _)| k == kind).map(|(_, v)| v.clone()).collect() };
    assert_eq!(get("FROM"), ["scratch"], "one stage, nothing to pull");
    assert!(
        get("RUN").is_empty(),
        "a scratch image has nothing to run a command with"
    );
    let copies = dockerfile_copies(&ins);
    assert!(
        copies
            .iter()
            .all(|(src, _)| src.starts_with("target/dist/${TARGETARCH}/")),
        "only what dist writes, per architecture: {copies:?}"
    );
    for want in [
        ("target/dist/${TARGETARCH}/sensor", "/sensor"),
        (
            "target/dist/${TARGETARCH}/ca-certificates.crt",
            "/etc/ssl/certs/ca-certificates.crt",
        ),
    ] {
        assert!(
            copies.iter().any(|(s, d)| (s.as_str(), d.as_str()) == want),
            "missing COPY {want:?}: {copies:?}"
        );
    }
    // The builder sets TARGETARCH from --platform; `cargo xtask image` builds both.
    let copies: Vec<(String, String)> = ["amd64", "arm64"]
        .iter()
        .flat_map(|arch| {
            copies
                .iter()
                .map(move |(s, d)| (s.replace("${TARGETARCH}", arch), d.clone()))
        })
        .collect();
    let sources: std::collections::BTreeSet<String> = copies.iter().map(|(s, _)| s.clone()).collect();
    // The build context is the repository root; .dockerignore lets exactly these files in.
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    let ignore: Vec<&str> = ignore
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(ignore[0], "*", ".dockerignore starts by excluding everything");
    let allowed: std::collections::BTreeSet<String> = ignore[1..]
        .iter()
        .map(|l| {
            l.strip_prefix('!')
                .unwrap_or_else(|| panic!("only exceptions after '*': {l}"))
                .to_string()
        })
        .collect();
    assert_eq!(allowed, sources, ".dockerignore exceptions vs. COPY sources");
    let entry: Vec<String> = serde_json::from_str(&get("ENTRYPOINT").concat()).expect("ENTRYPOINT in exec form");
    assert_eq!(entry, ["/sensor", "run"]);
    assert_eq!(get("USER"), ["0:0"]);
    assert_eq!(get("EXPOSE"), ["9442"]);
    let args = get("ARG");
    let labels = get("LABEL").concat();
    for (key, arg) in [("version", "VERSION"), ("revision", "REVISION"), ("source", "SOURCE")] {
        assert!(
            labels.contains(&format!("org.opencontainers.image.{key}=\"${{{arg}}}\"")),
            "label {key} from ARG {arg}: {labels}"
        );
        assert!(
            args.iter().any(|a| a.split('=').next() == Some(arg)),
            "ARG {arg}: {args:?}"
        );
    }

    if Command::new("podman").arg("--version").output().is_err() {
        tool_missing(
            "podman",
            "apt-get install podman runc musl-tools gcc-aarch64-linux-gnu; `cargo xtask deps` does it",
        );
        return;
    }
    let conf = common::runtimes::podman_conf();
    let podman = || {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", &conf);
        c
    };
    let mut xtask = Command::new(env!("CARGO"));
    xtask
        .args(["xtask", "image"])
        .current_dir(root())
        .env("CONTAINERS_CONF", &conf);
    // What cargo set for this test (OUT_DIR, CARGO_PKG_*, ...) would look like a changed
    // environment to build scripts and rebuild the static binary CI built before the tests.
    for (k, _) in std::env::vars() {
        let injected = k.starts_with("CARGO_PKG_")
            || matches!(
                k.as_str(),
                "OUT_DIR" | "CARGO_MANIFEST_DIR" | "CARGO_MANIFEST_PATH" | "CARGO_CRATE_NAME" | "CARGO_PRIMARY_PACKAGE"
            );
        if injected {
            xtask.env_remove(k);
        }
    }
    let out = xtask.output().unwrap();
    let t = text(&out);
    assert!(out.status.success(), "cargo xtask image: {t}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| -> Vec<String> {
        stdout
            .lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('\t'))
            .map(str::to_string)
            .collect()
    };
    let top = root().canonicalize().unwrap();
    let written: std::collections::BTreeSet<String> = field("file")
        .iter()
        .map(|f| {
            let p = Path::new(f).canonicalize().unwrap();
            p.strip_prefix(&top).unwrap().to_string_lossy().into_owned()
        })
        .collect();
    assert_eq!(written, sources, "files dist wrote vs. COPY sources\n{t}");
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        field("image"),
        [
            format!("localhost/sensor:{version}"),
            "localhost/sensor:latest".to_string()
        ]
    );
    let sizes = field("size");
    assert_eq!(sizes.len(), 2, "one size per architecture: {sizes:?}");
    for line in &sizes {
        let (arch, size) = line.split_once('\t').expect("size<TAB>ARCH<TAB>BYTES");
        let size: u64 = size.parse().expect("size in bytes");
        assert!(size <= 20_000_000, "{arch} image {size} bytes, over the 20 MB budget");
    }
    // Both tags are manifest lists over exactly linux/amd64 and linux/arm64.
    for list in field("image") {
        let m = podman().args(["manifest", "inspect", &list]).output().unwrap();
        let m: serde_json::Value = serde_json::from_slice(&m.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&m)));
        let mut platforms: Vec<String> = m["manifests"]
            .as_array()
            .unwrap_or_else(|| panic!("{list} is not a manifest list: {m}"))
            .iter()
            .map(|e| {
                format!(
                    "{}/{}",
                    e["platform"]["os"].as_str().unwrap_or("?"),
                    e["platform"]["architecture"].as_str().unwrap_or("?")
                )
            })
            .collect();
        platforms.sort();
        assert_eq!(platforms, ["linux/amd64", "linux/arm64"], "{list}");
    }

    let inspect = podman()
        .args([
            "image",
            "inspect",
            "--format",
            "{{json .Labels}}",
            &format!("localhost/sensor:{version}-amd64"),
        ])
        .output()
        .unwrap();
    let labels: serde_json::Value =
        serde_json::from_slice(&inspect.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&inspect)));
    let head = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(root())
        .output()
        .unwrap();
    assert_eq!(labels["org.opencontainers.image.version"], version, "{labels}");
    assert_eq!(
        labels["org.opencontainers.image.revision"],
        String::from_utf8_lossy(&head.stdout).trim(),
        "{labels}"
    );
    assert!(
        labels["org.opencontainers.image.source"]
            .as_str()
            .is_some_and(|s| s.starts_with("https://")),
        "{labels}"
    );

    // The static binary starts with nothing else in the image (runc: crun refuses hybrid
    // cgroup hosts; no network needed).
    let run = podman()
        .args([
            "run",
            "--rm",
            "--runtime",
            "runc",
            "--network",
            "none",
            "--entrypoint",
            "/sensor",
        ])
        .args(["localhost/sensor:latest", "--version"])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", text(&run));
    assert_eq!(String::from_utf8_lossy(&run.stdout).trim(), format!("sensor {version}"));

    // And the image holds these two files, nothing more.
    let id = podman()
        .args([
            "create",
            "--runtime",
            "runc",
            "--network",
            "none",
            "localhost/sensor:latest",
        ])
        .output()
        .unwrap();
    assert!(id.status.success(), "{}", text(&id));
    let id = String::from_utf8_lossy(&id.stdout).trim().to_string();
    let tar = podman().args(["export", &id]).output().unwrap();
    let _ = podman().args(["rm", &id]).output();
    assert!(tar.status.success(), "podman export");
    let files = image_files(&tar.stdout);
    let want: std::collections::BTreeSet<String> = copies
        .iter()
        .map(|(_, d)| d.trim_start_matches('/').to_string())
        .collect();
    assert_eq!(files, want, "regular files in the image");
    // The podman config stays: it is this process's, and other tests of this file running at
    // the same time use it (removing it here failed the owner test's `podman build` in CI).
}

/// Non-empty regular files in a tar stream (ustar headers; sizes in octal).
fn image_files(tar: &[u8]) -> std::collections::BTreeSet<String> {
    let mut files = std::collections::BTreeSet::new();
    let mut off = 0;
    while off + 512 <= tar.len() {
        let h = &tar[off..off + 512];
        if h.iter().all(|b| *b == 0) {
            break;
        }
        let cstr = |b: &[u8]| String::from_utf8_lossy(b.split(|c| *c == 0).next().unwrap_or(b)).into_owned();
        let (prefix, name) = (cstr(&h[345..500]), cstr(&h[0..100]));
        let size = u64::from_str_radix(cstr(&h[124..136]).trim(), 8).unwrap_or(0);
        let path = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        if matches!(h[156], b'0' | 0) && size > 0 {
            files.insert(path.trim_start_matches("./").to_string());
        }
        off += 512 + size.div_ceil(512) as usize * 512;
    }
    files
}

#[test]
fn kubernetes_manifests_validate_offline() {
    let Some(py) = deploy_python() else { return };
    let dir = root().join("deploy/kubernetes");
    let (ok, t) = validate_manifests(&py, &dir);
    assert!(ok, "{t}");
    // 5 built-in kinds x 2 Kubernetes versions + the ServiceMonitor, for the base and for each
    // overlay (privileged; seccomp: the Localhost profile).
    let trees = ["base", "overlays/privileged", "overlays/seccomp"];
    for tree in trees {
        for kind in [
            "Namespace/sensor",
            "ServiceAccount/sensor",
            "ConfigMap/sensor-config",
            "DaemonSet/sensor",
            "Service/sensor",
        ] {
            for v in ["1.25", "1.37"] {
                let line = format!("OK {tree} {kind} (Kubernetes {v}, strict)");
                assert!(t.lines().any(|l| l == line), "missing `{line}` in\n{t}");
            }
        }
        let sm = format!("OK {tree} ServiceMonitor/sensor (schemas/ CRD subset)");
        assert!(t.lines().any(|l| l == sm), "missing `{sm}` in\n{t}");
    }
    assert_eq!(t.lines().count(), 11 * trees.len(), "{t}");

    // The validator must catch what it is for: a misspelt field in the DaemonSet and a bad
    // duration in the ServiceMonitor.
    let tmp = std::env::temp_dir().join(format!("sensor-k8s-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let st = Command::new("cp").arg("-r").arg(&dir).arg(&tmp).status().unwrap();
    assert!(st.success());
    let edit = |f: &str, from: &str, to: &str| {
        let p = tmp.join(f);
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(s.contains(from), "{f} has no `{from}`");
        std::fs::write(&p, s.replacen(from, to, 1)).unwrap();
    };
    edit(
        "daemonset.yaml",
        "readOnlyRootFilesystem: true",
        "readOnlyRootFileSystem: true",
    );
    edit("servicemonitor.yaml", "interval: 15s", "interval: 15 seconds");
    let (ok, t) = validate_manifests(&py, &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(!ok, "{t}");
    assert!(
        t.contains("FAIL base DaemonSet/sensor (Kubernetes 1.37): spec.template.spec.containers.0.securityContext: Additional properties are not allowed ('readOnlyRootFileSystem' was unexpected)"),
        "{t}"
    );
    assert!(
        t.contains("FAIL base ServiceMonitor/sensor: spec.endpoints.0.interval"),
        "{t}"
    );
}

#[test]
fn daemonset_schedules_on_every_architecture() {
    // The image is a manifest list for linux/amd64 and linux/arm64 (`cargo xtask image`), so a
    // mixed cluster runs one DaemonSet: nothing in it or its overlays may pin an architecture.
    let dir = root().join("deploy/kubernetes");
    let mut files = vec![dir.join("daemonset.yaml")];
    for e in std::fs::read_dir(dir.join("overlays")).unwrap().flatten() {
        for f in std::fs::read_dir(e.path()).unwrap().flatten() {
            files.push(f.path());
        }
    }
    assert!(files.len() > 1, "overlays read: {files:?}");
    for f in files {
        let t = std::fs::read_to_string(&f).unwrap();
        for pin in ["kubernetes.io/arch", "amd64", "arm64", "x86_64", "aarch64"] {
            assert!(!t.contains(pin), "{} pins an architecture ({pin})", f.display());
        }
    }
}

/// The DaemonSet container's `capabilities.add`, read from the manifest.
fn daemonset_caps() -> Vec<String> {
    let y = std::fs::read_to_string(root().join("deploy/kubernetes/daemonset.yaml")).unwrap();
    let mut caps = Vec::new();
    let mut in_add = false;
    for line in y.lines() {
        let l = line.trim();
        if l == "add:" {
            in_add = true;
            continue;
        }
        if in_add {
            if l.starts_with('#') {
                continue;
            }
            match l.strip_prefix("- ") {
                Some(c) => caps.push(c.trim().to_string()),
                None => break,
            }
        }
    }
    assert!(y.contains("drop: [ALL]"), "the DaemonSet drops every capability first");
    caps
}

/// `setpriv` arguments that leave uid 0 with exactly `caps` and no way to gain more, as the
/// DaemonSet's securityContext does (allowPrivilegeEscalation: false = no_new_privs).
fn with_caps(caps: &[String]) -> Vec<String> {
    let list: String = caps.iter().map(|c| format!(",+{}", c.to_lowercase())).collect();
    vec![
        format!("--inh-caps=-all{list}"),
        format!("--ambient-caps=-all{list}"),
        format!("--bounding-set=-all{list}"),
        "--no-new-privs".into(),
    ]
}

/// Starts the sensor under setpriv with `caps` and the DaemonSet's ConfigMap config.
fn start_with_caps(caps: &[String], config: &Path) -> (std::process::Child, u16, PathBuf) {
    let port = free_port();
    let log = std::env::temp_dir().join(format!("sensor-caps-{}-{port}.log", std::process::id()));
    let child = Command::new("setpriv")
        .args(with_caps(caps))
        .arg(SENSOR)
        .args(["run", "--config"])
        .arg(config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        // Its own journal, never the host's /var/lib/sensor/journal.
        .arg("--journal.path")
        .arg(common::journal_dir(port))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (child, port, log)
}

fn wait_ready(port: u16, child: &mut std::process::Child, log: &Path) {
    let start = std::time::Instant::now();
    loop {
        if let Ok((200, _)) = http_get(port, "/readyz") {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "sensor exited with {st}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(start.elapsed() < Duration::from_secs(30), "not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The ConfigMap's sensor.yaml, as a file.
fn configmap_config() -> PathBuf {
    let y = std::fs::read_to_string(root().join("deploy/kubernetes/configmap.yaml")).unwrap();
    let body: String = y
        .split_once("sensor.yaml: |\n")
        .unwrap()
        .1
        .lines()
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    let p = std::env::temp_dir().join(format!("sensor-configmap-{}.yaml", std::process::id()));
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn daemonset_capabilities_are_sufficient_and_each_needed() {
    let Some(_k) = privileged("daemonset_capabilities_are_sufficient_and_each_needed") else {
        return;
    };
    if Command::new("setpriv").arg("--version").output().is_err() {
        tool_missing("setpriv", "apt-get install util-linux");
        return;
    }
    let caps = daemonset_caps();
    assert_eq!(caps, ["BPF", "PERFMON", "SYSLOG"]);
    let config = configmap_config();

    // Exactly the DaemonSet's set, with its ConfigMap: an OOM kill is counted, attributed and
    // scoped.
    let cg = MemCgroup::new("sensor-it-caps", 24 << 20);
    let (mut child, port, log) = start_with_caps(&caps, &config);
    wait_ready(port, &mut child, &log);
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim()
        .to_string();
    // CAP_SYSLOG 34, CAP_PERFMON 38, CAP_BPF 39.
    assert_eq!(eff, format!("{:016x}", (1u64 << 34) | (1 << 38) | (1 << 39)));
    cg.cause_oom_kill();
    let labels = cg.kill_labels();
    let mut m = String::new();
    for _ in 0..100 {
        m = http_get(port, "/metrics").unwrap().1;
        if metric_sum(&m, "sensor_oom_kills_total", &labels) == 1.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        metric_sum(&m, "sensor_oom_kills_total", &labels),
        1.0,
        "{m}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let oom_degraded = metric(&m, "sensor_probe_state", &[("probe", "oom"), ("state", "degraded")]) == Some(1.0);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(common::journal_dir(port));

    // Without BPF or PERFMON the sensor refuses to start, with its one sentence.
    for missing in ["BPF", "PERFMON"] {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let out = Command::new("setpriv")
            .args(with_caps(&fewer))
            .arg(SENSOR)
            .args(["run", "--listen", "127.0.0.1:0"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "without {missing}: {}", text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "sensor: the sensor needs CAP_BPF and CAP_PERFMON, or root\n"
        );
    }

    // Without SYSLOG, /proc/kallsyms shows no addresses: where the kill-context hook (fentry /
    // kprobe) is unavailable, as on this kind of kernel, the scope becomes "unknown".
    if !oom_degraded {
        eprintln!("kill-context hook attached: SYSLOG is not needed for the scope on this kernel");
        return;
    }
    let fewer: Vec<String> = caps.iter().filter(|c| *c != "SYSLOG").cloned().collect();
    let (mut child, port, log) = start_with_caps(&fewer, &config);
    wait_ready(port, &mut child, &log);
    cg.cause_oom_kill();
    let unknown = plain(&[("scope", "unknown")], cg.rel.as_str());
    let mut got = None;
    for _ in 0..100 {
        let sum = metric_sum(
            &http_get(port, "/metrics").unwrap().1,
            "sensor_oom_kills_total",
            &unknown,
        );
        got = (sum > 0.0).then_some(sum);
        if got.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(common::journal_dir(port));
    assert_eq!(got, Some(1.0), "{}", std::fs::read_to_string(&log).unwrap_or_default());
}

/// A real Prometheus (Debian's package) on a free loopback port with a temporary data dir,
/// stopped on drop.
struct Prometheus {
    child: std::process::Child,
    port: u16,
    dir: PathBuf,
}

impl Prometheus {
    /// `config` is prometheus.yml; `files` are written next to it (rule files).
    fn start(name: &str, config: &str, files: &[(&str, String)]) -> Option<Prometheus> {
        if Command::new("prometheus").arg("--version").output().is_err() {
            tool_missing("prometheus", "apt-get install prometheus; `cargo xtask deps` does it");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("sensor-prom-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        for (f, body) in files {
            std::fs::write(dir.join(f), body).unwrap();
        }
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .unwrap();
        let mut p = Prometheus { child, port, dir };
        let start = std::time::Instant::now();
        while !matches!(http_get(p.port, "/-/ready"), Ok((200, _))) {
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!("prometheus exited with {st}: {}", p.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "prometheus not ready: {}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(p)
    }

    /// Scraping the sensor at `instance` every second, with the rules as shipped but evaluated
    /// every second instead of every minute.
    fn scraping(name: &str, instance: &str) -> Option<Prometheus> {
        let rules = std::fs::read_to_string(prometheus_dir().join("sensor-rules.yml"))
            .unwrap()
            .replace("interval: 1m", "interval: 1s");
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [sensor-rules.yml]\n\
             scrape_configs:\n  - job_name: sensor\n    static_configs: [{{targets: ['{instance}']}}]\n"
        );
        Prometheus::start(name, &config, &[("sensor-rules.yml", rules)])
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// Instant query; panics unless Prometheus accepts it. Returns the result vector.
    fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let (code, body) = http_get(self.port, &format!("/api/v1/query?query={}", urlencode(expr))).unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert!(code == 200 && v["status"] == "success", "query `{expr}` failed: {body}");
        match v["data"]["resultType"].as_str() {
            Some("vector") | Some("matrix") => v["data"]["result"].as_array().cloned().unwrap_or_default(),
            // scalar / string: one pseudo-series without labels.
            _ => vec![serde_json::json!({"metric": {}, "value": v["data"]["result"]})],
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A query-string value (spaces as `+`, which Prometheus decodes like `%20`).
fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn sample_value(series: &serde_json::Value) -> f64 {
    series["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// A dashboard variable `label_values(expr, label)`: (name, expr, label).
type TemplateVar = (String, String, String);

/// Every PromQL expression of the dashboards in deploy/grafana/dashboards: (dashboard/panel,
/// expr), and the template variables' `label_values(expr, label)` as (name, expr, label).
fn dashboard_exprs() -> (Vec<(String, String)>, Vec<TemplateVar>) {
    let dir = root().join("deploy/grafana/dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let (mut exprs, mut vars) = (Vec::new(), Vec::new());
    fn walk(panels: &[serde_json::Value], dash: &str, out: &mut Vec<(String, String)>) {
        for p in panels {
            for t in p["targets"].as_array().into_iter().flatten() {
                let e = t["expr"].as_str().expect("every target has an expr");
                out.push((
                    format!("{dash} / {}", p["title"].as_str().unwrap_or("?")),
                    e.to_string(),
                ));
            }
            walk(p["panels"].as_array().map_or(&[], |v| v.as_slice()), dash, out);
        }
    }
    for f in files {
        let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        let name = d["title"].as_str().unwrap().to_string();
        walk(d["panels"].as_array().unwrap(), &name, &mut exprs);
        for v in d["templating"]["list"].as_array().into_iter().flatten() {
            let q = v["query"]["query"].as_str().expect("query variable");
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'))
                .expect(q);
            let (e, label) = inner.rsplit_once(',').expect(q);
            vars.push((
                v["name"].as_str().unwrap().to_string(),
                e.trim().to_string(),
                label.trim().to_string(),
            ));
        }
    }
    (exprs, vars)
}

/// Every rule of deploy/prometheus/sensor-rules.yml: (name, expr, is_recording).
fn rule_exprs() -> Vec<(String, String, bool)> {
    let y: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(prometheus_dir().join("sensor-rules.yml")).unwrap()).unwrap();
    let mut out = Vec::new();
    for g in y["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            let expr = r["expr"].as_str().unwrap().to_string();
            match (r["record"].as_str(), r["alert"].as_str()) {
                (Some(n), _) => out.push((n.to_string(), expr, true)),
                (_, Some(n)) => out.push((n.to_string(), expr, false)),
                _ => panic!("rule without record or alert"),
            }
        }
    }
    out
}

/// Grafana's variables as the dashboards use them.
fn substitute(expr: &str, instance: &str) -> String {
    expr.replace("$instance", instance)
        .replace("$check", ".*")
        .replace("$__rate_interval", "30s")
        .replace("$__range", "1h")
        .replace("$__interval", "5s")
}

#[test]
fn dashboards_and_rules_evaluate_against_live_prometheus() {
    let Some(_k) = privileged("dashboards_and_rules_evaluate_against_live_prometheus") else {
        return;
    };
    let cg = MemCgroup::new("sensor-it-dash", 24 << 20);
    // Two synthetic checks so the checks dashboard has data: one up, one refused.
    let web = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let web_addr = web.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in web.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 4096];
            let _ = std::io::Read::read(&mut s, &mut buf);
            let _ = std::io::Write::write_all(
                &mut s,
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
            );
        }
    });
    let closed = common::free_port();
    let cfg_path = std::env::temp_dir().join(format!("sensor-dash-{}.yaml", std::process::id()));
    std::fs::write(
        &cfg_path,
        format!(
            "alerting: {{window: 2s, min_samples: 2}}\nchecks:\n  - {{name: web, type: http, url: 'http://{web_addr}/', interval: 500ms}}\n  - {{name: refused, type: http, url: 'http://127.0.0.1:{closed}/', interval: 500ms}}\n"
        ),
    )
    .unwrap();
    let d = Daemon::start(&["--config", cfg_path.to_str().unwrap()]);
    let instance = format!("127.0.0.1:{}", d.port);
    let Some(prom) = Prometheus::scraping("dash", &instance) else {
        return;
    };

    // A real OOM kill and real TCP connects for the panels to show.
    cg.cause_oom_kill();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    for _ in 0..20 {
        drop(std::net::TcpStream::connect(addr).unwrap());
        let _ = listener.accept().unwrap();
    }
    let kill_labels = cg.kill_labels();
    d.wait_metric_sum("sensor_oom_kills_total", &kill_labels, 1.0, Duration::from_secs(5));

    // The recording rules see the kill once Prometheus has scraped it and evaluated them.
    let start = std::time::Instant::now();
    loop {
        let r = prom.query(&format!(
            "instance:sensor_oom_kills:increase1h{{instance=\"{instance}\"}}"
        ));
        if r.len() == 1 && sample_value(&r[0]) == 1.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "recording rule never saw the kill: {r:?}\n{}",
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Enough scrapes after the connects for rate() over 30s to have two samples.
    std::thread::sleep(Duration::from_secs(3));

    // Exact fleet numbers for a fleet of one host with one kill.
    let one = |e: &str| {
        let r = prom.query(e);
        assert_eq!(r.len(), 1, "{e}: {r:?}");
        sample_value(&r[0])
    };
    assert_eq!(one("fleet:sensor_hosts_with_oom_kills:ratio1h"), 1.0);
    assert!((one("fleet:sensor_oom_kills:rate1h") - 1.0 / 3600.0).abs() < 1e-12);
    assert_eq!(one("namespace:sensor_oom_kills:increase1h"), 1.0);

    let (exprs, vars) = dashboard_exprs();
    assert!(exprs.len() >= 30, "{} expressions", exprs.len());
    for (name, e, label) in &vars {
        let r = prom.query(&substitute(e, &instance));
        if name == "instance" {
            assert!(
                r.iter().any(|s| s["metric"][label.as_str()] == instance.as_str()),
                "variable {name}: {e} -> {r:?}"
            );
        }
    }
    let mut empty = Vec::new();
    for (panel, e) in &exprs {
        let q = substitute(e, &instance);
        assert!(!q.contains('$'), "{panel}: unsubstituted variable in {q}");
        let r = prom.query(&q);
        // Owner panels have data only for kills in Kubernetes pods: checked with kubelet-style
        // pods by owner_panels_and_rules_evaluate_against_live_prometheus.
        let oom = (e.contains("sensor_oom_kill") || e.contains(":sensor_oom_kills:") || e.contains("oom_kills:ratio"))
            && !e.contains("owner");
        if oom {
            assert!(!r.is_empty(), "OOM panel {panel} is empty: {q}");
            if r.iter().any(|s| s["metric"].get("cgroup").is_some()) {
                assert!(
                    r.iter().any(|s| s["metric"]["cgroup"] == cg.rel.as_str()),
                    "OOM panel {panel} lacks the kill's cgroup {}: {r:?}",
                    cg.rel
                );
            }
        } else if e.contains("sensor_tcp_connects_total") || e.contains("sensor_tcp_connect_duration") {
            assert!(!r.is_empty(), "TCP panel {panel} is empty: {q}");
            if e.contains("by (result") {
                assert!(r.iter().any(|s| s["metric"]["result"] == "success"), "{panel}: {r:?}");
            }
        } else if e.contains("sensor_series") {
            assert!(!r.is_empty(), "series panel {panel} is empty: {q}");
        } else if e.contains("sensor_check_") {
            assert!(!r.is_empty(), "checks panel {panel} is empty: {q}");
            if r.iter().any(|s| s["metric"].get("check").is_some()) {
                assert!(
                    r.iter().any(|s| s["metric"]["check"] == "refused")
                        || r.iter().any(|s| s["metric"]["check"] == "web"),
                    "checks panel {panel}: {r:?}"
                );
            }
        } else if r.is_empty() {
            empty.push(panel.clone());
        }
    }
    for (name, e, recording) in rule_exprs() {
        let r = prom.query(&e);
        if recording && !name.contains("owner") {
            assert!(!r.is_empty(), "recording rule {name} is empty");
        }
    }
    eprintln!(
        "{} dashboard expressions and {} rules evaluated; empty (no data of that kind on this host yet): {empty:?}",
        exprs.len(),
        rule_exprs().len()
    );
    assert_eq!(d.stop().code(), Some(0));
}

/// The fleet dashboard's owner panels and the owner rules on a live Prometheus scraping a
/// sensor that names kubelet-style pods through a private containerd: two pods of one
/// Deployment OOM-killed, a StatefulSet's pod running without kills.
#[test]
fn owner_panels_and_rules_evaluate_against_live_prometheus() {
    let Some(_k) = privileged("owner_panels_and_rules_evaluate_against_live_prometheus") else {
        return;
    };
    let Some(image) = runtimes::victim_image() else { return };
    let Some(ctrd) = runtimes::Containerd::start() else {
        return;
    };
    ctrd.import(image);
    let cfg = std::env::temp_dir().join(format!("sensor-owners-{}.yaml", std::process::id()));
    std::fs::write(
        &cfg,
        format!(
            "workloads:\n  runtimes:\n    - {{kind: containerd, socket: {}, namespaces: [k8s.io]}}\n",
            ctrd.socket.display()
        ),
    )
    .unwrap();
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let instance = format!("127.0.0.1:{}", d.port);
    let Some(prom) = Prometheus::scraping("owners", &instance) else {
        return;
    };
    let mut pg = runtimes::KubePod::new(
        "shop",
        "pg-main-0",
        &[
            ("statefulset.kubernetes.io/pod-name", "pg-main-0"),
            ("controller-revision-hash", "pg-main-6b9c8d7f5"),
        ],
    );
    ctrd.start_sandbox(&mut pg, image);
    for name in ["ledger-api-5d8f6c7b9-x2x4k", "ledger-api-5d8f6c7b9-q7z9m"] {
        let mut pod = runtimes::KubePod::new("shop", name, &[("pod-template-hash", "5d8f6c7b9")]);
        ctrd.start_sandbox(&mut pod, image);
        let mut c = pod.container("ledger", 32 << 20, &["/bin/busybox", "tail", "/dev/zero"]);
        let out = ctrd.run(&mut c, image);
        assert_eq!(out.status.code(), Some(137), "{out:?}\n{}", ctrd.log());
    }
    let ledger = [("owner_kind", "Deployment"), ("owner", "ledger-api")];
    d.wait_metric_sum("sensor_oom_kills_total", &ledger, 2.0, Duration::from_secs(10));

    // The rules see both kills under one owner, on this one host; pg-main runs without kills.
    let owner_value = |e: &str, owner: &str| {
        let r = prom.query(e);
        r.iter().find(|s| s["metric"]["owner"] == owner).map(sample_value)
    };
    let start = std::time::Instant::now();
    while owner_value("namespace_owner:sensor_oom_kills:increase1h", "ledger-api") != Some(2.0)
        || owner_value("namespace_owner:sensor_hosts_running:count", "pg-main").is_none()
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "owner rules never saw the kills: {:?}\n{}",
            prom.query("namespace_owner:sensor_oom_kills:increase1h"),
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let q = |e: &str| owner_value(e, "ledger-api");
    assert_eq!(q("instance_namespace_owner:sensor_oom_kills:increase1h"), Some(2.0));
    assert_eq!(q("namespace_owner:sensor_hosts_with_oom_kills:count1h"), Some(1.0));
    assert_eq!(q("namespace_owner:sensor_hosts_running:count"), Some(1.0));
    assert_eq!(
        owner_value("namespace_owner:sensor_hosts_running:count", "pg-main"),
        Some(1.0)
    );
    assert_eq!(
        owner_value("namespace_owner:sensor_oom_kills:increase1h", "pg-main"),
        None
    );
    // Two owners, 0 and 2 kills: p90 1.8, the threshold 3 x that (above the floor of 5).
    let one = |e: &str| prom.query(e).first().map(sample_value);
    assert_eq!(one("fleet:sensor_oom_kills_per_owner:quantile90_1h"), Some(1.8));
    assert_eq!(one("fleet:sensor_oom_kills_owner_outlier_threshold:1h"), Some(5.4));

    // Enough scrapes since the kills for increase() over 30s to have two samples.
    std::thread::sleep(Duration::from_secs(3));
    let (exprs, _) = dashboard_exprs();
    let owner_exprs: Vec<_> = exprs.iter().filter(|(_, e)| e.contains("owner")).collect();
    assert!(owner_exprs.len() >= 8, "{owner_exprs:?}");
    for (panel, e) in owner_exprs {
        let r = prom.query(&substitute(e, &instance));
        assert!(!r.is_empty(), "owner panel {panel} is empty: {e}");
        if r.iter().any(|s| s["metric"].get("owner").is_some()) {
            assert!(
                r.iter().all(|s| s["metric"]["owner"] == "ledger-api"
                    && s["metric"]["owner_kind"] == "Deployment"
                    && s["metric"]["namespace"] == "shop"),
                "owner panel {panel}: {r:?}"
            );
        }
    }
    assert_eq!(d.stop().code(), Some(0));
}

#[test]
fn fleet_rules_hold_at_10000_hosts_on_a_real_tsdb() {
    // The full scale check (deploy/prometheus/scale/scale_check.py, also `cargo xtask
    // scale-check`): 10,000 hosts x 4 hours backfilled with promtool into a real TSDB, the rule
    // expressions evaluated by a real Prometheus at the end of each hour. About 5 s.
    let Some(_) = promtool() else { return };
    if Command::new("prometheus").arg("--version").output().is_err() {
        tool_missing("prometheus", "apt-get install prometheus");
        return;
    }
    let out = Command::new("python3")
        .arg(prometheus_dir().join("scale/scale_check.py"))
        .args(["--hosts", "10000", "--hours", "4", "--json"])
        .output()
        .unwrap();
    let t = text(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {t}"));
    let hours = v["hours_checked"].as_array().unwrap();
    assert_eq!(hours.len(), 3, "{t}");
    for h in hours {
        assert_eq!(h["instance:sensor_oom_kills:increase1h (hosts > 0)"], 100.0, "{h}");
        assert_eq!(h["fleet:sensor_hosts_with_oom_kills:ratio1h"], 0.01, "{h}");
        let per_hour = h["fleet:sensor_oom_kills:rate1h"].as_f64().unwrap() * 3600.0;
        assert!((per_hour - 100.0).abs() < 5.0, "{h}");
        eprintln!("hour {}: query times (ms) {}", h["hour"], h["times_ms"]);
    }
    assert_eq!(v["samples"], 2_703_056);
    assert!(out.status.success(), "{t}");
}

fn alertmanager_file() -> PathBuf {
    root().join("deploy/alertmanager/alertmanager.yml")
}

#[test]
fn alertmanager_config_passes_amtool_and_routes_the_sensor_alerts() {
    if !require_tool(
        "amtool",
        "apt-get install prometheus-alertmanager; `cargo xtask deps` does it",
    ) {
        return;
    }
    let file = alertmanager_file();
    let out = Command::new("amtool").arg("check-config").arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("SUCCESS"), "{}", text(&out));
    // (labels, receivers in routing order)
    let cases: &[(&str, &str)] = &[
        ("alertname=SensorOOMKillStorm target=host severity=warning instance=h1", "ticket"),
        ("alertname=SensorDown target=host severity=critical instance=h1", "page"),
        ("alertname=SensorEventsLost target=host severity=warning instance=h1", "ticket"),
        (
            "alertname=SensorWorkloadOOMKillStorm target=workload severity=warning instance=h1 namespace=shop pod=web-1",
            "remediation,ticket",
        ),
        ("alertname=SensorOOMOutlierHost target=host severity=warning instance=h1", "remediation,ticket"),
        (
            "alertname=SensorOOMOutlierOwner target=workload severity=warning namespace=shop owner_kind=Deployment owner=ledger",
            "ticket",
        ),
        ("alertname=SensorGlobalOOMKills target=host severity=critical instance=h1", "remediation,page"),
        ("alertname=SensorFleetOOMHostRatioHigh target=fleet severity=warning", "page"),
        ("alertname=SensorCheckDown target=check severity=critical check=shop", "page"),
        (
            "alertname=SensorCheckUnreachableFromHost target=host severity=warning instance=h1 check=shop",
            "ticket",
        ),
        (
            "alertname=SensorCheckDownFromLocation target=check severity=warning location=zone-b check=shop",
            "ticket",
        ),
        ("alertname=SomethingElse severity=critical", "ticket"),
    ];
    for (labels, want) in cases {
        let out = Command::new("amtool")
            .args(["config", "routes", "test", "--config.file"])
            .arg(&file)
            .arg(format!("--verify.receivers={want}"))
            .args(labels.split(' '))
            .output()
            .unwrap();
        assert!(out.status.success(), "{labels} -> want {want}: {}", text(&out));
    }
    // And a wrong expectation fails, so the cases above really are checked.
    let out = Command::new("amtool")
        .args(["config", "routes", "test", "--config.file"])
        .arg(&file)
        .args([
            "--verify.receivers=page",
            "alertname=SensorOOMKillStorm",
            "target=host",
            "severity=warning",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    // Every alert of the rules carries the labels the routes use.
    let rules: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(prometheus_dir().join("sensor-rules.yml")).unwrap()).unwrap();
    for g in rules["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            if let Some(a) = r["alert"].as_str() {
                let sev = r["labels"]["severity"].as_str().unwrap_or_default();
                let target = r["labels"]["target"].as_str().unwrap_or_default();
                assert!(["critical", "warning"].contains(&sev), "{a}: severity {sev:?}");
                assert!(
                    ["host", "workload", "fleet", "check"].contains(&target),
                    "{a}: target {target:?}"
                );
            }
        }
    }
}

#[test]
fn alertmanager_groups_by_host_namespace_and_fleet_and_sensor_down_inhibits() {
    // The shipped file on a real Alertmanager (Debian's 0.25), alerts posted through its API.
    if !require_tool("prometheus-alertmanager", "apt-get install prometheus-alertmanager") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("sensor-am-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    // The remediation receiver's credential files (the Kubernetes Secret's mount) put here: a
    // real Alertmanager refuses to start without its CA file.
    let secrets = "/etc/alertmanager/secrets/sensor-remediate-alertmanager/";
    let shipped = std::fs::read_to_string(alertmanager_file()).unwrap();
    assert!(shipped.contains(secrets), "the remediation receiver reads {secrets}");
    let pki = tls::Pki::new(&dir.join("secrets"));
    std::fs::copy(&pki.ca, dir.join("secrets/ca.crt")).unwrap();
    std::fs::write(dir.join("secrets/token"), "0123456789abcdef0123456789abcdef\n").unwrap();
    let config = dir.join("alertmanager.yml");
    std::fs::write(
        &config,
        shipped.replace(secrets, &format!("{}/secrets/", dir.display())),
    )
    .unwrap();
    let mut cmd = Command::new("prometheus-alertmanager");
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.path={}", dir.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=");
    let am = Service::start("alertmanager", cmd, port, "/-/ready", dir.join("am.log"));
    let alert = |name: &str, target: &str, sev: &str, extra: &[(&str, &str)]| {
        let mut l = serde_json::json!({"alertname": name, "target": target, "severity": sev, "cluster": "c1"});
        for (k, v) in extra {
            l[*k] = serde_json::json!(v);
        }
        serde_json::json!({"labels": l, "annotations": {"summary": "test"}})
    };
    let alerts = serde_json::json!([
        alert(
            "SensorDown",
            "host",
            "critical",
            &[("instance", "h1"), ("job", "sensor")]
        ),
        alert("SensorOOMKillStorm", "host", "warning", &[("instance", "h1")]),
        alert("SensorOOMKillStorm", "host", "warning", &[("instance", "h2")]),
        alert(
            "SensorWorkloadOOMKillStorm",
            "workload",
            "warning",
            &[("instance", "h2"), ("namespace", "shop"), ("pod", "a")]
        ),
        alert(
            "SensorWorkloadOOMKillStorm",
            "workload",
            "warning",
            &[("instance", "h3"), ("namespace", "shop"), ("pod", "b")]
        ),
        alert(
            "SensorWorkloadOOMKillStorm",
            "workload",
            "warning",
            &[("instance", "h1"), ("namespace", "cart"), ("pod", "c")]
        ),
        alert("SensorFleetOOMHostRatioHigh", "fleet", "warning", &[]),
        // A check down for a quorum of the fleet (no instance), and two hosts that fail a check
        // alone: the one failing the check that is down anyway is inhibited.
        alert("SensorCheckDown", "check", "critical", &[("check", "shop")]),
        alert(
            "SensorCheckUnreachableFromHost",
            "host",
            "warning",
            &[("instance", "h4"), ("check", "shop")]
        ),
        alert(
            "SensorCheckUnreachableFromHost",
            "host",
            "warning",
            &[("instance", "h5"), ("check", "cart")]
        ),
        alert(
            "SensorCheckDownFromLocation",
            "check",
            "warning",
            &[("location", "zone-b"), ("check", "shop")]
        ),
    ]);
    let (code, body) = http_request(
        port,
        "POST",
        "/api/v2/alerts",
        &["Content-Type: application/json"],
        Some(&alerts.to_string()),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");

    // Inhibition: SensorDown on h1 suppresses h1's other alerts, and nothing on h2/h3.
    let start = std::time::Instant::now();
    let state = |a: &serde_json::Value| a["status"]["state"].as_str().unwrap_or("").to_string();
    loop {
        let (_, body) = http_get(port, "/api/v2/alerts").unwrap();
        let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        let on = |inst: &str| -> Vec<(String, String)> {
            list.iter()
                .filter(|a| a["labels"]["instance"] == inst)
                .map(|a| (a["labels"]["alertname"].as_str().unwrap().to_string(), state(a)))
                .collect()
        };
        let h1 = on("h1");
        let location = list
            .iter()
            .find(|a| a["labels"]["alertname"] == "SensorCheckDownFromLocation")
            .map(state);
        let ok = list.len() == 11
            && location.as_deref() == Some("suppressed")
            && h1.iter().all(|(n, s)| (n == "SensorDown") == (s == "active"))
            && on("h2").iter().chain(on("h3").iter()).all(|(_, s)| s == "active")
            && on("h4") == [("SensorCheckUnreachableFromHost".to_string(), "suppressed".to_string())]
            && on("h5") == [("SensorCheckUnreachableFromHost".to_string(), "active".to_string())];
        if ok {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "inhibition not as expected: h1 {h1:?}, h2 {:?}\n{body}\n{}",
            on("h2"),
            am.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Groups: per receiver, the labels each notification is grouped by, and its size. The
    // dispatcher takes alerts in asynchronously: poll until every group is there.
    let want: Vec<(String, String, usize)> = [
        // The fleet alert: one notification for the fleet.
        ("page", "alertname=SensorFleetOOMHostRatioHigh", 1),
        // SensorDown pages by host.
        ("page", "alertname=SensorDown,cluster=c1,instance=h1", 1),
        // A check pages once, whatever the hosts and clusters; a host failing a check alone
        // is a ticket for that host.
        ("page", "alertname=SensorCheckDown,check=shop", 1),
        ("ticket", "alertname=SensorCheckDownFromLocation,check=shop", 1),
        ("ticket", "alertname=SensorCheckUnreachableFromHost,cluster=c1,instance=h4", 1),
        ("ticket", "alertname=SensorCheckUnreachableFromHost,cluster=c1,instance=h5", 1),
        // Host alerts: by host.
        ("ticket", "alertname=SensorOOMKillStorm,cluster=c1,instance=h1", 1),
        ("ticket", "alertname=SensorOOMKillStorm,cluster=c1,instance=h2", 1),
        // Workload alerts: by namespace, across hosts (h2 and h3 in one notification).
        ("ticket", "alertname=SensorWorkloadOOMKillStorm,cluster=c1,namespace=cart", 1),
        ("ticket", "alertname=SensorWorkloadOOMKillStorm,cluster=c1,namespace=shop", 2),
        // The remediation receiver gets each of its alerts in a notification of its own.
        ("remediation", "alertname=SensorWorkloadOOMKillStorm,cluster=c1,instance=h1,namespace=cart,pod=c,severity=warning,target=workload", 1),
        ("remediation", "alertname=SensorWorkloadOOMKillStorm,cluster=c1,instance=h2,namespace=shop,pod=a,severity=warning,target=workload", 1),
        ("remediation", "alertname=SensorWorkloadOOMKillStorm,cluster=c1,instance=h3,namespace=shop,pod=b,severity=warning,target=workload", 1),
    ]
    .iter()
    .map(|(r, l, n)| (r.to_string(), l.to_string(), *n))
    .collect();
    let mut want = want;
    want.sort();
    let start = std::time::Instant::now();
    loop {
        let (_, body) = http_get(port, "/api/v2/alerts/groups").unwrap();
        let groups: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
        let mut got: Vec<(String, String, usize)> = groups
            .iter()
            .map(|g| {
                let labels: std::collections::BTreeMap<String, String> =
                    serde_json::from_value(g["labels"].clone()).unwrap_or_default();
                let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                (
                    g["receiver"]["name"].as_str().unwrap_or_default().to_string(),
                    labels.join(","),
                    g["alerts"].as_array().map_or(0, Vec::len),
                )
            })
            .collect();
        got.sort();
        if got == want {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "groups:\n{got:#?}\nwant:\n{want:#?}\n{body}\n{}",
            am.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(am);
    let _ = std::fs::remove_dir_all(&dir);
}
