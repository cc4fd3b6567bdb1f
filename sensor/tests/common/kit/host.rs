//! Facts about the host the tests and benches run on.

/// True under CI (`CI=true` or `CI=1`): what a test needs and lacks fails it there instead of
/// skipping it.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The kernel's count of OOM kills since boot (`oom_kill` in /proc/vmstat; 0 where missing).
pub fn vmstat_oom_kill() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// This process's effective capabilities (a bit per capability number).
pub fn cap_eff() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

/// This process's own memory cgroup, where tests, benches and the soak make theirs.
pub struct OwnMemcg {
    /// Its directory: in the v1 memory hierarchy on v1 and hybrid hosts, else in v2.
    pub dir: std::path::PathBuf,
    pub v2: bool,
    /// Its path below the hierarchy's root without a trailing `/` (`""` for the root), as the
    /// sensor labels workloads: a child `c` is `{rel}/c`.
    pub rel: String,
}

/// Finds [`OwnMemcg`] from /proc/self/cgroup; on v2 it also enables the memory controller for
/// children (best effort: a v2 cgroup with processes of its own cannot delegate).
pub fn own_memory_cgroup() -> Option<OwnMemcg> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let own = |controller: Option<&str>| {
        text.lines().find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, ctrls, path) = (p.next()?, p.next()?, p.next()?);
            let hit = match controller {
                Some(c) => ctrls.split(',').any(|x| x == c),
                None => ctrls.is_empty(),
            };
            hit.then(|| path.trim_end_matches('/').to_string())
        })
    };
    let v1_root = std::path::Path::new("/sys/fs/cgroup/memory");
    let (root, v2, rel) = if v1_root.join("memory.limit_in_bytes").exists() {
        (v1_root, false, own(Some("memory"))?)
    } else {
        (std::path::Path::new("/sys/fs/cgroup"), true, own(None)?)
    };
    let dir = root.join(rel.trim_start_matches('/'));
    if v2 {
        let _ = std::fs::write(dir.join("cgroup.subtree_control"), "+memory");
    }
    Some(OwnMemcg { dir, v2, rel })
}

/// Removes `root` (e.g. `/sensor-identity-123`) and everything below it from every cgroup
/// hierarchy (v1 controllers and v2), deepest first. Best effort: cleanup.
pub fn remove_cgroup_tree(root: &str) {
    let Ok(mounts) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let mut bases: Vec<std::path::PathBuf> = mounts.filter_map(Result::ok).map(|e| e.path()).collect();
    bases.push(std::path::PathBuf::from("/sys/fs/cgroup"));
    for base in bases {
        let top = base.join(root.trim_start_matches('/'));
        if !top.is_dir() {
            continue;
        }
        let mut dirs = Vec::new();
        let mut stack = vec![top];
        while let Some(d) = stack.pop() {
            if let Ok(rd) = std::fs::read_dir(&d) {
                stack.extend(
                    rd.filter_map(Result::ok)
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
            dirs.push(d);
        }
        for d in dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}
