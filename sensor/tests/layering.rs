//! The daemon's module structure: modules import downward only (no cycle among the top-level
//! modules of `sensor/src`), and generic modules name no probe slice.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// The probe slices, from the one probe list (each probe's module is named as the probe);
/// generic code must not reach into them.
fn slices() -> Vec<&'static str> {
    let names: Vec<&'static str> = sensor::probes::specs().iter().map(|s| s.name).collect();
    for n in &names {
        assert!(
            src().join(n).join("mod.rs").is_file(),
            "probe {n} has no folder sensor/src/{n}/"
        );
    }
    names
}
/// The modules that may name probes: the probe list, the config sections, the binary. Every
/// other top-level module must work for any probe, so a new module is generic unless it is
/// added here.
const WIRING: &[&str] = &["probes", "config", "main", "lib"];
/// Generic modules that still name a probe, until they read typed data from the probes (issue
/// 28). The test fails once one no longer does, so the list only shrinks.
const PENDING: &[&str] = &[];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without comments and without its `#[cfg(test)] mod tests`.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Top-level modules a file's code refers to: `crate::x` paths and the first items of
/// `use crate::{x, y::z}` groups.
fn deps(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item = String::new();
            for ch in group.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(head(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(ch);
            }
            out.insert(head(&item));
        } else {
            out.insert(head(rest));
        }
    }
    out.retain(|m| !m.is_empty() && m != "self");
    out
}

fn head(s: &str) -> String {
    s.trim()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// Module -> modules it imports.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let root = src();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&root).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let mut d = deps(&code(&std::fs::read_to_string(&f).unwrap()));
        d.remove(&top);
        g.entry(top).or_default().extend(d);
    }
    g
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let g = graph();
    assert!(g.len() > 15, "found the modules: {:?}", g.keys());
    // Depth-first search for a back edge; report the cycle.
    fn visit(
        m: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == m) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        stack.push(m.to_string());
        for d in g.get(m).into_iter().flatten().filter(|d| g.contains_key(*d)) {
            if let Some(c) = visit(d, g, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in g.keys() {
        if let Some(cycle) = visit(m, &g, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn generic_modules_name_no_slice() {
    let g = graph();
    let slices = slices();
    for m in PENDING {
        let deps = g.get(*m).unwrap_or_else(|| panic!("module {m} not found"));
        assert!(
            slices.iter().any(|s| deps.contains(*s)),
            "{m} names no probe any more: remove it from PENDING"
        );
    }
    let generic = g
        .keys()
        .filter(|m| ![&slices[..], WIRING, PENDING].iter().any(|l| l.contains(&m.as_str())));
    for m in generic {
        let deps = &g[m];
        let named: Vec<&&str> = slices.iter().filter(|s| deps.contains(**s)).collect();
        assert!(named.is_empty(), "generic module {m} imports slices {named:?}");
    }
}

#[test]
fn the_checker_sees_imports() {
    let d = deps("use crate::{a::{b, c}, d, e::f};\nfn x() { crate::g::h(); }");
    assert_eq!(d, ["a", "d", "e", "g"].iter().map(|s| s.to_string()).collect());
}
