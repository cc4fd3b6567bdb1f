//! Which limit an OOM kill hit: the victim cgroup's own (`self`), an ancestor's (`ancestor`: the
//! pod, a slice) or none (`host`). "Killed though the graph shows it below its limit" is the pod
//! or a parent slice running out.
//!
//! Where the kill context hook runs, the kernel names the memcg under OOM (`oom_control.memcg`):
//! it is matched against the victim's path. Elsewhere the path is read right after the kill,
//! victim first, and the limit that fired is the one whose counters moved since they were last
//! seen: the memcg under OOM counts an `oom` event (`memcg_memory_event(memcg, MEMCG_OOM)` in
//! mm/memcontrol.c; v2 `memory.events(.local)`), and the page counter that refused the charge
//! counts a failure (v1 `memory.failcnt`, `memory.memsw.failcnt`; v2 `max`). Among the cgroups
//! that moved (or every limited one when none did), the one with the least headroom wins: the
//! kill frees the victim's memory in all of them alike, so the one that was full is still the
//! fullest. Ties go to the deepest.

use std::collections::HashMap;

use serde::Serialize;

use crate::{
    cgroup::{workload, Hierarchies},
    sync::Lock as _,
};

/// Whose limit fired (`limit_scope` of a kill event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitScope {
    /// The victim cgroup's own limit.
    #[serde(rename = "self")]
    Own,
    /// An ancestor's: the pod, a parent slice.
    Ancestor,
    /// No cgroup's: the host ran out.
    Host,
}

impl LimitScope {
    pub fn label(self) -> &'static str {
        match self {
            LimitScope::Own => "self",
            LimitScope::Ancestor => "ancestor",
            LimitScope::Host => "host",
        }
    }
}

/// The limit a kill hit, with what the verdict needs to say it.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    pub scope: LimitScope,
    /// The cgroup whose limit fired (`None` for the host).
    pub cgroup: Option<String>,
    pub limit_bytes: Option<u64>,
    /// The victim cgroup's own limit (`None`: it has none).
    pub own_limit_bytes: Option<u64>,
    /// The ancestor is the victim container's pod cgroup.
    pub pod: bool,
    /// The victim cgroup is a container's.
    pub container: bool,
}

impl Binding {
    /// The limit in words: `its own 160 MiB limit`, `the pod's 512 MiB limit, the container has
    /// none`, `the 1.0 GiB limit of ancestor /jobs, its own is 2.0 GiB`, `the host's memory`.
    pub fn phrase(&self) -> String {
        let size = |b: Option<u64>| b.map_or_else(String::new, |b| format!("{} ", super::verdict::bytes(b)));
        match self.scope {
            LimitScope::Own => format!("its own {}limit", size(self.limit_bytes)),
            LimitScope::Host => "the host's memory".to_string(),
            LimitScope::Ancestor => {
                let whose = if self.pod {
                    format!("the pod's {}limit", size(self.limit_bytes))
                } else {
                    format!(
                        "the {}limit of ancestor {}",
                        size(self.limit_bytes),
                        self.cgroup.as_deref().unwrap_or("?")
                    )
                };
                let victim = if self.container { "the container" } else { "the cgroup" };
                match self.own_limit_bytes {
                    None => format!("{whose}, {victim} has none"),
                    Some(own) => format!("{whose}, {victim}'s own is {}", super::verdict::bytes(own)),
                }
            }
        }
    }
}

/// The counters that move when a limit fires, as last seen for one cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// OOM events of the memcg itself (v2 `memory.events.local` `oom`); `None` on v1.
    pub ooms: Option<u64>,
    /// Charges refused at its limit (v2 `max`, v1 `failcnt` + `memsw.failcnt`).
    pub hits: Option<u64>,
}

/// One cgroup of the victim's path, read right after the kill.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Level {
    pub cgroup: String,
    /// Kernfs id (directory inode), to match the kernel's memcg.
    pub id: Option<u64>,
    /// The smallest of its limits (v1: memory and memory+swap); `None` when unlimited.
    pub limit: Option<u64>,
    /// How far usage is below that limit (the least of both on v1); `None` when unlimited.
    pub headroom: Option<u64>,
    pub counters: Counters,
}

/// Where the limit was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// `levels[i]` (0: the victim's own cgroup).
    Level(usize),
    Host,
}

