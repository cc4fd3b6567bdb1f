//! Histogram bucket bounds as configured: a list of durations or a log2 range, each bound on
//! a log2 slot edge of the kernel's histograms.

use std::time::Duration;

use sensor_common::agg::LOG2_BUCKETS;
use serde::{Deserialize, Serialize};

/// Histogram bucket bounds of a duration family. The kernel counts in log2 slots of
/// nanoseconds, so every bound is rounded up to a power of two nanoseconds; the exported `le`
/// is that power of two minus 1 ns (the kernel counts whole nanoseconds), e.g. `1ms` is
/// exported as `le="0.001048575"`. Either a list of bounds, or a range: every slot edge from
/// `min` to `max`, `factor` (a power of two) apart.
#[derive(Debug, Clone, PartialEq)]
pub enum Buckets {
    List(Vec<Duration>),
    Log2 { min: Duration, max: Duration, factor: u32 },
}

impl Default for Buckets {
    /// 16 µs to 34 s, 8x apart: 8 bounds and `+Inf`. Loopback connects (10-100 µs) land at or
    /// below 131 µs, same-zone ones (0.2-1 ms) between 131 µs and 1.05 ms, cross-region ones
    /// (50-200 ms) between 8.4 ms and 537 ms.
    fn default() -> Self {
        Buckets::Log2 {
            min: Duration::from_micros(16),
            max: Duration::from_secs(34),
            factor: 8,
        }
    }
}

/// Largest bound: slot 62 ends at 2^63 - 1 ns (292 years); slot 63 also holds larger values.
const MAX_SLOT: usize = LOG2_BUCKETS - 2;

/// The slot whose inclusive upper edge is the smallest `2^(i+1) - 1` ns at or above `d - 1 ns`.
fn slot_of(d: Duration) -> Result<usize, String> {
    let ns = u64::try_from(d.as_nanos()).map_err(|_| format!("{} is too large", fmt_dur(d)))?;
    if ns == 0 {
        return Err("a bound must be greater than 0".into());
    }
    let slot = match ns.max(2).checked_next_power_of_two() {
        Some(p) => p.trailing_zeros() as usize - 1,
        None => usize::MAX,
    };
    if slot > MAX_SLOT {
        return Err(format!("{} is too large", fmt_dur(d)));
    }
    Ok(slot)
}

fn fmt_dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl Buckets {
    /// The exported slots, increasing; an error names the bound that does not work.
    pub fn slots(&self) -> Result<Vec<usize>, String> {
        match self {
            Buckets::List(bounds) => {
                if bounds.is_empty() {
                    return Err("at least one bound is needed".into());
                }
                let mut out: Vec<usize> = Vec::with_capacity(bounds.len());
                for (i, b) in bounds.iter().enumerate() {
                    let s = slot_of(*b)?;
                    if let Some(&prev) = out.last() {
                        if s <= prev {
                            return Err(format!(
                                "{} and {} must increase and fall in different log2 slots (each bound is rounded up to a power of two nanoseconds)",
                                fmt_dur(bounds[i - 1]),
                                fmt_dur(*b)
                            ));
                        }
                    }
                    out.push(s);
                }
                Ok(out)
            }
            Buckets::Log2 { min, max, factor } => {
                if *factor < 2 || !factor.is_power_of_two() {
                    return Err(format!("factor {factor} is not a power of two of at least 2"));
                }
                let (lo, hi) = (slot_of(*min)?, slot_of(*max)?);
                if hi < lo {
                    return Err("max must not be below min".into());
                }
                let step = factor.trailing_zeros() as usize;
                Ok((lo..=hi).step_by(step).collect())
            }
        }
    }
}

