//! Task -> cgroup offsets from the running kernel's BTF, for every probe that attributes to a
//! workload in the kernel (the `TASK_LAYOUT` global the programs share).

use sensor_common::task::TaskLayout;

use super::btf::{BtfError, KernelBtf};

pub fn layout(btf: &KernelBtf) -> Result<TaskLayout, BtfError> {
    Ok(TaskLayout {
        valid: 1,
        task_pid: btf.member_offset("task_struct", "pid")?,
        task_tgid: btf.member_offset("task_struct", "tgid")?,
        task_comm: btf.member_offset("task_struct", "comm")?,
        task_cgroups: btf.member_offset("task_struct", "cgroups")?,
        cset_subsys: btf.member_offset("css_set", "subsys")?,
        cset_dfl_cgrp: btf.member_offset("css_set", "dfl_cgrp")?,
        memory_cgrp_id: btf.enum_value("cgroup_subsys_id", "memory_cgrp_id")?,
        css_cgroup: btf.member_offset("cgroup_subsys_state", "cgroup")?,
        cgroup_kn: btf.member_offset("cgroup", "kn")?,
        kn_id: btf.member_offset("kernfs_node", "id")?,
        kn_name: btf.member_offset("kernfs_node", "name")?,
        kn_parent: btf.member_offset_any("kernfs_node", &["__parent", "parent"])?,
        _pad: 0,
    })
}
