//! Validating decoder for kernel records: the header's kind, length and version are checked
//! against the kinds the running probes registered before any payload byte is reinterpreted,
//! and every failure is a value the caller counts, never a panic.

use std::collections::HashMap;

use sensor_common::record::RecordHeader;

use crate::probe::RecordKind;

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
    /// The record kind a bad record is charged to, when its kind is a known one.
    pub fn kind(&self) -> Option<u16> {
        match self {
            DecodeError::TruncatedHeader { .. } | DecodeError::UnknownKind(_) => None,
            DecodeError::BadLength { kind, .. }
            | DecodeError::Truncated { kind, .. }
            | DecodeError::BadVersion { kind, .. } => Some(*kind),
        }
    }
}

/// Reads a `T` out of `bytes`; `None` when they are too short.
pub fn read<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: the slice holds at least size_of::<T>() bytes, `read_unaligned` has no alignment
    // requirement, and `T: Pod` is valid for any bit pattern.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// The kinds the running probes handle, each with the index of its owner.
#[derive(Default)]
pub struct KindTable {
    kinds: HashMap<u16, (RecordKind, usize)>,
}

impl KindTable {
    /// Registers `kinds` for owner `owner`; a kind registered twice is a programming error that
    /// the probe list's unit test catches, and the first owner keeps it.
    pub fn add(&mut self, kinds: &[RecordKind], owner: usize) {
        for k in kinds {
            self.kinds.entry(k.kind).or_insert((*k, owner));
        }
    }

    /// The owner of a kind.
    pub fn owner(&self, kind: u16) -> Option<usize> {
        self.kinds.get(&kind).map(|(_, o)| *o)
    }

    /// Checks one record: its header, then length and version against its kind. Perf samples
    /// may carry trailing alignment padding, so the sample may be longer than the record, never
    /// shorter. Returns the kind and its owner.
    pub fn check(&self, bytes: &[u8]) -> Result<(u16, usize), DecodeError> {
        let header: RecordHeader = read(bytes).ok_or(DecodeError::TruncatedHeader {
            got: bytes.len(),
            need: std::mem::size_of::<RecordHeader>(),
        })?;
        let (spec, owner) = self
            .kinds
            .get(&header.kind)
            .copied()
            .ok_or(DecodeError::UnknownKind(header.kind))?;
        if header.len != spec.len {
            return Err(DecodeError::BadLength {
                kind: header.kind,
                declared: header.len,
                expected: spec.len,
            });
        }
        if bytes.len() < usize::from(header.len) {
            return Err(DecodeError::Truncated {
                kind: header.kind,
                declared: header.len,
                got: bytes.len(),
            });
        }
        if header.version != spec.version {
            return Err(DecodeError::BadVersion {
                kind: header.kind,
                version: header.version,
            });
        }
        Ok((header.kind, owner))
    }

