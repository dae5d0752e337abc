//! One request's way to a server, whatever protocol the client speaks: the stick rule, the
//! balance, the retries its method and body allow, and the response head to forward.

use std::borrow::Cow;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Buf;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::Instrument;

use super::body::{self, BodyError};
use super::head::{self, Framing, HeadError, RequestHead, ResponseHead};
use super::log::Log;
use super::persist;
use crate::balance::{self, Request};
use crate::config::{Balance, StickOn};
use crate::net::{ClientInfo, Io};
use crate::shared::{NoServer, ServerRt, Shared, Slot};

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
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The body of the proxy's own answer.
    pub fn text(self) -> &'static str {
        match self {
            Status::BadRequest => "400 bad request\n",
            Status::RequestTimeout => "408 request timeout\n",
            Status::HeadersTooLarge => "431 headers too large\n",
            Status::NotImplemented => "501 not implemented\n",
            Status::BadGateway => "502 bad gateway\n",
            Status::ServiceUnavailable => "503 service unavailable\n",
            Status::GatewayTimeout => "504 gateway timeout\n",
        }
    }

    /// The whole HTTP/1.1 answer, which closes the connection.
    pub fn response(self) -> &'static [u8] {
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

/// The client side of one exchange, as this module sees it: where the request body comes from,
/// and what the client is told before the final response. HTTP/1.1 and HTTP/2 each have one.
pub trait Downstream {
    /// The request body's bytes, framed as the request head says.
    type Body: AsyncRead + Unpin;

    fn body(&mut self) -> &mut Io<Self::Body>;

    /// Asks the client for its body (the answer to `Expect: 100-continue`).
    fn go_on(&mut self) -> impl Future<Output = io::Result<()>>;

    /// Passes on an interim (1xx) response from the server, or not, as the protocol allows.
    fn informational(
        &mut self,
        resp: &ResponseHead,
        req: &RequestHead,
    ) -> impl Future<Output = io::Result<()>>;
}

/// Why an exchange ended without a server response to forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unanswered {
    /// The client is gone or broke off its body: nothing more can be said to it.
    ClientGone,
    /// The proxy answers with this status itself.
    Fail(Status),
}

/// A server's response head, with the connection its body comes on and the server's slot,
/// which counts the request against the server until the body is forwarded.
pub struct Answer<'s> {
    pub slot: Slot<'s>,
    pub srv: Io<TcpStream>,
    pub resp: ResponseHead,
}

/// How the request body travels.
enum ReqBody {
    /// Read completely already (possibly empty): the request can be sent again.
    Buffered(bytes::Bytes),
    /// Streamed from the client while sending: one attempt, on a new connection.
    Streamed,
}

