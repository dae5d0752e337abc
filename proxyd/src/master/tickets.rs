//! The TLS session-ticket keys the master makes and hands to every generation (in `Start`, and
//! to every running worker when it makes a new one), so that a session resumes on whichever
//! generation serves next. A new key every [`TICKET_KEY_ROTATION`], the previous one kept to
//! open the tickets it sealed; the keys live in memory only and die with the master.

use ring::rand::{SecureRandom, SystemRandom};
use tokio::time::Instant;

use super::Master;
use crate::control::{pb, ticket_keys_to_wire, to_worker};
use crate::model::{TICKET_KEY_ROTATION, TicketKey};

/// The newest key and the one before it.
const KEPT: usize = 2;

/// The master's ticket keys, newest first.
#[derive(Debug)]
pub(super) struct TicketKeys {
    keys: Vec<TicketKey>,
    rotate_at: Instant,
}

impl TicketKeys {
    pub fn new(now: Instant) -> TicketKeys {
        let mut keys = TicketKeys {
            keys: Vec::new(),
            rotate_at: now,
        };
        keys.rotate(now);
        keys
    }

    /// Puts a new key in front and forgets the oldest beyond [`KEPT`].
    fn rotate(&mut self, now: Instant) {
        self.rotate_at = now + TICKET_KEY_ROTATION;
        match new_key() {
            Some(key) => {
                self.keys.insert(0, key);
                self.keys.truncate(KEPT);
            }
            // Without fresh randomness the old keys serve on rather than a weak new one.
            None => tracing::error!("no random bytes for a new session-ticket key"),
        }
    }

    pub fn next_timer(&self) -> Instant {
        self.rotate_at
    }

    pub fn to_wire(&self) -> pb::TicketKeys {
        ticket_keys_to_wire(&self.keys)
    }
}

/// A key from the system's random bytes, if it gives some.
fn new_key() -> Option<TicketKey> {
    let random = SystemRandom::new();
    let mut key = TicketKey {
        name: [0; 16],
        secret: [0; 32],
    };
    random.fill(&mut key.name).ok()?;
    random.fill(&mut key.secret).ok()?;
    Some(key)
}

impl Master {
    /// Makes the next ticket key when it is time and gives it to every running worker.
    pub(super) fn rotate_ticket_keys(&mut self, now: Instant) {
        if self.tickets.rotate_at > now {
            return;
        }
        self.tickets.rotate(now);
        tracing::info!("new session-ticket key");
        let msg = to_worker(pb::master_to_worker::Kind::TicketKeys(
            self.tickets.to_wire(),
        ));
        for w in self.generations.iter().filter_map(|g| g.worker()) {
            w.send(msg.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotation_keeps_the_previous_key_and_forgets_the_one_before() {
        let t0 = Instant::now();
        let mut keys = TicketKeys::new(t0);
        assert_eq!(keys.keys.len(), 1);
        assert_eq!(keys.next_timer(), t0 + TICKET_KEY_ROTATION);
        let first = keys.keys[0].clone();
        keys.rotate(t0 + TICKET_KEY_ROTATION);
        assert_eq!(keys.keys.len(), 2);
        assert_eq!(keys.keys[1], first);
        assert_ne!(keys.keys[0], first);
        let second = keys.keys[0].clone();
        keys.rotate(t0 + TICKET_KEY_ROTATION * 2);
        assert_eq!(keys.keys.len(), 2);
        assert_eq!(keys.keys[1], second);
        assert!(!keys.keys.contains(&first));
        assert_eq!(keys.to_wire().keys.len(), 2);
    }
}
