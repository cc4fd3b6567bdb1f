//! The event journal: every published event, and the states components save to find again
//! after a restart, appended to bounded, checksummed segment files so history survives
//! restarts, `kill -9` and power loss.
//!
//! Hand-written rather than an embedded store: the journal only ever appends, reads forward
//! and drops whole old segments, which is a hundred lines over `crc32fast`; an embedded
//! database (SQLite, sled, redb) would bring compaction, a page cache and its own fsync
//! behaviour to a daemon whose memory is measured, and could not be fuzzed as one pure
//! function over bytes ([`format::scan`]).
//!
//! Writes leave the record path: publishing only queues (a bounded channel; overflow is
//! counted), and one thread encodes, appends and syncs in batches.

pub mod format;
mod writer;

use std::{
    collections::HashMap,
    fs::File,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{self, SyncSender, TrySendError},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use serde::{Deserialize, Serialize};

use format::{Entry as Decoded, Tail};

pub use format::{Mark, State};

use crate::sync::Lock as _;

/// When appended records are forced to disk (`journal.fsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fsync {
    /// After every batch the writer appends: nothing acknowledged is lost to a power cut, at
    /// one fdatasync per batch.
    Batch,
    /// At most every `fsync_interval`: a power cut loses at most that much history.
    Interval,
    /// Never (the kernel writes back within ~30 s); a process kill loses nothing either way.
    Never,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JournalConfig {
    /// `false`: history in memory only (`events.history`), lost on restart.
    pub enabled: bool,
    /// Directory of the segment files (a hostPath in the DaemonSet).
    pub path: PathBuf,
    /// Disk bound of the whole journal: oldest segments are removed first. A segment is an
    /// eighth of it.
    #[serde(with = "size")]
    pub max_bytes: u64,
    pub fsync: Fsync,
    #[serde(with = "crate::serde_duration")]
    pub fsync_interval: Duration,
    /// Records queued for the writer; more are dropped and counted.
    pub queue: usize,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            enabled: true,
            path: PathBuf::from("/var/lib/sensor/journal"),
            max_bytes: 64 << 20,
            fsync: Fsync::Interval,
            fsync_interval: Duration::from_secs(1),
            queue: 4096,
        }
    }
}

/// Smallest `journal.max_bytes`: eight segments of 8 KiB.
pub const MIN_MAX_BYTES: u64 = 64 << 10;

impl JournalConfig {
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.max_bytes < MIN_MAX_BYTES {
            return Err((".max_bytes".into(), format!("must be at least {MIN_MAX_BYTES} (64KiB)")));
        }
        if self.queue == 0 {
            return Err((".queue".into(), "must be greater than 0".into()));
        }
        if self.fsync == Fsync::Interval && self.fsync_interval.is_zero() {
            return Err((".fsync_interval".into(), "must be greater than 0".into()));
        }
        Ok(())
    }

    /// Bytes of one segment.
    pub fn segment_bytes(&self) -> u64 {
        self.max_bytes / 8
    }
}

/// Byte sizes in config files: `65536`, `64KiB`, `64MiB`, `1GiB` (also kB/MB/GB, powers of 10).
pub mod size {
    use serde::{de, Deserializer, Serializer};

    const UNITS: &[(&str, u64)] = &[
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("GB", 1_000_000_000),
        ("MB", 1_000_000),
        ("kB", 1000),
        ("KB", 1000),
        ("B", 1),
    ];

    pub fn parse(s: &str) -> Result<u64, String> {
        let t = s.trim();
        let (num, mult) = UNITS
            .iter()
            .find_map(|(u, m)| t.strip_suffix(u).map(|n| (n.trim(), *m)))
            .unwrap_or((t, 1));
        num.parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(mult))
            .ok_or_else(|| format!("bad size '{s}'; use e.g. 65536, 512KiB, 64MiB, 1GiB"))
    }

    pub fn format(v: u64) -> String {
        for (u, m) in &UNITS[..3] {
            if v >= *m && v.is_multiple_of(*m) {
                return format!("{}{u}", v / m);
            }
        }
        v.to_string()
    }

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*v))
    }

    struct V;
    impl de::Visitor<'_> for V {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a size such as 65536 or 64MiB")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom(format!("bad size {v}")))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            parse(v).map_err(E::custom)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(V)
    }
}

