//! The tls bench's targets: test certificates (ECDSA P-256 and RSA 2048, made with the openssl
//! CLI), and proxyd, HAProxy and nginx terminating TLS on one port per certificate, each with its
//! access log on as in the http bench, started.
//!
//! The typed config builders of `crate::configs` have no TLS binds; these configs are written
//! whole here, so that every line the comparison depends on is in one place beside the others.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{CHECK_INTER, Kind, TIMEOUT_IDLE, Target};
use crate::bench::Ctx;
use crate::bench::logs::{AccessLog, HTTPLOG_MARKER};
use crate::bench::tools::{check_config, run_as, spawn_nginx, wait_listening};
use crate::cluster::{self, START_TIMEOUT};
use crate::harness::{self, Env, Proc, ProcSpec};

/// The DNS name in both certificates (subjectAltName) and the SNI the clients send.
pub const SERVER_NAME: &str = "bench.test";

/// One PEM file per key type, the certificate followed by its key (HAProxy's `crt`, nginx's
/// `ssl_certificate` and `ssl_certificate_key`, and proxyd's `certs` all read that).
#[derive(Clone, Debug)]
pub struct Certs {
    pub ecdsa: PathBuf,
    pub rsa: PathBuf,
}

/// Makes both self-signed certificates (valid 2 days) with the openssl CLI in `dir`.
pub fn make_certs(dir: &Path) -> Result<Certs> {
    std::fs::create_dir_all(dir)?;
    let one = |name: &str, newkey: &[&str]| -> Result<PathBuf> {
        let key = dir.join(format!("{name}.key"));
        let crt = dir.join(format!("{name}.crt"));
        let out = Command::new("openssl")
            .args(["req", "-x509", "-nodes", "-days", "2"])
            .args(newkey)
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&crt)
            .args(["-subj", &format!("/CN={SERVER_NAME}")])
            .args(["-addext", &format!("subjectAltName=DNS:{SERVER_NAME}")])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .output()
            .context("cannot run openssl (package openssl)")?;
        if !out.status.success() {
            bail!(
                "openssl req for the {name} certificate failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let pem = dir.join(format!("{name}.pem"));
        let both = std::fs::read_to_string(&crt)? + &std::fs::read_to_string(&key)?;
        std::fs::write(&pem, both)?;
        Ok(pem)
    };
    Ok(Certs {
        ecdsa: one(
            "ecdsa",
            &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"],
        )?,
        rsa: one("rsa", &["-newkey", "rsa:2048"])?,
    })
}

/// What every target is given.
pub struct Setup {
    pub certs: Certs,
    /// The backends (Debian's nginx, or the demo backends).
    pub servers: Vec<(String, SocketAddr)>,
    /// Connections each target takes at once (its frontend's and its process's limit).
    pub maxconn: u64,
    /// HAProxy's syslog target.
    pub sink: SocketAddr,
}

/// Where a target listens: one port per certificate.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub ecdsa: SocketAddr,
    pub rsa: SocketAddr,
}

impl Ports {
    fn new(env: &mut Env) -> Result<Self> {
        Ok(Self {
            ecdsa: env.free_port(1)?,
            rsa: env.free_port(1)?,
        })
    }
}

