//! nginx.conf for the benches' comparisons: one worker in the foreground, every file under a
//! prefix dir, one upstream with keep-alive connections behind one `server`.

use std::fmt::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

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
    pub listen: SocketAddr,
    pub keepalive_timeout: &'static str,
    pub keepalive_requests: u64,
    /// `client_header_timeout`, `proxy_connect_timeout` and `proxy_read_timeout`, when set.
    pub timeouts: Option<Timeouts>,
    pub upstream: Upstream,
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
        s.push_str("worker_processes 1;\ndaemon off;\n");
        if self.master_process {
            s.push_str("master_process on;\n");
        }
        let _ = writeln!(s, "pid {p}/nginx.pid;");
        let _ = match self.error_log {
            ErrorLog::File(level) => writeln!(s, "error_log {p}/error.log {level};"),
            ErrorLog::Stderr(level) => writeln!(s, "error_log stderr {level};"),
        };
        s.push_str("\nevents {\n    worker_connections 4096;\n}\n\nhttp {\n    access_log off;\n");
        for (what, dir) in [
            ("client_body", "body"),
            ("proxy", "proxy"),
            ("fastcgi", "fastcgi"),
            ("uwsgi", "uwsgi"),
            ("scgi", "scgi"),
        ] {
            let _ = writeln!(s, "    {what}_temp_path {p}/{dir};");
        }
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
    }
}
