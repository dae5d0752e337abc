//! proxyd.toml: `[global]`, `[defaults]`, frontends and backends, and the seed's sticky setup.

use std::fmt::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::{Servers, bare_line, comment_line, quoted, string_line};

/// A whole proxyd config.
#[derive(Clone, Debug)]
pub struct Proxyd {
    /// The file's first line, after `# ` (none when empty).
    pub comment: &'static str,
    pub global: Global,
    pub defaults: Defaults,
    pub frontends: Vec<Frontend>,
    pub backends: Vec<Backend>,
}

#[derive(Clone, Debug)]
pub struct Global {
    pub admin_socket: PathBuf,
    pub fdkeeper_socket: PathBuf,
    pub stickd_socket: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    pub drain_timeout: Option<&'static str>,
    pub max_draining: Option<u32>,
    pub threads: Option<u32>,
    pub server_state_file: Option<PathBuf>,
    pub worker_ready_timeout: Option<&'static str>,
}

/// `[defaults]`; written only when something in it is set.
#[derive(Clone, Debug, Default)]
pub struct Defaults {
    pub timeout_http_request: Option<&'static str>,
    pub timeout_queue: Option<&'static str>,
    pub timeout_connect: Option<&'static str>,
    pub timeout_client: Option<&'static str>,
    pub timeout_server: Option<&'static str>,
    pub timeout_http_keep_alive: Option<&'static str>,
    pub timeout_check: Option<&'static str>,
    pub maxconn: Option<u32>,
    pub retries: Option<u32>,
    pub redispatch: Option<bool>,
    pub forwardfor: Option<bool>,
    pub forwardfor_except: Option<&'static str>,
}

#[derive(Clone, Debug)]
pub struct Frontend {
    pub name: String,
    pub bind: Vec<SocketAddr>,
    pub mode: Option<&'static str>,
    pub default_backend: String,
}

#[derive(Clone, Debug)]
pub struct Backend {
    pub name: String,
    pub balance: Option<&'static str>,
    pub check: Option<Check>,
    pub stick: Option<Stick>,
    pub servers: Vec<Server>,
}

/// `[backend.check]`: a TCP connect, or `GET path` expecting 200 when `http_get` is set.
#[derive(Clone, Debug)]
pub struct Check {
    pub http_get: Option<&'static str>,
    pub inter: String,
    pub fall: u32,
}

/// `[backend.stick]`.
#[derive(Clone, Debug)]
pub struct Stick {
    pub on: &'static str,
    pub store_response: Option<&'static str>,
}

#[derive(Clone, Debug)]
pub struct Server {
    pub name: String,
    pub address: SocketAddr,
    pub check: Option<bool>,
    pub rise: Option<u32>,
    pub maxconn: Option<u32>,
}

impl Server {
    /// A server with proxyd's defaults for everything but its address.
    pub fn plain(name: &str, address: SocketAddr) -> Self {
        Self {
            name: name.to_owned(),
            address,
            check: None,
            rise: None,
            maxconn: None,
        }
    }
}

impl Global {
    pub fn new(admin_socket: &Path, fdkeeper_socket: &Path) -> Self {
        Self {
            admin_socket: admin_socket.to_owned(),
            fdkeeper_socket: fdkeeper_socket.to_owned(),
            stickd_socket: None,
            metrics: None,
            drain_timeout: None,
            max_draining: None,
            threads: None,
            server_state_file: None,
            worker_ready_timeout: None,
        }
    }
}

