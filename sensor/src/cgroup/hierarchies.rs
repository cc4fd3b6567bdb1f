//! Where the cgroup hierarchies are mounted (v1, v2, hybrid), the bounded walk of the memory
//! hierarchy, and the few memory files read from one cgroup.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::activity::Reading;

/// Where the memory controller lives on this host.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Hierarchies {
    /// Root of the cgroup v1 hierarchy carrying the memory controller (v1 and hybrid hosts).
    pub memory_v1: Option<PathBuf>,
    /// Root of the cgroup v2 (unified) hierarchy, if mounted.
    pub unified: Option<PathBuf>,
}

impl Hierarchies {
    /// From this process's mount table; none found when it cannot be read (logged).
    pub fn discover() -> Hierarchies {
        match procfs::process::Process::myself().and_then(|p| p.mountinfo()) {
            Ok(m) => Hierarchies::from_mounts(&m.0),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read /proc/self/mountinfo; no cgroup hierarchy found");
                Hierarchies::from_mounts(&[])
            }
        }
    }

    /// Parses mountinfo text (tests and callers holding the text).
    pub fn parse_mountinfo(text: &str) -> Hierarchies {
        use procfs::FromBufRead as _;
        let mounts = procfs::process::MountInfos::from_buf_read(text.as_bytes())
            .map(|m| m.0)
            .unwrap_or_default();
        Hierarchies::from_mounts(&mounts)
    }

    /// The first cgroup2 mount, and the first v1 mount with the memory controller.
    fn from_mounts(mounts: &[procfs::process::MountInfo]) -> Hierarchies {
        let mut h = Hierarchies {
            memory_v1: None,
            unified: None,
        };
        for m in mounts {
            match m.fs_type.as_str() {
                "cgroup2" if h.unified.is_none() => h.unified = Some(m.mount_point.clone()),
                "cgroup" if h.memory_v1.is_none() && m.super_options.contains_key("memory") => {
                    h.memory_v1 = Some(m.mount_point.clone())
                }
                _ => {}
            }
        }
        h
    }

    /// Root of the hierarchy memory cgroup paths are relative to.
    pub fn memory_root(&self) -> Option<&Path> {
        self.memory_v1.as_deref().or(self.unified.as_deref())
    }

    pub fn memory_is_v1(&self) -> bool {
        self.memory_v1.is_some()
    }

    /// Directory of a memory cgroup given its path relative to the root (`/a/b`).
    pub fn memory_dir(&self, rel: &str) -> Option<PathBuf> {
        self.memory_root().map(|r| r.join(rel.trim_start_matches('/')))
    }

    /// Finds a memory cgroup by kernfs id (= directory inode), for paths the kernel could not
    /// capture whole. Walks at most `limit` directories.
    pub fn find_memory_cgroup(&self, id: u64, limit: usize) -> Option<String> {
        walk(self, limit)
            .into_iter()
            .find(|(_, ino)| *ino == id)
            .map(|(path, _)| path)
    }

    /// Limit and usage of a memory cgroup right now, in bytes (`None` where unknown or unlimited).
    pub fn memory_limit_usage(&self, rel: &str) -> (Option<u64>, Option<u64>) {
        let Some(dir) = self.memory_dir(rel) else {
            return (None, None);
        };
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
        };
        if self.memory_is_v1() {
            // v1 reports "no limit" as a huge page-aligned number.
            let limit = read("memory.limit_in_bytes").filter(|l| *l < (1 << 62));
            (limit, read("memory.usage_in_bytes"))
        } else {
            (read("memory.max"), read("memory.current"))
        }
    }
}

/// Reads a cgroup's activity signals (missing files read as `None` / not populated).
pub fn read_activity(h: &Hierarchies, cgroup: &str, reclaim_ns: Option<u64>) -> Reading {
    let Some(dir) = h.memory_dir(cgroup) else {
        return Reading::default();
    };
    let text = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let populated = if h.memory_is_v1() {
        // The first bytes say whether there is a pid (a busy cgroup's list can be long).
        let mut first = [0u8; 16];
        std::fs::File::open(dir.join("cgroup.procs"))
            .and_then(|mut f| std::io::Read::read(&mut f, &mut first))
            .is_ok_and(|n| first[..n].iter().any(u8::is_ascii_digit))
    } else {
        text("cgroup.events").is_some_and(|t| t.lines().any(|l| l.trim() == "populated 1"))
    };
    let (usage, limit_hits) = if h.memory_is_v1() {
        let n = |f: &str| text(f).and_then(|t| t.trim().parse::<u64>().ok());
        (n("memory.usage_in_bytes"), n("memory.failcnt"))
    } else {
        let usage = text("memory.current").and_then(|t| t.trim().parse().ok());
        let hits = text("memory.events").and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("max "))
                .and_then(|v| v.trim().parse().ok())
        });
        (usage, hits)
    };
    Reading {
        populated,
        usage,
        limit_hits,
        reclaim_ns,
    }
}

/// Walks the memory hierarchy (bounded) and returns `(path, kernfs id)` of every cgroup.
pub fn walk(hier: &Hierarchies, limit: usize) -> Vec<(String, u64)> {
    let Some(root) = hier.memory_root().map(Path::to_path_buf) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        if out.len() >= limit {
            break;
        }
        // A cgroup may vanish mid-walk: skip it.
        let Ok(meta) = std::fs::metadata(&dir) else { continue };
        let rel = dir
            .strip_prefix(&root)
            .map(|p| format!("/{}", p.display()))
            .unwrap_or_else(|_| "/".into());
        out.push((rel, meta.ino()));
        if let Ok(rd) = std::fs::read_dir(&dir) {
            let mut subs: Vec<PathBuf> = rd
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect();
            subs.sort();
            stack.extend(subs.into_iter().rev());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_hybrid_and_v2() {
        let hybrid = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu
";
        let h = Hierarchies::parse_mountinfo(hybrid);
        assert_eq!(h.memory_v1.as_deref(), Some(Path::new("/sys/fs/cgroup/memory")));
        assert_eq!(h.unified.as_deref(), Some(Path::new("/sys/fs/cgroup/unified")));
        assert!(h.memory_is_v1());
        let v2 = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let h = Hierarchies::parse_mountinfo(v2);
        assert_eq!(h.memory_root(), Some(Path::new("/sys/fs/cgroup")));
        assert!(!h.memory_is_v1());
        assert_eq!(h.memory_dir("/a/b"), Some(PathBuf::from("/sys/fs/cgroup/a/b")));
    }
}
