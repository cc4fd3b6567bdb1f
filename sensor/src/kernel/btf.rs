//! Struct member offsets from the running kernel's BTF, so kernel programs never carry
//! compiled-in offsets (Rust eBPF has no CO-RE relocations).

use std::path::{Path, PathBuf};

use btf_rs::{Backend, Btf, Type};

pub const DEFAULT_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read BTF from {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("BTF has no struct {0}")]
    NoStruct(String),
    #[error("BTF struct {strukt} has no member {member}")]
    NoMember { strukt: String, member: String },
    #[error("BTF member {strukt}.{member} is a bitfield")]
    Bitfield { strukt: String, member: String },
    #[error("BTF lookup failed: {0}")]
    Lookup(String),
}

/// Parsed kernel BTF plus where it came from.
pub struct KernelBtf {
    pub path: PathBuf,
    btf: Btf,
}

impl KernelBtf {
    pub fn open(path: Option<&Path>) -> Result<KernelBtf, BtfError> {
        let path = path.map_or_else(|| PathBuf::from(DEFAULT_BTF), Path::to_path_buf);
        // Mapped and read on demand (an index of type offsets, ~1 MB) rather than parsed into
        // tables (25 MB for a distribution kernel's 5.5 MB BTF: the start-up peak, see
        // docs/footprint.md); lookups scan the mapping, fine for the few dozen start-up makes.
        // Kernels whose sysfs BTF cannot be mapped get the parsed form.
        let btf = Btf::from_file_with_backend(&path, Backend::Mmap)
            .or_else(|_| Btf::from_file(&path))
            .map_err(|e| BtfError::Open {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        Ok(KernelBtf { path, btf })
    }

    /// Byte offset of `member` in `struct strukt`, looking through anonymous struct/union
    /// members (task_struct nests most fields in them).
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let types = self
            .btf
            .resolve_types_by_name(strukt)
            .map_err(|_| BtfError::NoStruct(strukt.to_string()))?;
        for t in types {
            if let Type::Struct(s) = t {
                if let Some(bits) = self.find_member(&s, member, 0)? {
                    if bits % 8 != 0 {
                        return Err(BtfError::Bitfield {
                            strukt: strukt.to_string(),
                            member: member.to_string(),
                        });
                    }
                    return Ok(bits / 8);
                }
                return Err(BtfError::NoMember {
                    strukt: strukt.to_string(),
                    member: member.to_string(),
                });
            }
        }
        Err(BtfError::NoStruct(strukt.to_string()))
    }

    /// Offset of the first of `members` that exists (fields get renamed across versions, e.g.
    /// `kernfs_node.parent` became `__parent` in 6.15).
    pub fn member_offset_any(&self, strukt: &str, members: &[&str]) -> Result<u32, BtfError> {
        let mut last = BtfError::NoStruct(strukt.to_string());
        for m in members {
            match self.member_offset(strukt, m) {
                Ok(o) => return Ok(o),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Value of an enumerator, e.g. `memory_cgrp_id` of `enum cgroup_subsys_id`.
    pub fn enum_value(&self, enum_name: &str, member: &str) -> Result<u32, BtfError> {
        let types = self
            .btf
            .resolve_types_by_name(enum_name)
            .map_err(|_| BtfError::NoStruct(enum_name.to_string()))?;
        for t in types {
            if let Type::Enum(e) = t {
                for m in &e.members {
                    if self.btf.resolve_name(m).is_ok_and(|n| n == member) {
                        return Ok(m.val());
                    }
                }
            }
        }
        Err(BtfError::NoMember {
            strukt: enum_name.to_string(),
            member: member.to_string(),
        })
    }

    /// Whether raw tracepoint `tp`'s argument `index` (after the hidden `void *__data`) is a
    /// pointer to `struct strukt`, read from the `btf_trace_<tp>` typedef.
    pub fn raw_tp_arg_is_struct_ptr(&self, tp: &str, index: usize, strukt: &str) -> Result<bool, BtfError> {
        let name = format!("btf_trace_{tp}");
        let err = |e: btf_rs::Error| BtfError::Lookup(e.to_string());
        let types = self
            .btf
            .resolve_types_by_name(&name)
            .map_err(|_| BtfError::NoStruct(name.clone()))?;
        let Some(Type::Typedef(td)) = types.into_iter().find(|t| matches!(t, Type::Typedef(_))) else {
            return Err(BtfError::NoStruct(name));
        };
        let Type::Ptr(p) = self.btf.resolve_chained_type(&td).map_err(err)? else {
            return Ok(false);
        };
        let Type::FuncProto(proto) = self.btf.resolve_chained_type(&p).map_err(err)? else {
            return Ok(false);
        };
        let Some(param) = proto.parameters.get(index + 1) else {
            return Ok(false);
        };
        let Type::Ptr(ap) = self.btf.resolve_chained_type(param).map_err(err)? else {
            return Ok(false);
        };
        // `const struct sock *` and the like: the qualifiers sit between pointer and struct.
        let mut t = self.btf.resolve_chained_type(&ap).map_err(err)?;
        for _ in 0..4 {
            t = match t {
                Type::Const(q) | Type::Volatile(q) | Type::Restrict(q) => {
                    self.btf.resolve_chained_type(&q).map_err(err)?
                }
                _ => break,
            };
        }
        match t {
            Type::Struct(st) => Ok(self.btf.resolve_name(&st).is_ok_and(|n| n == strukt)),
            _ => Ok(false),
        }
    }

    /// BTF id of `struct name` (`func == false`) or of function `name`.
    pub fn type_id(&self, name: &str, func: bool) -> Option<u32> {
        let ids = self.btf.resolve_ids_by_name(name).ok()?;
        ids.into_iter().find(|id| {
            matches!(
                (self.btf.resolve_type_by_id(*id), func),
                (Ok(Type::Struct(_)), false) | (Ok(Type::Func(_)), true)
            )
        })
    }

    /// Whether a function of that name exists (a precondition for fentry).
    pub fn has_func(&self, name: &str) -> bool {
        self.btf
            .resolve_types_by_name(name)
            .map(|ts| ts.iter().any(|t| matches!(t, Type::Func(_))))
            .unwrap_or(false)
    }

    fn find_member(&self, s: &btf_rs::Struct, member: &str, base_bits: u32) -> Result<Option<u32>, BtfError> {
        for m in &s.members {
            let name = self.btf.resolve_name(m).unwrap_or_default();
            let here = base_bits + m.bit_offset();
            if name == member {
                return Ok(Some(here));
            }
            if name.is_empty() {
                let mut ty = self
                    .btf
                    .resolve_chained_type(m)
                    .map_err(|e| BtfError::Lookup(e.to_string()))?;
                // Skip typedefs/qualifiers down to the aggregate.
                for _ in 0..8 {
                    match ty {
                        Type::Typedef(_) | Type::Const(_) | Type::Volatile(_) => {
                            let next = match ty.as_btf_type() {
                                Some(bt) => self.btf.resolve_chained_type(bt),
                                None => break,
                            };
                            ty = next.map_err(|e| BtfError::Lookup(e.to_string()))?;
                        }
                        _ => break,
                    }
                }
                let inner = match ty {
                    Type::Struct(inner) | Type::Union(inner) => inner,
                    _ => continue,
                };
                if let Some(found) = self.find_member(&inner, member, here)? {
                    return Ok(Some(found));
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the host's BTF when it has one; the offsets are checked against each other, not
    /// against constants, so this holds on any kernel.
    #[test]
    fn resolves_task_struct_members_when_btf_present() {
        let Ok(btf) = KernelBtf::open(None) else {
            eprintln!("no {DEFAULT_BTF}; skipping");
            return;
        };
        let pid = btf.member_offset("task_struct", "pid").unwrap();
        let tgid = btf.member_offset("task_struct", "tgid").unwrap();
        assert_eq!(tgid, pid + 4, "pid_t pid; pid_t tgid; are adjacent");
        assert!(btf.member_offset("task_struct", "comm").unwrap() > tgid);
        assert!(matches!(
            btf.member_offset("task_struct", "no_such_member"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.member_offset("no_such_struct_xyz", "a"),
            Err(BtfError::NoStruct(_))
        ));
        assert!(btf.has_func("oom_kill_process"));
        assert!(btf.member_offset_any("kernfs_node", &["__parent", "parent"]).is_ok());
        assert!(btf.enum_value("cgroup_subsys_id", "memory_cgrp_id").is_ok());
        assert!(btf.enum_value("cgroup_subsys_id", "no_such_cgrp_id").is_err());
        // A `const struct sock *` argument (the qualifier is looked through), and a plain one.
        if btf.has_func("sk_error_report") {
            assert_eq!(
                btf.raw_tp_arg_is_struct_ptr("inet_sk_error_report", 0, "sock").ok(),
                Some(true)
            );
            assert_eq!(
                btf.raw_tp_arg_is_struct_ptr("inet_sk_error_report", 0, "task_struct")
                    .ok(),
                Some(false)
            );
        }
        assert_eq!(
            btf.raw_tp_arg_is_struct_ptr("inet_sock_set_state", 0, "sock").ok(),
            Some(true)
        );
    }
}
