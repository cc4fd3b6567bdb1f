//! The text exposition of the families with a series per workload.
//!
//! `Registry::gather` builds a protobuf `MetricFamily` for every series (two `String`s per
//! label, eight labels per workload series) and the text encoder then walks them again; with
//! 1,000 workloads that is 25,000 protobuf messages per scrape. The map collectors
//! ([`Source`]) write their families into a [`Scrape`] as exposition text instead,
//! from pre-rendered label fragments; the scrape also carries what its writers share (a map
//! read once, label text rendered once per workload).

use std::{
    any::Any,
    collections::HashMap,
    fmt::Write as _,
    rc::Rc,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use crate::sync::Lock as _;

/// One family's text: `# HELP` and `# TYPE` once, then its samples.
pub struct Chunk {
    pub name: &'static str,
    pub header: String,
    pub body: String,
    /// Series written (lines of `body`).
    pub series: usize,
}

/// A part of the daemon whose families have a series per workload (or are read from kernel
/// maps at scrape): it writes them itself into the scrape as exposition text, with no
/// per-series protobuf (see the module doc). Its families are in no registry.
pub trait Source: Send + Sync {
    fn write(&self, scrape: &mut Scrape);
}

/// Every registered [`Source`], in the order they were added; cloned handles share them.
#[derive(Clone, Default)]
pub struct Sources(Arc<Mutex<Vec<Arc<dyn Source>>>>);

impl Sources {
    pub fn add(&self, s: Arc<dyn Source>) {
        self.0.locked().push(s);
    }

    /// Every source's families written into `scrape`.
    pub fn write(&self, scrape: &mut Scrape) {
        // Cloned out so a slow map read holds no lock another scrape needs.
        let all: Vec<Arc<dyn Source>> = self.0.locked().clone();
        for s in all {
            s.write(scrape);
        }
    }
}

/// Family bodies of the last scrape, cleared, by family name: the next scrape writes into the
/// same memory. The allocator hands freed memory back to the kernel at once (see `alloc`), so
/// fresh buffers of a few MiB were faulted in again page by page every scrape (with their
/// regrowth copies, a fifth of a scrape's CPU at 1,000 workloads, measured).
static BODIES: Mutex<Vec<(&'static str, String)>> = Mutex::new(Vec::new());

fn take_body(name: &'static str) -> String {
    let mut pool = BODIES.locked();
    match pool.iter().position(|(n, _)| *n == name) {
        Some(i) => pool.swap_remove(i).1,
        None => String::new(),
    }
}

/// Keeps the bodies of `chunks` (emptied, capacity kept) for the next scrape; one per family.
pub fn recycle(chunks: Vec<Chunk>) {
    let mut pool = BODIES.locked();
    for c in chunks {
        if !pool.iter().any(|(n, _)| *n == c.name) {
            let mut body = c.body;
            body.clear();
            pool.push((c.name, body));
        }
    }
}

/// Size of the last exposition, so the next one is written without regrowing its buffer.
static LAST_SIZE: AtomicUsize = AtomicUsize::new(0);

pub fn size_hint() -> usize {
    let last = LAST_SIZE.load(Ordering::Relaxed);
    last + last / 8
}

pub fn note_size(n: usize) {
    LAST_SIZE.store(n, Ordering::Relaxed);
}

/// A family's type, as `# TYPE` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Counter,
    Gauge,
    Histogram,
}

impl Type {
    pub fn as_str(self) -> &'static str {
        match self {
            Type::Counter => "counter",
            Type::Gauge => "gauge",
            Type::Histogram => "histogram",
        }
    }
}

/// One scrape: the families written so far, and values computed once for all its writers (a
/// map read once, label text rendered once per workload). Made by `metrics::render` for each
/// scrape and handed to every [`Source`].
#[derive(Default)]
pub struct Scrape {
    chunks: Vec<Chunk>,
    memo: HashMap<(usize, &'static str), Rc<dyn Any>>,
}

impl Scrape {
    pub fn new() -> Scrape {
        Scrape::default()
    }

