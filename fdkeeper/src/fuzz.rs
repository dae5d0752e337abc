//! Fuzz targets of the lending protocol: requests into the registry, responses into the client, fds through SCM_RIGHTS.
//!
//! An fd leak cannot be seen by counting every fd of the process (other tests open and close
//! theirs meanwhile), so each target counts the fds that point at objects it made itself: a
//! pipe and a TCP socket, by inode, in /proc/self/fd.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::SourceFile;
use common::fuzz::run;
use prost::Message;
use proto::fdlend::v1::{
    Acquire, Claim, ClaimRelease, Deposit, List, ListenSpec, Release, Request, Response, request,
    response,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::address::{self, Bind};
use crate::config::Config;
use common::seqpacket::{self, SeqPacket};

use crate::limits::{MAX_DATAGRAM, MAX_FDS_PER_MESSAGE, MAX_REQUEST};
use crate::registry::{MAX_CLAIMS, Registry};
use crate::sys;
use crate::{Client, ClientError, listener};

const MAX_LISTENERS: u32 = 8;

fn config(dir: &std::path::Path) -> Config {
    let uid = nix::unistd::getuid().as_raw();
    // Port 0 only: a fuzzed request never binds a fixed port another test may be using.
    let text = format!(
        "socket = \"{d}/lend.sock\"\nadmin = \"{d}/admin.sock\"\nallowed_uids = [{uid}]\n\
         allowed_binds = [\"127.0.0.0/8:0\"]\nmax_listeners = {MAX_LISTENERS}\n",
        d = dir.display()
    );
    Config::from_source(&SourceFile::from_text("fuzz.toml", text)).expect("config")
}

/// How many fds of this process point at the object `link` names ("pipe:[123]").
fn open_copies(link: &str) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == link))
        .count()
}

fn link_of(fd: BorrowedFd<'_>) -> String {
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    std::fs::read_link(path)
        .expect("readlink")
        .to_string_lossy()
        .into_owned()
}

/// Objects whose fds a target sends, and their copies kept outside what is under test.
struct Probes {
    pipe: OwnedFd,
    pipe_link: String,
    /// A listening TCP socket (a valid deposit) and a bound but not listening one.
    listening: std::net::TcpListener,
    listening_link: String,
    idle: socket2::Socket,
    idle_link: String,
    /// Copies of each this process holds outside the code under test.
    base: [usize; 3],
}

impl Probes {
    fn new() -> Self {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(writer);
        let pipe = OwnedFd::from(reader);
        let listening = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let idle = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        let pipe_link = link_of(pipe.as_fd());
        let listening_link = link_of(listening.as_fd());
        let idle_link = link_of(idle.as_fd());
        let mut p = Self {
            pipe,
            pipe_link,
            listening,
            listening_link,
            idle,
            idle_link,
            base: [0; 3],
        };
        p.base = p.counts();
        p
    }

    fn counts(&self) -> [usize; 3] {
        [
            open_copies(&self.pipe_link),
            open_copies(&self.listening_link),
            open_copies(&self.idle_link),
        ]
    }

    /// The fds to send beside a datagram, chosen by one byte: none, a few of each kind,
    /// or more than a message may carry.
    fn pick(&self, choice: u8) -> Vec<BorrowedFd<'_>> {
        let (p, l, i) = (self.pipe.as_fd(), self.listening.as_fd(), self.idle.as_fd());
        match choice % 8 {
            0 | 1 => Vec::new(),
            2 => vec![p],
            3 => vec![l],
            4 => vec![i],
            5 => vec![l, p, i],
            6 => vec![p; MAX_FDS_PER_MESSAGE + 1],
            _ => vec![l; 200],
        }
    }

    fn listening_addr(&self) -> SocketAddr {
        self.listening.local_addr().expect("addr")
    }
}

fn spec(address: &str) -> ListenSpec {
    ListenSpec {
        address: address.to_owned(),
        ..ListenSpec::default()
    }
}

fn claim(generation: u64) -> Option<Claim> {
    Some(Claim {
        owner: "proxyd /etc/proxyd.toml".into(),
        instance: "m1".into(),
        generation,
    })
}

