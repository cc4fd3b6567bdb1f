//! Pressure stall information: parsing the pressure files and kernel PSI triggers.

use std::{
    io::Write as _,
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tokio::{io::unix::AsyncFd, sync::watch};

use crate::config::PsiTrigger;

/// One line of a pressure file.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PsiLine {
    pub avg10: f64,
    pub avg60: f64,
    pub avg300: f64,
    /// Total stall time in microseconds.
    pub total_us: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Psi {
    pub some: PsiLine,
    /// Absent in the `cpu.pressure` of old kernels; always present for memory.
    pub full: Option<PsiLine>,
}

/// Parses `some avg10=.. avg60=.. avg300=.. total=..` / `full ...`; `None` if `some` is missing.
pub fn parse(text: &str) -> Option<Psi> {
    let mut some = None;
    let mut full = None;
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let kind = it.next();
        let mut l = PsiLine::default();
        let mut have_total = false;
        for kv in it {
            let Some((k, v)) = kv.split_once('=') else { continue };
            match k {
                "avg10" => l.avg10 = v.parse().ok()?,
                "avg60" => l.avg60 = v.parse().ok()?,
                "avg300" => l.avg300 = v.parse().ok()?,
                "total" => {
                    l.total_us = v.parse().ok()?;
                    have_total = true;
                }
                _ => {}
            }
        }
        if !have_total {
            continue;
        }
        match kind {
            Some("some") => some = Some(l),
            Some("full") => full = Some(l),
            _ => {}
        }
    }
    Some(Psi { some: some?, full })
}

pub fn read(path: &Path) -> Option<Psi> {
    parse(&std::fs::read_to_string(path).ok()?)
}

/// A crossing reported by a trigger.
#[derive(Debug, Clone)]
pub struct Crossing {
    pub file: PathBuf,
    pub trigger: PsiTrigger,
    pub at: Instant,
}

/// Groups trigger firings into episodes: the kernel fires at most once per window while the
/// threshold stays crossed, so firings less than two windows apart belong to one episode and
/// produce one event.
#[derive(Debug, Default)]
pub struct Episodes {
    last: Option<Instant>,
}

impl Episodes {
    /// True when this firing starts a new episode.
    pub fn fire(&mut self, at: Instant, window: Duration) -> bool {
        let new = self.last.is_none_or(|l| at.saturating_duration_since(l) > window * 2);
        self.last = Some(at);
        new
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("the kernel refused trigger '{spec}' on {path}: {source}")]
    Register {
        path: PathBuf,
        spec: String,
        source: std::io::Error,
    },
}

struct Fd(std::fs::File);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// Registers `trigger` on a pressure file and calls `on_fire` on each firing until `stop`.
/// The kernel keeps the trigger while the file stays open; it goes away with the task.
pub fn spawn(
    file: PathBuf,
    trigger: PsiTrigger,
    mut stop: watch::Receiver<bool>,
    on_fire: impl Fn(Crossing) + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>, TriggerError> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&file)
        .map_err(|source| TriggerError::Open {
            path: file.clone(),
            source,
        })?;
    let spec = format!(
        "{} {} {}",
        trigger.level.label(),
        trigger.stall.as_micros(),
        trigger.window.as_micros()
    );
    // The kernel parses the string including the terminating NUL.
    let mut bytes = spec.clone().into_bytes();
    bytes.push(0);
    f.write_all(&bytes).map_err(|source| {
        let hint =
            if source.raw_os_error() == Some(libc::EINVAL) && !trigger.window.as_micros().is_multiple_of(2_000_000) {
                " (without CAP_SYS_RESOURCE the kernel only accepts windows that are multiples of 2s)"
            } else {
                ""
            };
        TriggerError::Register {
            path: file.clone(),
            spec: format!("{spec}{hint}"),
            source,
        }
    })?;
    // SAFETY: `Fd` owns the file, so the descriptor stays open and unchanged for as long as the
    // AsyncFd holds it.
    let fd = unsafe { AsyncFd::register_with_interest(Fd(f), tokio::io::Interest::PRIORITY) }.map_err(|e| {
        TriggerError::Register {
            path: file.clone(),
            spec,
            source: e.into(),
        }
    })?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                ready = fd.ready(tokio::io::Interest::PRIORITY) => match ready {
                    Ok(mut guard) => {
                        guard.clear_ready();
                        on_fire(Crossing { file: file.clone(), trigger, at: Instant::now() });
                    }
                    Err(e) => {
                        tracing::warn!(file = %file.display(), error = %e, "PSI trigger stopped");
                        return;
                    }
                },
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        return;
                    }
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pressure_files() {
        let p = parse("some avg10=1.50 avg60=0.20 avg300=0.00 total=170171\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=106957\n").unwrap();
        assert_eq!(p.some.total_us, 170171);
        assert_eq!(p.some.avg10, 1.5);
        assert_eq!(p.full.unwrap().total_us, 106957);
        let no_full = parse("some avg10=0.00 avg60=0.00 avg300=0.00 total=5\n").unwrap();
        assert!(no_full.full.is_none());
        assert!(parse("").is_none());
        assert!(parse("garbage\nsome avg10=x total=1\n").is_none());
    }

    #[test]
    fn episodes_dedupe_sustained_pressure() {
        let w = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut e = Episodes::default();
        assert!(e.fire(t0, w));
        assert!(
            !e.fire(t0 + Duration::from_secs(10), w),
            "still crossed one window later"
        );
        assert!(!e.fire(t0 + Duration::from_secs(20), w));
        assert!(
            e.fire(t0 + Duration::from_secs(45), w),
            "quiet for more than two windows: new episode"
        );
    }
}
