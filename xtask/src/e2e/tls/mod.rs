//! TLS and HTTP/2 scenarios with real clients (openssl s_client, curl, h2load): SNI and ALPN,
//! reloads and certificate rotations under TLS load, session resumption across a reload, and
//! HTTP/2 floods beside normal traffic.
//!
//! Every scenario runs one node whose proxyd has a TLS bind (certificates for `a.test` and
//! `b.test` and a default one, from a CA made at run time; ALPN `h2` and `http/1.1`) and an h2c
//! bind, in front of two demo backends.

mod basics;
mod clients;
mod flood;
mod load;
mod pki;
mod relay;
mod storm;

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use nix::sys::signal::Signal;
use proto::proxyd::v1::{StatusReply, TlsCertificates};

use super::{Outcome, Scenario};
use crate::cluster::{self, ServingGeneration};
use crate::configs::{self, proxyd};
use crate::harness::{self, Env, Proc};
use pki::{Leaf, Pki};

pub fn scenarios() -> Vec<Scenario> {
    let s = Scenario::new;
    vec![
        s(
            "tls-sni-alpn",
            "SNI picks each name's certificate and the default for an unknown name; ALPN gives curl h2 or HTTP/1.1 as it asks",
            60,
            |env| Box::pin(with_clients(basics::sni_alpn(env))),
        ),
        s(
            "tls-session-resumes-across-reload",
            "openssl s_client -sess_out before a reload, -sess_in after: Reused (TLS 1.3 and 1.2)",
            60,
            |env| Box::pin(with_clients(basics::session_across_reload(env))),
        ),
        s(
            "tls-reload-storm",
            "200 reloads at >= 5/s under TLS load (HTTP/1.1 keep-alive, a handshake per request, h2load HTTP/2 multiplexed, curl): 0 failed requests, handshakes or streams",
            180,
            |env| Box::pin(with_clients(storm::reload_storm(env))),
        ),
        s(
            "tls-rotation-under-load",
            "20 certificate rotations on disk under TLS load: new handshakes get the new serial within 2.5s, 0 failures; a mismatched key is refused and the old one serves",
            150,
            |env| Box::pin(with_clients(storm::rotation_under_load(env))),
        ),
        s(
            "h2-floods",
            "rapid-reset and CONTINUATION floods beside h2load traffic: the floods get GOAWAY and are closed, 0 failed requests, the worker's RSS stays bounded",
            120,
            |env| Box::pin(with_clients(flood::floods(env))),
        ),
    ]
}

/// The client programs every scenario here runs.
const CLIENTS: [(&str, &str); 3] = [
    ("h2load", "nghttp2-client"),
    ("curl", "curl"),
    ("openssl", "openssl"),
];

/// Runs `scenario`, or skips it when a client program is not on PATH.
async fn with_clients(scenario: impl Future<Output = Result<Outcome>>) -> Result<Outcome> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<String> = CLIENTS
        .iter()
        .filter(|(bin, _)| !std::env::split_paths(&path).any(|d| d.join(bin).is_file()))
        .map(|(bin, package)| format!("{bin} (Debian's {package})"))
        .collect();
    if missing.is_empty() {
        scenario.await
    } else {
        Ok(Outcome::Skip(format!(
            "not on PATH: {}",
            missing.join(", ")
        )))
    }
}

/// The name of the scenarios' `[[tls]]` setting.
const TLS_NAME: &str = "site";
/// The certificate files, relative to proxyd.toml, in config order (the first is the default).
const CERT_FILES: [&str; 3] = ["certs/default.pem", "certs/a.pem", "certs/b.pem"];

/// A node whose proxyd terminates TLS.
pub struct TlsNode {
    /// Held: dropping a `Proc` kills it.
    _backends: Vec<Proc>,
    _fdkeeper: Proc,
    pub proxyd: Proc,
    /// The TLS bind (ALPN h2, http/1.1).
    pub tls: SocketAddr,
    /// The plain bind with `h2c = true`.
    pub h2c: SocketAddr,
    pub metrics: SocketAddr,
    pub admin: PathBuf,
    /// Where the config and `certs/` are.
    pub dir: PathBuf,
    pub pki: Pki,
    /// What `CERT_FILES` hold at start: for `default.test`, `a.test`, `b.test`.
    pub certs: [Leaf; 3],
}

