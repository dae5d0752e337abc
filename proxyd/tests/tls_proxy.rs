//! Requests through a TLS bind: curl through it with X-Forwarded-Proto, the redirect to https
//! from a plain bind, TCP mode, and large bodies both ways on one connection.

mod util;

use std::time::Duration;

use util::tls::{
    GLOBAL, Hello, Pki, curl, handshake, hello, listener, recording_backend_heads, start,
};
use util::{Action, Client, backend, ok};

#[tokio::test]
async fn curl_gets_the_backend_over_tls_with_x_forwarded_proto_https() {
    let pki = Pki::new();
    pki.write_pem("certs/b.pem", &pki.leaf(&["b.test"]));
    pki.write_pem("certs/a.pem", &pki.leaf(&["a.test"]));
    // Beside the certificates in the directory, and skipped.
    pki.write("certs/notes.ocsp", "not a certificate");
    let (heads, script) = recording_backend_heads();
    let be = backend(script).await;
    let (plain_l, plain) = listener();
    let (tls_l, tls) = listener();
    let text = format!(
        "{GLOBAL}[defaults]\nforwardfor = true\n\
         [[frontend]]\nname = \"web\"\nbind = [\"{plain}\", {{ address = \"{tls}\", tls = {{ certs = [\"certs\"] }} }}]\ndefault_backend = \"app\"\n\
         [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"{}\"\n",
        be.addr
    );
    let _proxy = start(&pki, &text, vec![plain_l, tls_l]);
    let port = tls.port();
    for name in ["a.test", "b.test"] {
        let out = curl(
            &pki,
            &[
                "--resolve",
                &format!("{name}:{port}:127.0.0.1"),
                "-H",
                "X-Forwarded-Proto: http",
                "-H",
                "x-forwarded-proto: ftp",
                &format!("https://{name}:{port}/hello"),
            ],
        )
        .await;
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "from the backend");
    }
    // The same request on the plain bind says http.
    let url = format!("http://{plain}/plain");
    let out = util::curl(&["-H", "X-Forwarded-Proto: https", &url]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from the backend");
    let heads = heads.lock().expect("lock").clone();
    assert_eq!(heads.len(), 3);
    for (head, want) in heads.iter().zip(["https", "https", "http"]) {
        let protos: Vec<&str> = head
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("x-forwarded-proto:"))
            .collect();
        assert_eq!(protos, [format!("X-Forwarded-Proto: {want}")], "{head}");
        assert!(head.contains("X-Forwarded-For: 127.0.0.1"), "{head}");
    }
}

