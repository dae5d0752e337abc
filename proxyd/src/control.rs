//! The master/worker control channel: one prost message per SOCK_SEQPACKET datagram, and the
//! certificate sets cut into parts that each fit one.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use common::seqpacket::{self, SeqPacket};
use prost::Message;

pub use proto::proxyd::control::v1 as pb;

use crate::config::tls::{LoadedCert, PemFiles};
use crate::model::TicketKey;

/// Largest control datagram (a Start message carries the whole config).
pub const MAX_DATAGRAM: usize = 256 * 1024;

/// Most certificate bytes one `Certificates` part carries, leaving room for the paths and the
/// framing within [`MAX_DATAGRAM`]. A certificate whose files are larger cannot be sent.
pub const MAX_CERT_PART: usize = 192 * 1024;

/// The two ends of a new channel: connected, non-blocking, close-on-exec, with socket buffers
/// that hold a Start message.
pub fn socket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let pair = seqpacket::pair()?;
    for fd in [&pair.0, &pair.1] {
        seqpacket::set_buffer_sizes(fd.as_fd(), MAX_DATAGRAM * 2)?;
    }
    Ok(pair)
}

/// Environment variable through which the master gives each worker its instance id (random
/// per master start). Workers claim their listeners in fdkeeper as (owner, this instance, their
/// generation), so that the master can later release exactly the claims of generations that
/// are gone, and a restarted master those of its predecessor. (The Start message would be the
/// natural carrier; it is a field to add to `proxyd/v1/control.proto` when that file moves.)
pub const MASTER_INSTANCE_ENV: &str = "PROXYD_MASTER_INSTANCE";

