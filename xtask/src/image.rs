//! What ships: `dist` (the fully static sensor and the CA bundle for HTTPS checks) and `image`
//! (deploy/Dockerfile, `FROM scratch`, built from exactly those files with podman or docker).
//!
//! Static because the image has no libc to link against; musl because glibc cannot be linked
//! fully statically (NSS, dlopen). x86_64 only for now: aarch64 is a follow-up.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, output, run, step};

/// The static build's target (musl, static-pie by default for this target).
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-musl";
/// Debian's CA bundle (package ca-certificates), the first file rustls-native-certs looks for.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The files `dist` writes into its output directory; deploy/Dockerfile COPYs exactly these.
pub const DIST_FILES: [&str; 2] = ["sensor", "ca-certificates.crt"];
/// Local image name; `image` tags `<IMAGE>:<version>` and `<IMAGE>:latest`.
pub const IMAGE: &str = "localhost/sensor";

/// The rustup target for the static build (idempotent) and musl-gcc, which compiles the C code
/// of ring (TLS) and mimalloc (the static build's allocator) for musl.
pub fn setup_static() -> Result<()> {
    // rustup answers for the toolchain running us (the cargo proxy sets RUSTUP_TOOLCHAIN).
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"])).unwrap_or_default();
    if !installed.lines().any(|l| l.trim() == STATIC_TARGET) {
        step(&format!("installing the rust target {STATIC_TARGET} (static build)"));
        run(Command::new("rustup").args(["target", "add", STATIC_TARGET]))?;
    }
    crate::deps::need(crate::deps::DIST, "the static build (`cargo xtask dist`)")?;
    if Command::new("musl-gcc").arg("--version").output().is_err() {
        bail!("musl-gcc not found although musl-tools is installed: it compiles the C code of ring and mimalloc for {STATIC_TARGET}");
    }
    Ok(())
}

/// Builds the static, stripped release sensor (eBPF object embedded) and writes it and the CA
/// bundle into `out`; returns the written files in [`DIST_FILES`] order.
pub fn dist(root: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    crate::setup()?;
    setup_static()?;
    step(&format!(
        "building the static sensor (release, {STATIC_TARGET}, stripped)"
    ));
    // Per-target rustflags apply to the sensor and its dependencies only, not to build scripts
    // and proc macros, which stay shared with the glibc release build.
    run(cargo()
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "sensor",
            "--target",
            STATIC_TARGET,
        ])
        .args([
            "--config",
            &format!("target.{STATIC_TARGET}.rustflags=[\"-Cstrip=symbols\"]"),
        ]))?;
    let bin = root.join("target").join(STATIC_TARGET).join("release/sensor");
    check_static_stripped(&bin)?;
    let ca = Path::new(CA_BUNDLE);
    if !ca.is_file() {
        bail!("{CA_BUNDLE} not found: install Debian's ca-certificates package (the image ships that bundle)");
    }
    let out = if out.is_absolute() {
        out.to_path_buf()
    } else {
        root.join(out)
    };
    std::fs::create_dir_all(&out).with_context(|| format!("mkdir {}", out.display()))?;
    let mut written = Vec::new();
    for (name, src) in DIST_FILES.iter().zip([bin.as_path(), ca]) {
        let dest = out.join(name);
        // Unlink first: copying over a binary that is running fails with ETXTBSY.
        let _ = std::fs::remove_file(&dest);
        std::fs::copy(src, &dest).with_context(|| format!("copy {} to {}", src.display(), dest.display()))?;
        written.push(dest);
    }
    let size = std::fs::metadata(&written[0]).map_or(0, |m| m.len());
    step(&format!(
        "{} ready: static, stripped, {:.1} MB; CA bundle next to it",
        written[0].display(),
        size as f64 / 1e6
    ));
    for f in &written {
        println!("file\t{}", f.display());
    }
    Ok(written)
}

