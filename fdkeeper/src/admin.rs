//! `fdkeeper.v1.Admin`: what fdkeeper holds, each socket's accept queue, and who borrowed it.

use std::os::fd::AsFd;

use common::time::unix_secs;
use proto::fdkeeper::v1::admin_server::Admin;
use proto::fdkeeper::v1::{Borrower, ListListenersReply, ListListenersRequest, Listener};
use tonic::{Request, Response, Status};

use crate::server::{Shared, lock};
use crate::sys;

#[derive(Debug)]
pub struct AdminService {
    registry: Shared,
}

impl AdminService {
    pub fn new(registry: Shared) -> Self {
        Self { registry }
    }
}

/// Builds the admin view (also used by tests).
pub fn list_listeners(registry: &Shared) -> ListListenersReply {
    let reg = lock(registry);
    let listeners = reg
        .held
        .iter()
        .map(|(address, h)| {
            let queue = sys::listen_queue(h.fd.as_fd()).unwrap_or_default();
            let borrowers = h
                .lends
                .iter()
                .filter_map(|(conn, at)| {
                    reg.peers.get(conn).map(|p| Borrower {
                        pid: u32::try_from(p.cred.pid).unwrap_or(0),
                        uid: p.cred.uid,
                        gid: p.cred.gid,
                        name: p.name.clone(),
                        last_lent_unix: unix_secs(*at),
                        connected: p.connected,
                    })
                })
                .collect();
            Listener {
                address: address.clone(),
                local_address: h.local_addr.to_string(),
                backlog: if queue.backlog != 0 {
                    queue.backlog
                } else {
                    h.spec.backlog
                },
                reuseport: h.spec.reuseport,
                v6only: h.spec.v6only,
                defer_accept_secs: h.spec.defer_accept_secs,
                fastopen_queue: h.spec.fastopen_queue,
                freebind: h.spec.freebind,
                inode: h.inode,
                accept_queue: queue.queued,
                times_lent: h.times_lent,
                borrowers,
                origin: h.origin.as_str().to_owned(),
                held_since_unix: unix_secs(h.held_since),
                claims: h.claims.iter().map(ToString::to_string).collect(),
                pinned: h.pinned,
                closing: h.closing,
            }
        })
        .collect();
    ListListenersReply {
        listeners,
        instance_id: reg.instance.id.clone(),
        pid: reg.instance.pid,
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_listeners(
        &self,
        _request: Request<ListListenersRequest>,
    ) -> Result<Response<ListListenersReply>, Status> {
        Ok(Response::new(list_listeners(&self.registry)))
    }
}
