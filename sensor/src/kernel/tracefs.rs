//! Tracefs: find it (or mount it), and parse tracepoint format files so that kernel
//! programs read fields at this kernel's offsets instead of compiled-in constants.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error("tracefs is not mounted and mounting it at /sys/kernel/tracing failed: {0}")]
    Mount(String),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: no field lines in the format file")]
    Empty { path: PathBuf },
}

/// Where tracefs lives and whether we mounted it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Tracefs {
    pub root: PathBuf,
    pub mounted_by_sensor: bool,
}

const CANDIDATES: &[&str] = &["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

impl Tracefs {
    /// Uses an explicit root, else the first mounted candidate, else mounts one.
    pub fn locate(explicit: Option<&Path>) -> Result<Tracefs, TracefsError> {
        if let Some(p) = explicit {
            return Ok(Tracefs {
                root: p.to_path_buf(),
                mounted_by_sensor: false,
            });
        }
        for c in CANDIDATES {
            if Path::new(c).join("events").is_dir() {
                return Ok(Tracefs {
                    root: PathBuf::from(c),
                    mounted_by_sensor: false,
                });
            }
        }
        mount_tracefs("/sys/kernel/tracing")?;
        Ok(Tracefs {
            root: PathBuf::from("/sys/kernel/tracing"),
            mounted_by_sensor: true,
        })
    }

    pub fn has_event(&self, category: &str, name: &str) -> bool {
        self.root.join("events").join(category).join(name).is_dir()
    }

    pub fn format(&self, category: &str, name: &str) -> Result<TracepointFormat, TracefsError> {
        let path = self.root.join("events").join(category).join(name).join("format");
        let text = std::fs::read_to_string(&path).map_err(|source| TracefsError::Read {
            path: path.clone(),
            source,
        })?;
        let fmt = TracepointFormat::parse(&text);
        if fmt.fields.is_empty() {
            return Err(TracefsError::Empty { path });
        }
        Ok(fmt)
    }
}

fn mount_tracefs(target: &str) -> Result<(), TracefsError> {
    let c = |s: &str| std::ffi::CString::new(s).map_err(|e| TracefsError::Mount(e.to_string()));
    let (src, tgt, fstype) = (c("tracefs")?, c(target)?, c("tracefs")?);
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call;
    // data is null, which mount(2) accepts.
    let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(TracefsError::Mount(std::io::Error::last_os_error().to_string()));
    }
    Ok(())
}

/// One `field:` line of a format file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TpField {
    pub name: String,
    /// The C declaration without the name, e.g. `unsigned long`, `__data_loc char[]`.
    pub decl: String,
    pub offset: u16,
    pub size: u16,
    pub signed: bool,
}

