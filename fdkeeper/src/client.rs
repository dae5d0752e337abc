//! The borrower's side of the lending protocol, and the guard that hands listeners back to a restarted fdkeeper.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::Message;
pub use proto::fdlend::v1::error::Code;
use proto::fdlend::v1::{
    Acquire, Deposit, Deposited, Instance, List, Listing, Release, Request, Response, request,
    response,
};
pub use proto::fdlend::v1::{Claim, ClaimRelease, ListenSpec, Released};
use tokio_util::sync::CancellationToken;

use common::seqpacket::SeqPacket;

use crate::limits::{MAX_DATAGRAM, MAX_FDS_PER_MESSAGE};

/// One listener lent by fdkeeper: a dup of the very socket fdkeeper holds.
#[derive(Debug)]
pub struct LentListener {
    /// The spec as fdkeeper holds it (canonical address, backlog resolved).
    pub spec: ListenSpec,
    pub local_addr: SocketAddr,
    /// Same inode, same kernel socket (and accept queue).
    pub inode: u64,
    /// Close-on-exec and already non-blocking.
    pub listener: std::net::TcpListener,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("fdkeeper at {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("talking to fdkeeper: {0}")]
    Io(#[from] io::Error),
    /// fdkeeper answered with an error. `BindFailed` is worth retrying: right after an
    /// fdkeeper restart the address is still held by borrowers that have not deposited yet.
    #[error("fdkeeper refused ({}): {message}", code.as_str_name())]
    Refused { code: Code, message: String },
    #[error("fdkeeper protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    /// Whether trying again later may succeed (fdkeeper gone or restarting, address busy).
    pub fn is_retriable(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::Io(_) => true,
            ClientError::Refused { code, .. } => *code == Code::BindFailed,
            ClientError::Protocol(_) => false,
        }
    }
}

/// An async connection to fdkeeper's lending socket (one request at a time).
#[derive(Debug)]
pub struct Client {
    conn: SeqPacket,
    next_id: u64,
    instance: Option<Instance>,
    buf: Vec<u8>,
}

impl Client {
    pub async fn connect(socket: &Path) -> Result<Client, ClientError> {
        let conn = SeqPacket::connect(socket)
            .await
            .map_err(|source| ClientError::Connect {
                path: socket.to_owned(),
                source,
            })?;
        Ok(Client {
            conn,
            next_id: 1,
            instance: None,
            buf: vec![0; MAX_DATAGRAM],
        })
    }

    /// The fdkeeper instance id seen at the last reply.
    pub fn instance_id(&self) -> Option<&str> {
        self.instance.as_ref().map(|i| i.id.as_str())
    }

    /// Bind-once-and-lend; one `LentListener` per spec, same order. Requests of more than
    /// 64 specs are split, since fdkeeper caps fds per message. Without a claim the sockets
    /// are pinned (kept for ever); see [`Client::acquire_claimed`].
    pub async fn acquire(
        &mut self,
        borrower: &str,
        specs: &[ListenSpec],
    ) -> Result<Vec<LentListener>, ClientError> {
        self.acquire_claimed(borrower, specs, None).await
    }

