//! The three nodes of the peers bench: ours (stickd) or HAProxy peered in mypeers, and their
//! tables.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use proto::stick::v1 as pb;
use proto::stick::v1::stick_client::StickClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{CHECK, Equal, HAPROXY_SIZE, POLL, SIZE, TABLE, Waited, differing};
use crate::cluster::{self, START_TIMEOUT};
use crate::configs::{self, haproxy};
use crate::e2e::lb::Lb;
use crate::harness::{self, Env, Proc};

/// Three running nodes of one system.
pub(super) struct Nodes {
    pub(super) frontends: Vec<SocketAddr>,
    kind: Kind,
    /// stickd clients kept between polls: a new gRPC connection per read would cost more than
    /// the read and blur the times (HAProxy's CLI is one cheap unix connection per command).
    clients: std::sync::Mutex<[Option<StickClient<tonic::transport::Channel>>; 3]>,
}

enum Kind {
    Ours(Lb),
    Haproxy(Haproxy),
}

/// Three HAProxy processes peered in `mypeers`, in front of their own two demo backends.
struct Haproxy {
    /// Held: the temp dir with configs, stats sockets and logs.
    _env: Env,
    /// Held: the demo backends; dropping a `Proc` kills it.
    _backends: Vec<Proc>,
    /// HAProxy on node `i`.
    procs: Vec<Proc>,
    stats: Vec<PathBuf>,
    /// Server names by HAProxy's `server_id` (1-based, in config order).
    servers: Vec<String>,
}

impl Nodes {
    /// Our three nodes (fdkeeper + stickd + proxyd each, the seed's sticky config).
    pub(super) async fn ours() -> Result<Nodes> {
        let env = Env::new("bench-peers-stickd")?;
        let lb = Lb::start_sized(env, 3, None, "5m", SIZE).await?;
        Ok(Nodes {
            frontends: lb.nodes.iter().map(|n| n.frontend).collect(),
            kind: Kind::Ours(lb),
            clients: Default::default(),
        })
    }

    /// Three HAProxy processes (`nbthread 1`, foreground) on 127.0.0.1-3, peered.
    pub(super) async fn haproxy(bin: &Path) -> Result<Nodes> {
        let mut env = Env::new("bench-peers-haproxy")?;
        let names = vec!["app1".to_owned(), "app2".to_owned()];
        let backends = cluster::start_backends(&mut env, &names, 1, Duration::ZERO, None).await?;
        let servers: Vec<(String, SocketAddr)> =
            backends.iter().map(|(n, a, _)| (n.clone(), *a)).collect();
        let peers = (1..=3)
            .map(|h| env.free_port(h))
            .collect::<Result<Vec<_>>>()?;
        let frontends = (1..=3)
            .map(|h| env.free_port(h))
            .collect::<Result<Vec<_>>>()?;
        let mut procs = Vec::new();
        let mut stats = Vec::new();
        for h in 1..=3u8 {
            let socket = env.path(&format!("h{h}/stats.sock"));
            let config = env.write(
                &format!("h{h}/haproxy.cfg"),
                &haproxy_config(&socket, &peers, frontends[usize::from(h) - 1], &servers).render(),
            )?;
            procs.push(env.spawn(
                &format!("haproxy-n{h}"),
                bin,
                [
                    "-db".as_ref(),
                    "-L".as_ref(),
                    format!("haproxy{h}").as_ref(),
                    "-f".as_ref(),
                    config.as_os_str(),
                ],
            )?);
            stats.push(socket);
        }
        for (f, s) in frontends.iter().zip(&stats) {
            harness::wait_tcp(*f, START_TIMEOUT).await?;
            harness::wait_unix(s, START_TIMEOUT).await?;
        }
        // Replication starts once each process has a session with both others; a store made
        // before that would only reach them by a later resync.
        for s in &stats {
            harness::wait_for("haproxy peers to connect", START_TIMEOUT, || async {
                let out = haproxy_cmd(s, "show peers").await?;
                let up = out
                    .lines()
                    .filter(|l| l.contains("(remote,") && l.contains("last_status=ESTA"))
                    .count();
                Ok((up == 2).then_some(()))
            })
            .await?;
        }
        Ok(Nodes {
            frontends,
            clients: Default::default(),
            kind: Kind::Haproxy(Haproxy {
                _env: env,
                _backends: backends.into_iter().map(|(_, _, p)| p).collect(),
                procs,
                stats,
                servers: names,
            }),
        })
    }

    /// A connected client for stickd on node `i` (ours only).
    async fn client(&self, lb: &Lb, i: usize) -> Result<StickClient<tonic::transport::Channel>> {
        let cached = self.lock_clients()[i].clone();
        if let Some(c) = cached {
            return Ok(c);
        }
        let c = cluster::stick_client(&lb.nodes[i].stickd_socket).await?;
        self.lock_clients()[i] = Some(c.clone());
        Ok(c)
    }

