//! TLS in proxyd.toml: the settings of the binds that terminate TLS, validated with their
//! certificates loaded, so that `proxyd check`, the master (at start and on every reload) and
//! each worker refuse the same broken file, and a generation never starts on one.
//!
//! - this file: the validated settings ([`Tls`]) and their validation from the raw tables;
//! - `certs`: reading PEM chains and keys, key against certificate, names, serial and dates;
//! - `x509`: the serial and the validity dates, read from a certificate's DER;
//! - `hkdf`: TLS 1.3's key schedule on aws-lc-rs, cheaper than the library's own;
//! - `watch`: the fingerprint of a setting's files on disk, by which the master notices a
//!   certificate rotated without a reload.
//!
//! A rotation loads a setting's certificates again with [`reload`], the very checks validation
//! runs, and a worker checks the bytes it is sent with [`from_files`].

mod certs;
#[cfg(feature = "aws-lc-rs")]
mod hkdf;
mod watch;
mod x509;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{ConfigError, SourceFile};
use rustls::crypto::CryptoProvider;

pub use certs::{CertError, CertSource, LoadedCert, PemFiles};
pub use watch::Fingerprint;
pub use x509::date;

use certs::SetBuilder;

use super::raw::{RawTls, Shorthand};

/// A certificate that expires sooner than this is worth a warning from `proxyd check`.
pub const EXPIRY_WARNING_SECS: i64 = 14 * 86_400;

/// The one crypto provider of proxyd's TLS: aws-lc-rs (the default `aws-lc-rs` feature) with
/// its TLS 1.3 key schedule on kept HMAC keys (`hkdf`), or ring, which tonic already brings, in a
/// build without it.
pub fn provider() -> Arc<CryptoProvider> {
    #[cfg(not(feature = "aws-lc-rs"))]
    let provider = rustls::crypto::ring::default_provider();
    #[cfg(feature = "aws-lc-rs")]
    let provider = {
        let stock = rustls::crypto::aws_lc_rs::default_provider();
        CryptoProvider {
            cipher_suites: hkdf::with_kept_keys(&stock.cipher_suites),
            ..stock
        }
    };
    Arc::new(provider)
}

/// The oldest TLS version a bind accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

/// An application protocol offered through ALPN. The protocol a connection speaks is chosen
/// from it once the handshake is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppProtocol {
    Http1,
    H2,
}

impl AppProtocol {
    /// The ALPN identifier (RFC 7301).
    pub fn id(self) -> &'static [u8] {
        match self {
            AppProtocol::Http1 => b"http/1.1",
            AppProtocol::H2 => b"h2",
        }
    }

    pub fn from_id(id: &[u8]) -> Option<AppProtocol> {
        [AppProtocol::Http1, AppProtocol::H2]
            .into_iter()
            .find(|p| p.id() == id)
    }
}

/// TLS settings shared by one or more binds, with their certificates loaded.
#[derive(Clone, Debug)]
pub struct Tls {
    /// The `[[tls]]` name, or `FRONTEND ADDRESS` for a bind's own settings.
    pub name: String,
    /// In the config's order; the first is served for an unknown or absent SNI.
    pub certs: Vec<Arc<LoadedCert>>,
    /// Where `certs` come from, as the config names them (relative paths resolved).
    pub sources: Vec<CertSource>,
    /// The files of `sources` on disk just before they were read.
    pub fingerprint: Fingerprint,
    /// Offered in this order of preference; empty: no ALPN.
    pub alpn: Vec<AppProtocol>,
    pub min_version: TlsVersion,
}

/// Reads and checks the certificates of `sources` again as validation does (every file, each key
/// against its certificate, none expired, no two for one name and key type), with the
/// fingerprint of their files taken just before the read. `now` in unix seconds.
pub fn reload(
    sources: &[CertSource],
    provider: &CryptoProvider,
    now: i64,
) -> (Fingerprint, Result<Vec<Arc<LoadedCert>>, CertError>) {
    let fingerprint = Fingerprint::of(sources);
    let load = || {
        let mut set = SetBuilder::default();
        for source in sources {
            for cert in certs::load(source, provider, now)? {
                set.add(cert)?;
            }
        }
        Ok(set.finish())
    };
    (fingerprint, load())
}