    /// The owner of a raw record, from its header alone.
    pub fn owner_of(&self, bytes: &[u8]) -> Option<usize> {
        read::<RecordHeader>(bytes).and_then(|h| self.owner(h.kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: RecordKind = RecordKind {
        kind: 7,
        len: 40,
        version: 3,
    };
    const B: RecordKind = RecordKind {
        kind: 9,
        len: 24,
        version: 1,
    };

    fn table() -> KindTable {
        let mut t = KindTable::default();
        t.add(&[A], 0);
        t.add(&[B], 1);
        t
    }

    fn record(k: RecordKind) -> Vec<u8> {
        let mut b = vec![0u8; usize::from(k.len)];
        b[0..2].copy_from_slice(&k.kind.to_ne_bytes());
        b[2..4].copy_from_slice(&k.len.to_ne_bytes());
        b[4..6].copy_from_slice(&k.version.to_ne_bytes());
        b
    }

    #[test]
    fn accepts_valid_records_with_padding() {
        let t = table();
        let mut a = record(A);
        a.extend_from_slice(&[0; 4]);
        assert_eq!(t.check(&a), Ok((7, 0)));
        assert_eq!(t.check(&record(B)), Ok((9, 1)));
        assert_eq!(t.owner_of(&record(B)), Some(1));
    }

    #[test]
    fn each_error_path() {
        let t = table();
        let a = record(A);
        assert_eq!(t.check(&a[..8]), Err(DecodeError::TruncatedHeader { got: 8, need: 16 }));
        assert_eq!(t.check(&[]), Err(DecodeError::TruncatedHeader { got: 0, need: 16 }));
        assert_eq!(
            t.check(&a[..39]),
            Err(DecodeError::Truncated {
                kind: 7,
                declared: 40,
                got: 39
            })
        );
        let mut long = a.clone();
        long[2..4].copy_from_slice(&48u16.to_ne_bytes());
        long.extend_from_slice(&[0; 8]);
        assert_eq!(
            t.check(&long),
            Err(DecodeError::BadLength {
                kind: 7,
                declared: 48,
                expected: 40
            })
        );
        let mut v = a.clone();
        v[4..6].copy_from_slice(&77u16.to_ne_bytes());
        assert_eq!(t.check(&v), Err(DecodeError::BadVersion { kind: 7, version: 77 }));
        assert_eq!(t.check(&v).unwrap_err().kind(), Some(7));
        let mut u = a;
        u[0..2].copy_from_slice(&999u16.to_ne_bytes());
        assert_eq!(t.check(&u), Err(DecodeError::UnknownKind(999)));
        assert_eq!(t.check(&u).unwrap_err().kind(), None);
    }

    /// Random bytes of every length: each result is one of the defined outcomes, and the
    /// outcome is the one the header implies.
    #[test]
    fn arbitrary_bytes_get_the_outcome_their_header_implies() {
        let t = table();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut seen = [0usize; 6];
        for len in 0..200usize {
            for round in 0..50 {
                let mut buf: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                // Steer a share of inputs onto known kinds so every path is exercised.
                if buf.len() >= 6 && round % 2 == 0 {
                    let k = if round % 4 == 0 { A } else { B };
                    buf[0..2].copy_from_slice(&k.kind.to_ne_bytes());
                    if round % 8 < 4 {
                        buf[2..4].copy_from_slice(&k.len.to_ne_bytes());
                    }
                    if round % 16 < 8 {
                        buf[4..6].copy_from_slice(&k.version.to_ne_bytes());
                    }
                }
                let r = t.check(&buf);
                let expect = if buf.len() < 16 {
                    Err(DecodeError::TruncatedHeader {
                        got: buf.len(),
                        need: 16,
                    })
                } else {
                    let kind = u16::from_ne_bytes([buf[0], buf[1]]);
                    let declared = u16::from_ne_bytes([buf[2], buf[3]]);
                    let version = u16::from_ne_bytes([buf[4], buf[5]]);
                    match [A, B].into_iter().find(|k| k.kind == kind) {
                        None => Err(DecodeError::UnknownKind(kind)),
                        Some(k) if declared != k.len => Err(DecodeError::BadLength {
                            kind,
                            declared,
                            expected: k.len,
                        }),
                        Some(k) if buf.len() < usize::from(k.len) => Err(DecodeError::Truncated {
                            kind,
                            declared,
                            got: buf.len(),
                        }),
                        Some(k) if version != k.version => Err(DecodeError::BadVersion { kind, version }),
                        Some(k) => Ok((kind, usize::from(k.kind == B.kind))),
                    }
                };
                assert_eq!(r, expect, "input {buf:?}");
                let slot = match r {
                    Ok(_) => 0,
                    Err(DecodeError::TruncatedHeader { .. }) => 1,
                    Err(DecodeError::UnknownKind(_)) => 2,
                    Err(DecodeError::BadLength { .. }) => 3,
                    Err(DecodeError::Truncated { .. }) => 4,
                    Err(DecodeError::BadVersion { .. }) => 5,
                };
                seen[slot] += 1;
            }
        }
        assert!(seen.iter().all(|n| *n > 0), "every outcome exercised: {seen:?}");
    }
}
