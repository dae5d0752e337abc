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
}

impl Parking {
    /// Starts the park of the calling runtime's thread, for the connections in `connections`.
    pub(super) fn start(connections: TaskTracker, hard_stop: CancellationToken) -> Parking {
        let (to, arrivals) = mpsc::unbounded_channel();
        let parking = Parking {
            to,
            connections,
            hard_stop,
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
}

/// Serves an HTTP/1.x connection in the calling task until it closes, or parks it once idle.
pub(super) async fn http1<S: Parkable>(
    active: Active,
    parking: Parking,
    mut stream: S,
    mut waiting: Waiting,
) {
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

/// One thread's park: waits on its connections until each is readable or at its deadline,
/// then serves it in a task again. Ends at the hard stop (closing every parked connection, as
/// the hard stop ends a task) or once the proxy has no connection left.
async fn run(mut arrivals: mpsc::UnboundedReceiver<Parked>, parking: Parking) {
    let mut parked = FuturesUnordered::new();
    let mut done = pin!(parking.connections.wait());
    loop {
        tokio::select! {
            biased;
            _ = parking.hard_stop.cancelled() => return,
            Some(conn) = arrivals.recv() => parked.push(wait(conn)),
            Some(conn) = parked.next(), if !parked.is_empty() => resume(conn, &parking),
            _ = &mut done => return,
        }
    }
}

/// Waits until `conn` is readable (a request, its end, an error) or at its deadline.
async fn wait(mut conn: Parked) -> Parked {
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
