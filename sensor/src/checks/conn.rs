//! Resolve, connect and TLS, each phase timed: shared by HTTP and websocket checks (and by the
//! webhook sender and `sensor top`, which want the same client without a second stack).

use std::{
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Instant,
};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{client::TlsStream, TlsConnector};

use super::config::TlsOptions;

/// Seconds spent in each phase of one run; `None` for phases that did not happen.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Phases {
    pub dns: Option<f64>,
    pub connect: Option<f64>,
    pub tls: Option<f64>,
    pub ttfb: Option<f64>,
    pub transfer: Option<f64>,
    /// Websocket upgrade (request sent to 101 received).
    pub handshake: Option<f64>,
    /// Websocket: handshake done to first message.
    pub first_message: Option<f64>,
    pub total: f64,
}

impl Phases {
    /// `(phase label, seconds)` for every phase that happened, total last.
    pub fn labelled(&self) -> Vec<(&'static str, f64)> {
        let mut v: Vec<(&'static str, f64)> = [
            ("dns", self.dns),
            ("connect", self.connect),
            ("tls", self.tls),
            ("ttfb", self.ttfb),
            ("transfer", self.transfer),
            ("handshake", self.handshake),
            ("first_message", self.first_message),
        ]
        .into_iter()
        .filter_map(|(n, v)| v.map(|v| (n, v)))
        .collect();
        v.push(("total", self.total));
        v
    }
}

/// What a run has done so far; read after a timeout to say where it hung.
#[derive(Debug, Default)]
pub struct Progress {
    pub phases: Phases,
    pub current: &'static str,
}

impl Progress {
    /// What a run that hit its timeout reports: where it was stuck.
    pub fn timeout_error(&self, timeout: std::time::Duration) -> String {
        let during = if self.current.is_empty() { "start" } else { self.current };
        format!("timeout after {} during {during}", humantime::format_duration(timeout))
    }

    /// Runs `f` as phase `name`, recording its duration whether it succeeds or not.
    pub async fn phase<T, E, F>(&mut self, name: &'static str, f: F) -> Result<T, CheckError>
    where
        F: std::future::Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        self.current = name;
        let t = Instant::now();
        let r = f.await;
        let secs = t.elapsed().as_secs_f64();
        let slot = match name {
            "dns" => &mut self.phases.dns,
            "connect" => &mut self.phases.connect,
            "tls" => &mut self.phases.tls,
            "ttfb" => &mut self.phases.ttfb,
            "transfer" => &mut self.phases.transfer,
            "handshake" => &mut self.phases.handshake,
            _ => &mut self.phases.first_message,
        };
        *slot = Some(secs);
        r.map_err(|e| CheckError::new(name, e))
    }
}

/// Why a run failed, and in which phase.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{phase}: {message}")]
pub struct CheckError {
    pub phase: &'static str,
    pub message: String,
}

impl CheckError {
    pub fn new(phase: &'static str, e: impl std::fmt::Display) -> CheckError {
        CheckError {
            phase,
            message: e.to_string(),
        }
    }
}

/// Where a check connects, from its URL.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// `host[:port]` as written in the URL, for the Host header.
    pub authority: String,
    pub path_and_query: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("'{url}': {e}"))?;
        let scheme = uri.scheme_str().unwrap_or("");
        let tls = matches!(scheme, "https" | "wss");
        if !matches!(scheme, "http" | "https" | "ws" | "wss") {
            return Err(format!("'{url}': unsupported scheme '{scheme}'"));
        }
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("'{url}' has no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let authority = uri.authority().map(|a| a.to_string()).unwrap_or_else(|| host.clone());
        let path_and_query = uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "/".into());
        Ok(Target {
            host,
            port,
            tls,
            authority,
            path_and_query,
        })
    }
}

/// A plain or TLS connection; both halves are `Unpin`, so delegation needs no unsafe.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// TLS settings of one check, built once at startup.
#[derive(Clone)]
pub struct Tls {
    pub connector: TlsConnector,
    pub server_name: Option<String>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static P: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    Arc::clone(P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())))
}

/// The system trust store, loaded once; Mozilla's roots when the system has none (scratch
/// containers).
fn system_roots() -> Arc<RootCertStore> {
    static R: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    Arc::clone(R.get_or_init(|| {
        let mut store = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        let (added, _) = store.add_parsable_certificates(native.certs);
        if added == 0 {
            store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        Arc::new(store)
    }))
}

/// Builds the TLS client of a check: its CA file or the system store, optional client cert,
/// optional "skip verify"; `alpn` is what the protocol on top speaks.
pub fn tls_client(opts: &TlsOptions, alpn: &[&[u8]]) -> Result<Tls, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if opts.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
    } else if let Some(ca) = &opts.ca_file {
        let mut store = RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca)
            .map_err(|e| format!("tls.ca_file {}: {e}", ca.display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("tls.ca_file {}: {e}", ca.display()))?;
        let (added, _) = store.add_parsable_certificates(certs);
        if added == 0 {
            return Err(format!("tls.ca_file {}: no usable certificate", ca.display()));
        }
        builder.with_root_certificates(store)
    } else {
        builder.with_root_certificates(system_roots())
    };
    let mut cfg = match (&opts.client_cert, &opts.client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| format!("tls.client_cert {}: {e}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("tls.client_cert {}: {e}", cert.display()))?;
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| format!("tls.client_key {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("tls client certificate: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Tls {
        connector: TlsConnector::from(Arc::new(cfg)),
        server_name: opts.server_name.clone(),
    })
}

/// Resolves (unless the host is an IP literal), connects and, for https/wss, does the TLS
/// handshake; each step is a phase in `progress`.
pub async fn connect(target: &Target, tls: Option<&Tls>, progress: &mut Progress) -> Result<Stream, CheckError> {
    let addrs: Vec<SocketAddr> = match target.host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, target.port)],
        Err(_) => {
            let host = (target.host.clone(), target.port);
            let found = progress
                .phase("dns", async move { tokio::net::lookup_host(host).await })
                .await?;
            let v: Vec<SocketAddr> = found.collect();
            if v.is_empty() {
                return Err(CheckError::new("dns", format!("{} has no address", target.host)));
            }
            v
        }
    };
    let tcp = progress
        .phase("connect", async {
            let mut last = io::Error::other("no address");
            for a in &addrs {
                match TcpStream::connect(a).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = e,
                }
            }
            Err(last)
        })
        .await?;
    let _ = tcp.set_nodelay(true);
    if !target.tls {
        return Ok(Stream::Plain(tcp));
    }
    let tls = tls.ok_or_else(|| CheckError::new("tls", "no TLS configuration"))?;
    let name = tls.server_name.clone().unwrap_or_else(|| target.host.clone());
    let name = ServerName::try_from(name).map_err(|e| CheckError::new("tls", e))?;
    let s = progress.phase("tls", tls.connector.connect(name, tcp)).await?;
    Ok(Stream::Tls(Box::new(s)))
}

/// `insecure_skip_verify`: accepts any certificate but still checks the handshake signatures.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_from_urls() {
        let t = Target::parse("https://shop.example/health?x=1").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.tls), ("shop.example", 443, true));
        assert_eq!(t.path_and_query, "/health?x=1");
        let t = Target::parse("ws://[::1]:8080").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.tls, t.path_and_query.as_str()),
            ("::1", 8080, false, "/")
        );
        assert_eq!(t.authority, "[::1]:8080");
        assert!(Target::parse("ftp://x/").is_err());
        assert!(Target::parse("http:///nohost").is_err());
    }
}
