//! Lending end to end against an in-process fdkeeper: same socket, refusals, conflicts, deposits, queues.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use fdkeeper::ClientError;
use fdkeeper::ListenSpec;
use proto::fdkeeper::v1::ListListenersRequest;
use proto::fdkeeper::v1::admin_client::AdminClient;
use proto::fdlend::v1::error::Code;
use support::{Keeper, spec};

/// Whether an fd of this process is close-on-exec, read from /proc/self/fdinfo.
fn cloexec(l: &std::net::TcpListener) -> bool {
    let info = std::fs::read_to_string(format!(
        "/proc/self/fdinfo/{}",
        std::os::fd::AsRawFd::as_raw_fd(l)
    ))
    .expect("fdinfo");
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        .expect("flags line");
    flags & 0o2000000 != 0
}

fn inode_of(l: &std::net::TcpListener) -> u64 {
    // fstat through /proc: the test needs no unsafe to read an fd's inode.
    std::fs::metadata(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(l)
    ))
    .map(|m| m.ino())
    .expect("stat the fd")
}

#[tokio::test]
async fn same_address_lends_the_same_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keeper = Keeper::start(dir.path(), "");
    let mut a = keeper.client().await;
    let mut b = keeper.client().await;

    let first = a
        .acquire("gen 1", &[spec("127.0.0.1:0")])
        .await
        .expect("acquire");
    let second = b
        .acquire("gen 2", &[spec("127.0.0.1:0")])
        .await
        .expect("acquire again");
    assert_eq!(first.len(), 1);
    assert_eq!(
        first[0].inode, second[0].inode,
        "one kernel socket per address"
    );
    assert_eq!(first[0].local_addr, second[0].local_addr);
    assert_ne!(first[0].local_addr.port(), 0);
    // The fds really are the same socket, not just reported so.
    assert_eq!(inode_of(&first[0].listener), inode_of(&second[0].listener));
    assert_eq!(inode_of(&first[0].listener), first[0].inode);
    assert_eq!(first[0].spec.backlog, 4096, "backlog 0 means the default");
    assert!(cloexec(&first[0].listener), "lent fds arrive close-on-exec");
    assert_eq!(a.instance_id(), b.instance_id());
    assert!(a.instance_id().is_some());

    // A connection accepted on one borrower's fd came through the shared queue.
    let addr = first[0].local_addr;
    let mut c = TcpStream::connect(addr).expect("connect");
    c.write_all(b"x").expect("write");
    let l = &second[0].listener;
    l.set_nonblocking(false).expect("blocking");
    let (mut s, _) = l.accept().expect("accept on the other borrower's dup");
    let mut buf = [0u8; 1];
    s.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"x");

    // Many lends later it is still the one socket; the round trip is timed for the notes.
    let started = std::time::Instant::now();
    const ROUNDS: u32 = 200;
    for _ in 0..ROUNDS {
        let again = b
            .acquire("gen 2", &[spec("127.0.0.1:0")])
            .await
            .expect("acquire");
        assert_eq!(again[0].inode, first[0].inode);
    }
    eprintln!(
        "acquire round trip (fd passing included): {:?} on average over {ROUNDS}",
        started.elapsed() / ROUNDS
    );

    let listing = a.list().await.expect("list");
    assert_eq!(listing.listeners.len(), 1);
    assert_eq!(listing.listeners[0].inode, first[0].inode);
    keeper.stop().await;
}

#[tokio::test]
async fn refuses_addresses_outside_allowed_binds_and_bad_addresses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keeper = Keeper::start(dir.path(), "");
    let mut c = keeper.client().await;
    match c.acquire("t", &[spec("0.0.0.0:0")]).await {
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, Code::AddressNotAllowed);
            assert!(message.contains("0.0.0.0:0"), "{message}");
        }
        other => panic!("expected ADDRESS_NOT_ALLOWED, got {other:?}"),
    }
    match c.acquire("t", &[spec("localhost:80")]).await {
        Err(ClientError::Refused { code, .. }) => assert_eq!(code, Code::InvalidArgument),
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
    // A refused request binds nothing, even for its allowed specs.
    match c
        .acquire("t", &[spec("127.0.0.1:0"), spec("[::1]:0")])
        .await
    {
        Err(ClientError::Refused { code, .. }) => assert_eq!(code, Code::AddressNotAllowed),
        other => panic!("expected ADDRESS_NOT_ALLOWED, got {other:?}"),
    }
    assert!(c.list().await.expect("list").listeners.is_empty());
    // The connection is still usable after refusals.
    c.acquire("t", &[spec("127.0.0.1:0")])
        .await
        .expect("allowed");
    keeper.stop().await;
}

