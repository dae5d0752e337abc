//! The http bench's targets: proxyd (with and without stickd), HAProxy and nginx, each with
//! one or two threads and its access log on, started.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Result;

use super::{CHECK_INTER, Kind, TABLE, TABLE_SIZE, TIMEOUT_IDLE, Target};
use crate::bench::Ctx;
use crate::bench::logs::{AccessLog, HTTPLOG_MARKER};
use crate::bench::tools::{check_config, run_as, spawn_nginx, wait_listening};
use crate::cluster::{self, START_TIMEOUT};
use crate::configs::{self, haproxy, nginx, proxyd};
use crate::harness::{self, Env, Proc, ProcSpec};

/// stickd.toml: one table like the seed's, but `TABLE_SIZE` entries.
fn stickd_config(dir: &Path, socket: &Path, peer: SocketAddr) -> configs::Stickd {
    configs::Stickd {
        comment: "stickd for the http bench: a single node (its own peer entry only).",
        peers: vec![("node1".to_owned(), peer)],
        tables: vec![configs::stickd::Table::string(TABLE, 32, TABLE_SIZE, "5m")],
        ..configs::Stickd::new(dir.join("data"), socket.to_owned())
    }
}

/// What every target of one thread count is given.
pub(super) struct Setup<'a> {
    pub servers: &'a [(String, SocketAddr)],
    /// proxyd `threads`, HAProxy `nbthread`, nginx `worker_processes`.
    pub threads: u32,
    /// Connections each target takes at once (the idle run's, with a margin).
    pub maxconn: u64,
    /// HAProxy's syslog target.
    pub sink: SocketAddr,
}

impl Setup<'_> {
    /// Names in the temp dir and of the logs: `proxyd-t1`, `haproxy-t2`...
    fn tag(&self, what: &str) -> String {
        format!("{what}-t{}", self.threads)
    }
}

/// proxyd.toml: the seed's backend (examples/proxyd-seed.toml), with or without its stick rule,
/// `threads`, and the idle timeouts of `TIMEOUT_IDLE`.
fn proxyd_config(
    admin: &Path,
    fdkeeper: &Path,
    stickd: Option<&Path>,
    frontend: SocketAddr,
    setup: &Setup<'_>,
) -> configs::Proxyd {
    let mut global = proxyd::Global::new(admin, fdkeeper);
    global.stickd_socket = stickd.map(Path::to_owned);
    global.threads = Some(setup.threads);
    let mut p = proxyd::Seed {
        global,
        frontend,
        table: TABLE,
        timeout_check: "2s",
        check_inter: CHECK_INTER.to_owned(),
        fall: 3,
        servers: setup.servers,
    }
    .proxyd("proxyd for the http bench: the seed's backend, its default access log.");
    p.defaults.timeout_client = Some(TIMEOUT_IDLE);
    p.defaults.timeout_http_keep_alive = Some(TIMEOUT_IDLE);
    p.defaults.maxconn = Some(setup.maxconn as u32);
    p
}

