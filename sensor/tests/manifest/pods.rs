//! Running the pod: the image, readiness asked the way kubelet asks it, the Podman pod.

use super::*;

/// The image deploy/Dockerfile builds from target/dist/amd64 (what `cargo xtask dist --out
/// target/dist/amd64` wrote; CI runs it before the tests; the builder's TARGETARCH is the
/// host's), under a tag of its own so other checkouts' images are not touched.
pub(crate) const IMAGE: &str = "localhost/sensor:manifest-test";

pub(crate) fn image() -> Option<&'static str> {
    static BUILT: OnceLock<()> = OnceLock::new();
    let dist = root().join("target/dist/amd64/sensor");
    let missing = format!(
        "{} is missing (`cargo xtask dist --out target/dist/amd64` builds it; .ci/run does)",
        dist.display()
    );
    if !require("", dist.is_file(), &missing) {
        return None;
    }
    BUILT.get_or_init(|| {
        run_ok(
            podman()
                .args(["build", "-q", "-f", "deploy/Dockerfile", "-t", IMAGE, "."])
                .current_dir(root()),
        );
    });
    Some(IMAGE)
}

/// `(status, body)` of GET `path` on `port` inside the network namespace of `pid` (one thread
/// enters it for the request and ends).
pub(crate) fn http_in_netns(pid: u32, port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    let path = path.to_string();
    std::thread::spawn(move || {
        // SAFETY: setns(2) with a descriptor we own; it moves only this thread, which ends
        // after the request.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        http_get(port, &path)
    })
    .join()
    .expect("netns thread")
}

/// One running sensor container, whichever runtime started it.
pub(crate) trait Pod {
    /// The container's init pid on the host, `None` once it has exited.
    fn pid(&self) -> Option<u32>;
    fn logs(&self) -> String;
    fn port(&self) -> u16;

    fn get(&self, path: &str) -> (u16, String) {
        let pid = self
            .pid()
            .unwrap_or_else(|| panic!("the sensor container is gone:\n{}", self.logs()));
        http_in_netns(pid, self.port(), path).unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.logs()))
    }

    fn metrics(&self) -> String {
        let (code, body) = self.get("/metrics");
        assert_eq!(code, 200, "{body}");
        body
    }

    /// Polls `/metrics` until the sum of `name` over series with `labels` is `want`.
    fn wait_sum(&self, name: &str, labels: &[(&str, &str)], want: f64) -> String {
        let start = Instant::now();
        loop {
            let m = self.metrics();
            if metric_sum(&m, name, labels) == want {
                return m;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{name}{labels:?} = {}, want {want}\n--- metrics ---\n{m}\n--- logs ---\n{}",
                metric_sum(&m, name, labels),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Waits for the readiness probe within the startup probe's budget; panics with the logs when
/// the container exits first.
/// A kubelet-style container (pod shop/cart-7f9c, container cart) with a 16 MiB limit that
/// reads /dev/zero into memory until the kernel kills it.
pub(crate) fn cart_victim() -> KubeContainer {
    KubeContainer::new(
        "shop",
        "cart-7f9c",
        "cart",
        16 << 20,
        &[runtimes::BUSYBOX, "tail", "/dev/zero"],
    )
}

/// `/proc/<pid>/status` of the pod's sensor once it is ready: its seccomp and privilege state.
pub(crate) fn ready_status(pod: &dyn Pod, run: &PodRun) -> String {
    wait_ready(pod, run);
    let pid = pod.pid().expect("a ready pod has a process");
    std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the sensor's /proc status")
}

pub(crate) fn wait_ready(pod: &dyn Pod, run: &PodRun) {
    let start = Instant::now();
    loop {
        let Some(pid) = pod.pid() else {
            panic!("the sensor container exited before it was ready:\n{}", pod.logs());
        };
        if let Ok((200, _)) = http_in_netns(pid, run.ready_port, &run.ready_path) {
            return;
        }
        assert!(
            start.elapsed() < run.startup,
            "not ready within the startup probe's {:?}:\n{}",
            run.startup,
            pod.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) struct PodmanPod {
    pub(crate) name: String,
    pub(crate) port: u16,
}

impl PodmanPod {
    /// `podman run -d` of the image with the template's options and args, plus `extra` args.
    pub(crate) fn start(run: &PodRun, name: &str, extra: &[&str]) -> PodmanPod {
        runtimes::podman_rm(&[name]);
        run_ok(
            podman()
                .args(["run", "-d", "--name", name])
                .args(run.podman_args())
                .arg(IMAGE)
                .args(&run.args)
                .args(extra),
        );
        PodmanPod {
            name: name.to_string(),
            port: run.ready_port,
        }
    }

    /// Waits for the container to exit; its exit code.
    pub(crate) fn wait_exit(&self) -> i32 {
        let out = run_ok(podman().args(["wait", &self.name]));
        out.trim().parse().unwrap_or_else(|_| panic!("podman wait: {out}"))
    }

    pub(crate) fn inspect(&self, format: &str) -> String {
        let out = podman()
            .args(["inspect", "--format", format, &self.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Pod for PodmanPod {
    fn pid(&self) -> Option<u32> {
        self.inspect("{{.State.Pid}}").parse().ok().filter(|p| *p != 0)
    }
    fn logs(&self) -> String {
        podman()
            .args(["logs", &self.name])
            .output()
            .map(|o| text(&o))
            .unwrap_or_default()
    }
    fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for PodmanPod {
    fn drop(&mut self) {
        let _ = podman().args(["stop", "-t", "20", &self.name]).output();
        runtimes::podman_rm(&[&self.name]);
    }
}
