//! tracefs `format` files: any text parses (unknown lines skipped), and every field it returns
//! is one the text declares.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensor::kernel::tracefs::TracepointFormat;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let fmt = TracepointFormat::parse(text);
    let fields = text.lines().filter(|l| l.trim().starts_with("field:")).count();
    assert!(fmt.fields.len() <= fields);
    for f in &fmt.fields {
        assert!(!f.name.is_empty());
        assert!(
            f.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "{:?}",
            f.name
        );
        assert!(text.contains(f.name.as_str()));
        // The first field of that name is the one found.
        let first = fmt.field(&f.name).expect("a parsed field is found by name");
        assert_eq!(fmt.offset_if(&f.name, &[first.size]), Some(first.offset));
    }
});
