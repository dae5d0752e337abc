//! Malformed traffic on the lending socket: errors come back, fds are closed, nothing crashes.

mod support;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use common::seqpacket::SeqPacket;
use prost::Message;
use proto::fdlend::v1::error::Code;
use proto::fdlend::v1::{
    Acquire, Claim, ClaimRelease, Deposit, List, Release, Request, Response, request, response,
};
use support::{Keeper, spec};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

async fn ask(conn: &SeqPacket, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> (Response, Vec<OwnedFd>) {
    conn.send(bytes, fds).await.expect("send");
    let mut buf = vec![0u8; 64 * 1024];
    let got = conn.recv(&mut buf, 64).await.expect("recv");
    assert!(got.len > 0, "fdkeeper answered instead of closing");
    let resp = Response::decode(&buf[..got.len]).expect("a response");
    (resp, got.fds)
}

fn error_code(resp: &Response) -> Option<Code> {
    match &resp.kind {
        Some(response::Kind::Error(e)) => Code::try_from(e.code).ok(),
        _ => None,
    }
}

// One test in this file: it counts the process's open fds, which other tests would disturb.
#[tokio::test]
async fn malformed_requests_get_errors_and_fds_are_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keeper = Keeper::start(dir.path(), "");
    let conn = SeqPacket::connect(&keeper.socket).await.expect("connect");

    // Garbage bytes.
    let (resp, fds) = ask(&conn, &[0xff, 0xff, 0xff, 0x01, 0x02], &[]).await;
    assert_eq!(error_code(&resp), Some(Code::InvalidArgument), "{resp:?}");
    assert!(fds.is_empty());

    // A request without a kind keeps its id.
    let bytes = Request { id: 7, kind: None }.encode_to_vec();
    let (resp, _) = ask(&conn, &bytes, &[]).await;
    assert_eq!(resp.id, 7);
    assert_eq!(error_code(&resp), Some(Code::InvalidArgument));

    // A datagram larger than any request: MSG_TRUNC, an error, and the connection lives on.
    let (resp, _) = ask(&conn, &vec![0u8; 100 * 1024], &[]).await;
    assert_eq!(error_code(&resp), Some(Code::InvalidArgument), "{resp:?}");
    match &resp.kind {
        Some(response::Kind::Error(e)) => assert!(e.message.contains("larger"), "{e:?}"),
        other => panic!("{other:?}"),
    }

    // Too many specs in one Acquire.
    let many: Vec<_> = (0..65).map(|_| spec("127.0.0.1:0")).collect();
    let bytes = Request {
        id: 8,
        kind: Some(request::Kind::Acquire(Acquire {
            listeners: many,
            borrower: "t".into(),
            claim: None,
        })),
    }
    .encode_to_vec();
    let (resp, fds) = ask(&conn, &bytes, &[]).await;
    assert_eq!(error_code(&resp), Some(Code::InvalidArgument), "{resp:?}");
    assert!(fds.is_empty());

    // A claim without an owner, in an Acquire or a Release, is refused.
    for (id, kind) in [
        (
            12,
            request::Kind::Acquire(Acquire {
                listeners: vec![spec("127.0.0.1:0")],
                borrower: "t".into(),
                claim: Some(Claim::default()),
            }),
        ),
        (
            13,
            request::Kind::Release(Release {
                addresses: Vec::new(),
                claims: Some(ClaimRelease::default()),
            }),
        ),
    ] {
        let bytes = Request {
            id,
            kind: Some(kind),
        }
        .encode_to_vec();
        let (resp, fds) = ask(&conn, &bytes, &[]).await;
        assert_eq!(resp.id, id);
        assert_eq!(error_code(&resp), Some(Code::InvalidArgument), "{resp:?}");
        assert!(fds.is_empty());
    }

    // fdkeeper itself opens nothing more from here on for malformed traffic.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let before = open_fds();

    // Fds on a request that may not carry any are closed.
    let bytes = Request {
        id: 9,
        kind: Some(request::Kind::List(List {})),
    }
    .encode_to_vec();
    let (resp, _) = ask(&conn, &bytes, &[probe.as_fd(), probe.as_fd()]).await;
    assert_eq!(error_code(&resp), Some(Code::InvalidArgument), "{resp:?}");

    // More fds than fdkeeper accepts in one message (MSG_CTRUNC): an error, and every
    // fd that did arrive is closed.
    let fds: Vec<BorrowedFd<'_>> = (0..70).map(|_| probe.as_fd()).collect();
    let bytes = Request {
        id: 10,
        kind: Some(request::Kind::Deposit(Deposit {
            listeners: (0..70).map(|_| spec("127.0.0.1:0")).collect(),
            claim: None,
        })),
    }
    .encode_to_vec();
    let (resp, _) = ask(&conn, &bytes, &fds).await;
    assert_eq!(error_code(&resp), Some(Code::InvalidArgument), "{resp:?}");
    match &resp.kind {
        Some(response::Kind::Error(e)) => assert!(e.message.contains("fds"), "{e:?}"),
        other => panic!("{other:?}"),
    }

    // A Deposit whose fd count does not match its specs.
    let bytes = Request {
        id: 11,
        kind: Some(request::Kind::Deposit(Deposit {
            listeners: vec![spec("127.0.0.1:0")],
            claim: None,
        })),
    }
    .encode_to_vec();
    let (resp, _) = ask(&conn, &bytes, &[probe.as_fd(), probe.as_fd()]).await;
    assert_eq!(error_code(&resp), Some(Code::InvalidArgument), "{resp:?}");

    // The server task runs in this process: give it a moment to drop what it received.
    let mut after = open_fds();
    for _ in 0..50 {
        if after <= before {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        after = open_fds();
    }
    assert!(
        after <= before,
        "fds leaked: {before} before, {after} after"
    );

    // And the connection still works.
    let bytes = Request {
        id: 12,
        kind: Some(request::Kind::List(List {})),
    }
    .encode_to_vec();
    let (resp, _) = ask(&conn, &bytes, &[]).await;
    assert_eq!(resp.id, 12);
    assert!(
        matches!(resp.kind, Some(response::Kind::Listing(_))),
        "{resp:?}"
    );
    keeper.stop().await;
}
