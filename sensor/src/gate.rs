//! Who may call an HTTP server of the sensor's (`sensor run`'s endpoints, `sensor remediate`'s
//! runner): one check of the `Authorization` header for both, basic auth from the
//! exporter-toolkit web config and, where configured, a bearer token. TLS client certificates
//! are checked earlier, in the handshake (`webconfig`). A refused request gets 401, is counted
//! where the server exports a counter, and is logged without its body.

use std::{path::Path, path::PathBuf, sync::Arc};

use axum::{
    extract::{Request, State},
    http::{header, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use prometheus::IntCounter;
use subtle::ConstantTimeEq as _;

use crate::webconfig::Web;

/// The client's address, in every request's extensions (the server puts it there; refused
/// requests are logged with it).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub std::net::SocketAddr);

/// Shortest bearer token accepted: shorter ones are guessable (`openssl rand -hex 32` makes 64
/// characters).
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("bearer_token_file {path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("bearer_token_file {path}: the token has {len} characters, at least {MIN_TOKEN_LEN} are needed (make one with `openssl rand -hex 32`)")]
    Short { path: PathBuf, len: usize },
}

/// The bearer token, kept only as its SHA-256: presented tokens are hashed and compared in
/// constant time, so neither the time taken nor the length tells an attacker anything.
pub struct Token {
    digest: [u8; 32],
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, b);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl Token {
    /// Reads the token from `path`; surrounding white space (the file's newline) is not part
    /// of it, as Alertmanager's `credentials_file` reads it.
    pub fn load(path: &Path) -> Result<Token, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Token::new(text.trim()).map_err(|len| TokenError::Short {
            path: path.to_path_buf(),
            len,
        })
    }

    /// The token itself; `Err(length)` when it is too short.
    pub fn new(token: &str) -> Result<Token, usize> {
        let len = token.chars().count();
        if len < MIN_TOKEN_LEN {
            return Err(len);
        }
        Ok(Token {
            digest: sha256(token.as_bytes()),
        })
    }

    /// True for `Bearer <the token>`.
    pub fn check(&self, header: &str) -> bool {
        let Some(presented) = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
        else {
            return false;
        };
        sha256(presented.trim().as_bytes())[..].ct_eq(&self.digest[..]).into()
    }
}

/// The `Authorization` check in front of every route.
pub struct Gate {
    web: Option<Arc<Web>>,
    bearer: Option<Token>,
    /// Refused requests, where the server exports them.
    unauthorized: Option<IntCounter>,
    /// The realm of the challenge: `sensor`, `sensor remediate`.
    realm: &'static str,
}

impl Gate {
    /// `None` when no header credentials are configured (client certificates are checked in the
    /// TLS handshake, before any request).
    pub fn new(
        web: Option<Arc<Web>>,
        bearer: Option<Token>,
        unauthorized: Option<IntCounter>,
        realm: &'static str,
    ) -> Option<Arc<Gate>> {
        let basic = web.as_ref().and_then(|w| w.wants_auth().then(|| Arc::clone(w)));
        if basic.is_none() && bearer.is_none() {
            return None;
        }
        Some(Arc::new(Gate {
            web: basic,
            bearer,
            unauthorized,
            realm,
        }))
    }

    /// `Ok` when the header carries valid credentials, else why not (for the log).
    fn check(&self, header: Option<&str>) -> Result<(), &'static str> {
        let Some(h) = header else {
            return Err("no credentials");
        };
        let scheme = h.split_whitespace().next().unwrap_or_default().to_ascii_lowercase();
        match (scheme.as_str(), &self.web, &self.bearer) {
            ("basic", Some(w), _) => w.check(Some(h)).then_some(()).ok_or("wrong user or password"),
            ("bearer", _, Some(t)) => t.check(h).then_some(()).ok_or("wrong bearer token"),
            _ => Err("an authorization scheme this server does not accept"),
        }
    }

    fn challenge(&self) -> String {
        let scheme = if self.web.is_some() { "Basic" } else { "Bearer" };
        format!("{scheme} realm=\"{}\"", self.realm)
    }
}

/// Axum middleware: 401 unless the request carries credentials the [`Gate`] accepts. The body
/// is never read (nor logged) for a refused request.
pub async fn require(State(gate): State<Arc<Gate>>, req: Request, next: Next) -> Response {
    let header = authorization(&req);
    let g = Arc::clone(&gate);
    // bcrypt takes tens of milliseconds: off the async workers.
    let verdict = tokio::task::spawn_blocking(move || g.check(header.as_deref()))
        .await
        .unwrap_or(Err("the credential check failed"));
    match verdict {
        Ok(()) => next.run(req).await,
        Err(why) => {
            if let Some(c) = &gate.unauthorized {
                c.inc();
            }
            let peer = req.extensions().get::<Peer>().map(|p| p.0.to_string());
            tracing::warn!(
                method = %req.method(),
                path = req.uri().path(),
                peer = peer.as_deref().unwrap_or("unknown"),
                reason = why,
                "request refused: unauthorized"
            );
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, gate.challenge())],
                "unauthorized\n",
            )
                .into_response()
        }
    }
}

/// The request's `Authorization` header, owned (to move into a blocking check).
fn authorization(req: &Request) -> Option<String> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_checked_whole_and_must_be_long() {
        let t = Token::new("0123456789abcdef0123").unwrap();
        assert!(t.check("Bearer 0123456789abcdef0123"));
        assert!(t.check("bearer 0123456789abcdef0123"));
        assert!(!t.check("Bearer 0123456789abcdef012"), "a prefix is not the token");
        assert!(!t.check("Bearer 0123456789abcdef01234"));
        assert!(!t.check("Basic 0123456789abcdef0123"));
        assert!(!t.check("0123456789abcdef0123"));
        assert_eq!(Token::new("short").err(), Some(5));
    }

    #[test]
    fn token_file_is_trimmed_like_alertmanagers_credentials_file() {
        let dir = std::env::temp_dir().join(format!("sensor-auth-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("token");
        std::fs::write(&p, "  0123456789abcdef0123\n").unwrap();
        assert!(Token::load(&p).unwrap().check("Bearer 0123456789abcdef0123"));
        std::fs::write(&p, "abc\n").unwrap();
        let e = Token::load(&p).err().unwrap().to_string();
        assert!(e.contains("the token has 3 characters, at least 16"), "{e}");
        let e = Token::load(&dir.join("absent")).err().unwrap().to_string();
        assert!(e.contains("cannot read"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn gate_accepts_only_the_configured_schemes() {
        let c = IntCounter::new("x", "x").unwrap();
        assert!(Gate::new(None, None, Some(c.clone()), "sensor remediate").is_none());
        let g = Gate::new(
            None,
            Some(Token::new("0123456789abcdef0123").unwrap()),
            Some(c),
            "sensor remediate",
        )
        .unwrap();
        assert_eq!(g.check(Some("Bearer 0123456789abcdef0123")), Ok(()));
        assert_eq!(g.check(None), Err("no credentials"));
        assert_eq!(g.check(Some("Bearer nope-nope-nope-nope")), Err("wrong bearer token"));
        assert_eq!(
            g.check(Some("Basic YWxpY2U6cHc=")),
            Err("an authorization scheme this server does not accept")
        );
        assert_eq!(g.challenge(), "Bearer realm=\"sensor remediate\"");
    }
}
