//! What the journal costs, as ratios in one run (docs/measurements.md): publishing an event with
//! the journal against without it (the record path), the writer's throughput, and how long
//! opening a full 64 MiB journal takes. `cargo run --release -p sensor --example journal_cost`.

use std::{sync::Arc, time::Instant};

use sensor::{
    events::EventHub,
    journal::{Fsync, Journal, JournalConfig, JournalMetrics},
};

#[derive(serde::Serialize)]
struct Kill<'a> {
    time: f64,
    scope: &'a str,
    victim_pid: u32,
    victim_comm: &'a str,
    cgroup: &'a str,
    anon_rss_bytes: u64,
    memory_limit_bytes: u64,
    trigger_comm: &'a str,
}

fn kill(i: u32) -> Kill<'static> {
    Kill {
        time: 1.8e9 + f64::from(i),
        scope: "memcg",
        victim_pid: i,
        victim_comm: "tail",
        cgroup: "/kubepods/burstable/pod0b7c2f3e-1111-2222-3333-444455556666/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        anon_rss_bytes: 33_554_432,
        memory_limit_bytes: 33_554_432,
        trigger_comm: "tail",
    }
}

fn publish_ns(hub: &EventHub, n: u32) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        hub.publish_as("oom_kill", &kill(i));
    }
    t.elapsed().as_nanos() as f64 / f64::from(n)
}

fn main() {
    let dir = std::env::temp_dir().join(format!("sensor-journal-cost-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = JournalConfig {
        path: dir.clone(),
        fsync: Fsync::Interval,
        queue: 1 << 20,
        ..JournalConfig::default()
    };
    let n = 200_000;
    for round in 0..3 {
        let plain = EventHub::new(1000);
        let base = publish_ns(&plain, n);
        let m = JournalMetrics::new().unwrap();
        let j = Journal::open(&cfg, m.clone()).unwrap();
        let hub = EventHub::with_journal(1000, Some(Arc::clone(&j)));
        let with = publish_ns(&hub, n);
        let t = Instant::now();
        hub.close();
        let drain = t.elapsed().as_secs_f64();
        println!(
            "round {round}: publish {base:.0} ns without the journal, {with:.0} ns with it (ratio {:.2}); writer drained the rest in {drain:.2} s, {} written, {} dropped",
            with / base,
            m.written.get(),
            m.dropped.with_label_values(&["queue_full"]).get()
        );
    }
    // Fill the default 64 MiB bound, then time opening it (every segment scanned).
    let cfg = JournalConfig { queue: 4096, ..cfg };
    let m = JournalMetrics::new().unwrap();
    let j = Journal::open(&cfg, m.clone()).unwrap();
    let hub = EventHub::with_journal(1000, Some(j));
    let t = Instant::now();
    let mut i = 0;
    while m.removed.get() < 4 {
        for _ in 0..10_000 {
            hub.publish_as("oom_kill", &kill(i));
            i += 1;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    hub.close();
    let fill = t.elapsed().as_secs_f64();
    let bytes = m.bytes.get();
    let t = Instant::now();
    let m2 = JournalMetrics::new().unwrap();
    let j = Journal::open(&cfg, m2).unwrap();
    let open = t.elapsed().as_secs_f64();
    println!(
        "full journal: {i} events published in {fill:.1} s ({:.0}/s written), {bytes} bytes on disk; opening it took {open:.3} s",
        m.written.get() as f64 / fill
    );
    j.close(j.next_seq());
    let _ = std::fs::remove_dir_all(&dir);
}
