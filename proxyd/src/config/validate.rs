//! From the file as written to a [`Config`]: defaults filled in, every value checked, names
//! resolved to indices, listen addresses compared as sockets; the first error is reported at
//! its line.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration as StdDuration;

use common::config::Spanned;
use common::{ConfigError, Duration, SourceFile};

use super::raw::{RawBind, RawConfig, Shorthand};
use super::tls::{Tls, TlsCheck};
use super::{
    Backend, Balance, Bind, CertificateSource, Check, CheckKind, Cidr, Config, Defaults,
    ForwardFor, Frontend, Global, Mode, RedirectHttps, Server, Stick, StickOn,
};

/// Most concurrent HTTP/2 streams a connection may be offered: each is a task and a server
/// request, and the per-connection memory grows with them.
const MAX_H2_STREAMS: u64 = 1000;

pub(super) fn validate(
    src: SourceFile,
    raw: RawConfig,
    certificates: CertificateSource,
) -> Result<Config, ConfigError> {
    let global_span = raw.global.span();
    let g = raw.global.into_inner();
    distinct_paths(
        &src,
        &[
            ("admin_socket", g.admin_socket.as_ref()),
            ("fdkeeper_socket", g.fdkeeper_socket.as_ref()),
            ("stickd_socket", g.stickd_socket.as_ref()),
            ("server_state_file", g.server_state_file.as_ref()),
        ],
    )?;
    let admin_socket = required_path(&src, g.admin_socket, global_span.clone(), "admin_socket")?;
    let fdkeeper_socket = required_path(
        &src,
        g.fdkeeper_socket,
        global_span.clone(),
        "fdkeeper_socket",
    )?;
    let max_draining = match g.max_draining {
        None => 4,
        Some(v) if *v.get_ref() >= 1 && *v.get_ref() <= 64 => *v.get_ref() as usize,
        Some(v) => return Err(src.error_at(v.span(), "max_draining must be between 1 and 64")),
    };
    let threads = match g.threads {
        None => 1,
        Some(v) if *v.get_ref() >= 1 && *v.get_ref() <= 256 => *v.get_ref() as usize,
        Some(v) => return Err(src.error_at(v.span(), "threads must be between 1 and 256")),
    };
    let worker_ready_timeout = match g.worker_ready_timeout {
        None => StdDuration::from_secs(10),
        Some(v) if v.get_ref().0 >= StdDuration::from_millis(100) => v.get_ref().0,
        Some(v) => {
            return Err(src.error_at(v.span(), "worker_ready_timeout must be at least 100ms"));
        }
    };
    let stickd_socket = match g.stickd_socket {
        Some(p) if p.get_ref().as_os_str().is_empty() => {
            return Err(src.error_at(p.span(), "stickd_socket must not be empty"));
        }
        p => p.map(Spanned::into_inner),
    };
    let metrics_span = g.metrics.as_ref().map(Spanned::span);
    let metrics = match g.metrics {
        None => None,
        Some(m) => Some(m.get_ref().parse::<SocketAddr>().map_err(|_| {
            src.error_at(
                m.span(),
                format!("bad metrics address '{}' (expected ip:port)", m.get_ref()),
            )
        })?),
    };
    let server_state_file = match g.server_state_file {
        Some(p) if p.get_ref().as_os_str().is_empty() => {
            return Err(src.error_at(p.span(), "server_state_file must not be empty"));
        }
        p => p.map(Spanned::into_inner),
    };
    let global = Global {
        admin_socket,
        stickd_socket,
        metrics,
        server_state_file,
        fdkeeper_socket,
        drain_timeout: g.drain_timeout.map_or(StdDuration::from_secs(30), |d| d.0),
        max_draining,
        threads,
        worker_ready_timeout,
    };

    let d = raw.defaults;
    let secs = StdDuration::from_secs;
    // Zero would time every exchange out at once; an unlimited timeout lets one stuck peer
    // hold a connection and its slot for ever, so neither is offered.
    let positive = |t: Option<Spanned<Duration>>, name: &str, default: StdDuration| match t {
        None => Ok(default),
        Some(t) if t.get_ref().0.is_zero() => {
            Err(src.error_at(t.span(), format!("{name} must be greater than 0")))
        }
        Some(t) => Ok(t.into_inner().0),
    };
    let defaults = Defaults {
        timeout_connect: positive(d.timeout_connect, "timeout_connect", secs(5))?,
        timeout_client: positive(d.timeout_client, "timeout_client", secs(60))?,
        timeout_server: positive(d.timeout_server, "timeout_server", secs(60))?,
        timeout_http_request: positive(d.timeout_http_request, "timeout_http_request", secs(10))?,
        timeout_http_keep_alive: d.timeout_http_keep_alive.map_or(secs(60), |d| d.0),
        timeout_pool_idle: d.timeout_pool_idle.map_or(secs(30), |d| d.0),
        pool_max_idle: d.pool_max_idle.map_or(64, |n| n as usize),
        timeout_queue: positive(d.timeout_queue, "timeout_queue", secs(5))?,
        timeout_check: positive(d.timeout_check, "timeout_check", secs(2))?,
        timeout_tls_handshake: positive(
            d.timeout_tls_handshake,
            "timeout_tls_handshake",
            secs(10),
        )?,
        timeout_tunnel: positive(d.timeout_tunnel, "timeout_tunnel", secs(3600))?,
        h2_max_concurrent_streams: match d.h2_max_concurrent_streams {
            None => 100,
            Some(n) if (1..=MAX_H2_STREAMS).contains(n.get_ref()) => *n.get_ref() as u32,
            Some(n) => {
                return Err(src.error_at(
                    n.span(),
                    format!("h2_max_concurrent_streams must be 1 to {MAX_H2_STREAMS}"),
                ));
            }
        },
    };
    let default_maxconn = match &d.maxconn {
        None => 10_000,
        Some(m) => checked_maxconn(&src, m)?,
    };
    let default_retries = match &d.retries {
        None => 3,
        Some(r) => checked_retries(&src, r)?,
    };
    let default_forwardfor = forwardfor(&src, d.forwardfor, d.forwardfor_except)?;

    let mut backends = Vec::with_capacity(raw.backend.len());
    let mut backend_names: HashMap<String, usize> = HashMap::new();
    for b in raw.backend {
        let b_span = b.span();
        let b = b.into_inner();
        let name = checked_name(&src, &b.name, "backend")?;
        if backend_names.insert(name.clone(), backends.len()).is_some() {
            return Err(src.error_at(b.name.span(), format!("duplicate backend name '{name}'")));
        }
        if b.server.is_empty() {
            return Err(src.error_at(b_span, format!("backend '{name}' has no server")));
        }
        let check_span = b.check.as_ref().map(Spanned::span);
        let (check, inter, rise, fall) = match b.check {
            None => (
                Check {
                    kind: CheckKind::Tcp,
                },
                None,
                None,
                None,
            ),
            Some(c) => {
                let c = c.into_inner();
                let kind = match c.kind.as_ref().map(|k| k.get_ref().as_str()) {
                    None | Some("tcp")
                        if c.path.is_none() && c.method.is_none() && c.expect_status.is_none() =>
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
                                    && !p.get_ref().bytes().any(|b| {
                                        b.is_ascii_whitespace() || b.is_ascii_control()
                                    }) =>
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
                                return Err(src.error_at(
                                    s.span(),
                                    "expect_status must be between 100 and 599",
                                ));
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
                            "a tcp check takes no method, path or expect_status",
                        ));
                    }
                    Some(other) => {
                        let span = c.kind.as_ref().map(Spanned::span).unwrap_or_default();
                        return Err(src.error_at(
                            span,
                            format!("unknown check type '{other}' (tcp or http)"),
                        ));
                    }
                };
                (Check { kind }, c.inter, c.rise, c.fall)
            }
        };
        let b_inter = checked_inter(&src, inter.as_ref())?.unwrap_or(StdDuration::from_secs(2));
        let b_rise = checked_count(&src, rise.as_ref(), "rise")?.unwrap_or(2);
        let b_fall = checked_count(&src, fall.as_ref(), "fall")?.unwrap_or(3);
        let mut servers: Vec<Server> = Vec::with_capacity(b.server.len());
        for s in b.server {
            let s = s.into_inner();
            let sname = checked_name(&src, &s.name, "server")?;
            if servers.iter().any(|x| x.name == sname) {
                return Err(src.error_at(
                    s.name.span(),
                    format!("duplicate server name '{sname}' in backend '{name}'"),
                ));
            }
            let address = s.address.get_ref().parse::<SocketAddr>().map_err(|_| {
                src.error_at(
                    s.address.span(),
                    format!(
                        "bad server address '{}' (expected ip:port)",
                        s.address.get_ref()
                    ),
                )
            })?;
            if address.port() == 0 {
                return Err(src.error_at(s.address.span(), "server port must not be 0"));
            }
            let weight = match s.weight {
                None => 1,
                Some(w) if *w.get_ref() <= 256 => *w.get_ref(),
                Some(w) => return Err(src.error_at(w.span(), "weight must be between 0 and 256")),
            };
            servers.push(Server {
                name: sname,
                address,
                weight,
                maxconn: s.maxconn.unwrap_or(0),
                check: s.check,
                inter: checked_inter(&src, s.inter.as_ref())?.unwrap_or(b_inter),
                rise: checked_count(&src, s.rise.as_ref(), "rise")?.unwrap_or(b_rise),
                fall: checked_count(&src, s.fall.as_ref(), "fall")?.unwrap_or(b_fall),
            });
        }
        let stick = match b.stick {
            None => None,
            Some(st) => {
                let st = st.into_inner();
                let table = match st.table {
                    None => name.clone(),
                    Some(t) => checked_name(&src, &t, "table")?,
                };
                let on = match parse_fetch(st.on.get_ref(), "req.cook") {
                    Some(c) => StickOn::Cookie(c),
                    None if st.on.get_ref().trim() == "src" => StickOn::Src,
                    None => {
                        return Err(src.error_at(
                            st.on.span(),
                            format!(
                                "unsupported stick on '{}' (req.cook(NAME) or src)",
                                st.on.get_ref()
                            ),
                        ));
                    }
                };
                let store_response = match st.store_response {
                    None => None,
                    Some(r) => match parse_fetch(r.get_ref(), "res.cook") {
                        Some(c) => Some(c),
                        None => {
                            return Err(src.error_at(
                                r.span(),
                                format!(
                                    "unsupported store_response '{}' (res.cook(NAME))",
                                    r.get_ref()
                                ),
                            ));
                        }
                    },
                };
                Some(Stick {
                    table,
                    on,
                    store_response,
                })
            }
        };
        let retries = match &b.retries {
            None => default_retries,
            Some(r) => checked_retries(&src, r)?,
        };
        let forwardfor = if b.forwardfor.is_some() || b.forwardfor_except.is_some() {
            forwardfor(&src, b.forwardfor, b.forwardfor_except)?
        } else {
            default_forwardfor.clone()
        };
        backends.push(Backend {
            name,
            balance: b.balance.unwrap_or(Balance::Roundrobin),
            servers,
            check,
            stick,
            redispatch: b.redispatch.or(d.redispatch).unwrap_or(false),
            retries,
            forwardfor,
            forwarded: b.forwarded.or(d.forwarded).unwrap_or(false),
        });
    }

    // Certificates are loaded here, so a file that cannot serve fails the config, at the line
    // that names it, wherever the config is loaded (check, master, worker).
    let provider = super::tls::provider();
    let mut warnings = Vec::new();
    let mut tls_check = TlsCheck {
        src: &src,
        provider: &provider,
        now: common::time::now_ms().div_euclid(1000),
        warnings: &mut warnings,
        load: certificates == CertificateSource::Files,
    };
    let mut tls: Vec<Tls> = Vec::new();
    let mut tls_names: HashMap<String, usize> = HashMap::new();
    for t in raw.tls {
        let span = t.span();
        let t = t.into_inner();
        let Some(n) = &t.name else {
            return Err(src.error_at(span, "[[tls]] needs a name"));
        };
        let name = checked_name(&src, n, "tls")?;
        if tls_names.insert(name.clone(), tls.len()).is_some() {
            return Err(src.error_at(n.span(), format!("duplicate tls name '{name}'")));
        }
        tls.push(tls_check.validate(t, name)?);
    }

    let mut frontends: Vec<Frontend> = Vec::with_capacity(raw.frontend.len());
    // Every listen address so far, parsed, with whose it is and where it was written: binds
    // are compared as the kernel sees them, never as text.
    let mut taken: Vec<Taken> = Vec::new();
    // The master binds metrics itself: on port 0 it gets a port of its own.
    if let (Some(addr), Some(span)) = (metrics.filter(|m| m.port() != 0), metrics_span) {
        taken.push(Taken {
            addr,
            text: addr.to_string(),
            owner: "[global] metrics".to_owned(),
            at: src.line_col(span.start),
        });
    }
    for f in raw.frontend {
        let f_span = f.span();
        let f = f.into_inner();
        let name = checked_name(&src, &f.name, "frontend")?;
        if frontends.iter().any(|x| x.name == name) {
            return Err(src.error_at(f.name.span(), format!("duplicate frontend name '{name}'")));
        }
        if f.bind.get_ref().is_empty() {
            return Err(src.error_at(f.bind.span(), format!("frontend '{name}' binds nothing")));
        }
        let mode = f.mode.unwrap_or(Mode::Http);
        let mut check = BindCheck {
            src: &src,
            frontend: &name,
            mode,
            taken: &mut taken,
            tls: &mut tls,
            tls_names: &tls_names,
            tls_check: &mut tls_check,
        };
        let bind = f
            .bind
            .into_inner()
            .into_iter()
            .map(|entry| frontend_bind(&mut check, entry))
            .collect::<Result<Vec<_>, _>>()?;
        let Some(db) = f.default_backend else {
            return Err(src.error_at(f_span, format!("frontend '{name}' has no default_backend")));
        };
        let Some(&default_backend) = backend_names.get(db.get_ref()) else {
            return Err(src.error_at(
                db.span(),
                format!("unknown backend '{}' in default_backend", db.get_ref()),
            ));
        };
        let maxconn = match &f.maxconn {
            None => default_maxconn,
            Some(m) => checked_maxconn(&src, m)?,
        };
        if mode == Mode::Tcp {
            let be = &backends[default_backend];
            let stick_on_cookie = be
                .stick
                .as_ref()
                .is_some_and(|s| s.on != StickOn::Src || s.store_response.is_some());
            if stick_on_cookie {
                return Err(src.error_at(db.span(), format!("tcp frontend '{name}' uses backend '{}' whose stick rule needs http (only `src` works in tcp mode)", be.name)));
            }
        }
        frontends.push(Frontend {
            name,
            bind,
            backlog: f.backlog,
            mode,
            default_backend,
            maxconn,
        });
    }
    if frontends.is_empty() {
        return Err(src.error("no [[frontend]] defined"));
    }
    if global.stickd_socket.is_none()
        && let Some(b) = backends.iter().find(|b| b.stick.is_some())
    {
        return Err(src.error_at(
            global_span,
            format!(
                "backend '{}' has a stick rule: [global] needs stickd_socket",
                b.name
            ),
        ));
    }

    Ok(Config {
        source: src,
        global,
        defaults,
        frontends,
        backends,
        tls,
        warnings,
    })
}

