//! Certificates changed under the real proxyd: a reload with a broken one is refused, and
//! certificates rotated without a reload (by the files changing, or `ReloadCertificates`) are
//! served and seen in Status and `/metrics`.

mod util;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proto::proxyd::v1 as api;
use util::master::{admin, serving, status};
use util::tls::{Leaf, Pki, handshake, hello, launch};
use util::{Client, cli};

/// The certificate new connections get, once it is `want`: how long that took.
async fn served_within(addr: SocketAddr, want: &Leaf, limit: Duration) -> Duration {
    let began = Instant::now();
    loop {
        let (_, got) = handshake(addr, hello()).await.expect("handshake");
        if got == want.der {
            return began.elapsed();
        }
        assert!(
            began.elapsed() < limit,
            "serial {} not served within {limit:?}",
            want.serial
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET /metrics` from the master.
async fn metrics(addr: SocketAddr) -> String {
    let mut c = Client::connect(addr).await.expect("metrics");
    let r = c
        .send(b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n", false)
        .await
        .expect("metrics reply");
    assert_eq!(r.status, 200);
    r.text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_broken_certificate_is_refused_and_tls_keeps_serving() {
    let pki = Pki::new();
    let first = pki.leaf(&["a.test"]);
    pki.write_pem("site.pem", &first);
    let proxyd = launch(&pki, "{ certs = [\"site.pem\"] }", "").await;
    let (addr, config) = (proxyd.addr, &proxyd.config);
    let served = handshake(addr, hello()).await.expect("serving");
    assert!(served.1 == first.der);
    let reload = || cli(&["reload"], config);

    // Another key under the same certificate: the reload is refused, with the file named.
    let other = pki.leaf(&["b.test"]);
    let site = pki.write("site.pem", &format!("{}{}", first.cert, other.key));
    let out = reload();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains(&format!(
            "does not match the certificate in '{}'",
            site.display()
        )),
        "{err}"
    );
    // The running generation still serves its certificate, on new connections too.
    let (tls, got) = handshake(addr, hello()).await.expect("still serving");
    assert!(got == first.der);
    let r = Client::over(tls)
        .send(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", false)
        .await
        .expect("reply");
    assert_eq!(r.text(), "hi");

    // A good new certificate is served after the next reload.
    let renewed = pki.leaf(&["a.test"]);
    pki.write_pem("site.pem", &renewed);
    let out = reload();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The old generation may take a last connection from the shared queue between the new
    // one's Ready and its own Drain: a new handshake gets the new certificate soon, not at once.
    served_within(addr, &renewed, Duration::from_secs(3)).await;
    drop(served);
}

/// Within this, a new connection gets a certificate rotated on disk: the master looks every
/// second and waits a quarter of one for the files to stand still.
const ROTATED_WITHIN: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_rotated_on_disk_serves_new_connections_without_a_reload() {
    let pki = Pki::new();
    let first = pki.leaf(&["a.test"]);
    let site = pki.write_pem("site.pem", &first);
    let proxyd = launch(
        &pki,
        "\"site\"",
        "[[tls]]\nname = \"site\"\ncerts = [\"site.pem\"]\n",
    )
    .await;
    let before = serving(&proxyd.admin).await.expect("serving");
    // Kept open across both rotations: it keeps the certificate it got.
    let (mut open, got) = handshake(proxyd.addr, hello()).await.expect("handshake");
    assert!(got == first.der);

    // Renewed as most tools do: a new file renamed over the old one.
    let renamed = pki.leaf(&["a.test"]);
    pki.write_pem("site.pem.new", &renamed);
    std::fs::rename(pki.path("site.pem.new"), &site).expect("rename");
    let took = served_within(proxyd.addr, &renamed, ROTATED_WITHIN).await;
    eprintln!("renamed: served after {took:?}");

    // Then written in place.
    let written = pki.leaf(&["a.test"]);
    std::fs::write(&site, format!("{}{}", written.cert, written.key)).expect("write");
    let took = served_within(proxyd.addr, &written, ROTATED_WITHIN).await;
    eprintln!("written in place: served after {took:?}");

    // No reload: the same generation and worker, alone.
    assert_eq!(serving(&proxyd.admin).await, Some(before));
    let st = status(&proxyd.admin).await.expect("status");
    assert_eq!(st.generations.len(), 1);
    // The connection opened before the rotations still works.
    let r = Client::over(&mut open)
        .send(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", false)
        .await
        .expect("reply on the old connection");
    assert_eq!(r.text(), "hi");
    assert!(open.get_ref().1.peer_certificates().expect("certs")[0].as_ref() == first.der);

    // Status and /metrics tell what is served and when it expires.
    let tls = &st.tls[0];
    assert_eq!(tls.name, "site");
    assert_eq!((tls.rotations_loaded, tls.rotations_refused), (2, 0));
    let cert = &tls.certificates[0];
    assert_eq!(cert.serial, written.serial);
    assert_eq!(cert.names, ["a.test"]);
    assert_eq!(cert.path, site.display().to_string());
    assert_eq!(cert.key_type, "ECDSA");
    let in_a_year = time::OffsetDateTime::now_utc().unix_timestamp() + 365 * 86_400;
    assert!((cert.not_after_unix - in_a_year).abs() < 60, "{cert:?}");
    let last = tls.last_rotation.as_ref().expect("last rotation");
    assert_eq!(last.outcome, api::RotationOutcome::RotationLoaded as i32);
    assert!(last.message.contains(&written.serial), "{}", last.message);
    let text = metrics(proxyd.metrics).await;
    let expiry = format!(
        "proxyd_tls_certificate_expiry_timestamp_seconds{{tls=\"site\",name=\"a.test\",serial=\"{}\"}} {}\n",
        written.serial, cert.not_after_unix
    );
    assert!(text.contains(&expiry), "{expiry} in\n{text}");
    assert!(
        text.contains("proxyd_tls_certificate_rotations_total{tls=\"site\",result=\"loaded\"} 2\n"),
        "{text}"
    );
    assert!(
        text.contains("proxyd_frontend_tls_handshake_failures_total{frontend=\"web\"} 0\n"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_to_a_key_that_does_not_match_is_refused_and_the_old_certificate_serves() {
    let pki = Pki::new();
    let first = pki.leaf(&["a.test"]);
    pki.write("site.crt", &first.cert);
    let key = pki.write("site.key", &first.key);
    let proxyd = launch(
        &pki,
        "{ certs = [{ cert = \"site.crt\", key = \"site.key\" }] }",
        "",
    )
    .await;
    let before = serving(&proxyd.admin).await.expect("serving");

    // Another key beside the same certificate.
    let other = pki.leaf(&["a.test"]);
    std::fs::write(&key, &other.key).expect("write");
    let why = format!(
        "the private key in '{}' does not match the certificate in '{}'",
        key.display(),
        pki.path("site.crt").display()
    );
    let began = Instant::now();
    let refused = loop {
        let st = status(&proxyd.admin).await.expect("status");
        if let Some(last) = st.tls[0].last_rotation.clone() {
            break (last, st.tls[0].rotations_refused);
        }
        assert!(began.elapsed() < Duration::from_secs(5), "never read");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        refused.0.outcome,
        api::RotationOutcome::RotationRefused as i32
    );
    assert!(refused.0.message.contains(&why), "{}", refused.0.message);
    assert_eq!(refused.1, 1);
    // The old certificate serves, with its own key.
    let (tls, got) = handshake(proxyd.addr, hello())
        .await
        .expect("still serving");
    assert!(got == first.der);
    let r = Client::over(tls)
        .send(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", false)
        .await
        .expect("reply");
    assert_eq!(r.text(), "hi");
    let st = status(&proxyd.admin).await.expect("status");
    assert_eq!(st.tls[0].certificates[0].serial, first.serial);
    let text = metrics(proxyd.metrics).await;
    assert!(
        text.contains("proxyd_tls_certificate_last_rotation_refused{tls=\"web "),
        "{text}"
    );

    // A worker that dies now comes back with the certificate the master serves, not with
    // the broken files on disk.
    let (generation, pid, _) = serving(&proxyd.admin).await.expect("serving");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the worker");
    let began = Instant::now();
    loop {
        let now = serving(&proxyd.admin).await;
        if now.is_some_and(|(g, p, _)| g == generation && p != pid) {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "no worker serving again after the kill: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, got) = handshake(proxyd.addr, hello())
        .await
        .expect("the respawned worker serves");
    assert!(got == first.der);

    // Asking says why too, and loads nothing.
    let e = admin(&proxyd.admin)
        .await
        .expect("admin")
        .reload_certificates(api::ReloadCertificatesRequest {})
        .await
        .expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains(&why), "{}", e.message());
    assert!(e.message().starts_with("tls 'web "), "{}", e.message());

    // The matching pair, then ReloadCertificates at once: it answers with what serves, once
    // the worker serves it.
    let renewed = pki.leaf(&["a.test"]);
    pki.write("site.crt", &renewed.cert);
    pki.write("site.key", &renewed.key);
    let reply = admin(&proxyd.admin)
        .await
        .expect("admin")
        .reload_certificates(api::ReloadCertificatesRequest {})
        .await
        .expect("loaded")
        .into_inner();
    assert_eq!(reply.generation, before.0);
    let tls = &reply.tls[0];
    assert_eq!(tls.certificates.len(), 1);
    assert_eq!(tls.certificates[0].serial, renewed.serial);
    assert_eq!(tls.certificates[0].names, ["a.test"]);
    let (_, got) = handshake(proxyd.addr, hello()).await.expect("handshake");
    assert!(got == renewed.der, "served as soon as the call returned");
    assert_eq!(
        serving(&proxyd.admin).await.map(|s| s.0),
        Some(before.0),
        "no new generation"
    );

    // Asked again, nothing changed.
    let reply = admin(&proxyd.admin)
        .await
        .expect("admin")
        .reload_certificates(api::ReloadCertificatesRequest {})
        .await
        .expect("unchanged")
        .into_inner();
    let last = reply.tls[0].last_rotation.as_ref().expect("outcome");
    assert_eq!(last.outcome, api::RotationOutcome::RotationUnchanged as i32);
    assert_eq!(reply.tls[0].rotations_loaded, 1);
}
