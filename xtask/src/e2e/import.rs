//! HAProxy users' configs, brought over with the real `proxyd import-haproxy` and run as
//! imported: the seeds' haproxy.cfg files, their own tests unchanged.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use super::lb::wait_peered;
use super::{Outcome, Scenario, ensure_no_failures, figure, print_load, with_tools};
use crate::cluster::{self, START_TIMEOUT};
use crate::harness::{self, Env, Proc, ProcSpec};
use crate::load::{Load, LoadConfig};

pub fn scenarios() -> Vec<Scenario> {
    let s = Scenario::new;
    vec![
        s(
            "import-seed-001",
            "seed 001's haproxy.cfg (three peers) imported per node with -L haproxy1..3 and run as imported: 5 curl requests per node, then grpcurl Show lists the same 15 sessions on every node",
            60,
            |env| Box::pin(with_tools(&[("curl", "curl")], seed_001(env))),
        ),
        s(
            "import-seed-000",
            "seed 000's haproxy.cfg imported: `expose-fd listeners` becomes fdkeeper's lending socket; the imported node serves, and `proxyd reload` under load keeps the socket and loses no request",
            60,
            |env| Box::pin(seed_000(env)),
        ),
    ]
}

/// A seed's haproxy.cfg, as the import tests keep it.
fn seed_cfg(dir: &str) -> PathBuf {
    harness::workspace_root()
        .join("proxyd/tests/fixtures/haproxy")
        .join(dir)
        .join("haproxy.cfg")
}

/// `proxyd --config CFG import-haproxy -L LOCAL --map-address ... --out DIR --run-dir DIR/run`
/// with the release binary; returns the output directory.
async fn import(env: &Env, cfg: &Path, local: &str, maps: &[String]) -> Result<PathBuf> {
    let out = env.path(local);
    let mut cmd = tokio::process::Command::new(harness::release_bin("proxyd"));
    cmd.arg("--config")
        .arg(cfg)
        .arg("import-haproxy")
        .args(["-L", local]);
    for m in maps {
        cmd.arg("--map-address").arg(m);
    }
    cmd.arg("--out")
        .arg(&out)
        .arg("--run-dir")
        .arg(out.join("run"));
    let output = tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .context("proxyd import-haproxy hung")?
        .context("cannot run proxyd import-haproxy")?;
    let report = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "proxyd import-haproxy -L {local} exited {}: {}{}",
        output.status,
        report,
        String::from_utf8_lossy(&output.stderr)
    );
    figure(
        &format!("import -L {local}"),
        report.lines().next().unwrap_or_default(),
    );
    Ok(out)
}

/// What the imported files name, read back from them.
struct Imported {
    dir: PathBuf,
    local: String,
    fdkeeper_socket: PathBuf,
    fdkeeper_admin: PathBuf,
    stickd_socket: PathBuf,
    proxyd_admin: PathBuf,
    /// `User=` and `Group=` of proxyd.service.d, when haproxy.cfg names them.
    user: Option<(String, String)>,
}

impl Imported {
    fn read(dir: PathBuf, local: &str) -> Result<Imported> {
        let toml = |file: &str| -> Result<toml::Table> {
            let path = dir.join(file);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            text.parse()
                .with_context(|| format!("{} is not TOML", path.display()))
        };
        let string = |t: &toml::Table, key: &str| -> Result<PathBuf> {
            t.get(key)
                .and_then(|v| v.as_str())
                .map(PathBuf::from)
                .with_context(|| format!("no {key} in the imported files"))
        };
        let fdkeeper = toml("fdkeeper.toml")?;
        let stickd = toml("stickd.toml")?;
        let proxyd = toml("proxyd.toml")?;
        let global = proxyd
            .get("global")
            .and_then(|g| g.as_table())
            .context("no [global] in proxyd.toml")?;
        let dropin = std::fs::read_to_string(dir.join("proxyd.service.d/haproxy.conf")).ok();
        let field = |text: &str, key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(str::to_owned)
        };
        let user = match dropin {
            Some(d) => Some((
                field(&d, "User=").context("proxyd.service.d without User=")?,
                field(&d, "Group=").context("proxyd.service.d without Group=")?,
            )),
            None => None,
        };
        Ok(Imported {
            local: local.to_owned(),
            fdkeeper_socket: string(&fdkeeper, "socket")?,
            fdkeeper_admin: string(&fdkeeper, "admin")?,
            stickd_socket: string(&stickd, "socket")?,
            proxyd_admin: string(global, "admin_socket")?,
            user,
            dir,
        })
    }
}

