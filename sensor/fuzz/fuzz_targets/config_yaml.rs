//! The daemon's YAML configuration and its command-line overrides. Input: the YAML text, then
//! after a NUL byte one override per line (first byte picks the key, `\x01` separates values).
//! An accepted configuration survives a YAML round trip, and applying the same overrides again
//! changes nothing.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sensor::config::{flag_keys, Config, FlagKey, Override};

fn keys() -> &'static [FlagKey] {
    static K: OnceLock<Vec<FlagKey>> = OnceLock::new();
    K.get_or_init(flag_keys)
}

/// Serializes, parses back, and checks it is the same configuration.
fn round_trip(cfg: &Config) {
    let text = serde_yaml_ng::to_string(cfg).expect("a configuration serializes");
    let back = Config::parse(&text, "round-trip.yaml")
        .unwrap_or_else(|e| panic!("an accepted configuration's YAML is rejected: {e}\n{text}"));
    let again = serde_yaml_ng::to_string(&back).expect("a configuration serializes");
    assert_eq!(text, again, "the YAML round trip changed the configuration");
}

fn overrides(bytes: &[u8]) -> Vec<Override> {
    let keys = keys();
    bytes
        .split(|b| *b == b'\n')
        .filter_map(|line| {
            let (first, rest) = line.split_first()?;
            let key = keys[usize::from(*first) % keys.len()].clone();
            let values = String::from_utf8_lossy(rest)
                .split('\x01')
                .map(str::to_string)
                .collect();
            Some(Override { key, values })
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let (yaml, rest) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(yaml) else { return };
    let base = match Config::parse(text, "fuzz.yaml") {
        Ok(cfg) => {
            round_trip(&cfg);
            cfg
        }
        Err(e) => {
            assert!(e.to_string().starts_with("config fuzz.yaml"), "{e}");
            Config::default()
        }
    };
    let ovs = overrides(rest);
    if let Ok(cfg) = base.with_overrides(&ovs) {
        round_trip(&cfg);
        let twice = cfg
            .clone()
            .with_overrides(&ovs)
            .expect("overrides accepted once are accepted again");
        assert_eq!(
            serde_yaml_ng::to_string(&twice).ok(),
            serde_yaml_ng::to_string(&cfg).ok(),
            "applying the same overrides twice changed the configuration"
        );
    }
});
