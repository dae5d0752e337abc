//! What the binary's commands do, kept out of main.rs: `check`, the master's start-up, `reload`,
//! `status` and `import-haproxy`.

use std::path::{Path, PathBuf};

use common::daemon::{EXIT_CONFIG, EXIT_FAILURE, EXIT_OK};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::master::Master;

/// `proxyd check`: exit 0, or 64 with file:line:column: reason. Every certificate is loaded
/// and checked against its key; warnings (a certificate that expires within 14 days) go to
/// stderr and leave the exit code 0.
pub fn check(config_path: &Path) -> i32 {
    match crate::resolve::load(config_path) {
        Ok(c) => {
            for w in &c.warnings {
                eprintln!("warning: {w}");
            }
            println!("{}: ok", config_path.display());
            EXIT_OK
        }
        Err(e) => {
            eprintln!("{e}");
            EXIT_CONFIG
        }
    }
}

/// `proxyd --config FILE`: validate, bind the admin socket, run the master until stopped.
pub fn master(config_path: &Path) -> i32 {
    let config = match crate::resolve::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return EXIT_CONFIG;
        }
    };
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    // Resolved once: a reload after an upgrade on disk must exec the new file at this path,
    // while /proc/self/exe would keep pointing at the old (deleted) one.
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "cannot find the proxyd binary");
            return EXIT_FAILURE;
        }
    };
    let admin = match common::daemon::bind_unix(&config.global.admin_socket, 0o600) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, socket = %config.global.admin_socket.display(), "cannot bind the admin socket");
            return EXIT_FAILURE;
        }
    };
    let metrics = match config.global.metrics.map(std::net::TcpListener::bind) {
        None => None,
        Some(Ok(l)) => Some(l),
        Some(Err(e)) => {
            tracing::error!(error = %e, "cannot bind the metrics listener");
            return EXIT_FAILURE;
        }
    };
    let admin_path = config.global.admin_socket.clone();
    // One thread: workers' parent-death signal follows the thread that spawned them.
    let rt = match common::daemon::runtime(1) {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the runtime");
            return EXIT_FAILURE;
        }
    };
    tracing::info!(pid = std::process::id(), admin = %admin_path.display(), "master started");
    let code = rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let (master, handle) = Master::new(config, exe);
        if let Err(e) = crate::master::forward_signals(handle.clone(), shutdown.clone()) {
            tracing::error!(error = %e, "cannot install signal handlers");
            return EXIT_FAILURE;
        }
        let admin_stop = CancellationToken::new();
        if let Some(l) = metrics {
            tokio::spawn(crate::metrics::serve(handle.clone(), l, admin_stop.clone()));
        }
        let admin_task = tokio::spawn(crate::admin::serve(handle, admin, admin_stop.clone()));
        master.run(shutdown).await;
        admin_stop.cancel();
        match admin_task.await {
            Ok(Ok(())) => EXIT_OK,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "admin server failed");
                EXIT_FAILURE
            }
            Err(e) => {
                tracing::error!(error = %e, "admin server panicked");
                EXIT_FAILURE
            }
        }
    });
    let _ = std::fs::remove_file(&admin_path);
    code
}

type AdminClient = proto::proxyd::v1::admin_client::AdminClient<tonic::transport::Channel>;

/// Runs `f` with a client of the running master's admin socket; returns the exit code.
fn with_admin<F, Fut>(config_path: &Path, admin_socket: Option<PathBuf>, f: F) -> i32
where
    F: FnOnce(AdminClient) -> Fut,
    Fut: Future<Output = i32>,
{
    let from_config = admin_socket.is_none();
    let socket = match admin_socket {
        Some(s) => s,
        None => match admin_socket_of(config_path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{e}");
                return EXIT_CONFIG;
            }
        },
    };
    let rt = match common::daemon::runtime(1) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot build the runtime: {e}");
            return EXIT_FAILURE;
        }
    };
    rt.block_on(async {
        match common::grpc::connect_unix(&socket).await {
            Ok(c) => f(AdminClient::new(c)).await,
            Err(e) => {
                eprintln!("cannot reach proxyd at {}: {e}", socket.display());
                if from_config {
                    // A reload reports a changed admin_socket but cannot move the master's.
                    eprintln!(
                        "if the running proxyd was started with another admin_socket (a reload \
                         does not move it, a restart does), pass --admin-socket PATH"
                    );
                }
                EXIT_FAILURE
            }
        }
    })
}

