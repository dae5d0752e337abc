//! Validation of the backend settings beside the servers and checks: the balance algorithm,
//! the persistence cookie, server addresses written as DNS names and the `[[resolvers]]`
//! they are resolved through.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration as StdDuration;

use common::config::Spanned;
use common::{ConfigError, Duration, SourceFile};

use super::raw::{RawBalance, RawCheck, RawCookie, RawResolvers, Shorthand};
use super::{Address, Balance, Check, CheckKind, Cookie, Resolvers, UriHash};

/// Shortest `resolve_interval`: below it a slow nameserver would have queries pile up.
const MIN_RESOLVE_INTERVAL: StdDuration = StdDuration::from_millis(100);
/// Default `resolve_interval` (HAProxy re-resolves every second with `resolvers`; a name that
/// moves seldom needs far less).
pub(super) const DEFAULT_RESOLVE_INTERVAL: StdDuration = StdDuration::from_secs(10);
/// Default wait for one nameserver's answer.
const DEFAULT_RESOLVER_TIMEOUT: StdDuration = StdDuration::from_secs(1);
/// Longest directory depth `balance = { type = "uri", depth = N }` takes.
const MAX_URI_DEPTH: u32 = 64;

/// `balance`: a word, `hdr(NAME)`, or a table with the algorithm's options.
pub(super) fn balance(
    src: &SourceFile,
    b: Option<Spanned<Shorthand<RawBalance>>>,
) -> Result<Balance, ConfigError> {
    let Some(b) = b else {
        return Ok(Balance::Roundrobin);
    };
    let span = b.span();
    let raw = match b.into_inner() {
        Shorthand::Text(t) => RawBalance {
            kind: Spanned::new(span.clone(), t),
            whole: None,
            depth: None,
            name: None,
        },
        Shorthand::Table(t) => t,
    };
    let kind = raw.kind.get_ref().trim();
    // `hdr(NAME)` in a word is the table's `{ type = "hdr", name = "NAME" }`.
    let in_word = kind
        .strip_prefix("hdr(")
        .and_then(|k| k.strip_suffix(')'))
        .map(str::trim);
    let (kind, name) = match in_word {
        Some(n) if raw.name.is_none() => ("hdr", Some(Spanned::new(raw.kind.span(), n.to_owned()))),
        _ => (kind, raw.name),
    };
    let no_option = |what: &str, opt: Option<std::ops::Range<usize>>| match opt {
        Some(at) => Err(src.error_at(at, format!("balance {what} takes no such option"))),
        None => Ok(()),
    };
    let whole_at = raw.whole.as_ref().map(Spanned::span);
    let depth_at = raw.depth.as_ref().map(Spanned::span);
    let name_at = name.as_ref().map(Spanned::span);
    let plain = |b: Balance| {
        no_option(kind, whole_at.clone())?;
        no_option(kind, depth_at.clone())?;
        no_option(kind, name_at.clone())?;
        Ok(b)
    };
    match kind {
        "roundrobin" => plain(Balance::Roundrobin),
        "leastconn" => plain(Balance::Leastconn),
        "source" => plain(Balance::Source),
        "random" => plain(Balance::Random),
        "uri" => {
            no_option("uri", name_at)?;
            let depth = match raw.depth {
                None => 0,
                Some(d) if (1..=MAX_URI_DEPTH).contains(d.get_ref()) => *d.get_ref(),
                Some(d) => {
                    return Err(src.error_at(
                        d.span(),
                        format!("uri depth must be between 1 and {MAX_URI_DEPTH}"),
                    ));
                }
            };
            Ok(Balance::Uri(UriHash {
                whole: raw.whole.is_some_and(|w| *w.get_ref()),
                depth,
            }))
        }
        "hdr" => {
            no_option("hdr", whole_at)?;
            no_option("hdr", depth_at)?;
            let Some(name) = name else {
                return Err(src.error_at(
                    raw.kind.span(),
                    "balance hdr needs the field's name: \"hdr(NAME)\" or { type = \"hdr\", name = \"NAME\" }",
                ));
            };
            if !is_token(name.get_ref()) {
                return Err(src.error_at(
                    name.span(),
                    format!("bad header name '{}' for balance hdr", name.get_ref()),
                ));
            }
            Ok(Balance::Hdr(name.into_inner()))
        }
        other => Err(src.error_at(
            raw.kind.span(),
            format!(
                "unknown balance '{other}' (roundrobin, leastconn, source, random, uri or hdr(NAME))"
            ),
        )),
    }
}

