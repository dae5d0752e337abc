//! The sending side: one stream per peer carrying our log, reconnecting for ever.
//!
//! A stream goes from the handshake through a snapshot (when the peer is too far behind) to
//! live changes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use proto::stick::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};
use tracing::{debug, info, warn};

use super::{LinkState, PeerState, Positions, def_to_pb, mismatches};
use crate::config::{Config, Peer};
use crate::store::{Store, StoreError};
use common::time::now_ms;

/// Entries per snapshot chunk (and per hold of the store's lock while copying one).
const SNAPSHOT_CHUNK: usize = crate::limits::MAX_BATCH;
/// Changes per pushed batch: big enough to amortise a round trip; the receiver's message bound
/// is derived from it (see `limits`).
const BATCH: usize = crate::limits::MAX_BATCH;
/// Changes pushed but not yet acknowledged before the sender waits for acks.
const WINDOW: u64 = 64 * 1024;

/// A tonic endpoint for a peer, with heartbeats at the HTTP/2 level as well as ours.
fn endpoint(peer: &Peer, config: &Config) -> Result<Endpoint, tonic::transport::Error> {
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let ep = Endpoint::from_shared(format!("{scheme}://{}", peer.address))?
        // Short, so that a SYN lost to a cut link is retried soon, not after the kernel's 1 s.
        .connect_timeout((config.heartbeat / 2).max(Duration::from_millis(100)))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(config.heartbeat)
        .keep_alive_timeout(config.heartbeat * 3)
        .keep_alive_while_idle(true);
    crate::tls::client(ep, config)
}

/// Pushes our log to one peer for ever: connect, handshake, catch up, stream, reconnect.
pub async fn push_loop(
    config: Arc<Config>,
    store: Arc<Store>,
    state: Arc<PeerState>,
    shutdown: CancellationToken,
) {
    // Capped at a quarter of a heartbeat (with connect attempts that give up after half of
    // one): a healed link is used again within about 3/4 of a heartbeat, sooner when the peer's
    // own attempt gets through first (see `Woken`), and an attempt costs one SYN.
    let max_backoff = (config.heartbeat / 4).max(Duration::from_millis(50));
    let mut backoff = Duration::from_millis(50);
    // Failures in a row: the first is a warning, the rest (a peer that stays down) only now and
    // then, so that a dead peer does not fill the log once per heartbeat.
    let mut failures = 0u64;
    loop {
        state.lock().state = LinkState::Connecting;
        let started = Instant::now();
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            r = push_once(&config, &store, &state, &shutdown) => r,
        };
        if shutdown.is_cancelled() {
            return;
        }
        // A stream that lived a while was healthy: start the backoff over.
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(50);
            failures = 0;
        }
        let mut pause = backoff;
        match result {
            Ok(()) => {}
            Err(PushError::Woken) => {
                debug!(peer = %state.peer.name, "peer connected to us: reconnecting now");
                continue;
            }
            Err(e) => {
                failures += 1;
                let refused = matches!(&e, PushError::Status(s)
                    if matches!(s.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated));
                if failures == 1 || failures.is_multiple_of(100) {
                    warn!(peer = %state.peer.name, error = %e, failures, "replication stream to peer ended");
                } else {
                    debug!(peer = %state.peer.name, error = %e, failures, "replication stream to peer ended");
                }
                state.error(&e);
                state.lock().state = if refused {
                    LinkState::Refused
                } else {
                    LinkState::Backoff
                };
                // A refusal needs an operator to fix a config: no point knocking every second.
                if refused {
                    pause = Duration::from_secs(10);
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
            () = state.wake.notified() => debug!("peer connected to us: reconnecting now"),
        }
        backoff = (backoff * 2).min(max_backoff);
    }
}

