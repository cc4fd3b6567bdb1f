//! Verifier refusals as one-line reasons: the kernel feature a program needs and what brings
//! it, where the log says so; else the verifier's last word. The log itself is kept apart (see
//! `HookAttempt::log`).

/// Helpers whose absence the verifier reports by id (`invalid func unknown#158`), with the
/// kernel that brought them.
const HELPERS: &[(u32, &str, &str)] = &[
    (113, "bpf_probe_read_kernel", "5.5"),
    (115, "bpf_probe_read_kernel_str", "5.5"),
    (130, "bpf_ringbuf_output", "5.8"),
    (158, "bpf_get_current_task_btf", "5.11"),
    (183, "bpf_loop", "5.17"),
];

/// The reason for a program the kernel refused with `io_error`, from its verifier `log`.
pub fn from_verifier(log: &str, io_error: &std::io::Error) -> String {
    if let Some(r) = known(log) {
        return r;
    }
    let last = log
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with("processed ") && !l.starts_with("verification time"))
        .unwrap_or("no verifier log");
    format!("the verifier refused the program: {last} ({io_error})")
}

/// A missing feature the log names.
fn known(log: &str) -> Option<String> {
    // Kernels before 5.12 refuse BPF_ATOMIC (compare-and-swap, exchange) in a first pass over
    // the whole program, with the message of the only atomic they knew (BPF_XADD).
    if [
        "BPF_STX uses reserved fields",
        "BPF_XADD uses reserved fields",
        "unknown opcode db",
    ]
    .iter()
    .any(|m| log.contains(m))
    {
        return Some(crate::kernel::insn::ATOMICS_NEED.to_string());
    }
    let id = log
        .split("invalid func unknown#")
        .nth(1)
        .or_else(|| log.split("unknown func ").nth(1).and_then(|r| r.split('#').nth(1)))
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<u32>().ok())?;
    Some(match HELPERS.iter().find(|(i, ..)| *i == id) {
        Some((_, name, since)) => format!("helper {name}: kernel {since}+"),
        None => format!("helper #{id}: not in this kernel"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn einval() -> std::io::Error {
        std::io::Error::from_raw_os_error(libc::EINVAL)
    }

    #[test]
    fn known_refusals_name_the_feature() {
        assert_eq!(
            from_verifier("BPF_STX uses reserved fields\nprocessed 0 insns\n", &einval()),
            "BPF atomics: kernel 5.12+"
        );
        assert_eq!(
            from_verifier("0: (85) call unknown#158\ninvalid func unknown#158\n", &einval()),
            "helper bpf_get_current_task_btf: kernel 5.11+"
        );
        assert_eq!(
            from_verifier("unknown func bpf_xyz#999\n", &einval()),
            "helper #999: not in this kernel"
        );
    }

    #[test]
    fn other_refusals_give_the_verifiers_last_word() {
        let log = "0: (79) r1 = *(u64 *)(r1 +0)\nR1 invalid mem access 'scalar'\nprocessed 3 insns (limit 1000000)\n";
        let r = from_verifier(log, &einval());
        assert!(
            r.starts_with("the verifier refused the program: R1 invalid mem access 'scalar' ("),
            "{r}"
        );
        assert!(!r.contains("processed"), "{r}");
    }
}
