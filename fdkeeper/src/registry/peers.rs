//! The borrowers fdkeeper knows: connected ones, and the last few that left (for the admin view).

use std::time::Instant;

use super::{Held, Registry};
use crate::sys::PeerCred;

#[derive(Clone, Debug)]
pub struct Peer {
    pub cred: PeerCred,
    pub name: String,
    pub connected: bool,
    closed_at: Option<Instant>,
}

/// Disconnected borrowers kept for the admin view; older ones are forgotten.
const KEEP_DISCONNECTED: usize = 64;

impl Registry {
    pub fn connected(&mut self, conn: u64, cred: PeerCred) {
        self.peers.insert(
            conn,
            Peer {
                cred,
                name: String::new(),
                connected: true,
                closed_at: None,
            },
        );
    }

    pub fn disconnected(&mut self, conn: u64) {
        if let Some(p) = self.peers.get_mut(&conn) {
            p.connected = false;
            p.closed_at = Some(Instant::now());
        }
        let let_go: Vec<String> = self
            .held
            .iter()
            .filter(|(_, h)| h.closing && h.lends.contains_key(&conn) && !self.lent_to_connected(h))
            .map(|(k, _)| k.clone())
            .collect();
        for key in let_go {
            self.close(&key, "released, and its last connected borrower let go");
        }
        // A peer that never borrowed is of no interest once gone.
        let borrowed = self.held.values().any(|h| h.lends.contains_key(&conn));
        if !borrowed {
            self.peers.remove(&conn);
        }
        let mut gone: Vec<(Instant, u64)> = self
            .peers
            .iter()
            .filter_map(|(id, p)| p.closed_at.map(|t| (t, *id)))
            .collect();
        if gone.len() > KEEP_DISCONNECTED {
            gone.sort();
            for (_, id) in &gone[..gone.len() - KEEP_DISCONNECTED] {
                self.peers.remove(id);
                for h in self.held.values_mut() {
                    h.lends.remove(id);
                }
            }
        }
    }

    /// Whether a borrower that is still connected holds a copy of `h`.
    pub(super) fn lent_to_connected(&self, h: &Held) -> bool {
        h.lends
            .keys()
            .any(|c| self.peers.get(c).is_some_and(|p| p.connected))
    }
}

#[cfg(test)]
mod tests {
    use proto::fdlend::v1::{Acquire, ListenSpec};

    use super::*;
    use crate::registry::testing::{cred, registry};

    #[test]
    fn borrowers_are_remembered_but_bounded() {
        let mut reg = registry();
        let acquire = |name: &str| Acquire {
            listeners: vec![ListenSpec {
                address: "127.0.0.1:0".into(),
                ..ListenSpec::default()
            }],
            borrower: name.into(),
            claim: None,
        };
        // A peer that never borrowed is forgotten at once.
        reg.connected(1, cred(1));
        reg.disconnected(1);
        assert!(reg.peers.is_empty());

        for conn in 10..210u64 {
            reg.connected(conn, cred(conn as i32));
            reg.acquire(conn, acquire(&format!("w{conn}")))
                .map_err(|f| f.message)
                .expect("acquire");
            reg.disconnected(conn);
        }
        reg.connected(500, cred(500));
        reg.acquire(500, acquire("live"))
            .map_err(|f| f.message)
            .expect("acquire");

        let held = reg.held.get("127.0.0.1:0").expect("held");
        assert_eq!(held.times_lent, 201);
        assert_eq!(reg.peers.len(), KEEP_DISCONNECTED + 1);
        assert_eq!(held.lends.len(), KEEP_DISCONNECTED + 1);
        assert!(reg.peers[&500].connected);
        assert_eq!(reg.peers[&500].name, "live");
        // The newest disconnected ones are the ones kept.
        assert!(reg.peers.contains_key(&209));
        assert!(!reg.peers.contains_key(&10));
    }
}
