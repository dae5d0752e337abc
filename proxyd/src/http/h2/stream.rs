//! One HTTP/2 stream: its request checked by the HTTP/1.1 parser (one set of rules for both),
//! passed on through the same exchange as an HTTP/1.1 request, and its response sent back.

use std::future::poll_fn;
use std::io;
use std::sync::Mutex;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};

use super::io::{self as body_io, RecvBody, SendBody};
use crate::http::body;
use crate::http::exchange::{Answer, Downstream, Status, Unanswered, exchange};
use crate::http::head::{self, Framing, HeadError, RequestHead, ResponseHead};
use crate::http::log::{self, Log, Side};
use crate::http::redirect;
use crate::http::route;
use crate::net::{ClientInfo, Io};
use crate::rules::{Decision, HeaderEdit};
use crate::shared::Shared;

/// How a stream ended, as its connection counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Done,
    /// The client reset it before its response was complete.
    ResetByClient,
}

/// A stream's response handle, and whether the final response head went out.
struct Respond {
    handle: SendResponse<Bytes>,
    answered: bool,
}

impl Respond {
    fn send_response(
        &mut self,
        resp: Response<()>,
        end_of_stream: bool,
    ) -> Result<SendStream<Bytes>, h2::Error> {
        self.answered = true;
        self.handle.send_response(resp, end_of_stream)
    }

    /// Ready when the client resets the stream before the response head; after it, the body's
    /// writes see a reset themselves (and the handle stops reporting one).
    fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.answered {
            return Poll::Pending;
        }
        self.handle.poll_reset(cx).map(|_| ())
    }
}

/// The client side of a stream's exchange. The response handle sits behind a lock because
/// the stream also watches it for a reset while the exchange runs (a lock, not a `RefCell`,
/// for the connection's future to be `Send`); both only take it for a moment, never across a
/// wait.
struct Client<'a> {
    body: Io<RecvBody>,
    respond: &'a Mutex<Respond>,
}

impl Client<'_> {
    fn interim(&self, status: u16, resp: Option<&ResponseHead>) -> io::Result<()> {
        let mut interim = Response::new(());
        *interim.status_mut() = StatusCode::from_u16(status).map_err(io::Error::other)?;
        if let Some(resp) = resp {
            // An interim response with a field HTTP/2 cannot carry is not worth failing for.
            let _ = copy_fields(resp, interim.headers_mut());
        }
        lock(self.respond)
            .handle
            .send_informational(interim)
            .map_err(io::Error::other)
    }
}

impl Downstream for Client<'_> {
    type Body = RecvBody;

    fn body(&mut self) -> &mut Io<RecvBody> {
        &mut self.body
    }

    async fn go_on(&mut self) -> io::Result<()> {
        self.interim(100, None)
    }

    async fn informational(&mut self, resp: &ResponseHead, _: &RequestHead) -> io::Result<()> {
        // 100 Continue was answered by the proxy already.
        if resp.status == 100 {
            return Ok(());
        }
        self.interim(resp.status, Some(resp))
    }
}

fn lock(m: &Mutex<Respond>) -> std::sync::MutexGuard<'_, Respond> {
    // Nothing panics while holding it; if something did, the handle is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A stream the connection accepted, its request head checked; [`Stream::serve`] serves it.
pub struct Stream {
    head: Result<RequestHead, Status>,
    recv: RecvStream,
    respond: SendResponse<Bytes>,
}

impl Stream {
    /// Checks the request's head, written as HTTP/1.1 into `scratch` (the connection's buffer
    /// for it, so that no stream allocates its own).
    pub fn new(
        req: Request<RecvStream>,
        respond: SendResponse<Bytes>,
        scratch: &mut Vec<u8>,
    ) -> Stream {
        let (parts, recv) = req.into_parts();
        let head = request_head(&parts, recv.is_end_stream(), scratch);
        Stream {
            head,
            recv,
            respond,
        }
    }

