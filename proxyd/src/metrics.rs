//! Prometheus `/metrics` on the master's metrics listener, from what the workers report.
//!
//! Counters come from the serving generation's worker: they restart from 0 with each new
//! generation, which Prometheus' `rate()` treats as a counter reset.

use std::fmt::Write as _;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::master::Handle;
use crate::model::AdminState;
use proto::proxyd::v1 as api;

/// Serves `GET /metrics` (anything else: 404) until `stop`.
pub async fn serve(handle: Handle, listener: std::net::TcpListener, stop: CancellationToken) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve metrics");
            return;
        }
    };
    loop {
        let (mut stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                let mut n = 0;
                while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return None,
                        Ok(k) => n += k,
                    }
                }
                Some(n)
            })
            .await;
            let Ok(Some(n)) = read else { return };
            let head = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if head.starts_with("GET /metrics ") {
                ("200 OK", render(&handle).await)
            } else {
                ("404 Not Found", "only /metrics here\n".to_owned())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
        });
    }
}

async fn render(handle: &Handle) -> String {
    let mut out = String::new();
    let status = handle.status().await;
    let servers = handle.servers().await;
    if let Some(st) = &status {
        metric(
            &mut out,
            "proxyd_reloads_total",
            "counter",
            "reloads by result",
        );
        let _ = writeln!(
            out,
            "proxyd_reloads_total{{result=\"ok\"}} {}",
            st.reloads_ok
        );
        let _ = writeln!(
            out,
            "proxyd_reloads_total{{result=\"failed\"}} {}",
            st.reloads_failed
        );
        generations(&mut out, &st.generations);
        certificates(&mut out, &st.tls);
    }
    if let Some((_, servers, stick, frontends, backends)) = servers {
        type Fe = crate::control::pb::FrontendStats;
        type Be = crate::control::pb::BackendStats;
        let fe_fields: [Row<Fe>; 5] = [
            (
                "proxyd_frontend_connections_active",
                "gauge",
                "client connections now",
                |f| f.connections_active,
            ),
            (
                "proxyd_frontend_connections_total",
                "counter",
                "client connections accepted",
                |f| f.connections_total,
            ),
            (
                "proxyd_frontend_requests_total",
                "counter",
                "requests received",
                |f| f.requests_total,
            ),
            (
                "proxyd_frontend_requests_denied_total",
                "counter",
                "requests refused by the proxy (400, 408, 431)",
                |f| f.requests_denied,
            ),
            (
                "proxyd_frontend_tls_handshake_failures_total",
                "counter",
                "TLS handshakes that failed or timed out",
                |f| f.tls_handshake_failures,
            ),
        ];
        for (name, kind, help, f) in fe_fields {
            metric(&mut out, name, kind, help);
            for fe in &frontends {
                let _ = writeln!(out, "{name}{{frontend=\"{}\"}} {}", fe.name, f(fe));
            }
        }
        let be_fields: [Row<Be>; 4] = [
            (
                "proxyd_backend_queued",
                "gauge",
                "requests waiting for a server slot",
                |b| b.queued,
            ),
            (
                "proxyd_backend_no_server_total",
                "counter",
                "requests answered 503 for want of a server",
                |b| b.no_server_total,
            ),
            (
                "proxyd_backend_redispatched_total",
                "counter",
                "requests sent to another server than the stuck or first one",
                |b| b.redispatched_total,
            ),
            (
                "proxyd_backend_retries_total",
                "counter",
                "connection retries",
                |b| b.retries_total,
            ),
        ];
        for (name, kind, help, f) in be_fields {
            metric(&mut out, name, kind, help);
            for be in &backends {
                let _ = writeln!(out, "{name}{{backend=\"{}\"}} {}", be.name, f(be));
            }
        }
        type Field = fn(&api::ServerState) -> String;
        let per_server: [(&str, &str, &str, Field); 9] = [
            (
                "proxyd_server_up",
                "gauge",
                "health: 1 up (or unchecked), 0 down",
                |s| u8::from(s.health != "down").to_string(),
            ),
            (
                "proxyd_server_active",
                "gauge",
                "requests or connections being served",
                |s| s.active.to_string(),
            ),
            ("proxyd_server_weight", "gauge", "current weight", |s| {
                s.weight.to_string()
            }),
            (
                "proxyd_server_requests_total",
                "counter",
                "requests sent",
                |s| s.requests_total.to_string(),
            ),
            (
                "proxyd_server_errors_total",
                "counter",
                "failed connects and bad answers",
                |s| s.errors.to_string(),
            ),
            (
                "proxyd_server_idle_pooled",
                "gauge",
                "idle pooled connections",
                |s| s.idle_pooled.to_string(),
            ),
            (
                "proxyd_server_pool_opened_total",
                "counter",
                "connections opened to the server",
                |s| s.pool_opened_total.to_string(),
            ),
            (
                "proxyd_server_pool_reused_total",
                "counter",
                "requests sent on a pooled idle connection",
                |s| s.pool_reused_total.to_string(),
            ),
            (
                "proxyd_server_pool_purged_total",
                "counter",
                "idle connections the pool closed (beyond demand, idle too long, over the cap)",
                |s| s.pool_purged_total.to_string(),
            ),
        ];
        for (name, kind, help, f) in per_server {
            metric(&mut out, name, kind, help);
            for s in &servers {
                let _ = writeln!(out, "{name}{{{}}} {}", labels(s), f(s));
            }
        }
        metric(
            &mut out,
            "proxyd_server_maint",
            "gauge",
            "1 when in maintenance or drain",
        );
        for s in &servers {
            let _ = writeln!(
                out,
                "proxyd_server_maint{{{},state=\"{}\"}} {}",
                labels(s),
                s.admin_state,
                u8::from(s.admin_state != AdminState::Ready.as_str())
            );
        }
        metric(
            &mut out,
            "proxyd_server_responses_total",
            "counter",
            "responses by class",
        );
        for s in &servers {
            for (class, n) in [
                ("1xx", s.responses_1xx),
                ("2xx", s.responses_2xx),
                ("3xx", s.responses_3xx),
                ("4xx", s.responses_4xx),
                ("5xx", s.responses_5xx),
            ] {
                let _ = writeln!(
                    out,
                    "proxyd_server_responses_total{{{},code=\"{class}\"}} {n}",
                    labels(s)
                );
            }
        }
        if let Some(st) = stick {
            for (name, kind, help, v) in [
                (
                    "proxyd_stick_cache_hits_total",
                    "counter",
                    "stick lookups that found a server",
                    st.hits,
                ),
                (
                    "proxyd_stick_cache_misses_total",
                    "counter",
                    "stick lookups that found nothing",
                    st.misses,
                ),
                (
                    "proxyd_stick_cache_entries",
                    "gauge",
                    "live cached entries",
                    st.entries,
                ),
                (
                    "proxyd_stick_pending_writes",
                    "gauge",
                    "stores and touches not yet sent to stickd",
                    st.pending,
                ),
                (
                    "proxyd_stick_dropped_writes_total",
                    "counter",
                    "writes dropped with the buffer full",
                    st.dropped,
                ),
                (
                    "proxyd_stick_stores_sent_total",
                    "counter",
                    "stores sent to stickd",
                    st.stores_sent,
                ),
                (
                    "proxyd_stick_touches_sent_total",
                    "counter",
                    "touches sent to stickd",
                    st.touches_sent,
                ),
                (
                    "proxyd_stickd_link_up",
                    "gauge",
                    "1 while the Watch stream to stickd is up",
                    u64::from(st.link_up),
                ),
            ] {
                metric(&mut out, name, kind, help);
                let _ = writeln!(out, "{name} {v}");
            }
        }
    }
    out
}

