//! The verdict's rules, each on both sides of its thresholds.

use super::*;

const MIB: u64 = 1 << 20;
const LIMIT: u64 = 64 * MIB;

fn s(at: f64, usage: u64) -> Sample {
    Sample {
        at,
        usage,
        limit: LIMIT,
        ..Sample::default()
    }
}

fn input<'a>(samples: &'a [Sample], time: f64, earlier: &'a [f64]) -> Input<'a> {
    Input {
        time,
        scope: Scope::Memcg,
        interval: 2.0,
        samples,
        after: None,
        limit: Some(LIMIT),
        victim_rss: Some(LIMIT / 2),
        earlier_kills: earlier,
        host_available: Some(100 * MIB),
        host_top: &[],
        binding: None,
    }
}

/// Idle at `base` until `t0`, then growing `rate` bytes/s, sampled every 2 s until `end`.
fn growing(base: u64, t0: f64, rate: f64, end: f64) -> Vec<Sample> {
    let mut v = Vec::new();
    let mut t = 0.0;
    while t <= end {
        let u = if t < t0 {
            base
        } else {
            base + 10 * MIB + ((t - t0) * rate) as u64
        };
        v.push(s(t, u.min(LIMIT)));
        t += 2.0;
    }
    v
}

#[test]
fn growth_rate_is_the_fit_over_the_run_only() {
    // Idle, a 10 MiB start-up jump, then 1 MiB/s: the jump and the idle part are left out.
    let v = growing(MIB, 20.0, MIB as f64, 60.0);
    let l = lead_up(&input(&v, 61.0, &[]));
    assert_eq!(l.reason, Reason::Growth, "{l:?}");
    let rate = l.growth_bytes_per_minute.unwrap();
    assert!((rate - 60.0 * MIB as f64).abs() < 0.01 * 60.0 * MIB as f64, "{rate}");
    assert_eq!(l.growth_seconds, Some(40.0));
    assert!(
        l.verdict
            .starts_with("steady growth of 60 MiB/min for 40 s until the 64 MiB limit"),
        "{}",
        l.verdict
    );
    assert_eq!(l.victim_share, Some(0.5));
    assert_eq!(l.usage_at_kill_bytes, Some(LIMIT));
}

/// Growth at `rate` from `t0`, ending 1 MiB below the limit at `end` (so never a spike).
fn growing_to_limit(t0: f64, rate: f64, end: f64) -> Vec<Sample> {
    let base = LIMIT - MIB - 10 * MIB - ((end - t0) * rate) as u64;
    growing(base, t0, rate, end)
}

/// `n` flat samples at `base`, then `rising` samples every 2 s, the first 2 s after the last
/// flat one.
fn ramp(base: u64, n: usize, rising: &[u64]) -> Vec<Sample> {
    let flat = (0..n).map(|i| s(i as f64 * 2.0, base));
    let up = rising.iter().enumerate().map(|(i, u)| s((n + i) as f64 * 2.0, *u));
    flat.chain(up).collect()
}

#[test]
fn growth_boundaries() {
    // A ramp shorter than 10 s is growth with its rate: 3 samples over 4 s, 5 MiB/s.
    let v = growing_to_limit(52.0, 5.0 * MIB as f64, 56.0);
    let l = lead_up(&input(&v, 57.0, &[]));
    assert_eq!((l.growth_samples, l.growth_seconds), (3, Some(4.0)));
    assert_eq!(l.reason, Reason::Growth, "{l:?}");
    assert_eq!(l.growth_bytes_per_minute, Some(300.0 * MIB as f64));
    // The ramp (from its first rising sample to the kill at the limit) must rise a quarter of
    // the limit: from 48 MiB it does, from 1 byte above it does not (the history is flat).
    let q = LIMIT / 4;
    let up = |first: u64| {
        let rising: Vec<u64> = (0..8).map(|i| first + i * 2 * MIB).collect();
        ramp(first - 2 * MIB, 5, &rising)
    };
    let l = lead_up(&input(&up(LIMIT - q), 25.0, &[]));
    assert_eq!((l.reason, l.ramp_rise_bytes), (Reason::Growth, Some(q)), "{l:?}");
    assert_eq!(
        l.verdict,
        "steady growth of 60 MiB/min for 14 s until the 64 MiB limit (leak-like)"
    );
    let l = lead_up(&input(&up(LIMIT - q + 1), 25.0, &[]));
    assert_eq!((l.reason, l.ramp_rise_bytes), (Reason::Unknown, Some(q - 1)), "{l:?}");
    assert_eq!(l.verdict, "no clear lead-up: 64 MiB of the 64 MiB limit");
    // A start-up step onto a plateau is no growth: the ramp is the plateau and the kill.
    let v = ramp(0, 3, &[48 * MIB + 1, 48 * MIB + 1, 48 * MIB + 1]);
    let l = lead_up(&input(&v, 13.0, &[]));
    assert_eq!((l.reason, l.growth_samples), (Reason::Unknown, 3), "{l:?}");
    // One rising sample is a ramp over two gaps: growth, its rate from the base to the kill.
    let v = ramp(8 * MIB, 5, &[40 * MIB]);
    let l = lead_up(&input(&v, 12.0, &[]));
    assert_eq!((l.reason, l.growth_samples), (Reason::Growth, 1), "{l:?}");
    assert_eq!(l.growth_seconds, Some(4.0));
    assert_eq!(l.growth_bytes_per_minute, Some(56.0 * MIB as f64 * 15.0));
}

