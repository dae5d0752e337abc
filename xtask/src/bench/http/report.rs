//! The http section of the report: a table per row, idle memory, 1 → 2 thread scaling, ratios
//! against HAProxy, and every target met or missed.

use super::idle::{self, Idle};
use super::sessions::STICKY_CHECKS;
use super::targets::{haproxy_maxconn, nofile_limit};
use super::{Kind, Plan, ROWS, Row, SESSIONS, Sample, Shape, TABLE_SIZE, TIMEOUT_IDLE};
use crate::bench::stats::{median, near, ratio, spread, with_spread};
use crate::bench::{BackendKind, Plot, PlotBar, Section, Table};
use crate::configs::nginx::BIG_BYTES;

/// Figures of one (row, target) over the rounds.
struct Figures {
    rps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    cpu: Vec<f64>,
    cpu_stickd: Vec<f64>,
    proxy_busy: Vec<f64>,
    client_busy: Vec<f64>,
    backends_busy: Vec<f64>,
    non_2xx: u64,
    socket_errors: u64,
    requests: u64,
    log_lines: Option<u64>,
}

impl Figures {
    /// The busy cores of everything on the machine that the run used: the proxy (with stickd),
    /// wrk and the backends.
    fn machine_busy(&self) -> f64 {
        let stickd = if self.cpu_stickd.is_empty() {
            0.0
        } else {
            (median(&self.cpu_stickd) - median(&self.cpu)) * median(&self.rps) / 1e6
        };
        median(&self.proxy_busy) + stickd + median(&self.client_busy) + median(&self.backends_busy)
    }
}

fn figures(samples: &[(Row, Kind, Sample)], row: Row, k: Kind) -> Option<Figures> {
    let s: Vec<&Sample> = samples
        .iter()
        .filter(|(r, sk, _)| *r == row && *sk == k)
        .map(|(_, _, s)| s)
        .collect();
    if s.is_empty() {
        return None;
    }
    let logged: Vec<u64> = s.iter().filter_map(|s| s.log_lines).collect();
    Some(Figures {
        rps: s.iter().map(|s| s.wrk.rps).collect(),
        p50: s.iter().map(|s| s.wrk.p50_ms).collect(),
        p99: s.iter().map(|s| s.wrk.p99_ms).collect(),
        cpu: s.iter().filter_map(|s| s.cpu_us).collect(),
        cpu_stickd: s.iter().filter_map(|s| s.cpu_stickd_us).collect(),
        proxy_busy: s.iter().filter_map(|s| s.proxy_busy).collect(),
        client_busy: s.iter().map(|s| s.client_busy).collect(),
        backends_busy: s.iter().map(|s| s.backends_busy).collect(),
        non_2xx: s.iter().map(|s| s.wrk.non_2xx).sum(),
        socket_errors: s.iter().map(|s| s.wrk.socket_errors).sum(),
        requests: s.iter().map(|s| s.wrk.requests).sum(),
        log_lines: (!logged.is_empty()).then(|| logged.iter().sum()),
    })
}

fn range(v: &[f64]) -> Option<(f64, f64)> {
    (v.len() > 1).then(|| spread(v))
}

/// MB (10^6 bytes) of body per answer of a 1 MB row.
fn mb_per_answer() -> f64 {
    BIG_BYTES as f64 / 1e6
}

