//! Kernel-side diagnostics (aya-log) on rare paths: a connect table that is full, a record
//! output that failed, an OOM record sent without its other part. Off by default and free when
//! off: the programs check the `AYA_LOG_LEVEL` global before formatting anything, and the
//! loader sets it to 0 unless `kernel_log` is on. When on, each record is logged through
//! `tracing` with the probe (the eBPF module that logged it) as a field.

use std::{os::fd::AsRawFd, sync::Arc};

use tokio::{io::unix::AsyncFd, sync::watch, task::JoinHandle};

use crate::health::Health;

/// `AYA_LOG_LEVEL` values: everything, or nothing.
pub const LEVEL_ALL: u8 = 5;
pub const LEVEL_OFF: u8 = 0;

/// Re-emits aya-log records as `tracing` events.
pub struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _m: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, r: &log::Record<'_>) {
        let probe = r.target().rsplit("::").next().unwrap_or("unknown");
        let msg = r.args().to_string();
        match r.level() {
            log::Level::Error => tracing::error!(target: "sensor::kernel", probe, "{msg}"),
            log::Level::Warn => tracing::warn!(target: "sensor::kernel", probe, "{msg}"),
            log::Level::Info => tracing::info!(target: "sensor::kernel", probe, "{msg}"),
            _ => tracing::debug!(target: "sensor::kernel", probe, "{msg}"),
        }
    }

    fn flush(&self) {}
}

pub type Logger = aya_log::EbpfLogger<KernelLog>;

/// Newtype so `AsyncFd` can own the logger (it needs `AsRawFd`).
struct Fd(Logger);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// Reads the kernel's log ring until `stop`; a malformed record (aya-log panics on one) is
/// counted as a failure of `kernel_log` and reading goes on.
pub fn spawn_reader(
    logger: Logger,
    health: Arc<Health>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<JoinHandle<()>> {
    // SAFETY: the logger owns its ring's fd (closed on drop) and `Fd` always returns that same
    // fd, for as long as the AsyncFd owns the logger.
    let mut fd = unsafe { AsyncFd::register_with_interest(Fd(logger), tokio::io::Interest::READABLE) }?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                guard = fd.readable_mut() => match guard {
                    Ok(mut g) => {
                        let flushed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| g.get_inner_mut().0.flush()));
                        if flushed.is_err() {
                            health.failed("kernel_log");
                        }
                        g.clear_ready();
                    }
                    Err(e) => {
                        health.failed("kernel_log");
                        tracing::error!(error = %e, "kernel log ring unreadable; kernel diagnostics stop");
                        return;
                    }
                },
                _ = stop.changed() => return,
            }
        }
    }))
}
