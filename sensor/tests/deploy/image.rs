//! The container image: exactly what `cargo xtask dist` built, and it runs.

use super::*;

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