    /// Serves the stream to its end; a reset by the client cancels the exchange at once (its
    /// server slot and connection are given up), which is what a rapid-reset flood relies on
    /// us not doing.
    pub async fn serve(self, shared: &Shared, info: ClientInfo) -> End {
        let _in_flight = log::in_flight(shared);
        let frontend = info.at.frontend;
        let mut log = Log::start("HTTP/2");
        let respond = Mutex::new(Respond {
            handle: self.respond,
            answered: false,
        });
        let mut head = match self.head {
            Ok(h) => h,
            Err(status) => {
                tracing::debug!(status = status.code(), "refusing request");
                let rules = &shared.config.frontends[frontend].rules;
                respond_status(&respond, status, &route::always(rules));
                log::access_log(shared, frontend, info.peer, &Log::refused(status), None);
                return End::Done;
            }
        };
        let framing = match head.framing {
            Framing::Chunked => body_io::Framing::Chunked,
            _ => body_io::Framing::Plain,
        };
        let client = Client {
            body: Io {
                stream: RecvBody::new(self.recv, framing),
                // Most requests have no body: no buffer until one is read.
                buf: bytes::BytesMut::new(),
            },
            respond: &respond,
        };
        let work = answer(shared, info, client, &mut head, &mut log);
        let reset = poll_fn(|cx| lock(&respond).poll_reset(cx));
        let end = tokio::select! {
            end = work => end,
            _ = reset => End::ResetByClient,
        };
        if end == End::ResetByClient {
            log.status = 0;
        }
        log::access_log(shared, frontend, info.peer, &log, Some(&head));
        end
    }
}

/// Answers the request: a redirect on a bind that sends plain HTTP to https, else the server's
/// response, or the proxy's own error.
async fn answer(
    shared: &Shared,
    info: ClientInfo,
    mut client: Client<'_>,
    head: &mut RequestHead,
    log: &mut Log,
) -> End {
    let respond = client.respond;
    let fe = &shared.config.frontends[info.at.frontend];
    let routed = route::route(&fe.rules, info, head);
    let edits = &routed.response;
    if let Some(to) = shared.config.bind(info.at).redirect_https {
        log.intercepted = true;
        let Some(location) = redirect::https_location(head.host(), head.target(), to.port) else {
            log.status = Status::BadRequest.code();
            respond_status(respond, Status::BadRequest, edits);
            return End::Done;
        };
        log.status = 301;
        let local = route::Local {
            status: 301,
            location: Some(location),
            content_type: None,
            body: "",
            denied: false,
        };
        respond_local(respond, &local, head.is_head(), edits);
        return End::Done;
    }
    let backend = match route::local(routed.decision, head, info) {
        Some(Ok(local)) => {
            log.status = local.status;
            log.intercepted = !local.denied;
            respond_local(respond, &local, head.is_head(), edits);
            return End::Done;
        }
        Some(Err(status)) => {
            log.status = status.code();
            respond_status(respond, status, edits);
            return End::Done;
        }
        None => match routed.decision {
            Decision::Backend(b) => b,
            _ => fe.default_backend,
        },
    };
    match exchange(shared, info, &mut client, head, backend, log).await {
        Ok(answer) => forward_response(shared, respond, head, answer, log, edits).await,
        Err(Unanswered::ClientGone) => {
            lock(respond).handle.send_reset(Reason::CANCEL);
            End::Done
        }
        Err(Unanswered::Fail(status)) => {
            tracing::debug!(status = status.code(), "answering with an error");
            log.status = status.code();
            log.proxy_error = true;
            log.bytes = status.text().len() as u64;
            respond_status(respond, status, edits);
            End::Done
        }
    }
}

/// The proxy's own answer, with the same text as over HTTP/1.1.
fn respond_status(respond: &Mutex<Respond>, status: Status, edits: &[&HeaderEdit]) {
    let local = route::Local {
        status: status.code(),
        location: None,
        content_type: Some("text/plain"),
        body: status.text(),
        denied: false,
    };
    respond_local(respond, &local, false, edits);
}

