//! The load: the connect generator (`cargo xtask soak-load`, in its own network namespace), the
//! flapping check target, cgroup churn and OOM kills.

use super::*;

/// What the load generator reported: connects that succeeded, were refused, failed otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Connects {
    pub ok: u64,
    pub refused: u64,
    pub other: u64,
}

impl Connects {
    pub(super) fn parse(line: &str) -> Option<Connects> {
        let rest = line.strip_prefix("CONNECTS ")?;
        let get = |k: &str| {
            rest.split_whitespace()
                .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
        };
        Some(Connects {
            ok: get("ok")?,
            refused: get("refused")?,
            other: get("other")?,
        })
    }
}

/// `xtask soak-load`: runs inside the soak's network namespace and cgroup until its stdin
/// closes: a steady trickle of connects to a local listener and to a port nothing listens on,
/// with a storm every 20 s; prints its totals once a second and when it ends.
pub fn load() -> Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", PORT_OK)).context("bind the soak listener")?;
    // SAFETY: listen(2) on a valid listening socket: a deep backlog so storms are not dropped.
    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096) };
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            stop.store(true, Ordering::Relaxed);
        });
    }
    let counts = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
    let one = |port: u16| {
        let slot = match TcpStream::connect_timeout(&loopback(port), Duration::from_secs(5)) {
            Ok(_) => 0,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => 1,
            Err(_) => 2,
        };
        counts[slot].fetch_add(1, Ordering::Relaxed);
    };
    let print = || {
        println!(
            "CONNECTS ok={} refused={} other={}",
            counts[0].load(Ordering::Relaxed),
            counts[1].load(Ordering::Relaxed),
            counts[2].load(Ordering::Relaxed)
        );
    };
    let started = Instant::now();
    let mut last_storm = Instant::now();
    let mut last_print = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if last_storm.elapsed() >= Duration::from_secs(20) {
            last_storm = Instant::now();
            // A storm: 4 threads, 1,500 successes and 300 refusals as fast as they go.
            std::thread::scope(|s| {
                for t in 0..4 {
                    s.spawn(move || {
                        for i in 0..450 {
                            one(if (i + t) % 6 == 0 { PORT_REFUSED } else { PORT_OK });
                        }
                    });
                }
            });
        }
        for _ in 0..4 {
            one(PORT_OK);
        }
        one(PORT_REFUSED);
        std::thread::sleep(Duration::from_millis(100));
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            print();
        }
    }
    print();
    eprintln!("soak load ran {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// A local HTTP server whose answer flips between 200 and 503 every `FLAP_EVERY`.
pub(super) fn flapping_server(stop: Arc<AtomicBool>) -> Result<(u16, std::thread::JoinHandle<u64>)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    l.set_nonblocking(true)?;
    let h = std::thread::spawn(move || {
        let t0 = Instant::now();
        let mut served = 0;
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf);
                    let up = (t0.elapsed().as_secs() / FLAP_EVERY.as_secs()).is_multiple_of(2);
                    let status = if up { "200 OK" } else { "503 Service Unavailable" };
                    let _ = write!(
                        s,
                        "HTTP/1.1 {status}\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
                    );
                    served += 1;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        served
    });
    Ok((port, h))
}

/// Creates a cgroup with a sleeping process every `CHURN_EVERY`, removing the oldest beyond
/// `CHURN_LIVE`; returns how many it created and removed.
pub(super) fn churn(parent: &Cg, stop: &AtomicBool, made: &AtomicU64) -> Result<()> {
    let mut live: std::collections::VecDeque<(Cg, Child)> = std::collections::VecDeque::new();
    let mut n = 0u64;
    let end = |(cg, mut child): (Cg, Child)| {
        let _ = child.kill();
        let _ = child.wait();
        drop(cg);
    };
    while !stop.load(Ordering::Relaxed) {
        let cg = parent.child(&format!("churn-{n}"), Some(64 << 20))?;
        n += 1;
        let child = cg.command(&["sleep", "3600"]).spawn().context("spawn sleep")?;
        live.push_back((cg, child));
        made.fetch_add(1, Ordering::Relaxed);
        while live.len() > CHURN_LIVE {
            if let Some(x) = live.pop_front() {
                end(x);
            }
        }
        std::thread::sleep(CHURN_EVERY);
    }
    live.into_iter().for_each(end);
    Ok(())
}

/// An OOM kill every `OOM_EVERY`, round robin over `cgs`; returns the kills whose victim died
/// of SIGKILL.
pub(super) fn oom_kills(cgs: &[Cg], stop: &AtomicBool, done: &AtomicU64) -> Result<()> {
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let st = cgs[i % cgs.len()]
            .command(&["tail", "/dev/zero"])
            .status()
            .context("run tail /dev/zero")?;
        if st.signal() == Some(libc::SIGKILL) {
            done.fetch_add(1, Ordering::Relaxed);
        }
        i += 1;
        std::thread::sleep(OOM_EVERY.saturating_sub(t.elapsed()));
    }
    Ok(())
}

/// The load generator, in the cgroup `cg` and a new network namespace; its stdout lines go to
/// `last`.
pub(super) fn start_load(cg: &Cg, last: Arc<Mutex<Connects>>) -> Result<(Child, std::thread::JoinHandle<()>)> {
    let exe = std::env::current_exe().context("xtask's own path")?;
    let exe = exe.to_str().context("xtask's path is not UTF-8")?;
    let mut cmd = cg.command(&[
        "unshare",
        "--net",
        "--",
        "sh",
        "-c",
        "ip link set lo up && exec \"$0\" soak-load",
        exe,
    ]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().context("start the connect load (unshare, ip)")?;
    let out = child.stdout.take().context("load stdout")?;
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(c) = Connects::parse(&line) {
                *last.lock().unwrap_or_else(|p| p.into_inner()) = c;
            }
        }
    });
    Ok((child, reader))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_totals_line() {
        assert_eq!(
            Connects::parse("CONNECTS ok=10 refused=2 other=0"),
            Some(Connects {
                ok: 10,
                refused: 2,
                other: 0
            })
        );
        assert_eq!(Connects::parse("CONNECTS ok=1"), None);
    }
}
