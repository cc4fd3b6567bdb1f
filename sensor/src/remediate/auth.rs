//! Who may drive the runner. Off loopback, a runner that acts (`dry_run: false`) starts only
//! when requests are authenticated in one of the ways Alertmanager's webhook `http_config` can
//! send: basic auth (`basic_auth_users` of the web config), a bearer token (`bearer_token_file`)
//! or a TLS client certificate verified against `client_ca_file`
//! (`client_auth_type: RequireAndVerifyClientCert`), unless `insecure_allow_unauthenticated`
//! says something in front of it authenticates. Refused requests get 401, are counted in
//! `sensor_remediation_webhooks_total{result="unauthorized"}` and logged without their body.

use std::net::SocketAddr;

pub use crate::gate::{Gate, Token, TokenError};
use crate::webconfig::Web;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Token(#[from] TokenError),
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
}
