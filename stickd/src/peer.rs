//! Replication over gRPC: one outgoing stream per peer carrying our log, and the server side that
//! applies a peer's log here.
//!
//! Each node pushes only its own changes (full mesh), so the pair (A, B) has two streams: A's log
//! to B over a stream A opened, and B's log to A over one B opened. The receiver keeps, per origin,
//! the last sequence it applied (with the data, in sled) and tells it in `Welcome`; the sender
//! resumes right after it, or sends a full snapshot when its log was trimmed past that point or
//! when the receiver's position belongs to an older incarnation of the log (a wiped data_dir).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use proto::stick::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::{Config, Peer, TableDef};
use crate::store::{Store, StoreError, now_ms};

/// Entries per snapshot chunk (and per hold of the store's lock while copying one).
const SNAPSHOT_CHUNK: usize = crate::limits::MAX_BATCH;
/// Changes per pushed batch: big enough to amortise a round trip; the receiver's message bound
/// is derived from it (see `limits`).
const BATCH: usize = crate::limits::MAX_BATCH;
/// Changes pushed but not yet acknowledged before the sender waits for acks.
const WINDOW: u64 = 64 * 1024;

/// What ShowPeers reports about one peer.
#[derive(Clone, Debug, Default)]
pub struct PeerStatus {
    pub state: &'static str,
    pub inbound: u32,
    /// Where the live inbound stream comes from.
    pub inbound_addr: String,
    pub last_handshake_ms: i64,
    pub pushed: u64,
    pub acked: u64,
    pub rtt_ms: f64,
    pub received: u64,
    pub errors: u64,
    pub last_error: String,
    /// (table, reason) pairs, from either side's point of view.
    pub mismatches: Vec<(String, String)>,
    pub snapshots_sent: u64,
    pub entries_sent: u64,
    pub entries_received: u64,
}

pub struct PeerState {
    pub peer: Peer,
    status: Mutex<PeerStatus>,
    /// Rung when the peer connects to us: it is back, so our pusher skips the rest of its backoff.
    wake: tokio::sync::Notify,
    /// We still have to ask this peer for our own writes we lost (see `Store::recover_since`).
    recover: std::sync::atomic::AtomicBool,
}

impl PeerState {
    fn lock(&self) -> MutexGuard<'_, PeerStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> PeerStatus {
        self.lock().clone()
    }

    /// Takes the peer's one inbound slot for a stream from `remote`; `Err` with the address of
    /// the stream that holds it. One live stream per name: a second process claiming a
    /// connected peer's name is refused instead of having its writes replicated.
    fn claim_inbound(self: &Arc<Self>, remote: &str) -> Result<InboundGuard, String> {
        let mut s = self.lock();
        if s.inbound > 0 {
            return Err(s.inbound_addr.clone());
        }
        s.inbound = 1;
        s.inbound_addr = remote.to_owned();
        Ok(InboundGuard(self.clone()))
    }

    fn error(&self, e: impl std::fmt::Display) {
        let mut s = self.lock();
        s.errors += 1;
        s.last_error = e.to_string();
    }
}

/// Holds a peer's inbound slot (see `PeerState::claim_inbound`) until dropped.
struct InboundGuard(Arc<PeerState>);

impl Drop for InboundGuard {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.inbound = 0;
        s.inbound_addr.clear();
    }
}

/// Every configured peer and its replication status.
pub struct Peers {
    pub map: HashMap<String, Arc<PeerState>>,
}

impl Peers {
    pub fn new(config: &Config, store: &Store) -> Peers {
        let map = config
            .peers
            .iter()
            .map(|p| {
                let status = PeerStatus {
                    state: "connecting",
                    acked: store.acked(&p.name),
                    ..PeerStatus::default()
                };
                (
                    p.name.clone(),
                    Arc::new(PeerState {
                        peer: p.clone(),
                        status: Mutex::new(status),
                        wake: tokio::sync::Notify::new(),
                        recover: std::sync::atomic::AtomicBool::new(
                            store.recover_since().is_some(),
                        ),
                    }),
                )
            })
            .collect();
        Peers { map }
    }

    /// ShowPeers, sorted by name.
    pub fn show(&self, store: &Store) -> pb::ShowPeersReply {
        let head = store.head();
        let mut peers: Vec<_> = self
            .map
            .values()
            .map(|p| {
                let s = p.status();
                pb::PeerInfo {
                    name: p.peer.name.clone(),
                    address: p.peer.address.clone(),
                    state: s.state.to_owned(),
                    inbound_connected: s.inbound > 0,
                    last_handshake_unix_ms: s.last_handshake_ms,
                    pushed_seq: s.pushed,
                    acked_seq: s.acked,
                    head_seq: head,
                    lag: head.saturating_sub(s.acked),
                    last_ack_rtt_ms: s.rtt_ms,
                    received_seq: s.received,
                    errors: s.errors,
                    last_error: s.last_error,
                    mismatches: s
                        .mismatches
                        .into_iter()
                        .map(|(table, reason)| pb::TableMismatch { table, reason })
                        .collect(),
                    snapshots_sent: s.snapshots_sent,
                    entries_sent: s.entries_sent,
                    entries_received: s.entries_received,
                }
            })
            .collect();
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        pb::ShowPeersReply {
            local: store.local().to_owned(),
            peers,
        }
    }
}

