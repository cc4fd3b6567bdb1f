//! Userspace side of the kernel-to-user transport: one tokio task per CPU ring, each
//! draining its perf buffer into the dispatcher, plus the kernel's per-probe counters.

use std::{
    os::fd::AsRawFd,
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::FutureExt as _;

use aya::maps::{
    perf::{PerfEvent, PerfEventArray, PerfEventArrayBuffer},
    MapData, PerCpuArray,
};
use sensor_common::record::{counter, COUNTER_ENTRIES};
use tokio::{io::unix::AsyncFd, sync::watch, task::JoinHandle};

/// Receives every raw sample; implemented by the dispatcher.
pub trait Sink: Send + Sync + 'static {
    fn sample(&self, bytes: &[u8]);
    /// The kernel reported samples lost at the perf ring itself (already counted in the kernel
    /// per-CPU counter by the failed output call; reported here for diagnostics).
    fn ring_lost(&self, cpu: u32, count: u64);
    /// Handling `bytes` panicked: the record is lost and must be counted as such.
    fn sample_failed(&self, bytes: &[u8]);
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map {0}: {1}")]
    Map(&'static str, String),
    #[error("cannot list online CPUs: {0}")]
    Cpus(String),
}

/// Newtype so `AsyncFd` can own the buffer (it needs `AsRawFd`).
struct Ring(PerfEventArrayBuffer<MapData>);

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// A CPU's perf ring, opened (and so in the `EVENTS` map) but not read yet.
pub struct OpenRing {
    cpu: u32,
    buf: PerfEventArrayBuffer<MapData>,
}

/// Opens every online CPU's ring of `pages` pages. Done before any program attaches: an
/// output to a CPU whose ring is not in the map yet fails, and the event would be lost.
pub fn open_rings(events: aya::maps::Map, pages: usize) -> Result<Vec<OpenRing>, TransportError> {
    let mut array: PerfEventArray<MapData> =
        PerfEventArray::try_from(events).map_err(|e| TransportError::Map("EVENTS", e.to_string()))?;
    let cpus = aya::util::online_cpus().map_err(|(what, e)| TransportError::Cpus(format!("{what}: {e}")))?;
    cpus.into_iter()
        .map(|cpu| {
            let buf = array
                .open(cpu, Some(pages))
                .map_err(|e| TransportError::Map("EVENTS", format!("cpu {cpu}: {e}")))?;
            Ok(OpenRing { cpu, buf })
        })
        .collect()
}

/// Told when a ring's reader stops running and when it runs again.
pub trait ReaderWatch: Send + Sync + 'static {
    fn reader_running(&self, cpu: u32, running: bool);
    /// The reader failed (an error or a panic); it restarts after a pause.
    fn reader_failed(&self, cpu: u32, why: &str);
}

impl ReaderWatch for crate::health::Health {
    fn reader_running(&self, cpu: u32, running: bool) {
        self.set_running(&format!("ring reader cpu {cpu}"), running);
    }

    fn reader_failed(&self, _cpu: u32, _why: &str) {
        self.failed("ring_reader");
    }
}

/// Spawns a supervised reader task per ring (see [`open_rings`]). A reader that fails is
/// restarted on the same ring (nothing the kernel wrote is lost with it); readers exit after a
/// final drain once `shutdown` flips to true.
pub fn spawn_readers(
    rings: Vec<OpenRing>,
    sink: Arc<dyn Sink>,
    watch: Arc<dyn ReaderWatch>,
    shutdown: watch::Receiver<bool>,
) -> Result<Vec<JoinHandle<()>>, TransportError> {
    let mut handles = Vec::new();
    for OpenRing { cpu, buf } in rings {
        // SAFETY: the perf buffer owns its fd (opened by `open`, closed on drop) and `Ring`
        // always returns that same fd, for as long as the AsyncFd owns the buffer.
        let fd = unsafe { AsyncFd::register_with_interest(Ring(buf), tokio::io::Interest::READABLE) }
            .map_err(|e| TransportError::Map("EVENTS", format!("cpu {cpu}: epoll: {e}")))?;
        watch.reader_running(cpu, true);
        let reader = Reader {
            cpu,
            fd,
            sink: Arc::clone(&sink),
        };
        handles.push(tokio::spawn(supervise(reader, Arc::clone(&watch), shutdown.clone())));
    }
    Ok(handles)
}

/// First pause before a failed reader restarts; doubles up to [`MAX_PAUSE`] while it keeps
/// failing.
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_secs(5);

