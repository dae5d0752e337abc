//! One client connection: read a request, pass it to a server of the frontend's backend,
//! stream the answer back, and keep the connection while both sides want it.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Buf;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::Instrument;

use super::body::{self, BodyError};
use super::head::{self, Framing, HeadError, RequestHead, ResponseHead};
use super::redirect;
use crate::config::{RedirectHttps, StickOn};
use crate::net::{ClientInfo, ClientStream, Io, pool};
use crate::shared::{NoServer, ServerRt, Shared};

/// Request bodies up to this size are read before the server is chosen, so that the request
/// can be sent again on another connection if a reused one turns out closed.
const MAX_BUFFERED_BODY: u64 = 64 * 1024;

/// Statuses the proxy answers itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    BadRequest = 400,
    RequestTimeout = 408,
    HeadersTooLarge = 431,
    NotImplemented = 501,
    BadGateway = 502,
    ServiceUnavailable = 503,
    GatewayTimeout = 504,
}

impl Status {
    fn response(self) -> &'static [u8] {
        match self {
            Status::BadRequest => b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 16\r\nConnection: close\r\n\r\n400 bad request\n",
            Status::RequestTimeout => b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain\r\nContent-Length: 20\r\nConnection: close\r\n\r\n408 request timeout\n",
            Status::HeadersTooLarge => b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\nContent-Length: 22\r\nConnection: close\r\n\r\n431 headers too large\n",
            Status::NotImplemented => b"HTTP/1.1 501 Not Implemented\r\nContent-Type: text/plain\r\nContent-Length: 20\r\nConnection: close\r\n\r\n501 not implemented\n",
            Status::BadGateway => b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: 16\r\nConnection: close\r\n\r\n502 bad gateway\n",
            Status::ServiceUnavailable => b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 24\r\nConnection: close\r\n\r\n503 service unavailable\n",
            Status::GatewayTimeout => b"HTTP/1.1 504 Gateway Timeout\r\nContent-Type: text/plain\r\nContent-Length: 20\r\nConnection: close\r\n\r\n504 gateway timeout\n",
        }
    }
}

/// What happens to the client connection after one exchange.
enum Next {
    KeepAlive,
    Close,
    /// Answer with this status, then close.
    Fail(Status),
}

/// Serves one accepted client connection (plain, or decrypted by TLS) until it closes.
pub async fn serve<C: ClientStream>(shared: Arc<Shared>, info: ClientInfo, stream: C) {
    let (frontend, peer) = (info.at.frontend, info.peer);
    let redirect = shared.config.bind(info.at).redirect_https;
    let mut client = Io::new(stream);
    let mut first = true;
    loop {
        let mut head = match read_request_head(&shared, &mut client, first).await {
            Ok(Some(h)) => h,
            Ok(None) => break,
            Err(status) => {
                tracing::debug!(status = status as u16, "refusing request");
                let _ = send(&mut client.stream, status.response()).await;
                access_log(&shared, frontend, peer, &Log::refused(status), None);
                break;
            }
        };
        first = false;
        let stats = &shared.stats;
        stats.requests_total.fetch_add(1, Ordering::Relaxed);
        stats.requests_in_flight.fetch_add(1, Ordering::Relaxed);
        let _in_flight = scopeguard(&shared);
        let mut log = Log::start();
        let next = match redirect {
            Some(r) => redirect_https(&shared, &mut client, &head, r, &mut log).await,
            None => exchange(&shared, info, &mut client, &mut head, &mut log).await,
        };
        if let Next::Fail(status) = next {
            log.status = status as u16;
            log.proxy_error = true;
        }
        access_log(&shared, frontend, peer, &log, Some(&head));
        match next {
            Next::KeepAlive => continue,
            Next::Close => break,
            Next::Fail(status) => {
                tracing::debug!(status = status as u16, "answering with an error");
                let _ = send(&mut client.stream, status.response()).await;
                break;
            }
        }
    }
    close_gracefully(client).await;
}

