//! The real TLS and HTTP/2 clients the scenarios drive: `openssl s_client` (which certificate
//! a name gets, session tickets), curl (ALPN, verification against the scenario's CA) and
//! h2load (nghttp2's load generator), each run as a child process with a deadline.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// How long one s_client or curl run may take.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs `cmd` (stdin empty) to its end, killed if it outlasts `timeout`.
pub async fn output(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().with_context(|| format!("cannot run {cmd:?}"))?;
    tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .with_context(|| format!("{cmd:?} ran past {timeout:?}"))?
        .with_context(|| format!("waiting for {cmd:?}"))
}

/// Runs `cmd` with `input` on its stdin, killed if it outlasts `timeout`.
async fn output_with_input(cmd: &mut Command, input: &[u8], timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| format!("cannot run {cmd:?}"))?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    stdin.write_all(input).await?;
    drop(stdin);
    tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .with_context(|| format!("{cmd:?} ran past {timeout:?}"))?
        .with_context(|| format!("waiting for {cmd:?}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The certificate a handshake got, as `openssl x509` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedCert {
    /// `CN = a.test`.
    pub subject: String,
    /// Upper-case hex.
    pub serial: String,
}

/// One handshake by `openssl s_client` with SNI `sni` (none when `None`): the certificate
/// served, read by `openssl x509`.
pub async fn served_cert(addr: SocketAddr, sni: Option<&str>) -> Result<ServedCert> {
    let mut cmd = Command::new("openssl");
    cmd.arg("s_client").arg("-connect").arg(addr.to_string());
    match sni {
        Some(name) => cmd.arg("-servername").arg(name),
        None => cmd.arg("-noservername"),
    };
    let out = output(&mut cmd, CLIENT_TIMEOUT).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let begin = stdout.find("-----BEGIN CERTIFICATE-----");
    let end = stdout
        .find("-----END CERTIFICATE-----")
        .map(|e| e + "-----END CERTIFICATE-----".len());
    let (Some(begin), Some(end)) = (begin, end) else {
        bail!(
            "openssl s_client -servername {sni:?} got no certificate: {}",
            text(&out).trim()
        );
    };
    let pem = format!("{}\n", &stdout[begin..end]);
    let mut x509 = Command::new("openssl");
    x509.args([
        "x509", "-noout", "-subject", "-serial", "-nameopt", "oneline",
    ]);
    let out = output_with_input(&mut x509, pem.as_bytes(), CLIENT_TIMEOUT).await?;
    ensure!(out.status.success(), "openssl x509: {}", text(&out).trim());
    let printed = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| {
        printed
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_owned())
            .with_context(|| format!("openssl x509 printed no {key}: {printed}"))
    };
    Ok(ServedCert {
        subject: field("subject=")?,
        serial: field("serial=")?,
    })
}

/// Where `openssl s_client` keeps the session: written after the handshake, or resumed.
#[derive(Clone, Copy, Debug)]
pub enum Session<'a> {
    Out(&'a Path),
    In(&'a Path),
}

/// What one `openssl s_client` exchange said about its session and its request.
#[derive(Clone, Debug)]
pub struct SessionRun {
    /// `New, TLSv1.3, Cipher is ...` or `Reused, TLSv1.3, ...`.
    pub session: String,
    /// The response's status line.
    pub status_line: String,
}

/// A `GET /` with `Connection: close` through `openssl s_client`, reading until proxyd closes:
/// the session tickets come after the handshake, so the run must last until they did.
pub async fn s_client_session(
    addr: SocketAddr,
    sni: &str,
    tls12: bool,
    session: Session<'_>,
) -> Result<SessionRun> {
    let mut cmd = Command::new("openssl");
    cmd.arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .arg("-servername")
        .arg(sni)
        .arg("-ign_eof");
    if tls12 {
        cmd.arg("-tls1_2");
    }
    match session {
        Session::Out(p) => cmd.arg("-sess_out").arg(p),
        Session::In(p) => cmd.arg("-sess_in").arg(p),
    };
    let request = format!("GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n");
    let out = output_with_input(&mut cmd, request.as_bytes(), CLIENT_TIMEOUT).await?;
    let all = text(&out);
    let line = |prefixes: &[&str]| {
        all.lines()
            .find(|l| prefixes.iter().any(|p| l.starts_with(p)))
            .map(str::to_owned)
    };
    Ok(SessionRun {
        session: line(&["New,", "Reused,"])
            .with_context(|| format!("s_client printed no session line: {}", all.trim()))?,
        status_line: line(&["HTTP/"]).unwrap_or_default(),
    })
}

/// What curl said of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CurlReply {
    pub code: u16,
    /// `%{http_version}`: `2` or `1.1`.
    pub version: String,
}

