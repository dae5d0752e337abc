//! A TCP relay in front of an h2c bind that reads the HTTP/2 frames going through it both ways,
//! so that a scenario knows what went on the wire: which streams the client opened, which the
//! server answered to the end, reset or refused, whatever the client itself reports.
//!
//! h2load counts a request it had queued when a GOAWAY came as sent and failed though it never
//! left the client; the relay tells those apart from streams that reached proxyd.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const PREFACE_LEN: usize = 24;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;

/// What crossed the relay, over every connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wire {
    pub connections: u64,
    /// Streams the client opened (a HEADERS frame on a new stream).
    pub opened: u64,
    /// Streams the server ended (END_STREAM on its HEADERS or DATA).
    pub answered: u64,
    /// RST_STREAM frames from the server.
    pub reset_by_server: u64,
    /// GOAWAY frames from the server, and how many of them had an error code.
    pub goaways: u64,
    pub goaway_errors: u64,
    /// Streams opened that the server neither ended nor reset before the connection closed.
    pub unanswered: u64,
}

impl Wire {
    pub fn summary(&self) -> String {
        format!(
            "{} connections, {} streams opened on the wire, {} answered to the end, {} reset by proxyd, {} unanswered, {} GOAWAYs ({} with an error code)",
            self.connections,
            self.opened,
            self.answered,
            self.reset_by_server,
            self.unanswered,
            self.goaways,
            self.goaway_errors
        )
    }
}

/// A running relay; dropping it stops accepting (connections in flight end with their peers).
pub struct Relay {
    pub addr: SocketAddr,
    wire: Arc<Mutex<Wire>>,
    task: JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    /// Listens on 127.0.0.1 (any port) and relays every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let wire = Arc::new(Mutex::new(Wire::default()));
        let shared = Arc::clone(&wire);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        let seen = relay(client, server).await;
                        let mut w = shared.lock().unwrap_or_else(|e| e.into_inner());
                        w.connections += 1;
                        w.opened += seen.opened.len() as u64;
                        w.answered += seen.ended.len() as u64;
                        w.reset_by_server += seen.resets;
                        w.goaways += seen.goaways;
                        w.goaway_errors += seen.goaway_errors;
                        w.unanswered += seen
                            .opened
                            .iter()
                            .filter(|s| !seen.ended.contains(s) && !seen.reset.contains(s))
                            .count() as u64;
                    }
                });
            }
        });
        Ok(Relay { addr, wire, task })
    }

    /// The counts of the connections that have closed.
    pub fn wire(&self) -> Wire {
        self.wire.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// One connection's frames.
#[derive(Default)]
struct Seen {
    opened: HashSet<u32>,
    ended: HashSet<u32>,
    reset: HashSet<u32>,
    resets: u64,
    goaways: u64,
    goaway_errors: u64,
}

/// Copies both ways until both sides closed, reading frame headers as they pass.
async fn relay(client: TcpStream, server: TcpStream) -> Seen {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let up = pipe(cr, sw, PREFACE_LEN, Arc::clone(&seen), Side::Client);
    let down = pipe(sr, cw, 0, Arc::clone(&seen), Side::Server);
    tokio::join!(up, down);
    std::mem::take(&mut *seen.lock().unwrap_or_else(|e| e.into_inner()))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut skip: usize,
    seen: Arc<Mutex<Seen>>,
    side: Side,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut frames = FrameReader::default();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        let mut bytes = &buf[..n];
        let s = skip.min(bytes.len());
        bytes = &bytes[s..];
        skip -= s;
        let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
        frames.feed(bytes, |kind, flags, stream, payload| {
            note(&mut seen, side, kind, flags, stream, payload)
        });
    }
    let _ = to.shutdown().await;
}

fn note(seen: &mut Seen, side: Side, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    match (side, kind) {
        (Side::Client, HEADERS) => {
            seen.opened.insert(stream);
        }
        (Side::Server, HEADERS | DATA) if flags & END_STREAM != 0 => {
            seen.ended.insert(stream);
        }
        (Side::Server, RST_STREAM) => {
            seen.resets += 1;
            seen.reset.insert(stream);
        }
        (Side::Server, GOAWAY) => {
            seen.goaways += 1;
            let code = payload
                .get(4..8)
                .map_or(0, |c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
            seen.goaway_errors += u64::from(code != 0);
        }
        _ => {}
    }
}

/// Splits a byte stream into frames, keeping each frame's first bytes until it is whole (up to
/// 8 bytes of payload are kept: all that GOAWAY's and RST_STREAM's counts need).
#[derive(Default)]
struct FrameReader {
    head: Vec<u8>,
    /// Payload bytes of the current frame still to come, once its header is read.
    left: usize,
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl FrameReader {
    fn feed(&mut self, mut bytes: &[u8], mut on_frame: impl FnMut(u8, u8, u32, &[u8])) {
        while !bytes.is_empty() {
            if self.head.len() < 9 {
                let take = (9 - self.head.len()).min(bytes.len());
                self.head.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if self.head.len() < 9 {
                    return;
                }
                let h = &self.head;
                self.left = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                self.kind = h[3];
                self.flags = h[4];
                self.stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                self.payload.clear();
            }
            let take = self.left.min(bytes.len());
            let keep = take.min(8usize.saturating_sub(self.payload.len()));
            self.payload.extend_from_slice(&bytes[..keep]);
            bytes = &bytes[take..];
            self.left -= take;
            if self.left == 0 {
                on_frame(self.kind, self.flags, self.stream, &self.payload);
                self.head.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_anywhere_are_read_whole() {
        let mut bytes = Vec::new();
        // HEADERS on 1 with END_STREAM|END_HEADERS and 3 bytes; GOAWAY with last 1, code 11.
        bytes.extend_from_slice(&[0, 0, 3, HEADERS, 0x5, 0, 0, 0, 1, 0x82, 0x86, 0x84]);
        bytes.extend_from_slice(&[0, 0, 8, GOAWAY, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 11]);
        for split in 0..bytes.len() {
            let mut r = FrameReader::default();
            let mut got = Vec::new();
            for part in [&bytes[..split], &bytes[split..]] {
                r.feed(part, |k, f, s, p| got.push((k, f, s, p.to_vec())));
            }
            assert_eq!(
                got,
                [
                    (HEADERS, 0x5, 1, vec![0x82, 0x86, 0x84]),
                    (GOAWAY, 0, 0, vec![0, 0, 0, 1, 0, 0, 0, 11]),
                ],
                "split at {split}"
            );
        }
    }
}
