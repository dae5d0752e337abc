//! The real fdkeeper binary: config check, refusal of a foreign uid, and kill -9 then restart with deposits.

mod support;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fdkeeper::Client;
use support::{Keeper, config_text, my_uid, spec};
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_fdkeeper");

/// A child process killed (SIGKILL) when the test ends, passing or not.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(config: &Path, log: &Path) -> Daemon {
    let log = std::fs::File::create(log).expect("log file");
    let child = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .env("RUST_LOG", "debug")
        .env_remove("NOTIFY_SOCKET")
        .spawn()
        .expect("spawn fdkeeper");
    Daemon(child)
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

#[test]
fn check_reports_file_line_and_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, config_text(dir.path(), "")).expect("write");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .expect("run check");
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        config_text(
            dir.path(),
            "allowed_gids = [\"no-such-group-here\"]\nsurprise = true\n",
        ),
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .expect("run check");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    // The first error found is the unknown key, at its line.
    assert!(err.starts_with(&format!("{}:6:", bad.display())), "{err}");
    assert!(err.contains("surprise"), "{err}");

    // The daemon refuses the same file before binding anything.
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&bad)
        .output()
        .expect("run daemon");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(!dir.path().join("run").exists(), "nothing was created");

    // The admin socket spelled as another path to the lending socket: one file, both lines named.
    let same = dir.path().join("same.toml");
    let text = config_text(dir.path(), "").replace("/run/admin.sock", "/./run/lend.sock");
    std::fs::write(&same, &text).expect("write");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&same)
        .output()
        .expect("run check");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!("{}:2:9: ", same.display())),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "same file as socket '{}/run/lend.sock' at {}:1:10",
            dir.path().display(),
            same.display()
        )),
        "{err}"
    );

    let out = Command::new(BIN).arg("--bogus").output().expect("run");
    assert_eq!(out.status.code(), Some(64), "usage errors exit 64");
}

#[tokio::test]
async fn a_foreign_uid_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Let anyone reach the socket, so that only fdkeeper's own check can refuse.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::create_dir(dir.path().join("run")).expect("mkdir");
    std::fs::set_permissions(
        dir.path().join("run"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    let keeper = Keeper::start(dir.path(), "socket_mode = \"0666\"\n");

    let me = my_uid(dir.path());
    let run_acquire = move |uid: Option<u32>, socket: std::path::PathBuf| {
        let mut cmd = Command::new(BIN);
        cmd.args(["acquire", "--socket"])
            .arg(socket)
            .arg("127.0.0.1:0");
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        cmd.output().expect("run fdkeeper acquire")
    };
    let socket = keeper.socket.clone();
    let allowed = tokio::task::spawn_blocking(move || run_acquire(None, socket))
        .await
        .expect("join");
    assert_eq!(allowed.status.code(), Some(0), "{allowed:?}");
    let line = String::from_utf8_lossy(&allowed.stdout);
    assert!(line.starts_with("127.0.0.1:0 127.0.0.1:"), "{line}");
    assert!(line.contains("inode="), "{line}");

    let foreign = if me == 0 { 65534 } else { me + 1 };
    if me != 0 {
        eprintln!("not root: cannot switch uid; the refusal is checked in-process below");
    } else {
        let socket = keeper.socket.clone();
        let refused = tokio::task::spawn_blocking(move || run_acquire(Some(foreign), socket))
            .await
            .expect("join");
        assert_eq!(refused.status.code(), Some(1), "{refused:?}");
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(err.contains("PERMISSION_DENIED"), "{err}");
    }
    keeper.stop().await;

    // The same refusal for this very process, with a config that does not list it.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "socket = \"{0}/run/lend.sock\"\nadmin = \"{0}/run/admin.sock\"\nallowed_uids = [{foreign}]\nallowed_binds = [\"127.0.0.0/8\"]\n",
        dir2.path().display()
    );
    let keeper = Keeper::start_with(dir2.path(), &text);
    let mut c = keeper.client().await;
    match c.acquire("t", &[spec("127.0.0.1:0")]).await {
        Err(fdkeeper::ClientError::Refused { code, .. }) => {
            assert_eq!(code, proto::fdlend::v1::error::Code::PermissionDenied);
        }
        other => panic!("expected PERMISSION_DENIED, got {other:?}"),
    }
    // Then the connection is closed: nothing else is answered.
    assert!(c.list().await.is_err());
    keeper.stop().await;
}

#[tokio::test]
async fn kill_9_and_restart_gets_the_same_sockets_back_from_the_guard() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("fdkeeper.toml");
    std::fs::write(&config, config_text(dir.path(), "")).expect("write");
    let socket = dir.path().join("run/lend.sock");
    let mut daemon = spawn(&config, &dir.path().join("first.log"));

    let mut client = connect_retrying(&socket).await;
    let lent = client
        .acquire("worker", &[spec("127.0.0.1:0"), spec("127.0.0.2:0")])
        .await
        .expect("acquire");
    let first_instance = client.instance_id().map(str::to_owned);
    let held: Vec<(fdkeeper::ListenSpec, OwnedFd)> = lent
        .iter()
        .map(|l| {
            let fd = OwnedFd::from(l.listener.try_clone().expect("dup"));
            (l.spec.clone(), fd)
        })
        .collect();
    let shutdown = CancellationToken::new();
    let claim = fdkeeper::Claim {
        owner: "test worker".into(),
        instance: "i1".into(),
        generation: 1,
    };
    let guard = tokio::spawn(fdkeeper::guard_listeners(
        socket.clone(),
        client,
        held,
        Some(claim),
        shutdown.clone(),
    ));

    daemon.0.kill().expect("kill -9");
    daemon.0.wait().expect("reap");

    // While fdkeeper is dead the socket keeps accepting into its queue.
    let mut during =
        std::net::TcpStream::connect(lent[0].local_addr).expect("connect during outage");
    during.write_all(b"hold").expect("write");

    let restarted = Instant::now();
    let _daemon = spawn(&config, &dir.path().join("second.log"));
    let mut c = connect_retrying(&socket).await;
    let mut listing;
    loop {
        listing = c.list().await.expect("list");
        if listing.listeners.len() == 2 {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(10),
            "the guard never deposited: {listing:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    eprintln!(
        "restart to both listeners deposited: {:?}",
        restarted.elapsed()
    );
    assert_ne!(c.instance_id().map(str::to_owned), first_instance);
    // The deposit made the guard's claim again: releasing it leaves a socket that the guard,
    // still connected, holds: it is closed only once the guard lets go...
    let released = c
        .release_claims(
            &["127.0.0.2:0".to_owned()],
            fdkeeper::ClaimRelease {
                owner: "test worker".into(),
                instance: "i1".into(),
                below: 2,
                keep: Vec::new(),
            },
        )
        .await
        .expect("release");
    assert_eq!(released.closing, ["127.0.0.2:0"], "{released:?}");
    assert!(released.closed.is_empty(), "{released:?}");
    // ...and a borrower asking for it before then gets the same socket, which stays.
    let again = c
        .acquire("worker 2", &[spec("127.0.0.1:0"), spec("127.0.0.2:0")])
        .await
        .expect("acquire after restart");
    assert_eq!(again[0].inode, lent[0].inode, "same kernel socket");
    assert_eq!(again[1].inode, lent[1].inode, "same kernel socket");
    drop(lent);

    let l = &again[0].listener;
    l.set_nonblocking(false).expect("blocking");
    let (mut s, _) = l.accept().expect("the connection made during the outage");
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"hold");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), guard)
        .await
        .expect("guard stops on shutdown")
        .expect("guard task");
}