/// Something the journal stores as an event: its id and its JSON object.
pub trait Item: Send + Sync {
    fn seq(&self) -> u64;
    fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()>;
}

/// What the writer thread is sent.
enum Entry {
    Event(Arc<dyn Item>),
    State(State),
    /// Orderly shutdown: ids below this are taken.
    Close(u64),
}

/// Every reason of `sensor_journal_records_dropped_total`, exported from the start at 0.
pub const DROP_REASONS: &[&str] = &["queue_full", "too_large", "write_error", "closed"];

/// The journal's exported counts.
#[derive(Clone)]
pub struct JournalMetrics {
    pub up: IntGauge,
    pub written: IntCounter,
    pub dropped: IntCounterVec,
    pub bytes: IntGauge,
    pub segments: IntGauge,
    pub removed: IntCounter,
    pub tail_cuts: IntCounter,
    pub tail_cut_bytes: IntCounter,
    pub skipped: IntCounter,
    pub io_errors: IntCounterVec,
    pub last_seq: IntGauge,
}

impl JournalMetrics {
    /// Created before the daemon's registry exists (the journal opens before the probes
    /// attach); [`JournalMetrics::register`] adds them to it.
    pub fn new() -> prometheus::Result<JournalMetrics> {
        let g = |n: &str, h: &str| IntGauge::new(n, h);
        let c = |n: &str, h: &str| IntCounter::new(n, h);
        let m = JournalMetrics {
            up: g("sensor_journal_up", "1 when events are written to the on-disk journal; 0 when it is disabled or could not be opened (history in memory only).")?,
            written: c("sensor_journal_events_written_total", "Events appended to the journal.")?,
            dropped: IntCounterVec::new(
                Opts::new("sensor_journal_records_dropped_total", "Records not written to the journal: queue_full (the writer fell behind), too_large, write_error, closed (published after shutdown began)."),
                &["reason"],
            )?,
            bytes: g("sensor_journal_bytes", "Bytes of the journal's segment files on disk (bounded by journal.max_bytes).")?,
            segments: g("sensor_journal_segments", "Segment files of the journal.")?,
            removed: c("sensor_journal_segments_removed_total", "Oldest segments removed to keep the journal within journal.max_bytes.")?,
            tail_cuts: c("sensor_journal_tail_cuts_total", "Torn or corrupt segment tails cut when the journal was opened (an append interrupted by kill -9 or power loss).")?,
            tail_cut_bytes: c("sensor_journal_tail_cut_bytes_total", "Bytes cut from torn or corrupt segment tails when the journal was opened.")?,
            skipped: c("sensor_journal_records_skipped_total", "Records with a valid checksum whose content could not be read (skipped).")?,
            io_errors: IntCounterVec::new(
                Opts::new("sensor_journal_io_errors_total", "Failed journal file operations by op (open, write, fsync, remove, read)."),
                &["op"],
            )?,
            last_seq: g("sensor_journal_last_written_seq", "Id (seq) of the last event appended to the journal.")?,
        };
        for r in DROP_REASONS {
            m.dropped.with_label_values(&[r]);
        }
        for op in ["open", "write", "fsync", "remove", "read"] {
            m.io_errors.with_label_values(&[op]);
        }
        Ok(m)
    }

    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.up.clone()))?;
        registry.register(Box::new(self.written.clone()))?;
        registry.register(Box::new(self.dropped.clone()))?;
        registry.register(Box::new(self.bytes.clone()))?;
        registry.register(Box::new(self.segments.clone()))?;
        registry.register(Box::new(self.removed.clone()))?;
        registry.register(Box::new(self.tail_cuts.clone()))?;
        registry.register(Box::new(self.tail_cut_bytes.clone()))?;
        registry.register(Box::new(self.skipped.clone()))?;
        registry.register(Box::new(self.io_errors.clone()))?;
        registry.register(Box::new(self.last_seq.clone()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {op}: {source}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("journal {0}: another sensor is writing it (lock held)")]
    Locked(String),
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> JournalError {
    let path = path.display().to_string();
    move |source| JournalError::Io { path, op, source }
}

/// File name of the segment whose events have ids from `first` on.
pub fn segment_name(first: u64) -> String {
    format!("{first:020}.seg")
}

/// The segment files of `dir`, oldest first, with the first id each may hold.
pub fn list_segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let first = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(first) = first {
            out.push((first, p));
        }
    }
    out.sort();
    Ok(out)
}

