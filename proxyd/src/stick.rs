//! A worker's stick cache: an in-memory copy of each stickd table it uses, fed by stickd's
//! Watch stream, written locally at once (read-your-writes) and flushed to stickd in batches.
//!
//! The request path only takes a mutex on a hash map: it never awaits stickd. Touches that
//! refresh an entry's expiry are coalesced: an entry is touched at most once per quarter of
//! its table's `expire`, so a busy session costs a few replication messages per `expire`.
//! While stickd is away the cache keeps serving, writes wait in a bounded buffer and go out
//! on reconnect; the reconnect's snapshot replaces the cache, with the unsent writes on top.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::stick::v1 as pb;
use proto::stick::v1::stick_client::StickClient;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::config::{Config, StickOn};

/// Unsent writes kept while stickd is away; beyond this new ones are dropped (and counted).
pub const MAX_PENDING: usize = 100_000;
/// Items per Store or Touch call.
const BATCH: usize = 1000;
/// How long writes gather before a flush (a flush also starts when a batch is full).
const FLUSH_EVERY: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StickError {
    #[error("stick table '{table}': {reason}")]
    Table { table: String, reason: String },
}

/// What a table's keys are, from the rules that use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// A cookie value: needs a `string` table.
    Text,
    /// A client address: needs an `ip` or `ipv6` table.
    Address,
}

#[derive(Debug)]
struct CEntry {
    server: Arc<str>,
    expires_ms: i64,
    /// When the expiry was last pushed forward (by a store, a touch, or stickd).
    refreshed_ms: i64,
    version: u64,
}

#[derive(Debug)]
pub struct Table {
    pub name: String,
    kind: KeyKind,
    /// From stickd (ListTables); until known, a touch is due every 5 s.
    expire_ms: AtomicU64,
    /// Longest key (string tables); 0: unknown or not a string table.
    max_len: AtomicU64,
    ipv6: AtomicBool,
    map: Mutex<HashMap<String, CEntry>>,
}

#[derive(Debug, Default)]
struct Pending {
    stores: HashMap<(usize, String), Arc<str>>,
    touches: HashSet<(usize, String)>,
}

impl Pending {
    fn len(&self) -> usize {
        self.stores.len() + self.touches.len()
    }
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct StickStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub stores: AtomicU64,
    pub stores_sent: AtomicU64,
    pub touches_sent: AtomicU64,
    pub dropped: AtomicU64,
    pub link_up: AtomicBool,
}

