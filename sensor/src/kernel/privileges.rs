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
    pub fn current() -> Result<Caps, procfs::ProcError> {
        let status = procfs::process::Process::myself()?.status()?;
        Ok(Caps {
            effective: status.capeff,
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
    fn tracing_needs_bpf_and_perfmon_or_sys_admin() {
        let all = Caps {
            effective: 0x1ff_ffff_ffff,
        };
        assert!(all.can_trace());
        let none = Caps { effective: 0 };
        assert!(!none.can_trace());
        assert!(Caps {
            effective: 1 << CAP_SYS_ADMIN
        }
        .can_trace());
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