/// Checks certificates from the bytes someone else read (the master, for a rotation) as
/// [`reload`] checks the files, reading nothing.
pub fn from_files(
    files: Vec<PemFiles>,
    provider: &CryptoProvider,
    now: i64,
) -> Result<Vec<Arc<LoadedCert>>, CertError> {
    let mut set = SetBuilder::default();
    for f in files {
        set.add(certs::parse(f, provider, now)?)?;
    }
    Ok(set.finish())
}

/// What validating TLS settings needs besides the raw table.
pub(super) struct TlsCheck<'a> {
    pub(super) src: &'a SourceFile,
    pub(super) provider: &'a CryptoProvider,
    /// Unix seconds.
    pub(super) now: i64,
    /// What `check` prints without refusing the file.
    pub(super) warnings: &'a mut Vec<ConfigError>,
    /// Read the certificates; else every setting is left without any, for its sets to come
    /// from the master.
    pub(super) load: bool,
}

impl TlsCheck<'_> {
    /// Validates TLS settings called `name` and loads their certificates.
    pub(super) fn validate(&mut self, raw: RawTls, name: String) -> Result<Tls, ConfigError> {
        let src = self.src;
        if raw.certs.get_ref().is_empty() {
            return Err(src.error_at(raw.certs.span(), format!("tls '{name}' has no certificate")));
        }
        let mut named: Vec<(CertSource, Range<usize>)> = Vec::new();
        for entry in raw.certs.into_inner() {
            let at = entry.span();
            named.push((
                match entry.into_inner() {
                    Shorthand::Text(p) => CertSource::Path(self.resolve(Path::new(&p))),
                    Shorthand::Table(pair) => CertSource::Pair {
                        cert: self.resolve(pair.cert.get_ref()),
                        key: self.resolve(pair.key.get_ref()),
                    },
                },
                at,
            ));
        }
        let (sources, spans): (Vec<CertSource>, Vec<Range<usize>>) = named.into_iter().unzip();
        let fingerprint = Fingerprint::of(&sources);
        let mut set = SetBuilder::default();
        let load = self.load;
        for (source, at) in sources.iter().zip(spans).filter(|_| load) {
            let loaded = certs::load(source, self.provider, self.now)
                .map_err(|e| src.error_at(at.clone(), e.to_string()))?;
            for cert in loaded {
                self.warn(&cert, at.clone(), set.is_empty());
                set.add(cert)
                    .map_err(|e| src.error_at(at.clone(), e.to_string()))?;
            }
        }
        let alpn = match raw.alpn {
            None => vec![AppProtocol::Http1],
            Some(list) => {
                let mut out = Vec::new();
                for p in list.into_inner() {
                    let id = p.get_ref();
                    let proto = AppProtocol::from_id(id.as_bytes()).ok_or_else(|| {
                        src.error_at(
                            p.span(),
                            format!("unknown alpn protocol '{id}' (h2, http/1.1)"),
                        )
                    })?;
                    if out.contains(&proto) {
                        return Err(
                            src.error_at(p.span(), format!("alpn '{}' given twice", p.get_ref()))
                        );
                    }
                    out.push(proto);
                }
                out
            }
        };
        let min_version = match raw.min_version {
            None => TlsVersion::V1_2,
            Some(v) => match v.get_ref().as_str() {
                "1.2" => TlsVersion::V1_2,
                "1.3" => TlsVersion::V1_3,
                other => {
                    return Err(src.error_at(
                        v.span(),
                        format!("bad min_version '{other}' (\"1.2\" or \"1.3\")"),
                    ));
                }
            },
        };
        Ok(Tls {
            name,
            certs: set.finish(),
            sources,
            fingerprint,
            alpn,
            min_version,
        })
    }

    /// A relative path is read from the config file's directory, whatever the daemon's.
    fn resolve(&self, p: &Path) -> PathBuf {
        match self.src.path.parent() {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_owned(),
        }
    }

    fn warn(&mut self, cert: &LoadedCert, at: Range<usize>, first: bool) {
        let path = cert.path.display();
        let left = cert.not_after - self.now;
        if left < EXPIRY_WARNING_SECS {
            self.warnings.push(self.src.error_at(
                at.clone(),
                format!(
                    "the certificate in '{path}' expires in {} days, on {}",
                    left / 86_400,
                    date(cert.not_after)
                ),
            ));
        }
        if cert.not_before > self.now {
            self.warnings.push(self.src.error_at(
                at.clone(),
                format!(
                    "the certificate in '{path}' is not valid before {}",
                    date(cert.not_before)
                ),
            ));
        }
        if cert.names.is_empty() && !first {
            self.warnings.push(self.src.error_at(
                at,
                format!(
                    "the certificate in '{path}' has no DNS name in its subjectAltName: no SNI picks it"
                ),
            ));
        }
    }
}