/// proxyd.toml: the seed's backend without the stick rule, a TLS bind per certificate (ALPN h2
/// and http/1.1), one thread, and the idle timeouts of `TIMEOUT_IDLE` so that the idle
/// connections of the memory run stay open.
fn proxyd_config(admin: &Path, fdkeeper: &Path, ports: Ports, setup: &Setup) -> String {
    let (certs, maxconn) = (&setup.certs, setup.maxconn);
    let mut s = format!(
        r#"# proxyd for the tls bench: TLS binds (ECDSA, RSA), the seed's backend without stick rules, one thread.
[global]
admin_socket = "{admin}"
fdkeeper_socket = "{fdkeeper}"
threads = 1

[defaults]
timeout_http_request = "{TIMEOUT_IDLE}"
timeout_queue = "3s"
timeout_connect = "1s"
timeout_client = "{TIMEOUT_IDLE}"
timeout_server = "2s"
timeout_http_keep_alive = "{TIMEOUT_IDLE}"
timeout_tls_handshake = "10s"
timeout_check = "2s"
maxconn = {maxconn}
retries = 3
redispatch = true
forwardfor = true
forwardfor_except = "127.0.0.0/8"

[[tls]]
name = "ecdsa"
certs = ["{ecdsa}"]
alpn = ["h2", "http/1.1"]

[[tls]]
name = "rsa"
certs = ["{rsa}"]
alpn = ["h2", "http/1.1"]

[[frontend]]
name = "https-in"
bind = [{{ address = "{ecdsa_port}", tls = "ecdsa" }}, {{ address = "{rsa_port}", tls = "rsa" }}]
mode = "http"
default_backend = "app"

[[backend]]
name = "app"
balance = "roundrobin"

[backend.check]
type = "http"
method = "GET"
path = "/index.php"
expect_status = 200
inter = "{CHECK_INTER}"
fall = 3
"#,
        admin = admin.display(),
        fdkeeper = fdkeeper.display(),
        ecdsa = certs.ecdsa.display(),
        rsa = certs.rsa.display(),
        ecdsa_port = ports.ecdsa,
        rsa_port = ports.rsa,
    );
    for (name, address) in &setup.servers {
        s.push_str(&format!(
            "\n[[backend.server]]\nname = \"{name}\"\naddress = \"{address}\"\ncheck = true\nrise = 1\nmaxconn = 3000\n"
        ));
    }
    s
}

/// fdkeeper and proxyd (the binary `bin`, measured as `kind`); waits until proxyd serves. No
/// stickd: no rule here stores anything.
pub async fn start_proxyd(
    env: &mut Env,
    setup: &Setup,
    bin: &Path,
    kind: Kind,
    procs: &mut Vec<Proc>,
) -> Result<Target> {
    let tag = if kind == Kind::ProxydRing {
        "proxyd-ring"
    } else {
        "proxyd"
    };
    let dir = env.path(tag);
    let fdkeeper = cluster::start_fdkeeper(env, tag, &format!("{tag}-fdkeeper")).await?;
    procs.push(fdkeeper.proc);
    let ports = Ports::new(env)?;
    let admin = dir.join("proxyd-admin.sock");
    let config = env.write(
        &format!("{tag}/proxyd.toml"),
        &proxyd_config(&admin, &fdkeeper.socket, ports, setup),
    )?;
    // proxyd's default logging, as in the http bench: `info`, and its access log in its default
    // format (HAProxy's httplog) to stderr, the log file.
    let spec = ProcSpec::new(tag, bin)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info");
    let proxyd = env.spawn_spec(spec)?;
    let pid = proxyd.pid();
    let log = AccessLog::File {
        path: proxyd.log_path().to_owned(),
        marker: Some(HTTPLOG_MARKER),
    };
    procs.push(proxyd);
    harness::wait_for("proxyd to serve", START_TIMEOUT, || {
        let admin = admin.clone();
        async move { Ok(cluster::serving(&cluster::proxyd_status(&admin).await?)) }
    })
    .await?;
    harness::wait_tcp(ports.ecdsa, START_TIMEOUT).await?;
    harness::wait_tcp(ports.rsa, START_TIMEOUT).await?;
    Ok(Target {
        kind,
        ports,
        pid,
        log,
    })
}

