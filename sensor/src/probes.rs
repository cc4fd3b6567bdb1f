//! The one place that lists the kernel probes. Adding a probe is one line here (see
//! docs/architecture.md); everything generic takes this list.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{
    memcg::{config::MemcgConfig, MemcgProbe},
    oom::{config::OomConfig, OomProbe},
    probe::{Probe, ProbeSpec, Section},
    tcp::{config::TcpConfig, TcpProbe},
};

/// Registers probes: each `name: Probe(Section)` line makes the configuration section
/// `probes.<name>` (read, validated and defaulted as one with the others) and the probe built
/// from it. The name is the probe's spec name (a test checks).
macro_rules! probes {
    ($($name:ident: $probe:ident($section:ident),)*) => {
        /// `probes:` of the configuration, a section per registered probe.
        #[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
        #[serde(default, deny_unknown_fields)]
        pub struct Probes {
            $(pub $name: $section,)*
        }

        impl Probes {
            /// Each section with its key, in registration order.
            pub fn sections(&self) -> Vec<(&'static str, &dyn Section)> {
                vec![$((stringify!($name), &self.$name as &dyn Section),)*]
            }
        }

        /// Every probe this build knows, configured, in registration order.
        pub fn all(cfg: &Probes) -> Vec<Arc<dyn Probe>> {
            vec![$(Arc::new($probe::new(cfg.$name.clone())),)*]
        }
    };
}

probes! {
    oom: OomProbe(OomConfig),
    memcg: MemcgProbe(MemcgConfig),
    tcp: TcpProbe(TcpConfig),
}

/// The specs (names and hook ladders) of every probe, independent of configuration.
pub fn specs() -> Vec<&'static ProbeSpec> {
    all(&Probes::default()).iter().map(|p| p.spec()).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use object::{Object, ObjectSection, ObjectSymbol, SectionKind, SymbolKind};

    use super::*;

    /// The programs of the embedded object, by name: functions in a program section (named by
    /// its hook type, e.g. `tracepoint`), not in `.text` (helpers such as `memcpy`).
    fn programs() -> BTreeSet<String> {
        let file = object::File::parse(crate::loader::object()).expect("the embedded eBPF object parses");
        file.symbols()
            .filter(|s| s.kind() == SymbolKind::Text && s.is_global())
            .filter(|s| {
                s.section_index()
                    .and_then(|i| file.section_by_index(i).ok())
                    .is_some_and(|sec| sec.kind() == SectionKind::Text && sec.name().is_ok_and(|n| n != ".text"))
            })
            .filter_map(|s| s.name().ok().map(str::to_string))
            .collect()
    }

    #[test]
    fn each_section_is_named_as_its_probe() {
        let cfg = Probes::default();
        let keys: Vec<&str> = cfg.sections().iter().map(|(k, _)| *k).collect();
        let names: Vec<&str> = specs().iter().map(|s| s.name).collect();
        assert_eq!(keys, names);
    }

    #[test]
    fn every_program_belongs_to_a_probe_and_every_hook_exists() {
        let progs = programs();
        assert!(!progs.is_empty(), "no programs found in the object");
        let hooks: BTreeSet<String> = specs()
            .iter()
            .flat_map(|s| s.groups.iter())
            .flat_map(|g| g.hooks.iter())
            .map(|h| h.program.to_string())
            .collect();
        let missing: Vec<&String> = hooks.difference(&progs).collect();
        assert!(
            missing.is_empty(),
            "hooks whose program is not in the object: {missing:?}"
        );
        let orphans: Vec<&String> = progs.difference(&hooks).collect();
        assert!(orphans.is_empty(), "programs no registered probe attaches: {orphans:?}");
    }

    /// Symbols of the object's sections named `section` (maps) or of its data sections
    /// (globals).
    fn symbols_in(pred: impl Fn(&str) -> bool) -> BTreeSet<String> {
        let file = object::File::parse(crate::loader::object()).expect("the embedded eBPF object parses");
        file.symbols()
            .filter(|s| {
                s.section_index()
                    .and_then(|i| file.section_by_index(i).ok())
                    .and_then(|sec| sec.name().ok().map(&pred))
                    .unwrap_or(false)
            })
            .filter_map(|s| {
                s.name()
                    .ok()
                    .filter(|n| !n.is_empty() && !n.starts_with('.'))
                    .map(str::to_string)
            })
            .collect()
    }

    #[test]
    fn map_and_global_names_are_those_of_the_object() {
        let maps = symbols_in(|sec| sec == "maps" || sec == ".maps");
        let named: BTreeSet<String> = sensor_common::names::maps::ALL.iter().map(|s| s.to_string()).collect();
        assert_eq!(named, maps, "sensor_common::names::maps against the object's maps");
        let data = symbols_in(|sec| sec.starts_with(".rodata") || sec.starts_with(".data") || sec.starts_with(".bss"));
        let missing: Vec<&&str> = sensor_common::names::globals::ALL
            .iter()
            .filter(|g| !data.contains(**g))
            .collect();
        assert!(
            missing.is_empty(),
            "globals not in the object: {missing:?} (it has {data:?})"
        );
    }

    /// The loader hands aya no kernel BTF (it would only be used for CO-RE relocations): that
    /// holds while the object has none. `.BTF.ext` header: magic, version, flags, hdr_len, then
    /// offset/length pairs for func info, line info and (when hdr_len >= 32) CO-RE relocations.
    #[test]
    fn object_has_no_core_relocations() {
        let file = object::File::parse(crate::loader::object()).expect("the embedded eBPF object parses");
        let Some(ext) = file.section_by_name(".BTF.ext") else {
            return;
        };
        let d = ext.data().expect("section data");
        let u32_at = |o: usize| u32::from_le_bytes(d[o..o + 4].try_into().expect("4 bytes"));
        assert_eq!(u16::from_le_bytes([d[0], d[1]]), 0xeb9f, "BTF.ext magic");
        let hdr_len = u32_at(4) as usize;
        let core_relo_len = if hdr_len >= 32 { u32_at(28) } else { 0 };
        assert_eq!(
            core_relo_len, 0,
            "the object has CO-RE relocations: hand aya the kernel BTF"
        );
    }

    #[test]
    fn names_counter_slots_and_record_kinds_are_unique() {
        let specs = specs();
        let names: BTreeSet<&str> = specs.iter().map(|s| s.name).collect();
        assert_eq!(names.len(), specs.len(), "probe names are unique");
        let slots: BTreeSet<u32> = specs.iter().map(|s| s.counter_id).collect();
        assert_eq!(slots.len(), specs.len(), "counter slots are unique");
        assert!(slots.iter().all(|s| *s < sensor_common::record::probe_id::COUNT));
        let probes = all(&Probes::default());
        let kinds: Vec<u16> = probes.iter().flat_map(|p| p.spec().records).map(|k| k.kind).collect();
        let unique: BTreeSet<u16> = kinds.iter().copied().collect();
        assert_eq!(unique.len(), kinds.len(), "each record kind has one owner: {kinds:?}");
        assert!(!unique.contains(&0), "kind 0 is never valid");
    }
}
