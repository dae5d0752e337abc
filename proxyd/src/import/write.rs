//! The import's result as files: fdkeeper.toml, stickd.toml, proxyd.toml and the systemd
//! drop-ins, written by hand so that each value can say which haproxy.cfg line it comes from.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::{Duration, Size};

use super::bind::BindDef;
use super::proxies::ServerDef;
use super::resolvers::ResolversOut;
use super::rules::RuleOut;

/// Where the daemons keep their sockets and data: dist/systemd's layout, or under one
/// directory for a try-out without root.
#[derive(Clone, Debug)]
pub struct Paths {
    pub fdkeeper_socket: PathBuf,
    pub fdkeeper_admin: PathBuf,
    pub stickd_socket: PathBuf,
    pub stickd_data: PathBuf,
    pub proxyd_admin: PathBuf,
}

impl Paths {
    pub fn new(run_dir: Option<&Path>) -> Paths {
        match run_dir {
            None => Paths {
                fdkeeper_socket: "/run/fdkeeper/lend.sock".into(),
                fdkeeper_admin: "/run/fdkeeper/admin.sock".into(),
                stickd_socket: "/run/stickd/stickd.sock".into(),
                stickd_data: "/var/lib/stickd".into(),
                proxyd_admin: "/run/proxyd/admin.sock".into(),
            },
            Some(d) => Paths {
                fdkeeper_socket: d.join("fdkeeper/lend.sock"),
                fdkeeper_admin: d.join("fdkeeper/admin.sock"),
                stickd_socket: d.join("stickd/stickd.sock"),
                stickd_data: d.join("stickd/data"),
                proxyd_admin: d.join("proxyd/admin.sock"),
            },
        }
    }
}

pub struct PeerOut {
    pub name: String,
    pub address: SocketAddr,
    pub line: Option<usize>,
}

pub struct TableOut {
    pub name: String,
    pub kind: String,
    pub len: Option<u32>,
    pub size: Size,
    pub expire: Duration,
    pub line: usize,
    /// The `stick-table` line as written.
    pub text: String,
    /// The peers section it names.
    pub peers: Option<String>,
}

pub struct FrontendOut {
    pub name: String,
    pub line: usize,
    pub mode: &'static str,
    pub binds: Vec<BindDef>,
    pub backlog: Option<u32>,
    pub default_backend: String,
    pub maxconn: Option<u64>,
    /// `[[frontend.rule]]`s, in the order proxyd runs them.
    pub rules: Vec<RuleOut>,
}

pub struct CheckOut {
    pub method: String,
    pub path: String,
    pub expect_status: Option<u16>,
    /// The check's `Host`.
    pub host: Option<String>,
    pub line: usize,
}

pub struct StickOut {
    pub table: String,
    pub on: String,
    pub store_response: Option<String>,
}

