//! The soak's memory cgroups: a parent under this process's own, children for churn and kills.

use super::*;

/// A memory cgroup under the soak's parent (v1 memory controller, or v2), removed on drop.
pub(super) struct Cg {
    pub(super) dir: PathBuf,
    pub(super) v2: bool,
    /// As the sensor labels it: the path below the memory hierarchy's root.
    pub(super) rel: String,
}

impl Cg {
    /// The soak's parent, under this process's own memory cgroup.
    pub(super) fn parent(name: &str) -> Result<Cg> {
        let own = crate::kit::host::own_memory_cgroup().context("this process's memory cgroup")?;
        let base = Cg {
            dir: own.dir,
            v2: own.v2,
            rel: own.rel,
        };
        let p = base.child(name, None)?;
        let v2 = base.v2;
        std::mem::forget(base);
        if v2 {
            fs::write(p.dir.join("cgroup.subtree_control"), "+memory")
                .context("enable memory below the soak's cgroup")?;
        }
        Ok(p)
    }

    pub(super) fn child(&self, name: &str, limit: Option<u64>) -> Result<Cg> {
        let dir = self.dir.join(name);
        let _ = fs::remove_dir(&dir);
        fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let cg = Cg {
            dir,
            v2: self.v2,
            rel: format!("{}/{name}", self.rel),
        };
        if let Some(l) = limit {
            let (file, swap) = if self.v2 {
                ("memory.max", "memory.swap.max")
            } else {
                ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")
            };
            fs::write(cg.dir.join(file), l.to_string()).with_context(|| format!("limit {}", cg.dir.display()))?;
            let _ = fs::write(cg.dir.join(swap), if self.v2 { "0".to_string() } else { l.to_string() });
        }
        Ok(cg)
    }

    /// `sh -c 'join; exec argv'` in this cgroup.
    pub(super) fn command(&self, argv: &[&str]) -> Command {
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

    /// The kernel's count of OOM kills in this cgroup.
    pub(super) fn kernel_oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events.local"
        } else {
            "memory.oom_control"
        };
        fs::read_to_string(self.dir.join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Cg {
    fn drop(&mut self) {
        for _ in 0..100 {
            if fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("==> could not remove {}", self.dir.display());
    }
}
