//! The access log line of one request, whatever protocol carried it, and the counters it feeds.
//!
//! The line is formatted on the request path into a buffer and handed to the worker's
//! [`LogSink`](crate::log_sink::LogSink), which writes it off the event loop.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use super::body::BodyError;
use super::exchange::Status;
use super::head::RequestHead;
use crate::config::access_log::LogFormat;
use crate::log_sink::{Rfc3339, Utc};
use crate::shared::Shared;

/// What the access log line says about one request.
pub struct Log {
    /// When the request head was complete.
    pub started: Instant,
    /// The same moment on the wall clock: the line's date.
    pub date: SystemTime,
    /// From the request's first byte to the end of its head (HAProxy's Tq).
    pub head_time: Duration,
    /// The protocol the client spoke (`HTTP/1.1`, `HTTP/2`).
    pub protocol: &'static str,
    pub backend: Option<usize>,
    pub server: Option<(usize, usize)>,
    /// 0: no response (client gone).
    pub status: u16,
    pub retries: u32,
    pub redispatched: bool,
    pub stick: &'static str,
    /// The status was the proxy's own (the server failed), not the server's.
    pub proxy_error: bool,
    /// Answered by the proxy by design (a redirect), without a backend.
    pub intercepted: bool,
    /// When the request got its server slot, its connection, and the response head.
    pub slot_at: Option<Instant>,
    pub connected_at: Option<Instant>,
    pub answered_at: Option<Instant>,
    /// Bytes sent to the client: the response head and body as they went out.
    pub bytes: u64,
    /// The response body broke off: who failed.
    pub aborted: Option<Side>,
}

/// Which side of the proxy failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

impl Side {
    /// Who failed, from the error that broke a response body off.
    pub fn of(e: &BodyError) -> Side {
        match e {
            BodyError::Write(_) => Side::Client,
            BodyError::Read(_) | BodyError::Framing(_) => Side::Server,
        }
    }
}

impl Log {
    pub fn start(protocol: &'static str) -> Log {
        Log {
            started: Instant::now(),
            date: SystemTime::now(),
            head_time: Duration::ZERO,
            protocol,
            backend: None,
            server: None,
            status: 0,
            retries: 0,
            redispatched: false,
            stick: "-",
            proxy_error: false,
            intercepted: false,
            slot_at: None,
            connected_at: None,
            answered_at: None,
            bytes: 0,
            aborted: None,
        }
    }

    pub fn refused(status: Status) -> Log {
        Log {
            status: status as u16,
            bytes: status.response().len() as u64,
            ..Log::start("-")
        }
    }

    /// HAProxy's timers in ms: Tq (head), Tw (queue), Tc (connect), Tr (server's answer),
    /// Ta (all); -1 for a phase never reached.
    fn timers(&self, now: Instant) -> [i64; 5] {
        let ms = |a: Instant, b: Option<Instant>| {
            b.map_or(-1, |b| {
                i64::try_from(b.saturating_duration_since(a).as_millis()).unwrap_or(i64::MAX)
            })
        };
        let tq = i64::try_from(self.head_time.as_millis()).unwrap_or(i64::MAX);
        let tw = ms(self.started, self.slot_at);
        let tc = self.slot_at.map_or(-1, |s| ms(s, self.connected_at));
        let tr = self.connected_at.map_or(-1, |c| ms(c, self.answered_at));
        [
            tq,
            tw,
            tc,
            tr,
            tq.saturating_add(ms(self.started, Some(now))),
        ]
    }

    /// HAProxy's termination state: what ended the session, in which phase, then two
    /// characters for persistence cookies, which proxyd does not set.
    fn termination(&self) -> &'static str {
        let phase = if self.answered_at.is_some() {
            'D'
        } else if self.connected_at.is_some() {
            'H'
        } else if self.slot_at.is_some() {
            'C'
        } else if self.backend.is_some() {
            'Q'
        } else {
            'R'
        };
        match (self.aborted, self.status) {
            (Some(Side::Client), _) => "CD--",
            (Some(Side::Server), _) => "SD--",
            (None, 0) => match phase {
                'D' => "CD--",
                'H' => "CH--",
                'C' => "CC--",
                'Q' => "CQ--",
                _ => "CR--",
            },
            _ if self.intercepted => "LR--",
            (None, s) if self.proxy_error || self.backend.is_none() => match s {
                408 => "cR--",
                400 | 431 | 501 => "PR--",
                504 => "sH--",
                502 => "SH--",
                503 if self.slot_at.is_none() => "sQ--",
                503 => "SC--",
                _ => "PR--",
            },
            _ => "----",
        }
    }
}