    /// [`Client::acquire`] under `claim`: fdkeeper keeps the sockets open until a release
    /// drops their last claim.
    pub async fn acquire_claimed(
        &mut self,
        borrower: &str,
        specs: &[ListenSpec],
        claim: Option<&Claim>,
    ) -> Result<Vec<LentListener>, ClientError> {
        let mut out = Vec::with_capacity(specs.len());
        for chunk in specs.chunks(MAX_FDS_PER_MESSAGE) {
            let kind = request::Kind::Acquire(Acquire {
                listeners: chunk.to_vec(),
                borrower: borrower.to_owned(),
                claim: claim.cloned(),
            });
            let (resp, fds) = self.call(kind, &[]).await?;
            let acquired = match resp {
                response::Kind::Acquired(a) => a,
                other => return Err(unexpected("Acquired", &other)),
            };
            self.instance = acquired.instance.clone().or(self.instance.take());
            if acquired.listeners.len() != chunk.len() || fds.len() != chunk.len() {
                return Err(ClientError::Protocol(format!(
                    "asked for {} listeners, got {} entries and {} fds",
                    chunk.len(),
                    acquired.listeners.len(),
                    fds.len()
                )));
            }
            for (lent, fd) in acquired.listeners.into_iter().zip(fds) {
                let local_addr = lent.local_address.parse::<SocketAddr>().map_err(|_| {
                    ClientError::Protocol(format!("bad local address '{}'", lent.local_address))
                })?;
                // A borrower accepts on what it gets: anything but the listening socket the
                // answer describes is refused here (and closed), not served.
                let actual = crate::listener::verify_listening_tcp(fd.as_fd()).map_err(|m| {
                    ClientError::Protocol(format!(
                        "the fd lent for {local_addr} is not a listening TCP socket: {m}"
                    ))
                })?;
                if actual != local_addr {
                    return Err(ClientError::Protocol(format!(
                        "the fd lent for {local_addr} listens on {actual}"
                    )));
                }
                let listener = std::net::TcpListener::from(fd);
                listener.set_nonblocking(true)?;
                out.push(LentListener {
                    spec: lent.spec.unwrap_or_default(),
                    local_addr,
                    inode: lent.inode,
                    listener,
                });
            }
        }
        Ok(out)
    }

    /// Tells fdkeeper this borrower no longer uses these addresses (fdkeeper keeps the sockets).
    pub async fn release(&mut self, addresses: &[String]) -> Result<Released, ClientError> {
        self.release_request(Release {
            addresses: addresses.to_vec(),
            claims: None,
        })
        .await
    }

    /// Drops claims as `claims` says, on `addresses` (every held socket when empty); sockets
    /// left without claim are closed (the reply lists them).
    pub async fn release_claims(
        &mut self,
        addresses: &[String],
        claims: ClaimRelease,
    ) -> Result<Released, ClientError> {
        self.release_request(Release {
            addresses: addresses.to_vec(),
            claims: Some(claims),
        })
        .await
    }

    async fn release_request(&mut self, req: Release) -> Result<Released, ClientError> {
        match self.call(request::Kind::Release(req), &[]).await?.0 {
            response::Kind::Released(r) => {
                self.instance = r.instance.clone().or(self.instance.take());
                Ok(r)
            }
            other => Err(unexpected("Released", &other)),
        }
    }

    pub async fn list(&mut self) -> Result<Listing, ClientError> {
        match self.call(request::Kind::List(List {}), &[]).await?.0 {
            response::Kind::Listing(l) => {
                self.instance = l.instance.clone().or(self.instance.take());
                Ok(l)
            }
            other => Err(unexpected("Listing", &other)),
        }
    }