/// Certificates made at test time, and a client that takes any, for the tests of this module
/// and of what sends them.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    /// A self-signed certificate for `names` and its key, in PEM.
    pub(crate) fn pem(names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .expect("params");
        let cert = params.self_signed(&key).expect("sign");
        (cert.pem(), key.serialize_pem())
    }

    /// A client that accepts any certificate.
    pub(crate) fn any_certificate_client() -> Arc<rustls::ClientConfig> {
        let client = rustls::ClientConfig::builder_with_provider(super::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate))
            .with_no_client_auth();
        Arc::new(client)
    }

    /// Takes the server's word for it: what these tests test is what follows the handshake, not
    /// the chain.
    #[derive(Debug)]
    struct AnyCertificate;

    impl ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }

        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            super::provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> i64 {
        common::time::now_ms().div_euclid(1000)
    }

    #[test]
    fn a_reload_runs_the_checks_of_validation_and_the_bytes_it_read_check_alike() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a_cert, a_key) = testing::pem(&["a.test"]);
        let (b_cert, b_key) = testing::pem(&["b.test"]);
        let a = dir.path().join("a.pem");
        let b = dir.path().join("b.crt");
        std::fs::write(&a, format!("{a_cert}{a_key}")).expect("write");
        std::fs::write(&b, &b_cert).expect("write");
        std::fs::write(dir.path().join("b.key"), &b_key).expect("write");
        let sources = [CertSource::Path(a.clone()), CertSource::Path(b.clone())];
        let provider = provider();

        let (fingerprint, loaded) = reload(&sources, &provider, now());
        let loaded = loaded.expect("a good set");
        assert_eq!(fingerprint, Fingerprint::of(&sources));
        let names: Vec<_> = loaded.iter().map(|c| c.names.clone()).collect();
        assert_eq!(names, [["a.test"], ["b.test"]]);
        assert_eq!(loaded[0].files.key, None, "a's key is in its file");
        assert_eq!(
            loaded[1].files.key.as_ref().map(|(p, _)| p.clone()),
            Some(dir.path().join("b.key"))
        );
        assert!(!loaded[0].serial.is_empty());

        // What a worker is sent checks as the files did.
        let files = loaded.iter().map(|c| c.files.clone()).collect();
        let again = from_files(files, &provider, now()).expect("the same set");
        assert_eq!(again.len(), 2);
        assert_eq!(again[1].serial, loaded[1].serial);

        // b's key for a's certificate.
        std::fs::write(&a, format!("{a_cert}{b_key}")).expect("write");
        let (_, refused) = reload(&sources, &provider, now());
        assert!(
            matches!(refused, Err(CertError::KeyMismatch { ref cert, .. }) if *cert == a),
            "{refused:?}"
        );
        let mut files: Vec<PemFiles> = loaded.iter().map(|c| c.files.clone()).collect();
        files[0].cert = format!("{a_cert}{b_key}").into_bytes();
        assert!(matches!(
            from_files(files, &provider, now()),
            Err(CertError::KeyMismatch { .. })
        ));

        // Two certificates for one name and key type.
        let (a2_cert, a2_key) = testing::pem(&["a.test"]);
        std::fs::write(&a, format!("{a_cert}{a_key}")).expect("write");
        std::fs::write(&b, &a2_cert).expect("write");
        std::fs::write(dir.path().join("b.key"), &a2_key).expect("write");
        let (_, refused) = reload(&sources, &provider, now());
        let e = refused.expect_err("both serve a.test");
        assert!(e.to_string().contains("both serve 'a.test'"), "{e}");

        // Expired, as of a later clock.
        std::fs::write(&b, &b_cert).expect("write");
        std::fs::write(dir.path().join("b.key"), &b_key).expect("write");
        let (_, refused) = reload(&sources, &provider, i64::MAX / 2);
        assert!(
            matches!(refused, Err(CertError::Expired { .. })),
            "{refused:?}"
        );
    }
}