/// Counts the request, then formats its line and hands it to the sink (when the log is on).
pub fn access_log(
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
        // Not an add of 0 per request: the line is shared by every serving thread.
        if log.retries > 0 {
            be.retries
                .fetch_add(u64::from(log.retries), Ordering::Relaxed);
        }
    }
    // `RUST_LOG` still turns the access log off (`proxyd::access=off`), as when it was an
    // ordinary event.
    if !shared.access_log.is_on()
        || !tracing::enabled!(target: "proxyd::access", tracing::Level::INFO)
    {
        return;
    }
    let line = Line::of(shared, frontend, peer, log, req, Instant::now());
    let mut buf = Vec::with_capacity(384);
    match shared.config.global.access_log.format {
        LogFormat::Httplog => line.httplog(&mut buf),
        LogFormat::Json => line.json(&mut buf),
    }
    shared.access_log.push(&buf);
}

/// Everything a line says, gathered once for either format.
struct Line<'a> {
    peer: SocketAddr,
    date: SystemTime,
    frontend: &'a str,
    backend: &'a str,
    server: &'a str,
    timers: [i64; 5],
    /// -1: no response.
    status: i32,
    bytes: u64,
    termination: &'static str,
    /// Connections of the worker, the frontend, the backend, the server.
    conns: [u64; 4],
    retries: u32,
    redispatched: bool,
    stick: &'static str,
    /// Requests waiting for the server, for the backend.
    queues: [u64; 2],
    request: Option<&'a RequestHead>,
    protocol: &'static str,
}