#[derive(Debug)]
pub struct StickCache {
    pub tables: Vec<Table>,
    pending: Mutex<Pending>,
    wake: Notify,
    pub stats: StickStats,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl StickCache {
    /// The tables the config's stick rules use; `None` without any rule.
    pub fn for_config(config: &Config) -> Option<Arc<StickCache>> {
        let mut tables: Vec<(String, KeyKind)> = Vec::new();
        for s in config.backends.iter().filter_map(|b| b.stick.as_ref()) {
            let kind = match s.on {
                StickOn::Cookie(_) => KeyKind::Text,
                StickOn::Src => KeyKind::Address,
            };
            if !tables.iter().any(|(n, _)| *n == s.table) {
                tables.push((s.table.clone(), kind));
            }
        }
        (!tables.is_empty()).then(|| Arc::new(StickCache::new(tables)))
    }

    pub fn new(tables: Vec<(String, KeyKind)>) -> StickCache {
        StickCache {
            tables: tables
                .into_iter()
                .map(|(name, kind)| Table {
                    name,
                    kind,
                    expire_ms: AtomicU64::new(0),
                    max_len: AtomicU64::new(0),
                    ipv6: AtomicBool::new(false),
                    map: Mutex::new(HashMap::new()),
                })
                .collect(),
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            stats: StickStats::default(),
        }
    }

    pub fn table_index(&self, name: &str) -> Option<usize> {
        self.tables.iter().position(|t| t.name == name)
    }

    /// The key of a client address in table `t` (its canonical form in stickd).
    pub fn address_key(&self, t: usize, ip: std::net::IpAddr) -> Option<String> {
        let v6 = self.tables[t].ipv6.load(Ordering::Relaxed);
        match ip {
            std::net::IpAddr::V4(a) if v6 => Some(a.to_ipv6_mapped().to_string()),
            std::net::IpAddr::V4(a) => Some(a.to_string()),
            std::net::IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) if !v6 => Some(v4.to_string()),
                _ if v6 => Some(a.to_string()),
                _ => None,
            },
        }
    }

    /// The server stuck to `key`, if a live entry exists; schedules a coalesced touch.
    pub fn lookup(&self, t: usize, key: &str) -> Option<Arc<str>> {
        let table = &self.tables[t];
        let now = now_ms();
        let expire = table.expire_ms.load(Ordering::Relaxed) as i64;
        let mut touch = false;
        let found = {
            let mut map = table.map.lock().unwrap_or_else(|p| p.into_inner());
            match map.get_mut(key) {
                Some(e) if e.expires_ms > now => {
                    let every = if expire > 0 { expire / 4 } else { 5_000 };
                    if now - e.refreshed_ms >= every {
                        e.refreshed_ms = now;
                        if expire > 0 {
                            e.expires_ms = now + expire;
                        }
                        touch = true;
                    }
                    Some(e.server.clone())
                }
                Some(_) => {
                    map.remove(key);
                    None
                }
                None => None,
            }
        };
        match &found {
            Some(_) => self.stats.hits.fetch_add(1, Ordering::Relaxed),
            None => self.stats.misses.fetch_add(1, Ordering::Relaxed),
        };
        if touch {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if p.len() < MAX_PENDING {
                p.touches.insert((t, key.to_owned()));
            } else {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        found
    }

    /// Sticks `key` to `server`: visible to this worker at once, sent to stickd soon.
    pub fn store(&self, t: usize, key: &str, server: &str) {
        let table = &self.tables[t];
        let max_len = table.max_len.load(Ordering::Relaxed);
        if key.is_empty() || (max_len > 0 && key.len() as u64 > max_len) {
            // stickd refuses it (never truncates): keep it out of the buffer.
            tracing::debug!(table = %table.name, key_len = key.len(), "key too long for the table, not stored");
            return;
        }
        let now = now_ms();
        let expire = table.expire_ms.load(Ordering::Relaxed) as i64;
        let server: Arc<str> = Arc::from(server);
        {
            let mut map = table.map.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = map.get(key)
                && e.server == server
                && e.expires_ms > now
            {
                return;
            }
            map.insert(
                key.to_owned(),
                CEntry {
                    server: server.clone(),
                    // Until stickd echoes the entry, assume 5 minutes if the table is unknown yet.
                    expires_ms: now + if expire > 0 { expire } else { 300_000 },
                    refreshed_ms: now,
                    version: 0,
                },
            );
        }
        self.stats.stores.fetch_add(1, Ordering::Relaxed);
        let full = {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if p.len() < MAX_PENDING {
                p.touches.remove(&(t, key.to_owned()));
                p.stores.insert((t, key.to_owned()), server);
            } else {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            p.stores.len() >= BATCH
        };
        if full {
            self.wake.notify_one();
        }
    }

    /// Entries held for table `t`, expired ones not swept yet included: O(1), for metrics.
    pub fn held(&self, t: usize) -> usize {
        self.tables[t]
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Live entries of table `t` (tests); walks the whole table.
    pub fn len(&self, t: usize) -> usize {
        let now = now_ms();
        self.tables[t]
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|e| e.expires_ms > now)
            .count()
    }

    pub fn pending_len(&self) -> usize {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Starts the watch and flush tasks. Returns `Ok(true)` once the first snapshot is in,
    /// `Ok(false)` if stickd did not answer within `wait` (the tasks keep trying), or the table
    /// that stickd does not have (or has with another type).
    pub async fn start(
        self: &Arc<Self>,
        socket: PathBuf,
        stop: CancellationToken,
        wait: Duration,
    ) -> Result<bool, StickError> {
        let (tx, rx) = oneshot::channel();
        tokio::spawn(watch_loop(self.clone(), socket.clone(), stop.clone(), tx));
        tokio::spawn(flush_loop(self.clone(), socket, stop));
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(r)) => r.map(|()| true),
            Ok(Err(_)) | Err(_) => Ok(false),
        }
    }

    fn check_tables(&self, have: &[pb::TableInfo]) -> Result<(), StickError> {
        for t in &self.tables {
            let Some(info) = have.iter().find(|i| i.name == t.name) else {
                return Err(StickError::Table {
                    table: t.name.clone(),
                    reason: "not defined in stickd".into(),
                });
            };
            let ok = match t.kind {
                KeyKind::Text => info.r#type == "string",
                KeyKind::Address => info.r#type == "ip" || info.r#type == "ipv6",
            };
            if !ok {
                let want = match t.kind {
                    KeyKind::Text => "string (for a cookie)",
                    KeyKind::Address => "ip or ipv6 (for src)",
                };
                return Err(StickError::Table {
                    table: t.name.clone(),
                    reason: format!("type {} in stickd, {want} needed", info.r#type),
                });
            }
            t.expire_ms.store(info.expire_ms, Ordering::Relaxed);
            t.max_len.store(
                if info.r#type == "string" {
                    u64::from(info.len)
                } else {
                    0
                },
                Ordering::Relaxed,
            );
            t.ipv6.store(info.r#type == "ipv6", Ordering::Relaxed);
        }
        Ok(())
    }

    /// Replaces table `t` with a snapshot; unsent local stores stay on top.
    fn install_snapshot(&self, t: usize, entries: Vec<pb::Entry>) {
        let now = now_ms();
        let mut fresh: HashMap<String, CEntry> = HashMap::with_capacity(entries.len());
        for e in entries {
            if !e.deleted && e.expires_unix_ms > now {
                fresh.insert(e.key, entry(e.server, e.expires_unix_ms, e.version, now));
            }
        }
        let pending: Vec<(String, Arc<str>)> = {
            let p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            p.stores
                .iter()
                .filter(|((ti, _), _)| *ti == t)
                .map(|((_, k), s)| (k.clone(), s.clone()))
                .collect()
        };
        let expire = self.tables[t].expire_ms.load(Ordering::Relaxed) as i64;
        for (k, s) in pending {
            fresh.insert(
                k,
                CEntry {
                    server: s,
                    expires_ms: now + expire.max(1000),
                    refreshed_ms: now,
                    version: 0,
                },
            );
        }
        *self.tables[t].map.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
    }

    fn apply(&self, t: usize, entries: Vec<pb::Entry>) {
        let now = now_ms();
        let unsent: HashSet<String> = {
            let p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if p.stores.is_empty() {
                HashSet::new()
            } else {
                entries
                    .iter()
                    .filter(|e| p.stores.contains_key(&(t, e.key.clone())))
                    .map(|e| e.key.clone())
                    .collect()
            }
        };
        let mut map = self.tables[t].map.lock().unwrap_or_else(|p| p.into_inner());
        for e in entries {
            // Our own newer store is on its way to stickd: it wins, as it will there.
            if unsent.contains(&e.key) {
                continue;
            }
            if e.deleted || e.expires_unix_ms <= now {
                map.remove(&e.key);
            } else {
                map.insert(e.key, entry(e.server, e.expires_unix_ms, e.version, now));
            }
        }
    }

    fn clear(&self, t: usize, version: u64) {
        self.tables[t]
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, e| e.version >= version && e.version != 0);
    }

    fn sweep(&self) {
        let now = now_ms();
        for t in &self.tables {
            t.map
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|_, e| e.expires_ms > now);
        }
    }
}