/// `proxyd status`: prints the running master's generations in a few lines.
pub fn status(config_path: &Path, admin_socket: Option<PathBuf>) -> i32 {
    use proto::proxyd::v1::GenerationState;
    with_admin(config_path, admin_socket, |mut admin| async move {
        let s = match admin.status(proto::proxyd::v1::StatusRequest {}).await {
            Ok(s) => s.into_inner(),
            Err(status) => {
                eprintln!("status failed: {}", status.message());
                return EXIT_FAILURE;
            }
        };
        println!("master pid {} config {}", s.master_pid, s.config_path);
        for g in &s.generations {
            let state = GenerationState::try_from(g.state).map_or("unknown", |st| st.as_str_name());
            let w = g.worker.clone().unwrap_or_default();
            println!(
                "generation {} {state} pid {} restarts {} connections {} requests {} in flight {} tunnels {} threads {}",
                g.generation,
                w.pid,
                w.restarts,
                w.active_connections,
                w.requests_total,
                w.requests_in_flight,
                w.tunnels_active,
                threads_holding(&w.thread_connections)
            );
        }
        match &s.last_reload {
            Some(r) => println!(
                "last reload: {} ({}), reloads {} ok {} failed",
                if r.ok { "ok" } else { "failed" },
                r.message,
                s.reloads_ok,
                s.reloads_failed
            ),
            None => println!("no reload yet"),
        }
        EXIT_OK
    })
}

/// How many serving threads hold a connection, of how many: `8/8` when the connections are
/// spread over every thread (`proxyd status`; the counts themselves are in `/metrics`).
fn threads_holding(thread_connections: &[u64]) -> String {
    let holding = thread_connections.iter().filter(|&&n| n > 0).count();
    format!("{holding}/{}", thread_connections.len())
}

/// `proxyd servers`: every server with its state, as HAProxy's `show servers state` lists
/// them (one line each, a header naming the columns).
pub fn servers(config_path: &Path, admin_socket: Option<PathBuf>, backend: Option<String>) -> i32 {
    with_admin(config_path, admin_socket, |mut admin| async move {
        let request = proto::proxyd::v1::ShowServersRequest {
            backend: backend.unwrap_or_default(),
        };
        match admin.show_servers(request).await {
            Ok(r) => {
                let r = r.into_inner();
                println!("# generation {}", r.generation);
                println!("{}", server_header());
                for s in &r.servers {
                    println!("{}", server_line(s));
                }
                EXIT_OK
            }
            Err(status) => {
                eprintln!("servers failed: {}", status.message());
                EXIT_FAILURE
            }
        }
    })
}

/// `proxyd set-server`: HAProxy's `set server BACKEND/SERVER state ...|weight ...`; the
/// master applies it to every generation and keeps it across reloads.
pub fn set_server(
    config_path: &Path,
    admin_socket: Option<PathBuf>,
    request: proto::proxyd::v1::SetServerRequest,
) -> i32 {
    with_admin(config_path, admin_socket, |mut admin| async move {
        match admin.set_server(request).await {
            Ok(r) => {
                println!("{}", server_header());
                if let Some(s) = r.into_inner().server {
                    println!("{}", server_line(&s));
                }
                EXIT_OK
            }
            Err(status) => {
                eprintln!("set-server failed: {}", status.message());
                match status.code() {
                    tonic::Code::InvalidArgument | tonic::Code::NotFound => EXIT_CONFIG,
                    _ => EXIT_FAILURE,
                }
            }
        }
    })
}

fn server_header() -> &'static str {
    "# be_name srv_name srv_addr health admin_state weight active maxconn requests errors"
}

fn server_line(s: &proto::proxyd::v1::ServerState) -> String {
    format!(
        "{} {} {} {} {} {} {} {} {} {}",
        s.backend,
        s.server,
        s.address,
        s.health,
        s.admin_state,
        s.weight,
        s.active,
        s.maxconn,
        s.requests_total,
        s.errors
    )
}

/// `proxyd reload`: calls Admin/Reload on the running master and prints the result.
pub fn reload(config_path: &Path, admin_socket: Option<PathBuf>) -> i32 {
    with_admin(config_path, admin_socket, |mut admin| async move {
        match admin.reload(proto::proxyd::v1::ReloadRequest {}).await {
            Ok(r) => {
                let r = r.into_inner().result.unwrap_or_default();
                println!(
                    "reload ok: generation {} serving after {:.1} ms",
                    r.generation,
                    r.duration_us as f64 / 1000.0
                );
                for s in &r.restart_only {
                    println!(
                        "not applied until proxyd restarts: {} (running {}, configured {})",
                        s.setting, s.running, s.configured
                    );
                }
                EXIT_OK
            }
            Err(status) => {
                eprintln!("reload failed: {}", status.message());
                reload_exit_code(status.code())
            }
        }
    })
}