impl<'a> Line<'a> {
    fn of(
        shared: &'a Shared,
        frontend: usize,
        peer: SocketAddr,
        log: &Log,
        request: Option<&'a RequestHead>,
        now: Instant,
    ) -> Line<'a> {
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let be = log.backend.map(|b| &shared.backends[b]);
        let srv = log.server.map(|(b, s)| &shared.backends[b].servers[s]);
        let active = |s: &crate::shared::ServerRt| u64::from(s.active.load(Ordering::Relaxed));
        Line {
            peer,
            date: log.date,
            frontend: &shared.config.frontends[frontend].name,
            backend: be.map_or("-", |b| b.name.as_str()),
            server: srv.map_or("<NOSRV>", |s| s.name.as_str()),
            timers: log.timers(now),
            status: if log.status == 0 {
                -1
            } else {
                i32::from(log.status)
            },
            bytes: log.bytes,
            termination: log.termination(),
            conns: [
                ld(&shared.stats.active_connections),
                ld(&shared.frontends[frontend].connections_active),
                be.map_or(0, |b| b.servers.iter().map(active).sum()),
                srv.map_or(0, active),
            ],
            retries: log.retries,
            redispatched: log.redispatched,
            stick: log.stick,
            queues: [0, be.map_or(0, |b| ld(&b.queued))],
            request,
            protocol: log.protocol,
        }
    }

    /// HAProxy's `option httplog`:
    /// `ip:port [date] frontend backend/server Tq/Tw/Tc/Tr/Ta status bytes - - tttt
    /// act/fe/be/srv/retries srvq/beq "request line"`, the date in UTC. A retry that went to
    /// another server shows `+` before the retries, as HAProxy does.
    fn httplog(&self, out: &mut Vec<u8>) {
        let u = Utc::of(self.date);
        const MONTHS: [&str; 12] = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let [tq, tw, tc, tr, ta] = self.timers;
        let [act, fe, be, srv] = self.conns;
        let _ = write!(
            out,
            "{} [{:02}/{}/{:04}:{:02}:{:02}:{:02}.{:03}] {} {}/{} {tq}/{tw}/{tc}/{tr}/{ta} {} {} - - {} {act}/{fe}/{be}/{srv}/{}{} {}/{} \"",
            self.peer,
            u.day,
            MONTHS[(u.month as usize).saturating_sub(1) % 12],
            u.year,
            u.hour,
            u.minute,
            u.second,
            u.milli,
            self.frontend,
            self.backend,
            self.server,
            self.status,
            self.bytes,
            self.termination,
            if self.redispatched { "+" } else { "" },
            self.retries,
            self.queues[0],
            self.queues[1],
        );
        match self.request {
            Some(r) => {
                // The head parser lets only visible ASCII through the method and target; a
                // quote is written `#22` as HAProxy does, so that the field ends at the
                // line's last quote.
                out.extend_from_slice(r.method().as_bytes());
                out.push(b' ');
                for &b in r.target().as_bytes() {
                    match b {
                        b'"' => out.extend_from_slice(b"#22"),
                        _ => out.push(b),
                    }
                }
                out.push(b' ');
                out.extend_from_slice(self.protocol.as_bytes());
            }
            None => out.extend_from_slice(b"<BADREQ>"),
        }
        out.extend_from_slice(b"\"\n");
    }

    /// One JSON object: the same facts as httplog, named.
    fn json(&self, out: &mut Vec<u8>) {
        let [tq, tw, tc, tr, ta] = self.timers;
        let [act, fe, be, srv] = self.conns;
        let _ = write!(
            out,
            "{{\"client_ip\":\"{}\",\"client_port\":{},\"date\":\"{}\",\"frontend\":",
            self.peer.ip(),
            self.peer.port(),
            Rfc3339(self.date)
        );
        json_str(out, self.frontend);
        out.extend_from_slice(b",\"backend\":");
        json_str(out, self.backend);
        out.extend_from_slice(b",\"server\":");
        json_str(out, self.server);
        let _ = write!(
            out,
            ",\"tq\":{tq},\"tw\":{tw},\"tc\":{tc},\"tr\":{tr},\"ta\":{ta},\"status\":{},\"bytes\":{},\"termination\":\"{}\",\"actconn\":{act},\"feconn\":{fe},\"beconn\":{be},\"srvconn\":{srv},\"retries\":{},\"redispatched\":{},\"stick\":\"{}\",\"srv_queue\":{},\"backend_queue\":{},\"method\":",
            self.status,
            self.bytes,
            self.termination,
            self.retries,
            self.redispatched,
            self.stick,
            self.queues[0],
            self.queues[1],
        );
        match self.request {
            Some(r) => {
                json_str(out, r.method());
                out.extend_from_slice(b",\"target\":");
                json_str(out, r.target());
            }
            None => out.extend_from_slice(b"null,\"target\":null"),
        }
        out.extend_from_slice(b",\"protocol\":");
        json_str(out, self.protocol);
        out.extend_from_slice(b"}\n");
    }
}

