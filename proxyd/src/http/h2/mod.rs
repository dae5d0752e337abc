//! HTTP/2 from clients (ALPN `h2`, or h2c with prior knowledge): one task per connection that
//! drives the h2 state machine and one per stream, each stream an exchange with a pooled
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
use tokio::task::JoinSet;
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
    let mut streams: JoinSet<End> = JoinSet::new();
    let (mut accepted, mut resets) = (0u64, 0u64);
    // Set once the connection was asked to go away: by the drain, the idle timeout or abuse.
    let mut going_away: Option<Instant> = None;
    let mut idle_since = Instant::now();
    loop {
        let idle_deadline = idle_since + d.timeout_http_keep_alive;
        let away_deadline = going_away.map(|t| t + GOAWAY_GRACE);
        tokio::select! {
            biased;
            _ = shared.drain.cancelled(), if going_away.is_none() => {
                conn.graceful_shutdown();
                going_away = Some(Instant::now());
            }
            Some(done) = streams.join_next(), if !streams.is_empty() => {
                if matches!(done, Ok(End::ResetByClient)) {
                    resets += 1;
                    if resets > RESETS_ALLOWED && resets * 2 > accepted {
                        tracing::warn!(
                            client = %info.peer,
                            streams = accepted,
                            resets,
                            "closing an http/2 connection whose client resets most streams"
                        );
                        conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                        going_away.get_or_insert_with(Instant::now);
                    }
                }
                if streams.is_empty() {
                    idle_since = Instant::now();
                }
            }
            _ = tokio::time::sleep_until(idle_deadline), if streams.is_empty() && going_away.is_none() => {
                conn.graceful_shutdown();
                going_away = Some(Instant::now());
            }
            _ = sleep_until_some(away_deadline), if streams.is_empty() => {
                tracing::debug!("http/2 connection did not close after goaway");
                break;
            }
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    accepted += 1;
                    // Boxed: the stream's future holds a whole exchange and is moved several times
                    // on its way into the task.
                    streams.spawn(Box::pin(stream::serve(shared.clone(), info, req, respond)));
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "http/2 connection failed");
                    break;
                }
                None => break,
            },
        }
    }
    // What is left of the streams ends with the connection.
    streams.shutdown().await;
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
