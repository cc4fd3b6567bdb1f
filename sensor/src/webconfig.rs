//! `--web.config.file`: TLS and basic auth for the daemon's HTTP endpoints, in the file format of
//! Prometheus exporter-toolkit, so the file that protects node_exporter protects the sensor too.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};
use serde::Deserialize;

use crate::{
    sync::Lock as _,
    yaml::{ConfigError, Named},
};

/// The subset of exporter-toolkit's web configuration the sensor implements; any other key is
/// an error naming it rather than a setting silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebConfigFile {
    #[serde(default)]
    pub tls_server_config: Option<TlsServerConfig>,
    /// User name -> bcrypt hash of the password.
    #[serde(default)]
    pub basic_auth_users: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsServerConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    #[serde(default)]
    pub client_auth_type: ClientAuth,
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// `TLS12` (default) or `TLS13`.
    #[serde(default)]
    pub min_version: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum ClientAuth {
    #[default]
    NoClientCert,
    VerifyClientCertIfGiven,
    RequireAndVerifyClientCert,
}

impl WebConfigFile {
    /// Parses the file's text and checks what needs no file system (the TLS files are read by
    /// [`Web::load`]); `file` names it in errors.
    pub fn parse(text: &str, file: &Path) -> Result<WebConfigFile, ConfigError> {
        // An empty file is a valid "no TLS, no auth".
        let cfg: WebConfigFile = crate::yaml::parse(text).map_err(|f| match f {
            crate::yaml::Fault::Syntax(reason) => err(file, "", reason),
            crate::yaml::Fault::Key { key, reason } => err(file, &key, reason),
        })?;
        for (user, hash) in &cfg.basic_auth_users {
            if hash.parse::<bcrypt::HashParts>().is_err() {
                return Err(err(
                    file,
                    &format!("basic_auth_users.{user}"),
                    "is not a bcrypt hash (make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)",
                ));
            }
        }
        Ok(cfg)
    }
}

/// The loaded configuration: a TLS acceptor and/or the users allowed in.
pub struct Web {
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// What the TLS handshake asks of clients (`NoClientCert` without TLS).
    pub client_auth: ClientAuth,
    users: BTreeMap<String, String>,
    /// Credentials already verified: bcrypt is deliberately slow, scrapes come every few
    /// seconds. Only successes are cached, so wrong guesses always pay the full cost.
    verified: Mutex<HashSet<(String, String)>>,
}

/// The kind of file in its errors.
const WHAT: &str = "web config";

fn err(file: &Path, key: &str, reason: impl std::fmt::Display) -> ConfigError {
    let file = file.display().to_string();
    let named = Named {
        what: WHAT,
        file: &file,
    };
    if key.is_empty() {
        named.syntax(reason.to_string())
    } else {
        named.key(key, reason.to_string())
    }
}

impl Web {
    pub fn load(file: &Path) -> Result<Arc<Web>, ConfigError> {
        let text = crate::yaml::read(WHAT, file)?;
        let cfg = WebConfigFile::parse(&text, file)?;
        let tls = cfg.tls_server_config.as_ref().map(|t| acceptor(file, t)).transpose()?;
        let client_auth = cfg
            .tls_server_config
            .as_ref()
            .map_or(ClientAuth::NoClientCert, |t| t.client_auth_type);
        Ok(Arc::new(Web {
            tls,
            client_auth,
            users: cfg.basic_auth_users,
            verified: Mutex::new(HashSet::new()),
        }))
    }

    pub fn wants_auth(&self) -> bool {
        !self.users.is_empty()
    }

    /// True when no client gets past the TLS handshake without a certificate signed by
    /// `client_ca_file` (`RequireAndVerifyClientCert`).
    pub fn requires_client_cert(&self) -> bool {
        self.tls.is_some() && self.client_auth == ClientAuth::RequireAndVerifyClientCert
    }

    /// Checks an `Authorization: Basic ...` header value (bcrypt: call it off the async
    /// workers).
    pub fn check(&self, header: Option<&str>) -> bool {
        let Some((user, pass)) = header.and_then(decode_basic) else {
            return false;
        };
        let Some(hash) = self.users.get(&user) else {
            return false;
        };
        let key = (user, pass);
        if self.verified.locked().contains(&key) {
            return true;
        }
        let ok = bcrypt::verify(&key.1, hash).unwrap_or(false);
        if ok {
            let mut v = self.verified.locked();
            if v.len() >= 64 {
                v.clear();
            }
            v.insert(key);
        }
        ok
    }
}

