//! What the soak did to the cluster and when (events), and which failures and sticky moves those
//! events excuse.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use crate::load::FailKind;

/// A master or fdkeeper kill excuses failures until this long after its daemon is back: a
/// connection queued meanwhile is answered only then.
pub const KILL_WINDOW_GRACE: Duration = Duration::from_secs(2);
/// A sticky client may land elsewhere until this long after a kill or partition of the node that
/// held its entry (or that it landed on): the time for the healed node's stores to replicate.
pub const MOVE_GRACE: Duration = Duration::from_secs(10);

/// What the soak did to the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventKind {
    Reload,
    KillWorker,
    KillMaster,
    KillStickd,
    KillFdkeeper,
    Partition,
}

impl EventKind {
    pub const ALL: [EventKind; 6] = [
        EventKind::Reload,
        EventKind::KillWorker,
        EventKind::KillMaster,
        EventKind::KillStickd,
        EventKind::KillFdkeeper,
        EventKind::Partition,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Reload => "proxyd reload",
            Self::KillWorker => "kill -9 proxyd worker",
            Self::KillMaster => "kill -9 proxyd master",
            Self::KillStickd => "kill -9 stickd",
            Self::KillFdkeeper => "kill -9 fdkeeper",
            Self::Partition => "stickd partition",
        }
    }
}

/// One event, with times since the start of the run.
#[derive(Clone, Debug)]
pub struct Event {
    pub kind: EventKind,
    /// Index of the node (0-based).
    pub node: usize,
    pub start: Duration,
    /// When the node was whole again (the daemon back, the reload done, the partition healed).
    pub end: Duration,
    /// For a worker kill: the client addresses of the connections the killed worker held.
    pub killed_conns: HashSet<SocketAddr>,
    /// False when the event did not go as it should (a refused reload): a violation.
    pub ok: bool,
    pub note: String,
}

impl Event {
    fn touches(&self, from: Duration, to: Duration, grace: Duration) -> bool {
        from <= self.end + grace && to >= self.start
    }
}

/// One failed request.
#[derive(Clone, Debug)]
pub struct Failure {
    pub class: &'static str,
    pub node: usize,
    /// The client side of the connection, when one was open.
    pub client: Option<SocketAddr>,
    /// When that connection was opened.
    pub opened: Option<Duration>,
    pub started: Duration,
    pub ended: Duration,
    pub kind: FailKind,
    pub why: String,
}

/// Why a request failed, as far as the events tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cause {
    /// Allowed: its connection was on a worker that was killed, or it overlapped the kill of
    /// its node's master or fdkeeper.
    Expected(EventKind),
    /// A violation, during this kind of event (`None`: during no event at all).
    Violation(Option<EventKind>),
}

impl Cause {
    pub fn name(self) -> String {
        match self {
            Self::Expected(EventKind::KillWorker) => {
                "expected: in flight on the killed worker".into()
            }
            Self::Expected(k) => format!("expected: in the {} window", k.name()),
            Self::Violation(Some(k)) => format!("VIOLATION during {}", k.name()),
            Self::Violation(None) => "VIOLATION outside any event".into(),
        }
    }
}

/// Attributes one failure to the events of the run.
pub fn attribute(f: &Failure, events: &[Event]) -> Cause {
    for e in events.iter().filter(|e| e.node == f.node) {
        match e.kind {
            EventKind::KillWorker => {
                let held = f.client.is_some_and(|c| e.killed_conns.contains(&c));
                let before = f.opened.is_some_and(|o| o < e.start);
                if held && before && f.ended >= e.start {
                    return Cause::Expected(e.kind);
                }
            }
            EventKind::KillMaster | EventKind::KillFdkeeper
                if e.touches(f.started, f.ended, KILL_WINDOW_GRACE) =>
            {
                return Cause::Expected(e.kind);
            }
            _ => {}
        }
    }
    // Not excused: name the event it happened in, its own node's first.
    let during = |same_node: bool| {
        events
            .iter()
            .filter(|e| (e.node == f.node) == same_node)
            .find(|e| e.touches(f.started, f.ended, KILL_WINDOW_GRACE))
            .map(|e| e.kind)
    };
    Cause::Violation(during(true).or_else(|| during(false)))
}

/// A sticky client answered by another server than the one that held its session.
#[derive(Clone, Debug)]
pub struct Move {
    /// The node the request went to.
    pub node: usize,
    /// The node where the client's entry was created (or last moved).
    pub holder: usize,
    pub at: Duration,
    /// When the session was created (or last moved), and the servers before and after.
    pub since: Duration,
    pub from: String,
    pub to: String,
    /// Per node, the last time before the move that it answered this session: a node it
    /// visited during a partition keeps its own version of the entry, which may win once healed.
    pub seen: Vec<Option<Duration>>,
}

/// A session answered on a node this long before a kill there may have had its entry only in
/// that worker's batch of stores not yet sent to stickd.
pub const SEEN_BEFORE: Duration = Duration::from_secs(2);

