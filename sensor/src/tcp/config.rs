//! The TCP probe's configuration section (`probes.tcp`).

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Deserializer, Serialize};

use crate::{
    agg::{ByDestination, ByWorkload, HistogramConfig, Per},
    probe::HookKind,
    serde_duration as duration,
};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TcpConfig {
    pub enabled: bool,
    pub exclude_hooks: Vec<HookKind>,
    /// Destination groups: name -> `CIDR[:port]`; everything else is `other`.
    pub destinations: BTreeMap<String, Destination>,
    /// Sockets tracked between SYN_SENT and the outcome (slots of an array in the kernel,
    /// rounded up to a power of two).
    pub max_tracked_connects: u32,
    /// Series per in-kernel aggregation map (workload x destination x result).
    pub max_series: u32,
    /// A connect whose outcome was not seen after this long may give its slot to a new connect;
    /// should its outcome still come, it counts as lost (`untracked`). Keep it above the longest
    /// SYN retry time (127 s with the default `tcp_syn_retries` of 6).
    #[serde(with = "duration")]
    pub connect_max_age: Duration,
    /// `sensor_tcp_connect_duration_seconds`: labels kept (`workload`, `destination` or
    /// `host`) and buckets.
    pub connect_duration: HistogramConfig<ByWorkload>,
    /// `sensor_tcp_rtt_seconds`: per destination group by default (the RTT is the network's,
    /// the connect duration already shows each workload).
    pub rtt: HistogramConfig<ByDestination>,
    /// How connect failures become events (`tcp_connect_failure`): the counters stay exact
    /// per record, events are coalesced per workload, destination group and result.
    pub failure_events: FailureEvents,
}

/// `probes.tcp.failure_events`: a key's first failure is published at once; further failures
/// of the key are summed into one event per `interval` (its `count`), so a storm of refused
/// connects costs a few events, not one journal record each.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FailureEvents {
    /// `0s`: one event per failure (no coalescing).
    #[serde(with = "duration")]
    pub interval: Duration,
    /// Keys (workload x destination x result) waiting for their interval's summary; failures
    /// of further keys are summed into one overflow event per interval and counted in
    /// `sensor_events_coalesced_total{reason="key_limit"}`.
    pub max_keys: usize,
}

impl Default for FailureEvents {
    fn default() -> Self {
        FailureEvents {
            interval: Duration::from_secs(1),
            max_keys: 1024,
        }
    }
}

impl TcpConfig {
    /// Slots of the kernel's connect table: `max_tracked_connects` rounded up to a power of two.
    pub fn conn_slots(&self) -> u32 {
        self.max_tracked_connects
            .clamp(64, sensor_common::tcp::ConnSlot::MAX_SLOTS)
            .next_power_of_two()
    }
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            enabled: true,
            exclude_hooks: Vec::new(),
            destinations: BTreeMap::new(),
            max_tracked_connects: sensor_common::tcp::DEFAULT_TRACKED_CONNECTS,
            max_series: sensor_common::tcp::DEFAULT_SERIES,
            connect_max_age: Duration::from_secs(300),
            connect_duration: HistogramConfig::default(),
            rtt: HistogramConfig::default(),
            failure_events: FailureEvents::default(),
        }
    }
}

/// `10.0.0.0/8:5432`, `0.0.0.0/0:53`, `[fd00::/8]:443`, or a CIDR without port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct Destination {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
    pub port: Option<u16>,
}

impl From<Destination> for String {
    fn from(d: Destination) -> String {
        let net = format!("{}/{}", d.addr, d.prefix);
        match (d.port, d.addr.is_ipv6()) {
            (Some(p), true) => format!("[{net}]:{p}"),
            (Some(p), false) => format!("{net}:{p}"),
            (None, _) => net,
        }
    }
}

impl std::str::FromStr for Destination {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (net, port) = if let Some(rest) = s.strip_prefix('[') {
            let (net, tail) = rest.split_once(']').ok_or("missing ']' after IPv6 network")?;
            let port = match tail.strip_prefix(':') {
                Some(p) => Some(p),
                None if tail.is_empty() => None,
                None => return Err(format!("unexpected '{tail}' after ']'")),
            };
            (net, port)
        } else {
            match s.rsplit_once(':') {
                Some((n, p)) if !n.contains(':') => (n, Some(p)),
                _ => (s, None),
            }
        };
        let (addr, prefix) = net.split_once('/').ok_or("expected CIDR such as 10.0.0.0/8")?;
        let addr: std::net::IpAddr = addr.parse().map_err(|e| format!("bad address '{addr}': {e}"))?;
        let prefix: u8 = prefix.parse().map_err(|_| format!("bad prefix length '{prefix}'"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("prefix /{prefix} is longer than {max}"));
        }
        let port = match port {
            Some(p) => Some(p.parse::<u16>().map_err(|_| format!("bad port '{p}'"))?),
            None => None,
        };
        Ok(Destination { addr, prefix, port })
    }
}

impl<'de> Deserialize<'de> for Destination {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl crate::probe::Section for TcpConfig {
    crate::section_switches!();

    /// Checks serde cannot express; the error is (key path below `probes.tcp`, reason).
    fn validate(&self) -> Result<(), (String, String)> {
        if self.destinations.len() >= sensor_common::tcp::MAX_DEST_GROUPS as usize {
            return Err((
                ".destinations".into(),
                format!("at most {} groups", sensor_common::tcp::MAX_DEST_GROUPS - 1),
            ));
        }
        if self.max_tracked_connects < 64 || self.max_series < 64 {
            return Err((
                String::new(),
                "max_tracked_connects and max_series must be at least 64".into(),
            ));
        }
        let per = [Per::Workload, Per::Destination, Per::Host];
        self.connect_duration
            .validate(&per)
            .map_err(|(k, r)| (format!(".connect_duration{k}"), r))?;
        self.rtt.validate(&per).map_err(|(k, r)| (format!(".rtt{k}"), r))?;
        if self.connect_max_age < Duration::from_millis(100) {
            return Err((".connect_max_age".into(), "must be at least 100ms".into()));
        }
        if self.failure_events.max_keys == 0 {
            return Err((".failure_events.max_keys".into(), "must be at least 1".into()));
        }
        if self.failure_events.interval > Duration::from_secs(3600) {
            return Err((".failure_events.interval".into(), "at most 1h".into()));
        }
        if self.max_tracked_connects > sensor_common::tcp::ConnSlot::MAX_SLOTS {
            return Err((
                ".max_tracked_connects".into(),
                format!("at most {}", sensor_common::tcp::ConnSlot::MAX_SLOTS),
            ));
        }
        Ok(())
    }
}