#[tokio::test]
async fn fixed_options_conflict_and_changeable_ones_update() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keeper = Keeper::start(dir.path(), "default_backlog = 128\n");
    let mut c = keeper.client().await;
    let first = c
        .acquire(
            "t",
            &[ListenSpec {
                reuseport: true,
                ..spec("127.0.0.1:0")
            }],
        )
        .await
        .expect("acquire");
    assert_eq!(first[0].spec.backlog, 128);
    match c.acquire("t", &[spec("127.0.0.1:0")]).await {
        Err(e @ ClientError::Refused { .. }) => {
            let ClientError::Refused { code, message } = &e else {
                unreachable!()
            };
            assert_eq!(*code, Code::OptionsConflict);
            assert!(message.contains("reuseport=true"), "{message}");
            assert!(!e.is_retriable());
        }
        other => panic!("expected OPTIONS_CONFLICT, got {other:?}"),
    }
    let again = c
        .acquire(
            "t",
            &[ListenSpec {
                reuseport: true,
                backlog: 16,
                defer_accept_secs: 2,
                fastopen_queue: 8,
                ..spec("127.0.0.1:0")
            }],
        )
        .await
        .expect("changeable options update");
    assert_eq!(again[0].inode, first[0].inode);
    assert_eq!(again[0].spec.backlog, 16);
    assert_eq!(again[0].spec.defer_accept_secs, 2);
    assert_eq!(again[0].spec.fastopen_queue, 8);

    // The admin view reads the backlog back from the kernel.
    let channel = common::grpc::connect_unix(&keeper.admin)
        .await
        .expect("admin channel");
    let reply = AdminClient::new(channel)
        .list_listeners(ListListenersRequest {})
        .await
        .expect("ListListeners")
        .into_inner();
    assert_eq!(reply.listeners.len(), 1);
    let l = &reply.listeners[0];
    assert_eq!(l.backlog, 16);
    assert!(l.reuseport);
    assert_eq!(l.times_lent, 2);
    assert_eq!(l.origin, "bound");
    assert_eq!(l.borrowers.len(), 1);
    assert_eq!(l.borrowers[0].pid, std::process::id());
    assert!(l.borrowers[0].connected);
    keeper.stop().await;
}

#[tokio::test]
async fn a_queued_connection_waits_for_the_next_borrower() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keeper = Keeper::start(dir.path(), "");
    let addr;
    {
        let mut gen1 = keeper.client().await;
        let lent = gen1
            .acquire("gen 1", &[spec("127.0.0.1:0")])
            .await
            .expect("acquire");
        addr = lent[0].local_addr;
        // gen 1 goes away without accepting: its dup and its connection close.
    }
    let mut client = TcpStream::connect(addr).expect("connect while nobody accepts");
    client.write_all(b"ping").expect("write");

    let channel = common::grpc::connect_unix(&keeper.admin)
        .await
        .expect("admin channel");
    let mut admin = AdminClient::new(channel);
    let reply = admin
        .list_listeners(ListListenersRequest {})
        .await
        .expect("ListListeners")
        .into_inner();
    assert_eq!(reply.listeners[0].accept_queue, 1, "one connection queued");
    let b = &reply.listeners[0].borrowers;
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].name, "gen 1");

    let mut gen2 = keeper.client().await;
    let lent = gen2
        .acquire("gen 2", &[spec("127.0.0.1:0")])
        .await
        .expect("acquire");
    let l = &lent[0].listener;
    l.set_nonblocking(false).expect("blocking");
    let (mut s, _) = l.accept().expect("the queued connection");
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"ping");

    let reply = admin
        .list_listeners(ListListenersRequest {})
        .await
        .expect("ListListeners")
        .into_inner();
    assert_eq!(reply.listeners[0].accept_queue, 0);
    let names: Vec<(&str, bool)> = reply.listeners[0]
        .borrowers
        .iter()
        .map(|b| (b.name.as_str(), b.connected))
        .collect();
    assert!(names.contains(&("gen 1", false)), "{names:?}");
    assert!(names.contains(&("gen 2", true)), "{names:?}");

    gen2.release(&["127.0.0.1:0".to_owned()])
        .await
        .expect("release");
    let reply = admin
        .list_listeners(ListListenersRequest {})
        .await
        .expect("ListListeners")
        .into_inner();
    assert!(
        reply.listeners[0]
            .borrowers
            .iter()
            .all(|b| b.name != "gen 2"),
        "released"
    );
    assert_eq!(reply.listeners.len(), 1, "release keeps the socket");
    keeper.stop().await;
}