fn def_to_pb(d: &TableDef) -> pb::TableDef {
    pb::TableDef {
        name: d.name.clone(),
        r#type: d.key.name().to_owned(),
        len: d.key.max_len(),
        size: d.size,
        expire_ms: u64::try_from(d.expire.as_millis()).unwrap_or(u64::MAX),
    }
}

fn describe(d: &pb::TableDef) -> String {
    let len = if d.r#type == "string" {
        format!(" len {}", d.len)
    } else {
        String::new()
    };
    format!(
        "type {}{len} size {} expire {}",
        d.r#type,
        d.size,
        common::Duration(Duration::from_millis(d.expire_ms))
    )
}

/// Tables that cannot be replicated between us and a peer with definitions `theirs`, and why.
pub fn mismatches(ours: &[TableDef], theirs: &[pb::TableDef], peer: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for o in ours {
        let o = def_to_pb(o);
        match theirs.iter().find(|t| t.name == o.name) {
            None => out.push((o.name.clone(), format!("not defined on {peer}"))),
            Some(t) if *t != o => out.push((
                o.name.clone(),
                format!("{} here, {} on {peer}", describe(&o), describe(t)),
            )),
            Some(_) => {}
        }
    }
    for t in theirs {
        if !ours.iter().any(|o| o.name == t.name) {
            out.push((t.name.clone(), format!("defined on {peer} but not here")));
        }
    }
    out
}

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
        state.lock().state = "connecting";
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
                state.lock().state = if refused { "refused" } else { "backoff" };
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
    state.lock().state = "handshaking";
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
        state.lock().state = "syncing";
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
    state.lock().state = "connected";
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
                            store.set_acked(&peer.name, acked)?;
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
        let (recv_epoch, received) = self
            .store
            .received(&hello.from)
            .map_err(|e| Status::internal(e.to_string()))?;
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
        let store = self.store.clone();
        let shutdown = self.shutdown.clone();
        let span = info_span!("inbound", peer = %hello.from);
        tokio::spawn(
            async move {
                let result = receive(
                    &store,
                    &state,
                    epoch,
                    received,
                    &skip,
                    &mut incoming,
                    &tx,
                    dead_after,
                    &shutdown,
                )
                .await;
                if let Err(e) = &result {
                    warn!(error = %e, "inbound replication stream ended");
                    state.error(e);
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

#[allow(clippy::too_many_arguments)]
async fn receive(
    store: &Arc<Store>,
    state: &PeerState,
    epoch: u64,
    mut position: u64,
    skip: &[String],
    incoming: &mut Streaming<pb::PeerMessage>,
    tx: &mpsc::Sender<Result<pb::PeerReply, Status>>,
    dead_after: Duration,
    shutdown: &CancellationToken,
) -> Result<(), Status> {
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
                let (st, from2, skip2) = (store.clone(), from.clone(), skip.to_vec());
                let applied = tokio::task::spawn_blocking(move || {
                    let r = apply_batch(&st, &from2, epoch, position, b.changes, &skip2);
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
                let (st, from2) = (store.clone(), from.clone());
                let task = tokio::task::spawn_blocking(move || {
                    let r = st.apply_snapshot(&from2, epoch, c);
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

/// Applies one batch of `from`'s log received at `position`: it must not leave a gap after it;
/// its changes merge by LWW (entries that do not fit our tables are skipped). Returns the new
/// position, or `None` for an empty batch.
pub(crate) fn apply_batch(
    store: &Store,
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
    store
        .apply_remote(from, epoch, changes, skip, Some(through))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeyType;

    #[test]
    fn mismatches_name_the_difference() {
        let ours = vec![
            TableDef {
                name: "a".into(),
                key: KeyType::String { len: 32 },
                size: 10,
                expire: Duration::from_secs(60),
            },
            TableDef {
                name: "b".into(),
                key: KeyType::Ip,
                size: 10,
                expire: Duration::from_secs(60),
            },
        ];
        let mut theirs: Vec<_> = ours.iter().map(def_to_pb).collect();
        assert!(mismatches(&ours, &theirs, "p").is_empty());
        theirs[0].len = 64;
        theirs.remove(1);
        theirs.push(pb::TableDef {
            name: "c".into(),
            r#type: "ip".into(),
            ..Default::default()
        });
        let m = mismatches(&ours, &theirs, "p");
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[0].1,
            "type string len 32 size 10 expire 1m here, type string len 64 size 10 expire 1m on p"
        );
        assert_eq!(m[1].1, "not defined on p");
        assert_eq!(m[2].1, "defined on p but not here");
    }
}
