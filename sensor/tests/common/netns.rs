//! Network namespaces the tests create (never the host's own network): `ip` commands, running
//! code inside a namespace, and a star of namespaces joined to a hub by veth pairs.

use std::os::fd::AsRawFd;

/// Runs `ip ARGS` (split on whitespace); panics when it fails.
pub fn ip(args: &str) {
    let st = std::process::Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .expect("ip");
    assert!(st.success(), "ip {args}");
}

/// Runs `f` on a thread of its own inside network namespace `ns` (/var/run/netns/NS): sockets
/// it opens and processes it spawns live there.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns(2) on this thread only, with a namespace fd we own.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// True when this process can create network namespaces (CAP_SYS_ADMIN and CAP_NET_ADMIN);
/// else fails under CI=true, or reports the test skipped.
pub fn require_netns(test: &str) -> bool {
    let eff = super::cap_eff();
    super::require(
        test,
        eff & (1 << 21) != 0 && eff & (1 << 12) != 0,
        "this process cannot create network namespaces (needs CAP_SYS_ADMIN and CAP_NET_ADMIN, or root)",
    )
}

/// A hub namespace and spokes, spoke `i` (from 1) joined to the hub by a veth pair:
/// 10.77.i.1 on the hub's side, 10.77.i.2 on the spoke's. The hub's service addresses
/// 10.77.0.1 and 10.77.0.2 (on its loopback) are reached from every spoke through its veth.
/// Removed on drop.
pub struct Star {
    pub hub: String,
    pub spokes: Vec<String>,
}

impl Star {
    /// The hub's service addresses.
    pub const SERVICES: [&'static str; 2] = ["10.77.0.1", "10.77.0.2"];

    pub fn new(tag: &str, spokes: usize) -> Star {
        let id = std::process::id();
        let star = Star {
            hub: format!("sensor-{tag}-hub-{id}"),
            spokes: (1..=spokes).map(|i| format!("sensor-{tag}-{i}-{id}")).collect(),
        };
        ip(&format!("netns add {}", star.hub));
        ip(&format!("-n {} link set lo up", star.hub));
        for a in Star::SERVICES {
            ip(&format!("-n {} addr add {a}/32 dev lo", star.hub));
        }
        for (i, ns) in star.spokes.iter().enumerate() {
            let i = i + 1;
            ip(&format!("netns add {ns}"));
            ip(&format!("-n {ns} link set lo up"));
            ip(&format!(
                "-n {ns} link add s type veth peer name h{i} netns {}",
                star.hub
            ));
            ip(&format!("-n {ns} addr add {}/24 dev s", Star::spoke_addr(i)));
            ip(&format!("-n {} addr add 10.77.{i}.1/24 dev h{i}", star.hub));
            ip(&format!("-n {ns} link set s up"));
            ip(&format!("-n {} link set h{i} up", star.hub));
            ip(&format!("-n {ns} route add 10.77.0.0/24 via 10.77.{i}.1"));
        }
        star
    }

    /// Spoke `i`'s address (the hub reaches it through the veth).
    pub fn spoke_addr(i: usize) -> String {
        format!("10.77.{i}.2")
    }

    /// Spoke `i` (from 1) has no route to the hub's address `addr` any more: connects there
    /// fail at once with "no route to host", as from a node with a broken route.
    pub fn cut(&self, i: usize, addr: &str) {
        ip(&format!("-n {} route add unreachable {addr}/32", self.spokes[i - 1]));
    }

    /// Undoes [`Star::cut`].
    pub fn mend(&self, i: usize, addr: &str) {
        ip(&format!("-n {} route del unreachable {addr}/32", self.spokes[i - 1]));
    }
}

impl Drop for Star {
    fn drop(&mut self) {
        for ns in self.spokes.iter().chain(std::iter::once(&self.hub)) {
            let _ = std::process::Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
