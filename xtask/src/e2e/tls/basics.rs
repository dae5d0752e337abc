//! What one client sees of TLS and HTTP/2: the certificate SNI picks, the protocol ALPN (or h2c)
//! gives, and a session ticket that resumes on the next generations' workers.

use std::time::Duration;

use anyhow::{Context, Result, ensure};

use super::clients::{self, Session};
use super::{TlsNode, tls_setting};
use crate::e2e::{Outcome, figure};
use crate::harness::Env;

pub async fn sni_alpn(mut env: Env) -> Result<Outcome> {
    let node = TlsNode::start(&mut env, Duration::ZERO).await?;
    let [default, a, b] = &node.certs;

    // SNI: each name its certificate, an unknown name or none the first one.
    let cases = [
        (Some("a.test"), a),
        (Some("b.test"), b),
        (Some("unknown.test"), default),
        (None, default),
    ];
    for (sni, want) in cases {
        let got = clients::served_cert(node.tls, sni).await?;
        let label = sni.unwrap_or("(no SNI)");
        figure(
            &format!("openssl s_client -servername {label}"),
            format!("{}, serial {}", got.subject, got.serial),
        );
        ensure!(
            got.serial == want.serial && got.subject.contains(&want.name),
            "{label} got {got:?}, expected {} serial {}",
            want.name,
            want.serial
        );
    }
    let st = node.status().await?;
    let setting = tls_setting(&st).context("Status lists no TLS setting")?;
    let listed: Vec<&str> = setting
        .certificates
        .iter()
        .map(|c| c.serial.as_str())
        .collect();
    figure("Status serials", listed.join(", "));
    ensure!(
        listed == [&default.serial, &a.serial, &b.serial],
        "Status lists {listed:?}"
    );

    // ALPN on the TLS bind; curl verifies the chain against the scenario's CA.
    let ca = node.pki.ca_path();
    for (args, want) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let r = clients::curl_tls(ca, "b.test", node.tls, &[args]).await?;
        figure(
            &format!("curl {args} https://b.test"),
            format!("{} HTTP/{}", r.code, r.version),
        );
        ensure!(
            r.code == 200 && r.version == want,
            "curl {args} got {r:?}, expected 200 over HTTP/{want}"
        );
    }
    // The default certificate does not cover an unknown name: curl must refuse it.
    let refused = clients::curl_tls(ca, "unknown.test", node.tls, &["--http2"]).await;
    figure(
        "curl https://unknown.test (default certificate)",
        match &refused {
            Ok(r) => format!("{r:?}"),
            Err(e) => {
                let text = format!("{e:#}");
                let line = text
                    .lines()
                    .find_map(|l| l.split_once("curl: (").map(|(_, r)| r));
                line.map_or(text.clone(), |r| format!("refused: curl: ({r}"))
            }
        },
    );
    ensure!(
        refused.is_err(),
        "curl accepted the default certificate for unknown.test"
    );

    // The h2c bind: HTTP/2 with prior knowledge, HTTP/1.1 otherwise (an Upgrade: h2c is not
    // taken up).
    for (args, want) in [
        ("--http2-prior-knowledge", "2"),
        ("--http1.1", "1.1"),
        ("--http2", "1.1"),
    ] {
        let r = clients::curl_plain(node.h2c, &[args]).await?;
        figure(
            &format!("curl {args} http:// (h2c bind)"),
            format!("{} HTTP/{}", r.code, r.version),
        );
        ensure!(
            r.code == 200 && r.version == want,
            "curl {args} on the h2c bind got {r:?}, expected 200 over HTTP/{want}"
        );
    }
    Ok(Outcome::Pass)
}

pub async fn session_across_reload(mut env: Env) -> Result<Outcome> {
    let node = TlsNode::start(&mut env, Duration::ZERO).await?;
    let sessions = [
        ("TLS 1.3", false, env.path("session-tls13.pem")),
        ("TLS 1.2", true, env.path("session-tls12.pem")),
    ];
    let first = node.serving().await?;
    for (label, tls12, file) in &sessions {
        let run = clients::s_client_session(node.tls, "a.test", *tls12, Session::Out(file)).await?;
        figure(
            &format!(
                "{label}, generation {} (worker {})",
                first.generation, first.pid
            ),
            format!("{} -> {}", run.session, run.status_line),
        );
        ensure!(
            run.session.starts_with("New"),
            "{label}: the first handshake says {}",
            run.session
        );
        ensure!(
            run.status_line.contains(" 200 "),
            "{label}: {}",
            run.status_line
        );
        ensure!(
            std::fs::metadata(file).is_ok_and(|m| m.len() > 0),
            "{label}: s_client wrote no session to {}",
            file.display()
        );
    }
    // Two reloads, each resumed on a worker of a new generation (the old one gone, so that no
    // handshake can reach it).
    let mut generation = first.generation;
    for _ in 0..2 {
        let (next, _) = node.reload(generation).await?;
        generation = next.generation;
        node.wait_alone(Duration::from_secs(15)).await?;
        for (label, tls12, file) in &sessions {
            let run =
                clients::s_client_session(node.tls, "a.test", *tls12, Session::In(file)).await?;
            figure(
                &format!(
                    "{label}, generation {} (worker {})",
                    next.generation, next.pid
                ),
                format!("{} -> {}", run.session, run.status_line),
            );
            ensure!(
                run.session.starts_with("Reused"),
                "{label}: the session from generation {} did not resume on generation {}: {}",
                first.generation,
                next.generation,
                run.session
            );
            ensure!(
                run.status_line.contains(" 200 "),
                "{label}: {}",
                run.status_line
            );
        }
    }
    Ok(Outcome::Pass)
}
