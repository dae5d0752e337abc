//! TLS session tickets sealed with the master's keys: every generation of a master has the same
//! keys, so a client resumes its session on the worker that replaced the one that gave it the
//! ticket (rustls's own ticketer makes its keys in each process, and a reload would lose them).
//!
//! A ticket is `key name (16) | nonce (12) | ChaCha20-Poly1305(session) | tag (16)`, as rustls's
//! ticketer makes them; the additional data is the key name and the TLS setting's name, so a
//! ticket opens only where it was given. The newest key seals, the previous one still opens
//! (see [`crate::model::TICKET_KEY_ROTATION`]). Without keys (a worker started by hand, the
//! serving half on its own in tests) tickets are off and rustls keeps sessions in memory.

use std::sync::{Arc, RwLock};

use ring::aead::{self, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;

use crate::model::{TICKET_KEY_ROTATION, TicketKey};

/// Longer tickets are refused before any work: proxyd's sessions carry no client certificate.
const MAX_TICKET: usize = 16 * 1024;

struct Key {
    name: [u8; 16],
    aead: LessSafeKey,
}

/// A worker's ticket keys, newest first, shared by the tickets of every TLS setting.
#[derive(Default)]
pub struct TicketKeys {
    keys: RwLock<Arc<Vec<Key>>>,
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketKeys")
            .field("keys", &self.current().len())
            .finish()
    }
}

impl TicketKeys {
    /// Seals with `keys[0]` from now on and opens with any of them.
    pub fn replace(&self, keys: &[TicketKey]) {
        let keys: Vec<Key> = keys
            .iter()
            .filter_map(|k| {
                let aead = UnboundKey::new(&CHACHA20_POLY1305, &k.secret).ok()?;
                Some(Key {
                    name: k.name,
                    aead: LessSafeKey::new(aead),
                })
            })
            .collect();
        // A poisoned lock only means a panic elsewhere while it was held: the Arc is whole.
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
    }

    fn current(&self) -> Arc<Vec<Key>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The tickets of one TLS setting.
#[derive(Debug)]
pub struct Ticketer {
    keys: Arc<TicketKeys>,
    /// The setting's name, in every ticket's additional data.
    setting: Vec<u8>,
}

impl Ticketer {
    pub fn new(keys: Arc<TicketKeys>, setting: &str) -> Self {
        Self {
            keys,
            setting: setting.as_bytes().to_vec(),
        }
    }

    fn aad(&self, name: &[u8]) -> Vec<u8> {
        let mut aad = Vec::with_capacity(name.len() + self.setting.len());
        aad.extend_from_slice(name);
        aad.extend_from_slice(&self.setting);
        aad
    }
}

impl ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        !self.keys.current().is_empty()
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(TICKET_KEY_ROTATION.as_secs()).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let keys = self.keys.current();
        let key = keys.first()?;
        // A random nonce: a counter would tell how many tickets were given.
        let mut nonce = [0u8; aead::NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).ok()?;
        let tag_len = key.aead.algorithm().tag_len();
        let mut out = Vec::with_capacity(key.name.len() + nonce.len() + plain.len() + tag_len);
        out.extend_from_slice(&key.name);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let start = key.name.len() + nonce.len();
        let tag = key
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.aad(&key.name)),
                &mut out[start..],
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() > MAX_TICKET {
            return None;
        }
        let (name, rest) = ticket.split_at_checked(16)?;
        let (nonce, sealed) = rest.split_at_checked(aead::NONCE_LEN)?;
        let keys = self.keys.current();
        // The name is public (it travels in the ticket); the tag is what authenticates.
        let key = keys.iter().find(|k| k.name == name)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut out = sealed.to_vec();
        let len = key
            .aead
            .open_in_place(nonce, Aad::from(self.aad(name)), &mut out)
            .ok()?
            .len();
        out.truncate(len);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> TicketKey {
        TicketKey {
            name: [n; 16],
            secret: [n.wrapping_mul(7); 32],
        }
    }

    #[test]
    fn the_newest_key_seals_the_previous_one_still_opens_and_an_older_one_no_longer() {
        let keys = Arc::new(TicketKeys::default());
        let site = Ticketer::new(keys.clone(), "site");
        assert!(!site.enabled(), "no keys: rustls keeps sessions itself");
        assert_eq!(site.encrypt(b"session"), None);

        keys.replace(&[key(1)]);
        assert!(site.enabled());
        let first = site.encrypt(b"session").expect("sealed");
        assert_eq!(&first[..16], &[1; 16]);
        assert_eq!(site.decrypt(&first).as_deref(), Some(&b"session"[..]));
        assert_ne!(
            site.encrypt(b"session"),
            Some(first.clone()),
            "a fresh nonce"
        );

        // Rotated: key 2 seals, key 1 still opens.
        keys.replace(&[key(2), key(1)]);
        let second = site.encrypt(b"later").expect("sealed");
        assert_eq!(&second[..16], &[2; 16]);
        assert_eq!(site.decrypt(&first).as_deref(), Some(&b"session"[..]));
        // Rotated again: key 1 is gone.
        keys.replace(&[key(3), key(2)]);
        assert_eq!(site.decrypt(&first), None);
        assert_eq!(site.decrypt(&second).as_deref(), Some(&b"later"[..]));
    }

    #[test]
    fn a_ticket_opens_only_where_it_was_given_and_only_untouched() {
        let keys = Arc::new(TicketKeys::default());
        keys.replace(&[key(1)]);
        let site = Ticketer::new(keys.clone(), "site");
        let other = Ticketer::new(keys, "other");
        let ticket = site.encrypt(b"session").expect("sealed");
        assert_eq!(other.decrypt(&ticket), None, "another setting");
        for i in [0, 16, 30, ticket.len() - 1] {
            let mut bad = ticket.clone();
            bad[i] ^= 1;
            assert_eq!(site.decrypt(&bad), None, "byte {i} flipped");
        }
        assert_eq!(site.decrypt(&ticket[..20]), None);
        assert_eq!(site.decrypt(&[]), None);
        assert_eq!(site.decrypt(&vec![1; MAX_TICKET + 1]), None);
    }
}
