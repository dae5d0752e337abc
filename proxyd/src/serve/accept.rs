//! One listener's accept loop: maxconn, the drain that takes what is already queued, and the
//! hand-over of each connection to its transport (plain or TLS), then to its frontend's protocol.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::park::{self, Parkable, Parking};
use super::threads;
use crate::config::tls::AppProtocol;
use crate::config::{BindRef, Mode};
use crate::http::conn::Waiting;
use crate::http::h2;
use crate::net::tls::TlsServer;
use crate::net::{ClientInfo, Io, Rewind};
use crate::shared::Shared;

/// Most connections a drain takes from one listener's queue.
const TAKE_QUEUE_MAX: usize = 4096;

/// What the accept loop of one listener needs, and hands to each connection task.
pub(super) struct Acceptor {
    pub(super) shared: Arc<Shared>,
    pub(super) at: BindRef,
    /// The bind's TLS, when it terminates TLS.
    pub(super) tls: Option<TlsServer>,
    pub(super) connections: TaskTracker,
    pub(super) hard_stop: CancellationToken,
    /// Whether to take the queued connections when the drain stops this loop.
    pub(super) take_queue: Arc<AtomicBool>,
    /// The frontend's maxconn, shared by its binds: past it, connections (TLS handshakes
    /// included) wait in the accept queue (shared with the other generation).
    pub(super) limit: Arc<Semaphore>,
    /// The serving threads, to hand each connection to the least loaded.
    pub(super) spread: Arc<super::threads::Spread>,
    /// Each serving thread's park (`spread`'s order).
    pub(super) parks: Arc<[Parking]>,
}

/// An accepted connection's share of the worker's counts and limits (active connections, its
/// frontend's, maxconn, its serving thread's load), from accept to close: it moves with the
/// connection between its task and the park.
pub(super) struct Active {
    shared: Arc<Shared>,
    info: ClientInfo,
    _permit: OwnedSemaphorePermit,
    _thread: threads::Counted,
}

impl Active {
    fn new(
        shared: Arc<Shared>,
        info: ClientInfo,
        permit: OwnedSemaphorePermit,
        thread: threads::Counted,
    ) -> Self {
        shared
            .stats
            .active_connections
            .fetch_add(1, Ordering::Relaxed);
        let fc = &shared.frontends[info.at.frontend];
        fc.connections_active.fetch_add(1, Ordering::Relaxed);
        fc.connections_total.fetch_add(1, Ordering::Relaxed);
        Active {
            shared,
            info,
            _permit: permit,
            _thread: thread,
        }
    }

