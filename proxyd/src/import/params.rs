//! The words after a directive: `server` and `bind` parameters, stick fetches, timeouts,
//! balance and cookie, read as HAProxy reads them.

use std::path::Path;

use common::Duration;

use super::catalog::Topic;
use super::lexer::Line;
use super::proxies::{At, Balance, ServerDef, Settings, TIMEOUTS};
use super::report::Report;

/// `bind` parameters that take a value (so the value is not read as a parameter).
pub const BIND_VALUE_PARAMS: &[&str] = &[
    "crt-list",
    "npn",
    "ssl-max-ver",
    "ciphers",
    "ciphersuites",
    "curves",
    "ecdhe",
    "ca-file",
    "crl-file",
    "verify",
    "maxconn",
    "name",
    "id",
    "process",
    "thread",
    "interface",
    "mss",
    "mode",
    "uid",
    "gid",
    "user",
    "group",
    "level",
    "severity-output",
    "nice",
    "namespace",
    "tcp-ut",
    "sigalgs",
    "client-sigalgs",
    "ca-verify-file",
    "ca-ignore-err",
    "crt-ignore-err",
    "ocsp-update",
    "proto",
    "quic-cc-algo",
    "shards",
    "label",
    "guid-prefix",
];

/// `server` parameters that take a value.
const SERVER_VALUE_PARAMS: &[&str] = &[
    "port",
    "addr",
    "cookie",
    "id",
    "slowstart",
    "maxqueue",
    "minconn",
    "on-error",
    "on-marked-down",
    "on-marked-up",
    "observe",
    "error-limit",
    "agent-port",
    "agent-inter",
    "agent-addr",
    "agent-send",
    "sni",
    "verify",
    "ca-file",
    "crl-file",
    "crt",
    "ciphers",
    "ciphersuites",
    "proto",
    "resolve-net",
    "init-addr",
    "track",
    "redir",
    "source",
    "namespace",
    "pool-max-conn",
    "pool-low-conn",
    "max-reuse",
    "alpn",
    "check-alpn",
    "check-proto",
    "check-sni",
    "shard",
    "log-proto",
    "usesrc",
    "ssl-min-ver",
    "ssl-max-ver",
    "curves",
    "sigalgs",
    "hash-key",
    "fastinter",
    "downinter",
    "set-proxy-v2-tlv-fmt",
    "guid",
    "verifyhost",
];

#[derive(PartialEq, Eq)]
pub enum Param {
    Flag,
    WithValue,
    /// The server cannot be translated (backup, disabled).
    LeftOut,
}

pub fn server_param(
    srv: &mut ServerDef,
    word: &str,
    value: &str,
    line: &Line,
    report: &mut Report,
) -> Param {
    let num = |report: &mut Report, max: u32, min: u32| match value.parse::<u32>() {
        Ok(n) if (min..=max).contains(&n) => Some(n),
        _ => {
            report.add(line, Topic::ServerParam, Some(format!("{word} {value}")));
            None
        }
    };
    match word {
        "check" => srv.check = true,
        "no-check" => srv.check = false,
        "weight" => {
            srv.weight = num(report, 256, 0);
            return Param::WithValue;
        }
        "maxconn" => {
            srv.maxconn = num(report, u32::MAX, 0);
            return Param::WithValue;
        }
        "rise" => {
            srv.rise = num(report, 100, 1);
            return Param::WithValue;
        }
        "fall" => {
            srv.fall = num(report, 100, 1);
            return Param::WithValue;
        }
        "inter" => {
            match value.parse::<Duration>() {
                Ok(d) if d.0 >= std::time::Duration::from_millis(10) => srv.inter = Some(d),
                _ => report.add(line, Topic::ServerParam, Some(format!("inter {value}"))),
            }
            return Param::WithValue;
        }
        "backup" => {
            report.add(line, Topic::ServerBackup, None);
            return Param::LeftOut;
        }
        "disabled" => {
            report.add(line, Topic::ServerDisabled, None);
            return Param::LeftOut;
        }
        "enabled" => {}
        "ssl" | "check-ssl" => report.add(line, Topic::ServerSsl, None),
        "cookie" => {
            srv.cookie = Some(value.to_owned());
            return Param::WithValue;
        }
        "resolvers" => {
            srv.resolvers = Some(value.to_owned());
            return Param::WithValue;
        }
        "resolve-prefer" => {
            srv.resolve_prefer = Some(value.to_owned());
            return Param::WithValue;
        }
        "pool-purge-delay" => {
            match value.parse::<Duration>() {
                Ok(d) if !d.0.is_zero() => {
                    srv.pool_purge_delay = Some(At {
                        value: d,
                        line: line.no,
                    })
                }
                _ => report.add(line, Topic::ServerParam, Some(format!("{word} {value}"))),
            }
            return Param::WithValue;
        }
        p if SERVER_VALUE_PARAMS.contains(&p) => {
            report.add(line, Topic::ServerParam, Some(format!("{p} {value}")));
            return Param::WithValue;
        }
        p => report.add(line, Topic::ServerParam, Some(p.to_owned())),
    }
    Param::Flag
}

