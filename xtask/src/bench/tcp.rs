//! `cargo xtask bench tcp`: loopback connect-and-close rate with the sensor attached against the
//! same without it, alternating in one run, plus an equivalent bpftrace latency histogram on the
//! same tracepoint so our overhead sits next to a known tool's.

use std::{
    io::{BufRead as _, BufReader, ErrorKind},
    net::{SocketAddr, TcpListener},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    bench::kit::{in_fresh_netns, stats},
    net::{http_get, stop_child},
};

/// The bpftrace equivalent of the sensor's connect-latency histogram.
const BPFTRACE: &str = r#"
tracepoint:sock:inet_sock_set_state /args->protocol == 6 && args->oldstate == 7 && args->newstate == 2/ {
  @start[args->skaddr] = nsecs;
}
tracepoint:sock:inet_sock_set_state /args->protocol == 6 && args->oldstate == 2 && @start[args->skaddr]/ {
  if (args->newstate == 1) { @connect_ns = hist(nsecs - @start[args->skaddr]); }
  delete(@start[args->skaddr]);
}
"#;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Baseline,
    Sensor,
    Bpftrace,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Baseline => "baseline",
            Mode::Sensor => "sensor",
            Mode::Bpftrace => "bpftrace",
        }
    }
}

/// How the client closes each connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close {
    /// Ordinary close (FIN handshake). Client source addresses rotate over 127.0.0.0/8 so
    /// TIME_WAIT cannot exhaust the ephemeral ports.
    Fin,
    /// Abortive close (SO_LINGER 0: RST, no TIME_WAIT); also fires the reset tracepoints.
    Rst,
}

/// One connect with libc, bound to source `127.0.0.{src}`; true when it connected.
fn connect_once(dst: &libc::sockaddr_in, src: u8, close: Close) -> bool {
    // SAFETY: plain socket syscalls on a socket this function owns and closes; the address
    // structs are fully initialised and correctly sized.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return false;
        }
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        sa.sin_family = libc::AF_INET as u16;
        sa.sin_addr.s_addr = u32::from_be_bytes([127, 0, 0, src]).to_be();
        let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
        let mut ok = libc::bind(fd, std::ptr::from_ref(&sa).cast(), len) == 0;
        ok = ok && libc::connect(fd, std::ptr::from_ref(dst).cast(), len) == 0;
        if ok && close == Close::Rst {
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                std::ptr::from_ref(&linger).cast(),
                std::mem::size_of::<libc::linger>() as u32,
            );
        }
        libc::close(fd);
        ok
    }
}