/// Each generation's worker: its connections (in all and by serving thread), requests,
/// tunnels and dropped log lines. Each family's samples follow its own HELP and TYPE lines, as
/// the exposition format wants.
fn generations(out: &mut String, generations: &[api::Generation]) {
    type Sample = fn(&api::Worker) -> u64;
    let families: [(&str, &str, &str, Sample); 3] = [
        (
            "proxyd_connections_active",
            "gauge",
            "client connections per generation",
            |w| w.active_connections,
        ),
        (
            "proxyd_requests_total",
            "counter",
            "requests per generation",
            |w| w.requests_total,
        ),
        (
            "proxyd_tunnels_active",
            "gauge",
            "switched connections (WebSocket) per generation",
            |w| w.tunnels_active,
        ),
    ];
    let workers = || {
        generations
            .iter()
            .filter_map(|g| Some((g, g.worker.as_ref()?)))
    };
    for (name, kind, help, sample) in families {
        metric(out, name, kind, help);
        for (g, w) in workers() {
            let _ = writeln!(out, "{name}{{{}}} {}", generation_labels(g), sample(w));
        }
    }
    metric(
        out,
        "proxyd_access_log_dropped_total",
        "counter",
        "access log lines dropped because the log destination could not keep up",
    );
    for (g, w) in workers() {
        let _ = writeln!(
            out,
            "proxyd_access_log_dropped_total{{generation=\"{}\"}} {}",
            g.generation, w.access_log_dropped
        );
    }
    metric(
        out,
        "proxyd_thread_connections_active",
        "gauge",
        "client connections per serving thread of each generation, idle keep-alive ones included",
    );
    for (g, w) in workers() {
        let l = generation_labels(g);
        for (thread, n) in w.thread_connections.iter().enumerate() {
            let _ = writeln!(
                out,
                "proxyd_thread_connections_active{{{l},thread=\"{thread}\"}} {n}"
            );
        }
    }
}

