//! The QEMU kernel matrix's table (sensor/tests/qemu/kernels.tsv), read one way by the test
//! that boots each row and by `cargo xtask test`, which fetches each row's kernel.

use std::path::{Path, PathBuf};

/// One row: a kernel the suite boots.
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

/// The table, relative to the workspace root.
pub const TABLE: &str = "sensor/tests/qemu/kernels.tsv";

impl Kernel {
    /// Whether the row's architecture is the host's (its guest runs the host's busybox).
    pub fn native(&self) -> bool {
        let host = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        self.arch == host
    }

    /// Where the image is cached.
    pub fn dir(&self, root: &Path) -> PathBuf {
        root.join("target/qemu").join(&self.name)
    }
}

/// The table's rows (comments and blank lines skipped); a row without its four tab-separated
/// columns is an error naming it.
pub fn parse(text: &str) -> Result<Vec<Kernel>, String> {
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
                _ => Err(format!("kernels.tsv: want 4 tab-separated columns in '{l}'")),
            }
        })
        .collect()
}

/// The rows of the table under the workspace `root`.
pub fn table(root: &Path) -> Result<Vec<Kernel>, String> {
    let path = root.join(TABLE);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
    parse(&text)
}
