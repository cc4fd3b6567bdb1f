//! A network namespace pair whose peer blackholes SYNs, and the kernel's own TCP state.

use super::*;

/// Two namespaces joined by a veth pair; `peer` blackholes `10.201.0.0/24` / `fd00:201::/64`, so
/// SYNs routed through it are dropped without any ICMP answer (a peer merely without a route
/// would answer IPv6 with "no route"). SYN retries are cut to 1 in `client`.
pub(crate) struct Netns {
    pub(crate) client: String,
    pub(crate) peer: String,
}

impl Netns {
    pub(crate) fn new() -> Netns {
        let id = std::process::id();
        let n = Netns {
            client: format!("sensor-c{id}"),
            peer: format!("sensor-p{id}"),
        };
        let ip = common::netns::ip;
        ip(&format!("netns add {}", n.client));
        ip(&format!("netns add {}", n.peer));
        ip(&format!(
            "-n {} link add vc type veth peer name vp netns {}",
            n.client, n.peer
        ));
        ip(&format!("-n {} addr add 10.200.0.1/24 dev vc", n.client));
        ip(&format!("-n {} addr add fd00:200::1/64 dev vc nodad", n.client));
        ip(&format!("-n {} addr add 10.200.0.2/24 dev vp", n.peer));
        ip(&format!("-n {} addr add fd00:200::2/64 dev vp nodad", n.peer));
        for ns in [&n.client, &n.peer] {
            ip(&format!("-n {ns} link set lo up"));
        }
        ip(&format!("-n {} link set vc up", n.client));
        ip(&format!("-n {} link set vp up", n.peer));
        ip(&format!("-n {} route add 10.201.0.0/24 via 10.200.0.2", n.client));
        ip(&format!("-n {} route add fd00:201::/64 via fd00:200::2", n.client));
        ip(&format!("-n {} route add blackhole 10.201.0.0/24", n.peer));
        ip(&format!("-n {} -6 route add blackhole fd00:201::/64", n.peer));
        let st = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &n.client,
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv4/tcp_syn_retries",
            ])
            .status()
            .unwrap();
        assert!(st.success());
        n
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in [&self.client, &self.peer] {
            let _ = std::process::Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Occupied slots of `TCP_CONNS` (index, lock word, socket, cgroup id) and `bpftool prog show`
/// of the set_state programs, through bpftool when it is installed: the kernel's side when a
/// count does not arrive (the timeout test failed twice, rarely, with neither the timeouts nor
/// `untracked` counted; the table tells whether their ends ran at all).
pub(crate) fn kernel_tcp_state() -> String {
    let run = |args: &[&str]| {
        std::process::Command::new("bpftool")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let Some(dump) = run(&["-j", "map", "dump", "name", "TCP_CONNS"]) else {
        return "--- kernel ---\nbpftool unavailable or TCP_CONNS not found\n".to_string();
    };
    let entries: Vec<serde_json::Value> = serde_json::from_str(&dump).unwrap_or_default();
    let bytes = |v: &serde_json::Value| -> Vec<u8> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| u8::from_str_radix(x.as_str()?.trim_start_matches("0x"), 16).ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let word = |b: &[u8], i: usize| {
        b.get(i * 8..i * 8 + 8)
            .map_or(0, |w| u64::from_le_bytes(w.try_into().unwrap()))
    };
    let mut busy = Vec::new();
    for e in &entries {
        let v = bytes(&e["value"]);
        let k = bytes(&e["key"]);
        if word(&v, 0) > 1 {
            let idx = k.get(..4).map_or(0, |w| u32::from_le_bytes(w.try_into().unwrap()));
            busy.push(format!(
                "slot {idx}: state {} sk {:#x} cgroup {}",
                word(&v, 0),
                word(&v, 1),
                word(&v, 2)
            ));
        }
    }
    let progs = run(&["prog", "show", "name", "tcp_set_state_raw"]).unwrap_or_default()
        + &run(&["prog", "show", "name", "tcp_set_state"]).unwrap_or_default();
    format!(
        "--- kernel ---\n{} of {} slots occupied\n{}\n{progs}\n",
        busy.len(),
        entries.len(),
        busy.iter().take(40).cloned().collect::<Vec<_>>().join("\n")
    )
}