/// What validating one frontend's binds needs from the rest of the config.
struct BindCheck<'a, 'c> {
    src: &'a SourceFile,
    frontend: &'a str,
    mode: Mode,
    /// Every listen address so far.
    taken: &'a mut Vec<Taken>,
    /// The TLS settings so far: a bind's own are added to them.
    tls: &'a mut Vec<Tls>,
    tls_names: &'a HashMap<String, usize>,
    tls_check: &'a mut TlsCheck<'c>,
}

/// One bind: `"ip:port"`, or a table with TLS (by name or its own) or a redirect to https.
fn frontend_bind(
    c: &mut BindCheck<'_, '_>,
    entry: Spanned<Shorthand<RawBind>>,
) -> Result<Bind, ConfigError> {
    let src = c.src;
    let entry_span = entry.span();
    let (text, tls, redirect_https, redirect_port, h2c) = match entry.into_inner() {
        Shorthand::Text(t) => (Spanned::new(entry_span, t), None, None, None, None),
        Shorthand::Table(b) => (b.address, b.tls, b.redirect_https, b.redirect_port, b.h2c),
    };
    let Ok(address) = text.get_ref().parse::<SocketAddr>() else {
        return Err(src.error_at(
            text.span(),
            format!(
                "bad bind address '{}' (expected ip:port, [ipv6]:port)",
                text.get_ref()
            ),
        ));
    };
    let here = Taken {
        addr: address,
        text: text.get_ref().clone(),
        owner: format!("frontend '{}'", c.frontend),
        at: src.line_col(text.span().start),
    };
    check_overlap(src, c.taken, &here, text.span())?;
    c.taken.push(here);
    let tls = match tls {
        None => None,
        Some(t) => {
            let span = t.span();
            match t.into_inner() {
                Shorthand::Text(name) => match c.tls_names.get(&name) {
                    Some(&i) => Some(i),
                    None => {
                        return Err(src.error_at(span, format!("unknown tls '{name}'")));
                    }
                },
                Shorthand::Table(raw) => {
                    if let Some(n) = &raw.name {
                        return Err(src.error_at(
                            n.span(),
                            "a bind's own tls takes no name (write a [[tls]] with it and refer to it by name)",
                        ));
                    }
                    let own = format!("{} {}", c.frontend, text.get_ref());
                    let t = c.tls_check.validate(raw, own)?;
                    c.tls.push(t);
                    Some(c.tls.len() - 1)
                }
            }
        }
    };
    let wants_redirect = redirect_https.as_ref().is_some_and(|r| *r.get_ref());
    if let Some(p) = &redirect_port
        && !wants_redirect
    {
        return Err(src.error_at(p.span(), "redirect_port needs redirect_https = true"));
    }
    let redirect_https = match redirect_https {
        Some(r) if *r.get_ref() => {
            if tls.is_some() {
                return Err(src.error_at(
                    r.span(),
                    "redirect_https is for plain binds: this one has tls",
                ));
            }
            if c.mode == Mode::Tcp {
                return Err(src.error_at(
                    r.span(),
                    format!(
                        "redirect_https needs http: frontend '{}' is in tcp mode",
                        c.frontend
                    ),
                ));
            }
            if let Some(p) = &redirect_port
                && *p.get_ref() == 0
            {
                return Err(src.error_at(p.span(), "redirect_port must not be 0"));
            }
            Some(RedirectHttps {
                port: redirect_port.map(Spanned::into_inner),
            })
        }
        _ => None,
    };
    let h2c = match h2c {
        Some(h) if *h.get_ref() => {
            if tls.is_some() {
                return Err(src.error_at(
                    h.span(),
                    "h2c is HTTP/2 without TLS: on a tls bind, offer h2 with alpn",
                ));
            }
            if c.mode == Mode::Tcp {
                return Err(src.error_at(
                    h.span(),
                    format!("h2c needs http: frontend '{}' is in tcp mode", c.frontend),
                ));
            }
            true
        }
        _ => false,
    };
    Ok(Bind {
        address,
        tls,
        redirect_https,
        h2c,
    })
}

