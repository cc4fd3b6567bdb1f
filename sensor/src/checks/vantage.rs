//! Where a sensor probes from (`vantage.location`, a label on its check series) and which of
//! the fleet's checks it runs (`vantage.sample`, per check `checks[].sample`).
//!
//! Every sensor of a DaemonSet gets the same check list; with 10,000 nodes each target would
//! see 10,000 probers. A share is chosen per check by a hash of the node's name and the check's
//! name: the same nodes probe across restarts and upgrades (no reshuffle of the fleet's view),
//! and different checks land on different nodes.

use serde::{Deserialize, Serialize};

use super::config::Check;

/// The `vantage:` section of the config.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Vantage {
    /// Zone or region this sensor probes from; a `location` label on its check series when
    /// set (the DaemonSet passes the node's `topology.kubernetes.io/zone` through the downward
    /// API).
    pub location: String,
    /// This sensor's name in the sampling hash; empty: the host name (the DaemonSet passes the
    /// node name, which is also the `instance` Prometheus gives the sensor).
    pub node: String,
    /// Share of the fleet's sensors that run each check, in (0, 1]; a check's own `sample`
    /// overrides it.
    pub sample: f64,
}

impl Default for Vantage {
    fn default() -> Self {
        Vantage {
            location: String::new(),
            node: String::new(),
            sample: 1.0,
        }
    }
}

/// What `/api/v1/checks` says about this sensor's place in the fleet.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct VantageView {
    /// Empty when unset (the series then carry no `location` label).
    pub location: String,
    pub node: String,
    /// Configured checks this sensor does not run (sampled out), by name.
    pub sampled_out: Vec<String>,
}

fn valid_share(s: f64) -> bool {
    s > 0.0 && s <= 1.0
}

/// Validates `vantage` and every check's `sample`; errors are `(key path, reason)`.
pub fn validate(v: &Vantage, checks: &[Check]) -> Result<(), (String, String)> {
    if !valid_share(v.sample) {
        return Err(("vantage.sample".into(), format!("{} is outside (0, 1]", v.sample)));
    }
    if v.location.chars().any(char::is_control) {
        return Err(("vantage.location".into(), "contains a control character".into()));
    }
    for (i, c) in checks.iter().enumerate() {
        if let Some(s) = c.sample.filter(|s| !valid_share(*s)) {
            return Err((
                format!("checks[{i}].sample"),
                format!("check '{}': {s} is outside (0, 1]", c.name),
            ));
        }
    }
    Ok(())
}

/// FNV-1a over the bytes, then the splitmix64 finalizer: stable across Rust versions and
/// platforms (std's hasher is not promised to be), and well mixed in its high bits even for
/// names that differ in one character (node-0001, node-0002).
fn stable_hash(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0xff)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// True when `node` is among the `share` of the fleet that runs `check`.
pub fn runs(node: &str, check: &str, share: f64) -> bool {
    if share >= 1.0 {
        return true;
    }
    // The top 53 bits as a fraction in [0, 1).
    let frac = (stable_hash(&[node, check]) >> 11) as f64 / (1u64 << 53) as f64;
    frac < share
}

/// The host name (/proc/sys/kernel/hostname), or "" when unreadable.
fn host_name() -> String {
    match std::fs::read_to_string("/proc/sys/kernel/hostname") {
        Ok(s) => s.trim().to_string(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the host name; check sampling uses \"\"");
            String::new()
        }
    }
}

impl Vantage {
    /// `node`, or the host name when it is empty.
    pub fn node_name(&self) -> String {
        match self.node.trim() {
            "" => host_name(),
            n => n.to_string(),
        }
    }

    /// The checks this sensor runs, and its view (location, node, the names sampled out).
    pub fn select(&self, checks: &[Check]) -> (Vec<Check>, VantageView) {
        let node = self.node_name();
        let (run, out): (Vec<&Check>, Vec<&Check>) = checks
            .iter()
            .partition(|c| runs(&node, &c.name, c.sample.unwrap_or(self.sample)));
        let view = VantageView {
            location: self.location.trim().to_string(),
            node,
            sampled_out: out.iter().map(|c| c.name.clone()).collect(),
        };
        (run.into_iter().cloned().collect(), view)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, sample: Option<f64>) -> Check {
        let mut c: Check =
            serde_yaml_ng::from_str(&format!("{{name: {name}, type: http, url: 'http://127.0.0.1:1/'}}")).unwrap();
        c.sample = sample;
        c
    }

    #[test]
    fn a_tenth_of_ten_thousand_nodes_probe_and_the_same_ones_again() {
        let nodes: Vec<String> = (0..10_000).map(|i| format!("node-{i:05}")).collect();
        let chosen =
            |check: &str| -> Vec<usize> { (0..nodes.len()).filter(|&i| runs(&nodes[i], check, 0.1)).collect() };
        let shop = chosen("shop");
        // Binomial(10000, 0.1): sd 30; 5 sd either side.
        assert!((850..=1150).contains(&shop.len()), "{} nodes", shop.len());
        assert_eq!(shop, chosen("shop"), "deterministic: the same nodes after a restart");
        // Another check lands on other nodes: the overlap is ~1% of the fleet, not 10%.
        let cart = chosen("cart");
        let both = shop.iter().filter(|i| cart.binary_search(i).is_ok()).count();
        assert!((50..=160).contains(&both), "{both} nodes run both");
        assert!((0..nodes.len()).all(|i| runs(&nodes[i], "shop", 1.0)));
        assert_eq!(stable_hash(&["a", "b"]), stable_hash(&["a", "b"]));
        assert_ne!(
            stable_hash(&["ab", ""]),
            stable_hash(&["a", "b"]),
            "parts are delimited"
        );
    }

    #[test]
    fn a_checks_own_share_overrides_the_default() {
        let v = Vantage {
            location: " eu-west-1a ".into(),
            node: "node-7".into(),
            sample: 1.0,
        };
        let never = (0..100)
            .map(|i| format!("c{i}"))
            .find(|n| !runs("node-7", n, 0.01))
            .unwrap();
        let checks = [check("all", None), check(&never, Some(0.01))];
        let (run, view) = v.select(&checks);
        assert_eq!(run.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["all"]);
        assert_eq!(view.sampled_out, vec![never]);
        assert_eq!(view.location, "eu-west-1a");
        assert_eq!(view.node, "node-7");
    }

    #[test]
    fn shares_are_validated_with_their_key() {
        let bad = Vantage {
            sample: 0.0,
            ..Vantage::default()
        };
        assert_eq!(validate(&bad, &[]).unwrap_err().0, "vantage.sample");
        let e = validate(&Vantage::default(), &[check("a", Some(1.0)), check("b", Some(1.5))]).unwrap_err();
        assert_eq!(e.0, "checks[1].sample");
        assert!(e.1.contains("check 'b'"), "{e:?}");
        assert!(validate(&Vantage::default(), &[check("a", Some(0.5))]).is_ok());
    }

    #[test]
    fn an_empty_node_is_the_host_name() {
        let v = Vantage::default();
        let want = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(v.node_name(), want.trim());
    }
}