/// A JSON string: quotes, backslashes and control characters escaped (RFC 8259 §7).
fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0..=0x1f | 0x7f => {
                let _ = write!(out, "\\u{b:04x}");
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

/// Decrements the in-flight count however the exchange ends (even when cancelled).
pub struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0
            .stats
            .requests_in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a request as received and in flight until the guard drops.
pub fn in_flight(shared: &Shared) -> InFlight<'_> {
    let stats = &shared.stats;
    stats.requests_total.fetch_add(1, Ordering::Relaxed);
    stats.requests_in_flight.fetch_add(1, Ordering::Relaxed);
    InFlight(shared)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn shared() -> Shared {
        let text = "[global]\nadmin_socket = \"/x/a.sock\"\nfdkeeper_socket = \"/x/l.sock\"\n\
                    [[frontend]]\nname = \"www\"\nbind = [\"127.0.0.1:80\"]\ndefault_backend = \"app\"\n\
                    [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s1\"\naddress = \"127.0.0.1:81\"\n";
        let config = crate::Config::from_source(common::SourceFile::from_text("t.toml", text))
            .expect("config");
        Shared::new(Arc::new(config), None, &Default::default())
    }

    fn request(raw: &str) -> RequestHead {
        super::super::head::parse_request(raw.as_bytes())
            .expect("parses")
            .expect("complete")
    }

    /// A request answered by s1: head in 2 ms, slot at once, connected after 3, answer after
    /// 40 more, done 10 later; 2750 bytes, on 2009-02-06 at 12:14:14.655 UTC.
    fn answered() -> (Log, Instant) {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut log = Log::start("HTTP/1.1");
        log.started = t0;
        log.date = std::time::UNIX_EPOCH + ms(1_233_922_454_655);
        log.head_time = ms(2);
        log.backend = Some(0);
        log.server = Some((0, 0));
        log.slot_at = Some(t0);
        log.connected_at = Some(t0 + ms(3));
        log.answered_at = Some(t0 + ms(43));
        log.status = 200;
        log.bytes = 2750;
        log.stick = "hit";
        (log, t0 + ms(53))
    }

    #[test]
    fn httplog_has_haproxys_fields_in_order() {
        let shared = shared();
        let (log, now) = answered();
        let req = request("GET /index.html?a=\"b\" HTTP/1.1\r\nHost: x\r\n\r\n");
        let peer: SocketAddr = "10.0.1.2:33317".parse().expect("addr");
        let mut out = Vec::new();
        Line::of(&shared, 0, peer, &log, Some(&req), now).httplog(&mut out);
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "10.0.1.2:33317 [06/Feb/2009:12:14:14.655] www app/s1 2/0/3/40/55 200 2750 - - ---- 0/0/0/0/0 0/0 \"GET /index.html?a=#22b#22 HTTP/1.1\"\n"
        );
    }

    #[test]
    fn httplog_of_refusals_and_failures() {
        let shared = shared();
        let peer: SocketAddr = "[::1]:5000".parse().expect("addr");
        let mut log = Log::refused(Status::BadRequest);
        log.date = std::time::UNIX_EPOCH;
        let now = log.started;
        let mut out = Vec::new();
        Line::of(&shared, 0, peer, &log, None, now).httplog(&mut out);
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            format!(
                "[::1]:5000 [01/Jan/1970:00:00:00.000] www -/<NOSRV> 0/-1/-1/-1/0 400 {} - - PR-- 0/0/0/0/0 0/0 \"<BADREQ>\"\n",
                Status::BadRequest.response().len()
            )
        );
        // No server could be had: 503 before any slot; a server that timed out: 504 in headers.
        let mut log = Log::start("HTTP/1.1");
        log.backend = Some(0);
        log.status = 503;
        log.proxy_error = true;
        assert_eq!(log.termination(), "sQ--");
        let (mut log, _) = answered();
        log.answered_at = None;
        log.status = 504;
        log.proxy_error = true;
        assert_eq!(log.termination(), "sH--");
        let (mut log, _) = answered();
        log.aborted = Some(Side::Client);
        assert_eq!(log.termination(), "CD--");
        let (mut log, _) = answered();
        log.answered_at = None;
        log.status = 0;
        assert_eq!(log.termination(), "CH--");
    }

    #[test]
    fn json_fields_are_exact() {
        let shared = shared();
        let (mut log, now) = answered();
        log.retries = 1;
        log.redispatched = true;
        let req = request("GET /a\\b?q=\"x\" HTTP/1.1\r\nHost: x\r\n\r\n");
        let peer: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        let mut out = Vec::new();
        Line::of(&shared, 0, peer, &log, Some(&req), now).json(&mut out);
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            concat!(
                r#"{"client_ip":"127.0.0.1","client_port":40000,"date":"2009-02-06T12:14:14.655Z","#,
                r#""frontend":"www","backend":"app","server":"s1","tq":2,"tw":0,"tc":3,"tr":40,"ta":55,"#,
                r#""status":200,"bytes":2750,"termination":"----","actconn":0,"feconn":0,"beconn":0,"#,
                r#""srvconn":0,"retries":1,"redispatched":true,"stick":"hit","srv_queue":0,"#,
                r#""backend_queue":0,"method":"GET","target":"/a\\b?q=\"x\"","protocol":"HTTP/1.1"}"#,
                "\n"
            )
        );
        let mut out = Vec::new();
        json_str(&mut out, "a\u{1}\u{7f}é");
        assert_eq!(out, "\"a\\u0001\\u007fé\"".as_bytes());
    }
}