impl Proxyd {
    /// One HTTP frontend `www` on `frontend`, round robin over `servers` with no checks.
    pub fn round_robin(global: Global, frontend: SocketAddr, servers: &Servers) -> Self {
        Self {
            comment: "proxyd for an xtask node.",
            global,
            defaults: Defaults::default(),
            frontends: vec![Frontend {
                name: "www".into(),
                bind: vec![frontend],
                mode: Some("http"),
                default_backend: "app".into(),
            }],
            backends: vec![Backend {
                name: "app".into(),
                balance: Some("roundrobin"),
                check: None,
                stick: None,
                servers: servers.iter().map(|(n, a)| Server::plain(n, *a)).collect(),
            }],
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        comment_line(&mut s, self.comment);
        let g = &self.global;
        s.push_str("[global]\n");
        string_line(&mut s, "admin_socket", Some(g.admin_socket.display()));
        string_line(&mut s, "fdkeeper_socket", Some(g.fdkeeper_socket.display()));
        string_line(
            &mut s,
            "stickd_socket",
            g.stickd_socket.as_deref().map(Path::display),
        );
        string_line(&mut s, "metrics", g.metrics);
        string_line(&mut s, "drain_timeout", g.drain_timeout);
        bare_line(&mut s, "max_draining", g.max_draining);
        bare_line(&mut s, "threads", g.threads);
        string_line(
            &mut s,
            "server_state_file",
            g.server_state_file.as_deref().map(Path::display),
        );
        string_line(&mut s, "worker_ready_timeout", g.worker_ready_timeout);

        let mut d = String::new();
        let x = &self.defaults;
        string_line(&mut d, "timeout_http_request", x.timeout_http_request);
        string_line(&mut d, "timeout_queue", x.timeout_queue);
        string_line(&mut d, "timeout_connect", x.timeout_connect);
        string_line(&mut d, "timeout_client", x.timeout_client);
        string_line(&mut d, "timeout_server", x.timeout_server);
        string_line(&mut d, "timeout_http_keep_alive", x.timeout_http_keep_alive);
        string_line(&mut d, "timeout_check", x.timeout_check);
        bare_line(&mut d, "maxconn", x.maxconn);
        bare_line(&mut d, "retries", x.retries);
        bare_line(&mut d, "redispatch", x.redispatch);
        bare_line(&mut d, "forwardfor", x.forwardfor);
        string_line(&mut d, "forwardfor_except", x.forwardfor_except);
        if !d.is_empty() {
            s.push_str("\n[defaults]\n");
            s.push_str(&d);
        }

        for f in &self.frontends {
            let binds: Vec<String> = f.bind.iter().map(quoted).collect();
            let _ = write!(
                s,
                "\n[[frontend]]\nname = {}\nbind = [{}]\n",
                quoted(&f.name),
                binds.join(", ")
            );
            string_line(&mut s, "mode", f.mode);
            string_line(&mut s, "default_backend", Some(&f.default_backend));
        }
        for b in &self.backends {
            let _ = write!(s, "\n[[backend]]\nname = {}\n", quoted(&b.name));
            string_line(&mut s, "balance", b.balance);
            if let Some(c) = &b.check {
                s.push_str("\n[backend.check]\n");
                if let Some(path) = c.http_get {
                    let _ = writeln!(
                        s,
                        "type = \"http\"\nmethod = \"GET\"\npath = {}\nexpect_status = 200",
                        quoted(path)
                    );
                }
                let _ = writeln!(s, "inter = {}\nfall = {}", quoted(&c.inter), c.fall);
            }
            if let Some(st) = &b.stick {
                // `on` right below the header: the lb-table-refused scenario edits that line.
                s.push_str("\n[backend.stick]\n");
                string_line(&mut s, "on", Some(st.on));
                string_line(&mut s, "store_response", st.store_response);
            }
            for v in &b.servers {
                let _ = write!(
                    s,
                    "\n[[backend.server]]\nname = {}\naddress = {}\n",
                    quoted(&v.name),
                    quoted(v.address)
                );
                bare_line(&mut s, "check", v.check);
                bare_line(&mut s, "rise", v.rise);
                bare_line(&mut s, "maxconn", v.maxconn);
            }
        }
        s
    }
}

/// The seed's setup (examples/proxyd-seed.toml): its timeouts and maxconns, retries with
/// redispatch, forwardfor, a round-robin backend named after the stick table with HTTP checks
/// of `GET /index.php`, and the PHPSESSID stick rule when proxyd has a stickd.
#[derive(Clone, Debug)]
pub struct Seed<'a> {
    pub global: Global,
    pub frontend: SocketAddr,
    pub table: &'a str,
    pub timeout_check: &'static str,
    pub check_inter: String,
    pub fall: u32,
    pub servers: &'a Servers,
}