    pub(super) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub(super) fn info(&self) -> ClientInfo {
        self.info
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.shared
            .stats
            .active_connections
            .fetch_sub(1, Ordering::Relaxed);
        self.shared.frontends[self.info.at.frontend]
            .connections_active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's task: `serve`, unless the hard stop comes first.
pub(super) async fn until_hard_stop(hard_stop: CancellationToken, serve: impl Future<Output = ()>) {
    tokio::select! {
        _ = serve => {}
        _ = hard_stop.cancelled() => {}
    }
}

impl Acceptor {
    /// Accepts until the drain, then (for a graceful drain) takes what is queued.
    pub(super) async fn run(self, listener: TcpListener) {
        let shared = &self.shared;
        loop {
            let permit = tokio::select! {
                biased;
                _ = shared.drain.cancelled() => break,
                p = self.limit.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                biased;
                _ = shared.drain.cancelled() => break,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((stream, peer)) => self.spawn_conn(stream, peer, permit),
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        if self.take_queue.load(Ordering::Relaxed) {
            self.take_queue(listener);
        }
        tracing::debug!("stopped accepting");
    }

    /// Accepts, without waiting, what the kernel has already queued on a listener this worker
    /// stops using, and serves it (with `Connection: close`, as the worker drains). When the
    /// bind stays in the config the next generation would take these too; when the reload
    /// dropped it, nobody else will, and closing the listener would reset them: a reload loses
    /// no queued connection either way. Only what arrives in the microseconds between this and
    /// the close of the last copy of a dropped listener is refused.
    fn take_queue(&self, listener: TcpListener) {
        // Out of tokio's hands: its readiness may not have seen the last arrivals yet.
        let Ok(listener) = listener.into_std() else {
            return;
        };
        let mut taken = 0;
        while taken < TAKE_QUEUE_MAX {
            let Ok(permit) = self.limit.clone().try_acquire_owned() else {
                break;
            };
            let (stream, peer) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "accept of a queued connection failed");
                    break;
                }
            };
            let stream = match stream
                .set_nonblocking(true)
                .and_then(|()| TcpStream::from_std(stream))
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot serve a queued connection");
                    continue;
                }
            };
            self.spawn_conn(stream, peer, permit);
            taken += 1;
        }
        if taken > 0 {
            tracing::info!(
                connections = taken,
                "took the queued connections before closing"
            );
        }
    }

    /// Counts the connection and serves it in its own task until it ends, is parked, or the
    /// hard stop.
    fn spawn_conn(&self, stream: TcpStream, peer: SocketAddr, permit: OwnedSemaphorePermit) {
        let info = ClientInfo {
            peer,
            at: self.at,
            tls: false,
        };
        let (elsewhere, thread) = self.spread.pick(crate::shared::serving_thread());
        let parking = self.parks[thread.thread()].clone();
        let active = Active::new(self.shared.clone(), info, permit, thread);
        let span = tracing::debug_span!("conn", client.addr = %peer);
        // Plain and TLS connections are tasks of their own types: tokio keeps a task's future
        // in the task itself, sized for its largest state, and a plain connection needs much
        // less than a TLS one.
        match &self.tls {
            None => self.spawn_task(stream, elsewhere, span, move |s| {
                serve_plain(active, parking, s)
            }),
            Some(tls) => {
                let tls = tls.clone();
                self.spawn_task(stream, elsewhere, span, move |s| {
                    serve_tls(active, parking, tls, s)
                })
            }
        }
    }

    /// Runs `serve` on `stream` in its own task, on serving thread `elsewhere` (`None`: this
    /// one), until it ends or the hard stop.
    fn spawn_task<F: Future<Output = ()> + Send + 'static>(
        &self,
        stream: TcpStream,
        elsewhere: Option<&tokio::runtime::Handle>,
        span: tracing::Span,
        serve: impl FnOnce(TcpStream) -> F + Send + 'static,
    ) {
        // Another thread takes the socket into its own reactor (out of this one's first).
        let (stream, moved) = if elsewhere.is_none() {
            (Some(stream), None)
        } else {
            match stream.into_std() {
                Ok(std) => (None, Some(std)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot hand a connection to another thread");
                    (None, None)
                }
            }
        };
        let hard_stop = self.hard_stop.clone();
        let task = async move {
            let stream = match (stream, moved) {
                (Some(s), _) => Some(s),
                (None, Some(std)) => TcpStream::from_std(std)
                    .inspect_err(|e| tracing::warn!(error = %e, "cannot serve a connection"))
                    .ok(),
                (None, None) => None,
            };
            // Without a stream, `serve` drops unused, and the connection's counts with it.
            if let Some(stream) = stream {
                until_hard_stop(hard_stop, serve(stream)).await;
            }
        }
        .instrument(span);
        match elsewhere {
            Some(handle) => self.connections.spawn_on(task, handle),
            None => self.connections.spawn(task),
        };
    }
}

/// Sets a plain connection up and serves it with its frontend's protocol (telling h2c from
/// HTTP/1.x first on an `h2c` bind).
///
/// Not an `async fn`, nor is [`protocol`] or `park::http1`: an `async fn` keeps its arguments
/// twice in its future, as arguments and as the locals they are moved to.
#[allow(clippy::manual_async_fn)]
fn serve_plain(active: Active, parking: Parking, stream: TcpStream) -> impl Future<Output = ()> {
    async move {
        set_nodelay(active.shared(), active.info(), &stream);
        if active.shared().config.bind(active.info().at).h2c {
            // On the heap: inline, the HTTP/2 connection's state would size every plain task.
            return Box::pin(prior_knowledge(active, parking, stream)).await;
        }
        protocol(active, parking, None, stream).await;
    }
}

/// A head and its body go out in separate writes: with Nagle the second would wait for the
/// client's (delayed) ACK of the first. A handshake's flights are written whole.
fn set_nodelay(shared: &Shared, info: ClientInfo, stream: &TcpStream) {
    if shared.config.frontends[info.at.frontend].mode == Mode::Http
        && let Err(e) = stream.set_nodelay(true)
    {
        tracing::debug!(error = %e, "set_nodelay failed");
    }
}

/// Runs the TLS handshake, then serves the decrypted connection.
async fn serve_tls(mut active: Active, parking: Parking, tls: TlsServer, stream: TcpStream) {
    let (shared, info) = (active.shared().clone(), active.info());
    set_nodelay(&shared, info, &stream);
    match tls
        .accept(stream, shared.config.defaults.timeout_tls_handshake)
        .await
    {
        Ok((stream, alpn)) => {
            active.info.tls = true;
            protocol(active, parking, alpn, stream).await;
        }
        Err(e) => {
            shared.frontends[info.at.frontend]
                .tls_handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                target: "proxyd::access",
                client = %info.peer,
                frontend = %shared.config.frontends[info.at.frontend].name,
                error = %e,
                "tls handshake failed"
            );
        }
    }
}