pub struct BackendOut {
    pub name: String,
    pub line: usize,
    /// The TOML value.
    pub balance: String,
    /// Settings that differ from `[defaults]`: key, TOML value.
    pub settings: Vec<(&'static str, String)>,
    pub check: Option<CheckOut>,
    pub stick: Option<StickOut>,
    /// The backend's `cookie = {...}`, a TOML inline table.
    pub cookie: Option<String>,
    pub servers: Vec<ServerDef>,
}

/// A `[defaults]` value and the line it comes from.
pub struct Setting {
    pub key: &'static str,
    pub value: String,
    pub line: Option<usize>,
}

/// Everything the import writes.
pub struct Plan {
    /// haproxy.cfg's file name, for the comments.
    pub source: String,
    pub paths: Paths,
    pub local: String,
    pub user: Option<String>,
    pub group: Option<String>,
    /// Line of `stats socket ... expose-fd listeners`.
    pub expose_fd: bool,
    pub allowed_uids: Vec<String>,
    pub peers: Vec<PeerOut>,
    /// The peers section the peers come from: its name and line.
    pub peers_section: Option<(String, usize)>,
    pub tables: Vec<TableOut>,
    pub threads: Option<u64>,
    pub drain_timeout: Option<Duration>,
    pub metrics: Option<SocketAddr>,
    /// The access log's keys of `[global]`.
    pub log: Vec<Setting>,
    pub defaults: Vec<Setting>,
    pub frontends: Vec<FrontendOut>,
    pub backends: Vec<BackendOut>,
    /// The `[[resolvers]]` the backends name.
    pub resolvers: Vec<ResolversOut>,
}

/// A TOML string.
pub fn q(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn path(p: &Path) -> String {
    q(&p.display().to_string())
}

fn list(items: impl IntoIterator<Item = String>) -> String {
    format!("[{}]", items.into_iter().collect::<Vec<_>>().join(", "))
}

impl Plan {
    fn at(&self, line: usize) -> String {
        format!("{}:{line}", self.source)
    }

    pub fn fdkeeper(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# fdkeeper.toml, imported from {} by `proxyd import-haproxy`.\n# Check it with: fdkeeper check --config fdkeeper.toml\n",
            self.source
        );
        if self.expose_fd {
            let _ = writeln!(
                o,
                "# HAProxy's `stats socket ... expose-fd listeners` handed the listeners from the old\n# process to the new one at a reload; here fdkeeper holds them for ever and lends them\n# to every proxyd generation over this socket."
            );
        }
        let _ = writeln!(o, "socket = {}", path(&self.paths.fdkeeper_socket));
        let _ = writeln!(
            o,
            "# Group members may connect (dist/systemd puts proxyd in fdkeeper's group); fdkeeper\n# then lends only to allowed_uids.\nsocket_mode = \"0660\""
        );
        let _ = writeln!(o, "admin = {}", path(&self.paths.fdkeeper_admin));
        match &self.user {
            Some(u) => {
                let _ = writeln!(
                    o,
                    "# proxyd runs as HAProxy's `user {u}` (proxyd.service.d)."
                );
            }
            None => {
                let _ = writeln!(
                    o,
                    "# haproxy.cfg names no user: add the one proxyd runs as (`proxyd` under dist/systemd)."
                );
            }
        }
        let _ = writeln!(
            o,
            "allowed_uids = {}",
            list(self.allowed_uids.iter().map(|u| q(u)))
        );
        let _ = writeln!(o, "# Every bind of proxyd.toml.");
        let mut binds: Vec<String> = Vec::new();
        for f in &self.frontends {
            for b in &f.binds {
                let a = b.address.to_string();
                if !binds.contains(&a) {
                    binds.push(a);
                }
            }
        }
        let _ = writeln!(o, "allowed_binds = {}", list(binds.iter().map(|b| q(b))));
        o
    }

    pub fn stickd(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# stickd.toml, imported from {} by `proxyd import-haproxy`.\n# Check it with: stickd check --config stickd.toml -L NAME\n# The same file serves every node: each starts with its own NAME (stickd.service.d).\n",
            self.source
        );
        let _ = writeln!(o, "data_dir = {}", path(&self.paths.stickd_data));
        let _ = writeln!(
            o,
            "# proxyd's `stickd_socket`; operators: grpcurl -plaintext -unix ... stick.v1.Stick/Show"
        );
        let _ = writeln!(o, "socket = {}", path(&self.paths.stickd_socket));
        match &self.peers_section {
            Some((name, line)) => {
                let _ = writeln!(o, "\n# {}: peers {name}", self.at(*line));
            }
            None => {
                let _ = writeln!(
                    o,
                    "\n# No table of haproxy.cfg is shared with peers: this node alone, its peer port\n# on the loopback."
                );
            }
        }
        for p in &self.peers {
            if let Some(l) = p.line {
                let _ = writeln!(o, "# {}", self.at(l));
            }
            let _ = writeln!(
                o,
                "[[peers]]\nname = {}\naddress = {}\n",
                q(&p.name),
                q(&p.address.to_string())
            );
        }
        for t in &self.tables {
            let _ = writeln!(o, "# {}: {}", self.at(t.line), t.text);
            let _ = writeln!(
                o,
                "[[tables]]\nname = {}\ntype = {}",
                q(&t.name),
                q(&t.kind)
            );
            if let Some(len) = t.len {
                let _ = writeln!(o, "len = {len}");
            }
            let _ = writeln!(
                o,
                "size = {}\nexpire = {}\n",
                q(&t.size.to_string()),
                q(&t.expire.to_string())
            );
        }
        o.truncate(o.trim_end().len());
        o.push('\n');
        o
    }