/// An answer of the proxy's own (an error, or a rule's redirect, deny or return).
fn respond_local(
    respond: &Mutex<Respond>,
    local: &route::Local<'_>,
    is_head: bool,
    edits: &[&HeaderEdit],
) {
    let mut resp = Response::new(());
    *resp.status_mut() = StatusCode::from_u16(local.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let h = resp.headers_mut();
    if let Some(l) = local
        .location
        .as_deref()
        .and_then(|l| HeaderValue::from_str(l).ok())
    {
        h.insert(http::header::LOCATION, l);
    }
    if let Some(t) = local
        .content_type
        .and_then(|t| HeaderValue::from_str(t).ok())
    {
        h.insert(http::header::CONTENT_TYPE, t);
    }
    h.insert(
        http::header::CONTENT_LENGTH,
        HeaderValue::from(local.body.len()),
    );
    route::edit_map(h, edits);
    let empty = local.body.is_empty() || is_head;
    let mut r = lock(respond);
    if let Ok(mut send) = r.send_response(resp, empty)
        && !empty
    {
        let body = Bytes::copy_from_slice(local.body.as_bytes());
        let _ = send.send_data(body, true);
    }
}

/// Sends the server's response head and streams its body as DATA frames; the server
/// connection goes back to the pool once the body is complete.
async fn forward_response(
    shared: &Shared,
    respond: &Mutex<Respond>,
    req: &RequestHead,
    answer: Answer<'_>,
    log: &mut Log,
    edits: &[&HeaderEdit],
) -> End {
    let Answer {
        slot,
        mut srv,
        resp,
    } = answer;
    let mut out = Response::new(());
    // No HTTP/2 request asks to switch (h2 refuses `Upgrade`): a 101 here is the server's error.
    let status = StatusCode::from_u16(resp.status)
        .ok()
        .filter(|_| !resp.is_switch());
    let copied = copy_fields(&resp, out.headers_mut());
    let (Some(status), Ok(())) = (status, copied) else {
        tracing::warn!(
            status = resp.status,
            "a response HTTP/2 cannot carry from the server"
        );
        log.status = Status::BadGateway.code();
        log.proxy_error = true;
        respond_status(respond, Status::BadGateway, edits);
        return End::Done;
    };
    *out.status_mut() = status;
    route::edit_map(out.headers_mut(), edits);
    use bytes::Buf as _;
    srv.buf.advance(resp.len);
    let empty = resp.framing == Framing::Empty || req.is_head();
    let whole = whole_body(resp.framing, &srv.buf).filter(|_| !empty);
    let send = {
        let mut r = lock(respond);
        let mut send = match r.send_response(out, empty) {
            Ok(s) => s,
            // The stream is gone (reset): the connection to the server is left unfinished.
            Err(_) => return End::ResetByClient,
        };
        if let Some(n) = whole {
            // Sent without waiting for the client's window: h2 holds it until the window
            // opens, which `SMALL_BODY` bounds.
            let body = Bytes::copy_from_slice(&srv.buf[..n]);
            srv.buf.advance(n);
            if send.send_data(body, true).is_err() {
                return End::ResetByClient;
            }
            log.bytes = n as u64;
        }
        send
    };
    if !empty && whole.is_none() {
        let mut sink = SendBody::new(send);
        let timeout = shared.config.defaults.timeout_server;
        match body::forward_payload(&mut srv, &mut sink, resp.framing, timeout).await {
            Ok(sent) => log.bytes = sent,
            Err(e) => {
                tracing::debug!(error = %e, "response body aborted");
                log.aborted = Some(Side::of(&e));
                sink.abort();
                return End::Done;
            }
        }
        if sink.finish().is_err() {
            return End::ResetByClient;
        }
    }
    if resp.keep_alive && srv.buf.is_empty() {
        slot.server().release(srv);
    }
    End::Done
}

/// Largest body sent in one piece with its head when the server's read brought all of it: one
/// DATA frame that ends the stream, instead of a copy through the body forwarder and an empty
/// frame to end it.
const SMALL_BODY: usize = 16 * 1024;

/// The length of a body that is small and already read whole, if it is.
fn whole_body(framing: Framing, buf: &[u8]) -> Option<usize> {
    match framing {
        Framing::Length(n) => usize::try_from(n)
            .ok()
            .filter(|&n| n <= SMALL_BODY && n <= buf.len()),
        _ => None,
    }
}

/// The response's end-to-end fields as HTTP/2 fields. A transfer coding other than chunked
/// cannot be undone here, so such a response is refused rather than passed on garbled.
///
/// In one pass over the fields, the values copied into one buffer that they all share (an
/// allocation per value showed in the profile of small responses); the head's length bounds
/// what they need unless a field was added since (a persistence cookie), which then takes a
/// second buffer.
fn copy_fields(resp: &ResponseHead, to: &mut http::HeaderMap) -> Result<(), &'static str> {
    let mut values = bytes::BytesMut::with_capacity(resp.len);
    for (name, value) in resp.fields() {
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if !value.eq_ignore_ascii_case(b"chunked") {
                return Err("transfer coding");
            }
            continue;
        }
        values.extend_from_slice(value);
        let value = values.split().freeze();
        let name = HeaderName::from_bytes(name).map_err(|_| "field name")?;
        let value = HeaderValue::from_maybe_shared(value).map_err(|_| "field value")?;
        to.append(name, value);
    }
    Ok(())
}

