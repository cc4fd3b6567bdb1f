//! The machine-wide kernel lock. Whatever loads BPF or causes OOM kills (tests, benches, the
//! soak) holds it, so runs from several test binaries and checkouts never see each other's
//! kills and connects.

use std::{fs::File, io, os::fd::AsRawFd as _};

pub const KERNEL_LOCK_FILE: &str = "/tmp/sensor-kernel-tests.lock";

/// Takes the lock, held until the returned file is dropped (the lock goes with its close);
/// `waiting` runs once first when another holder has it, to say why nothing happens.
pub fn lock_kernel(waiting: impl FnOnce()) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(KERNEL_LOCK_FILE)
        .map_err(|e| io::Error::new(e.kind(), format!("open {KERNEL_LOCK_FILE}: {e}")))?;
    let fd = file.as_raw_fd();
    // SAFETY: flock(2) on a descriptor this function owns.
    if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(file);
    }
    waiting();
    // SAFETY: as above, blocking this time.
    if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("flock {KERNEL_LOCK_FILE}: {e}")));
    }
    Ok(file)
}
