//! The QEMU kernel matrix: fetches each kernel of sensor/tests/qemu/kernels.tsv from Debian
//! into target/qemu/<name>/vmlinuz (and, for a row of another architecture than the host's, that
//! architecture's busybox-static into target/qemu/<name>/busybox), through the private apt state of its suite and architecture
//! (`crate::apt`), so the machine's sources and lists stay untouched.

use std::path::Path;

use anyhow::{bail, Context as _, Result};

use crate::step;

pub use crate::kit::kernels::Kernel;

pub fn table(root: &Path) -> Result<Vec<Kernel>> {
    crate::kit::kernels::table(root).map_err(anyhow::Error::msg)
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
        if k.dir(root).join("vmlinuz").exists() && (k.native() || k.dir(root).join("busybox").exists()) {
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

/// The newest name among packages named `<prefix><numbers...><suffix>`: compared by their
/// numbers in order (5.10.0-32 > 5.10.0-9).
fn newest(names: &[String]) -> Option<String> {
    let key = |n: &str| -> Vec<u64> {
        n.split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .filter_map(|s| s.parse().ok())
            .collect()
    };
    names.iter().max_by_key(|n| key(n)).cloned()
}

fn fetch(root: &Path, k: &Kernel) -> Result<()> {
    crate::apt::require_tools()?;
    let apt = crate::apt::PrivateApt::open(root, &k.suite, &k.arch)?;
    let name =
        newest(&apt.search(&k.package)).with_context(|| format!("no package matching {} in {}", k.package, k.suite))?;
    step(&format!("fetching {name} ({} kernel of the QEMU matrix)", k.name));
    let dir = k.dir(root);
    let x = dir.join("x");
    let _ = std::fs::remove_dir_all(&x);
    apt.extract(&name, &x)?;
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
    let _ = std::fs::remove_dir_all(&x);
    if !k.native() {
        // The host's /bin/busybox cannot run in the guest: the row's own busybox-static.
        apt.extract("busybox-static", &x)?;
        std::fs::copy(x.join("bin/busybox"), dir.join("busybox")).context("busybox-static without bin/busybox")?;
        let _ = std::fs::remove_dir_all(&x);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::kit::kernels::parse;

    #[test]
    fn the_table_parses_and_each_row_has_a_directory_of_its_own() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
        let t = table(&root).unwrap();
        let names: Vec<&str> = t.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["5.10", "6.1", "6.12", "6.1-arm64"]);
        let mut dirs: Vec<PathBuf> = t.iter().map(|k| k.dir(&root)).collect();
        dirs.sort();
        dirs.dedup();
        assert_eq!(dirs.len(), t.len());
        assert_eq!(t.iter().filter(|k| !k.native()).count(), 1, "one arm64 row");
        assert!(parse("5.10\tbullseye\tamd64").is_err());
    }

    #[test]
    fn newest_compares_numbers() {
        let names = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let found = names(&[
            "linux-image-5.10.0-9-cloud-amd64-unsigned",
            "linux-image-5.10.0-32-cloud-amd64-unsigned",
        ]);
        assert_eq!(newest(&found).unwrap(), "linux-image-5.10.0-32-cloud-amd64-unsigned");
        let found = names(&[
            "linux-image-6.12.117+deb13-cloud-amd64-unsigned",
            "linux-image-6.12.9+deb13-cloud-amd64-unsigned",
        ]);
        assert_eq!(
            newest(&found).unwrap(),
            "linux-image-6.12.117+deb13-cloud-amd64-unsigned"
        );
        assert_eq!(newest(&[]), None);
    }
}
