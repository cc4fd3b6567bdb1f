//! Synthetic checks against real servers on loopback: HTTP phases and failures, TLS with a CA
//! generated here, websocket streams with JSON gauges and error closes, the availability alert
//! on a real daemon (down, then recovery, delivered to a real webhook), and `sensor top` in a
//! real pseudo-terminal. The daemon runs with every probe disabled: checks need no BPF.

#[path = "../common/mod.rs"]
mod common;

use std::{
    io::{Read, Write},
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use common::{free_port, metric, Daemon, SENSOR};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};
use tokio_tungstenite::tungstenite::{
    protocol::{frame::coding::CloseCode, CloseFrame},
    Message,
};

const NO_PROBES: &str = "probes: {oom: {enabled: false}, memcg: {enabled: false}, tcp: {enabled: false}}\n";

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sensor-checks-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// `sensor check` on `cfg` until its check `authorized` succeeds (the server under test may
/// still be starting), for at most 15 s; the last results.
fn check_until_authorized(cfg: &PathBuf) -> Vec<serde_json::Value> {
    let start = Instant::now();
    loop {
        let r = sensor_check(cfg);
        if by_name(&r, "authorized")["success"] == true || start.elapsed() > Duration::from_secs(15) {
            return r;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A daemon started with the config `body` (written to `name`).
fn daemon_with(name: &str, body: &str) -> Daemon {
    let cfg = write_config(name, body);
    Daemon::start(&["--config", cfg.to_str().unwrap()])
}

fn write_config(name: &str, body: &str) -> PathBuf {
    let p = tmp(name);
    std::fs::write(&p, format!("{NO_PROBES}{body}")).unwrap();
    p
}

/// Reads one request head.
async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut buf = Vec::new();
    let mut b = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut b).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&b[..n]),
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// An HTTP server on loopback answering every request with `status`, after `delay`.
fn http_server(status: u16, delay: Duration, body: &'static str) -> SocketAddr {
    let l = rt().block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = l.local_addr().unwrap();
    rt().spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                read_head(&mut s).await;
                tokio::time::sleep(delay).await;
                let resp = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

fn sensor_check(config: &PathBuf) -> Vec<serde_json::Value> {
    let out = std::process::Command::new(SENSOR)
        .args(["check", "--json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn by_name<'a>(results: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    results
        .iter()
        .find(|r| r["check"] == name)
        .unwrap_or_else(|| panic!("no result for {name}: {results:?}"))
}

mod alert;
mod configs;
mod http;
mod tls;
mod top;
mod ws;

// Each part sees the others' helpers through `use super::*`.
#[allow(unused_imports)]
use self::{alert::*, configs::*, http::*, tls::*, top::*, ws::*};
