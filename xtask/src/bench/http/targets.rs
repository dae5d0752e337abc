//! The http bench's targets: proxyd (with and without stickd), HAProxy and nginx, started.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{CHECK_INTER, Kind, TABLE, TABLE_SIZE, Target};
use crate::bench::Ctx;
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

/// proxyd.toml: the seed's backend (examples/proxyd-seed.toml), with or without its stick rule.
fn proxyd_config(
    admin: &Path,
    fdkeeper: &Path,
    stickd: Option<&Path>,
    frontend: SocketAddr,
    servers: &[(String, SocketAddr)],
) -> configs::Proxyd {
    let mut global = proxyd::Global::new(admin, fdkeeper);
    global.stickd_socket = stickd.map(Path::to_owned);
    global.threads = Some(1);
    proxyd::Seed {
        global,
        frontend,
        table: TABLE,
        timeout_check: "2s",
        check_inter: CHECK_INTER.to_owned(),
        fall: 3,
        servers,
    }
    .proxyd("proxyd for the http bench: the seed's backend, one thread.")
}

/// fdkeeper, stickd (when `stick`) and proxyd; waits until proxyd serves.
pub(super) async fn start_proxyd(
    env: &mut Env,
    servers: &[(String, SocketAddr)],
    stick: bool,
    procs: &mut Vec<Proc>,
) -> Result<Target> {
    let tag = if stick { "proxyd" } else { "proxyd-nostick" };
    let dir = env.path(tag);
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
    let fdkeeper = cluster::start_fdkeeper(env, tag, &format!("{tag}-fdkeeper")).await?;
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
            servers,
        )
        .render(),
    )?;
    // No access log: HAProxy and nginx log nothing either here.
    let spec = ProcSpec::new(&format!("{tag}-proxyd"), &harness::release_bin("proxyd"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info,proxyd::access=off");
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
    Ok(Target::new(
        kind,
        frontend,
        Some(pid),
        stickd.map(|(_, p)| p),
    ))
}

/// The hard limit on open files of this process (and so of what it starts), from /proc.
pub(super) fn nofile_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(4)?.parse().ok()
}

/// HAProxy's global maxconn: the seed's 20000 unless the open-files limit is lower (HAProxy needs
/// two fds per connection and refuses to start if it cannot raise its limit to that).
pub(super) fn haproxy_maxconn() -> u64 {
    nofile_limit()
        .map_or(20_000, |n| n.saturating_sub(100) / 2)
        .min(20_000)
}

/// haproxy.cfg: the seed's config (001), one thread, no peers, no logging, `TABLE_SIZE` entries.
fn haproxy_config(
    frontend: SocketAddr,
    servers: &[(String, SocketAddr)],
    maxconn: u64,
) -> configs::Haproxy {
    let mut defaults = haproxy::Defaults::seed("http-keep-alive", "2s");
    defaults.retries = Some(3);
    defaults.maxconn = Some(maxconn.min(18_000));
    configs::Haproxy {
        comment: "HAProxy for the http bench: the seed's backend, one thread, in the foreground (-db).",
        global: haproxy::Global {
            maxconn: Some(maxconn),
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
                servers,
                &format!("check inter {CHECK_INTER} rise 1 maxconn 3000"),
            ),
        ),
    }
}

pub(super) async fn start_haproxy(
    ctx: &Ctx,
    env: &mut Env,
    servers: &[(String, SocketAddr)],
    procs: &mut Vec<Proc>,
) -> Result<Target> {
    let frontend = env.free_port(1)?;
    let cfg = env.write(
        "haproxy/haproxy.cfg",
        &haproxy_config(frontend, servers, haproxy_maxconn()).render(),
    )?;
    check_config(&ctx.tools.haproxy, &["-c", "-q", "-f"], &cfg)?;
    let p = env.spawn(
        "haproxy",
        &ctx.tools.haproxy,
        ["-db".as_ref(), "-f".as_ref(), cfg.as_os_str()],
    )?;
    let pid = p.pid();
    let p = wait_listening(p, frontend).await?;
    procs.push(p);
    Ok(Target::new(Kind::Haproxy, frontend, Some(pid), None))
}