/// A segment kept at start: first id, path, size.
type KeptSegment = (u64, PathBuf, u64);

/// What the journal held at start.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The id the next event gets.
    pub next_seq: u64,
    /// The last run ended with an orderly shutdown.
    pub clean: bool,
    /// The last saved state of each name.
    pub states: HashMap<String, State>,
    pub events: u64,
}

/// Reads every segment of `dir`, cuts torn or corrupt tails (counted and logged) and returns
/// what they held. `queue` ids are skipped after an unclean end: events that were queued but
/// never written may have been seen live with those ids.
fn recover(dir: &Path, queue: usize, m: &JournalMetrics) -> Result<(Recovered, Vec<KeptSegment>), JournalError> {
    let mut r = Recovered::default();
    let mut hi = 0u64;
    let mut last_mark: Option<Mark> = None;
    let mut kept = Vec::new();
    for (first, path) in list_segments(dir).map_err(io_err(dir, "list"))? {
        let bytes = std::fs::read(&path).map_err(io_err(&path, "read"))?;
        let scan = format::scan(&bytes);
        last_mark = None;
        for rec in &scan.records {
            // Events only need their id here: no JSON object per event (a full 64 MiB journal
            // is some 190,000 of them).
            let entry = match format::event_seq(rec) {
                Some(seq) => seq.map(|seq| Decoded::Event {
                    seq,
                    json: serde_json::Map::new(),
                }),
                None => format::decode(rec),
            };
            match entry {
                Ok(Decoded::Event { seq, .. }) => {
                    hi = hi.max(seq);
                    r.events += 1;
                }
                Ok(Decoded::State(s)) => {
                    hi = hi.max(s.after_seq);
                    r.states.insert(s.name.clone(), s);
                }
                Ok(Decoded::Mark(mk)) => {
                    hi = hi.max(mk.next_seq.saturating_sub(1));
                    last_mark = Some(mk);
                    continue;
                }
                Err(e) => {
                    m.skipped.inc();
                    tracing::warn!(file = %path.display(), offset = rec.offset, error = %e, "journal record skipped");
                }
            }
            last_mark = None;
        }
        let mut size = bytes.len() as u64;
        if let Some(at) = scan.tail.cut_at() {
            let cut = bytes.len() - at;
            m.tail_cuts.inc();
            m.tail_cut_bytes.inc_by(cut as u64);
            let kind = if matches!(scan.tail, Tail::Torn { .. }) {
                "torn"
            } else {
                "corrupt"
            };
            tracing::warn!(
                file = %path.display(),
                offset = at,
                bytes_cut = cut,
                records_kept = scan.records.len(),
                reason = scan.tail.reason(),
                "journal: {kind} tail cut"
            );
            if at < format::MAGIC.len() {
                std::fs::remove_file(&path).map_err(io_err(&path, "remove"))?;
                continue;
            }
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_err(&path, "open"))?;
            f.set_len(at as u64).map_err(io_err(&path, "truncate"))?;
            f.sync_all().map_err(io_err(&path, "fsync"))?;
            size = at as u64;
            last_mark = None;
        }
        kept.push((first, path, size));
    }
    r.clean = last_mark.is_some_and(|mk| mk.clean);
    r.next_seq = match (kept.is_empty(), r.clean) {
        (true, _) if hi == 0 => 1,
        (_, true) => hi + 1,
        _ => hi + 1 + queue as u64,
    };
    Ok((r, kept))
}

/// The journal of a running daemon: queue in, writer thread out.
pub struct Journal {
    dir: PathBuf,
    tx: SyncSender<Entry>,
    writer: Mutex<Option<JoinHandle<()>>>,
    metrics: JournalMetrics,
    recovered: Recovered,
    /// Highest id dropped on a full queue (the writer marks it taken).
    dropped_max: Arc<AtomicU64>,
    /// Held (flock) while this process writes the directory; released by `close`.
    lock: Mutex<Option<File>>,
}

