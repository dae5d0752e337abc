//! The two backends the http and tls sections' targets proxy to: Debian's nginx (each its own
//! instance in the temp dir, one worker, no access log) by default, or xtask's demo backend with
//! `--backends demo`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;

use super::tools::{run_as, spawn_nginx, wait_listening};
use super::{BackendKind, Ctx};
use crate::cluster;
use crate::configs::nginx::{self, BIG_BYTES, BIG_PATH};
use crate::harness::{Env, Proc};

/// A running backend.
pub(super) struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    /// Root of its process tree, whose CPU the report shows beside the proxy's.
    pub pid: u32,
}

/// Starts `app1` and `app2` of `kind`; `nofile` is the open-file limit they may use.
pub(super) async fn start(
    env: &mut Env,
    ctx: &Ctx,
    kind: BackendKind,
    nofile: u64,
    procs: &mut Vec<Proc>,
) -> Result<Vec<Backend>> {
    let names = ["app1".to_owned(), "app2".to_owned()];
    let mut out = Vec::new();
    match kind {
        BackendKind::Demo => {
            for (name, addr, p) in
                cluster::start_backends(env, &names, 2, Duration::ZERO, None).await?
            {
                out.push(Backend {
                    name,
                    addr,
                    pid: p.pid(),
                });
                procs.push(p);
            }
        }
        BackendKind::Nginx => {
            for name in names {
                let addr = env.free_port(2)?;
                let (pid, p) = start_nginx(env, ctx, &name, addr, nofile).await?;
                out.push(Backend { name, addr, pid });
                procs.push(p);
            }
        }
    }
    Ok(out)
}

async fn start_nginx(
    env: &mut Env,
    ctx: &Ctx,
    name: &str,
    addr: SocketAddr,
    nofile: u64,
) -> Result<(u32, Proc)> {
    let prefix = env.path(&format!("backend-{name}"));
    std::fs::create_dir_all(prefix.join("www"))?;
    std::fs::write(
        prefix.join("www").join(&BIG_PATH[1..]),
        vec![b'x'; BIG_BYTES],
    )?;
    let conf = env.write(
        &format!("backend-{name}/nginx.conf"),
        &nginx::Backend {
            name: name.to_owned(),
            prefix: prefix.clone(),
            user: run_as(),
            workers: nginx::Workers {
                processes: 1,
                // Every idle connection of the memory run may hold one to a backend.
                connections: nofile.saturating_sub(200),
                rlimit_nofile: Some(nofile),
            },
            listen: addr,
        }
        .render(),
    )?;
    let p = spawn_nginx(env, ctx, &format!("backend-{name}"), &prefix, &conf)?;
    let pid = p.pid();
    Ok((pid, wait_listening(p, addr).await?))
}
