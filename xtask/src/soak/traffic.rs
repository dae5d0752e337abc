//! The soak's clients: keep-alive, connection-close, sticky (a cookie each, moves counted) and
//! uploads, to random nodes at a modest paced rate, each bounded in time and count, every
//! failure recorded with its connection and times for attribution.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::report::{ClassTotals, Failure, Move};
use crate::load::{self, FailKind, Reply};

/// Connect + request + full response must fit in this: a master restart keeps new connections
/// queued (not lost) for a second or so.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Past this many recorded failures the rest are only counted.
const MAX_RECORDED: usize = 100_000;
/// Largest upload.
const MAX_UPLOAD: usize = 1024 * 1024;

/// How many clients of each class.
#[derive(Clone, Copy, Debug)]
pub struct Mix {
    pub keepalive: usize,
    pub close: usize,
    pub sticky: usize,
    pub upload: usize,
}

/// A kind of client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    KeepAlive,
    Close,
    Sticky,
    Upload,
}

impl Class {
    const ALL: [Class; 4] = [Class::KeepAlive, Class::Close, Class::Sticky, Class::Upload];

    fn name(self) -> &'static str {
        match self {
            Self::KeepAlive => "keep-alive",
            Self::Close => "connection-close",
            Self::Sticky => "sticky",
            Self::Upload => "upload",
        }
    }

    /// Pause between two requests of one client: about 10 req/s for keep-alive clients, 5 for
    /// the others, one upload a second; the point is endurance, not speed.
    fn think(self, rng: &mut StdRng) -> Duration {
        let ms = match self {
            Self::KeepAlive => rng.random_range(50..150),
            Self::Close | Self::Sticky => rng.random_range(100..300),
            Self::Upload => rng.random_range(500..1500),
        };
        Duration::from_millis(ms)
    }
}

/// What the clients share: the clock and the counters.
pub struct Recorder {
    t0: Instant,
    requests: [AtomicU64; 4],
    failed: [AtomicU64; 4],
    unrecorded: AtomicU64,
    sessions: AtomicU64,
    uploaded: AtomicU64,
    failures: Mutex<Vec<Failure>>,
    moves: Mutex<Vec<Move>>,
}

/// What the clients measured.
pub struct Totals {
    pub classes: Vec<(&'static str, ClassTotals)>,
    pub failures: Vec<Failure>,
    pub unrecorded: u64,
    pub moves: Vec<Move>,
    pub sessions: u64,
    pub uploaded: u64,
}

impl Recorder {
    pub fn new(t0: Instant) -> Self {
        Self {
            t0,
            requests: Default::default(),
            failed: Default::default(),
            unrecorded: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            uploaded: AtomicU64::new(0),
            failures: Mutex::new(Vec::new()),
            moves: Mutex::new(Vec::new()),
        }
    }

