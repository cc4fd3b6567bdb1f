//! What ships: `dist` (the fully static sensor and the CA bundle for HTTPS checks) and `image`
//! (deploy/Dockerfile, `FROM scratch`, built from exactly those files with podman or docker).
//!
//! Static because the image has no libc to link against; musl because glibc cannot be linked
//! fully statically (NSS, dlopen). Both architectures build on this x86_64 machine: aarch64
//! with Debian's cross gcc and the arm64 musl headers of Debian's musl-dev (fetched through a
//! private apt state, see apt.rs), linked against Rust's own self-contained musl.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, output, run, step};

/// An architecture the sensor ships for.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::Amd64, Arch::Arm64];

    /// The static build's Rust target (musl, static-pie by default).
    pub fn target(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-unknown-linux-musl",
            Arch::Arm64 => "aarch64-unknown-linux-musl",
        }
    }

    /// Debian's and the OCI platform's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }
}
/// Debian's CA bundle (package ca-certificates), the first file rustls-native-certs looks for.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The files `dist` writes into its output directory; deploy/Dockerfile COPYs exactly these.
pub const DIST_FILES: [&str; 2] = ["sensor", "ca-certificates.crt"];
/// Local image name; `image` tags `<IMAGE>:<version>` and `<IMAGE>:latest`.
pub const IMAGE: &str = "localhost/sensor";

/// The rustup target of the static build (idempotent) and the C compiler for ring's and
/// mimalloc's C code; returns the environment the cargo build needs for that target.
pub fn setup_static(root: &Path, arch: Arch) -> Result<Vec<(String, String)>> {
    let target = arch.target();
    // rustup answers for the toolchain running us (the cargo proxy sets RUSTUP_TOOLCHAIN).
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"])).unwrap_or_default();
    if !installed.lines().any(|l| l.trim() == target) {
        step(&format!("installing the rust target {target} (static build)"));
        run(Command::new("rustup").args(["target", "add", target]))?;
    }
    match arch {
        Arch::Amd64 => {
            crate::deps::need(crate::deps::DIST, "the static build (`cargo xtask dist`)")?;
            if Command::new("musl-gcc").arg("--version").output().is_err() {
                bail!("musl-gcc not found although musl-tools is installed: it compiles the C code of ring and mimalloc for {target}");
            }
            Ok(Vec::new())
        }
        Arch::Arm64 => cross_arm64(root),
    }
}

/// Debian's aarch64 cross gcc compiles the C code against musl's arm64 headers (Debian's
/// musl-dev for arm64, unpacked under target/); it also links, against Rust's self-contained
/// musl for the target.
fn cross_arm64(root: &Path) -> Result<Vec<(String, String)>> {
    const GCC: &str = "aarch64-linux-gnu-gcc";
    crate::deps::need(
        crate::deps::DIST_ARM64,
        "the static aarch64 build (`cargo xtask dist --arch arm64`)",
    )?;
    let sysroot = root.join("target/xtask/sysroot-arm64");
    let include = sysroot.join("usr/include/aarch64-linux-musl");
    if !include.join("stdlib.h").is_file() {
        crate::apt::require_tools()?;
        let apt = crate::apt::PrivateApt::open(root, "bookworm", "arm64")?;
        apt.extract("musl-dev", &sysroot)?;
        if !include.join("stdlib.h").is_file() {
            bail!(
                "musl-dev (arm64) unpacked without {}",
                include.join("stdlib.h").display()
            );
        }
    }
    let gcc_include = output(Command::new(GCC).arg("-print-file-name=include"))
        .map(|s| s.trim().to_string())
        .filter(|s| Path::new(s).is_dir())
        .with_context(|| format!("{GCC} -print-file-name=include: no such directory"))?;
    let cflags = format!("-nostdinc -isystem {gcc_include} -isystem {}", include.display());
    Ok(vec![
        ("CC_aarch64_unknown_linux_musl".into(), GCC.into()),
        ("AR_aarch64_unknown_linux_musl".into(), "aarch64-linux-gnu-ar".into()),
        ("CFLAGS_aarch64_unknown_linux_musl".into(), cflags),
        ("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER".into(), GCC.into()),
    ])
}

