//! Where this kernel keeps what the OOM programs read: `oom_control` and `mem_cgroup` offsets
//! from BTF, the `oom:mark_victim` fields from tracefs.

use sensor_common::{
    names::globals,
    oom::{MarkVictimLayout, OomControlLayout, TpField},
};

use crate::{
    kernel::btf::KernelBtf,
    probe::{KernelContext, LoadPlan},
};

pub fn oom_control_layout(btf: &KernelBtf) -> Result<OomControlLayout, crate::kernel::btf::BtfError> {
    Ok(OomControlLayout {
        valid: 1,
        oc_memcg: btf.member_offset("oom_control", "memcg")?,
        oc_totalpages: btf.member_offset("oom_control", "totalpages")?,
        oc_chosen: btf.member_offset("oom_control", "chosen")?,
        oc_constraint: btf.member_offset("oom_control", "constraint")?,
        memcg_css: btf.member_offset("mem_cgroup", "css")?,
    })
}

/// Kernel layouts the OOM programs need, found at load time.
#[derive(Debug, Clone)]
pub struct Layouts {
    pub mark_victim: MarkVictimLayout,
    pub oom_control: OomControlLayout,
    /// Why a layout is partial, for logs.
    pub notes: Vec<String>,
}

impl Layouts {
    pub fn discover(kctx: &KernelContext) -> Layouts {
        let mut notes = Vec::new();
        let mark_victim = match &kctx.tracefs {
            Ok(t) => match t.format("oom", "mark_victim") {
                Ok(f) => mark_victim_layout(&f),
                Err(e) => {
                    notes.push(format!("oom/mark_victim format: {e}"));
                    MarkVictimLayout::ABSENT
                }
            },
            Err(e) => {
                notes.push(format!("tracefs: {e}"));
                MarkVictimLayout::ABSENT
            }
        };
        let oom_control = match &kctx.btf {
            Ok(btf) => oom_control_layout(btf).unwrap_or_else(|e| {
                notes.push(format!("oom_control layout: {e}"));
                OomControlLayout::INVALID
            }),
            Err(e) => {
                notes.push(format!("BTF: {e}"));
                OomControlLayout::INVALID
            }
        };
        Layouts {
            mark_victim,
            oom_control,
            notes,
        }
    }

    /// Sets the OOM programs' globals (`TASK_LAYOUT`, shared by every slice that attributes to
    /// cgroups, comes from `LoadPlan::task_layout`).
    pub fn apply(&self, plan: &mut LoadPlan) {
        plan.global(globals::MARK_VICTIM_LAYOUT, &self.mark_victim);
        plan.global(globals::OOM_CONTROL_LAYOUT, &self.oom_control);
    }
}

/// Offsets of the fields we read, each accepted only with the size we expect.
pub fn mark_victim_layout(f: &crate::kernel::tracefs::TracepointFormat) -> MarkVictimLayout {
    let off = |name: &str, sizes: &[u16]| f.offset_if(name, sizes).unwrap_or(TpField::ABSENT);
    let (comm, comm_is_data_loc) = match f.field("comm") {
        Some(c) if c.is_data_loc() && c.size == 4 => (c.offset, 1),
        Some(c) if !c.is_data_loc() && c.size == 16 => (c.offset, 0),
        _ => (TpField::ABSENT, 0),
    };
    MarkVictimLayout {
        pid: off("pid", &[4]),
        comm,
        total_vm: off("total_vm", &[8]),
        anon_rss: off("anon_rss", &[8]),
        file_rss: off("file_rss", &[8]),
        shmem_rss: off("shmem_rss", &[8]),
        uid: off("uid", &[4]),
        pgtables: off("pgtables", &[8]),
        oom_score_adj: off("oom_score_adj", &[2]),
        comm_is_data_loc,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::tracefs::TracepointFormat;

    #[test]
    fn layout_from_6_18_and_6_1_formats() {
        let l = mark_victim_layout(&TracepointFormat::parse(
            "\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;\n\tfield:__data_loc char[] comm;\toffset:12;\tsize:4;\tsigned:0;\n\tfield:unsigned long total_vm;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:short oom_score_adj;\toffset:64;\tsize:2;\tsigned:1;\n",
        ));
        assert_eq!(
            (l.pid, l.comm, l.comm_is_data_loc, l.total_vm, l.oom_score_adj),
            (8, 12, 1, 16, 64)
        );
        assert_eq!(l.anon_rss, TpField::ABSENT);
        let old = mark_victim_layout(&TracepointFormat::parse(
            "\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;\n",
        ));
        assert_eq!(
            old,
            MarkVictimLayout {
                pid: 8,
                ..MarkVictimLayout::ABSENT
            }
        );
    }
}
