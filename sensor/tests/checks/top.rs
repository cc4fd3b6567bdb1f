//! `sensor top` in a real terminal.

use super::*;

pub(crate) fn nz(v: u16) -> std::num::NonZeroU16 {
    std::num::NonZeroU16::new(v).unwrap()
}

/// Runs `sensor top` on a pseudo-terminal of `cols` x `rows` and returns a handle to it.
pub(crate) struct Pty {
    pub(crate) master: std::fs::File,
    pub(crate) child: std::process::Child,
    pub(crate) parser: vt100::Parser,
}

impl Pty {
    pub(crate) fn spawn(args: &[&str], rows: u16, cols: u16) -> Pty {
        let (mut master, mut slave) = (0, 0);
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two fds into the provided ints; the winsize pointer is valid.
        let rc = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &ws) };
        assert_eq!(rc, 0, "openpty");
        use std::os::fd::FromRawFd;
        use std::os::unix::process::CommandExt;
        // SAFETY: the fds were just returned by openpty and are owned here.
        let (m, s) = unsafe { (std::fs::File::from_raw_fd(master), std::fs::File::from_raw_fd(slave)) };
        let mut cmd = std::process::Command::new(SENSOR);
        cmd.args(args)
            .env("TERM", "xterm-256color")
            .stdin(s.try_clone().unwrap())
            .stdout(s.try_clone().unwrap())
            .stderr(s);
        // SAFETY: setsid/ioctl are async-signal-safe; they make the pty the controlling terminal.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                libc::ioctl(0, libc::TIOCSCTTY, 0);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        // SAFETY: fcntl on our own fd.
        unsafe {
            let fl = libc::fcntl(master, libc::F_GETFL);
            libc::fcntl(master, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        Pty {
            master: m,
            child,
            parser: vt100::Parser::new(nz(rows), nz(cols), 0),
        }
    }

    pub(crate) fn pump(&mut self) {
        let mut b = [0u8; 65536];
        loop {
            match self.master.read(&mut b) {
                Ok(0) => return,
                Ok(n) => self.parser.process(&b[..n]),
                Err(_) => return,
            }
        }
    }

    /// Waits until the screen contains every needle; returns the screen text.
    pub(crate) fn wait_for(&mut self, needles: &[&str], limit: Duration) -> String {
        let start = Instant::now();
        loop {
            self.pump();
            let screen = self.parser.screen().contents();
            if needles.iter().all(|n| screen.contains(n)) {
                return screen;
            }
            assert!(
                start.elapsed() < limit,
                "screen lacks {needles:?} after {limit:?}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn resize(&mut self, rows: u16, cols: u16) {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        use std::os::fd::AsRawFd;
        // SAFETY: TIOCSWINSZ on the pty master with a valid winsize; the kernel sends SIGWINCH.
        unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        self.parser.screen_mut().set_size(nz(rows), nz(cols));
    }
}

#[test]
fn sensor_top_in_a_terminal() {
    let up = http_server(200, Duration::ZERO, "ok");
    let closed = free_port();
    let d = daemon_with(
        "top.yaml",
        &format!(
            "alerting: {{window: 1s, min_samples: 2}}
checks:
  - {{name: api-ok, type: http, url: 'http://{up}/', interval: 200ms}}
  - {{name: api-down, type: http, url: 'http://127.0.0.1:{closed}/', interval: 200ms}}
"
        ),
    );
    // Let the alert fire before the dashboard starts.
    d.wait_metric(
        "sensor_check_alert_firing",
        &[("check", "api-down")],
        1.0,
        Duration::from_secs(10),
    );
    let url = format!("http://127.0.0.1:{}", d.port);
    let mut t = Pty::spawn(
        &["top", "--url", &url, "--refresh", "500ms", "--refresh-long", "1s"],
        30,
        130,
    );
    let screen = t.wait_for(
        &[
            "Checks: last 10 minutes",
            "Checks: last hour",
            "api-ok",
            "api-down",
            "Website api-down is down.",
        ],
        Duration::from_secs(10),
    );
    let row = |name: &str, screen: &str| -> String {
        screen
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_default()
            .to_string()
    };
    let ok_row = row("api-ok", &screen);
    assert!(
        ok_row.contains(" up ") && ok_row.contains("100.0%") && ok_row.contains("200:"),
        "{ok_row}\n{screen}"
    );
    let down_row = row("api-down", &screen);
    assert!(
        down_row.contains("DOWN") && down_row.contains("0.0%") && down_row.contains("connect: Conn"),
        "{down_row}\n{screen}"
    );
    assert!(screen.contains("checks-only daemon"), "{screen}");
    assert!(screen.lines().all(|l| l.chars().count() <= 130));

    // Resize: the layout follows the new width.
    t.resize(24, 100);
    let start = Instant::now();
    loop {
        t.pump();
        let screen = t.parser.screen().contents();
        let border = screen
            .lines()
            .find(|l| l.contains("Checks: last 10 minutes"))
            .unwrap_or_default()
            .trim_end()
            .to_string();
        if border.chars().count() == 100 && border.ends_with('┐') {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "box not redrawn at 100 columns: {border:?}\n{screen}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // q quits and restores the terminal.
    t.master.write_all(b"q").unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = t.child.try_wait().unwrap() {
            break st;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "top did not quit on q");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    // `--once` prints the same dashboard without a terminal.
    let out = std::process::Command::new(SENSOR)
        .args(["top", "--once", "--url", &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("api-down") && text.contains("Alerts (1 in history"),
        "{text}"
    );
    drop(d);
}
