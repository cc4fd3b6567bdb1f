//! `cargo xtask bench workloads`: what naming workloads through the container runtimes costs,
//! against real podman (its Docker API service) and a private containerd:
//!
//! - lookup latency per runtime (p50/p99), from the daemon's own per-answer debug lines;
//! - daemon CPU per lookup and memory per cached workload: the same daemon and the same
//!   `--cached` container cgroups twice, once with the runtimes configured and once without
//!   (the anchor), and the difference divided by the lookups / names;
//! - the share of OOM kills named in a churn of `--churn` kubelet-style containers, each
//!   OOM-killed right after it starts.
//!
//! Self-contained (its own runtime harness); prints a Markdown report on stdout. Takes the
//! machine-wide kernel lock of the tests (OOM kills, BPF).

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::bench::report::{Goal, Row};
use crate::kit::ids::{pod_uid, random_hex};
use crate::net::{free_port, http_get, loopback, stop_child};

const IMAGE: &str = "localhost/sensor-victim:busybox";

#[derive(clap::Args, Debug, Clone)]
pub struct Opts {
    /// Containers created (not started) whose cgroups the daemon discovers and names, for
    /// latency, CPU and memory; a quarter of them podman's, the rest containerd's.
    #[arg(long = "workloads-cached", default_value_t = 400)]
    pub cached: usize,
    /// Kubelet-style containers started and OOM-killed one after the other.
    #[arg(long = "workloads-churn", default_value_t = 200)]
    pub churn: usize,
    /// Seconds each of the two daemons runs after the cgroups appear.
    #[arg(long = "workloads-window", default_value_t = 20.0)]
    pub window: f64,
}

impl Opts {
    pub fn quick(&mut self) {
        self.cached = 40;
        self.churn = 10;
        self.window = 5.0;
    }
}

