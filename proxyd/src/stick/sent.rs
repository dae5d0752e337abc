//! The stores a worker sent to stickd that its Watch stream has not yet shown applied.
//!
//! stickd does not echo a worker's own stores back on that worker's stream (they are in its
//! cache already) when the Store call names the stream: a `StoreApplied` marker takes their
//! place there. Until it comes, a change of the same key on the stream was applied before the
//! store, which outranks it in stickd (a later version), so the cache keeps the store; after
//! it, a change is newer and replaces it. A stickd that numbers no stream echoes everything,
//! and then nothing is held here.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use foldhash::fast::RandomState;

/// A store: (table, key) and the server it names.
pub type Store = ((usize, String), Arc<str>);
/// Stores by (table, key).
pub type Stores = HashMap<(usize, String), Arc<str>, RandomState>;

#[derive(Debug, Default)]
pub struct Sent {
    /// The Watch stream stickd numbered; 0: none up, or a stickd that echoes every store.
    watcher: u64,
    /// The number of the next call.
    next: u64,
    /// The calls not yet shown applied, oldest first: number and stores.
    calls: VecDeque<(u64, Stores)>,
}

/// What a Store call names, for `StoreRequest.watcher` and `.batch` (0 and 0: nothing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallIds {
    pub watcher: u64,
    pub batch: u64,
}

impl Sent {
    /// Holds `stores`, about to be sent, until their marker comes, and says what the call names.
    /// With no numbered stream, they come back: stickd will echo them.
    pub fn hold(&mut self, stores: Stores) -> Result<CallIds, Stores> {
        if self.watcher == 0 {
            return Err(stores);
        }
        self.next += 1;
        let ids = CallIds {
            watcher: self.watcher,
            batch: self.next,
        };
        self.calls.push_back((ids.batch, stores));
        Ok(ids)
    }

    /// The call did not go through (or was refused): its stores, if still held.
    pub fn release(&mut self, ids: CallIds) -> Option<Stores> {
        if ids.watcher != self.watcher {
            return None;
        }
        let at = self.calls.iter().position(|(b, _)| *b == ids.batch)?;
        self.calls.remove(at).map(|(_, s)| s)
    }

    /// Stream `watcher` shows call `batch` applied: it, and any older call, no longer outrank
    /// what follows on the stream.
    pub fn applied(&mut self, watcher: u64, batch: u64) {
        if watcher != self.watcher {
            return;
        }
        while self.calls.front().is_some_and(|(b, _)| *b <= batch) {
            self.calls.pop_front();
        }
    }

    /// A new stream (`watcher`; 0: none, or one from a stickd that echoes): the markers of the
    /// calls sent before will not come on it. Returns their stores, whose calls may have failed
    /// with the stream (stickd restarting): the caller buffers them again, to be resent.
    pub fn restart(&mut self, watcher: u64) -> Vec<Store> {
        self.watcher = watcher;
        std::mem::take(&mut self.calls)
            .into_iter()
            .flat_map(|(_, stores)| stores)
            .collect()
    }

    pub fn contains(&self, key: &(usize, String)) -> bool {
        self.calls.iter().any(|(_, s)| s.contains_key(key))
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// The keys of table `t` held.
    pub fn keys(&self, t: usize) -> impl Iterator<Item = &str> {
        self.calls
            .iter()
            .flat_map(|(_, s)| s.keys())
            .filter(move |(ti, _)| *ti == t)
            .map(|(_, k)| k.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stores(keys: &[&str]) -> Stores {
        keys.iter()
            .map(|k| ((0, (*k).to_owned()), Arc::from("app1")))
            .collect()
    }

    #[test]
    fn nothing_is_held_without_a_numbered_stream() {
        let mut s = Sent::default();
        assert_eq!(s.hold(stores(&["a"])).err().map(|s| s.len()), Some(1));
        assert!(s.is_empty());
    }

    #[test]
    fn a_call_is_held_until_its_marker_or_a_newer_one() {
        let mut s = Sent::default();
        assert!(s.restart(7).is_empty());
        let one = s.hold(stores(&["a"])).expect("held");
        let two = s.hold(stores(&["b"])).expect("held");
        assert_eq!((one.watcher, one.batch, two.batch), (7, 1, 2));
        assert!(s.contains(&(0, "a".into())) && s.contains(&(0, "b".into())));
        // Another stream's marker says nothing about ours.
        s.applied(6, 2);
        assert!(s.contains(&(0, "a".into())));
        s.applied(7, 1);
        assert!(!s.contains(&(0, "a".into())) && s.contains(&(0, "b".into())));
        assert_eq!(s.keys(0).collect::<Vec<_>>(), ["b"]);
        s.applied(7, 5);
        assert!(s.is_empty());
    }

    #[test]
    fn a_failed_call_and_a_new_stream_give_the_stores_back() {
        let mut s = Sent::default();
        assert!(s.restart(3).is_empty());
        let one = s.hold(stores(&["a"])).expect("held");
        let two = s.hold(stores(&["b", "c"])).expect("held");
        assert_eq!(s.release(two).map(|s| s.len()), Some(2));
        assert_eq!(s.release(two), None);
        // The old stream's call is handed back, to be resent: it may have failed with it.
        let back = s.restart(4);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].0, (0, "a".to_owned()));
        assert!(s.is_empty());
        assert_eq!(s.release(one), None);
        assert_eq!(s.hold(stores(&["d"])).expect("held").watcher, 4);
    }
}
