//! haproxy.cfg for the benches' comparisons: one thread (or as many as asked), in the foreground,
//! one frontend and one backend, and the seed's stick table and checks where a bench wants them.

use std::fmt::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use super::Servers;

/// A whole HAProxy config.
#[derive(Clone, Debug)]
pub struct Haproxy {
    /// The file's first line, after `# ` (none when empty).
    pub comment: &'static str,
    pub global: Global,
    /// The `mypeers` section: every peer by name (this process's is its `-L` name).
    pub peers: Vec<(String, SocketAddr)>,
    pub defaults: Defaults,
    pub frontend: Frontend,
    pub backend: Backend,
}

/// `global`: `nbthread 1` unless `nbthread` says otherwise, like proxyd's `threads` and nginx's
/// `worker_processes`.
#[derive(Clone, Debug, Default)]
pub struct Global {
    pub nbthread: Option<u32>,
    pub maxconn: Option<u64>,
    /// `log ADDR local0` (UDP syslog), with `log global` in `defaults`: where `option httplog`
    /// lines go.
    pub log: Option<SocketAddr>,
    pub stats_socket: Option<StatsSocket>,
    /// `master-worker no-exit-on-failure`.
    pub no_exit_on_failure: bool,
}

/// `stats socket PATH mode 600 level admin`.
#[derive(Clone, Debug)]
pub struct StatsSocket {
    pub path: PathBuf,
    /// `expose-fd listeners`: a new worker of a reload takes the listeners over.
    pub expose_fd_listeners: bool,
}

