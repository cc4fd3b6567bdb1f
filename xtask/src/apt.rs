//! Debian packages of any suite and architecture, fetched without touching the machine's apt
//! configuration: a private apt state per (suite, arch) under target/apt/ (its own sources
//! file, lists and cache), then `apt-get download` and `dpkg-deb -x`. The kernels of the test
//! matrix and the arm64 musl sysroot of the static aarch64 build come this way.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context as _, Result};

use crate::{output, run, step};

/// The lists are fetched again when older than this (a suite's point release moves them).
const LISTS_FRESH: Duration = Duration::from_secs(24 * 3600);
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// A private apt state for one suite (e.g. `bullseye`) and architecture (`amd64`, `arm64`).
pub struct PrivateApt {
    dir: PathBuf,
    arch: String,
}

/// The mirror the machine's apt uses for Debian's main archive (a URI ending in `/debian`: not
/// the security archive nor a third-party one), from the active files of
/// /etc/apt/sources.list.d (`*.sources`, `*.list`) or /etc/apt/sources.list.
pub fn mirror() -> String {
    let mut texts = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "sources" || x == "list") {
                texts.extend(std::fs::read_to_string(p).ok());
            }
        }
    }
    texts.extend(std::fs::read_to_string("/etc/apt/sources.list").ok());
    texts
        .iter()
        .flat_map(|t| t.lines())
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix("URIs:").map(str::trim).or_else(|| {
                l.strip_prefix("deb ")
                    .and_then(|r| r.split_whitespace().find(|w| w.contains("://")))
            })
        })
        .find(|u| u.trim_end_matches('/').ends_with("/debian"))
        .map_or_else(|| DEFAULT_MIRROR.to_string(), |u| u.trim_end_matches('/').to_string())
}

impl PrivateApt {
    /// The state under `root/target/apt/<suite>-<arch>`, its lists fetched when missing or stale.
    pub fn open(root: &Path, suite: &str, arch: &str) -> Result<Self> {
        let dir = root.join("target/apt").join(format!("{suite}-{arch}"));
        for sub in ["lists/partial", "cache/archives/partial", "parts"] {
            std::fs::create_dir_all(dir.join(sub)).with_context(|| format!("mkdir {}", dir.join(sub).display()))?;
        }
        let signed = if Path::new(KEYRING).is_file() {
            format!(" signed-by={KEYRING}")
        } else {
            String::new()
        };
        let line = format!("deb [arch={arch}{signed}] {} {suite} main\n", mirror());
        std::fs::write(dir.join("sources.list"), line)?;
        std::fs::write(dir.join("status"), "")?;
        let apt = Self {
            dir,
            arch: arch.to_string(),
        };
        if !apt.lists_fresh() {
            step(&format!(
                "apt-get update for Debian {suite} ({arch}), private state {}",
                apt.dir.display()
            ));
            run(apt.command("apt-get").args(["update", "-qq"]))
                .with_context(|| format!("fetching the package lists of Debian {suite} ({arch})"))?;
        }
        Ok(apt)
    }

    fn lists_fresh(&self) -> bool {
        std::fs::read_dir(self.dir.join("lists"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with("_Packages"))
            .filter_map(|e| e.metadata().ok()?.modified().ok())
            .any(|m| SystemTime::now().duration_since(m).is_ok_and(|age| age < LISTS_FRESH))
    }

    /// `apt-get`/`apt-cache` with every path pointing into the private state.
    fn command(&self, tool: &str) -> Command {
        let d = |p: &str| self.dir.join(p).display().to_string();
        let mut c = Command::new(tool);
        for (k, v) in [
            ("Dir::Etc::SourceList", d("sources.list")),
            ("Dir::Etc::SourceParts", d("parts")),
            ("Dir::State::Lists", d("lists")),
            ("Dir::State::status", d("status")),
            ("Dir::Cache", d("cache")),
            ("APT::Architecture", self.arch.clone()),
            ("APT::Architectures", self.arch.clone()),
            ("Debug::NoLocking", "1".to_string()),
            // The private state lives under target/, which apt's _apt user cannot write.
            ("APT::Sandbox::User", "root".to_string()),
        ] {
            c.arg("-o").arg(format!("{k}={v}"));
        }
        c
    }

    /// Names of the packages whose name matches `regex` (`apt-cache search --names-only`).
    pub fn search(&self, regex: &str) -> Vec<String> {
        output(self.command("apt-cache").args(["search", "--names-only", regex]))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    }

    /// Downloads `pkg` (cached in the private state) and unpacks it into `dest`.
    pub fn extract(&self, pkg: &str, dest: &Path) -> Result<()> {
        let dl = self.dir.join("debs");
        std::fs::create_dir_all(&dl)?;
        let prefix = format!("{}_", pkg.split(':').next().unwrap_or(pkg));
        let find = || {
            std::fs::read_dir(&dl).ok().and_then(|rd| {
                rd.flatten().map(|e| e.path()).find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
                })
            })
        };
        let deb = match find() {
            Some(d) => d,
            None => {
                step(&format!("downloading {pkg} ({})", self.arch));
                run(self.command("apt-get").args(["download", "-qq", pkg]).current_dir(&dl))?;
                find().with_context(|| format!("apt-get download {pkg} left no .deb in {}", dl.display()))?
            }
        };
        std::fs::create_dir_all(dest)?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(dest))
    }
}

/// Fails with one line when dpkg-deb or apt-get is missing (not a Debian-like machine).
pub fn require_tools() -> Result<()> {
    for tool in ["apt-get", "dpkg-deb"] {
        if output(Command::new(tool).arg("--version")).is_none() {
            bail!("{tool} not found: fetching Debian's packages needs apt and dpkg (a Debian or Ubuntu machine)");
        }
    }
    Ok(())
}
