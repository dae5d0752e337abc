//! HTTP/2 from clients (ALPN `h2`, or h2c with prior knowledge): one task per connection that
//! drives the h2 state machine and polls its streams, each stream an exchange with a pooled
//! HTTP/1.1 server connection like any request.
//!
//! Abuse is bounded where it is cheap to be: concurrent streams and header list size are
//! settings the client must obey, h2 refuses CONTINUATION floods and resets of streams not yet
//! accepted, and a client that resets most of its streams (CVE-2023-44487) loses the
//! connection. A draining worker sends GOAWAY in two steps (RFC 9113 §6.8) and finishes the
//! streams it has.

mod io;
mod stream;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt as _};
use tokio::time::Instant;

use super::head::MAX_HEAD;
use crate::net::{ClientInfo, ClientStream};
use crate::shared::Shared;

use stream::End;

/// The first bytes of every HTTP/2 connection (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Resets by the client that a connection may have before the share rule applies: a browser
/// cancels some streams (a page left while loading) and must not lose its connection for it.
const RESETS_ALLOWED: u64 = 100;

/// How long a connection that was asked to go away may take to close once no stream is left
/// (the client owes us the acknowledgement of a PING in between).
const GOAWAY_GRACE: Duration = Duration::from_secs(2);

/// Flow-control window of the whole connection: one stream's window (64 KiB) times a few, so
/// that several uploads move at once without a client being able to park much memory here.
const CONNECTION_WINDOW: u32 = 1 << 20;

/// Response bytes a stream may have queued for the client: a client that opens a large window
/// and then reads nothing parks at most this much per stream here.
const SEND_BUFFER: usize = 64 * 1024;

/// Serves an HTTP/2 connection until the client closes it, it stays idle past the keep-alive
/// timeout, or the worker drains.
pub async fn serve<C: ClientStream + Send + 'static>(
    shared: Arc<Shared>,
    info: ClientInfo,
    stream: C,
) {
    let d = &shared.config.defaults;
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(d.h2_max_concurrent_streams)
        .max_header_list_size(MAX_HEAD as u32)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buffer_size(SEND_BUFFER);
    let handshake = builder.handshake::<C, Bytes>(stream);
    let mut conn = match tokio::time::timeout(d.timeout_http_request, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "http/2 handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("http/2 handshake timed out");
            return;
        }
    };
    let shared = &*shared;
    // The streams are polled by this task, between its turns at the connection: no task of
    // their own to spawn, wake and join (a tenth of a small request's CPU), and they borrow
    // what the connection has.
    let mut streams = FuturesUnordered::new();
    // Where each request head is written as HTTP/1.1 before it is parsed: one buffer for all.
    let mut scratch = Vec::new();
    let (mut accepted, mut resets) = (0u64, 0u64);
    // Set once the connection was asked to go away: by the drain, the idle timeout or abuse.
    let mut going_away = false;
    let drain = shared.drain.cancelled();
    // Armed while no stream is open: the keep-alive timeout, or once the connection was asked
    // to go away, the grace it has to close.
    let timer = tokio::time::sleep(d.timeout_http_keep_alive);
    tokio::pin!(drain, timer);
    loop {
        // In this order: the streams write their responses before the connection is polled to
        // send them, and the rare events are looked at last.
        tokio::select! {
            biased;
            Some(end) = streams.next(), if !streams.is_empty() => {
                if end == End::ResetByClient {
                    resets += 1;
                    if resets > RESETS_ALLOWED && resets * 2 > accepted {
                        tracing::warn!(
                            client = %info.peer,
                            streams = accepted,
                            resets,
                            "closing an http/2 connection whose client resets most streams"
                        );
                        conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                        going_away = true;
                    }
                }
                if streams.is_empty() {
                    let wait = if going_away { GOAWAY_GRACE } else { d.timeout_http_keep_alive };
                    timer.as_mut().reset(Instant::now() + wait);
                }
            }
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    accepted += 1;
                    let stream = stream::Stream::new(req, respond, &mut scratch);
                    streams.push(stream.serve(shared, info));
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "http/2 connection failed");
                    break;
                }
                None => break,
            },
            () = &mut timer, if streams.is_empty() => {
                if going_away {
                    tracing::debug!("http/2 connection did not close after goaway");
                    break;
                }
                conn.graceful_shutdown();
                going_away = true;
                timer.as_mut().reset(Instant::now() + GOAWAY_GRACE);
            }
            () = &mut drain, if !going_away => {
                conn.graceful_shutdown();
                going_away = true;
                timer.as_mut().reset(Instant::now() + GOAWAY_GRACE);
            }
        }
    }
    // What is left of the streams ends with the connection: `streams` drops them.
}
