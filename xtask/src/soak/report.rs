//! The soak's pure bookkeeping: what happened when (events), which failures and sticky moves
//! those events excuse, the RSS trend per daemon, and the report built from them.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use crate::load::FailKind;

/// A master or fdkeeper kill excuses failures until this long after its daemon is back: a
/// connection queued meanwhile is answered only then.
pub const KILL_WINDOW_GRACE: Duration = Duration::from_secs(2);
/// A sticky client may land elsewhere until this long after a kill or partition of the node that
/// held its entry (or that it landed on): the time for the healed node's stores to replicate.
pub const MOVE_GRACE: Duration = Duration::from_secs(10);
/// A daemon whose RSS grows faster than this over the second half of the run is a violation.
pub const RSS_SLOPE_LIMIT_MIB_PER_H: f64 = 10.0;
/// Slopes are judged only over at least this long: a minute's noise, extrapolated to an hour,
/// says nothing.
pub const RSS_MIN_SPAN: Duration = Duration::from_secs(300);
/// The first minute of each process lifetime is left out of the slope: allocator arenas and the
/// stick cache fill then, which is growth to a plateau, not a trend.
pub const LIFETIME_WARM_UP_S: f64 = 60.0;
/// stickd's warm-up is longer: its change log, sled's journal and the allocator's pages grow for
/// half an hour at the soak's 2-3 stick writes per second before they level off. Unkilled at that
/// load, stickd went from 32.7 MiB to 36.2-36.5 in 10 minutes (19-21 MiB/h) and to 38.5-40.2 in
/// 30, then stayed there (39.0-40.0 at 50 minutes); a slope fitted earlier in a lifetime reads
/// that warm-up as a leak, and one fitted after it still shows a leak of 10 MiB/h.
pub const STICKD_WARM_UP_S: f64 = 30.0 * 60.0;

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

/// One RSS sample of one daemon kind on one node: seconds into the run, MiB, and which
/// processes it summed (a different set starts a new lifetime).
#[derive(Clone, Debug, PartialEq)]
pub struct RssSample {
    pub t: f64,
    pub mib: f64,
    pub pids: Vec<u32>,
}

/// The samples of `series` taken at least `warm_up` seconds after the first sample of their
/// lifetime (a run of samples with the same pids).
pub fn settled(series: &[RssSample], warm_up: f64) -> Vec<RssSample> {
    series
        .chunk_by(|a, b| a.pids == b.pids)
        .flat_map(|life| {
            let born = life[0].t;
            life.iter().filter(move |s| s.t >= born + warm_up).cloned()
        })
        .collect()
}

/// Every sample as CSV (`t_s,node,daemon,mib,pids`), for a closer look than the slope.
pub fn rss_csv(rss: &BTreeMap<(usize, Daemon), Vec<RssSample>>) -> String {
    let mut out = String::from("t_s,node,daemon,mib,pids\n");
    for ((node, daemon), series) in rss {
        for s in series {
            let pids: Vec<String> = s.pids.iter().map(u32::to_string).collect();
            let _ = writeln!(
                out,
                "{:.1},node{},{},{:.2},{}",
                s.t,
                node + 1,
                daemon.name(),
                s.mib,
                pids.join(" ")
            );
        }
    }
    out
}

/// Seconds from the first to the last of `samples`.
fn span_s(samples: &[RssSample]) -> f64 {
    let (lo, hi) = samples
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), s| {
            (lo.min(s.t), hi.max(s.t))
        });
    (hi - lo).max(0.0)
}

/// Least-squares slope in MiB per hour, with one intercept per lifetime (a run of samples with
/// the same pids): a restarted daemon starts small, and a plain fit across restarts would read
/// its drop and regrowth as a trend. `None` if no lifetime has two samples at distinct times.
pub fn slope_mib_per_hour(samples: &[RssSample]) -> Option<f64> {
    let mut num = 0.0;
    let mut den = 0.0;
    for seg in samples.chunk_by(|a, b| a.pids == b.pids) {
        let n = seg.len() as f64;
        let mt = seg.iter().map(|s| s.t).sum::<f64>() / n;
        let my = seg.iter().map(|s| s.mib).sum::<f64>() / n;
        for s in seg {
            num += (s.t - mt) * (s.mib - my);
            den += (s.t - mt) * (s.t - mt);
        }
    }
    (den > 0.0).then(|| num / den * 3600.0)
}