impl Journal {
    /// Opens (creating) the journal directory, takes its lock, recovers what it holds and
    /// starts the writer. Blocking: reads every segment.
    pub fn open(cfg: &JournalConfig, metrics: JournalMetrics) -> Result<Arc<Journal>, JournalError> {
        let dir = cfg.path.clone();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir, "create"))?;
        let lock_path = dir.join("lock");
        let lock = File::create(&lock_path).map_err(io_err(&lock_path, "open"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(JournalError::Locked(dir.display().to_string())),
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&lock_path, "lock")(e)),
        }
        let (recovered, segments) = recover(&dir, cfg.queue, &metrics)?;
        let dropped_max = Arc::new(AtomicU64::new(0));
        let w = writer::Writer::start(cfg, segments, &recovered, metrics.clone(), Arc::clone(&dropped_max))
            .map_err(io_err(&dir, "start"))?;
        let (tx, rx) = mpsc::sync_channel(cfg.queue);
        let handle = std::thread::Builder::new()
            .name("sensor-journal".into())
            .spawn(move || w.run(&rx))
            .map_err(io_err(&dir, "spawn writer"))?;
        metrics.up.set(1);
        tracing::info!(
            path = %dir.display(),
            events = recovered.events,
            next_seq = recovered.next_seq,
            clean = recovered.clean,
            "journal opened"
        );
        Ok(Arc::new(Journal {
            dir,
            tx,
            writer: Mutex::new(Some(handle)),
            metrics,
            recovered,
            dropped_max,
            lock: Mutex::new(Some(lock)),
        }))
    }

    /// The id the first event of this run gets.
    pub fn next_seq(&self) -> u64 {
        self.recovered.next_seq
    }

    /// The last state saved under `name` before this run.
    pub fn recovered_state(&self, name: &str) -> Option<&State> {
        self.recovered.states.get(name)
    }

    /// Queues an event; never blocks (a full queue drops it, counted).
    pub fn append(&self, item: Arc<dyn Item>) {
        let seq = item.seq();
        match self.tx.try_send(Entry::Event(item)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.metrics.dropped.with_label_values(&["queue_full"]).inc();
                self.dropped_max.fetch_max(seq, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => self.metrics.dropped.with_label_values(&["closed"]).inc(),
        }
    }

    /// Queues a state; never blocks.
    pub fn save_state(&self, state: State) {
        match self.tx.try_send(Entry::State(state)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.metrics.dropped.with_label_values(&["queue_full"]).inc(),
            Err(TrySendError::Disconnected(_)) => self.metrics.dropped.with_label_values(&["closed"]).inc(),
        }
    }

    /// Events with `since < seq < below`, oldest first, at most `limit`. Blocking.
    pub fn events(&self, since: u64, below: u64, limit: usize) -> Vec<serde_json::Map<String, serde_json::Value>> {
        let mut out = Vec::new();
        let r = each_event(&self.dir, since, |seq, json| {
            if seq >= below || out.len() >= limit {
                return false;
            }
            out.push(json);
            true
        });
        if let Err(e) = r {
            self.metrics.io_errors.with_label_values(&["read"]).inc();
            tracing::warn!(error = %e, "journal read failed");
        }
        out
    }

    /// Calls `f` with each event of earlier runs with `seq > since`, oldest first. Blocking.
    pub fn each_before_start(&self, since: u64, mut f: impl FnMut(&serde_json::Map<String, serde_json::Value>)) {
        let below = self.next_seq();
        let r = each_event(&self.dir, since, |seq, json| {
            if seq >= below {
                return false;
            }
            f(&json);
            true
        });
        if let Err(e) = r {
            self.metrics.io_errors.with_label_values(&["read"]).inc();
            tracing::warn!(error = %e, "journal read failed");
        }
    }

    /// The newest `n` events with `seq < below`, oldest first; reads segments from the newest
    /// back until it has them. Blocking.
    pub fn newest(&self, below: u64, n: usize) -> Vec<serde_json::Map<String, serde_json::Value>> {
        let segs = match list_segments(&self.dir) {
            Ok(s) => s,
            Err(e) => {
                self.metrics.io_errors.with_label_values(&["read"]).inc();
                tracing::warn!(error = %e, "journal read failed");
                return Vec::new();
            }
        };
        let mut parts: Vec<Vec<serde_json::Map<String, serde_json::Value>>> = Vec::new();
        let mut have = 0;
        for (_, path) in segs.iter().rev() {
            if have >= n {
                break;
            }
            let bytes = match std::fs::read(path) {
                Ok(b) => b,
                Err(e) => {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        self.metrics.io_errors.with_label_values(&["read"]).inc();
                        tracing::warn!(file = %path.display(), error = %e, "journal read failed");
                    }
                    continue;
                }
            };
            // Ids first; only the newest `n - have` of this segment become JSON objects (a whole
            // segment of objects is tens of MiB).
            let scan = format::scan(&bytes);
            let wanted: Vec<_> = scan
                .records
                .iter()
                .filter(|r| matches!(format::event_seq(r), Some(Ok(seq)) if seq < below))
                .collect();
            let skip = wanted.len().saturating_sub(n - have);
            let part: Vec<_> = wanted[skip..]
                .iter()
                .filter_map(|r| match format::decode(r) {
                    Ok(Decoded::Event { json, .. }) => Some(json),
                    _ => None,
                })
                .collect();
            have += part.len();
            parts.push(part);
        }
        let mut out: Vec<_> = parts.into_iter().rev().flatten().collect();
        let extra = out.len().saturating_sub(n);
        out.drain(..extra);
        out
    }

    /// Writes what is queued and a clean-shutdown mark (`next_seq`: the id the next event would
    /// have got), syncs, and stops the writer. Blocking.
    pub fn close(&self, next_seq: u64) {
        let handle = self.writer.locked().take();
        let Some(handle) = handle else { return };
        if self.tx.send(Entry::Close(next_seq)).is_err() {
            tracing::error!("journal writer already gone at shutdown");
        }
        if handle.join().is_err() {
            tracing::error!("journal writer panicked");
        }
        self.metrics.up.set(0);
        // The next writer (a restarted daemon in the same process's tests) may take over.
        drop(self.lock.locked().take());
    }
}