/// nginx.conf: one worker, upstream keepalive 64, the cookie hashed (OSS nginx has no sticky
/// cookie), files under `prefix`, the seed's timeouts and no cap on requests per connection
/// (HAProxy and proxyd have none).
fn nginx_config(
    prefix: &Path,
    frontend: SocketAddr,
    servers: &[(String, SocketAddr)],
    user: Option<&str>,
) -> configs::Nginx {
    configs::Nginx {
        comment: "nginx for the http bench: one worker in the foreground, upstream keep-alive.",
        prefix: prefix.to_owned(),
        user: user.map(str::to_owned),
        master_process: false,
        error_log: nginx::ErrorLog::File("warn"),
        workers: nginx::Workers::ONE,
        access_log: None,
        listen: frontend,
        keepalive_timeout: "10s",
        keepalive_requests: 1_000_000_000,
        timeouts: Some(nginx::Timeouts {
            client_header: "2s",
            proxy_connect: "1s",
            proxy_read: "2s",
        }),
        upstream: nginx::Upstream {
            name: TABLE.to_owned(),
            hash_cookie: Some("PHPSESSID"),
            servers: servers.iter().map(|(_, a)| *a).collect(),
            server_params: "max_fails=3 fail_timeout=2s",
            keepalive: 64,
            keepalive_requests: Some(1_000_000_000),
        },
    }
}

pub(super) async fn start_nginx(
    ctx: &Ctx,
    env: &mut Env,
    servers: &[(String, SocketAddr)],
    procs: &mut Vec<Proc>,
) -> Result<Target> {
    let frontend = env.free_port(1)?;
    let prefix = env.path("nginx");
    std::fs::create_dir_all(&prefix)?;
    // As root, nginx's worker would switch to `nobody`, who cannot enter the 0700 temp dir.
    let user = nix::unistd::geteuid()
        .is_root()
        .then(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
        })
        .flatten()
        .map(|u| u.name);
    let conf = env.write(
        "nginx/nginx.conf",
        &nginx_config(&prefix, frontend, servers, user.as_deref()).render(),
    )?;
    let prefix_arg = format!("{}/", prefix.display());
    check_config(
        &ctx.tools.nginx,
        &["-q", "-e", "stderr", "-p", &prefix_arg, "-t", "-c"],
        &conf,
    )?;
    let p = env.spawn(
        "nginx",
        &ctx.tools.nginx,
        [
            "-e".as_ref(),
            "stderr".as_ref(),
            "-p".as_ref(),
            prefix_arg.as_ref(),
            "-c".as_ref(),
            conf.as_os_str(),
        ],
    )?;
    let pid = p.pid();
    let p = wait_listening(p, frontend).await?;
    procs.push(p);
    Ok(Target::new(Kind::Nginx, frontend, Some(pid), None))
}

/// Waits until `addr` accepts, failing at once (with its log) if `proc` exits first.
pub(in crate::bench) async fn wait_listening(mut proc: Proc, addr: SocketAddr) -> Result<Proc> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(proc);
        }
        if !proc.is_running() {
            bail!(
                "{} exited before listening on {addr}: {}",
                proc.name(),
                proc.log_text().trim()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "{} does not accept on {addr} after {START_TIMEOUT:?}",
                proc.name()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `prog args.. config` (a config check) and fails with what it said.
pub(in crate::bench) fn check_config(prog: &Path, args: &[&str], config: &Path) -> Result<()> {
    let out = std::process::Command::new(prog)
        .args(args)
        .arg(config)
        .output()
        .with_context(|| format!("cannot run {}", prog.display()))?;
    if !out.status.success() {
        bail!(
            "{} rejects {}: {}{}",
            prog.display(),
            config.display(),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_carry_the_seed_rules() {
        let servers = vec![
            ("app1".to_owned(), "127.0.0.2:9001".parse().expect("addr")),
            ("app2".to_owned(), "127.0.0.2:9002".parse().expect("addr")),
        ];
        let fe: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        let h = haproxy_config(fe, &servers, 20_000).render();
        assert!(h.contains("maxconn 20000") && h.contains("maxconn 18000"));
        assert!(haproxy_maxconn() <= 20_000);
        assert!(h.contains("stick on req.cook(PHPSESSID)"));
        assert!(h.contains("stick store-response res.cook(PHPSESSID)"));
        assert!(h.contains("nbthread 1"));
        assert!(h.contains("server app2 127.0.0.2:9002"));
        let p = proxyd_config(Path::new("/a"), Path::new("/f"), None, fe, &servers).render();
        assert!(!p.contains("[backend.stick]") && !p.contains("stickd_socket"));
        let p = proxyd_config(
            Path::new("/a"),
            Path::new("/f"),
            Some(Path::new("/s")),
            fe,
            &servers,
        )
        .render();
        assert!(p.contains("[backend.stick]") && p.contains("stickd_socket = \"/s\""));
        let n = nginx_config(Path::new("/n"), fe, &servers, None).render();
        assert!(n.contains("hash $cookie_PHPSESSID consistent;"));
        assert!(n.contains("keepalive 64;"));
        assert!(!n.contains("user "));
    }
}
