//! The TCP event: a failed connect, as exported in events and logs.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use sensor_common::tcp::{result, TcpFailureRecord, AF_INET};
use serde::Serialize;

use crate::kernel::clock;

pub fn result_label(r: u16) -> &'static str {
    match r {
        result::SUCCESS => "success",
        result::REFUSED => "refused",
        result::TIMEOUT => "timeout",
        result::RESET => "reset",
        result::UNREACHABLE => "unreachable",
        _ => "error",
    }
}

/// A failed connect, as exported in events and logs.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TcpFailure {
    pub time: f64,
    pub result: &'static str,
    /// The socket error the kernel recorded (errno), 0 when the application gave up first.
    pub errno: i32,
    pub address: String,
    pub port: u16,
    pub destination: String,
    pub duration_seconds: f64,
    pub pid: u32,
    pub comm: String,
    pub cgroup: Option<String>,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    /// Names from the container runtime; empty when unknown (not looked up on this path).
    #[serde(flatten)]
    pub names: crate::workloads::Names,
    /// Failures this event stands for: 1 for a key's first (published at once), else the
    /// failures of the same workload, destination group and result summed over the interval;
    /// the other fields are the latest one's.
    pub count: u64,
    /// Time of the first failure summed (`time` for a single one).
    pub first_time: f64,
    /// `probes.tcp.failure_events.interval` for a sum, 0 for a failure published at once.
    pub interval_seconds: f64,
    /// A sum over keys that did not fit in `failure_events.max_keys` (the other fields are the
    /// latest failure's, of any key).
    pub overflow: bool,
}

impl TcpFailure {
    /// Converts a record; `names` are the destination groups by id, `cgroup` and `workload`
    /// (the `WORKLOAD_LABELS` values) the attribution of its cgroup id.
    pub fn from_record(
        r: &TcpFailureRecord,
        names: &[String],
        cgroup: Option<String>,
        workload: &crate::cgroup::WorkloadLabels,
        workload_names: crate::workloads::Names,
    ) -> TcpFailure {
        let nonempty = |s: &String| (!s.is_empty()).then(|| s.clone());
        let end = r.comm.iter().position(|b| *b == 0).unwrap_or(r.comm.len());
        let time = clock::unix_seconds(clock::ktime_to_wall(r.header.ktime_ns));
        TcpFailure {
            time,
            result: result_label(r.result),
            errno: r.sk_err,
            address: address(r.family, &r.daddr),
            port: r.dport,
            destination: names
                .get(usize::from(r.dest))
                .cloned()
                .unwrap_or_else(|| "other".into()),
            duration_seconds: r.duration_ns as f64 / 1e9,
            pid: r.tgid,
            comm: String::from_utf8_lossy(&r.comm[..end]).into_owned(),
            cgroup,
            container_id: nonempty(&workload[1]),
            pod_uid: nonempty(&workload[2]),
            names: workload_names,
            count: 1,
            first_time: time,
            interval_seconds: 0.0,
            overflow: false,
        }
    }

    /// This (latest) failure standing for `p`'s sum over `interval`.
    pub(super) fn summing<S>(
        mut self,
        p: &super::coalesce::Pending<S>,
        interval: Duration,
        overflow: bool,
    ) -> TcpFailure {
        self.count = p.count;
        self.first_time = clock::unix_seconds(clock::ktime_to_wall(p.first_ktime_ns));
        self.interval_seconds = interval.as_secs_f64();
        self.overflow = overflow;
        self
    }
}

pub(super) fn address(family: u16, a: &[u8; 16]) -> String {
    match family {
        AF_INET => Ipv4Addr::new(a[0], a[1], a[2], a[3]).to_string(),
        _ => Ipv6Addr::from(*a).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use sensor_common::tcp::{result, AF_INET, AF_INET6};

    use super::*;

    #[test]
    fn addresses_format() {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(address(AF_INET, &a), "127.0.0.1");
        assert_eq!(address(AF_INET6, &Ipv6Addr::LOCALHOST.octets()), "::1");
        assert_eq!(result_label(result::TIMEOUT), "timeout");
        assert_eq!(result_label(99), "error");
    }
}
