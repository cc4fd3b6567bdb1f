//! Shared by every probe that attributes to a workload: how to get from a task to its cgroups.

/// Offsets into `task_struct` and the cgroup structs, from the running kernel's BTF, used to go
/// from a task to its memory cgroup's kernfs node. `valid == 0` disables the walk.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskLayout {
    pub valid: u32,
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_comm: u32,
    /// `task_struct.cgroups` (`struct css_set *`).
    pub task_cgroups: u32,
    /// `css_set.subsys` (array of `struct cgroup_subsys_state *`).
    pub cset_subsys: u32,
    /// `css_set.dfl_cgrp` (`struct cgroup *`).
    pub cset_dfl_cgrp: u32,
    /// `enum cgroup_subsys_id::memory_cgrp_id`.
    pub memory_cgrp_id: u32,
    /// `cgroup_subsys_state.cgroup`.
    pub css_cgroup: u32,
    /// `cgroup.kn`.
    pub cgroup_kn: u32,
    /// `kernfs_node.id`.
    pub kn_id: u32,
    /// `kernfs_node.name`.
    pub kn_name: u32,
    /// `kernfs_node.__parent` (or `parent` before 6.15).
    pub kn_parent: u32,
    pub _pad: u32,
}
crate::assert_size!(TaskLayout, 56);

impl TaskLayout {
    /// All offsets zero and `valid == 0`: the programs skip what needs this layout.
    // SAFETY: `#[repr(C)]` and made only of integers, so all-zero is a valid value.
    pub const INVALID: TaskLayout = unsafe { core::mem::zeroed() };
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]`, integers only with an explicit padding field: every bit pattern is
    // valid and there are no implicit holes.
    unsafe impl aya::Pod for super::TaskLayout {}
}
