//! Who may drive the runner. Off loopback, a runner that acts (`dry_run: false`) starts only
//! when requests are authenticated in one of the ways Alertmanager's webhook `http_config` can
//! send: basic auth (`basic_auth_users` of the web config), a bearer token (`bearer_token_file`)
//! or a TLS client certificate verified against `client_ca_file`
//! (`client_auth_type: RequireAndVerifyClientCert`), unless `insecure_allow_unauthenticated`
//! says something in front of it authenticates. Refused requests get 401, are counted in
//! `sensor_remediation_webhooks_total{result="unauthorized"}` and logged without their body.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use axum::{
    extract::{Request, State},
    http::{header, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use prometheus::IntCounter;
use subtle::ConstantTimeEq as _;

use crate::webconfig::Web;

/// Shortest bearer token accepted: shorter ones are guessable (`openssl rand -hex 32` makes 64
/// characters).
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("bearer_token_file {path}: cannot read: {source}")]
    ReadToken { path: PathBuf, source: std::io::Error },
    #[error("bearer_token_file {path}: the token has {len} characters, at least {MIN_TOKEN_LEN} are needed (make one with `openssl rand -hex 32`)")]
    ShortToken { path: PathBuf, len: usize },
    #[error("refusing to start: listen {listen} is reachable from other hosts and dry_run is false, but requests are not authenticated: set basic_auth_users, or tls_server_config with client_auth_type: RequireAndVerifyClientCert and client_ca_file, in web_config_file, or bearer_token_file (or insecure_allow_unauthenticated: true when a proxy in front authenticates)")]
    Unauthenticated { listen: SocketAddr },
}

/// A way requests are authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    BasicAuth,
    BearerToken,
    ClientCert,
}

