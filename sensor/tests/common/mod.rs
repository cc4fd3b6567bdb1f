//! Helpers for integration tests that run the real daemon against the real kernel.
#![allow(dead_code)]

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

pub mod kit;
pub mod manifests;
pub mod netns;
pub mod prom;
pub mod runtimes;
pub mod tls;

// Not every test binary uses every one.
#[allow(unused_imports)]
pub use kit::{
    host::{cap_eff, ci, vmstat_oom_kill},
    lock::KERNEL_LOCK_FILE,
    promtext::plain,
};

pub const SENSOR: &str = env!("CARGO_BIN_EXE_sensor");

/// Privileged tests share the kernel (every daemon sees every OOM kill), so they run one at a
/// time: within a test binary through this mutex, across test binaries and checkouts on the
/// same machine through an flock on [`KERNEL_LOCK_FILE`].
static KERNEL: Mutex<()> = Mutex::new(());

/// Holds the kernel for one test; released on drop.
pub struct KernelGuard {
    _file: std::fs::File,
    _inner: MutexGuard<'static, ()>,
}

pub fn kernel_lock() -> KernelGuard {
    let inner = KERNEL.lock().unwrap_or_else(|p| p.into_inner());
    let file =
        kit::lock::lock_kernel(|| eprintln!("waiting for {KERNEL_LOCK_FILE} (other kernel tests or benches run)"))
            .unwrap_or_else(|e| panic!("{e}"));
    KernelGuard {
        _file: file,
        _inner: inner,
    }
}

fn can_trace() -> bool {
    let eff = cap_eff();
    let has = |c: u32| eff & (1 << c) != 0;
    (has(39) && has(38)) || has(21)
}

/// True when BPF tests can run. Under CI=true a missing privilege fails the test instead of
/// skipping it, so CI can never go green without loading BPF.
pub fn require_bpf(test: &str) -> bool {
    if can_trace() {
        return true;
    }
    require(
        test,
        false,
        "this process cannot load BPF (needs CAP_BPF and CAP_PERFMON, or root)",
    )
}

/// The preamble of every privileged test: `None` (skip) without BPF outside CI, else the guard
/// that keeps kernel-wide tests from overlapping.
pub fn privileged(test: &str) -> Option<KernelGuard> {
    require_bpf(test).then(kernel_lock)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Minimal HTTP/1.0 GET; returns (status, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    get_on(s, "127.0.0.1", path)
}

/// An HTTP/1.0 GET on a connected stream (TCP or unix); returns (status, body).
pub fn get_on(mut s: impl Read + Write, host: &str, path: &str) -> std::io::Result<(u16, String)> {
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    Ok(status_and_body(&raw))
}

/// An HTTP/1 response's status code (0 when there is none) and body.
fn status_and_body(raw: &str) -> (u16, String) {
    let status = raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Value of the series `name{labels}` (labels in any order, all must match exactly).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    kit::promtext::value(text, name, labels)
}

/// Sum over the series of `name` that carry at least `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    kit::promtext::sum(text, name, labels)
}

/// A running `sensor run`, stopped with SIGTERM on `stop()` (or killed on drop).
pub struct Daemon {
    pub child: Option<Child>,
    pub port: u16,
    pub stderr_path: PathBuf,
}

impl Daemon {
    pub fn start(extra: &[&str]) -> Daemon {
        Daemon::start_with_stderr(extra, None)
    }

    /// [`Daemon::start`] with stderr going to `stderr` (e.g. a pipe) instead of the log file
    /// (which then stays empty).
    pub fn start_with_stderr(extra: &[&str], stderr: Option<Stdio>) -> Daemon {
        Daemon::start_with(extra, stderr, &[])
    }

    /// [`Daemon::start_with_stderr`] with extra environment variables (e.g. `RUST_LOG`).
    ///
    /// Unless `extra` sets `--journal.path` or `--journal.enabled`, the daemon's journal is a
    /// fresh directory of its own (removed on drop), so no test sees another's history.
    pub fn start_with(extra: &[&str], stderr: Option<Stdio>, env: &[(&str, &str)]) -> Daemon {
        let port = free_port();
        let stderr_path = std::env::temp_dir().join(format!("sensor-test-{}-{port}.log", std::process::id()));
        let log = std::fs::File::create(&stderr_path).expect("log file");
        let own_journal = !extra
            .iter()
            .any(|a| a.starts_with("--journal.path") || a.starts_with("--journal.enabled"));
        let journal = journal_dir(port);
        let _ = std::fs::remove_dir_all(&journal);
        let child = Command::new(SENSOR)
            .args(["run", "--listen", &format!("127.0.0.1:{port}")])
            .args(if own_journal {
                vec!["--journal.path".to_string(), journal.display().to_string()]
            } else {
                Vec::new()
            })
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(stderr.unwrap_or_else(|| log.into()))
            .spawn()
            .expect("spawn sensor");
        let mut d = Daemon {
            child: Some(child),
            port,
            stderr_path,
        };
        d.wait_ready(Duration::from_secs(30));
        d
    }