/// A backend's checks: what one does, and the backend's own `inter`, `rise` and `fall` (its
/// servers' defaults, checked with the servers' own).
type CheckParts = (
    Check,
    Option<Spanned<Duration>>,
    Option<Spanned<u32>>,
    Option<Spanned<u32>>,
);

/// The backend's `check` table.
pub(super) fn check(
    src: &SourceFile,
    raw: Option<Spanned<RawCheck>>,
    name: &str,
) -> Result<CheckParts, ConfigError> {
    let check_span = raw.as_ref().map(Spanned::span);
    Ok(match raw {
        None => (
            Check {
                kind: CheckKind::Tcp,
                host: None,
            },
            None,
            None,
            None,
        ),
        Some(c) => {
            let c = c.into_inner();
            let kind = match c.kind.as_ref().map(|k| k.get_ref().as_str()) {
                None | Some("tcp")
                    if c.path.is_none()
                        && c.method.is_none()
                        && c.expect_status.is_none()
                        && c.host.is_none() =>
                {
                    CheckKind::Tcp
                }
                None | Some("http") => {
                    let method = c
                        .method
                        .map_or_else(|| "GET".to_owned(), Spanned::into_inner);
                    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
                        return Err(src.error_at(
                            check_span.clone().unwrap_or_default(),
                            format!("bad check method '{method}' in backend '{name}'"),
                        ));
                    }
                    let path = match c.path {
                        None => "/".to_owned(),
                        Some(p)
                            if p.get_ref().starts_with('/')
                                && !p
                                    .get_ref()
                                    .bytes()
                                    .any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) =>
                        {
                            p.into_inner()
                        }
                        Some(p) => {
                            return Err(src.error_at(
                                p.span(),
                                format!(
                                    "bad check path '{}' (must start with '/', no spaces)",
                                    p.get_ref()
                                ),
                            ));
                        }
                    };
                    let expect_status = match c.expect_status {
                        None => 200,
                        Some(s) if (100..=599).contains(s.get_ref()) => *s.get_ref(),
                        Some(s) => {
                            return Err(
                                src.error_at(s.span(), "expect_status must be between 100 and 599")
                            );
                        }
                    };
                    CheckKind::Http {
                        method,
                        path,
                        expect_status,
                    }
                }
                Some("tcp") => {
                    return Err(src.error_at(
                        check_span.clone().unwrap_or_default(),
                        "a tcp check takes no method, path, expect_status or host",
                    ));
                }
                Some(other) => {
                    let span = c.kind.as_ref().map(Spanned::span).unwrap_or_default();
                    return Err(
                        src.error_at(span, format!("unknown check type '{other}' (tcp or http)"))
                    );
                }
            };
            let host = match c.host {
                None => None,
                Some(h)
                    if !h.get_ref().is_empty()
                        && h.get_ref()
                            .bytes()
                            .all(|b| b.is_ascii_graphic() && !b"\"\\/?#@".contains(&b)) =>
                {
                    Some(h.into_inner())
                }
                Some(h) => {
                    return Err(src.error_at(
                        h.span(),
                        format!("bad check host '{}' (a host[:port])", h.get_ref()),
                    ));
                }
            };
            (Check { kind, host }, c.inter, c.rise, c.fall)
        }
    })
}

