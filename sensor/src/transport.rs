//! Userspace side of the kernel-to-user transport: one tokio task per CPU ring, each
//! draining its perf buffer into the dispatcher, plus the kernel's per-probe counters.

use std::{
    future::Future,
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
use sensor_common::{
    names::maps,
    record::{counter, COUNTER_ENTRIES},
};
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
        PerfEventArray::try_from(events).map_err(|e| TransportError::Map(maps::EVENTS, e.to_string()))?;
    let cpus = aya::util::online_cpus().map_err(|(what, e)| TransportError::Cpus(format!("{what}: {e}")))?;
    cpus.into_iter()
        .map(|cpu| {
            let buf = array
                .open(cpu, Some(pages))
                .map_err(|e| TransportError::Map(maps::EVENTS, format!("cpu {cpu}: {e}")))?;
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
            .map_err(|e| TransportError::Map(maps::EVENTS, format!("cpu {cpu}: epoll: {e}")))?;
        watch.reader_running(cpu, true);
        let reader = Reader {
            cpu,
            ring: PerfRing::new(cpu, fd),
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

/// What a reader reads: a CPU's perf ring, or a scripted ring in tests.
trait RingSource: Send + 'static {
    /// Waits until the ring has data, then hands every sample to `sink`.
    fn next_batch<'a>(&'a mut self, sink: &'a dyn Sink) -> impl Future<Output = std::io::Result<()>> + Send + 'a;
    /// Hands what the ring holds now to `sink`, without waiting.
    fn drain_now(&mut self, sink: &dyn Sink);
}

/// Records within [`STORM_WINDOW`] that switch a ring to polling: above about 3,000 a second
/// a wakeup per record (epoll, a task wake) costs more than reading them.
const STORM_RECORDS: u32 = 32;
const STORM_WINDOW: Duration = Duration::from_millis(10);
/// How often a ring in a storm is read. Also the most any record (an OOM kill during a connect
/// storm) waits then; outside storms every record wakes its reader at once.
const STORM_POLL: Duration = Duration::from_millis(2);

/// How a ring's reader learns of new records.
enum Wait {
    /// Registered with epoll: woken by the kernel for every record (quiet times).
    Woken(AsyncFd<Ring>),
    /// Out of epoll, read every [`STORM_POLL`] (a storm): the kernel's wakeups reach nobody,
    /// so they cost the reader nothing. Back to `Woken` after a read that finds nothing.
    Polled(Ring),
    /// Between the two (only while switching).
    Switching,
}

/// Records read per [`STORM_WINDOW`]: tells a storm from quiet times.
struct Rate {
    /// Start of the current window and the records read in it.
    window: (Instant, u32),
}

impl Rate {
    fn new(now: Instant) -> Rate {
        Rate { window: (now, 0) }
    }

    /// Counts `n` records read at `now`; true when the rate makes it a storm.
    fn storm(&mut self, n: usize, now: Instant) -> bool {
        if now.duration_since(self.window.0) > STORM_WINDOW {
            self.window = (now, 0);
        }
        self.window.1 = self.window.1.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        self.window.1 >= STORM_RECORDS
    }
}

struct PerfRing {
    cpu: u32,
    wait: Wait,
    rate: Rate,
}

impl PerfRing {
    fn new(cpu: u32, fd: AsyncFd<Ring>) -> PerfRing {
        PerfRing {
            cpu,
            wait: Wait::Woken(fd),
            rate: Rate::new(Instant::now()),
        }
    }

    fn start_polling(&mut self) {
        if let Wait::Woken(fd) = std::mem::replace(&mut self.wait, Wait::Switching) {
            tracing::debug!(cpu = self.cpu, "record storm: reading the ring every {STORM_POLL:?}");
            self.wait = Wait::Polled(fd.into_inner());
        }
    }

    fn start_waking(&mut self) -> std::io::Result<()> {
        let Wait::Polled(ring) = std::mem::replace(&mut self.wait, Wait::Switching) else {
            return Ok(());
        };
        // SAFETY: as in `spawn_readers`: the buffer owns its fd and `Ring` returns that fd.
        match unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) } {
            Ok(fd) => {
                self.wait = Wait::Woken(fd);
                self.rate = Rate::new(Instant::now());
                Ok(())
            }
            Err(e) => {
                let (ring, err) = e.into_parts();
                // Still read, on the timer, until a restart registers it again.
                self.wait = Wait::Polled(ring);
                Err(err)
            }
        }
    }

    fn buffer(&mut self) -> Option<&mut PerfEventArrayBuffer<MapData>> {
        match &mut self.wait {
            Wait::Woken(fd) => Some(&mut fd.get_mut().0),
            Wait::Polled(ring) => Some(&mut ring.0),
            Wait::Switching => None,
        }
    }
}

impl RingSource for PerfRing {
    async fn next_batch<'a>(&'a mut self, sink: &'a dyn Sink) -> std::io::Result<()> {
        match &mut self.wait {
            Wait::Woken(fd) => {
                let mut g = fd.readable_mut().await?;
                let n = drain(self.cpu, &mut g.get_inner_mut().0, sink);
                g.clear_ready();
                if self.rate.storm(n, Instant::now()) {
                    self.start_polling();
                }
            }
            Wait::Polled(_) => {
                tokio::time::sleep(STORM_POLL).await;
                let cpu = self.cpu;
                let n = self.buffer().map_or(0, |b| drain(cpu, b, sink));
                if n == 0 {
                    tracing::debug!(cpu, "record storm over: woken per record again");
                    self.start_waking()?;
                }
            }
            Wait::Switching => {
                return Err(std::io::Error::other("ring lost while switching how it is read"));
            }
        }
        Ok(())
    }

    fn drain_now(&mut self, sink: &dyn Sink) {
        let cpu = self.cpu;
        if let Some(b) = self.buffer() {
            drain(cpu, b, sink);
        }
    }
}