/// The case: 16 MiB/s into a 160 MiB limit, killed 10 s in: 4 rising samples over 6 s.
#[test]
fn a_fast_steady_ramp_is_growth_with_its_rate() {
    const LIM: u64 = 160 * MIB;
    let v: Vec<Sample> = [
        (-4.0, 8),
        (-2.0, 8),
        (0.0, 8),
        (2.0, 32),
        (4.0, 64),
        (6.0, 96),
        (8.0, 128),
    ]
    .iter()
    .map(|(at, mib)| Sample {
        limit: LIM,
        ..s(*at, mib * MIB)
    })
    .collect();
    let mut i = input(&v, 10.0, &[]);
    i.limit = Some(LIM);
    let l = lead_up(&i);
    assert_eq!(
        (l.reason, l.growth_samples, l.growth_seconds),
        (Reason::Growth, 4, Some(6.0)),
        "{l:?}"
    );
    assert_eq!(l.growth_bytes_per_minute, Some(16.0 * 60.0 * MIB as f64));
    assert_eq!(
        l.verdict,
        "steady growth of 960 MiB/min for 6 s until the 160 MiB limit (leak-like)"
    );
}

#[test]
fn spike_and_its_boundaries() {
    let v: Vec<Sample> = (0..10).map(|i| s(f64::from(i) * 2.0, 2 * MIB)).collect();
    let l = lead_up(&input(&v, 19.0, &[]));
    assert_eq!(l.reason, Reason::Spike);
    assert_eq!(l.verdict, "sudden spike: 62 MiB in 1 s to the 64 MiB limit");
    // Last sample too old (more than 3 intervals): no longer measurable as a spike.
    assert_eq!(lead_up(&input(&v, 18.0 + 6.1, &[])).reason, Reason::Unknown);
    assert_eq!(lead_up(&input(&v, 18.0 + 6.0, &[])).reason, Reason::Spike);
    // After rising samples, half of the ramp's rise (48 MiB from 16 MiB) after the last sample
    // is a spike; a byte less is the ramp's end (growth).
    let v = ramp(8 * MIB, 3, &[16 * MIB, 28 * MIB, 40 * MIB]);
    let l = lead_up(&input(&v, 11.0, &[]));
    assert_eq!((l.reason, l.ramp_rise_bytes), (Reason::Spike, Some(48 * MIB)), "{l:?}");
    assert_eq!(l.verdict, "sudden spike: 24 MiB in 1 s to the 64 MiB limit");
    let v = ramp(8 * MIB, 3, &[16 * MIB, 28 * MIB, 40 * MIB + 1]);
    assert_eq!(lead_up(&input(&v, 11.0, &[])).reason, Reason::Growth);
}

#[test]
fn a_ramp_within_one_sample_gap_is_a_spike() {
    // Flat until the last sample, then a quarter of the limit before the next: a spike.
    let q = LIMIT / 4;
    let v = ramp(LIMIT - q, 10, &[]);
    let l = lead_up(&input(&v, 19.0, &[]));
    assert_eq!((l.reason, l.growth_samples), (Reason::Spike, 0), "{l:?}");
    assert_eq!(l.verdict, "sudden spike: 16 MiB in 1 s to the 64 MiB limit");
    // One byte less is a flat history.
    let v = ramp(LIMIT - q + 1, 10, &[]);
    assert_eq!(lead_up(&input(&v, 19.0, &[])).reason, Reason::Unknown);
    // Dips and wobbles within the tolerance are still flat.
    let v: Vec<Sample> = (0..10u32)
        .map(|i| s(f64::from(i) * 2.0, LIMIT - q + u64::from((i + 1) % 2) * MIB))
        .collect();
    assert_eq!(lead_up(&input(&v, 19.0, &[])).reason, Reason::Spike);
    // The last sample more than 3 intervals before the kill cannot tell when it rose.
    let v = ramp(LIMIT - q, 10, &[]);
    assert_eq!(lead_up(&input(&v, 18.0 + 6.1, &[])).reason, Reason::Unknown);
}