/// Refuses a binary that needs a dynamic loader (PT_INTERP: it would not start in a scratch
/// image) or that still has a symbol table (not stripped, e.g. because RUSTFLAGS replaced the
/// strip flag).
fn check_static_stripped(bin: &Path) -> Result<()> {
    let elf = std::fs::read(bin).with_context(|| format!("read {}", bin.display()))?;
    let (interp, symtab) = elf_facts(&elf).with_context(|| format!("{}: not a 64-bit ELF file", bin.display()))?;
    if interp {
        bail!(
            "{} needs a dynamic loader (PT_INTERP): not a static build",
            bin.display()
        );
    }
    if symtab {
        bail!(
            "{} has a symbol table: not stripped (is RUSTFLAGS set? it replaces the per-target strip flag)",
            bin.display()
        );
    }
    Ok(())
}

/// (has a PT_INTERP program header, has a SHT_SYMTAB section) of a little-endian ELF64 file.
fn elf_facts(elf: &[u8]) -> Option<(bool, bool)> {
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(|b| u64::from_le_bytes(b) as usize)
    };
    let (phoff, shoff) = (u64_at(0x20)?, u64_at(0x28)?);
    let (phentsize, phnum, shentsize, shnum) = (u16_at(0x36)?, u16_at(0x38)?, u16_at(0x3a)?, u16_at(0x3c)?);
    const PT_INTERP: u32 = 3;
    const SHT_SYMTAB: u32 = 2;
    let mut interp = false;
    for i in 0..phnum {
        interp |= u32_at(phoff + i * phentsize)? == PT_INTERP;
    }
    let mut symtab = false;
    for i in 0..shnum {
        symtab |= u32_at(shoff + i * shentsize + 4)? == SHT_SYMTAB;
    }
    Some((interp, symtab))
}

/// podman where it is installed, else docker (whose daemon must answer).
fn engine() -> Result<&'static str> {
    if Command::new("podman")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok("podman");
    }
    if Command::new("docker")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok("docker");
    }
    bail!("neither podman nor a running docker found: apt-get install podman (Debian), or start the docker daemon")
}

/// `dist`, then deploy/Dockerfile built from the repository root (.dockerignore keeps the
/// context to target/dist) as `localhost/sensor:<version>` and `:latest`; prints the size.
pub fn image(root: &Path) -> Result<()> {
    crate::deps::need(crate::deps::IMAGE, "the image (`cargo xtask image`)")?;
    dist(root, &root.join("target/dist"))?;
    let engine = engine()?;
    let version = env!("CARGO_PKG_VERSION");
    let revision = output(Command::new("git").args(["rev-parse", "HEAD"]).current_dir(root))
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "unknown".into());
    let tag = format!("{IMAGE}:{version}");
    let latest = format!("{IMAGE}:latest");
    step(&format!("{engine} build {tag} (revision {revision})"));
    run(Command::new(engine)
        .arg("build")
        // Buildah 1.28 reuses a cached LABEL layer when only a build-arg it expands changed
        // (measured: a new commit with the same binary kept the old revision label); the image
        // is two COPYs, so building it afresh costs nothing.
        .arg("--no-cache")
        .arg("-f")
        .arg(root.join("deploy/Dockerfile"))
        .args(["--build-arg", &format!("VERSION={version}")])
        .args(["--build-arg", &format!("REVISION={revision}")])
        .args(["--build-arg", &format!("SOURCE={}", env!("CARGO_PKG_REPOSITORY"))])
        .args(["-t", &tag, "-t", &latest])
        .arg(root)
        // Its progress goes to stderr with ours; stdout is the summary below.
        .stdout(std::io::stderr()))?;
    let size: u64 = output(Command::new(engine).args(["image", "inspect", "--format", "{{.Size}}", &tag]))
        .and_then(|s| s.trim().parse().ok())
        .with_context(|| format!("{engine} image inspect {tag}: no size"))?;
    step(&format!(
        "{tag} and {latest}: {:.1} MB ({size} bytes, uncompressed)",
        size as f64 / 1e6
    ));
    println!("image\t{tag}");
    println!("image\t{latest}");
    println!("size\t{size}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::elf_facts;

    #[test]
    fn elf_facts_of_this_test_binary() {
        // The test binary is dynamic (glibc) and unstripped, so both facts hold.
        let exe = std::env::current_exe().expect("current_exe");
        let elf = std::fs::read(exe).expect("read own binary");
        assert_eq!(elf_facts(&elf), Some((true, true)));
        assert_eq!(elf_facts(b"not an elf"), None);
    }
}
