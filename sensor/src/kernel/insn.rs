//! Instruction-set features, asked of the verifier with a tiny program that uses them: a
//! kernel refuses a program with an instruction it does not know even in dead code, so the
//! loader must pick programs without it ahead of time.

use super::features::Support;

/// Test-only switch: reports BPF atomics as missing, so a kernel that has them runs the
/// programs built for kernels without them (the feature probe picks them by itself there).
pub const FORCE_NO_ATOMICS: &str = "SENSOR_FORCE_NO_BPF_ATOMICS";

/// What brings BPF atomics, for reasons shown to users.
pub const ATOMICS_NEED: &str = "BPF atomics: kernel 5.12+";

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;

/// The head of `union bpf_attr` for BPF_PROG_LOAD (the rest stays zero, as the kernel wants).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    _rest: [u64; 10],
}

/// One `struct bpf_insn`.
const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    (code as u64) | (((dst | (src << 4)) as u64) << 8) | (((off as u16) as u64) << 16) | (((imm as u32) as u64) << 32)
}

/// `*(u64 *)(r10 - 8) = 0; r0 = 0; cmpxchg(r10 - 8, r0, r1); return 0`.
const CMPXCHG_PROGRAM: [u64; 5] = [
    insn(0xb7, 1, 0, 0, 0),      // r1 = 0
    insn(0x7b, 10, 1, -8, 0),    // *(u64 *)(r10 - 8) = r1
    insn(0xb7, 0, 0, 0, 0),      // r0 = 0
    insn(0xdb, 10, 1, -8, 0xf1), // r0 = cmpxchg((u64 *)(r10 - 8), r0, r1)
    insn(0x95, 0, 0, 0, 0),      // exit
];

/// Whether the verifier takes BPF_ATOMIC instructions (compare-and-swap, exchange).
pub fn atomics() -> Support {
    if std::env::var_os(FORCE_NO_ATOMICS).is_some_and(|v| v == "1") {
        return Support::no(
            "atomics",
            format!("{ATOMICS_NEED} (forced off by {FORCE_NO_ATOMICS}=1)"),
        );
    }
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SOCKET_FILTER,
        insn_cnt: CMPXCHG_PROGRAM.len() as u32,
        insns: CMPXCHG_PROGRAM.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..ProgLoadAttr::default()
    };
    // SAFETY: `attr` and the buffers it points to (instructions, license) outlive the call;
    // the kernel reads at most `size_of::<ProgLoadAttr>()` bytes of it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            std::ptr::from_mut(&mut attr),
            std::mem::size_of::<ProgLoadAttr>(),
        )
    };
    if fd >= 0 {
        // SAFETY: a file descriptor this call just created and nothing else owns.
        unsafe { libc::close(fd as libc::c_int) };
        return Support::yes("atomics");
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) => Support::no("atomics", ATOMICS_NEED),
        // Not allowed to ask (unprivileged doctor): assume the common case, say so.
        _ => Support {
            name: "atomics",
            supported: true,
            detail: Some(format!("not probed ({err}); assumed present")),
        },
    }
}