/// haproxy.cfg: the seed's defaults and backend without the stick table, one thread, a TLS bind
/// per certificate with `alpn h2,http/1.1`, the idle timeouts of `TIMEOUT_IDLE`, and `option
/// httplog` to the syslog sink as in the http bench. `option dontlognull` (Debian's default
/// haproxy.cfg has it) keeps it from logging the handshake runs' connections, which send no
/// request: proxyd and nginx log no line for those either.
fn haproxy_config(ports: Ports, setup: &Setup) -> String {
    let (certs, maxconn) = (&setup.certs, setup.maxconn);
    let mut s = format!(
        r#"# HAProxy for the tls bench: TLS binds (ECDSA, RSA), one thread, in the foreground (-db).
global
    nbthread 1
    maxconn {maxconn}
    log {sink} local0

defaults
    mode http
    log global
    option httplog
    option dontlognull
    option http-keep-alive
    option forwardfor except 127.0.0.0/8
    option redispatch
    retries 3
    timeout http-request {TIMEOUT_IDLE}
    timeout queue 3s
    timeout connect 1s
    timeout client {TIMEOUT_IDLE}
    timeout server 2s
    timeout http-keep-alive {TIMEOUT_IDLE}
    timeout check 2s
    maxconn {maxconn}

frontend https-in
    bind {ecdsa_port} ssl crt {ecdsa} alpn h2,http/1.1
    bind {rsa_port} ssl crt {rsa} alpn h2,http/1.1
    default_backend app

backend app
    balance roundrobin
    option httpchk GET /index.php
    http-check expect status 200
"#,
        ecdsa = certs.ecdsa.display(),
        rsa = certs.rsa.display(),
        ecdsa_port = ports.ecdsa,
        rsa_port = ports.rsa,
        sink = setup.sink,
    );
    for (name, address) in &setup.servers {
        s.push_str(&format!(
            "    server {name} {address} check inter {CHECK_INTER} rise 1 maxconn 3000\n"
        ));
    }
    s
}

pub async fn start_haproxy(
    ctx: &Ctx,
    env: &mut Env,
    setup: &Setup,
    procs: &mut Vec<Proc>,
) -> Result<Target> {
    let ports = Ports::new(env)?;
    let cfg = env.write("haproxy/haproxy.cfg", &haproxy_config(ports, setup))?;
    check_config(&ctx.tools.haproxy, &["-c", "-q", "-f"], &cfg)?;
    let p = env.spawn(
        "haproxy",
        &ctx.tools.haproxy,
        ["-db".as_ref(), "-f".as_ref(), cfg.as_os_str()],
    )?;
    let pid = p.pid();
    let p = wait_listening(p, ports.ecdsa).await?;
    harness::wait_tcp(ports.rsa, START_TIMEOUT).await?;
    procs.push(p);
    Ok(Target {
        kind: Kind::Haproxy,
        ports,
        pid,
        log: AccessLog::Sink,
    })
}

