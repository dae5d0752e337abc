//! The tls section of the report: a table per load and one for idle memory, ratios against
//! HAProxy and nginx, and the targets met or missed.

use super::{
    H2_CONNECTIONS, H2_STREAMS, HANDSHAKE_CONCURRENCY, Idle, Kind, Load, Sample, Shape, Target,
    WRK_CONNECTIONS,
};
use crate::bench::stats::{median, near, ratio, with_spread};
use crate::bench::{BackendKind, Section, Table};

/// One field of one (load, target) over the rounds.
fn values(
    samples: &[(Load, Kind, Sample)],
    load: Load,
    kind: Kind,
    f: impl Fn(&Sample) -> Option<f64>,
) -> Vec<f64> {
    samples
        .iter()
        .filter(|(l, k, _)| *l == load && *k == kind)
        .filter_map(|(_, _, s)| f(s))
        .collect()
}

pub(super) fn section(
    samples: &[(Load, Kind, Sample)],
    idle: &[Idle],
    targets: &[Target],
    shape: &Shape,
) -> Section {
    let backends = match shape.backends {
        BackendKind::Nginx => "nginx",
        BackendKind::Demo => "demo",
    };
    let mut s = Section::new(&format!(
        "TLS ({backends} backends): handshakes, keep-alive, HTTP/2, idle connections"
    ));
    s.text.push(format!(
        "proxyd (rustls on aws-lc-rs, its default build), HAProxy 2.6 (OpenSSL 3.0) and nginx \
         1.22 (OpenSSL 3.0) terminate TLS for the same two backends on loopback ({}), each with \
         one proxy thread (proxyd `threads = 1`, HAProxy `nbthread 1`, nginx `worker_processes \
         1`), without stick rules (round robin; nginx's upstream with `keepalive 64`). Each \
         serves a self-signed ECDSA P-256 certificate on one port and an RSA 2048 one on \
         another, offers `h2` and `http/1.1` by ALPN, TLS 1.2 and 1.3 (every client here \
         negotiates 1.3 and X25519, its first key share), and its default session \
         tickets: two per full TLS 1.3 handshake from each (rustls's default and OpenSSL's). \
         Each load runs {} s per target, {} round(s), the target order rotating each round; \
         figures are the median of the rounds with (min..max). Client: {}; {}.",
        match shape.backends {
            BackendKind::Nginx =>
                "two Debian nginx instances, one worker each, `access_log off`, as in the http \
                 section",
            BackendKind::Demo => "two instances of xtask's demo backend, as in the http section",
        },
        shape.secs,
        shape.rounds,
        shape.openssl,
        shape.h2load
    ));
    s.text.push(
        "**Access logs are on for every target**, as in the http section: proxyd its default \
         access log (HAProxy's httplog format, to its stderr, a file here); HAProxy `option \
         httplog` to a UDP syslog sink in the bench's process, with `option dontlognull` \
         (Debian's default haproxy.cfg has it), so that it logs no line for a connection that \
         sent no request, as proxyd and nginx log none; nginx `access_log` (`combined`) to a \
         file. After each run the bench counts the lines it wrote; the log column is those lines \
         per handshake or request: about 1.00 for the keep-alive and HTTP/2 loads, 0 for the \
         handshake loads, which send no request."
            .to_owned(),
    );
    s.text.push(match &shape.ring {
        Ok(_) => "proxyd ring: the same proxyd built without its default `aws-lc-rs` feature \
                  (`cargo build --release -p proxyd --no-default-features`, in target/ring), \
                  rustls on ring instead of aws-lc-rs, the same config; it runs every load beside \
                  the others. The row \"proxyd\" is the default build (aws-lc-rs), and the \
                  targets below judge it alone."
            .to_owned(),
        Err(why) => format!(
            "No ring build of proxyd in this run: {why}. The row \"proxyd\" is the default build \
             (aws-lc-rs), which the targets below judge."
        ),
    });
    s.text.push(format!(
        "Loads: **full handshakes**: xtask's own client (rustls on ring, in the bench's process, \
         {HANDSHAKE_CONCURRENCY} connections at a time, no session cache) connects, completes \
         the handshake, sends close_notify and reads to the server's close, again and again; \
         it checks no certificate, so that the client's share of the two cores is as small as \
         it can be. **Resumed**: the same with a ticket cache per connection loop, so that each \
         handshake after a loop's first resumes (TLS 1.3 PSK with a fresh X25519 exchange); \
         the resumed column is the share that did. **Keep-alive**: wrk 4.1 `-t1 \
         -c{WRK_CONNECTIONS}` over https (HTTP/1.1, ALPN not sent). **HTTP/2**: h2load `-t1 \
         -c{H2_CONNECTIONS} -m{H2_STREAMS}` ({H2_CONNECTIONS} connections × {H2_STREAMS} \
         streams, ALPN h2, checked). CPU µs/op: user+system time of the proxy's process tree \
         (/proc) from the start of the run until it is quiet again, divided by the handshakes \
         or requests completed; proxy, client and backends CPU: their CPU time over the run's \
         wall time (100 % = one core). The machine has two cores for proxy, backends and client \
         alike: when the proxy is well under 100 %, the client or the backends set the pace, and \
         CPU µs/op is the fairer comparison."
    ));

    let ours = |load, k| values(samples, load, k, |s| Some(s.rate));
    for load in Load::ALL {
        let mut header = vec![
            format!("{}: target", load.title()),
            load.unit().to_owned(),
            "vs HAProxy".to_owned(),
            "vs nginx".to_owned(),
            "CPU µs/op".to_owned(),
            "vs HAProxy".to_owned(),
            "vs nginx".to_owned(),
            "proxy CPU".to_owned(),
            "client CPU".to_owned(),
            "backends CPU".to_owned(),
            "errors".to_owned(),
            "log lines/op".to_owned(),
        ];
        if load.is_handshake() {
            header.push("resumed".to_owned());
        }
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        let mut t = Table::new(&header);
        let h_rate = median(&ours(load, Kind::Haproxy));
        let n_rate = median(&ours(load, Kind::Nginx));
        let cpu = |k| values(samples, load, k, |s| Some(s.cpu_us));
        let (h_cpu, n_cpu) = (median(&cpu(Kind::Haproxy)), median(&cpu(Kind::Nginx)));
        for target in targets {
            let k = target.kind;
            let rate = ours(load, k);
            if rate.is_empty() {
                continue;
            }
            let c = cpu(k);
            let pct = |v: Vec<f64>| format!("{:.0} %", median(&v) * 100.0);
            let errors: u64 = samples
                .iter()
                .filter(|(l, sk, _)| *l == load && *sk == k)
                .map(|(_, _, s)| s.errors)
                .sum();
            let ops: u64 = samples
                .iter()
                .filter(|(l, sk, _)| *l == load && *sk == k)
                .map(|(_, _, s)| s.ops)
                .sum();
            let mut row = vec![
                k.label().to_owned(),
                with_spread(&rate, 0),
                ratio(median(&rate), h_rate),
                ratio(median(&rate), n_rate),
                with_spread(&c, 1),
                ratio(median(&c), h_cpu),
                ratio(median(&c), n_cpu),
                pct(values(samples, load, k, |s| Some(s.proxy_busy))),
                pct(values(samples, load, k, |s| Some(s.client_busy))),
                pct(values(samples, load, k, |s| Some(s.backends_busy))),
                if errors == 0 {
                    "0".to_owned()
                } else {
                    format!("{errors} (of {ops})")
                },
                log_per_op(samples, load, k, ops),
            ];
            if load.is_handshake() {
                row.push(pct(values(samples, load, k, |s| s.resumed)));
            }
            t.row(row);
        }
        s.tables.push(t);
    }

    let mut t = Table::new(&[
        "idle TLS connections: target",
        "connections",
        "opened in",
        "RSS before",
        "RSS after",
        "KiB per connection",
        "vs HAProxy",
        "vs nginx",
    ]);
    let per = |k: Kind| idle.iter().find(|i| i.kind == k).map(Idle::kib_per_conn);
    for i in idle {
        let mib = |b: u64| format!("{:.1} MiB", b as f64 / 1048576.0);
        t.row(vec![
            i.kind.label().to_owned(),
            i.opened.to_string(),
            format!("{:.1} s", i.seconds),
            mib(i.before),
            mib(i.after),
            format!("{:.1}", i.kib_per_conn()),
            ratio(i.kib_per_conn(), per(Kind::Haproxy).unwrap_or(0.0)),
            ratio(i.kib_per_conn(), per(Kind::Nginx).unwrap_or(0.0)),
        ]);
    }
    s.tables.push(t);
    s.text.push(format!(
        "Idle connections (the last table, measured first, on targets that had served only a \
         one-second warm-up of handshakes): {} TLS connections opened by xtask's client to the \
         ECDSA port, {} handshakes at a time, each left open and silent after its handshake \
         (the client keeps only the socket); the resident memory (VmRSS) of every process of \
         the target (proxyd's master and worker, HAProxy's one process, nginx's master and \
         worker) is read before and a second after the last handshake, and the difference \
         divided by the connections.",
        shape.idle,
        super::IDLE_PARALLEL
    ));
    s.text
        .extend(crate::bench::tools::idle_cap_text(shape.idle, shape.nofile));
    s.notes.extend(verdicts(samples, idle));
    s.notes.extend(rsa_floor(samples, shape.rsa_sign_us));
    s
}

