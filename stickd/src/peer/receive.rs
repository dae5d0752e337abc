//! The receiving side: the Peer service, which applies the logs peers push to us.
//!
//! It checks who connects, and acknowledges each batch once applied.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use proto::stick::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

use super::{PeerState, Peers, Positions, def_to_pb, mismatches};
use crate::config::Config;
use crate::store::{Store, StoreError};
use common::time::now_ms;

/// The receiving side: applies the logs peers push to us.
pub struct PeerService {
    pub config: Arc<Config>,
    pub store: Arc<Store>,
    pub peers: Arc<Peers>,
    pub shutdown: CancellationToken,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<pb::PeerReply, Status>> + Send>>;

fn reply(msg: pb::peer_reply::Msg) -> Result<pb::PeerReply, Status> {
    Ok(pb::PeerReply { msg: Some(msg) })
}

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    type ReplicateStream = ReplyStream;

    async fn replicate(
        &self,
        request: Request<Streaming<pb::PeerMessage>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let remote = request
            .remote_addr()
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let certs = request.peer_certs();
        if let Some(secret) = &self.config.peer_secret
            && !secret.verify(request.metadata())
        {
            warn!(client.addr = %remote, "refused a peer without the shared secret");
            return Err(Status::unauthenticated(
                "missing or wrong peer secret (peer_secret_file)",
            ));
        }
        let mut incoming = request.into_inner();
        let dead_after = self.config.heartbeat * 3;
        let hello = match tokio::time::timeout(dead_after, incoming.next()).await {
            Ok(Some(Ok(pb::PeerMessage {
                msg: Some(pb::peer_message::Msg::Hello(h)),
            }))) => h,
            Ok(Some(Err(s))) => return Err(s),
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be a hello",
                ));
            }
        };
        if hello.to != self.store.local() {
            warn!(client.addr = %remote, from = %hello.from, to = %hello.to, "refused a peer that addressed another node");
            return Err(Status::permission_denied(format!(
                "this is peer '{}', not '{}'",
                self.store.local(),
                hello.to
            )));
        }
        let Some(state) = self.peers.map.get(&hello.from).cloned() else {
            warn!(client.addr = %remote, from = %hello.from, "refused an unknown peer");
            return Err(Status::permission_denied(format!(
                "unknown peer '{}': not in {}'s configuration",
                hello.from,
                self.store.local()
            )));
        };
        if self.config.tls.is_some()
            && let Err(reason) =
                crate::tls::check_peer_name(certs.as_deref().map(Vec::as_slice), &hello.from)
        {
            warn!(client.addr = %remote, from = %hello.from, reason = %reason, "refused a peer whose certificate does not name the peer it claims to be");
            state.error(format!("refused its connection: {reason}"));
            return Err(Status::permission_denied(format!(
                "peer '{}': {reason}",
                hello.from
            )));
        }
        let inbound = match state.claim_inbound(&remote) {
            Ok(g) => g,
            Err(holder) => {
                warn!(client.addr = %remote, from = %hello.from, connected.addr = %holder, "refused a second stream for a peer that is already connected");
                state.error(format!(
                    "refused a second stream from {remote}: already connected from {holder}"
                ));
                return Err(Status::already_exists(format!(
                    "peer '{}' is already connected to '{}' (from {holder})",
                    hello.from,
                    self.store.local()
                )));
            }
        };
        let ours = self.store.table_defs();
        let mism = mismatches(&ours, &hello.tables, &hello.from);
        for (table, reason) in &mism {
            warn!(peer = %hello.from, table = %table, reason = %reason, "table definitions differ: not replicated with this peer");
        }
        let skip: Vec<String> = mism.iter().map(|(t, _)| t.clone()).collect();
        let epoch = hello.log_epoch;
        let (recv_epoch, received) = self.peers.positions.received(&hello.from);
        {
            let mut s = state.lock();
            s.received = received;
            s.mismatches = mism.clone();
        }
        info!(peer = %hello.from, client.addr = %remote, received, their_head = hello.head_seq, "peer connected");
        state.wake.notify_one();
        let recover_own = state
            .recover
            .swap(false, std::sync::atomic::Ordering::Relaxed);
        if recover_own {
            info!(peer = %hello.from, since = self.store.recover_since().unwrap_or(0), "asking the peer for our own writes we may have lost");
        }
        let (tx, rx) = mpsc::channel(64);
        // Cannot fail: the channel is new and has room.
        let _ = tx
            .send(reply(pb::peer_reply::Msg::Welcome(pb::Welcome {
                from: self.store.local().to_owned(),
                received_seq: received,
                log_epoch: recv_epoch,
                mismatches: mism
                    .into_iter()
                    .map(|(table, reason)| pb::TableMismatch { table, reason })
                    .collect(),
                tables: ours.iter().map(def_to_pb).collect(),
                recover_own,
                recover_since_version: self.store.recover_since().unwrap_or(0),
            })))
            .await;
        let stream = Inbound {
            store: self.store.clone(),
            peers: self.peers.clone(),
            state,
            epoch,
            skip,
            dead_after,
            shutdown: self.shutdown.clone(),
        };
        let span = info_span!("inbound", peer = %hello.from);
        tokio::spawn(
            async move {
                let result = stream.receive(received, &mut incoming, &tx).await;
                if let Err(e) = &result {
                    warn!(error = %e, "inbound replication stream ended");
                    stream.state.error(e);
                    let _ = tx.send(Err(e.clone())).await;
                } else {
                    debug!("inbound replication stream closed");
                }
                drop(inbound);
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// What one inbound stream keeps from its handshake.
struct Inbound {
    store: Arc<Store>,
    peers: Arc<Peers>,
    state: Arc<PeerState>,
    /// The epoch of the peer's log that the stream carries.
    epoch: u64,
    /// Tables whose definitions differ: not replicated with this peer.
    skip: Vec<String>,
    /// Silence after which the link is taken for dead.
    dead_after: Duration,
    shutdown: CancellationToken,
}

impl Inbound {
    /// Applies what the peer sends, from `position` in its log on, and answers on `tx`.
    async fn receive(
        &self,
        mut position: u64,
        incoming: &mut Streaming<pb::PeerMessage>,
        tx: &mpsc::Sender<Result<pb::PeerReply, Status>>,
    ) -> Result<(), Status> {
        let Inbound {
            store,
            peers,
            state,
            epoch,
            skip,
            dead_after,
            shutdown,
        } = self;
        let (epoch, dead_after) = (*epoch, *dead_after);
        let from = state.peer.name.clone();
        // A snapshot chunk is applied while the next message is read and decoded; anything else
        // waits for it, so that changes apply in the order sent and no ack runs ahead of the data.
        let mut applying: Option<Applying> = None;
        loop {
            let msg = tokio::select! {
                () = shutdown.cancelled() => return finish(&mut applying, state).await,
                m = tokio::time::timeout(dead_after, incoming.next()) => match m {
                    Err(_) => return Err(Status::deadline_exceeded(format!("nothing from {from} for {dead_after:?}"))),
                    Ok(None) => return finish(&mut applying, state).await,
                    Ok(Some(m)) => m?,
                },
            };
            let answer = match msg.msg {
                Some(pb::peer_message::Msg::Batch(b)) => {
                    finish(&mut applying, state).await?;
                    let n = b.changes.len() as u64;
                    // Applying thousands of changes takes the store's lock and touches sled: keep it
                    // off the async workers.
                    let (st, peers2, from2, skip2) =
                        (store.clone(), peers.clone(), from.clone(), skip.clone());
                    let applied = tokio::task::spawn_blocking(move || {
                        let r = apply_batch(
                            &st,
                            &peers2.positions,
                            &from2,
                            epoch,
                            position,
                            b.changes,
                            &skip2,
                        );
                        st.backpressure();
                        r
                    })
                    .await
                    .map_err(|e| Status::internal(format!("apply task failed: {e}")))??;
                    let Some(through) = applied else {
                        continue;
                    };
                    position = through;
                    let mut s = state.lock();
                    s.received = position;
                    s.entries_received += n;
                    pb::peer_reply::Msg::Ack(pb::Ack { seq: position })
                }
                Some(pb::peer_message::Msg::Snapshot(c)) => {
                    finish(&mut applying, state).await?;
                    if !c.table.is_empty() && skip.contains(&c.table) {
                        continue;
                    }
                    let n = c.entries.len() as u64;
                    let (last, through) = (c.last, c.through_seq);
                    let (st, peers2, from2) = (store.clone(), peers.clone(), from.clone());
                    let task = tokio::task::spawn_blocking(move || {
                        let r = peers2.positions.apply_snapshot(&st, &from2, epoch, c);
                        st.backpressure();
                        r
                    });
                    applying = Some(Applying { task, entries: n });
                    if !last {
                        continue;
                    }
                    finish(&mut applying, state).await?;
                    position = through;
                    state.lock().received = position;
                    info!(through = position, "snapshot from peer applied");
                    pb::peer_reply::Msg::Ack(pb::Ack { seq: position })
                }
                Some(pb::peer_message::Msg::Heartbeat(_)) => {
                    pb::peer_reply::Msg::Heartbeat(pb::Heartbeat { unix_ms: now_ms() })
                }
                Some(pb::peer_message::Msg::Hello(_)) | None => {
                    return Err(Status::invalid_argument("unexpected message after hello"));
                }
            };
            if tx.send(reply(answer)).await.is_err() {
                return finish(&mut applying, state).await;
            }
        }
    }
}

/// Applies one batch of `from`'s log received at `position`: it must not leave a gap after it;
/// its changes merge by LWW (entries that do not fit our tables are skipped). Returns the new
/// position, or `None` for an empty batch.
pub(crate) fn apply_batch(
    store: &Store,
    positions: &Positions,
    from: &str,
    epoch: u64,
    position: u64,
    changes: Vec<pb::Change>,
    skip: &[String],
) -> Result<Option<u64>, Status> {
    let Some(last) = changes.last().map(|c| c.seq) else {
        return Ok(None);
    };
    let first = changes.first().map_or(last, |c| c.seq);
    if first > position.saturating_add(1) {
        return Err(Status::failed_precondition(format!(
            "gap in {from}'s log: have {position}, got {first}"
        )));
    }
    let through = last.max(position);
    positions
        .apply_remote(store, from, epoch, changes, skip, through)
        .map_err(|e| Status::internal(e.to_string()))?;
    Ok(Some(through))
}

/// A snapshot chunk being applied (off the async workers) while the stream is read on.
struct Applying {
    task: tokio::task::JoinHandle<Result<(), StoreError>>,
    entries: u64,
}

/// Waits for the chunk being applied, if any, and counts its entries.
async fn finish(applying: &mut Option<Applying>, state: &PeerState) -> Result<(), Status> {
    let Some(a) = applying.take() else {
        return Ok(());
    };
    a.task
        .await
        .map_err(|e| Status::internal(format!("apply task failed: {e}")))?
        .map_err(|e| Status::internal(e.to_string()))?;
    state.lock().entries_received += a.entries;
    Ok(())
}