impl TlsNode {
    /// Starts two demo backends (each answer delayed by `backend_delay`), fdkeeper and proxyd
    /// with certificates of a new CA, and waits until the TLS bind serves.
    pub async fn start(env: &mut Env, backend_delay: Duration) -> Result<TlsNode> {
        let names = ["app1".to_owned(), "app2".to_owned()];
        let backends = cluster::start_backends(env, &names, 2, backend_delay, None).await?;
        let servers: Vec<(String, SocketAddr)> =
            backends.iter().map(|(n, a, _)| (n.clone(), *a)).collect();
        let fdk = cluster::start_fdkeeper(env, "n1", "fdkeeper-n1").await?;
        harness::wait_unix(&fdk.admin, cluster::START_TIMEOUT).await?;
        harness::wait_grpc_health(&fdk.admin, cluster::START_TIMEOUT).await?;

        let dir = env.path("n1");
        let pki = Pki::new(&dir)?;
        let certs = [
            pki.leaf("default.test")?,
            pki.leaf("a.test")?,
            pki.leaf("b.test")?,
        ];
        for (file, leaf) in CERT_FILES.iter().zip(&certs) {
            env.write(&format!("n1/{file}"), &leaf.pem())?;
        }
        let tls = env.free_port(1)?;
        let h2c = env.free_port(1)?;
        let metrics = env.free_port(1)?;
        let admin = env.path("n1/proxyd-admin.sock");
        let mut global = proxyd::Global::new(&admin, &fdk.socket);
        global.drain_timeout = Some("10s");
        global.max_draining = Some(4);
        global.threads = Some(1);
        global.metrics = Some(metrics);
        let config = env.write("n1/proxyd.toml", &render_config(global, tls, h2c, &servers))?;
        let proxyd = env.spawn(
            "proxyd-n1",
            harness::release_bin("proxyd"),
            ["--config".as_ref(), config.as_os_str()],
        )?;
        let node = TlsNode {
            _backends: backends.into_iter().map(|(_, _, p)| p).collect(),
            _fdkeeper: fdk.proc,
            proxyd,
            tls,
            h2c,
            metrics,
            admin,
            dir,
            pki,
            certs,
        };
        harness::wait_for("proxyd to serve", cluster::START_TIMEOUT, || async {
            Ok(cluster::serving(&node.status().await?))
        })
        .await?;
        let ca = node.pki.ca_path().to_owned();
        harness::wait_for("a 200 over TLS", cluster::START_TIMEOUT, || {
            let ca = ca.clone();
            async move {
                Ok(clients::curl_tls(&ca, "a.test", tls, &["--http1.1"])
                    .await
                    .ok()
                    .filter(|r| r.code == 200))
            }
        })
        .await?;
        Ok(node)
    }

    pub async fn status(&self) -> Result<StatusReply> {
        cluster::proxyd_status(&self.admin).await
    }

    pub async fn serving(&self) -> Result<ServingGeneration> {
        cluster::serving(&self.status().await?).context("no serving generation")
    }

    /// h2load with `args` on `https://a.test:PORT/`, connected to the TLS bind (so that SNI is
    /// `a.test`).
    pub fn h2load_tls(&self, label: &str, args: &[&str], expect: load::Expect) -> load::Client {
        load::Client::H2load {
            label: label.to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            expect,
            url: format!("https://a.test:{}/", self.tls.port()),
            connect_to: Some(self.tls),
        }
    }

    /// SIGUSR2, then waits until a generation newer than `after` serves; checks the master's
    /// word on it. Returns the new generation and how long until Status showed it.
    pub async fn reload(&self, after: u64) -> Result<(ServingGeneration, Duration)> {
        let t0 = Instant::now();
        self.proxyd.signal(Signal::SIGUSR2)?;
        let (new, seen) =
            cluster::wait_new_generation(&self.admin, after, Duration::from_secs(15)).await?;
        let st = self.status().await?;
        if let Some(r) = st.last_reload.filter(|r| r.generation == new.generation) {
            ensure!(r.ok, "the reload reported failure: {}", r.message);
        }
        Ok((new, seen - t0))
    }

