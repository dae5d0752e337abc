//! A nameserver on loopback for tests and e2e scenarios: one name with an A record the caller
//! changes at will, NXDOMAIN for every other name.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinEncodable};

/// A nameserver on 127.0.0.1 that answers its name with the A record the caller sets, and
/// NXDOMAIN for any other name.
pub struct Nameserver {
    pub addr: SocketAddr,
    /// The address the name resolves to: set it to move the name.
    pub answer: Arc<Mutex<Ipv4Addr>>,
    /// How many queries it has answered.
    pub queries: Arc<AtomicUsize>,
}

/// Starts a [`Nameserver`] for `name` (fully qualified: `app.test.`) answering `first`; it
/// serves until the tokio runtime it runs on stops.
pub async fn nameserver(name: &str, first: Ipv4Addr) -> std::io::Result<Nameserver> {
    let name = Name::from_ascii(name)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let addr = socket.local_addr()?;
    let answer = Arc::new(Mutex::new(first));
    let queries = Arc::new(AtomicUsize::new(0));
    let (a, q) = (answer.clone(), queries.clone());
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                return;
            };
            let Ok(req) = Message::from_bytes(&buf[..n]) else {
                continue;
            };
            q.fetch_add(1, Ordering::SeqCst);
            let mut resp = Message::new();
            resp.set_id(req.id())
                .set_message_type(MessageType::Response)
                .set_op_code(req.op_code())
                .set_authoritative(true)
                .set_recursion_desired(req.recursion_desired())
                .set_recursion_available(true)
                .add_queries(req.queries().to_vec());
            for query in req.queries() {
                if query.name() != &name {
                    resp.set_response_code(ResponseCode::NXDomain);
                } else if query.query_type() == RecordType::A {
                    let ip = *a.lock().unwrap_or_else(|p| p.into_inner());
                    resp.add_answer(Record::from_rdata(name.clone(), 1, RData::A(A(ip))));
                }
            }
            if let Ok(bytes) = resp.to_bytes() {
                let _ = socket.send_to(&bytes, from).await;
            }
        }
    });
    Ok(Nameserver {
        addr,
        answer,
        queries,
    })
}
