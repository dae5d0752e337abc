//! The lending server: accepts borrowers on the SOCK_SEQPACKET socket, authenticates them, answers their requests.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prost::Message;
use proto::fdlend::v1::Request;
use proto::fdlend::v1::error::Code;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use common::seqpacket::{Acceptor, SeqPacket};

use crate::limits::{MAX_FDS_PER_MESSAGE, MAX_REQUEST};
use crate::registry::{Registry, error_kind, response};
use crate::sys::{self, PeerCred};

/// How long a refused peer may take to send its first request (which gets the refusal).
const REFUSAL_WAIT: Duration = Duration::from_secs(5);

pub type Shared = Arc<Mutex<Registry>>;

pub fn lock(reg: &Shared) -> MutexGuard<'_, Registry> {
    // A panic while holding the lock leaves the map consistent enough to keep lending.
    reg.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Accepts borrowers until `shutdown`; each connection runs in `tracker`.
pub async fn serve(
    acceptor: Acceptor,
    registry: Shared,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let next_id = AtomicU64::new(1);
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            r = acceptor.accept() => r,
        };
        let fd = match accepted {
            Ok(fd) => fd,
            Err(e) => {
                // EMFILE and friends: wait instead of spinning on a socket that stays readable.
                tracing::error!(error = %e, "accept on the lending socket failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let cred = match sys::peer_cred(fd.as_fd()) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the peer's credentials; closing");
                continue;
            }
        };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!(
            "borrower",
            conn = id,
            peer.pid = cred.pid,
            peer.uid = cred.uid,
            peer.gid = cred.gid
        );
        tracker
            .spawn(connection(id, fd, cred, registry.clone(), shutdown.clone()).instrument(span));
    }
}

async fn connection(
    id: u64,
    fd: OwnedFd,
    cred: PeerCred,
    registry: Shared,
    shutdown: CancellationToken,
) {
    let conn = match SeqPacket::new(fd) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot register a borrower connection");
            return;
        }
    };
    let allowed = lock(&registry).config.allows_peer(cred.uid, cred.gid);
    if !allowed {
        tracing::warn!(
            pid = cred.pid,
            uid = cred.uid,
            gid = cred.gid,
            "refused a peer whose uid and gid are not allowed"
        );
        refuse(&conn, &shutdown).await;
        return;
    }
    tracing::debug!("borrower connected");
    lock(&registry).connected(id, cred);
    let mut buf = vec![0u8; MAX_REQUEST];
    loop {
        let got = tokio::select! {
            () = shutdown.cancelled() => break,
            r = conn.recv(&mut buf, MAX_FDS_PER_MESSAGE) => r,
        };
        let got = match got {
            Ok(g) => g,
            Err(e) => {
                tracing::debug!(error = %e, "borrower connection failed");
                break;
            }
        };
        if got.len == 0 && got.fds.is_empty() && !got.truncated {
            break;
        }
        let (id_echo, kind, fds) = if got.truncated || got.fds_truncated {
            // Whatever fds did arrive are dropped (closed) here.
            let what = if got.truncated {
                format!("request larger than {MAX_REQUEST} bytes")
            } else {
                format!("more than {MAX_FDS_PER_MESSAGE} fds in one message")
            };
            tracing::warn!(reason = %what, "refused a truncated request");
            (0, error_kind(Code::InvalidArgument, what), Vec::new())
        } else {
            match Request::decode(&buf[..got.len]) {
                Err(e) => {
                    tracing::warn!(error = %e, "refused an undecodable request");
                    (
                        0,
                        error_kind(Code::InvalidArgument, format!("undecodable request: {e}")),
                        Vec::new(),
                    )
                }
                Ok(Request {
                    id: rid,
                    kind: None,
                }) => (
                    rid,
                    error_kind(Code::InvalidArgument, "request has no kind"),
                    Vec::new(),
                ),
                Ok(Request {
                    id: rid,
                    kind: Some(kind),
                }) => {
                    let (k, fds) = lock(&registry).handle(id, kind, got.fds);
                    if let proto::fdlend::v1::response::Kind::Error(e) = &k {
                        tracing::info!(code = e.code, message = %e.message, "request refused");
                    }
                    (rid, k, fds)
                }
            }
        };
        let bytes = response(id_echo, kind).encode_to_vec();
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
        if let Err(e) = conn.send(&bytes, &borrowed).await {
            tracing::debug!(error = %e, "cannot answer the borrower");
            break;
        }
    }
    tracing::debug!("borrower disconnected");
    lock(&registry).disconnected(id);
}

/// Answers the first request of a refused peer with PERMISSION_DENIED, then lets the
/// connection close. Nothing else is read or sent.
async fn refuse(conn: &SeqPacket, shutdown: &CancellationToken) {
    let mut buf = vec![0u8; MAX_REQUEST];
    let got = tokio::select! {
        () = shutdown.cancelled() => return,
        () = tokio::time::sleep(REFUSAL_WAIT) => return,
        r = conn.recv(&mut buf, MAX_FDS_PER_MESSAGE) => r,
    };
    let rid = match got {
        Ok(g) if !g.truncated => Request::decode(&buf[..g.len]).map_or(0, |r| r.id),
        Ok(_) => 0,
        Err(_) => return,
    };
    let bytes = response(
        rid,
        error_kind(
            Code::PermissionDenied,
            "this uid/gid may not borrow from fdkeeper",
        ),
    )
    .encode_to_vec();
    if let Err(e) = conn.send(&bytes, &[]).await {
        tracing::debug!(error = %e, "cannot send the refusal");
    }
}