    pub fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    fn fail(&self, class: Class, f: Failure) {
        self.failed[class as usize].fetch_add(1, Ordering::Relaxed);
        let mut v = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() < MAX_RECORDED {
            v.push(f);
        } else {
            self.unrecorded.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn totals(&self) -> Totals {
        Totals {
            classes: Class::ALL
                .iter()
                .map(|c| {
                    (
                        c.name(),
                        ClassTotals {
                            requests: self.requests[*c as usize].load(Ordering::Relaxed),
                            failed: self.failed[*c as usize].load(Ordering::Relaxed),
                        },
                    )
                })
                .collect(),
            failures: self
                .failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            unrecorded: self.unrecorded.load(Ordering::Relaxed),
            moves: self.moves.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            sessions: self.sessions.load(Ordering::Relaxed),
            uploaded: self.uploaded.load(Ordering::Relaxed),
        }
    }
}

/// Starts every client; each stops by itself at `until` (or after `max_requests`).
pub fn start(
    rec: Arc<Recorder>,
    frontends: Vec<SocketAddr>,
    mix: Mix,
    until: Instant,
    seed: u64,
) -> Vec<JoinHandle<()>> {
    let max_requests = {
        let secs = until.saturating_duration_since(Instant::now()).as_secs();
        // Twice the paced rate of the busiest class: a bound that pacing never reaches.
        (secs + 1) * 40
    };
    let body: Arc<[u8]> = vec![b'u'; MAX_UPLOAD].into();
    let mut tasks = Vec::new();
    let mut i = 0u64;
    for (class, n) in [
        (Class::KeepAlive, mix.keepalive),
        (Class::Close, mix.close),
        (Class::Sticky, mix.sticky),
        (Class::Upload, mix.upload),
    ] {
        for k in 0..n {
            i += 1;
            let c = Client {
                class,
                rec: Arc::clone(&rec),
                frontends: frontends.clone(),
                rng: StdRng::seed_from_u64(seed ^ (i << 32)),
                until,
                max_requests,
                // Not a session of the demo app: one fixed cookie per client keeps the stick table
                // at the sticky clients' sessions instead of one per request.
                fixed_cookie: format!("soak-{}-{k}", class.name()),
                body: Arc::clone(&body),
            };
            tasks.push(tokio::spawn(c.run()));
        }
    }
    tasks
}

/// A connection of a client.
struct Conn {
    stream: TcpStream,
    node: usize,
    local: SocketAddr,
    opened: Duration,
}

struct Client {
    class: Class,
    rec: Arc<Recorder>,
    frontends: Vec<SocketAddr>,
    rng: StdRng,
    until: Instant,
    max_requests: u64,
    fixed_cookie: String,
    body: Arc<[u8]>,
}

/// A sticky client's session.
struct Session {
    cookie: String,
    server: String,
    /// The node where its entry was created or last moved.
    holder: usize,
    since: Duration,
    /// Per node, when it last answered this session.
    seen: Vec<Option<Duration>>,
    /// Requests left before the user "logs out" and starts a new session.
    left: u32,
}

impl Client {
    async fn run(mut self) {
        let mut conn: Option<Conn> = None;
        let mut session: Option<Session> = None;
        let mut sent = 0u64;
        while Instant::now() < self.until && sent < self.max_requests {
            sent += 1;
            let node = match &conn {
                Some(c) => c.node,
                None => self.rng.random_range(0..self.frontends.len()),
            };
            let (cookie, upload) = match self.class {
                Class::Sticky => (session.as_ref().map(|s| s.cookie.clone()), 0),
                Class::Upload => (
                    Some(self.fixed_cookie.clone()),
                    self.rng.random_range(4 * 1024..=MAX_UPLOAD),
                ),
                _ => (Some(self.fixed_cookie.clone()), 0),
            };
            let keep = self.class == Class::KeepAlive;
            let reply = self
                .request(&mut conn, node, cookie.as_deref(), upload, keep)
                .await;
            if let (Some(r), Class::Sticky) = (&reply, self.class) {
                self.sticky(&mut session, node, r);
            }
            if keep && self.rng.random_range(0..100) == 0 {
                // Now and then a keep-alive client moves to another node.
                conn = None;
            }
            let pause = self.class.think(&mut self.rng);
            let left = self.until.saturating_duration_since(Instant::now());
            tokio::time::sleep(pause.min(left)).await;
        }
    }

    /// Follows a sticky client's session: a new one, or the same server as before (a move is
    /// recorded otherwise, and the client follows it).
    fn sticky(&mut self, session: &mut Option<Session>, node: usize, r: &Reply) {
        let Some(server) = r.server().map(str::to_owned) else {
            return;
        };
        match session {
            None => {
                let cookie = r
                    .set_cookie
                    .as_deref()
                    .and_then(|c| c.strip_prefix("PHPSESSID="))
                    .and_then(|c| c.split(';').next());
                if let Some(cookie) = cookie {
                    self.rec.sessions.fetch_add(1, Ordering::Relaxed);
                    *session = Some(Session {
                        cookie: cookie.to_owned(),
                        server,
                        holder: node,
                        since: self.rec.now(),
                        seen: {
                            let mut seen = vec![None; self.frontends.len()];
                            seen[node] = Some(self.rec.now());
                            seen
                        },
                        left: self.rng.random_range(30..80),
                    });
                }
            }
            Some(s) => {
                if s.server != server {
                    self.rec
                        .moves
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Move {
                            node,
                            holder: s.holder,
                            at: self.rec.now(),
                            since: s.since,
                            from: s.server.clone(),
                            to: server.clone(),
                            seen: s.seen.clone(),
                        });
                    s.server = server;
                    s.holder = node;
                    s.since = self.rec.now();
                }
                if let Some(t) = s.seen.get_mut(node) {
                    *t = Some(self.rec.now());
                }
                s.left = s.left.saturating_sub(1);
                if s.left == 0 {
                    *session = None;
                }
            }
        }
    }

    /// One request on `conn` (opened to `node` first if there is none); the reply if it was a
    /// 200 as expected, else the failure is recorded and `None` returned.
    async fn request(
        &mut self,
        conn: &mut Option<Conn>,
        node: usize,
        cookie: Option<&str>,
        upload: usize,
        keep: bool,
    ) -> Option<Reply> {
        let class = self.class;
        self.rec.requests[class as usize].fetch_add(1, Ordering::Relaxed);
        let started = self.rec.now();
        let frontend = self.frontends[node];
        let result = tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.exchange(conn, node, cookie, upload, keep),
        )
        .await
        .unwrap_or_else(|_| Err((FailKind::Timeout, "no complete response in time".into())))
        .and_then(|r| check(r, upload));
        match result {
            Ok(r) => {
                if upload > 0 {
                    self.rec
                        .uploaded
                        .fetch_add(upload as u64, Ordering::Relaxed);
                }
                if r.close || !keep {
                    *conn = None;
                }
                Some(r)
            }
            Err((kind, why)) => {
                let c = conn.take();
                self.rec.fail(
                    class,
                    Failure {
                        class: class.name(),
                        node,
                        client: c.as_ref().map(|c| c.local),
                        opened: c.as_ref().map(|c| c.opened),
                        started,
                        ended: self.rec.now(),
                        kind,
                        why: format!("{frontend}: {why}"),
                    },
                );
                None
            }
        }
    }

