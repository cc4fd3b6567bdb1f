//! The QEMU kernel matrix: fetches each kernel of sensor/tests/qemu/kernels.tsv from Debian
//! into target/qemu/<suite>/vmlinuz. Each suite gets its own apt state (sources file, lists,
//! cache) under target/qemu/<suite>/apt, so the machine's sources and lists stay untouched.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{output, run, step};

/// One row of the kernel table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// What the tests call it (`5.10`).
    pub name: String,
    /// Debian suite that serves it (`bullseye`).
    pub suite: String,
    /// Debian architecture (`amd64`): QEMU's system and the package's `Architecture`.
    pub arch: String,
    /// `apt-cache search --names-only` regex of the image package.
    pub package: String,
}

impl Kernel {
    /// Where the image is cached.
    pub fn dir(&self, root: &Path) -> PathBuf {
        root.join("target/qemu").join(&self.suite)
    }
}

/// The table's rows (comments and blank lines skipped).
pub fn parse(text: &str) -> Result<Vec<Kernel>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split('\t').filter(|f| !f.is_empty()).collect();
            match f.as_slice() {
                [name, suite, arch, package] => Ok(Kernel {
                    name: name.to_string(),
                    suite: suite.to_string(),
                    arch: arch.to_string(),
                    package: package.to_string(),
                }),
                _ => bail!("kernels.tsv: want 4 tab-separated columns in '{l}'"),
            }
        })
        .collect()
}

pub fn table(root: &Path) -> Result<Vec<Kernel>> {
    let path = root.join("sensor/tests/qemu/kernels.tsv");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    parse(&text)
}

/// Fetches every kernel of the table that is not cached yet. Best effort: a kernel that cannot
/// be fetched is reported, and its test says what is missing (and fails under CI).
pub fn prepare(root: &Path) {
    let kernels = match table(root) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("==> the QEMU kernel table is unreadable ({e:#})");
            return;
        }
    };
    for k in kernels {
        if k.dir(root).join("vmlinuz").exists() {
            continue;
        }
        if let Err(e) = fetch(root, &k) {
            eprintln!(
                "==> could not fetch the {} kernel from {} ({e:#}); its QEMU test will report it",
                k.name, k.suite
            );
        }
    }
}

/// `cargo xtask kernels`: fetches what is missing, then lists each kernel and its image; fails
/// when one could not be fetched.
pub fn prepare_and_list(root: &Path) -> Result<()> {
    prepare(root);
    let mut missing = Vec::new();
    for k in table(root)? {
        let image = k.dir(root).join("vmlinuz");
        let package = std::fs::read_to_string(k.dir(root).join("package")).unwrap_or_default();
        println!(
            "{}\t{}\t{}\t{}\t{}",
            k.name,
            k.suite,
            k.arch,
            image.display(),
            package.trim()
        );
        if !image.exists() {
            missing.push(k.name);
        }
    }
    if !missing.is_empty() {
        bail!("kernels not fetched: {}", missing.join(", "));
    }
    Ok(())
}

/// The Debian archive this machine's apt uses (copied, so a mirror configured here is used for
/// the other suites too).
fn debian_uri() -> String {
    let mut texts: Vec<String> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in dir.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "sources" || x == "list") {
                texts.extend(std::fs::read_to_string(&p).ok());
            }
        }
    }
    texts.extend(std::fs::read_to_string("/etc/apt/sources.list").ok());
    uri_from_sources(&texts).unwrap_or_else(|| "http://deb.debian.org/debian".into())
}

/// The first Debian main-archive URI (not -security, not a snapshot comment) in apt sources in
/// either format (`URIs: ...` or `deb URI suite ...`).
fn uri_from_sources(texts: &[String]) -> Option<String> {
    texts
        .iter()
        .flat_map(|t| t.lines())
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            if let Some(v) = l.strip_prefix("URIs:") {
                return v.split_whitespace().next();
            }
            let mut w = l.split_whitespace().filter(|w| !w.starts_with('['));
            (w.next() == Some("deb")).then(|| w.next()).flatten()
        })
        .find(|u| u.trim_end_matches('/').ends_with("/debian"))
        .map(str::to_string)
}

