//! Idle HTTP/1.x keep-alive connections parked outside of tasks, a small allocation each, until
//! they are readable or reach their keep-alive deadline.
//!
//! A connection's task is sized for its largest state (a request in flight), and an idle one
//! would hold all of it while it waits. So a connection silent for [`PARK_AFTER`] between
//! requests ends its task, and its stream, its counts ([`Active`]) and its deadline go to the
//! park of its serving thread: one task there waits on all of them at once. Readable or at its
//! deadline, a parked connection is a task again, which reads its next request or closes it
//! (gracefully) as an idle connection's task does. The hard stop closes every parked
//! connection; a drain leaves them their keep-alive timeout, and waits for them.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::Instrument;

use super::accept::{Active, until_hard_stop};
use crate::http::conn::{self, Ended, Waiting};
use crate::net::tls::TlsStream;
use crate::net::{ClientStream, Rewind};

/// How long an idle connection waits for its next request in its own task before it is
/// parked: a client that sends its next request at once (a busy keep-alive connection) finds
/// its task still there and pays no park and resume per request.
pub(super) const PARK_AFTER: Duration = Duration::from_millis(20);

/// The stream of a parked connection: those an HTTP/1.x connection is served on.
#[derive(Debug)]
pub(super) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl Stream {
    fn poll_read_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        match self {
            Stream::Plain(s) => ClientStream::poll_read_ready(s, cx),
            Stream::Tls(s) => s.poll_read_ready(cx),
        }
    }
}

/// A client stream an HTTP/1.x connection may be parked with.
pub(super) trait Parkable: ClientStream + Send + Sized + 'static {
    /// The stream to park; itself back when it cannot be parked (bytes it still holds).
    fn into_parked(self) -> Result<Stream, Self>;
}

impl Parkable for TcpStream {
    fn into_parked(self) -> Result<Stream, Self> {
        Ok(Stream::Plain(self))
    }
}

impl Parkable for Box<TlsStream> {
    fn into_parked(self) -> Result<Stream, Self> {
        Ok(Stream::Tls(self))
    }
}

/// An h2c bind's HTTP/1.x connection: the bytes read to tell its protocol are read again first.
impl Parkable for Rewind<TcpStream> {
    fn into_parked(self) -> Result<Stream, Self> {
        self.into_inner().map(Stream::Plain)
    }
}

/// An idle connection on its way to, or in, its thread's park.
pub(super) struct Parked {
    stream: Stream,
    active: Active,
    /// When its keep-alive timeout ends.
    until: Instant,
    /// Counted among the proxy's connections while out of a task, so that a drain waits for it.
    _tracked: TaskTrackerToken,
}

/// Where a serving thread's idle connections go: one per thread and proxy, cloned into each
/// connection's task.
#[derive(Clone, Debug)]
pub(super) struct Parking {
    to: mpsc::UnboundedSender<Parked>,
    connections: TaskTracker,
    hard_stop: CancellationToken,
    /// How many connections wait in the park now.
    parked: Arc<AtomicUsize>,
}

impl Parking {
    /// Starts the park of the calling runtime's thread, for the connections in `connections`.
    pub(super) fn start(connections: TaskTracker, hard_stop: CancellationToken) -> Parking {
        let (to, arrivals) = mpsc::unbounded_channel();
        let parking = Parking {
            to,
            connections,
            hard_stop,
            parked: Arc::default(),
        };
        tokio::spawn(run(arrivals, parking.clone()));
        parking
    }

    /// Parks `stream` until it is readable or `until`; after the hard stop, closes it.
    fn park(&self, stream: Stream, active: Active, until: Instant) {
        let parked = Parked {
            stream,
            active,
            until,
            _tracked: self.connections.token(),
        };
        // The park ended at the hard stop: the connection closes as it drops.
        let _ = self.to.send(parked);
    }

    /// How many connections wait in the park now.
    pub(super) fn parked(&self) -> usize {
        self.parked.load(Ordering::Relaxed)
    }
}

/// Serves an HTTP/1.x connection in the calling task until it closes, or parks it once idle.
#[allow(clippy::manual_async_fn)]
pub(super) fn http1<S: Parkable>(
    active: Active,
    parking: Parking,
    mut stream: S,
    mut waiting: Waiting,
) -> impl Future<Output = ()> {
    async move {
        loop {
            let shared = active.shared().clone();
            match conn::serve(shared, active.info(), stream, waiting, Some(PARK_AFTER)).await {
                Ended::Closed => return,
                Ended::Idle(idle, until) => match idle.into_parked() {
                    Ok(parked) => return parking.park(parked, active, until),
                    Err(unparked) => {
                        stream = unparked;
                        waiting = Waiting::Idle { until };
                    }
                },
            }
        }
    }
}

