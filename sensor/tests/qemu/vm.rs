//! Booting one kernel of the matrix (sensor/tests/qemu/kernels.tsv) with init.sh as PID 1, and
//! reading its serial console.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::common;

const SENSOR: &str = env!("CARGO_BIN_EXE_sensor");

pub use common::kit::kernels::Kernel;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The row named `name`.
pub fn kernel(name: &str) -> Kernel {
    let rows = common::kit::kernels::table(&workspace()).unwrap_or_else(|e| panic!("{e}"));
    rows.into_iter()
        .find(|k| k.name == name)
        .unwrap_or_else(|| panic!("no kernel {name} in {}", common::kit::kernels::TABLE))
}

/// Skips (or, under CI, fails) for a missing piece of the set-up.
fn missing(what: &str) {
    common::require("", false, what);
}

/// Copies `bin` and the shared libraries it needs (per ldd) into `root` at the same paths.
fn install_with_libs(bin: &Path, root: &Path, dest: &str) {
    std::fs::copy(bin, root.join(dest.trim_start_matches('/'))).expect("copy binary");
    let out = Command::new("ldd").arg(bin).output().expect("ldd");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = line.split_whitespace().find(|w| w.starts_with('/'));
        if let Some(p) = path {
            let to = root.join(p.trim_start_matches('/'));
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(p, &to).unwrap_or_else(|e| panic!("copy {p}: {e}"));
        }
    }
}

/// Strips `bin` into `dir` (the RAM-backed root stays small) and returns the copy.
fn stripped(bin: &Path, dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(format!("{name}.stripped"));
    let st = Command::new("strip")
        .arg("-o")
        .arg(&out)
        .arg(bin)
        .status()
        .expect("strip");
    assert!(st.success(), "strip {}", bin.display());
    out
}

/// What runs in the guest: the host's own binaries (the debug sensor with its libraries, GNU
/// tail, /bin/busybox) on an amd64 row; on an arm64 row the static aarch64 sensor `cargo xtask
/// dist --arch arm64` writes, the row's busybox-static and its `tail` applet.
struct Guest {
    busybox: PathBuf,
    /// `None`: the host's debug build (dynamic, copied with its libraries).
    static_sensor: Option<PathBuf>,
    qemu: &'static str,
    machine: &'static [&'static str],
    console: &'static str,
}

impl Guest {
    fn of(k: &Kernel) -> Guest {
        let dir = workspace().join("target/qemu").join(&k.name);
        match k.arch.as_str() {
            "amd64" => Guest {
                busybox: PathBuf::from("/bin/busybox"),
                static_sensor: None,
                qemu: "qemu-system-x86_64",
                machine: &[],
                console: "ttyS0",
            },
            "arm64" => Guest {
                busybox: dir.join("busybox"),
                static_sensor: Some(workspace().join("target/dist/arm64/sensor")),
                qemu: "qemu-system-aarch64",
                machine: &["-M", "virt", "-cpu", "max"],
                console: "ttyAMA0",
            },
            other => panic!("no QEMU system for arch {other}"),
        }
    }

    /// The first piece of the set-up that is missing, if any.
    fn missing(&self) -> Option<String> {
        if Command::new(self.qemu).arg("--version").output().is_err() {
            return Some(format!("{} is not installed", self.qemu));
        }
        if !self.busybox.exists() {
            return Some(format!("{} (busybox-static) is absent", self.busybox.display()));
        }
        match &self.static_sensor {
            Some(s) if !s.exists() => Some(format!(
                "{} is absent (`cargo xtask dist --arch arm64 --out target/dist/arm64` builds it)",
                s.display()
            )),
            _ => None,
        }
    }
}

