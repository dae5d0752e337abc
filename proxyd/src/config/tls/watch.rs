//! What the certificate files of a TLS setting look like on disk, cheaply: device, inode, size
//! and times of every file and directory its certificates are read from, so that the master
//! notices a rotated certificate by polling a few `stat`s instead of reading keys.
//!
//! A rename over a file (how most tools rotate) changes its inode; a write in place changes its
//! size or times; a file added to or removed from a directory changes the directory's.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::certs::{self, CertSource};

/// One file's identity and version as `stat` (following symlinks) tells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// The stamps of every path a setting's certificates are read from, or may be (a key file
/// that does not exist yet); two equal fingerprints mean nothing a load reads has changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint(Vec<(PathBuf, Option<Stamp>)>);

impl Fingerprint {
    /// Takes the stamps now. Taken before the files are read, so that a change that lands
    /// during the read shows in the next fingerprint.
    pub fn of(sources: &[CertSource]) -> Fingerprint {
        let mut paths = Vec::new();
        for source in sources {
            match source {
                CertSource::Pair { cert, key } => paths.extend([cert.clone(), key.clone()]),
                CertSource::Path(dir) if dir.is_dir() => {
                    paths.push(dir.clone());
                    for file in certs::directory(dir).unwrap_or_default() {
                        paths.extend(certs::key_candidates(&file));
                        paths.push(file);
                    }
                }
                CertSource::Path(file) => {
                    paths.push(file.clone());
                    paths.extend(certs::key_candidates(file));
                }
            }
        }
        Fingerprint(
            paths
                .into_iter()
                .map(|p| {
                    let stamp = Stamp::of(&p);
                    (p, stamp)
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rename_a_write_in_place_and_a_new_file_each_change_the_fingerprint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("site.pem");
        std::fs::write(&file, "one").expect("write");
        let sources = [
            CertSource::Path(file.clone()),
            CertSource::Path(dir.path().join("more")),
        ];
        std::fs::create_dir(dir.path().join("more")).expect("mkdir");
        let first = Fingerprint::of(&sources);
        assert_eq!(first, Fingerprint::of(&sources), "nothing changed");

        // Same size, new inode.
        let tmp = dir.path().join("new");
        std::fs::write(&tmp, "two").expect("write");
        std::fs::rename(&tmp, &file).expect("rename");
        let renamed = Fingerprint::of(&sources);
        assert_ne!(first, renamed);

        std::fs::write(&file, "three").expect("write in place");
        let written = Fingerprint::of(&sources);
        assert_ne!(renamed, written);

        // The key that the chain's file may take from beside it.
        std::fs::write(dir.path().join("site.key"), "key").expect("write");
        let keyed = Fingerprint::of(&sources);
        assert_ne!(written, keyed);

        std::fs::write(dir.path().join("more/a.pem"), "a").expect("write");
        assert_ne!(keyed, Fingerprint::of(&sources));
    }
}