/// The owner of every fdkeeper claim a proxyd makes: one per config file, which is what tells
/// two proxyds on one host apart (each needs its own admin socket, so its own file), and stays
/// the same across reloads and master restarts.
pub fn claim_owner(config_path: &std::path::Path) -> String {
    format!("proxyd {}", config_path.display())
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("undecodable control message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("control message without a kind")]
    Empty,
}

/// One end of the channel; `S` is what we send, `R` what we receive.
#[derive(Debug)]
pub struct Channel<S, R> {
    sock: SeqPacket,
    _types: std::marker::PhantomData<fn(S) -> R>,
}

/// The master's end of a worker's channel.
pub type MasterEnd = Channel<pb::MasterToWorker, pb::WorkerToMaster>;
/// The worker's end.
pub type WorkerEnd = Channel<pb::WorkerToMaster, pb::MasterToWorker>;

impl<S: Message, R: Message + Default> Channel<S, R> {
    pub fn new(sock: SeqPacket) -> Self {
        Self {
            sock,
            _types: std::marker::PhantomData,
        }
    }

    pub fn into_inner(self) -> SeqPacket {
        self.sock
    }

    pub async fn send(&self, msg: &S) -> Result<(), ControlError> {
        Ok(self.sock.send(&msg.encode_to_vec(), &[]).await?)
    }

    /// The next message, or `None` when the other end closed.
    pub async fn recv(&self) -> Result<Option<R>, ControlError> {
        match self.sock.recv_message(MAX_DATAGRAM).await? {
            None => Ok(None),
            Some(buf) => Ok(Some(R::decode(buf.as_slice())?)),
        }
    }
}

/// Shorthands for building messages.
pub fn to_worker(kind: pb::master_to_worker::Kind) -> pb::MasterToWorker {
    pb::MasterToWorker { kind: Some(kind) }
}

pub fn to_master(kind: pb::worker_to_master::Kind) -> pb::WorkerToMaster {
    pb::WorkerToMaster { kind: Some(kind) }
}

/// A certificate whose files do not fit in one control message.
#[derive(Debug, thiserror::Error)]
#[error("the files of '{}' hold {bytes} bytes, more than the {} KiB a worker can be sent", path.display(), MAX_CERT_PART / 1024)]
pub struct TooLarge {
    pub path: PathBuf,
    pub bytes: usize,
}

/// The parts that carry the set `certs` of TLS setting `tls` (called `name`) to a worker, in
/// order, as few as fit.
pub fn certificate_parts(
    tls: u32,
    name: &str,
    rotation: u64,
    certs: &[Arc<LoadedCert>],
) -> Result<Vec<pb::MasterToWorker>, TooLarge> {
    let part = |certs: Vec<pb::PemFiles>| pb::Certificates {
        tls,
        name: name.to_owned(),
        rotation,
        certs,
        last: false,
    };
    let mut parts = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for c in certs {
        let size = c.files.len();
        if size > MAX_CERT_PART {
            return Err(TooLarge {
                path: c.path.clone(),
                bytes: size,
            });
        }
        if bytes + size > MAX_CERT_PART {
            parts.push(part(std::mem::take(&mut current)));
            bytes = 0;
        }
        bytes += size;
        current.push(pem_to_wire(&c.files));
    }
    parts.push(part(current));
    if let Some(last) = parts.last_mut() {
        last.last = true;
    }
    Ok(parts
        .into_iter()
        .map(|p| to_worker(pb::master_to_worker::Kind::Certificates(p)))
        .collect())
}

fn pem_to_wire(f: &PemFiles) -> pb::PemFiles {
    let (key_path, key) = match &f.key {
        Some((p, k)) => (p.display().to_string(), k.clone()),
        None => (String::new(), Vec::new()),
    };
    pb::PemFiles {
        cert_path: f.cert_path.display().to_string(),
        cert: f.cert.clone(),
        key_path,
        key,
    }
}

fn pem_from_wire(f: pb::PemFiles) -> PemFiles {
    PemFiles {
        cert_path: PathBuf::from(f.cert_path),
        cert: f.cert,
        key: (!f.key_path.is_empty()).then(|| (PathBuf::from(f.key_path), f.key)),
    }
}

/// Session-ticket keys on the wire.
pub fn ticket_keys_to_wire(keys: &[TicketKey]) -> pb::TicketKeys {
    pb::TicketKeys {
        keys: keys
            .iter()
            .map(|k| pb::TicketKey {
                name: k.name.to_vec(),
                secret: k.secret.to_vec(),
            })
            .collect(),
    }
}

/// Session-ticket keys from the wire; a key of the wrong size is left out.
pub fn ticket_keys_from_wire(keys: &pb::TicketKeys) -> Vec<TicketKey> {
    keys.keys
        .iter()
        .filter_map(|k| {
            Some(TicketKey {
                name: k.name.as_slice().try_into().ok()?,
                secret: k.secret.as_slice().try_into().ok()?,
            })
        })
        .collect()
}

/// A certificate set as the worker gets it whole.
#[derive(Debug)]
pub struct CertificateSet {
    pub tls: u32,
    pub name: String,
    pub rotation: u64,
    pub files: Vec<PemFiles>,
}

/// The worker's side of [`certificate_parts`]: gathers the parts of each setting's set.
#[derive(Debug, Default)]
pub struct CertificateParts {
    /// By setting: the rotation being gathered and its certificates so far.
    gathering: HashMap<u32, (u64, Vec<PemFiles>)>,
}

impl CertificateParts {
    /// Takes a part; returns the set once its last part is in. A part of a newer rotation
    /// drops what an older one left unfinished.
    pub fn add(&mut self, part: pb::Certificates) -> Option<CertificateSet> {
        let entry = self
            .gathering
            .entry(part.tls)
            .or_insert_with(|| (part.rotation, Vec::new()));
        if entry.0 != part.rotation {
            *entry = (part.rotation, Vec::new());
        }
        entry.1.extend(part.certs.into_iter().map(pem_from_wire));
        if !part.last {
            return None;
        }
        let (rotation, files) = self.gathering.remove(&part.tls)?;
        Some(CertificateSet {
            tls: part.tls,
            name: part.name,
            rotation,
            files,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(rotation: u64, paths: &[&str], last: bool) -> pb::Certificates {
        pb::Certificates {
            tls: 1,
            name: "site".to_owned(),
            rotation,
            certs: paths
                .iter()
                .map(|p| pb::PemFiles {
                    cert_path: (*p).to_owned(),
                    cert: b"chain".to_vec(),
                    key_path: String::new(),
                    key: Vec::new(),
                })
                .collect(),
            last,
        }
    }

    /// A certificate whose files are `size` bytes or so.
    fn cert(size: usize) -> Arc<LoadedCert> {
        let (cert, key) = crate::config::tls::testing::pem(&["a.test"]);
        let files = PemFiles {
            cert_path: PathBuf::from("/etc/a.pem"),
            cert: format!("{cert}{key}").into_bytes(),
            key: None,
        };
        let now = common::time::now_ms().div_euclid(1000);
        let mut c =
            crate::config::tls::from_files(vec![files], &crate::config::tls::provider(), now)
                .expect("good")
                .remove(0);
        Arc::get_mut(&mut c)
            .expect("one owner")
            .files
            .cert
            .resize(size, b'\n');
        c
    }

    #[test]
    fn a_large_set_goes_in_parts_that_fit_a_datagram_and_come_back_whole() {
        let one = cert(40_000);
        let set = vec![one.clone(); 12];
        let parts = certificate_parts(3, "site", 7, &set).expect("fits");
        assert_eq!(parts.len(), 3, "4 certificates of 40 kB a part");
        let mut gathered = CertificateParts::default();
        let mut whole = None;
        for p in parts {
            assert!(p.encoded_len() <= MAX_DATAGRAM);
            let Some(pb::master_to_worker::Kind::Certificates(part)) = p.kind else {
                panic!("a certificates part");
            };
            assert!(whole.is_none(), "complete only at the last part");
            whole = gathered.add(part);
        }
        let whole = whole.expect("complete");
        assert_eq!((whole.tls, whole.rotation), (3, 7));
        assert_eq!(whole.files.len(), 12);
        assert!(whole.files.iter().all(|f| *f == one.files));

        let e = certificate_parts(0, "site", 8, &[cert(MAX_CERT_PART + 1)]).expect_err("too large");
        assert!(e.to_string().contains("'/etc/a.pem'"), "{e}");
    }

    #[test]
    fn parts_gather_into_one_set_and_a_newer_rotation_drops_an_unfinished_one() {
        let mut parts = CertificateParts::default();
        assert!(parts.add(part(1, &["a"], false)).is_none());
        // Rotation 2 starts before 1 was complete (never happens in order, but must not mix).
        assert!(parts.add(part(2, &["b"], false)).is_none());
        let set = parts.add(part(2, &["c"], true)).expect("complete");
        assert_eq!((set.tls, set.rotation, set.name.as_str()), (1, 2, "site"));
        let paths: Vec<_> = set.files.iter().map(|f| f.cert_path.clone()).collect();
        assert_eq!(paths, [PathBuf::from("b"), PathBuf::from("c")]);
        assert_eq!(set.files[0].key, None, "the key is in the chain's file");
        assert!(parts.gathering.is_empty());
    }
}
