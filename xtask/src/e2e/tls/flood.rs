//! HTTP/2 floods from raw frames on the h2c bind (a rapid reset: HEADERS and RST_STREAM again
//! and again; CONTINUATION frames that never end a header block) beside h2load traffic on the
//! TLS bind: each flooding connection must get a GOAWAY and be closed, the traffic must not fail
//! and the worker's memory must stay bounded.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::load::{Expect, Load};
use super::{TlsNode, clients, report_load, rss_kib};
use crate::e2e::{Outcome, figure, ms};
use crate::harness::Env;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const CANCEL: u32 = 0x8;

/// How long one flooding connection may go on before the scenario gives up on a GOAWAY.
const FLOOD_TIME: Duration = Duration::from_secs(10);
/// How long after the GOAWAY proxyd has to close the connection.
const CLOSE_TIME: Duration = Duration::from_secs(5);
/// Growth of the worker's resident memory over the floods that still counts as bounded.
const RSS_GROWTH_LIMIT_KIB: u64 = 64 * 1024;

/// One kind of flood, with the bound past which the client stops by itself.
#[derive(Clone, Copy, Debug)]
enum Flood {
    /// A request (HEADERS with END_STREAM) and its RST_STREAM(CANCEL), `max_streams` times.
    RapidReset { max_streams: u32 },
    /// One HEADERS without END_HEADERS, then CONTINUATION frames of `frame_len` bytes of header
    /// fields (0: empty frames), never ending the block, `max_frames` of them.
    Continuation { frame_len: usize, max_frames: u32 },
}

impl Flood {
    fn name(self) -> String {
        match self {
            Flood::RapidReset { .. } => "rapid reset (HEADERS + RST_STREAM)".into(),
            Flood::Continuation { frame_len: 0, .. } => "CONTINUATION flood, empty frames".into(),
            Flood::Continuation { frame_len, .. } => {
                format!("CONTINUATION flood, {} KiB frames", frame_len / 1024)
            }
        }
    }
}

/// What proxyd did to one flooding connection.
#[derive(Clone, Debug, Default)]
struct FloodResult {
    /// Streams opened (rapid reset) or CONTINUATION frames sent before the GOAWAY.
    sent: u64,
    bytes: u64,
    /// Error code of proxyd's GOAWAY.
    goaway: Option<u32>,
    /// From the first byte to the GOAWAY, and to the close.
    to_goaway: Option<Duration>,
    to_close: Option<Duration>,
}

impl FloodResult {
    fn describe(&self) -> String {
        format!(
            "GOAWAY {} after {} ({} sent, {} KiB), closed after {}",
            self.goaway.map_or("none".to_owned(), error_name),
            self.to_goaway.map_or("-".to_owned(), ms),
            self.sent,
            self.bytes / 1024,
            self.to_close.map_or("never".to_owned(), ms),
        )
    }
}

fn error_name(code: u32) -> String {
    let name = match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x6 => "FRAME_SIZE_ERROR",
        0x9 => "COMPRESSION_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        _ => "other",
    };
    format!("{name} (0x{code:x})")
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix, the prefix byte's other bits being `flags`.
fn hpack_int(out: &mut Vec<u8>, flags: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// `GET http://flood/`: static-table :method, :scheme and :path, and :authority as a literal.
fn request_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x86, 0x84];
    hpack_int(&mut b, 0x00, 4, 1);
    hpack_int(&mut b, 0x00, 7, 5);
    b.extend_from_slice(b"flood");
    b
}

/// About `len` bytes of one literal header field `x-flood: aaa...` (never indexed).
fn filler_block(len: usize) -> Vec<u8> {
    let name = b"x-flood";
    let value_len = len.saturating_sub(name.len() + 8).max(1);
    let mut b = vec![0x10];
    hpack_int(&mut b, 0x00, 7, name.len());
    b.extend_from_slice(name);
    hpack_int(&mut b, 0x00, 7, value_len);
    b.extend(std::iter::repeat_n(b'a', value_len));
    b
}

/// What the reading half saw.
#[derive(Default)]
struct Seen {
    goaway: Option<(u32, Instant)>,
    closed: Option<Instant>,
}

/// Reads proxyd's frames until it closes: asks the writer to ACK its SETTINGS, notes its GOAWAY.
async fn read_frames(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    acks: mpsc::UnboundedSender<()>,
    seen: Arc<Mutex<Seen>>,
) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match rd.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let payload = &buf[9..9 + len];
            if kind == SETTINGS && flags & ACK == 0 {
                let _ = acks.send(());
            }
            if kind == GOAWAY && len >= 8 {
                let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                s.goaway.get_or_insert((code, Instant::now()));
            }
            buf.drain(..9 + len);
        }
    }
    seen.lock().unwrap_or_else(|e| e.into_inner()).closed = Some(Instant::now());
}

