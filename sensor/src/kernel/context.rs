//! What the loader learns about the running kernel before loading anything: BPF features,
//! tracefs and BTF. Built once per start (blocking: it reads files and probes the kernel) and
//! dropped once the programs are loaded.

use std::path::Path;

use super::{btf::KernelBtf, features::KernelFeatures, tracefs::Tracefs};

pub struct KernelContext {
    pub features: KernelFeatures,
    pub tracefs: Result<Tracefs, String>,
    /// Parsed once: struct offsets and function/type ids come from here. Released (see
    /// [`KernelContext::release_btf`]) once the loader has taken what it needs.
    pub btf: Result<KernelBtf, String>,
    /// Where the BTF was read from, or why it could not be: kept after the release.
    pub btf_source: Result<std::path::PathBuf, String>,
    /// Where the BTF came from when given explicitly (`--btf-path`); aya parses it itself
    /// only when a program needs it (fentry), so the common path parses it once.
    pub btf_path: Option<std::path::PathBuf>,
}

impl KernelContext {
    pub fn discover(btf_path: Option<&Path>, tracefs_path: Option<&Path>) -> KernelContext {
        // Features first: aya's probe of the tracing program type parses the kernel BTF too,
        // and that copy is gone before ours is parsed (the two together set the peak RSS).
        let features = KernelFeatures::probe();
        let btf = KernelBtf::open(btf_path).map_err(|e| super::features::error_chain(&e));
        let features = features.with_btf(btf.is_ok());
        let tracefs = Tracefs::locate(tracefs_path).map_err(|e| e.to_string());
        KernelContext {
            features,
            tracefs,
            btf_source: btf.as_ref().map(|b| b.path.clone()).map_err(Clone::clone),
            btf,
            btf_path: btf_path.map(Path::to_path_buf),
        }
    }

    /// Frees the parsed BTF (tens of MB for a distribution kernel) before aya parses its own
    /// copy, so the two are never in memory at once.
    pub fn release_btf(&mut self) {
        if self.btf.is_ok() {
            self.btf = Err("released once the probes were prepared".into());
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
