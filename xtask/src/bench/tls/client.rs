//! The tls bench's own TLS client (rustls on ring, through tokio-rustls): bounded loops of full
//! or resumed handshakes, and many idle connections held open after their handshake.
//!
//! It checks no certificate (the bench's are self-signed, and checking them would only add the
//! client's verification to the two cores the targets share); the servers do all of their work.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, HandshakeKind, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::targets::SERVER_NAME;

/// Longest wait for one connect and handshake, and for the server's close after ours.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// What a handshake loop did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Handshakes {
    pub done: u64,
    /// Of `done`, how many resumed a session.
    pub resumed: u64,
    pub errors: u64,
    pub seconds: f64,
}

/// `concurrency` connections at a time for `duration`, each: connect, handshake, close_notify,
/// read to the server's close (which also takes in the session tickets it sent). With `resume`,
/// each loop keeps its own session cache, so that each handshake after its first resumes with a
/// ticket from the one before.
pub async fn handshakes(
    addr: SocketAddr,
    concurrency: usize,
    duration: Duration,
    resume: bool,
) -> Result<Handshakes> {
    let shared = Arc::new(config(resume));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        // A cache of its own per loop: one shared cache would hand a ticket to whichever loop
        // asked first, and leave others with none.
        let connector = TlsConnector::from(if resume {
            Arc::new(config(true))
        } else {
            Arc::clone(&shared)
        });
        tasks.spawn(async move {
            let mut out = Handshakes::default();
            while Instant::now() < deadline {
                match tokio::time::timeout(STEP_TIMEOUT, one(&connector, addr)).await {
                    Ok(Ok(kind)) => {
                        out.done += 1;
                        out.resumed += u64::from(kind == Some(HandshakeKind::Resumed));
                    }
                    Ok(Err(_)) | Err(_) => {
                        out.errors += 1;
                        // A refused or broken target: do not spin on it.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            out
        });
    }
    let mut total = Handshakes::default();
    while let Some(r) = tasks.join_next().await {
        let r = r.context("a handshake loop panicked")?;
        total.done += r.done;
        total.resumed += r.resumed;
        total.errors += r.errors;
    }
    total.seconds = started.elapsed().as_secs_f64();
    Ok(total)
}

/// One connection: handshake, close_notify, the server's close. Returns the handshake's kind.
async fn one(connector: &TlsConnector, addr: SocketAddr) -> Result<Option<HandshakeKind>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut tls = connector.connect(server_name(), tcp).await?;
    let kind = tls.get_ref().1.handshake_kind();
    // The handshake is what counts; how the server ends the connection does not (nginx closes
    // without a close_notify of its own, which rustls reports as an error).
    let _ = tls.shutdown().await;
    let mut sink = [0u8; 512];
    while let Ok(1..) = tls.read(&mut sink).await {}
    Ok(kind)
}

/// Opens `n` TLS connections to `addr`, `parallel` handshakes at a time, and returns their
/// sockets once every handshake is complete; the client's TLS state is dropped (the servers
/// cannot tell), so that the client's own memory stays small. Bounded by `limit` overall.
pub async fn open_idle(
    addr: SocketAddr,
    n: usize,
    parallel: usize,
    limit: Duration,
) -> Result<Vec<TcpStream>> {
    let connector = TlsConnector::from(Arc::new(config(false)));
    let deadline = Instant::now() + limit;
    let per = n.div_ceil(parallel);
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..parallel {
        let count = per.min(n.saturating_sub(w * per));
        let connector = connector.clone();
        tasks.spawn(async move {
            let mut held = Vec::with_capacity(count);
            for _ in 0..count {
                let left = deadline.saturating_duration_since(Instant::now());
                let open = async {
                    let tcp = TcpStream::connect(addr).await?;
                    let tls = connector.connect(server_name(), tcp).await?;
                    anyhow::Ok(tls.into_inner().0)
                };
                match tokio::time::timeout(left, open).await {
                    Ok(r) => held.push(r?),
                    Err(_) => bail!("{} connections open when the time ran out", held.len()),
                }
            }
            anyhow::Ok(held)
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        all.extend(r.context("an opening loop panicked")??);
    }
    Ok(all)
}

fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME).expect("a valid DNS name")
}

/// TLS 1.3 and 1.2 on ring, no client certificate, tickets kept in memory when `resume`.
fn config(resume: bool) -> ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    c.resumption = if resume {
        rustls::client::Resumption::in_memory_sessions(8)
    } else {
        rustls::client::Resumption::disabled()
    };
    c
}

/// Accepts any certificate and signature: the bench measures the servers, not this client.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
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
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
