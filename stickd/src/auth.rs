//! Peer authentication without mTLS: a secret shared by every peer, sent with each replication
//! stream and compared in constant time by the receiver.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tonic::metadata::{MetadataMap, MetadataValue};

/// The metadata key that carries the secret (binary: the file may hold any bytes).
pub const SECRET_HEADER: &str = "x-stickd-peer-secret-bin";

/// The shared secret as read from `peer_secret_file` (surrounding whitespace removed, so that an
/// editor's trailing newline does not count). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerSecret(Vec<u8>);

impl std::fmt::Debug for PeerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerSecret({} bytes)", self.0.len())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("cannot read '{path}': {reason}")]
    Unreadable { path: String, reason: String },
    #[error("'{0}' is empty")]
    Empty(String),
    #[error("'{path}' is readable or writable by every user (mode {mode:o}): chmod o= it")]
    WorldAccessible { path: String, mode: u32 },
}

impl PeerSecret {
    /// Reads a secret file: it must be readable, not accessible to other users, and non-empty.
    pub fn read(path: &Path) -> Result<PeerSecret, SecretError> {
        let shown = path.display().to_string();
        let unreadable = |e: std::io::Error| SecretError::Unreadable {
            path: shown.clone(),
            reason: e.to_string(),
        };
        let mode = std::fs::metadata(path)
            .map_err(unreadable)?
            .permissions()
            .mode();
        if mode & 0o007 != 0 {
            return Err(SecretError::WorldAccessible {
                path: shown,
                mode: mode & 0o7777,
            });
        }
        let bytes = std::fs::read(path).map_err(unreadable)?;
        let secret = bytes.trim_ascii();
        if secret.is_empty() {
            return Err(SecretError::Empty(shown));
        }
        Ok(PeerSecret(secret.to_vec()))
    }

    /// Adds the secret to an outgoing request's metadata.
    pub fn attach(&self, md: &mut MetadataMap) {
        md.insert_bin(SECRET_HEADER, MetadataValue::from_bytes(&self.0));
    }

    /// Whether an incoming request carries this secret. The comparison takes the same time
    /// wherever the first difference is, so that timing does not reveal a prefix.
    pub fn verify(&self, md: &MetadataMap) -> bool {
        let Some(Ok(given)) = md.get_bin(SECRET_HEADER).map(|v| v.to_bytes()) else {
            return false;
        };
        constant_time_eq(&given, &self.0)
    }
}

/// Equality whose time depends on the lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str, mode: u32) -> std::path::PathBuf {
        let p = dir.join("secret");
        std::fs::write(&p, text).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        p
    }

    #[test]
    fn secret_file_is_checked_and_trimmed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write(dir.path(), "s3cret\n", 0o640);
        let s = PeerSecret::read(&p).expect("good");
        assert_eq!(s.0, b"s3cret");
        assert_eq!(format!("{s:?}"), "PeerSecret(6 bytes)");
        let p = write(dir.path(), "s3cret\n", 0o644);
        assert!(matches!(
            PeerSecret::read(&p),
            Err(SecretError::WorldAccessible { mode: 0o644, .. })
        ));
        let p = write(dir.path(), " \n", 0o600);
        assert!(matches!(PeerSecret::read(&p), Err(SecretError::Empty(_))));
        assert!(matches!(
            PeerSecret::read(&dir.path().join("nope")),
            Err(SecretError::Unreadable { .. })
        ));
    }

    #[test]
    fn verify_wants_the_exact_secret() {
        let s = PeerSecret(b"abc\xff".to_vec());
        let mut md = MetadataMap::new();
        assert!(!s.verify(&md));
        s.attach(&mut md);
        assert!(s.verify(&md));
        let mut other = MetadataMap::new();
        PeerSecret(b"abc\xfe".to_vec()).attach(&mut other);
        assert!(!s.verify(&other));
        let mut short = MetadataMap::new();
        PeerSecret(b"abc".to_vec()).attach(&mut short);
        assert!(!s.verify(&short));
    }
}