/// The root file system: busybox, init.sh, the sensor, `tail`, and with `with_tests` this test
/// binary as `/qemu-tests` (its helpers run inside the VM; amd64 rows only).
fn build_initramfs(dir: &Path, guest: &Guest, with_tests: bool) -> PathBuf {
    let root = dir.join("root");
    let _ = std::fs::remove_dir_all(&root);
    for d in ["bin", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(&guest.busybox, root.join("bin/busybox")).expect("busybox-static");
    let init = root.join("init");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qemu/init.sh"), &init).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(root.join("bin/busybox"), std::fs::Permissions::from_mode(0o755)).unwrap();
    match &guest.static_sensor {
        None => {
            install_with_libs(&stripped(Path::new(SENSOR), dir, "sensor"), &root, "/sensor");
            install_with_libs(Path::new("/usr/bin/tail"), &root, "/tail");
        }
        Some(sensor) => {
            assert!(!with_tests, "this test binary does not run on another architecture");
            std::fs::copy(sensor, root.join("sensor")).expect("copy the static sensor");
            // busybox's tail: its comm is still "tail", as the checks expect.
            std::os::unix::fs::symlink("/bin/busybox", root.join("tail")).unwrap();
        }
    }
    if with_tests {
        let me = std::env::current_exe().expect("test binary");
        install_with_libs(&stripped(&me, dir, "qemu-tests"), &root, "/qemu-tests");
    }
    let cpio = dir.join("initramfs.cpio");
    let st = Command::new("sh")
        .arg("-c")
        .arg("cd \"$1\" && find . | /bin/busybox cpio -o -H newc > \"$2\" 2>/dev/null")
        .arg("sh")
        .arg(&root)
        .arg(&cpio)
        .status()
        .unwrap();
    assert!(st.success(), "cpio failed");
    cpio
}

/// VMs that run at once: each is a 2-vCPU TCG guest, and with four of them on a 2-CPU host one
/// guest's wget loop ran 40 times slower than alone and hit its 600 s timeout (CI, 5.10).
const VM_SLOTS: usize = 2;

static VMS: (std::sync::Mutex<usize>, std::sync::Condvar) = (std::sync::Mutex::new(0), std::sync::Condvar::new());

/// One of the [`VM_SLOTS`], held while a VM runs.
struct VmSlot;

impl VmSlot {
    fn take() -> VmSlot {
        let mut n = VMS.0.lock().unwrap_or_else(|e| e.into_inner());
        while *n >= VM_SLOTS {
            n = VMS.1.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        *n += 1;
        VmSlot
    }
}

impl Drop for VmSlot {
    fn drop(&mut self) {
        let mut n = VMS.0.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        VMS.1.notify_one();
    }
}

/// Boots `k` with init.sh running `passes` (comma-separated); returns the serial console's
/// text, or `None` when a piece of the set-up is missing (skipped, or failed under CI).
pub fn boot(k: &Kernel, passes: &str) -> Option<String> {
    boot_with(k, passes, false)
}

/// [`boot`], with this test binary in the VM when `with_tests`.
pub fn boot_with(k: &Kernel, passes: &str, with_tests: bool) -> Option<String> {
    let kernel = workspace().join("target/qemu").join(&k.name).join("vmlinuz");
    if !kernel.exists() {
        missing(&format!(
            "{} (Debian {}'s {} kernel) is absent",
            kernel.display(),
            k.suite,
            k.name
        ));
        return None;
    }
    let guest = Guest::of(k);
    if let Some(what) = guest.missing() {
        missing(&what);
        return None;
    }
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "qemu-{}{}",
        k.name,
        if with_tests { "-tests" } else { "" }
    ));
    std::fs::create_dir_all(&work).unwrap();
    let initrd = build_initramfs(&work, &guest, with_tests);
    let serial = work.join("serial.log");
    // The clock of the VM's timeout starts once it has a slot.
    let _slot = VmSlot::take();
    let started = Instant::now();
    let st = Command::new("timeout")
        // TCG: KVM inside a VM (as here) can hang at boot.
        .args(["--kill-after=10", "600", guest.qemu, "-accel", "tcg"])
        .args(guest.machine)
        .args(["-m", "512", "-smp", "2"])
        .args(["-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(format!(
            "console={} panic=-1 quiet loglevel=3 sensor.passes={passes}",
            guest.console
        ))
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .args(["-monitor", "none", "-display", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .expect("start qemu");
    let out = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(st.success(), "qemu exited with {st}; serial:\n{out}");
    eprintln!(
        "kernel {} ({}, {}): the VM ran {:.1} s",
        k.name,
        k.suite,
        k.arch,
        started.elapsed().as_secs_f64(),
    );
    std::thread::sleep(Duration::from_millis(10));
    Some(out)
}

/// The text between `=== {start} ===` and `=== END {name} ===`.
pub fn section<'a>(out: &'a str, start: &str, name: &str) -> &'a str {
    let begin = format!("=== {start} ===");
    let end = format!("=== END {name} ===");
    let s = out
        .find(&begin)
        .unwrap_or_else(|| panic!("no '{begin}' in VM output:\n{out}"));
    let rest = &out[s + begin.len()..];
    let e = rest
        .find(&end)
        .unwrap_or_else(|| panic!("no '{end}' in VM output:\n{out}"));
    &rest[..e]
}

/// The text after `--- {name}` up to the next `--- ` marker.
/// The samples of a section of scraped metrics. The guest's console interleaves its shell's own
/// lines (busybox `timeout` ends its `nc` with SIGTERM: `Terminated`) with what the guest
/// printed, so only sample lines (`sensor_...`, what the guest's grep selected) are kept for
/// the strict reader.
pub fn samples_part(sec: &str, name: &str) -> String {
    let lines: Vec<&str> = part(sec, name).lines().filter(|l| l.starts_with("sensor_")).collect();
    lines.join("\n")
}

pub fn part<'a>(sec: &'a str, name: &str) -> &'a str {
    let marker = format!("--- {name}");
    let s = sec.find(&marker).unwrap_or_else(|| panic!("no '{marker}' in:\n{sec}"));
    let rest = &sec[s + marker.len()..];
    rest.find("\n--- ").map_or(rest, |e| &rest[..e]).trim()
}
