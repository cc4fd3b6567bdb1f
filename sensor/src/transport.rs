//! Userspace side of the kernel-to-user transport: one tokio task per CPU ring, each
//! draining its perf buffer into the dispatcher, plus the kernel's per-probe counters.

use std::{os::fd::AsRawFd, sync::Arc};

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

/// Spawns a reader task per ring (see [`open_rings`]). Readers exit after a final drain once
/// `shutdown` flips to true.
pub fn spawn_readers(
    rings: Vec<OpenRing>,
    sink: Arc<dyn Sink>,
    shutdown: watch::Receiver<bool>,
) -> Result<Vec<JoinHandle<()>>, TransportError> {
    let mut handles = Vec::new();
    for OpenRing { cpu, buf } in rings {
        // SAFETY: the perf buffer owns its fd (opened by `open`, closed on drop) and `Ring`
        // always returns that same fd, for as long as the AsyncFd owns the buffer.
        let fd = unsafe { AsyncFd::register_with_interest(Ring(buf), tokio::io::Interest::READABLE) }
            .map_err(|e| TransportError::Map("EVENTS", format!("cpu {cpu}: epoll: {e}")))?;
        handles.push(tokio::spawn(read_ring(cpu, fd, Arc::clone(&sink), shutdown.clone())));
    }
    Ok(handles)
}

async fn read_ring(cpu: u32, mut fd: AsyncFd<Ring>, sink: Arc<dyn Sink>, mut shutdown: watch::Receiver<bool>) {
    let mut scratch = Vec::new();
    loop {
        tokio::select! {
            guard = fd.readable_mut() => {
                match guard {
                    Ok(mut g) => {
                        drain(cpu, &mut g.get_inner_mut().0, sink.as_ref(), &mut scratch);
                        g.clear_ready();
                    }
                    Err(e) => {
                        tracing::error!(cpu, error = %e, "perf ring poll failed; reader stops");
                        return;
                    }
                }
            }
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    // Final flush: whatever the kernel wrote before detach is still delivered.
                    drain(cpu, &mut fd.get_mut().0, sink.as_ref(), &mut scratch);
                    return;
                }
            }
        }
    }
}

fn drain(cpu: u32, buf: &mut PerfEventArrayBuffer<MapData>, sink: &dyn Sink, scratch: &mut Vec<u8>) {
    buf.for_each(|ev| match ev {
        PerfEvent::Sample { head, tail } => {
            if tail.is_empty() {
                sink.sample(head);
            } else {
                scratch.clear();
                scratch.extend_from_slice(head);
                scratch.extend_from_slice(tail);
                sink.sample(scratch);
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
