//! Memory cgroups the tests, benches and the soak make under this process's own: created with a
//! limit (no swap), entered by the commands they run, counted by the kernel, removed on drop.
//! Works on v1, hybrid (memory controller on v1) and v2 hosts.

use std::{
    io,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use super::host::own_memory_cgroup;

pub struct Cgroup {
    pub dir: PathBuf,
    pub v2: bool,
    /// Its path below the memory hierarchy's root, as the sensor labels workloads.
    pub rel: String,
}

impl Cgroup {
    /// `name` under this process's own memory cgroup, with memory limit `limit` (bytes; `None`:
    /// unlimited).
    pub fn under_own(name: &str, limit: Option<u64>) -> io::Result<Cgroup> {
        let own = own_memory_cgroup().ok_or_else(|| io::Error::other("this process's memory cgroup is not found"))?;
        make(own.dir.join(name), own.v2, format!("{}/{name}", own.rel), limit)
    }

    /// Child `name` (e.g. a 64-hex container id) with memory limit `limit`; drop it before its
    /// parent. On v2 the parent then holds no processes of its own (the kernel's rule for a
    /// cgroup that hands controllers down).
    pub fn child(&self, name: &str, limit: Option<u64>) -> io::Result<Cgroup> {
        self.enable_memory_below();
        make(self.dir.join(name), self.v2, format!("{}/{name}", self.rel), limit)
    }

    /// On v2 children get the memory controller only when their parent hands it down (best
    /// effort: a v2 cgroup with processes of its own cannot).
    fn enable_memory_below(&self) {
        if self.v2 {
            let _ = std::fs::write(self.dir.join("cgroup.subtree_control"), "+memory");
        }
    }

    /// Its memory limit in bytes (0 when unreadable or `max`).
    pub fn limit(&self) -> u64 {
        let f = if self.v2 { "memory.max" } else { "memory.limit_in_bytes" };
        std::fs::read_to_string(self.dir.join(f))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The kernel's own count of OOM kills in this cgroup (not its children).
    pub fn kernel_oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events.local"
        } else {
            "memory.oom_control"
        };
        std::fs::read_to_string(self.dir.join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// `sh -c 'join the cgroup; exec argv'`, its output discarded.
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("echo $$ > \"$1\" && shift && exec \"$@\"")
            .arg("sh")
            .arg(self.dir.join("cgroup.procs"))
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    }
}

fn make(dir: PathBuf, v2: bool, rel: String, limit: Option<u64>) -> io::Result<Cgroup> {
    // A leftover of a killed run, empty: take its place.
    let _ = std::fs::remove_dir(&dir);
    std::fs::create_dir(&dir).map_err(|e| io::Error::new(e.kind(), format!("mkdir {}: {e}", dir.display())))?;
    let cg = Cgroup { dir, v2, rel };
    if let Some(l) = limit {
        let (file, swap, no_swap) = if v2 {
            ("memory.max", "memory.swap.max", "0".to_string())
        } else {
            ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes", l.to_string())
        };
        std::fs::write(cg.dir.join(file), l.to_string())
            .map_err(|e| io::Error::new(e.kind(), format!("write {l} to {}/{file}: {e}", cg.dir.display())))?;
        // Absent without swap accounting; without swap it does not matter.
        let _ = std::fs::write(cg.dir.join(swap), no_swap);
    }
    Ok(cg)
}

/// rmdir with retries: a cgroup whose last task just died is busy for a moment.
pub fn remove(dir: &std::path::Path) -> bool {
    for _ in 0..100 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return true,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    false
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if !remove(&self.dir) {
            eprintln!("could not remove cgroup {}", self.dir.display());
        }
    }
}
