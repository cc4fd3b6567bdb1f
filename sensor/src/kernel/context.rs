//! What the loader learns about the running kernel before loading anything: BPF features,
//! tracefs and BTF. Built once per start (blocking: it reads files and probes the kernel) and
//! dropped once the programs are loaded.

use std::path::Path;

use super::{btf::KernelBtf, features::KernelFeatures, tracefs::Tracefs};

pub struct KernelContext {
    pub features: KernelFeatures,
    pub tracefs: Result<Tracefs, String>,
    /// Parsed once: struct offsets and function/type ids come from here.
    pub btf: Result<KernelBtf, String>,
    /// Where the BTF came from when given explicitly (`--btf-path`); aya parses it itself
    /// only when a program needs it (fentry), so the common path parses it once.
    pub btf_path: Option<std::path::PathBuf>,
}

impl KernelContext {
    pub fn discover(btf_path: Option<&Path>, tracefs_path: Option<&Path>) -> KernelContext {
        let btf = KernelBtf::open(btf_path).map_err(|e| super::features::error_chain(&e));
        let features = KernelFeatures::probe(btf.is_ok());
        let tracefs = Tracefs::locate(tracefs_path).map_err(|e| e.to_string());
        KernelContext {
            features,
            tracefs,
            btf,
            btf_path: btf_path.map(Path::to_path_buf),
        }
    }

    /// The BTF in aya's form, for loading fentry programs (parsed on demand).
    pub fn aya_btf(&self) -> Result<aya::Btf, String> {
        let r = match &self.btf_path {
            Some(p) => aya::Btf::parse_file(p, aya::Endianness::default()),
            None => aya::Btf::from_sys_fs(),
        };
        r.map_err(|e| {
            format!(
                "kernel BTF could not be parsed by aya: {}",
                super::features::error_chain(&e)
            )
        })
    }
}
