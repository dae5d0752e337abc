//! TLS handshakes on a bind, with certificates made at test time by a CA of the test's own: SNI,
//! ECDSA or RSA by what the client verifies, ALPN, the minimum version, and the handshake
//! timeout.

mod util;

use std::process::Command;
use std::time::{Duration, Instant};

use rcgen::KeyPair;
use rustls::SignatureScheme;
use util::tls::{
    GLOBAL, Hello, Pki, curl, handshake, hello, listener, recording_backend_heads, s_client, start,
};
use util::{Client, backend, ok};

/// An RSA key: ring signs with RSA but does not make RSA keys.
fn rsa_key() -> KeyPair {
    let out = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .output()
        .expect("openssl genpkey");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    KeyPair::from_pem(&String::from_utf8_lossy(&out.stdout)).expect("rsa key")
}

#[tokio::test]
async fn sni_picks_the_certificate_by_name_and_the_first_for_any_other() {
    let pki = Pki::new();
    let a = pki.leaf(&["a.test"]);
    let b = pki.leaf(&["b.test"]);
    let wild = pki.leaf(&["*.w.test"]);
    let exact = pki.leaf(&["x.w.test"]);
    pki.write_pem("a.pem", &a);
    pki.write_pem("b.pem", &b);
    pki.write_pem("wild.pem", &wild);
    pki.write_pem("exact.pem", &exact);
    let be = backend(|_| ok("hi")).await;
    let (l, addr) = listener();
    let text = format!(
        "{GLOBAL}[[tls]]\nname = \"site\"\ncerts = [\"a.pem\", \"b.pem\", \"wild.pem\", \"exact.pem\"]\n\
         [[frontend]]\nname = \"web\"\nbind = [{{ address = \"{addr}\", tls = \"site\" }}]\ndefault_backend = \"app\"\n\
         [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"{}\"\n",
        be.addr
    );
    let _proxy = start(&pki, &text, vec![l]);
    for (sni, want, which) in [
        (Some("a.test"), &a, "a"),
        (Some("b.test"), &b, "b"),
        (Some("B.Test"), &b, "b, names without case"),
        (Some("y.w.test"), &wild, "the wildcard"),
        (
            Some("x.w.test"),
            &exact,
            "the exact name before the wildcard",
        ),
        (
            Some("y.z.w.test"),
            &a,
            "the default: a wildcard covers one label",
        ),
        (Some("unknown.test"), &a, "the default"),
        (None, &a, "the default, without SNI"),
    ] {
        let (_tls, got) = handshake(
            addr,
            Hello {
                sni,
                ..Hello::default()
            },
        )
        .await
        .expect("handshake");
        assert!(got == want.der, "{sni:?} should get {which}");
    }
    // OpenSSL's client sees the same.
    for (sni, cn) in [
        (Some("b.test"), "b.test"),
        (Some("other.test"), "a.test"),
        (None, "a.test"),
    ] {
        let text = match sni {
            Some(name) => s_client(addr, &["-servername", name]).await,
            None => s_client(addr, &["-noservername"]).await,
        };
        assert!(
            text.contains(&format!("subject=CN = {cn}\n")),
            "{sni:?}: {text}"
        );
    }
}

#[tokio::test]
async fn ecdsa_first_and_rsa_for_a_client_that_verifies_only_rsa() {
    let pki = Pki::new();
    let ec = pki.leaf(&["a.test"]);
    let rsa = pki.leaf_with(&["a.test"], 365, rsa_key());
    // The RSA chain with its key beside it, in `rsa.crt` and `rsa.key`.
    pki.write("rsa.crt", &rsa.cert);
    pki.write("rsa.key", &rsa.key);
    pki.write_pem("ec.pem", &ec);
    let be = backend(|_| ok("hi")).await;
    let (l, addr) = listener();
    let text = format!(
        "{GLOBAL}[[frontend]]\nname = \"web\"\nbind = [{{ address = \"{addr}\", tls = {{ certs = [\"rsa.crt\", \"ec.pem\"] }} }}]\ndefault_backend = \"app\"\n\
         [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"{}\"\n",
        be.addr
    );
    let _proxy = start(&pki, &text, vec![l]);
    let (_, got) = handshake(addr, hello()).await.expect("handshake");
    assert!(got == ec.der, "ECDSA is preferred for a name that has both");
    let rsa_only = vec![
        SignatureScheme::RSA_PSS_SHA256,
        SignatureScheme::RSA_PKCS1_SHA256,
    ];
    let (mut tls, got) = handshake(
        addr,
        Hello {
            schemes: Some(rsa_only.clone()),
            ..hello()
        },
    )
    .await
    .expect("handshake");
    assert!(
        got == rsa.der,
        "a client that verifies only RSA gets the RSA one"
    );
    // And the RSA key does sign: the request goes through.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await.expect("read");
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("hi"),
        "{answer}"
    );
    // The default (the first certificate listed, and its ECDSA twin) for a client without SNI.
    let (_, got) = handshake(
        addr,
        Hello {
            schemes: Some(rsa_only),
            ..Hello::default()
        },
    )
    .await
    .expect("handshake");
    assert!(got == rsa.der);
}