/// One flooding connection to `addr` (an h2c bind), until proxyd's GOAWAY or the flood's bound.
async fn flood(addr: SocketAddr, kind: Flood) -> Result<FloodResult> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (rd, mut wr) = stream.into_split();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (acks_tx, mut acks) = mpsc::unbounded_channel();
    let reader = tokio::spawn(read_frames(rd, acks_tx, Arc::clone(&seen)));
    let t0 = Instant::now();
    let mut out = FloodResult::default();
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    wr.write_all(&hello).await?;

    let block = request_block();
    let filler = match kind {
        Flood::Continuation { frame_len, .. } if frame_len > 0 => filler_block(frame_len),
        _ => Vec::new(),
    };
    let mut next_stream = 1u32;
    if let Flood::Continuation { .. } = kind {
        wr.write_all(&frame(HEADERS, END_STREAM, 1, &block)).await?;
    }
    let goaway_seen = || {
        seen.lock()
            .unwrap_or_else(|e| e.into_inner())
            .goaway
            .is_some()
    };
    // A batch per write keeps the flood fast without holding more than a few KiB.
    let write_result: std::io::Result<()> = async {
        loop {
            if goaway_seen() || t0.elapsed() > FLOOD_TIME {
                return Ok(());
            }
            while acks.try_recv().is_ok() {
                wr.write_all(&frame(SETTINGS, ACK, 0, &[])).await?;
            }
            let mut batch = Vec::new();
            match kind {
                Flood::RapidReset { max_streams } => {
                    if out.sent >= u64::from(max_streams) {
                        return Ok(());
                    }
                    for _ in 0..50 {
                        batch.extend(frame(
                            HEADERS,
                            END_STREAM | END_HEADERS,
                            next_stream,
                            &block,
                        ));
                        batch.extend(frame(RST_STREAM, 0, next_stream, &CANCEL.to_be_bytes()));
                        next_stream += 2;
                        out.sent += 1;
                    }
                }
                Flood::Continuation { max_frames, .. } => {
                    if out.sent >= u64::from(max_frames) {
                        return Ok(());
                    }
                    let per_batch = if filler.is_empty() { 500 } else { 4 };
                    for _ in 0..per_batch {
                        batch.extend(frame(CONTINUATION, 0, 1, &filler));
                        out.sent += 1;
                    }
                }
            }
            wr.write_all(&batch).await?;
            out.bytes += batch.len() as u64;
        }
    }
    .await;
    // A write refused by a closed connection ends the flood as well as the GOAWAY does.
    let _ = write_result;
    let _ = tokio::time::timeout(CLOSE_TIME, reader).await;
    let s = seen.lock().unwrap_or_else(|e| e.into_inner());
    out.goaway = s.goaway.map(|(code, _)| code);
    out.to_goaway = s.goaway.map(|(_, at)| at - t0);
    out.to_close = s.closed.map(|at| at - t0);
    Ok(out)
}

/// Flooding connections run at once, per kind.
const PARALLEL: usize = 3;
/// How long new flooding connections keep coming, and at most how many waves of them.
const FLOODING: Duration = Duration::from_secs(6);
const MAX_WAVES: usize = 500;

/// One kind's flooding connections, added up.
#[derive(Default)]
struct KindTotals {
    connections: u64,
    sent: u64,
    bytes: u64,
    /// GOAWAY error code -> connections.
    codes: std::collections::BTreeMap<u32, u64>,
    closed: u64,
    slowest_close: Duration,
    /// The first connections that did not end with an error GOAWAY and a close.
    bad: Vec<String>,
}

impl KindTotals {
    fn add(&mut self, r: &FloodResult) {
        self.connections += 1;
        self.sent += r.sent;
        self.bytes += r.bytes;
        if let Some(code) = r.goaway {
            *self.codes.entry(code).or_default() += 1;
        }
        if let Some(t) = r.to_close {
            self.closed += 1;
            self.slowest_close = self.slowest_close.max(t);
        }
        let good = matches!((r.goaway, r.to_close), (Some(code), Some(_)) if code != 0);
        if !good && self.bad.len() < 3 {
            self.bad.push(r.describe());
        }
    }

    fn describe(&self) -> String {
        let codes: Vec<String> = self
            .codes
            .iter()
            .map(|(code, n)| format!("{n} x {}", error_name(*code)))
            .collect();
        format!(
            "{} connections, {} sent ({} KiB); GOAWAY: {}; closed by proxyd: {}, the slowest {} after its first byte",
            self.connections,
            self.sent,
            self.bytes / 1024,
            if codes.is_empty() {
                "none".to_owned()
            } else {
                codes.join(", ")
            },
            self.closed,
            ms(self.slowest_close)
        )
    }
}

