//! `stickd table show|set|delete|clear`: the operator's stick-table commands over the local
//! socket (the same `stick.v1.Stick` service grpcurl speaks), printed as HAProxy's
//! `show table` prints them.

use std::future::Future;
use std::path::Path;

use common::daemon::{EXIT_CONFIG, EXIT_FAILURE, EXIT_OK};
use proto::stick::v1 as pb;
use proto::stick::v1::stick_client::StickClient;
use tonic::transport::Channel;

use crate::Config;

/// What an operator asks of a table.
#[derive(Debug)]
pub enum TableOp {
    /// Every table's summary, or one table's entries (only `key`, when given).
    Show {
        table: Option<String>,
        key: Option<String>,
    },
    Set {
        table: String,
        key: String,
        server: String,
    },
    Delete {
        table: String,
        key: String,
    },
    Clear {
        table: String,
    },
}

/// Runs `op` against the stickd of the config at `path`; exit 0, 64 for a config that cannot
/// be read, 1 when stickd cannot be reached or refuses (its reason is printed).
/// The local peer's name plays no part: only the socket is read from the config.
pub fn table(path: &Path, op: TableOp) -> i32 {
    let socket = match Config::local_socket(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("stickd: {e}");
            return EXIT_CONFIG;
        }
    };
    with_client(&socket, |client| run(client, op))
}

fn with_client<F, Fut>(socket: &Path, f: F) -> i32
where
    F: FnOnce(StickClient<Channel>) -> Fut,
    Fut: Future<Output = Result<(), tonic::Status>>,
{
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stickd: {e}");
            return EXIT_FAILURE;
        }
    };
    rt.block_on(async {
        let channel = match common::grpc::connect_unix(socket).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("stickd: cannot reach stickd at {}: {e}", socket.display());
                return EXIT_FAILURE;
            }
        };
        match f(StickClient::new(channel)).await {
            Ok(()) => EXIT_OK,
            Err(status) => {
                eprintln!("stickd: {:?}: {}", status.code(), status.message());
                EXIT_FAILURE
            }
        }
    })
}

async fn run(mut client: StickClient<Channel>, op: TableOp) -> Result<(), tonic::Status> {
    match op {
        TableOp::Show { table: None, .. } => {
            let reply = client
                .list_tables(pb::ListTablesRequest {})
                .await?
                .into_inner();
            for t in &reply.tables {
                println!("{}", table_line(t));
            }
        }
        TableOp::Show {
            table: Some(table),
            key,
        } => {
            let mut page_token = String::new();
            let mut first = true;
            loop {
                let reply = client
                    .show(pb::ShowRequest {
                        table: table.clone(),
                        key: key.clone().unwrap_or_default(),
                        page_token,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                if first && let Some(t) = &reply.table {
                    println!("{}", table_line(t));
                    first = false;
                }
                for e in &reply.entries {
                    println!("{}", entry_line(e));
                }
                if reply.next_page_token.is_empty() {
                    break;
                }
                page_token = reply.next_page_token;
            }
        }
        TableOp::Set { table, key, server } => {
            let reply = client
                .set(pb::SetRequest {
                    table,
                    key,
                    server,
                    expires_unix_ms: 0,
                })
                .await?
                .into_inner();
            if let Some(e) = reply.entry {
                println!("{}", entry_line(&e));
            }
        }
        TableOp::Delete { table, key } => {
            let reply = client
                .delete(pb::DeleteRequest { table, key })
                .await?
                .into_inner();
            println!(
                "{}",
                if reply.existed {
                    "deleted"
                } else {
                    "no such key (a tombstone replicates anyway)"
                }
            );
        }
        TableOp::Clear { table } => {
            let reply = client.clear(pb::ClearRequest { table }).await?.into_inner();
            println!("cleared {} entries", reply.removed);
        }
    }
    Ok(())
}

/// `# table: NAME, type: string, size:N, used:N` as HAProxy's `show table` heads a table.
fn table_line(t: &pb::TableInfo) -> String {
    let len = if t.r#type == "string" {
        format!(" len {}", t.len)
    } else {
        String::new()
    };
    format!(
        "# table: {}, type: {}{len}, size:{}, used:{}, expire:{}ms, tombstones:{}",
        t.name, t.r#type, t.size, t.used, t.expire_ms, t.tombstones
    )
}

/// `key=K use=0 exp=MS server_key=NAME` as HAProxy prints an entry (the server by name: names
/// identify servers across nodes), with the version and the peer that wrote it; `exp` by
/// stickd's clock.
fn entry_line(e: &pb::Entry) -> String {
    let exp = e.expires_in_ms.max(0);
    if e.deleted {
        return format!(
            "key={} exp={exp} deleted version={} origin={}",
            e.key, e.version, e.origin
        );
    }
    format!(
        "key={} use=0 exp={exp} server_key={} version={} origin={}",
        e.key, e.server, e.version, e.origin
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_read_like_haproxys_show_table() {
        let t = pb::TableInfo {
            name: "dynamic_group".into(),
            r#type: "string".into(),
            len: 32,
            size: 1024,
            expire_ms: 1_800_000,
            used: 2,
            ..Default::default()
        };
        assert_eq!(
            table_line(&t),
            "# table: dynamic_group, type: string len 32, size:1024, used:2, expire:1800000ms, tombstones:0"
        );
        let e = pb::Entry {
            key: "abc".into(),
            server: "app1".into(),
            expires_unix_ms: 10_500,
            version: 7,
            origin: "haproxy1".into(),
            deleted: false,
            expires_in_ms: 500,
        };
        assert_eq!(
            entry_line(&e),
            "key=abc use=0 exp=500 server_key=app1 version=7 origin=haproxy1"
        );
    }
}
