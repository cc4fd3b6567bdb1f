//! Seccomp as the cause of a refused `bpf()`.
//!
//! Container runtimes apply a seccomp filter. Some defaults (Podman 4.3's, containers-common
//! 0.50) allow `bpf` and `perf_event_open` only with CAP_SYS_ADMIN, so with the least-privilege
//! set (CAP_BPF, CAP_PERFMON) every call fails with EPERM before the kernel's own checks run.
//! The error then looks like the kernel refusing BPF; this module tells the two apart from
//! `/proc/self/status` (`Seccomp: 2` = filter, `CapEff`) and the errno, and names the fix.

use serde::Serialize;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// The fix, named wherever the denial is reported (doctor, startup error, probe reasons).
pub const FIX: &str = "run the container with the sensor's seccomp profile deploy/seccomp/sensor.json \
(the runtime default plus bpf and perf_event_open): `--security-opt seccomp=sensor.json` with podman or docker, \
`seccompProfile: {type: Localhost, localhostProfile: sensor.json}` in Kubernetes (deploy/README.md, \"Seccomp\")";

/// How every reason that blames the filter for `bpf()` starts.
pub const DENIES_BPF: &str = "seccomp filter denies bpf()";

/// `Seccomp:` of /proc/self/status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// 0: no seccomp.
    Disabled,
    /// 1: strict mode (read, write, exit, sigreturn only).
    Strict,
    /// 2: a BPF filter, as container runtimes install.
    Filter,
    /// The field is missing (kernel without CONFIG_SECCOMP) or unreadable.
    Unknown,
}

/// What of /proc/self/status decides whether seccomp explains an EPERM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessSecurity {
    pub seccomp: Mode,
    pub cap_eff: u64,
}

impl ProcessSecurity {
    /// This process's state; `Unknown` / no capabilities when /proc is unreadable.
    pub fn current() -> ProcessSecurity {
        match std::fs::read_to_string("/proc/self/status") {
            Ok(s) => ProcessSecurity::parse(&s),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read /proc/self/status");
                ProcessSecurity {
                    seccomp: Mode::Unknown,
                    cap_eff: 0,
                }
            }
        }
    }

    /// Parses the `Seccomp:` and `CapEff:` lines of a /proc/<pid>/status text.
    pub fn parse(status: &str) -> ProcessSecurity {
        let field = |key: &str| status.lines().find_map(|l| l.strip_prefix(key)).map(str::trim);
        let seccomp = match field("Seccomp:") {
            Some("0") => Mode::Disabled,
            Some("1") => Mode::Strict,
            Some("2") => Mode::Filter,
            _ => Mode::Unknown,
        };
        let cap_eff = field("CapEff:")
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .unwrap_or(0);
        ProcessSecurity { seccomp, cap_eff }
    }

    fn has(&self, cap: u32) -> bool {
        self.cap_eff & (1u64 << cap) != 0
    }

    /// The diagnosis when a seccomp filter, not the kernel, refused `bpf()`: every one of the
    /// `errnos` (the feature probes' calls: program loads and map creations, which the
    /// kernel allows with CAP_BPF) is EPERM, CAP_BPF (or CAP_SYS_ADMIN) is effective, and a
    /// filter is installed. One call that got through, or another errno, means the filter
    /// lets `bpf()` pass and an EPERM is the kernel's own (e.g. a program type it refuses):
    /// `None`, and the caller keeps its message.
    pub fn diagnose_bpf(&self, errnos: &[Option<i32>]) -> Option<String> {
        if errnos.is_empty() || errnos.iter().any(|e| *e != Some(libc::EPERM)) {
            return None;
        }
        if self.seccomp != Mode::Filter || !(self.has(CAP_BPF) || self.has(CAP_SYS_ADMIN)) {
            return None;
        }
        Some(format!(
            "{DENIES_BPF} (Seccomp: 2 in /proc/self/status; EPERM for every bpf() call although CAP_BPF is effective): {FIX}"
        ))
    }
}

