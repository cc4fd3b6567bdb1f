//! The target (a fixed 200 to every request, one request per connection) and the keep-alive
//! HTTP client the blackbox driver uses.

use super::*;
// ---------------------------------------------------------------------------------------------
// The target: a fixed 200 to every request, one request per connection.

pub(super) struct Target {
    pub(super) addr: SocketAddr,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) served: Arc<AtomicU64>,
    pub(super) tids: Arc<Mutex<Vec<i64>>>,
    pub(super) threads: Vec<JoinHandle<()>>,
}

impl Target {
    pub(super) fn start() -> Result<Target> {
        let l = TcpListener::bind("127.0.0.1:0").context("bind the target")?;
        // SAFETY: valid listening fd; a deeper backlog than std's 128.
        unsafe { libc::listen(l.as_raw_fd(), 4096) };
        let addr = l.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let tids = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for _ in 0..TARGET_THREADS {
            let l = l.try_clone()?;
            let (stop, served, tids) = (Arc::clone(&stop), Arc::clone(&served), Arc::clone(&tids));
            threads.push(std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::syscall(libc::SYS_gettid) };
                tids.lock().unwrap_or_else(|p| p.into_inner()).push(tid);
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((s, _)) = l.accept() {
                        if serve(s) {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        Ok(Target {
            addr,
            stop,
            served,
            tids,
            threads,
        })
    }

    pub(super) fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// CPU seconds of the server threads so far.
    pub(super) fn cpu(&self) -> f64 {
        let tids = self.tids.lock().unwrap_or_else(|p| p.into_inner()).clone();
        tids.iter()
            .filter_map(|t| cpu_seconds(&format!("/proc/self/task/{t}/stat")).ok())
            .sum()
    }

    pub(super) fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Each blocked accept needs a connection to notice the flag.
        for _ in 0..self.threads.len() {
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Reads the request head and answers 200; the server closes first, so TIME_WAIT stays on its
/// side and the probers' ephemeral ports are free again at once.
pub(super) fn serve(mut s: TcpStream) -> bool {
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 2048];
    let mut have = 0;
    loop {
        match s.read(&mut buf[have..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => have += n,
        }
        if buf[..have].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
        if have == buf.len() {
            return false;
        }
    }
    s.write_all(RESPONSE).is_ok()
}

// ---------------------------------------------------------------------------------------------
// HTTP clients: one-shot (metrics, readiness) and keep-alive (the blackbox driver).

/// One persistent HTTP/1.1 connection.
pub(super) struct KeepAlive {
    pub(super) addr: SocketAddr,
    pub(super) conn: Option<BufReader<TcpStream>>,
}

impl KeepAlive {
    pub(super) fn new(addr: SocketAddr) -> KeepAlive {
        KeepAlive { addr, conn: None }
    }

    pub(super) fn get(&mut self, path: &str) -> Result<(u16, Vec<u8>)> {
        let r = self.try_get(path);
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    pub(super) fn try_get(&mut self, path: &str) -> Result<(u16, Vec<u8>)> {
        if self.conn.is_none() {
            let s = TcpStream::connect(self.addr)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            self.conn = Some(BufReader::new(s));
        }
        let conn = self.conn.as_mut().context("no connection")?;
        write!(conn.get_mut(), "GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.addr)?;
        let mut line = String::new();
        conn.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("bad status line {line:?}"))?;
        let (mut len, mut chunked, mut close) = (None, false, false);
        loop {
            line.clear();
            if conn.read_line(&mut line)? == 0 {
                bail!("connection closed in the headers");
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
                match k.as_str() {
                    "content-length" => len = v.parse::<usize>().ok(),
                    "transfer-encoding" => chunked = v.contains("chunked"),
                    "connection" => close = v.contains("close"),
                    _ => {}
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                conn.read_line(&mut line)?;
                let hex = line.trim().split(';').next().unwrap_or("");
                let n = usize::from_str_radix(hex, 16).with_context(|| format!("bad chunk size {line:?}"))?;
                if n == 0 {
                    // Trailers, then the empty line.
                    loop {
                        line.clear();
                        if conn.read_line(&mut line)? == 0 || line.trim().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let start = body.len();
                body.resize(start + n, 0);
                conn.read_exact(&mut body[start..])?;
                let mut crlf = [0u8; 2];
                conn.read_exact(&mut crlf)?;
            }
        } else if let Some(n) = len {
            body.resize(n, 0);
            conn.read_exact(&mut body)?;
        } else {
            conn.read_to_end(&mut body)?;
            close = true;
        }
        if close {
            self.conn = None;
        }
        Ok((status, body))
    }
}
