//! TLS sessions with the real proxyd resume on the generation after a reload (the master hands
//! each generation its ticket keys): rustls over TLS 1.3 and 1.2, and openssl s_client.

mod util;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use util::master::serving;
use util::tls::{Pki, Recorder, launch, s_client};
use util::{Client, cli};

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
    let flag = if resume { "-sess_in" } else { "-sess_out" };
    let session = session.display().to_string();
    let text = s_client(addr, &["-servername", "a.test", "-tls1_2", flag, &session]).await;
    assert!(text.contains("a.test"), "{text}");
    text.contains("\nReused, ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_session_resumes_on_the_generation_after_a_reload() {
    let pki = Pki::new();
    pki.write_pem("site.pem", &pki.leaf(&["a.test"]));
    let proxyd = launch(&pki, "{ certs = [\"site.pem\"] }", "").await;
    let before = serving(&proxyd.admin).await.expect("serving");
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

    let out = cli(&["reload"], &proxyd.config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = serving(&proxyd.admin).await.expect("serving");
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
