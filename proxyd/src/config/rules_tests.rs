//! The unit tests of `[[frontend.rule]]`: every kind loads, each refusal names its line.

use crate::config::Config;
use common::{ConfigError, SourceFile};

/// A config whose frontend `www` has `rules` and whose backends are `app` and `api`.
fn with_rules(rules: &str) -> String {
    format!(
        r#"[global]
admin_socket = "/tmp/p/admin.sock"
fdkeeper_socket = "/tmp/f/fdkeeper.sock"

[[frontend]]
name = "www"
bind = ["127.0.0.1:8080"]
default_backend = "app"
{rules}

[[backend]]
name = "app"
[[backend.server]]
name = "app1"
address = "127.0.0.1:9001"

[[backend]]
name = "api"
[[backend.server]]
name = "api1"
address = "127.0.0.1:9002"
"#
    )
}

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_source(SourceFile::from_text("p.toml", text))
}

/// The 1-based line of the first line containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} not in the text"))
}

#[test]
fn every_kind_of_rule_loads() {
    let text = with_rules(
        r#"
[[frontend.rule]]
set_response_header = { name = "Strict-Transport-Security", value = "max-age=63072000" }
[[frontend.rule]]
when = { host = ["api.example.com", "*.api.example.com", ".internal"], path_prefix = "/v1/" }
use_backend = "api"
[[frontend.rule]]
when = { any = [{ header = { name = "X-Canary", equals = "1" } }, { cookie = { name = "beta" } }] }
set_header = { name = "X-Canary-Seen", value = "yes" }
[[frontend.rule]]
when = { method = ["PUT", "DELETE"], not = { src = ["10.0.0.0/8", "fd00::/8"] } }
deny = { status = 405, body = "read only\n" }
[[frontend.rule]]
when = { path = "/old", query = { name = "v", regex = "^[0-9]+$" } }
redirect = { prefix = "https://new.example.com", status = 308, drop_query = true }
[[frontend.rule]]
when = { path_regex = "^/static/.*\\.css$", tls = false }
redirect = { scheme = "https" }
[[frontend.rule]]
when = { path = "/health" }
return = { status = 200, content_type = "text/plain", body = "ok\n" }
[[frontend.rule]]
when = { all = [{ path_prefix = "/api/" }, { header = { name = "User-Agent", regex = "bot" } }] }
set_path = "/api/bots"
[[frontend.rule]]
add_header = { name = "X-Via", value = "proxyd" }
[[frontend.rule]]
del_header = "X-Debug"
[[frontend.rule]]
add_response_header = { name = "X-Frame-Options", value = "DENY" }
[[frontend.rule]]
del_response_header = "Server"
"#,
    );
    let c = load(&text).expect("valid");
    let rules = &c.frontends[0].rules;
    assert_eq!(rules.len(), 12);
    // The unconditional response rules: what the proxy's answers to unparsed requests get.
    assert_eq!(rules.always_response().len(), 3);
    assert!(c.frontends[0].rules.len() == 12 && load(&with_rules("")).is_ok());
}

