//! TLS settings checked at their line, `proxyd check` refusing certificate files that cannot
//! serve and warning of one about to expire, and the TLS example's certificates.

mod util;

use std::path::PathBuf;

use rcgen::KeyPair;
use util::cli;
use util::tls::{GLOBAL, Pki, load};

#[test]
fn tls_settings_are_checked_at_their_line() {
    let pki = Pki::new();
    pki.write_pem("a.pem", &pki.leaf(&["a.test", "*.w.test"]));
    pki.write_pem("a2.pem", &pki.leaf(&["a.test"]));
    let bind = |tls: &str| {
        format!(
            "{GLOBAL}[[frontend]]\nname = \"web\"\nbind = [\"127.0.0.1:1\", {{ address = \"127.0.0.1:2\", {tls} }}]\ndefault_backend = \"app\"\n\
             [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"127.0.0.1:9\"\n"
        )
    };
    let good = load(&pki, &bind("tls = { certs = [\"a.pem\"] }")).expect("valid");
    let b = &good.frontends[0].bind;
    assert_eq!((b[0].tls, b[1].tls), (None, Some(0)));
    assert_eq!(good.tls[0].name, "web 127.0.0.1:2");
    assert_eq!(good.tls[0].certs[0].names, ["*.w.test", "a.test"]);
    assert!(good.warnings.is_empty(), "{:?}", good.warnings);
    for (tls, why) in [
        ("tls = { certs = [\"a.pem\"], bogus = 1 }", "bogus"),
        ("bogus = 1", "bogus"),
        ("tls = \"nope\"", "unknown tls 'nope'"),
        ("tls = { certs = [] }", "has no certificate"),
        (
            "tls = { certs = [\"a.pem\"], alpn = [\"h2\", \"h2\"] }",
            "given twice",
        ),
        (
            "tls = { certs = [\"a.pem\"] }, h2c = true",
            "on a tls bind, offer h2 with alpn",
        ),
        (
            "tls = { certs = [\"a.pem\"], alpn = [\"spdy/3\"] }",
            "unknown alpn",
        ),
        (
            "tls = { certs = [\"a.pem\"], min_version = \"1.1\" }",
            "bad min_version",
        ),
        (
            "tls = { name = \"x\", certs = [\"a.pem\"] }",
            "takes no name",
        ),
        (
            "tls = { certs = [\"a.pem\", \"a2.pem\"] }",
            "both serve 'a.test'",
        ),
        (
            "tls = { certs = [\"a.pem\"] }, redirect_https = true",
            "plain binds",
        ),
        ("redirect_port = 443", "needs redirect_https"),
        ("tls = { certs = [\"missing.pem\"] }", "cannot read"),
        ("tls = 5", "a string or a table"),
    ] {
        let e = load(&pki, &bind(tls)).expect_err(tls);
        assert_eq!(e.at.map(|a| a.0), Some(6), "{tls}: {e}");
        assert!(e.reason.contains(why), "{tls}: {e}");
    }
    // [[tls]] needs a name, and a unique one.
    let named = |t: &str| {
        format!(
            "{GLOBAL}{t}[[frontend]]\nname = \"web\"\nbind = [\"127.0.0.1:1\"]\ndefault_backend = \"app\"\n\
             [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"127.0.0.1:9\"\n"
        )
    };
    let e = load(&pki, &named("[[tls]]\ncerts = [\"a.pem\"]\n")).expect_err("no name");
    assert!(e.reason.contains("needs a name"), "{e}");
    let twice =
        "[[tls]]\nname = \"t\"\ncerts = [\"a.pem\"]\n[[tls]]\nname = \"t\"\ncerts = [\"a.pem\"]\n";
    let e = load(&pki, &named(twice)).expect_err("twice");
    assert!(e.reason.contains("duplicate tls name"), "{e}");
    assert_eq!(e.at.map(|a| a.0), Some(8), "{e}");
    // A redirect needs http.
    let tcp =
        bind("redirect_https = true").replace("name = \"web\"", "name = \"web\"\nmode = \"tcp\"");
    let e = load(&pki, &tcp).expect_err("tcp redirect");
    assert!(e.reason.contains("tcp mode"), "{e}");
    let tcp = bind("h2c = true").replace("name = \"web\"", "name = \"web\"\nmode = \"tcp\"");
    let e = load(&pki, &tcp).expect_err("tcp h2c");
    assert!(e.reason.contains("tcp mode"), "{e}");
    let h2 = load(
        &pki,
        &bind("tls = { certs = [\"a.pem\"], alpn = [\"h2\", \"http/1.1\"] }"),
    )
    .expect("h2 is offered");
    assert_eq!(h2.tls[0].alpn.len(), 2);
}

