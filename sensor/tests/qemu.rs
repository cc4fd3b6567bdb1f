//! The fentry and kprobe paths of the OOM probe, tested for real inside Debian's 6.1 cloud
//! kernel under QEMU (the CI kernel has neither). `cargo xtask test` fetches the kernel into
//! target/qemu; .ci/run installs qemu-system-x86 and busybox-static. Under CI=true a missing
//! piece fails the test instead of skipping it.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

const SENSOR: &str = env!("CARGO_BIN_EXE_sensor");

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn missing(what: &str) -> bool {
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("CI=true but {what}; .ci/run and `cargo xtask test` provide it");
    }
    common::skip(&format!("{what} (run `cargo xtask test`, which prepares it)"));
    false
}

/// Copies `bin` and the shared libraries it needs (per ldd) into `root` at the same paths.
fn install_with_libs(bin: &Path, root: &Path, dest: &str) {
    std::fs::copy(bin, root.join(dest.trim_start_matches('/'))).expect("copy binary");
    let out = Command::new("ldd").arg(bin).output().expect("ldd");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = line.split_whitespace().find(|w| w.starts_with('/'));
        if let Some(p) = path {
            let to = root.join(p.trim_start_matches('/'));
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(p, &to).unwrap_or_else(|e| panic!("copy {p}: {e}"));
        }
    }
}

fn build_initramfs(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    let _ = std::fs::remove_dir_all(&root);
    for d in ["bin", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
    let init = root.join("init");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qemu/init.sh"), &init).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Strip the debug binary so the RAM-backed root stays small.
    let stripped = dir.join("sensor.stripped");
    let st = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(SENSOR)
        .status()
        .expect("strip");
    assert!(st.success());
    install_with_libs(&stripped, &root, "/sensor");
    install_with_libs(Path::new("/usr/bin/tail"), &root, "/tail");
    let cpio = dir.join("initramfs.cpio");
    let st = Command::new("sh")
        .arg("-c")
        .arg("cd \"$1\" && find . | /bin/busybox cpio -o -H newc > \"$2\" 2>/dev/null")
        .arg("sh")
        .arg(&root)
        .arg(&cpio)
        .status()
        .unwrap();
    assert!(st.success(), "cpio failed");
    cpio
}

/// The text between `=== {start} ===` and `=== END {name} ===`.
fn section<'a>(out: &'a str, start: &str, name: &str) -> &'a str {
    let begin = format!("=== {start} ===");
    let end = format!("=== END {name} ===");
    let s = out
        .find(&begin)
        .unwrap_or_else(|| panic!("no '{begin}' in VM output:\n{out}"));
    let rest = &out[s + begin.len()..];
    let e = rest
        .find(&end)
        .unwrap_or_else(|| panic!("no '{end}' in VM output:\n{out}"));
    &rest[..e]
}

