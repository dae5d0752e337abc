//! The config's unit tests: loading good files, and each error reported at its line.

use super::*;

const GOOD: &str = r#"
[global]
admin_socket = "/tmp/p/admin.sock"
fdkeeper_socket = "/tmp/f/fdkeeper.sock"
drain_timeout = "5s"

[[frontend]]
name = "www"
bind = ["127.0.0.1:8080"]
default_backend = "app"

[[backend]]
name = "app"
[[backend.server]]
name = "app1"
address = "127.0.0.1:9001"
[[backend.server]]
name = "app2"
address = "127.0.0.1:9002"
"#;

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_source(SourceFile::from_text("p.toml", text))
}

#[test]
fn good_config_gets_defaults() {
    let c = load(GOOD).expect("valid");
    assert_eq!(c.global.drain_timeout, StdDuration::from_secs(5));
    assert_eq!(c.global.max_draining, 4);
    assert_eq!(c.global.threads, 1);
    assert_eq!(c.frontends[0].default_backend, 0);
    assert_eq!(c.backends[0].servers.len(), 2);
    assert_eq!(c.backends[0].balance, Balance::Roundrobin);
}

fn err_line(text: &str) -> (usize, String) {
    let e = load(text).expect_err("must be refused");
    (e.at.map_or(0, |a| a.0), e.reason)
}

#[test]
fn unknown_backend_is_refused_at_its_line() {
    let (line, reason) =
        err_line(&GOOD.replace("default_backend = \"app\"", "default_backend = \"nope\""));
    assert_eq!(line, 10);
    assert!(reason.contains("nope"), "{reason}");
}

#[test]
fn duplicate_server_and_bad_address() {
    let (line, reason) = err_line(&GOOD.replace("name = \"app2\"", "name = \"app1\""));
    assert_eq!(line, 18);
    assert!(reason.contains("duplicate server"), "{reason}");
    let (line, reason) = err_line(&GOOD.replace("127.0.0.1:9002", "localhost"));
    assert_eq!(line, 19);
    assert!(reason.contains("bad server address"), "{reason}");
}

#[test]
fn a_zero_timeout_is_refused_at_its_line() {
    for key in ["timeout_server", "timeout_connect", "timeout_http_request"] {
        let text = format!("{GOOD}\n[defaults]\n{key} = \"0s\"\n");
        let (line, reason) = err_line(&text);
        let at = text.lines().position(|l| l.starts_with(key)).map(|i| i + 1);
        assert_eq!(Some(line), at, "{key}");
        assert!(
            reason.contains(key) && reason.contains("greater than 0"),
            "{reason}"
        );
    }
}

#[test]
fn unknown_key_and_missing_server() {
    let (line, reason) = err_line(&GOOD.replace("drain_timeout", "drain_timout"));
    assert_eq!(line, 5);
    assert!(reason.contains("drain_timout"), "{reason}");
    let text = GOOD.split("[[backend.server]]").next().unwrap_or_default();
    let (line, reason) = err_line(text);
    assert_eq!(line, 12);
    assert!(reason.contains("no server"), "{reason}");
}

#[test]
fn the_seed_translation_loads() {
    let text = include_str!("../../../examples/proxyd-seed.toml");
    let c = load(text).expect("the seed example is valid");
    let d = &c.defaults;
    assert_eq!(d.timeout_queue, StdDuration::from_secs(3));
    assert_eq!(d.timeout_server, StdDuration::from_secs(2));
    assert_eq!(c.frontends[0].maxconn, 18000);
    let b = &c.backends[0];
    assert!(b.redispatch);
    assert_eq!(b.retries, 3);
    let ff = b.forwardfor.as_ref().expect("forwardfor");
    let except = ff.except.expect("except");
    assert!(except.contains("127.0.0.2".parse().expect("ip")));
    assert!(!except.contains("10.0.0.1".parse().expect("ip")));
    assert_eq!(
        b.check.kind,
        CheckKind::Http {
            method: "GET".into(),
            path: "/index.php".into(),
            expect_status: 200
        }
    );
    let st = b.stick.as_ref().expect("stick");
    assert_eq!(st.table, "dynamic_group");
    assert_eq!(st.on, StickOn::Cookie("PHPSESSID".into()));
    assert_eq!(st.store_response.as_deref(), Some("PHPSESSID"));
    let s = &b.servers[0];
    assert!(s.check);
    assert_eq!((s.rise, s.fall, s.maxconn, s.weight), (1, 3, 3000, 1));
    assert_eq!(s.inter, StdDuration::from_secs(2));
}