/// What the RSA signature alone leaves of the RSA target: its share of each full RSA handshake,
/// and the most proxyd could reach against HAProxy per CPU second if everything else in its
/// handshake cost nothing, or what it may cost for 1.5×.
fn rsa_floor(samples: &[(Load, Kind, Sample)], sign_us: Option<f64>) -> Option<String> {
    let sign = sign_us?;
    let cpu = |k| median(&values(samples, Load::FullRsa, k, |s| Some(s.cpu_us)));
    let (p, h) = (cpu(Kind::Proxyd), cpu(Kind::Haproxy));
    if !(p > 0.0 && h > 0.0) {
        return None;
    }
    Some(format!(
        "RSA 2048 against its signature: one RSA 2048 signature costs {sign:.0} µs of CPU here \
         (OpenSSL's, `openssl speed rsa2048`; aws-lc-rs, proxyd's provider, signs about as fast: \
         measured apart, not by this run). That is {:.0} % of proxyd's {p:.0} µs per full RSA \
         handshake and {:.0} % of HAProxy's {h:.0} µs; the rest, {:.0} µs against {:.0} µs, is \
         where they differ. Signing with the same key, proxyd would reach at most {:.2}× \
         HAProxy per CPU second with nothing else in its handshake, and 1.5× only with at most \
         {:.0} µs around the signature.",
        100.0 * sign / p,
        100.0 * sign / h,
        p - sign,
        h - sign,
        h / sign,
        h / 1.5 - sign
    ))
}