/// One node started from its imported files.
struct ImportedNode {
    imported: Imported,
    _fdkeeper: Proc,
    _stickd: Proc,
    proxyd: Proc,
}

/// Uid and gid of a user and group of this machine (from /etc/passwd and /etc/group).
fn ids(user: &str, group: &str) -> Result<Option<(u32, u32)>> {
    let find = |file: &str, name: &str| -> Result<Option<u32>> {
        let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))?;
        Ok(text.lines().find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(name))
                .then(|| f.nth(1).and_then(|id| id.parse().ok()))
                .flatten()
        }))
    };
    Ok(find("/etc/passwd", user)?.zip(find("/etc/group", group)?))
}

/// Why the imported files cannot run here, if they cannot: proxyd runs as haproxy.cfg's
/// `user` (fdkeeper lends to it alone), which takes root and that user on this machine.
fn cannot_run(imported: &Imported) -> Result<Option<String>> {
    let Some((user, group)) = &imported.user else {
        return Ok(None);
    };
    if !nix::unistd::geteuid().is_root() {
        return Ok(Some(format!(
            "not root: the imported proxyd runs as haproxy.cfg's `user {user}`"
        )));
    }
    if ids(user, group)?.is_none() {
        return Ok(Some(format!(
            "no user {user} or group {group} on this machine (Debian's haproxy package makes them)"
        )));
    }
    Ok(None)
}

impl ImportedNode {
    /// fdkeeper, stickd (`-L` as the stickd drop-in says) and proxyd on the imported files;
    /// proxyd as the user the proxyd drop-in names. Returns once proxyd serves.
    async fn start(env: &Env, imported: Imported) -> Result<ImportedNode> {
        let local = imported.local.clone();
        let stickd_dropin =
            std::fs::read_to_string(imported.dir.join("stickd.service.d/haproxy.conf"))
                .context("no stickd.service.d drop-in")?;
        ensure!(
            stickd_dropin.contains(&format!("STICKD_OPTS=-L {local}\"")),
            "the stickd drop-in does not name -L {local}: {stickd_dropin}"
        );
        let ids = match &imported.user {
            Some((u, g)) => Some(ids(u, g)?.with_context(|| format!("no user {u}"))?),
            None => None,
        };
        if let Some((uid, gid)) = ids {
            share_run_dirs(env, &imported, uid, gid)?;
        }
        let file = |f: &str| imported.dir.join(f);
        let fdkeeper = env.spawn(
            &format!("fdkeeper-{local}"),
            harness::release_bin("fdkeeper"),
            ["--config".as_ref(), file("fdkeeper.toml").as_os_str()],
        )?;
        let stickd = env.spawn(
            &format!("stickd-{local}"),
            harness::release_bin("stickd"),
            [
                "--config".as_ref(),
                file("stickd.toml").as_os_str(),
                "-L".as_ref(),
                local.as_ref(),
            ],
        )?;
        harness::wait_seqpacket(&imported.fdkeeper_socket, START_TIMEOUT).await?;
        harness::wait_unix(&imported.stickd_socket, START_TIMEOUT).await?;
        let mut spec = ProcSpec::new(&format!("proxyd-{local}"), &harness::release_bin("proxyd"))
            .arg("--config")
            .arg(file("proxyd.toml"));
        if let Some((uid, gid)) = ids {
            spec.uid = Some(uid);
            spec.gid = Some(gid);
        }
        let proxyd = env.spawn_spec(spec)?;
        let admin = imported.proxyd_admin.clone();
        harness::wait_for("the imported proxyd to serve", START_TIMEOUT, || {
            let admin = admin.clone();
            async move { Ok(cluster::serving(&cluster::proxyd_status(&admin).await?)) }
        })
        .await?;
        Ok(ImportedNode {
            imported,
            _fdkeeper: fdkeeper,
            _stickd: stickd,
            proxyd,
        })
    }
}

/// What systemd's `RuntimeDirectory=` and the groups of dist/systemd give the daemons: proxyd,
/// running as another user, reaches fdkeeper's and stickd's sockets through their group (the
/// set-group-id directories hand it to the sockets) and owns its own directory.
fn share_run_dirs(env: &Env, imported: &Imported, uid: u32, gid: u32) -> Result<()> {
    use std::os::unix::fs::chown;
    // Every directory down to the sockets and the config must be traversable by proxyd's user.
    let mut dir = imported.dir.clone();
    while dir.starts_with(env.dir()) {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
        if !dir.pop() {
            break;
        }
    }
    let run = imported.dir.join("run");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(&run)?;
    for socket in [&imported.fdkeeper_socket, &imported.stickd_socket] {
        let d = socket.parent().context("a socket without a directory")?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(d)?;
        chown(d, None, Some(gid))?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o2750))?;
    }
    let own = imported
        .proxyd_admin
        .parent()
        .context("an admin socket without a directory")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(own)?;
    chown(own, Some(uid), Some(gid))?;
    Ok(())
}