struct Reader<R> {
    cpu: u32,
    ring: R,
    sink: Arc<dyn Sink>,
}

/// Why a reader's loop returned.
enum Exit {
    Shutdown,
    Failed(String),
}

/// Runs the reader; after a failure (error or panic) counts it, waits and runs it again. The
/// ring lives here, outside the loop that can fail, so a restart resumes where the kernel is.
async fn supervise<R: RingSource>(mut r: Reader<R>, watch: Arc<dyn ReaderWatch>, mut shutdown: watch::Receiver<bool>) {
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
                    r.ring.drain_now(r.sink.as_ref());
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

impl<R: RingSource> Reader<R> {
    async fn read(&mut self, shutdown: &mut watch::Receiver<bool>) -> Exit {
        let Reader { ring, sink, .. } = self;
        loop {
            tokio::select! {
                batch = ring.next_batch(sink.as_ref()) => {
                    if let Err(e) = batch {
                        return Exit::Failed(format!("poll: {e}"));
                    }
                }
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        // Final flush: whatever the kernel wrote before detach is still delivered.
                        ring.drain_now(sink.as_ref());
                        return Exit::Shutdown;
                    }
                }
            }
        }
    }
}

/// Hands one sample to the sink. A sample whose handling panics is reported to the sink as
/// failed (counted as lost) and the caller goes on, so one bad record never stops the ring.
fn deliver(sink: &dyn Sink, bytes: &[u8]) {
    if std::panic::catch_unwind(AssertUnwindSafe(|| sink.sample(bytes))).is_err() {
        sink.sample_failed(bytes);
    }
}