/// `cookie = { name = "SRV", insert = true, ... }`.
pub(super) fn cookie(src: &SourceFile, c: Spanned<RawCookie>) -> Result<Cookie, ConfigError> {
    let c = c.into_inner();
    if !is_token(c.name.get_ref()) {
        return Err(src.error_at(
            c.name.span(),
            format!(
                "bad cookie name '{}' (letters, digits and !#$%&'*+-.^_`|~)",
                c.name.get_ref()
            ),
        ));
    }
    let insert = c.insert.unwrap_or(true);
    let path = match c.path {
        None => "/".to_owned(),
        Some(p) if p.get_ref().starts_with('/') && is_attribute_value(p.get_ref()) => {
            p.into_inner()
        }
        Some(p) => {
            return Err(src.error_at(
                p.span(),
                format!(
                    "bad cookie path '{}' (starts with '/', no ';' or control characters)",
                    p.get_ref()
                ),
            ));
        }
    };
    let mut attributes = format!("; Path={path}");
    if let Some(d) = c.domain {
        let ok = !d.get_ref().is_empty()
            && d.get_ref()
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !ok {
            return Err(src.error_at(d.span(), format!("bad cookie domain '{}'", d.get_ref())));
        }
        attributes.push_str("; Domain=");
        attributes.push_str(d.get_ref());
    }
    if let Some(m) = c.max_age {
        if m.get_ref().0 < StdDuration::from_secs(1) {
            return Err(src.error_at(m.span(), "cookie max_age must be at least 1s"));
        }
        attributes.push_str(&format!("; Max-Age={}", m.get_ref().0.as_secs()));
    }
    if c.httponly.unwrap_or(false) {
        attributes.push_str("; HttpOnly");
    }
    if c.secure.unwrap_or(false) {
        attributes.push_str("; Secure");
    }
    Ok(Cookie {
        name: c.name.into_inner(),
        insert,
        indirect: c.indirect.unwrap_or(false),
        nocache: c.nocache.unwrap_or(false),
        attributes,
    })
}

/// A server's cookie value: what a `Cookie` field carries unquoted.
pub(super) fn server_cookie(
    src: &SourceFile,
    given: Option<Spanned<String>>,
    server: &str,
) -> Result<String, ConfigError> {
    match given {
        None => Ok(server.to_owned()),
        Some(v)
            if !v.get_ref().is_empty()
                && v.get_ref().len() <= 64
                && v.get_ref()
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b"\",;\\".contains(&b)) =>
        {
            Ok(v.into_inner())
        }
        Some(v) => Err(src.error_at(
            v.span(),
            format!(
                "bad server cookie '{}' (1-64 printable characters without '\"', ',', ';' or '\\\\')",
                v.get_ref()
            ),
        )),
    }
}

/// `ip:port`, `[ipv6]:port`, or `name:port` for a server resolved by DNS.
pub(super) fn server_address(
    src: &SourceFile,
    a: &Spanned<String>,
) -> Result<Address, ConfigError> {
    let text = a.get_ref();
    let bad = || {
        src.error_at(
            a.span(),
            format!("bad server address '{text}' (expected ip:port or name:port)"),
        )
    };
    let address = match text.parse::<SocketAddr>() {
        Ok(ip) => Address::Ip(ip),
        Err(_) => {
            let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
            let port: u16 = port.parse().map_err(|_| bad())?;
            if !is_dns_name(host) {
                return Err(bad());
            }
            Address::Name {
                host: host.to_ascii_lowercase(),
                port,
                span: a.span(),
            }
        }
    };
    let port = match &address {
        Address::Ip(ip) => ip.port(),
        Address::Name { port, .. } => *port,
    };
    if port == 0 {
        return Err(src.error_at(a.span(), "server port must not be 0"));
    }
    Ok(address)
}

