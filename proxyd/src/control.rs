//! The master/worker control channel: one prost message per SOCK_SEQPACKET datagram.

use std::os::fd::{AsFd, OwnedFd};

use common::seqpacket::{self, SeqPacket};
use prost::Message;

pub use proto::proxyd::control::v1 as pb;

/// Largest control datagram (a Start message carries the whole config).
pub const MAX_DATAGRAM: usize = 256 * 1024;

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
