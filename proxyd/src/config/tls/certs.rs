//! Certificate files: PEM chains and their keys read from disk, each key checked against its
//! certificate, each certificate's DNS names, serial and dates read; a file that cannot serve is
//! refused with its name.
//!
//! Reading ([`read`]) and checking ([`parse`]) are apart: a worker calls both when it loads its
//! config, and the master and `proxyd check` when they validate one, so a broken certificate is
//! found before a generation starts; a certificate rotation sends the bytes the master read and
//! checked to the workers, which check them again without reading a file that may have changed
//! since. [`SetBuilder`] refuses two certificates of one setting that would serve the same name.

use std::collections::HashMap;
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

/// The bytes of one certificate chain and its key, as read from disk. (Its `Debug` names the
/// files, never the key.)
#[derive(Clone, PartialEq, Eq)]
pub struct PemFiles {
    /// The file the chain came from.
    pub cert_path: PathBuf,
    pub cert: Vec<u8>,
    /// The key's file and its bytes; `None`: the key is in the chain's file.
    pub key: Option<(PathBuf, Vec<u8>)>,
}

impl PemFiles {
    /// How many bytes the files hold.
    pub fn len(&self) -> usize {
        self.cert.len() + self.key.as_ref().map_or(0, |(_, k)| k.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for PemFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PemFiles")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key.as_ref().map(|(p, _)| p))
            .finish()
    }
}

/// A certificate chain with its key, ready to serve. (Its `Debug` names the file, never the key.)
pub struct LoadedCert {
    /// The file the chain came from.
    pub path: PathBuf,
    /// What was read: the chain and the key in PEM, to hand to workers as they are.
    pub files: PemFiles,
    /// The chain (end-entity first) and its signing key.
    pub key: Arc<CertifiedKey>,
    /// The DNS names of the end-entity certificate's subjectAltName, lower case; a wildcard
    /// keeps its `*.` prefix.
    pub names: Vec<String>,
    pub algorithm: SignatureAlgorithm,
    /// The end-entity certificate's serial number in upper-case hex, as `openssl x509 -serial`
    /// prints it.
    pub serial: String,
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
            .field("serial", &self.serial)
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
    #[error("'{}' and '{}' both serve '{name}' with {algorithm:?} keys: keep one", first.display(), second.display())]
    BothServe {
        first: PathBuf,
        second: PathBuf,
        name: String,
        algorithm: SignatureAlgorithm,
    },
}

/// `'a' or 'b'`, for a message.
fn quoted(paths: &[PathBuf]) -> String {
    let quoted: Vec<String> = paths.iter().map(|p| format!("'{}'", p.display())).collect();
    quoted.join(" or ")
}

/// Reads the files of every certificate a source names, in order (a directory's files by name),
/// each chain with the key that goes with it.
pub fn read(source: &CertSource) -> Result<Vec<PemFiles>, CertError> {
    match source {
        CertSource::Pair { cert, key } => Ok(vec![read_one(cert, Some(key))?]),
        CertSource::Path(path) if path.is_dir() => {
            let files = directory(path)?;
            if files.is_empty() {
                return Err(CertError::EmptyDirectory { path: path.clone() });
            }
            files.iter().map(|f| read_one(f, None)).collect()
        }
        CertSource::Path(path) => Ok(vec![read_one(path, None)?]),
    }
}

/// Reads and checks every certificate a source names; `now` in unix seconds, to refuse an
/// expired one.
pub fn load(
    source: &CertSource,
    provider: &CryptoProvider,
    now: i64,
) -> Result<Vec<LoadedCert>, CertError> {
    read(source)?
        .into_iter()
        .map(|files| parse(files, provider, now))
        .collect()
}

/// The certificate files of a directory, by name: HAProxy's `crt DIR`.
pub(super) fn directory(path: &Path) -> Result<Vec<PathBuf>, CertError> {
    let entries = std::fs::read_dir(path).map_err(|source| CertError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| CertError::Read {
            path: path.to_owned(),
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
    files.sort();
    Ok(files)
}

fn read_file(path: &Path) -> Result<Vec<u8>, CertError> {
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
pub(super) fn key_candidates(cert: &Path) -> Vec<PathBuf> {
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

/// The chain of a PEM file, end-entity first; refused when there is none.
fn chain(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let chain = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(chain)
}

/// Reads a chain and finds its key: in `key_path` when given, else in the file itself, else in
/// one of [`key_candidates`].
fn read_one(path: &Path, key_path: Option<&Path>) -> Result<PemFiles, CertError> {
    let bytes = read_file(path)?;
    chain(path, &bytes)?;
    let key = match key_path {
        Some(k) => {
            let key = read_file(k)?;
            if private_key(k, &key)?.is_none() {
                return Err(CertError::NoKey {
                    path: path.to_owned(),
                    tried: vec![k.to_owned()],
                });
            }
            Some((k.to_owned(), key))
        }
        None if private_key(path, &bytes)?.is_some() => None,
        None => {
            let tried = key_candidates(path);
            let mut found = None;
            for k in &tried {
                if k.is_file() {
                    let key = read_file(k)?;
                    if private_key(k, &key)?.is_some() {
                        found = Some((k.clone(), key));
                        break;
                    }
                }
            }
            Some(found.ok_or_else(|| CertError::NoKey {
                path: path.to_owned(),
                tried,
            })?)
        }
    };
    Ok(PemFiles {
        cert_path: path.to_owned(),
        cert: bytes,
        key,
    })
}

/// Checks a chain and its key as read: PEM, names, dates (`now` in unix seconds: an expired
/// certificate is refused), the key usable and matching the certificate.
pub fn parse(
    files: PemFiles,
    provider: &CryptoProvider,
    now: i64,
) -> Result<LoadedCert, CertError> {
    let path = files.cert_path.as_path();
    let chain = chain(path, &files.cert)?;
    let end_entity = &chain[0];
    let (key_file, key_bytes) = match &files.key {
        Some((k, bytes)) => (k.as_path(), bytes.as_slice()),
        None => (path, files.cert.as_slice()),
    };
    let Some(key) = private_key(key_file, key_bytes)? else {
        return Err(CertError::NoKey {
            path: path.to_owned(),
            tried: vec![key_file.to_owned()],
        });
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
    let Some(fields) = x509::fields(end_entity) else {
        return Err(CertError::BadCertificate {
            path: path.to_owned(),
            why: "unreadable serial or validity dates".to_owned(),
        });
    };
    if fields.not_after < now {
        return Err(CertError::Expired {
            path: path.to_owned(),
            not_after: fields.not_after,
        });
    }
    let key_file = key_file.to_owned();
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
        files,
        key: Arc::new(certified),
        names,
        algorithm,
        serial: fields.serial,
        not_before: fields.not_before,
        not_after: fields.not_after,
    })
}

/// One setting's certificates as they are added, refusing a second certificate for a name and
/// key type: SNI would pick one of the two by the order of the files.
#[derive(Debug, Default)]
pub struct SetBuilder {
    certs: Vec<Arc<LoadedCert>>,
    /// Which certificate serves each (name, key type).
    serves: HashMap<(String, u8), PathBuf>,
}

impl SetBuilder {
    pub fn add(&mut self, cert: LoadedCert) -> Result<(), CertError> {
        for n in &cert.names {
            let key = (n.clone(), u8::from(cert.algorithm));
            if let Some(first) = self.serves.insert(key, cert.path.clone()) {
                return Err(CertError::BothServe {
                    first,
                    second: cert.path.clone(),
                    name: n.clone(),
                    algorithm: cert.algorithm,
                });
            }
        }
        self.certs.push(Arc::new(cert));
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    pub fn finish(self) -> Vec<Arc<LoadedCert>> {
        self.certs
    }
}