#[tokio::test]
async fn a_fresh_fdkeeper_adopts_deposited_sockets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keeper = Keeper::start(dir.path(), "");
    let mut c = keeper.client().await;
    let lent = c
        .acquire(
            "worker",
            &[
                spec("127.0.0.1:0"),
                ListenSpec {
                    fastopen_queue: 4,
                    ..spec("127.0.0.2:0")
                },
            ],
        )
        .await
        .expect("acquire");
    let old_instance = c.instance_id().map(str::to_owned);
    drop(c);
    keeper.stop().await;

    // The old fdkeeper is gone; the worker's dups keep the sockets (and queues) alive.
    let queued = TcpStream::connect(lent[0].local_addr).expect("still listening");

    let keeper = Keeper::start(dir.path(), "");
    let mut c = keeper.client().await;
    assert!(c.list().await.expect("list").listeners.is_empty());
    let deposit: Vec<(ListenSpec, std::os::fd::BorrowedFd<'_>)> = lent
        .iter()
        .map(|l| (l.spec.clone(), l.listener.as_fd()))
        .collect();
    let d = c.deposit(&deposit, None).await.expect("deposit");
    assert_eq!(d.adopted, vec!["127.0.0.1:0", "127.0.0.2:0"]);
    assert!(d.already_held.is_empty() && d.rejected.is_empty(), "{d:?}");
    assert_ne!(c.instance_id().map(str::to_owned), old_instance);

    // The options were read back from the deposited socket itself.
    let listing = c.list().await.expect("list");
    let spec2 = listing.listeners[1].spec.clone().unwrap_or_default();
    assert_eq!(spec2.address, "127.0.0.2:0");
    assert_eq!(spec2.fastopen_queue, 4);
    assert_eq!(spec2.backlog, 4096);

    // Depositing again: already held, and the duplicate fd is closed by fdkeeper.
    let d = c.deposit(&deposit[..1], None).await.expect("deposit again");
    assert_eq!(d.already_held, vec!["127.0.0.1:0"]);

    // A new borrower gets the very same sockets back.
    let mut next = keeper.client().await;
    let again = next
        .acquire("worker 2", &[spec("127.0.0.1:0"), spec("127.0.0.2:0")])
        .await
        .expect("acquire after restart");
    assert_eq!(again[0].inode, lent[0].inode);
    assert_eq!(again[1].inode, lent[1].inode);
    assert_eq!(
        again[1].spec.fastopen_queue, 0,
        "the latest acquire sets fastopen"
    );
    let l = &again[0].listener;
    l.set_nonblocking(false).expect("blocking");
    let (_s, peer) = l
        .accept()
        .expect("the connection queued during the restart");
    assert_eq!(peer, queued.local_addr().expect("addr"));

    // fds that are not listening TCP sockets bound where they claim are rejected.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let other = std::net::TcpListener::bind("127.0.0.3:0").expect("tcp");
    let d = c
        .deposit(
            &[
                (spec("127.0.0.1:5"), udp.as_fd()),
                (spec("127.0.0.4:0"), other.as_fd()),
                (spec("10.0.0.1:0"), other.as_fd()),
            ],
            None,
        )
        .await
        .expect("deposit");
    assert!(d.adopted.is_empty(), "{d:?}");
    assert_eq!(d.rejected.len(), 3, "{d:?}");
    assert!(d.rejected[0].reason.contains("stream"), "{d:?}");
    assert!(d.rejected[1].reason.contains("bound to 127.0.0.3"), "{d:?}");
    assert!(d.rejected[2].reason.contains("allowed_binds"), "{d:?}");

    let channel = common::grpc::connect_unix(&keeper.admin)
        .await
        .expect("admin channel");
    let reply = AdminClient::new(channel)
        .list_listeners(ListListenersRequest {})
        .await
        .expect("ListListeners")
        .into_inner();
    assert!(reply.listeners.iter().all(|l| l.origin == "deposit"));
    keeper.stop().await;
}