fn acceptor(file: &Path, t: &TlsServerConfig) -> Result<tokio_rustls::TlsAcceptor, ConfigError> {
    let key_name = "tls_server_config";
    let certs = CertificateDer::pem_file_iter(&t.cert_file)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            err(
                file,
                &format!("{key_name}.cert_file"),
                format!("{}: {e}", t.cert_file.display()),
            )
        })?;
    let key = PrivateKeyDer::from_pem_file(&t.key_file).map_err(|e| {
        err(
            file,
            &format!("{key_name}.key_file"),
            format!("{}: {e}", t.key_file.display()),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = match t.min_version.as_deref() {
        None | Some("TLS12") => &[&rustls::version::TLS13, &rustls::version::TLS12],
        Some("TLS13") => &[&rustls::version::TLS13],
        Some(v) => {
            return Err(err(
                file,
                &format!("{key_name}.min_version"),
                format!("'{v}': use TLS12 or TLS13"),
            ))
        }
    };
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .map_err(|e| err(file, key_name, e))?;
    let builder = if t.client_auth_type == ClientAuth::NoClientCert {
        builder.with_no_client_auth()
    } else {
        let ca = t.client_ca_file.as_ref().ok_or_else(|| {
            err(
                file,
                &format!("{key_name}.client_ca_file"),
                "is required with client_auth_type other than NoClientCert",
            )
        })?;
        let mut roots = RootCertStore::empty();
        let cas = CertificateDer::pem_file_iter(ca)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| {
                err(
                    file,
                    &format!("{key_name}.client_ca_file"),
                    format!("{}: {e}", ca.display()),
                )
            })?;
        roots.add_parsable_certificates(cas);
        let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        let v = if t.client_auth_type == ClientAuth::VerifyClientCertIfGiven {
            v.allow_unauthenticated()
        } else {
            v
        };
        builder.with_client_cert_verifier(
            v.build()
                .map_err(|e| err(file, &format!("{key_name}.client_ca_file"), e))?,
        )
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| err(file, key_name, format!("certificate and key: {e}")))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// `Basic base64(user:password)` -> (user, password); `None` for anything else.
pub fn decode_basic(v: &str) -> Option<(String, String)> {
    let b64 = v.strip_prefix("Basic ").or_else(|| v.strip_prefix("basic "))?.trim();
    let raw = base64_decode(b64)?;
    let s = String::from_utf8(raw).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

/// Standard base64 with padding (for clients sending basic auth).
pub fn base64_encode(input: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(input)
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_header_decoding() {
        // "alice:s3cr:et" (colons after the first belong to the password)
        assert_eq!(
            decode_basic("Basic YWxpY2U6czNjcjpldA=="),
            Some(("alice".into(), "s3cr:et".into()))
        );
        assert_eq!(decode_basic("Basic YTpi"), Some(("a".into(), "b".into())));
        assert_eq!(decode_basic("Bearer xyz"), None);
        assert_eq!(decode_basic("Basic !!!"), None);
        assert_eq!(decode_basic("Basic YWxpY2U"), None, "no colon");
        for s in ["", "a", "ab", "abc", "alice:s3cr:et"] {
            let enc = base64_encode(s.as_bytes());
            assert_eq!(base64_decode(&enc).as_deref(), Some(s.as_bytes()), "{s} -> {enc}");
        }
        assert_eq!(base64_encode(b"alice:s3cr:et"), "YWxpY2U6czNjcjpldA==");
    }

    #[test]
    fn users_are_checked_against_bcrypt_hashes() {
        let web = Web {
            tls: None,
            client_auth: ClientAuth::NoClientCert,
            users: [("alice".to_string(), bcrypt::hash("pw", 4).unwrap())].into(),
            verified: Mutex::new(HashSet::new()),
        };
        assert!(web.check(Some("Basic YWxpY2U6cHc="))); // alice:pw
        assert!(web.check(Some("Basic YWxpY2U6cHc=")), "cached");
        assert!(!web.check(Some("Basic YWxpY2U6cHd4"))); // alice:pwx
        assert!(!web.check(Some("Basic Ym9iOnB3"))); // bob:pw
        assert!(!web.check(None));
    }
}
