//! The units of `dist/systemd/` under a real systemd, booted with systemd-nspawn
//! from a cached debootstrap root and driven with `systemctl` through nsenter, while the load
//! generator runs outside against 127.0.0.1 (the container shares the host's network).
//!
//! The container boots once for every check (a boot costs seconds, a debootstrap a minute);
//! each check is counted in the closing line like a scenario, and first puts the units in the
//! state it needs, so that one failure does not cascade.

mod boot;
mod container;
mod lab;
mod reload;
mod restart;

use std::future::Future;
use std::pin::Pin;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use super::{Totals, figure};
use crate::harness;
use boot::{start, verify};
use container::Container;
use lab::Lab;
use reload::{broken_reload, kill_proxyd, reloads};
use restart::{restart_fdkeeper, restart_stickd, stop};

/// Packages on top of debootstrap's minbase: systemd as pid 1, and procps for the
/// `/bin/kill` of proxyd's ExecReload. Changing this list rebuilds the cached root.
const INCLUDE: &str = "systemd,systemd-sysv,dbus,procps";
const RELEASE: &str = "bookworm";
/// The container's hostname, which stickd takes as its peer name (dist/config/stickd.toml).
const HOSTNAME: &str = "lb1";
const UNITS: [&str; 3] = ["fdkeeper", "stickd", "proxyd"];
/// How many `systemctl reload proxyd` check 2 runs under load.
const RELOADS: usize = 50;
/// Load clients: keep-alive, connection-close, and keep-alive pausing between requests.
const CLIENTS: (usize, usize, usize) = (25, 25, 10);
/// How long a systemctl (or any command in the container) may take.
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<()>> + 'a>>;

/// One counted check, run against the booted container.
struct Check {
    name: &'static str,
    about: &'static str,
    timeout: Duration,
    /// Runs with systemd's log level at debug, so that the journal shows every sd_notify
    /// message. Only where a check reads them: at debug every exec logs ~100 lines, which
    /// fifty reloads would push past journald's rate limit.
    debug: bool,
    run: for<'a> fn(&'a Lab) -> CheckFuture<'a>,
}

fn checks() -> Vec<Check> {
    pub(super) fn c(
        name: &'static str,
        about: &'static str,
        timeout_s: u64,
        run: for<'a> fn(&'a Lab) -> CheckFuture<'a>,
    ) -> Check {
        Check {
            name,
            about,
            timeout: Duration::from_secs(timeout_s),
            debug: name == "systemd-start" || name == "systemd-stop",
            run,
        }
    }
    vec![
        c(
            "systemd-verify",
            "systemd-analyze verify is clean on the three units",
            60,
            |l| Box::pin(verify(l)),
        ),
        c(
            "systemd-start",
            "1. systemctl start proxyd brings up all three, each active only once it sent READY=1",
            90,
            |l| Box::pin(start(l)),
        ),
        c(
            "systemd-reload",
            "2. 50 systemctl reload proxyd under load: 0 failed requests, status shows the generation",
            240,
            |l| Box::pin(reloads(l)),
        ),
        c(
            "systemd-broken-reload",
            "3. systemctl reload proxyd with a broken config fails visibly, the service keeps serving",
            90,
            |l| Box::pin(broken_reload(l)),
        ),
        c(
            "systemd-kill",
            "4. systemctl kill -s KILL proxyd under load: systemd restarts it, 0 refused connections",
            90,
            |l| Box::pin(kill_proxyd(l)),
        ),
        c(
            "systemd-restart-fdkeeper",
            "5. systemctl restart fdkeeper (then kill -9, stop + start) under load: 0 refused, the same listening socket",
            90,
            |l| Box::pin(restart_fdkeeper(l)),
        ),
        c(
            "systemd-restart-stickd",
            "6. systemctl restart stickd: the table is intact afterwards, proxyd follows it",
            90,
            |l| Box::pin(restart_stickd(l)),
        ),
        c(
            "systemd-stop",
            "7. systemctl stop proxyd stickd fdkeeper: clean stop, STOPPING=1 seen, nothing left",
            90,
            |l| Box::pin(stop(l)),
        ),
    ]
}

/// Whether `filter` selects any check of this module (so that `e2e --filter systemd` is valid).
pub fn any_selected(filter: Option<&str>) -> bool {
    checks()
        .iter()
        .any(|c| filter.is_none_or(|f| c.name.contains(f)))
}