/// Access log lines per handshake or request over every round of (`load`, `kind`), of `ops`.
fn log_per_op(samples: &[(Load, Kind, Sample)], load: Load, kind: Kind, ops: u64) -> String {
    let lines: Vec<u64> = samples
        .iter()
        .filter(|(l, k, _)| *l == load && *k == kind)
        .filter_map(|(_, _, s)| s.log_lines)
        .collect();
    if lines.is_empty() {
        return "-".to_owned();
    }
    format!(
        "{:.2}",
        lines.iter().sum::<u64>() as f64 / ops.max(1) as f64
    )
}

/// The targets for TLS, met or missed, from this run's medians.
fn verdicts(samples: &[(Load, Kind, Sample)], idle: &[Idle]) -> Vec<String> {
    let mark = |ok: bool| if ok { "met" } else { "**missed**" };
    let rate = |load, k| median(&values(samples, load, k, |s| Some(s.rate)));
    let cpu = |load, k| median(&values(samples, load, k, |s| Some(s.cpu_us)));
    let vs = |load| {
        let r = rate(load, Kind::Proxyd) / rate(load, Kind::Haproxy);
        let c = cpu(load, Kind::Haproxy) / cpu(load, Kind::Proxyd);
        (r, c)
    };
    let mut notes = Vec::new();
    let mut line = |what: &str, load: Load, target: f64| {
        let (r, c) = vs(load);
        if r.is_finite() && c.is_finite() {
            notes.push(format!(
                "Target, {what}: ≥ {target:.1}× HAProxy's rate: {}× ({}); per CPU second \
                 (HAProxy's CPU µs/op over proxyd's), what each would do with a core to itself: \
                 {}× ({}).",
                near(r, target),
                mark(r >= target),
                near(c, target),
                mark(c >= target)
            ));
        }
    };
    line("full handshakes/s, ECDSA P-256", Load::FullEcdsa, 1.5);
    line("full handshakes/s, RSA 2048", Load::FullRsa, 1.5);
    line("TLS keep-alive req/s", Load::KeepAlive, 1.2);
    line("HTTP/2 req/s", Load::H2, 1.0);
    for (what, load) in [
        ("full handshakes/s, ECDSA P-256", Load::FullEcdsa),
        ("full handshakes/s, RSA 2048", Load::FullRsa),
        ("resumed handshakes/s", Load::Resumed),
    ] {
        let (ring, aws) = (rate(load, Kind::ProxydRing), rate(load, Kind::Proxyd));
        let (ring_cpu, aws_cpu) = (cpu(load, Kind::ProxydRing), cpu(load, Kind::Proxyd));
        if ring > 0.0 && aws > 0.0 {
            notes.push(format!(
                "ring against aws-lc-rs, {what}: proxyd on ring {ring:.0}, on aws-lc-rs \
                 {aws:.0} ({:.2}×); CPU µs per handshake {ring_cpu:.1} against {aws_cpu:.1} \
                 ({:.2}×).",
                aws / ring,
                aws_cpu / ring_cpu
            ));
        }
    }
    let per = |k: Kind| idle.iter().find(|i| i.kind == k).map(Idle::kib_per_conn);
    if let (Some(p), Some(h)) = (per(Kind::Proxyd), per(Kind::Haproxy).filter(|h| *h > 0.0)) {
        notes.push(format!(
            "Target, memory per idle TLS connection ≤ 0.5× HAProxy's: {p:.1} KiB against \
             {h:.1} KiB, {:.2}× ({}).",
            p / h,
            mark(p / h <= 0.5)
        ));
    }
    notes
}