fn request_seeds(listening: SocketAddr) -> Vec<Vec<u8>> {
    let req = |kind| {
        Request {
            id: 7,
            kind: Some(kind),
        }
        .encode_to_vec()
    };
    vec![
        req(request::Kind::Acquire(Acquire {
            listeners: vec![spec("127.0.0.1:0")],
            borrower: "proxyd worker gen 1".into(),
            claim: claim(1),
        })),
        req(request::Kind::Acquire(Acquire {
            listeners: vec![spec("127.0.0.2:0"), spec("127.0.0.3:00"), spec("[::1]:0")],
            borrower: "w".into(),
            claim: None,
        })),
        req(request::Kind::Release(Release {
            addresses: vec!["127.0.0.1:0".into()],
            claims: Some(ClaimRelease {
                owner: "proxyd /etc/proxyd.toml".into(),
                instance: "m1".into(),
                below: 2,
                keep: vec![1],
            }),
        })),
        req(request::Kind::Release(Release {
            addresses: vec![],
            claims: None,
        })),
        req(request::Kind::List(List {})),
        req(request::Kind::Deposit(Deposit {
            listeners: vec![spec(&listening.to_string())],
            claim: claim(3),
        })),
        req(request::Kind::Deposit(Deposit {
            listeners: vec![
                spec("127.0.0.1:0"),
                spec("127.0.0.4:0"),
                spec("127.0.0.5:0"),
            ],
            claim: None,
        })),
    ]
}

/// What every registry must keep, whatever it was asked.
fn check_invariants(reg: &Registry) {
    assert!(
        reg.held.len() <= MAX_LISTENERS as usize,
        "{} held",
        reg.held.len()
    );
    assert!(
        reg.peers.len() <= 64 + 1,
        "{} peers remembered",
        reg.peers.len()
    );
    let mut inodes = BTreeSet::new();
    let held: Vec<_> = reg.held.iter().collect();
    for (i, (key, h)) in held.iter().enumerate() {
        assert!(h.claims.len() <= MAX_CLAIMS);
        assert!(
            h.lends.keys().all(|c| reg.peers.contains_key(c)),
            "{key} is lent to a forgotten peer"
        );
        let canonical = listener::parse_address(key).map(|a| a.to_string());
        assert_eq!(
            canonical.as_deref(),
            Ok(key.as_str()),
            "a key in canonical form"
        );
        assert!(
            inodes.insert(h.inode),
            "{key}: one socket held under two names"
        );
        for (other, o) in &held[..i] {
            let overlap = address::overlap(
                Bind::new(h.local_addr, h.spec.v6only),
                Bind::new(o.local_addr, o.spec.v6only),
            );
            assert!(overlap.is_none(), "{key} and {other} overlap");
        }
    }
}

/// Arbitrary bytes decoded as a `Request` and handled by the registry as a connected peer's
/// would be, with real fds beside deposits; the registry stays bounded and consistent.
#[test]
fn fuzz_lending_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut reg = Registry::new(Arc::new(config(dir.path())), false);
    let probes = Probes::new();
    let seeds = request_seeds(probes.listening_addr());
    let seeds: Vec<&[u8]> = seeds.iter().map(Vec::as_slice).collect();
    let mut conn = 1u64;
    let mut inputs = 0u64;
    run("lending_requests", &seeds, |input| {
        inputs += 1;
        let Ok(Request {
            kind: Some(kind), ..
        }) = Request::decode(input)
        else {
            return;
        };
        if !reg.peers.get(&conn).is_some_and(|p| p.connected) {
            reg.connected(
                conn,
                sys::PeerCred {
                    pid: 1,
                    uid: u32::from(input.first().copied().unwrap_or(0) % 2),
                    gid: 0,
                },
            );
        }
        let fds: Vec<OwnedFd> = match &kind {
            request::Kind::Deposit(d) => probes
                .pick(input.len() as u8)
                .into_iter()
                .take(d.listeners.len().min(4))
                .map(|fd| fd.try_clone_to_owned().expect("dup"))
                .collect(),
            _ if input.len() % 5 == 0 => vec![probes.pipe.try_clone().expect("dup")],
            _ => Vec::new(),
        };
        let asked = std::mem::discriminant(&kind);
        let acquire_len = match &kind {
            request::Kind::Acquire(a) => Some(a.listeners.len()),
            _ => None,
        };
        let (answer, lent) = reg.handle(conn, kind.clone(), fds);
        match (&kind, &answer) {
            (_, response::Kind::Error(e)) => assert!(!e.message.is_empty()),
            (request::Kind::Acquire(_), response::Kind::Acquired(a)) => {
                assert_eq!(Some(a.listeners.len()), acquire_len);
                assert_eq!(lent.len(), a.listeners.len());
            }
            (request::Kind::Release(_), response::Kind::Released(_))
            | (request::Kind::List(_), response::Kind::Listing(_))
            | (request::Kind::Deposit(_), response::Kind::Deposited(_)) => {
                assert!(lent.is_empty());
            }
            _ => panic!("{asked:?} answered with {answer:?}"),
        }
        let bytes = crate::registry::response(1, answer).encode_to_vec();
        assert!(bytes.len() <= MAX_DATAGRAM, "a {} byte answer", bytes.len());
        for fd in &lent {
            listener::verify_listening_tcp(fd.as_fd()).expect("lends only listening sockets");
        }
        drop(lent);
        // Borrowers come and go: a new connection every few requests.
        if inputs.is_multiple_of(3) {
            reg.disconnected(conn);
            conn += 1;
        }
        check_invariants(&reg);
    });
    // Every fd the registry was given is closed, or held as a listener.
    let held_probe = reg
        .held
        .values()
        .filter(|h| link_of(h.fd.as_fd()) == probes.listening_link)
        .count();
    let now = probes.counts();
    assert_eq!(now[0], probes.base[0], "pipe fds leaked");
    assert_eq!(now[1], probes.base[1] + held_probe, "listener fds leaked");
    assert_eq!(now[2], probes.base[2], "idle socket fds leaked");
}

