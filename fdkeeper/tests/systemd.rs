//! Under a (simulated) systemd: READY=1, FDSTORE=1 with FDNAME for each new listener, and adoption from LISTEN_FDS.

mod support;

use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::seqpacket::SeqPacket;
use fdkeeper::Client;
use support::{config_text, spec};

const BIN: &str = env!("CARGO_BIN_EXE_fdkeeper");

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn connect_retrying(socket: &Path) -> Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Client::connect(socket).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("fdkeeper never came up: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Reads notifications until one contains `needle`; returns its text and fds.
async fn wait_for(notify: &SeqPacket, needle: &str) -> (String, Vec<OwnedFd>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let got = tokio::time::timeout(Duration::from_secs(10), notify.recv(&mut buf, 8))
            .await
            .unwrap_or_else(|_| panic!("no notification with {needle}"))
            .expect("recv");
        let text = String::from_utf8_lossy(&buf[..got.len]).into_owned();
        if text.contains(needle) {
            return (text, got.fds);
        }
    }
}

fn inode(fd: &OwnedFd) -> u64 {
    std::fs::metadata(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(fd)
    ))
    .map(|m| m.ino())
    .expect("stat fd")
}

#[tokio::test]
async fn fd_store_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("fdkeeper.toml");
    std::fs::write(&config, config_text(dir.path(), "")).expect("write");
    let socket = dir.path().join("run/lend.sock");
    let notify_path = dir.path().join("notify.sock");
    let notify = SeqPacket::new(OwnedFd::from(
        UnixDatagram::bind(&notify_path).expect("bind notify"),
    ))
    .expect("notify conn");

    let log = std::fs::File::create(dir.path().join("first.log")).expect("log");
    let first = Daemon(
        Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn"),
    );
    wait_for(&notify, "READY=1").await;
    let mut c = connect_retrying(&socket).await;
    let lent = c
        .acquire("worker", &[spec("127.0.0.1:0")])
        .await
        .expect("acquire");
    let (text, mut fds) = wait_for(&notify, "FDSTORE=1").await;
    assert!(text.contains("FDNAME=127.0.0.1_0"), "{text}");
    assert_eq!(fds.len(), 1, "one fd stored");
    let stored = fds.remove(0);
    assert_eq!(
        inode(&stored),
        lent[0].inode,
        "the held socket went to the store"
    );
    drop(c);
    drop(lent);
    drop(first); // SIGKILL: only the "fd store" (this test) keeps the socket now.

    // systemd starts it again with the stored fd as fd 3. The shell moves it from
    // stdin to fd 3 and sets LISTEN_PID to its own pid, which exec keeps.
    let log = std::fs::File::create(dir.path().join("second.log")).expect("log");
    let stored_for_child = stored.try_clone().expect("dup");
    let mut second = Daemon(
        Command::new("sh")
            .arg("-c")
            .arg("exec 3<&0 0</dev/null; export LISTEN_PID=$$; exec \"$0\" --config \"$1\"")
            .arg(BIN)
            .arg(&config)
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", "127.0.0.1_0")
            .env("NOTIFY_SOCKET", &notify_path)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::from(stored_for_child))
            .stderr(log)
            .spawn()
            .expect("spawn"),
    );
    wait_for(&notify, "READY=1").await;
    let mut c = connect_retrying(&socket).await;
    let listing = c.list().await.expect("list");
    assert_eq!(listing.listeners.len(), 1, "{listing:?}");
    assert_eq!(listing.listeners[0].inode, inode(&stored));
    let again = c
        .acquire("worker", &[spec("127.0.0.1:0")])
        .await
        .expect("acquire");
    assert_eq!(
        again[0].inode,
        inode(&stored),
        "same socket from the fd store"
    );

    // Adopted fds are already in the store: nothing new is pushed for them.
    let mut buf = vec![0u8; 4096];
    let extra = tokio::time::timeout(Duration::from_millis(200), notify.recv(&mut buf, 8)).await;
    if let Ok(Ok(got)) = extra {
        let text = String::from_utf8_lossy(&buf[..got.len]);
        assert!(!text.contains("FDSTORE=1"), "{text}");
    }

    // SIGTERM: STOPPING=1, then a clean exit (the sockets live on in the store).
    let pid = second.0.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(status.success());
    wait_for(&notify, "STOPPING=1").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(s) = second.0.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "fdkeeper did not exit on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(exit.code(), Some(0), "{exit:?}");
}
