//! Real container runtimes for tests: podman (CLI and its Docker Engine API service) and a
//! private containerd daemon running containers the way kubelet lays them out. Nothing here
//! needs a registry: the victim image is built `FROM scratch` around Debian's static busybox.
//!
//! Every entry point returns `None` (after [`super::skip`], which fails under CI=true) when a
//! tool is missing, and panics with the tool's output when a started component misbehaves.

use std::{
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

pub use super::kit::ids::{container_id, pod_uid, random_hex};
use super::{kit::host::remove_cgroup_tree, require_tool, Service};

/// The test victim image: `/bin/busybox` (static) and nothing else. Run applets by path, e.g.
/// `/bin/busybox tail /dev/zero`.
pub const VICTIM_IMAGE: &str = "localhost/sensor-victim:busybox";

/// Where Debian's busybox-static puts the static binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Kubernetes namespace used by containerd for kubelet's containers.
pub const K8S_NAMESPACE: &str = "k8s.io";

/// A unique-enough tag for names, cgroups and temp dirs of this test process.
pub fn tag() -> String {
    format!("identity-{}", std::process::id())
}

/// containers.conf for podman here: no default ulimits (podman's exceed the hard limit of a
/// host without CAP_SYS_RESOURCE, and then no container starts), and runc (crun refuses hybrid
/// cgroup hosts). Written once per test process; point `CONTAINERS_CONF` at it.
pub fn podman_conf() -> PathBuf {
    static CONF: OnceLock<PathBuf> = OnceLock::new();
    CONF.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("sensor-podman-{}.conf", std::process::id()));
        std::fs::write(
            &p,
            "[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = \"runc\"\n",
        )
        .unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    })
    .clone()
}