struct Reader {
    cpu: u32,
    fd: AsyncFd<Ring>,
    sink: Arc<dyn Sink>,
}

/// Why a reader's loop returned.
enum Exit {
    Shutdown,
    Failed(String),
}

/// Runs the reader; after a failure (error or panic) counts it, waits and runs it again. The
/// ring lives here, outside the loop that can fail, so a restart resumes where the kernel is.
async fn supervise(mut r: Reader, watch: Arc<dyn ReaderWatch>, mut shutdown: watch::Receiver<bool>) {
    let mut pause = FIRST_PAUSE;
    loop {
        let started = Instant::now();
        let run = AssertUnwindSafe(r.read(&mut shutdown)).catch_unwind().await;
        let why = match run {
            Ok(Exit::Shutdown) => return,
            Ok(Exit::Failed(why)) => why,
            Err(panic) => format!("panicked: {}", panic_message(panic.as_ref())),
        };
        watch.reader_running(r.cpu, false);
        watch.reader_failed(r.cpu, &why);
        if started.elapsed() > MAX_PAUSE * 2 {
            pause = FIRST_PAUSE;
        }
        tracing::error!(cpu = r.cpu, error = %why, pause = ?pause, "perf ring reader failed; restarting it");
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    r.drain();
                    return;
                }
            }
        }
        pause = (pause * 2).min(MAX_PAUSE);
        watch.reader_running(r.cpu, true);
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

impl Reader {
    async fn read(&mut self, shutdown: &mut watch::Receiver<bool>) -> Exit {
        loop {
            tokio::select! {
                guard = self.fd.readable_mut() => {
                    match guard {
                        Ok(mut g) => {
                            drain(self.cpu, &mut g.get_inner_mut().0, self.sink.as_ref());
                            g.clear_ready();
                        }
                        Err(e) => return Exit::Failed(format!("poll: {e}")),
                    }
                }
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        // Final flush: whatever the kernel wrote before detach is still delivered.
                        self.drain();
                        return Exit::Shutdown;
                    }
                }
            }
        }
    }

    fn drain(&mut self) {
        drain(self.cpu, &mut self.fd.get_mut().0, self.sink.as_ref());
    }
}

/// Hands every sample to the sink. A sample whose handling panics is reported to the sink as
/// failed (counted as lost) and the drain goes on, so one bad record never stops the ring.
fn drain(cpu: u32, buf: &mut PerfEventArrayBuffer<MapData>, sink: &dyn Sink) {
    let deliver = |bytes: &[u8]| {
        if std::panic::catch_unwind(AssertUnwindSafe(|| sink.sample(bytes))).is_err() {
            sink.sample_failed(bytes);
        }
    };
    let mut scratch = Vec::new();
    buf.for_each(|ev| match ev {
        PerfEvent::Sample { head, tail } => {
            if tail.is_empty() {
                deliver(head);
            } else {
                scratch.clear();
                scratch.extend_from_slice(head);
                scratch.extend_from_slice(tail);
                deliver(&scratch);
            }
        }
        PerfEvent::Lost { count } => sink.ring_lost(cpu, count),
        #[allow(unreachable_patterns)]
        _ => {}
    });
}

/// The kernel's per-probe counters (`COUNTERS` map), summed over CPUs.
pub struct KernelCounters {
    map: PerCpuArray<MapData, u64>,
}

/// Lost-event reasons exported as `sensor_events_lost_total{reason}`.
pub const LOST_REASONS: &[(u32, &str)] = &[
    (counter::LOST_BUFFER_FULL, "buffer_full"),
    (counter::LOST_MAP_FULL, "map_full"),
    (counter::LOST_NO_SCRATCH, "no_scratch"),
    (counter::LOST_UNTRACKED, "untracked"),
];

impl KernelCounters {
    pub fn new(map: aya::maps::Map) -> Result<KernelCounters, TransportError> {
        let map = PerCpuArray::try_from(map).map_err(|e| TransportError::Map("COUNTERS", e.to_string()))?;
        Ok(KernelCounters { map })
    }

    /// Sum over CPUs of counter `which` for probe `probe`.
    pub fn get(&self, probe: u32, which: u32) -> u64 {
        let idx = counter::index(probe, which);
        if idx >= COUNTER_ENTRIES {
            return 0;
        }
        self.map
            .get(&idx, 0)
            .map(|vals| vals.iter().copied().fold(0u64, u64::wrapping_add))
            .unwrap_or(0)
    }
}