/// nginx.conf: a master and one worker, the http bench's upstream (keepalive 64, no cookie
/// hash: nothing here is sticky), a TLS server per certificate with `http2` on its `listen`
/// (nginx 1.22 has no `http2 on;`), TLS 1.2 and 1.3 (1.22's default lacks 1.3), the idle
/// timeouts of `TIMEOUT_IDLE`, room for the idle connections of the memory run, and the access
/// log (`combined`) to `PREFIX/access.log`.
fn nginx_config(prefix: &Path, ports: Ports, setup: &Setup, user: Option<&str>) -> String {
    let (certs, maxconn) = (&setup.certs, setup.maxconn);
    let p = prefix.display();
    let user = user.map_or(String::new(), |u| format!("user {u};\n"));
    let upstream: String = setup
        .servers
        .iter()
        .map(|(_, a)| format!("        server {a} max_fails=3 fail_timeout=2s;\n"))
        .collect();
    let server = |port: SocketAddr, pem: &Path| {
        format!(
            r#"
    server {{
        listen {port} ssl http2;
        ssl_certificate {pem};
        ssl_certificate_key {pem};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"#,
            pem = pem.display()
        )
    };
    let idle = TIMEOUT_IDLE;
    format!(
        r#"# nginx for the tls bench: TLS servers (ECDSA, RSA), one worker in the foreground.
{user}worker_processes 1;
worker_rlimit_nofile {nofile};
daemon off;
pid {p}/nginx.pid;
error_log {p}/error.log warn;

events {{
    worker_connections {maxconn};
}}

http {{
    access_log {p}/access.log;
    client_body_temp_path {p}/body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    keepalive_timeout {idle};
    keepalive_requests 1000000000;
    client_header_timeout {idle};
    proxy_connect_timeout 1s;
    proxy_read_timeout 2s;
    ssl_protocols TLSv1.2 TLSv1.3;

    upstream app {{
{upstream}        keepalive 64;
        keepalive_requests 1000000000;
    }}
{ecdsa}{rsa}}}
"#,
        nofile = 2 * maxconn + 100,
        ecdsa = server(ports.ecdsa, &certs.ecdsa),
        rsa = server(ports.rsa, &certs.rsa),
    )
}

pub async fn start_nginx(
    ctx: &Ctx,
    env: &mut Env,
    setup: &Setup,
    procs: &mut Vec<Proc>,
) -> Result<Target> {
    let ports = Ports::new(env)?;
    let prefix = env.path("nginx");
    std::fs::create_dir_all(&prefix)?;
    let conf = env.write(
        "nginx/nginx.conf",
        &nginx_config(&prefix, ports, setup, run_as().as_deref()),
    )?;
    let p = spawn_nginx(env, ctx, "nginx", &prefix, &conf)?;
    let pid = p.pid();
    let p = wait_listening(p, ports.ecdsa).await?;
    harness::wait_tcp(ports.rsa, START_TIMEOUT).await?;
    procs.push(p);
    Ok(Target {
        kind: Kind::Nginx,
        ports,
        pid,
        log: AccessLog::File {
            path: prefix.join("access.log"),
            marker: None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> (Ports, Setup) {
        (
            Ports {
                ecdsa: "127.0.0.1:8443".parse().expect("addr"),
                rsa: "127.0.0.1:8444".parse().expect("addr"),
            },
            Setup {
                certs: Certs {
                    ecdsa: "/c/ecdsa.pem".into(),
                    rsa: "/c/rsa.pem".into(),
                },
                servers: vec![
                    ("app1".to_owned(), "127.0.0.2:9001".parse().expect("addr")),
                    ("app2".to_owned(), "127.0.0.2:9002".parse().expect("addr")),
                ],
                maxconn: 15_000,
                sink: "127.0.0.1:5140".parse().expect("addr"),
            },
        )
    }

    #[test]
    fn every_target_binds_both_certificates_with_h2() {
        let (ports, setup) = fixtures();
        let p = proxyd_config(Path::new("/a"), Path::new("/f"), ports, &setup);
        assert!(
            p.contains("bind = [{ address = \"127.0.0.1:8443\", tls = \"ecdsa\" }, { address = \"127.0.0.1:8444\", tls = \"rsa\" }]"),
            "{p}"
        );
        assert!(
            p.contains("certs = [\"/c/rsa.pem\"]\nalpn = [\"h2\", \"http/1.1\"]"),
            "{p}"
        );
        assert!(
            p.contains("threads = 1") && !p.contains("[backend.stick]"),
            "{p}"
        );
        assert!(p.contains("maxconn = 15000"), "{p}");
        assert!(
            p.contains("name = \"app2\"\naddress = \"127.0.0.2:9002\""),
            "{p}"
        );

        let h = haproxy_config(ports, &setup);
        assert!(
            h.contains("bind 127.0.0.1:8443 ssl crt /c/ecdsa.pem alpn h2,http/1.1\n"),
            "{h}"
        );
        assert!(
            h.contains("nbthread 1") && !h.contains("stick-table"),
            "{h}"
        );
        assert!(h.contains("    maxconn 15000\n"), "{h}");
        assert!(h.contains("server app1 127.0.0.2:9001 check"), "{h}");
        assert!(
            h.contains("    log 127.0.0.1:5140 local0\n")
                && h.contains("    log global\n    option httplog\n    option dontlognull\n"),
            "{h}"
        );

        let n = nginx_config(Path::new("/n"), ports, &setup, None);
        assert!(
            n.contains("listen 127.0.0.1:8444 ssl http2;\n        ssl_certificate /c/rsa.pem;"),
            "{n}"
        );
        assert!(n.contains("ssl_protocols TLSv1.2 TLSv1.3;"), "{n}");
        assert!(n.contains("worker_connections 15000;"), "{n}");
        assert!(
            n.contains("worker_processes 1;") && !n.contains("user "),
            "{n}"
        );
        assert!(n.contains("server 127.0.0.2:9002 max_fails=3"), "{n}");
        assert!(n.contains("    access_log /n/access.log;\n"), "{n}");
        assert!(
            !p.contains("access_log"),
            "proxyd's default access log: {p}"
        );
    }
}
