//! HTTPS checks against a generated CA, with client certificates.

use super::*;

/// A CA, a server certificate for 127.0.0.1 signed by it, and a client certificate.
pub(crate) struct Pki {
    pub(crate) ca_pem: PathBuf,
    pub(crate) server_pem: PathBuf,
    pub(crate) server_key: PathBuf,
    pub(crate) server: (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ),
    pub(crate) client_cert: PathBuf,
    pub(crate) client_key: PathBuf,
    pub(crate) ca_der: rustls::pki_types::CertificateDer<'static>,
}

/// An exporter-toolkit web config serving `p`'s server certificate, with `user` allowed in by the
/// password `s3cret`.
pub(crate) fn tls_web_config(p: &Pki, file: &str, user: &str) -> PathBuf {
    let web = tmp(file);
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\nbasic_auth_users:\n  {user}: '{hash}'\n",
            p.server_pem.display(),
            p.server_key.display()
        ),
    )
    .unwrap();
    web
}

pub(crate) fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sensor test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let srv_key = KeyPair::generate().unwrap();
    let srv = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&srv_key, &issuer)
        .unwrap();
    let cli_key = KeyPair::generate().unwrap();
    let cli = CertificateParams::new(vec!["client".to_string()])
        .unwrap()
        .signed_by(&cli_key, &issuer)
        .unwrap();
    let ca_pem = tmp("ca.pem");
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    let server_pem = tmp("server.pem");
    std::fs::write(&server_pem, srv.pem()).unwrap();
    let server_key = tmp("server.key");
    std::fs::write(&server_key, srv_key.serialize_pem()).unwrap();
    let client_cert = tmp("client.pem");
    std::fs::write(&client_cert, cli.pem()).unwrap();
    let client_key = tmp("client.key");
    std::fs::write(&client_key, cli_key.serialize_pem()).unwrap();
    Pki {
        ca_pem,
        server_pem,
        server_key,
        server: (
            vec![srv.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(srv_key.serialize_der().into()),
        ),
        client_cert,
        client_key,
        ca_der: ca.der().clone(),
    }
}

/// An HTTPS server with the PKI's server certificate; with `require_client` it demands a
/// client certificate signed by the CA.
pub(crate) fn https_server(p: &Pki, require_client: bool) -> SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = if require_client {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(p.ca_der.clone()).unwrap();
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
        builder.with_client_cert_verifier(v)
    } else {
        builder.with_no_client_auth()
    };
    let cfg = builder
        .with_single_cert(p.server.0.clone(), p.server.1.clone_key())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = rt().block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = l.local_addr().unwrap();
    rt().spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(s).await else { return };
                read_head(&mut s).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nsecure")
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[test]
fn https_with_generated_ca_and_client_certificates() {
    let p = pki();
    let one_way = https_server(&p, false);
    let mutual = https_server(&p, true);
    let ca = p.ca_pem.display();
    let (cc, ck) = (p.client_cert.display(), p.client_key.display());
    let cfg = write_config(
        "tls.yaml",
        &format!(
            "checks:
  - {{name: trusted, type: http, url: 'https://{one_way}/', tls: {{ca_file: '{ca}'}}, expect: {{body_regex: secure}}}}
  - {{name: untrusted, type: http, url: 'https://{one_way}/'}}
  - {{name: skipverify, type: http, url: 'https://{one_way}/', tls: {{insecure_skip_verify: true}}}}
  - {{name: byname, type: http, url: 'https://localhost:{port}/', tls: {{ca_file: '{ca}'}}}}
  - {{name: mtls, type: http, url: 'https://{mutual}/', tls: {{ca_file: '{ca}', client_cert: '{cc}', client_key: '{ck}'}}}}
  - {{name: mtls-nocert, type: http, url: 'https://{mutual}/', tls: {{ca_file: '{ca}'}}}}
",
            port = one_way.port()
        ),
    );
    let results = sensor_check(&cfg);
    let ok = |n: &str| {
        let r = by_name(&results, n);
        assert_eq!(r["success"], true, "{n}: {r}");
        assert!(r["phases"]["tls"].as_f64().unwrap() > 0.0, "{n}: {r}");
        assert_eq!(r["status"], 200);
        r.clone()
    };
    ok("trusted");
    ok("skipverify");
    ok("mtls");
    let n = ok("byname");
    assert!(n["phases"]["dns"].is_number(), "a host name is resolved: {n}");
    let u = by_name(&results, "untrusted");
    assert_eq!(u["success"], false);
    let e = u["error"].as_str().unwrap();
    assert!(e.starts_with("tls: ") && e.contains("UnknownIssuer"), "{e}");
    assert!(u["phases"]["ttfb"].is_null(), "{u}");
    let m = by_name(&results, "mtls-nocert");
    assert_eq!(m["success"], false, "{m}");
}