    /// Hands listeners to fdkeeper (after its restart), under the depositor's claim (without
    /// one, adopted sockets are pinned). Sent in batches of 64; the results are merged.
    pub async fn deposit(
        &mut self,
        listeners: &[(ListenSpec, BorrowedFd<'_>)],
        claim: Option<&Claim>,
    ) -> Result<Deposited, ClientError> {
        let mut all = Deposited::default();
        for chunk in listeners.chunks(MAX_FDS_PER_MESSAGE) {
            let kind = request::Kind::Deposit(Deposit {
                listeners: chunk.iter().map(|(s, _)| s.clone()).collect(),
                claim: claim.cloned(),
            });
            let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|(_, fd)| *fd).collect();
            match self.call(kind, &fds).await?.0 {
                response::Kind::Deposited(d) => {
                    self.instance = d.instance.clone().or(self.instance.take());
                    all.adopted.extend(d.adopted);
                    all.already_held.extend(d.already_held);
                    all.rejected.extend(d.rejected);
                    all.instance = d.instance;
                }
                other => return Err(unexpected("Deposited", &other)),
            }
        }
        Ok(all)
    }

    /// Resolves when fdkeeper closes the connection (it exited or died).
    pub async fn closed(&mut self) -> io::Error {
        loop {
            match self.conn.recv(&mut self.buf, MAX_FDS_PER_MESSAGE).await {
                Ok(r) if r.len == 0 && r.fds.is_empty() => {
                    return io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "fdkeeper closed the connection",
                    );
                }
                // Nothing is sent unasked; whatever arrives (and its fds) is dropped.
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    }

    async fn call(
        &mut self,
        kind: request::Kind,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(response::Kind, Vec<OwnedFd>), ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = Request {
            id,
            kind: Some(kind),
        };
        self.conn.send(&req.encode_to_vec(), fds).await?;
        let got = self.conn.recv(&mut self.buf, MAX_FDS_PER_MESSAGE).await?;
        if got.len == 0 && got.fds.is_empty() {
            return Err(ClientError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "fdkeeper closed the connection",
            )));
        }
        if got.truncated || got.fds_truncated {
            return Err(ClientError::Protocol(
                "response did not fit (datagram or fds truncated)".to_owned(),
            ));
        }
        let resp = Response::decode(&self.buf[..got.len])
            .map_err(|e| ClientError::Protocol(format!("undecodable response: {e}")))?;
        if resp.id != id {
            return Err(ClientError::Protocol(format!(
                "response id {} does not match request id {id}",
                resp.id
            )));
        }
        match resp.kind {
            Some(response::Kind::Error(e)) => Err(ClientError::Refused {
                code: Code::try_from(e.code).unwrap_or(Code::Unspecified),
                message: e.message,
            }),
            Some(k) => Ok((k, got.fds)),
            None => Err(ClientError::Protocol("empty response".to_owned())),
        }
    }
}

fn unexpected(wanted: &str, got: &response::Kind) -> ClientError {
    let name = match got {
        response::Kind::Acquired(_) => "Acquired",
        response::Kind::Released(_) => "Released",
        response::Kind::Listing(_) => "Listing",
        response::Kind::Deposited(_) => "Deposited",
        response::Kind::Error(_) => "Error",
    };
    ClientError::Protocol(format!("expected {wanted}, got {name}"))
}

const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Runs until `shutdown`: keeps a connection to fdkeeper; when it breaks (fdkeeper died),
/// reconnects with backoff (5 ms doubling up to 500 ms) and, on meeting an fdkeeper,
/// deposits the held listeners (dups of `held`) under `claim`, so that a restarted fdkeeper
/// gets the very same sockets back, and knows again who keeps them.
pub async fn guard_listeners(
    socket: PathBuf,
    mut client: Client,
    held: Vec<(ListenSpec, OwnedFd)>,
    claim: Option<Claim>,
    shutdown: CancellationToken,
) {
    loop {
        let lost = tokio::select! {
            () = shutdown.cancelled() => return,
            e = client.closed() => e,
        };
        tracing::warn!(error = %lost, socket = %socket.display(), "lost the connection to fdkeeper; will deposit listeners when it is back");
        let mut backoff = BACKOFF_MIN;
        client = loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            let mut next = match Client::connect(&socket).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "fdkeeper not back yet");
                    continue;
                }
            };
            let borrowed: Vec<(ListenSpec, BorrowedFd<'_>)> =
                held.iter().map(|(s, fd)| (s.clone(), fd.as_fd())).collect();
            match next.deposit(&borrowed, claim.as_ref()).await {
                Ok(d) => {
                    tracing::info!(
                        instance = next.instance_id().unwrap_or(""),
                        adopted = ?d.adopted,
                        already_held = ?d.already_held,
                        rejected = d.rejected.len(),
                        "deposited listeners with fdkeeper"
                    );
                    for r in &d.rejected {
                        tracing::warn!(address = %r.address, reason = %r.reason, "fdkeeper rejected a deposited listener");
                    }
                    break next;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "deposit failed; retrying");
                }
            }
        };
    }
}