/// A SEQPACKET listener on a temp path, for a client or a server under test.
fn seqpacket_listener(path: &std::path::Path) -> OwnedFd {
    let fd = seqpacket::socket().expect("socket");
    seqpacket::bind(fd.as_fd(), path).expect("bind");
    seqpacket::listen(fd.as_fd(), 8).expect("listen");
    fd
}

fn runtime() -> tokio::runtime::Runtime {
    common::daemon::runtime(1).expect("runtime")
}

/// A peer (here: fdkeeper's server, the real one) gets garbage, truncated datagrams, too many
/// fds, pipes and non-listening sockets through SCM_RIGHTS: it answers each with one response,
/// and every fd it received is closed unless it adopted a listening socket from a deposit.
#[test]
fn fuzz_lending_server_receive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    let probes = Probes::new();
    let registry = Arc::new(Mutex::new(Registry::new(
        Arc::new(config(dir.path())),
        false,
    )));
    let shutdown = CancellationToken::new();
    let path = dir.path().join("lend.sock");
    let acceptor = {
        let _guard = rt.enter();
        seqpacket::Acceptor::new(seqpacket_listener(&path)).expect("acceptor")
    };
    rt.spawn(crate::server::serve(
        acceptor,
        registry.clone(),
        TaskTracker::new(),
        shutdown.clone(),
    ));
    let peer = rt.block_on(SeqPacket::connect(&path)).expect("connect");
    let seeds = request_seeds(probes.listening_addr());
    let seeds: Vec<&[u8]> = seeds.iter().map(Vec::as_slice).collect();
    let mut reply = vec![0u8; MAX_DATAGRAM];
    run("lending_server_receive", &seeds, |input| {
        let choice = input.last().copied().unwrap_or(0);
        let fds = probes.pick(choice);
        // Now and then a datagram larger than fdkeeper reads; never more than the socket's
        // send buffer takes in one datagram.
        let mut data = input.to_vec();
        if choice % 16 == 15 {
            data.resize(MAX_REQUEST + 1 + input.len(), 0);
        }
        data.truncate(MAX_REQUEST + 4096);
        if data.is_empty() && fds.is_empty() {
            // An empty datagram reads as end of file: the server would hang up.
            return;
        }
        let got = rt.block_on(async {
            peer.send(&data, &fds).await.expect("send");
            tokio::time::timeout(
                Duration::from_secs(5),
                peer.recv(&mut reply, MAX_FDS_PER_MESSAGE),
            )
            .await
            .expect("fdkeeper answers every datagram")
            .expect("recv")
        });
        assert!(!got.truncated && !got.fds_truncated);
        let resp = Response::decode(&reply[..got.len]).expect("a decodable answer");
        let refused = matches!(resp.kind, Some(response::Kind::Error(_)));
        let bad_input = data.len() > MAX_REQUEST
            || fds.len() > MAX_FDS_PER_MESSAGE
            || Request::decode(data.as_slice()).map_or(true, |r| r.kind.is_none());
        assert!(!bad_input || refused, "accepted a bad request: {resp:?}");
        drop(got);
        let reg = crate::server::lock(&registry);
        check_invariants(&reg);
        let held_probe = reg
            .held
            .values()
            .filter(|h| link_of(h.fd.as_fd()) == probes.listening_link)
            .count();
        drop(reg);
        let now = probes.counts();
        assert_eq!(now[0], probes.base[0], "a received pipe fd stayed open");
        assert_eq!(
            now[1],
            probes.base[1] + held_probe,
            "a received socket fd stayed open"
        );
        assert_eq!(now[2], probes.base[2], "a received idle socket stayed open");
    });
    shutdown.cancel();
}

