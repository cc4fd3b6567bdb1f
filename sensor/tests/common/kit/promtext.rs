//! The one reader of the Prometheus text format for tests and benches. Strict: a line that is
//! not a comment, blank, or `name{labels} value [timestamp]` with properly quoted and escaped
//! label values is an error, not a silently skipped series, and labels match by exact value
//! (a value holding `,`, `}`, `=` or spaces is read whole).

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The label's value, if the sample has it.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// True when every `(key, value)` of `want` is among the sample's labels.
    pub fn has(&self, want: &[(&str, &str)]) -> bool {
        want.iter().all(|(k, v)| self.label(k) == Some(v))
    }
}

/// Every sample of `text`, or the first malformed line with its number.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_line(line).map_err(|e| format!("line {}: {e}: {line}", i + 1))?);
    }
    Ok(out)
}

/// [`parse`], failing the caller (a test or bench) on malformed text.
pub fn samples(text: &str) -> Vec<Sample> {
    parse(text).unwrap_or_else(|e| panic!("malformed exposition: {e}"))
}

/// The value of the series `name` whose label set is exactly `labels` (any order).
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(text)
        .into_iter()
        .find(|s| s.name == name && s.labels.len() == labels.len() && s.has(labels))
        .map(|s| s.value)
}

/// The label set of a series of `cgroup` outside any container or pod (their labels empty),
/// after `first`: the shape of every per-workload series of a plain cgroup.
pub fn plain<'a>(first: &[(&'a str, &'a str)], cgroup: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut l = first.to_vec();
    l.push(("cgroup", cgroup));
    l.extend(["container_id", "pod_uid", "namespace", "pod", "container"].map(|n| (n, "")));
    l
}

/// The sum over the series of `name` that carry at least `labels`.
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(text)
        .iter()
        .filter(|s| s.name == name && s.has(labels))
        .map(|s| s.value)
        .sum()
}

/// Samples (series) in the text.
pub fn series_count(text: &str) -> usize {
    samples(text).len()
}

fn parse_line(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    let name_ok = !name.is_empty()
        && name
            .chars()
            .enumerate()
            .all(|(i, c)| c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit()));
    if !name_ok {
        return Err(format!("bad metric name '{name}'"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            rest = rest.trim_start_matches(' ');
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = rest.find('=').ok_or("label without '='")?;
            let key = rest[..eq].trim();
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("bad label name '{key}'"));
            }
            let (val, r) = quoted(rest[eq + 1..].trim_start()).ok_or("bad label value")?;
            labels.push((key.to_string(), val));
            rest = r.trim_start_matches(' ');
            if let Some(r) = rest.strip_prefix(',') {
                rest = r;
            } else if !rest.starts_with('}') {
                return Err("expected ',' or '}' after a label".into());
            }
        }
    }
    let mut fields = rest.split_whitespace();
    let v = fields.next().ok_or("no value")?;
    let value = match v {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|_| format!("bad value '{v}'"))?,
    };
    if let Some(ts) = fields.next() {
        ts.parse::<i64>().map_err(|_| format!("bad timestamp '{ts}'"))?;
    }
    if fields.next().is_some() {
        return Err("text after the timestamp".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// A `"..."` value with `\\`, `\"` and `\n` escapes; the unescaped value and the rest.
fn quoted(s: &str) -> Option<(String, &str)> {
    let body = s.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &body[i + 1..])),
            '\\' => match chars.next()?.1 {
                '\\' => out.push('\\'),
                '"' => out.push('"'),
                'n' => out.push('\n'),
                _ => return None,
            },
            c => out.push(c),
        }
    }
    None
}
