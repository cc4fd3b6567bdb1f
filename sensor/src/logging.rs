//! Logging that can never stop the sensor.
//!
//! A container's stderr goes to a pipe read by a log shim or journald, and that reader stalls
//! exactly when the host is out of memory: the moment the sensor exists for. So log lines go
//! through a bounded in-memory queue to one writer thread (tracing-appender's non-blocking
//! writer); when the queue is full a line is dropped and counted, and a failed write (EPIPE, a
//! closed stderr) is counted the same way. No task ever waits on stderr, and no write error
//! ever panics (tracing-subscriber's own error report is an `eprintln!`, which panics on a
//! broken stderr, so it is turned off). Panics are reported through the same queue: the default
//! panic hook writes to stderr directly and would block a panicking task on a stalled pipe.

use std::{
    io::{self, Write},
    sync::{
        atomic::{AtomicU64, Ordering},
        OnceLock,
    },
    time::Duration,
};

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

/// Lines queued for the writer thread before new ones are dropped: about 16 MB at worst
/// (a kill line is ~1 KB), minutes of a 500 kills/s storm.
pub const QUEUE_LINES: usize = 16_384;

static QUEUE_DROPS: OnceLock<ErrorCounter> = OnceLock::new();
static WRITE_FAILURES: AtomicU64 = AtomicU64::new(0);

/// Log lines lost so far: dropped at the full queue plus lines whose write failed.
pub fn lines_dropped() -> u64 {
    let queued = QUEUE_DROPS.get().map_or(0, |c| c.dropped_lines() as u64);
    queued + WRITE_FAILURES.load(Ordering::Relaxed)
}

/// stderr that counts lines it could not write instead of reporting them (to whom?).
struct CountingStderr;

impl Write for CountingStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::stderr().write(buf)
    }

    /// The writer thread writes each line with one `write_all`, so one failure is one line.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let r = io::stderr().lock().write_all(buf);
        if r.is_err() {
            WRITE_FAILURES.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn flush(&mut self) -> io::Result<()> {
        // stderr is unbuffered; a flush error would only be reported by the worker with an
        // `eprintln!`.
        Ok(())
    }
}

/// Keeps the writer thread; [`LogGuard::finish`] flushes what is queued, within a bound.
pub struct LogGuard(Option<WorkerGuard>);

impl LogGuard {
    /// Gives the writer thread up to `limit` to write what is queued. Dropping tracing-appender's
    /// guard can block on a stalled stdout (it reports a full queue with `println!`), so it is
    /// dropped on a helper thread that is abandoned after `limit`.
    pub fn finish(mut self, limit: Duration) {
        let Some(guard) = self.0.take() else { return };
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("sensor-log-flush".into())
            .spawn(move || {
                drop(guard);
                let _ = tx.send(());
            });
        if spawned.is_ok() {
            let _ = rx.recv_timeout(limit);
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some(g) = self.0.take() {
            // Never block exit on a stalled log consumer (see `finish`).
            std::mem::forget(g);
        }
    }
}

/// Installs the global subscriber (`text` or `json` on stderr, filtered by `RUST_LOG`, default
/// `info`, at most `queue_lines` waiting) and the panic hook.
pub fn init(format: &str, queue_lines: usize) -> LogGuard {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(queue_lines.max(1))
        .thread_name("sensor-log")
        .finish(CountingStderr);
    let _ = QUEUE_DROPS.set(writer.error_counter());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = io::IsTerminal::is_terminal(&io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi)
        .log_internal_errors(false);
    let installed = if format == "json" {
        b.json().try_init()
    } else {
        b.try_init()
    };
    if installed.is_ok() {
        std::panic::set_hook(Box::new(|info| {
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("unnamed");
            tracing::error!(thread = name, "panic: {info}");
        }));
    }
    LogGuard(Some(guard))
}