/// What the access log line says about one request.
struct Log {
    started: Instant,
    backend: Option<usize>,
    server: Option<(usize, usize)>,
    /// 0: no response (client gone).
    status: u16,
    retries: u32,
    redispatched: bool,
    stick: &'static str,
    /// The status was the proxy's own (the server failed), not the server's.
    proxy_error: bool,
    /// Answered by the proxy by design (a redirect), without a backend.
    intercepted: bool,
}

impl Log {
    fn start() -> Log {
        Log {
            started: Instant::now(),
            backend: None,
            server: None,
            status: 0,
            retries: 0,
            redispatched: false,
            stick: "-",
            proxy_error: false,
            intercepted: false,
        }
    }

    fn refused(status: Status) -> Log {
        Log {
            status: status as u16,
            ..Log::start()
        }
    }
}

/// One line per request, like HAProxy's httplog: client, frontend, backend/server, time,
/// status, retries, the stick decision, the request line.
fn access_log(
    shared: &Shared,
    frontend: usize,
    peer: SocketAddr,
    log: &Log,
    req: Option<&RequestHead>,
) {
    if let Some((b, s)) = log.server {
        let server = &shared.backends[b].servers[s];
        server.requests.fetch_add(1, Ordering::Relaxed);
        if (100..600).contains(&log.status) {
            server.responses[usize::from(log.status / 100) - 1].fetch_add(1, Ordering::Relaxed);
        }
        if log.proxy_error {
            server.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    let fc = &shared.frontends[frontend];
    fc.requests_total.fetch_add(1, Ordering::Relaxed);
    if log.backend.is_none() && !log.intercepted {
        fc.requests_denied.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(b) = log.backend {
        let be = &shared.backends[b];
        if log.server.is_none() && log.status == 503 {
            be.no_server.fetch_add(1, Ordering::Relaxed);
        }
        if log.redispatched {
            be.redispatched.fetch_add(1, Ordering::Relaxed);
        }
        be.retries
            .fetch_add(u64::from(log.retries), Ordering::Relaxed);
    }
    let backend = log
        .backend
        .map_or("-", |b| shared.backends[b].name.as_str());
    let server = log
        .server
        .map_or("-", |(b, s)| shared.backends[b].servers[s].name.as_str());
    tracing::info!(
        target: "proxyd::access",
        client = %peer,
        frontend = %shared.config.frontends[frontend].name,
        backend = %backend,
        server = %server,
        status = log.status,
        time_ms = log.started.elapsed().as_millis() as u64,
        retries = log.retries,
        redispatched = log.redispatched,
        stick = %log.stick,
        request = %RequestLine(req),
    );
}

/// The request line of the access log, formatted only when the log is on.
struct RequestLine<'a>(Option<&'a RequestHead>);

impl std::fmt::Display for RequestLine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(r) => write!(f, "{} {}", r.method(), r.target()),
            None => f.write_str("<BADREQ>"),
        }
    }
}

/// Decrements the in-flight count however the exchange ends (even when cancelled).
struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0
            .stats
            .requests_in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

fn scopeguard(shared: &Shared) -> InFlight<'_> {
    InFlight(shared)
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
        match client.fill(left).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Waits for the next complete request head; `Ok(None)` when the client is gone or stayed
