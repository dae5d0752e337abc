//! The soak's pure bookkeeping: what happened when (events), which failures and sticky moves
//! those events excuse, the RSS trend per daemon, and the report built from them.

mod events;
mod render;
mod rss;

pub use events::{Event, EventKind, Failure, Move};
pub use render::{ClassTotals, Run, render};
pub use rss::{Daemon, RssSample, rss_csv};

#[cfg(test)]
mod fixtures {
    use std::collections::HashSet;
    use std::net::SocketAddr;
    use std::time::Duration;

    use super::{Event, EventKind, Failure, RssSample};
    use crate::load::FailKind;

    pub fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    pub fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    pub fn event(kind: EventKind, node: usize, start: u64, end: u64) -> Event {
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

    pub fn failure(node: usize, client: u16, opened: u64, started: u64, ended: u64) -> Failure {
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

    pub fn series(points: &[(f64, f64, u32)]) -> Vec<RssSample> {
        points
            .iter()
            .map(|&(t, mib, pid)| RssSample {
                t,
                mib,
                pids: vec![pid],
            })
            .collect()
    }
}