#[test]
fn the_limit_that_fired_is_in_the_verdict() {
    use crate::oom::limit::{Binding, LimitScope};
    let v: Vec<Sample> = (0..10).map(|i| s(f64::from(i) * 2.0, 2 * MIB)).collect();
    let own = Binding {
        scope: LimitScope::Own,
        cgroup: Some("/a".into()),
        limit_bytes: Some(LIMIT),
        own_limit_bytes: Some(LIMIT),
        pod: false,
        container: false,
    };
    let mut i = input(&v, 19.0, &[]);
    i.binding = Some(&own);
    assert_eq!(
        lead_up(&i).verdict,
        "sudden spike: 62 MiB in 1 s to its own 64 MiB limit"
    );
    // The pod's limit, the container without one: the container held its last sample and the
    // victim (32 MiB) at the kill, not the pod's limit.
    let pod = Binding {
        scope: LimitScope::Ancestor,
        limit_bytes: Some(512 * MIB),
        own_limit_bytes: None,
        pod: true,
        container: true,
        ..own.clone()
    };
    let grown: Vec<Sample> = (0..10u32)
        .map(|i| s(f64::from(i) * 2.0, u64::from(i + 1) * 16 * MIB))
        .collect();
    let mut i = input(&grown, 19.0, &[]);
    i.binding = Some(&pod);
    i.limit = Some(512 * MIB);
    let l = lead_up(&i);
    assert_eq!(l.usage_at_kill_bytes, Some(160 * MIB), "{l:?}");
    assert_eq!(
        l.verdict,
        "steady growth of 480 MiB/min for 16 s until the pod's 512 MiB limit, the container has none (leak-like)"
    );
    // Without a history, the verdict still says whose limit it was.
    let mut i = input(&[], 19.0, &[]);
    i.binding = Some(&pod);
    assert_eq!(
        lead_up(&i).verdict,
        "no memory history for this workload: killed at the pod's 512 MiB limit, the container has none"
    );
    // The host ran out (a scope the kernel could not tell, no limit on the path).
    let host = Binding {
        scope: LimitScope::Host,
        cgroup: None,
        limit_bytes: None,
        ..own
    };
    let mut i = input(&v, 19.0, &[]);
    i.scope = Scope::Unknown;
    i.binding = Some(&host);
    assert_eq!(lead_up(&i).reason, Reason::Host);
}

fn at_limit(secs: u32, hits_per_sample: u64) -> Vec<Sample> {
    (0..=secs / 2)
        .map(|i| Sample {
            limit_hits: Some(u64::from(i) * hits_per_sample),
            ..s(f64::from(i) * 2.0, LIMIT - MIB)
        })
        .collect()
}

#[test]
fn limit_and_its_boundaries() {
    let v = at_limit(120, 3);
    let l = lead_up(&input(&v, 121.0, &[]));
    assert_eq!(l.reason, Reason::Limit, "{l:?}");
    assert_eq!(l.near_limit_seconds, Some(121.0));
    assert_eq!(l.limit_hits_1m, Some(90));
    assert_eq!(
        l.verdict,
        "at the 64 MiB limit for 2 min with 180 limit hits (limit too small)"
    );
    // Stalls alone are evidence too.
    let stalled: Vec<Sample> = at_limit(120, 0)
        .into_iter()
        .map(|x| Sample {
            psi_full_us: Some((x.at * 250_000.0) as u64),
            ..x
        })
        .collect();
    let l = lead_up(&input(&stalled, 121.0, &[]));
    assert_eq!(
        l.verdict,
        "at the 64 MiB limit for 2 min with 0 limit hits and memory stalls 25% of the time (limit too small)"
    );
    // At the limit but never hitting it, and no stalls: not this rule.
    assert_eq!(lead_up(&input(&at_limit(120, 0), 121.0, &[])).reason, Reason::Unknown);
    // Just under the minimum time at the limit.
    assert_eq!(lead_up(&input(&at_limit(58, 3), 59.9, &[])).reason, Reason::Unknown);
    assert_eq!(lead_up(&input(&at_limit(58, 3), 60.0, &[])).reason, Reason::Limit);
    // 5% below the limit still counts as at it; below that does not.
    let far: Vec<Sample> = at_limit(120, 3)
        .into_iter()
        .map(|x| Sample {
            usage: LIMIT - LIMIT / 20 - 1,
            ..x
        })
        .collect();
    assert_eq!(lead_up(&input(&far, 121.0, &[])).near_limit_seconds, Some(0.0));
}