/// The borrower's side: whatever fdkeeper answers (fuzzed bytes, with the request's id put in
/// when they decode) and whatever fds it sends, the client returns an error or listeners that
/// listen, and keeps no fd it refused.
#[test]
fn fuzz_lending_client_receive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    let probes = Probes::new();
    let path = dir.path().join("fake-keeper.sock");
    let listener_fd = seqpacket_listener(&path);
    let (mut client, server) = rt.block_on(async {
        let client = Client::connect(&path).await.expect("connect");
        let accepted = loop {
            match seqpacket::accept(listener_fd.as_fd()) {
                Ok(fd) => break fd,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        (client, SeqPacket::new(accepted).expect("server end"))
    });
    let lent_at = probes.listening_addr();
    let response_seeds: Vec<Vec<u8>> = [
        response::Kind::Acquired(proto::fdlend::v1::Acquired {
            listeners: vec![proto::fdlend::v1::Lent {
                spec: Some(spec(&lent_at.to_string())),
                local_address: lent_at.to_string(),
                inode: 1,
            }],
            instance: None,
        }),
        response::Kind::Listing(proto::fdlend::v1::Listing::default()),
        response::Kind::Released(proto::fdlend::v1::Released {
            closed: vec!["127.0.0.1:0".into()],
            ..Default::default()
        }),
        response::Kind::Deposited(proto::fdlend::v1::Deposited::default()),
        crate::registry::error_kind(proto::fdlend::v1::error::Code::BindFailed, "busy"),
    ]
    .into_iter()
    .map(|k| crate::registry::response(1, k).encode_to_vec())
    .collect();
    let seeds: Vec<&[u8]> = response_seeds.iter().map(Vec::as_slice).collect();
    let mut buf = vec![0u8; MAX_REQUEST];
    run("lending_client_receive", &seeds, |input| {
        let choice = input.last().copied().unwrap_or(0);
        let fds = probes.pick(choice);
        let server_side = async {
            let got = server
                .recv(&mut buf, MAX_FDS_PER_MESSAGE)
                .await
                .expect("request");
            let id = Request::decode(&buf[..got.len])
                .expect("the client's request")
                .id;
            let data = match Response::decode(input) {
                Ok(mut r) => {
                    r.id = id;
                    r.encode_to_vec()
                }
                Err(_) => input.to_vec(),
            };
            // An empty datagram reads as end of file: the client would take fdkeeper as gone.
            let mut data = if data.is_empty() {
                vec![0x08, 0x00]
            } else {
                data
            };
            // One datagram must fit the socket's send buffer (~208 KiB by default).
            data.truncate(128 * 1024);
            server.send(&data, &fds).await.expect("answer");
        };
        let client_side = async {
            match choice % 3 {
                0 => client
                    .acquire("fuzz", &[spec("127.0.0.1:0")])
                    .await
                    .map(|lent| {
                        for l in &lent {
                            listener::verify_listening_tcp(l.listener.as_fd())
                                .expect("a lent listener listens");
                        }
                        lent.len()
                    }),
                1 => client.list().await.map(|l| l.listeners.len()),
                _ => client
                    .release(&["127.0.0.1:0".to_owned()])
                    .await
                    .map(|r| r.closed.len()),
            }
        };
        let (result, ()) = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), async {
                tokio::join!(client_side, server_side)
            })
            .await
            .expect("the client returns")
        });
        match result {
            Ok(_) | Err(ClientError::Refused { .. } | ClientError::Protocol(_)) => {}
            Err(e) => panic!("the connection broke: {e}"),
        }
        // Lent listeners were dropped with the result; refused fds were never kept.
        assert_eq!(
            probes.counts(),
            probes.base,
            "the client kept a received fd"
        );
    });
}