impl Method {
    pub fn label(self) -> &'static str {
        match self {
            Method::BasicAuth => "basic_auth",
            Method::BearerToken => "bearer_token",
            Method::ClientCert => "client_certificate",
        }
    }
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
    pub fn load(path: &Path) -> Result<Token, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::ReadToken {
            path: path.to_path_buf(),
            source,
        })?;
        Token::new(text.trim()).map_err(|len| AuthError::ShortToken {
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

/// How the runner is protected, as decided at start (see [`exposure`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Posture {
    /// Every request authenticated by these methods (TLS client certificates in the handshake,
    /// the others by the `Authorization` header).
    Authenticated(Vec<Method>),
    /// Unauthenticated, but only processes on this host can connect.
    Loopback,
    /// Unauthenticated and reachable, but nothing runs (`dry_run`).
    DryRun,
    /// Unauthenticated and acting: the operator says a proxy in front authenticates.
    OptedOut,
}

/// The methods configured: those of the web config and the bearer token.
pub fn methods(web: Option<&Web>, bearer: bool) -> Vec<Method> {
    let mut m = Vec::new();
    if web.is_some_and(Web::wants_auth) {
        m.push(Method::BasicAuth);
    }
    if bearer {
        m.push(Method::BearerToken);
    }
    if web.is_some_and(Web::requires_client_cert) {
        m.push(Method::ClientCert);
    }
    m
}

/// True for addresses only this host reaches (127.0.0.0/8, ::1, ::ffff:127.x).
pub fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// Whether the runner may start: off loopback, acting, unauthenticated and not opted out it
/// may not.
pub fn exposure(listen: SocketAddr, dry_run: bool, methods: &[Method], opt_out: bool) -> Result<Posture, AuthError> {
    if !methods.is_empty() {
        Ok(Posture::Authenticated(methods.to_vec()))
    } else if is_loopback(listen) {
        Ok(Posture::Loopback)
    } else if dry_run {
        Ok(Posture::DryRun)
    } else if opt_out {
        Ok(Posture::OptedOut)
    } else {
        Err(AuthError::Unauthenticated { listen })
    }
}

impl Posture {
    /// One line at start saying who can drive the runner.
    pub fn log(&self, listen: SocketAddr, tls: bool) {
        match self {
            Posture::Authenticated(m) => {
                let names: Vec<&str> = m.iter().map(|m| m.label()).collect();
                let header_auth = m.iter().any(|m| *m != Method::ClientCert);
                if header_auth && !tls && !is_loopback(listen) {
                    tracing::warn!(%listen, auth = %names.join("+"), "requests are authenticated, but without TLS (tls_server_config) the credentials cross the network in clear text");
                } else {
                    tracing::info!(%listen, auth = %names.join("+"), "requests are authenticated");
                }
            }
            Posture::Loopback => {
                tracing::info!(%listen, "requests are not authenticated: only processes on this host can connect")
            }
            Posture::DryRun => tracing::warn!(
                %listen,
                "requests are not authenticated and the runner is reachable from other hosts: anyone can fill the audit and use up cooldowns and limits; nothing runs (dry_run), but configure authentication before switching dry_run off"
            ),
            Posture::OptedOut => tracing::warn!(
                %listen,
                "INSECURE: requests are not authenticated, the runner is reachable from other hosts and runs actions (insecure_allow_unauthenticated: true): whatever reaches this port runs them unless a proxy in front authenticates"
            ),
        }
    }
}

/// The `Authorization` check in front of every route.
pub struct Gate {
    web: Option<Arc<Web>>,
    bearer: Option<Token>,
    unauthorized: IntCounter,
}

impl Gate {
    /// `None` when no header credentials are configured (client certificates are checked in the
    /// TLS handshake, before any request).
    pub fn new(web: Option<Arc<Web>>, bearer: Option<Token>, unauthorized: IntCounter) -> Option<Arc<Gate>> {
        let basic = web.as_ref().and_then(|w| w.wants_auth().then(|| Arc::clone(w)));
        if basic.is_none() && bearer.is_none() {
            return None;
        }
        Some(Arc::new(Gate {
            web: basic,
            bearer,
            unauthorized,
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
            _ => Err("an authorization scheme this runner does not accept"),
        }
    }

    fn challenge(&self) -> &'static str {
        if self.web.is_some() {
            "Basic realm=\"sensor remediate\""
        } else {
            "Bearer realm=\"sensor remediate\""
        }
    }
}

/// Axum middleware: 401 unless the request carries credentials the [`Gate`] accepts. The body
/// is never read (nor logged) for a refused request.
pub async fn require(State(gate): State<Arc<Gate>>, req: Request, next: Next) -> Response {
    let header = crate::webconfig::authorization(&req);
    let g = Arc::clone(&gate);
    // bcrypt takes tens of milliseconds: off the async workers.
    let verdict = tokio::task::spawn_blocking(move || g.check(header.as_deref()))
        .await
        .unwrap_or(Err("the credential check failed"));
    match verdict {
        Ok(()) => next.run(req).await,
        Err(why) => {
            gate.unauthorized.inc();
            let peer = req.extensions().get::<crate::http::Peer>().map(|p| p.0.to_string());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn acting_off_loopback_needs_authentication_or_the_opt_out() {
        let open = addr("0.0.0.0:9449");
        let e = exposure(open, false, &[], false).unwrap_err().to_string();
        assert!(
            e.starts_with("refusing to start: listen 0.0.0.0:9449 is reachable from other hosts and dry_run is false"),
            "{e}"
        );
        assert!(
            e.contains("basic_auth_users")
                && e.contains("RequireAndVerifyClientCert")
                && e.contains("bearer_token_file"),
            "{e}"
        );
        assert_eq!(exposure(open, false, &[], true).unwrap(), Posture::OptedOut);
        assert_eq!(exposure(open, true, &[], false).unwrap(), Posture::DryRun);
        assert_eq!(
            exposure(open, false, &[Method::BearerToken], false).unwrap(),
            Posture::Authenticated(vec![Method::BearerToken])
        );
        for local in ["127.0.0.1:9443", "127.3.2.1:1", "[::1]:9443", "[::ffff:127.0.0.1]:9443"] {
            assert_eq!(
                exposure(addr(local), false, &[], false).unwrap(),
                Posture::Loopback,
                "{local}"
            );
        }
        for exposed in ["[::]:9443", "10.1.2.3:9443", "[::ffff:10.0.0.1]:9443"] {
            assert!(exposure(addr(exposed), false, &[], false).is_err(), "{exposed}");
        }
    }

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
        assert!(Gate::new(None, None, c.clone()).is_none());
        let g = Gate::new(None, Some(Token::new("0123456789abcdef0123").unwrap()), c).unwrap();
        assert_eq!(g.check(Some("Bearer 0123456789abcdef0123")), Ok(()));
        assert_eq!(g.check(None), Err("no credentials"));
        assert_eq!(g.check(Some("Bearer nope-nope-nope-nope")), Err("wrong bearer token"));
        assert_eq!(
            g.check(Some("Basic YWxpY2U6cHc=")),
            Err("an authorization scheme this runner does not accept")
        );
        assert_eq!(g.challenge(), "Bearer realm=\"sensor remediate\"");
    }
}
