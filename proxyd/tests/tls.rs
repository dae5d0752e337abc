//! TLS on a bind, with certificates made at test time by a CA of the test's own: SNI, ALPN,
//! curl through it, X-Forwarded-Proto, the redirect to https, TCP mode, the handshake timeout,
//! `proxyd check` and reload refusing certificate files that cannot serve, and certificates
//! rotated under a running proxyd without a reload (by the files changing, or
//! `ReloadCertificates`), seen in Status and `/metrics`.

mod util;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::proxyd::v1 as api;
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
use tokio_util::sync::CancellationToken;
use util::{Action, Client, backend, ok, start_fdkeeper};

const PROXYD: &str = env!("CARGO_BIN_EXE_proxyd");

/// A CA and the certificates it signs, written in a temp dir (where the configs are too, so
/// that they name the files relative to themselves).
struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, in PEM, and the certificate's DER to recognise it by.
struct Leaf {
    cert: String,
    key: String,
    der: Vec<u8>,
    /// As proxyd reports it: upper-case hex.
    serial: String,
}

/// A serial of its own for every certificate a test makes.
fn next_serial() -> [u8; 4] {
    static NEXT: AtomicU16 = AtomicU16::new(1);
    let [hi, lo] = NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes();
    [0x5e, 0xed, hi, lo]
}

impl Pki {
    fn new() -> Pki {
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

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn ca_path(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// A certificate for `names`, valid until `days` from now (negative: expired), on `key`.
    fn leaf_with(&self, names: &[&str], days: i64, key: KeyPair) -> Leaf {
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
    fn leaf(&self, names: &[&str]) -> Leaf {
        self.leaf_with(names, 365, KeyPair::generate().expect("key"))
    }

    /// Chain and key in one file, as HAProxy takes them.
    fn write_pem(&self, file: &str, leaf: &Leaf) -> PathBuf {
        self.write(file, &format!("{}{}", leaf.cert, leaf.key))
    }

    fn write(&self, file: &str, text: &str) -> PathBuf {
        let p = self.path(file);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&p, text).expect("write");
        p
    }
}

/// An RSA key: ring signs with RSA but does not make RSA keys.
fn rsa_key() -> KeyPair {
    let out = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .output()
        .expect("openssl genpkey");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    KeyPair::from_pem(&String::from_utf8_lossy(&out.stdout)).expect("rsa key")
}

const GLOBAL: &str =
    "[global]\nadmin_socket = \"/nonexistent/a.sock\"\nfdkeeper_socket = \"/nonexistent/f.sock\"\n";

fn listener() -> (std::net::TcpListener, SocketAddr) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr");
    (l, a)
}

/// Validates `text` as `DIR/proxyd.toml` (relative certificate paths are the pki dir's).
fn load(pki: &Pki, text: &str) -> Result<proxyd::Config, common::ConfigError> {
    proxyd::Config::from_source(common::SourceFile::from_text(pki.path("proxyd.toml"), text))
}

/// Starts the serving half of proxyd in-process on already bound listeners, one per bind of
/// the first frontend in order.
fn start(pki: &Pki, text: &str, listeners: Vec<std::net::TcpListener>) -> Proxy {
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
struct Recorder {
    seen: Mutex<Option<Vec<u8>>>,
    schemes: Vec<SignatureScheme>,
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
struct Hello<'a> {
    /// None: no SNI (a client connecting to an address).
    sni: Option<&'a str>,
    alpn: &'a [&'a str],
    /// Only these signature schemes (default: all of ring's).
    schemes: Option<Vec<SignatureScheme>>,
    /// TLS 1.2 only.
    tls12: bool,
}

/// A TLS connection to `addr` and the end-entity certificate it got.
async fn handshake(
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
fn recording_backend_heads() -> (Arc<Mutex<Vec<String>>>, impl Fn(&util::Seen) -> Action) {
    let heads = Arc::new(Mutex::new(Vec::new()));
    let h = heads.clone();
    (heads, move |s: &util::Seen| {
        h.lock().expect("lock").push(s.head.clone());
        ok("from the backend")
    })
}

/// curl, trusting the test's CA; awaited, since the proxy runs on the test's runtime.
async fn curl(pki: &Pki, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "5", "--cacert"])
        .arg(pki.ca_path())
        .args(args)
        .output()
        .await
        .expect("run curl")
}

#[tokio::test]
async fn sni_picks_the_certificate_by_name_and_the_first_for_any_other() {
    let pki = Pki::new();
    let a = pki.leaf(&["a.test"]);
    let b = pki.leaf(&["b.test"]);
    let wild = pki.leaf(&["*.w.test"]);
    let exact = pki.leaf(&["x.w.test"]);
    pki.write_pem("a.pem", &a);
    pki.write_pem("b.pem", &b);
    pki.write_pem("wild.pem", &wild);
    pki.write_pem("exact.pem", &exact);
    let be = backend(|_| ok("hi")).await;
    let (l, addr) = listener();
    let text = format!(
        "{GLOBAL}[[tls]]\nname = \"site\"\ncerts = [\"a.pem\", \"b.pem\", \"wild.pem\", \"exact.pem\"]\n\
         [[frontend]]\nname = \"web\"\nbind = [{{ address = \"{addr}\", tls = \"site\" }}]\ndefault_backend = \"app\"\n\
         [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"{}\"\n",
        be.addr
    );
    let _proxy = start(&pki, &text, vec![l]);
    for (sni, want, which) in [
        (Some("a.test"), &a, "a"),
        (Some("b.test"), &b, "b"),
        (Some("B.Test"), &b, "b, names without case"),
        (Some("y.w.test"), &wild, "the wildcard"),
        (
            Some("x.w.test"),
            &exact,
            "the exact name before the wildcard",
        ),
        (
            Some("y.z.w.test"),
            &a,
            "the default: a wildcard covers one label",
        ),
        (Some("unknown.test"), &a, "the default"),
        (None, &a, "the default, without SNI"),
    ] {
        let (_tls, got) = handshake(
            addr,
            Hello {
                sni,
                ..Hello::default()
            },
        )
        .await
        .expect("handshake");
        assert!(got == want.der, "{sni:?} should get {which}");
    }
    // OpenSSL's client sees the same.
    for (sni, cn) in [
        (Some("b.test"), "b.test"),
        (Some("other.test"), "a.test"),
        (None, "a.test"),
    ] {
        let mut cmd = tokio::process::Command::new("openssl");
        cmd.args(["s_client", "-connect", &addr.to_string()]);
        match sni {
            Some(name) => cmd.args(["-servername", name]),
            None => cmd.arg("-noservername"),
        };
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .await
            .expect("openssl s_client");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("subject=CN = {cn}\n")),
            "{sni:?}: {text}"
        );
    }
}