/// The counters' growth since `before` (a counter that went back means the cgroup was made
/// anew: all of it is new).
fn moved(now: Option<u64>, before: Option<u64>) -> bool {
    match (now, before.unwrap_or(0)) {
        (Some(n), b) if n >= b => n > b,
        (Some(n), _) => n > 0,
        (None, _) => false,
    }
}

/// Picks the limit that fired from the victim's path (`levels`, victim first, root excluded).
/// `kernel_memcg`: the memcg the kernel named; `global`: the kill's scope says the host ran out;
/// `memcg`: it says a cgroup's limit did. `None` when a cgroup ran out but none can be named.
pub fn find(
    levels: &[Level],
    before: &HashMap<String, Counters>,
    kernel_memcg: Option<u64>,
    global: bool,
    memcg: bool,
) -> Option<Found> {
    if global {
        return Some(Found::Host);
    }
    if let Some(i) = kernel_memcg.and_then(|id| levels.iter().position(|l| l.id == Some(id))) {
        return Some(Found::Level(i));
    }
    if levels.is_empty() {
        // The victim's cgroup is unknown or gone: nothing to tell.
        return None;
    }
    let limited: Vec<usize> = (0..levels.len()).filter(|i| levels[*i].headroom.is_some()).collect();
    if limited.is_empty() {
        // Nothing on the path has a limit: only the host can have run out.
        return (!memcg).then_some(Found::Host);
    }
    let was = |i: usize| before.get(&levels[i].cgroup).copied().unwrap_or_default();
    let ooms: Vec<usize> = limited
        .iter()
        .copied()
        .filter(|i| moved(levels[*i].counters.ooms, was(*i).ooms))
        .collect();
    let hits: Vec<usize> = limited
        .iter()
        .copied()
        .filter(|i| moved(levels[*i].counters.hits, was(*i).hits))
        .collect();
    let candidates = [ooms, hits, limited].into_iter().find(|c| !c.is_empty())?;
    // `min_by_key` keeps the first of equals: the deepest.
    candidates
        .into_iter()
        .min_by_key(|i| levels[*i].headroom)
        .map(Found::Level)
}

/// The cgroup and its ancestors below the root, victim first: `/a/b` gives `/a/b`, `/a`.
pub fn path_up(cgroup: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut p = cgroup.trim_end_matches('/').to_string();
    while !p.is_empty() && p != "/" {
        out.push(p.clone());
        match p.rfind('/') {
            Some(i) => p.truncate(i),
            None => break,
        }
    }
    out
}

fn read_u64(dir: &std::path::Path, file: &str) -> Option<u64> {
    std::fs::read_to_string(dir.join(file)).ok()?.trim().parse().ok()
}

/// `key value` of a flat-keyed file such as `memory.events`.
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Reads one cgroup of the path (a handful of small files); `None` when it is gone.
pub fn read_level(h: &Hierarchies, cgroup: &str) -> Option<Level> {
    use std::os::unix::fs::MetadataExt as _;
    let dir = h.memory_dir(cgroup)?;
    let id = std::fs::metadata(&dir).ok()?.ino();
    let pair = |limit: Option<u64>, usage: Option<u64>| {
        // v1 writes "no limit" as a huge page-aligned number; v2 as "max" (not a number).
        let limit = limit.filter(|l| *l < (1 << 62))?;
        Some((limit, limit.saturating_sub(usage.unwrap_or(0))))
    };
    let (limits, counters) = if h.memory_is_v1() {
        let mem = pair(
            read_u64(&dir, "memory.limit_in_bytes"),
            read_u64(&dir, "memory.usage_in_bytes"),
        );
        let memsw = pair(
            read_u64(&dir, "memory.memsw.limit_in_bytes"),
            read_u64(&dir, "memory.memsw.usage_in_bytes"),
        );
        let hits = read_u64(&dir, "memory.failcnt").map(|f| f + read_u64(&dir, "memory.memsw.failcnt").unwrap_or(0));
        (vec![mem, memsw], Counters { ooms: None, hits })
    } else {
        let events = std::fs::read_to_string(dir.join("memory.events.local"))
            .or_else(|_| std::fs::read_to_string(dir.join("memory.events")))
            .unwrap_or_default();
        let mem = pair(read_u64(&dir, "memory.max"), read_u64(&dir, "memory.current"));
        let counters = Counters {
            ooms: keyed(&events, "oom"),
            hits: keyed(&events, "max"),
        };
        (vec![mem], counters)
    };
    let limits: Vec<(u64, u64)> = limits.into_iter().flatten().collect();
    Some(Level {
        cgroup: cgroup.to_string(),
        id: Some(id),
        limit: limits.iter().map(|l| l.0).min(),
        headroom: limits.iter().map(|l| l.1).min(),
        counters,
    })
}