/// Most of the head buffer a connection keeps between requests: a common head fits.
const SCRATCH_KEPT: usize = 4096;

/// The request as an HTTP/1.1 head, checked by the same parser as a request that came as
/// one: `:authority` becomes `Host`, cookies are joined into one field (RFC 9113 §8.2.3), and
/// a body of unknown length goes to the server chunked.
fn request_head(
    parts: &http::request::Parts,
    end_stream: bool,
    text: &mut Vec<u8>,
) -> Result<RequestHead, Status> {
    text.clear();
    text.extend_from_slice(parts.method.as_str().as_bytes());
    text.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    text.extend_from_slice(target.as_bytes());
    text.extend_from_slice(b" HTTP/1.1\r\n");
    let authority = parts.uri.authority().map(|a| a.as_str());
    if let Some(a) = authority {
        text.extend_from_slice(b"host: ");
        text.extend_from_slice(a.as_bytes());
        text.extend_from_slice(b"\r\n");
    }
    let mut length = false;
    for (name, value) in &parts.headers {
        if name == http::header::HOST {
            // RFC 9113 §8.3.1: `:authority` wins; a `Host` naming another is an attack on
            // whoever believes it.
            if let Some(a) = authority {
                if !value.as_bytes().eq_ignore_ascii_case(a.as_bytes()) {
                    return Err(Status::BadRequest);
                }
                continue;
            }
        } else if name == http::header::COOKIE {
            continue;
        } else if name == http::header::CONTENT_LENGTH {
            length = true;
        }
        text.extend_from_slice(name.as_str().as_bytes());
        text.extend_from_slice(b": ");
        text.extend_from_slice(value.as_bytes());
        text.extend_from_slice(b"\r\n");
    }
    let mut cookies = parts
        .headers
        .get_all(http::header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .filter(|c| !c.is_empty());
    if let Some(first) = cookies.next() {
        text.extend_from_slice(b"cookie: ");
        text.extend_from_slice(first);
        for c in cookies {
            text.extend_from_slice(b"; ");
            text.extend_from_slice(c);
        }
        text.extend_from_slice(b"\r\n");
    }
    if !length && !end_stream {
        text.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    text.extend_from_slice(b"\r\n");
    let parsed = head::parse_request(text);
    if text.capacity() > SCRATCH_KEPT {
        // One large head must not leave its size with the connection for good.
        *text = Vec::new();
    }
    match parsed {
        Ok(Some(h)) => Ok(h),
        // The head is complete by construction.
        Ok(None) => Err(Status::BadRequest),
        Err(HeadError::TooLarge) => Err(Status::HeadersTooLarge),
        Err(HeadError::Malformed(why)) => {
            tracing::debug!(reason = why, "malformed request");
            Err(Status::BadRequest)
        }
        Err(HeadError::Unsupported(why)) => {
            tracing::debug!(reason = why, "unsupported request");
            Err(Status::NotImplemented)
        }
    }
}