#[test]
fn load_balancer_keys_are_validated_at_their_line() {
    let with = |extra: &str| {
        GOOD.replace(
            "[[backend.server]]\nname = \"app1\"",
            &format!("{extra}\n[[backend.server]]\nname = \"app1\""),
        )
    };
    let (line, reason) = err_line(&with("[backend.stick]\non = \"req.hdr(x)\""));
    assert_eq!(line, 15);
    assert!(reason.contains("req.hdr(x)"), "{reason}");
    let (line, reason) = err_line(&with("[backend.stick]\non = \"src\""));
    assert_eq!(line, 2);
    assert!(reason.contains("stickd_socket"), "{reason}");
    let (line, reason) = err_line(&with("[backend.check]\ntype = \"icmp\""));
    assert_eq!(line, 15);
    assert!(reason.contains("icmp"), "{reason}");
    let (line, reason) = err_line(&with("[backend.check]\nexpect_status = 700"));
    assert_eq!(line, 15);
    assert!(reason.contains("expect_status"), "{reason}");
    let (line, reason) = err_line(&GOOD.replace(
        "address = \"127.0.0.1:9001\"",
        "address = \"127.0.0.1:9001\"\nweight = 300",
    ));
    assert_eq!(line, 17);
    assert!(reason.contains("weight"), "{reason}");
    let (line, reason) = err_line(&GOOD.replace("drain_timeout = \"5s\"", "drain_timeout = \"5s\"\nstickd_socket = \"/s\"\n[defaults]\nforwardfor_except = \"10.0.0.0/40\""));
    assert_eq!(line, 8);
    assert!(reason.contains("forwardfor_except"), "{reason}");
    let tcp = GOOD
        .replace(
            "drain_timeout = \"5s\"",
            "drain_timeout = \"5s\"\nstickd_socket = \"/s\"",
        )
        .replace(
            "default_backend = \"app\"",
            "mode = \"tcp\"\ndefault_backend = \"app\"",
        );
    let (_, reason) = err_line(&format!("{}\n", with_stick(&tcp, "req.cook(S)")));
    assert!(reason.contains("tcp"), "{reason}");
    let ok = load(&with_stick(&tcp, "src")).expect("stick on src in tcp mode");
    assert_eq!(ok.frontends[0].mode, Mode::Tcp);
    assert_eq!(
        ok.backends[0].stick.as_ref().map(|s| s.table.as_str()),
        Some("app")
    );
}

/// GOOD with a second frontend `api` binding `api_bind`, and `www` binding `www_bind`.
fn two_frontends(www_bind: &str, api_bind: &str) -> String {
    GOOD.replace("\"127.0.0.1:8080\"", www_bind).replace(
        "[[backend]]",
        &format!(
            "[[frontend]]\nname = \"api\"\nbind = [{api_bind}]\ndefault_backend = \"app\"\n\n[[backend]]"
        ),
    )
}

#[test]
fn binds_are_compared_as_sockets_not_as_text() {
    // www's bind is at 9:9; api's is at 14:9.
    let refused = [
        (
            "\"127.0.0.1:23080\"",
            "\"127.0.0.1:023080\"",
            "is the same socket as",
        ),
        ("\"0.0.0.0:23080\"", "\"127.0.0.1:23080\"", "overlaps"),
        ("\"127.0.0.1:23080\"", "\"0.0.0.0:23080\"", "overlaps"),
        ("\"[::]:23080\"", "\"127.0.0.1:23080\"", "overlaps"),
        ("\"[::]:23080\"", "\"[::1]:23080\"", "overlaps"),
        (
            "\"[::ffff:127.0.0.1]:23080\"",
            "\"127.0.0.1:23080\"",
            "is the same socket as",
        ),
        ("\"[::1]:443\"", "\"[0::1]:0443\"", "is the same socket as"),
        // Port 0 is one kernel-chosen port per address in fdkeeper: shared, so refused.
        (
            "\"127.0.0.1:0\"",
            "\"127.0.0.1:00\"",
            "is the same socket as",
        ),
    ];
    for (www, api, why) in refused {
        let e = load(&two_frontends(www, api)).expect_err(&format!("{www} and {api}"));
        let text = e.to_string();
        assert!(text.starts_with("p.toml:14:9: "), "{www} {api}: {text}");
        assert!(text.contains(why), "{www} {api}: {text}");
        assert!(text.contains("frontend 'www' at p.toml:9:9"), "{text}");
        assert!(text.contains(&api.replace('"', "'")), "{text}");
    }
    // Within one frontend too: the socket would be accepted on twice.
    let e = load(&GOOD.replace(
        "\"127.0.0.1:8080\"",
        "\"127.0.0.1:8080\", \"127.0.0.1:08080\"",
    ))
    .expect_err("one frontend, one socket twice");
    assert!(e.to_string().starts_with("p.toml:9:27: "), "{e}");
    assert!(
        e.reason.contains(
            "frontend 'www' is the same socket as '127.0.0.1:8080' of frontend 'www' at p.toml:9:9"
        ),
        "{e}"
    );

    let fine = [
        ("\"127.0.0.1:23080\"", "\"127.0.0.2:23080\""),
        ("\"127.0.0.1:23080\"", "\"127.0.0.1:23081\""),
        ("\"[::1]:23080\"", "\"127.0.0.1:23080\""),
        ("\"0.0.0.0:23080\"", "\"[::1]:23080\""),
        ("\"127.0.0.1:0\"", "\"0.0.0.0:0\""),
    ];
    for (www, api) in fine {
        let c = load(&two_frontends(www, api)).unwrap_or_else(|e| panic!("{www} {api}: {e}"));
        assert_eq!(c.frontends.len(), 2);
    }
    // A bind holds the canonical address, not the text: it is what fdkeeper is asked for.
    let c = load(&two_frontends("\"127.0.0.1:023080\"", "\"[0::1]:0443\"")).expect("valid");
    let addresses: Vec<String> = c.binds().map(|(_, b)| b.address.to_string()).collect();
    assert_eq!(addresses, ["127.0.0.1:23080", "[::1]:443"]);
}

