//! Test certificates (rcgen) and an HTTPS client (rustls) for servers on loopback.

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};

/// PEM files in `dir`: a CA, a server certificate for 127.0.0.1 and localhost and a client
/// certificate, both signed by the CA, and a client certificate of another CA (`rogue_*`).
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
}

fn ca(name: &str) -> (rcgen::Certificate, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    (cert, Issuer::new(params, key))
}

/// Writes a certificate for `names` signed by `issuer` and its key to `dir/<stem>.{pem,key}`.
fn leaf(dir: &Path, stem: &str, names: &[&str], issuer: &Issuer<'_, KeyPair>) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let cert = CertificateParams::new(names).unwrap().signed_by(&key, issuer).unwrap();
    let (c, k) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}.key")));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let (ca_cert, issuer) = ca("sensor test CA");
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, ca_cert.pem()).unwrap();
        let (server_cert, server_key) = leaf(dir, "server", &["127.0.0.1", "localhost"], &issuer);
        let (client_cert, client_key) = leaf(dir, "client", &["alertmanager"], &issuer);
        let (_, rogue_issuer) = ca("someone else's CA");
        let (rogue_cert, rogue_key) = leaf(dir, "rogue", &["alertmanager"], &rogue_issuer);
        Pki {
            ca: ca_path,
            server_cert,
            server_key,
            client_cert,
            client_key,
            rogue_cert,
            rogue_key,
        }
    }
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// [`super::http_request`] over TLS to 127.0.0.1:`port`, trusting `ca`, presenting the client
/// certificate `client` (cert, key) when given. A refused handshake is an `Err`.
pub fn https_request(
    port: u16,
    ca: &Path,
    client: Option<(&Path, &Path)>,
    method: &str,
    path: &str,
    headers: &[&str],
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(io_err)? {
        roots.add(c.map_err(io_err)?).map_err(io_err)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(io_err)?
        .with_root_certificates(roots);
    let cfg = match client {
        Some((cert, key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .map_err(io_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(io_err)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(io_err)?;
            builder.with_client_auth_cert(certs, key).map_err(io_err)?
        }
        None => builder.with_no_client_auth(),
    };
    let name = ServerName::try_from("127.0.0.1").map_err(io_err)?;
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).map_err(io_err)?;
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    super::request_on(rustls::StreamOwned::new(conn, tcp), method, path, headers, body)
}