fn out(cmd: &mut Command) -> Result<String> {
    let o = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    if !o.status.success() {
        bail!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Everything the benchmark started, undone on drop.
struct Env {
    dir: PathBuf,
    conf: PathBuf,
    containerd: Option<Child>,
    podman: Option<Child>,
    ctrd_ids: Vec<String>,
    podman_names: Vec<String>,
    cgroup_root: String,
}

impl Env {
    fn podman(&self) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", &self.conf);
        c
    }

    fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("-a").arg(self.dir.join("containerd.sock")).args(["-n", "k8s.io"]);
        c
    }

    fn start() -> Result<Env> {
        let tag = format!("bench-workloads-{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("sensor-{tag}"));
        std::fs::create_dir_all(&dir)?;
        let conf = dir.join("containers.conf");
        std::fs::write(
            &conf,
            "[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = \"runc\"\n",
        )?;
        let mut env = Env {
            dir,
            conf,
            containerd: None,
            podman: None,
            ctrd_ids: Vec::new(),
            podman_names: Vec::new(),
            cgroup_root: format!("/sensor-{tag}"),
        };
        // The victim image, FROM scratch around the static busybox.
        let ctx = env.dir.join("image");
        std::fs::create_dir_all(&ctx)?;
        std::fs::copy("/bin/busybox", ctx.join("busybox")).context("/bin/busybox (busybox-static)")?;
        std::fs::write(ctx.join("Containerfile"), "FROM scratch\nCOPY busybox /bin/busybox\n")?;
        out(env.podman().args(["build", "-q", "-t", IMAGE]).arg(&ctx))?;
        // containerd, private.
        let d = env.dir.display().to_string();
        std::fs::write(
            env.dir.join("containerd.toml"),
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{d}/containerd.sock\"\n[ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n\
                 [debug]\n  address = \"{d}/debug.sock\"\n"
            ),
        )?;
        let log = std::fs::File::create(env.dir.join("containerd.log"))?;
        env.containerd = Some(
            Command::new("containerd")
                .arg("--config")
                .arg(env.dir.join("containerd.toml"))
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("containerd (Debian containerd)")?,
        );
        wait_for("containerd", || {
            env.ctr().arg("version").output().is_ok_and(|o| o.status.success())
        })?;
        let archive = env.dir.join("image.tar");
        out(env
            .podman()
            .args(["save", "--format", "oci-archive", "-o"])
            .arg(&archive)
            .arg(IMAGE))?;
        out(env.ctr().args(["images", "import"]).arg(&archive))?;
        // podman's Docker API.
        let sock = env.dir.join("podman.sock");
        let log = std::fs::File::create(env.dir.join("podman.log"))?;
        env.podman = Some(
            env.podman()
                .args(["system", "service", "--time", "0"])
                .arg(format!("unix://{}", sock.display()))
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?,
        );
        wait_for("podman system service", || ping(&sock))?;
        Ok(env)
    }

    /// Creates `n` containers without starting them (3/4 containerd, 1/4 podman); their ids.
    fn create(&mut self, n: usize) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        for i in 0..n {
            if i % 4 == 3 {
                let name = format!("sensor-bench-{}-{i}", std::process::id());
                let id = out(self
                    .podman()
                    .args(["create", "--name", &name, IMAGE, "/bin/busybox", "true"]))?;
                self.podman_names.push(name);
                ids.push(id);
            } else {
                let id = random_hex(32);
                out(self
                    .ctr()
                    .args(["containers", "create"])
                    .args(kube_labels("bench", &format!("cached-{i}"), "app"))
                    .arg(IMAGE)
                    .arg(&id))?;
                self.ctrd_ids.push(id.clone());
                ids.push(id);
            }
        }
        Ok(ids)
    }

    fn memory_root() -> PathBuf {
        let v1 = Path::new("/sys/fs/cgroup/memory");
        if v1.join("memory.limit_in_bytes").exists() {
            v1.to_path_buf()
        } else {
            PathBuf::from("/sys/fs/cgroup")
        }
    }

    /// One memory cgroup per id under this run's root (what a runtime would create).
    fn make_cgroups(&self, ids: &[String]) -> Result<()> {
        let top = Env::memory_root()
            .join(self.cgroup_root.trim_start_matches('/'))
            .join("cached");
        std::fs::create_dir_all(&top)?;
        for id in ids {
            std::fs::create_dir(top.join(id)).with_context(|| format!("mkdir {id}"))?;
        }
        Ok(())
    }

    fn remove_cgroups(&self) {
        crate::kit::host::remove_cgroup_tree(&self.cgroup_root);
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for id in &self.ctrd_ids {
            let _ = self.ctr().args(["tasks", "delete", "-f", id]).output();
            let _ = self.ctr().args(["containers", "delete", id]).output();
        }
        if !self.podman_names.is_empty() {
            let _ = self.podman().args(["rm", "-f", "-i"]).args(&self.podman_names).output();
        }
        for c in [self.podman.take(), self.containerd.take()].into_iter().flatten() {
            stop_child(c, libc::SIGTERM);
        }
        self.remove_cgroups();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn kube_labels(ns: &str, pod: &str, container: &str) -> Vec<String> {
    [
        format!("io.kubernetes.pod.namespace={ns}"),
        format!("io.kubernetes.pod.name={pod}"),
        format!("io.kubernetes.container.name={container}"),
    ]
    .into_iter()
    .flat_map(|l| ["--label".to_string(), l])
    .collect()
}

fn ping(sock: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(sock) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /_ping HTTP/1.0\r\nHost: x\r\n\r\n").is_err() {
        return false;
    }
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200")
}