    /// Waits until the serving generation is the only one (the drained ones exited).
    pub async fn wait_alone(&self, timeout: Duration) -> Result<()> {
        let admin = self.admin.clone();
        harness::wait_for("the old generations to exit", timeout, || {
            let admin = admin.clone();
            async move {
                Ok((cluster::proxyd_status(&admin).await?.generations.len() == 1).then_some(()))
            }
        })
        .await
    }

    /// The pid of the serving generation's worker.
    pub async fn worker_pid(&self) -> Result<u32> {
        Ok(self.serving().await?.pid)
    }
}

/// proxyd.toml: the usual `[global]` and round-robin backend, one `[[tls]]` and a frontend
/// with the TLS bind and the h2c bind.
fn render_config(
    global: proxyd::Global,
    tls: SocketAddr,
    h2c: SocketAddr,
    servers: &[(String, SocketAddr)],
) -> String {
    let mut base = configs::Proxyd::round_robin(global, tls, servers);
    base.comment = "proxyd for an xtask TLS node.";
    base.frontends.clear();
    let mut s = base.render();
    let certs: Vec<String> = CERT_FILES.iter().map(|f| format!("\"{f}\"")).collect();
    let _ = write!(
        s,
        "\n[[tls]]\nname = \"{TLS_NAME}\"\ncerts = [{}]\nalpn = [\"h2\", \"http/1.1\"]\n",
        certs.join(", ")
    );
    let _ = write!(
        s,
        "\n[[frontend]]\nname = \"www\"\nmode = \"http\"\ndefault_backend = \"app\"\n\
         bind = [{{ address = \"{tls}\", tls = \"{TLS_NAME}\" }}, {{ address = \"{h2c}\", h2c = true }}]\n"
    );
    s
}

/// The scenarios' TLS setting in a Status reply.
fn tls_setting(st: &StatusReply) -> Option<&TlsCertificates> {
    st.tls.iter().find(|t| t.name == TLS_NAME)
}

/// `GET /metrics` on proxyd's metrics listener: the body.
async fn metrics(addr: SocketAddr) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .context("no /metrics within 10s")??;
    let (_, body) = text.split_once("\r\n\r\n").context("no metrics body")?;
    Ok(body.to_owned())
}

/// The value of the sample of `/metrics` whose name and labels are `series` exactly.
fn metric_value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Resident and peak resident memory of `pid`, in KiB, from /proc/PID/status.
fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let field = |key: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {key} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Prints each client kind's totals and fails naming the first that saw a failure.
fn report_load(totals: &[load::Totals]) -> Result<()> {
    for t in totals {
        super::figure(&format!("load, {}", t.label), t.summary());
        for s in &t.samples {
            super::figure("  bad round", s);
        }
    }
    let problems: Vec<String> = totals.iter().filter_map(load::Totals::problems).collect();
    ensure!(problems.is_empty(), "{}", problems.join("; "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_the_tls_setting_and_both_binds() {
        let g = proxyd::Global::new("/a".as_ref(), "/f".as_ref());
        let servers = vec![("app1".to_owned(), "127.0.0.2:9001".parse().expect("addr"))];
        let t = render_config(
            g,
            "127.0.0.1:8443".parse().expect("addr"),
            "127.0.0.1:8080".parse().expect("addr"),
            &servers,
        );
        assert!(
            t.contains("certs = [\"certs/default.pem\", \"certs/a.pem\", \"certs/b.pem\"]"),
            "{t}"
        );
        assert!(
            t.contains(
                "bind = [{ address = \"127.0.0.1:8443\", tls = \"site\" }, { address = \"127.0.0.1:8080\", h2c = true }]"
            ),
            "{t}"
        );
        assert_eq!(t.matches("[[frontend]]").count(), 1, "{t}");
        assert!(t.contains("alpn = [\"h2\", \"http/1.1\"]"), "{t}");
    }

    #[test]
    fn reads_a_metric_by_its_labels() {
        let body = "# TYPE x gauge\nx{tls=\"site\"} 1\nx{tls=\"other\"} 0\ny 3.5\n";
        assert_eq!(metric_value(body, "x{tls=\"site\"}"), Some(1.0));
        assert_eq!(metric_value(body, "x{tls=\"other\"}"), Some(0.0));
        assert_eq!(metric_value(body, "y"), Some(3.5));
        assert_eq!(metric_value(body, "x"), None);
    }
}
