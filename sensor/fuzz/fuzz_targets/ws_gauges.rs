//! Websocket messages -> user-named gauges: any text is JSON or `not_json`, each message
//! item yields at most one error, and the series stay within `max_series`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prometheus::Registry;
use sensor::checks::{config::GaugeSpec, metrics::Extractor};

fn spec(pick: u8) -> GaugeSpec {
    let s = |v: &str| v.to_string();
    match pick % 3 {
        0 => GaugeSpec {
            name: s("inventory"),
            labels: vec![s("store"), s("model")],
            value: s("inventory"),
            help: None,
            max_series: 4,
        },
        1 => GaugeSpec {
            name: s("depth"),
            labels: vec![s("q")],
            value: s("stats.depth"),
            help: Some(s("queue depth")),
            max_series: 2,
        },
        _ => GaugeSpec {
            name: s("value"),
            labels: Vec::new(),
            value: s("a.b.c"),
            help: None,
            max_series: 1,
        },
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((pick, msgs)) = data.split_first() else { return };
    let spec = spec(*pick);
    let reg = Registry::new();
    let x = Extractor::new(&reg, "fuzz", &spec).expect("a valid spec registers");
    // Several messages, one per line, as a stream delivers them.
    for msg in msgs.split(|b| *b == b'\n') {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(msg) else {
            continue;
        };
        let items = match &v {
            serde_json::Value::Array(a) => a.len(),
            _ => 1,
        };
        assert!(x.apply(&v).len() <= items);
    }
    let families = reg.gather();
    let series: usize = families.iter().map(|f| f.get_metric().len()).sum();
    assert!(series <= spec.max_series, "{series} series > {}", spec.max_series);
    // The scrape also carries `sensor_series{family}`, a series count per family of it.
    let text = sensor::metrics::render(&reg, &sensor::expo::Sources::default());
    let rendered = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("sensor_series{"))
        .count();
    assert_eq!(rendered, series, "{text}");
});