/// Calls `f` with every event in `dir` whose id is above `since`, oldest first, until it returns
/// false. Reads without the lock: a record being appended shows as a torn tail and is left out.
pub fn each_event(
    dir: &Path,
    since: u64,
    mut f: impl FnMut(u64, serde_json::Map<String, serde_json::Value>) -> bool,
) -> std::io::Result<()> {
    let segs = list_segments(dir)?;
    // The last segment whose first id is at most since + 1 holds the first wanted event.
    let start = segs
        .iter()
        .rposition(|(first, _)| *first <= since.saturating_add(1))
        .unwrap_or(0);
    for (first, path) in &segs[start..] {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        // A segment holds ids from its first on: only the one `since` falls into needs ids
        // checked before objects are built.
        let filter = *first <= since;
        for rec in format::scan(&bytes).records {
            if filter && !matches!(format::event_seq(&rec), Some(Ok(seq)) if seq > since) {
                continue;
            }
            if let Ok(Decoded::Event { seq, json }) = format::decode(&rec) {
                if seq > since && !f(seq, json) {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// Opens the journal when it is enabled; a journal that cannot be opened leaves the daemon
/// running with history in memory (logged, `sensor_journal_up` 0). Blocking.
pub fn open_configured(cfg: &JournalConfig) -> prometheus::Result<(Option<Arc<Journal>>, JournalMetrics)> {
    let metrics = JournalMetrics::new()?;
    if !cfg.enabled {
        tracing::info!("journal disabled: event history in memory only");
        return Ok((None, metrics));
    }
    match Journal::open(cfg, metrics.clone()) {
        Ok(j) => Ok((Some(j), metrics)),
        Err(e) => {
            metrics.io_errors.with_label_values(&["open"]).inc();
            tracing::error!(error = %e, "journal unavailable: event history in memory only, lost on restart");
            Ok((None, metrics))
        }
    }
}

#[cfg(test)]
mod tests;
