//! One socket, one name: spellings of one address, and overlapping binds, against an in-process fdkeeper with real sockets.

mod support;

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;

use fdkeeper::{ClientError, ListenSpec};
use proto::fdlend::v1::error::Code;
use support::{Keeper, spec};

/// A port of 127.0.0.1 that nobody listens on now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn refused(addr: SocketAddr) -> bool {
    matches!(
        TcpStream::connect(addr),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

fn refusal(r: Result<Vec<fdkeeper::LentListener>, ClientError>) -> (Code, String) {
    match r {
        Err(ClientError::Refused { code, message }) => (code, message),
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(lent) => panic!(
            "expected a refusal, got {:?}",
            lent.iter()
                .map(|l| (l.spec.address.clone(), l.inode))
                .collect::<Vec<_>>()
        ),
    }
}

/// What a proxyd with `bind = ["127.0.0.1:P"]` and `bind = ["127.0.0.1:0P"]` in two frontends
/// asks for: one request naming one socket twice. It used to get two dups of one socket, so
/// both frontends accepted from one queue; now it is refused and nothing is bound.
#[tokio::test]
async fn two_spellings_in_one_request_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keeper = Keeper::start(dir.path(), "");
    let mut c = keeper.client().await;
    let port = free_port();
    let plain = format!("127.0.0.1:{port}");
    let padded = format!("127.0.0.1:0{port}");
    let (code, message) = refusal(c.acquire("t", &[spec(&plain), spec(&padded)]).await);
    assert_eq!(code, Code::InvalidArgument, "{message}");
    assert!(
        message.contains(&format!(
            "listener 2 ('{padded}') is the same socket as listener 1 ('{plain}')"
        )),
        "{message}"
    );
    assert!(c.list().await.expect("list").listeners.is_empty());
    assert!(refused(plain.parse().expect("addr")), "nothing was bound");

    // The same text twice is one socket twice as well.
    let (code, _) = refusal(c.acquire("t", &[spec(&plain), spec(&plain)]).await);
    assert_eq!(code, Code::InvalidArgument);
    keeper.stop().await;
}

/// Another borrower asking under another spelling gets the very socket, under its one name.
#[tokio::test]
async fn a_second_spelling_later_gets_the_same_socket_under_its_canonical_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keeper = Keeper::start(dir.path(), "");
    let port = free_port();
    let mut a = keeper.client().await;
    let mut b = keeper.client().await;
    let first = a
        .acquire("a", &[spec(&format!("127.0.0.1:{port}"))])
        .await
        .expect("acquire");
    let second = b
        .acquire("b", &[spec(&format!("127.0.0.1:0{port}"))])
        .await
        .expect("acquire the padded spelling");
    assert_eq!(first[0].inode, second[0].inode);
    assert_eq!(second[0].spec.address, format!("127.0.0.1:{port}"));
    assert_eq!(a.list().await.expect("list").listeners.len(), 1);
    keeper.stop().await;
}

/// `127.0.0.1:0` is held on a kernel-chosen port P; `127.0.0.1:P` is that socket under a
/// second name: refused with the name it has, not a retriable bind failure.
#[tokio::test]
async fn the_port_a_zero_bind_got_is_not_a_second_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keeper = Keeper::start(dir.path(), "");
    let mut c = keeper.client().await;
    let lent = c
        .acquire("t", &[spec("127.0.0.1:0")])
        .await
        .expect("acquire");
    let actual = lent[0].local_addr;
    let (code, message) = refusal(c.acquire("t", &[spec(&actual.to_string())]).await);
    assert_eq!(code, Code::InvalidArgument, "{message}");
    assert!(message.contains("ask for it as 127.0.0.1:0"), "{message}");
    assert_eq!(c.list().await.expect("list").listeners.len(), 1);

    // Nor can it come back as a deposit under that second name.
    let dup = lent[0].listener.as_fd().try_clone_to_owned().expect("dup");
    let d = c
        .deposit(&[(spec(&actual.to_string()), dup.as_fd())], None)
        .await
        .expect("deposit answered");
    assert!(d.adopted.is_empty(), "{d:?}");
    assert_eq!(d.rejected.len(), 1, "{d:?}");
    assert!(
        d.rejected[0].reason.contains("held as 127.0.0.1:0"),
        "{d:?}"
    );
    keeper.stop().await;
}

/// With SO_REUSEPORT the kernel lets `0.0.0.0:P` and `127.0.0.1:P` both listen, and the
/// specific one silently takes every loopback connection from the wildcard's borrower.
#[tokio::test]
async fn a_wildcard_and_a_specific_address_of_one_port_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = support::config_text(dir.path(), "").replace("\"127.0.0.0/8\"", "\"*\"");
    let keeper = Keeper::start_with(dir.path(), &text);
    let mut c = keeper.client().await;
    let port = free_port();
    let reuse = |a: &str| ListenSpec {
        reuseport: true,
        ..spec(a)
    };
    let wild = c
        .acquire("wild", &[reuse(&format!("0.0.0.0:{port}"))])
        .await
        .expect("acquire the wildcard");
    let (code, message) = refusal(
        c.acquire("specific", &[reuse(&format!("127.0.0.1:{port}"))])
            .await,
    );
    assert_eq!(code, Code::InvalidArgument, "{message}");
    assert!(
        message.contains(&format!("overlaps 0.0.0.0:{port}")),
        "{message}"
    );
    // Every loopback connection still reaches the wildcard's queue.
    let _c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    wild[0].listener.set_nonblocking(false).expect("blocking");
    wild[0]
        .listener
        .accept()
        .expect("accepted by the wildcard's borrower");

    // The other order, in one request, is refused as well.
    let other = free_port();
    let (code, message) = refusal(
        c.acquire(
            "both",
            &[
                reuse(&format!("127.0.0.1:{other}")),
                reuse(&format!("0.0.0.0:{other}")),
            ],
        )
        .await,
    );
    assert_eq!(code, Code::InvalidArgument, "{message}");
    assert!(message.contains("overlaps listener 1"), "{message}");
    keeper.stop().await;
}