    fn wait_ready(&mut self, limit: Duration) {
        let start = Instant::now();
        loop {
            if let Ok((200, _)) = http_get(self.port, "/readyz") {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                panic!("sensor exited early with {st}:\n{}", self.log());
            }
            assert!(
                start.elapsed() < limit,
                "sensor not ready after {limit:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn metrics(&self) -> String {
        let (code, body) = http_get(self.port, "/metrics").expect("scrape");
        assert_eq!(code, 200);
        body
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.port, path).expect("http get")
    }

    /// Polls `/metrics` until `name{labels}` equals `want`; returns the last scrape.
    pub fn wait_metric(&self, name: &str, labels: &[(&str, &str)], want: f64, limit: Duration) -> String {
        self.wait_metric_or_explain(name, labels, want, limit, String::new)
    }

    /// Polls `/metrics` until the sum of the series of `name` carrying at least `labels` equals
    /// `want` (for families with labels the test does not pin, e.g. the OOM `reason`).
    pub fn wait_metric_sum(&self, name: &str, labels: &[(&str, &str)], want: f64, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            let m = self.metrics();
            if metric_sum(&m, name, labels) == want {
                return m;
            }
            if start.elapsed() > limit {
                panic!(
                    "sum of {name}{labels:?} = {}, want {want} after {limit:?}\n--- metrics ---\n{m}\n--- log ---\n{}",
                    metric_sum(&m, name, labels),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// [`Daemon::wait_metric`], whose panic also carries `explain()` (e.g. the kernel's side).
    pub fn wait_metric_or_explain(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        want: f64,
        limit: Duration,
        explain: impl Fn() -> String,
    ) -> String {
        let start = Instant::now();
        loop {
            let m = self.metrics();
            if metric(&m, name, labels) == Some(want) {
                return m;
            }
            if start.elapsed() > limit {
                panic!(
                    "{name}{labels:?} = {:?}, want {want} after {limit:?}\n{}--- metrics ---\n{m}\n--- log ---\n{}",
                    metric(&m, name, labels),
                    explain(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Events with `seq > since` from `/api/v1/events`.
    pub fn events(&self, since: u64) -> Vec<serde_json::Value> {
        let (code, body) = self.get(&format!("/api/v1/events?since={since}"));
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("events JSON")
    }

    /// OOM-kill events with `seq > since` (other event types, e.g. pressure, are skipped).
    pub fn oom_events(&self, since: u64) -> Vec<serde_json::Value> {
        self.events(since)
            .into_iter()
            .filter(|e| e["type"] == "oom_kill")
            .collect()
    }

    /// Sum of every series of `name` whose labels include `labels`.
    pub fn metric_sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics(), name, labels)
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        terminate(&mut child, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("sensor did not exit within 20s of SIGTERM:\n{}", self.log()))
    }
}

/// SIGTERM to `child`, then its exit status once it exits; after `limit`, SIGKILL (waited for)
/// and `None`.
pub fn terminate(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    // SAFETY: kill(2) on our own child's pid with a valid signal number.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(journal_dir(self.port));
    }
}

/// The journal directory [`Daemon::start_with`] gives a daemon on `port`.
pub fn journal_dir(port: u16) -> PathBuf {
    std::env::temp_dir().join(format!("sensor-test-journal-{}-{port}", std::process::id()))
}

pub fn run_sensor(args: &[&str]) -> Output {
    Command::new(SENSOR).args(args).output().expect("run sensor")
}

/// A child memory cgroup under this process's own (the kit's [`kit::cgroup::Cgroup`]), removed
/// on drop, with what the tests do in it.
pub struct MemCgroup(kit::cgroup::Cgroup);

impl std::ops::Deref for MemCgroup {
    type Target = kit::cgroup::Cgroup;
    fn deref(&self) -> &kit::cgroup::Cgroup {
        &self.0
    }
}

impl MemCgroup {
    /// `name`, made unique to this process, with memory limit `limit_bytes` and no swap.
    pub fn new(name: &str, limit_bytes: u64) -> MemCgroup {
        let unique = format!("{name}-{}", std::process::id());
        MemCgroup(kit::cgroup::Cgroup::under_own(&unique, Some(limit_bytes)).unwrap_or_else(|e| panic!("{e}")))
    }

    /// A child of `parent` named exactly `name` (e.g. a 64-hex container id), with its own
    /// limit; drop it before its parent.
    pub fn child(parent: &MemCgroup, name: &str, limit_bytes: u64) -> MemCgroup {
        MemCgroup(
            parent
                .0
                .child(name, Some(limit_bytes))
                .unwrap_or_else(|e| panic!("{e}")),
        )
    }

    /// The workload labels its series carry (a plain cgroup: no container, no names), in
    /// `WORKLOAD_LABELS` order.
    pub fn workload_labels(&self) -> [(&'static str, &str); 6] {
        [
            ("cgroup", self.rel.as_str()),
            ("container_id", ""),
            ("pod_uid", ""),
            ("namespace", ""),
            ("pod", ""),
            ("container", ""),
        ]
    }

    /// The labels of a memcg OOM kill in it on `sensor_oom_kills_total` (the reason aside).
    pub fn kill_labels(&self) -> [(&'static str, &str); 7] {
        let [a, b, c, d, e, f] = self.workload_labels();
        [("scope", "memcg"), a, b, c, d, e, f]
    }

    /// Runs `argv` inside the cgroup (optionally inside network namespace `netns`) and returns
    /// its output.
    pub fn exec(&self, netns: Option<&str>, argv: &[&str], env: &[(&str, String)]) -> std::process::Output {
        // Join the cgroup first: `ip netns exec` remounts /sys for the namespace.
        let mut full: Vec<&str> = match netns {
            Some(ns) => vec!["ip", "netns", "exec", ns],
            None => Vec::new(),
        };
        full.extend_from_slice(argv);
        let mut cmd = self.command(&full);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("exec in cgroup")
    }

    /// Runs a shell script inside the cgroup and waits for it.
    pub fn run(&self, script: &str) -> std::process::ExitStatus {
        self.command(&["sh", "-c", script]).status().expect("run in cgroup")
    }

    /// Pushes `mb` MiB of file data through the page cache from inside the cgroup, which makes
    /// the kernel reclaim once the cache exceeds the limit.
    pub fn churn_page_cache(&self, mb: u32) {
        let f = format!(
            "/var/tmp/sensor-churn-{}-{}",
            std::process::id(),
            self.dir.file_name().unwrap().to_string_lossy()
        );
        let st = self.run(&format!(
            "head -c {mb}M /dev/zero > {f} && cat {f} > /dev/null; rm -f {f}"
        ));
        assert!(st.success(), "churn failed: {st}");
    }

    /// A v1/v2 file of this cgroup as u64 (`key` picks a `key value` line).
    pub fn read_value(&self, file: &str, key: Option<&str>) -> u64 {
        let text = std::fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        match key {
            None => text.trim().parse().unwrap_or(0),
            Some(k) => text
                .lines()
                .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix(' ')))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0),
        }
    }

    /// Starts `python3 -c script` inside the cgroup (output discarded).
    pub fn spawn_python(&self, script: &str) -> Child {
        self.command(&["python3", "-c", script]).spawn().expect("python3")
    }

    /// Runs `tail /dev/zero` (which buffers without bound) inside the cgroup until the kernel
    /// kills it; returns its pid after checking it died of SIGKILL.
    pub fn cause_oom_kill(&self) -> u32 {
        let mut child = self.command(&["tail", "/dev/zero"]).spawn().expect("spawn allocator");
        let pid = child.id();
        let st = child.wait().expect("wait allocator");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            st.signal(),
            Some(libc::SIGKILL),
            "allocator should be OOM-killed, got {st}"
        );
        pid
    }
}

/// One probe's report in `/api/v1/probes` (or `sensor doctor --json`'s `probes`).
pub fn probe_report<'a>(probes: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    probes
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["probe"] == name))
        .unwrap_or_else(|| panic!("no {name} probe in {probes}"))
}

/// Minimal HTTP/1.0 request with an optional body and extra header lines; returns (status,
/// body).
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[&str],
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    request_on(s, method, path, headers, body)
}

