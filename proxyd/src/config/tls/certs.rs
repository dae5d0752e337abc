//! Certificate files: PEM chains and their keys read from disk, each key checked against its
//! certificate, each certificate's DNS names and dates read; a file that cannot serve is refused
//! with its name.
//!
//! A worker calls this when it loads its config, and the master and `proxyd check` when they
//! validate one, so a broken certificate is found before a generation starts.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::SignatureAlgorithm;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::x509;

/// Files that sit beside certificates in a directory and are not certificates: HAProxy's
/// convention for a directory given as `crt`.
const NOT_CERTS: [&str; 5] = [".key", ".ocsp", ".issuer", ".sctl", ".dh"];

/// Where a certificate comes from, as the config names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertSource {
    /// A PEM file with the chain and its key (or the key in `FILE.key`), or a directory of them.
    Path(PathBuf),
    /// The chain and the key in two files.
    Pair { cert: PathBuf, key: PathBuf },
}

/// A certificate chain with its key, ready to serve. (Its `Debug` names the file, never the key.)
pub struct LoadedCert {
    /// The file the chain came from.
    pub path: PathBuf,
    /// The chain (end-entity first) and its signing key.
    pub key: Arc<CertifiedKey>,
    /// The DNS names of the end-entity certificate's subjectAltName, lower case; a wildcard
    /// keeps its `*.` prefix.
    pub names: Vec<String>,
    pub algorithm: SignatureAlgorithm,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
}

impl fmt::Debug for LoadedCert {
    /// Names the file, never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedCert")
            .field("path", &self.path)
            .field("names", &self.names)
            .field("algorithm", &self.algorithm)
            .field("not_after", &x509::date(self.not_after))
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read '{}': {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("'{}' is not valid PEM: {why}", path.display())]
    Pem { path: PathBuf, why: String },
    #[error("no certificate in '{}'", path.display())]
    NoCertificate { path: PathBuf },
    #[error("no certificate file in directory '{}'", path.display())]
    EmptyDirectory { path: PathBuf },
    #[error("no private key for '{}' (an unencrypted key in the file itself or in {})", path.display(), quoted(tried))]
    NoKey { path: PathBuf, tried: Vec<PathBuf> },
    #[error("unusable private key in '{}': {why}", key.display())]
    BadKey { key: PathBuf, why: String },
    #[error("the private key in '{}' does not match the certificate in '{}'", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("bad certificate in '{}': {why}", path.display())]
    BadCertificate { path: PathBuf, why: String },
    #[error("the certificate in '{}' expired on {}", path.display(), x509::date(*not_after))]
    Expired { path: PathBuf, not_after: i64 },
}

/// `'a' or 'b'`, for a message.
fn quoted(paths: &[PathBuf]) -> String {
    let quoted: Vec<String> = paths.iter().map(|p| format!("'{}'", p.display())).collect();
    quoted.join(" or ")
}

/// Loads every certificate a source names, in order (a directory's files by name); `now` in unix
/// seconds, to refuse an expired one.
pub fn load(
    source: &CertSource,
    provider: &CryptoProvider,
    now: i64,
) -> Result<Vec<LoadedCert>, CertError> {
    match source {
        CertSource::Pair { cert, key } => Ok(vec![load_one(cert, Some(key), provider, now)?]),
        CertSource::Path(path) if path.is_dir() => {
            let entries = std::fs::read_dir(path).map_err(|source| CertError::Read {
                path: path.clone(),
                source,
            })?;
            let mut files = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|source| CertError::Read {
                    path: path.clone(),
                    source,
                })?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let file = entry.path();
                if name.starts_with('.')
                    || NOT_CERTS.iter().any(|ext| name.ends_with(ext))
                    || !file.is_file()
                {
                    continue;
                }
                files.push(file);
            }
            if files.is_empty() {
                return Err(CertError::EmptyDirectory { path: path.clone() });
            }
            files.sort();
            files
                .iter()
                .map(|f| load_one(f, None, provider, now))
                .collect()
        }
        CertSource::Path(path) => Ok(vec![load_one(path, None, provider, now)?]),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read {
        path: path.to_owned(),
        source,
    })
}