/// The daemon kinds whose RSS is followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Daemon {
    Fdkeeper,
    Stickd,
    ProxydMaster,
    ProxydWorkers,
}

impl Daemon {
    /// Seconds left out at the start of each lifetime (see [`STICKD_WARM_UP_S`]).
    pub fn warm_up_s(self) -> f64 {
        match self {
            Self::Stickd => STICKD_WARM_UP_S,
            _ => LIFETIME_WARM_UP_S,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Fdkeeper => "fdkeeper",
            Self::Stickd => "stickd",
            Self::ProxydMaster => "proxyd master",
            Self::ProxydWorkers => "proxyd workers",
        }
    }
}

/// Per traffic class: requests and failures.
#[derive(Clone, Debug, Default)]
pub struct ClassTotals {
    pub requests: u64,
    pub failed: u64,
}

/// Everything the run measured.
#[derive(Debug)]
pub struct Run {
    pub seed: u64,
    pub minutes: f64,
    pub elapsed: Duration,
    pub partition_method: &'static str,
    pub classes: BTreeMap<&'static str, ClassTotals>,
    pub failures: Vec<Failure>,
    /// Failures past the recording cap (counted as violations: nothing attributes them).
    pub unrecorded_failures: u64,
    pub events: Vec<Event>,
    pub moves: Vec<Move>,
    pub sessions: u64,
    pub uploaded_bytes: u64,
    /// Ok(time to equal tables and entries) or the difference after the settle time.
    pub tables: Result<(Duration, usize), String>,
    pub rss: BTreeMap<(usize, Daemon), Vec<RssSample>>,
}

/// The report's text and whether the run kept every promise.
pub struct Verdict {
    pub text: String,
    pub violations: Vec<String>,
}