/// The exit code of a reload the master refused: a configuration it refused (INVALID_ARGUMENT,
/// or FAILED_PRECONDITION) is the user's to fix, so 64 as for `proxyd check`; anything else
/// (a worker that could not start, a master stopping) is 1.
pub fn reload_exit_code(code: tonic::Code) -> i32 {
    match code {
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => EXIT_CONFIG,
        _ => EXIT_FAILURE,
    }
}

/// The admin socket named in a config, read leniently: the file may be broken (that is
/// what the reload will report), but the master's socket is still worth finding.
fn admin_socket_of(path: &Path) -> Result<PathBuf, common::ConfigError> {
    if let Ok(c) = Config::load(path) {
        return Ok(c.global.admin_socket);
    }
    let src = common::SourceFile::read(path)?;
    let table: toml::Table = src.parse()?;
    table
        .get("global")
        .and_then(|g| g.get("admin_socket"))
        .and_then(|s| s.as_str())
        .map(PathBuf::from)
        .ok_or_else(|| src.error("no [global] admin_socket to find the running proxyd"))
}

/// Where `import-haproxy` looks when no `--config` is given.
pub const HAPROXY_CFG: &str = "/etc/haproxy/haproxy.cfg";

/// `proxyd import-haproxy`'s own arguments (`--config` is the binary's, naming haproxy.cfg).
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The local peer, as `haproxy -L` (default: `localpeer` of haproxy.cfg, else the hostname).
    #[arg(short = 'L', long = "local-peer", value_name = "NAME")]
    pub local_peer: Option<String>,
    /// Rewrite an address of haproxy.cfg (binds, servers, peers) for a try-out:
    /// `192.168.1.10=127.0.0.1` (every port of an IP) or `*:80=127.0.0.1:8080`.
    #[arg(long = "map-address", value_name = "OLD=NEW")]
    pub map_address: Vec<crate::import::AddressMap>,
    /// Directory the files are written to (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Sockets and stickd's data under DIR instead of /run and /var/lib (a try-out without root).
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Exit 64 if any line is translated only approximately or not at all.
    #[arg(long)]
    pub strict: bool,
}

/// `proxyd import-haproxy`: writes the files and the report under `--out`, prints the report;
/// exits 64 on a config it cannot translate, or with `--strict` on any reported line.
pub fn import_haproxy(config: Option<&Path>, args: &ImportArgs) -> i32 {
    let config = config.unwrap_or(Path::new(HAPROXY_CFG));
    let opts = crate::import::Options {
        local: args.local_peer.clone(),
        maps: args.map_address.clone(),
        run_dir: args.run_dir.clone(),
    };
    match crate::import::import(config, &args.out, &opts) {
        Ok(imported) => {
            print!("{}", imported.report);
            for (name, _) in &imported.files {
                eprintln!("wrote {}", args.out.join(name).display());
            }
            if args.strict && !imported.report.is_empty() {
                eprintln!("--strict: some lines are not translated exactly");
                EXIT_CONFIG
            } else {
                EXIT_OK
            }
        }
        Err(e @ crate::import::ImportError::Write { .. }) => {
            eprintln!("{e}");
            EXIT_FAILURE
        }
        Err(e) => {
            eprintln!("{e}");
            EXIT_CONFIG
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_configuration_exits_64_and_other_failures_1() {
        assert_eq!(reload_exit_code(tonic::Code::InvalidArgument), EXIT_CONFIG);
        assert_eq!(
            reload_exit_code(tonic::Code::FailedPrecondition),
            EXIT_CONFIG
        );
        assert_eq!(reload_exit_code(tonic::Code::Internal), EXIT_FAILURE);
        assert_eq!(reload_exit_code(tonic::Code::Unavailable), EXIT_FAILURE);
    }

    #[test]
    fn status_counts_the_threads_holding_a_connection() {
        assert_eq!(threads_holding(&[3, 0, 1, 0]), "2/4");
        assert_eq!(threads_holding(&[2, 2]), "2/2");
        // A worker that has not accepted yet reports no thread.
        assert_eq!(threads_holding(&[]), "0/0");
    }
}
