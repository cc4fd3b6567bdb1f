//! `--web.config.file` text and `Authorization: Basic` headers: errors, never panics; an
//! accepted file has only bcrypt hashes; an encoded pair decodes back.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sensor::webconfig::{base64_encode, decode_basic, WebConfigFile};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let file = Path::new("web.yml");
    match WebConfigFile::parse(text, file) {
        Ok(cfg) => {
            for hash in cfg.basic_auth_users.values() {
                assert!(hash.parse::<bcrypt::HashParts>().is_ok(), "{hash:?}");
            }
        }
        Err(e) => {
            let e = e.to_string();
            assert!(e.starts_with("web config web.yml: "), "{e}");
        }
    }
    // The same text as a header value.
    if let Some((user, pass)) = decode_basic(text) {
        assert!(!user.contains(':'));
        let header = format!("Basic {}", base64_encode(format!("{user}:{pass}").as_bytes()));
        assert_eq!(decode_basic(&header), Some((user, pass)));
    }
    if let Some((user, pass)) = text.split_once(':') {
        if !user.contains(':') {
            let header = format!("Basic {}", base64_encode(text.as_bytes()));
            assert_eq!(decode_basic(&header), Some((user.to_string(), pass.to_string())));
        }
    }
});