#[test]
fn repeat_host_and_unknown() {
    let v: Vec<Sample> = (0..10).map(|i| s(f64::from(i) * 2.0, 2 * MIB)).collect();
    assert_eq!(
        lead_up(&input(&v, 19.0, &[1.0])).reason,
        Reason::Spike,
        "one earlier kill"
    );
    let l = lead_up(&input(&v, 19.0, &[1.0, 5.0]));
    assert_eq!(l.reason, Reason::Repeat);
    assert_eq!(l.verdict, "killed 3 times in the last hour (crash loop)");
    let mut i = input(&v, 19.0, &[1.0, 5.0]);
    i.scope = Scope::Global;
    let l = lead_up(&i);
    assert_eq!(l.reason, Reason::Host, "host wins over everything");
    assert_eq!(l.verdict, "host out of memory: the node had 100 MiB available");
    let top = [
        MemUser {
            pid: 7,
            comm: "java".into(),
            rss_bytes: 3 << 30,
        },
        MemUser {
            pid: 9,
            comm: "redis".into(),
            rss_bytes: 200 * MIB,
        },
    ];
    i.host_top = &top;
    assert_eq!(
        lead_up(&i).verdict,
        "host out of memory: the node had 100 MiB available; largest: java 3.0 GiB (pid 7), redis 200 MiB (pid 9)"
    );
    let l = lead_up(&input(&[], 19.0, &[]));
    assert_eq!(
        (l.reason, l.verdict.as_str()),
        (Reason::Unknown, "no memory history for this workload")
    );
}

#[test]
fn counters_use_the_read_after_the_kill() {
    let v: Vec<Sample> = (0..=60)
        .map(|i| Sample {
            psi_full_us: Some(0),
            psi_some_us: Some(0),
            limit_hits: Some(0),
            ..s(f64::from(i) * 2.0, MIB)
        })
        .collect();
    let mut i = input(&v, 120.5, &[]);
    i.after = Some(Sample {
        psi_some_us: Some(30_500_000),
        psi_full_us: Some(6_100_000),
        limit_hits: Some(7),
        ..s(121.0, 0)
    });
    let l = lead_up(&i);
    assert_eq!((l.limit_hits_1m, l.limit_hits_10m), (Some(7), Some(7)));
    assert_eq!(l.psi_some_ratio_1m, Some(0.5));
    assert!((l.psi_full_ratio_1m.unwrap() - 0.1).abs() < 1e-9);
}

#[test]
fn formats() {
    assert_eq!(bytes(512 * MIB), "512 MiB");
    assert_eq!(bytes(3 << 29), "1.5 GiB");
    assert_eq!(bytes(800 << 10), "800 KiB");
    assert_eq!((span(45.0), span(540.0)), ("45 s".to_string(), "9 min".to_string()));
}

#[test]
fn reclaim_time_is_limit_evidence_where_psi_is_missing() {
    // cgroup v1: no PSI, no limit hits counted, but the memcg probe saw 0.1 s of reclaim
    // per 2 s sample.
    let mut at_limit: Vec<Sample> = at_limit(120, 0)
        .into_iter()
        .enumerate()
        .map(|(i, s)| Sample {
            reclaim_ns: Some(i as u64 * 100_000_000),
            ..s
        })
        .collect();
    let l = lead_up(&input(&at_limit, 121.0, &[]));
    assert_eq!(l.reclaim_seconds_1m, Some(3.0));
    assert_eq!(
        l.reclaim_seconds_10m,
        Some(6.0),
        "the window holds 2 minutes of samples"
    );
    assert_eq!(l.reason, Reason::Limit, "{}", l.verdict);
    assert_eq!(
        l.verdict,
        "at the 64 MiB limit for 2 min with 0 limit hits and 3.0 s in reclaim in the last minute (limit too small)"
    );
    // Without reclaim (and without hits or PSI) the same history is not this rule.
    for s in &mut at_limit {
        s.reclaim_ns = Some(0);
    }
    assert_ne!(lead_up(&input(&at_limit, 121.0, &[])).reason, Reason::Limit);
    // Samples taken before reclaim was first published do not hide it.
    for (i, s) in at_limit.iter_mut().enumerate() {
        s.reclaim_ns = (i >= 5).then_some(i as u64 * 100_000_000);
    }
    let l = lead_up(&input(&at_limit, 121.0, &[]));
    assert_eq!(l.reclaim_seconds_1m, Some(3.0));
    assert_eq!(l.reclaim_seconds_10m, Some(5.5), "from the first sample that has it");
}