impl TpField {
    pub fn is_data_loc(&self) -> bool {
        self.decl.starts_with("__data_loc")
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TracepointFormat {
    pub fields: Vec<TpField>,
}

impl TracepointFormat {
    /// Parses a format file; lines it does not understand are skipped, never fatal.
    pub fn parse(text: &str) -> TracepointFormat {
        let fields = text.lines().filter_map(parse_field_line).collect();
        TracepointFormat { fields }
    }

    pub fn field(&self, name: &str) -> Option<&TpField> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Offset of `name` if present with one of the accepted sizes, else `None`: a field whose
    /// size changed is treated as absent rather than read as garbage.
    pub fn offset_if(&self, name: &str, sizes: &[u16]) -> Option<u16> {
        self.field(name).filter(|f| sizes.contains(&f.size)).map(|f| f.offset)
    }
}

fn parse_field_line(line: &str) -> Option<TpField> {
    let line = line.trim();
    let rest = line.strip_prefix("field:")?;
    let mut parts = rest.split(';').map(str::trim);
    let decl_full = parts.next()?;
    let mut offset = None;
    let mut size = None;
    let mut signed = false;
    for p in parts {
        if let Some(v) = p.strip_prefix("offset:") {
            offset = v.trim().parse().ok();
        } else if let Some(v) = p.strip_prefix("size:") {
            size = v.trim().parse().ok();
        } else if let Some(v) = p.strip_prefix("signed:") {
            signed = v.trim() == "1";
        }
    }
    // The name is the last identifier once a trailing array suffix is removed:
    // `char comm[16]` and `__data_loc char[] comm` both name `comm`.
    let (base, suffix) = match decl_full.strip_suffix(']').and_then(|d| d.rfind('[')) {
        Some(i) => (&decl_full[..i], &decl_full[i..]),
        None => (decl_full, ""),
    };
    // After the last character that cannot be in an identifier, which may be several bytes
    // long: a byte index inside it would panic (found by the `tracefs_format` fuzz target).
    let name_start = base
        .char_indices()
        .rfind(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_'))
        .map_or(0, |(i, c)| i + c.len_utf8());
    let name = base[name_start..].to_string();
    if name.is_empty() {
        return None;
    }
    let mut decl = base[..name_start].trim().to_string();
    decl.push_str(&suffix.replace(|c: char| c.is_ascii_digit(), ""));
    Some(TpField {
        name,
        decl,
        offset: offset?,
        size: size?,
        signed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields every tracepoint's format starts with, as the kernel prints them.
    macro_rules! common_fields {
        () => {
            "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

"
        };
    }

    /// `oom:mark_victim` on 6.18 (this project's CI kernel).
    pub const MARK_VICTIM_6_18: &str = concat!(
        "name: mark_victim
ID: 609
format:
",
        common_fields!(),
        "\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;
\tfield:__data_loc char[] comm;\toffset:12;\tsize:4;\tsigned:0;
\tfield:unsigned long total_vm;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned long anon_rss;\toffset:24;\tsize:8;\tsigned:0;
\tfield:unsigned long file_rss;\toffset:32;\tsize:8;\tsigned:0;
\tfield:unsigned long shmem_rss;\toffset:40;\tsize:8;\tsigned:0;
\tfield:uid_t uid;\toffset:48;\tsize:4;\tsigned:0;
\tfield:unsigned long pgtables;\toffset:56;\tsize:8;\tsigned:0;
\tfield:short oom_score_adj;\toffset:64;\tsize:2;\tsigned:1;

print fmt: \"pid=%d comm=%s\", REC->pid, __get_str(comm)
"
    );

    /// `oom:mark_victim` before 6.8 had only the pid.
    pub const MARK_VICTIM_6_1: &str = concat!(
        "name: mark_victim
ID: 500
format:
",
        common_fields!(),
        "\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;

print fmt: \"pid=%d\", REC->pid
"
    );

    #[test]
    fn parses_6_18_mark_victim() {
        let f = TracepointFormat::parse(MARK_VICTIM_6_18);
        assert_eq!(f.fields.len(), 13);
        let comm = f.field("comm").unwrap();
        assert!(comm.is_data_loc());
        assert_eq!((comm.offset, comm.size), (12, 4));
        assert_eq!(f.offset_if("pgtables", &[8]), Some(56));
        assert_eq!(f.offset_if("oom_score_adj", &[2]), Some(64));
        assert!(f.field("oom_score_adj").unwrap().signed);
        // A size we do not expect makes the field absent.
        assert_eq!(f.offset_if("uid", &[8]), None);
    }

    #[test]
    fn parses_6_1_mark_victim() {
        let f = TracepointFormat::parse(MARK_VICTIM_6_1);
        assert_eq!(f.offset_if("pid", &[4]), Some(8));
        assert!(f.field("comm").is_none());
    }

    #[test]
    fn inline_array_and_garbage() {
        let f = TracepointFormat::parse(
            "\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\nfield:broken\nfield:int x; offset:zz; size:4;\n",
        );
        assert_eq!(f.fields.len(), 1);
        assert_eq!(f.fields[0].name, "comm");
        assert_eq!(f.fields[0].decl, "char[]");
        assert!(!f.fields[0].is_data_loc());
    }

    /// Fuzz regression (`tracefs_format`, crash-66044467): a multi-byte character right before
    /// the name panicked on a byte index inside it. Also a name that is only such a character.
    #[test]
    fn non_ascii_before_the_name_is_no_panic() {
        let crash = b"name: inct_sock_set_state\nID: 1500\nformat:\n\tfield:unsigned s: 1\xca\x87\nm500\nform/at:\n\tfield:u6nsigned sh'rt common_type;\toffset:0;\tsize:2;\tsie\nID: 1500\nformat:\n";
        let f = TracepointFormat::parse(&String::from_utf8_lossy(crash));
        let names: Vec<&str> = f.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["common_type"], "the one line with an offset and a size");
        let f = TracepointFormat::parse(
            "\tfield:unsigned \u{287}pid;\toffset:8;\tsize:4;\tsigned:1;\n\tfield:\u{e9};\toffset:0;\tsize:1;\n",
        );
        assert_eq!(f.fields.len(), 1);
        assert_eq!(
            (f.fields[0].name.as_str(), f.fields[0].decl.as_str()),
            ("pid", "unsigned \u{287}")
        );
    }
}
