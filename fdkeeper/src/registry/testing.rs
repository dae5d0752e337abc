//! Registries and requests for the registry's unit tests.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use common::SourceFile;
use proto::fdlend::v1::{Acquire, Claim, ClaimRelease, ListenSpec, Release, Released};

use super::{Failure, Registry};
use crate::config::Config;
use crate::sys::PeerCred;

pub fn registry() -> Registry {
    let text = "socket = \"/x/s\"\nadmin = \"/x/a\"\nallowed_uids = [0]\nallowed_binds = [\"127.0.0.0/8\"]\n";
    let config = Config::from_source(&SourceFile::from_text("t.toml", text)).expect("config");
    Registry::new(Arc::new(config), false)
}

pub fn cred(pid: i32) -> PeerCred {
    PeerCred {
        pid,
        uid: 0,
        gid: 0,
    }
}

pub fn cred_uid(pid: i32, uid: u32) -> PeerCred {
    PeerCred { pid, uid, gid: uid }
}

pub fn claim(owner: &str, instance: &str, generation: u64) -> Option<Claim> {
    Some(Claim {
        owner: owner.into(),
        instance: instance.into(),
        generation,
    })
}

pub fn acquire_as(reg: &mut Registry, conn: u64, addr: &str, c: Option<Claim>) -> Vec<OwnedFd> {
    let req = Acquire {
        listeners: vec![ListenSpec {
            address: addr.into(),
            ..ListenSpec::default()
        }],
        borrower: format!("conn {conn}"),
        claim: c,
    };
    reg.acquire(conn, req)
        .map_err(|f| f.message)
        .expect("acquire")
        .1
}

pub fn release_as(
    reg: &mut Registry,
    conn: u64,
    addrs: &[&str],
    owner: &str,
    instance: &str,
    below: u64,
    keep: &[u64],
) -> Result<Released, Failure> {
    reg.release(
        conn,
        Release {
            addresses: addrs.iter().map(|a| (*a).to_owned()).collect(),
            claims: Some(ClaimRelease {
                owner: owner.into(),
                instance: instance.into(),
                below,
                keep: keep.to_vec(),
            }),
        },
    )
}

/// The address a held socket's kernel picked, to connect to it.
pub fn bound(reg: &Registry, key: &str) -> SocketAddr {
    reg.held.get(key).expect("held").local_addr
}

pub fn refused(addr: SocketAddr) -> bool {
    matches!(
        std::net::TcpStream::connect(addr),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}
