//! Destination groups: their ids, and the two LPM tries the kernel matches connects against.

use std::{collections::BTreeMap, net::IpAddr};

use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    MapData,
};
use sensor_common::tcp::{DestAnyKey, DestPortKey, SockLayout, AF_INET, AF_INET6};

use super::config::Destination;

/// `SockLayout::DEST_*` bits for a destination configuration.
pub fn dest_group_bits(dests: &BTreeMap<String, Destination>) -> u32 {
    let mut bits = 0;
    if dests.values().any(|d| d.port.is_some()) {
        bits |= SockLayout::DEST_WITH_PORT;
    }
    if dests.values().any(|d| d.port.is_none()) {
        bits |= SockLayout::DEST_ANY_PORT;
    }
    bits
}

/// Destination groups: id 0 is `other`, configured groups follow in name order.
pub fn group_names(dests: &BTreeMap<String, Destination>) -> Vec<String> {
    std::iter::once("other".to_string())
        .chain(dests.keys().cloned())
        .collect()
}

pub(super) fn addr_bytes(a: IpAddr) -> ([u8; 2], [u8; 16], u32) {
    let mut out = [0u8; 16];
    match a {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            (AF_INET.to_be_bytes(), out, 32)
        }
        IpAddr::V6(v6) => (AF_INET6.to_be_bytes(), v6.octets(), 128),
    }
}

/// Writes the configured groups into the kernel's two tries.
pub fn load_destinations(
    dests: &BTreeMap<String, Destination>,
    with_port: &mut LpmTrie<MapData, DestPortKey, u16>,
    any_port: &mut LpmTrie<MapData, DestAnyKey, u16>,
) -> Result<(), String> {
    for (i, (name, d)) in dests.iter().enumerate() {
        let id = (i + 1) as u16;
        let (family, addr, _) = addr_bytes(d.addr);
        let bits = u32::from(d.prefix);
        let res = match d.port {
            Some(p) => with_port.insert(
                &Key::new(
                    32 + bits,
                    DestPortKey {
                        port: p.to_be_bytes(),
                        family,
                        addr,
                    },
                ),
                id,
                0,
            ),
            None => any_port.insert(&Key::new(16 + bits, DestAnyKey { family, addr }), id, 0),
        };
        res.map_err(|e| format!("destination {name}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn group_ids_follow_name_order() {
        let mut d = BTreeMap::new();
        d.insert("postgres".to_string(), "10.0.0.0/8:5432".parse().unwrap());
        d.insert("dns".to_string(), "0.0.0.0/0:53".parse().unwrap());
        assert_eq!(group_names(&d), vec!["other", "dns", "postgres"]);
    }
}