/// The labels naming a generation: its number and its state.
fn generation_labels(g: &api::Generation) -> String {
    let state = match api::GenerationState::try_from(g.state) {
        Ok(api::GenerationState::Serving) => "serving",
        Ok(api::GenerationState::Draining) => "draining",
        _ => "starting",
    };
    format!("generation=\"{}\",state=\"{state}\"", g.generation)
}

/// Each certificate's expiry, one series per DNS name (what an alert names), and the rotations
/// of each TLS setting.
fn certificates(out: &mut String, tls: &[api::TlsCertificates]) {
    if tls.is_empty() {
        return;
    }
    metric(
        out,
        "proxyd_tls_certificate_expiry_timestamp_seconds",
        "gauge",
        "when a served certificate expires (notAfter, unix seconds), per DNS name",
    );
    for set in tls {
        for c in &set.certificates {
            let no_name = [String::new()];
            let names = if c.names.is_empty() {
                &no_name[..]
            } else {
                &c.names[..]
            };
            for name in names {
                let _ = writeln!(
                    out,
                    "proxyd_tls_certificate_expiry_timestamp_seconds{{tls=\"{}\",name=\"{}\",serial=\"{}\"}} {}",
                    escape(&set.name),
                    escape(name),
                    c.serial,
                    c.not_after_unix
                );
            }
        }
    }
    metric(
        out,
        "proxyd_tls_certificate_rotations_total",
        "counter",
        "certificate sets read again without a reload, loaded or refused (unchanged ones are not counted)",
    );
    for set in tls {
        for (result, n) in [
            ("loaded", set.rotations_loaded),
            ("refused", set.rotations_refused),
        ] {
            let _ = writeln!(
                out,
                "proxyd_tls_certificate_rotations_total{{tls=\"{}\",result=\"{result}\"}} {n}",
                escape(&set.name)
            );
        }
    }
    metric(
        out,
        "proxyd_tls_certificate_last_rotation_refused",
        "gauge",
        "1 when the last read of a setting's certificates was refused: its files on disk cannot serve",
    );
    for set in tls {
        let refused = set
            .last_rotation
            .as_ref()
            .is_some_and(|r| r.outcome == api::RotationOutcome::RotationRefused as i32);
        let _ = writeln!(
            out,
            "proxyd_tls_certificate_last_rotation_refused{{tls=\"{}\"}} {}",
            escape(&set.name),
            u8::from(refused)
        );
    }
}

