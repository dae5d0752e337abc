//! The programs the bench compares against and drives (HAProxy, nginx, wrk), found on PATH or
//! installed from Debian's packages with `--install`, the open-file limit they run under, and
//! how they are started: config checked first, then waited for until they listen.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::Ctx;
use crate::cluster::START_TIMEOUT;
use crate::harness::{Env, Proc};

/// Debian packages that provide what the bench needs, by the program that is looked for.
const NEEDED: &[(&str, &str)] = &[
    ("haproxy", "haproxy"),
    ("nginx", "nginx-light"),
    ("wrk", "wrk"),
];
/// The font the plot writes its labels with (package fonts-dejavu-core).
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FONT_PACKAGE: &str = "fonts-dejavu-core";

/// Paths of the external programs, and their versions for the report.
#[derive(Clone, Debug)]
pub struct Tools {
    pub haproxy: PathBuf,
    pub nginx: PathBuf,
    pub wrk: PathBuf,
    pub versions: Vec<(String, String)>,
}

impl Tools {
    /// Finds every program; with `install` (root only) apt-get installs what is missing first.
    /// Without it, a missing program is an error that says how to install it.
    pub fn find(install: bool) -> Result<Self> {
        let mut missing: Vec<&str> = NEEDED
            .iter()
            .filter(|(prog, _)| which(prog).is_none())
            .map(|(_, pkg)| *pkg)
            .collect();
        if !Path::new(FONT).exists() {
            missing.push(FONT_PACKAGE);
        }
        if !missing.is_empty() {
            if !install {
                bail!(
                    "missing: {}. Install with `sudo apt-get install -y {}`, or run \
                     `cargo xtask bench --install` as root",
                    missing.join(", "),
                    missing.join(" ")
                );
            }
            apt_install(&missing)?;
        }
        let get = |prog: &str| {
            which(prog).with_context(|| format!("{prog} is still not on PATH after installing"))
        };
        let haproxy = get("haproxy")?;
        let nginx = get("nginx")?;
        let wrk = get("wrk")?;
        let versions = vec![
            ("HAProxy".to_owned(), first_line(&haproxy, &["-v"])),
            ("nginx".to_owned(), first_line(&nginx, &["-v"])),
            ("wrk".to_owned(), first_line(&wrk, &["-v"])),
        ];
        Ok(Self {
            haproxy,
            nginx,
            wrk,
            versions,
        })
    }
}

fn apt_install(packages: &[&str]) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "--install needs root; as root run `apt-get install -y {}`",
            packages.join(" ")
        );
    }
    eprintln!("installing {} with apt-get", packages.join(" "));
    let status = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("cannot run apt-get")?;
    if !status.success() {
        bail!("apt-get install {} failed ({status})", packages.join(" "));
    }
    Ok(())
}

/// Open files a section that holds thousands of connections asks for.
const NOFILE_WANTED: u64 = 65_536;

/// The open-file limit this process had, put back when dropped (the sections after one that
/// raised it expect the usual limit).
pub struct Nofile {
    soft: u64,
    hard: u64,
    /// The soft limit in force now, which the targets started meanwhile inherit.
    pub limit: u64,
}

impl Nofile {
    /// Raises the limit towards `NOFILE_WANTED`; without CAP_SYS_RESOURCE as far as the hard
    /// limit goes.
    pub fn raise() -> Self {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
        let limit = if setrlimit(
            Resource::RLIMIT_NOFILE,
            NOFILE_WANTED,
            hard.max(NOFILE_WANTED),
        )
        .is_ok()
        {
            NOFILE_WANTED
        } else {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
            getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(s, _)| s)
        };
        Self { soft, hard, limit }
    }

    /// Idle connections a section can hold against HAProxy, at most `wanted`: HAProxy wants
    /// two files per connection of its `maxconn` and refuses to start if it cannot have them,
    /// and the client's ends and the rest need some room.
    pub fn idle_connections(&self, wanted: usize) -> usize {
        wanted
            .min(self.limit.saturating_sub(1_000) as usize / 2)
            .max(1)
    }
}

/// The report's sentence on why a section opened `idle` idle connections rather than 10,000
/// under the open-file limit `nofile`; none when it opened them all.
pub fn idle_cap_text(idle: usize, nofile: u64) -> Option<String> {
    (idle < 10_000).then(|| {
        format!(
            "{idle} idle connections rather than 10,000: the open-file limit here is {nofile} and \
             cannot be raised (no CAP_SYS_RESOURCE), and HAProxy refuses to start with a \
             `maxconn` that needs more than two files per connection within it."
        )
    })
}

impl Drop for Nofile {
    fn drop(&mut self) {
        let _ = nix::sys::resource::setrlimit(
            nix::sys::resource::Resource::RLIMIT_NOFILE,
            self.soft,
            self.hard,
        );
    }
}

/// The first match of `prog` on PATH (and /usr/sbin, where Debian puts haproxy and nginx).
pub fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// The first non-empty line a program prints about its version (stdout or stderr).
fn first_line(prog: &Path, args: &[&str]) -> String {
    let Ok(out) = Command::new(prog).args(args).output() else {
        return "unknown".to_owned();
    };
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("unknown")
        .to_owned()
}

/// The user nginx's workers run as: as root they would switch to `nobody`, who cannot enter the
/// 0700 temp dir, so root's own name then.
pub fn run_as() -> Option<String> {
    nix::unistd::geteuid()
        .is_root()
        .then(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
        })
        .flatten()
        .map(|u| u.name)
}

/// Waits until `addr` accepts, failing at once (with its log) if `proc` exits first.
pub async fn wait_listening(mut proc: Proc, addr: SocketAddr) -> Result<Proc> {
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
pub fn check_config(prog: &Path, args: &[&str], config: &Path) -> Result<()> {
    let out = Command::new(prog)
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

/// Checks `conf` and starts nginx on it in the foreground, with the prefix `prefix` and its
/// errors to its stderr log.
pub fn spawn_nginx(env: &Env, ctx: &Ctx, name: &str, prefix: &Path, conf: &Path) -> Result<Proc> {
    let prefix_arg = format!("{}/", prefix.display());
    check_config(
        &ctx.tools.nginx,
        &["-q", "-e", "stderr", "-p", &prefix_arg, "-t", "-c"],
        conf,
    )?;
    env.spawn(
        name,
        &ctx.tools.nginx,
        [
            "-e".as_ref(),
            "stderr".as_ref(),
            "-p".as_ref(),
            prefix_arg.as_ref(),
            "-c".as_ref(),
            conf.as_os_str(),
        ],
    )
}