    fn lock_clients(
        &self,
    ) -> std::sync::MutexGuard<'_, [Option<StickClient<tonic::transport::Channel>>; 3]> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Entries in node `i`'s table, from the table header (cheap: no entry is listed).
    pub(super) async fn used(&self, i: usize) -> Result<u64> {
        let r = self.read_used(i).await;
        if r.is_err() {
            // A killed stickd: connect afresh next time.
            self.lock_clients()[i] = None;
        }
        r
    }

    async fn read_used(&self, i: usize) -> Result<u64> {
        match &self.kind {
            Kind::Ours(lb) => {
                let mut c = self.client(lb, i).await?;
                let tables = c.list_tables(pb::ListTablesRequest {}).await?.into_inner();
                tables
                    .tables
                    .iter()
                    .find(|t| t.name == TABLE)
                    .map(|t| t.used)
                    .with_context(|| format!("stickd on node{} has no table {TABLE}", i + 1))
            }
            Kind::Haproxy(h) => parse_used(&haproxy_cmd(&h.stats[i], "show table").await?),
        }
    }

    /// key -> server name of node `i`'s table.
    async fn table(&self, i: usize) -> Result<BTreeMap<String, String>> {
        match &self.kind {
            Kind::Ours(lb) => {
                // About 1.5 MB a page: under tonic's 4 MB default message limit.
                let r = cluster::stick_table(&mut self.client(lb, i).await?, TABLE, 20_000).await;
                if r.is_err() {
                    self.lock_clients()[i] = None;
                }
                r
            }
            Kind::Haproxy(h) => parse_table(
                &haproxy_cmd(&h.stats[i], &format!("show table {TABLE}")).await?,
                &h.servers,
            ),
        }
    }

    async fn tables(&self) -> Result<[BTreeMap<String, String>; 3]> {
        let (a, b, c) = tokio::join!(self.table(0), self.table(1), self.table(2));
        Ok([a?, b?, c?])
    }

    /// kill -9 of what holds node `i`'s table: stickd for ours (proxyd keeps serving from its
    /// cache), the HAProxy process for theirs.
    pub(super) fn kill9(&mut self, i: usize) -> Result<()> {
        match &mut self.kind {
            Kind::Ours(lb) => lb.nodes[i].stickd.kill9(),
            Kind::Haproxy(h) => h.procs[i].kill9(),
        }
    }

    /// Starts node `i`'s table holder again with the same command line.
    pub(super) fn restart(&mut self, i: usize) -> Result<()> {
        self.lock_clients()[i] = None;
        match &mut self.kind {
            Kind::Ours(lb) => lb.nodes[i].stickd.restart(),
            Kind::Haproxy(h) => h.procs[i].restart(),
        }
    }

