//! From haproxy.cfg's sections to the [`Plan`] of our three files: which proxies survive,
//! the one value of each setting proxyd keeps for all, the stick tables and their peers.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use common::Duration;

use super::catalog::Topic;
use super::global::{self, Global, PeersDef};
use super::proxies::{self, At, Context, Mode, Proxy, Settings, TIMEOUTS};
use super::report::Report;
use super::resolvers;
use super::rules;
use super::sections::{Kind, Sections};
use super::stick;
use super::write::{BackendOut, CheckOut, FrontendOut, Paths, PeerOut, Plan, Setting, TableOut, q};
use super::{ImportError, Options};

/// A table of stickd without peers listens on this port of the loopback.
const LOCAL_PEER_PORT: u16 = 10000;

pub fn assemble(
    sections: Sections,
    opts: &Options,
    source: String,
    report: &mut Report,
) -> Result<Plan, ImportError> {
    for l in &sections.orphans {
        report.add(l, Topic::Orphan, None);
    }
    let mut g = Global::default();
    for s in sections.sections.iter().filter(|s| s.kind == Kind::Global) {
        global::global(s, &mut g, report);
    }
    let mut peers_defs: Vec<PeersDef> = Vec::new();
    let mut resolvers_defs: Vec<resolvers::ResolversDef> = Vec::new();
    let mut proxies: Vec<Proxy> = Vec::new();
    let mut defaults = Settings::default();
    let mut named: HashMap<String, Settings> = HashMap::new();
    let mut cx = Context {
        report,
        maps: &opts.maps,
        crt_base: g.crt_base.as_deref(),
        default_min_version: g.min_version.clone(),
    };
    for s in &sections.sections {
        match &s.kind {
            Kind::Global => {}
            Kind::Peers => peers_defs.push(global::peers(s, &opts.maps, cx.report)),
            Kind::Other(k) if k == "resolvers" => {
                resolvers_defs.push(resolvers::section(s, &opts.maps, cx.report))
            }
            Kind::Other(_) => cx.report.add(
                &s.header,
                Topic::OtherSection,
                Some(format!("{} lines left out", s.body.len() + 1)),
            ),
            Kind::Defaults => {
                defaults = proxies::defaults(s, &mut cx);
                if let Some(n) = s.name() {
                    named.insert(n.to_owned(), defaults.clone());
                }
            }
            _ => {
                // `frontend NAME from DEFAULTS` names its defaults section.
                let from = match s.header.args() {
                    [_, f, d, ..] if f == "from" => named.get(d),
                    _ => None,
                };
                proxies.push(proxies::proxy(s, from.unwrap_or(&defaults), &mut cx));
            }
        }
    }
    let report = cx.report;

    // Backends: a backend or listen with servers; one that only holds a table is not reported.
    let mut backends: Vec<&Proxy> = Vec::new();
    let mut metrics = None;
    for p in &proxies {
        if !matches!(p.kind, Kind::Backend | Kind::Listen) {
            continue;
        }
        if !p.servers.is_empty() {
            backends.push(p);
        } else if p.stats.is_some() && p.kind == Kind::Listen {
            metrics = metrics.or(p.binds.first().map(|b| b.address));
        } else if p.table.is_none() || p.kind == Kind::Listen {
            report.add(&p.header, Topic::NoServer, None);
        }
    }
    let backend_names: Vec<&str> = backends.iter().map(|b| b.name.as_str()).collect();

    // Frontends: a frontend or listen with binds and a default backend that survived.
    let mut frontends: Vec<(&Proxy, String)> = Vec::new();
    for p in &proxies {
        let default = match p.kind {
            Kind::Frontend => p.settings.default_backend.as_ref().map(|d| d.value.clone()),
            Kind::Listen if !p.servers.is_empty() => Some(p.name.clone()),
            Kind::Listen => continue,
            _ => continue,
        };
        if p.binds.is_empty() {
            report.add(
                &p.header,
                Topic::BindUnsupported,
                Some("no usable bind".to_owned()),
            );
            continue;
        }
        match default {
            Some(d) if backend_names.contains(&d.as_str()) => frontends.push((p, d)),
            Some(d) => report.add(
                &p.header,
                Topic::NoDefaultBackend,
                Some(format!("backend '{d}' is not translated")),
            ),
            None => report.add(&p.header, Topic::NoDefaultBackend, None),
        }
    }
    if frontends.is_empty() {
        return Err(ImportError::NothingToServe);
    }

    let (tables, mut sticks) = stick::tables(&proxies, &backends, report);
    let peering = choose_peers(&g, &peers_defs, &tables, opts, &sections, report)?;

    // Backend settings that may differ per backend; `option forwardfor` of a frontend goes to
    // its default backend.
    let mut settings: Vec<Settings> = backends.iter().map(|b| b.settings.clone()).collect();
    for (f, d) in &frontends {
        if let Some(line) = &f.forwardfor_here
            && let Some(i) = backend_names.iter().position(|n| n == d)
        {
            settings[i].forwardfor = f.settings.forwardfor.clone();
            report.add(
                line,
                Topic::ForwardforFrontend,
                Some(format!("set on backend '{d}'")),
            );
        }
        // A backend in another mode than its frontend runs in the frontend's.
        if let Some(b) = backends.iter().find(|b| &b.name == d) {
            let fm = mode_of(&f.settings);
            if mode_of(&b.settings) != fm {
                let line = b.settings.mode.as_ref().map_or(b.header.no, |m| m.line);
                report.add(
                    &sections_line(&sections, line),
                    Topic::BackendMode,
                    Some(format!("frontend '{}' is in {} mode", f.name, fm.as_str())),
                );
            }
        }
    }

    let mut defaults_out = Vec::new();
    // Timeouts: one value each, for every frontend and backend.
    for (haproxy, key) in TIMEOUTS {
        let client_side = matches!(*haproxy, "client" | "http-request" | "http-keep-alive");
        let users: Vec<&At<Duration>> = if client_side {
            frontends
                .iter()
                .filter_map(|(f, _)| f.settings.timeouts.get(key))
                .collect()
        } else {
            settings
                .iter()
                .filter_map(|s| s.timeouts.get(key))
                .collect()
        };
        let Some(first) = users.first() else { continue };
        for other in &users[1..] {
            if other.value != first.value {
                report.add(
                    &sections_line(&sections, other.line),
                    Topic::TimeoutPerProxy,
                    Some(format!("kept {} from line {}", first.value, first.line)),
                );
            }
        }
        defaults_out.push(Setting {
            key,
            value: q(&first.value.to_string()),
            line: Some(first.line),
        });
    }
    // maxconn: the first frontend's (or global's) in [defaults], others on their frontend.
    let clamp = |n: u64| n.clamp(1, 1_000_000);
    let default_maxconn = frontends
        .first()
        .and_then(|(f, _)| f.settings.maxconn.clone())
        .or_else(|| {
            g.maxconn.as_ref().map(|(n, l)| At {
                value: *n,
                line: l.no,
            })
        });
    if let Some(m) = &default_maxconn {
        defaults_out.push(Setting {
            key: "maxconn",
            value: clamp(m.value).to_string(),
            line: Some(m.line),
        });
    }
    // Per-backend settings: the first backend's in [defaults], the others' where they differ.
    let per_backend: Vec<Vec<(&'static str, String, usize)>> =
        settings.iter().map(backend_settings).collect();
    let first = per_backend.first().cloned().unwrap_or_default();
    for (k, v, line) in &first {
        defaults_out.push(Setting {
            key: k,
            value: v.clone(),
            line: Some(*line),
        });
    }

    let frontends_out = frontends
        .iter()
        .map(|(f, d)| FrontendOut {
            name: f.name.clone(),
            line: f.header.no,
            mode: mode_of(&f.settings).as_str(),
            binds: f.binds.clone(),
            backlog: f.backlog,
            default_backend: d.clone(),
            maxconn: f
                .settings
                .maxconn
                .as_ref()
                .filter(|m| Some(m.value) != default_maxconn.as_ref().map(|d| d.value))
                .map(|m| clamp(m.value)),
            rules: rules::translate(
                f,
                mode_of(&f.settings) == Mode::Http,
                &backend_names,
                report,
            ),
        })
        .collect();
    pool_purge_delay(&backends, &sections, &mut defaults_out, report);
    let mut resolvers_out: Vec<resolvers::ResolversOut> = Vec::new();
    let backends_out = backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let s = &settings[i];
            let line = |no: usize| sections_line(&sections, no);
            let dns: Vec<(&'static str, String)> =
                match resolvers::backend(&b.servers, &line, &resolvers_defs, report) {
                    Some((r, every)) => {
                        let name = q(&r.name);
                        if !resolvers_out.iter().any(|o| o.name == r.name) {
                            resolvers_out.push(r);
                        }
                        vec![
                            ("resolvers", name),
                            ("resolve_interval", q(&every.to_string())),
                        ]
                    }
                    None => Vec::new(),
                };
            let own: Vec<(&'static str, String)> = per_backend[i]
                .iter()
                .filter(|(k, v, _)| !first.iter().any(|(fk, fv, _)| fk == k && fv == v))
                .map(|(k, v, _)| (*k, v.clone()))
                .chain(
                    // A setting the first backend has and this one lacks goes back to proxyd's default.
                    first
                        .iter()
                        .filter(|(k, _, _)| !per_backend[i].iter().any(|(bk, _, _)| bk == k))
                        .filter_map(|(k, _, _)| unset_value(k).map(|v| (*k, v))),
                )
                .chain(dns)
                .collect();
            BackendOut {
                name: b.name.clone(),
                line: b.header.no,
                balance: balance_of(s, b, &frontends, &sections, report),
                settings: own,
                check: s.httpchk.as_ref().map(|c| CheckOut {
                    method: c.value.0.clone(),
                    path: c.value.1.clone(),
                    expect_status: s.expect_status.as_ref().map(|e| e.value),
                    host: s.check_host.as_ref().map(|h| h.value.clone()),
                    line: c.line,
                }),
                stick: sticks.remove(&b.name),
                cookie: s.cookie.as_ref().map(|c| c.value.clone()),
                // A server's cookie value means nothing without the backend's cookie.
                servers: b
                    .servers
                    .iter()
                    .cloned()
                    .map(|mut srv| {
                        if s.cookie.is_none() {
                            srv.cookie = None;
                        }
                        srv
                    })
                    .collect(),
            }
        })
        .collect();

    for d in &resolvers_defs {
        if !resolvers_out.iter().any(|r| r.name == d.name) {
            report.add(&d.header, Topic::ResolversUnused, None);
        }
    }

    let mut log: Vec<Setting> = g
        .log
        .iter()
        .map(|(key, value, line)| Setting {
            key,
            value: value.clone(),
            line: Some(*line),
        })
        .collect();
    if let Some(h) = frontends
        .iter()
        .find_map(|(f, _)| f.settings.httplog.as_ref())
    {
        log.push(Setting {
            key: "access_log_format",
            value: q("httplog"),
            line: Some(h.line),
        });
    }
    let allowed_uids = match &g.user {
        Some(u) => vec![u.clone()],
        None => {
            report.note("no user in global", Topic::NoUser, None);
            vec!["root".to_owned()]
        }
    };
    Ok(Plan {
        source,
        paths: Paths::new(opts.run_dir.as_deref()),
        local: peering.local,
        user: g.user.clone(),
        group: g.group.clone(),
        expose_fd: g.expose_fd,
        allowed_uids,
        peers: peering.peers,
        peers_section: peering.section,
        tables,
        threads: g.nbthread,
        drain_timeout: g.hard_stop_after,
        metrics,
        log,
        defaults: defaults_out,
        frontends: frontends_out,
        backends: backends_out,
        resolvers: resolvers_out,
    })
}

/// `pool-purge-delay` of the servers: proxyd's one `pool_purge_delay`, the first value written;
/// a server with another one (HAProxy's default, 5s, when it has none) is reported.
fn pool_purge_delay(
    backends: &[&Proxy],
    sections: &Sections,
    defaults: &mut Vec<Setting>,
    report: &mut Report,
) {
    let servers = || backends.iter().flat_map(|b| &b.servers);
    let Some(first) = servers().find_map(|s| s.pool_purge_delay.clone()) else {
        return;
    };
    defaults.push(Setting {
        key: "pool_purge_delay",
        value: q(&first.value.to_string()),
        line: Some(first.line),
    });
    let haproxy_default = Duration(std::time::Duration::from_secs(5));
    for s in servers() {
        let (value, line) = match &s.pool_purge_delay {
            Some(p) => (p.value, p.line),
            None => (haproxy_default, s.line),
        };
        if value != first.value {
            report.add(
                &sections_line(sections, line),
                Topic::PoolPurgeDelayPerServer,
                Some(format!(
                    "server {}: kept {} from line {}",
                    s.name, first.value, first.line
                )),
            );
        }
    }
}

/// The line numbered `no` of any section (for reports about values written elsewhere).
fn sections_line(sections: &Sections, no: usize) -> super::lexer::Line {
    sections
        .sections
        .iter()
        .flat_map(|s| std::iter::once(&s.header).chain(&s.body))
        .find(|l| l.no == no)
        .cloned()
        .unwrap_or(super::lexer::Line {
            no,
            words: Vec::new(),
        })
}

/// The backend's `balance`; one that hashes HTTP requests in a backend that a tcp frontend
/// uses is reported and balanced round robin, as HAProxy does.
fn balance_of(
    s: &Settings,
    b: &Proxy,
    frontends: &[(&Proxy, String)],
    sections: &Sections,
    report: &mut Report,
) -> String {
    let Some(bal) = &s.balance else {
        return "\"roundrobin\"".to_owned();
    };
    let tcp = frontends
        .iter()
        .find(|(f, d)| d == &b.name && mode_of(&f.settings) == Mode::Tcp);
    match tcp {
        Some((f, _)) if bal.value.http => {
            report.add(
                &sections_line(sections, bal.line),
                Topic::BalanceOther,
                Some(format!("frontend '{}' is in tcp mode: roundrobin", f.name)),
            );
            "\"roundrobin\"".to_owned()
        }
        _ => bal.value.toml.clone(),
    }
}

/// HAProxy's default mode is tcp.
fn mode_of(s: &Settings) -> Mode {
    s.mode.as_ref().map_or(Mode::Tcp, |m| m.value)
}

/// The settings proxyd keeps per backend, as TOML values, with their lines.
fn backend_settings(s: &Settings) -> Vec<(&'static str, String, usize)> {
    let mut v = Vec::new();
    if let Some(r) = &s.retries {
        v.push(("retries", r.value.to_string(), r.line));
    }
    if let Some(r) = &s.redispatch {
        v.push(("redispatch", r.value.to_string(), r.line));
    }
    if let Some(f) = &s.forwardfor {
        v.push(("forwardfor", f.value.is_some().to_string(), f.line));
        if let Some(Some(e)) = &f.value {
            v.push(("forwardfor_except", q(e), f.line));
        }
    }
    if let Some(f) = &s.forwarded {
        v.push(("forwarded", f.value.to_string(), f.line));
    }
    v
}

/// What a backend writes to undo a `[defaults]` setting it does not have.
fn unset_value(key: &str) -> Option<String> {
    match key {
        "retries" => Some("3".to_owned()),
        "redispatch" | "forwardfor" | "forwarded" => Some("false".to_owned()),
        _ => None,
    }
}

/// stickd's peers as written, and the local one's name.
struct Peering {
    peers: Vec<PeerOut>,
    /// The peers section they come from: its name and line.
    section: Option<(String, usize)>,
    local: String,
}

/// stickd's peers: the section the written tables name, with the local peer among them.
fn choose_peers(
    g: &Global,
    defs: &[PeersDef],
    tables: &[TableOut],
    opts: &Options,
    sections: &Sections,
    report: &mut Report,
) -> Result<Peering, ImportError> {
    let local = match opts.local.clone().or_else(|| g.localpeer.clone()) {
        Some(l) => l,
        None => hostname()?,
    };
    let chosen = tables.iter().find_map(|t| t.peers.as_deref());
    let mut out_peers = Vec::new();
    let mut section = None;
    for def in defs {
        if Some(def.name.as_str()) != chosen {
            report.add(
                &def.header,
                Topic::PeersOther,
                Some("no translated table uses it".to_owned()),
            );
        }
    }
    if let Some(name) = chosen {
        let Some(def) = defs.iter().find(|d| d.name == name) else {
            return Err(ImportError::NoPeers(name.to_owned()));
        };
        if !def.peers.iter().any(|p| p.0 == local) {
            return Err(ImportError::LocalPeer {
                local,
                section: name.to_owned(),
                line: def.header.no,
                known: def
                    .peers
                    .iter()
                    .map(|p| p.0.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        for t in tables.iter().filter(|t| t.peers.as_deref() != Some(name)) {
            report.add(
                &sections_line(sections, t.line),
                Topic::PeersOther,
                Some(format!("replicated to the peers of '{name}'")),
            );
        }
        out_peers = def
            .peers
            .iter()
            .map(|(n, a, l)| PeerOut {
                name: n.clone(),
                address: *a,
                line: Some(l.no),
            })
            .collect();
        section = Some((name.to_owned(), def.header.no));
    } else {
        out_peers.push(PeerOut {
            name: local.clone(),
            // Mapped like haproxy.cfg's addresses, so that a try-out can move it off a port in use.
            address: super::address::map(
                &opts.maps,
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), LOCAL_PEER_PORT),
            ),
            line: None,
        });
    }
    Ok(Peering {
        peers: out_peers,
        section,
        local,
    })
}

fn hostname() -> Result<String, ImportError> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .map_err(|e| ImportError::Hostname(e.to_string()))
}