fn entry(server: String, expires_ms: i64, version: u64, now: i64) -> CEntry {
    CEntry {
        server: Arc::from(server),
        expires_ms,
        refreshed_ms: now,
        version,
    }
}

async fn connect(socket: &std::path::Path) -> Result<StickClient<Channel>, String> {
    let ch = common::grpc::connect_unix(socket)
        .await
        .map_err(|e| format!("connect {}: {e}", socket.display()))?;
    Ok(StickClient::new(ch))
}

enum WatchEnd {
    Stopped,
    Lost(String),
    Refused(StickError),
}

async fn watch_loop(
    cache: Arc<StickCache>,
    socket: PathBuf,
    stop: CancellationToken,
    first: oneshot::Sender<Result<(), StickError>>,
) {
    let mut first = Some(first);
    let mut backoff = Duration::from_millis(50);
    loop {
        let end = watch_once(&cache, &socket, &stop, &mut first).await;
        cache.stats.link_up.store(false, Ordering::Relaxed);
        match end {
            WatchEnd::Stopped => return,
            WatchEnd::Lost(why) => {
                tracing::warn!(reason = %why, "stickd watch lost; serving from the cache, retrying");
            }
            WatchEnd::Refused(e) => {
                tracing::error!(error = %e, "stick table refused");
                if let Some(tx) = first.take() {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn watch_once(
    cache: &StickCache,
    socket: &std::path::Path,
    stop: &CancellationToken,
    first: &mut Option<oneshot::Sender<Result<(), StickError>>>,
) -> WatchEnd {
    let mut client = match connect(socket).await {
        Ok(c) => c,
        Err(e) => return WatchEnd::Lost(e),
    };
    let tables = match client.list_tables(pb::ListTablesRequest {}).await {
        Ok(r) => r.into_inner().tables,
        Err(e) => return WatchEnd::Lost(format!("ListTables: {}", e.message())),
    };
    if let Err(e) = cache.check_tables(&tables) {
        return WatchEnd::Refused(e);
    }
    let names: Vec<String> = cache.tables.iter().map(|t| t.name.clone()).collect();
    let mut stream = match client.watch(pb::WatchRequest { tables: names }).await {
        Ok(r) => r.into_inner(),
        Err(e) => return WatchEnd::Lost(format!("Watch: {}", e.message())),
    };
    let mut snapshot: Vec<Vec<pb::Entry>> = cache.tables.iter().map(|_| Vec::new()).collect();
    let mut in_snapshot = true;
    let mut sweep = tokio::time::interval(Duration::from_secs(10));
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return WatchEnd::Stopped,
            _ = sweep.tick() => { cache.sweep(); continue; }
            m = stream.message() => m,
        };
        let event = match msg {
            Ok(Some(ev)) => ev.event,
            Ok(None) => return WatchEnd::Lost("stream ended".into()),
            Err(e) => return WatchEnd::Lost(format!("Watch: {}", e.message())),
        };
        match event {
            Some(pb::watch_event::Event::Snapshot(b)) => {
                if let Some(t) = cache.table_index(&b.table) {
                    snapshot[t].extend(b.entries);
                }
            }
            Some(pb::watch_event::Event::SnapshotEnd(end)) => {
                for (t, entries) in snapshot.iter_mut().enumerate() {
                    cache.install_snapshot(t, std::mem::take(entries));
                }
                in_snapshot = false;
                cache.stats.link_up.store(true, Ordering::Relaxed);
                tracing::info!(entries = end.entries, "stick cache loaded from stickd");
                // A reconnect may have writes waiting.
                cache.wake.notify_one();
                if let Some(tx) = first.take() {
                    let _ = tx.send(Ok(()));
                }
            }
            Some(pb::watch_event::Event::Changes(b)) => {
                if let Some(t) = cache.table_index(&b.table) {
                    if in_snapshot {
                        snapshot[t].extend(b.entries);
                    } else {
                        cache.apply(t, b.entries);
                    }
                }
            }
            Some(pb::watch_event::Event::Cleared(c)) => {
                if let Some(t) = cache.table_index(&c.table) {
                    snapshot[t].clear();
                    cache.clear(t, c.version);
                }
            }
            None => {}
        }
    }
}

async fn flush_loop(cache: Arc<StickCache>, socket: PathBuf, stop: CancellationToken) {
    let mut client: Option<StickClient<Channel>> = None;
    let mut backoff = Duration::from_millis(50);
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                // Last chance for what is buffered (a draining worker's final stores).
                if let Some(c) = client.as_mut() {
                    let _ = tokio::time::timeout(Duration::from_secs(1), flush(&cache, c)).await;
                }
                return;
            }
            _ = cache.wake.notified() => {}
            _ = tokio::time::sleep(FLUSH_EVERY) => {}
        }
        if cache.pending_len() == 0 {
            continue;
        }
        if client.is_none() {
            match connect(&socket).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::debug!(error = %e, "stickd unreachable, writes stay buffered");
                    sleep_or_stop(&stop, backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            }
        }
        let Some(c) = client.as_mut() else { continue };
        match flush(&cache, c).await {
            Ok(()) => backoff = Duration::from_millis(50),
            Err(e) => {
                tracing::warn!(error = %e, pending = cache.pending_len(), "cannot write to stickd, will resend");
                client = None;
                sleep_or_stop(&stop, backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

async fn sleep_or_stop(stop: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

/// Sends everything pending; on failure the unsent part goes back (behind newer writes).
async fn flush(cache: &StickCache, client: &mut StickClient<Channel>) -> Result<(), String> {
    let taken = std::mem::take(&mut *cache.pending.lock().unwrap_or_else(|p| p.into_inner()));
    let mut stores: Vec<Vec<pb::StoreItem>> = cache.tables.iter().map(|_| Vec::new()).collect();
    for ((t, key), server) in &taken.stores {
        stores[*t].push(pb::StoreItem {
            key: key.clone(),
            server: server.to_string(),
            expires_unix_ms: 0,
        });
    }
    let mut touches: Vec<Vec<String>> = cache.tables.iter().map(|_| Vec::new()).collect();
    for (t, key) in &taken.touches {
        touches[*t].push(key.clone());
    }
    let result = async {
        for (t, items) in stores.into_iter().enumerate() {
            for chunk in items.chunks(BATCH) {
                let n = chunk.len() as u64;
                let req = pb::StoreRequest {
                    table: cache.tables[t].name.clone(),
                    items: chunk.to_vec(),
                };
                match client.store(req).await {
                    Ok(_) => {}
                    // A refused item (e.g. a key stickd finds invalid) would be resent for ever.
                    Err(s) if s.code() == tonic::Code::InvalidArgument => {
                        tracing::warn!(table = %cache.tables[t].name, error = %s.message(), "stickd refused a batch of stores; dropped");
                    }
                    Err(s) => return Err(format!("Store: {}", s.message())),
                }
                cache.stats.stores_sent.fetch_add(n, Ordering::Relaxed);
            }
        }
        for (t, keys) in touches.into_iter().enumerate() {
            for chunk in keys.chunks(BATCH) {
                let n = chunk.len() as u64;
                let req = pb::TouchRequest {
                    table: cache.tables[t].name.clone(),
                    keys: chunk.to_vec(),
                };
                match client.touch(req).await {
                    Ok(_) => {}
                    Err(s) if s.code() == tonic::Code::InvalidArgument => {}
                    Err(s) => return Err(format!("Touch: {}", s.message())),
                }
                cache.stats.touches_sent.fetch_add(n, Ordering::Relaxed);
            }
        }
        Ok(())
    }
    .await;
    if result.is_err() {
        // Resend everything (stores are idempotent), newer writes made meanwhile win.
        let mut p = cache.pending.lock().unwrap_or_else(|p| p.into_inner());
        for (k, v) in taken.stores {
            if p.len() >= MAX_PENDING {
                cache.stats.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            p.stores.entry(k).or_insert(v);
        }
        for k in taken.touches {
            if p.len() >= MAX_PENDING {
                break;
            }
            if !p.stores.contains_key(&k) {
                p.touches.insert(k);
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> StickCache {
        let c = StickCache::new(vec![("t".into(), KeyKind::Text)]);
        c.tables[0].expire_ms.store(60_000, Ordering::Relaxed);
        c
    }

    #[test]
    fn stores_are_read_at_once_and_buffered_once() {
        let c = cache();
        assert!(c.lookup(0, "k").is_none());
        c.store(0, "k", "app1");
        assert_eq!(c.lookup(0, "k").as_deref(), Some("app1"));
        c.store(0, "k", "app1");
        assert_eq!(c.pending_len(), 1);
        c.store(0, "k", "app2");
        assert_eq!(c.lookup(0, "k").as_deref(), Some("app2"));
        assert_eq!(c.pending_len(), 1);
        assert_eq!(c.stats.hits.load(Ordering::Relaxed), 2);
        assert_eq!(c.stats.misses.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn touches_are_coalesced() {
        let c = cache();
        let now = now_ms();
        c.apply(
            0,
            vec![pb::Entry {
                key: "k".into(),
                server: "app1".into(),
                expires_unix_ms: now + 60_000,
                version: 7,
                ..Default::default()
            }],
        );
        for _ in 0..1000 {
            assert_eq!(c.lookup(0, "k").as_deref(), Some("app1"));
        }
        // Refreshed by stickd just now: no touch is due for a quarter of the expire.
        assert_eq!(c.pending_len(), 0);
        if let Some(e) = c.tables[0]
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut("k")
        {
            e.refreshed_ms -= 16_000;
        }
        for _ in 0..1000 {
            c.lookup(0, "k");
        }
        assert_eq!(c.pending_len(), 1);
    }

    #[test]
    fn unsent_stores_win_over_watch_and_snapshot() {
        let c = cache();
        c.store(0, "k", "app2");
        let e = |server: &str| pb::Entry {
            key: "k".into(),
            server: server.into(),
            expires_unix_ms: now_ms() + 60_000,
            version: 9,
            ..Default::default()
        };
        c.apply(0, vec![e("app1")]);
        assert_eq!(c.lookup(0, "k").as_deref(), Some("app2"));
        c.install_snapshot(0, vec![e("app1")]);
        assert_eq!(c.lookup(0, "k").as_deref(), Some("app2"));
        // Once sent, stickd's view is applied.
        c.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stores
            .clear();
        c.apply(0, vec![e("app1")]);
        assert_eq!(c.lookup(0, "k").as_deref(), Some("app1"));
        let mut gone = e("app1");
        gone.deleted = true;
        c.apply(0, vec![gone]);
        assert!(c.lookup(0, "k").is_none());
    }

    #[test]
    fn expired_entries_and_long_keys() {
        let c = cache();
        c.apply(
            0,
            vec![pb::Entry {
                key: "old".into(),
                server: "app1".into(),
                expires_unix_ms: now_ms() - 1,
                version: 1,
                ..Default::default()
            }],
        );
        assert!(c.lookup(0, "old").is_none());
        c.tables[0].max_len.store(4, Ordering::Relaxed);
        c.store(0, "toolong", "app1");
        assert!(c.lookup(0, "toolong").is_none());
        assert_eq!(c.pending_len(), 0);
    }

    #[test]
    fn table_types_are_checked() {
        let c = StickCache::new(vec![
            ("t".into(), KeyKind::Text),
            ("ips".into(), KeyKind::Address),
        ]);
        let info = |name: &str, ty: &str| pb::TableInfo {
            name: name.into(),
            r#type: ty.into(),
            len: 32,
            expire_ms: 1000,
            ..Default::default()
        };
        let e = c
            .check_tables(&[info("t", "string")])
            .expect_err("ips missing");
        assert!(e.to_string().contains("'ips'"), "{e}");
        let e = c
            .check_tables(&[info("t", "integer"), info("ips", "ip")])
            .expect_err("wrong type");
        assert!(
            e.to_string().contains("'t'") && e.to_string().contains("integer"),
            "{e}"
        );
        c.check_tables(&[info("t", "string"), info("ips", "ipv6")])
            .expect("compatible");
        let ip: std::net::IpAddr = "10.0.0.1".parse().expect("ip");
        assert_eq!(c.address_key(1, ip).as_deref(), Some("::ffff:10.0.0.1"));
    }
}
