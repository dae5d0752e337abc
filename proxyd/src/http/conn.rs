//! One HTTP/1.x client connection: read a request, pass it on through [`exchange`], stream
//! the answer back, and keep the connection while both sides want it.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Buf;
use tokio::io::AsyncWriteExt;

use super::body;
use super::exchange::{Answer, Downstream, Status, Unanswered, exchange};
use super::head::{self, Framing, HeadError, RequestHead, ResponseHead};
use super::log::{self, Log, Side};
use super::redirect;
use super::route;
use super::tunnel;
use crate::config::RedirectHttps;
use crate::net::{ClientInfo, ClientStream, Io, spares};
use crate::rules::{Decision, HeaderEdit};
use crate::shared::Shared;

/// What happens to the client connection after one exchange.
enum Next {
    KeepAlive,
    Close,
    /// Answer with this status, then close.
    Fail(Status),
}

/// How long a connection may wait for a request head before any byte of it came.
#[derive(Clone, Copy, Debug)]
pub enum Waiting {
    /// Just accepted: `timeout_http_request`.
    First,
    /// Between requests: until its keep-alive timeout ends.
    Idle { until: tokio::time::Instant },
}

/// How [`serve`] leaves a connection.
#[derive(Debug)]
pub enum Ended<C> {
    /// Closed, or ended by the client.
    Closed,
    /// Silent between requests for the `park_after` it was given, with no byte unread and no
    /// buffer: the caller waits for its next request (until its keep-alive deadline) and hands
    /// it back to [`serve`] with [`Waiting::Idle`].
    Idle(C, tokio::time::Instant),
}

/// Serves one accepted client connection (plain, or decrypted by TLS) until it closes, or,
/// given `park_after`, until it has been idle between requests that long.
///
/// What waits between requests is kept small, since every idle keep-alive connection holds it:
/// the stream, without a read buffer ([`Io::fill_lazily`]); the state of a request in flight
/// is on the heap only while it is ([`answer`]).
pub async fn serve<C: ClientStream>(
    shared: Arc<Shared>,
    info: ClientInfo,
    stream: C,
    mut waiting: Waiting,
    park_after: Option<Duration>,
) -> Ended<C> {
    let mut client = Io::new(stream);
    loop {
        let (head, head_time) =
            match read_request_head(&shared, &mut client, waiting, park_after).await {
                Ok(Read::Head(h, t)) => (h, t),
                Ok(Read::Idle(until)) => {
                    spares::give_buffer(&mut client.buf);
                    return Ended::Idle(client.stream, until);
                }
                Ok(Read::Gone) => break,
                Err(status) => {
                    tracing::debug!(status = status as u16, "refusing request");
                    let fe = &shared.config.frontends[info.at.frontend];
                    let answer = route::h1_error(status, &route::always(&fe.rules));
                    let _ = send(&mut client.stream, &answer).await;
                    log::access_log(
                        &shared,
                        info.at.frontend,
                        info.peer,
                        &Log::refused(status),
                        None,
                    );
                    break;
                }
            };
        if !Box::pin(answer(&shared, info, &mut client, head, head_time)).await {
            break;
        }
        let keep_alive = shared.config.defaults.timeout_http_keep_alive;
        waiting = Waiting::Idle {
            until: tokio::time::Instant::now() + keep_alive,
        };
    }
    close_gracefully(client).await;
    Ended::Closed
}

/// Answers one request (through a server, a rule or the redirect to https) and logs it;
/// whether the connection is kept for the next.
async fn answer<C: ClientStream>(
    shared: &Shared,
    info: ClientInfo,
    client: &mut Io<C>,
    mut head: RequestHead,
    head_time: Duration,
) -> bool {
    let (frontend, peer) = (info.at.frontend, info.peer);
    let redirect = shared.config.bind(info.at).redirect_https;
    let fe = &shared.config.frontends[frontend];
    let _in_flight = log::in_flight(shared);
    let mut log = Log::start(if head.minor == 0 {
        "HTTP/1.0"
    } else {
        "HTTP/1.1"
    });
    log.head_time = head_time;
    let routed = route::route(&fe.rules, info, &mut head);
    let edits = &routed.response;
    let next = match (redirect, route::local(routed.decision, &head, info)) {
        (Some(r), _) => redirect_https(shared, client, &head, r, &mut log, edits).await,
        (None, Some(Ok(local))) => {
            answer_locally(shared, client, &head, &local, &mut log, edits).await
        }
        (None, Some(Err(status))) => Next::Fail(status),
        (None, None) => {
            let backend = match routed.decision {
                Decision::Backend(b) => b,
                _ => fe.default_backend,
            };
            match exchange(shared, info, client, &mut head, backend, &mut log).await {
                Ok(answer) => {
                    forward_response(shared, client, &head, answer, &mut log, edits).await
                }
                Err(Unanswered::ClientGone) => Next::Close,
                Err(Unanswered::Fail(status)) => Next::Fail(status),
            }
        }
    };
    if let Next::Fail(status) = next {
        log.status = status as u16;
        log.proxy_error = true;
        log.bytes = status.response().len() as u64;
    }
    log::access_log(shared, frontend, peer, &log, Some(&head));
    match next {
        Next::KeepAlive => true,
        Next::Close => false,
        Next::Fail(status) => {
            tracing::debug!(status = status as u16, "answering with an error");
            let _ = send(&mut client.stream, &route::h1_error(status, edits)).await;
            false
        }
    }
}

