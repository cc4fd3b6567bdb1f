//! The on-disk segment format, as pure functions over bytes (no I/O), so the reader can be
//! fuzzed and every corruption shape unit-tested.
//!
//! A segment is `MAGIC` followed by records. A record is
//! `len: u32 LE | crc: u32 LE | kind: u8 | payload: [u8; len]`, where `crc` is CRC-32 (IEEE)
//! over the kind byte and the payload. Payloads are JSON objects (see [`Entry`]).

use serde::{Deserialize, Serialize};

/// First bytes of every segment file (format version 1).
pub const MAGIC: &[u8; 8] = b"SNSRJNL\x01";
/// Bytes before a record's payload.
pub const RECORD_HEADER: usize = 9;
/// Larger lengths are corruption, not records (no event comes near it).
pub const MAX_PAYLOAD: usize = 1 << 20;

/// A published event: the JSON object of `/api/v1/events` (with `seq` and `type`).
pub const KIND_EVENT: u8 = 1;
/// A named state a component saves to find again after a restart ([`State`]).
pub const KIND_STATE: u8 = 2;
/// A sequence mark ([`Mark`]): ids up to `next_seq - 1` are taken.
pub const KIND_MARK: u8 = 3;

/// One record whose length and checksum are right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRecord<'a> {
    /// Offset of the record's header in the segment.
    pub offset: usize,
    pub kind: u8,
    pub payload: &'a [u8],
}

impl RawRecord<'_> {
    /// Bytes the record takes in the segment.
    pub fn len(&self) -> usize {
        RECORD_HEADER + self.payload.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// How a segment ends. Everything from a `Torn` or `Corrupt` offset on is cut at start; the
/// records before it are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// The last record ends exactly at the end of the bytes.
    Clean,
    /// An append that did not finish (kill -9 or power loss mid-write): a short header, a
    /// record running past the end, or zeros where a record should be.
    Torn { offset: usize, reason: &'static str },
    /// Bytes that are not a record: bad magic, impossible length, checksum mismatch.
    Corrupt { offset: usize, reason: &'static str },
}

impl Tail {
    /// Where the valid part ends, when something follows it.
    pub fn cut_at(&self) -> Option<usize> {
        match self {
            Tail::Clean => None,
            Tail::Torn { offset, .. } | Tail::Corrupt { offset, .. } => Some(*offset),
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Tail::Clean => "clean",
            Tail::Torn { reason, .. } | Tail::Corrupt { reason, .. } => reason,
        }
    }
}

/// The records of a segment and how it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan<'a> {
    pub records: Vec<RawRecord<'a>>,
    pub tail: Tail,
}

fn crc(kind: u8, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(payload);
    h.finalize()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// Reads a whole segment: every record up to the first one that is torn or corrupt. Never
/// panics, whatever the bytes.
pub fn scan(bytes: &[u8]) -> Scan<'_> {
    let mut records = Vec::new();
    if bytes.len() < MAGIC.len() {
        let tail = if MAGIC.starts_with(bytes) {
            Tail::Torn {
                offset: 0,
                reason: "short segment header",
            }
        } else {
            Tail::Corrupt {
                offset: 0,
                reason: "bad segment magic",
            }
        };
        return Scan { records, tail };
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Scan {
            records,
            tail: Tail::Corrupt {
                offset: 0,
                reason: "bad segment magic",
            },
        };
    }
    let mut off = MAGIC.len();
    let tail = loop {
        let rest = bytes.len() - off;
        if rest == 0 {
            break Tail::Clean;
        }
        if rest < RECORD_HEADER {
            let reason = if bytes[off..].iter().all(|b| *b == 0) {
                "zero-filled tail"
            } else {
                "short record header"
            };
            break Tail::Torn { offset: off, reason };
        }
        let len = u32_at(bytes, off) as usize;
        let sum = u32_at(bytes, off + 4);
        let kind = bytes[off + 8];
        if len == 0 && sum == 0 && kind == 0 {
            // Space the file system allocated but the data never reached (power loss).
            break Tail::Torn {
                offset: off,
                reason: "zero-filled tail",
            };
        }
        if len > MAX_PAYLOAD {
            break Tail::Corrupt {
                offset: off,
                reason: "impossible record length",
            };
        }
        if rest - RECORD_HEADER < len {
            break Tail::Torn {
                offset: off,
                reason: "record runs past the end",
            };
        }
        let payload = &bytes[off + RECORD_HEADER..off + RECORD_HEADER + len];
        if crc(kind, payload) != sum {
            break Tail::Corrupt {
                offset: off,
                reason: "checksum mismatch",
            };
        }
        records.push(RawRecord {
            offset: off,
            kind,
            payload,
        });
        off += RECORD_HEADER + len;
    };
    Scan { records, tail }
}

/// Appends one record to `out`.
pub fn encode(kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc(kind, payload).to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
}

/// A saved state: `name`'s value as of the event stream's position `after_seq`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub name: String,
    pub after_seq: u64,
    pub state: serde_json::Value,
}