/// [`http_request`] on a connected stream (plain or TLS). The answer ends where the server
/// closes; a close without TLS close_notify after the answer arrived is an ordinary end.
pub fn request_on(
    mut s: impl Read + Write,
    method: &str,
    path: &str,
    headers: &[&str],
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    if let Some(b) = body {
        s.write_all(b.as_bytes())?;
    }
    let mut raw = Vec::new();
    match s.read_to_end(&mut raw) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e),
    }
    Ok(status_and_body(&String::from_utf8_lossy(&raw)))
}

/// True when `bin` runs; else fails under CI=true (CI must not go green without it) or prints
/// why the test is skipped.
pub fn require_tool(bin: &str, how: &str) -> bool {
    let ok = Command::new(bin).arg("--version").output().is_ok();
    require("", ok, &format!("{bin} is missing ({how})"))
}

/// The one rule for what a test needs: `true` when `ok`; else, under CI=true, the test fails
/// (CI never goes green without what it needs), and elsewhere it is reported skipped with
/// `missing` and `false` returned. `test` names it where the thread has no test's name.
pub fn require(test: &str, ok: bool, missing: &str) -> bool {
    if ok {
        return true;
    }
    let test = if test.is_empty() { "main" } else { test };
    if ci() {
        let name = std::thread::current().name().unwrap_or(test).to_string();
        panic!("{name}: CI=true but {missing}; `cargo xtask test` and .ci/run install and prepare what tests need");
    }
    skip_named(test, missing);
    false
}

