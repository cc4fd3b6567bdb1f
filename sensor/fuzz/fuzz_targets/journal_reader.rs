//! Journal segment reader: whatever the bytes, the scan keeps a contiguous run of records whose
//! re-encoding is exactly the bytes before the cut, decoding a record never panics, and an event's
//! cheap id (`event_seq`) is the one the full decode finds where both read one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensor::journal::format::{decode, encode, event_seq, scan, Entry, Tail, MAGIC};

fuzz_target!(|data: &[u8]| {
    let s = scan(data);
    let end = match s.tail.cut_at() {
        Some(at) => at,
        None => data.len(),
    };
    assert!(end <= data.len());
    if s.tail == Tail::Clean || !s.records.is_empty() {
        // Records follow the magic with no gap and re-encode to the same bytes.
        let mut again = MAGIC.to_vec();
        for r in &s.records {
            assert_eq!(r.offset, again.len());
            encode(r.kind, r.payload, &mut again);
            let full = decode(r);
            // Where both read an id it is the same one (the cheap read skips other values
            // without validating them, so it may accept what the full decode refuses).
            if let (Some(Ok(seq)), Ok(Entry::Event { seq: s, .. })) = (event_seq(r), &full) {
                assert_eq!(seq, *s);
            }
        }
        assert_eq!(&again[..], &data[..end]);
    }
    // What was kept scans again the same, with a clean tail.
    if s.tail != Tail::Clean && end >= MAGIC.len() {
        let kept = scan(&data[..end]);
        assert_eq!(kept.tail, Tail::Clean);
        assert_eq!(kept.records, s.records);
    }
});