/// One thread's park: waits on its connections until each is readable or at its deadline,
/// then serves it in a task again. Ends at the hard stop (closing every parked connection, as
/// the hard stop ends a task) or once the proxy has no connection left.
async fn run(mut arrivals: mpsc::UnboundedReceiver<Parked>, parking: Parking) {
    let mut parked = FuturesUnordered::new();
    let mut done = pin!(parking.connections.wait());
    loop {
        tokio::select! {
            biased;
            _ = parking.hard_stop.cancelled() => {
                parking.parked.store(0, Ordering::Relaxed);
                return;
            }
            Some(conn) = arrivals.recv() => parked.push(wait(conn)),
            Some(conn) = parked.next(), if !parked.is_empty() => resume(conn, &parking),
            _ = &mut done => return,
        }
        parking.parked.store(parked.len(), Ordering::Relaxed);
    }
}

/// Waits until `conn` is readable (a request, its end, an error) or at its deadline.
///
/// Not an `async fn`: its argument would be kept twice in the future, once as the argument
/// and once as the local it is moved to.
#[allow(clippy::manual_async_fn)]
fn wait(mut conn: Parked) -> impl Future<Output = Parked> {
    async move {
        let mut deadline = pin!(tokio::time::sleep_until(conn.until));
        poll_fn(|cx| {
            if conn.stream.poll_read_ready(cx).is_ready() || deadline.as_mut().poll(cx).is_ready() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        conn
    }
}

/// Serves a connection that left the park in a task of its own: it reads its next request,
/// or, past its deadline, closes as an idle connection does.
fn resume(conn: Parked, parking: &Parking) {
    let Parked {
        stream,
        active,
        until,
        _tracked,
    } = conn;
    let span = tracing::debug_span!("conn", client.addr = %active.info().peer);
    let waiting = Waiting::Idle { until };
    let p = parking.clone();
    let serve = async move {
        match stream {
            Stream::Plain(s) => http1(active, p, s, waiting).await,
            Stream::Tls(s) => http1(active, p, s, waiting).await,
        }
    };
    let task = until_hard_stop(parking.hard_stop.clone(), serve).instrument(span);
    parking.connections.spawn(task);
    // Only now: the task counts in the token's place.
    drop(_tracked);
}

/// The bytes of a plain connection's future in the park.
#[cfg(test)]
pub(super) fn waiting_size(stream: TcpStream, active: Active) -> usize {
    let conn = Parked {
        stream: Stream::Plain(stream),
        active,
        until: Instant::now(),
        _tracked: TaskTracker::new().token(),
    };
    std::mem::size_of_val(&wait(conn))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use crate::config::BindRef;
    use crate::serve::Proxy;

    const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    /// Longest wait for anything in these tests.
    const T: Duration = Duration::from_secs(10);

    /// A server that answers every request head on every connection with `ANSWER`.
    async fn server() -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while let Ok(n @ 1..) = s.read(&mut chunk).await {
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            if s.write_all(ANSWER).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    /// A proxy in front of `server()` with `defaults`; its address.
    async fn proxy(defaults: &str) -> (Proxy, std::net::SocketAddr) {
        proxy_with(defaults, "", "\"127.0.0.1:80\"").await
    }

    /// A proxy in front of `server()` with `defaults`, more top-level `sections` and one `bind`.
    async fn proxy_with(
        defaults: &str,
        sections: &str,
        bind: &str,
    ) -> (Proxy, std::net::SocketAddr) {
        let backend = server().await;
        let text = format!(
            "[global]\nadmin_socket = \"/x/a.sock\"\nfdkeeper_socket = \"/x/l.sock\"\n\
             [defaults]\n{defaults}\n{sections}\n\
             [[frontend]]\nname = \"www\"\nbind = [{bind}]\ndefault_backend = \"app\"\n\
             [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s1\"\naddress = \"{backend}\"\n"
        );
        let config = crate::Config::from_source(common::SourceFile::from_text("t.toml", text))
            .expect("config");
        let proxy = Proxy::new(std::sync::Arc::new(config));
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        proxy.start(vec![(BindRef::default(), l)]).expect("start");
        (proxy, addr)
    }

    /// Sends a request on `c` and reads its whole answer; the answer.
    async fn request<C: AsyncRead + AsyncWrite + Unpin>(c: &mut C) -> String {
        c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("write");
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while !got.ends_with(b"\r\n\r\nok") {
            let n = tokio::time::timeout(T, c.read(&mut chunk))
                .await
                .expect("an answer in time")
                .expect("read");
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8(got).expect("text")
    }

    /// Whether the proxy closes `c` (an end of stream, or a reset) within `T`.
    async fn closed(c: &mut TcpStream) -> bool {
        let mut chunk = [0u8; 64];
        matches!(
            tokio::time::timeout(T, c.read(&mut chunk)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    /// Waits (at most `T`) until `f` holds.
    async fn until(what: &str, f: impl Fn() -> bool) {
        let start = std::time::Instant::now();
        while !f() {
            assert!(start.elapsed() < T, "never: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// `n` connections that each had a request answered, once all are parked.
    async fn parked_clients(proxy: &Proxy, addr: std::net::SocketAddr, n: usize) -> Vec<TcpStream> {
        let mut clients = Vec::new();
        for _ in 0..n {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            request(&mut c).await;
            clients.push(c);
        }
        until("parked", || proxy.parked_connections() == n).await;
        clients
    }

    /// The connections counted by the worker, its frontend and its (one) serving thread.
    fn active(proxy: &Proxy) -> (u64, u64, Vec<u64>) {
        let s = proxy.stats();
        (
            s.active_connections,
            proxy.shared().frontends[0]
                .connections_active
                .load(Ordering::Relaxed),
            s.thread_connections,
        )
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_parked_connection_serves_its_next_request() {
        let (proxy, addr) = proxy("").await;
        let mut c = TcpStream::connect(addr).await.expect("connect");
        for _ in 0..3 {
            let answer = request(&mut c).await;
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            until("parked", || proxy.parked_connections() == 1).await;
        }
        assert_eq!(proxy.stats().requests_total, 3);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_parked_tls_connection_serves_its_next_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = crate::config::tls::testing::pem(&["a.test"]);
        let pem = dir.path().join("a.pem");
        std::fs::write(&pem, format!("{cert}{key}")).expect("write");
        let tls = format!("[[tls]]\nname = \"t\"\ncerts = [{:?}]\n", pem.display());
        let bind = "{ address = \"127.0.0.1:80\", tls = \"t\" }";
        let (proxy, addr) = proxy_with("", &tls, bind).await;
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("a.test").expect("name");
        let connector =
            tokio_rustls::TlsConnector::from(crate::config::tls::testing::any_certificate_client());
        let mut c = connector.connect(name, tcp).await.expect("handshake");
        for _ in 0..3 {
            let answer = request(&mut c).await;
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            until("parked", || proxy.parked_connections() == 1).await;
        }
        assert_eq!(proxy.stats().requests_total, 3);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_silent_parked_connection_closes_at_its_keep_alive_timeout() {
        let (proxy, addr) = proxy("timeout_http_keep_alive = \"300ms\"").await;
        let mut c = TcpStream::connect(addr).await.expect("connect");
        request(&mut c).await;
        until("parked", || proxy.parked_connections() == 1).await;
        assert!(closed(&mut c).await, "still open");
        until("uncounted", || active(&proxy) == (0, 0, vec![0])).await;
        assert_eq!(proxy.parked_connections(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_hard_stop_closes_parked_connections() {
        let (proxy, addr) = proxy("").await;
        let mut clients = parked_clients(&proxy, addr, 3).await;
        proxy.stop().await;
        for c in &mut clients {
            assert!(closed(c).await, "still open");
        }
        assert_eq!(active(&proxy), (0, 0, vec![0]));
        assert_eq!(proxy.parked_connections(), 0);
    }

    /// Parked connections stay counted (worker, frontend, serving thread) and keep their
    /// maxconn permit: a connection past maxconn waits in the accept queue until one of them
    /// closes.
    #[tokio::test(flavor = "current_thread")]
    async fn counts_and_maxconn_hold_across_park_and_resume() {
        let (proxy, addr) = proxy("maxconn = 3").await;
        let mut clients = parked_clients(&proxy, addr, 3).await;
        assert_eq!(active(&proxy), (3, 3, vec![3]));
        // Resumed and parked again: counted once all along.
        for c in &mut clients {
            request(c).await;
        }
        assert_eq!(active(&proxy), (3, 3, vec![3]));
        until("parked again", || proxy.parked_connections() == 3).await;
        assert_eq!(active(&proxy), (3, 3, vec![3]));
        let mut fourth = TcpStream::connect(addr)
            .await
            .expect("queued by the kernel");
        let answered = tokio::spawn(async move { (request(&mut fourth).await, fourth) });
        drop(clients.pop());
        let (answer, _fourth) = tokio::time::timeout(T, answered)
            .await
            .expect("answered once a permit is free")
            .expect("task");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(active(&proxy), (3, 3, vec![3]));
        drop(clients);
        until("one left", || active(&proxy) == (1, 1, vec![1])).await;
        assert_eq!(proxy.stats().requests_total, 7);
    }

    /// A drain leaves a parked connection its keep-alive timeout: its next request is answered
    /// (with `Connection: close`), and a silent one closes at its timeout, before the deadline.
    #[tokio::test(flavor = "current_thread")]
    async fn a_drain_lets_parked_connections_finish() {
        let (proxy, addr) = proxy("timeout_http_keep_alive = \"1s\"").await;
        let mut talking = TcpStream::connect(addr).await.expect("connect");
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        request(&mut talking).await;
        request(&mut silent).await;
        until("parked", || proxy.parked_connections() == 2).await;
        proxy.drain().await;
        let finished = async {
            proxy
                .finish(tokio::time::Instant::now() + Duration::from_secs(60))
                .await;
            std::time::Instant::now()
        };
        let clients = async {
            let answer = request(&mut talking).await;
            assert!(
                answer.to_ascii_lowercase().contains("connection: close"),
                "{answer}"
            );
            assert!(closed(&mut talking).await, "talking still open");
            assert!(closed(&mut silent).await, "silent still open");
            std::time::Instant::now()
        };
        let (finished, closed) = tokio::join!(finished, clients);
        assert!(finished >= closed, "finished before its connections closed");
        assert_eq!(active(&proxy), (0, 0, vec![0]));
        assert_eq!(proxy.stats().requests_total, 3);
    }
}