impl<C: ClientStream> Downstream for Io<C> {
    type Body = C;

    fn body(&mut self) -> &mut Io<C> {
        self
    }

    async fn go_on(&mut self) -> io::Result<()> {
        send(&mut self.stream, b"HTTP/1.1 100 Continue\r\n\r\n").await
    }

    async fn informational(&mut self, resp: &ResponseHead, req: &RequestHead) -> io::Result<()> {
        // 100 Continue was answered by the proxy already; others go to 1.1 clients.
        if resp.status == 100 || req.minor != 1 {
            return Ok(());
        }
        send(&mut self.stream, &resp.downstream(false, 1)).await
    }
}

/// Writes what the proxy says itself to the client, flushed: over TLS the last records of a
/// write may wait in the stream until then, while the client waits for them.
async fn send<C: ClientStream>(client: &mut C, bytes: &[u8]) -> std::io::Result<()> {
    client.write_all(bytes).await?;
    client.flush().await
}

/// Shuts our side down and reads what the client still sends for a moment, so that the kernel
/// does not answer unread bytes with a reset that could destroy the last response in flight.
async fn close_gracefully<C: ClientStream>(mut client: Io<C>) {
    if client.stream.shutdown().await.is_err() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        client.buf.clear();
        let left = deadline.saturating_duration_since(Instant::now());
        match client.fill_lazily(left).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// What waiting for a request head gave.
enum Read {
    /// A complete head, with the time from its first byte to its end.
    Head(RequestHead, Duration),
    /// No byte of a request for `park_after`; the keep-alive deadline is still ahead.
    Idle(tokio::time::Instant),
    /// The client is gone, or stayed silent past its timeout.
    Gone,
}

/// Waits for the next complete request head.
async fn read_request_head<C: ClientStream>(
    shared: &Shared,
    client: &mut Io<C>,
    waiting: Waiting,
    park_after: Option<Duration>,
) -> Result<Read, Status> {
    let d = &shared.config.defaults;
    let mut started: Option<Instant> = None;
    loop {
        if !client.buf.is_empty() {
            let began = *started.get_or_insert_with(Instant::now);
            match head::parse_request(&client.buf) {
                Ok(Some(h)) => {
                    client.buf.advance(h.len);
                    return Ok(Read::Head(h, began.elapsed()));
                }
                Ok(None) => {}
                Err(HeadError::TooLarge) => return Err(Status::HeadersTooLarge),
                Err(HeadError::Malformed(why)) => {
                    tracing::debug!(reason = why, "malformed request");
                    return Err(Status::BadRequest);
                }
                Err(HeadError::Unsupported(why)) => {
                    tracing::debug!(reason = why, "unsupported request");
                    return Err(Status::NotImplemented);
                }
            }
        }
        // An idle connection waits for its next request however long the keep-alive timeout
        // allows, draining or not: closing it early would race the client's next request.
        let (timeout, parks) = match (started, waiting) {
            (None, Waiting::First) => (d.timeout_http_request, None),
            (None, Waiting::Idle { until }) => {
                let left = until.saturating_duration_since(tokio::time::Instant::now());
                match park_after {
                    Some(after) if after < left => (after, Some(until)),
                    _ => (left, None),
                }
            }
            (Some(t), _) => (d.timeout_http_request.saturating_sub(t.elapsed()), None),
        };
        match client.fill_lazily(timeout).await {
            Ok(0) => return Ok(Read::Gone),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                return match (started, parks) {
                    (None, Some(until)) => Ok(Read::Idle(until)),
                    (None, None) => Ok(Read::Gone),
                    (Some(_), _) => Err(Status::RequestTimeout),
                };
            }
            Err(_) => return Ok(Read::Gone),
        }
    }
}