    async fn exchange(
        &self,
        conn: &mut Option<Conn>,
        node: usize,
        cookie: Option<&str>,
        upload: usize,
        keep: bool,
    ) -> Result<Reply, (FailKind, String)> {
        if conn.is_none() {
            let stream = TcpStream::connect(self.frontends[node])
                .await
                .map_err(|e| (load::classify(&e, false), format!("connect: {e}")))?;
            let _ = stream.set_nodelay(true);
            let local = stream
                .local_addr()
                .map_err(|e| (FailKind::Other, format!("local address: {e}")))?;
            *conn = Some(Conn {
                stream,
                node,
                local,
                opened: self.rec.now(),
            });
        }
        let Some(c) = conn.as_mut() else {
            return Err((FailKind::Other, "no connection".into()));
        };
        let (method, path) = match self.class {
            Class::Upload => ("POST", "/"),
            Class::Sticky => ("GET", "/index.php"),
            _ => ("GET", "/"),
        };
        let mut head =
            format!("{method} {path} HTTP/1.1\r\nHost: soak\r\nUser-Agent: xtask-soak\r\n");
        if let Some(c) = cookie {
            head.push_str(&format!("Cookie: PHPSESSID={c}\r\n"));
        }
        if upload > 0 {
            head.push_str(&format!("Content-Length: {upload}\r\n"));
        }
        if !keep {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let write = |e: std::io::Error| (load::classify(&e, false), format!("write: {e}"));
        c.stream.write_all(head.as_bytes()).await.map_err(write)?;
        if upload > 0 {
            c.stream
                .write_all(&self.body[..upload])
                .await
                .map_err(write)?;
        }
        load::read_reply(&mut c.stream).await
    }
}

/// A 200 from a demo backend, which for an upload counted every byte sent.
fn check(r: Reply, upload: usize) -> Result<Reply, (FailKind, String)> {
    if r.status != 200 {
        return Err((FailKind::BadStatus, format!("status {}", r.status)));
    }
    if r.server().is_none() {
        return Err((FailKind::Other, "no server name in the body".into()));
    }
    if upload > 0 {
        let want = format!("request body bytes: {upload}");
        if !String::from_utf8_lossy(&r.body).lines().any(|l| l == want) {
            return Err((
                FailKind::Other,
                format!("upload of {upload} bytes not counted whole by the backend"),
            ));
        }
    }
    Ok(r)
}