    /// Polls until the three tables hold the same keys and servers, at least `expected` of
    /// them, or until `bound` after `since`. The time is taken when the cheap header counts
    /// agreed, if the full reads that follow show the contents equal with the same counts (then
    /// they were equal already at the header read: tables only grow here); else after the reads.
    pub(super) async fn wait_equal(
        &self,
        expected: u64,
        bound: Duration,
        since: Instant,
    ) -> Waited {
        let deadline = since + bound;
        let mut first = None;
        let mut answered = None;
        let mut round = 0;
        loop {
            let (a, b, c) = tokio::join!(self.used(0), self.used(1), self.used(2));
            if let (Ok(a), Ok(b), Ok(c)) = (&a, &b, &c) {
                if round == 0 {
                    first = Some([*a, *b, *c]);
                }
                answered.get_or_insert_with(|| since.elapsed());
            }
            round += 1;
            // A node that does not answer yet (a restarted one) is "not equal yet".
            if let (Ok(a), Ok(b), Ok(c)) = (a, b, c)
                && a == b
                && b == c
                && a >= expected
            {
                let agreed = Instant::now();
                if let Ok(t) = self.tables().await
                    && t[0] == t[1]
                    && t[1] == t[2]
                {
                    let at = if t[0].len() as u64 == a {
                        agreed
                    } else {
                        Instant::now()
                    };
                    return Waited {
                        equal: Equal::After(at.duration_since(since)),
                        first,
                        answered,
                    };
                }
            }
            if Instant::now() >= deadline {
                let differ = match self.tables().await {
                    Ok(t) => differing(&t, expected),
                    Err(_) => expected,
                };
                return Waited {
                    equal: Equal::Not { bound, differ },
                    first,
                    answered,
                };
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// One node's HAProxy config: the seed's (global, peers, defaults, frontend, backend) with
/// loopback addresses, `nbthread 1`, a stats socket in the temp dir and no daemon, chroot or log.
fn haproxy_config(
    stats: &Path,
    peers: &[SocketAddr],
    frontend: SocketAddr,
    servers: &[(String, SocketAddr)],
) -> configs::Haproxy {
    let mut backend = haproxy::Backend::seed(
        TABLE,
        haproxy::StickTable {
            size: HAPROXY_SIZE,
            peers: true,
        },
        haproxy::servers(servers, CHECK),
    );
    backend.options = vec!["http-server-close", "redispatch"];
    configs::Haproxy {
        comment: "HAProxy for bench peers: the seed's stick-table replication between three peers.",
        global: haproxy::Global {
            // The seed's 20000 needs 40k file descriptors, over this machine's hard limit
            // (HAProxy refuses to start); 8000 is far above the 16 connections per node used here.
            maxconn: Some(8000),
            stats_socket: Some(haproxy::StatsSocket {
                path: stats.to_owned(),
                expose_fd_listeners: false,
            }),
            no_exit_on_failure: false,
            ..haproxy::Global::default()
        },
        peers: peers
            .iter()
            .enumerate()
            .map(|(i, a)| (format!("haproxy{}", i + 1), *a))
            .collect(),
        defaults: haproxy::Defaults::seed("http-server-close", "1s"),
        frontend: haproxy::Frontend {
            name: "http-in",
            bind: frontend,
        },
        backend,
    }
}

/// One command on a HAProxy stats socket (non-interactive: HAProxy answers and closes).
async fn haproxy_cmd(socket: &Path, cmd: &str) -> Result<String> {
    let fut = async {
        let mut s = tokio::net::UnixStream::connect(socket).await?;
        s.write_all(format!("{cmd}\n").as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        anyhow::Ok(String::from_utf8_lossy(&out).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .with_context(|| format!("`{cmd}` on {} took over 10 s", socket.display()))?
        .with_context(|| format!("`{cmd}` on {}", socket.display()))
}

/// `used` of our table from `show table`'s header lines
/// (`# table: dynamic_group, type: string, size:1048576, used:15`).
fn parse_used(out: &str) -> Result<u64> {
    out.lines()
        .filter(|l| l.starts_with("# table: ") && l.contains(&format!(" {TABLE},")))
        .find_map(|l| l.split("used:").nth(1))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no header for table {TABLE} in `show table`: {out:?}"))
}

/// key -> server name from `show table NAME` entry lines
/// (`0x55…: key=ludl48… use=0 exp=299241 server_id=2 server_key=app2`).
fn parse_table(out: &str, servers: &[String]) -> Result<BTreeMap<String, String>> {
    let mut table = BTreeMap::new();
    for line in out.lines().filter(|l| l.starts_with("0x")) {
        // One pass over the words: tens of thousands of lines are read per poll.
        let (mut key, mut name, mut id) = (None, None, None);
        for w in line.split_ascii_whitespace() {
            if let Some(v) = w.strip_prefix("key=") {
                key = Some(v);
            } else if let Some(v) = w.strip_prefix("server_key=") {
                name = Some(v);
            } else if let Some(v) = w.strip_prefix("server_id=") {
                id = Some(v);
            }
        }
        let key = key.with_context(|| format!("no key in {line:?}"))?;
        // server_key (HAProxy 2.5+) names the server; older ones only give its id.
        let server = match name {
            Some(name) => name.to_owned(),
            None => {
                let id: usize = id
                    .and_then(|v| v.parse().ok())
                    .with_context(|| format!("no server in {line:?}"))?;
                servers
                    .get(id.wrapping_sub(1))
                    .cloned()
                    .unwrap_or_else(|| format!("#{id}"))
            }
        };
        table.insert(key.to_owned(), server);
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOW: &str = "# table: dynamic_group, type: string, size:5120, used:3\n\
        0x1551cc4: key=1t1lr3s5s7pm4tuu3476c40jk3 use=0 exp=286311 server_id=2\n\
        0x1551f04: key=3m3o6qkfvk8l4lenk0k8to2bd6 use=0 exp=288500 server_id=1\n\
        0x55de4c3e71a0: key=8bg6ej7md7453sp0rrgi5vsiu7 use=0 exp=298787 server_id=1 server_key=app2\n\n";

    #[test]
    fn parses_haproxy_show_table() {
        assert_eq!(parse_used(SHOW).expect("the header parses"), 3);
        let t =
            parse_table(SHOW, &["app1".to_owned(), "app2".to_owned()]).expect("the entries parse");
        let want: BTreeMap<String, String> = [
            ("1t1lr3s5s7pm4tuu3476c40jk3", "app2"),
            ("3m3o6qkfvk8l4lenk0k8to2bd6", "app1"),
            // server_key wins over server_id: it is the name HAProxy matched on.
            ("8bg6ej7md7453sp0rrgi5vsiu7", "app2"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(t, want);
        assert!(parse_used("# table: other, type: ip, size:10, used:1\n").is_err());
        assert!(parse_table("0x1: use=0 server_id=1\n", &[]).is_err());
    }
}