/// fdkeeper, stickd (when `stick`) and proxyd; waits until proxyd serves.
pub(super) async fn start_proxyd(
    env: &mut Env,
    setup: &Setup<'_>,
    stick: bool,
    procs: &mut Vec<Proc>,
) -> Result<Target> {
    let tag = setup.tag(if stick { "proxyd" } else { "proxyd-nostick" });
    let dir = env.path(&tag);
    let stickd = if stick {
        let socket = dir.join("stickd.sock");
        let peer = env.free_port(1)?;
        let config = env.write(
            &format!("{tag}/stickd.toml"),
            &stickd_config(&dir.join("stickd"), &socket, peer).render(),
        )?;
        let p = env.spawn(
            &format!("{tag}-stickd"),
            harness::release_bin("stickd"),
            [
                "--config".as_ref(),
                config.as_os_str(),
                "-L".as_ref(),
                "node1".as_ref(),
            ],
        )?;
        harness::wait_unix(&socket, START_TIMEOUT).await?;
        let pid = p.pid();
        procs.push(p);
        Some((socket, pid))
    } else {
        None
    };
    let fdkeeper = cluster::start_fdkeeper(env, &tag, &format!("{tag}-fdkeeper")).await?;
    procs.push(fdkeeper.proc);
    let frontend = env.free_port(1)?;
    let admin = dir.join("proxyd-admin.sock");
    let config = env.write(
        &format!("{tag}/proxyd.toml"),
        &proxyd_config(
            &admin,
            &fdkeeper.socket,
            stickd.as_ref().map(|(s, _)| s.as_path()),
            frontend,
            setup,
        )
        .render(),
    )?;
    // proxyd's default logging: `info`, and its access log in its default format (HAProxy's
    // httplog) to stderr, the log file.
    let name = format!("{tag}-proxyd");
    let spec = ProcSpec::new(&name, &harness::release_bin("proxyd"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info");
    let proxyd = env.spawn_spec(spec)?;
    let pid = proxyd.pid();
    procs.push(proxyd);
    harness::wait_for("proxyd to serve", START_TIMEOUT, || {
        let admin = admin.clone();
        async move { Ok(cluster::serving(&cluster::proxyd_status(&admin).await?)) }
    })
    .await?;
    harness::wait_tcp(frontend, START_TIMEOUT).await?;
    let kind = if stick {
        Kind::Proxyd
    } else {
        Kind::ProxydNoStick
    };
    let log = AccessLog::File {
        path: env.logs_dir().join(format!("{name}.log")),
        marker: Some(HTTPLOG_MARKER),
    };
    Ok(Target::new(
        kind,
        frontend,
        pid,
        stickd.map(|(_, p)| p),
        log,
    ))
}

/// The hard limit on open files of this process (and so of what it starts), from /proc.
pub(super) fn nofile_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(4)?.parse().ok()
}

/// HAProxy's global maxconn at most: the seed's 20000 unless the open-files limit is lower
/// (HAProxy needs two fds per connection and refuses to start if it cannot raise its limit to
/// that).
pub(super) fn haproxy_maxconn() -> u64 {
    nofile_limit()
        .map_or(20_000, |n| n.saturating_sub(100) / 2)
        .min(20_000)
}

/// haproxy.cfg: the seed's config (001), `nbthread`, no peers, `TABLE_SIZE` entries, the idle
/// timeouts of `TIMEOUT_IDLE`, and `option httplog` to the syslog sink.
fn haproxy_config(frontend: SocketAddr, setup: &Setup<'_>) -> configs::Haproxy {
    let maxconn = setup.maxconn.min(haproxy_maxconn());
    let mut defaults = haproxy::Defaults::seed("http-keep-alive", "2s");
    defaults.retries = Some(3);
    defaults.maxconn = Some(maxconn);
    defaults.options.push("httplog");
    for (name, value) in &mut defaults.timeouts {
        if matches!(*name, "client" | "http-keep-alive") {
            *value = TIMEOUT_IDLE;
        }
    }
    configs::Haproxy {
        comment: "HAProxy for the http bench: the seed's backend, httplog, in the foreground (-db).",
        global: haproxy::Global {
            nbthread: Some(setup.threads),
            maxconn: Some(maxconn),
            log: Some(setup.sink),
            ..haproxy::Global::default()
        },
        peers: Vec::new(),
        defaults,
        frontend: haproxy::Frontend {
            name: "http-in",
            bind: frontend,
        },
        backend: haproxy::Backend::seed(
            TABLE,
            haproxy::StickTable {
                size: TABLE_SIZE,
                peers: false,
            },
            haproxy::servers(
                setup.servers,
                &format!("check inter {CHECK_INTER} rise 1 maxconn 3000"),
            ),
        ),
    }
}

pub(super) async fn start_haproxy(
    ctx: &Ctx,
    env: &mut Env,
    setup: &Setup<'_>,
    procs: &mut Vec<Proc>,
) -> Result<Target> {
    let frontend = env.free_port(1)?;
    let tag = setup.tag("haproxy");
    let cfg = env.write(
        &format!("{tag}/haproxy.cfg"),
        &haproxy_config(frontend, setup).render(),
    )?;
    check_config(&ctx.tools.haproxy, &["-c", "-q", "-f"], &cfg)?;
    let p = env.spawn(
        &tag,
        &ctx.tools.haproxy,
        ["-db".as_ref(), "-f".as_ref(), cfg.as_os_str()],
    )?;
    let pid = p.pid();
    let p = wait_listening(p, frontend).await?;
    procs.push(p);
    Ok(Target::new(
        Kind::Haproxy,
        frontend,
        pid,
        None,
        AccessLog::Sink,
    ))
}

/// nginx.conf: `worker_processes`, upstream keepalive 64, the cookie hashed (OSS nginx has no
/// sticky cookie), files under `prefix`, the seed's timeouts but the idle ones of
/// `TIMEOUT_IDLE`, no cap on requests per connection (HAProxy and proxyd have none), and the
/// access log to `PREFIX/access.log`.
fn nginx_config(
    prefix: &Path,
    frontend: SocketAddr,
    setup: &Setup<'_>,
    user: Option<&str>,
) -> configs::Nginx {
    configs::Nginx {
        comment: "nginx for the http bench: workers in the foreground, upstream keep-alive.",
        prefix: prefix.to_owned(),
        user: user.map(str::to_owned),
        master_process: false,
        error_log: nginx::ErrorLog::File("warn"),
        workers: nginx::Workers {
            processes: setup.threads,
            connections: setup.maxconn,
            rlimit_nofile: Some(2 * setup.maxconn + 100),
        },
        access_log: Some(prefix.join("access.log")),
        listen: frontend,
        keepalive_timeout: TIMEOUT_IDLE,
        keepalive_requests: 1_000_000_000,
        timeouts: Some(nginx::Timeouts {
            client_header: "2s",
            proxy_connect: "1s",
            proxy_read: "2s",
        }),
        upstream: nginx::Upstream {
            name: TABLE.to_owned(),
            hash_cookie: Some("PHPSESSID"),
            servers: setup.servers.iter().map(|(_, a)| *a).collect(),
            server_params: "max_fails=3 fail_timeout=2s",
            keepalive: 64,
            keepalive_requests: Some(1_000_000_000),
        },
    }
}

pub(super) async fn start_nginx(
    ctx: &Ctx,
    env: &mut Env,
    setup: &Setup<'_>,
    procs: &mut Vec<Proc>,
) -> Result<Target> {
    let frontend = env.free_port(1)?;
    let tag = setup.tag("nginx");
    let prefix = env.path(&tag);
    std::fs::create_dir_all(&prefix)?;
    let conf = env.write(
        &format!("{tag}/nginx.conf"),
        &nginx_config(&prefix, frontend, setup, run_as().as_deref()).render(),
    )?;
    let p = spawn_nginx(env, ctx, &tag, &prefix, &conf)?;
    let pid = p.pid();
    let p = wait_listening(p, frontend).await?;
    procs.push(p);
    let log = AccessLog::File {
        path: prefix.join("access.log"),
        marker: None,
    };
    Ok(Target::new(Kind::Nginx, frontend, pid, None, log))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_carry_the_seed_rules_threads_and_logs() {
        let servers = vec![
            ("app1".to_owned(), "127.0.0.2:9001".parse().expect("addr")),
            ("app2".to_owned(), "127.0.0.2:9002".parse().expect("addr")),
        ];
        let fe: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        let setup = Setup {
            servers: &servers,
            threads: 2,
            maxconn: 9_000,
            sink: "127.0.0.1:5140".parse().expect("addr"),
        };
        let h = haproxy_config(fe, &setup).render();
        assert!(haproxy_maxconn() <= 20_000);
        assert!(h.contains("nbthread 2\n"), "{h}");
        assert!(
            h.contains("    maxconn 9000\n") || haproxy_maxconn() < 9_000,
            "{h}"
        );
        assert!(h.contains("log 127.0.0.1:5140 local0") && h.contains("option httplog"));
        assert!(h.contains("timeout client 60s") && h.contains("timeout http-keep-alive 60s"));
        assert!(h.contains("stick on req.cook(PHPSESSID)"));
        assert!(h.contains("stick store-response res.cook(PHPSESSID)"));
        assert!(h.contains("server app2 127.0.0.2:9002"));
        let p = proxyd_config(Path::new("/a"), Path::new("/f"), None, fe, &setup).render();
        assert!(!p.contains("[backend.stick]") && !p.contains("stickd_socket"));
        assert!(p.contains("threads = 2") && p.contains("timeout_http_keep_alive = \"60s\""));
        let p = proxyd_config(
            Path::new("/a"),
            Path::new("/f"),
            Some(Path::new("/s")),
            fe,
            &setup,
        )
        .render();
        assert!(p.contains("[backend.stick]") && p.contains("stickd_socket = \"/s\""));
        let n = nginx_config(Path::new("/n"), fe, &setup, None).render();
        assert!(n.contains("hash $cookie_PHPSESSID consistent;"));
        assert!(n.contains("keepalive 64;"));
        assert!(n.contains("worker_processes 2;") && n.contains("worker_connections 9000;"));
        assert!(n.contains("access_log /n/access.log;"), "{n}");
        assert!(!n.contains("user "));
    }
}