/// The event that excuses a move (the latest, if several): a kill of a daemon that holds stick
/// entries (a worker's cache, stickd; a master's workers go with it) or a partition, shortly
/// before, of a node that held a version of the entry: where it was created or last moved, where
/// the request went, or where the session was answered since just before the event. Reloads and
/// fdkeeper kills excuse nothing: they hold no entry.
pub fn excuse(m: &Move, events: &[Event]) -> Option<EventKind> {
    let held = |e: &Event| {
        e.node == m.node
            || e.node == m.holder
            || m.seen
                .get(e.node)
                .copied()
                .flatten()
                .is_some_and(|t| t + SEEN_BEFORE >= e.start)
    };
    events
        .iter()
        .filter(|e| !matches!(e.kind, EventKind::Reload | EventKind::KillFdkeeper))
        .filter(|e| held(e))
        .filter(|e| e.touches(m.at, m.at, MOVE_GRACE))
        .max_by_key(|e| e.start)
        .map(|e| e.kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soak::report::fixtures::{addr, event, failure, s};

    #[test]
    fn a_failure_is_expected_only_on_a_connection_the_killed_worker_held() {
        let mut kill = event(EventKind::KillWorker, 0, 100, 101);
        kill.killed_conns.insert(addr(40000));
        let events = vec![kill, event(EventKind::Reload, 1, 100, 102)];
        // Held by the killed worker, opened before, failed at the kill.
        assert_eq!(
            attribute(&failure(0, 40000, 90, 99, 100), &events),
            Cause::Expected(EventKind::KillWorker)
        );
        // Another connection on the same node at the same time: not excused.
        assert_eq!(
            attribute(&failure(0, 40001, 90, 99, 100), &events),
            Cause::Violation(Some(EventKind::KillWorker))
        );
        // The same client port, but a connection opened after the kill (port reuse).
        assert_eq!(
            attribute(&failure(0, 40000, 100, 103, 103), &events),
            Cause::Violation(Some(EventKind::KillWorker))
        );
        // The same port on another node is another connection; during node2's reload.
        assert_eq!(
            attribute(&failure(1, 40000, 90, 99, 100), &events),
            Cause::Violation(Some(EventKind::Reload))
        );
        // Long after everything.
        assert_eq!(
            attribute(&failure(0, 40000, 200, 300, 301), &events),
            Cause::Violation(None)
        );
    }

    #[test]
    fn master_and_fdkeeper_kills_excuse_their_node_for_the_window_only() {
        let events = vec![
            event(EventKind::KillMaster, 2, 50, 53),
            event(EventKind::KillFdkeeper, 0, 80, 81),
            event(EventKind::KillStickd, 1, 50, 52),
            event(EventKind::Partition, 1, 80, 85),
        ];
        let in_window = failure(2, 1, 40, 52, 54);
        assert_eq!(
            attribute(&in_window, &events),
            Cause::Expected(EventKind::KillMaster)
        );
        // Within the grace after the master is back, not after it.
        assert_eq!(
            attribute(&failure(2, 1, 40, 55, 55), &events),
            Cause::Expected(EventKind::KillMaster)
        );
        assert_eq!(
            attribute(&failure(2, 1, 40, 56, 56), &events),
            Cause::Violation(None)
        );
        // The stickd kill on node2 at the same time excuses nothing, on any node.
        assert_eq!(
            attribute(&failure(1, 1, 40, 51, 51), &events),
            Cause::Violation(Some(EventKind::KillStickd))
        );
        assert_eq!(
            attribute(&failure(0, 1, 70, 80, 80), &events),
            Cause::Expected(EventKind::KillFdkeeper)
        );
        // A partition is no excuse, and its own node's event is named before others.
        assert_eq!(
            attribute(&failure(1, 1, 70, 80, 80), &events),
            Cause::Violation(Some(EventKind::Partition))
        );
    }

    #[test]
    fn moves_are_excused_by_kills_and_partitions_of_the_holder_or_landing_node() {
        let events = vec![
            event(EventKind::KillFdkeeper, 2, 95, 96),
            event(EventKind::KillStickd, 2, 97, 98),
            event(EventKind::Partition, 2, 100, 105),
            event(EventKind::Reload, 0, 200, 201),
            event(EventKind::KillFdkeeper, 0, 300, 301),
        ];
        let m = |node, holder, at| Move {
            node,
            holder,
            at: s(at),
            since: s(0),
            from: "app1".into(),
            to: "app2".into(),
            seen: vec![Some(s(at - 1)), None, Some(s(90))],
        };
        assert_eq!(excuse(&m(0, 2, 103), &events), Some(EventKind::Partition));
        assert_eq!(excuse(&m(2, 1, 114), &events), Some(EventKind::Partition));
        assert_eq!(
            excuse(&m(0, 1, 103), &events),
            None,
            "node3 answered it only 10 s before the partition"
        );
        // Answered by node3 during its partition: node3's version may win after the heal.
        let mut visited = m(0, 1, 110);
        visited.seen[2] = Some(s(102));
        assert_eq!(excuse(&visited, &events), Some(EventKind::Partition));
        assert_eq!(excuse(&m(0, 2, 116), &events), None, "too long after");
        assert_eq!(
            excuse(&m(0, 0, 200), &events),
            None,
            "a reload excuses nothing"
        );
        assert_eq!(excuse(&m(0, 0, 300), &events), None, "nor an fdkeeper kill");
        // The stickd kill before the partition also covers it: the latest event is named.
        assert_eq!(excuse(&m(2, 2, 99), &events), Some(EventKind::KillStickd));
        assert_eq!(excuse(&m(2, 2, 101), &events), Some(EventKind::Partition));
    }
}