/// Ids below `next_seq` are taken; `clean` when written by an orderly shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    pub next_seq: u64,
    pub clean: bool,
}

/// A record's meaning.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    Event {
        seq: u64,
        json: serde_json::Map<String, serde_json::Value>,
    },
    State(State),
    Mark(Mark),
}

/// The entry of a checked record; an error for a payload that is not what its kind says (a
/// record written by a newer version, or a checksum collision).
/// The id of an event record without building its JSON object (other fields are skipped, not
/// allocated): readers filter by id first and pay for the object only for what they return.
/// `None` for a record that is not an event.
pub fn event_seq(r: &RawRecord<'_>) -> Option<Result<u64, String>> {
    #[derive(Deserialize)]
    struct Seq {
        seq: u64,
    }
    (r.kind == KIND_EVENT).then(|| {
        serde_json::from_slice::<Seq>(r.payload)
            .map(|s| s.seq)
            .map_err(|e| format!("event: {e}"))
    })
}

pub fn decode(r: &RawRecord<'_>) -> Result<Entry, String> {
    match r.kind {
        KIND_EVENT => {
            let json: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(r.payload).map_err(|e| format!("event: {e}"))?;
            let seq = json
                .get("seq")
                .and_then(serde_json::Value::as_u64)
                .ok_or("event without seq")?;
            Ok(Entry::Event { seq, json })
        }
        KIND_STATE => serde_json::from_slice(r.payload)
            .map(Entry::State)
            .map_err(|e| format!("state: {e}")),
        KIND_MARK => serde_json::from_slice(r.payload)
            .map(Entry::Mark)
            .map_err(|e| format!("mark: {e}")),
        k => Err(format!("unknown record kind {k}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(payloads: &[&str]) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        for p in payloads {
            encode(KIND_EVENT, p.as_bytes(), &mut b);
        }
        b
    }

    const A: &str = r#"{"seq":1,"type":"oom_kill","cgroup":"/a"}"#;
    const B: &str = r#"{"seq":2,"type":"tcp_connect_failure"}"#;

    #[test]
    fn event_seq_agrees_with_decode() {
        let b = segment(&[A, B, r#"{"type":"x"}"#, r#"{"seq":"7"}"#]);
        let s = scan(&b);
        let seqs: Vec<_> = s.records.iter().map(|r| event_seq(r).map(|x| x.ok())).collect();
        assert_eq!(seqs, [Some(Some(1)), Some(Some(2)), Some(None), Some(None)]);
        for r in &s.records {
            let full = match decode(r) {
                Ok(Entry::Event { seq, .. }) => Some(seq),
                _ => None,
            };
            assert_eq!(event_seq(r).and_then(Result::ok), full);
        }
        // Found by the fuzzer: the cheap read skips values without validating them, so it reads
        // the id of a record whose strings are not UTF-8; readers then drop it at the full decode.
        let mut bad = MAGIC.to_vec();
        encode(KIND_EVENT, b"{\"seq\":1,\"type\":\"a\x98b\"}", &mut bad);
        let r = scan(&bad).records[0];
        assert_eq!(event_seq(&r), Some(Ok(1)));
        assert!(decode(&r).is_err());
        let mut m = MAGIC.to_vec();
        encode(KIND_MARK, br#"{"next_seq":3,"clean":true}"#, &mut m);
        assert!(event_seq(&scan(&m).records[0]).is_none(), "a mark is no event");
    }

    #[test]
    fn round_trip() {
        let b = segment(&[A, B]);
        let s = scan(&b);
        assert_eq!(s.tail, Tail::Clean);
        assert_eq!(s.records.len(), 2);
        assert_eq!(s.records[1].payload, B.as_bytes());
        assert_eq!(s.records[1].offset, MAGIC.len() + RECORD_HEADER + A.len());
        match decode(&s.records[0]).unwrap() {
            Entry::Event { seq, json } => assert_eq!((seq, json["cgroup"].as_str()), (1, Some("/a"))),
            e => panic!("{e:?}"),
        }
        assert_eq!(scan(MAGIC).tail, Tail::Clean);
    }

    #[test]
    fn every_truncation_keeps_the_whole_records_before_it() {
        let b = segment(&[A, B]);
        let second = MAGIC.len() + RECORD_HEADER + A.len();
        for cut in 0..=b.len() {
            let s = scan(&b[..cut]);
            let whole = usize::from(cut >= second) + usize::from(cut == b.len());
            assert_eq!(s.records.len(), whole, "cut at {cut}");
            if [MAGIC.len(), second, b.len()].contains(&cut) {
                assert_eq!(s.tail, Tail::Clean, "cut at {cut}");
                continue;
            }
            let at = if cut < MAGIC.len() {
                0
            } else if cut < second {
                MAGIC.len()
            } else {
                second
            };
            assert!(matches!(s.tail, Tail::Torn { .. }), "cut at {cut}: {:?}", s.tail);
            assert_eq!(s.tail.cut_at(), Some(at), "cut at {cut}");
        }
    }

    #[test]
    fn flipped_bits_are_a_checksum_mismatch() {
        let clean = segment(&[A, B]);
        let second = MAGIC.len() + RECORD_HEADER + A.len();
        // Every bit of the second record's crc, kind and payload.
        for byte in second + 4..clean.len() {
            for bit in 0..8 {
                let mut b = clean.clone();
                b[byte] ^= 1 << bit;
                let s = scan(&b);
                assert_eq!(s.records.len(), 1, "byte {byte} bit {bit}");
                assert_eq!(
                    s.tail,
                    Tail::Corrupt {
                        offset: second,
                        reason: "checksum mismatch"
                    }
                );
            }
        }
    }

    #[test]
    fn length_corruption() {
        let mut b = segment(&[A]);
        let at = MAGIC.len();
        b[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            scan(&b).tail,
            Tail::Corrupt {
                offset: at,
                reason: "impossible record length"
            }
        );
        let mut b = segment(&[A]);
        b[at..at + 4].copy_from_slice(&(A.len() as u32 + 5).to_le_bytes());
        assert_eq!(
            scan(&b).tail,
            Tail::Torn {
                offset: at,
                reason: "record runs past the end"
            }
        );
        let mut b = segment(&[A]);
        b[at..at + 4].copy_from_slice(&(A.len() as u32 - 1).to_le_bytes());
        let s = scan(&b);
        assert!(s.records.is_empty());
        assert_eq!(s.tail.cut_at(), Some(at));
    }

    #[test]
    fn zero_fill_and_bad_magic() {
        let mut b = segment(&[A]);
        let end = b.len();
        b.extend_from_slice(&[0u8; 64]);
        let s = scan(&b);
        assert_eq!(s.records.len(), 1);
        assert_eq!(
            s.tail,
            Tail::Torn {
                offset: end,
                reason: "zero-filled tail"
            }
        );
        let mut b = segment(&[A]);
        b.extend_from_slice(&[0u8; 3]);
        assert_eq!(scan(&b).tail.reason(), "zero-filled tail");
        let mut b = segment(&[A]);
        b[0] = b'X';
        let s = scan(&b);
        assert!(s.records.is_empty());
        assert_eq!(s.tail.reason(), "bad segment magic");
        assert_eq!(scan(b"SNS").tail.reason(), "short segment header");
        assert_eq!(scan(b"XY").tail.reason(), "bad segment magic");
        assert_eq!(scan(b"").tail.cut_at(), Some(0));
    }

    #[test]
    fn garbage_after_records_is_cut_there() {
        let mut b = segment(&[A]);
        let end = b.len();
        b.extend_from_slice(b"\x05\x00\x00\x00garbage and more garbage");
        let s = scan(&b);
        assert_eq!(s.records.len(), 1);
        assert_eq!(s.tail.cut_at(), Some(end));
    }

    #[test]
    fn decode_rejects_what_the_kind_does_not_say() {
        let mut b = MAGIC.to_vec();
        encode(KIND_EVENT, b"[1,2]", &mut b);
        encode(KIND_EVENT, br#"{"type":"x"}"#, &mut b);
        encode(KIND_STATE, br#"{"name":"n"}"#, &mut b);
        encode(9, b"{}", &mut b);
        let st = State {
            name: "n".into(),
            after_seq: 4,
            state: serde_json::json!({"a": 1}),
        };
        encode(KIND_STATE, &serde_json::to_vec(&st).unwrap(), &mut b);
        let m = Mark {
            next_seq: 7,
            clean: true,
        };
        encode(KIND_MARK, &serde_json::to_vec(&m).unwrap(), &mut b);
        let s = scan(&b);
        assert_eq!(s.tail, Tail::Clean);
        let d: Vec<_> = s.records.iter().map(decode).collect();
        assert!(d[..4].iter().all(Result::is_err), "{d:?}");
        assert_eq!(d[4], Ok(Entry::State(st)));
        assert_eq!(d[5], Ok(Entry::Mark(m)));
    }

    /// The seed corpus in tests/data/journal: each file's name says what scan must find.
    #[test]
    fn seed_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/journal");
        let mut seen = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            let bytes = std::fs::read(&p).unwrap();
            let s = scan(&bytes);
            let want = name.split('-').next().unwrap();
            let got = match s.tail {
                Tail::Clean => "valid",
                Tail::Torn { .. } => "torn",
                Tail::Corrupt { .. } => "corrupt",
            };
            assert_eq!(got, want, "{name}: {:?}", s.tail);
            assert!(s.records.iter().all(|r| decode(r).is_ok()), "{name}");
            seen += 1;
        }
        assert!(seen >= 5, "seed corpus in {}", dir.display());
    }
}