/// Reports that the running test cannot run here and returns without asserting anything:
/// `SKIP <test>: <reason>` on stderr, and a `<test>\t<reason>` line appended to the file
/// `SENSOR_SKIP_LOG` names, so `cargo xtask test` counts it as skipped, not passed. The test
/// is the one of the calling thread (libtest names each test's thread after it).
pub fn skip(reason: &str) {
    let name = std::thread::current().name().unwrap_or("main").to_string();
    skip_named(&name, reason);
}

/// [`skip`] for a test named by the caller (libtest's thread name when it has one).
pub fn skip_named(test: &str, reason: &str) {
    let name = match std::thread::current().name() {
        Some(n) if n != "main" => n.to_string(),
        _ => test.to_string(),
    };
    eprintln!("SKIP {name}: {reason}");
    let Some(path) = std::env::var_os("SENSOR_SKIP_LOG") else {
        return;
    };
    // One write of one line with O_APPEND: test binaries running at once do not interleave.
    let line = format!("{name}\t{}\n", reason.replace(['\t', '\n'], " "));
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("cannot record the skip in {}: {e}", Path::new(&path).display());
    }
}

/// A server process on a loopback port (Prometheus, Alertmanager, `sensor remediate`), its
/// stderr and stdout in `log`; killed on drop.
pub struct Service {
    pub name: String,
    pub child: Option<Child>,
    pub port: u16,
    pub log: PathBuf,
}

impl Service {
    /// Spawns `cmd` and waits until GET `ready` answers 200.
    pub fn start(name: &str, cmd: Command, port: u16, ready: &str, log: PathBuf) -> Service {
        let mut s = Service::spawn(name, cmd, port, log);
        s.wait_ready(ready);
        s
    }

    /// Spawns `cmd` without waiting (see [`Service::wait_until`]).
    pub fn spawn(name: &str, mut cmd: Command, port: u16, log: PathBuf) -> Service {
        let f = std::fs::File::create(&log).expect("log file");
        let child = cmd
            .stdout(f.try_clone().expect("log fd"))
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Service {
            name: name.to_string(),
            child: Some(child),
            port,
            log,
        }
    }

    pub fn wait_ready(&mut self, ready: &str) {
        self.wait_until(|port| matches!(http_get(port, ready), Ok((200, _))));
    }

    /// Waits (30 s at most) until `ready(port)`; panics with the log when the process exits.
    pub fn wait_until(&mut self, ready: impl Fn(u16) -> bool) {
        let start = Instant::now();
        loop {
            if ready(self.port) {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                panic!("{} exited with {st}:\n{}", self.name, self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{} not ready:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then SIGKILL after 20 s; returns once it has exited.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = terminate(&mut c, Duration::from_secs(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sets `SO_LINGER` 0 on `c`: its close sends RST and leaves no TIME_WAIT, so connect loops
/// cannot run out of ports.
pub fn close_with_rst(c: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
}

/// A python program that holds `rate_mib_s` MiB more every second, paced by the clock (not by
/// sleeps), until it is killed: a steady leak.
pub fn leak_script(rate_mib_s: f64) -> String {
    format!(
        r#"
import time
rate = {rate_mib_s} * 1024 * 1024
chunk = 256 * 1024
held = []
t0 = time.monotonic()
while True:
    want = int((time.monotonic() - t0) * rate / chunk)
    while len(held) < want:
        held.append(b"x" * chunk)
    time.sleep(0.02)
"#
    )
}