    /// Opens family `name`; a family opened twice in one scrape goes on in the same chunk.
    pub fn family(&mut self, name: &'static str, help: &str, kind: Type) -> Family<'_> {
        let i = match self.chunks.iter().position(|c| c.name == name) {
            Some(i) => i,
            None => {
                let kind = kind.as_str();
                let mut header = String::with_capacity(help.len() + 2 * name.len() + 24);
                header.push_str("# HELP ");
                header.push_str(name);
                header.push(' ');
                escape_into(&mut header, help, false);
                header.push_str("\n# TYPE ");
                header.push_str(name);
                header.push(' ');
                header.push_str(kind);
                header.push('\n');
                self.chunks.push(Chunk {
                    name,
                    header,
                    body: take_body(name),
                    series: 0,
                });
                self.chunks.len() - 1
            }
        };
        Family {
            chunk: &mut self.chunks[i],
        }
    }

    /// A value computed once per scrape for `(owner, what)` (`owner`: the address of the
    /// object it belongs to).
    pub fn memo<T: 'static>(&mut self, owner: usize, what: &'static str, init: impl FnOnce() -> T) -> Rc<T> {
        let key = (owner, what);
        if let Some(v) = self.memo.get(&key).and_then(|v| Rc::clone(v).downcast::<T>().ok()) {
            return v;
        }
        let v = Rc::new(init());
        self.memo.insert(key, Rc::clone(&v) as Rc<dyn Any>);
        v
    }

    /// The families written, in the order they were opened.
    pub fn into_chunks(self) -> Vec<Chunk> {
        self.chunks
    }

    /// The scrape's text, families in the order they were opened (for tests).
    pub fn text(&self) -> String {
        self.chunks.iter().map(|c| format!("{}{}", c.header, c.body)).collect()
    }
}

/// One family's samples. Labels are given as pre-rendered fragments (`a="x",b="y"`, see
/// [`labels`]); empty fragments are skipped.
pub struct Family<'a> {
    chunk: &'a mut Chunk,
}

impl Family<'_> {
    fn start(&mut self, suffix: &str, frags: &[&str]) {
        let b = &mut self.chunk.body;
        b.push_str(self.chunk.name);
        b.push_str(suffix);
        let mut sep = '{';
        for f in frags.iter().filter(|f| !f.is_empty()) {
            b.push(sep);
            b.push_str(f);
            sep = ',';
        }
        if sep == ',' {
            b.push('}');
        }
        b.push(' ');
        self.chunk.series += 1;
    }

    /// A counter or gauge sample with an integer value.
    pub fn int(&mut self, frags: &[&str], v: u64) {
        self.start("", frags);
        push_u64(&mut self.chunk.body, v);
        self.chunk.body.push('\n');
    }

    /// A counter or gauge sample.
    pub fn float(&mut self, frags: &[&str], v: f64) {
        self.start("", frags);
        push_f64(&mut self.chunk.body, v);
        self.chunk.body.push('\n');
    }

    /// A histogram series: `cumulative[i]` is the count at or below `les[i]` (the `le` values,
    /// pre-rendered, `+Inf` not among them), `count` the `+Inf` bucket and `_count`.
    pub fn histogram(&mut self, frags: &[&str], les: &[String], cumulative: &[u64], count: u64, sum: f64) {
        for (le, c) in les.iter().zip(cumulative) {
            self.bucket(frags, le, *c);
        }
        self.bucket(frags, "+Inf", count);
        self.start("_sum", frags);
        push_f64(&mut self.chunk.body, sum);
        self.chunk.body.push('\n');
        self.start("_count", frags);
        push_u64(&mut self.chunk.body, count);
        self.chunk.body.push('\n');
        // `start` counted the three lines; the buckets counted themselves.
    }

    fn bucket(&mut self, frags: &[&str], le: &str, v: u64) {
        let b = &mut self.chunk.body;
        b.push_str(self.chunk.name);
        b.push_str("_bucket{");
        for f in frags.iter().filter(|f| !f.is_empty()) {
            b.push_str(f);
            b.push(',');
        }
        b.push_str("le=\"");
        b.push_str(le);
        b.push_str("\"} ");
        push_u64(b, v);
        b.push('\n');
        self.chunk.series += 1;
    }
}

fn push_u64(out: &mut String, v: u64) {
    let mut buf = itoa::Buffer::new();
    out.push_str(buf.format(v));
}

/// As the crate's encoder writes values (`f64`'s `Display`, `+Inf`, `-Inf`, `NaN`).
fn push_f64(out: &mut String, v: f64) {
    if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        // Integral values print without a fraction either way; itoa is faster.
        if v < 0.0 {
            out.push('-');
        }
        push_u64(out, v.abs() as u64);
    } else {
        let _ = write!(out, "{v}");
    }
}