/// A listen address of the config and where it was written.
struct Taken {
    addr: SocketAddr,
    text: String,
    owner: String,
    at: (usize, usize),
}

/// Refuses `here` when it is the same socket as an earlier bind (fdkeeper would lend one socket
/// to two frontends) or overlaps one (`0.0.0.0:P` and `127.0.0.1:P`, or a dual-stack `[::]:P`
/// and any IPv4 `P`: one of them would fail to bind). proxyd binds IPv6 without IPV6_V6ONLY.
fn check_overlap(
    src: &SourceFile,
    taken: &[Taken],
    here: &Taken,
    span: std::ops::Range<usize>,
) -> Result<(), ConfigError> {
    let bind = |a: SocketAddr| fdkeeper::address::Bind::new(a, false);
    for t in taken {
        if let Some(o) = fdkeeper::address::overlap(bind(t.addr), bind(here.addr)) {
            return Err(src.error_at(
                span,
                format!(
                    "bind '{}' of {} {o} '{}' of {} at {}:{}:{}",
                    here.text,
                    here.owner,
                    t.text,
                    t.owner,
                    src.path.display(),
                    t.at.0,
                    t.at.1
                ),
            ));
        }
    }
    Ok(())
}

/// `req.cook(NAME)` -> `NAME`.
fn parse_fetch(s: &str, fetch: &str) -> Option<String> {
    let inner = s
        .trim()
        .strip_prefix(fetch)?
        .strip_prefix('(')?
        .strip_suffix(')')?
        .trim();
    let ok = !inner.is_empty()
        && inner
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
    ok.then(|| inner.to_owned())
}