pub fn timeout(s: &mut Settings, line: &Line, which: &str, value: &str, report: &mut Report) {
    let Some(&(_, key)) = TIMEOUTS.iter().find(|(h, _)| *h == which) else {
        report.add(line, Topic::TimeoutOther, Some(format!("timeout {which}")));
        return;
    };
    match value.parse::<Duration>() {
        Ok(d) if d.0.is_zero() => report.add(line, Topic::TimeoutZero, None),
        Ok(d) => {
            s.timeouts.insert(
                key,
                At {
                    value: d,
                    line: line.no,
                },
            );
        }
        Err(e) => report.add(line, Topic::Unknown, Some(e.to_string())),
    }
}

/// `balance ALGORITHM [PARAMS]` as proxyd's `balance`; what proxyd lacks is reported and
/// balanced round robin.
pub fn balance(args: &[String], line: &Line, report: &mut Report) -> Balance {
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut approximate = |detail: String| report.add(line, Topic::BalanceOther, Some(detail));
    match words.as_slice() {
        [b @ ("roundrobin" | "leastconn" | "source")] => Balance::plain(b),
        // HAProxy draws two servers by default, as proxyd always does.
        ["random"] | ["random", "2"] | ["random", "draws", "2"] => Balance::plain("random"),
        ["random", rest @ ..] => {
            approximate(format!("random {}: proxyd draws 2", rest.join(" ")));
            Balance::plain("random")
        }
        ["uri", rest @ ..] => {
            let (mut whole, mut depth) = (false, None);
            let mut i = 0;
            while i < rest.len() {
                match (rest[i], rest.get(i + 1).map(|d| d.parse::<u32>())) {
                    ("whole", _) => whole = true,
                    // proxyd hashes the path: what HAProxy's path-only takes too.
                    ("path-only", _) => {}
                    ("depth", Some(Ok(d))) => {
                        depth = Some(d);
                        i += 1;
                    }
                    ("len", Some(Ok(n))) => {
                        approximate(format!("len {n}: the whole path is hashed"));
                        i += 1;
                    }
                    (other, _) => approximate(format!("uri {other}")),
                }
                i += 1;
            }
            let mut toml = String::from("{ type = \"uri\"");
            if whole {
                toml.push_str(", whole = true");
            }
            if let Some(d) = depth {
                toml.push_str(&format!(", depth = {d}"));
            }
            toml.push_str(" }");
            if !whole && depth.is_none() {
                toml = "\"uri\"".to_owned();
            }
            Balance { toml, http: true }
        }
        [h, rest @ ..] if cookie_of(h, "hdr").is_some() => {
            if !rest.is_empty() {
                approximate(format!("{}: the whole field is hashed", rest.join(" ")));
            }
            Balance {
                toml: super::write::q(h),
                http: true,
            }
        }
        [b @ "static-rr", ..] => {
            approximate(format!("{b}: proxyd's roundrobin follows weight changes"));
            Balance::plain("roundrobin")
        }
        other => {
            approximate(other.join(" "));
            Balance::plain("roundrobin")
        }
    }
}

/// `cookie NAME [insert] [indirect] [nocache] [httponly] [secure] [domain D] [maxlife T]` as
/// the backend's `cookie = {...}`; `rewrite` and `prefix` modes are reported and left out.
pub fn cookie(args: &[String], line: &Line, report: &mut Report) -> Option<String> {
    let name = args.first()?;
    let mut toml = format!("{{ name = {}", super::write::q(name));
    let mut insert = false;
    let mut domain = false;
    let mut i = 1;
    while i < args.len() {
        let value = args.get(i + 1).map_or("", String::as_str);
        match args[i].as_str() {
            "insert" => insert = true,
            m @ ("rewrite" | "prefix") => {
                report.add(line, Topic::CookieOther, Some(m.to_owned()));
                return None;
            }
            f @ ("indirect" | "nocache" | "httponly" | "secure") => {
                toml.push_str(&format!(", {f} = true"));
            }
            "domain" if !domain => {
                domain = true;
                toml.push_str(&format!(", domain = {}", super::write::q(value)));
                i += 1;
            }
            "maxlife" => {
                match value.parse::<Duration>() {
                    Ok(d) if d.0 >= std::time::Duration::from_secs(1) => {
                        toml.push_str(&format!(", max_age = {}", super::write::q(&d.to_string())));
                        report.add(line, Topic::CookieMaxlife, None);
                    }
                    _ => report.add(line, Topic::CookieOther, Some(format!("maxlife {value}"))),
                }
                i += 1;
            }
            w @ ("domain" | "maxidle" | "attr") => {
                report.add(line, Topic::CookieOther, Some(format!("{w} {value}")));
                i += 1;
            }
            w => report.add(line, Topic::CookieOther, Some(w.to_owned())),
        }
        i += 1;
    }
    toml.push_str(&format!(", insert = {insert} }}"));
    Some(toml)
}

/// `req.cook(NAME)` -> `NAME`.
pub fn cookie_of(fetch: &str, name: &str) -> Option<String> {
    let inner = fetch
        .strip_prefix(name)?
        .strip_prefix('(')?
        .strip_suffix(')')?;
    (!inner.is_empty() && !inner.contains([',', '(', ')'])).then(|| inner.to_owned())
}

/// A `crt` path, with `crt-base` before a relative one, as HAProxy reads it.
pub fn cert_path(base: Option<&Path>, crt: &str) -> String {
    match base {
        Some(b) if !crt.starts_with('/') => b.join(crt).display().to_string(),
        _ => crt.to_owned(),
    }
}