    pub fn proxyd(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# proxyd.toml, imported from {} by `proxyd import-haproxy`.\n# Check it with: proxyd check --config proxyd.toml\n\n[global]",
            self.source
        );
        let _ = writeln!(o, "admin_socket = {}", path(&self.paths.proxyd_admin));
        let _ = writeln!(o, "fdkeeper_socket = {}", path(&self.paths.fdkeeper_socket));
        if self.backends.iter().any(|b| b.stick.is_some()) {
            let _ = writeln!(o, "stickd_socket = {}", path(&self.paths.stickd_socket));
        }
        for s in &self.log {
            match s.line {
                Some(l) => {
                    let _ = writeln!(o, "{} = {}  # {}", s.key, s.value, self.at(l));
                }
                None => {
                    let _ = writeln!(o, "{} = {}", s.key, s.value);
                }
            }
        }
        if let Some(t) = self.threads {
            let _ = writeln!(o, "threads = {t}");
        }
        if let Some(d) = self.drain_timeout {
            let _ = writeln!(
                o,
                "# hard-stop-after\ndrain_timeout = {}",
                q(&d.to_string())
            );
        }
        if let Some(m) = self.metrics {
            let _ = writeln!(
                o,
                "# The stats page's address: Prometheus /metrics\nmetrics = {}",
                q(&m.to_string())
            );
        }
        if !self.defaults.is_empty() {
            let _ = writeln!(o, "\n[defaults]");
            for s in &self.defaults {
                match s.line {
                    Some(l) => {
                        let _ = writeln!(o, "{} = {}  # {}", s.key, s.value, self.at(l));
                    }
                    None => {
                        let _ = writeln!(o, "{} = {}", s.key, s.value);
                    }
                }
            }
        }
        for f in &self.frontends {
            let _ = writeln!(
                o,
                "\n# {}\n[[frontend]]\nname = {}",
                self.at(f.line),
                q(&f.name)
            );
            let _ = writeln!(o, "mode = {}", q(f.mode));
            let binds = f.binds.iter().map(|b| match &b.tls {
                None => q(&b.address.to_string()),
                Some(t) => {
                    let mut tls = format!("certs = {}", list(t.certs.iter().map(|c| q(c))));
                    if let Some(a) = &t.alpn {
                        let _ = write!(tls, ", alpn = {}", list(a.iter().map(|x| q(x))));
                    }
                    if let Some(v) = &t.min_version {
                        let _ = write!(tls, ", min_version = {}", q(v));
                    }
                    format!(
                        "{{ address = {}, tls = {{ {tls} }} }}",
                        q(&b.address.to_string())
                    )
                }
            });
            let _ = writeln!(o, "bind = {}", list(binds));
            if let Some(b) = f.backlog {
                let _ = writeln!(o, "backlog = {b}");
            }
            if let Some(m) = f.maxconn {
                let _ = writeln!(o, "maxconn = {m}");
            }
            let _ = writeln!(o, "default_backend = {}", q(&f.default_backend));
            for r in &f.rules {
                let _ = writeln!(
                    o,
                    "\n# {}: {}\n[[frontend.rule]]\n{}",
                    self.at(r.line),
                    r.text,
                    r.toml
                );
            }
        }
        for b in &self.backends {
            let _ = writeln!(
                o,
                "\n# {}\n[[backend]]\nname = {}",
                self.at(b.line),
                q(&b.name)
            );
            let _ = writeln!(o, "balance = {}", b.balance);
            for (k, v) in &b.settings {
                let _ = writeln!(o, "{k} = {v}");
            }
            if let Some(c) = &b.cookie {
                let _ = writeln!(o, "cookie = {c}");
            }
            if let Some(c) = &b.check {
                let _ = writeln!(
                    o,
                    "\n# {}\n[backend.check]\ntype = \"http\"\nmethod = {}\npath = {}",
                    self.at(c.line),
                    q(&c.method),
                    q(&c.path)
                );
                if let Some(s) = c.expect_status {
                    let _ = writeln!(o, "expect_status = {s}");
                }
                if let Some(h) = &c.host {
                    let _ = writeln!(o, "host = {}", q(h));
                }
            }
            if let Some(s) = &b.stick {
                let _ = writeln!(
                    o,
                    "\n[backend.stick]\ntable = {}\non = {}",
                    q(&s.table),
                    q(&s.on)
                );
                if let Some(r) = &s.store_response {
                    let _ = writeln!(o, "store_response = {}", q(&format!("res.cook({r})")));
                }
            }
            for s in &b.servers {
                let _ = writeln!(
                    o,
                    "\n# {}\n[[backend.server]]\nname = {}\naddress = {}",
                    self.at(s.line),
                    q(&s.name),
                    q(&s.address.to_string())
                );
                if s.check {
                    let _ = writeln!(o, "check = true");
                }
                for (k, v) in [
                    ("weight", s.weight),
                    ("maxconn", s.maxconn),
                    ("rise", s.rise),
                    ("fall", s.fall),
                ] {
                    if let Some(v) = v {
                        let _ = writeln!(o, "{k} = {v}");
                    }
                }
                if let Some(i) = s.inter {
                    let _ = writeln!(o, "inter = {}", q(&i.to_string()));
                }
                if let Some(c) = &s.cookie {
                    let _ = writeln!(o, "cookie = {}", q(c));
                }
            }
        }
        for r in &self.resolvers {
            let _ = writeln!(
                o,
                "\n# {}\n[[resolvers]]\nname = {}\nnameservers = {}",
                self.at(r.line),
                q(&r.name),
                list(r.nameservers.iter().map(|n| q(&n.to_string())))
            );
            if let Some(t) = r.timeout {
                let _ = writeln!(o, "timeout = {}", q(&t.to_string()));
            }
        }
        o
    }

    /// systemd drop-ins for what belongs in a unit: proxyd's user, stickd's local peer name.
    pub fn dropins(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.user.is_some() || self.group.is_some() {
            let mut o = format!(
                "# proxyd.service.d/haproxy.conf, imported from {}: HAProxy's `user`/`group`.\n# fdkeeper lends listeners to this user (allowed_uids in fdkeeper.toml).\n[Service]\n",
                self.source
            );
            if let Some(u) = &self.user {
                let _ = writeln!(o, "User={u}");
            }
            if let Some(g) = &self.group {
                let _ = writeln!(o, "Group={g}");
            }
            out.push(("proxyd.service.d/haproxy.conf".to_owned(), o));
        }
        out.push((
            "stickd.service.d/haproxy.conf".to_owned(),
            format!(
                "# stickd.service.d/haproxy.conf, imported from {}: this node's peer name, as `haproxy -L`.\n# /etc/default/stickd, if it sets STICKD_OPTS, wins over this.\n[Service]\nEnvironment=\"STICKD_OPTS=-L {}\"\n",
                self.source, self.local
            ),
        ));
        out
    }
}
