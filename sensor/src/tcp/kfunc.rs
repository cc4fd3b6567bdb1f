//! Socket fields as direct loads through the `bpf_rdonly_cast` kfunc (6.2+): the programs call
//! a placeholder helper id that is rewritten here before loading.

use sensor_common::tcp::SockLayout;

/// Rewrites every call of the `bpf_rdonly_cast` placeholder (see `SockLayout::direct`) in the
/// object: into a call of the kfunc with BTF id `kfunc` (`src_reg` 2, `BPF_PSEUDO_KFUNC_CALL`),
/// or without it into `bpf_ktime_get_ns`, valid everywhere and never reached (the programs
/// only call the placeholder when `direct` is set), so the object loads on any kernel.
pub fn patch_rdonly_cast(object: &[u8], kfunc: Option<u32>) -> Vec<u8> {
    const BPF_CALL: u8 = 0x85;
    const BPF_FUNC_KTIME_GET_NS: u32 = 5;
    let mut out = object.to_vec();
    let mut placeholder = [BPF_CALL, 0, 0, 0, 0, 0, 0, 0];
    placeholder[4..].copy_from_slice(&SockLayout::RDONLY_CAST_PLACEHOLDER.to_le_bytes());
    let (regs, imm) = match kfunc {
        Some(id) => (0x20, id),
        None => (0x00, BPF_FUNC_KTIME_GET_NS),
    };
    // Instructions are 8 bytes at 8-aligned offsets of 8-aligned sections.
    for insn in out.chunks_exact_mut(8) {
        if insn == placeholder {
            insn[1] = regs;
            insn[4..].copy_from_slice(&imm.to_le_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insn(code: u8, regs: u8, imm: u32) -> [u8; 8] {
        let mut i = [code, regs, 0, 0, 0, 0, 0, 0];
        i[4..].copy_from_slice(&imm.to_le_bytes());
        i
    }

    #[test]
    fn rdonly_cast_placeholder_becomes_the_kfunc_or_a_harmless_helper() {
        let call = insn(0x85, 0, SockLayout::RDONLY_CAST_PLACEHOLDER);
        let other = insn(0x85, 0, 113);
        // The placeholder's bytes at an odd offset are data, not an instruction.
        let mut object = [other, call, other, call].concat();
        object.extend_from_slice(&[0u8; 3]);
        object.extend_from_slice(&call);
        object.extend_from_slice(&[0u8; 5]);
        let kf = patch_rdonly_cast(&object, Some(77_001));
        assert_eq!(&kf[8..16], &insn(0x85, 0x20, 77_001));
        assert_eq!(&kf[24..32], &insn(0x85, 0x20, 77_001));
        assert_eq!(&kf[0..8], &other);
        assert_eq!(&kf[35..43], &call, "unaligned bytes untouched");
        let plain = patch_rdonly_cast(&object, None);
        assert_eq!(&plain[8..16], &insn(0x85, 0, 5));
        assert_eq!(plain.len(), object.len());
    }
}