#[tokio::test]
async fn bind_failures_are_reported_and_retriable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keeper = Keeper::start(dir.path(), "");
    // Someone else holds the port.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = squatter.local_addr().expect("addr").to_string();
    let mut c = keeper.client().await;
    match c.acquire("t", &[spec(&addr)]).await {
        Err(e @ ClientError::Refused { .. }) => {
            assert!(e.is_retriable());
            let msg = e.to_string();
            assert!(msg.contains("BIND_FAILED"), "{msg}");
            assert!(msg.to_lowercase().contains("in use"), "{msg}");
        }
        other => panic!("expected BIND_FAILED, got {other:?}"),
    }
    drop(squatter);
    tokio::time::sleep(Duration::from_millis(10)).await;
    c.acquire("t", &[spec(&addr)]).await.expect("free now");

    // With SO_REUSEPORT the kernel would let fdkeeper bind a second socket next to a
    // listener it does not hold (say, one not yet deposited after a restart), splitting
    // the accept queue: fdkeeper refuses that too.
    let reuse = ListenSpec {
        reuseport: true,
        backlog: 16,
        ..spec("127.0.0.3:0")
    };
    let any = "127.0.0.3:0".parse().expect("addr");
    let outsider = fdkeeper::listener::bind(&reuse, any).expect("outsider binds");
    let taken = fdkeeper::listener::local_addr(outsider.as_fd()).expect("addr");
    let wanted = ListenSpec {
        address: taken.to_string(),
        ..reuse.clone()
    };
    match c.acquire("t", std::slice::from_ref(&wanted)).await {
        Err(e @ ClientError::Refused { .. }) => {
            assert!(e.is_retriable());
            assert!(e.to_string().contains("SO_REUSEPORT"), "{e}");
        }
        other => panic!("expected BIND_FAILED, got {other:?}"),
    }
    drop(outsider);
    let lent = c.acquire("t", &[wanted]).await.expect("free now");
    assert!(lent[0].spec.reuseport);
    keeper.stop().await;
}

#[tokio::test]
async fn max_listeners_is_enforced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keeper = Keeper::start(dir.path(), "max_listeners = 2\n");
    let mut c = keeper.client().await;
    c.acquire("t", &[spec("127.0.0.1:0"), spec("127.0.0.2:0")])
        .await
        .expect("two fit");
    match c.acquire("t", &[spec("127.0.0.3:0")]).await {
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, Code::InvalidArgument);
            assert!(message.contains("max_listeners"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Held ones are still lent.
    c.acquire("t", &[spec("127.0.0.2:0")]).await.expect("held");
    keeper.stop().await;
}

#[tokio::test]
async fn lending_socket_gets_its_mode_in_a_private_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keeper = Keeper::start(dir.path(), "socket_mode = \"0660\"\n");
    let meta = std::fs::metadata(&keeper.socket).expect("socket");
    assert_eq!(meta.mode() & 0o777, 0o660);
    let run = std::fs::metadata(keeper.socket.parent().expect("dir")).expect("dir");
    assert_eq!(run.mode() & 0o777, 0o700);
    // A second fdkeeper on the same socket refuses instead of stealing it.
    let text = support::config_text(dir.path(), "");
    let config = fdkeeper::Config::from_source(&common::SourceFile::from_text("x.toml", text))
        .expect("config");
    let err = fdkeeper::bind_sockets(&config).expect_err("in use");
    assert!(err.to_string().contains("in use"), "{err}");
    keeper.stop().await;
}