fn checked_maxconn(src: &SourceFile, m: &Spanned<u64>) -> Result<usize, ConfigError> {
    match *m.get_ref() {
        n @ 1..=1_000_000 => Ok(n as usize),
        _ => Err(src.error_at(m.span(), "maxconn must be between 1 and 1000000")),
    }
}

fn checked_retries(src: &SourceFile, r: &Spanned<u32>) -> Result<u32, ConfigError> {
    match *r.get_ref() {
        n @ 0..=10 => Ok(n),
        _ => Err(src.error_at(r.span(), "retries must be between 0 and 10")),
    }
}

fn checked_inter(
    src: &SourceFile,
    d: Option<&Spanned<Duration>>,
) -> Result<Option<StdDuration>, ConfigError> {
    match d {
        None => Ok(None),
        Some(d) if d.get_ref().0 >= StdDuration::from_millis(10) => Ok(Some(d.get_ref().0)),
        Some(d) => Err(src.error_at(d.span(), "inter must be at least 10ms")),
    }
}

fn checked_count(
    src: &SourceFile,
    n: Option<&Spanned<u32>>,
    what: &str,
) -> Result<Option<u32>, ConfigError> {
    match n {
        None => Ok(None),
        Some(n) if (1..=100).contains(n.get_ref()) => Ok(Some(*n.get_ref())),
        Some(n) => Err(src.error_at(n.span(), format!("{what} must be between 1 and 100"))),
    }
}