/// idle past the keep-alive timeout.
async fn read_request_head<C: ClientStream>(
    shared: &Shared,
    client: &mut Io<C>,
    first: bool,
) -> Result<Option<RequestHead>, Status> {
    let d = &shared.config.defaults;
    let mut started: Option<Instant> = None;
    loop {
        if !client.buf.is_empty() {
            started.get_or_insert_with(Instant::now);
            match head::parse_request(&client.buf) {
                Ok(Some(h)) => {
                    client.buf.advance(h.len);
                    return Ok(Some(h));
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
        let timeout = match started {
            None if first => d.timeout_http_request,
            None => d.timeout_http_keep_alive,
            Some(t) => d.timeout_http_request.saturating_sub(t.elapsed()),
        };
        match client.fill(timeout).await {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                return match started {
                    None => Ok(None),
                    Some(_) => Err(Status::RequestTimeout),
                };
            }
            Err(_) => return Ok(None),
        }
    }
}

/// How the request body travels.
enum ReqBody {
    /// Read completely already (possibly empty): the request can be sent again.
    Buffered(bytes::Bytes),
    /// Streamed from the client while sending: one attempt, on a new connection.
    Streamed,
}

/// Answers a request on a bind that sends plain HTTP to https: a 301 to the same URL in https
/// (HAProxy's `redirect scheme https`).
async fn redirect_https<C: ClientStream>(
    shared: &Shared,
    client: &mut Io<C>,
    req: &RequestHead,
    to: RedirectHttps,
    log: &mut Log,
) -> Next {
    let Some(location) = redirect::https_location(req.host(), req.target(), to.port) else {
        return Next::Fail(Status::BadRequest);
    };
    log.status = 301;
    log.intercepted = true;
    // A body is not read but left behind with the connection.
    let close = !req.keep_alive || req.framing != Framing::Empty || shared.drain.is_cancelled();
    let answer = redirect::moved_permanently(&location, close, req.minor);
    if send(&mut client.stream, &answer).await.is_err() || close {
        return Next::Close;
    }
    Next::KeepAlive
}

async fn exchange<C: ClientStream>(
    shared: &Shared,
    info: ClientInfo,
    client: &mut Io<C>,
    req: &mut RequestHead,
    log: &mut Log,
) -> Next {
    let (frontend, peer) = (info.at.frontend, info.peer);
    let d = &shared.config.defaults;
    let b = shared.config.frontends[frontend].default_backend;
    let backend = &shared.backends[b];
    let bconf = &shared.config.backends[b];
    log.backend = Some(b);

    let has_body = !matches!(req.framing, Framing::Empty);
    if req.expect_continue && has_body {
        // The proxy takes the body itself, so it answers the expectation itself.
        if send(&mut client.stream, b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .is_err()
        {
            return Next::Close;
        }
    }
    let body = match req.framing {
        Framing::Empty => ReqBody::Buffered(bytes::Bytes::new()),
        Framing::Length(n) if n <= MAX_BUFFERED_BODY => {
            let n = n as usize;
            while client.buf.len() < n {
                match client.fill(d.timeout_client).await {
                    Ok(0) | Err(_) => return Next::Close,
                    Ok(_) => {}
                }
            }
            ReqBody::Buffered(client.buf.split_to(n).freeze())
        }
        _ => ReqBody::Streamed,
    };
    let client_ip = canonical_ip(peer.ip());
    if let Some(ff) = &bconf.forwardfor
        && !ff.except.is_some_and(|net| net.contains(client_ip))
    {
        req.add_field("X-Forwarded-For", &client_ip.to_string());
    }
    if bconf.forwardfor.is_some() {
        // The scheme is the bind's to say: a client's own claim is dropped, never forwarded.
        req.set_field("X-Forwarded-Proto", if info.tls { "https" } else { "http" });
    }

    // The stick rule: which key, and which server it is stuck to (from the local cache only).
    let stick = bconf
        .stick
        .as_ref()
        .zip(backend.stick_table)
        .zip(shared.stick.as_ref());
    let req = &*req;
    // Borrowed from the request head: a cookie key costs no allocation.
    let key: Option<(&crate::stick::StickCache, usize, Cow<'_, str>)> =
        stick.and_then(|((rule, t), cache)| {
            let key = match &rule.on {
                StickOn::Cookie(name) => req.cookie(name).map(Cow::Borrowed),
                StickOn::Src => cache.address_key(t, client_ip).map(Cow::Owned),
            };
            key.map(|k| (&**cache, t, k))
        });
    let stuck = key
        .as_ref()
        .and_then(|(cache, t, k)| cache.lookup_with(*t, k, |name| backend.server_index(name)))
        .flatten();
    let queue = d.timeout_queue;
    // Whether the key must be (re)stored once a server answers.
    let mut store_key = key.is_some() && stuck.is_none();
    let got = match stuck {
        Some(i) => match backend.acquire_on(i, queue).await {
            Err(NoServer::Unavailable) if bconf.redispatch => {
                log.redispatched = true;
                store_key = true;
                backend.acquire(client_ip, Some(i), queue).await
            }
            r => r,
        },
        None => backend.acquire(client_ip, None, queue).await,
    };
    log.stick = match (key.is_some(), stuck.is_some(), log.redispatched) {
        (false, _, _) => "-",
        (true, false, _) => "new",
        (true, true, false) => "hit",
        (true, true, true) => "moved",
    };
    let mut slot = match got {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(reason = ?e, "no server");
            return Next::Fail(Status::ServiceUnavailable);
        }
    };

    let mut attempt = 0;
    let (srv, resp) = loop {
        log.server = Some((b, slot.index));
        let server = slot.server();
        let span = tracing::debug_span!("request", server = %server.name, method = %req.method());
        let failure = match send_request(shared, server, client, req, &body)
            .instrument(span)
            .await
        {
            Ok(x) => break x,
            Err(Failure::Next(n)) => return n,
            Err(Failure::Attempt(f)) => f,
        };
        // RFC 9110 §9.2.2: a request the server may have received goes again only if it is
        // idempotent and still in hand; and nothing goes more than `retries` times again.
        let again = match failure.sent {
            // Nothing left, and nothing of a streamed body was read from the client yet.
            Sent::Nothing => true,
            Sent::Some => retriable(req, &body),
        };
        if !failure.stale {
            server.errors.fetch_add(1, Ordering::Relaxed);
        }
        if !again || attempt >= bconf.retries {
            return Next::Fail(failure.status);
        }
        attempt += 1;
        log.retries = attempt;
        if failure.stale {
            // The server closed an idle connection as it was reused: it is not failing, so
            // the request stays with it, on another connection.
            continue;
        }
        // HAProxy's `option redispatch`: the last retry goes to another server; a server
        // known down is left at once.
        let last = attempt == bconf.retries;
        if bconf.redispatch && (last || !slot.server().takes_stuck()) {
            let prev = slot.index;
            drop(slot);
            slot = match backend.acquire(client_ip, Some(prev), queue).await {
                Ok(s) => s,
                Err(_) => return Next::Fail(Status::ServiceUnavailable),
            };
            if slot.index != prev {
                log.redispatched = true;
                store_key = key.is_some();
                if log.stick == "hit" {
                    log.stick = "moved";
                }
            }
        }
    };
    log.status = resp.status;
    let server = slot.server();
    if let Some((cache, t, k)) = &key
        && store_key
    {
        cache.store(*t, k, &server.name);
    }
    if let Some(((rule, t), cache)) = stick
        && let Some(name) = &rule.store_response
        && let Some(value) = resp.set_cookie(name)
    {
        cache.store(t, value, &server.name);
    }
    forward_response(shared, server, client, req, srv, resp).await
}

/// The client's address as one protocol family: an IPv4-mapped IPv6 address becomes IPv4.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Streams the response to the client once its head is read.
async fn forward_response<C: ClientStream>(
    shared: &Shared,
    server: &ServerRt,
    client: &mut Io<C>,
    req: &RequestHead,
    mut srv: Io<TcpStream>,
    resp: ResponseHead,
) -> Next {
    let close =
        !req.keep_alive || shared.drain.is_cancelled() || resp.framing == Framing::UntilClose;
    srv.buf.advance(resp.len);
    let (framing, keep_alive) = (resp.framing, resp.keep_alive);
    let mut out = resp.into_downstream(close, req.minor);
    let timeout = shared.config.defaults.timeout_server;
    if let Err(e) = body::forward(&mut srv, &mut client.stream, framing, &mut out, timeout).await {
        // The head is on its way to the client: the only honest signal left is to close.
        tracing::debug!(error = %e, "response body aborted");
        return Next::Close;
    }
    if keep_alive && srv.buf.is_empty() {
        server.pool.put(srv);
    }
    // The client learned about the close from the response, which is now complete.
    if close { Next::Close } else { Next::KeepAlive }
}

/// Whether a request that may have reached the server can be sent again: its method is
/// idempotent (RFC 9110 §9.2.2) and its body is still in hand.
fn retriable(req: &RequestHead, body: &ReqBody) -> bool {
    matches!(body, ReqBody::Buffered(_))
        && matches!(
            req.method(),
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        )
}

/// How much of a request reached the server before an attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sent {
    /// Not one byte: no connection, or the first write was refused.
    Nothing,
    /// Some or all of it: the server may have acted on it.
    Some,
}

/// One attempt at a server that failed without an answer.
#[derive(Debug)]
struct AttemptFailed {
    /// The answer to the client if the request does not go again.
    status: Status,
    sent: Sent,
    /// The connection was an idle one from the pool, which the server may close at any
    /// moment: no sign that the server is failing.
    stale: bool,
}

/// Why a request could not be sent.
enum Failure {
    /// The server did not answer: the request may go again (see [`Sent`]).
    Attempt(AttemptFailed),
    /// Anything else: what to do with the client connection.
    Next(Next),
}

/// Sends the request to `server` once, on a pooled connection if its body is in hand, and
/// reads the response head.
async fn send_request<C: ClientStream>(
    shared: &Shared,
    server: &ServerRt,
    client: &mut Io<C>,
    req: &RequestHead,
    body: &ReqBody,
) -> Result<(Io<TcpStream>, ResponseHead), Failure> {
    let d = &shared.config.defaults;
    let pooled = match body {
        ReqBody::Buffered(_) => server.pool.take(),
        ReqBody::Streamed => None,
    };
    let stale = pooled.is_some();
    let mut srv = match pooled {
        Some(s) => s,
        None => Io::new(connect(shared, server).await?),
    };
    let fail = |status, sent| {
        Failure::Attempt(AttemptFailed {
            status,
            sent,
            stale,
        })
    };
    let sent = match body {
        // The usual request: its head goes out as it is, without a copy.
        ReqBody::Buffered(b) if b.is_empty() => {
            send_all(&mut srv.stream, &req.upstream, d.timeout_server).await
        }
        ReqBody::Buffered(b) => {
            let mut out = Vec::with_capacity(req.upstream.len() + b.len());
            out.extend_from_slice(&req.upstream);
            out.extend_from_slice(b);
            send_all(&mut srv.stream, &out, d.timeout_server).await
        }
        ReqBody::Streamed => {
            let mut out = Vec::with_capacity(req.upstream.len() + 1024);
            out.extend_from_slice(&req.upstream);
            body::forward(
                client,
                &mut srv.stream,
                req.framing,
                &mut out,
                d.timeout_client,
            )
            .await
            .map_err(|e| (e, Sent::Some))
        }
    };
    match sent {
        Ok(()) => {}
        Err((BodyError::Write(e), sent)) => {
            if !stale {
                tracing::warn!(error = %e, "sending the request to the server failed");
            }
            return Err(fail(Status::BadGateway, sent));
        }
        Err((BodyError::Read(e), _)) => {
            tracing::debug!(error = %e, "client stopped sending its body");
            return Err(Failure::Next(Next::Close));
        }
        Err((BodyError::Framing(why), _)) => {
            tracing::debug!(reason = why, "bad request body");
            return Err(Failure::Next(Next::Fail(Status::BadRequest)));
        }
    }
    match read_response_head(shared, &mut srv, client, req).await {
        Ok(resp) => Ok((srv, resp)),
        Err(HeadRead::ClosedBeforeAnswer) => {
            if stale {
                tracing::debug!("reused server connection was closed before answering");
            } else {
                tracing::warn!("server closed the connection without answering");
            }
            Err(fail(Status::BadGateway, Sent::Some))
        }
        Err(HeadRead::Timeout) => Err(Failure::Next(Next::Fail(Status::GatewayTimeout))),
        Err(HeadRead::Bad(why)) => {
            tracing::warn!(reason = why, "bad response from the server");
            Err(Failure::Next(Next::Fail(Status::BadGateway)))
        }
        Err(HeadRead::ClientGone) => Err(Failure::Next(Next::Close)),
    }
}

/// Writes all of `bytes` within `timeout`; a failure says whether any byte was accepted, since
/// a request of which not one byte left may go again whatever its method.
async fn send_all(
    stream: &mut TcpStream,
    bytes: &[u8],
    timeout: Duration,
) -> Result<(), (BodyError, Sent)> {
    let mut written = 0;
    let result = tokio::time::timeout(timeout, async {
        while written < bytes.len() {
            match stream.write(&bytes[written..]).await {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
    result.map_err(|e| {
        let sent = if written == 0 {
            Sent::Nothing
        } else {
            Sent::Some
        };
        (BodyError::Write(e), sent)
    })
}

async fn connect(shared: &Shared, server: &ServerRt) -> Result<TcpStream, Failure> {
    pool::connect(server.address, shared.config.defaults.timeout_connect)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, address = %server.address, "cannot connect to the server");
            // HAProxy's answer when no connection could be made (refused or timed out, after
            // the retries and redispatch): 503. 502 and 504 are for a server that took the
            // request and answered badly or not in time.
            Failure::Attempt(AttemptFailed {
                status: Status::ServiceUnavailable,
                sent: Sent::Nothing,
                stale: false,
            })
        })
}

enum HeadRead {
    ClosedBeforeAnswer,
    Timeout,
    Bad(&'static str),
    ClientGone,
}

/// Reads the final response head, passing informational (1xx) responses to the client.
async fn read_response_head<C: ClientStream>(
    shared: &Shared,
    srv: &mut Io<TcpStream>,
    client: &mut Io<C>,
    req: &RequestHead,
) -> Result<ResponseHead, HeadRead> {
    // One deadline for the whole head: a server sending it a byte at a time must not hold
    // the request past `timeout_server`.
    let deadline = Instant::now() + shared.config.defaults.timeout_server;
    let mut got_any = false;
    loop {
        if !srv.buf.is_empty() {
            got_any = true;
            match head::parse_response(&srv.buf, req.is_head()) {
                Ok(Some(resp)) if resp.is_informational() => {
                    let bytes = resp.downstream(false, 1);
                    srv.buf.advance(resp.len);
                    // 100 Continue was answered by the proxy already; others go to 1.1 clients.
                    if resp.status != 100
                        && req.minor == 1
                        && send(&mut client.stream, &bytes).await.is_err()
                    {
                        return Err(HeadRead::ClientGone);
                    }
                    continue;
                }
                Ok(Some(resp)) => return Ok(resp),
                Ok(None) => {}
                Err(HeadError::TooLarge) => return Err(HeadRead::Bad("response head too large")),
                Err(HeadError::Malformed(why) | HeadError::Unsupported(why)) => {
                    return Err(HeadRead::Bad(why));
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HeadRead::Timeout);
        }
        match srv.fill(left).await {
            Ok(0) if !got_any => return Err(HeadRead::ClosedBeforeAnswer),
            Ok(0) => return Err(HeadRead::Bad("truncated response head")),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Err(HeadRead::Timeout),
            Err(_) if !got_any => return Err(HeadRead::ClosedBeforeAnswer),
            Err(_) => return Err(HeadRead::Bad("connection reset mid-head")),
        }
    }
}
