//! `cargo xtask run --until-ready`: the README's first command made scriptable. The daemon runs
//! as `cargo xtask run` runs it (embedded default config, extra args passed on), must answer
//! `/readyz` 200, and must exit 0 on SIGTERM; CI runs this first, before anything is installed.

use std::{
    ffi::OsString,
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{net, step};

/// How long the daemon may take to become ready (probes load in a few seconds).
const READY_WITHIN: Duration = Duration::from_secs(120);
/// How long it may take to exit after SIGTERM.
const EXIT_WITHIN: Duration = Duration::from_secs(30);

/// The daemon's default listen address (CONVENTIONS: `0.0.0.0:9442`), or the one `--listen`
/// gives, as a loopback address to ask.
fn readyz_addr(args: &[OsString]) -> Result<SocketAddr> {
    let mut listen = "0.0.0.0:9442".to_string();
    let mut it = args.iter().filter_map(|a| a.to_str());
    while let Some(a) = it.next() {
        if a == "--listen" {
            listen = it.next().context("--listen needs an address")?.to_string();
        } else if let Some(v) = a.strip_prefix("--listen=") {
            listen = v.to_string();
        }
    }
    let addr: SocketAddr = listen.parse().with_context(|| format!("--listen {listen}"))?;
    let ip = if addr.ip().is_unspecified() {
        [127, 0, 0, 1].into()
    } else {
        addr.ip()
    };
    Ok(SocketAddr::new(ip, addr.port()))
}

/// Starts `bin run ARGS`, waits for `/readyz` 200, sends SIGTERM and requires exit status 0.
pub fn until_ready(bin: &Path, args: &[OsString]) -> Result<()> {
    let addr = readyz_addr(args)?;
    step(&format!(
        "starting {} run; waiting for http://{addr}/readyz",
        bin.display()
    ));
    let started = Instant::now();
    let mut child = Command::new(bin)
        .arg("run")
        .args(args)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let ready = loop {
        if let Some(status) = child.try_wait()? {
            bail!("the daemon exited before it was ready: {status}");
        }
        if matches!(net::http_get(addr, "/readyz"), Ok((200, _))) {
            break started.elapsed();
        }
        if started.elapsed() > READY_WITHIN {
            net::stop_child(child, libc::SIGKILL);
            bail!("/readyz did not answer 200 within {} s", READY_WITHIN.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    step(&format!(
        "/readyz answered 200 after {:.1} s; sending SIGTERM",
        ready.as_secs_f64()
    ));
    // SAFETY: kill(2) on our own child, which has not been reaped (try_wait saw it running).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let term = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if term.elapsed() > EXIT_WITHIN {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the daemon did not exit within {} s of SIGTERM", EXIT_WITHIN.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !status.success() {
        bail!("the daemon exited with {status} on SIGTERM, not 0");
    }
    step(&format!(
        "first run: ready in {:.1} s, exited 0 on SIGTERM in {} ms",
        ready.as_secs_f64(),
        term.elapsed().as_millis()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readyz_is_asked_on_loopback_at_the_listen_port() {
        let a = |v: &[&str]| readyz_addr(&v.iter().map(OsString::from).collect::<Vec<_>>()).unwrap();
        assert_eq!(a(&[]), "127.0.0.1:9442".parse().unwrap());
        assert_eq!(a(&["--listen", "0.0.0.0:9500"]), "127.0.0.1:9500".parse().unwrap());
        assert_eq!(a(&["--listen=127.0.0.2:1"]), "127.0.0.2:1".parse().unwrap());
    }
}