#[derive(Debug, thiserror::Error)]
enum PushError {
    #[error("connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("peer answered: {}: {}", .0.code(), .0.message())]
    Status(#[from] Status),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("no answer for {0:?}: link is dead")]
    Dead(Duration),
    #[error("peer closed the stream")]
    Closed,
    #[error("peer connected to us while we were connecting: retrying at once")]
    Woken,
}

async fn push_once(
    config: &Config,
    store: &Store,
    state: &PeerState,
    shutdown: &CancellationToken,
) -> Result<(), PushError> {
    let peer = &state.peer;
    let endpoint = endpoint(peer, config)?;
    let channel: Channel = tokio::select! {
        r = endpoint.connect() => r?,
        // The peer has just connected to us, so the link is back; this attempt's SYN may have
        // been lost while it was down: start over now rather than wait out its timeout.
        () = state.wake.notified() => return Err(PushError::Woken),
    };
    let mut client = pb::peer_client::PeerClient::new(channel)
        .max_decoding_message_size(crate::limits::MAX_REPLY)
        .max_encoding_message_size(crate::limits::MAX_REQUEST);
    state.lock().state = LinkState::Handshaking;
    let (tx, rx) = mpsc::channel::<pb::PeerMessage>(16);
    let hello = pb::Hello {
        from: store.local().to_owned(),
        to: peer.name.clone(),
        tables: store.table_defs().iter().map(def_to_pb).collect(),
        log_epoch: store.epoch(),
        head_seq: store.head(),
        first_seq: store.first_seq(),
    };
    send(&tx, pb::peer_message::Msg::Hello(hello)).await?;
    let mut request = Request::new(ReceiverStream::new(rx));
    if let Some(secret) = &config.peer_secret {
        secret.attach(request.metadata_mut());
    }
    let mut replies = client.replicate(request).await?.into_inner();
    let dead_after = config.heartbeat * 3;
    let welcome = match tokio::time::timeout(dead_after, replies.next()).await {
        Err(_) => return Err(PushError::Dead(dead_after)),
        Ok(None) => return Err(PushError::Closed),
        Ok(Some(r)) => match r?.msg {
            Some(pb::peer_reply::Msg::Welcome(w)) => w,
            other => {
                return Err(PushError::Protocol(format!(
                    "expected welcome, got {other:?}"
                )));
            }
        },
    };
    if welcome.from != peer.name {
        return Err(PushError::Protocol(format!(
            "peer at {} says it is '{}', not '{}'",
            peer.address, welcome.from, peer.name
        )));
    }
    // Our view of the differences (the receiver skips its own list; both lists name the same tables).
    let mism = mismatches(&store.table_defs(), &welcome.tables, &peer.name);
    let skip: Vec<String> = mism.iter().map(|(t, _)| t.clone()).collect();
    for (table, reason) in &mism {
        warn!(peer = %peer.name, table = %table, reason = %reason, "table definitions differ: not replicated with this peer");
    }
    let resumable = store.can_resume(welcome.log_epoch, welcome.received_seq);
    let resume = if resumable { welcome.received_seq } else { 0 };
    {
        let mut s = state.lock();
        s.last_handshake_ms = now_ms();
        s.mismatches = mism;
        s.acked = resume;
        s.pushed = resume;
    }
    let mut next = resume + 1;
    // Nothing to send if the receiver is at our head; otherwise the log must reach back to it.
    if !resumable || (next <= store.head() && next < store.first_seq()) {
        state.lock().state = LinkState::Syncing;
        let tables: Vec<String> = store
            .table_defs()
            .into_iter()
            .map(|d| d.name)
            .filter(|n| !skip.contains(n))
            .collect();
        let (through, tables) = store.snapshot_keys(&tables);
        let keys: usize = tables.iter().map(|t| t.slots.len()).sum();
        info!(peer = %peer.name, from = next, first = store.first_seq(), through, keys, "peer is behind our log: sending a full snapshot");
        // Copied a chunk at a time while sending: the store's lock is never held for a whole
        // table, and the peer applies the first chunks while we copy the next.
        let mut entries = 0;
        let n = tables.len();
        for (i, t) in tables.into_iter().enumerate() {
            // At least one chunk per table (it carries the clear).
            let m = t.slots.len().div_ceil(SNAPSHOT_CHUNK).max(1);
            let total = t.slots.len() as u64;
            let mut parts = t.slots.chunks(SNAPSHOT_CHUNK);
            for j in 0..m {
                let part = parts.next().unwrap_or_default();
                let chunk = store.snapshot_entries(&t.name, part);
                entries += chunk.len();
                let last = i + 1 == n && j + 1 == m;
                let c = pb::SnapshotChunk {
                    table: t.name.clone(),
                    entries: chunk,
                    cleared_version: if j == 0 { t.cleared_version } else { 0 },
                    cleared_origin: if j == 0 {
                        t.cleared_origin.clone()
                    } else {
                        String::new()
                    },
                    last,
                    through_seq: if last { through } else { 0 },
                    table_entries: if j == 0 { total } else { 0 },
                };
                send(&tx, pb::peer_message::Msg::Snapshot(c)).await?;
            }
        }
        if n == 0 {
            let c = pb::SnapshotChunk {
                last: true,
                through_seq: through,
                ..Default::default()
            };
            send(&tx, pb::peer_message::Msg::Snapshot(c)).await?;
        }
        let mut s = state.lock();
        s.snapshots_sent += 1;
        s.entries_sent += entries as u64;
        s.pushed = through;
        drop(s);
        next = through + 1;
    } else {
        info!(peer = %peer.name, from = next, head = store.head(), "resuming replication from the log");
    }
    if welcome.recover_own {
        let chunks = store.entries_of(&peer.name, welcome.recover_since_version);
        let entries: usize = chunks.iter().map(|c| c.entries.len()).sum();
        info!(peer = %peer.name, since = welcome.recover_since_version, entries, "peer lost writes of its own: sending them back");
        for c in chunks {
            send(&tx, pb::peer_message::Msg::Snapshot(c)).await?;
        }
        state.lock().entries_sent += entries as u64;
    }
    state.lock().state = LinkState::Connected;
    let mut head_rx = store.subscribe_head();
    let mut heartbeat = tokio::time::interval(config.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    // Send time of each batch, by last sequence, to measure push-to-ack latency.
    let mut in_flight: std::collections::VecDeque<(u64, Instant)> = Default::default();
    let mut acked = resume;
    let mut persisted_ack = Instant::now();
    loop {
        // Push whatever the log has, within the window.
        while next <= store.head() && next.saturating_sub(acked) < WINDOW {
            let changes = store.read_log(next, BATCH)?;
            let Some(last) = changes.last().map(|c| c.seq) else {
                break;
            };
            let n = changes.len() as u64;
            send(&tx, pb::peer_message::Msg::Batch(pb::Batch { changes })).await?;
            in_flight.push_back((last, Instant::now()));
            next = last + 1;
            let mut s = state.lock();
            s.pushed = last;
            s.entries_sent += n;
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            changed = head_rx.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > dead_after {
                    return Err(PushError::Dead(dead_after));
                }
                send(&tx, pb::peer_message::Msg::Heartbeat(pb::Heartbeat { unix_ms: now_ms() })).await?;
            }
            reply = replies.next() => {
                last_heard = Instant::now();
                match reply {
                    None => return Err(PushError::Closed),
                    Some(Err(s)) => return Err(s.into()),
                    Some(Ok(pb::PeerReply { msg: Some(pb::peer_reply::Msg::Ack(a)) })) => {
                        acked = acked.max(a.seq);
                        let mut rtt = None;
                        while in_flight.front().is_some_and(|(s, _)| *s <= acked) {
                            rtt = in_flight.pop_front().map(|(_, t)| t.elapsed());
                        }
                        let mut s = state.lock();
                        s.acked = acked;
                        if let Some(rtt) = rtt {
                            s.rtt_ms = rtt.as_secs_f64() * 1000.0;
                        }
                        drop(s);
                        if persisted_ack.elapsed() > Duration::from_millis(500) {
                            Positions::set_acked(store, &peer.name, acked)?;
                            persisted_ack = Instant::now();
                        }
                    }
                    Some(Ok(_)) => {}
                }
            }
        }
    }
}

async fn send(
    tx: &mpsc::Sender<pb::PeerMessage>,
    msg: pb::peer_message::Msg,
) -> Result<(), PushError> {
    tx.send(pb::PeerMessage { msg: Some(msg) })
        .await
        .map_err(|_| PushError::Closed)
}
