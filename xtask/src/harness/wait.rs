//! Readiness waits: poll until a check passes, a socket accepts or gRPC health says SERVING.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};

use super::grpcurl::grpcurl;

/// Polls `check` every 20 ms until it returns `Ok(Some(v))`, failing after `timeout` with the
/// last error seen (or `what` if it only ever said "not yet").
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until a TCP connect to `addr` succeeds.
pub async fn wait_tcp(addr: SocketAddr, timeout: Duration) -> Result<()> {
    wait_for(&format!("{addr} to accept"), timeout, || async move {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => Ok(Some(())),
            Err(e) => Err(anyhow::Error::new(e).context(format!("connect {addr}"))),
        }
    })
    .await
}

/// Waits until a unix stream connect to `path` succeeds.
pub async fn wait_unix(path: &Path, timeout: Duration) -> Result<()> {
    let path = path.to_owned();
    wait_for(&format!("{} to accept", path.display()), timeout, || {
        let path = path.clone();
        async move {
            match tokio::net::UnixStream::connect(&path).await {
                Ok(_) => Ok(Some(())),
                Err(e) => Err(anyhow::Error::new(e).context(format!("connect {}", path.display()))),
            }
        }
    })
    .await
}

/// Waits until a unix SOCK_SEQPACKET connect to `path` succeeds (fdkeeper's lending socket).
pub async fn wait_seqpacket(path: &Path, timeout: Duration) -> Result<()> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let path = path.to_owned();
    wait_for(&format!("{} to accept", path.display()), timeout, || {
        let path = path.clone();
        async move {
            let fd = socket(
                AddressFamily::Unix,
                SockType::SeqPacket,
                SockFlag::SOCK_CLOEXEC,
                None,
            )?;
            let addr = UnixAddr::new(&path)?;
            match connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
                Ok(()) => Ok(Some(())),
                Err(e) => Err(anyhow::Error::new(e).context(format!("connect {}", path.display()))),
            }
        }
    })
    .await
}

/// Waits until `grpc.health.v1.Health/Check` (through grpcurl) answers SERVING.
pub async fn wait_grpc_health(socket: &Path, timeout: Duration) -> Result<()> {
    wait_for("the gRPC health check to say SERVING", timeout, || {
        let socket = socket.to_owned();
        async move {
            let v = tokio::task::spawn_blocking(move || {
                grpcurl(&socket, "grpc.health.v1.Health/Check", None)
            })
            .await??;
            Ok((v["status"] == "SERVING").then_some(()))
        }
    })
    .await
}