#[tokio::test]
async fn ecdsa_first_and_rsa_for_a_client_that_verifies_only_rsa() {
    let pki = Pki::new();
    let ec = pki.leaf(&["a.test"]);
    let rsa = pki.leaf_with(&["a.test"], 365, rsa_key());
    // The RSA chain with its key beside it, in `rsa.crt` and `rsa.key`.
    pki.write("rsa.crt", &rsa.cert);
    pki.write("rsa.key", &rsa.key);
    pki.write_pem("ec.pem", &ec);
    let be = backend(|_| ok("hi")).await;
    let (l, addr) = listener();
    let text = format!(
        "{GLOBAL}[[frontend]]\nname = \"web\"\nbind = [{{ address = \"{addr}\", tls = {{ certs = [\"rsa.crt\", \"ec.pem\"] }} }}]\ndefault_backend = \"app\"\n\
         [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"{}\"\n",
        be.addr
    );
    let _proxy = start(&pki, &text, vec![l]);
    let (_, got) = handshake(
        addr,
        Hello {
            sni: Some("a.test"),
            ..Hello::default()
        },
    )
    .await
    .expect("handshake");
    assert!(got == ec.der, "ECDSA is preferred for a name that has both");
    let rsa_only = vec![
        SignatureScheme::RSA_PSS_SHA256,
        SignatureScheme::RSA_PKCS1_SHA256,
    ];
    let (mut tls, got) = handshake(
        addr,
        Hello {
            sni: Some("a.test"),
            schemes: Some(rsa_only.clone()),
            ..Hello::default()
        },
    )
    .await
    .expect("handshake");
    assert!(
        got == rsa.der,
        "a client that verifies only RSA gets the RSA one"
    );
    // And the RSA key does sign: the request goes through.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await.expect("read");
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("hi"),
        "{answer}"
    );
    // The default (the first certificate listed, and its ECDSA twin) for a client without SNI.
    let (_, got) = handshake(
        addr,
        Hello {
            schemes: Some(rsa_only),
            ..Hello::default()
        },
    )
    .await
    .expect("handshake");
    assert!(got == rsa.der);
}

#[tokio::test]
async fn alpn_agrees_on_http11_and_refuses_a_client_without_it() {
    let pki = Pki::new();
    pki.write_pem("site.pem", &pki.leaf(&["a.test"]));
    let be = backend(|_| ok("hi")).await;
    let (l, addr) = listener();
    let text = format!(
        "{GLOBAL}[[frontend]]\nname = \"web\"\nbind = [{{ address = \"{addr}\", tls = {{ certs = [\"site.pem\"] }} }}]\ndefault_backend = \"app\"\n\
         [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"{}\"\n",
        be.addr
    );
    let _proxy = start(&pki, &text, vec![l]);
    for offered in [&["h2", "http/1.1"][..], &["http/1.1"], &[]] {
        let (tls, _) = handshake(
            addr,
            Hello {
                sni: Some("a.test"),
                alpn: offered,
                ..Hello::default()
            },
        )
        .await
        .expect("handshake");
        let agreed = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let want = (!offered.is_empty()).then(|| b"http/1.1".to_vec());
        assert_eq!(agreed, want, "offered {offered:?}");
        let mut c = Client::over(tls);
        let r = c
            .send(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", false)
            .await
            .expect("reply");
        assert_eq!((r.status, r.text().as_str()), (200, "hi"));
    }
    // A client that speaks only h2 is told there is nothing in common (RFC 7301).
    let refused = handshake(
        addr,
        Hello {
            sni: Some("a.test"),
            alpn: &["h2"],
            ..Hello::default()
        },
    )
    .await;
    assert!(refused.is_err());
}

#[tokio::test]
async fn alpn_h2_gives_http2_to_curl_and_http11_to_a_client_that_asks_for_it() {
    let pki = Pki::new();
    pki.write_pem("site.pem", &pki.leaf(&["a.test"]));
    let (heads, script) = recording_backend_heads();
    let be = backend(script).await;
    let (l, addr) = listener();
    let text = format!(
        "{GLOBAL}[defaults]\nforwardfor = true\n[[frontend]]\nname = \"web\"\nbind = [{{ address = \"{addr}\", tls = {{ certs = [\"site.pem\"], alpn = [\"h2\", \"http/1.1\"] }} }}]\ndefault_backend = \"app\"\n\
         [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"{}\"\n",
        be.addr
    );
    let _proxy = start(&pki, &text, vec![l]);
    let url = format!("https://a.test:{}/h2", addr.port());
    let resolve = format!("a.test:{}:127.0.0.1", addr.port());
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let out = curl(
            &pki,
            &[flag, "--resolve", &resolve, "-w", "\n%{http_version}", &url],
        )
        .await;
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text,
            format!("from the backend\n{version}"),
            "{flag}: {out:?}"
        );
    }
    let heads = heads.lock().expect("lock").clone();
    assert_eq!(heads.len(), 2, "{heads:?}");
    for h in &heads {
        assert!(h.starts_with("GET /h2 HTTP/1.1\r\n"), "{h}");
        assert!(h.contains("X-Forwarded-Proto: https\r\n"), "{h}");
    }
}