/// The counters of every memory cgroup as last seen: at the start (a bounded walk), then after
/// each kill for the cgroups on its path. A cgroup made later starts at 0, as the kernel's do.
#[derive(Debug, Default)]
pub struct Baselines(HashMap<String, Counters>);

impl Baselines {
    /// Reads every cgroup of the memory hierarchy (at most `limit`).
    pub fn snapshot(h: &Hierarchies, limit: usize) -> Baselines {
        let map = crate::cgroup::walk(h, limit)
            .into_iter()
            .filter(|(rel, _)| rel != "/")
            .filter_map(|(rel, _)| read_level(h, &rel).map(|l| (rel, l.counters)))
            .collect();
        Baselines(map)
    }

    /// Finds the kill's limit (see [`find`]) and remembers the counters just read.
    pub fn binding(
        &mut self,
        levels: &[Level],
        kernel_memcg: Option<u64>,
        global: bool,
        memcg: bool,
    ) -> Option<Binding> {
        let found = find(levels, &self.0, kernel_memcg, global, memcg);
        for l in levels {
            self.0.insert(l.cgroup.clone(), l.counters);
        }
        let own = levels.first();
        let victim = own.map(|l| workload(&l.cgroup)).unwrap_or_default();
        Some(match found? {
            Found::Host => Binding {
                scope: LimitScope::Host,
                cgroup: None,
                limit_bytes: None,
                own_limit_bytes: own.and_then(|l| l.limit),
                pod: false,
                container: !victim.container_id.is_empty(),
            },
            Found::Level(i) => {
                let at = workload(&levels[i].cgroup);
                Binding {
                    scope: if i == 0 { LimitScope::Own } else { LimitScope::Ancestor },
                    cgroup: Some(levels[i].cgroup.clone()),
                    limit_bytes: levels[i].limit,
                    own_limit_bytes: own.and_then(|l| l.limit),
                    pod: i > 0 && !at.pod_uid.is_empty() && at.container_id.is_empty() && at.pod_uid == victim.pod_uid,
                    container: !victim.container_id.is_empty(),
                }
            }
        })
    }

    /// Drops cgroups `keep` rejects (vanished ones).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.0.retain(|c, _| keep(c));
    }
}

/// Reads the victim's path right after the kill and finds the limit that fired.
pub fn find_binding(
    h: &Hierarchies,
    base: &std::sync::Mutex<Baselines>,
    cgroup: Option<&str>,
    kernel_memcg: Option<u64>,
    global: bool,
    memcg: bool,
) -> Option<Binding> {
    let levels: Vec<Level> = cgroup
        .map(path_up)
        .unwrap_or_default()
        .iter()
        .map_while(|c| read_level(h, c))
        .collect();
    let mut b = base.locked();
    let found = b.binding(&levels, kernel_memcg, global, memcg);
    if b.0.len() > KEPT {
        b.retain(|c| h.memory_dir(c).is_some_and(|d| d.exists()));
    }
    found
}