/// `proxyd check` on a config naming `certs`, in the pki dir.
fn check(pki: &Pki, certs: &str) -> (Option<i32>, String, String, PathBuf) {
    let config = pki.write(
        "check.toml",
        &format!(
            "{GLOBAL}[[frontend]]\nname = \"web\"\nbind = [{{ address = \"127.0.0.1:8443\", tls = {{ certs = {certs} }} }}]\ndefault_backend = \"app\"\n\
             [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"127.0.0.1:9\"\n"
        ),
    );
    let out = cli(&["check"], &config);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        config,
    )
}

#[test]
fn check_refuses_certificates_that_cannot_serve_and_names_the_file() {
    let pki = Pki::new();
    let a = pki.leaf(&["a.test"]);
    let b = pki.leaf(&["b.test"]);
    pki.write_pem("good.pem", &a);
    let (code, out, err, _) = check(&pki, "[\"good.pem\"]");
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.ends_with("check.toml: ok\n") && err.is_empty(),
        "{out}{err}"
    );

    // b's key with a's certificate.
    let mismatch = pki.write("mismatch.pem", &format!("{}{}", a.cert, b.key));
    pki.write("pair.crt", &a.cert);
    let wrong_key = pki.write("pair.key", &b.key);
    pki.write("nokey.pem", &a.cert);
    let garbage = pki.write("garbage.pem", "hello, not a certificate\n");
    pki.write(
        "badbase64.pem",
        "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
    );
    pki.write_pem(
        "expired.pem",
        &pki.leaf_with(&["old.test"], -1, KeyPair::generate().expect("key")),
    );
    let path = |f: &str| pki.path(f).display().to_string();
    let cases = [
        (
            "[\"good.pem\", \"mismatch.pem\"]".to_owned(),
            format!(
                "the private key in '{}' does not match the certificate in '{}'",
                mismatch.display(),
                mismatch.display()
            ),
        ),
        (
            "[{ cert = \"pair.crt\", key = \"pair.key\" }]".to_owned(),
            format!(
                "the private key in '{}' does not match",
                wrong_key.display()
            ),
        ),
        (
            "[\"nokey.pem\"]".to_owned(),
            format!("no private key for '{}'", path("nokey.pem")),
        ),
        (
            "[\"garbage.pem\"]".to_owned(),
            format!("no certificate in '{}'", garbage.display()),
        ),
        (
            "[\"badbase64.pem\"]".to_owned(),
            format!("'{}' is not valid PEM", path("badbase64.pem")),
        ),
        (
            "[\"expired.pem\"]".to_owned(),
            format!("the certificate in '{}' expired on ", path("expired.pem")),
        ),
    ];
    for (certs, why) in cases {
        let (code, _, err, config) = check(&pki, &certs);
        assert_eq!(code, Some(64), "{certs}: {err}");
        assert!(
            err.starts_with(&format!("{}:6:", config.display())),
            "{certs}: {err}"
        );
        assert!(err.contains(&why), "{certs}: {err}");
    }
}

#[test]
fn check_warns_of_a_certificate_about_to_expire_and_still_passes() {
    let pki = Pki::new();
    pki.write_pem(
        "soon.pem",
        &pki.leaf_with(&["soon.test"], 5, KeyPair::generate().expect("key")),
    );
    let (code, out, err, config) = check(&pki, "[\"soon.pem\"]");
    assert_eq!(code, Some(0), "{err}");
    assert!(out.ends_with(": ok\n"), "{out}");
    let want = format!("warning: {}:6:", config.display());
    assert!(err.starts_with(&want), "{err}");
    assert!(
        err.contains(&format!(
            "the certificate in '{}' expires in 4 days",
            pki.path("soon.pem").display()
        )) || err.contains(&format!(
            "the certificate in '{}' expires in 5 days",
            pki.path("soon.pem").display()
        )),
        "{err}"
    );
}

#[test]
fn the_tls_example_is_valid_with_its_certificates_in_place() {
    let pki = Pki::new();
    pki.write_pem(
        "certs/www.example.com.pem",
        &pki.leaf(&["www.example.com", "example.com"]),
    );
    let api = pki.leaf(&["api.example.com"]);
    pki.write("certs/api.example.com.crt", &api.cert);
    pki.write("certs/api.example.com.key", &api.key);
    let shop = pki.leaf(&["*.shop.example.com"]);
    pki.write("certs/more/shop.crt", &shop.cert);
    pki.write("certs/more/shop.key", &shop.key);
    pki.write_pem(
        "certs/mail.example.com.pem",
        &pki.leaf(&["mail.example.com"]),
    );
    let text = include_str!("../../examples/proxyd-tls.toml");
    let c = load(&pki, text).expect("the example is valid");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let site = &c.tls[0];
    assert_eq!(site.certs.len(), 3);
    assert_eq!(site.certs[2].names, ["*.shop.example.com"]);
    let www = &c.frontends[0].bind;
    assert!(www[0].redirect_https.is_some() && www[1].tls == Some(0));
    assert_eq!(c.frontends[1].bind[0].tls, Some(1));
    assert!(c.tls[1].alpn.is_empty());
}
