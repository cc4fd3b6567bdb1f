//! Random names as container runtimes and kubelet make them, for the containers, pods and
//! cgroups tests and benches create.

use std::io::Read as _;

/// `bytes` random bytes as lowercase hex (2 x `bytes` digits), from /dev/urandom.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A random 64-hex container id, as kubelet's runtimes make them.
pub fn container_id() -> String {
    random_hex(32)
}

/// A random pod uid (UUID v4 layout).
pub fn pod_uid() -> String {
    let h = random_hex(16);
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}
