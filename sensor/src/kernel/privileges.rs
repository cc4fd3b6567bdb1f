//! Capability check before touching BPF, so an unprivileged user gets one clear sentence
//! instead of a syscall error from deep inside the loader.

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The sentence every unprivileged start prints.
pub const NEEDS: &str = "the sensor needs CAP_BPF and CAP_PERFMON, or root";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub effective: u64,
}

impl Caps {
    pub fn current() -> std::io::Result<Caps> {
        let status = std::fs::read_to_string("/proc/self/status")?;
        Ok(Caps {
            effective: parse_cap_eff(&status).unwrap_or(0),
        })
    }

    fn has(&self, cap: u32) -> bool {
        self.effective & (1u64 << cap) != 0
    }

    /// BPF tracing needs CAP_BPF + CAP_PERFMON (5.8+), or CAP_SYS_ADMIN on any kernel.
    pub fn can_trace(&self) -> bool {
        (self.has(CAP_BPF) && self.has(CAP_PERFMON)) || self.has(CAP_SYS_ADMIN)
    }
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// Fails with [`NEEDS`] unless this process may load and attach tracing programs.
pub fn require_tracing() -> anyhow::Result<()> {
    match Caps::current() {
        Ok(c) if c.can_trace() => Ok(()),
        Ok(_) => Err(anyhow::anyhow!("{NEEDS}")),
        Err(e) => Err(anyhow::anyhow!("{NEEDS} (could not read /proc/self/status: {e})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_capeff() {
        let s = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        let c = Caps {
            effective: parse_cap_eff(s).unwrap(),
        };
        assert!(c.can_trace());
        let none = Caps {
            effective: parse_cap_eff("CapEff:\t0000000000000000\n").unwrap(),
        };
        assert!(!none.can_trace());
        let bpf_only = Caps {
            effective: 1 << CAP_BPF,
        };
        assert!(!bpf_only.can_trace());
        let bpf_perfmon = Caps {
            effective: (1 << CAP_BPF) | (1 << CAP_PERFMON),
        };
        assert!(bpf_perfmon.can_trace());
    }
}
