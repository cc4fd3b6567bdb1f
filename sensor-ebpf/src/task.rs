//! From a `task_struct` to its cgroups, at offsets the daemon reads from the running kernel's
//! BTF (Rust eBPF has no CO-RE relocations). Shared by every slice that attributes to workloads.

use aya_ebpf::helpers::{bpf_probe_read_kernel, generated::bpf_probe_read_kernel_str};
use sensor_common::oom::{field, TaskLayout, VictimCgroup, NAME_MAX, PATH_BUF, PATH_MAX_DEPTH};

/// `task_struct` / cgroup / kernfs offsets, set by the daemon from BTF.
#[unsafe(no_mangle)]
pub static TASK_LAYOUT: TaskLayout = TaskLayout::INVALID;

/// The layout as the loader set it.
#[inline(always)]
pub fn layout() -> TaskLayout {
    // SAFETY: read of a plain global in .rodata that the loader may have rewritten.
    unsafe { core::ptr::read_volatile(&TASK_LAYOUT) }
}

#[inline(always)]
pub fn read_u64(addr: u64) -> u64 {
    if addr == 0 {
        return 0;
    }
    // SAFETY: bpf_probe_read_kernel validates the address and cannot fault.
    unsafe { bpf_probe_read_kernel(addr as *const u64) }.unwrap_or(0)
}

#[inline(always)]
pub fn read_i32(addr: u64) -> Option<i32> {
    if addr == 0 {
        return None;
    }
    // SAFETY: as above.
    unsafe { bpf_probe_read_kernel(addr as *const i32) }.ok()
}

/// Kernfs id of `task`'s memory cgroup (0 when unknown), without the path walk: the cheap form
/// for hot paths.
#[inline(always)]
pub fn task_memcg_id(l: &TaskLayout, task: u64) -> u64 {
    let cset = read_u64(task + u64::from(l.task_cgroups));
    let css = read_u64(cset + u64::from(l.cset_subsys) + 8 * u64::from(l.memory_cgrp_id));
    let cgrp = read_u64(css + u64::from(l.css_cgroup));
    let kn = read_u64(cgrp + u64::from(l.cgroup_kn));
    read_u64(kn + u64::from(l.kn_id))
}

/// Fills `out` with `task`'s memory cgroup (kernfs id and path) and v2 cgroup id; returns the
/// `field::MEMCG_ID | field::CGROUP_PATH | field::DFL_CGROUP_ID` bits it could fill.
#[inline(always)]
pub fn task_cgroup(l: &TaskLayout, task: u64, out: &mut VictimCgroup) -> u32 {
    let mut present = 0;
    out.memcg_id = 0;
    out.dfl_cgroup_id = 0;
    out.path_len = 0;
    let cset = read_u64(task + u64::from(l.task_cgroups));
    let css = read_u64(cset + u64::from(l.cset_subsys) + 8 * u64::from(l.memory_cgrp_id));
    let cgrp = read_u64(css + u64::from(l.css_cgroup));
    let kn = read_u64(cgrp + u64::from(l.cgroup_kn));
    if kn != 0 {
        out.memcg_id = read_u64(kn + u64::from(l.kn_id));
        walk_path(l, kn, out);
        present |= field::MEMCG_ID | field::CGROUP_PATH;
    }
    let dfl = read_u64(cset + u64::from(l.cset_dfl_cgrp));
    let dfl_kn = read_u64(dfl + u64::from(l.cgroup_kn));
    if dfl_kn != 0 {
        out.dfl_cgroup_id = read_u64(dfl_kn + u64::from(l.kn_id));
        present |= field::DFL_CGROUP_ID;
    }
    present
}

/// Copies kernfs names from `kn` up to (not including) the hierarchy root, leaf first.
#[inline(always)]
fn walk_path(l: &TaskLayout, kn: u64, out: &mut VictimCgroup) {
    let mut node = kn;
    let mut off: usize = 0;
    let mut depth: u8 = 0;
    let mut reached_root = false;
    for _ in 0..PATH_MAX_DEPTH {
        let parent = read_u64(node + u64::from(l.kn_parent));
        if parent == 0 {
            reached_root = true;
            break;
        }
        if off >= PATH_BUF - NAME_MAX {
            break;
        }
        let name = read_u64(node + u64::from(l.kn_name));
        // The mask is a no-op after the check above, but it bounds the value in the very
        // register used for the pointer: older verifiers (6.1) lose the check's bound when the
        // compiler reloads `off` from the stack. The volatile read keeps LLVM from folding the
        // mask away as redundant.
        // SAFETY: a plain read of a local.
        let at = unsafe { core::ptr::read_volatile(&off) } & (PATH_BUF - NAME_MAX - 1);
        // SAFETY: `at < PATH_BUF - NAME_MAX`, so the destination range lies inside `path`;
        // the helper copies at most NAME_MAX bytes and always NUL-terminates.
        let n = unsafe {
            bpf_probe_read_kernel_str(
                out.path.as_mut_ptr().add(at).cast(),
                NAME_MAX as u32,
                name as *const core::ffi::c_void,
            )
        };
        if n <= 0 {
            break;
        }
        off += (n as usize) & (NAME_MAX * 2 - 1);
        depth += 1;
        node = parent;
    }
    out.path_len = off as u16;
    out.path_depth = depth;
    out.path_truncated = u8::from(!reached_root);
}

/// The current task as a BTF pointer: its fields are then plain loads that the verifier checks
/// against the kernel's BTF (the offsets come from the frozen layout, so it sees constants),
/// instead of one helper call each. Kernel 5.11+ with BTF; programs using it have a fallback.
#[inline(always)]
pub fn current_btf() -> *const u8 {
    // SAFETY: helper without arguments; the result is only dereferenced through `field`.
    unsafe { aya_ebpf::helpers::generated::bpf_get_current_task_btf() as *const u8 }
}

/// A `T` at `off` bytes into a BTF object (`base` from `current_btf` or a pointer loaded from
/// one). The verifier turns this into a checked load that yields 0 instead of faulting.
#[inline(always)]
unsafe fn field<T: Copy>(base: *const u8, off: u32) -> T {
    // SAFETY: the caller passes a BTF pointer and an offset of a member of its type.
    unsafe { core::ptr::read(base.add(off as usize).cast::<T>()) }
}

/// [`task_memcg_id`] by direct loads on a BTF task pointer.
#[inline(always)]
pub fn btf_memcg_id(l: &TaskLayout, task: *const u8) -> u64 {
    // SAFETY: each pointer is a BTF pointer loaded from the one before; offsets from BTF.
    unsafe {
        let cset: *const u8 = field(task, l.task_cgroups);
        if cset.is_null() {
            return 0;
        }
        let css: *const u8 = field(cset, l.cset_subsys + 8 * l.memory_cgrp_id);
        if css.is_null() {
            return 0;
        }
        let cgrp: *const u8 = field(css, l.css_cgroup);
        if cgrp.is_null() {
            return 0;
        }
        let kn: *const u8 = field(cgrp, l.cgroup_kn);
        if kn.is_null() {
            return 0;
        }
        field(kn, l.kn_id)
    }
}

/// `tgid` and `comm` of a BTF task pointer, by direct loads.
#[inline(always)]
pub fn btf_tgid_comm(l: &TaskLayout, task: *const u8) -> (u32, [u64; 2]) {
    // SAFETY: offsets of `task_struct` members from BTF; `comm` is 16 bytes.
    unsafe {
        (
            field(task, l.task_tgid),
            [field(task, l.task_comm), field(task, l.task_comm + 8)],
        )
    }
}
