//! TCP mode: one server connection per client connection, bytes copied both ways, with
//! balancing, `stick on src`, maxconn and retries as in HTTP mode.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::balance::Request;
use crate::config::StickOn;
use crate::net::{ClientInfo, ClientStream};
use crate::shared::{NoServer, Shared};

/// Serves one accepted client connection (plain, or decrypted by TLS) until either side closes.
pub async fn serve<C: ClientStream>(shared: Arc<Shared>, info: ClientInfo, mut client: C) {
    let (frontend, peer) = (info.at.frontend, info.peer);
    let started = Instant::now();
    let d = &shared.config.defaults;
    let b = shared.config.frontends[frontend].default_backend;
    let backend = &shared.backends[b];
    let bconf = &shared.config.backends[b];
    let ip = match peer.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer.ip(), IpAddr::V4),
        v4 => v4,
    };
    let key = bconf
        .stick
        .as_ref()
        .filter(|s| s.on == StickOn::Src)
        .and(backend.stick_table)
        .zip(shared.stick.as_ref())
        .and_then(|(t, c)| c.address_key(t, ip).map(|k| (c, t, k)));
    let stuck = key
        .as_ref()
        .and_then(|(c, t, k)| c.lookup_with(*t, k, |n| backend.server_index(n)))
        .flatten();
    let mut store = key.is_some() && stuck.is_none();
    let got = match stuck {
        Some(i) => match backend.acquire_on(i, d.timeout_queue).await {
            Err(NoServer::Unavailable) if bconf.redispatch => {
                store = true;
                backend
                    .acquire(Request::client(ip), Some(i), d.timeout_queue)
                    .await
            }
            r => r,
        },
        None => {
            backend
                .acquire(Request::client(ip), None, d.timeout_queue)
                .await
        }
    };
    let Ok(mut slot) = got else {
        tracing::info!(target: "proxyd::access", client = %peer, backend = %backend.name, "no server, closing");
        return;
    };
    let mut attempt = 0;
    let mut server_conn = loop {
        let server = slot.server();
        match server.connect(d.timeout_connect).await {
            Ok(s) => break s,
            Err(e) if attempt < bconf.retries => {
                attempt += 1;
                tracing::debug!(error = %e, server = %server.name, "connect failed, retrying");
                if bconf.redispatch && (attempt == bconf.retries || !server.takes_stuck()) {
                    let prev = slot.index;
                    drop(slot);
                    slot = match backend
                        .acquire(Request::client(ip), Some(prev), d.timeout_queue)
                        .await
                    {
                        Ok(s) => s,
                        Err(_) => return,
                    };
                    store = key.is_some();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, server = %server.name, "cannot connect to the server");
                return;
            }
        }
    };
    let server = slot.server();
    if let Some((c, t, k)) = &key
        && store
    {
        c.store(*t, k, &server.name);
    }
    // HAProxy's client and server timeouts are inactivity timeouts in TCP mode: a session
    // with no byte either way for the longer of the two is closed.
    let idle = d.timeout_client.max(d.timeout_server);
    let (up, down) = pipe(&mut client, &mut server_conn, idle).await;
    tracing::info!(
        target: "proxyd::access",
        client = %peer,
        frontend = %shared.config.frontends[frontend].name,
        backend = %backend.name,
        server = %server.name,
        time_ms = started.elapsed().as_millis() as u64,
        bytes_up = up,
        bytes_down = down,
        retries = attempt,
        "tcp session"
    );
}

/// Copies both ways until both sides have closed (each half-close is passed on), an error, or
/// `idle` without a byte in either direction. Returns the bytes sent up and down.
///
/// The client's halves come from `tokio::io::split`, which works on any stream (a transport
/// such as TLS cannot be split by the socket); the server's are a `TcpStream`'s own.
async fn pipe<C: ClientStream>(
    client: &mut C,
    server: &mut TcpStream,
    idle: Duration,
) -> (u64, u64) {
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut sr, mut sw) = server.split();
    let mut up_buf = vec![0u8; 16 * 1024];
    let mut down_buf = vec![0u8; 16 * 1024];
    let (mut up, mut down) = (0u64, 0u64);
    let (mut client_done, mut server_done) = (false, false);
    while !(client_done && server_done) {
        tokio::select! {
            r = cr.read(&mut up_buf), if !client_done => match r {
                Ok(0) | Err(_) => {
                    client_done = true;
                    let _ = sw.shutdown().await;
                }
                Ok(n) => {
                    if sw.write_all(&up_buf[..n]).await.is_err() {
                        break;
                    }
                    up += n as u64;
                }
            },
            r = sr.read(&mut down_buf), if !server_done => match r {
                Ok(0) | Err(_) => {
                    server_done = true;
                    let _ = cw.shutdown().await;
                }
                Ok(n) => {
                    // Flushed: over TLS the last records of a write may wait in the stream.
                    if cw.write_all(&down_buf[..n]).await.is_err() || cw.flush().await.is_err() {
                        break;
                    }
                    down += n as u64;
                }
            },
            () = tokio::time::sleep(idle) => {
                tracing::debug!(idle_ms = idle.as_millis() as u64, "tcp session idle, closing");
                break;
            }
        }
    }
    (up, down)
}