/// Passes one request to a server of backend `b` (the frontend's rules chose it, see
/// `http::route`), by that backend's stick rule and balance, with the retries its method and
/// body allow, and returns the response head to forward.
pub async fn exchange<'s, D: Downstream>(
    shared: &'s Shared,
    info: ClientInfo,
    client: &mut D,
    req: &mut RequestHead,
    b: usize,
    log: &mut Log,
) -> Result<Answer<'s>, Unanswered> {
    let peer = info.peer;
    let d = &shared.config.defaults;
    let backend = &shared.backends[b];
    let bconf = &shared.config.backends[b];
    log.backend = Some(b);

    let has_body = !matches!(req.framing, Framing::Empty);
    if req.expect_continue && has_body {
        // The proxy takes the body itself, so it answers the expectation itself.
        if client.go_on().await.is_err() {
            return Err(Unanswered::ClientGone);
        }
    }
    let body = match req.framing {
        Framing::Empty => ReqBody::Buffered(bytes::Bytes::new()),
        Framing::Length(n) if n <= MAX_BUFFERED_BODY => {
            let n = n as usize;
            let body = client.body();
            while body.buf.len() < n {
                match body.fill(d.timeout_client).await {
                    Ok(0) | Err(_) => return Err(Unanswered::ClientGone),
                    Ok(_) => {}
                }
            }
            ReqBody::Buffered(body.buf.split_to(n).freeze())
        }
        _ => ReqBody::Streamed,
    };
    let client_ip = canonical_ip(peer.ip());
    if let Some(ff) = &bconf.forwardfor
        && !ff.except.is_some_and(|net| net.contains(client_ip))
    {
        req.add_field("X-Forwarded-For", &client_ip.to_string());
    }
    let proto = if info.tls { "https" } else { "http" };
    if bconf.forwardfor.is_some() {
        // The scheme is the bind's to say: a client's own claim is dropped, never forwarded.
        req.set_field("X-Forwarded-Proto", proto);
    }
    if bconf.forwarded {
        // Replaces the client's own: what a server reads there is what this proxy saw.
        let value = forwarded(client_ip, proto, req.host());
        req.set_field("Forwarded", &value);
    }

    // The persistence cookie: the server it names, if it is known and usable; read before
    // `indirect` takes it out of what the server will see.
    let named = bconf.cookie.as_ref().and_then(|c| {
        let i = backend.cookie_index(req.cookie(&c.name)?)?;
        backend.servers[i].takes_stuck().then_some(i)
    });
    if let Some(c) = &bconf.cookie
        && c.indirect
    {
        req.remove_cookie(&c.name);
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
    let pick = Request {
        client: client_ip,
        key: hash_key(&bconf.balance, req),
    };
    // Whether the key must be (re)stored once a server answers.
    let mut store_key = key.is_some() && stuck.is_none();
    let got = match (named, stuck) {
        // A valid cookie wins over the stick table (HAProxy's order); its server going down
        // meanwhile sends the request elsewhere, and the response sets the cookie anew.
        (Some(i), _) => match backend.acquire_on(i, queue).await {
            Err(NoServer::Unavailable) => backend.acquire(pick, Some(i), queue).await,
            r => r,
        },
        (None, Some(i)) => match backend.acquire_on(i, queue).await {
            Err(NoServer::Unavailable) if bconf.redispatch => {
                log.redispatched = true;
                store_key = true;
                backend.acquire(pick, Some(i), queue).await
            }
            r => r,
        },
        (None, None) => backend.acquire(pick, None, queue).await,
    };
    log.stick = match (key.is_some(), stuck.is_some(), log.redispatched) {
        (false, _, _) => "-",
        (true, false, _) => "new",
        (true, true, false) => "hit",
        (true, true, true) => "moved",
    };
    let mut slot = match got {
        Ok(s) => {
            log.slot_at = Some(Instant::now());
            s
        }
        Err(e) => {
            tracing::debug!(reason = ?e, "no server");
            return Err(Unanswered::Fail(Status::ServiceUnavailable));
        }
    };

    let mut attempt = 0;
    let (srv, mut resp) = loop {
        log.server = Some((b, slot.index));
        let server = slot.server();
        let span = tracing::debug_span!("request", server = %server.name, method = %req.method());
        let failure = match send_request(shared, server, client, req, &body, log)
            .instrument(span)
            .await
        {
            Ok(x) => {
                log.answered_at = Some(Instant::now());
                break x;
            }
            Err(Failure::Stop(u)) => return Err(u),
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
            return Err(Unanswered::Fail(failure.status));
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
            slot = match backend.acquire(pick, Some(prev), queue).await {
                Ok(s) => s,
                Err(_) => return Err(Unanswered::Fail(Status::ServiceUnavailable)),
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
    if let Some(c) = &bconf.cookie {
        persist::on_response(c, named, slot.index, &server.config.cookie, &mut resp);
    }
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
    Ok(Answer { slot, srv, resp })
}

/// The bytes a hashing balance hashes for this request; none for the other algorithms, and
/// for `hdr` when the request has no such field (the balancer then goes round robin).
fn hash_key<'r>(balance: &'r Balance, req: &'r RequestHead) -> Option<&'r [u8]> {
    match balance {
        Balance::Uri(how) => Some(balance::uri_key(req.target(), *how).as_bytes()),
        Balance::Hdr(name) => req.field(name).map(str::as_bytes),
        _ => None,
    }
}

/// A `Forwarded` element (RFC 7239 §4): an IPv6 node is quoted in brackets, and the host
/// (checked by the parser: no quote or backslash) is a quoted string.
fn forwarded(client: IpAddr, proto: &str, host: Option<&str>) -> String {
    let mut v = match client {
        IpAddr::V4(a) => format!("for={a};proto={proto}"),
        IpAddr::V6(a) => format!("for=\"[{a}]\";proto={proto}"),
    };
    if let Some(h) = host {
        v.push_str(";host=\"");
        v.push_str(h);
        v.push('"');
    }
    v
}

/// The client's address as one protocol family: an IPv4-mapped IPv6 address becomes IPv4.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
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
    /// Anything else: the exchange ends here.
    Stop(Unanswered),
}

/// Sends the request to `server` once, on a pooled connection if its body is in hand, and
/// reads the response head.
async fn send_request<D: Downstream>(
    shared: &Shared,
    server: &ServerRt,
    client: &mut D,
    req: &RequestHead,
    body: &ReqBody,
    log: &mut Log,
) -> Result<(Io<TcpStream>, ResponseHead), Failure> {
    let d = &shared.config.defaults;
    let pooled = match body {
        ReqBody::Buffered(_) => server.pool().take(),
        ReqBody::Streamed => None,
    };
    let stale = pooled.is_some();
    let mut srv = match pooled {
        Some(s) => s,
        None => Io::new(connect(shared, server).await?),
    };
    log.connected_at = Some(Instant::now());
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
                client.body(),
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
            return Err(Failure::Stop(Unanswered::ClientGone));
        }
        Err((BodyError::Framing(why), _)) => {
            tracing::debug!(reason = why, "bad request body");
            return Err(Failure::Stop(Unanswered::Fail(Status::BadRequest)));
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
        Err(HeadRead::Timeout) => Err(Failure::Stop(Unanswered::Fail(Status::GatewayTimeout))),
        Err(HeadRead::Bad(why)) => {
            tracing::warn!(reason = why, "bad response from the server");
            Err(Failure::Stop(Unanswered::Fail(Status::BadGateway)))
        }
        Err(HeadRead::ClientGone) => Err(Failure::Stop(Unanswered::ClientGone)),
    }
}

/// Writes all of `bytes` within `timeout`; a failure says whether any byte was accepted, since
/// a request of which not one byte left may go again whatever its method.
async fn send_all(
    stream: &mut TcpStream,
    bytes: &[u8],
    timeout: Duration,
) -> Result<(), (BodyError, Sent)> {
    // Usually all of it goes at once: then without a timer, which costs a clock read and
    // a look-up of the runtime's handle.
    let mut written = match stream.try_write(bytes) {
        Ok(n) if n == bytes.len() => return Ok(()),
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err((BodyError::Write(e), Sent::Nothing)),
    };
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
    server
        .connect(shared.config.defaults.timeout_connect)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, address = %server.config.address, "cannot connect to the server");
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
async fn read_response_head<D: Downstream>(
    shared: &Shared,
    srv: &mut Io<TcpStream>,
    client: &mut D,
    req: &RequestHead,
) -> Result<ResponseHead, HeadRead> {
    // One deadline for the whole head: a server sending it a byte at a time must not hold
    // the request past `timeout_server`.
    let deadline = Instant::now() + shared.config.defaults.timeout_server;
    let mut got_any = false;
    loop {
        if !srv.buf.is_empty() {
            got_any = true;
            match head::parse_response_to(&srv.buf, req) {
                Ok(Some(resp)) if resp.is_informational() => {
                    srv.buf.advance(resp.len);
                    if client.informational(&resp, req).await.is_err() {
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