#[test]
fn the_metrics_listener_must_not_overlap_a_frontend() {
    let with_metrics = |m: &str, bind: &str| {
        GOOD.replace(
            "drain_timeout = \"5s\"",
            &format!("drain_timeout = \"5s\"\nmetrics = \"{m}\""),
        )
        .replace("127.0.0.1:8080", bind)
    };
    let e = load(&with_metrics("0.0.0.0:9100", "127.0.0.1:09100")).expect_err("overlap");
    assert!(e.to_string().starts_with("p.toml:10:9: "), "{e}");
    assert!(
        e.reason
            .contains("overlaps '0.0.0.0:9100' of [global] metrics at p.toml:6:11"),
        "{e}"
    );
    load(&with_metrics("127.0.0.1:0", "127.0.0.1:0")).expect("metrics on port 0 gets its own port");
    load(&with_metrics("127.0.0.1:9100", "127.0.0.1:8080")).expect("distinct ports");
}

fn with_stick(text: &str, on: &str) -> String {
    text.replace(
        "[[backend.server]]\nname = \"app1\"",
        &format!("[backend.stick]\non = \"{on}\"\n[[backend.server]]\nname = \"app1\""),
    )
}

#[test]
fn one_path_for_two_sockets_is_refused_at_the_second() {
    let (line, reason) = err_line(&GOOD.replace(
        "fdkeeper_socket = \"/tmp/f/fdkeeper.sock\"",
        "fdkeeper_socket = \"/tmp/p//admin.sock\"",
    ));
    assert_eq!(line, 4);
    assert!(
        reason.contains("fdkeeper_socket is the same path as admin_socket"),
        "{reason}"
    );
    let (line, reason) = err_line(&GOOD.replace(
        "drain_timeout = \"5s\"",
        "stickd_socket = \"/tmp/f/fdkeeper.sock\"",
    ));
    assert_eq!(line, 5);
    assert!(
        reason.contains("stickd_socket is the same path as fdkeeper_socket"),
        "{reason}"
    );
}

#[test]
fn access_log_and_pool_keys() {
    use access_log::{AccessLog, LogFormat, LogTarget, Syslog, SyslogFormat};
    let c = load(GOOD).expect("valid");
    assert_eq!(
        c.global.access_log,
        AccessLog {
            to: LogTarget::Stderr,
            format: LogFormat::Httplog
        }
    );
    assert_eq!(c.defaults.pool_max_idle, 1024);
    assert_eq!(c.defaults.pool_purge_delay, StdDuration::from_secs(5));
    let global = |extra: &str| {
        GOOD.replace(
            "drain_timeout = \"5s\"",
            &format!("drain_timeout = \"5s\"\n{extra}"),
        )
    };
    let c = load(&global(
        "access_log = \"syslog\"\naccess_log_format = \"json\"\nsyslog_format = \"rfc5424\"\nsyslog_facility = \"local3\"",
    ))
    .expect("valid");
    assert_eq!(
        c.global.access_log,
        AccessLog {
            to: LogTarget::Syslog(Syslog {
                socket: "/dev/log".into(),
                format: SyslogFormat::Rfc5424,
                facility: 19
            }),
            format: LogFormat::Json
        }
    );
    // A syslog key that would do nothing is refused at its line and column.
    let e = load(&global(
        "access_log_format = \"json\"\n  syslog_format = \"rfc3164\"",
    ))
    .expect_err("refused");
    assert_eq!(e.at, Some((7, 19)), "at the value");
    assert!(
        e.reason.contains("access_log is not \"syslog\""),
        "{}",
        e.reason
    );
    let (line, reason) = err_line(&global("access_log_format = \"xml\""));
    assert_eq!(line, 6);
    assert!(reason.contains("xml"), "{reason}");
    let (line, reason) = err_line(&global(
        "access_log = \"syslog\"\nsyslog_socket = \"dev/log\"",
    ));
    assert_eq!(line, 7);
    assert!(reason.contains("absolute"), "{reason}");
    let (line, reason) = err_line(&GOOD.replace(
        "[[frontend]]",
        "[defaults]\npool_purge_delay = \"0s\"\n\n[[frontend]]",
    ));
    assert_eq!(line, 8);
    assert!(reason.contains("pool_purge_delay"), "{reason}");
}
