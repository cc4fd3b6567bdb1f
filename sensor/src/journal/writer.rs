//! The journal's writer thread: batches queued records into the active segment, rotates
//! segments, removes the oldest to stay within the disk bound, and syncs per `journal.fsync`.

use std::{
    collections::{BTreeMap, VecDeque},
    fs::{File, OpenOptions},
    io::Write as _,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, RecvTimeoutError},
        Arc,
    },
    time::{Duration, Instant},
};

use super::{
    format::{self, Mark, State, KIND_EVENT, KIND_MARK, KIND_STATE, MAGIC},
    segment_name, Entry, Fsync, JournalConfig, JournalMetrics, Recovered,
};

/// Records taken from the queue per write.
const BATCH: usize = 1024;

struct Segment {
    first: u64,
    path: PathBuf,
    size: u64,
    /// Size before its first appended record (header and carried states): a segment no
    /// bigger than this is not rotated away.
    head: u64,
}

pub(super) struct Writer {
    dir: PathBuf,
    seg_bytes: u64,
    max_bytes: u64,
    fsync: Fsync,
    interval: Duration,
    /// Oldest first; the last one is appended to.
    segments: VecDeque<Segment>,
    file: File,
    /// Bytes encoded for the active segment, not yet written.
    buf: Vec<u8>,
    /// Events in `buf`, and the id of the last one.
    buf_events: u64,
    buf_last_seq: Option<u64>,
    /// The latest state of each name, written again at the head of every new segment so
    /// removing old segments never loses one.
    states: BTreeMap<String, State>,
    m: JournalMetrics,
    dropped_max: Arc<AtomicU64>,
    marked: u64,
    unsynced: bool,
    last_sync: Instant,
}

impl Writer {
    /// Opens the segment this run appends to (named after the first id it will hold).
    pub(super) fn start(
        cfg: &JournalConfig,
        kept: Vec<super::KeptSegment>,
        rec: &Recovered,
        m: JournalMetrics,
        dropped_max: Arc<AtomicU64>,
    ) -> std::io::Result<Writer> {
        let mut segments: VecDeque<Segment> = kept
            .into_iter()
            .map(|(first, path, size)| Segment {
                first,
                path,
                size,
                head: size,
            })
            .collect();
        let states: BTreeMap<String, State> = rec.states.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let dir = cfg.path.clone();
        let (file, seg) = open_segment(&dir, rec.next_seq, &states)?;
        if segments.back().is_some_and(|s| s.path == seg.path) {
            segments.pop_back();
        }
        segments.push_back(seg);
        let mut w = Writer {
            dir,
            seg_bytes: cfg.segment_bytes(),
            max_bytes: cfg.max_bytes,
            fsync: cfg.fsync,
            interval: cfg.fsync_interval,
            segments,
            file,
            buf: Vec::new(),
            buf_events: 0,
            buf_last_seq: None,
            states,
            m,
            dropped_max,
            marked: 0,
            unsynced: false,
            last_sync: Instant::now(),
        };
        w.make_room(0);
        w.gauges();
        Ok(w)
    }