fn pem_error(path: &Path, e: pem::Error) -> CertError {
    CertError::Pem {
        path: path.to_owned(),
        why: match e {
            pem::Error::MissingSectionEnd { .. } => "a section has no END line".to_owned(),
            pem::Error::IllegalSectionStart { .. } => "bad BEGIN line".to_owned(),
            pem::Error::Base64Decode(why) => format!("bad base64 ({why})"),
            other => format!("{other:?}"),
        },
    }
}

/// The files where the key of a chain without one may be: HAProxy's `FILE.key`, then the file's
/// name with `.key` for its extension (`site.crt` and `site.key`).
fn key_candidates(cert: &Path) -> Vec<PathBuf> {
    let mut with_key = cert.as_os_str().to_owned();
    with_key.push(".key");
    let mut out = vec![PathBuf::from(with_key)];
    if cert.extension().is_some() {
        out.push(cert.with_extension("key"));
    }
    out
}

fn private_key(path: &Path, bytes: &[u8]) -> Result<Option<PrivateKeyDer<'static>>, CertError> {
    match PrivateKeyDer::from_pem_slice(bytes) {
        Ok(k) => Ok(Some(k)),
        Err(pem::Error::NoItemsFound) => Ok(None),
        Err(e) => Err(pem_error(path, e)),
    }
}

fn load_one(
    path: &Path,
    key_path: Option<&Path>,
    provider: &CryptoProvider,
    now: i64,
) -> Result<LoadedCert, CertError> {
    let bytes = read(path)?;
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    let Some(end_entity) = chain.first() else {
        return Err(CertError::NoCertificate {
            path: path.to_owned(),
        });
    };
    let (key, key_file) = match key_path {
        Some(k) => match private_key(k, &read(k)?)? {
            Some(key) => (key, k.to_owned()),
            None => {
                return Err(CertError::NoKey {
                    path: path.to_owned(),
                    tried: vec![k.to_owned()],
                });
            }
        },
        None => match private_key(path, &bytes)? {
            Some(key) => (key, path.to_owned()),
            None => {
                let tried = key_candidates(path);
                let mut found = None;
                for k in &tried {
                    if k.is_file()
                        && let Some(key) = private_key(k, &read(k)?)?
                    {
                        found = Some((key, k.clone()));
                        break;
                    }
                }
                found.ok_or_else(|| CertError::NoKey {
                    path: path.to_owned(),
                    tried,
                })?
            }
        },
    };
    let parsed =
        webpki::EndEntityCert::try_from(end_entity).map_err(|e| CertError::BadCertificate {
            path: path.to_owned(),
            why: format!("{e:?}"),
        })?;
    let mut names: Vec<String> = parsed
        .valid_dns_names()
        .map(str::to_ascii_lowercase)
        .collect();
    names.sort();
    names.dedup();
    let Some((not_before, not_after)) = x509::validity(end_entity) else {
        return Err(CertError::BadCertificate {
            path: path.to_owned(),
            why: "unreadable validity dates".to_owned(),
        });
    };
    if not_after < now {
        return Err(CertError::Expired {
            path: path.to_owned(),
            not_after,
        });
    }
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| CertError::BadKey {
            key: key_file.clone(),
            why: e.to_string(),
        })?;
    let algorithm = signing.algorithm();
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(CertError::KeyMismatch {
                cert: path.to_owned(),
                key: key_file,
            });
        }
        Err(e) => {
            return Err(CertError::BadKey {
                key: key_file,
                why: format!("cannot compare it with the certificate: {e}"),
            });
        }
    }
    Ok(LoadedCert {
        path: path.to_owned(),
        key: Arc::new(certified),
        names,
        algorithm,
        not_before,
        not_after,
    })
}