/// The first OS error code in `e`'s source chain (aya keeps the syscall's `io::Error` there).
pub fn errno(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(code) = c
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
        {
            return Some(code);
        }
        cur = c.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const BPF_PERFMON_SYSLOG: u64 = (1 << 34) | (1 << 38) | (1 << 39);

    fn status(seccomp: &str, capeff: u64) -> String {
        format!("Name:\tsensor\nUmask:\t0022\nCapPrm:\t{capeff:016x}\nCapEff:\t{capeff:016x}\nNoNewPrivs:\t1\nSeccomp:\t{seccomp}\nSeccomp_filters:\t1\n")
    }

    #[test]
    fn parses_seccomp_mode_and_effective_caps() {
        let s = ProcessSecurity::parse(&status("2", BPF_PERFMON_SYSLOG));
        assert_eq!(s.seccomp, Mode::Filter);
        assert_eq!(s.cap_eff, BPF_PERFMON_SYSLOG);
        assert_eq!(ProcessSecurity::parse(&status("0", 0)).seccomp, Mode::Disabled);
        assert_eq!(ProcessSecurity::parse(&status("1", 0)).seccomp, Mode::Strict);
        // A kernel without CONFIG_SECCOMP has no such line.
        assert_eq!(ProcessSecurity::parse("CapEff:\t0\n").seccomp, Mode::Unknown);
    }

    const EPERM: Option<i32> = Some(libc::EPERM);

    #[test]
    fn eperm_for_every_call_under_a_filter_with_cap_bpf_is_seccomp() {
        let s = ProcessSecurity::parse(&status("2", BPF_PERFMON_SYSLOG));
        let d = s.diagnose_bpf(&[EPERM, EPERM, EPERM]).expect("seccomp");
        assert!(d.starts_with(DENIES_BPF));
        assert!(
            d.starts_with("seccomp filter denies bpf() (Seccomp: 2 in /proc/self/status; EPERM for every bpf() call although CAP_BPF is effective): "),
            "{d}"
        );
        assert!(d.contains("deploy/seccomp/sensor.json"), "{d}");
        // CAP_SYS_ADMIN alone passes the kernel's check as well.
        let admin = ProcessSecurity::parse(&status("2", 1 << 21));
        assert!(admin.diagnose_bpf(&[EPERM]).is_some());
    }

    #[test]
    fn anything_else_is_not_blamed_on_seccomp() {
        let filtered = ProcessSecurity::parse(&status("2", BPF_PERFMON_SYSLOG));
        // One call got through (None: it succeeded) or failed otherwise: the filter lets bpf()
        // pass, and an EPERM for one program type is the kernel's (measured: fentry on a
        // kernel without trampolines, inside a container with deploy/seccomp/sensor.json).
        assert_eq!(filtered.diagnose_bpf(&[EPERM, None, EPERM]), None);
        assert_eq!(filtered.diagnose_bpf(&[EPERM, Some(libc::EINVAL)]), None);
        assert_eq!(filtered.diagnose_bpf(&[]), None);
        // No filter: EPERM is the kernel's (lockdown, LSM, ...).
        let none = ProcessSecurity::parse(&status("0", BPF_PERFMON_SYSLOG));
        assert_eq!(none.diagnose_bpf(&[EPERM, EPERM]), None);
        // Without the capability the kernel itself refuses: that is the privileges message.
        let no_bpf = ProcessSecurity::parse(&status("2", (1 << 34) | (1 << 38)));
        assert_eq!(no_bpf.diagnose_bpf(&[EPERM, EPERM]), None);
    }

    #[test]
    fn errno_is_found_in_the_source_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(errno(&e), Some(libc::EPERM));
        let plain = std::io::Error::other("no code");
        assert_eq!(errno(&plain), None);
    }
}