/// Serves a plain connection that may start with the HTTP/2 preface (h2c with prior
/// knowledge) as HTTP/2, and any other as HTTP/1.x, with the bytes read to tell them apart.
async fn prior_knowledge(active: Active, parking: Parking, stream: TcpStream) {
    let mut io = Io::new(stream);
    let timeout = active.shared().config.defaults.timeout_http_request;
    let deadline = tokio::time::Instant::now() + timeout;
    let alpn = loop {
        let n = io.buf.len().min(h2::PREFACE.len());
        if io.buf[..n] != h2::PREFACE[..n] {
            break AppProtocol::Http1;
        }
        if n == h2::PREFACE.len() {
            break AppProtocol::H2;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match io.fill_lazily(left).await {
            Ok(0) | Err(_) if io.buf.is_empty() => return,
            // What came is served as HTTP/1.x, which answers a partial or late request.
            Ok(0) | Err(_) => break AppProtocol::Http1,
            Ok(_) => {}
        }
    };
    let stream = Rewind::new(io.buf.freeze(), io.stream);
    protocol(active, parking, Some(alpn), stream).await;
}

/// Serves a connection, plain or decrypted, with the protocol of its frontend and, over TLS,
/// the one agreed through ALPN.
#[allow(clippy::manual_async_fn)]
fn protocol<C: Parkable>(
    active: Active,
    parking: Parking,
    alpn: Option<AppProtocol>,
    stream: C,
) -> impl Future<Output = ()> {
    async move {
        let (shared, info) = (active.shared().clone(), active.info());
        match shared.config.frontends[info.at.frontend].mode {
            Mode::Http => match alpn {
                None | Some(AppProtocol::Http1) => {
                    park::http1(active, parking, stream, Waiting::First).await
                }
                // On the heap: an HTTP/2 connection's state is larger than an HTTP/1.x one's, and
                // inline it would make every connection's task as large.
                Some(AppProtocol::H2) => {
                    Box::pin(crate::http::h2::serve(shared, info, stream)).await
                }
            },
            // On the heap for the same reason: an HTTP/1.x connection is a task of the same type.
            Mode::Tcp => Box::pin(crate::tcp::serve(shared, info, stream)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BindRef;

    /// Most bytes of a plain connection's future: a connection holds it (in its task) while a
    /// request is in flight and for `park::PARK_AFTER` after, as it holds what its largest
    /// state needs.
    const PLAIN_MAX: usize = 1408;

    async fn accepted(l: &TcpListener) -> (TcpStream, TcpStream, ClientInfo) {
        let client = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (stream, peer) = l.accept().await.expect("accept");
        let info = ClientInfo {
            peer,
            at: BindRef {
                frontend: 0,
                bind: 0,
            },
            tls: false,
        };
        (stream, client, info)
    }

    /// Most bytes of a parked connection's future: every idle keep-alive connection holds it,
    /// with the park's links to it, in one allocation.
    const PARKED_MAX: usize = 320;

    /// An accepted connection's counts, on the calling thread, with a permit of its own.
    fn active(shared: &Arc<Shared>, info: ClientInfo) -> Active {
        let spread = Arc::new(threads::Spread::new(&[tokio::runtime::Handle::current()]));
        let (_, thread) = spread.pick(0);
        let permit = Arc::new(Semaphore::new(1))
            .try_acquire_owned()
            .expect("permit");
        Active::new(shared.clone(), info, permit, thread)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_plain_connection_is_a_small_task_and_a_smaller_parked_one() {
        let text = "[global]\nadmin_socket = \"/x/a.sock\"\nfdkeeper_socket = \"/x/l.sock\"\n\
                    [[frontend]]\nname = \"www\"\nbind = [\"127.0.0.1:80\"]\ndefault_backend = \"app\"\n\
                    [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s1\"\naddress = \"127.0.0.1:81\"\n";
        let config = crate::Config::from_source(common::SourceFile::from_text("t.toml", text))
            .expect("config");
        let shared = Arc::new(Shared::new(Arc::new(config), None, &Default::default()));
        let parking = Parking::start(TaskTracker::new(), CancellationToken::new());
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (stream, _client, info) = accepted(&l).await;
        let http = std::mem::size_of_val(&crate::http::conn::serve(
            shared.clone(),
            info,
            stream,
            Waiting::First,
            None,
        ));
        let (stream, _client, info) = accepted(&l).await;
        let tcp = std::mem::size_of_val(&crate::tcp::serve(shared.clone(), info, stream));
        let (stream, _client, info) = accepted(&l).await;
        let plain = std::mem::size_of_val(&serve_plain(active(&shared, info), parking, stream));
        let (stream, _client, info) = accepted(&l).await;
        let parked = park::waiting_size(stream, active(&shared, info));
        eprintln!(
            "futures: http/1.x {http} bytes, tcp {tcp}, a plain connection {plain}, \
             a parked one {parked}"
        );
        assert!(plain <= PLAIN_MAX, "{plain} bytes");
        assert!(parked <= PARKED_MAX, "{parked} bytes parked");
    }
}
