//! Replication over gRPC: our log pushed to every peer, and the peers' logs applied here.
//!
//! One outgoing stream per peer carries our log (`push`); the server side applies a peer's log
//! here (`receive`); `positions` keeps where each stands.
//!
//! Each node pushes only its own changes (full mesh), so the pair (A, B) has two streams: A's log
//! to B over a stream A opened, and B's log to A over one B opened. The receiver keeps, per origin,
//! the last sequence it applied (with the data, in sled) and tells it in `Welcome`; the sender
//! resumes right after it, or sends a full snapshot when its log was trimmed past that point or
//! when the receiver's position belongs to an older incarnation of the log (a wiped data_dir).

mod positions;
mod push;
mod receive;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use proto::stick::v1 as pb;

use crate::config::{Config, Peer, TableDef};
use crate::store::{Store, StoreError};

pub use positions::Positions;
pub use push::push_loop;
pub use receive::PeerService;
#[cfg(test)]
pub(crate) use receive::apply_batch;

/// Where our outgoing stream to a peer stands: ShowPeers' `state`, as text only there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LinkState {
    /// Connecting, or about to.
    #[default]
    Connecting,
    /// Connected; hello sent, waiting for the welcome.
    Handshaking,
    /// Sending the peer a full snapshot.
    Syncing,
    /// Streaming our log.
    Connected,
    /// Waiting before the next attempt, after a failure.
    Backoff,
    /// The peer refused us (secret, certificate, name): waiting longer, an operator must act.
    Refused,
}

impl LinkState {
    /// The state's name in ShowPeers.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Handshaking => "handshaking",
            LinkState::Syncing => "syncing",
            LinkState::Connected => "connected",
            LinkState::Backoff => "backoff",
            LinkState::Refused => "refused",
        }
    }
}

/// What ShowPeers reports about one peer.
#[derive(Clone, Debug, Default)]
pub struct PeerStatus {
    pub state: LinkState,
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

/// One configured peer: its replication status and what its two streams share.
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

/// Every configured peer, its replication status, and where replication stands with each.
pub struct Peers {
    pub map: HashMap<String, Arc<PeerState>>,
    pub positions: Positions,
}

impl Peers {
    /// The configured peers, with the positions the store holds for them.
    pub fn new(config: &Config, store: &Store) -> Result<Peers, StoreError> {
        let map = config
            .peers
            .iter()
            .map(|p| {
                let status = PeerStatus {
                    state: LinkState::Connecting,
                    acked: Positions::acked(store, &p.name),
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
        Ok(Peers {
            map,
            positions: Positions::load(store)?,
        })
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
                    state: s.state.as_str().to_owned(),
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
