//! TLS helpers for proxyd's integration tests: a CA of the test's own and the certificates it
//! signs, a client that keeps the certificate it got, and proxyd serving a TLS bind, in-process
//! or as the real binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proxyd::config::BindRef;
use proxyd::serve::Proxy;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::util::master::{Running, command, wait_for};
use crate::util::{self, Action, backend, ok};

/// A CA and the certificates it signs, written in a temp dir (where the configs are too, so
/// that they name the files relative to themselves).
pub struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, in PEM, and the certificate's DER to recognise it by.
pub struct Leaf {
    pub cert: String,
    pub key: String,
    pub der: Vec<u8>,
    /// As proxyd reports it: upper-case hex.
    pub serial: String,
}

/// A serial of its own for every certificate a test makes.
fn next_serial() -> [u8; 4] {
    static NEXT: AtomicU16 = AtomicU16::new(1);
    let [hi, lo] = NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes();
    [0x5e, 0xed, hi, lo]
}

impl Pki {
    pub fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "proxyd test ca");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("ca key")).expect("ca");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write ca");
        Pki { dir, ca }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    pub fn ca_path(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// A certificate for `names`, valid until `days` from now (negative: expired), on `key`.
    pub fn leaf_with(&self, names: &[&str], days: i64, key: KeyPair) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("none"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(30);
        params.not_after = now + time::Duration::days(days);
        let serial = next_serial();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let cert = params.signed_by(&key, &self.ca).expect("sign");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
            der: cert.der().to_vec(),
            serial: serial.iter().map(|b| format!("{b:02X}")).collect(),
        }
    }

    /// An ECDSA P-256 certificate valid for a year.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        self.leaf_with(names, 365, KeyPair::generate().expect("key"))
    }

    /// Chain and key in one file, as HAProxy takes them.
    pub fn write_pem(&self, file: &str, leaf: &Leaf) -> PathBuf {
        self.write(file, &format!("{}{}", leaf.cert, leaf.key))
    }

    pub fn write(&self, file: &str, text: &str) -> PathBuf {
        let p = self.path(file);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&p, text).expect("write");
        p
    }
}

pub const GLOBAL: &str =
    "[global]\nadmin_socket = \"/nonexistent/a.sock\"\nfdkeeper_socket = \"/nonexistent/f.sock\"\n";

pub fn listener() -> (std::net::TcpListener, SocketAddr) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr");
    (l, a)
}

/// Validates `text` as `DIR/proxyd.toml` (relative certificate paths are the pki dir's).
pub fn load(pki: &Pki, text: &str) -> Result<proxyd::Config, common::ConfigError> {
    proxyd::Config::from_source(common::SourceFile::from_text(pki.path("proxyd.toml"), text))
}

/// Starts the serving half of proxyd in-process on already bound listeners, one per bind of
/// the first frontend in order.
pub fn start(pki: &Pki, text: &str, listeners: Vec<std::net::TcpListener>) -> Proxy {
    let config = load(pki, text).expect("valid config");
    let proxy = Proxy::new(Arc::new(config));
    proxy
        .start(
            listeners
                .into_iter()
                .enumerate()
                .map(|(bind, l)| (BindRef { frontend: 0, bind }, l))
                .collect(),
        )
        .expect("start");
    proxy
}

/// A client verifier that accepts any certificate and keeps the one it saw, so that a test
/// can ask which certificate a name got (also for names the certificate does not cover), and
/// that offers only `schemes` when given (to ask for an RSA certificate).
#[derive(Debug)]
pub struct Recorder {
    pub seen: Mutex<Option<Vec<u8>>>,
    pub schemes: Vec<SignatureScheme>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock().expect("lock") = Some(end_entity.to_vec());
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
        self.schemes.clone()
    }
}