fn part<'a>(sec: &'a str, name: &str) -> &'a str {
    let marker = format!("--- {name}");
    let s = sec.find(&marker).unwrap_or_else(|| panic!("no '{marker}' in:\n{sec}"));
    let rest = &sec[s + marker.len()..];
    rest.find("\n--- ").map_or(rest, |e| &rest[..e]).trim()
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn fentry_and_kprobe_paths_on_debian_6_1() {
    let dir = workspace().join("target/qemu");
    let kernel = dir.join("vmlinuz");
    if !kernel.exists() {
        missing("target/qemu/vmlinuz (Debian's 6.1 cloud kernel) is absent");
        return;
    }
    if Command::new("qemu-system-x86_64").arg("--version").output().is_err() {
        missing("qemu-system-x86_64 is not installed");
        return;
    }
    if !Path::new("/bin/busybox").exists() {
        missing("busybox-static is not installed");
        return;
    }
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("qemu-oom");
    std::fs::create_dir_all(&work).unwrap();
    let initrd = build_initramfs(&work);
    let serial = work.join("serial.log");
    let mut child = Command::new("timeout")
        .args([
            "--kill-after=10",
            "600",
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-m",
            "1024",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=3"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .args(["-monitor", "none", "-display", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start qemu");
    let st = child.wait().expect("qemu");
    let out = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(st.success(), "qemu exited with {st}; serial:\n{out}");
    std::thread::sleep(Duration::from_millis(10));

    for (pass, hook, other) in [("fentry", "fentry", "kprobe"), ("kprobe", "kprobe", "fentry")] {
        let sec = section(&out, &format!("PASS {pass}"), pass);
        assert_eq!(part(sec, "victim exit"), "137", "the allocator was OOM-killed:\n{sec}");
        assert_eq!(part(sec, "kernel"), "oom_kill 1", "{sec}");
        // Pure cgroup v2 here: memory.events and per-cgroup PSI per workload.
        let m = part(sec, "metrics");
        // Unsorted, in the collector's order: the path's labels, then the runtime's names.
        let wl =
            format!("cgroup=\"/victim-{pass}\",container_id=\"\",pod_uid=\"\",namespace=\"\",pod=\"\",container=\"\"");
        for line in part(sec, "memory.events").lines() {
            let (event, value) = line.split_once(' ').unwrap();
            let series = format!("sensor_memcg_events_total{{event=\"{event}\",{wl}}}");
            assert_eq!(metric(m, &series), value.trim().parse().ok(), "{series} in:\n{m}");
        }
        let psi = format!("sensor_memory_pressure_waiting_seconds_total{{{wl}}}");
        assert!(metric(m, &psi).is_some(), "per-cgroup PSI on v2: {psi} in:\n{m}");
        assert_eq!(part(sec, "sensor exit"), "0", "{sec}");
        let probes: serde_json::Value = serde_json::from_str(part(sec, "probes")).expect("probes JSON");
        let oom = &probes[0];
        let groups = oom["groups"].as_array().unwrap();
        let ctx = groups.iter().find(|g| g["purpose"] == "kill context").unwrap();
        assert_eq!(ctx["hook"], hook, "{sec}");
        let fields = groups.iter().find(|g| g["purpose"] == "victim fields").unwrap();
        assert_eq!(fields["hook"], "tracepoint");
        // Debian's 6.1 backports the mark_victim fields and task argument: all parts attach,
        // and the 6.1 verifier accepts the same programs as the CI kernel's.
        let raw = groups.iter().find(|g| g["purpose"] == "victim cgroup").unwrap();
        assert_eq!(raw["hook"], "raw_tracepoint", "{sec}");
        assert_eq!(
            oom["state"],
            if hook == "fentry" { "attached" } else { "degraded" },
            "{sec}"
        );

        // TCP on 6.1: the raw entry (compare-and-swap slots, BTF task pointer) in the first
        // pass, the classic-tracepoint entry in the second; both count the 20 connects and the
        // second scrape's own exactly.
        let tcp = common::probe_report(&probes, "tcp");
        let tcp_hook = if pass == "fentry" {
            "raw_tracepoint"
        } else {
            "tracepoint"
        };
        assert_eq!(tcp["groups"][0]["purpose"], "connect state", "{tcp}");
        assert_eq!(tcp["groups"][0]["hook"], tcp_hook, "{tcp}");
        // The connect-end recovery program: a raw tracepoint only (excluded in the second
        // pass). Debian's 6.1 backports `tcp_done_with_error()` (state change before the error
        // report), so it attaches; a 6.1 without it must say so instead.
        let rec = tcp["groups"]
            .as_array()
            .and_then(|g| g.iter().find(|g| g["purpose"] == "connect end recovery"))
            .unwrap_or_else(|| panic!("no connect end recovery group: {tcp}"));
        if pass == "fentry" {
            let why = rec["attempts"][0]["error"].as_str().unwrap_or("");
            assert!(
                rec["hook"] == "raw_tracepoint" || why.contains("no tcp_done_with_error in BTF"),
                "{tcp}"
            );
        } else {
            assert_eq!(rec["hook"], serde_json::Value::Null, "{tcp}");
            assert_eq!(tcp["state"], "degraded", "{tcp}");
        }
        let count = |p: &str| -> f64 {
            part(sec, p)
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no root-cgroup connect count in '{p}':\n{sec}"))
        };
        assert_eq!(count("tcp after") - count("tcp before"), 21.0, "{sec}");

        let events: Vec<serde_json::Value> = serde_json::from_str(part(sec, "events")).expect("events JSON");
        // Other events (e.g. the readiness polls refused while the daemon started) are fine.
        let events: Vec<_> = events.into_iter().filter(|e| e["type"] == "oom_kill").collect();
        assert_eq!(events.len(), 1, "{sec}");
        let e = &events[0];
        assert_eq!(e["context_hook"], hook, "{e}");
        assert_eq!(e["scope"], "memcg", "{e}");
        assert_eq!(e["constraint"], "memcg", "{e}");
        assert_eq!(e["cgroup"], format!("/victim-{pass}"), "{e}");
        assert_eq!(e["victim_comm"], "tail", "{e}");
        assert_eq!(e["totalpages"], 8192, "32 MiB limit in 4 KiB pages: {e}");
        assert_eq!(e["oom_memcg_id"], e["memcg_id"], "the victim's own memcg ran out: {e}");
        assert_eq!(e["memory_limit_bytes"], 33554432u64, "{e}");
        assert!(e["victim_pid"].as_i64().unwrap() > 1, "{e}");
        assert_eq!(e["victim_tgid"], e["victim_pid"], "{e}");
        let anon = e["anon_rss_bytes"].as_u64().expect("anon rss");
        assert!((24 << 20..=32 << 20).contains(&anon), "{e}");

        // The host-wide kill: global scope, the "host" verdict with what the node had left.
        assert_eq!(
            part(sec, "host victim exit"),
            "137",
            "the unlimited allocator was OOM-killed:\n{sec}"
        );
        let host: Vec<serde_json::Value> = serde_json::from_str(part(sec, "host events")).expect("host events JSON");
        let host: Vec<_> = host.into_iter().filter(|e| e["type"] == "oom_kill").collect();
        assert_eq!(host.len(), 2, "the memcg kill and the host kill: {host:?}");
        let h = &host[1];
        assert_eq!(h["scope"], "global", "{h}");
        assert_eq!(h["constraint"], "none", "{h}");
        assert_eq!(h["victim_comm"], "tail", "{h}");
        assert_eq!(h["reason"], "host", "{h}");
        assert!(
            h["lead_up"]["verdict"]
                .as_str()
                .is_some_and(|v| v.starts_with("host out of memory")),
            "{h}"
        );
        let hm = part(sec, "host metrics");
        assert!(
            hm.lines()
                .any(|l| l.contains("reason=\"host\"") && l.contains("scope=\"global\"") && l.ends_with(" 1")),
            "one global kill with the host verdict:\n{hm}"
        );

        let m = part(sec, "metrics");
        // Any verdict (`reason`): the kill is counted once, in its cgroup, as a memcg kill.
        let prefix =
            format!("sensor_oom_kills_total{{cgroup=\"/victim-{pass}\",container=\"\",container_id=\"\",namespace=\"\",owner=\"\",owner_kind=\"\",pod=\"\",pod_uid=\"\",reason=\"");
        let kills: f64 = m
            .lines()
            .filter(|l| l.starts_with(&prefix) && l.contains("scope=\"memcg\"}"))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum();
        assert_eq!(kills, 1.0, "{m}");
        assert_eq!(
            metric(m, &format!("sensor_probe_attached{{hook=\"{hook}\",probe=\"oom\"}}")),
            Some(1.0),
            "{m}"
        );
        assert_eq!(
            metric(m, &format!("sensor_probe_attached{{hook=\"{other}\",probe=\"oom\"}}")),
            Some(0.0),
            "{m}"
        );
        assert_eq!(metric(m, "sensor_events_total{probe=\"oom\"}"), Some(1.0), "{m}");
        let unseen = "sensor_oom_kills_unseen{cgroup=\"\",container=\"\",container_id=\"\",namespace=\"\",pod=\"\",pod_uid=\"\",source=\"vmstat\"}";
        assert_eq!(metric(m, unseen), Some(0.0), "{m}");
    }
    let doctor = section(&out, "DOCTOR", "DOCTOR");
    assert!(
        doctor.contains("kill context (optional): uses fentry oom_kill_process"),
        "{doctor}"
    );
}