#[test]
fn each_refusal_names_its_line() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "[[frontend.rule]]\nwhen = { host = \"a.example.com\" }\nuse_backend = \"nope\"",
            "use_backend",
            "unknown backend 'nope' in use_backend",
        ),
        (
            "[[frontend.rule]]\nwhen = { path_regex = \"(unclosed\" }\nuse_backend = \"api\"",
            "path_regex",
            "bad regex '(unclosed'",
        ),
        (
            "[[frontend.rule]]\nwhen = { header = { name = \"X-A\", regex = \"[z-a]\" } }\nuse_backend = \"api\"",
            "regex",
            "bad regex '[z-a]'",
        ),
        (
            "[[frontend.rule]]\nwhen = { src = [\"10.0.0.0/8\", \"10.0.0.0/33\"] }\ndeny = {}",
            "10.0.0.0/33",
            "bad src '10.0.0.0/33'",
        ),
        (
            "[[frontend.rule]]\nwhen = { src = \"fd00::/129\" }\ndeny = {}",
            "fd00",
            "bad src 'fd00::/129'",
        ),
        (
            "[[frontend.rule]]\nwhen = { path = \"/a\" }\nredirect = { location = \"https://x/\", status = 200 }",
            "redirect",
            "bad redirect status 200",
        ),
        (
            "[[frontend.rule]]\nwhen = { path = \"/a\" }\ndeny = { status = 302 }",
            "deny",
            "bad deny status 302",
        ),
        (
            "[[frontend.rule]]\nwhen = { path = \"/a\" }\nreturn = { status = 101 }",
            "return",
            "bad return status 101",
        ),
        (
            "[[frontend.rule]]\nset_header = { name = \"X Bad\", value = \"1\" }",
            "set_header",
            "bad header name 'X Bad'",
        ),
        (
            "[[frontend.rule]]\nadd_response_header = { name = \"X-Ok\", value = \"a\\nb\" }",
            "add_response_header",
            "bad header value",
        ),
        (
            "[[frontend.rule]]\ndel_response_header = \"Content-Length\"",
            "del_response_header",
            "header 'Content-Length' is the proxy's to write",
        ),
        (
            "[[frontend.rule]]\nwhen = { path = \"/a\" }",
            "[[frontend.rule]]",
            "a rule needs one action",
        ),
        (
            "[[frontend.rule]]\nwhen = { path = \"/a\" }\nuse_backend = \"api\"\ndeny = {}",
            "deny",
            "a rule has one action: use_backend and deny are both given",
        ),
        (
            "[[frontend.rule]]\nwhen = { host = \"api.example.com:8080\" }\nuse_backend = \"api\"",
            "host",
            "bad host pattern 'api.example.com:8080'",
        ),
        (
            "[[frontend.rule]]\nwhen = {}\nuse_backend = \"api\"",
            "when",
            "an empty condition",
        ),
        (
            "[[frontend.rule]]\nwhen = { any = [] }\nuse_backend = \"api\"",
            "when",
            "any needs at least one condition",
        ),
        (
            "[[frontend.rule]]\nwhen = { hots = \"a\" }\nuse_backend = \"api\"",
            "hots",
            "unknown field `hots`",
        ),
        (
            "[[frontend.rule]]\nredirect = { location = \"https://x/\", prefix = \"https://y\" }",
            "redirect",
            "a redirect has one of location, prefix or scheme",
        ),
        (
            "[[frontend.rule]]\nwhen = { path_prefix = \"api/\" }\nuse_backend = \"api\"",
            "path_prefix",
            "bad path_prefix 'api/'",
        ),
        (
            "[[frontend.rule]]\nwhen = { method = \"GE T\" }\nuse_backend = \"api\"",
            "method",
            "bad method 'GE T'",
        ),
        (
            "[[frontend.rule]]\nset_path = \"/a?b\"",
            "set_path",
            "bad set_path '/a?b'",
        ),
        (
            "[[frontend.rule]]\ndel_header = \"Host\"",
            "del_header",
            "header 'Host' is the proxy's to write",
        ),
    ];
    for (rules, at, why) in cases {
        let text = with_rules(rules);
        let e = load(&text).expect_err(rules);
        let line = line_of(&text, at);
        assert_eq!(e.at.map(|a| a.0), Some(line), "{rules}: {e}");
        assert!(e.reason.contains(why), "{rules}: {e}");
    }
}

#[test]
fn the_documented_example_loads_with_its_rules() {
    let c = load(include_str!("../../../examples/proxyd.toml")).expect("valid example");
    assert_eq!(c.frontends[0].rules.len(), 10);
    assert_eq!(c.frontends[0].rules.always_response().len(), 2);
}

#[test]
fn a_deny_says_its_status_by_default() {
    use crate::rules::{Decision, Request};
    struct Any;
    impl Request for Any {
        fn method(&self) -> &str {
            "GET"
        }
        fn target(&self) -> &str {
            "/"
        }
        fn host(&self) -> Option<&str> {
            None
        }
        fn any_field(&self, _: &str, _: &mut dyn FnMut(&[u8]) -> bool) -> bool {
            false
        }
        fn cookie(&self, _: &str) -> Option<&str> {
            None
        }
        fn src(&self) -> std::net::IpAddr {
            std::net::Ipv4Addr::LOCALHOST.into()
        }
        fn tls(&self) -> bool {
            false
        }
    }
    for (deny, body) in [
        ("{}", "403 forbidden\n"),
        ("{ status = 429 }", "429 too many requests\n"),
    ] {
        let c = load(&with_rules(&format!("[[frontend.rule]]\ndeny = {deny}"))).expect("valid");
        match c.frontends[0].rules.route(&Any).decision {
            Decision::Reply(r) => assert_eq!((&*r.body, r.denied), (body, true)),
            d => panic!("{d:?}"),
        }
    }
}

#[test]
fn a_tcp_frontend_takes_no_rules() {
    let text = with_rules("mode = \"tcp\"\n[[frontend.rule]]\nuse_backend = \"api\"");
    let e = load(&text).expect_err("tcp with rules");
    assert_eq!(e.at.map(|a| a.0), Some(line_of(&text, "[[frontend.rule]]")));
    assert!(e.reason.contains("rules need http"), "{e}");
}
