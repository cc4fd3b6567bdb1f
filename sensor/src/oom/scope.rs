//! Memcg vs global OOM, from the kernel stack captured at the kill.
//!
//! `oom:mark_victim` does not say why the OOM happened, but the call chain does: a memcg OOM
//! runs through `mem_cgroup_out_of_memory`, a global one reaches `out_of_memory` without it.
//! Symbol ranges come from `/proc/kallsyms` once at startup.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Memcg,
    Global,
    /// No stack, or kallsyms hidden (kptr_restrict): the label says so instead of guessing.
    Unknown,
}

impl Scope {
    pub fn label(self) -> &'static str {
        match self {
            Scope::Memcg => "memcg",
            Scope::Global => "global",
            Scope::Unknown => "unknown",
        }
    }
}

const MEMCG_SYMS: &[&str] = &["mem_cgroup_out_of_memory"];
const GLOBAL_SYMS: &[&str] = &["out_of_memory", "pagefault_out_of_memory"];
/// A real kill passes through one of these; `mark_victim` without them marks a task that was
/// already exiting (`task_will_free_mem`), which the kernel does not count as a kill either.
const KILL_SYMS: &[&str] = &["oom_kill_process", "__oom_kill_process", "oom_kill_memcg_member"];

#[derive(Debug, Default)]
pub struct ScopeResolver {
    memcg: Vec<(u64, u64)>,
    global: Vec<(u64, u64)>,
    kill: Vec<(u64, u64)>,
}

impl ScopeResolver {
    pub fn from_kallsyms() -> Result<ScopeResolver, String> {
        let text = std::fs::read_to_string("/proc/kallsyms").map_err(|e| format!("/proc/kallsyms: {e}"))?;
        let r = ScopeResolver::parse(&text);
        if r.memcg.is_empty() && r.global.is_empty() {
            return Err("OOM entry points not found in /proc/kallsyms (addresses hidden by kptr_restrict?)".into());
        }
        Ok(r)
    }

    /// Builds `[start, next symbol)` ranges for the entry points from kallsyms text.
    pub fn parse(text: &str) -> ScopeResolver {
        let mut starts: Vec<u64> = Vec::new();
        let mut wanted: Vec<(u64, u8)> = Vec::new();
        for line in text.lines() {
            let mut it = line.split_whitespace();
            let (Some(addr), Some(ty), Some(name)) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            if !matches!(ty, "t" | "T") {
                continue;
            }
            let Ok(addr) = u64::from_str_radix(addr, 16) else {
                continue;
            };
            if addr == 0 {
                continue;
            }
            starts.push(addr);
            if MEMCG_SYMS.contains(&name) {
                wanted.push((addr, 0));
            } else if GLOBAL_SYMS.contains(&name) {
                wanted.push((addr, 1));
            } else if KILL_SYMS.contains(&name) {
                wanted.push((addr, 2));
            }
        }
        starts.sort_unstable();
        starts.dedup();
        let mut r = ScopeResolver::default();
        for (addr, which) in wanted {
            let idx = starts.partition_point(|s| *s <= addr);
            let end = starts.get(idx).copied().unwrap_or(addr + 4096);
            match which {
                0 => r.memcg.push((addr, end)),
                1 => r.global.push((addr, end)),
                _ => r.kill.push((addr, end)),
            }
        }
        r
    }

    /// Whether the stack shows a real kill (see `KILL_SYMS`); true when it cannot tell.
    pub fn is_kill(&self, stack: &[u64]) -> bool {
        if stack.is_empty() || self.kill.is_empty() {
            return true;
        }
        stack.iter().any(|ip| self.kill.iter().any(|(s, e)| ip >= s && ip < e))
    }

    pub fn classify(&self, stack: &[u64]) -> Scope {
        let hit = |ranges: &[(u64, u64)]| stack.iter().any(|ip| ranges.iter().any(|(s, e)| ip >= s && ip < e));
        if stack.is_empty() {
            Scope::Unknown
        } else if hit(&self.memcg) {
            Scope::Memcg
        } else if hit(&self.global) {
            Scope::Global
        } else {
            Scope::Unknown
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KALLSYMS: &str = "\
ffffffff81300000 T out_of_memory
ffffffff81300400 t oom_kill_process
ffffffff81300800 T pagefault_out_of_memory
ffffffff81400000 T mem_cgroup_out_of_memory
ffffffff81400200 T try_charge_memcg
ffffffff81500000 D some_data
";

    #[test]
    fn classifies_by_entry_point() {
        let r = ScopeResolver::parse(KALLSYMS);
        // memcg chain: mark_victim <- ... <- out_of_memory <- mem_cgroup_out_of_memory
        assert_eq!(
            r.classify(&[0xffffffff81300410, 0xffffffff81300120, 0xffffffff81400050]),
            Scope::Memcg
        );
        assert_eq!(
            r.classify(&[0xffffffff81300410, 0xffffffff81300120, 0xffffffff81999999]),
            Scope::Global
        );
        assert_eq!(r.classify(&[0xffffffff81300810]), Scope::Global);
        // Just past mem_cgroup_out_of_memory is try_charge_memcg, not a hit.
        assert_eq!(r.classify(&[0xffffffff81400210]), Scope::Unknown);
        assert_eq!(r.classify(&[]), Scope::Unknown);
        assert!(r.is_kill(&[0xffffffff81300410]));
        assert!(
            !r.is_kill(&[0xffffffff81300120]),
            "out_of_memory marking an exiting task"
        );
        assert!(r.is_kill(&[]), "no stack: cannot tell, count it");
    }

    #[test]
    fn hidden_addresses_yield_nothing() {
        let r = ScopeResolver::parse("0000000000000000 T out_of_memory\n0000000000000000 T mem_cgroup_out_of_memory\n");
        assert!(r.memcg.is_empty() && r.global.is_empty());
    }
}