/// Builds the static, stripped release sensor (eBPF object embedded) for `arch` and writes it
/// and the CA bundle into `out`; returns the written files in [`DIST_FILES`] order.
pub fn dist(root: &Path, out: &Path, arch: Arch) -> Result<Vec<PathBuf>> {
    crate::setup()?;
    let env = setup_static(root, arch)?;
    let target = arch.target();
    step(&format!("building the static sensor (release, {target}, stripped)"));
    // Per-target rustflags apply to the sensor and its dependencies only, not to build scripts
    // and proc macros, which stay shared with the glibc release build.
    run(cargo()
        .args(["build", "--release", "--locked", "-p", "sensor", "--target", target])
        .args([
            "--config",
            &format!("target.{target}.rustflags=[\"-Cstrip=symbols\", \"-Clink-self-contained=yes\"]"),
        ])
        .envs(env))?;
    let bin = root.join("target").join(target).join("release/sensor");
    check_static_stripped(&bin, arch)?;
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
        "{} ready: {}, static, stripped, {:.1} MB; CA bundle next to it",
        written[0].display(),
        arch.name(),
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
fn check_static_stripped(bin: &Path, arch: Arch) -> Result<()> {
    let elf = std::fs::read(bin).with_context(|| format!("read {}", bin.display()))?;
    let (interp, symtab, machine) =
        elf_facts(&elf).with_context(|| format!("{}: not a 64-bit ELF file", bin.display()))?;
    let want = match arch {
        Arch::Amd64 => EM_X86_64,
        Arch::Arm64 => EM_AARCH64,
    };
    if machine != want {
        bail!(
            "{} is for ELF machine {machine}, not {} ({want})",
            bin.display(),
            arch.name()
        );
    }
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

const EM_X86_64: usize = 62;
const EM_AARCH64: usize = 183;

/// (has a PT_INTERP program header, has a SHT_SYMTAB section, e_machine) of a little-endian
/// ELF64 file.
fn elf_facts(elf: &[u8]) -> Option<(bool, bool, usize)> {
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
    Some((interp, symtab, u16_at(0x12)?))
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

/// `dist` for each architecture into target/dist/<arch>/, then deploy/Dockerfile built once
/// per platform from the repository root (.dockerignore keeps the context to target/dist;
/// TARGETARCH picks the binary) as `localhost/sensor:<version>-<arch>`, and the manifest lists
/// `localhost/sensor:<version>` and `:latest` over both; prints each image's size.
pub fn image(root: &Path) -> Result<()> {
    crate::deps::need(crate::deps::IMAGE, "the image (`cargo xtask image`)")?;
    let mut files = Vec::new();
    for arch in Arch::ALL {
        files.extend(dist(root, &root.join("target/dist").join(arch.name()), arch)?);
    }
    let engine = engine()?;
    if engine != "podman" {
        bail!("the multi-arch image is assembled with `podman manifest`: apt-get install podman");
    }
    let version = env!("CARGO_PKG_VERSION");
    let revision = output(Command::new("git").args(["rev-parse", "HEAD"]).current_dir(root))
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "unknown".into());
    let lists = [format!("{IMAGE}:{version}"), format!("{IMAGE}:latest")];
    for list in &lists {
        // An earlier list or single-arch image of that name is replaced, not extended.
        let _ = output(Command::new("podman").args(["manifest", "rm", list]));
        let _ = output(Command::new("podman").args(["rmi", list]));
        run(Command::new("podman")
            .args(["manifest", "create", list])
            .stdout(std::io::stderr()))?;
    }
    let mut sizes = Vec::new();
    for arch in Arch::ALL {
        let tag = format!("{IMAGE}:{version}-{}", arch.name());
        step(&format!(
            "podman build {tag} (linux/{}, revision {revision})",
            arch.name()
        ));
        run(Command::new("podman")
            .arg("build")
            // Buildah 1.28 reuses a cached LABEL layer when only a build-arg it expands changed
            // (measured: a new commit with the same binary kept the old revision label); the
            // image is two COPYs, so building it afresh costs nothing.
            .arg("--no-cache")
            .args(["--platform", &format!("linux/{}", arch.name())])
            .arg("-f")
            .arg(root.join("deploy/Dockerfile"))
            .args(["--build-arg", &format!("VERSION={version}")])
            .args(["--build-arg", &format!("REVISION={revision}")])
            .args(["--build-arg", &format!("SOURCE={}", env!("CARGO_PKG_REPOSITORY"))])
            .args(["-t", &tag])
            .arg(root)
            // Its progress goes to stderr with ours; stdout is the summary below.
            .stdout(std::io::stderr()))?;
        let size: u64 = output(Command::new("podman").args(["image", "inspect", "--format", "{{.Size}}", &tag]))
            .and_then(|s| s.trim().parse().ok())
            .with_context(|| format!("podman image inspect {tag}: no size"))?;
        for list in &lists {
            run(Command::new("podman")
                .args(["manifest", "add", list, &format!("containers-storage:{tag}")])
                .stdout(std::io::stderr()))?;
        }
        step(&format!(
            "{tag}: {:.1} MB ({size} bytes, uncompressed)",
            size as f64 / 1e6
        ));
        sizes.push((arch, size));
    }
    step(&format!(
        "{} and {}: manifest lists for linux/amd64 and linux/arm64",
        lists[0], lists[1]
    ));
    for f in &files {
        println!("file\t{}", f.display());
    }
    for list in &lists {
        println!("image\t{list}");
    }
    for (arch, size) in sizes {
        println!("size\t{}\t{size}", arch.name());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{elf_facts, EM_X86_64};

    #[test]
    fn elf_facts_of_this_test_binary() {
        // The test binary is dynamic (glibc) and unstripped, so both facts hold.
        let exe = std::env::current_exe().expect("current_exe");
        let elf = std::fs::read(exe).expect("read own binary");
        assert_eq!(elf_facts(&elf), Some((true, true, EM_X86_64)));
        assert_eq!(elf_facts(b"not an elf"), None);
    }
}
