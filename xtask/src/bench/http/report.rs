//! The http section of the report: tables, ratios against HAProxy and nginx, and verdicts.

use super::targets::{haproxy_maxconn, nofile_limit};
use super::{CONNECTIONS, Kind, STICKY_CHECKS, Sample, TABLE_SIZE, Target, Workload};
use crate::bench::stats::{median, ratio, spread, with_spread};
use crate::bench::{Plot, PlotBar, Section, Table};

/// Figures of one (workload, target) over the rounds.
struct Figures {
    rps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    cpu: Vec<f64>,
    cpu_stickd: Vec<f64>,
    non_2xx: u64,
    socket_errors: u64,
    requests: u64,
}

fn figures(samples: &[(Workload, Kind, Sample)], w: Workload, k: Kind) -> Option<Figures> {
    let s: Vec<&Sample> = samples
        .iter()
        .filter(|(sw, sk, _)| *sw == w && *sk == k)
        .map(|(_, _, s)| s)
        .collect();
    if s.is_empty() {
        return None;
    }
    Some(Figures {
        rps: s.iter().map(|s| s.wrk.rps).collect(),
        p50: s.iter().map(|s| s.wrk.p50_ms).collect(),
        p99: s.iter().map(|s| s.wrk.p99_ms).collect(),
        cpu: s.iter().filter_map(|s| s.cpu_us).collect(),
        cpu_stickd: s.iter().filter_map(|s| s.cpu_stickd_us).collect(),
        non_2xx: s.iter().map(|s| s.wrk.non_2xx).sum(),
        socket_errors: s.iter().map(|s| s.wrk.socket_errors).sum(),
        requests: s.iter().map(|s| s.wrk.requests).sum(),
    })
}

fn range(v: &[f64]) -> Option<(f64, f64)> {
    (v.len() > 1).then(|| spread(v))
}

pub(super) fn section(
    samples: &[(Workload, Kind, Sample)],
    targets: &[Target],
    rounds: usize,
    secs: u64,
    sessions: usize,
) -> Section {
    let mut s = Section::new("HTTP proxying: direct, proxyd, HAProxy, nginx");
    s.text.push(format!(
        "wrk 4.1 (`-t1 -c{CONNECTIONS} --latency`, {secs} s per run) against each target in turn, \
         {rounds} round(s), the target order rotating each round; figures are the median of the \
         rounds with (min..max). All targets proxy to the same two demo backends on loopback, run \
         one proxy thread (proxyd `threads = 1`, HAProxy `nbthread 1`, nginx `worker_processes 1`) \
         and log no request. Direct is wrk straight to one backend: the limit of the machine."
    ));
    s.text.push(format!(
        "proxyd: fdkeeper + stickd + proxyd with the seed's rule (`stick on req.cook(PHPSESSID)`, \
         `stick store-response res.cook(PHPSESSID)`); proxyd no-stick is the same backend without \
         the rule (and without stickd). HAProxy 2.6: the seed's backend (roundrobin, `stick-table \
         type string len 32 size {TABLE_SIZE} expire 5m`, the same stick rules, `option \
         http-keep-alive`, the seed's timeouts and checks, no peers). The table holds {TABLE_SIZE} \
         entries on both HAProxy and stickd instead of the seed's 5k, so that the new-session runs \
         never evict. nginx 1.22: `upstream` with `keepalive 64`; OSS nginx has no sticky cookie, \
         so it routes by `hash $cookie_PHPSESSID consistent`: sticky, but it stores nothing, and \
         new sessions all hash alike (to one backend)."
    ));
    let maxconn = haproxy_maxconn();
    if maxconn < 20_000 {
        s.text.push(format!(
            "HAProxy's global `maxconn` is {maxconn} instead of the seed's 20000: HAProxy needs two \
             open files per connection and refuses to start above this machine's limit of {} \
             (50 connections are used here).",
            nofile_limit().map_or("?".to_owned(), |n| n.to_string())
        ));
    }
    s.text.push(format!(
        "Workloads: **keep-alive, sticky cookie**: each request carries one of {sessions} \
         `PHPSESSID` cookies that the target itself stored first (cookie-less requests, Set-Cookie \
         kept); **connection-close**: the same with `Connection: close`, a new connection per \
         request; **new session**: keep-alive without a cookie, so every answer sets a session \
         that the proxy stores. Before the runs, {STICKY_CHECKS} sessions per target are checked: \
         two requests each reach the same server, for proxyd and HAProxy the one that set it. CPU µs/req: user+system time of the proxy's own process tree \
         (/proc, proxyd's master and worker) during the run, divided by the requests wrk \
         completed; for proxyd the last column adds stickd's, which holds the table that HAProxy \
         keeps in-process. Errors: wrk's non-2xx answers plus socket errors, all rounds."
    ));

    let haproxy = |w| figures(samples, w, Kind::Haproxy);
    for w in Workload::ALL {
        let mut t = Table::new(&[
            "target",
            "req/s",
            "vs HAProxy",
            "p50 ms",
            "p99 ms",
            "vs HAProxy",
            "errors",
            "CPU µs/req",
            "vs HAProxy",
            "CPU µs/req + stickd (vs HAProxy)",
        ]);
        let h = haproxy(w);
        let mut bars = Vec::new();
        for target in targets {
            let Some(f) = figures(samples, w, target.kind) else {
                continue;
            };
            let vs = |ours: &[f64], theirs: Option<&[f64]>| {
                theirs.map_or("n/a".to_owned(), |t| ratio(median(ours), median(t)))
            };
            let errors = f.non_2xx + f.socket_errors;
            let errors = if errors == 0 {
                "0".to_owned()
            } else {
                format!(
                    "{errors} of {} (non-2xx {}, socket {})",
                    f.requests, f.non_2xx, f.socket_errors
                )
            };
            let cpu = if f.cpu.is_empty() {
                "-".to_owned()
            } else {
                with_spread(&f.cpu, 1)
            };
            let cpu_vs = if f.cpu.is_empty() {
                "-".to_owned()
            } else {
                vs(&f.cpu, h.as_ref().map(|h| h.cpu.as_slice()))
            };
            let cpu_stickd = if f.cpu_stickd.is_empty() {
                "-".to_owned()
            } else {
                format!(
                    "{} ({})",
                    with_spread(&f.cpu_stickd, 1),
                    vs(&f.cpu_stickd, h.as_ref().map(|h| h.cpu.as_slice()))
                )
            };
            t.row(vec![
                target.kind.label().to_owned(),
                with_spread(&f.rps, 0),
                vs(&f.rps, h.as_ref().map(|h| h.rps.as_slice())),
                with_spread(&f.p50, 2),
                with_spread(&f.p99, 2),
                vs(&f.p99, h.as_ref().map(|h| h.p99.as_slice())),
                errors,
                cpu,
                cpu_vs,
                cpu_stickd,
            ]);
            bars.push(PlotBar {
                target: target.kind.short().to_owned(),
                rps: median(&f.rps),
                p99_ms: median(&f.p99),
                rps_range: range(&f.rps),
                p99_range: range(&f.p99),
            });
        }
        s.tables.push(titled(t, w.title()));
        s.plots.push(Plot {
            workload: w.title().to_owned(),
            bars,
        });
    }
    s.notes.extend(verdicts(samples));
    s
}

