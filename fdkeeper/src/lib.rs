//! fdkeeper: binds listening sockets once, keeps them for ever, and lends dups of them over SCM_RIGHTS.
//!
//! The daemon side is [`bind_sockets`] + [`run`]; borrowers (proxyd workers) use [`client`].
//!
//! The lending protocol (`proto/fdlend/v1`), as this crate implements it:
//! - one prost `Request` per SOCK_SEQPACKET datagram, one `Response` back with the same id;
//!   fds travel as SCM_RIGHTS, at most [`MAX_FDS_PER_MESSAGE`] per message;
//! - a peer is authenticated once, at accept (SO_PEERCRED): allowed if its uid is in
//!   `allowed_uids` or its primary gid in `allowed_gids`; a refused peer gets one
//!   `PERMISSION_DENIED` answer to its first request, then the connection closes;
//! - the key of a held socket is its spec address in canonical form; `127.0.0.1:0` is a
//!   key of its own (one kernel-chosen port, the same for every borrower);
//! - a socket has one name: a request naming one socket twice (`127.0.0.1:80` and
//!   `127.0.0.1:080`), or two binds that collide (`0.0.0.0:P` and `127.0.0.1:P`, a dual-stack
//!   `[::]:P` and any IPv4 `P`), is refused, and so is a bind colliding with a held socket
//!   under another key (see [`address::overlap`]); such a deposit is rejected;
//! - `BIND_FAILED` is worth retrying: right after an fdkeeper restart without systemd the
//!   address is still held by borrowers that have not deposited it yet (with
//!   `reuseport` fdkeeper refuses to bind next to such a socket for the same reason);
//! - restart-safety without systemd needs fixed ports: a fresh fdkeeper asked for
//!   `127.0.0.1:0` before the deposits arrive binds a new port;
//! - a socket is kept while something claims it: an Acquire or Deposit may carry a
//!   `Claim` (owner, instance, generation), keyed with the peer's uid; a claimless one
//!   pins the socket for ever. A `Release` with `claims` drops claims of the peer's own uid
//!   only, and a socket left with no claim and no pin is closed: at once, or when the last
//!   connected borrower holding a copy disconnects (so the admin view never loses a socket
//!   that still accepts). Connections still in its accept queue are reset by that close;
//!   connections a borrower accepted are its own and are not touched. A restarted fdkeeper
//!   has no claims until borrowers deposit again; sockets back from systemd's fd store
//!   carry none, so a release can close them only once a claim was made again.
#![deny(unsafe_code)]

pub mod address;
pub mod admin;
pub mod cli;
pub mod client;
pub mod config;
#[cfg(test)]
mod fuzz;
pub mod limits;
pub mod listener;
pub mod pattern;
mod registry;
mod server;
mod sys;
pub mod systemd;

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::seqpacket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use client::{
    Claim, ClaimRelease, Client, ClientError, LentListener, ListenSpec, Released, guard_listeners,
};
pub use config::Config;
pub use limits::MAX_FDS_PER_MESSAGE;

/// Backlog of the lending socket itself (borrowers waiting to be accepted).
const LENDING_BACKLOG: i32 = 128;

/// The sockets fdkeeper serves on, bound before `run` (so tests and main share one path).
#[derive(Debug)]
pub struct Sockets {
    /// The SOCK_SEQPACKET lending socket, listening.
    pub lending: OwnedFd,
    pub admin: std::os::unix::net::UnixListener,
    /// Listening sockets handed over by systemd (its fd store) at start.
    pub inherited: Vec<systemd::Inherited>,
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot create directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("lending socket {path}: {source}")]
    Lending { path: PathBuf, source: io::Error },
    #[error("admin socket {path}: {source}")]
    Admin { path: PathBuf, source: io::Error },
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot serve on the lending socket: {0}")]
    Lending(io::Error),
    #[error("cannot build the reflection service: {0}")]
    Reflection(String),
    #[error("admin gRPC server: {0}")]
    Admin(#[from] tonic::transport::Error),
}

/// Binds the lending and admin sockets as the config says. The lending socket's directory
/// is created 0700 (0750 with `socket_group`) when missing; an existing one is left alone.
pub fn bind_sockets(config: &Config) -> Result<Sockets, BindError> {
    let lending = bind_lending(config)?;
    let admin =
        common::daemon::bind_unix(config.admin(), 0o600).map_err(|source| BindError::Admin {
            path: config.admin().to_owned(),
            source,
        })?;
    Ok(Sockets {
        lending,
        admin,
        inherited: Vec::new(),
    })
}