const TABLE: &str = "dynamic_group";

/// Seed 001: three nodes on 127.0.0.1-3, each with the same haproxy.cfg and its own `-L`.
async fn seed_001(mut env: Env) -> Result<Outcome> {
    let cfg = seed_cfg("seed-001-peers");
    let names = vec!["app1".to_owned(), "app2".to_owned()];
    let backends = cluster::start_backends(&mut env, &names, 1, Duration::ZERO, None).await?;
    // haproxy.cfg's addresses: the peers, then the servers in the order of its lines.
    let peer_ips = ["192.168.100.59", "192.168.100.54", "192.168.100.42"];
    let server_ips = ["192.168.100.60", "192.168.100.61"];
    let mut maps = Vec::new();
    for (i, ip) in peer_ips.iter().enumerate() {
        let addr = env.free_port(i as u8 + 1)?;
        maps.push(format!("{ip}:12138={addr}"));
    }
    for (ip, (_, addr, _)) in server_ips.iter().zip(&backends) {
        maps.push(format!("{ip}:80={addr}"));
    }
    let mut frontends = Vec::new();
    let mut imports = Vec::new();
    for h in 1..=3u8 {
        let frontend = env.free_port(h)?;
        let mut node_maps = maps.clone();
        node_maps.push(format!("*:80={frontend}"));
        let local = format!("haproxy{h}");
        let dir = import(&env, &cfg, &local, &node_maps).await?;
        imports.push(Imported::read(dir, &local)?);
        frontends.push(frontend);
    }
    if let Some(why) = cannot_run(&imports[0])? {
        return Ok(Outcome::Skip(why));
    }
    let mut nodes = Vec::new();
    for imported in imports {
        nodes.push(ImportedNode::start(&env, imported).await?);
    }
    let sockets: Vec<PathBuf> = nodes
        .iter()
        .map(|n| n.imported.stickd_socket.clone())
        .collect();
    wait_peered(&sockets).await?;
    figure(
        "proxyd runs as",
        format!("{:?}", nodes[0].imported.user.as_ref().map(|(u, _)| u)),
    );

    // The seed's test, unchanged: five cookie-less curl requests to each node, 0.5 s apart.
    let mut sessions = BTreeMap::new();
    for frontend in &frontends {
        for _ in 0..5 {
            let (server, cookie) = curl_index(*frontend).await?;
            sessions.insert(cookie, server);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    ensure!(sessions.len() == 15, "{} distinct sessions", sessions.len());
    let per_server = sessions.values().filter(|s| *s == "app1").count();
    figure(
        "sessions on app1 / app2",
        format!("{per_server} / {}", 15 - per_server),
    );
    // The seed's `show table dynamic_group` on every node, as grpcurl.
    for n in &nodes {
        let socket = n.imported.stickd_socket.clone();
        let want = sessions.clone();
        let shown = harness::wait_for(
            "the 15 sessions on every node",
            Duration::from_secs(5),
            || {
                let socket = socket.clone();
                let want = want.clone();
                async move {
                    let shown = grpcurl_table(&socket)?;
                    if shown == want {
                        return Ok(Some(shown));
                    }
                    if shown.len() >= want.len() {
                        bail!("{} shows {shown:?}, not {want:?}", socket.display());
                    }
                    Ok(None)
                }
            },
        )
        .await?;
        figure(
            &format!("{} table {TABLE}", n.imported.local),
            format!(
                "{} entries, equal to the sessions the clients got",
                shown.len()
            ),
        );
    }
    Ok(Outcome::Pass)
}

/// `curl -si http://FRONTEND/index.php`: the server that answered and the new session.
async fn curl_index(frontend: SocketAddr) -> Result<(String, String)> {
    let out = tokio::time::timeout(
        Duration::from_secs(15),
        tokio::process::Command::new("curl")
            .args(["-si", "--max-time", "10"])
            .arg(format!("http://{frontend}/index.php"))
            .output(),
    )
    .await
    .context("curl hung")??;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.starts_with("HTTP/1.1 200"),
        "curl {frontend} exited {}: {text}",
        out.status
    );
    let server = text
        .lines()
        .find_map(|l| l.strip_prefix("server: "))
        .map(|s| s.trim().to_owned())
        .context("a response without a server name")?;
    let cookie = text
        .lines()
        .find_map(|l| l.strip_prefix("Set-Cookie: PHPSESSID="))
        .and_then(|v| v.split(';').next())
        .map(str::to_owned)
        .context("a new session without a PHPSESSID")?;
    Ok((server, cookie))
}

/// key -> server of the table, from `grpcurl ... stick.v1.Stick/Show`.
fn grpcurl_table(socket: &Path) -> Result<BTreeMap<String, String>> {
    let v = harness::grpcurl(
        socket,
        "stick.v1.Stick/Show",
        Some(&serde_json::json!({ "table": TABLE })),
    )?;
    Ok(v["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["key"].as_str().unwrap_or_default().to_owned(),
                e["server"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

/// Seed 000: the seamless reload's haproxy.cfg on one node.
async fn seed_000(mut env: Env) -> Result<Outcome> {
    let cfg = seed_cfg("seed-000-seamless-reload");
    let names = vec!["app1".to_owned()];
    let backends = cluster::start_backends(&mut env, &names, 1, Duration::ZERO, None).await?;
    let frontend = env.free_port(1)?;
    let peer = env.free_port(1)?;
    let maps = [
        format!("*:80={frontend}"),
        format!("127.0.0.1:8080={}", backends[0].1),
        // The port stickd would take for a node without peers.
        format!("127.0.0.1:10000={peer}"),
    ];
    let dir = import(&env, &cfg, "lb1", &maps).await?;
    let fdkeeper_toml = std::fs::read_to_string(dir.join("fdkeeper.toml"))?;
    ensure!(
        fdkeeper_toml.contains("expose-fd listeners"),
        "fdkeeper.toml does not say it replaces `expose-fd listeners`:\n{fdkeeper_toml}"
    );
    let report = std::fs::read_to_string(dir.join("import-report.txt"))?;
    ensure!(
        report.contains("`expose-fd listeners` becomes fdkeeper's lending socket"),
        "the report does not say what became of `expose-fd listeners`:\n{report}"
    );
    let imported = Imported::read(dir, "lb1")?;
    if !nix::unistd::geteuid().is_root() {
        // haproxy.cfg names no user: the import lends to root, as HAProxy ran.
        return Ok(Outcome::Skip(
            "not root: the imported fdkeeper lends to root alone".into(),
        ));
    }
    let node = ImportedNode::start(&env, imported).await?;
    let before = listener_inodes(&node)?;
    figure("lent listener", format!("{before:?}"));

    let load = Load::start(LoadConfig {
        keepalive_clients: 10,
        close_clients: 10,
        max_duration: Duration::from_secs(30),
        max_requests: 200_000,
        request_timeout: Duration::from_secs(10),
        path: "/index.php".to_owned(),
        expect_servers: names.clone(),
        ..LoadConfig::new(frontend)
    });
    load.wait_ok(200, Duration::from_secs(10)).await?;
    for _ in 0..3 {
        let was = cluster::serving(&cluster::proxyd_status(&node.imported.proxyd_admin).await?)
            .context("no serving generation")?;
        proxyd_reload(&node.imported.dir.join("proxyd.toml")).await?;
        cluster::wait_new_generation(&node.imported.proxyd_admin, was.generation, START_TIMEOUT)
            .await?;
        // Requests on the new generation while the old one drains.
        load.wait_ok(2000, Duration::from_secs(10)).await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = load.finish().await;
    print_load(&report);
    ensure_no_failures(&report)?;
    let after = listener_inodes(&node)?;
    ensure!(
        before == after,
        "the lent listener changed across reloads: {before:?} then {after:?}"
    );
    Ok(Outcome::Pass)
}

/// fdkeeper's listeners (address, inode), checked to be the ones the serving worker holds.
fn listener_inodes(node: &ImportedNode) -> Result<Vec<(String, u64)>> {
    let held = cluster::fdkeeper_inodes(&node.imported.fdkeeper_admin)?;
    ensure!(!held.is_empty(), "fdkeeper holds no listener");
    let workers = harness::descendants(node.proxyd.pid());
    for (addr, inode) in &held {
        let in_worker = workers
            .iter()
            .any(|&w| harness::socket_inodes(w).is_ok_and(|s| s.contains(inode)));
        ensure!(
            in_worker,
            "no worker holds fdkeeper's listener {addr} (inode {inode})"
        );
    }
    Ok(held)
}

/// `proxyd --config FILE reload`, the operator's command.
async fn proxyd_reload(config: &Path) -> Result<()> {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(harness::release_bin("proxyd"))
            .arg("--config")
            .arg(config)
            .arg("reload")
            .output(),
    )
    .await
    .context("proxyd reload hung")??;
    ensure!(
        out.status.success(),
        "proxyd reload exited {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
