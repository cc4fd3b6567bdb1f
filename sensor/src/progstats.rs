//! Runs the kernel skipped: a BPF program is not re-entered on a CPU where it is already
//! running (e.g. when a softirq interrupts it), and the kernel only counts that in the program's
//! `recursion_misses`. Exported as `sensor_events_lost_total{reason="recursion"}`, so no skipped
//! run is invisible.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use aya::Ebpf;

use crate::probe::{ProbeReport, ProbeSpec};

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `struct bpf_prog_info` up to and including `verified_insns` etc. (UAPI, stable).
const PROG_INFO_LEN: usize = 232;
/// Offset of `recursion_misses` (5.12+), right after `run_time_ns` and `run_cnt`.
const RECURSION_MISSES_OFF: usize = 208;
const _: () = assert!(RECURSION_MISSES_OFF.is_multiple_of(8) && RECURSION_MISSES_OFF + 8 <= PROG_INFO_LEN);

/// `BPF_OBJ_GET_INFO_BY_FD` attribute.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// A program's `recursion_misses`, or `None` where the kernel does not report it.
pub fn recursion_misses(fd: &impl AsRawFd) -> Option<u64> {
    let mut info = [0u64; PROG_INFO_LEN / 8];
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: PROG_INFO_LEN as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` points to a valid, correctly sized info buffer that outlives the call; the
    // kernel writes at most `info_len` bytes into it and updates `info_len`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            std::ptr::from_mut(&mut attr),
            std::mem::size_of::<InfoAttr>(),
        )
    };
    if rc != 0 || (attr.info_len as usize) < RECURSION_MISSES_OFF + 8 {
        return None;
    }
    info.get(RECURSION_MISSES_OFF / 8).copied()
}

/// Program fds per probe, duplicated at startup so the counts can be read at scrape time.
#[derive(Default)]
pub struct ProgramMisses {
    progs: Vec<(&'static str, OwnedFd)>,
}

impl ProgramMisses {
    /// Every attached program of every probe.
    pub fn collect(ebpf: &Ebpf, specs: &[&ProbeSpec], reports: &[ProbeReport]) -> ProgramMisses {
        let mut progs = Vec::new();
        for r in reports {
            let Some(spec) = specs.iter().find(|s| s.name == r.probe) else {
                continue;
            };
            for (g, gr) in spec.groups.iter().zip(&r.groups) {
                let Some(hook) = gr.hook else { continue };
                let Some(h) = g.hooks.iter().find(|h| h.kind == hook) else {
                    continue;
                };
                let fd = ebpf
                    .program(h.program)
                    .and_then(|p| p.fd().ok())
                    .and_then(|f| f.as_fd().try_clone_to_owned().ok());
                if let Some(fd) = fd {
                    progs.push((r.probe, fd));
                }
            }
        }
        ProgramMisses { progs }
    }

    /// Sum over the probe's programs.
    pub fn misses(&self, probe: &str) -> u64 {
        self.progs
            .iter()
            .filter(|(p, _)| *p == probe)
            .filter_map(|(_, fd)| recursion_misses(fd))
            .sum()
    }
}
