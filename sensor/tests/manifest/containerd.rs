//! The DaemonSet under a private containerd, as kubelet's CRI would run it.

use super::*;

/// The sensor as a container of a private containerd, run with `ctr run` from the template
/// the way kubelet's CRI would set it up (cgroup under `kubepods`, the template's options).
pub(crate) struct CtrPod<'a> {
    pub(crate) ctd: &'a Containerd,
    pub(crate) id: String,
    pub(crate) port: u16,
    pub(crate) pid_file: PathBuf,
    pub(crate) log: PathBuf,
}

impl<'a> CtrPod<'a> {
    /// `ctr run` of the image with the template's options: detached (output to `<id>.log`) or
    /// in the foreground (output to ctr's own stdout / stderr).
    pub(crate) fn command(ctd: &Containerd, run: &PodRun, extra: &[&str], id: &str, detach: bool) -> Command {
        let cgroup = format!("{}/kubepods/burstable/pod{}/{id}", ctd.cgroup_root, runtimes::pod_uid());
        let mut cmd = ctd.ctr();
        cmd.args(["run", "--runtime", "io.containerd.runc.v2", "--cgroup", &cgroup])
            .arg("--pid-file")
            .arg(ctd.dir.join(format!("{id}.pid")));
        if detach {
            cmd.arg("-d")
                .arg("--log-uri")
                .arg(format!("file://{}", ctd.dir.join(format!("{id}.log")).display()));
        }
        assert_eq!(
            run.user,
            (0, 0),
            "ctr run has no --user: the image's USER 0:0 must be the template's"
        );
        if run.privileged {
            cmd.arg("--privileged");
        }
        // Kubernetes: the runtime's default set, minus `drop`, plus `add`. ctr applies its
        // drops after its adds and knows no `ALL`: drop every other capability by name.
        let drop: Vec<String> = if run.cap_drop.iter().any(|c| c == "ALL") {
            CAPS.iter().map(|c| c.to_string()).collect()
        } else {
            run.cap_drop.clone()
        };
        for c in drop.iter().filter(|c| !run.cap_add.contains(c)) {
            cmd.args(["--cap-drop", &format!("CAP_{c}")]);
        }
        for c in &run.cap_add {
            cmd.args(["--cap-add", &format!("CAP_{c}")]);
        }
        if !run.no_new_privs {
            cmd.arg("--allow-new-privs");
        }
        if run.read_only_root {
            cmd.arg("--read-only");
        }
        match &run.seccomp {
            Seccomp::RuntimeDefault => {
                cmd.arg("--seccomp");
            }
            Seccomp::Localhost(p) => {
                cmd.arg("--seccomp").arg("--seccomp-profile").arg(p);
            }
            Seccomp::Unconfined => {}
        }
        if run.host_pid {
            cmd.args(["--with-ns", "pid:/proc/1/ns/pid"]);
        }
        if run.host_network {
            cmd.arg("--net-host");
        }
        for m in &run.mounts {
            let mut opts = vec!["rbind", if m.read_only { "ro" } else { "rw" }];
            opts.extend(m.propagation);
            cmd.arg("--mount").arg(format!(
                "type=bind,src={},dst={},options={}",
                m.src.display(),
                m.dst,
                opts.join(":")
            ));
        }
        for (k, v) in &run.env {
            cmd.args(["--env", &format!("{k}={v}")]);
        }
        cmd.args(["--memory-limit", &run.memory_limit.to_string()])
            .args(["--cpus", &run.cpu_limit.to_string()]);
        cmd.arg(IMAGE)
            .arg(id)
            .args(["/sensor", "run"])
            .args(&run.args)
            .args(extra);
        cmd
    }

