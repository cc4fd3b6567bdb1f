//! What the daemon benchmarks share: the machine-wide kernel lock, the daemon and
//! node_exporter as child processes, /proc readings, and real workload cgroups (each a process
//! that joins its own memory cgroup, makes one loopback connect and charges memory).

use std::{
    ffi::CString,
    io::ErrorKind,
    net::{SocketAddr, TcpListener},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    kit::cgroup::Cgroup,
    net::{free_port, http_get, loopback, stop_child},
};

pub use crate::kit::lock::KERNEL_LOCK_FILE;

/// The kernel lock of the tests (the shared kit's), held for one benchmark or soak; released
/// when dropped.
pub struct KernelLock(#[allow(dead_code)] std::fs::File);

impl KernelLock {
    pub fn acquire(what: &str) -> Result<KernelLock> {
        let lock = KERNEL_LOCK_FILE;
        let t = Instant::now();
        let mut waited = false;
        let file = crate::kit::lock::lock_kernel(|| {
            waited = true;
            eprintln!("==> {what}: waiting for {lock} (other kernel tests or benchmarks run)");
        })?;
        if waited {
            eprintln!("==> {what}: got the lock after {:.0} s", t.elapsed().as_secs_f64());
        }
        Ok(KernelLock(file))
    }
}

// ---------------------------------------------------------------------------------------------
// /proc

pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime in seconds from a /proc/.../stat file.
pub fn cpu_seconds(stat: &str) -> Result<f64> {
    cpu_split(stat).map(|(u, s)| u + s)
}

/// (utime, stime) in seconds from a /proc/.../stat file.
pub fn cpu_split(stat: &str) -> Result<(f64, f64)> {
    let text = std::fs::read_to_string(stat).with_context(|| format!("read {stat}"))?;
    // The command name may contain spaces and parentheses; the fields follow the last ')'.
    let rest = text.rsplit_once(')').map(|(_, r)| r).context("malformed stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let num = |i: usize| -> Result<u64> {
        f.get(i)
            .context("short stat")?
            .parse::<u64>()
            .with_context(|| format!("{stat}: field {}", i + 3))
    };
    Ok((num(11)? as f64 / clk_tck(), num(12)? as f64 / clk_tck()))
}

pub fn pid_cpu(pid: u32) -> Result<f64> {
    cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// VmRSS and VmHWM in KiB.
pub fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let field = |key: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {key} in {path}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Resident KiB per kind of mapping from /proc/PID/smaps ([heap], anonymous mappings (glibc's
/// thread arenas, stacks of threads), [stack], each file by name), largest first.
pub fn smaps_breakdown(pid: u32) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut by: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    let mut current = String::new();
    for l in text.lines() {
        let mut f = l.split_whitespace();
        let first = f.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: address perms offset dev inode [path]
            let path = f.nth(4).unwrap_or("");
            current = match path {
                "" => "anonymous (arenas, thread stacks)".into(),
                p if p.starts_with('[') => p.to_string(),
                p => Path::new(p)
                    .file_name()
                    .map_or(p.to_string(), |n| n.to_string_lossy().into_owned()),
            };
        } else if first == "Rss:" {
            *by.entry(current.clone()).or_default() += f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    let mut v: Vec<(String, u64)> = by.into_iter().filter(|x| x.1 > 0).collect();
    v.sort_by_key(|b| std::cmp::Reverse(b.1));
    v
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The 1-minute load average: other work on the machine widens the spread of the rounds.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

pub fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

pub fn command_text(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s
        })
        .unwrap_or_default()
}

pub use crate::kit::promtext::{series_count, sum as metric_sum};

// ---------------------------------------------------------------------------------------------
// Processes

pub fn wait_http_ok(addr: SocketAddr, path: &str, child: &mut Child, what: &str) -> Result<()> {
    let t = Instant::now();
    loop {
        if matches!(http_get(addr, path), Ok((200, _))) {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("{what} exited with {status} before it was ready");
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("{what} did not answer {path} with 200 within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child serving HTTP on loopback (`sensor run`, node_exporter), stopped on drop.
pub struct Served {
    child: Option<Child>,
    pub addr: SocketAddr,
}

impl Served {
    /// Starts `cmd` (which must listen on `addr`) and waits for `ready` to answer 200.
    pub fn start(mut cmd: Command, addr: SocketAddr, ready: &str, log: &Path, what: &str) -> Result<Served> {
        let log = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {what} ({cmd:?})"))?;
        if let Err(e) = wait_http_ok(addr, ready, &mut child, what) {
            stop_child(child, libc::SIGKILL);
            return Err(e);
        }
        Ok(Served {
            child: Some(child),
            addr,
        })
    }

    /// `sensor run --listen 127.0.0.1:PORT` plus `args`, with a fresh event journal of its own
    /// next to its log (the default config's journal, so its cost is measured, but never the
    /// host's /var/lib/sensor/journal or another run's history).
    pub fn sensor(bin: &Path, args: &[&str], log: &Path) -> Result<Served> {
        let addr = loopback(free_port()?);
        let journal = log.with_extension("journal");
        let _ = std::fs::remove_dir_all(&journal);
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .args(["--listen", &addr.to_string()])
            .arg("--journal.path")
            .arg(&journal)
            .args(args);
        Served::start(cmd, addr, "/readyz", log, "the sensor")
    }

    /// Debian's prometheus-node-exporter with its default collectors.
    pub fn node_exporter(log: &Path) -> Result<Served> {
        let bin = find_in_path(NODE_EXPORTER).with_context(|| format!("{NODE_EXPORTER} not installed"))?;
        let addr = loopback(free_port()?);
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--web.listen-address={addr}"));
        Served::start(cmd, addr, "/metrics", log, "node_exporter")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn metrics(&self) -> Result<String> {
        let (status, body) = http_get(self.addr, "/metrics")?;
        if status != 200 {
            bail!("/metrics of {} answered {status}", self.addr);
        }
        Ok(body)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            stop_child(c, libc::SIGINT);
        }
    }
}

pub const NODE_EXPORTER: &str = "prometheus-node-exporter";

// ---------------------------------------------------------------------------------------------
// Cgroups

/// `sensor-bench-<what>-<pid>` under this process's own memory cgroup: where a benchmark makes
/// its workloads' cgroups.
pub fn bench_cgroup(what: &str) -> Result<Cgroup> {
    Ok(Cgroup::under_own(
        &format!("sensor-bench-{what}-{}", std::process::id()),
        None,
    )?)
}

/// The file that makes the kernel reclaim in `cg` when written (memory.reclaim on v2,
/// memory.force_empty on v1) and what to write: real memcg reclaim, which the memcg probe times
/// and attributes to the writer's cgroup.
fn reclaim_file(cg: &Cgroup) -> Result<(CString, &'static [u8])> {
    let (f, v): (&str, &'static [u8]) = if cg.v2 {
        ("memory.reclaim", b"1M")
    } else {
        ("memory.force_empty", b"0")
    };
    Ok((CString::new(cg.dir.join(f).into_os_string().into_encoded_bytes())?, v))
}

// ---------------------------------------------------------------------------------------------
// Workloads

/// A loopback listener that accepts and drops connections until dropped.
pub struct Listener {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    pub fn start() -> Result<Listener> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        // SAFETY: valid listening fd; a deep accept queue (std listens with 128).
        unsafe { libc::listen(l.as_raw_fd(), 4096) };
        let addr = l.local_addr()?;
        l.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_micros(500)),
                    Err(_) => {}
                }
            }
        });
        Ok(Listener {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sockaddr(a: SocketAddr) -> libc::sockaddr_in {
    // SAFETY: a zeroed sockaddr_in is valid; the fields are set below.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as u16;
    sa.sin_port = a.port().to_be();
    if let std::net::IpAddr::V4(ip) = a.ip() {
        sa.sin_addr.s_addr = u32::from(ip).to_be();
    }
    sa
}

/// What a forked child does, prepared before the fork so the child only makes system calls
/// (the parent is multi-threaded: between fork and exit only async-signal-safe calls).
struct Plan {
    procs: CString,
    connect: Option<libc::sockaddr_in>,
    touch: usize,
    /// A cgroup file and what to write to it to make the kernel reclaim, from the child itself
    /// (reclaim is attributed to the task that runs it).
    reclaim: Option<(CString, &'static [u8])>,
    ready: libc::c_int,
    /// Keep running (until killed) after the work, instead of exiting.
    stay: bool,
}

/// The child's side of [`spawn`]: join the cgroup, connect once, touch `touch` bytes of
/// anonymous memory (charged to the cgroup), ask for reclaim, say ready, then wait to be killed
/// or exit.
///
/// # Safety
/// Only in a freshly forked child.
unsafe fn child_main(p: &Plan) -> ! {
    // SAFETY (whole body): raw system calls on memory prepared before the fork.
    unsafe {
        let fd = libc::open(p.procs.as_ptr(), libc::O_WRONLY);
        if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
            libc::_exit(10);
        }
        libc::close(fd);
        if let Some(dst) = &p.connect {
            let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
            if s < 0 || libc::connect(s, std::ptr::from_ref(dst).cast(), len) != 0 {
                libc::_exit(11);
            }
            libc::close(s);
        }
        if p.touch > 0 {
            let m = libc::mmap(
                std::ptr::null_mut(),
                p.touch,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if m == libc::MAP_FAILED {
                libc::_exit(12);
            }
            let m = m.cast::<u8>();
            let mut i = 0;
            while i < p.touch {
                std::ptr::write_volatile(m.add(i), 1);
                i += 4096;
            }
        }
        if let Some((file, value)) = &p.reclaim {
            // EAGAIN/EBUSY are expected: anonymous memory without swap cannot go.
            let fd = libc::open(file.as_ptr(), libc::O_WRONLY);
            if fd >= 0 {
                libc::write(fd, value.as_ptr().cast(), value.len());
                libc::close(fd);
            }
        }
        libc::write(p.ready, b"r".as_ptr().cast(), 1);
        if p.stay {
            loop {
                libc::pause();
            }
        }
        libc::_exit(0)
    }
}

/// Forks a child that runs [`child_main`]; returns its pid.
fn spawn(p: &Plan) -> Result<i32> {
    // SAFETY: the child runs only system calls on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => bail!("fork: {}", std::io::Error::last_os_error()),
        // SAFETY: a freshly forked child.
        0 => unsafe { child_main(p) },
        pid => Ok(pid),
    }
}

/// Waits for `pid`; its wait status.
pub fn reap(pid: i32) -> i32 {
    let mut status = 0;
    // SAFETY: waitpid on our own child with a valid out pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    status
}

/// A ready pipe: children write one byte each once they have done their work.
struct Ready {
    r: libc::c_int,
    w: libc::c_int,
}

impl Ready {
    fn new() -> Result<Ready> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 with a valid two-int array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            bail!("pipe: {}", std::io::Error::last_os_error());
        }
        Ok(Ready { r: fds[0], w: fds[1] })
    }

    /// Reads `n` bytes (n children ready), or fails after `limit`.
    fn wait(&self, n: usize, limit: Duration) -> Result<()> {
        let t = Instant::now();
        let mut got = 0;
        let mut buf = [0u8; 256];
        while got < n {
            let mut pfd = libc::pollfd {
                fd: self.r,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll and read on our own pipe with valid buffers.
            unsafe {
                if libc::poll(&mut pfd, 1, 200) > 0 {
                    let k = libc::read(self.r, buf.as_mut_ptr().cast(), buf.len().min(n - got));
                    if k > 0 {
                        got += k as usize;
                    }
                }
            }
            if t.elapsed() > limit {
                bail!("{got} of {n} workload processes ready after {limit:?}");
            }
        }
        Ok(())
    }
}

impl Drop for Ready {
    fn drop(&mut self) {
        // SAFETY: closing our own descriptors.
        unsafe {
            libc::close(self.r);
            libc::close(self.w);
        }
    }
}

/// `n` workload cgroups, each with one live process that made one loopback connect, charged
/// `touch` bytes and made the kernel reclaim in its cgroup. Killed and removed by
/// [`Workloads::remove`] (or on drop).
pub struct Workloads<'a> {
    parent: &'a Cgroup,
    members: Vec<(i32, Cgroup)>,
}

impl<'a> Workloads<'a> {
    pub fn start(
        parent: &'a Cgroup,
        prefix: &str,
        n: usize,
        connect: SocketAddr,
        touch: usize,
    ) -> Result<Workloads<'a>> {
        let ready = Ready::new()?;
        let mut w = Workloads {
            parent,
            members: Vec::with_capacity(n),
        };
        let dst = sockaddr(connect);
        for i in 0..n {
            let cg = parent.child(&format!("{prefix}{i:05}"), None)?;
            let procs = CString::new(cg.dir.join("cgroup.procs").into_os_string().into_encoded_bytes())?;
            let plan = Plan {
                procs,
                connect: Some(dst),
                touch,
                reclaim: Some(reclaim_file(&cg)?),
                ready: ready.w,
                stay: true,
            };
            let pid = spawn(&plan)?;
            w.members.push((pid, cg));
        }
        ready.wait(n, Duration::from_secs(60 + n as u64 / 20))?;
        Ok(w)
    }

    /// Kills every process, waits for it, removes its cgroup; how many died of SIGKILL.
    pub fn remove(mut self) -> usize {
        self.teardown()
    }

    fn teardown(&mut self) -> usize {
        for (pid, _) in &self.members {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        let mut killed = 0;
        for (pid, cg) in self.members.drain(..) {
            let st = reap(pid);
            if libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL {
                killed += 1;
            }
            // Removed now that its process is gone.
            drop(cg);
        }
        let _ = self.parent;
        killed
    }
}

impl Drop for Workloads<'_> {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Forks a process into the cgroup `dir` that touches memory until the kernel's OOM killer
/// kills it (the cgroup's limit must be far below `bytes`); returns its wait status.
pub fn oom_victim(dir: &Path, bytes: usize) -> Result<(i32, i32)> {
    let ready = Ready::new()?;
    let plan = Plan {
        procs: CString::new(dir.join("cgroup.procs").into_os_string().into_encoded_bytes())?,
        connect: None,
        touch: bytes,
        reclaim: None,
        ready: ready.w,
        stay: false,
    };
    let pid = spawn(&plan)?;
    Ok((pid, reap(pid)))
}

/// (min, median, max); NaN for no samples.
pub fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (v[0], median, v[n - 1])
}

/// Runs `cargo xtask ARGS` (this binary) in a network namespace of its own, loopback up and
/// accept backlog and TIME_WAIT limit raised (see `tcp::isolated_rate`); returns its stdout.
pub fn in_fresh_netns(args: &[String]) -> Result<String> {
    let exe = std::env::current_exe().context("xtask's own path")?;
    let mut cmd = Command::new("unshare");
    let setup = "ip link set lo up && sysctl -qw net.core.somaxconn=65535 net.ipv4.tcp_max_syn_backlog=65535 \
                 net.ipv4.tcp_max_tw_buckets=1000000 && exec \"$@\"";
    cmd.args(["--net", "--", "sh", "-c", setup, "sh"]).arg(&exe).args(args);
    let out = cmd.output().context("run unshare (util-linux) and ip (iproute2)")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "measurement in a new network namespace failed ({}): {}{}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(stdout)
}
