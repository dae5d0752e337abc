//! HAProxy's and nginx's side of a target: their configs, and their processes as seen from outside.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Kind;
use crate::configs::{self, haproxy, nginx};

/// The HAProxy config: the same frontend and round-robin backend as proxyd's, one thread, the
/// stats socket with `expose-fd listeners` so that a new worker takes the listeners over.
pub(super) fn haproxy_config(
    stats: &Path,
    frontend: SocketAddr,
    servers: &[(String, SocketAddr)],
    idle_close: bool,
    no_exit: bool,
) -> configs::Haproxy {
    configs::Haproxy {
        comment: "",
        global: haproxy::Global {
            maxconn: None,
            stats_socket: Some(haproxy::StatsSocket {
                path: stats.to_owned(),
                expose_fd_listeners: true,
            }),
            no_exit_on_failure: no_exit,
            ..haproxy::Global::default()
        },
        peers: Vec::new(),
        defaults: haproxy::Defaults {
            options: if idle_close {
                vec!["idle-close-on-response"]
            } else {
                Vec::new()
            },
            retries: None,
            timeouts: vec![
                ("connect", "5s"),
                ("client", "30s"),
                ("server", "30s"),
                ("http-keep-alive", "30s"),
            ],
            maxconn: None,
        },
        frontend: haproxy::Frontend {
            name: "www",
            bind: frontend,
        },
        backend: haproxy::Backend {
            name: "app".into(),
            stick: None,
            options: Vec::new(),
            http_check: None,
            servers: haproxy::servers(servers, ""),
        },
    }
}

/// `haproxy -c`: fails naming the option when this HAProxy does not accept the config. Once
/// per variant and run: a check costs a whole HAProxy start-up (about 0.3 s here).
pub(super) fn check_haproxy(haproxy: &Path, kind: Kind, cfg: &Path) -> Result<()> {
    static CHECKED: std::sync::Mutex<Vec<Kind>> = std::sync::Mutex::new(Vec::new());
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if checked.contains(&kind) {
        return Ok(());
    }
    let out = std::process::Command::new(haproxy)
        .args(["-c", "-q", "-f"])
        .arg(cfg)
        .output()
        .context("cannot run haproxy -c")?;
    if !out.status.success() {
        bail!(
            "haproxy -c rejects the {} config: {}",
            kind.label(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    checked.push(kind);
    Ok(())
}

/// The nginx config: one worker, the master in the foreground, upstream keep-alive, every file
/// inside `dir`.
pub(super) fn nginx_config(
    dir: &Path,
    frontend: SocketAddr,
    servers: &[(String, SocketAddr)],
) -> configs::Nginx {
    configs::Nginx {
        comment: "",
        prefix: dir.to_owned(),
        user: None,
        master_process: true,
        error_log: nginx::ErrorLog::Stderr("notice"),
        workers: nginx::Workers::ONE,
        access_log: None,
        listen: frontend,
        keepalive_timeout: "30s",
        keepalive_requests: 1_000_000,
        timeouts: None,
        upstream: nginx::Upstream {
            name: "app".into(),
            hash_cookie: None,
            servers: servers.iter().map(|(_, a)| *a).collect(),
            server_params: "",
            keepalive: 64,
            keepalive_requests: None,
        },
    }
}

/// What HAProxy's master says about its processes.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct ShowProc {
    pub(super) reloads: u64,
    pub(super) failed: u64,
    /// The worker of the latest reload (its own reload count is 0).
    pub(super) current_worker: Option<u32>,
    workers: usize,
}

/// `show proc` on HAProxy's master CLI.
pub(super) async fn show_proc(master_cli: &Path) -> Result<ShowProc> {
    let fut = async {
        let mut s = tokio::net::UnixStream::connect(master_cli).await?;
        // The master CLI keeps a connection open after a command unless told to quit.
        s.write_all(b"show proc;quit\n").await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        anyhow::Ok(out)
    };
    let text = tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .context("HAProxy's master CLI did not answer within 2s")?
        .with_context(|| format!("show proc on {}", master_cli.display()))?;
    parse_show_proc(&text).with_context(|| format!("unexpected show proc output: {text:?}"))
}

/// `show proc`, retried for up to 2 s: the master re-executes itself on a reload, and once more
/// (into wait mode) when the new worker is up, and its CLI is briefly gone each time.
pub(super) async fn show_proc_retry(master_cli: &Path) -> Result<ShowProc> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match show_proc(master_cli).await {
            Ok(p) => return Ok(p),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Parses `show proc` (HAProxy 2.6): the master line "PID master RELOADS [failed: N] ...", then
/// "PID worker RELOADS ..." lines.
fn parse_show_proc(text: &str) -> Option<ShowProc> {
    let mut out = ShowProc::default();
    let mut saw_master = false;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            [_, "master", reloads, "[failed:", failed, ..] => {
                out.reloads = reloads.parse().ok()?;
                out.failed = failed.trim_end_matches(']').parse().ok()?;
                saw_master = true;
            }
            [pid, "worker", reloads, ..] => {
                out.workers += 1;
                if *reloads == "0" {
                    out.current_worker = pid.parse().ok();
                }
            }
            _ => {}
        }
    }
    saw_master.then_some(out)
}

/// A process's title (nginx renames its workers: "nginx: worker process is shutting down").
pub(super) fn proc_title(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .replace('\0', " ")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_proc_of_haproxy_2_6() {
        // Columns as HAProxy 2.6.12 prints them, padding shortened.
        let text = "#<PID>   <type>   <reloads>   <uptime>   <version>      \n\
                    14803   master   3 [failed: 1]   0d00h00m05s   2.6.12-1+deb12u3\n\
                    # workers\n\
                    14998   worker   0   0d00h00m01s   2.6.12-1+deb12u3\n\
                    14950   worker   1   0d00h00m02s   2.6.12-1+deb12u3\n\
                    # programs\n\n";
        assert_eq!(
            parse_show_proc(text),
            Some(ShowProc {
                reloads: 3,
                failed: 1,
                current_worker: Some(14998),
                workers: 2,
            })
        );
        // A worker alone (no master line) is not a master's answer.
        assert_eq!(parse_show_proc("# workers\n1 worker 0 0d 2.6\n"), None);
    }

    #[test]
    fn configs_name_every_server_and_option() {
        let servers = vec![
            ("app1".to_owned(), SocketAddr::from(([127, 0, 0, 2], 8001))),
            ("app2".to_owned(), SocketAddr::from(([127, 0, 0, 2], 8002))),
        ];
        let fe = SocketAddr::from(([127, 0, 0, 1], 8000));
        let h = haproxy_config(Path::new("/x/stats.sock"), fe, &servers, true, true).render();
        assert!(h.contains("expose-fd listeners"), "{h}");
        assert!(h.contains("master-worker no-exit-on-failure"), "{h}");
        assert!(h.contains("option idle-close-on-response"), "{h}");
        assert!(h.contains("server app2 127.0.0.2:8002"), "{h}");
        let h = haproxy_config(Path::new("/x/stats.sock"), fe, &servers, false, false).render();
        assert!(
            !h.contains("idle-close") && !h.contains("master-worker"),
            "{h}"
        );
        let n = nginx_config(Path::new("/x"), fe, &servers).render();
        assert!(n.contains("listen 127.0.0.1:8000;"), "{n}");
        assert!(n.contains("server 127.0.0.2:8001;"), "{n}");
        assert!(
            n.contains("worker_processes 1;") && n.contains("daemon off;"),
            "{n}"
        );
    }
}
