//! Direct text exposition for the families with a series per workload.
//!
//! `Registry::gather` builds a protobuf `MetricFamily` for every series (two `String`s per
//! label, eight labels per workload series) and the text encoder then walks them again; with
//! 1,000 workloads that is 25,000 protobuf messages per scrape. During [`capture`] (called by
//! `metrics::render` around the gather), a collector that supports it writes its families here
//! as exposition text instead, from pre-rendered label fragments, and returns no protobuf
//! families; outside a capture (the web view's summary, tests) it builds them as before.
//! Everything lives in a thread-local for the one call: `gather` runs every collector on the
//! calling thread.

use std::{
    any::Any,
    cell::RefCell,
    collections::HashMap,
    fmt::Write as _,
    rc::Rc,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
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

#[derive(Default)]
struct Capture {
    chunks: Vec<Chunk>,
    /// Values shared by the collectors of one scrape (a map read once, label text rendered once).
    memo: HashMap<(usize, &'static str), Rc<dyn Any>>,
}

thread_local! {
    static CAPTURE: RefCell<Option<Capture>> = const { RefCell::new(None) };
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

/// Runs `f` (the registry's gather) with direct writers enabled; returns its result and the
/// families written as text.
pub fn capture<T>(f: impl FnOnce() -> T) -> (T, Vec<Chunk>) {
    let outer = CAPTURE.with(|c| c.borrow_mut().replace(Capture::default()));
    // A collector that panics must not leave the thread capturing.
    struct Restore(Option<Option<Capture>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(outer) = self.0.take() {
                CAPTURE.with(|c| *c.borrow_mut() = outer);
            }
        }
    }
    let mut restore = Restore(Some(outer));
    let out = f();
    let mine = CAPTURE.with(|c| c.borrow_mut().take());
    if let Some(outer) = restore.0.take() {
        CAPTURE.with(|c| *c.borrow_mut() = outer);
    }
    (out, mine.map(|c| c.chunks).unwrap_or_default())
}

/// Whether a capture is under way on this thread.
pub fn capturing() -> bool {
    CAPTURE.with(|c| c.borrow().is_some())
}

/// Lets `f` write families when a capture is under way; `false` (and `f` not called) when not.
pub fn write(f: impl FnOnce(&mut Writer)) -> bool {
    let Some(mut cap) = CAPTURE.with(|c| c.borrow_mut().take()) else {
        return false;
    };
    let mut w = Writer {
        chunks: std::mem::take(&mut cap.chunks),
    };
    // Put the memo back first: `f` may use it.
    CAPTURE.with(|c| *c.borrow_mut() = Some(cap));
    f(&mut w);
    CAPTURE.with(|c| {
        if let Some(cap) = c.borrow_mut().as_mut() {
            let mut chunks = w.chunks;
            chunks.append(&mut cap.chunks);
            cap.chunks = chunks;
        }
    });
    true
}

/// A value computed once per capture for `(owner, what)` (`owner`: the address of the object
/// it belongs to); `None` outside a capture, where the caller computes it itself.
pub fn memo<T: 'static>(owner: usize, what: &'static str, init: impl FnOnce() -> T) -> Option<Rc<T>> {
    let found = CAPTURE.with(|c| c.borrow().as_ref().map(|cap| cap.memo.get(&(owner, what)).cloned()))?;
    if let Some(v) = found.and_then(|v| v.downcast::<T>().ok()) {
        return Some(v);
    }
    // Computed outside the borrow: `init` may itself use memos.
    let v = Rc::new(init());
    CAPTURE.with(|c| {
        if let Some(cap) = c.borrow_mut().as_mut() {
            cap.memo.insert((owner, what), Rc::clone(&v) as Rc<dyn Any>);
        }
    });
    Some(v)
}

/// Writes families into the capture.
pub struct Writer {
    chunks: Vec<Chunk>,
}

impl Writer {
    /// Opens family `name` (`kind`: counter, gauge or histogram); a family opened twice in one
    /// capture goes on in the same chunk.
    pub fn family(&mut self, name: &'static str, help: &str, kind: &str) -> Family<'_> {
        let i = match self.chunks.iter().position(|c| c.name == name) {
            Some(i) => i,
            None => {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_families_only_inside_a_capture() {
        assert!(!write(|_| panic!("not capturing")));
        let ((), chunks) = capture(|| {
            assert!(capturing());
            assert!(write(|w| {
                let wl = labels([("cgroup", "/a\"b\\c\nd"), ("pod", "")]);
                let mut f = w.family("t_total", "Help with \\ and\nnewline.", "counter");
                f.int(&["result=\"ok\"", &wl], 3);
                f.float(&[], 0.5);
                let mut h = w.family("t_seconds", "h", "histogram");
                h.histogram(&[&wl], &le_values([0.001, 1.0]), &[1, 2], 3, 2.5);
            }));
            // A second writer appends to the same family.
            assert!(write(|w| w.family("t_total", "ignored", "counter").int(&[], 1)));
            let n = memo(1, "x", || 41).unwrap();
            assert_eq!(*memo(1, "x", || 0).unwrap(), *n);
        });
        assert!(!capturing());
        assert!(memo(1, "x", || 0).is_none());
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