/// `GET https://NAME:PORT/` by curl, resolved to `addr` and verified against `ca`, with `args`
/// (`--http2`, `--http1.1`).
pub async fn curl_tls(ca: &Path, name: &str, addr: SocketAddr, args: &[&str]) -> Result<CurlReply> {
    let mut cmd = Command::new("curl");
    cmd.arg("--cacert")
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{name}:{}:{}", addr.port(), addr.ip()))
        .args(args)
        .arg(format!("https://{name}:{}/", addr.port()));
    curl(cmd).await
}

/// `GET http://ADDR/` by curl with `args` (`--http2-prior-knowledge`, `--http2`).
pub async fn curl_plain(addr: SocketAddr, args: &[&str]) -> Result<CurlReply> {
    let mut cmd = Command::new("curl");
    cmd.args(args).arg(format!("http://{addr}/"));
    curl(cmd).await
}

async fn curl(mut cmd: Command) -> Result<CurlReply> {
    cmd.args([
        "-sS",
        "-o",
        "/dev/null",
        "--max-time",
        "10",
        "-w",
        "%{http_code} %{http_version}",
    ]);
    let out = output(&mut cmd, CLIENT_TIMEOUT).await?;
    ensure!(
        out.status.success(),
        "curl failed ({}): {}",
        out.status,
        text(&out).trim()
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    let (code, version) = printed
        .trim()
        .split_once(' ')
        .with_context(|| format!("curl printed {printed:?}"))?;
    Ok(CurlReply {
        code: code
            .parse()
            .with_context(|| format!("curl printed {printed:?}"))?,
        version: version.to_owned(),
    })
}

/// The counts of one h2load run, from its `requests:` and `status codes:` lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct H2loadCounts {
    pub total: u64,
    pub started: u64,
    pub done: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
    pub timeout: u64,
    pub status_2xx: u64,
    pub status_other: u64,
}

impl H2loadCounts {
    /// Reads h2load's summary; `None` when it printed none (it did not get that far).
    pub fn parse(text: &str) -> Option<H2loadCounts> {
        let numbers = |prefix: &str| -> Option<Vec<(u64, String)>> {
            let line = text.lines().find_map(|l| l.trim().strip_prefix(prefix))?;
            line.split(',')
                .map(|part| {
                    let mut words = part.split_whitespace();
                    let n = words.next()?.parse().ok()?;
                    Some((n, words.next()?.to_owned()))
                })
                .collect()
        };
        let mut c = H2loadCounts::default();
        for (n, word) in numbers("requests:")? {
            match word.as_str() {
                "total" => c.total = n,
                "started" => c.started = n,
                "done" => c.done = n,
                "succeeded" => c.succeeded = n,
                "failed" => c.failed = n,
                "errored" => c.errored = n,
                "timeout" => c.timeout = n,
                _ => {}
            }
        }
        for (n, word) in numbers("status codes:")? {
            if word == "2xx" {
                c.status_2xx = n;
            } else {
                c.status_other += n;
            }
        }
        Some(c)
    }

    pub fn add(&mut self, o: &H2loadCounts) {
        self.total += o.total;
        self.started += o.started;
        self.done += o.done;
        self.succeeded += o.succeeded;
        self.failed += o.failed;
        self.errored += o.errored;
        self.timeout += o.timeout;
        self.status_2xx += o.status_2xx;
        self.status_other += o.status_other;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_h2loads_summary() {
        let out = "Process Request Failure:2003\n\
            finished in 201.16ms, 9927.52 req/s, 1.28MB/s\n\
            requests: 4000 total, 1997 started, 1997 done, 1997 succeeded, 2003 failed, 2003 errored, 0 timeout\n\
            status codes: 1990 2xx, 3 3xx, 4 4xx, 0 5xx\n\
            traffic: 263.60KB (269929) total\n";
        let c = H2loadCounts::parse(out).expect("parsed");
        assert_eq!(
            c,
            H2loadCounts {
                total: 4000,
                started: 1997,
                done: 1997,
                succeeded: 1997,
                failed: 2003,
                errored: 2003,
                timeout: 0,
                status_2xx: 1990,
                status_other: 7,
            }
        );
        assert_eq!(H2loadCounts::parse("starting benchmark...\n"), None);
    }
}