pub async fn floods(mut env: Env) -> Result<Outcome> {
    let node = TlsNode::start(&mut env, Duration::from_millis(1)).await?;
    let h2 = ["-c", "1", "-m", "10", "--rps", "300", "-n", "300"];
    let multiplexed = Expect::Multiplexed { streams: 10 };
    let traffic = [
        node.h2load_tls(
            "HTTP/2 beside the floods (h2load -c 1 -m 10), first",
            &h2,
            multiplexed,
        ),
        node.h2load_tls(
            "HTTP/2 beside the floods (h2load -c 1 -m 10), second",
            &h2,
            multiplexed,
        ),
        node.h2load_tls(
            "HTTP/1.1 keep-alive beside the floods (h2load --h1 -c 2)",
            &["--h1", "-c", "2", "-n", "500"],
            Expect::KeepAlive,
        ),
    ];
    let load = Load::start(&traffic, &env.logs_dir(), Duration::from_secs(90));
    load.wait_flowing(500, Duration::from_secs(30))
        .await
        .context("the h2load traffic never got going")?;
    let pid = node.worker_pid().await?;
    let (rss0, hwm0) = rss_kib(pid)?;
    figure(
        "worker before",
        format!("pid {pid}, VmRSS {rss0} KiB, VmHWM {hwm0} KiB"),
    );

    let kinds = [
        Flood::RapidReset {
            max_streams: 20_000,
        },
        Flood::Continuation {
            frame_len: 16 * 1024,
            max_frames: 4096,
        },
        Flood::Continuation {
            frame_len: 0,
            max_frames: 1_000_000,
        },
    ];
    let mut per_kind: Vec<KindTotals> = kinds.iter().map(|_| KindTotals::default()).collect();
    let t0 = Instant::now();
    let mut waves = 0;
    while t0.elapsed() < FLOODING && waves < MAX_WAVES {
        waves += 1;
        let mut runs = Vec::new();
        for (k, kind) in kinds.iter().enumerate() {
            for _ in 0..PARALLEL {
                runs.push((k, tokio::spawn(flood(node.h2c, *kind))));
            }
        }
        for (k, r) in runs {
            let r = r.await.context("a flood task panicked")??;
            per_kind[k].add(&r);
        }
    }
    figure(
        "flooding",
        format!(
            "{waves} waves of {PARALLEL} connections of each kind at once in {:.1}s",
            t0.elapsed().as_secs_f64()
        ),
    );
    let mut problems = Vec::new();
    for (kind, t) in kinds.iter().zip(&per_kind) {
        figure(&kind.name(), t.describe());
        if !t.bad.is_empty() {
            problems.push(format!("{}: {}", kind.name(), t.bad.join("; ")));
        }
    }
    let after_pid = node.worker_pid().await?;
    let (rss1, hwm1) = rss_kib(pid).unwrap_or_default();
    figure(
        "worker after",
        format!("pid {after_pid}, VmRSS {rss1} KiB, VmHWM {hwm1} KiB"),
    );
    let probe = clients::curl_plain(node.h2c, &["--http2-prior-knowledge"]).await?;
    figure(
        "curl --http2-prior-knowledge on the h2c bind after the floods",
        format!("{} HTTP/{}", probe.code, probe.version),
    );
    let totals = load.finish().await;
    report_load(&totals)?;
    ensure!(
        problems.is_empty(),
        "flooding connections not closed with an error GOAWAY: {}",
        problems.join("; ")
    );
    ensure!(
        after_pid == pid,
        "the worker changed ({pid} -> {after_pid}): it died"
    );
    ensure!(
        rss1.saturating_sub(rss0) <= RSS_GROWTH_LIMIT_KIB,
        "the worker's RSS grew by {} KiB",
        rss1.saturating_sub(rss0)
    );
    ensure!(
        probe.code == 200 && probe.version == "2",
        "after the floods: {probe:?}"
    );
    Ok(Outcome::Pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_hpack_integers() {
        let f = frame(RST_STREAM, 0, 3, &CANCEL.to_be_bytes());
        assert_eq!(f, [0, 0, 4, 3, 0, 0, 0, 0, 3, 0, 0, 0, 8]);
        let mut b = Vec::new();
        hpack_int(&mut b, 0x00, 7, 1337);
        // RFC 7541 C.1.2 uses a 5-bit prefix; with 7 bits: 127, then 1210 in 7-bit groups.
        assert_eq!(b, [0x7f, 0xba, 0x09]);
        let filler = filler_block(16 * 1024);
        assert!(filler.len().abs_diff(16 * 1024) < 16, "{}", filler.len());
        assert_eq!(
            request_block(),
            [0x82, 0x86, 0x84, 0x01, 0x05, b'f', b'l', b'o', b'o', b'd']
        );
    }
}