#[tokio::test]
async fn a_plain_bind_with_redirect_answers_301_to_https() {
    let pki = Pki::new();
    pki.write_pem("site.pem", &pki.leaf(&["a.test"]));
    let be = backend(|_| ok("secure")).await;
    let (plain_l, plain) = listener();
    let (tls_l, tls) = listener();
    let text = format!(
        "{GLOBAL}[[frontend]]\nname = \"web\"\n\
         bind = [{{ address = \"{plain}\", redirect_https = true, redirect_port = {} }}, {{ address = \"{tls}\", tls = {{ certs = [\"site.pem\"] }} }}]\n\
         default_backend = \"app\"\n\
         [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"{}\"\n",
        tls.port(),
        be.addr
    );
    let proxy = start(&pki, &text, vec![plain_l, tls_l]);
    let mut c = Client::connect(plain).await.expect("connect");
    let r = c
        .send(
            format!(
                "GET /a/b?c=d HTTP/1.1\r\nHost: a.test:{}\r\n\r\n",
                plain.port()
            )
            .as_bytes(),
            false,
        )
        .await
        .expect("reply");
    assert_eq!(r.status, 301);
    let location = format!("location: https://a.test:{}/a/b?c=d", tls.port());
    assert!(
        r.head.to_ascii_lowercase().contains(&location),
        "{}",
        r.head
    );
    assert!(!r.closes(), "the connection stays for the next request");
    // A request with a body is answered and the connection closed: its body is not read.
    let r = c
        .send(
            b"POST /form HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\n\r\nabc",
            false,
        )
        .await
        .expect("reply");
    assert_eq!(r.status, 301);
    assert!(r.head.contains("Location: https://a.test:"), "{}", r.head);
    assert!(r.closes() && c.closed().await);
    assert_eq!(be.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
    // curl follows it to the TLS bind and gets the backend's answer.
    let out = curl(
        &pki,
        &[
            "-L",
            "--resolve",
            &format!("a.test:{}:127.0.0.1", plain.port()),
            "--resolve",
            &format!("a.test:{}:127.0.0.1", tls.port()),
            &format!("http://a.test:{}/x", plain.port()),
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "secure");
    assert_eq!(be.requests.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Redirects are answered, not denied.
    let (frontends, _) = proxy.shared().frontend_backend_stats();
    assert_eq!(frontends[0].requests_denied, 0);
}

#[tokio::test]
async fn a_tcp_frontend_terminates_tls_too() {
    let pki = Pki::new();
    pki.write_pem("site.pem", &pki.leaf(&["t.test"]));
    let (heads, script) = recording_backend_heads();
    let be = backend(script).await;
    let (l, addr) = listener();
    let text = format!(
        "{GLOBAL}[[tls]]\nname = \"t\"\ncerts = [\"site.pem\"]\nalpn = []\n\
         [[frontend]]\nname = \"raw\"\nmode = \"tcp\"\nbind = [{{ address = \"{addr}\", tls = \"t\" }}]\ndefault_backend = \"app\"\n\
         [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"{}\"\n",
        be.addr
    );
    let _proxy = start(&pki, &text, vec![l]);
    let (tls, _) = handshake(
        addr,
        Hello {
            sni: Some("t.test"),
            alpn: &["http/1.1"],
            ..Hello::default()
        },
    )
    .await
    .expect("handshake");
    // No ALPN offered by this setting.
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    let mut c = Client::over(tls);
    let r = c
        .send(
            b"GET /raw HTTP/1.1\r\nHost: t.test\r\nX-Forwarded-Proto: mine\r\n\r\n",
            false,
        )
        .await
        .expect("reply");
    assert_eq!(r.text(), "from the backend");
    // Bytes, decrypted, untouched: TCP mode adds no field.
    let heads = heads.lock().expect("lock").clone();
    assert!(heads[0].contains("X-Forwarded-Proto: mine"), "{}", heads[0]);
}

#[tokio::test]
async fn large_bodies_cross_tls_both_ways_on_a_kept_alive_connection() {
    let pki = Pki::new();
    pki.write_pem("site.pem", &pki.leaf(&["a.test"]));
    // More than the socket buffers hold: the proxy's writes block while the client waits.
    let big = 16 * 1024 * 1024;
    let be = backend(move |s| {
        let body = vec![b'x'; big + s.body.len()];
        let mut r =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        r.extend_from_slice(&body);
        Action::Respond(r)
    })
    .await;
    let (l, addr) = listener();
    let text = format!(
        "{GLOBAL}[[frontend]]\nname = \"web\"\nbind = [{{ address = \"{addr}\", tls = {{ certs = [\"site.pem\"] }} }}]\ndefault_backend = \"app\"\n\
         [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"{}\"\n",
        be.addr
    );
    let _proxy = start(&pki, &text, vec![l]);
    let (tls, _) = handshake(addr, hello()).await.expect("handshake");
    let mut c = Client::over(tls);
    let upload = 1024 * 1024;
    for _ in 0..3 {
        let mut req =
            format!("POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: {upload}\r\n\r\n")
                .into_bytes();
        req.extend(std::iter::repeat_n(b'u', upload));
        use tokio::io::AsyncWriteExt;
        c.io.stream.write_all(&req).await.expect("send");
        c.io.stream.flush().await.expect("send");
        // Reads only once the proxy is stuck writing: what it wrote last must still come.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = c.read(false).await.expect("reply");
        assert_eq!((r.status, r.body.len()), (200, big + upload));
        assert!(!r.closes());
    }
}