/// `podman` with [`podman_conf`], run from the temp dir: podman's monitor writes an `oom` file
/// into its working directory when a container is OOM-killed.
pub fn podman() -> Command {
    let mut c = Command::new("podman");
    c.env("CONTAINERS_CONF", podman_conf())
        .current_dir(std::env::temp_dir());
    c
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd`, panics with its output unless it succeeds; returns its trimmed stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{}", out.status, text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// podman, runc and the static busybox are there (else skipped, or a failure under CI).
pub fn require_podman() -> bool {
    const HOW: &str = "apt-get install podman runc busybox-static; `cargo xtask deps` does it";
    if !(require_tool("podman", HOW) && require_tool("runc", HOW)) {
        return false;
    }
    super::require(
        "",
        Path::new(BUSYBOX).exists(),
        &format!("{BUSYBOX} is missing ({HOW})"),
    )
}

/// [`require_podman`] plus containerd and ctr.
pub fn require_containerd() -> bool {
    const HOW: &str = "apt-get install containerd; `cargo xtask deps` does it";
    require_podman() && require_tool("containerd", HOW) && require_tool("ctr", HOW)
}

/// Builds [`VICTIM_IMAGE`] with podman (once per test process): `FROM scratch`, the static
/// busybox at /bin/busybox. `None` when podman is missing (skipped).
pub fn victim_image() -> Option<&'static str> {
    static BUILT: OnceLock<()> = OnceLock::new();
    if !require_podman() {
        return None;
    }
    BUILT.get_or_init(|| {
        let ctx = std::env::temp_dir().join(format!("sensor-victim-{}", tag()));
        let _ = std::fs::remove_dir_all(&ctx);
        std::fs::create_dir_all(&ctx).expect("image context");
        std::fs::copy(BUSYBOX, ctx.join("busybox")).expect("copy busybox");
        std::fs::write(
            ctx.join("Containerfile"),
            "FROM scratch\nCOPY busybox /bin/busybox\nCMD [\"/bin/busybox\", \"sh\"]\n",
        )
        .expect("Containerfile");
        run_ok(podman().args(["build", "-q", "-t", VICTIM_IMAGE]).arg(&ctx));
        let _ = std::fs::remove_dir_all(&ctx);
    });
    Some(VICTIM_IMAGE)
}

/// `podman run` of the victim image (not removed on exit, so its id stays inspectable: call
/// [`podman_rm`]). `args` follow the image, e.g. `["/bin/busybox", "tail", "/dev/zero"]`;
/// `memory` in bytes (swap pinned to the same, so the limit is the limit). Returns the
/// finished command's output (exit 137 for an OOM-killed main process).
pub fn podman_run(name: &str, memory: u64, args: &[&str]) -> Output {
    let mem = memory.to_string();
    podman()
        .args([
            "run",
            "--name",
            name,
            "--memory",
            &mem,
            "--memory-swap",
            &mem,
            VICTIM_IMAGE,
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn podman run")
}

/// The full id of a podman container by name.
pub fn podman_id(name: &str) -> String {
    run_ok(podman().args(["inspect", "--format", "{{.Id}}", name]))
}

/// Removes podman containers by name (best effort: cleanup).
pub fn podman_rm(names: &[&str]) {
    let _ = podman().args(["rm", "-f", "-i"]).args(names).output();
}

/// A minimal HTTP/1.0 GET over a unix socket; returns (status, body).
pub fn unix_http_get(socket: &Path, path: &str) -> std::io::Result<(u16, String)> {
    let s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    super::get_on(s, "localhost", path)
}

/// `podman system service --time 0 unix://<tmp>/podman.sock`: podman's Docker Engine API, as a
/// `docker` runtime socket for the sensor. Stopped on drop (or [`PodmanService::stop`]).
pub struct PodmanService {
    pub socket: PathBuf,
    pub dir: PathBuf,
    service: Service,
}

impl PodmanService {
    /// Starts the service and waits until `GET /_ping` answers. `None` when podman is missing.
    pub fn start() -> Option<PodmanService> {
        if !require_podman() {
            return None;
        }
        let dir = std::env::temp_dir().join(format!("sensor-podman-svc-{}-{}", tag(), random_hex(4)));
        std::fs::create_dir_all(&dir).expect("service dir");
        let socket = dir.join("podman.sock");
        let mut cmd = podman();
        cmd.args(["system", "service", "--time", "0"])
            .arg(format!("unix://{}", socket.display()));
        let mut service = Service::spawn("podman system service", cmd, 0, dir.join("service.log"));
        let sock = socket.clone();
        service.wait_until(move |_| matches!(unix_http_get(&sock, "/_ping"), Ok((200, _))));
        Some(PodmanService { socket, dir, service })
    }

    /// Stops the service (SIGTERM, then SIGKILL); the socket file stays, refusing connections.
    pub fn stop(&mut self) {
        self.service.stop();
    }

    pub fn log(&self) -> String {
        self.service.log()
    }
}

impl Drop for PodmanService {
    fn drop(&mut self) {
        self.service.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A container as kubelet would have containerd run it: 64-hex id, cgroup
/// `<parent>/kubepods/burstable/pod<uid>/<id>`, the `io.kubernetes.*` labels, a memory limit.
#[derive(Debug, Clone)]
pub struct KubeContainer {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub memory_limit: u64,
    /// Share the host's network namespace (to reach a loopback listener of the test).
    pub net_host: bool,
    /// Command and arguments inside the image.
    pub args: Vec<String>,
    /// More labels and OCI annotations (a pod's labels on its sandbox; the sandbox's id on an
    /// app container), as kubelet's CRI plugin sets them.
    pub labels: Vec<(String, String)>,
    pub annotations: Vec<(String, String)>,
    /// Run detached (`ctr run -d`): a pod's sandbox.
    pub detach: bool,
    // Filled by Containerd::run:
    pub id: String,
    pub pod_uid: String,
    /// The memory cgroup path as the sensor labels it (`/…/kubepods/burstable/pod<uid>/<id>`).
    pub cgroup: String,
}

impl KubeContainer {
    /// `shop/cart-7f9c/cart`-style names, `memory_limit` bytes, running `args`.
    pub fn new(namespace: &str, pod: &str, container: &str, memory_limit: u64, args: &[&str]) -> KubeContainer {
        KubeContainer {
            namespace: namespace.into(),
            pod: pod.into(),
            container: container.into(),
            memory_limit,
            net_host: false,
            args: args.iter().map(|s| s.to_string()).collect(),
            labels: Vec::new(),
            annotations: Vec::new(),
            detach: false,
            id: container_id(),
            pod_uid: pod_uid(),
            cgroup: String::new(),
        }
    }
}

/// A pod as kubelet lays it out through containerd's CRI plugin: a sandbox (pause) container
/// carrying the pod's labels, and app containers whose spec annotations name that sandbox. All
/// in the pod's cgroup `kubepods/burstable/pod<uid>/`.
#[derive(Debug, Clone)]
pub struct KubePod {
    pub sandbox: KubeContainer,
}

fn pairs(kv: &[(&str, &str)]) -> Vec<(String, String)> {
    kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

impl KubePod {
    /// Pod `namespace/name` with the pod's `labels` (a controller's: `pod-template-hash`, ...).
    pub fn new(namespace: &str, name: &str, labels: &[(&str, &str)]) -> KubePod {
        let mut sandbox = KubeContainer::new(namespace, name, "", 16 << 20, &["/bin/busybox", "sleep", "3600"]);
        sandbox.labels = pairs(labels);
        sandbox.labels.push(("io.cri-containerd.kind".into(), "sandbox".into()));
        sandbox.annotations = pairs(&[
            ("io.kubernetes.cri.container-type", "sandbox"),
            ("io.kubernetes.cri.sandbox-id", &sandbox.id),
            ("io.kubernetes.cri.sandbox-name", name),
            ("io.kubernetes.cri.sandbox-namespace", namespace),
        ]);
        sandbox.detach = true;
        KubePod { sandbox }
    }

    /// An app container of the pod: its `io.kubernetes.*` labels and the annotations naming
    /// the sandbox (the pod's labels stay on the sandbox, as with kubelet).
    pub fn container(&self, name: &str, memory_limit: u64, args: &[&str]) -> KubeContainer {
        let s = &self.sandbox;
        let mut c = KubeContainer::new(&s.namespace, &s.pod, name, memory_limit, args);
        c.pod_uid = s.pod_uid.clone();
        c.labels = pairs(&[("io.cri-containerd.kind", "container")]);
        c.annotations = pairs(&[
            ("io.kubernetes.cri.container-type", "container"),
            ("io.kubernetes.cri.sandbox-id", &s.id),
            ("io.kubernetes.cri.container-name", name),
        ]);
        c
    }
}

/// A private containerd (temporary root, state and socket; the CRI plugin off), stopped on
/// drop with every container it ran deleted and the kubepods cgroup tree it made removed.
pub struct Containerd {
    pub socket: PathBuf,
    pub dir: PathBuf,
    /// Parent of `kubepods/` in every cgroup hierarchy: unique to this test process, so runs
    /// from several checkouts never share a cgroup (kind nests kubelet the same way).
    pub cgroup_root: String,
    service: Service,
    ran: std::sync::Mutex<Vec<String>>,
}

impl Containerd {
    /// Starts the daemon and waits until `ctr version` answers. `None` when a tool is missing.
    pub fn start() -> Option<Containerd> {
        if !require_containerd() {
            return None;
        }
        let dir = std::env::temp_dir().join(format!("sensor-containerd-{}-{}", tag(), random_hex(4)));
        std::fs::create_dir_all(&dir).expect("containerd dir");
        let socket = dir.join("containerd.sock");
        let d = dir.display();
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/containerd.sock\"\n\
             [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n\
             [debug]\n  address = \"{d}/debug.sock\"\n"
        );
        std::fs::write(dir.join("config.toml"), config).expect("containerd config");
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(dir.join("config.toml"));
        let mut service = Service::spawn("containerd", cmd, 0, dir.join("containerd.log"));
        let sock = socket.clone();
        service.wait_until(move |_| {
            Command::new("ctr")
                .arg("-a")
                .arg(&sock)
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
        Some(Containerd {
            socket,
            dir,
            cgroup_root: format!("/sensor-{}", tag()),
            service,
            ran: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// `ctr -a <socket> -n k8s.io`.
    pub fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("-a").arg(&self.socket).args(["-n", K8S_NAMESPACE]);
        c
    }

    /// Imports a podman image: `podman save --format oci-archive` | `ctr images import`.
    pub fn import(&self, image: &str) {
        let archive = self.dir.join("image.tar");
        run_ok(
            podman()
                .args(["save", "--format", "oci-archive", "-o"])
                .arg(&archive)
                .arg(image),
        );
        run_ok(self.ctr().args(["images", "import"]).arg(&archive));
        let _ = std::fs::remove_file(&archive);
    }

    /// The `ctr run` command for `c` (id, pod uid and cgroup filled in here).
    fn run_cmd(&self, c: &mut KubeContainer, image: &str) -> Command {
        c.cgroup = format!("{}/kubepods/burstable/pod{}/{}", self.cgroup_root, c.pod_uid, c.id);
        let mut cmd = self.ctr();
        cmd.args(["run", "--runtime", "io.containerd.runc.v2", "--cgroup", &c.cgroup])
            .args(["--memory-limit", &c.memory_limit.to_string()])
            .args(["--label", &format!("io.kubernetes.pod.namespace={}", c.namespace)])
            .args(["--label", &format!("io.kubernetes.pod.name={}", c.pod)])
            .args(["--label", &format!("io.kubernetes.pod.uid={}", c.pod_uid)]);
        // A sandbox has no container name.
        if !c.container.is_empty() {
            cmd.args(["--label", &format!("io.kubernetes.container.name={}", c.container)]);
        }
        for (k, v) in &c.labels {
            cmd.args(["--label", &format!("{k}={v}")]);
        }
        for (k, v) in &c.annotations {
            cmd.args(["--annotation", &format!("{k}={v}")]);
        }
        if c.net_host {
            cmd.arg("--net-host");
        }
        if c.detach {
            cmd.arg("--detach");
        }
        cmd.arg(image).arg(&c.id).args(&c.args).stdin(Stdio::null());
        self.ran.lock().unwrap_or_else(|p| p.into_inner()).push(c.id.clone());
        cmd
    }

    /// Runs `c` in the foreground until its task exits (the container stays, as kubelet keeps
    /// it, until drop); returns the output (exit 137 when OOM-killed).
    pub fn run(&self, c: &mut KubeContainer, image: &str) -> Output {
        self.run_cmd(c, image).output().expect("spawn ctr run")
    }

    /// Starts the pod's sandbox container (detached; deleted on drop like the others).
    pub fn start_sandbox(&self, pod: &mut KubePod, image: &str) {
        run_ok(&mut self.run_cmd(&mut pod.sandbox, image));
    }

    /// Starts `c` in the background (`ctr run` stays attached; its child is returned).
    pub fn spawn(&self, c: &mut KubeContainer, image: &str) -> std::process::Child {
        self.run_cmd(c, image)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ctr run")
    }

    pub fn log(&self) -> String {
        self.service.log()
    }

    /// Deletes the containers run so far (tasks killed first).
    pub fn remove_all(&self) {
        let ids: Vec<String> = std::mem::take(&mut *self.ran.lock().unwrap_or_else(|p| p.into_inner()));
        for id in &ids {
            let _ = self.ctr().args(["tasks", "kill", "-s", "SIGKILL", id]).output();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for id in &ids {
            let _ = self.ctr().args(["tasks", "delete", "-f", id]).output();
            while !self
                .ctr()
                .args(["containers", "delete", id])
                .output()
                .is_ok_and(|o| o.status.success())
                && self
                    .ctr()
                    .args(["containers", "info", id])
                    .output()
                    .is_ok_and(|o| o.status.success())
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.remove_all();
        self.service.stop();
        // The shims outlive the daemon; containers were deleted above, so they exit with it.
        remove_cgroup_tree(&self.cgroup_root);
        // Mounts of the overlay snapshotter may linger under root/ until the shims are gone.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