#[tokio::test]
async fn alpn_agrees_on_http11_and_refuses_a_client_without_it() {
    let pki = Pki::new();
    pki.write_pem("site.pem", &pki.leaf(&["a.test"]));
    let be = backend(|_| ok("hi")).await;
    let (l, addr) = listener();
    let text = format!(
        "{GLOBAL}[[frontend]]\nname = \"web\"\nbind = [{{ address = \"{addr}\", tls = {{ certs = [\"site.pem\"] }} }}]\ndefault_backend = \"app\"\n\
         [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"{}\"\n",
        be.addr
    );
    let _proxy = start(&pki, &text, vec![l]);
    for offered in [&["h2", "http/1.1"][..], &["http/1.1"], &[]] {
        let (tls, _) = handshake(
            addr,
            Hello {
                alpn: offered,
                ..hello()
            },
        )
        .await
        .expect("handshake");
        let agreed = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let want = (!offered.is_empty()).then(|| b"http/1.1".to_vec());
        assert_eq!(agreed, want, "offered {offered:?}");
        let mut c = Client::over(tls);
        let r = c
            .send(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", false)
            .await
            .expect("reply");
        assert_eq!((r.status, r.text().as_str()), (200, "hi"));
    }
    // A client that speaks only h2 is told there is nothing in common (RFC 7301).
    let refused = handshake(
        addr,
        Hello {
            alpn: &["h2"],
            ..hello()
        },
    )
    .await;
    assert!(refused.is_err());
}

#[tokio::test]
async fn alpn_h2_gives_http2_to_curl_and_http11_to_a_client_that_asks_for_it() {
    let pki = Pki::new();
    pki.write_pem("site.pem", &pki.leaf(&["a.test"]));
    let (heads, script) = recording_backend_heads();
    let be = backend(script).await;
    let (l, addr) = listener();
    let text = format!(
        "{GLOBAL}[defaults]\nforwardfor = true\n[[frontend]]\nname = \"web\"\nbind = [{{ address = \"{addr}\", tls = {{ certs = [\"site.pem\"], alpn = [\"h2\", \"http/1.1\"] }} }}]\ndefault_backend = \"app\"\n\
         [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"{}\"\n",
        be.addr
    );
    let _proxy = start(&pki, &text, vec![l]);
    let url = format!("https://a.test:{}/h2", addr.port());
    let resolve = format!("a.test:{}:127.0.0.1", addr.port());
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let out = curl(
            &pki,
            &[flag, "--resolve", &resolve, "-w", "\n%{http_version}", &url],
        )
        .await;
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text,
            format!("from the backend\n{version}"),
            "{flag}: {out:?}"
        );
    }
    let heads = heads.lock().expect("lock").clone();
    assert_eq!(heads.len(), 2, "{heads:?}");
    for h in &heads {
        assert!(h.starts_with("GET /h2 HTTP/1.1\r\n"), "{h}");
        assert!(h.contains("X-Forwarded-Proto: https\r\n"), "{h}");
    }
}

#[tokio::test]
async fn min_version_13_refuses_a_tls12_client() {
    let pki = Pki::new();
    pki.write_pem("site.pem", &pki.leaf(&["a.test"]));
    let be = backend(|_| ok("hi")).await;
    let (l13, a13) = listener();
    let (l12, a12) = listener();
    let text = format!(
        "{GLOBAL}[[frontend]]\nname = \"web\"\n\
         bind = [{{ address = \"{a13}\", tls = {{ certs = [\"site.pem\"], min_version = \"1.3\" }} }}, {{ address = \"{a12}\", tls = {{ certs = [\"site.pem\"] }} }}]\n\
         default_backend = \"app\"\n\
         [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"{}\"\n",
        be.addr
    );
    let _proxy = start(&pki, &text, vec![l13, l12]);
    let tls12 = |addr| {
        handshake(
            addr,
            Hello {
                tls12: true,
                ..hello()
            },
        )
    };
    assert!(tls12(a13).await.is_err());
    let (tls, _) = tls12(a12).await.expect("1.2 where allowed");
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
}

#[tokio::test]
async fn a_client_that_never_says_hello_frees_its_slot_at_the_handshake_timeout() {
    let pki = Pki::new();
    pki.write_pem("site.pem", &pki.leaf(&["a.test"]));
    let be = backend(|_| ok("hi")).await;
    let (l, addr) = listener();
    let text = format!(
        "{GLOBAL}[defaults]\ntimeout_tls_handshake = \"300ms\"\n\
         [[frontend]]\nname = \"web\"\nmaxconn = 1\nbind = [{{ address = \"{addr}\", tls = {{ certs = [\"site.pem\"] }} }}]\ndefault_backend = \"app\"\n\
         [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"{}\"\n",
        be.addr
    );
    let proxy = start(&pki, &text, vec![l]);
    // Takes the only slot and says nothing.
    let mut silent = Client::connect(addr).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(proxy.stats().active_connections, 1);
    let began = Instant::now();
    let (tls, _) = handshake(addr, hello())
        .await
        .expect("served once the silent one is gone");
    let waited = began.elapsed();
    assert!(
        waited >= Duration::from_millis(200),
        "the handshake counted against maxconn: {waited:?}"
    );
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    assert!(silent.closed().await, "the silent connection was closed");
    let r = Client::over(tls)
        .send(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", false)
        .await
        .expect("reply");
    assert_eq!(r.status, 200);
}