    pub(crate) fn start(ctd: &'a Containerd, run: &PodRun, extra: &[&str]) -> CtrPod<'a> {
        let id = format!("sensor-{}", runtimes::random_hex(8));
        run_ok(&mut CtrPod::command(ctd, run, extra, &id, true));
        let pod = CtrPod {
            ctd,
            port: run.ready_port,
            pid_file: ctd.dir.join(format!("{id}.pid")),
            log: ctd.dir.join(format!("{id}.log")),
            id,
        };
        // What the CNI loopback plugin does for every pod: the netns's `lo` up (runc leaves a
        // new network namespace's loopback down).
        if !run.host_network {
            let pid = pod.pid().expect("sensor task pid");
            run_ok(
                Command::new("nsenter")
                    .arg(format!("--net=/proc/{pid}/ns/net"))
                    .args(["ip", "link", "set", "lo", "up"]),
            );
        }
        pod
    }

    /// Runs the container in the foreground to its end (for starts that must fail); its output.
    pub(crate) fn run_to_exit(ctd: &'a Containerd, run: &PodRun) -> Output {
        let id = format!("sensor-{}", runtimes::random_hex(8));
        let out = CtrPod::command(ctd, run, &[], &id, false)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("ctr run");
        drop(CtrPod {
            ctd,
            port: run.ready_port,
            pid_file: PathBuf::new(),
            log: PathBuf::new(),
            id,
        });
        out
    }
}

/// Every Linux capability (0..=40), by its name without `CAP_`.
pub(crate) const CAPS: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

impl Pod for CtrPod<'_> {
    fn pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(&self.pid_file).ok()?.trim().parse().ok()?;
        // A zombie or a reused pid is not the task: its cgroup must be ours.
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        cg.contains(&self.id).then_some(pid)
    }
    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for CtrPod<'_> {
    fn drop(&mut self) {
        let _ = self
            .ctd
            .ctr()
            .args(["tasks", "kill", "-s", "SIGKILL", &self.id])
            .output();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let _ = self.ctd.ctr().args(["tasks", "delete", "-f", &self.id]).output();
            if self
                .ctd
                .ctr()
                .args(["containers", "delete", &self.id])
                .output()
                .is_ok_and(|o| o.status.success())
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn daemonset_runs_under_containerd_with_its_default_seccomp() {
    // containerd 1.6's default profile (what Kubernetes' RuntimeDefault means there) allows
    // bpf and perf_event_open with CAP_BPF / CAP_PERFMON: the base template, unchanged, loads.
    let test = "daemonset_runs_under_containerd_with_its_default_seccomp";
    let Some(_k) = require_runtime_bits(test) else {
        return;
    };
    let Some(ctd) = Containerd::start() else {
        return;
    };
    ctd.import(IMAGE);
    ctd.import(runtimes::VICTIM_IMAGE);
    for overlay in [None, Some("seccomp")] {
        let run = PodRun::from_daemonset(&daemonset(overlay), &tag());
        let check = self_check_flag(run.ready_port);
        let pod = CtrPod::start(&ctd, &run, &["--checks", &check]);
        let status = ready_status(&pod, &run);
        assert!(
            status.lines().any(|l| l == "Seccomp:\t2"),
            "{overlay:?}: a filter is on\n{status}"
        );
        assert!(status.lines().any(|l| l == "NoNewPrivs:\t1"), "{status}");
        assert_probes_match_host(&pod);

        // An OOM kill in a kubelet-style container of the same containerd.
        let mut victim = cart_victim();
        let before = vmstat_oom_kill();
        let out = ctd.run(&mut victim, runtimes::VICTIM_IMAGE);
        assert_eq!(out.status.code(), Some(137), "{}", text(&out));
        assert_eq!(vmstat_oom_kill() - before, 1);
        pod.wait_sum(
            "sensor_oom_kills_total",
            &[
                ("container_id", victim.id.as_str()),
                ("pod_uid", victim.pod_uid.as_str()),
                ("scope", "memcg"),
            ],
            1.0,
        );

        // A TCP connect from another kubelet-style container (host network, to a listener of
        // this test on loopback).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port().to_string();
        // It stays until counted: the sensor names a cgroup it has seen alive.
        let script = format!(
            "{bb} nc 127.0.0.1 {port} </dev/null; {bb} sleep 120",
            bb = runtimes::BUSYBOX
        );
        let mut client = KubeContainer::new(
            "shop",
            "cart-7f9c",
            "client",
            64 << 20,
            &[runtimes::BUSYBOX, "sh", "-c", &script],
        );
        client.net_host = true;
        let accept = std::thread::spawn(move || listener.accept().map(drop));
        let mut ctr = ctd.spawn(&mut client, runtimes::VICTIM_IMAGE);
        accept.join().unwrap().expect("accepted");
        pod.wait_sum(
            "sensor_tcp_connects_total",
            &[("container_id", client.id.as_str()), ("result", "success")],
            1.0,
        );
        pod.wait_sum("sensor_check_up", &[("check", "pod-self")], 1.0);
        ctd.remove_all();
        let _ = ctr.wait();
        eprintln!("containerd, overlay {overlay:?}: ready, probes as on the host, OOM kill, connect and check counted");
    }

    // Each added capability removed in turn, under containerd's default profile.
    let full = PodRun::from_daemonset(&daemonset(None), &tag());
    for missing in full.cap_add.clone() {
        let mut run = full.clone();
        run.cap_add.retain(|c| *c != missing);
        match missing.as_str() {
            "BPF" | "PERFMON" => {
                let out = CtrPod::run_to_exit(&ctd, &run);
                assert_eq!(
                    out.status.code(),
                    Some(1),
                    "without {missing}: exit 1, not a crash: {}",
                    text(&out)
                );
                assert_eq!(
                    String::from_utf8_lossy(&out.stderr),
                    "sensor: the sensor needs CAP_BPF and CAP_PERFMON, or root\n"
                );
            }
            "SYSLOG" => {
                let pod = CtrPod::start(&ctd, &run, &[]);
                wait_ready(&pod, &run);
                let m = pod.metrics();
                let degraded =
                    metric(&m, "sensor_probe_state", &[("probe", "oom"), ("state", "degraded")]) == Some(1.0);
                let mut victim = cart_victim();
                let out = ctd.run(&mut victim, runtimes::VICTIM_IMAGE);
                assert_eq!(out.status.code(), Some(137), "{}", text(&out));
                assert_oom_counted(&pod, &victim.id, if degraded { "unknown" } else { "memcg" });
            }
            other => panic!("capability {other} added by the template: say what happens without it"),
        }
    }
}