#[tokio::test]
async fn curl_gets_the_backend_over_tls_with_x_forwarded_proto_https() {
    let pki = Pki::new();
    pki.write_pem("certs/b.pem", &pki.leaf(&["b.test"]));
    pki.write_pem("certs/a.pem", &pki.leaf(&["a.test"]));
    // Beside the certificates in the directory, and skipped.
    pki.write("certs/notes.ocsp", "not a certificate");
    let (heads, script) = recording_backend_heads();
    let be = backend(script).await;
    let (plain_l, plain) = listener();
    let (tls_l, tls) = listener();
    let text = format!(
        "{GLOBAL}[defaults]\nforwardfor = true\n\
         [[frontend]]\nname = \"web\"\nbind = [\"{plain}\", {{ address = \"{tls}\", tls = {{ certs = [\"certs\"] }} }}]\ndefault_backend = \"app\"\n\
         [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"{}\"\n",
        be.addr
    );
    let _proxy = start(&pki, &text, vec![plain_l, tls_l]);
    let port = tls.port();
    for name in ["a.test", "b.test"] {
        let out = curl(
            &pki,
            &[
                "--resolve",
                &format!("{name}:{port}:127.0.0.1"),
                "-H",
                "X-Forwarded-Proto: http",
                "-H",
                "x-forwarded-proto: ftp",
                &format!("https://{name}:{port}/hello"),
            ],
        )
        .await;
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "from the backend");
    }
    // The same request on the plain bind says http.
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "5", "-H", "X-Forwarded-Proto: https"])
        .arg(format!("http://{plain}/plain"))
        .output()
        .await
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from the backend");
    let heads = heads.lock().expect("lock").clone();
    assert_eq!(heads.len(), 3);
    for (head, want) in heads.iter().zip(["https", "https", "http"]) {
        let protos: Vec<&str> = head
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("x-forwarded-proto:"))
            .collect();
        assert_eq!(protos, [format!("X-Forwarded-Proto: {want}")], "{head}");
        assert!(head.contains("X-Forwarded-For: 127.0.0.1"), "{head}");
    }
}