/// Puts the workload's name into the first header cell, so that each table says what it is.
fn titled(mut t: Table, title: &str) -> Table {
    if let Some(first) = t.header.first_mut() {
        *first = format!("{title}: target");
    }
    t
}

/// The speed targets (and the stick rule's cost), met or missed, from this run's medians.
fn verdicts(samples: &[(Workload, Kind, Sample)]) -> Vec<String> {
    let mut notes = Vec::new();
    let mark = |ok: bool| if ok { "met" } else { "**missed**" };
    for w in Workload::ALL {
        let (Some(p), Some(h)) = (
            figures(samples, w, Kind::Proxyd),
            figures(samples, w, Kind::Haproxy),
        ) else {
            continue;
        };
        let rps = median(&p.rps) / median(&h.rps);
        let cpu = median(&p.cpu) / median(&h.cpu);
        let cpu_all = median(&p.cpu_stickd) / median(&h.cpu);
        let p99 = median(&p.p99) / median(&h.p99);
        notes.push(format!(
            "Targets, {}: requests/s {rps:.2}× HAProxy (target ≥ 1.2×: {}); CPU µs/req \
             {cpu:.2}× (≤ 0.8×: {}), {cpu_all:.2}× with stickd ({}); p99 {p99:.2}× (no worse, \
             ≤ 1.0×: {}).",
            w.title(),
            mark(rps >= 1.2),
            mark(cpu <= 0.8),
            mark(cpu_all <= 0.8),
            mark(p99 <= 1.0),
        ));
    }
    if let (Some(stick), Some(plain)) = (
        figures(samples, Workload::Sticky, Kind::Proxyd),
        figures(samples, Workload::Sticky, Kind::ProxydNoStick),
    ) {
        let cost = 1.0 - median(&stick.rps) / median(&plain.rps);
        let verdict = if cost < 0.0 {
            "met: the runs with the rule were the faster ones, so the cost is below this run's noise"
        } else if cost <= 0.10 {
            "met"
        } else {
            "**missed**"
        };
        notes.push(format!(
            "Stick rule cost (target: at most 10 % of requests/s), keep-alive sticky run: proxyd \
             with the rule {:.0} req/s, without {:.0} req/s: {:.1} % ({verdict}).",
            median(&stick.rps),
            median(&plain.rps),
            cost * 100.0,
        ));
    }
    if let Some(p) = figures(samples, Workload::NewSession, Kind::Proxyd) {
        let stickd = median(&p.cpu_stickd) - median(&p.cpu);
        notes.push(format!(
            "Where the new-session CPU goes: proxyd's worker and master spend {:.1} µs per request \
             (proxying, the cache insert and the batched send), stickd {stickd:.1} µs per stored \
             session (receiving the batch, its table, change log and disk writes, the watch \
             stream back to proxyd); HAProxy stores in-process and persists nothing.",
            median(&p.cpu),
        ));
    }
    notes
}
