//! Cgroup path -> workload: what it returns is a well-formed id taken from the path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensor::cgroup::workload;

fn hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_hexdigit())
}

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    let w = workload(path);
    if !w.container_id.is_empty() {
        assert_eq!(w.container_id.len(), 64);
        assert!(hex(&w.container_id));
        assert!(path.contains(&w.container_id));
    }
    if !w.pod_uid.is_empty() {
        let parts: Vec<&str> = w.pod_uid.split('-').collect();
        let uuid = parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12]);
        let static_pod = parts.len() == 1 && w.pod_uid.len() == 32;
        assert!((uuid || static_pod) && parts.iter().all(|p| hex(p)), "{:?}", w.pod_uid);
        // Systemd writes the uid's dashes as underscores.
        assert!(path.contains(&w.pod_uid) || path.contains(&w.pod_uid.replace('-', "_")));
    }
    // Deterministic, and a path made of its own segments says the same.
    assert_eq!(workload(path), w);
    let again: Vec<&str> = path.split('/').collect();
    assert_eq!(workload(&again.join("/")), w);
});