/// Answers a request on a bind that sends plain HTTP to https: a 301 to the same URL in https
/// (HAProxy's `redirect scheme https`).
async fn redirect_https<C: ClientStream>(
    shared: &Shared,
    client: &mut Io<C>,
    req: &RequestHead,
    to: RedirectHttps,
    log: &mut Log,
    edits: &[&HeaderEdit],
) -> Next {
    let Some(location) = redirect::https_location(req.host(), req.target(), to.port) else {
        return Next::Fail(Status::BadRequest);
    };
    log.status = 301;
    log.intercepted = true;
    let close = closes_after_local(shared, req);
    let mut answer = redirect::moved_permanently(&location, close, req.minor);
    route::edit_head(&mut answer, edits);
    log.bytes = answer.len() as u64;
    if send(&mut client.stream, &answer).await.is_err() || close {
        return Next::Close;
    }
    Next::KeepAlive
}

/// Whether the connection ends after an answer of the proxy's own: a request body is not read
/// but left behind with the connection.
fn closes_after_local(shared: &Shared, req: &RequestHead) -> bool {
    !req.keep_alive || req.framing != Framing::Empty || shared.drain.is_cancelled()
}

/// Answers by a rule (`redirect`, `deny`, `return`), without a backend.
async fn answer_locally<C: ClientStream>(
    shared: &Shared,
    client: &mut Io<C>,
    req: &RequestHead,
    local: &route::Local<'_>,
    log: &mut Log,
    edits: &[&HeaderEdit],
) -> Next {
    log.status = local.status;
    // A deny counts as denied (no backend, not intercepted by design).
    log.intercepted = !local.denied;
    let close = closes_after_local(shared, req);
    let answer = route::h1_local(local, close, req.minor, req.is_head(), edits);
    log.bytes = answer.len() as u64;
    if send(&mut client.stream, &answer).await.is_err() || close {
        return Next::Close;
    }
    Next::KeepAlive
}

/// Streams the response to the client once its head is read.
async fn forward_response<C: ClientStream>(
    shared: &Shared,
    client: &mut Io<C>,
    req: &RequestHead,
    answer: Answer<'_>,
    log: &mut Log,
    edits: &[&HeaderEdit],
) -> Next {
    let Answer {
        slot,
        mut srv,
        resp,
    } = answer;
    if resp.is_switch() {
        return switch(shared, client, req, srv, resp).await;
    }
    let close =
        !req.keep_alive || shared.drain.is_cancelled() || resp.framing == Framing::UntilClose;
    srv.buf.advance(resp.len);
    let (framing, keep_alive) = (resp.framing, resp.keep_alive);
    let mut out = resp.into_downstream(close, req.minor);
    route::edit_head(&mut out, edits);
    let timeout = shared.config.defaults.timeout_server;
    match body::forward_counted(&mut srv, &mut client.stream, framing, &mut out, timeout).await {
        Ok(sent) => log.bytes = sent,
        Err(e) => {
            // The head is on its way to the client: the only honest signal left is to close.
            tracing::debug!(error = %e, "response body aborted");
            log.aborted = Some(Side::of(&e));
            return Next::Close;
        }
    }
    if keep_alive && srv.buf.is_empty() {
        slot.server().release(srv);
    }
    // The client learned about the close from the response, which is now complete.
    if close { Next::Close } else { Next::KeepAlive }
}

/// Passes the server's 101 on and carries the connection as a tunnel until it ends; the
/// server connection is never pooled again.
async fn switch<C: ClientStream>(
    shared: &Shared,
    client: &mut Io<C>,
    req: &RequestHead,
    mut srv: Io<tokio::net::TcpStream>,
    resp: ResponseHead,
) -> Next {
    srv.buf.advance(resp.len);
    let head = resp.into_downstream(false, req.minor);
    if send(&mut client.stream, &head).await.is_err() {
        return Next::Close;
    }
    let _open = shared.stats.tunnel();
    let ending = tunnel::Ending {
        idle: shared.config.defaults.timeout_tunnel,
        closing: &shared.closing,
        websocket: req.upgrades_to_websocket(),
    };
    if let Err(e) = tunnel::run(client, &mut srv, ending).await {
        tracing::debug!(error = %e, "tunnel ended");
    }
    Next::Close
}