/// How a test client says hello.
#[derive(Default)]
pub struct Hello<'a> {
    /// None: no SNI (a client connecting to an address).
    pub sni: Option<&'a str>,
    pub alpn: &'a [&'a str],
    /// Only these signature schemes (default: all of ring's).
    pub schemes: Option<Vec<SignatureScheme>>,
    /// TLS 1.2 only.
    pub tls12: bool,
}

/// A TLS connection to `addr` and the end-entity certificate it got.
pub async fn handshake(
    addr: SocketAddr,
    hello: Hello<'_>,
) -> std::io::Result<(TlsStream<TcpStream>, Vec<u8>)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let recorder = Arc::new(Recorder {
        seen: Mutex::new(None),
        schemes: hello.schemes.unwrap_or_else(|| {
            provider
                .signature_verification_algorithms
                .supported_schemes()
        }),
    });
    let versions: &[&rustls::SupportedProtocolVersion] = if hello.tls12 {
        &[&rustls::version::TLS12]
    } else {
        rustls::DEFAULT_VERSIONS
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    config.alpn_protocols = hello.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let name = match hello.sni {
        Some(n) => ServerName::try_from(n.to_owned()).expect("name"),
        None => ServerName::IpAddress(addr.ip().into()),
    };
    let tcp = TcpStream::connect(addr).await?;
    let tls = tokio::time::timeout(
        util::T,
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let seen = recorder
        .seen
        .lock()
        .expect("lock")
        .take()
        .unwrap_or_default();
    Ok((tls, seen))
}

/// The heads a backend received, to look for the fields the proxy wrote.
pub fn recording_backend_heads() -> (Arc<Mutex<Vec<String>>>, impl Fn(&util::Seen) -> Action) {
    let heads = Arc::new(Mutex::new(Vec::new()));
    let h = heads.clone();
    (heads, move |s: &util::Seen| {
        h.lock().expect("lock").push(s.head.clone());
        ok("from the backend")
    })
}

/// [`util::curl`], trusting the test's CA.
pub async fn curl(pki: &Pki, args: &[&str]) -> std::process::Output {
    let ca = pki.ca_path().display().to_string();
    util::curl(&[&["--cacert", &ca], args].concat()).await
}

/// What `openssl s_client -connect ADDR ARGS` prints, its input closed at once.
pub async fn s_client(addr: SocketAddr, args: &[&str]) -> String {
    let out = tokio::process::Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string()])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("openssl s_client");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running proxyd over a TLS bind, and where to reach it.
pub struct Launched {
    _running: Running,
    pub config: PathBuf,
    pub admin: PathBuf,
    /// The TLS bind.
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
}

/// Starts the real proxyd in the pki dir with one TLS bind whose `tls` is `tls` (a bind's own
/// settings, or the name of a `[[tls]]` in `sections`), and waits until it serves TLS.
pub async fn launch(pki: &Pki, tls: &str, sections: &str) -> Launched {
    let be = backend(|_| ok("hi")).await;
    let d = pki.dir.path().display().to_string();
    let addr = util::closed_port();
    let metrics = util::closed_port();
    let config = pki.write(
        "proxyd.toml",
        &format!(
            "[global]\nadmin_socket = \"{d}/proxyd/admin.sock\"\nfdkeeper_socket = \"{d}/fdk/lend.sock\"\nmetrics = \"{metrics}\"\n{sections}\
             [[frontend]]\nname = \"web\"\nbind = [{{ address = \"{addr}\", tls = {tls} }}]\ndefault_backend = \"app\"\n\
             [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"{}\"\n",
            be.addr
        ),
    );
    let running = Running::start(pki.dir.path(), &mut command(&config));
    wait_for(Duration::from_secs(10), || async {
        handshake(addr, hello()).await.is_ok()
    })
    .await;
    Launched {
        _running: running,
        config,
        admin: pki.dir.path().join("proxyd/admin.sock"),
        addr,
        metrics,
    }
}

/// A client of `a.test`.
pub fn hello() -> Hello<'static> {
    Hello {
        sni: Some("a.test"),
        ..Hello::default()
    }
}
