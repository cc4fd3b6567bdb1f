//! Pressure stall information: parsing the pressure files and kernel PSI triggers.

use std::{
    io::Write as _,
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::{io::unix::AsyncFd, sync::watch};

use super::config::{PsiLevel, PsiTrigger};
use crate::cgroup::Hierarchies;

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

/// Parses a memory pressure file (`some avg10=.. avg60=.. avg300=.. total=..` and `full ...`,
/// with procfs' parser); `None` when it is not one.
pub fn parse(text: &str) -> Option<Psi> {
    use procfs::FromBufRead as _;
    let p = procfs::MemoryPressure::from_buf_read(text.as_bytes()).ok()?;
    // procfs keeps the averages as f32; through their decimal text they stay what the file says.
    let exact = |v: f32| v.to_string().parse::<f64>().unwrap_or(f64::from(v));
    let line = |r: &procfs::PressureRecord| PsiLine {
        avg10: exact(r.avg10),
        avg60: exact(r.avg60),
        avg300: exact(r.avg300),
        total_us: r.total,
    };
    Some(Psi {
        some: line(&p.some),
        full: Some(line(&p.full)),
    })
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

/// Turns trigger firings into crossings. The kernel fires at most once per window while the
/// threshold is exceeded, and not at regular intervals, so an episode starts at a firing and
/// ends only when the pressure file shows the stall over a whole window back below the
/// threshold: one event per crossing, however long the pressure lasts.
#[derive(Debug, Default)]
pub struct Episodes {
    active: bool,
    /// `(when, total stall in us)` samples covering at least the last window.
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl Episodes {
    /// A firing; true when it starts a new episode (the caller reports it). The kernel can fire
    /// late: its growth adds a share of the previous window's stall, so a firing can come after
    /// the stall stopped or fell under the threshold (seen: 3.7 s after, with no stall since; and
    /// 2 s after a burst, with a small tail under the threshold, which made one burst two
    /// episodes). The caller samples just before, and the samples span at least `window`, so
    /// their growth is never less than the stall over the exact last window: when even that is
    /// under `threshold` the last window was under it too, and the firing is ignored. A firing
    /// at the start of a crossing is never early (the kernel's current window started inside the
    /// last one), so no real crossing is dropped.
    pub fn fire(&mut self, window: Duration, threshold: Duration) -> bool {
        if self.active {
            return false;
        }
        if self.growth(window).is_some_and(|g| g < threshold) {
            return false;
        }
        self.active = true;
        true
    }

    /// Stall over the last `window`, if the samples cover one.
    fn growth(&self, window: Duration) -> Option<Duration> {
        let (&(first_at, first), &(last_at, last)) = (self.samples.front()?, self.samples.back()?);
        (last_at.saturating_duration_since(first_at) >= window)
            .then(|| Duration::from_micros(last.saturating_sub(first)))
    }

    /// A sample of the file's total stall time; ends the episode once the stall over the last
    /// `window` is below `threshold`.
    pub fn sample(&mut self, at: Instant, total_us: u64, window: Duration, threshold: Duration) {
        self.samples.push_back((at, total_us));
        while self.samples.len() > 2 && self.samples[1].0 + window <= at {
            self.samples.pop_front();
        }
        if self.active && self.growth(window).is_some_and(|g| g < threshold) {
            self.active = false;
        }
    }

    pub fn active(&self) -> bool {
        self.active
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

/// Registers `trigger` on a pressure file and calls `on_fire` once per crossing until `stop`.
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
        let mut episodes = Episodes::default();
        let mut tick = tokio::time::interval(trigger.window / 4);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Some(p) = read(&file) {
                        let line = match trigger.level {
                            PsiLevel::Some => Some(p.some),
                            PsiLevel::Full => p.full,
                        };
                        if let Some(l) = line {
                            episodes.sample(Instant::now(), l.total_us, trigger.window, trigger.stall);
                        }
                    }
                }
                ready = fd.ready(tokio::io::Interest::PRIORITY) => match ready {
                    Ok(mut guard) => {
                        guard.clear_ready();
                        // A fresh sample, so the check below sees the stall up to now.
                        if let Some(l) = read(&file).and_then(|p| match trigger.level {
                            PsiLevel::Some => Some(p.some),
                            PsiLevel::Full => p.full,
                        }) {
                            episodes.sample(Instant::now(), l.total_us, trigger.window, trigger.stall);
                        }
                        if episodes.fire(trigger.window, trigger.stall) {
                            on_fire(Crossing { file: file.clone(), trigger, at: Instant::now() });
                        }
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

pub const HOST_PSI: &str = "/proc/pressure/memory";

/// What this host offers for memory pressure, for `doctor`.
#[derive(Debug, Clone, Serialize)]
pub struct Sources {
    pub host_psi: bool,
    pub cgroup_psi: bool,
    pub memory_events: &'static str,
    pub notes: Vec<String>,
}

pub fn sources(h: &Hierarchies) -> Sources {
    let mut notes = Vec::new();
    let host_psi = read(Path::new(HOST_PSI)).is_some();
    if !host_psi {
        notes.push(format!(
            "{HOST_PSI} unreadable: the kernel lacks CONFIG_PSI or booted with psi=0"
        ));
    }
    let cgroup_psi = !h.memory_is_v1() && h.memory_root().is_some() && host_psi;
    if h.memory_is_v1() {
        notes.push(
            "the memory controller is on cgroup v1 (v1 or hybrid host): per-cgroup PSI does not exist there; host PSI and the eBPF reclaim histograms still work, and memory.events comes from memory.failcnt and memory.oom_control"
                .to_string(),
        );
    }
    let memory_events = if h.memory_root().is_none() {
        "unavailable (no memory cgroup hierarchy mounted)"
    } else if h.memory_is_v1() {
        "cgroup v1: memory.failcnt + memory.memsw.failcnt (as event=\"max\") and memory.oom_control oom_kill"
    } else {
        "cgroup v2: memory.events"
    };
    Sources {
        host_psi,
        cgroup_psi,
        memory_events,
        notes,
    }
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
        assert!(
            parse("some avg10=0.00 avg60=0.00 avg300=0.00 total=5\n").is_none(),
            "memory pressure always has its full line"
        );
        assert_eq!(
            parse("some avg10=0.12 avg60=0.00 avg300=0.00 total=5\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=1\n")
                .unwrap()
                .some
                .avg10,
            0.12,
            "averages keep their decimal value"
        );
        assert!(parse("").is_none());
        assert!(parse("garbage\nsome avg10=x total=1\n").is_none());
    }

    #[test]
    fn one_event_per_crossing() {
        let w = Duration::from_secs(2);
        let th = Duration::from_millis(50);
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let mut e = Episodes::default();
        e.sample(ms(0), 0, w, th);
        assert!(e.fire(w, th), "first firing starts an episode");
        // Pressure keeps growing 100 ms per window: the episode goes on, firings are absorbed.
        for i in 1..=8u64 {
            e.sample(ms(i * 500), i * 25_000, w, th);
        }
        assert!(e.active());
        assert!(!e.fire(w, th), "a firing during the episode is the same crossing");
        // Quiet: the total stops growing; once a whole window shows less than the threshold, the
        // episode ends.
        e.sample(ms(4500), 200_000, w, th);
        e.sample(ms(5000), 200_000, w, th);
        assert!(e.active(), "one quiet half-window is not enough");
        for i in 11..=14u64 {
            e.sample(ms(i * 500), 200_000, w, th);
        }
        assert!(!e.active());
        assert!(
            !e.fire(w, th),
            "a late kernel firing with no stall in the last window is ignored"
        );
        // A late firing after a small tail under the threshold (20 ms of 50 ms in the window).
        e.sample(ms(7200), 210_000, w, th);
        e.sample(ms(7400), 220_000, w, th);
        assert!(
            !e.fire(w, th),
            "a late kernel firing with a tail under the threshold in the last window is ignored"
        );
        for i in 15..=19u64 {
            e.sample(ms(i * 500), 200_000 + (i - 14) * 40_000, w, th);
        }
        assert!(
            e.fire(w, th),
            "a new crossing after the pressure fell below the threshold"
        );
    }

    #[test]
    fn short_history_never_ends_an_episode() {
        let w = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut e = Episodes::default();
        assert!(e.fire(w, Duration::from_secs(1)), "no history yet: trust the kernel");
        e.sample(t0, 5, w, Duration::from_secs(1));
        e.sample(t0 + Duration::from_secs(1), 5, w, Duration::from_secs(1));
        assert!(
            e.active(),
            "less than a window of samples cannot show the pressure is gone"
        );
    }

    #[test]
    fn v1_and_v2_sources_are_described() {
        let v1 = Hierarchies {
            memory_v1: Some("/sys/fs/cgroup/memory".into()),
            unified: Some("/sys/fs/cgroup/unified".into()),
        };
        let s = sources(&v1);
        assert!(!s.cgroup_psi);
        assert!(s.notes.iter().any(|n| n.contains("per-cgroup PSI does not exist")));
        assert!(s.memory_events.contains("memory.failcnt"));
        let v2 = Hierarchies {
            memory_v1: None,
            unified: Some("/sys/fs/cgroup".into()),
        };
        assert!(sources(&v2).memory_events.contains("memory.events"));
    }
}