/// A label value in the exposition format: backslash, double quote and newline escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A metric: name, type, help, and how to read it from a reported record.
type Row<T> = (&'static str, &'static str, &'static str, fn(&T) -> u64);

fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn labels(s: &api::ServerState) -> String {
    // Names are restricted to [A-Za-z0-9._-] by the config: nothing to escape.
    format!("backend=\"{}\",server=\"{}\"", s.backend, s.server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("web [::1]:443"), "web [::1]:443");
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn each_serving_thread_has_its_connections() {
        let worker = |thread_connections: Vec<u64>| api::Worker {
            active_connections: thread_connections.iter().sum(),
            thread_connections,
            ..Default::default()
        };
        let reported = [
            api::Generation {
                generation: 1,
                state: api::GenerationState::Draining as i32,
                worker: Some(worker(vec![0, 2])),
                ..Default::default()
            },
            api::Generation {
                generation: 2,
                state: api::GenerationState::Serving as i32,
                worker: Some(worker(vec![3, 4])),
                ..Default::default()
            },
        ];
        let mut out = String::new();
        generations(&mut out, &reported);
        for line in [
            "# TYPE proxyd_thread_connections_active gauge\n",
            "proxyd_thread_connections_active{generation=\"1\",state=\"draining\",thread=\"0\"} 0\n",
            "proxyd_thread_connections_active{generation=\"1\",state=\"draining\",thread=\"1\"} 2\n",
            "proxyd_thread_connections_active{generation=\"2\",state=\"serving\",thread=\"0\"} 3\n",
            "proxyd_thread_connections_active{generation=\"2\",state=\"serving\",thread=\"1\"} 4\n",
            "proxyd_connections_active{generation=\"2\",state=\"serving\"} 7\n",
        ] {
            assert!(out.contains(line), "{line} in\n{out}");
        }
        assert_eq!(out.matches("proxyd_thread_connections_active{").count(), 4);
        // Each family is one group: its HELP, its TYPE, then its samples and nothing else.
        let mut family = "";
        let mut seen = Vec::new();
        for line in out.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                family = rest.split(' ').next().unwrap_or_default();
                assert!(!seen.contains(&family), "{family} twice in\n{out}");
                seen.push(family);
            } else if !line.starts_with('#') {
                assert!(
                    line.starts_with(&format!("{family}{{")),
                    "{line} outside {family}"
                );
            }
        }
    }

    #[test]
    fn each_name_of_each_certificate_has_its_expiry() {
        let tls = [api::TlsCertificates {
            name: "site".to_owned(),
            certificates: vec![
                api::Certificate {
                    names: vec!["a.test".to_owned(), "b.test".to_owned()],
                    serial: "0A".to_owned(),
                    not_after_unix: 2_000_000_000,
                    ..Default::default()
                },
                api::Certificate {
                    serial: "0B".to_owned(),
                    not_after_unix: 1_900_000_000,
                    ..Default::default()
                },
            ],
            last_rotation: Some(api::CertificateRotation {
                outcome: api::RotationOutcome::RotationRefused as i32,
                ..Default::default()
            }),
            rotations_loaded: 2,
            rotations_refused: 1,
        }];
        let mut out = String::new();
        certificates(&mut out, &tls);
        for line in [
            "proxyd_tls_certificate_expiry_timestamp_seconds{tls=\"site\",name=\"a.test\",serial=\"0A\"} 2000000000\n",
            "proxyd_tls_certificate_expiry_timestamp_seconds{tls=\"site\",name=\"b.test\",serial=\"0A\"} 2000000000\n",
            "proxyd_tls_certificate_expiry_timestamp_seconds{tls=\"site\",name=\"\",serial=\"0B\"} 1900000000\n",
            "proxyd_tls_certificate_rotations_total{tls=\"site\",result=\"loaded\"} 2\n",
            "proxyd_tls_certificate_rotations_total{tls=\"site\",result=\"refused\"} 1\n",
            "proxyd_tls_certificate_last_rotation_refused{tls=\"site\"} 1\n",
        ] {
            assert!(out.contains(line), "{line} in\n{out}");
        }
    }
}