pub fn render(run: &Run) -> Verdict {
    let mut v = Vec::new();
    let mut t = String::new();
    let requests: u64 = run.classes.values().map(|c| c.requests).sum();
    let secs = run.elapsed.as_secs_f64().max(1e-9);
    let _ = writeln!(t, "# Soak report\n");
    let _ = writeln!(
        t,
        "- {:.1} minutes asked, {:.1} s of traffic; seed {} (replay: `cargo xtask soak --minutes {} --seed {}`)",
        run.minutes, secs, run.seed, run.minutes, run.seed
    );
    let _ = writeln!(t, "- partition: {}", run.partition_method);
    let _ = writeln!(
        t,
        "- requests: {requests} ({:.1} req/s), {} sticky sessions created, {:.1} MiB uploaded",
        requests as f64 / secs,
        run.sessions,
        run.uploaded_bytes as f64 / (1024.0 * 1024.0)
    );

    let _ = writeln!(
        t,
        "\n## Traffic\n\n| class | requests | failed |\n|---|---:|---:|"
    );
    for (name, c) in &run.classes {
        let _ = writeln!(t, "| {name} | {} | {} |", c.requests, c.failed);
    }

    let _ = writeln!(
        t,
        "\n## Events\n\n| event | count | not ok | mean time to whole (s) |\n|---|---:|---:|---:|"
    );
    for kind in EventKind::ALL {
        let es: Vec<&Event> = run.events.iter().filter(|e| e.kind == kind).collect();
        let bad = es.iter().filter(|e| !e.ok).count();
        let mean = if es.is_empty() {
            0.0
        } else {
            es.iter()
                .map(|e| (e.end - e.start).as_secs_f64())
                .sum::<f64>()
                / es.len() as f64
        };
        let _ = writeln!(t, "| {} | {} | {bad} | {mean:.2} |", kind.name(), es.len());
        for e in es.iter().filter(|e| !e.ok) {
            v.push(format!(
                "{} on node{} at +{:.1}s: {}",
                kind.name(),
                e.node + 1,
                e.start.as_secs_f64(),
                e.note
            ));
        }
    }

    let mut causes: BTreeMap<Cause, u64> = BTreeMap::new();
    let mut samples: BTreeMap<Cause, &Failure> = BTreeMap::new();
    for f in &run.failures {
        let c = attribute(f, &run.events);
        *causes.entry(c).or_default() += 1;
        samples.entry(c).or_insert(f);
    }
    if run.unrecorded_failures > 0 {
        *causes.entry(Cause::Violation(None)).or_default() += run.unrecorded_failures;
    }
    let _ = writeln!(t, "\n## Failures by cause\n");
    if causes.is_empty() {
        let _ = writeln!(t, "none");
    } else {
        let _ = writeln!(t, "| cause | count | first |\n|---|---:|---|");
    }
    for (c, n) in &causes {
        let first = samples.get(c).map_or(String::new(), |f| {
            format!(
                "+{:.3}s node{} {} {}: {}",
                f.started.as_secs_f64(),
                f.node + 1,
                f.class,
                f.kind.name(),
                f.why
            )
        });
        let _ = writeln!(t, "| {} | {n} | {} |", c.name(), first.replace('|', "/"));
        if matches!(c, Cause::Violation(_)) {
            v.push(format!("{n} failed requests: {}", c.name()));
        }
    }

    let mut excused: BTreeMap<EventKind, u64> = BTreeMap::new();
    let mut unexcused = 0u64;
    let mut listed = String::new();
    for m in &run.moves {
        match excuse(m, &run.events) {
            Some(k) => *excused.entry(k).or_default() += 1,
            None => {
                unexcused += 1;
                if unexcused <= 10 {
                    let _ = writeln!(
                        listed,
                        "- +{:.3}s on node{}: {} -> {} (entry from node{} at +{:.3}s)",
                        m.at.as_secs_f64(),
                        m.node + 1,
                        m.from,
                        m.to,
                        m.holder + 1,
                        m.since.as_secs_f64()
                    );
                }
            }
        }
    }
    let _ = writeln!(
        t,
        "\n## Sticky moves\n\n{} moves: {unexcused} not excused by any event{}",
        run.moves.len(),
        excused
            .iter()
            .map(|(k, n)| format!(", {n} after a {}", k.name()))
            .collect::<String>()
    );
    t.push_str(&listed);
    if unexcused > 0 {
        v.push(format!(
            "{unexcused} sticky moves not after a kill or partition of the node holding the entry"
        ));
    }

    let _ = writeln!(t, "\n## Stick tables at the end\n");
    match &run.tables {
        Ok((took, n)) => {
            let _ = writeln!(
                t,
                "equal on every node after {:.2} s of settling ({n} entries)",
                took.as_secs_f64()
            );
        }
        Err(why) => {
            let _ = writeln!(t, "NOT equal: {why}");
            v.push(format!("stick tables differ at the end: {why}"));
        }
    }

    let half = run.elapsed.as_secs_f64() / 2.0;
    let judged = Duration::from_secs_f64(half) >= RSS_MIN_SPAN;
    let _ = writeln!(
        t,
        "\n## RSS (MiB, sampled from /proc)\n\nSlope: least squares over the second half (from +{half:.0}s), one intercept per process lifetime, each lifetime's first {LIFETIME_WARM_UP_S:.0} s left out (stickd's first {:.0} min: n/a until a stickd lives longer; node1's is never killed); limit {RSS_SLOPE_LIMIT_MIB_PER_H} MiB/h{}.\n\n| node | daemon | first | last | max | samples | slope MiB/h |\n|---|---|---:|---:|---:|---:|---:|",
        STICKD_WARM_UP_S / 60.0,
        if judged {
            String::new()
        } else {
            format!(
                " (not judged: the second half is shorter than {} s)",
                RSS_MIN_SPAN.as_secs()
            )
        }
    );
    for ((node, daemon), series) in &run.rss {
        let late: Vec<RssSample> = settled(series, daemon.warm_up_s())
            .into_iter()
            .filter(|s| s.t >= half)
            .collect();
        // A few samples just past a long warm-up say nothing about an hour either.
        let slope = (span_s(&late) >= RSS_MIN_SPAN.as_secs_f64())
            .then(|| slope_mib_per_hour(&late))
            .flatten();
        let first = series.first().map_or(0.0, |s| s.mib);
        let last = series.last().map_or(0.0, |s| s.mib);
        let max = series.iter().map(|s| s.mib).fold(0.0, f64::max);
        let over = judged && slope.is_some_and(|s| s > RSS_SLOPE_LIMIT_MIB_PER_H);
        let _ = writeln!(
            t,
            "| node{} | {} | {first:.1} | {last:.1} | {max:.1} | {} | {}{} |",
            node + 1,
            daemon.name(),
            series.len(),
            slope.map_or("n/a".into(), |s| format!("{s:+.1}")),
            if over { " OVER" } else { "" }
        );
        if over {
            v.push(format!(
                "node{} {} RSS grows {:+.1} MiB/h (limit {RSS_SLOPE_LIMIT_MIB_PER_H})",
                node + 1,
                daemon.name(),
                slope.unwrap_or_default()
            ));
        }
    }

    let _ = writeln!(t, "\n## Verdict\n");
    if v.is_empty() {
        let _ = writeln!(t, "no violation");
    } else {
        for line in &v {
            let _ = writeln!(t, "- VIOLATION: {line}");
        }
    }
    Verdict {
        text: t,
        violations: v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn event(kind: EventKind, node: usize, start: u64, end: u64) -> Event {
        Event {
            kind,
            node,
            start: s(start),
            end: s(end),
            killed_conns: HashSet::new(),
            ok: true,
            note: String::new(),
        }
    }

    fn failure(node: usize, client: u16, opened: u64, started: u64, ended: u64) -> Failure {
        Failure {
            class: "keep-alive",
            node,
            client: Some(addr(client)),
            opened: Some(s(opened)),
            started: s(started),
            ended: s(ended),
            kind: FailKind::Reset,
            why: "closed before any response byte".into(),
        }
    }

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

    fn series(points: &[(f64, f64, u32)]) -> Vec<RssSample> {
        points
            .iter()
            .map(|&(t, mib, pid)| RssSample {
                t,
                mib,
                pids: vec![pid],
            })
            .collect()
    }

    #[test]
    fn each_lifetime_warm_up_is_left_out() {
        // Two lifetimes that each grow in their first minute and then stay flat: no trend.
        let mut pts = Vec::new();
        for (pid, born) in [(1, 0.0), (2, 300.0)] {
            for i in 0..30 {
                let t = born + f64::from(i) * 10.0;
                let mib = if t - born < 60.0 {
                    30.0 + (t - born) / 6.0
                } else {
                    40.0
                };
                pts.push((t, mib, pid));
            }
        }
        let all = series(&pts);
        assert!(
            slope_mib_per_hour(&all).is_some_and(|s| s > 10.0),
            "warm-up reads as growth"
        );
        let calm = settled(&all, LIFETIME_WARM_UP_S);
        assert_eq!(calm.len(), 2 * 24);
        assert_eq!(slope_mib_per_hour(&calm), Some(0.0));
    }

    #[test]
    fn slope_of_a_steady_leak_is_its_rate_per_hour() {
        // 1 MiB every 360 s = 10 MiB/h.
        let pts: Vec<(f64, f64, u32)> = (0..10)
            .map(|i| (f64::from(i) * 360.0, 50.0 + f64::from(i), 7))
            .collect();
        let got = slope_mib_per_hour(&series(&pts)).expect("slope");
        assert!((got - 10.0).abs() < 1e-9, "{got}");
        let flat: Vec<(f64, f64, u32)> = (0..10).map(|i| (f64::from(i) * 10.0, 50.0, 7)).collect();
        assert_eq!(slope_mib_per_hour(&series(&flat)), Some(0.0));
    }

    #[test]
    fn a_restart_is_not_a_trend_but_a_leak_across_restarts_still_shows() {
        // Flat at 80 MiB, restarted at 40 MiB, flat again: a plain fit would say it shrinks.
        let pts = [
            (0.0, 80.0, 1),
            (10.0, 80.0, 1),
            (20.0, 80.0, 1),
            (30.0, 40.0, 2),
            (40.0, 40.0, 2),
        ];
        assert_eq!(slope_mib_per_hour(&series(&pts)), Some(0.0));
        // Growing 0.1 MiB per 10 s in both lifetimes: 36 MiB/h.
        let pts = [
            (0.0, 80.0, 1),
            (10.0, 80.1, 1),
            (20.0, 80.2, 1),
            (30.0, 40.0, 2),
            (40.0, 40.1, 2),
        ];
        let got = slope_mib_per_hour(&series(&pts)).expect("slope");
        assert!((got - 36.0).abs() < 1e-6, "{got}");
        // Single-sample lifetimes carry no slope.
        assert_eq!(
            slope_mib_per_hour(&series(&[(0.0, 1.0, 1), (10.0, 9.0, 2)])),
            None
        );
        assert_eq!(slope_mib_per_hour(&[]), None);
    }

    /// A run of `minutes` with nothing but `rss` to judge.
    fn quiet_run(minutes: u64, rss: BTreeMap<(usize, Daemon), Vec<RssSample>>) -> Run {
        Run {
            seed: 1,
            minutes: minutes as f64,
            elapsed: s(minutes * 60),
            partition_method: "test",
            classes: BTreeMap::new(),
            failures: Vec::new(),
            unrecorded_failures: 0,
            events: Vec::new(),
            moves: Vec::new(),
            sessions: 0,
            uploaded_bytes: 0,
            tables: Ok((s(0), 0)),
            rss,
        }
    }

    /// stickd's RSS every 10 s over one lifetime of `minutes`: 21 MiB/h for its first 10
    /// minutes, 10 MiB/h until 30, then `after` MiB/h (the shape measured unkilled at the soak's
    /// load, with `after` = 3).
    fn stickd_life(pid: u32, born: f64, minutes: u32, after: f64) -> Vec<(f64, f64, u32)> {
        (0..minutes * 6)
            .map(|i| {
                let age = f64::from(i) * 10.0;
                let h = |a: f64| a / 3600.0;
                let mib = 32.7
                    + 21.0 * h(age.min(600.0))
                    + 10.0 * h(age.clamp(600.0, 1800.0) - 600.0)
                    + after * h((age - 1800.0).max(0.0));
                (born + age, mib, pid)
            })
            .collect()
    }

    #[test]
    fn stickd_is_judged_past_its_warm_up_and_a_leak_on_top_still_fails() {
        let judge = |minutes: u64, series_of: &dyn Fn(f64) -> Vec<(f64, f64, u32)>| {
            let mut rss = BTreeMap::new();
            rss.insert((0, Daemon::Stickd), series(&series_of(0.0)));
            render(&quiet_run(minutes, rss)).violations
        };
        // Killed every 6 minutes: its warm-up only, never judged.
        let short = |_: f64| {
            (0..10)
                .flat_map(|k| stickd_life(k + 1, f64::from(k) * 360.0, 6, 3.0))
                .collect()
        };
        assert!(judge(60, &short).is_empty());
        // One lifetime of an hour: judged over its second half, after the warm-up.
        assert!(judge(60, &|born| stickd_life(1, born, 60, 3.0)).is_empty());
        // The same with a leak of 10 MiB/h on top of the warm-up's tail.
        let leak = judge(60, &|born| stickd_life(1, born, 60, 13.0));
        assert_eq!(leak.len(), 1, "{leak:?}");
        assert!(leak[0].contains("node1 stickd RSS grows +13.0"), "{leak:?}");
        // A 30-minute run cannot see past the warm-up: not judged, rather than judged on it.
        assert!(judge(30, &|born| stickd_life(1, born, 30, 13.0)).is_empty());
    }

    #[test]
    fn the_verdict_lists_every_violation() {
        let mut rss = BTreeMap::new();
        // 20 minutes, growing 1 MiB per minute = 60 MiB/h.
        rss.insert(
            (0, Daemon::ProxydWorkers),
            series(
                &(0..120)
                    .map(|i| (f64::from(i) * 10.0, 30.0 + f64::from(i) / 6.0, 3))
                    .collect::<Vec<_>>(),
            ),
        );
        let mut kill = event(EventKind::KillWorker, 0, 100, 101);
        kill.killed_conns.insert(addr(40000));
        let mut refused = event(EventKind::Reload, 1, 300, 301);
        refused.ok = false;
        refused.note = "refused".into();
        let run = Run {
            seed: 42,
            minutes: 20.0,
            elapsed: s(1200),
            partition_method: "test",
            classes: BTreeMap::new(),
            failures: vec![
                failure(0, 40000, 90, 99, 100),
                failure(0, 40001, 90, 500, 500),
            ],
            unrecorded_failures: 0,
            events: vec![kill, refused],
            moves: vec![Move {
                node: 0,
                holder: 1,
                at: s(700),
                since: s(650),
                from: "app1".into(),
                to: "app2".into(),
                seen: vec![None, None, None],
            }],
            sessions: 1,
            uploaded_bytes: 0,
            tables: Err("node2 has 1 entry more".into()),
            rss,
        };
        let verdict = render(&run);
        assert_eq!(verdict.violations.len(), 5, "{:#?}", verdict.violations);
        assert!(verdict.text.contains("+60.0 OVER"), "{}", verdict.text);
        assert!(
            verdict
                .text
                .contains("| expected: in flight on the killed worker | 1 |")
        );
    }
}