impl Serialize for Buckets {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self {
            Buckets::List(bounds) => {
                let mut seq = s.serialize_seq(Some(bounds.len()))?;
                for b in bounds {
                    seq.serialize_element(&fmt_dur(*b))?;
                }
                seq.end()
            }
            Buckets::Log2 { min, max, factor } => {
                let mut m = s.serialize_map(Some(3))?;
                m.serialize_entry("min", &fmt_dur(*min))?;
                m.serialize_entry("max", &fmt_dur(*max))?;
                m.serialize_entry("factor", factor)?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Buckets {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(BucketsVisitor)
    }
}

struct BucketsVisitor;

fn parse_dur<E: serde::de::Error>(s: &str) -> Result<Duration, E> {
    humantime::parse_duration(s).map_err(|e| E::custom(format!("bad duration '{s}' ({e}); use e.g. 100us, 1ms, 2s")))
}

impl<'de> serde::de::Visitor<'de> for BucketsVisitor {
    type Value = Buckets;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of bounds such as [100us, 1ms, 10ms], or {min: 16us, max: 34s, factor: 8}")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Buckets, A::Error> {
        let mut out = Vec::new();
        while let Some(s) = seq.next_element::<String>()? {
            out.push(parse_dur(&s)?);
        }
        Ok(Buckets::List(out))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Buckets, A::Error> {
        use serde::de::Error;
        let (mut min, mut max, mut factor) = (None, None, None);
        while let Some(k) = map.next_key::<String>()? {
            match k.as_str() {
                "min" => min = Some(parse_dur(&map.next_value::<String>()?)?),
                "max" => max = Some(parse_dur(&map.next_value::<String>()?)?),
                "factor" => factor = Some(map.next_value::<u32>()?),
                other => return Err(A::Error::unknown_field(other, &["min", "max", "factor"])),
            }
        }
        Ok(Buckets::Log2 {
            min: min.ok_or_else(|| A::Error::missing_field("min"))?,
            max: max.ok_or_else(|| A::Error::missing_field("max"))?,
            factor: factor.ok_or_else(|| A::Error::missing_field("factor"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agg::{
        tests::{buckets, hist},
        ByDestination, HistLayout, HistogramConfig, Per,
    };

    fn dur(s: &str) -> Duration {
        humantime::parse_duration(s).unwrap()
    }
    #[test]
    fn bucket_lists_round_up_to_slot_edges() {
        let b = Buckets::List(vec![dur("100us"), dur("1ms"), dur("1024ns"), dur("1s")]);
        // 1024 ns is a power of two: its slot ends at 1023 ns, below 100 us, so out of order.
        assert!(b.slots().unwrap_err().contains("must increase"), "{:?}", b.slots());
        let b = Buckets::List(vec![dur("1024ns"), dur("100us"), dur("1ms"), dur("1s")]);
        assert_eq!(b.slots().unwrap(), vec![9, 16, 19, 29]);
        let h = hist(&[1023, 1024, 999_999, 2_000_000_000]);
        let got = buckets(&h, &HistLayout::nanos_as_seconds(&b).unwrap());
        assert_eq!(
            got,
            vec![(1023e-9, 1), (131071e-9, 2), (1048575e-9, 3), (1073741823e-9, 3)]
        );
        assert_eq!(h.buckets.iter().sum::<u64>(), 4);
        // Two bounds in one slot cannot be told apart by the kernel.
        let b = Buckets::List(vec![dur("600us"), dur("1ms")]);
        assert!(b.slots().is_err());
        assert!(Buckets::List(vec![]).slots().is_err());
        assert!(Buckets::List(vec![Duration::ZERO]).slots().is_err());
    }

    #[test]
    fn log2_ranges_step_by_factor() {
        let r = |min: &str, max: &str, factor| Buckets::Log2 {
            min: dur(min),
            max: dur(max),
            factor,
        };
        assert_eq!(r("1us", "137s", 2).slots().unwrap(), (9..=36).collect::<Vec<_>>());
        assert_eq!(
            r("16us", "1s", 4).slots().unwrap(),
            vec![13, 15, 17, 19, 21, 23, 25, 27, 29]
        );
        assert!(r("1ms", "1us", 2).slots().is_err());
        assert!(r("1us", "1s", 3).slots().is_err());
        assert!(r("1us", "1s", 1).slots().is_err());
    }

    #[test]
    fn histogram_config_parses_both_forms_and_names_errors() {
        type H = HistogramConfig<ByDestination>;
        let h: H = serde_yaml_ng::from_str("{buckets: [100us, 1ms, 100ms]}").unwrap();
        assert_eq!(h.per, Per::Destination, "the family's default per");
        assert_eq!(h.buckets.slots().unwrap(), vec![16, 19, 26]);
        let h: H = serde_yaml_ng::from_str("{per: workload, buckets: {min: 1us, max: 1s, factor: 2}}").unwrap();
        assert_eq!(h.per, Per::Workload);
        assert_eq!(h.buckets.slots().unwrap().len(), 21);
        let back: H = serde_yaml_ng::from_str(&serde_yaml_ng::to_string(&h).unwrap()).unwrap();
        assert_eq!(back, h);
        let h: H = serde_yaml_ng::from_str("{}").unwrap();
        assert_eq!(h, H::default());
        assert!(serde_yaml_ng::from_str::<H>("{buckets: {min: 1us, max: 1s}}")
            .unwrap_err()
            .to_string()
            .contains("factor"));
        assert!(serde_yaml_ng::from_str::<H>("{buckets: [soon]}")
            .unwrap_err()
            .to_string()
            .contains("bad duration"));
        assert!(serde_yaml_ng::from_str::<H>("{per: pod}").is_err());
        let h: H = serde_yaml_ng::from_str("{per: destination, buckets: [1ms, 1ms]}").unwrap();
        assert_eq!(
            h.validate(&[Per::Workload, Per::Destination]).unwrap_err().0,
            ".buckets"
        );
        assert_eq!(h.validate(&[Per::Workload, Per::Host]).unwrap_err().0, ".per");
        assert_eq!(h.kept_labels(&["destination", "cgroup"], true), 1);
    }
}