fn wait_for(what: &str, ok: impl Fn() -> bool) -> Result<()> {
    let start = Instant::now();
    while !ok() {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("{what} not ready after 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// A running daemon with its stderr (JSON log lines) in a file.
struct Daemon {
    child: Option<Child>,
    port: u16,
}

impl Daemon {
    fn start(sensor: &Path, dir: &Path, name: &str, config: &str) -> Result<Daemon> {
        let cfg = dir.join(format!("{name}.yaml"));
        std::fs::write(&cfg, config)?;
        let port = free_port()?;
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(sensor)
            .args([
                "--log-format",
                "json",
                "run",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--config",
            ])
            .arg(&cfg)
            .env("RUST_LOG", "info,sensor::workloads::lookup=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let d = Daemon {
            child: Some(child),
            port,
        };
        wait_for("sensor", || matches!(http_get(loopback(port), "/readyz"), Ok((200, _))))?;
        Ok(d)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn metrics(&self) -> Result<String> {
        Ok(http_get(loopback(self.port), "/metrics")?.1)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            stop_child(c, libc::SIGTERM);
        }
    }
}

fn proc_field(pid: u32, key: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{key} of {pid}"))
}

fn cpu_seconds(pid: u32) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = text.rsplit_once(')').map(|(_, r)| r).context("stat")?;
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(f.iter().sum::<u64>() as f64 / tck)
}

/// Sum of the series of `name` whose line contains every `needle`.
fn sum(metrics: &str, name: &str, needles: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// What one daemon run over the cached containers measured.
struct Run {
    rss_delta_kib: f64,
    cpu: f64,
    lookups: f64,
    named: f64,
    /// (runtime, result, seconds) per answer.
    answers: Vec<(String, String, f64)>,
}

fn cached_run(env: &Env, sensor: &Path, ids: &[String], runtimes: &str, name: &str, window: f64) -> Result<Run> {
    let config = format!(
        "probes:\n  memcg: {{discovery_interval: 200ms}}\nworkloads:\n  runtimes: {runtimes}\n  lookup_timeout: 2s\n  cache_size: 10000\n"
    );
    let d = Daemon::start(sensor, &env.dir, name, &config)?;
    std::thread::sleep(Duration::from_secs(3));
    let (rss0, cpu0) = (proc_field(d.pid(), "VmRSS:")?, cpu_seconds(d.pid())?);
    env.make_cgroups(ids)?;
    std::thread::sleep(Duration::from_secs_f64(window));
    let (rss1, cpu1) = (proc_field(d.pid(), "VmRSS:")?, cpu_seconds(d.pid())?);
    let m = d.metrics()?;
    drop(d);
    env.remove_cgroups();
    let log = std::fs::read_to_string(env.dir.join(format!("{name}.log")))?;
    let answers = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "sensor::workloads::lookup")
        // Container lookups (a pod's sandbox read is logged there too, `of="sandbox"`).
        .filter(|v| v["fields"]["of"] != "sandbox")
        .filter_map(|v| {
            let f = &v["fields"];
            Some((
                f["runtime"].as_str()?.to_string(),
                f["result"].as_str()?.to_string(),
                f["seconds"].as_f64()?,
            ))
        })
        .collect();
    Ok(Run {
        rss_delta_kib: rss1 as f64 - rss0 as f64,
        cpu: cpu1 - cpu0,
        lookups: sum(&m, "sensor_workload_lookups_total", &[]),
        named: sum(&m, "sensor_workload_info", &[]),
        answers,
    })
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Kubelet-style containers, each OOM-killed right after it starts; (kills, named).
fn churn(env: &mut Env, sensor: &Path, n: usize) -> Result<(f64, f64)> {
    let sock = env.dir.join("containerd.sock");
    let config = format!(
        "workloads:\n  runtimes: [{{kind: containerd, socket: {}, namespaces: [k8s.io]}}]\n",
        sock.display()
    );
    let d = Daemon::start(sensor, &env.dir, "churn", &config)?;
    for i in 0..n {
        let id = random_hex(32);
        let cgroup = format!("{}/kubepods/burstable/pod{}/{id}", env.cgroup_root, pod_uid());
        env.ctrd_ids.push(id.clone());
        let o = env
            .ctr()
            .args([
                "run",
                "--runtime",
                "io.containerd.runc.v2",
                "--cgroup",
                &cgroup,
                "--memory-limit",
                "33554432",
            ])
            .args(kube_labels("churn", &format!("victim-{i}"), "victim"))
            .arg(IMAGE)
            .arg(&id)
            .args(["/bin/busybox", "tail", "/dev/zero"])
            .output()?;
        if o.status.code() != Some(137) {
            bail!("container {i} was not OOM-killed: {o:?}");
        }
    }
    // Every kill counted (under the churn's cgroup root), then how many carry their names.
    let root = format!("cgroup=\"{}/", env.cgroup_root);
    let start = Instant::now();
    loop {
        let m = d.metrics()?;
        let kills = sum(&m, "sensor_oom_kills_total", &[&root]);
        if kills >= n as f64 || start.elapsed() > Duration::from_secs(30) {
            let named = sum(
                &m,
                "sensor_oom_kills_total",
                &[&root, "namespace=\"churn\"", "container=\"victim\""],
            );
            return Ok((kills, named));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs the benchmark with the `sensor` binary (a release build) and prints the report.
pub fn run(root: &Path, sensor: &Path, o: &Opts) -> Result<()> {
    use std::fmt::Write as _;
    let machine = crate::bench::report::machine();
    eprintln!("{machine}");
    let mut md = String::new();
    let _lock = crate::bench::kit::KernelLock::acquire("bench workloads")?;
    let mut env = Env::start()?;
    let ids = env.create(o.cached)?;
    let anchor = cached_run(&env, sensor, &ids, "[]", "anchor", o.window)?;
    let rts = format!(
        "[{{kind: containerd, socket: {}, namespaces: [k8s.io]}}, {{kind: docker, socket: {}}}]",
        env.dir.join("containerd.sock").display(),
        env.dir.join("podman.sock").display()
    );
    let named = cached_run(&env, sensor, &ids, &rts, "named", o.window)?;
    let (kills, named_kills) = churn(&mut env, sensor, o.churn)?;

    writeln!(
        md,
        "{} containers created (3/4 containerd, 1/4 podman), their cgroups made at once; the daemon \
         (discovery every 200 ms) named {} of them with {} lookups in {} s.\n",
        ids.len(),
        named.named,
        named.lookups,
        o.window
    )?;
    writeln!(md, "| runtime | answer | lookups | p50 | p99 |\n|---|---|---|---|---|")?;
    let mut keys: Vec<(String, String)> = named.answers.iter().map(|(r, s, _)| (r.clone(), s.clone())).collect();
    keys.sort();
    keys.dedup();
    for (rt, res) in keys {
        let mut v: Vec<f64> = named
            .answers
            .iter()
            .filter(|(r, s, _)| *r == rt && *s == res)
            .map(|a| a.2)
            .collect();
        let n = v.len();
        let (p50, p99) = (percentile(&mut v, 0.5), percentile(&mut v, 0.99));
        writeln!(md, "| {rt} | {res} | {n} | {:.2} ms | {:.2} ms |", p50 * 1e3, p99 * 1e3)?;
    }
    let cpu_per_lookup = (named.cpu - anchor.cpu) / named.lookups.max(1.0);
    let bytes_per_name = (named.rss_delta_kib - anchor.rss_delta_kib) * 1024.0 / named.named.max(1.0);
    writeln!(md,
        "\n| measure | value |\n|---|---|\n\
         | daemon CPU per lookup (named run minus anchor run without runtimes, same cgroups) | {:.3} ms ({:.3} s vs {:.3} s) |\n\
         | memory per cached workload (RSS growth, named minus anchor) | {:.0} bytes ({:.0} KiB vs {:.0} KiB) |\n\
         | kills named in a churn of {} kubelet-style containers, each OOM-killed at start | {} of {} ({:.1}%) |",
        cpu_per_lookup * 1e3,
        named.cpu,
        anchor.cpu,
        bytes_per_name,
        named.rss_delta_kib,
        anchor.rss_delta_kib,
        o.churn,
        named_kills,
        kills,
        100.0 * named_kills / kills.max(1.0)
    )?;
    let share = 100.0 * named_kills / kills.max(1.0);
    let rows = [
        Row::measured(
            &format!("kills named in a churn of {} containers", o.churn),
            share,
            "%",
            1,
            "-",
            Goal::AtLeast(100.0),
            "100%",
        ),
        Row::measured(
            "daemon CPU per runtime lookup",
            cpu_per_lookup * 1e3,
            " ms",
            3,
            "-",
            Goal::None,
            "-",
        ),
        Row::measured(
            "memory per cached workload name",
            bytes_per_name,
            " B",
            0,
            "-",
            Goal::None,
            "-",
        ),
    ];
    print!("{md}");
    crate::bench::report::store(root, "workloads", &machine, &rows, &md)
}
