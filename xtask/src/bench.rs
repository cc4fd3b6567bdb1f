//! `cargo xtask bench`: loopback connect-and-close rate with the sensor attached against the
//! same without it, alternating in one run, plus an equivalent bpftrace latency histogram on the
//! same tracepoint so our overhead sits next to a known tool's.

use std::{
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

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

/// Connects and closes (with RST, so no TIME_WAIT) against a local listener for `secs`.
fn connect_rate(threads: usize, secs: f64) -> Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    // SAFETY: valid listening fd; a deeper backlog than std's 128.
    unsafe { libc::listen(l.as_raw_fd(), 4096) };
    let addr = l.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let stop = Arc::clone(&stop);
        l.set_nonblocking(true)?;
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_micros(50)),
                    Err(_) => {}
                }
            }
        })
    };
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let done = Arc::clone(&done);
            s.spawn(move || {
                while Instant::now() < deadline {
                    if let Ok(c) = TcpStream::connect(addr) {
                        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
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
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = acceptor.join();
    Ok(done.load(Ordering::Relaxed) as f64 / elapsed)
}

fn http_ok(addr: SocketAddr, path: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET {path} HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.1 200") || buf.starts_with("HTTP/1.0 200")
}

fn stop(mut child: Child, sig: i32) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
    let _ = child.wait();
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
            while !http_ok(addr, "/readyz") {
                if t.elapsed() > Duration::from_secs(30) {
                    stop(child, libc::SIGKILL);
                    bail!("sensor did not become ready");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(Some(child))
        }
        Mode::Bpftrace => {
            let mut child = Command::new("bpftrace")
                .args(["-e", BPFTRACE])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("start bpftrace (apt-get install bpftrace)")?;
            // bpftrace prints "Attaching N probes..." once its programs are in.
            let out = child.stdout.take().context("bpftrace stdout")?;
            let mut first = String::new();
            BufReader::new(out).read_line(&mut first)?;
            if !first.contains("Attaching") {
                stop(child, libc::SIGKILL);
                bail!("bpftrace did not attach: {first}");
            }
            Ok(Some(child))
        }
    }
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    (v[0], median, v[n - 1])
}

pub fn run(root: &Path, rounds: usize, secs: f64, threads: usize) -> Result<()> {
    let sensor = root.join("target/release/sensor");
    let modes = [Mode::Baseline, Mode::Sensor, Mode::Bpftrace];
    let mut rates: Vec<[f64; 3]> = Vec::new();
    // Warm-up: caches, page tables, socket slabs.
    let _ = connect_rate(threads, 1.0)?;
    for round in 0..rounds {
        let mut r = [0.0; 3];
        // Rotate the order so drift over the run does not favour one mode.
        for i in 0..3 {
            let mode = modes[(round + i) % 3];
            let child = start(mode, &sensor)?;
            std::thread::sleep(Duration::from_millis(300));
            let rate = connect_rate(threads, secs)?;
            if let Some(c) = child {
                stop(c, libc::SIGINT);
            }
            let idx = modes.iter().position(|m| *m == mode).unwrap_or(0);
            r[idx] = rate;
            eprintln!("round {}/{rounds} {:<8} {:>9.0} connects/s", round + 1, mode.name(), rate);
        }
        rates.push(r);
    }
    let ratio = |i: usize| rates.iter().map(|r| r[i] / r[0]).collect::<Vec<_>>();
    let (smin, smed, smax) = stats(ratio(1));
    let (bmin, bmed, bmax) = stats(ratio(2));
    let (amin, amed, amax) = stats(rates.iter().map(|r| r[0]).collect());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let report = format!(
        "## TCP connect overhead\n\n\
         Loopback connect-and-close (RST, no TIME_WAIT) with {threads} client threads, {secs} s per measurement, \
         {rounds} rounds alternating baseline / sensor / bpftrace (order rotated each round); kernel {}, {cpus} CPUs.\n\
         Ratios are the rate with the tool attached over the baseline of the same round.\n\n\
         | | min | median | max |\n|---|---|---|---|\n\
         | baseline connects/s | {amin:.0} | {amed:.0} | {amax:.0} |\n\
         | sensor / baseline | {smin:.3} | {smed:.3} | {smax:.3} |\n\
         | bpftrace latency histogram / baseline | {bmin:.3} | {bmed:.3} | {bmax:.3} |\n\n\
         The sensor runs with its default configuration (all probes: OOM, memcg, TCP with counters, \
         latency and RTT histograms per workload and destination, failure events); the bpftrace \
         script keeps only a global connect-latency histogram on the same tracepoint:\n\n```\n{}\n```\n",
        kernel.trim(),
        BPFTRACE.trim()
    );
    println!("{report}");
    let path = root.join("docs/benchmarks.md");
    let header = "# Benchmarks\n\nGenerated by `cargo xtask bench`; numbers from the last run on the machine named.\n\n";
    std::fs::write(&path, format!("{header}{report}")).with_context(|| format!("write {}", path.display()))?;
    eprintln!("==> wrote {}", path.display());
    if smed < 0.97 {
        eprintln!("==> WARNING: the sensor's median connect-rate ratio {smed:.3} is below the 0.97 target");
    }
    Ok(())
}
