//! What `cargo xtask demo` tells the operator to type, typed: every printed command run as
//! printed, through `sh -c`, on the demo's cluster.

use std::time::Duration;

use anyhow::{Context, Result, ensure};

use super::lb::Lb;
use super::{Outcome, Scenario, figure, with_tools};
use crate::cluster::{self, START_TIMEOUT};
use crate::demo::{Try, TryCommand, instructions, try_commands};
use crate::harness::Env;

pub fn scenarios() -> Vec<Scenario> {
    vec![Scenario::new(
        "printed-commands",
        "the demo's cluster: every command `cargo xtask demo` prints (curl, grpcurl, proxyd and stickd subcommands, kill -USR2) runs as printed through sh -c, exits 0 and shows what it says",
        60,
        |env| Box::pin(with_tools(&[("curl", "curl")], printed(env))),
    )]
}

async fn printed(env: Env) -> Result<Outcome> {
    // The demo's own start, on free ports instead of its well-known ones.
    let lb = Lb::start_with(env, 3, None).await?;
    let text = instructions(&lb);
    let commands = try_commands(&lb);
    ensure!(!commands.is_empty(), "the demo prints no command");
    let admin = &lb.nodes[0].proxyd_admin;
    for c in &commands {
        ensure!(
            text.contains(&c.line),
            "the demo does not print {:?}:\n{text}",
            c.line
        );
        let before = cluster::serving(&cluster::proxyd_status(admin).await?)
            .context("no serving generation")?;
        let output = run_until_checked(c).await?;
        if c.what == Try::Signal {
            // The signal returns at once; the reload it asked for is seen in Status.
            cluster::wait_new_generation(admin, before.generation, START_TIMEOUT).await?;
        }
        figure(
            &format!("{:?}", c.what),
            output.lines().next().unwrap_or("(no output)"),
        );
    }
    figure("commands run", commands.len());
    Ok(Outcome::Pass)
}

/// Runs `c` and checks its output; a table read right after the sessions were made may miss
/// the last of them (the worker sends its stores in batches), so those are run again for a
/// few seconds, as an operator would.
async fn run_until_checked(c: &TryCommand) -> Result<String> {
    let again = matches!(c.what, Try::TableGrpc | Try::TableCli);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let output = run(c).await?;
        match check(c, &output) {
            Ok(()) => return Ok(output),
            Err(e) if !again || std::time::Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("`{}` printed:\n{output}", c.line));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// `sh -c LINE`; its stdout and stderr, once it exited 0.
async fn run(c: &TryCommand) -> Result<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&c.line)
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .with_context(|| format!("`{}` did not end within 20 s", c.line))?
    .with_context(|| format!("cannot run sh -c {:?}", c.line))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "`{}` exited {}:\n{text}",
        c.line,
        out.status
    );
    Ok(text)
}

/// The output a command shows when it does what the demo says it does.
fn check(c: &TryCommand, out: &str) -> Result<()> {
    let servers: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("server: "))
        .collect();
    let has = |s: &str| out.to_lowercase().contains(&s.to_lowercase());
    match c.what {
        Try::NewSessions => ensure!(servers.len() == 5, "{} answers, not 5", servers.len()),
        Try::TableGrpc => {
            let v: serde_json::Value = serde_json::from_str(out).context("not JSON")?;
            let n = v["entries"].as_array().map_or(0, Vec::len);
            ensure!(n >= 5, "{n} entries, not the 5 sessions at least");
        }
        Try::TableCli => ensure!(
            out.lines().filter(|l| l.contains("app")).count() >= 5,
            "fewer than the 5 sessions"
        ),
        Try::SameServer => ensure!(
            servers.len() == 2 && servers[0] == servers[1],
            "not the same server twice: {servers:?}"
        ),
        Try::ServersGrpc | Try::ServersCli => {
            ensure!(
                has("app1") && has("app2"),
                "app1 and app2 are not both listed"
            )
        }
        Try::Maint => ensure!(has("maint"), "app1 is not in maintenance"),
        Try::Ready => ensure!(
            out.lines()
                .any(|l| l.contains("app1") && l.to_lowercase().contains("ready")),
            "app1 is not ready"
        ),
        Try::Signal => ensure!(out.is_empty(), "kill printed something"),
        Try::Reload => ensure!(has("reload ok"), "no `reload ok`"),
        Try::Status => ensure!(has("serving"), "no serving generation"),
        Try::Metrics => ensure!(has("proxyd_"), "no proxyd metric"),
        Try::Log => ensure!(!out.trim().is_empty(), "an empty log"),
    }
    Ok(())
}
