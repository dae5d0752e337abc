//! nginx.conf for the benches' comparisons: workers in the foreground, every file under a prefix
//! dir, one upstream with keep-alive connections behind one `server`; and nginx as a backend
//! (an application server stand-in) for the http bench.

use std::fmt::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A whole nginx config.
#[derive(Clone, Debug)]
pub struct Nginx {
    /// The file's first line, after `# ` (none when empty).
    pub comment: &'static str,
    /// Holds the pid file and the temp dirs.
    pub prefix: PathBuf,
    /// `user`: as root, nginx's worker would otherwise switch to `nobody`.
    pub user: Option<String>,
    /// `master_process on` written out (it is nginx's default).
    pub master_process: bool,
    pub error_log: ErrorLog,
    pub workers: Workers,
    /// `access_log PATH` (nginx's default `combined` format); `access_log off` when none.
    pub access_log: Option<PathBuf>,
    pub listen: SocketAddr,
    pub keepalive_timeout: &'static str,
    pub keepalive_requests: u64,
    /// `client_header_timeout`, `proxy_connect_timeout` and `proxy_read_timeout`, when set.
    pub timeouts: Option<Timeouts>,
    pub upstream: Upstream,
}

/// `worker_processes`, `worker_connections` and `worker_rlimit_nofile`.
#[derive(Clone, Copy, Debug)]
pub struct Workers {
    pub processes: u32,
    pub connections: u64,
    /// Raised by nginx itself at start; needed above 1024 connections.
    pub rlimit_nofile: Option<u64>,
}

impl Workers {
    /// One worker of 4096 connections.
    pub const ONE: Workers = Workers {
        processes: 1,
        connections: 4096,
        rlimit_nofile: None,
    };

    fn render(self, s: &mut String) {
        let _ = writeln!(s, "worker_processes {};", self.processes);
        if let Some(n) = self.rlimit_nofile {
            let _ = writeln!(s, "worker_rlimit_nofile {n};");
        }
    }
}