/// Connects and closes against a local listener for `secs`; returns connects per second.
pub fn connect_rate(threads: usize, secs: f64, close: Close) -> Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    // SAFETY: valid listening fd; a deeper backlog than std's 128 (see `isolated_rate`).
    unsafe { libc::listen(l.as_raw_fd(), 65535) };
    let addr = l.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let acceptor = {
        let stop = Arc::clone(&stop);
        let accepted = Arc::clone(&accepted);
        l.set_nonblocking(true)?;
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok(_) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_micros(50)),
                    Err(_) => {}
                }
            }
        })
    };
    // SAFETY: a zeroed sockaddr_in is valid; the fields are set below.
    let mut dst: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    dst.sin_family = libc::AF_INET as u16;
    dst.sin_port = addr.port().to_be();
    dst.sin_addr.s_addr = u32::from_be_bytes([127, 0, 0, 1]).to_be();
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let done = Arc::clone(&done);
            s.spawn(move || {
                let mut src = 2 + (t as u8) * 50;
                while Instant::now() < deadline {
                    src = if src >= 250 { 2 } else { src + 1 };
                    if connect_once(&dst, src, close) {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    // The clock stops once the server has accepted (and closed) every connection, not at the
    // deadline: the acceptor shares the CPUs with the clients and falls behind by a varying
    // few thousand connections, whose server-side half would otherwise fall outside the
    // measurement by a varying amount.
    let done = done.load(Ordering::Relaxed);
    let drain = Instant::now() + Duration::from_secs(10);
    while accepted.load(Ordering::Relaxed) < done && Instant::now() < drain {
        std::thread::sleep(Duration::from_micros(200));
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = acceptor.join();
    let accepted = accepted.load(Ordering::Relaxed);
    if accepted < done {
        bail!("the server accepted {accepted} of {done} connections within 10 s of the deadline");
    }
    Ok(done as f64 / elapsed)
}

/// One measurement in a network namespace of its own (`unshare --net`, loopback up): the
/// TIME_WAIT sockets a FIN measurement leaves behind (about 100,000, 60 s each) stay in that
/// namespace, which the kernel tears down when the measurement's process exits, so each
/// measurement starts from empty connection tables instead of inheriting its predecessors'.
/// The namespace's accept backlog is raised too: with the default 4096, the clients (which
/// keep both CPUs busy) now and then overflow it while the acceptor waits for a CPU, and each
/// dropped SYN costs its client a 1 s retransmit, which made FIN rounds swing by half. So is
/// its TIME_WAIT limit (131,072 here): past it, closes skip TIME_WAIT, the peer's last segments
/// draw resets, and a reused port's SYN can meet the old connection and wait 1 s to retry.
fn isolated_rate(threads: usize, secs: f64, close: Close) -> Result<f64> {
    let mut args = vec![
        "bench-load".to_string(),
        "--threads".into(),
        threads.to_string(),
        "--seconds".into(),
        secs.to_string(),
    ];
    if close == Close::Rst {
        args.push("--rst".into());
    }
    let stdout = in_fresh_netns(&args)?;
    stdout
        .trim()
        .parse()
        .with_context(|| format!("measurement printed no rate: {stdout:?}"))
}

/// Starts what `mode` measures and returns it once attached.
fn start(mode: Mode, sensor: &Path) -> Result<Option<Child>> {
    match mode {
        Mode::Baseline => Ok(None),
        Mode::Sensor => {
            let addr: SocketAddr = "127.0.0.1:19449".parse()?;
            let child = Command::new(sensor)
                .args(["run", "--listen", &addr.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start sensor")?;
            let t = Instant::now();
            while !matches!(http_get(addr, "/readyz"), Ok((200, _))) {
                if t.elapsed() > Duration::from_secs(30) {
                    stop_child(child, libc::SIGKILL);
                    bail!("sensor did not become ready");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(Some(child))
        }
        Mode::Bpftrace => {
            let script = std::env::var("SENSOR_BENCH_BPFTRACE").unwrap_or_else(|_| BPFTRACE.to_string());
            let mut child = Command::new("bpftrace")
                .args(["-e", &script])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("start bpftrace (apt-get install bpftrace)")?;
            // bpftrace prints "Attaching N probes..." once its programs are in.
            let out = child.stdout.take().context("bpftrace stdout")?;
            let mut first = String::new();
            BufReader::new(out).read_line(&mut first)?;
            if !first.contains("Attaching") {
                stop_child(child, libc::SIGKILL);
                bail!("bpftrace did not attach: {first}");
            }
            Ok(Some(child))
        }
    }
}

/// Rates per round for baseline, sensor, bpftrace.
fn measure(sensor: &Path, rounds: usize, secs: f64, threads: usize, close: Close) -> Result<Vec<[f64; 3]>> {
    let modes = [Mode::Baseline, Mode::Sensor, Mode::Bpftrace];
    let mut rates = Vec::new();
    // Warm-up: caches, page tables, socket slabs.
    let _ = isolated_rate(threads, 1.0, close)?;
    for round in 0..rounds {
        let mut r = [0.0; 3];
        // Rotate the order so drift over the run does not favour one mode.
        for i in 0..3 {
            let mode = modes[(round + i) % 3];
            let child = start(mode, sensor)?;
            std::thread::sleep(Duration::from_millis(300));
            let rate = isolated_rate(threads, secs, close)?;
            if let Some(c) = child {
                stop_child(c, libc::SIGINT);
            }
            // Let the kernel tear the measurement's namespace (and its TIME_WAIT sockets) down.
            std::thread::sleep(Duration::from_millis(500));
            r[modes.iter().position(|m| *m == mode).unwrap_or(0)] = rate;
            eprintln!(
                "{close:?} round {}/{rounds} {:<8} {:>9.0} connects/s",
                round + 1,
                mode.name(),
                rate
            );
        }
        rates.push(r);
    }
    Ok(rates)
}

/// Mean and the half-width of its 95% confidence interval (Student's t; NaN below 2 samples).
fn mean_ci(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    if v.len() < 2 {
        return (v.first().copied().unwrap_or(f64::NAN), f64::NAN);
    }
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, t975(v.len() - 1) * (var / n).sqrt())
}

/// Student's t quantile 0.975 for `df` degrees of freedom (a table to 30, then the
/// Cornish-Fisher expansion, within 0.1% there).
fn t975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        1..=30 => T[df - 1],
        _ => {
            let d = df as f64;
            1.959_964 + 2.372_1 / d + 2.822_5 / (d * d)
        }
    }
}

fn row(label: &str, v: Vec<f64>, digits: usize) -> String {
    let (mean, ci) = mean_ci(&v);
    let (min, med, max) = stats(v);
    format!("| {label} | {min:.digits$} | {med:.digits$} | {max:.digits$} | {mean:.digits$} ± {ci:.digits$} |\n")
}

fn rows(label: &str, rates: &[[f64; 3]]) -> (String, f64) {
    let ratio = |i: usize| rates.iter().map(|r| r[i] / r[0]).collect::<Vec<_>>();
    let (_, smed, _) = stats(ratio(1));
    (
        [
            row(
                &format!("{label}: baseline connects/s"),
                rates.iter().map(|r| r[0]).collect(),
                0,
            ),
            row(&format!("{label}: sensor / baseline"), ratio(1), 3),
            row(&format!("{label}: bpftrace histogram / baseline"), ratio(2), 3),
        ]
        .concat(),
        smed,
    )
}

#[derive(clap::Args, Debug, Clone)]
#[group(id = "bench_opts")]
pub struct Opts {
    /// TCP: rounds of baseline / sensor / bpftrace; the report gives the median ratio.
    #[arg(long, default_value_t = 15)]
    pub tcp_rounds: usize,
    /// TCP: seconds per measurement.
    #[arg(long, default_value_t = 2.0)]
    pub tcp_seconds: f64,
    /// TCP: client threads.
    #[arg(long, default_value_t = 2)]
    pub tcp_threads: usize,
}

impl Opts {
    pub fn quick(&mut self) {
        self.tcp_rounds = 2;
        self.tcp_seconds = 1.0;
    }
}

pub fn run(root: &Path, o: &Opts) -> Result<()> {
    let (rounds, secs, threads) = (o.tcp_rounds.max(1), o.tcp_seconds, o.tcp_threads.max(1));
    // SENSOR_BENCH_SENSOR compares another build (e.g. an experiment) against the same baseline.
    let sensor = std::env::var_os("SENSOR_BENCH_SENSOR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/release/sensor"));
    let m = crate::bench::report::machine();
    eprintln!("==> bench tcp on {m}");
    // The sensor and bpftrace load BPF.
    let lock = crate::bench::kit::KernelLock::acquire("bench tcp")?;
    let fin = measure(&sensor, rounds, secs, threads, Close::Fin)?;
    let rst = measure(&sensor, rounds, secs, threads, Close::Rst)?;
    drop(lock);
    let (fin_rows, fin_med) = rows("close (FIN)", &fin);
    let (rst_rows, rst_med) = rows("abortive close (RST)", &rst);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let report = format!(
        "Loopback connect-and-close with {threads} client threads, {secs} s per measurement, {rounds} rounds \
         alternating baseline / sensor / bpftrace (order rotated each round), on kernel {} with {cpus} CPUs. \
         Ratios are the rate with the tool attached over the baseline of the same round. Each measurement \
         runs in a network namespace of its own (`unshare --net`, accept backlog and TIME_WAIT limit raised), \
         so the TIME_WAIT sockets of one do not slow the next, and its clock stops when the server has \
         accepted and closed every connection, so each measurement pays for all of its own work. \
         \"close (FIN)\" is an ordinary close (client source addresses rotate over \
         127.0.0.0/8 so TIME_WAIT cannot exhaust ports); \"abortive close (RST)\" closes with SO_LINGER 0, \
         which also fires the reset tracepoints on both sides, the worst case for the sensor. The last column \
         is the mean over rounds with its 95% confidence interval.\n\n\
         | | min | median | max | mean |\n|---|---|---|---|---|\n{fin_rows}{rst_rows}\n\
         The sensor runs with its default configuration (all probes: OOM, memcg, TCP counters, latency and RTT \
         histograms per workload and destination, reset and retransmit counters, failure events) and uses raw \
         tracepoints; the bpftrace script keeps only a global connect-latency histogram on the classic \
         tracepoint:\n\n```\n{}\n```\n\n\
         Reproduce: `cargo xtask bench tcp --tcp-rounds {rounds} --tcp-seconds {secs} --tcp-threads {threads}`; \
         the history of this figure (harness fixes, A/B runs) is in [tcp-overhead.md](tcp-overhead.md).\n",
        kernel.trim(),
        BPFTRACE.trim()
    );
    println!("{report}");
    let bpf_med = |r: &[[f64; 3]]| stats(r.iter().map(|x| x[2] / x[0]).collect()).1;
    let summary = |what: &str, med: f64, bpf: f64| {
        crate::bench::report::Row::measured(
            &format!("loopback connect rate with the sensor / without, {what}"),
            med,
            "",
            3,
            &format!("bpftrace histogram {bpf:.3}"),
            crate::bench::report::Goal::AtLeast(0.97),
            "≥ 0.97",
        )
    };
    let summary_rows = [
        summary("close (FIN)", fin_med, bpf_med(&fin)),
        summary("abortive close (RST)", rst_med, bpf_med(&rst)),
    ];
    crate::bench::report::store(root, "tcp", &m, &summary_rows, &report)?;
    for (what, med) in [("close (FIN)", fin_med), ("abortive close (RST)", rst_med)] {
        if med < 0.97 {
            eprintln!("==> the sensor's median connect-rate ratio for {what} is {med:.3}, below the 0.97 target");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confidence_interval_of_the_mean() {
        let (m, h) = mean_ci(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(m, 3.0);
        // sd = sqrt(2.5), t(4) = 2.776
        assert!((h - 2.776 * (2.5f64 / 5.0).sqrt()).abs() < 1e-9, "{h}");
        assert!(mean_ci(&[1.0]).1.is_nan());
        // The expansion meets the table at 30 and tends to 1.96.
        assert!((t975(31) - 2.040).abs() < 0.002, "{}", t975(31));
        assert!((t975(120) - 1.980).abs() < 0.001, "{}", t975(120));
    }
}