/// Cgroups whose counters are kept before vanished ones are dropped (the start's walk reads as
/// many).
pub const KEPT: usize = 20_000;

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn level(cgroup: &str, limit: Option<u64>, usage: u64, ooms: Option<u64>, hits: u64) -> Level {
        Level {
            cgroup: cgroup.into(),
            id: Some(cgroup.len() as u64),
            limit,
            headroom: limit.map(|l| l.saturating_sub(usage)),
            counters: Counters { ooms, hits: Some(hits) },
        }
    }

    #[test]
    fn the_path_up_from_the_victim() {
        assert_eq!(path_up("/a/b/c"), ["/a/b/c", "/a/b", "/a"]);
        assert_eq!(path_up("/a/"), ["/a"]);
        assert!(path_up("/").is_empty());
    }

    #[test]
    fn a_parent_limit_with_an_unlimited_child_is_the_ancestor() {
        // v1: the child has no limit, the parent's failcnt moved.
        let levels = [
            level("/p/c", None, 30 * MIB, None, 0),
            level("/p", Some(32 * MIB), 30 * MIB, None, 5),
        ];
        let before = HashMap::from([(
            "/p".to_string(),
            Counters {
                ooms: None,
                hits: Some(2),
            },
        )]);
        assert_eq!(find(&levels, &before, None, false, true), Some(Found::Level(1)));
        // No counters moved (v1 reclaiming at an equal memsw limit counts nothing): the only
        // limit on the path.
        assert_eq!(find(&levels, &HashMap::new(), None, false, true), Some(Found::Level(1)));
    }

    #[test]
    fn the_smaller_limit_that_fired_wins() {
        // Both limited, the child's smaller: its headroom is the least after the kill freed
        // the same memory in both, though the parent's failcnt moved too (an earlier reclaim).
        let levels = [
            level("/p/c", Some(32 * MIB), 20 * MIB, None, 4),
            level("/p", Some(64 * MIB), 20 * MIB, None, 9),
        ];
        assert_eq!(find(&levels, &HashMap::new(), None, false, true), Some(Found::Level(0)));
        // v2: the `oom` event moved in the parent only: the parent ran out, whatever the headroom.
        let levels = [
            level("/p/c", Some(32 * MIB), 20 * MIB, Some(0), 4),
            level("/p", Some(64 * MIB), 50 * MIB, Some(1), 9),
        ];
        assert_eq!(find(&levels, &HashMap::new(), None, false, true), Some(Found::Level(1)));
        // Equal headroom: the deepest.
        let levels = [
            level("/p/c", Some(32 * MIB), 32 * MIB, None, 1),
            level("/p", Some(32 * MIB), 32 * MIB, None, 1),
        ];
        assert_eq!(find(&levels, &HashMap::new(), None, false, true), Some(Found::Level(0)));
    }

    #[test]
    fn the_kernel_and_the_scope_come_first() {
        let levels = [
            level("/p/c", Some(32 * MIB), 32 * MIB, Some(1), 1),
            level("/p", Some(64 * MIB), 40 * MIB, Some(0), 0),
        ];
        assert_eq!(
            find(&levels, &HashMap::new(), Some(2), false, true),
            Some(Found::Level(1)),
            "the kernel's memcg (id 2 = \"/p\")"
        );
        assert_eq!(find(&levels, &HashMap::new(), None, true, false), Some(Found::Host));
        // An unlimited path: the host, unless the scope says a cgroup ran out.
        let free = [level("/a", None, MIB, None, 0)];
        assert_eq!(find(&free, &HashMap::new(), None, false, false), Some(Found::Host));
        assert_eq!(find(&free, &HashMap::new(), None, false, true), None);
        assert_eq!(find(&[], &HashMap::new(), None, false, true), None);
        assert_eq!(find(&[], &HashMap::new(), None, false, false), None);
        assert_eq!(find(&[], &HashMap::new(), None, true, false), Some(Found::Host));
    }

    #[test]
    fn a_counter_that_went_back_is_a_new_cgroup() {
        assert!(moved(Some(1), Some(5)));
        assert!(!moved(Some(0), Some(5)));
        assert!(!moved(Some(5), Some(5)));
        assert!(moved(Some(6), Some(5)));
        assert!(moved(Some(1), None));
        assert!(!moved(None, Some(1)));
    }

    #[test]
    fn baselines_follow_each_kill() {
        let mut b = Baselines::default();
        let levels = [
            level("/p/c", Some(64 * MIB), 10 * MIB, Some(0), 0),
            level("/p", Some(32 * MIB), 0, Some(1), 3),
        ];
        let got = b.binding(&levels, None, false, true).unwrap();
        assert_eq!((got.scope, got.cgroup.as_deref()), (LimitScope::Ancestor, Some("/p")));
        // The same counters again: nothing moved since, so the least headroom decides.
        let levels = [
            level("/p/c", Some(64 * MIB), 64 * MIB, Some(0), 0),
            level("/p", Some(32 * MIB), 0, Some(1), 3),
        ];
        let got = b.binding(&levels, None, false, true).unwrap();
        assert_eq!(got.scope, LimitScope::Own);
    }

    /// A temporary directory standing in for a memory hierarchy: `files` are (path, text).
    fn fake(name: &str, v1: bool, files: &[(&str, &str)]) -> (std::path::PathBuf, Hierarchies) {
        let root = std::env::temp_dir().join(format!("sensor-limit-unit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (f, text) in files {
            let p = root.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        let h = Hierarchies {
            memory_v1: v1.then(|| root.clone()),
            unified: (!v1).then(|| root.clone()),
        };
        (root, h)
    }

    #[test]
    fn levels_read_from_v2_and_v1_files() {
        let events = "low 0\nhigh 0\nmax 7\noom 2\noom_kill 1\noom_group_kill 0\n";
        let (root, h) = fake(
            "v2",
            false,
            &[
                ("p/memory.max", "33554432\n"),
                ("p/memory.current", "30000000\n"),
                ("p/memory.events.local", events),
                ("p/c/memory.max", "max\n"),
                ("p/c/memory.current", "29000000\n"),
                ("p/c/memory.events", "max 0\noom 0\n"),
            ],
        );
        let p = read_level(&h, "/p").unwrap();
        assert_eq!((p.limit, p.headroom), (Some(33554432), Some(3554432)));
        assert_eq!(
            p.counters,
            Counters {
                ooms: Some(2),
                hits: Some(7)
            }
        );
        let c = read_level(&h, "/p/c").unwrap();
        assert_eq!((c.limit, c.headroom), (None, None), "max is no limit");
        assert_eq!(
            c.counters,
            Counters {
                ooms: Some(0),
                hits: Some(0)
            },
            "memory.events without .local"
        );
        assert_eq!(read_level(&h, "/gone"), None);
        let _ = std::fs::remove_dir_all(root);

        let (root, h) = fake(
            "v1",
            true,
            &[
                ("p/memory.limit_in_bytes", "67108864\n"),
                ("p/memory.usage_in_bytes", "60000000\n"),
                ("p/memory.memsw.limit_in_bytes", "33554432\n"),
                ("p/memory.memsw.usage_in_bytes", "33000000\n"),
                ("p/memory.failcnt", "3\n"),
                ("p/memory.memsw.failcnt", "4\n"),
                ("p/c/memory.limit_in_bytes", "9223372036854771712\n"),
                ("p/c/memory.usage_in_bytes", "1000\n"),
                ("p/c/memory.failcnt", "0\n"),
            ],
        );
        let p = read_level(&h, "/p").unwrap();
        assert_eq!(
            (p.limit, p.headroom),
            (Some(33554432), Some(554432)),
            "the memory+swap limit is the smaller"
        );
        assert_eq!(
            p.counters,
            Counters {
                ooms: None,
                hits: Some(7)
            }
        );
        let c = read_level(&h, "/p/c").unwrap();
        assert_eq!((c.limit, c.headroom), (None, None), "v1's huge number is no limit");
        let base = Mutex::new(Baselines::default());
        let got = find_binding(&h, &base, Some("/p/c"), None, false, true).unwrap();
        assert_eq!((got.scope, got.cgroup.as_deref()), (LimitScope::Ancestor, Some("/p")));
        assert_eq!((got.limit_bytes, got.own_limit_bytes), (Some(33554432), None));
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn phrases() {
        let pod = "/kubepods/burstable/pod1e9b4e3c-7a3f-4c8e-9d51-2b6f0a1c3d4e";
        let ctr = format!("{pod}/{}", "ab".repeat(32));
        let mut b = Baselines::default();
        let levels = [
            level(&ctr, None, 0, Some(0), 0),
            level(pod, Some(512 * MIB), 0, Some(1), 1),
            level("/kubepods/burstable", None, 0, Some(0), 0),
        ];
        let got = b.binding(&levels, None, false, true).unwrap();
        assert!(got.pod && got.container);
        assert_eq!(got.phrase(), "the pod's 512 MiB limit, the container has none");
        let own = Binding {
            scope: LimitScope::Own,
            cgroup: Some("/a".into()),
            limit_bytes: Some(160 * MIB),
            own_limit_bytes: Some(160 * MIB),
            pod: false,
            container: false,
        };
        assert_eq!(own.phrase(), "its own 160 MiB limit");
        let slice = Binding {
            scope: LimitScope::Ancestor,
            cgroup: Some("/jobs".into()),
            limit_bytes: Some(1 << 30),
            own_limit_bytes: Some(2 << 30),
            ..own.clone()
        };
        assert_eq!(
            slice.phrase(),
            "the 1.0 GiB limit of ancestor /jobs, the cgroup's own is 2.0 GiB"
        );
    }
}