/// `defaults`, always `mode http`.
#[derive(Clone, Debug, Default)]
pub struct Defaults {
    /// Each written as `option ...`.
    pub options: Vec<&'static str>,
    pub retries: Option<u32>,
    /// `timeout NAME VALUE` lines.
    pub timeouts: Vec<(&'static str, &'static str)>,
    pub maxconn: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct Frontend {
    pub name: &'static str,
    pub bind: SocketAddr,
}

/// The frontend's default backend, `balance roundrobin`.
#[derive(Clone, Debug)]
pub struct Backend {
    pub name: String,
    pub stick: Option<StickTable>,
    /// Each written as `option ...`.
    pub options: Vec<&'static str>,
    /// `option httpchk GET PATH` expecting status 200.
    pub http_check: Option<&'static str>,
    pub servers: Vec<Server>,
}

/// The seed's stick table (string keys of 32 bytes, 5 minutes) and its PHPSESSID rules.
#[derive(Clone, Debug)]
pub struct StickTable {
    pub size: &'static str,
    /// Replicated to the `mypeers` section.
    pub peers: bool,
}

#[derive(Clone, Debug)]
pub struct Server {
    pub name: String,
    pub address: SocketAddr,
    /// What follows the address, e.g. `check inter 2s rise 1 maxconn 3000`.
    pub params: String,
}

/// Each server with the same `params`.
pub fn servers(servers: &Servers, params: &str) -> Vec<Server> {
    servers
        .iter()
        .map(|(name, address)| Server {
            name: name.clone(),
            address: *address,
            params: params.to_owned(),
        })
        .collect()
}

impl Defaults {
    /// The seed's defaults: `connection` (`http-keep-alive` or `http-server-close`),
    /// forwardfor, redispatch, its timeouts and `maxconn 18000`.
    pub fn seed(connection: &'static str, timeout_check: &'static str) -> Self {
        Self {
            options: vec![connection, "forwardfor except 127.0.0.0/8", "redispatch"],
            retries: None,
            timeouts: vec![
                ("http-request", "2s"),
                ("queue", "3s"),
                ("connect", "1s"),
                ("client", "10s"),
                ("server", "2s"),
                ("http-keep-alive", "10s"),
                ("check", timeout_check),
            ],
            maxconn: Some(18_000),
        }
    }
}

impl Backend {
    /// The seed's backend: named after its stick table, with the table, round robin and the
    /// HTTP check of `GET /index.php`.
    pub fn seed(table: &str, stick: StickTable, servers: Vec<Server>) -> Self {
        Self {
            name: table.to_owned(),
            stick: Some(stick),
            options: Vec::new(),
            http_check: Some("/index.php"),
            servers,
        }
    }
}

impl Haproxy {
    pub fn render(&self) -> String {
        let mut s = String::new();
        if !self.comment.is_empty() {
            let _ = writeln!(s, "# {}", self.comment);
        }
        let g = &self.global;
        let _ = writeln!(s, "global\n    nbthread {}", g.nbthread.unwrap_or(1));
        if let Some(n) = g.maxconn {
            let _ = writeln!(s, "    maxconn {n}");
        }
        if let Some(addr) = g.log {
            let _ = writeln!(s, "    log {addr} local0");
        }
        if let Some(st) = &g.stats_socket {
            let expose = if st.expose_fd_listeners {
                " expose-fd listeners"
            } else {
                ""
            };
            let _ = writeln!(
                s,
                "    stats socket {} mode 600 level admin{expose}",
                st.path.display()
            );
        }
        if g.no_exit_on_failure {
            s.push_str("    master-worker no-exit-on-failure\n");
        }
        if !self.peers.is_empty() {
            s.push_str("\npeers mypeers\n");
            for (name, address) in &self.peers {
                let _ = writeln!(s, "    peer {name} {address}");
            }
        }
        let d = &self.defaults;
        s.push_str("\ndefaults\n    mode http\n");
        if g.log.is_some() {
            s.push_str("    log global\n");
        }
        for o in &d.options {
            let _ = writeln!(s, "    option {o}");
        }
        if let Some(n) = d.retries {
            let _ = writeln!(s, "    retries {n}");
        }
        for (name, value) in &d.timeouts {
            let _ = writeln!(s, "    timeout {name} {value}");
        }
        if let Some(n) = d.maxconn {
            let _ = writeln!(s, "    maxconn {n}");
        }
        let b = &self.backend;
        let _ = write!(
            s,
            "\nfrontend {}\n    bind {}\n    default_backend {}\n\nbackend {}\n",
            self.frontend.name, self.frontend.bind, b.name, b.name
        );
        if let Some(t) = &b.stick {
            let peers = if t.peers { " peers mypeers" } else { "" };
            let _ = writeln!(
                s,
                "    stick-table type string len 32 size {} expire 5m{peers}",
                t.size
            );
            s.push_str("    stick on req.cook(PHPSESSID)\n");
            s.push_str("    stick store-response res.cook(PHPSESSID)\n");
        }
        s.push_str("    balance roundrobin\n");
        for o in &b.options {
            let _ = writeln!(s, "    option {o}");
        }
        if let Some(path) = b.http_check {
            let _ = writeln!(
                s,
                "    option httpchk GET {path}\n    http-check expect status 200"
            );
        }
        for v in &b.servers {
            let params = if v.params.is_empty() {
                String::new()
            } else {
                format!(" {}", v.params)
            };
            let _ = writeln!(s, "    server {} {}{params}", v.name, v.address);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_seed_with_peers() {
        let servers = servers(
            &[("app1".to_owned(), "127.0.0.2:9001".parse().expect("addr"))],
            "check inter 300ms",
        );
        let h = Haproxy {
            comment: "test",
            global: Global {
                nbthread: None,
                maxconn: Some(8000),
                log: None,
                stats_socket: Some(StatsSocket {
                    path: "/d/stats.sock".into(),
                    expose_fd_listeners: false,
                }),
                no_exit_on_failure: false,
            },
            peers: vec![(
                "haproxy1".to_owned(),
                "127.0.0.1:10000".parse().expect("addr"),
            )],
            defaults: Defaults::seed("http-server-close", "1s"),
            frontend: Frontend {
                name: "http-in",
                bind: "127.0.0.1:8080".parse().expect("addr"),
            },
            backend: Backend::seed(
                "dynamic_group",
                StickTable {
                    size: "1m",
                    peers: true,
                },
                servers,
            ),
        }
        .render();
        assert!(
            h.starts_with("# test\nglobal\n    nbthread 1\n    maxconn 8000\n"),
            "{h}"
        );
        assert!(
            h.contains("    stats socket /d/stats.sock mode 600 level admin\n"),
            "{h}"
        );
        assert!(
            h.contains("peers mypeers\n    peer haproxy1 127.0.0.1:10000\n"),
            "{h}"
        );
        assert!(
            h.contains("    option forwardfor except 127.0.0.0/8\n"),
            "{h}"
        );
        assert!(
            h.contains("    timeout check 1s\n    maxconn 18000\n"),
            "{h}"
        );
        assert!(h.contains("default_backend dynamic_group\n"), "{h}");
        assert!(
            h.contains("stick-table type string len 32 size 1m expire 5m peers mypeers\n"),
            "{h}"
        );
        assert!(
            h.contains("    server app1 127.0.0.2:9001 check inter 300ms\n"),
            "{h}"
        );
        assert!(!h.contains("log"), "{h}");
    }

    #[test]
    fn renders_threads_and_the_log_target() {
        let mut defaults = Defaults::seed("http-keep-alive", "2s");
        defaults.options.push("httplog");
        let h = Haproxy {
            comment: "",
            global: Global {
                nbthread: Some(2),
                log: Some("127.0.0.1:5140".parse().expect("addr")),
                ..Global::default()
            },
            peers: Vec::new(),
            defaults,
            frontend: Frontend {
                name: "http-in",
                bind: "127.0.0.1:8080".parse().expect("addr"),
            },
            backend: Backend::seed(
                "t",
                StickTable {
                    size: "1m",
                    peers: false,
                },
                Vec::new(),
            ),
        }
        .render();
        assert!(
            h.starts_with("global\n    nbthread 2\n    log 127.0.0.1:5140 local0\n"),
            "{h}"
        );
        assert!(
            h.contains("defaults\n    mode http\n    log global\n"),
            "{h}"
        );
        assert!(h.contains("    option httplog\n"), "{h}");
    }
}