#[tokio::test]
async fn a_plain_bind_with_redirect_answers_301_to_https() {
    let pki = Pki::new();
    pki.write_pem("site.pem", &pki.leaf(&["a.test"]));
    let be = backend(|_| ok("secure")).await;
    let (plain_l, plain) = listener();
    let (tls_l, tls) = listener();
    let text = format!(
        "{GLOBAL}[[frontend]]\nname = \"web\"\n\
         bind = [{{ address = \"{plain}\", redirect_https = true, redirect_port = {} }}, {{ address = \"{tls}\", tls = {{ certs = [\"site.pem\"] }} }}]\n\
         default_backend = \"app\"\n\
         [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"{}\"\n",
        tls.port(),
        be.addr
    );
    let proxy = start(&pki, &text, vec![plain_l, tls_l]);
    let mut c = Client::connect(plain).await.expect("connect");
    let r = c
        .send(
            format!(
                "GET /a/b?c=d HTTP/1.1\r\nHost: a.test:{}\r\n\r\n",
                plain.port()
            )
            .as_bytes(),
            false,
        )
        .await
        .expect("reply");
    assert_eq!(r.status, 301);
    let location = format!("location: https://a.test:{}/a/b?c=d", tls.port());
    assert!(
        r.head.to_ascii_lowercase().contains(&location),
        "{}",
        r.head
    );
    assert!(!r.closes(), "the connection stays for the next request");
    // A request with a body is answered and the connection closed: its body is not read.
    let r = c
        .send(
            b"POST /form HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\n\r\nabc",
            false,
        )
        .await
        .expect("reply");
    assert_eq!(r.status, 301);
    assert!(r.head.contains("Location: https://a.test:"), "{}", r.head);
    assert!(r.closes() && c.closed().await);
    assert_eq!(be.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
    // curl follows it to the TLS bind and gets the backend's answer.
    let out = curl(
        &pki,
        &[
            "-L",
            "--resolve",
            &format!("a.test:{}:127.0.0.1", plain.port()),
            "--resolve",
            &format!("a.test:{}:127.0.0.1", tls.port()),
            &format!("http://a.test:{}/x", plain.port()),
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "secure");
    assert_eq!(be.requests.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Redirects are answered, not denied.
    let (frontends, _) = proxy.shared().frontend_backend_stats();
    assert_eq!(frontends[0].requests_denied, 0);
}

#[tokio::test]
async fn a_tcp_frontend_terminates_tls_too() {
    let pki = Pki::new();
    pki.write_pem("site.pem", &pki.leaf(&["t.test"]));
    let (heads, script) = recording_backend_heads();
    let be = backend(script).await;
    let (l, addr) = listener();
    let text = format!(
        "{GLOBAL}[[tls]]\nname = \"t\"\ncerts = [\"site.pem\"]\nalpn = []\n\
         [[frontend]]\nname = \"raw\"\nmode = \"tcp\"\nbind = [{{ address = \"{addr}\", tls = \"t\" }}]\ndefault_backend = \"app\"\n\
         [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"{}\"\n",
        be.addr
    );
    let _proxy = start(&pki, &text, vec![l]);
    let (tls, _) = handshake(
        addr,
        Hello {
            sni: Some("t.test"),
            alpn: &["http/1.1"],
            ..Hello::default()
        },
    )
    .await
    .expect("handshake");
    // No ALPN offered by this setting.
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    let mut c = Client::over(tls);
    let r = c
        .send(
            b"GET /raw HTTP/1.1\r\nHost: t.test\r\nX-Forwarded-Proto: mine\r\n\r\n",
            false,
        )
        .await
        .expect("reply");
    assert_eq!(r.text(), "from the backend");
    // Bytes, decrypted, untouched: TCP mode adds no field.
    let heads = heads.lock().expect("lock").clone();
    assert!(heads[0].contains("X-Forwarded-Proto: mine"), "{}", heads[0]);
}

#[tokio::test]
async fn min_version_13_refuses_a_tls12_client() {
    let pki = Pki::new();
    pki.write_pem("site.pem", &pki.leaf(&["a.test"]));
    let be = backend(|_| ok("hi")).await;
    let (l13, a13) = listener();
    let (l12, a12) = listener();
    let text = format!(
        "{GLOBAL}[[frontend]]\nname = \"web\"\n\
         bind = [{{ address = \"{a13}\", tls = {{ certs = [\"site.pem\"], min_version = \"1.3\" }} }}, {{ address = \"{a12}\", tls = {{ certs = [\"site.pem\"] }} }}]\n\
         default_backend = \"app\"\n\
         [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"{}\"\n",
        be.addr
    );
    let _proxy = start(&pki, &text, vec![l13, l12]);
    let tls12 = |addr| {
        handshake(
            addr,
            Hello {
                sni: Some("a.test"),
                tls12: true,
                ..Hello::default()
            },
        )
    };
    assert!(tls12(a13).await.is_err());
    let (tls, _) = tls12(a12).await.expect("1.2 where allowed");
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
}

#[tokio::test]
async fn a_client_that_never_says_hello_frees_its_slot_at_the_handshake_timeout() {
    let pki = Pki::new();
    pki.write_pem("site.pem", &pki.leaf(&["a.test"]));
    let be = backend(|_| ok("hi")).await;
    let (l, addr) = listener();
    let text = format!(
        "{GLOBAL}[defaults]\ntimeout_tls_handshake = \"300ms\"\n\
         [[frontend]]\nname = \"web\"\nmaxconn = 1\nbind = [{{ address = \"{addr}\", tls = {{ certs = [\"site.pem\"] }} }}]\ndefault_backend = \"app\"\n\
         [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"{}\"\n",
        be.addr
    );
    let proxy = start(&pki, &text, vec![l]);
    // Takes the only slot and says nothing.
    let mut silent = Client::connect(addr).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(proxy.stats().active_connections, 1);
    let began = Instant::now();
    let (tls, _) = handshake(
        addr,
        Hello {
            sni: Some("a.test"),
            ..Hello::default()
        },
    )
    .await
    .expect("served once the silent one is gone");
    let waited = began.elapsed();
    assert!(
        waited >= Duration::from_millis(200),
        "the handshake counted against maxconn: {waited:?}"
    );
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    assert!(silent.closed().await, "the silent connection was closed");
    let r = Client::over(tls)
        .send(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", false)
        .await
        .expect("reply");
    assert_eq!(r.status, 200);
}

#[test]
fn tls_settings_are_checked_at_their_line() {
    let pki = Pki::new();
    pki.write_pem("a.pem", &pki.leaf(&["a.test", "*.w.test"]));
    pki.write_pem("a2.pem", &pki.leaf(&["a.test"]));
    let bind = |tls: &str| {
        format!(
            "{GLOBAL}[[frontend]]\nname = \"web\"\nbind = [\"127.0.0.1:1\", {{ address = \"127.0.0.1:2\", {tls} }}]\ndefault_backend = \"app\"\n\
             [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"127.0.0.1:9\"\n"
        )
    };
    let good = load(&pki, &bind("tls = { certs = [\"a.pem\"] }")).expect("valid");
    let b = &good.frontends[0].bind;
    assert_eq!((b[0].tls, b[1].tls), (None, Some(0)));
    assert_eq!(good.tls[0].name, "web 127.0.0.1:2");
    assert_eq!(good.tls[0].certs[0].names, ["*.w.test", "a.test"]);
    assert!(good.warnings.is_empty(), "{:?}", good.warnings);
    for (tls, why) in [
        ("tls = { certs = [\"a.pem\"], bogus = 1 }", "bogus"),
        ("bogus = 1", "bogus"),
        ("tls = \"nope\"", "unknown tls 'nope'"),
        ("tls = { certs = [] }", "has no certificate"),
        (
            "tls = { certs = [\"a.pem\"], alpn = [\"h2\", \"h2\"] }",
            "given twice",
        ),
        (
            "tls = { certs = [\"a.pem\"] }, h2c = true",
            "on a tls bind, offer h2 with alpn",
        ),
        (
            "tls = { certs = [\"a.pem\"], alpn = [\"spdy/3\"] }",
            "unknown alpn",
        ),
        (
            "tls = { certs = [\"a.pem\"], min_version = \"1.1\" }",
            "bad min_version",
        ),
        (
            "tls = { name = \"x\", certs = [\"a.pem\"] }",
            "takes no name",
        ),
        (
            "tls = { certs = [\"a.pem\", \"a2.pem\"] }",
            "both serve 'a.test'",
        ),
        (
            "tls = { certs = [\"a.pem\"] }, redirect_https = true",
            "plain binds",
        ),
        ("redirect_port = 443", "needs redirect_https"),
        ("tls = { certs = [\"missing.pem\"] }", "cannot read"),
        ("tls = 5", "a string or a table"),
    ] {
        let e = load(&pki, &bind(tls)).expect_err(tls);
        assert_eq!(e.at.map(|a| a.0), Some(6), "{tls}: {e}");
        assert!(e.reason.contains(why), "{tls}: {e}");
    }
    // [[tls]] needs a name, and a unique one.
    let named = |t: &str| {
        format!(
            "{GLOBAL}{t}[[frontend]]\nname = \"web\"\nbind = [\"127.0.0.1:1\"]\ndefault_backend = \"app\"\n\
             [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"127.0.0.1:9\"\n"
        )
    };
    let e = load(&pki, &named("[[tls]]\ncerts = [\"a.pem\"]\n")).expect_err("no name");
    assert!(e.reason.contains("needs a name"), "{e}");
    let twice =
        "[[tls]]\nname = \"t\"\ncerts = [\"a.pem\"]\n[[tls]]\nname = \"t\"\ncerts = [\"a.pem\"]\n";
    let e = load(&pki, &named(twice)).expect_err("twice");
    assert!(e.reason.contains("duplicate tls name"), "{e}");
    assert_eq!(e.at.map(|a| a.0), Some(8), "{e}");
    // A redirect needs http.
    let tcp =
        bind("redirect_https = true").replace("name = \"web\"", "name = \"web\"\nmode = \"tcp\"");
    let e = load(&pki, &tcp).expect_err("tcp redirect");
    assert!(e.reason.contains("tcp mode"), "{e}");
    let tcp = bind("h2c = true").replace("name = \"web\"", "name = \"web\"\nmode = \"tcp\"");
    let e = load(&pki, &tcp).expect_err("tcp h2c");
    assert!(e.reason.contains("tcp mode"), "{e}");
    let h2 = load(
        &pki,
        &bind("tls = { certs = [\"a.pem\"], alpn = [\"h2\", \"http/1.1\"] }"),
    )
    .expect("h2 is offered");
    assert_eq!(h2.tls[0].alpn.len(), 2);
}

/// `proxyd check` on a config naming `certs`, in the pki dir.
fn check(pki: &Pki, certs: &str) -> (Option<i32>, String, String, PathBuf) {
    let config = pki.write(
        "check.toml",
        &format!(
            "{GLOBAL}[[frontend]]\nname = \"web\"\nbind = [{{ address = \"127.0.0.1:8443\", tls = {{ certs = {certs} }} }}]\ndefault_backend = \"app\"\n\
             [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"127.0.0.1:9\"\n"
        ),
    );
    let out = Command::new(PROXYD)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("proxyd check");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        config,
    )
}

#[test]
fn check_refuses_certificates_that_cannot_serve_and_names_the_file() {
    let pki = Pki::new();
    let a = pki.leaf(&["a.test"]);
    let b = pki.leaf(&["b.test"]);
    pki.write_pem("good.pem", &a);
    let (code, out, err, _) = check(&pki, "[\"good.pem\"]");
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.ends_with("check.toml: ok\n") && err.is_empty(),
        "{out}{err}"
    );

    // b's key with a's certificate.
    let mismatch = pki.write("mismatch.pem", &format!("{}{}", a.cert, b.key));
    pki.write("pair.crt", &a.cert);
    let wrong_key = pki.write("pair.key", &b.key);
    pki.write("nokey.pem", &a.cert);
    let garbage = pki.write("garbage.pem", "hello, not a certificate\n");
    pki.write(
        "badbase64.pem",
        "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
    );
    pki.write_pem(
        "expired.pem",
        &pki.leaf_with(&["old.test"], -1, KeyPair::generate().expect("key")),
    );
    let path = |f: &str| pki.path(f).display().to_string();
    let cases = [
        (
            "[\"good.pem\", \"mismatch.pem\"]".to_owned(),
            format!(
                "the private key in '{}' does not match the certificate in '{}'",
                mismatch.display(),
                mismatch.display()
            ),
        ),
        (
            "[{ cert = \"pair.crt\", key = \"pair.key\" }]".to_owned(),
            format!(
                "the private key in '{}' does not match",
                wrong_key.display()
            ),
        ),
        (
            "[\"nokey.pem\"]".to_owned(),
            format!("no private key for '{}'", path("nokey.pem")),
        ),
        (
            "[\"garbage.pem\"]".to_owned(),
            format!("no certificate in '{}'", garbage.display()),
        ),
        (
            "[\"badbase64.pem\"]".to_owned(),
            format!("'{}' is not valid PEM", path("badbase64.pem")),
        ),
        (
            "[\"expired.pem\"]".to_owned(),
            format!("the certificate in '{}' expired on ", path("expired.pem")),
        ),
    ];
    for (certs, why) in cases {
        let (code, _, err, config) = check(&pki, &certs);
        assert_eq!(code, Some(64), "{certs}: {err}");
        assert!(
            err.starts_with(&format!("{}:6:", config.display())),
            "{certs}: {err}"
        );
        assert!(err.contains(&why), "{certs}: {err}");
    }
}

#[test]
fn check_warns_of_a_certificate_about_to_expire_and_still_passes() {
    let pki = Pki::new();
    pki.write_pem(
        "soon.pem",
        &pki.leaf_with(&["soon.test"], 5, KeyPair::generate().expect("key")),
    );
    let (code, out, err, config) = check(&pki, "[\"soon.pem\"]");
    assert_eq!(code, Some(0), "{err}");
    assert!(out.ends_with(": ok\n"), "{out}");
    let want = format!("warning: {}:6:", config.display());
    assert!(err.starts_with(&want), "{err}");
    assert!(
        err.contains(&format!(
            "the certificate in '{}' expires in 4 days",
            pki.path("soon.pem").display()
        )) || err.contains(&format!(
            "the certificate in '{}' expires in 5 days",
            pki.path("soon.pem").display()
        )),
        "{err}"
    );
}

/// The real proxyd (master and worker) over an in-process fdkeeper.
struct Running {
    master: Child,
    fdk_stop: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.master.kill();
        let _ = self.master.wait();
        self.fdk_stop.cancel();
    }
}

/// A running proxyd over a TLS bind, and where to reach it.
struct Launched {
    _running: Running,
    config: PathBuf,
    admin: PathBuf,
    /// The TLS bind.
    addr: SocketAddr,
    metrics: SocketAddr,
}

/// Starts the real proxyd in the pki dir with one TLS bind whose `tls` is `tls` (a bind's own
/// settings, or the name of a `[[tls]]` in `sections`), and waits until it serves TLS.
async fn launch(pki: &Pki, tls: &str, sections: &str) -> Launched {
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
    let fdk_stop = start_fdkeeper(pki.dir.path());
    let master = Command::new(PROXYD)
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()),
        )
        .spawn()
        .expect("spawn proxyd");
    let running = Running { master, fdk_stop };
    let deadline = Instant::now() + Duration::from_secs(10);
    while handshake(addr, hello()).await.is_err() {
        assert!(Instant::now() < deadline, "proxyd never served TLS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Launched {
        _running: running,
        config,
        admin: pki.dir.path().join("proxyd/admin.sock"),
        addr,
        metrics,
    }
}