pub(super) fn section(samples: &[(Row, Kind, Sample)], idle: &[Idle], plan: &Plan) -> Section {
    let backends = match plan.backends {
        BackendKind::Nginx => "nginx",
        BackendKind::Demo => "demo",
    };
    let mut s = Section::new(&format!(
        "HTTP proxying ({backends} backends): direct, proxyd, HAProxy, nginx"
    ));
    s.text.push(format!(
        "wrk 4.1 (`--latency`, {} s per run, one wrk thread per proxy thread) against each target \
         in turn, {} round(s), the target order rotating each round, each run once every \
         target's and backend's processes are quiet (at most 3 s); figures are the median of \
         the rounds with (min..max). All targets proxy to the same two backends on loopback: {}. \
         Rows with 1 thread: proxyd `threads = 1`, HAProxy `nbthread 1`, nginx \
         `worker_processes 1`; with 2 threads: `threads = 2`, `nbthread 2`, `worker_processes 2` \
         (a second set of targets, started after the first is stopped). Direct is wrk straight \
         to one backend: the limit of the machine.",
        plan.secs,
        plan.rounds,
        match plan.backends {
            BackendKind::Nginx =>
                "two Debian nginx instances (each its own prefix in the temp dir, one worker, \
                 `access_log off`), answering `GET /index.php` with a 29-byte text, `X-Server` \
                 and, to a request without one, a new `PHPSESSID` ($request_id), and `GET /1m` \
                 with a 1 MiB file (sendfile)",
            BackendKind::Demo =>
                "two instances of xtask's demo backend (`cargo xtask backend`), answering \
                 `GET /index.php` with a short text, `X-Server` and, to a request without one, \
                 a new `PHPSESSID`, and `GET /1m` with 1 MiB",
        }
    ));
    s.text.push(
        "**Access logs are on for every target**: proxyd its default access log (HAProxy's \
         httplog format, written by a thread of the worker's own, to its stderr, a file here); HAProxy `option httplog` with \
         `log 127.0.0.1:PORT local0`, a UDP syslog sink in the bench's process that reads and \
         counts the datagrams; nginx `access_log` (the `combined` format) to a file. After each \
         run the bench counts the lines the run wrote and drops them (the files are truncated); \
         the log column is those lines per request wrk completed (about 1.00 when every request \
         was logged; a little above when requests cut off at the end of the run were logged \
         too)."
            .to_owned(),
    );
    s.text.push(format!(
        "proxyd: fdkeeper + stickd + proxyd with the seed's rule (`stick on req.cook(PHPSESSID)`, \
         `stick store-response res.cook(PHPSESSID)`); proxyd no-stick is the same backend without \
         the rule (and without stickd). HAProxy 2.6: the seed's backend (roundrobin, `stick-table \
         type string len 32 size {TABLE_SIZE} expire 5m`, the same stick rules, `option \
         http-keep-alive`, the seed's timeouts and checks, no peers). nginx 1.22: `upstream` with \
         `keepalive 64`; OSS nginx has no sticky cookie, so it routes by `hash $cookie_PHPSESSID \
         consistent`: sticky, but it stores nothing, and new sessions all hash alike (to one \
         backend). The tables hold {TABLE_SIZE} entries on HAProxy and stickd instead of the \
         seed's 5k, so that the new-session runs never evict; every target's client and \
         keep-alive timeouts are {TIMEOUT_IDLE} instead of the seed's 10 s, so that the idle \
         connections stay open while their memory is read."
    ));
    let maxconn = haproxy_maxconn();
    if maxconn < 20_000 {
        s.text.push(format!(
            "HAProxy's `maxconn` is at most {maxconn} instead of the seed's 20000: HAProxy needs \
             two open files per connection and refuses to start above this machine's limit of \
             {} (at most 1000 client connections are used in the loads).",
            nofile_limit().map_or("?".to_owned(), |n| n.to_string())
        ));
    }
    s.text.push(format!(
        "Shapes: **1000 cookies (spread)**: each request carries one of {SESSIONS} `PHPSESSID` \
         cookies that the target itself stored first (cookie-less requests, Set-Cookie kept), \
         round robin; **one cookie (hot key)**: every request of every connection carries the \
         same one; **connection-close**: the spread cookies with `Connection: close`, a new \
         connection per request; **new session**: keep-alive without a cookie, so every answer \
         sets a session that the proxy stores; **1 MB answers**: the spread cookies on `GET \
         /1m`, in MB/s (10^6 bytes of body) and CPU µs per MB. Before the runs, {STICKY_CHECKS} \
         sessions per target are checked: two requests each reach the same server, for proxyd \
         and HAProxy the one that set it. CPU µs/req: user+system time of the proxy's own process \
         tree (/proc, proxyd's master and worker) from the start of the run until it is quiet \
         again, divided by the requests wrk completed; for proxyd the next column adds stickd's, \
         which holds the table that HAProxy keeps in-process. CPU: the proxy's, wrk's and the \
         backends' CPU time over the run's wall time (100 % = one core of the machine's {}). \
         Errors: wrk's non-2xx answers plus socket errors, all rounds.",
        cores()
    ));

    let mut bars_of = Vec::new();
    for row in ROWS {
        let (t, bars) = row_table(samples, row);
        if t.rows.is_empty() {
            continue;
        }
        s.tables.push(t);
        if row.threads == 1 && row.connections == 100 && row.shape != Shape::Big {
            bars_of.push((row, bars));
        }
    }
    for (row, bars) in bars_of {
        s.plots.push(Plot {
            workload: row.shape.title().to_owned(),
            bars,
        });
    }
    s.tables.push(idle_table(idle));
    s.text.push(format!(
        "Idle connections (their table follows the rows; measured before the loads, on the \
         1-thread targets after they stored their sessions): {} keep-alive connections opened \
         by the bench's own client, {} at a time, each after one answered `GET /index.php` with \
         a session the target already stored (so that none stores a new one), then left open \
         and silent; the resident memory (VmRSS) of the target's process tree is read before and \
         a second after the last answer, and the difference divided by the connections.",
        plan.idle,
        idle::PARALLEL
    ));
    s.text
        .extend(crate::bench::tools::idle_cap_text(plan.idle, plan.nofile));
    s.tables.push(scaling_table(samples));
    s.notes.extend(verdicts(samples, idle));
    s
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// One row's table and its plot bars.
fn row_table(samples: &[(Row, Kind, Sample)], row: Row) -> (Table, Vec<PlotBar>) {
    let big = row.shape == Shape::Big;
    let (rate_name, cpu_name) = if big {
        ("MB/s", "CPU µs/MB")
    } else {
        ("req/s", "CPU µs/req")
    };
    // A 1 MB row shows MB/s and CPU per MB; the ratios are those of req/s and CPU per request.
    let (rate_scale, cpu_scale) = if big {
        (mb_per_answer(), 1.0 / mb_per_answer())
    } else {
        (1.0, 1.0)
    };
    let scale = |v: &[f64], k: f64| v.iter().map(|x| x * k).collect::<Vec<f64>>();
    let first = format!("{}: target", row.title());
    let mut t = Table::new(&[
        first.as_str(),
        rate_name,
        "vs HAProxy",
        "p50 ms",
        "p99 ms",
        "vs HAProxy",
        "errors",
        cpu_name,
        "vs HAProxy",
        "+ stickd (vs HAProxy)",
        "CPU proxy / wrk / backends",
        "log lines per request",
    ]);
    let h = figures(samples, row, Kind::Haproxy);
    let mut bars = Vec::new();
    for kind in [
        Kind::Direct,
        Kind::Proxyd,
        Kind::ProxydNoStick,
        Kind::Haproxy,
        Kind::Nginx,
    ] {
        let Some(f) = figures(samples, row, kind) else {
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
        let dash = || "-".to_owned();
        let cpu = |v: &[f64]| {
            if v.is_empty() {
                dash()
            } else {
                with_spread(&scale(v, cpu_scale), 1)
            }
        };
        let pct = |v: &[f64]| format!("{:.0} %", median(v) * 100.0);
        let busy = format!(
            "{} / {} / {}",
            if f.proxy_busy.is_empty() {
                dash()
            } else {
                pct(&f.proxy_busy)
            },
            pct(&f.client_busy),
            pct(&f.backends_busy)
        );
        t.row(vec![
            kind.label().to_owned(),
            with_spread(&scale(&f.rps, rate_scale), if big { 1 } else { 0 }),
            vs(&f.rps, h.as_ref().map(|h| h.rps.as_slice())),
            with_spread(&f.p50, 2),
            with_spread(&f.p99, 2),
            vs(&f.p99, h.as_ref().map(|h| h.p99.as_slice())),
            errors,
            cpu(&f.cpu),
            if f.cpu.is_empty() {
                dash()
            } else {
                vs(&f.cpu, h.as_ref().map(|h| h.cpu.as_slice()))
            },
            if f.cpu_stickd.is_empty() {
                dash()
            } else {
                format!(
                    "{} ({})",
                    cpu(&f.cpu_stickd),
                    vs(&f.cpu_stickd, h.as_ref().map(|h| h.cpu.as_slice()))
                )
            },
            busy,
            f.log_lines.map_or_else(dash, |n| {
                format!("{:.2}", n as f64 / f.requests.max(1) as f64)
            }),
        ]);
        bars.push(PlotBar {
            target: kind.short().to_owned(),
            rps: median(&f.rps),
            p99_ms: median(&f.p99),
            rps_range: range(&f.rps),
            p99_range: range(&f.p99),
        });
    }
    (t, bars)
}

fn idle_table(idle: &[Idle]) -> Table {
    let mut t = Table::new(&[
        "idle keep-alive connections (1 thread): target",
        "connections",
        "opened in",
        "RSS before",
        "RSS after",
        "KiB per connection",
        "vs HAProxy",
    ]);
    let haproxy = idle
        .iter()
        .find(|i| i.kind == Kind::Haproxy)
        .map_or(0.0, Idle::kib_per_conn);
    for i in idle {
        let mib = |b: u64| format!("{:.1} MiB", b as f64 / 1048576.0);
        t.row(vec![
            i.kind.label().to_owned(),
            i.opened.to_string(),
            format!("{:.1} s", i.seconds),
            mib(i.before),
            mib(i.after),
            format!("{:.1}", i.kib_per_conn()),
            ratio(i.kib_per_conn(), haproxy),
        ]);
    }
    t
}

/// The rows measured at both thread counts: (1-thread row, 2-thread row).
fn scaled_rows() -> Vec<(Row, Row)> {
    ROWS.iter()
        .filter(|r| r.threads == 2)
        .filter_map(|two| {
            ROWS.iter()
                .find(|one| {
                    one.threads == 1 && one.shape == two.shape && one.connections == two.connections
                })
                .map(|one| (*one, *two))
        })
        .collect()
}

/// Client and machine limits of a 2-thread run: whether wrk's own CPU was at its threads'
/// cores, or the machine's cores were all busy.
fn limits(row: Row, f: &Figures) -> String {
    let wrk = median(&f.client_busy);
    let machine = f.machine_busy();
    let client_bound = wrk >= 0.9 * f64::from(row.wrk_threads());
    let machine_bound = machine >= 0.9 * cores() as f64;
    let what = match (client_bound, machine_bound) {
        (true, _) => "the client was the limit",
        (false, true) => "the machine's cores were the limit, not the client alone",
        (false, false) => {
            "neither wrk nor the run's own processes filled the cores (whatever else runs on \
             the machine had the rest: see the load average)"
        }
    };
    format!(
        "{what}: wrk {:.0} % of its {} thread(s), all of the run {:.0} % of {} cores",
        wrk * 100.0,
        row.wrk_threads(),
        machine * 100.0,
        cores()
    )
}

fn scaling_table(samples: &[(Row, Kind, Sample)]) -> Table {
    let mut t = Table::new(&[
        "1 → 2 threads: row",
        "proxyd req/s 1 → 2",
        "×",
        "HAProxy req/s 1 → 2",
        "×",
        "nginx req/s 1 → 2",
        "×",
        "proxyd's 2-thread run",
    ]);
    for (one, two) in scaled_rows() {
        let mut cells = vec![format!(
            "{}, {} connections",
            two.shape.title(),
            two.connections
        )];
        for kind in [Kind::Proxyd, Kind::Haproxy, Kind::Nginx] {
            match (figures(samples, one, kind), figures(samples, two, kind)) {
                (Some(a), Some(b)) => {
                    cells.push(format!("{:.0} → {:.0}", median(&a.rps), median(&b.rps)));
                    cells.push(ratio(median(&b.rps), median(&a.rps)));
                }
                _ => cells.extend(["-".to_owned(), "-".to_owned()]),
            }
        }
        cells.push(figures(samples, two, Kind::Proxyd).map_or("-".to_owned(), |f| limits(two, &f)));
        t.row(cells);
    }
    t
}

/// Every target, met or missed, from this run's medians.
fn verdicts(samples: &[(Row, Kind, Sample)], idle: &[Idle]) -> Vec<String> {
    let mut notes = Vec::new();
    let mark = |ok: bool| if ok { "met" } else { "**missed**" };
    for row in ROWS {
        let (Some(p), Some(h)) = (
            figures(samples, row, Kind::Proxyd),
            figures(samples, row, Kind::Haproxy),
        ) else {
            notes.push(format!(
                "Targets, {}: **not measured** (a target did not run).",
                row.title()
            ));
            continue;
        };
        let rps = median(&p.rps) / median(&h.rps);
        let cpu = median(&p.cpu) / median(&h.cpu);
        let cpu_all = median(&p.cpu_stickd) / median(&h.cpu);
        let p99 = median(&p.p99) / median(&h.p99);
        let (rate, per) = if row.shape == Shape::Big {
            ("MB/s", "CPU µs/MB")
        } else {
            ("requests/s", "CPU µs/req")
        };
        notes.push(format!(
            "Targets, {}: {rate} {}× HAProxy (target ≥ 1.2×: {}); {per} {}× (≤ 0.8×: {}), {}× \
             with stickd ({}); p99 {}× (no worse, ≤ 1.0×: {}).",
            row.title(),
            near(rps, 1.2),
            mark(rps >= 1.2),
            near(cpu, 0.8),
            mark(cpu <= 0.8),
            near(cpu_all, 0.8),
            mark(cpu_all <= 0.8),
            near(p99, 1.0),
            mark(p99 <= 1.0),
        ));
    }
    let per = |k: Kind| idle.iter().find(|i| i.kind == k).map(Idle::kib_per_conn);
    match (per(Kind::Proxyd), per(Kind::Haproxy)) {
        (Some(p), Some(h)) => notes.push(format!(
            "Target, memory per idle keep-alive connection ≤ HAProxy's: proxyd {p:.1} KiB, \
             HAProxy {h:.1} KiB ({}).",
            mark(p <= h)
        )),
        _ => notes
            .push("Target, memory per idle keep-alive connection: **not measured**.".to_owned()),
    }
    for (one, two) in scaled_rows() {
        let (Some(a), Some(b)) = (
            figures(samples, one, Kind::Proxyd),
            figures(samples, two, Kind::Proxyd),
        ) else {
            continue;
        };
        let x = median(&b.rps) / median(&a.rps);
        notes.push(format!(
            "Target, 2 threads ≥ 1.6× one thread's requests/s, {}, {} connections: proxyd \
             {}× ({}); {}.",
            two.shape.title(),
            two.connections,
            near(x, 1.6),
            mark(x >= 1.6),
            limits(two, &b)
        ));
    }
    let spread1 = ROWS[0];
    if let (Some(stick), Some(plain)) = (
        figures(samples, spread1, Kind::Proxyd),
        figures(samples, spread1, Kind::ProxydNoStick),
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
            "Stick rule cost (target: at most 10 % of requests/s), {}: proxyd with the rule \
             {:.0} req/s, without {:.0} req/s: {:.1} % ({verdict}).",
            spread1.title(),
            median(&stick.rps),
            median(&plain.rps),
            cost * 100.0,
        ));
    }
    let new = ROWS.iter().copied().find(|r| r.shape == Shape::NewSession);
    if let Some(p) = new.and_then(|r| figures(samples, r, Kind::Proxyd)) {
        let stickd = median(&p.cpu_stickd) - median(&p.cpu);
        notes.push(format!(
            "Where the new-session CPU goes: proxyd's worker and master spend {:.1} µs per request \
             (proxying, the cache insert, the batched send and the access log line), stickd \
             {stickd:.1} µs per stored session (receiving the batch, its table, change log and \
             disk writes, the watch stream back to proxyd); HAProxy stores in-process and \
             persists nothing.",
            median(&p.cpu),
        ));
    }
    notes
}
