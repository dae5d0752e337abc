//! The TLS transport under the protocols: rustls's server settings of each `[[tls]]` (or a
//! bind's own), and the handshake that turns an accepted TCP stream into a [`ClientStream`]
//! ([`TlsStream`], on rustls's unbuffered API) bounded by its own timeout.
//!
//! `serve` runs the handshake inside the connection's task, after its `maxconn` slot is taken:
//! a handshake counts as a connection, and one that stalls gives its slot back at the timeout.
//! Certificates are chosen per handshake by [`sni::SniResolver`], whose store a rotation
//! replaces ([`TlsServer::replace_certificates`]) without a new generation. Sessions resume
//! through tickets sealed with the master's keys ([`tickets`]), so across reloads too.
//!
//! [`ClientStream`]: super::ClientStream

pub mod sni;
mod stream;
pub mod tickets;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::version::{TLS12, TLS13};
use tokio::net::TcpStream;

pub use stream::TlsStream;

use crate::config::tls::{AppProtocol, LoadedCert, Tls, TlsVersion, provider};

/// The server side of one TLS setting, shared by its binds' connections.
#[derive(Clone)]
pub struct TlsServer {
    config: Arc<ServerConfig>,
    certs: Arc<sni::SniResolver>,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsServer")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("no handshake within {} ms", .0.as_millis())]
    TimedOut(Duration),
    #[error("{0}")]
    Failed(#[from] io::Error),
}

impl TlsServer {
    /// rustls's settings for `tls`, its tickets sealed with `tickets`; fails only on settings
    /// rustls refuses.
    pub fn new(tls: &Tls, tickets: &Arc<tickets::TicketKeys>) -> Result<Self, rustls::Error> {
        let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
            TlsVersion::V1_2 => &[&TLS13, &TLS12],
            TlsVersion::V1_3 => &[&TLS13],
        };
        let certs = Arc::new(sni::SniResolver::new(&tls.certs));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)?
            .with_no_client_auth()
            .with_cert_resolver(certs.clone());
        config.alpn_protocols = tls.alpn.iter().map(|p| p.id().to_vec()).collect();
        config.ticketer = Arc::new(tickets::Ticketer::new(tickets.clone(), &tls.name));
        Ok(Self {
            config: Arc::new(config),
            certs,
        })
    }

    /// Serves `certs` to the handshakes that begin from now on.
    pub fn replace_certificates(&self, certs: &[Arc<LoadedCert>]) {
        self.certs.replace(certs);
    }

    /// Runs the server side of a handshake on `stream` for at most `timeout`: the stream (on
    /// the heap: rustls's connection is large, and moves and futures that pass it on then
    /// cost a pointer), and the protocol agreed through ALPN (none when the client offered
    /// none).
    pub async fn accept(
        &self,
        stream: TcpStream,
        timeout: Duration,
    ) -> Result<(Box<TlsStream>, Option<AppProtocol>), HandshakeError> {
        let mut tls =
            Box::new(TlsStream::new(stream, self.config.clone()).map_err(io::Error::other)?);
        tokio::time::timeout(timeout, tls.handshake())
            .await
            .map_err(|_| HandshakeError::TimedOut(timeout))??;
        let alpn = tls.session().alpn_protocol().and_then(AppProtocol::from_id);
        Ok((tls, alpn))
    }
}