/// A client of `a.test`.
fn hello() -> Hello<'static> {
    Hello {
        sni: Some("a.test"),
        ..Hello::default()
    }
}

async fn admin(path: &Path) -> api::admin_client::AdminClient<tonic::transport::Channel> {
    let channel = common::grpc::connect_unix(path)
        .await
        .expect("admin socket");
    api::admin_client::AdminClient::new(channel)
}

async fn status(path: &Path) -> api::StatusReply {
    admin(path)
        .await
        .status(api::StatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

/// The serving generation's number and worker pid, and how many generations there are.
async fn serving(path: &Path) -> (u64, u32, usize) {
    let s = status(path).await;
    let g = s
        .generations
        .iter()
        .find(|g| g.state == api::GenerationState::Serving as i32)
        .expect("a serving generation");
    (
        g.generation,
        g.worker.as_ref().map_or(0, |w| w.pid),
        s.generations.len(),
    )
}

/// The certificate new connections get, once it is `want`: how long that took.
async fn served_within(addr: SocketAddr, want: &Leaf, limit: Duration) -> Duration {
    let began = Instant::now();
    loop {
        let (_, got) = handshake(addr, hello()).await.expect("handshake");
        if got == want.der {
            return began.elapsed();
        }
        assert!(
            began.elapsed() < limit,
            "serial {} not served within {limit:?}",
            want.serial
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET /metrics` from the master.
async fn metrics(addr: SocketAddr) -> String {
    let mut c = Client::connect(addr).await.expect("metrics");
    let r = c
        .send(b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n", false)
        .await
        .expect("metrics reply");
    assert_eq!(r.status, 200);
    r.text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_broken_certificate_is_refused_and_tls_keeps_serving() {
    let pki = Pki::new();
    let first = pki.leaf(&["a.test"]);
    pki.write_pem("site.pem", &first);
    let proxyd = launch(&pki, "{ certs = [\"site.pem\"] }", "").await;
    let (addr, config) = (proxyd.addr, &proxyd.config);
    let served = handshake(addr, hello()).await.expect("serving");
    assert!(served.1 == first.der);
    let reload = || {
        Command::new(PROXYD)
            .args(["reload", "--config"])
            .arg(config)
            .output()
            .expect("proxyd reload")
    };

    // Another key under the same certificate: the reload is refused, with the file named.
    let other = pki.leaf(&["b.test"]);
    let site = pki.write("site.pem", &format!("{}{}", first.cert, other.key));
    let out = reload();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains(&format!(
            "does not match the certificate in '{}'",
            site.display()
        )),
        "{err}"
    );
    // The running generation still serves its certificate, on new connections too.
    let (tls, got) = handshake(addr, hello()).await.expect("still serving");
    assert!(got == first.der);
    let r = Client::over(tls)
        .send(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", false)
        .await
        .expect("reply");
    assert_eq!(r.text(), "hi");

    // A good new certificate is served after the next reload.
    let renewed = pki.leaf(&["a.test"]);
    pki.write_pem("site.pem", &renewed);
    let out = reload();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The old generation may take a last connection from the shared queue between the new
    // one's Ready and its own Drain: a new handshake gets the new certificate soon, not at once.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (_, got) = handshake(addr, hello())
            .await
            .expect("serving after reload");
        if got == renewed.der {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate is not served 3 s after the reload"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(served);
}

/// Within this, a new connection gets a certificate rotated on disk: the master looks every
/// second and waits a quarter of one for the files to stand still.
const ROTATED_WITHIN: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_rotated_on_disk_serves_new_connections_without_a_reload() {
    let pki = Pki::new();
    let first = pki.leaf(&["a.test"]);
    let site = pki.write_pem("site.pem", &first);
    let proxyd = launch(
        &pki,
        "\"site\"",
        "[[tls]]\nname = \"site\"\ncerts = [\"site.pem\"]\n",
    )
    .await;
    let before = serving(&proxyd.admin).await;
    // Kept open across both rotations: it keeps the certificate it got.
    let (mut open, got) = handshake(proxyd.addr, hello()).await.expect("handshake");
    assert!(got == first.der);

    // Renewed as most tools do: a new file renamed over the old one.
    let renamed = pki.leaf(&["a.test"]);
    pki.write_pem("site.pem.new", &renamed);
    std::fs::rename(pki.path("site.pem.new"), &site).expect("rename");
    let took = served_within(proxyd.addr, &renamed, ROTATED_WITHIN).await;
    eprintln!("renamed: served after {took:?}");

    // Then written in place.
    let written = pki.leaf(&["a.test"]);
    std::fs::write(&site, format!("{}{}", written.cert, written.key)).expect("write");
    let took = served_within(proxyd.addr, &written, ROTATED_WITHIN).await;
    eprintln!("written in place: served after {took:?}");

    // No reload: the same generation and worker, alone.
    assert_eq!(serving(&proxyd.admin).await, before);
    // The connection opened before the rotations still works.
    let r = Client::over(&mut open)
        .send(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", false)
        .await
        .expect("reply on the old connection");
    assert_eq!(r.text(), "hi");
    assert!(open.get_ref().1.peer_certificates().expect("certs")[0].as_ref() == first.der);

    // Status and /metrics tell what is served and when it expires.
    let st = status(&proxyd.admin).await;
    let tls = &st.tls[0];
    assert_eq!(tls.name, "site");
    assert_eq!((tls.rotations_loaded, tls.rotations_refused), (2, 0));
    let cert = &tls.certificates[0];
    assert_eq!(cert.serial, written.serial);
    assert_eq!(cert.names, ["a.test"]);
    assert_eq!(cert.path, site.display().to_string());
    assert_eq!(cert.key_type, "ECDSA");
    let in_a_year = time::OffsetDateTime::now_utc().unix_timestamp() + 365 * 86_400;
    assert!((cert.not_after_unix - in_a_year).abs() < 60, "{cert:?}");
    let last = tls.last_rotation.as_ref().expect("last rotation");
    assert_eq!(last.outcome, api::RotationOutcome::RotationLoaded as i32);
    assert!(last.message.contains(&written.serial), "{}", last.message);
    let text = metrics(proxyd.metrics).await;
    let expiry = format!(
        "proxyd_tls_certificate_expiry_timestamp_seconds{{tls=\"site\",name=\"a.test\",serial=\"{}\"}} {}\n",
        written.serial, cert.not_after_unix
    );
    assert!(text.contains(&expiry), "{expiry} in\n{text}");
    assert!(
        text.contains("proxyd_tls_certificate_rotations_total{tls=\"site\",result=\"loaded\"} 2\n"),
        "{text}"
    );
    assert!(
        text.contains("proxyd_frontend_tls_handshake_failures_total{frontend=\"web\"} 0\n"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_to_a_key_that_does_not_match_is_refused_and_the_old_certificate_serves() {
    let pki = Pki::new();
    let first = pki.leaf(&["a.test"]);
    pki.write("site.crt", &first.cert);
    let key = pki.write("site.key", &first.key);
    let proxyd = launch(
        &pki,
        "{ certs = [{ cert = \"site.crt\", key = \"site.key\" }] }",
        "",
    )
    .await;
    let before = serving(&proxyd.admin).await;

    // Another key beside the same certificate.
    let other = pki.leaf(&["a.test"]);
    std::fs::write(&key, &other.key).expect("write");
    let why = format!(
        "the private key in '{}' does not match the certificate in '{}'",
        key.display(),
        pki.path("site.crt").display()
    );
    let began = Instant::now();
    let refused = loop {
        let st = status(&proxyd.admin).await;
        if let Some(last) = st.tls[0].last_rotation.clone() {
            break (last, st.tls[0].rotations_refused);
        }
        assert!(began.elapsed() < Duration::from_secs(5), "never read");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        refused.0.outcome,
        api::RotationOutcome::RotationRefused as i32
    );
    assert!(refused.0.message.contains(&why), "{}", refused.0.message);
    assert_eq!(refused.1, 1);
    // The old certificate serves, with its own key.
    let (tls, got) = handshake(proxyd.addr, hello())
        .await
        .expect("still serving");
    assert!(got == first.der);
    let r = Client::over(tls)
        .send(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", false)
        .await
        .expect("reply");
    assert_eq!(r.text(), "hi");
    let st = status(&proxyd.admin).await;
    assert_eq!(st.tls[0].certificates[0].serial, first.serial);
    let text = metrics(proxyd.metrics).await;
    assert!(
        text.contains("proxyd_tls_certificate_last_rotation_refused{tls=\"web "),
        "{text}"
    );

    // A worker that dies now comes back with the certificate the master serves, not with
    // the broken files on disk.
    let (generation, pid, _) = serving(&proxyd.admin).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the worker");
    let began = Instant::now();
    loop {
        let now = serving(&proxyd.admin).await;
        if now.0 == generation && now.1 != pid && now.1 != 0 {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "no worker serving again after the kill: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, got) = handshake(proxyd.addr, hello())
        .await
        .expect("the respawned worker serves");
    assert!(got == first.der);

    // Asking says why too, and loads nothing.
    let e = admin(&proxyd.admin)
        .await
        .reload_certificates(api::ReloadCertificatesRequest {})
        .await
        .expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains(&why), "{}", e.message());
    assert!(e.message().starts_with("tls 'web "), "{}", e.message());

    // The matching pair, then ReloadCertificates at once: it answers with what serves, once
    // the worker serves it.
    let renewed = pki.leaf(&["a.test"]);
    pki.write("site.crt", &renewed.cert);
    pki.write("site.key", &renewed.key);
    let reply = admin(&proxyd.admin)
        .await
        .reload_certificates(api::ReloadCertificatesRequest {})
        .await
        .expect("loaded")
        .into_inner();
    assert_eq!(reply.generation, before.0);
    let tls = &reply.tls[0];
    assert_eq!(tls.certificates.len(), 1);
    assert_eq!(tls.certificates[0].serial, renewed.serial);
    assert_eq!(tls.certificates[0].names, ["a.test"]);
    let (_, got) = handshake(proxyd.addr, hello()).await.expect("handshake");
    assert!(got == renewed.der, "served as soon as the call returned");
    assert_eq!(
        serving(&proxyd.admin).await.0,
        before.0,
        "no new generation"
    );

    // Asked again, nothing changed.
    let reply = admin(&proxyd.admin)
        .await
        .reload_certificates(api::ReloadCertificatesRequest {})
        .await
        .expect("unchanged")
        .into_inner();
    let last = reply.tls[0].last_rotation.as_ref().expect("outcome");
    assert_eq!(last.outcome, api::RotationOutcome::RotationUnchanged as i32);
    assert_eq!(reply.tls[0].rotations_loaded, 1);
}

/// A client configuration that keeps its sessions, to resume them (TLS 1.2 only, or 1.3).
fn resuming_client(tls12: bool) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let recorder = Arc::new(Recorder {
        seen: Mutex::new(None),
        schemes: provider
            .signature_verification_algorithms
            .supported_schemes(),
    });
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12 {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(recorder)
        .with_no_client_auth();
    Arc::new(config)
}

/// Connects with `config`, sends a request and reads its answer (which also reads the session
/// tickets a TLS 1.3 server sends after the handshake); whether the handshake resumed.
async fn resumed(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> bool {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("a.test").expect("name");
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .expect("handshake");
    let kind = tls.get_ref().1.handshake_kind();
    let r = Client::over(tls)
        .send(
            b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
            false,
        )
        .await
        .expect("reply");
    assert_eq!(r.text(), "hi");
    kind == Some(rustls::HandshakeKind::Resumed)
}

/// `openssl s_client` over TLS 1.2, saving its session to `out` or resuming the one in `input`:
/// whether it says it reused it.
async fn openssl_reused(addr: SocketAddr, session: &Path, resume: bool) -> bool {
    let out = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            "a.test",
            "-tls1_2",
        ])
        .arg(if resume { "-sess_in" } else { "-sess_out" })
        .arg(session)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("a.test"), "{text}");
    text.contains("\nReused, ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_session_resumes_on_the_generation_after_a_reload() {
    let pki = Pki::new();
    pki.write_pem("site.pem", &pki.leaf(&["a.test"]));
    let proxyd = launch(&pki, "{ certs = [\"site.pem\"] }", "").await;
    let before = serving(&proxyd.admin).await;
    let tls13 = resuming_client(false);
    let tls12 = resuming_client(true);
    let session = pki.path("openssl.session");
    assert!(
        !resumed(proxyd.addr, &tls13).await,
        "a first handshake is full"
    );
    assert!(!resumed(proxyd.addr, &tls12).await);
    assert!(!openssl_reused(proxyd.addr, &session, false).await);
    assert!(
        resumed(proxyd.addr, &tls13).await,
        "resumed on the same worker"
    );

    let out = Command::new(PROXYD)
        .args(["reload", "--config"])
        .arg(&proxyd.config)
        .output()
        .expect("proxyd reload");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = serving(&proxyd.admin).await;
    assert!(
        after.0 > before.0 && after.1 != before.1,
        "{before:?} then {after:?}"
    );
    // The old worker is gone, or at least no longer accepting: the new one resumes.
    assert!(
        resumed(proxyd.addr, &tls13).await,
        "TLS 1.3 resumed after the reload"
    );
    assert!(
        resumed(proxyd.addr, &tls12).await,
        "TLS 1.2 resumed after the reload"
    );
    assert!(
        openssl_reused(proxyd.addr, &session, true).await,
        "openssl's saved session resumed after the reload"
    );
}

#[test]
fn the_tls_example_is_valid_with_its_certificates_in_place() {
    let pki = Pki::new();
    pki.write_pem(
        "certs/www.example.com.pem",
        &pki.leaf(&["www.example.com", "example.com"]),
    );
    let api = pki.leaf(&["api.example.com"]);
    pki.write("certs/api.example.com.crt", &api.cert);
    pki.write("certs/api.example.com.key", &api.key);
    let shop = pki.leaf(&["*.shop.example.com"]);
    pki.write("certs/more/shop.crt", &shop.cert);
    pki.write("certs/more/shop.key", &shop.key);
    pki.write_pem(
        "certs/mail.example.com.pem",
        &pki.leaf(&["mail.example.com"]),
    );
    let text = include_str!("../../examples/proxyd-tls.toml");
    let c = load(&pki, text).expect("the example is valid");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let site = &c.tls[0];
    assert_eq!(site.certs.len(), 3);
    assert_eq!(site.certs[2].names, ["*.shop.example.com"]);
    let www = &c.frontends[0].bind;
    assert!(www[0].redirect_https.is_some() && www[1].tls == Some(0));
    assert_eq!(c.frontends[1].bind[0].tls, Some(1));
    assert!(c.tls[1].alpn.is_empty());
}

#[tokio::test]
async fn large_bodies_cross_tls_both_ways_on_a_kept_alive_connection() {
    let pki = Pki::new();
    pki.write_pem("site.pem", &pki.leaf(&["a.test"]));
    // More than the socket buffers hold: the proxy's writes block while the client waits.
    let big = 16 * 1024 * 1024;
    let be = backend(move |s| {
        let body = vec![b'x'; big + s.body.len()];
        let mut r =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        r.extend_from_slice(&body);
        Action::Respond(r)
    })
    .await;
    let (l, addr) = listener();
    let text = format!(
        "{GLOBAL}[[frontend]]\nname = \"web\"\nbind = [{{ address = \"{addr}\", tls = {{ certs = [\"site.pem\"] }} }}]\ndefault_backend = \"app\"\n\
         [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"{}\"\n",
        be.addr
    );
    let _proxy = start(&pki, &text, vec![l]);
    let (tls, _) = handshake(
        addr,
        Hello {
            sni: Some("a.test"),
            ..Hello::default()
        },
    )
    .await
    .expect("handshake");
    let mut c = Client::over(tls);
    let upload = 1024 * 1024;
    for _ in 0..3 {
        let mut req =
            format!("POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: {upload}\r\n\r\n")
                .into_bytes();
        req.extend(std::iter::repeat_n(b'u', upload));
        use tokio::io::AsyncWriteExt;
        c.io.stream.write_all(&req).await.expect("send");
        c.io.stream.flush().await.expect("send");
        // Reads only once the proxy is stuck writing: what it wrote last must still come.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = c.read(false).await.expect("reply");
        assert_eq!((r.status, r.body.len()), (200, big + upload));
        assert!(!r.closes());
    }
}