impl Seed<'_> {
    pub fn proxyd(self, comment: &'static str) -> Proxyd {
        let stick = self.global.stickd_socket.is_some().then_some(Stick {
            on: "req.cook(PHPSESSID)",
            store_response: Some("res.cook(PHPSESSID)"),
        });
        Proxyd {
            comment,
            global: self.global,
            defaults: Defaults {
                timeout_http_request: Some("2s"),
                timeout_queue: Some("3s"),
                timeout_connect: Some("1s"),
                timeout_client: Some("10s"),
                timeout_server: Some("2s"),
                timeout_http_keep_alive: Some("10s"),
                timeout_check: Some(self.timeout_check),
                maxconn: Some(18000),
                retries: Some(3),
                redispatch: Some(true),
                forwardfor: Some(true),
                forwardfor_except: Some("127.0.0.0/8"),
            },
            frontends: vec![Frontend {
                name: "http-in".into(),
                bind: vec![self.frontend],
                mode: Some("http"),
                default_backend: self.table.to_owned(),
            }],
            backends: vec![Backend {
                name: self.table.to_owned(),
                balance: Some("roundrobin"),
                check: Some(Check {
                    http_get: Some("/index.php"),
                    inter: self.check_inter,
                    fall: self.fall,
                }),
                stick,
                servers: self
                    .servers
                    .iter()
                    .map(|(name, address)| Server {
                        name: name.clone(),
                        address: *address,
                        check: Some(true),
                        rise: Some(1),
                        maxconn: Some(3000),
                    })
                    .collect(),
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers() -> Vec<(String, SocketAddr)> {
        vec![
            ("app1".to_owned(), "127.0.0.2:9001".parse().expect("addr")),
            ("app2".to_owned(), "127.0.0.2:9002".parse().expect("addr")),
        ]
    }

    #[test]
    fn round_robin_lists_servers_and_global_keys() {
        let mut g = Global::new(Path::new("/a"), Path::new("/f"));
        g.threads = Some(1);
        g.drain_timeout = Some("10s");
        let t =
            Proxyd::round_robin(g, "127.0.0.1:8080".parse().expect("addr"), &servers()).render();
        assert!(
            t.contains("[global]\nadmin_socket = \"/a\"\nfdkeeper_socket = \"/f\"\n"),
            "{t}"
        );
        assert!(t.contains("drain_timeout = \"10s\"\nthreads = 1\n"), "{t}");
        assert!(!t.contains("[defaults]"), "{t}");
        assert!(t.contains("bind = [\"127.0.0.1:8080\"]\n"), "{t}");
        assert!(
            t.contains("[[backend.server]]\nname = \"app2\"\naddress = \"127.0.0.2:9002\"\n"),
            "{t}"
        );
    }

    #[test]
    fn seed_has_the_stick_rule_only_with_stickd() {
        let seed = |stickd: Option<&str>| {
            let mut global = Global::new(Path::new("/a"), Path::new("/f"));
            global.stickd_socket = stickd.map(PathBuf::from);
            Seed {
                global,
                frontend: "127.0.0.1:8080".parse().expect("addr"),
                table: "dynamic_group",
                timeout_check: "1s",
                check_inter: "300ms".into(),
                fall: 2,
                servers: &servers(),
            }
            .proxyd("seed")
            .render()
        };
        let t = seed(Some("/s"));
        assert!(t.contains("stickd_socket = \"/s\""), "{t}");
        assert!(
            t.contains("[backend.stick]\non = \"req.cook(PHPSESSID)\"\n"),
            "{t}"
        );
        assert!(
            t.contains("path = \"/index.php\"\nexpect_status = 200\ninter = \"300ms\"\nfall = 2\n"),
            "{t}"
        );
        let t = seed(None);
        assert!(
            !t.contains("[backend.stick]") && !t.contains("stickd_socket"),
            "{t}"
        );
    }
}
