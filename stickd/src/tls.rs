//! Optional mTLS between peers: both sides present a certificate signed by the configured CA.

use tonic::transport::{
    Certificate, CertificateDer, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};

use crate::config::{Config, Tls};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read tls {what} '{path}': {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("tls set-up: {0}")]
    Transport(#[from] tonic::transport::Error),
}

fn read(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

fn identity(tls: &Tls) -> Result<(Identity, Certificate), TlsError> {
    let cert = read("cert", &tls.cert)?;
    let key = read("key", &tls.key)?;
    let ca = read("ca", &tls.ca)?;
    Ok((Identity::from_pem(cert, key), Certificate::from_pem(ca)))
}

/// The server side: client certificates signed by the CA are required.
pub fn server(tls: &Tls) -> Result<ServerTlsConfig, TlsError> {
    let (id, ca) = identity(tls)?;
    Ok(ServerTlsConfig::new()
        .identity(id)
        .client_ca_root(ca)
        .client_auth_optional(false))
}

/// Adds our certificate and the CA to a peer endpoint when mTLS is configured.
pub fn client(ep: Endpoint, config: &Config) -> Result<Endpoint, tonic::transport::Error> {
    let Some(tls) = &config.tls else {
        return Ok(ep);
    };
    // Files were checked at load time; a failure here is reported on the connection attempt.
    let (id, ca) = match identity(tls) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "cannot load tls files for a peer connection");
            return Ok(ep);
        }
    };
    let host = ep
        .uri()
        .host()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_owned();
    ep.tls_config(
        ClientTlsConfig::new()
            .ca_certificate(ca)
            .identity(id)
            .domain_name(host),
    )
}

/// Checks that a peer's client certificate names the peer it claims to be in its hello: one of
/// the certificate's DNS subject alternative names must be that name. The CA vouches for the
/// certificate; without this, any certificate it signed could claim to be any configured peer.
pub fn check_peer_name(certs: Option<&[CertificateDer<'_>]>, peer: &str) -> Result<(), String> {
    let Some(cert) = certs.and_then(<[_]>::first) else {
        return Err("no client certificate".to_owned());
    };
    let cert = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| format!("cannot read the client certificate: {e}"))?;
    let name = rustls_pki_types::ServerName::try_from(peer)
        .map_err(|_| format!("peer name '{peer}' cannot appear in a certificate"))?;
    cert.verify_is_valid_for_subject_name(&name).map_err(|_| {
        format!(
            "the client certificate does not name '{peer}' (no such DNS subject alternative name)"
        )
    })
}