/// Where errors go, and from which level.
#[derive(Clone, Copy, Debug)]
pub enum ErrorLog {
    /// `PREFIX/error.log`.
    File(&'static str),
    Stderr(&'static str),
}

#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub client_header: &'static str,
    pub proxy_connect: &'static str,
    pub proxy_read: &'static str,
}

#[derive(Clone, Debug)]
pub struct Upstream {
    pub name: String,
    /// `hash $cookie_NAME consistent`: OSS nginx has no sticky cookie, so the cookie is hashed.
    pub hash_cookie: Option<&'static str>,
    pub servers: Vec<SocketAddr>,
    /// What follows each server's address, e.g. `max_fails=3 fail_timeout=2s`.
    pub server_params: &'static str,
    pub keepalive: u32,
    pub keepalive_requests: Option<u64>,
}

impl Nginx {
    pub fn render(&self) -> String {
        let p = self.prefix.display();
        let mut s = String::new();
        if !self.comment.is_empty() {
            let _ = writeln!(s, "# {}", self.comment);
        }
        if let Some(u) = &self.user {
            let _ = writeln!(s, "user {u};");
        }
        self.workers.render(&mut s);
        s.push_str("daemon off;\n");
        if self.master_process {
            s.push_str("master_process on;\n");
        }
        let _ = writeln!(s, "pid {p}/nginx.pid;");
        let _ = match self.error_log {
            ErrorLog::File(level) => writeln!(s, "error_log {p}/error.log {level};"),
            ErrorLog::Stderr(level) => writeln!(s, "error_log stderr {level};"),
        };
        let _ = writeln!(
            s,
            "\nevents {{\n    worker_connections {};\n}}\n\nhttp {{",
            self.workers.connections
        );
        match &self.access_log {
            Some(path) => {
                let _ = writeln!(s, "    access_log {};", path.display());
            }
            None => s.push_str("    access_log off;\n"),
        }
        temp_paths(&mut s, &self.prefix);
        let _ = writeln!(
            s,
            "    keepalive_timeout {};\n    keepalive_requests {};",
            self.keepalive_timeout, self.keepalive_requests
        );
        if let Some(t) = self.timeouts {
            let _ = writeln!(
                s,
                "    client_header_timeout {};\n    proxy_connect_timeout {};\n    proxy_read_timeout {};",
                t.client_header, t.proxy_connect, t.proxy_read
            );
        }
        let u = &self.upstream;
        let _ = writeln!(s, "\n    upstream {} {{", u.name);
        if let Some(cookie) = u.hash_cookie {
            let _ = writeln!(s, "        hash $cookie_{cookie} consistent;");
        }
        for a in &u.servers {
            if u.server_params.is_empty() {
                let _ = writeln!(s, "        server {a};");
            } else {
                let _ = writeln!(s, "        server {a} {};", u.server_params);
            }
        }
        let _ = writeln!(s, "        keepalive {};", u.keepalive);
        if let Some(n) = u.keepalive_requests {
            let _ = writeln!(s, "        keepalive_requests {n};");
        }
        let _ = write!(
            s,
            r#"    }}

    server {{
        listen {};
        location / {{
            proxy_pass http://{};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#,
            self.listen, u.name
        );
        s
    }
}

/// Every temp dir nginx may write, under `prefix`.
fn temp_paths(s: &mut String, prefix: &Path) {
    let p = prefix.display();
    for (what, dir) in [
        ("client_body", "body"),
        ("proxy", "proxy"),
        ("fastcgi", "fastcgi"),
        ("uwsgi", "uwsgi"),
        ("scgi", "scgi"),
    ] {
        let _ = writeln!(s, "    {what}_temp_path {p}/{dir};");
    }
}

/// nginx standing in for an application server (like xtask's demo backend, but nobody here
/// wrote it): `GET /index.php` answers a short text with `X-Server: NAME`, and a new
/// `PHPSESSID` (nginx's 32-hex `$request_id`) to a request without one; `GET /1m` sends the
/// file `PREFIX/www/1m`, which the caller writes. No access log: a backend's logging is not
/// what is measured.
#[derive(Clone, Debug)]
pub struct Backend {
    pub name: String,
    pub prefix: PathBuf,
    pub user: Option<String>,
    pub workers: Workers,
    pub listen: SocketAddr,
}

/// The path of the large answer, and its size.
pub const BIG_PATH: &str = "/1m";
pub const BIG_BYTES: usize = 1 << 20;

impl Backend {
    pub fn render(&self) -> String {
        let p = self.prefix.display();
        let name = &self.name;
        let mut s = format!("# nginx as the application server {name}, in the foreground.\n");
        if let Some(u) = &self.user {
            let _ = writeln!(s, "user {u};");
        }
        self.workers.render(&mut s);
        let _ = write!(
            s,
            "daemon off;\npid {p}/nginx.pid;\nerror_log {p}/error.log warn;\n\nevents {{\n    \
             worker_connections {};\n}}\n\nhttp {{\n    access_log off;\n",
            self.workers.connections
        );
        temp_paths(&mut s, &self.prefix);
        let _ = write!(
            s,
            r#"    keepalive_timeout 120s;
    keepalive_requests 1000000000;
    sendfile on;

    server {{
        listen {listen};
        root {p}/www;
        location = /index.php {{
            default_type text/plain;
            add_header X-Server {name} always;
            # Inside `if`, only its own add_header lines apply: X-Server again.
            if ($cookie_PHPSESSID = "") {{
                add_header X-Server {name} always;
                add_header Set-Cookie "PHPSESSID=$request_id; path=/" always;
            }}
            return 200 "Hello from {name}\nserver: {name}\n";
        }}
        location = {BIG_PATH} {{
            default_type application/octet-stream;
            add_header X-Server {name} always;
        }}
    }}
}}
"#,
            listen = self.listen,
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prefix_paths_upstream_and_server() {
        let n = Nginx {
            comment: "",
            prefix: "/n".into(),
            user: Some("u".into()),
            master_process: true,
            error_log: ErrorLog::File("warn"),
            workers: Workers::ONE,
            access_log: None,
            listen: "127.0.0.1:8000".parse().expect("addr"),
            keepalive_timeout: "10s",
            keepalive_requests: 7,
            timeouts: None,
            upstream: Upstream {
                name: "app".into(),
                hash_cookie: Some("PHPSESSID"),
                servers: vec!["127.0.0.2:8001".parse().expect("addr")],
                server_params: "",
                keepalive: 64,
                keepalive_requests: None,
            },
        }
        .render();
        assert!(
            n.starts_with("user u;\nworker_processes 1;\ndaemon off;\nmaster_process on;\n"),
            "{n}"
        );
        assert!(
            n.contains("pid /n/nginx.pid;\nerror_log /n/error.log warn;\n"),
            "{n}"
        );
        assert!(
            n.contains("    client_body_temp_path /n/body;\n    proxy_temp_path /n/proxy;\n"),
            "{n}"
        );
        assert!(n.contains("    scgi_temp_path /n/scgi;\n"), "{n}");
        assert!(n.contains("hash $cookie_PHPSESSID consistent;\n        server 127.0.0.2:8001;\n        keepalive 64;\n    }"), "{n}");
        assert!(n.contains("listen 127.0.0.1:8000;"), "{n}");
        assert!(n.contains("proxy_pass http://app;"), "{n}");
        assert!(n.contains("worker_connections 4096;"), "{n}");
        assert!(n.contains("http {\n    access_log off;\n"), "{n}");
    }

    #[test]
    fn renders_the_backend_stand_in() {
        let b = Backend {
            name: "app1".into(),
            prefix: "/b".into(),
            user: None,
            workers: Workers {
                processes: 1,
                connections: 19_000,
                rlimit_nofile: Some(20_000),
            },
            listen: "127.0.0.1:9001".parse().expect("addr"),
        }
        .render();
        assert!(
            b.contains("worker_processes 1;\nworker_rlimit_nofile 20000;\ndaemon off;\n"),
            "{b}"
        );
        assert!(b.contains("worker_connections 19000;"), "{b}");
        assert!(b.contains("access_log off;"), "{b}");
        assert!(b.contains("root /b/www;"), "{b}");
        assert!(
            b.contains("add_header Set-Cookie \"PHPSESSID=$request_id; path=/\" always;"),
            "{b}"
        );
        assert!(
            b.contains("return 200 \"Hello from app1\\nserver: app1\\n\";"),
            "{b}"
        );
        assert!(b.contains("location = /1m {"), "{b}");
    }
}