/// Escapes a label value (`\\`, `\n`, `"`) or a HELP text (`\\`, `\n`).
pub fn escape_into(out: &mut String, v: &str, quote: bool) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// Renders `name="value"` pairs, comma-separated, values escaped: a fragment for [`Family`].
pub fn labels<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (i, (n, v)) in pairs.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(n);
        out.push_str("=\"");
        escape_into(&mut out, v, true);
        out.push('"');
    }
    out
}

/// `le` values as the crate's encoder prints them (`f64`'s `Display`).
pub fn le_values(bounds: impl IntoIterator<Item = f64>) -> Vec<String> {
    bounds.into_iter().map(|b| b.to_string()).collect()
}

/// The kit's strict reader of the text format, for the sources' unit tests.
#[cfg(test)]
#[allow(dead_code)]
#[path = "../tests/common/kit/promtext.rs"]
pub(crate) mod promtext;

/// For the sources' tests: `text` read strictly (see [`promtext`]), each family with one
/// `# HELP` and then one `# TYPE` before its samples, and every sample named as its family's
/// type allows (a histogram's `_bucket`, `_sum`, `_count`). Returns the samples.
#[cfg(test)]
pub(crate) fn valid(text: &str) -> Vec<promtext::Sample> {
    let samples = promtext::samples(text);
    let mut seen = std::collections::HashSet::new();
    let (mut help, mut family): (Option<&str>, Option<(&str, &str)>) = (None, None);
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default();
            assert!(seen.insert(name), "a second HELP for {name}:\n{text}");
            help = Some(name);
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert_eq!(help.take(), Some(name), "TYPE without its HELP:\n{text}");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            family = Some((name, kind));
        } else if !line.is_empty() {
            let (fam, kind) = family.unwrap_or_else(|| panic!("a sample before any TYPE: {line}"));
            let name = &line[..line.find(['{', ' ']).unwrap_or(line.len())];
            let suffix = name.strip_prefix(fam);
            let ok =
                suffix == Some("") || (kind == "histogram" && matches!(suffix, Some("_bucket" | "_sum" | "_count")));
            assert!(ok, "{name} is not a sample of {fam} ({kind})");
        }
    }
    samples
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_families_and_shares_memos() {
        let mut scrape = Scrape::new();
        let wl = labels([("cgroup", "/a\"b\\c\nd"), ("pod", "")]);
        let mut f = scrape.family("t_total", "Help with \\ and\nnewline.", Type::Counter);
        f.int(&["result=\"ok\"", &wl], 3);
        f.float(&[], 0.5);
        let mut h = scrape.family("t_seconds", "h", Type::Histogram);
        h.histogram(&[&wl], &le_values([0.001, 1.0]), &[1, 2], 3, 2.5);
        // A second writer appends to the same family.
        scrape.family("t_total", "ignored", Type::Counter).int(&[], 1);
        let n = scrape.memo(1, "x", || 41);
        assert_eq!(*scrape.memo(1, "x", || 0), *n);
        assert_eq!(*scrape.memo(2, "x", || 7), 7, "another owner's");
        let chunks = scrape.into_chunks();
        assert_eq!(chunks.len(), 2);
        let c = &chunks[0];
        assert_eq!(
            c.header,
            "# HELP t_total Help with \\\\ and\\nnewline.\n# TYPE t_total counter\n"
        );
        assert_eq!(
            c.body,
            "t_total{result=\"ok\",cgroup=\"/a\\\"b\\\\c\\nd\",pod=\"\"} 3\nt_total 0.5\nt_total 1\n"
        );
        assert_eq!(c.series, 3);
        let h = &chunks[1];
        assert_eq!(h.series, 5);
        assert!(h
            .body
            .starts_with("t_seconds_bucket{cgroup=\"/a\\\"b\\\\c\\nd\",pod=\"\",le=\"0.001\"} 1\n"));
        assert!(h.body.contains(",le=\"+Inf\"} 3\nt_seconds_sum{"));
        assert!(h.body.ends_with("pod=\"\"} 3\n"));
    }

    #[test]
    fn values_print_as_the_crate_encoder_prints_them() {
        for v in [0.0, 1.0, 3.0e9, 0.000131071, 2.5, 1e20, -4.0, 1e-9, 200.003002] {
            let mut s = String::new();
            push_f64(&mut s, v);
            assert_eq!(s, v.to_string(), "{v}");
        }
    }
}
