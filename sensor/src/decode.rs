//! Validating decoder for kernel records: kind and length are checked before any bytes are
//! reinterpreted, and every failure is a value the caller counts, never a panic.

use sensor_common::{
    oom::{OomKillRecord, RECORD_VERSION as OOM_VERSION},
    record::{kind, RecordHeader},
    tcp::{TcpFailureRecord, FAILURE_VERSION},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {got} bytes is shorter than its {need}-byte header")]
    TruncatedHeader { got: usize, need: usize },
    #[error("unknown record kind {0}")]
    UnknownKind(u16),
    #[error("kind {kind}: header says {declared} bytes, expected {expected}")]
    BadLength { kind: u16, declared: u16, expected: u16 },
    #[error("kind {kind}: header says {declared} bytes but only {got} arrived")]
    Truncated { kind: u16, declared: u16, got: usize },
    #[error("kind {kind}: unsupported version {version}")]
    BadVersion { kind: u16, version: u16 },
}

impl DecodeError {
    /// The probe a bad record is charged to (`unknown` when the kind itself is bad).
    pub fn probe(&self) -> &'static str {
        match self {
            DecodeError::TruncatedHeader { .. } | DecodeError::UnknownKind(_) => "unknown",
            DecodeError::BadLength { kind, .. }
            | DecodeError::Truncated { kind, .. }
            | DecodeError::BadVersion { kind, .. } => probe_of_kind(*kind),
        }
    }
}

/// The probe a raw record belongs to, from its header alone (`unknown` if it has none).
pub fn probe_of_record(bytes: &[u8]) -> &'static str {
    read::<RecordHeader>(bytes).map_or("unknown", |h| probe_of_kind(h.kind))
}

pub fn probe_of_kind(k: u16) -> &'static str {
    match k {
        kind::OOM_KILL => "oom",
        kind::TCP_CONNECT_FAILURE => "tcp",
        _ => "unknown",
    }
}

#[derive(Debug, Clone)]
pub enum Record {
    OomKill(Box<OomKillRecord>),
    TcpFailure(TcpFailureRecord),
}

/// Reads a `T` out of `bytes` after the caller has checked the length.
fn read<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: the slice holds at least size_of::<T>() bytes, `read_unaligned` has no alignment
    // requirement, and every `T` used here is a Pod type valid for any bit pattern.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Decodes one record. Perf samples may carry trailing alignment padding, so the sample may be
/// longer than the record, never shorter.
pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
    let header: RecordHeader = read(bytes).ok_or(DecodeError::TruncatedHeader {
        got: bytes.len(),
        need: std::mem::size_of::<RecordHeader>(),
    })?;
    let (expected, version) = match header.kind {
        kind::OOM_KILL => (OomKillRecord::LEN, OOM_VERSION),
        kind::TCP_CONNECT_FAILURE => (TcpFailureRecord::LEN, FAILURE_VERSION),
        other => return Err(DecodeError::UnknownKind(other)),
    };
    if header.len != expected {
        return Err(DecodeError::BadLength {
            kind: header.kind,
            declared: header.len,
            expected,
        });
    }
    if bytes.len() < usize::from(header.len) {
        return Err(DecodeError::Truncated {
            kind: header.kind,
            declared: header.len,
            got: bytes.len(),
        });
    }
    if header.version != version {
        return Err(DecodeError::BadVersion {
            kind: header.kind,
            version: header.version,
        });
    }
    match header.kind {
        kind::OOM_KILL => read::<OomKillRecord>(bytes)
            .map(|r| Record::OomKill(Box::new(r)))
            .ok_or(DecodeError::Truncated {
                kind: header.kind,
                declared: header.len,
                got: bytes.len(),
            }),
        kind::TCP_CONNECT_FAILURE => {
            read::<TcpFailureRecord>(bytes)
                .map(Record::TcpFailure)
                .ok_or(DecodeError::Truncated {
                    kind: header.kind,
                    declared: header.len,
                    got: bytes.len(),
                })
        }
        other => Err(DecodeError::UnknownKind(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oom_bytes() -> Vec<u8> {
        let mut r: OomKillRecord = unsafe_zeroed();
        r.header = RecordHeader {
            kind: kind::OOM_KILL,
            len: OomKillRecord::LEN,
            version: OOM_VERSION,
            _pad: 0,
            ktime_ns: 42,
        };
        r.victim_pid = 1234;
        let p = std::ptr::from_ref(&r).cast::<u8>();
        // SAFETY: reading the bytes of a live repr(C) Pod value.
        unsafe { std::slice::from_raw_parts(p, std::mem::size_of::<OomKillRecord>()) }.to_vec()
    }

    fn unsafe_zeroed<T>() -> T {
        // SAFETY: only used with Pod record types, for which all-zero is valid.
        unsafe { std::mem::zeroed() }
    }

    #[test]
    fn decodes_valid_record_with_padding() {
        let mut b = oom_bytes();
        b.extend_from_slice(&[0, 0, 0, 0]); // perf alignment padding
        match decode(&b).unwrap() {
            Record::OomKill(r) => {
                assert_eq!(r.victim_pid, 1234);
                assert_eq!(r.header.ktime_ns, 42);
            }
            other => panic!("decoded as {other:?}"),
        }
    }

    #[test]
    fn rejects_truncated() {
        let b = oom_bytes();
        assert_eq!(
            decode(&b[..8]).unwrap_err(),
            DecodeError::TruncatedHeader { got: 8, need: 16 }
        );
        let e = decode(&b[..b.len() - 1]).unwrap_err();
        assert!(matches!(e, DecodeError::Truncated { .. }), "{e}");
        assert_eq!(e.probe(), "oom");
        assert!(decode(&[]).is_err());
    }

    #[test]
    fn rejects_oversized_and_undersized_length() {
        let mut b = oom_bytes();
        b[2..4].copy_from_slice(&(OomKillRecord::LEN + 8).to_ne_bytes());
        b.extend_from_slice(&[0; 8]);
        assert!(matches!(decode(&b).unwrap_err(), DecodeError::BadLength { .. }));
        let mut b = oom_bytes();
        b[2..4].copy_from_slice(&16u16.to_ne_bytes());
        assert!(matches!(decode(&b).unwrap_err(), DecodeError::BadLength { .. }));
    }

    #[test]
    fn rejects_unknown_kind_and_version() {
        let mut b = oom_bytes();
        b[0..2].copy_from_slice(&0u16.to_ne_bytes());
        assert_eq!(decode(&b).unwrap_err(), DecodeError::UnknownKind(0));
        assert_eq!(decode(&b).unwrap_err().probe(), "unknown");
        b[0..2].copy_from_slice(&999u16.to_ne_bytes());
        assert_eq!(decode(&b).unwrap_err(), DecodeError::UnknownKind(999));
        let mut b = oom_bytes();
        b[4..6].copy_from_slice(&77u16.to_ne_bytes());
        assert!(matches!(
            decode(&b).unwrap_err(),
            DecodeError::BadVersion { version: 77, .. }
        ));
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        // Deterministic pseudo-random inputs of every length up to twice a record.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..(2 * usize::from(OomKillRecord::LEN)) {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = decode(&buf);
        }
    }
}