/// apt options that give the suite a state of its own under `dir`.
fn apt_state(dir: &Path, suite: &str, arch: &str) -> Result<Vec<String>> {
    let lists = dir.join("lists");
    let cache = dir.join("cache");
    std::fs::create_dir_all(lists.join("partial"))?;
    std::fs::create_dir_all(cache.join("archives/partial"))?;
    let sources = dir.join("sources.list");
    std::fs::write(&sources, format!("deb {} {suite} main\n", debian_uri()))?;
    Ok(vec![
        format!("-oDir::Etc::SourceList={}", sources.display()),
        "-oDir::Etc::SourceParts=/dev/null".into(),
        format!("-oDir::State::Lists={}", lists.display()),
        format!("-oDir::Cache={}", cache.display()),
        format!("-oAPT::Architecture={arch}"),
        // The download lands in a root-owned directory: no `_apt` sandbox (it warns otherwise).
        "-oAPT::Sandbox::User=root".into(),
    ])
}

/// The newest name among packages named `<prefix><numbers...><suffix>`: compared by their
/// numbers in order (5.10.0-32 > 5.10.0-9).
fn newest(names: &str) -> Option<String> {
    let key = |n: &str| -> Vec<u64> {
        n.split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .filter_map(|s| s.parse().ok())
            .collect()
    };
    names
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .max_by_key(|n| key(n))
        .map(str::to_string)
}

fn fetch(root: &Path, k: &Kernel) -> Result<()> {
    let dir = k.dir(root);
    let apt = dir.join("apt");
    let opts = apt_state(&apt, &k.suite, &k.arch)?;
    step(&format!(
        "apt-get update for Debian {} (private state in {})",
        k.suite,
        apt.display()
    ));
    run(Command::new("apt-get").args(&opts).args(["update", "-qq"]))?;
    let found = output(
        Command::new("apt-cache")
            .args(&opts)
            .args(["search", "--names-only", &k.package]),
    )
    .unwrap_or_default();
    let name = newest(&found).with_context(|| format!("no package matching {} in {}", k.package, k.suite))?;
    step(&format!("fetching {name} ({} kernel of the QEMU matrix)", k.name));
    let dl = dir.join("dl");
    let _ = std::fs::remove_dir_all(&dl);
    std::fs::create_dir_all(&dl)?;
    run(Command::new("apt-get")
        .args(&opts)
        .args(["download", "-qq", &name])
        .current_dir(&dl))?;
    let deb = std::fs::read_dir(&dl)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download produced no .deb")?;
    let x = dl.join("x");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x))?;
    let vmlinuz = std::fs::read_dir(x.join("boot"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .context("no boot/vmlinuz-* in the package")?;
    std::fs::copy(&vmlinuz, dir.join("vmlinuz"))?;
    std::fs::write(dir.join("package"), format!("{name}\n"))?;
    let _ = std::fs::remove_dir_all(&dl);
    let _ = std::fs::remove_dir_all(apt.join("cache"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_parses_and_names_each_suite_once() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
        let t = table(&root).unwrap();
        let names: Vec<&str> = t.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["5.10", "6.1", "6.12"]);
        let mut suites: Vec<&str> = t.iter().map(|k| k.suite.as_str()).collect();
        suites.dedup();
        assert_eq!(suites.len(), t.len());
        assert!(parse("5.10\tbullseye\tamd64").is_err());
    }

    #[test]
    fn newest_compares_numbers_and_uri_comes_from_either_format() {
        let found = "linux-image-5.10.0-9-cloud-amd64-unsigned - x\nlinux-image-5.10.0-32-cloud-amd64-unsigned - x\n";
        assert_eq!(newest(found).unwrap(), "linux-image-5.10.0-32-cloud-amd64-unsigned");
        assert_eq!(
            newest("linux-image-6.12.117+deb13-cloud-amd64-unsigned\nlinux-image-6.12.9+deb13-cloud-amd64-unsigned")
                .unwrap(),
            "linux-image-6.12.117+deb13-cloud-amd64-unsigned"
        );
        let deb822 = "Types: deb\n# http://snapshot.debian.org/archive/debian/2025\nURIs: http://deb.debian.org/debian-security\n\nURIs: http://mirror.example/debian\n";
        assert_eq!(
            uri_from_sources(&[deb822.into()]).unwrap(),
            "http://mirror.example/debian"
        );
        let list = "deb [arch=amd64] http://ftp.de.debian.org/debian bookworm main\n";
        assert_eq!(
            uri_from_sources(&[list.into()]).unwrap(),
            "http://ftp.de.debian.org/debian"
        );
    }
}