/// Hands every sample in the ring to the sink; returns how many.
fn drain(cpu: u32, buf: &mut PerfEventArrayBuffer<MapData>, sink: &dyn Sink) -> usize {
    let mut scratch = Vec::new();
    let mut n = 0;
    buf.for_each(|ev| match ev {
        PerfEvent::Sample { head, tail } => {
            n += 1;
            if tail.is_empty() {
                deliver(sink, head);
            } else {
                scratch.clear();
                scratch.extend_from_slice(head);
                scratch.extend_from_slice(tail);
                deliver(sink, &scratch);
            }
        }
        PerfEvent::Lost { count } => sink.ring_lost(cpu, count),
        #[allow(unreachable_patterns)]
        _ => {}
    });
    n
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
        let map = PerCpuArray::try_from(map).map_err(|e| TransportError::Map(maps::COUNTERS, e.to_string()))?;
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

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, sync::Mutex};

    use super::*;

    /// One step of a scripted ring.
    enum Step {
        Samples(Vec<Vec<u8>>),
        Fail,
        Panic,
    }

    struct ScriptedRing {
        steps: VecDeque<Step>,
        /// Samples handed out by the final drain.
        left: Vec<Vec<u8>>,
    }

    impl RingSource for ScriptedRing {
        async fn next_batch<'a>(&'a mut self, sink: &'a dyn Sink) -> std::io::Result<()> {
            match self.steps.pop_front() {
                Some(Step::Samples(v)) => v.iter().for_each(|b| deliver(sink, b)),
                Some(Step::Fail) => return Err(std::io::Error::other("epoll broke")),
                Some(Step::Panic) => panic!("reader bug"),
                None => std::future::pending::<()>().await,
            }
            Ok(())
        }

        fn drain_now(&mut self, sink: &dyn Sink) {
            self.left.drain(..).for_each(|b| deliver(sink, &b));
        }
    }

    #[derive(Default)]
    struct Recorder {
        samples: Mutex<Vec<Vec<u8>>>,
        failed_samples: Mutex<Vec<Vec<u8>>>,
        running: Mutex<Vec<bool>>,
        failures: Mutex<Vec<String>>,
    }

    impl Sink for Recorder {
        fn sample(&self, bytes: &[u8]) {
            assert_ne!(bytes, b"poison", "handling this record panics");
            self.samples.lock().unwrap().push(bytes.to_vec());
        }
        fn ring_lost(&self, _cpu: u32, _count: u64) {}
        fn sample_failed(&self, bytes: &[u8]) {
            self.failed_samples.lock().unwrap().push(bytes.to_vec());
        }
    }

    impl ReaderWatch for Recorder {
        fn reader_running(&self, _cpu: u32, running: bool) {
            self.running.lock().unwrap().push(running);
        }
        fn reader_failed(&self, _cpu: u32, why: &str) {
            self.failures.lock().unwrap().push(why.to_string());
        }
    }

    #[test]
    fn a_storm_is_a_rate_not_a_count() {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let mut r = Rate::new(t0);
        // A record every millisecond (1,000 a second) never makes a storm.
        assert!((0..100).all(|i| !r.storm(1, ms(i))));
        // 32 within 10 ms (3,200 a second) do.
        let mut r = Rate::new(t0);
        assert!((0..31).all(|i| !r.storm(1, t0 + Duration::from_micros(100 * i))));
        assert!(r.storm(1, ms(4)));
        // A batch read after one wakeup counts as its records.
        assert!(Rate::new(t0).storm(40, ms(1)));
    }

    #[tokio::test]
    async fn a_failed_reader_restarts_on_the_same_ring_and_loses_nothing() {
        let rec = Arc::new(Recorder::default());
        let ring = ScriptedRing {
            steps: VecDeque::from([
                Step::Samples(vec![b"a".to_vec(), b"poison".to_vec(), b"b".to_vec()]),
                Step::Panic,
                Step::Samples(vec![b"c".to_vec()]),
                Step::Fail,
                Step::Samples(vec![b"d".to_vec()]),
            ]),
            left: vec![b"e".to_vec()],
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let reader = Reader {
            cpu: 3,
            ring,
            sink: Arc::clone(&rec) as Arc<dyn Sink>,
        };
        let task = tokio::spawn(supervise(reader, Arc::clone(&rec) as Arc<dyn ReaderWatch>, stop_rx));
        // Both failures pause (100 ms, then 200 ms) before the reader runs again.
        let start = Instant::now();
        while rec.samples.lock().unwrap().len() < 4 {
            assert!(start.elapsed() < Duration::from_secs(5), "reader did not come back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        let samples = rec.samples.lock().unwrap().clone();
        assert_eq!(
            samples,
            [&b"a"[..], b"b", b"c", b"d", b"e"].map(<[u8]>::to_vec),
            "in order, the final drain included"
        );
        assert_eq!(
            *rec.failed_samples.lock().unwrap(),
            vec![b"poison".to_vec()],
            "the record whose handling panicked is reported, the batch goes on"
        );
        let failures = rec.failures.lock().unwrap().clone();
        assert_eq!(failures.len(), 2, "{failures:?}");
        assert!(failures[0].contains("panicked: reader bug"), "{failures:?}");
        assert!(failures[1].contains("epoll broke"), "{failures:?}");
        assert_eq!(
            *rec.running.lock().unwrap(),
            vec![false, true, false, true],
            "down while paused, up again after"
        );
    }
}