    pub(super) fn run(mut self, rx: &Receiver<Entry>) {
        let tick = match self.fsync {
            Fsync::Interval => self.interval,
            _ => Duration::from_secs(1),
        };
        loop {
            let first = match rx.recv_timeout(tick) {
                Ok(e) => e,
                Err(RecvTimeoutError::Timeout) => {
                    self.sync_if_due(false);
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.sync();
                    return;
                }
            };
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(e) => batch.push(e),
                    Err(_) => break,
                }
            }
            let mut close = None;
            for e in batch {
                match e {
                    Entry::Event(item) => {
                        let mut payload = Vec::with_capacity(256);
                        if let Err(e) = item.write_json(&mut payload) {
                            tracing::error!(seq = item.seq(), error = %e, "event not serializable; not journaled");
                            continue;
                        }
                        if self.append(KIND_EVENT, &payload, item.seq()) {
                            self.buf_events += 1;
                            self.buf_last_seq = Some(item.seq());
                        }
                    }
                    Entry::State(s) => {
                        if let Ok(payload) = serde_json::to_vec(&s) {
                            self.append(KIND_STATE, &payload, s.after_seq + 1);
                        }
                        self.states.insert(s.name.clone(), s);
                    }
                    Entry::Close(next_seq) => close = Some(next_seq),
                }
            }
            let dropped = self.dropped_max.load(Ordering::Relaxed);
            if dropped > self.marked {
                self.mark(dropped + 1, false);
                self.marked = dropped;
            }
            if let Some(next_seq) = close {
                self.mark(next_seq, true);
            }
            self.flush();
            if close.is_some() {
                self.sync();
                return;
            }
            self.sync_if_due(self.fsync == Fsync::Batch);
            self.gauges();
        }
    }

    fn mark(&mut self, next_seq: u64, clean: bool) {
        if let Ok(p) = serde_json::to_vec(&Mark { next_seq, clean }) {
            self.append(KIND_MARK, &p, next_seq);
        }
    }

    fn active(&self) -> u64 {
        self.segments.back().map_or(0, |s| s.size) + self.buf.len() as u64
    }

    fn total(&self) -> u64 {
        self.segments.iter().map(|s| s.size).sum::<u64>() + self.buf.len() as u64
    }

    /// Encodes one record into the batch; `first` is the lowest id a new segment started for
    /// it would hold. False when it was dropped.
    fn append(&mut self, kind: u8, payload: &[u8], first: u64) -> bool {
        let need = (format::RECORD_HEADER + payload.len()) as u64;
        if need > self.seg_bytes / 2 {
            self.m.dropped.with_label_values(&["too_large"]).inc();
            tracing::warn!(bytes = need, "journal record larger than half a segment; dropped");
            return false;
        }
        let head = self.segments.back().map_or(0, |s| s.head);
        if self.active() + need > self.seg_bytes && self.active() > head {
            self.flush();
            self.rotate(first);
        }
        self.make_room(need);
        format::encode(kind, payload, &mut self.buf);
        true
    }

    /// Removes the oldest segments (never the active one) until `need` more bytes fit.
    fn make_room(&mut self, need: u64) {
        while self.total() + need > self.max_bytes && self.segments.len() > 1 {
            let Some(old) = self.segments.pop_front() else { break };
            match std::fs::remove_file(&old.path) {
                Ok(()) => {
                    self.m.removed.inc();
                    tracing::info!(file = %old.path.display(), bytes = old.size, "journal: oldest segment removed (journal.max_bytes)");
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    self.m.io_errors.with_label_values(&["remove"]).inc();
                    tracing::error!(file = %old.path.display(), error = %e, "journal segment not removed");
                }
            }
        }
    }

    fn rotate(&mut self, first: u64) {
        if self.segments.back().is_some_and(|s| s.first >= first) {
            return;
        }
        if self.fsync != Fsync::Never {
            self.sync();
        }
        match open_segment(&self.dir, first, &self.states) {
            Ok((file, seg)) => {
                self.file = file;
                self.segments.push_back(seg);
            }
            Err(e) => {
                self.m.io_errors.with_label_values(&["open"]).inc();
                tracing::error!(error = %e, "journal: new segment not created; appending to the old one");
            }
        }
    }

    /// Writes the batch (counted as written or dropped); on failure the segment is cut back to
    /// its last whole record.
    fn flush(&mut self) {
        let (events, last_seq) = (self.buf_events, self.buf_last_seq.take());
        self.buf_events = 0;
        if self.buf.is_empty() {
            return;
        }
        let ok = self.write_buf();
        self.buf.clear();
        if ok {
            self.m.written.inc_by(events);
            if let Some(s) = last_seq {
                self.m.last_seq.set(i64::try_from(s).unwrap_or(i64::MAX));
            }
        } else {
            self.m.dropped.with_label_values(&["write_error"]).inc_by(events);
        }
    }

    fn write_buf(&mut self) -> bool {
        let Some(seg) = self.segments.back_mut() else {
            return false;
        };
        match self.file.write_all(&self.buf) {
            Ok(()) => {
                seg.size += self.buf.len() as u64;
                self.unsynced = true;
                true
            }
            Err(e) => {
                self.m.io_errors.with_label_values(&["write"]).inc();
                tracing::error!(file = %seg.path.display(), error = %e, "journal write failed; batch dropped");
                if let Err(e) = self.file.set_len(seg.size) {
                    tracing::error!(error = %e, "journal segment not cut back after a failed write");
                }
                false
            }
        }
    }

    fn sync_if_due(&mut self, now: bool) {
        let due = match self.fsync {
            Fsync::Never => false,
            Fsync::Batch => now,
            Fsync::Interval => self.last_sync.elapsed() >= self.interval,
        };
        if due {
            self.sync();
        }
    }

    fn sync(&mut self) {
        if !self.unsynced {
            return;
        }
        if let Err(e) = self.file.sync_data() {
            self.m.io_errors.with_label_values(&["fsync"]).inc();
            tracing::error!(error = %e, "journal fsync failed");
        }
        self.unsynced = false;
        self.last_sync = Instant::now();
    }

    fn gauges(&self) {
        self.m.bytes.set(i64::try_from(self.total()).unwrap_or(i64::MAX));
        self.m.segments.set(self.segments.len() as i64);
    }
}

/// Opens segment `first` for appending, creating it with its header and the current states.
fn open_segment(
    dir: &std::path::Path,
    first: u64,
    states: &BTreeMap<String, State>,
) -> std::io::Result<(File, Segment)> {
    let path = dir.join(segment_name(first));
    let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
    let mut size = file.metadata()?.len();
    if size == 0 {
        let mut head = MAGIC.to_vec();
        for s in states.values() {
            if let Ok(p) = serde_json::to_vec(s) {
                format::encode(KIND_STATE, &p, &mut head);
            }
        }
        file.write_all(&head)?;
        file.sync_all()?;
        // The new name must survive a power cut too.
        if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
            tracing::warn!(dir = %dir.display(), error = %e, "journal directory not synced");
        }
        size = head.len() as u64;
    }
    Ok((
        file,
        Segment {
            first,
            path,
            size,
            head: size,
        },
    ))
}