/// Boots the container and runs every selected check; prints each one like a scenario and
/// returns the counts. The container is torn down on every path.
pub async fn run(filter: Option<&str>) -> Result<Totals> {
    let selected: Vec<Check> = checks()
        .into_iter()
        .filter(|c| filter.is_none_or(|f| c.name.contains(f)))
        .collect();
    let mut totals = Totals::default();
    if selected.is_empty() {
        return Ok(totals);
    }
    let logs = tempfile::Builder::new()
        .prefix("xtask-systemd-")
        .tempdir()
        .context("cannot create a temp dir")?;
    println!("== systemd: booting a {RELEASE} container with systemd-nspawn");
    let booted = Instant::now();
    let lab = match Lab::start(logs.path()).await {
        Ok(Ok(lab)) => lab,
        Ok(Err(skip)) => {
            for c in &selected {
                println!("== {}: {}", c.name, c.about);
                println!("  SKIP {} ({skip})", c.name);
                totals.skipped += 1;
            }
            return Ok(totals);
        }
        Err(e) => {
            // Every selected check fails: none of them could run.
            for c in &selected {
                println!("== {}: {}", c.name, c.about);
                println!("  FAIL {}: the container did not come up: {e:#}", c.name);
                totals.failed += 1;
            }
            println!("{}", harness::log_tails(logs.path(), 40));
            return Ok(totals);
        }
    };
    figure(
        "container up",
        format!(
            "{:.1}s ({}, pid 1 is host pid {})",
            booted.elapsed().as_secs_f64(),
            lab.container.version,
            lab.container.pid1
        ),
    );
    for c in selected {
        println!("== {}: {}", c.name, c.about);
        let started = Instant::now();
        let level = if c.debug { "debug" } else { "info" };
        if let Err(e) = lab.c().run(&["systemd-analyze", "log-level", level]).await {
            totals.failed += 1;
            println!("  FAIL {}: cannot set systemd's log level: {e:#}", c.name);
            continue;
        }
        let result = match tokio::time::timeout(c.timeout, (c.run)(&lab)).await {
            Ok(r) => r,
            Err(_) => Err(anyhow!("timed out after {:?}", c.timeout)),
        };
        let took = started.elapsed().as_secs_f64();
        match result {
            Ok(()) => {
                totals.passed += 1;
                println!("  PASS {} ({took:.1}s)", c.name);
            }
            Err(e) => {
                totals.failed += 1;
                println!("  FAIL {} ({took:.1}s): {e:#}", c.name);
                println!("{}", lab.journal_tail(60).await);
            }
        }
    }
    lab.shutdown().await;
    Ok(totals)
}

// ---- shared bits of the checks ----------------------------------------------------------------

/// Polls `systemctl show` until `prop` of `unit` satisfies `ok`.
async fn wait_prop(
    lab: &Lab,
    unit: &str,
    prop: &str,
    timeout: Duration,
    ok: impl Fn(&str) -> bool,
) -> Result<String> {
    let ok = &ok;
    harness::wait_for(&format!("{unit}'s {prop}"), timeout, || async move {
        let v = lab.c().prop(unit, prop).await?;
        Ok(ok(&v).then_some(v))
    })
    .await
}

/// The first journal line of `unit` after `cursor` that matches, waiting up to 5 s for it: a
/// daemon's own output reaches the journal through its stream, which may lag systemd's lines.
async fn journal_line(
    c: &Container,
    unit: &str,
    cursor: &str,
    matches: impl Fn(&str) -> bool,
) -> Result<String> {
    let matches = &matches;
    harness::wait_for(
        &format!("a matching line in {unit}'s journal"),
        Duration::from_secs(5),
        || async move {
            let lines = c.journal_since(unit, cursor).await?;
            Ok(lines.into_iter().find(|l| matches(l)))
        },
    )
    .await
}

/// How a unit's main process ended, from systemd's `ExecMainCode` (waitid's `CLD_*` code) and
/// `ExecMainStatus` (the exit code, or the signal). `None` where systemd keeps no record of an
/// end (code and status 0): a unit that stopped cleanly is garbage-collected at once, which
/// resets both.
fn main_exit(code: &str, status: &str) -> Result<Option<ExitStatus>> {
    use std::os::unix::process::ExitStatusExt;
    let status: i32 = status
        .parse()
        .with_context(|| format!("ExecMainStatus {status:?} is not a number"))?;
    let code: i32 = code
        .parse()
        .with_context(|| format!("ExecMainCode {code:?} is not a number"))?;
    // The wait status that waitpid would have given.
    let raw = match code {
        0 if status == 0 => return Ok(None),
        libc::CLD_EXITED => (status & 0xff) << 8,
        libc::CLD_KILLED => status & 0x7f,
        libc::CLD_DUMPED => (status & 0x7f) | 0x80,
        _ => bail!("ExecMainCode {code} with ExecMainStatus {status}: not an end of a process"),
    };
    Ok(Some(ExitStatus::from_raw(raw)))
}

/// "[ 2351.730203] host ident[pid]: text" → the monotonic seconds.
fn monotonic(line: &str) -> Option<f64> {
    line.trim_start()
        .strip_prefix('[')?
        .split_once(']')?
        .0
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn main_exit_reads_systemd_codes() {
        let ok = main_exit("1", "0").expect("read").expect("exited");
        assert!(ok.success());
        assert_eq!(ok.code(), Some(0));
        let bad = main_exit("1", "64").expect("read").expect("exited");
        assert_eq!(bad.code(), Some(64));
        let killed = main_exit("2", "9").expect("read").expect("killed");
        assert!(!killed.success());
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&killed),
            Some(9)
        );
        assert!(main_exit("0", "0").expect("read").is_none());
        assert!(main_exit("0", "1").is_err());
        assert!(main_exit("1", "x").is_err());
    }

    #[test]
    fn journal_monotonic_time() {
        assert_eq!(
            monotonic("[ 2351.730203] vm systemd[1]: fdkeeper.service: Changed start -> running"),
            Some(2351.730203)
        );
        assert_eq!(monotonic("no time"), None);
    }
}