/// Every `[[resolvers]]`, by name.
pub(super) fn resolvers(
    src: &SourceFile,
    raw: Vec<Spanned<RawResolvers>>,
) -> Result<(Vec<Resolvers>, HashMap<String, usize>), ConfigError> {
    let mut all = Vec::with_capacity(raw.len());
    let mut names = HashMap::new();
    for r in raw {
        let r = r.into_inner();
        let name = super::validate::checked_name(src, &r.name, "resolvers")?;
        if names.insert(name.clone(), all.len()).is_some() {
            return Err(src.error_at(r.name.span(), format!("duplicate resolvers name '{name}'")));
        }
        if r.nameservers.get_ref().is_empty() {
            return Err(src.error_at(
                r.nameservers.span(),
                format!("resolvers '{name}' has no nameserver"),
            ));
        }
        let nameservers = r
            .nameservers
            .get_ref()
            .iter()
            .map(|n| {
                n.get_ref().parse::<SocketAddr>().map_err(|_| {
                    src.error_at(
                        n.span(),
                        format!("bad nameserver '{}' (expected ip:port)", n.get_ref()),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let timeout = match r.timeout {
            None => DEFAULT_RESOLVER_TIMEOUT,
            Some(t) if t.get_ref().0 >= StdDuration::from_millis(10) => t.get_ref().0,
            Some(t) => {
                return Err(src.error_at(t.span(), "resolvers timeout must be at least 10ms"));
            }
        };
        all.push(Resolvers {
            name,
            nameservers,
            timeout,
        });
    }
    Ok((all, names))
}

/// A backend's `resolvers = "NAME"`, as an index.
pub(super) fn resolvers_ref(
    src: &SourceFile,
    r: Option<Spanned<String>>,
    names: &HashMap<String, usize>,
) -> Result<Option<usize>, ConfigError> {
    match r {
        None => Ok(None),
        Some(r) => match names.get(r.get_ref()) {
            Some(&i) => Ok(Some(i)),
            None => Err(src.error_at(r.span(), format!("unknown resolvers '{}'", r.get_ref()))),
        },
    }
}

/// `resolve_interval`, global or a backend's.
pub(super) fn resolve_interval(
    src: &SourceFile,
    d: Option<Spanned<Duration>>,
    default: StdDuration,
) -> Result<StdDuration, ConfigError> {
    match d {
        None => Ok(default),
        Some(d) if d.get_ref().0 >= MIN_RESOLVE_INTERVAL => Ok(d.get_ref().0),
        Some(d) => Err(src.error_at(d.span(), "resolve_interval must be at least 100ms")),
    }
}

/// An HTTP field name or cookie name (RFC 9110's token).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A cookie attribute's value (RFC 6265 §4.1.1: no control character and no ';').
fn is_attribute_value(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b';')
}

/// A host name as DNS writes it: dot-separated labels of letters, digits and '-', not
/// starting or ending with '-'; not all digits (that would be a mistyped address).
fn is_dns_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        && !s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    /// A config whose one backend gets `backend` after its name, and whose servers get
    /// `server1` / `server2` after their addresses.
    fn config(top: &str, backend: &str, server1: &str, server2: &str) -> String {
        format!(
            r#"[global]
admin_socket = "/tmp/p/admin.sock"
fdkeeper_socket = "/tmp/f/fdkeeper.sock"
stickd_socket = "/tmp/s/stickd.sock"
{top}
[[frontend]]
name = "www"
bind = ["127.0.0.1:8080"]
default_backend = "app"

[[backend]]
name = "app"
{backend}
[[backend.server]]
name = "app1"
address = "127.0.0.1:9001"
{server1}
[[backend.server]]
name = "app2"
address = "127.0.0.1:9002"
{server2}
"#
        )
    }

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_source(SourceFile::from_text("p.toml", text))
    }

    /// The line and reason of the error, and the line where `needle` is written.
    fn refused_at(text: &str, needle: &str) -> String {
        let e = load(text).expect_err("refused").to_string();
        let line = text
            .lines()
            .position(|l| l.contains(needle))
            .map(|i| i + 1)
            .expect("needle in text");
        assert!(
            e.starts_with(&format!("p.toml:{line}:")),
            "{e} (expected line {line})"
        );
        e
    }

    #[test]
    fn every_balance_and_its_options() {
        let b = |v: &str| {
            load(&config("", &format!("balance = {v}"), "", ""))
                .map(|c| c.backends[0].balance.clone())
        };
        assert_eq!(b("\"random\"").ok(), Some(Balance::Random));
        assert_eq!(b("\"source\"").ok(), Some(Balance::Source));
        assert_eq!(b("\"uri\"").ok(), Some(Balance::Uri(UriHash::default())));
        assert_eq!(
            b("{ type = \"uri\", whole = true, depth = 2 }").ok(),
            Some(Balance::Uri(UriHash {
                whole: true,
                depth: 2
            }))
        );
        assert_eq!(
            b("\"hdr(X-User)\"").ok(),
            Some(Balance::Hdr("X-User".into()))
        );
        assert_eq!(
            b("{ type = \"hdr\", name = \"X-User\" }").ok(),
            Some(Balance::Hdr("X-User".into()))
        );
        assert_eq!(
            load(&config("", "", "", ""))
                .map(|c| c.backends[0].balance.clone())
                .ok(),
            Some(Balance::Roundrobin)
        );
        for (bad, why) in [
            ("\"fastest\"", "unknown balance 'fastest'"),
            ("{ type = \"uri\", depth = 0 }", "depth"),
            ("{ type = \"uri\", name = \"x\" }", "no such option"),
            ("{ type = \"random\", whole = true }", "no such option"),
            ("\"hdr\"", "needs the field's name"),
            ("\"hdr(a b)\"", "bad header name"),
            ("{ type = \"uri\", deep = 1 }", "unknown field"),
        ] {
            let e = refused_at(&config("", &format!("balance = {bad}"), "", ""), "balance");
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn the_cookie_and_each_servers_value() {
        let c = load(&config(
            "",
            "cookie = { name = \"SRV\", indirect = true, nocache = true, httponly = true, secure = true, max_age = \"1h\", domain = \"example.com\" }",
            "cookie = \"a1\"",
            "",
        ))
        .expect("valid");
        let cookie = c.backends[0].cookie.clone().expect("a cookie");
        assert!(cookie.insert && cookie.indirect && cookie.nocache);
        assert_eq!(
            cookie.attributes,
            "; Path=/; Domain=example.com; Max-Age=3600; HttpOnly; Secure"
        );
        let values: Vec<&str> = c.backends[0]
            .servers
            .iter()
            .map(|s| s.cookie.as_str())
            .collect();
        assert_eq!(values, ["a1", "app2"], "the default is the server's name");
        assert!(c.warnings.is_empty());

        let e = refused_at(
            &config("", "cookie = { name = \"S;R\" }", "", ""),
            "cookie =",
        );
        assert!(e.contains("bad cookie name"), "{e}");
        let e = refused_at(
            &config("", "cookie = { name = \"S\", max_age = \"0s\" }", "", ""),
            "cookie =",
        );
        assert!(e.contains("max_age"), "{e}");
        let e = refused_at(
            &config("", "cookie = { name = \"S\", path = \"x\" }", "", ""),
            "cookie =",
        );
        assert!(e.contains("cookie path"), "{e}");
        let e = refused_at(
            &config("", "cookie = { name = \"S\" }", "", "cookie = \"app1\""),
            "cookie = \"app1\"",
        );
        assert!(e.contains("already server 'app1'"), "{e}");
        let e = refused_at(&config("", "", "cookie = \"a;b\"", ""), "cookie = \"a;b\"");
        assert!(e.contains("bad server cookie"), "{e}");

        // Beside a stick rule: valid, with a warning at the cookie.
        let both = config(
            "",
            "cookie = { name = \"SRV\" }\nstick = { on = \"src\" }",
            "",
            "",
        );
        let c = load(&both).expect("valid");
        assert_eq!(c.warnings.len(), 1);
        let w = c.warnings[0].to_string();
        let line = both
            .lines()
            .position(|l| l.starts_with("cookie"))
            .map(|i| i + 1);
        assert!(
            w.starts_with(&format!("p.toml:{}:", line.unwrap_or(0))),
            "{w}"
        );
        assert!(w.contains("a valid cookie wins"), "{w}");

        // A tcp frontend has no cookie to read, nor a path or field to hash.
        for http in [
            "cookie = { name = \"SRV\" }",
            "balance = \"uri\"",
            "balance = \"hdr(X)\"",
        ] {
            let tcp = config("", http, "", "").replace(
                "default_backend = \"app\"",
                "mode = \"tcp\"\ndefault_backend = \"app\"",
            );
            let e = refused_at(&tcp, "default_backend");
            assert!(e.contains("needs http"), "{http}: {e}");
        }
    }

    #[test]
    fn server_names_resolvers_and_intervals() {
        let text = config(
            "resolve_interval = \"30s\"\n[[resolvers]]\nname = \"dns\"\nnameservers = [\"127.0.0.1:5353\"]\ntimeout = \"200ms\"",
            "resolvers = \"dns\"",
            "",
            "",
        )
        .replace("127.0.0.1:9002", "App.Internal:8080");
        let c = load(&text).expect("valid");
        assert_eq!(c.global.resolve_interval, StdDuration::from_secs(30));
        let b = &c.backends[0];
        assert_eq!(b.resolvers, Some(0));
        assert_eq!(b.resolve_interval, StdDuration::from_secs(30));
        assert_eq!(
            c.resolvers[0].nameservers,
            ["127.0.0.1:5353".parse::<SocketAddr>().expect("addr")]
        );
        assert_eq!(c.resolvers[0].timeout, StdDuration::from_millis(200));
        assert!(
            matches!(&b.servers[1].address, Address::Name { host, port: 8080, .. } if host == "app.internal")
        );
        assert_eq!(b.servers[1].address.to_string(), "app.internal:8080");
        let c = load(&config("", "resolve_interval = \"2s\"", "", "")).expect("valid");
        assert_eq!(c.global.resolve_interval, DEFAULT_RESOLVE_INTERVAL);
        assert_eq!(c.backends[0].resolve_interval, StdDuration::from_secs(2));

        for (addr, why) in [
            ("app.internal", "expected ip:port or name:port"),
            ("app_1:80", "expected ip:port or name:port"),
            ("10.0.0.300:80", "expected ip:port or name:port"),
            ("app:0", "port must not be 0"),
            ("app:70000", "expected ip:port or name:port"),
        ] {
            let e = refused_at(
                &config("", "", "", "").replace("127.0.0.1:9002", addr),
                addr,
            );
            assert!(e.contains(why), "{addr}: {e}");
        }
        let e = refused_at(&config("", "resolvers = \"nope\"", "", ""), "resolvers =");
        assert!(e.contains("unknown resolvers 'nope'"), "{e}");
        let e = refused_at(
            &config("", "resolve_interval = \"10ms\"", "", ""),
            "resolve_interval",
        );
        assert!(e.contains("at least 100ms"), "{e}");
        let bad_ns = "[[resolvers]]\nname = \"dns\"\nnameservers = [\"ns1:53\"]";
        let e = refused_at(&config(bad_ns, "", "", ""), "nameservers");
        assert!(e.contains("bad nameserver 'ns1:53'"), "{e}");
        let none = "[[resolvers]]\nname = \"dns\"\nnameservers = []";
        let e = refused_at(&config(none, "", "", ""), "nameservers");
        assert!(e.contains("no nameserver"), "{e}");
    }

    #[test]
    fn a_check_host_needs_an_http_check() {
        let c = load(&config(
            "",
            "check = { type = \"http\", host = \"app.example.com\" }",
            "",
            "",
        ))
        .expect("valid");
        assert_eq!(c.backends[0].check.host.as_deref(), Some("app.example.com"));
        assert!(matches!(c.backends[0].check.kind, CheckKind::Http { .. }));
        let e = refused_at(
            &config("", "check = { type = \"tcp\", host = \"a\" }", "", ""),
            "check =",
        );
        assert!(e.contains("a tcp check takes no"), "{e}");
        let e = refused_at(&config("", "check = { host = \"a b\" }", "", ""), "check =");
        assert!(e.contains("bad check host"), "{e}");
    }

    #[test]
    fn dns_names() {
        for ok in ["localhost", "app-1.internal", "a.b.c.example.com.", "x1"] {
            assert!(is_dns_name(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "a..b", "10.0.0.300", "a_b", "a b", "[::1]"] {
            assert!(!is_dns_name(bad), "{bad}");
        }
    }
}
