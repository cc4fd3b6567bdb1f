use super::*;

struct Ev {
    seq: u64,
    pad: usize,
}

impl Item for Ev {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        serde_json::to_writer(
            out,
            &serde_json::json!({"seq": self.seq, "type": "test", "pad": "x".repeat(self.pad)}),
        )
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sensor-journal-unit-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn cfg(dir: &Path) -> JournalConfig {
    JournalConfig {
        path: dir.to_path_buf(),
        ..JournalConfig::default()
    }
}

fn open(c: &JournalConfig) -> (Arc<Journal>, JournalMetrics) {
    let m = JournalMetrics::new().unwrap();
    (Journal::open(c, m.clone()).unwrap(), m)
}

fn seqs(j: &Journal, since: u64) -> Vec<u64> {
    j.events(since, u64::MAX, usize::MAX)
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect()
}

fn dir_bytes(dir: &Path) -> u64 {
    list_segments(dir)
        .unwrap()
        .iter()
        .map(|(_, p)| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum()
}

#[test]
fn history_and_ids_survive_a_clean_restart() {
    let dir = tmp("clean");
    let c = cfg(&dir);
    let (j, m) = open(&c);
    assert_eq!(j.next_seq(), 1);
    for seq in 1..=5 {
        j.append(Arc::new(Ev { seq, pad: 10 }));
    }
    j.save_state(State {
        name: "probe".into(),
        after_seq: 5,
        state: serde_json::json!({"n": 3}),
    });
    j.close(6);
    assert_eq!(m.written.get(), 5);
    assert_eq!(m.last_seq.get(), 5);
    drop(j);
    let (j, m) = open(&c);
    assert_eq!(j.next_seq(), 6, "a clean shutdown takes no ids");
    assert_eq!(seqs(&j, 0), [1, 2, 3, 4, 5]);
    assert_eq!(seqs(&j, 3), [4, 5]);
    assert_eq!(j.events(1, 4, 10).len(), 2, "below is exclusive");
    assert_eq!(j.recovered_state("probe").unwrap().state["n"], 3);
    assert_eq!(m.tail_cuts.get(), 0);
    j.append(Arc::new(Ev { seq: 6, pad: 0 }));
    j.close(7);
    drop(j);
    let (j, _) = open(&c);
    assert_eq!(seqs(&j, 0), [1, 2, 3, 4, 5, 6]);
    assert_eq!(j.recovered_state("probe").unwrap().after_seq, 5);
    j.close(7);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes a segment by hand: the state a `kill -9` leaves (no clean mark).
fn write_segment(dir: &Path, first: u64, seqs: &[u64], extra: &[u8]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut b = format::MAGIC.to_vec();
    for s in seqs {
        let mut p = Vec::new();
        Ev { seq: *s, pad: 5 }.write_json(&mut p).unwrap();
        format::encode(format::KIND_EVENT, &p, &mut b);
    }
    b.extend_from_slice(extra);
    let path = dir.join(segment_name(first));
    std::fs::write(&path, b).unwrap();
    path
}

#[test]
fn unclean_end_skips_the_queue_of_ids() {
    let dir = tmp("unclean");
    write_segment(&dir, 1, &[1, 2, 3], &[]);
    let mut c = cfg(&dir);
    c.queue = 100;
    let (j, m) = open(&c);
    assert_eq!(j.next_seq(), 104, "ids that may have been queued are not reused");
    assert_eq!(m.tail_cuts.get(), 0);
    assert_eq!(seqs(&j, 0), [1, 2, 3]);
    j.close(104);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn torn_and_corrupt_tails_are_cut_and_counted() {
    for (name, extra, reason) in [
        ("torn", &b"\x40\x00\x00\x00\x01\x02"[..], "short record header"),
        (
            "past-end",
            &b"\x40\x00\x00\x00\x01\x02\x03\x04\x01{\"seq\""[..],
            "record runs past the end",
        ),
        ("zeros", &[0u8; 100][..], "zero-filled tail"),
        (
            "crc",
            &b"\x02\x00\x00\x00\x00\x00\x00\x00\x01{}"[..],
            "checksum mismatch",
        ),
    ] {
        let dir = tmp(name);
        let good = write_segment(&dir, 1, &[1, 2], &[]);
        let whole = std::fs::metadata(&good).unwrap().len();
        write_segment(&dir, 1, &[1, 2], extra);
        let (j, m) = open(&cfg(&dir));
        assert_eq!(m.tail_cuts.get(), 1, "{name}");
        assert_eq!(m.tail_cut_bytes.get(), extra.len() as u64, "{name}");
        assert_eq!(seqs(&j, 0), [1, 2], "{name}: nothing before the tail is lost");
        assert_eq!(std::fs::metadata(&good).unwrap().len(), whole, "{name}: cut on disk");
        let _ = reason;
        j.append(Arc::new(Ev {
            seq: j.next_seq(),
            pad: 1,
        }));
        let next = j.next_seq();
        j.close(next + 1);
        drop(j);
        let (j, m) = open(&cfg(&dir));
        assert_eq!(m.tail_cuts.get(), 0, "{name}: cut once");
        assert_eq!(seqs(&j, 0), [1, 2, next], "{name}");
        j.close(next + 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn a_segment_with_a_bad_header_is_removed_and_the_others_kept() {
    let dir = tmp("badmagic");
    write_segment(&dir, 1, &[1, 2], &[]);
    let bad = write_segment(&dir, 3, &[3], &[]);
    let mut b = std::fs::read(&bad).unwrap();
    b[0] = b'Z';
    std::fs::write(&bad, b).unwrap();
    let (j, m) = open(&cfg(&dir));
    assert_eq!(m.tail_cuts.get(), 1);
    assert_eq!(seqs(&j, 0), [1, 2]);
    assert!(!bad.exists());
    j.close(j.next_seq());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn max_bytes_is_respected_oldest_removed_first() {
    let dir = tmp("bound");
    let mut c = cfg(&dir);
    c.max_bytes = MIN_MAX_BYTES;
    c.fsync = Fsync::Never;
    let (j, m) = open(&c);
    j.save_state(State {
        name: "keep".into(),
        after_seq: 0,
        state: serde_json::json!(1),
    });
    // ~300 bytes each: about 10 times the bound.
    let n = 2000u64;
    for seq in 1..=n {
        j.append(Arc::new(Ev { seq, pad: 250 }));
        if seq % 100 == 0 {
            // Let the writer keep up (a full queue would drop, which is another test).
            while (m.last_seq.get() as u64) < seq {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(dir_bytes(&dir) <= c.max_bytes, "{} > bound", dir_bytes(&dir));
        }
    }
    j.close(n + 1);
    assert!(dir_bytes(&dir) <= c.max_bytes);
    assert_eq!(m.written.get(), n);
    assert!(m.removed.get() > 0);
    assert_eq!(m.dropped.with_label_values(&["queue_full"]).get(), 0);
    drop(j);
    let (j, m2) = open(&c);
    let s = seqs(&j, 0);
    assert_eq!(*s.last().unwrap(), n, "newest kept");
    assert!(s.len() < 400 && s.len() > 100, "{}", s.len());
    assert!(s.windows(2).all(|w| w[1] == w[0] + 1), "a contiguous suffix");
    assert_eq!(
        j.recovered_state("keep").unwrap().state,
        1,
        "states outlive their segment"
    );
    assert_eq!(m2.segments.get() as u64, list_segments(&dir).unwrap().len() as u64);
    j.close(n + 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_full_queue_drops_counts_and_takes_the_ids() {
    let dir = tmp("queue");
    let mut c = cfg(&dir);
    c.queue = 1;
    let (j, m) = open(&c);
    for seq in 1..=2000 {
        j.append(Arc::new(Ev { seq, pad: 200 }));
    }
    j.close(2001);
    let dropped = m.dropped.with_label_values(&["queue_full"]).get();
    assert!(dropped > 0, "a queue of 1 cannot take 2000 at once");
    assert_eq!(m.written.get() + dropped, 2000);
    drop(j);
    let (j, _) = open(&c);
    assert_eq!(j.next_seq(), 2001);
    j.close(2001);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_writer_is_refused() {
    let dir = tmp("lock");
    let (j, _) = open(&cfg(&dir));
    let e = Journal::open(&cfg(&dir), JournalMetrics::new().unwrap());
    assert!(matches!(e, Err(JournalError::Locked(_))));
    j.close(1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sizes_parse_and_print() {
    assert_eq!(size::parse("64MiB"), Ok(64 << 20));
    assert_eq!(size::parse("65536"), Ok(65536));
    assert_eq!(size::parse("1 GiB"), Ok(1 << 30));
    assert_eq!(size::parse("10MB"), Ok(10_000_000));
    assert!(size::parse("lots").is_err());
    assert!(size::parse("99999999999GiB").is_err());
    assert_eq!(size::format(64 << 20), "64MiB");
    assert_eq!(size::format(1000), "1000");
}

#[test]
fn newest_reads_back_from_the_last_segment() {
    let dir = tmp("newest");
    let mut c = cfg(&dir);
    c.max_bytes = MIN_MAX_BYTES;
    let (j, m) = open(&c);
    for seq in 1..=300 {
        j.append(Arc::new(Ev { seq, pad: 300 }));
    }
    while m.last_seq.get() < 300 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let s: Vec<u64> = j.newest(290, 5).iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(s, [285, 286, 287, 288, 289]);
    let all = j.newest(u64::MAX, 10_000);
    assert_eq!(all.last().unwrap()["seq"], 300);
    assert!(all.len() < 300, "older segments were removed");
    j.close(301);
    let _ = std::fs::remove_dir_all(&dir);
}