fn forwardfor(
    src: &SourceFile,
    on: Option<bool>,
    except: Option<Spanned<String>>,
) -> Result<Option<ForwardFor>, ConfigError> {
    let except = match except {
        None => None,
        Some(e) => match Cidr::parse(e.get_ref()) {
            Some(c) => Some(c),
            None => {
                return Err(src.error_at(
                    e.span(),
                    format!(
                        "bad forwardfor_except '{}' (expected ip/prefix)",
                        e.get_ref()
                    ),
                ));
            }
        },
    };
    Ok(match on {
        Some(true) => Some(ForwardFor { except }),
        Some(false) => None,
        None if except.is_some() => Some(ForwardFor { except }),
        None => None,
    })
}

/// proxyd binds its admin socket and writes its server-state file, and talks to fdkeeper and
/// stickd on theirs: one path given twice would have proxyd unlink a peer's socket, or talk to
/// itself, and fail only at run time.
fn distinct_paths(
    src: &SourceFile,
    paths: &[(&str, Option<&Spanned<PathBuf>>)],
) -> Result<(), ConfigError> {
    let given: Vec<(&str, &Spanned<PathBuf>)> = paths
        .iter()
        .filter_map(|(k, p)| p.map(|p| (*k, p)))
        .collect();
    for (i, (key, p)) in given.iter().enumerate() {
        if let Some((first, _)) = given[..i].iter().find(|(_, q)| q.get_ref() == p.get_ref()) {
            return Err(src.error_at(
                p.span(),
                format!(
                    "{key} is the same path as {first} ('{}')",
                    p.get_ref().display()
                ),
            ));
        }
    }
    Ok(())
}

fn required_path(
    src: &SourceFile,
    v: Option<Spanned<PathBuf>>,
    section: std::ops::Range<usize>,
    key: &str,
) -> Result<PathBuf, ConfigError> {
    match v {
        None => Err(src.error_at(section, format!("[global] needs {key}"))),
        Some(p) if p.get_ref().as_os_str().is_empty() => {
            Err(src.error_at(p.span(), format!("{key} must not be empty")))
        }
        Some(p) => Ok(p.into_inner()),
    }
}

/// Names appear in logs, metrics and admin output: keep them to a safe alphabet.
fn checked_name(src: &SourceFile, n: &Spanned<String>, what: &str) -> Result<String, ConfigError> {
    let s = n.get_ref();
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(s.clone())
    } else {
        Err(src.error_at(
            n.span(),
            format!("bad {what} name '{s}' (1-64 of a-z, A-Z, 0-9, '-', '_', '.')"),
        ))
    }
}