fn bind_lending(config: &Config) -> Result<OwnedFd, BindError> {
    let path = config.socket();
    let err = |source: io::Error| BindError::Lending {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    if !dir.exists() {
        let mode = if config.socket_group.is_some() {
            0o750
        } else {
            0o700
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(&dir)
            .map_err(|source| BindError::Dir {
                path: dir.clone(),
                source,
            })?;
        if let Some(gid) = config.socket_group {
            std::os::unix::fs::chown(&dir, None, Some(gid)).map_err(|source| BindError::Dir {
                path: dir.clone(),
                source,
            })?;
        }
    }
    if config.socket_mode & 0o002 != 0 {
        tracing::warn!(
            socket = %path.display(),
            mode = format!("{:04o}", config.socket_mode),
            "socket_mode lets every local user connect; only SO_PEERCRED stands between them and the listeners"
        );
    }
    remove_stale(path).map_err(err)?;
    let fd = seqpacket::socket().map_err(err)?;
    seqpacket::bind(fd.as_fd(), path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(config.socket_mode))
        .map_err(err)?;
    if let Some(gid) = config.socket_group {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(err)?;
    }
    seqpacket::listen(fd.as_fd(), LENDING_BACKLOG).map_err(err)?;
    Ok(fd)
}

/// Removes a lending socket file left by a dead fdkeeper; refuses while one is serving
/// there, and never removes anything that is not a socket.
fn remove_stale(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(meta) if meta.file_type().is_socket() => {
            let probe = seqpacket::socket()?;
            match seqpacket::connect(probe.as_fd(), path) {
                // A full backlog (EAGAIN) means a live listener too.
                Ok(()) => Err(in_use(path)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(in_use(path)),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path)
                }
                Err(e) => Err(io::Error::new(
                    e.kind(),
                    format!("{} exists and cannot be probed: {e}", path.display()),
                )),
            }
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
    }
}

fn in_use(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("{} is in use by a running fdkeeper", path.display()),
    )
}

/// Serves lending and admin until `shutdown`. A held listener is closed only when a release
/// drops its last claim; on shutdown they go away with the process, and live on in borrowers
/// and systemd's fd store.
pub async fn run(
    config: Config,
    sockets: Sockets,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let fdstore = systemd::under_systemd();
    let registry: server::Shared = Arc::new(Mutex::new(registry::Registry::new(
        Arc::new(config),
        fdstore,
    )));
    {
        let mut reg = server::lock(&registry);
        for inh in sockets.inherited {
            let name = inh.name.clone();
            match reg.adopt_inherited(&inh.name, inh.fd) {
                Ok(()) => {}
                Err(reason) => {
                    tracing::warn!(fdname = %name, %reason, "dropping an fd from systemd's fd store");
                    if fdstore {
                        systemd::remove(&name);
                    }
                }
            }
        }
        tracing::info!(
            instance = %reg.instance.id,
            adopted = reg.held.len(),
            socket = %reg.config.socket().display(),
            admin = %reg.config.admin().display(),
            "fdkeeper serving"
        );
    }

    let acceptor = seqpacket::Acceptor::new(sockets.lending).map_err(RunError::Lending)?;
    let tracker = TaskTracker::new();
    let lending = tokio::spawn(server::serve(
        acceptor,
        registry.clone(),
        tracker.clone(),
        shutdown.clone(),
    ));

    let health = common::grpc::health::<
        proto::fdkeeper::v1::admin_server::AdminServer<admin::AdminService>,
    >()
    .await;
    let router = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(proto::fdkeeper::v1::admin_server::AdminServer::new(
            admin::AdminService::new(registry.clone()),
        ));
    let router =
        common::grpc::with_reflection(router, &[proto::fdkeeper::v1::admin_server::SERVICE_NAME])
            .map_err(|e| RunError::Reflection(e.to_string()))?;
    common::daemon::notify::ready("lending");
    let served = common::grpc::serve_unix(router, sockets.admin, shutdown.clone()).await;

    // The admin server returns on shutdown (or on a fatal error, which stops everything).
    shutdown.cancel();
    if let Err(e) = lending.await {
        tracing::error!(error = %e, "the lending task failed");
    }
    tracker.close();
    tracker.wait().await;
    served?;
    Ok(())
}
