//! The page's files, embedded in the binary and served with an ETag. Assets are named with
//! their content hash in the page (`/assets/app.js?v=<etag>`), so browsers may keep them for a
//! year; the page itself is revalidated on each load (a 304 when unchanged).

use std::{hash::Hasher as _, sync::OnceLock};

use axum::{
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};

pub struct Asset {
    pub name: &'static str,
    pub content_type: &'static str,
    pub body: &'static [u8],
    /// Revalidate on each load (the page) or keep (hash-named assets).
    pub immutable: bool,
}

const HTML: &str = include_str!("assets/index.html");

pub const PAGE: &Asset = &Asset {
    name: "index.html",
    content_type: "text/html; charset=utf-8",
    body: HTML.as_bytes(),
    immutable: false,
};

const FILES: &[Asset] = &[
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("assets/app.js"),
        immutable: true,
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("assets/app.css"),
        immutable: true,
    },
];

/// Only the daemon itself: the page never loads anything from elsewhere, and the browser
/// enforces it.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub fn find(name: &str) -> Option<&'static Asset> {
    FILES.iter().find(|a| a.name == name)
}

fn hash(body: &[u8]) -> String {
    // FNV-1a: stable across builds and platforms (std's hasher is not promised to be).
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    h.write(body);
    format!("{:016x}", h.finish())
}

struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The page with each asset reference carrying its content hash, and the page's own ETag.
fn page() -> &'static (String, String) {
    static PAGE_BODY: OnceLock<(String, String)> = OnceLock::new();
    PAGE_BODY.get_or_init(|| {
        let mut html = HTML.to_string();
        for a in FILES {
            let plain = format!("/assets/{}\"", a.name);
            let versioned = format!("/assets/{}?v={}\"", a.name, hash(a.body));
            html = html.replace(&plain, &versioned);
        }
        let etag = format!("\"{}\"", hash(html.as_bytes()));
        (html, etag)
    })
}

fn etag(a: &Asset) -> String {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| FILES.iter().map(|f| format!("\"{}\"", hash(f.body))).collect());
    FILES
        .iter()
        .position(|f| f.name == a.name)
        .and_then(|i| tags.get(i).cloned())
        .unwrap_or_else(|| page().1.clone())
}

/// Serves an asset, or 304 when the browser already has this version.
pub fn serve(headers: &HeaderMap, a: &'static Asset) -> Response {
    let (body, tag): (Vec<u8>, String) = if a.immutable {
        (a.body.to_vec(), etag(a))
    } else {
        let (html, tag) = page();
        (html.clone().into_bytes(), tag.clone())
    };
    let cache = if a.immutable {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let tag = HeaderValue::from_str(&tag).unwrap_or_else(|_| HeaderValue::from_static("\"0\""));
    let common = [
        (header::ETAG, tag),
        (header::CACHE_CONTROL, HeaderValue::from_static(cache)),
        (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP)),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
    ];
    if matches {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (
        common,
        [(header::CONTENT_TYPE, HeaderValue::from_static(a.content_type))],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_references_versioned_assets_that_exist() {
        let (html, tag) = page();
        for a in FILES {
            let want = format!("/assets/{}?v={}\"", a.name, hash(a.body));
            assert!(html.contains(&want), "page lacks {want}");
        }
        assert!(tag.starts_with('"') && tag.len() == 18, "{tag}");
        // Nothing from elsewhere.
        // (The SVG namespace is a name, not a request.)
        let strip = |t: &str| t.replace("http://www.w3.org/2000/svg", "");
        for bad in ["http://", "https://", "//cdn"] {
            assert!(!strip(html).contains(bad), "page references {bad}");
            for a in FILES {
                let text = strip(&String::from_utf8_lossy(a.body));
                assert!(!text.contains(bad), "{} references {bad}", a.name);
            }
        }
    }

    #[test]
    fn unchanged_assets_answer_304() {
        let Some(js) = find("app.js") else {
            panic!("app.js missing")
        };
        let r = serve(&HeaderMap::new(), js);
        assert_eq!(r.status(), StatusCode::OK);
        let tag = r.headers()[header::ETAG].clone();
        let mut h = HeaderMap::new();
        h.insert(header::IF_NONE_MATCH, tag);
        assert_eq!(serve(&h, js).status(), StatusCode::NOT_MODIFIED);
    }
}
