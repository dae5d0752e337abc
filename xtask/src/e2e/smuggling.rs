//! HTTP smuggling corpus: hundreds of request variants through a real proxyd to a hyper and a
//! naive Python backend, and response variants from a raw backend, each judged against a strict
//! reading of the bytes sent.
//!
//! A request variant passes when proxyd refuses it (4xx, or a close before anything reaches a
//! backend) or when each backend sees exactly the one request a strict parser reads in it (same
//! method, target, host and decoded body length), and nothing else. Each variant's requests carry
//! its tag (`/vNNNN`); requests hidden in its body carry `/hNNNN`, and untagged requests or parse
//! errors on a backend connection are charged to the variant whose request came before them there.
//! `XTASK_SMUGGLING_VARIANT=NAME` sends only the variants whose name contains NAME.

mod backends;
mod corpus;
mod responses;
mod strict;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Outcome, Scenario, figure};
use crate::cluster::{Node, NodeOptions};
use crate::harness::Env;
use backends::{Event, HyperBackend, PythonBackend, RawBackend, Seen};
use corpus::Variant;

/// Variants in flight at once, each on its own connection.
const CONCURRENCY: usize = 32;
/// A client gives up on an answer after this long.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// After an answer, how long the client keeps its connection open, so that whatever proxyd
/// made of bytes left after the first request reaches the backends before the count.
const LINGER: Duration = Duration::from_millis(300);
/// Variant bytes printed with a failure (the full bytes when few variants were selected).
const PRINT_BYTES: usize = 240;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::new(
            "smuggling-requests",
            "200+ request variants through proxyd to hyper and a naive Python backend: each refused with 4xx or forwarded as exactly the one request a strict parser reads",
            120,
            |env| Box::pin(requests(env)),
        ),
        Scenario::new(
            "smuggling-responses",
            "response variants from a raw backend: the client sees 502 or exactly what a strict parser frames",
            60,
            |env| Box::pin(responses(env)),
        ),
    ]
}

/// The variants the environment selects (all of them by default).
fn selected(all: Vec<Variant>) -> Vec<Variant> {
    match std::env::var("XTASK_SMUGGLING_VARIANT") {
        Ok(f) if !f.is_empty() => all.into_iter().filter(|v| v.name.contains(&f)).collect(),
        _ => all,
    }
}

fn shown(v: &Variant, few: bool) -> String {
    let bytes = if few {
        &v.bytes[..]
    } else {
        &v.bytes[..v.bytes.len().min(PRINT_BYTES)]
    };
    let more = if bytes.len() < v.bytes.len() {
        "..."
    } else {
        ""
    };
    format!("b\"{}\"{more}", corpus::escape(bytes))
}

/// What the client got back.
#[derive(Clone, Debug)]
enum Answer {
    Status(u16),
    /// Closed (or reset) without a byte of answer.
    Closed,
    /// Nothing within [`ANSWER_TIMEOUT`], and the connection still open.
    Silent,
    Garbled(String),
}

/// Sends `bytes` on a new connection and reads what comes back, within [`ANSWER_TIMEOUT`].
async fn send(addr: SocketAddr, bytes: &[u8], linger: Duration) -> (Answer, Vec<u8>) {
    let Ok(Ok(mut s)) = tokio::time::timeout(ANSWER_TIMEOUT, TcpStream::connect(addr)).await else {
        return (Answer::Closed, Vec::new());
    };
    // A proxy that refuses early may close before taking every byte: the answer still counts.
    let _ = s.write_all(bytes).await;
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let mut buf = Vec::new();
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read_buf(&mut buf)).await {
            Err(_) => {
                timed_out = true;
                break;
            }
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(_)) if strict::response(&buf).is_ok() && !linger.is_zero() => {
                let mut rest = Vec::new();
                let _ = tokio::time::timeout(linger, s.read_buf(&mut rest)).await;
                buf.extend_from_slice(&rest);
                break;
            }
            Ok(Ok(_)) => {}
        }
    }
    let answer = match strict::response(&buf) {
        Ok(r) => Answer::Status(r.status),
        Err(_) if buf.is_empty() && timed_out => Answer::Silent,
        Err(_) if buf.is_empty() => Answer::Closed,
        Err(e) => Answer::Garbled(format!(
            "{e:?}: {}",
            corpus::escape(&buf[..buf.len().min(120)])
        )),
    };
    (answer, buf)
}

/// What one backend saw of each variant, by the rules in this module's doc.
#[derive(Default)]
struct Attributed {
    by_variant: HashMap<usize, Vec<Seen>>,
    /// Seen before any tagged request on its connection: no variant to charge.
    orphans: Vec<Seen>,
}

fn attribute(mut events: Vec<Event>) -> Attributed {
    events.sort_by_key(|e| (e.conn, e.seq));
    let mut out = Attributed::default();
    let mut last: Option<(u64, usize)> = None;
    for e in events {
        let prev = last.filter(|(c, _)| *c == e.conn).map(|(_, id)| id);
        let blame: Vec<usize> = match &e.seen {
            Seen::Request { target, .. } => match corpus::find_tag(target, 'v') {
                Some(id) => {
                    last = Some((e.conn, id));
                    vec![id]
                }
                None => corpus::find_tag(target, 'h').or(prev).into_iter().collect(),
            },
            Seen::Rejected { raw, .. } | Seen::Incomplete { raw, .. } => {
                let tags = corpus::all_tags(raw, 'v');
                if tags.is_empty() {
                    prev.into_iter().collect()
                } else {
                    tags
                }
            }
        };
        if blame.is_empty() {
            out.orphans.push(e.seen);
            continue;
        }
        for id in blame {
            out.by_variant.entry(id).or_default().push(e.seen.clone());
        }
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Refused,
    Intact,
}

/// Whether `seen` is what a backend should receive for `req`.
fn same(req: &strict::Request, seen: &Seen) -> bool {
    let Seen::Request {
        method,
        target,
        hosts,
        body,
    } = seen
    else {
        return false;
    };
    let hosts: Vec<String> = hosts
        .iter()
        .map(|h| h.trim_matches([' ', '\t']).to_ascii_lowercase())
        .collect();
    let want: Vec<String> = req.host.iter().map(|h| h.to_ascii_lowercase()).collect();
    *method == req.method
        && (*target == req.target || *target == req.origin_form)
        && hosts == want
        && *body == req.body
}

/// One variant on one backend: refused, forwarded intact, or why neither. When a strict parser
/// reads several requests (a body that a lenient reader would take for a request, after a
/// framing field that a strict one ignores), the backend must see the first ones in order:
/// proxyd may refuse the rest, never forward anything else.
fn judge(
    expect: &Result<Vec<strict::Request>, strict::Error>,
    answer: &Answer,
    seen: &[Seen],
) -> std::result::Result<Verdict, String> {
    if seen.is_empty() {
        return match answer {
            Answer::Status(s) if (400..500).contains(s) => Ok(Verdict::Refused),
            Answer::Closed => Ok(Verdict::Refused),
            Answer::Status(s) => Err(format!("answered {s} but the backend saw nothing")),
            Answer::Silent => Err(format!(
                "no answer within {ANSWER_TIMEOUT:?}, nothing reached the backend"
            )),
            Answer::Garbled(g) => Err(format!("garbled answer {g}")),
        };
    }
    let reqs = match expect {
        Ok(r) => r,
        Err(e) => {
            return Err(format!(
                "a strict parser refuses it ({e:?}) but it was forwarded; the backend saw {}",
                backends::show(seen)
            ));
        }
    };
    // In any order: they may have come on different backend connections.
    if seen.len() <= reqs.len() {
        let mut unused: Vec<&strict::Request> = reqs[..seen.len()].iter().collect();
        let all_matched = seen
            .iter()
            .all(|s| match unused.iter().position(|r| same(r, s)) {
                Some(i) => {
                    unused.swap_remove(i);
                    true
                }
                None => false,
            });
        if all_matched {
            return Ok(Verdict::Intact);
        }
    }
    let want: Vec<String> = reqs
        .iter()
        .map(|r| {
            format!(
                "{} {} (host {:?}, body {})",
                r.method, r.target, r.host, r.body
            )
        })
        .collect();
    Err(format!(
        "expected {}; the backend saw {}",
        want.join(" then "),
        backends::show(seen)
    ))
}

async fn requests(mut env: Env) -> Result<Outcome> {
    let hyper = HyperBackend::start(env.free_port(2)?).await?;
    let python_addr = env.free_port(4)?;
    let python = PythonBackend::start(&env, python_addr).await?;
    let mut nodes = Vec::new();
    for (host, name, addr) in [(1, "hyper", hyper.addr), (3, "python", python.addr)] {
        let node = Node::start(
            &mut env,
            NodeOptions {
                host,
                servers: Some(vec![(name.to_owned(), addr)]),
                ..NodeOptions::default()
            },
        )
        .await?;
        nodes.push((name, node));
    }
    // The readiness probes are not variants.
    let (hyper_mark, python_mark) = (hyper.mark(), python.mark()?);

    let variants = selected(corpus::requests());
    ensure!(!variants.is_empty(), "no variant selected");
    let few = variants.len() <= 5;
    let started = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = Vec::new();
    for v in &variants {
        for (b, (_, node)) in nodes.iter().enumerate() {
            let (gate, addr, bytes, id) = (Arc::clone(&gate), node.frontend, v.bytes.clone(), v.id);
            tasks.push(tokio::spawn(async move {
                let _permit = gate.acquire_owned().await;
                (id, b, send(addr, &bytes, LINGER).await.0)
            }));
        }
    }
    let mut answers: HashMap<(usize, usize), Answer> = HashMap::new();
    for t in tasks {
        let (id, b, a) = t.await?;
        answers.insert((id, b), a);
    }
    // What proxyd still had in hand reaches the backends.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent_in = started.elapsed();
    let seen = [
        attribute(hyper.events_since(hyper_mark)),
        attribute(python.events_since(python_mark)?),
    ];

    let (mut refused, mut intact, mut failed, mut strict_ok, mut refused_valid) = (0, 0, 0, 0, 0);
    for v in &variants {
        let expect = strict::requests(&v.bytes);
        strict_ok += usize::from(expect.is_ok());
        let mut verdicts = Vec::new();
        let mut why = Vec::new();
        for (b, (name, _)) in nodes.iter().enumerate() {
            let seen_here = seen[b].by_variant.get(&v.id).map_or(&[][..], Vec::as_slice);
            let answer = answers.get(&(v.id, b)).cloned().unwrap_or(Answer::Silent);
            match judge(&expect, &answer, seen_here) {
                Ok(verdict) => verdicts.push(verdict),
                Err(e) => why.push(format!("[{name}] {e}")),
            }
        }
        if !why.is_empty() {
            failed += 1;
            println!("    FAILED #{} {}: {}", v.id, v.name, why.join("; "));
            println!("      sent {}", shown(v, few));
        } else if verdicts.iter().all(|&x| x == Verdict::Refused) {
            refused += 1;
            refused_valid += usize::from(expect.is_ok());
        } else {
            intact += 1;
        }
    }
    for (b, (name, _)) in nodes.iter().enumerate() {
        for o in &seen[b].orphans {
            println!("    FAILED [{name}] no variant to charge with {o}");
        }
    }
    let orphans: usize = seen.iter().map(|s| s.orphans.len()).sum();
    figure(
        "variants",
        format!(
            "{} request variants x 2 backends (hyper, python) in {:.1}s; a strict parser accepts {strict_ok}",
            variants.len(),
            sent_in.as_secs_f64()
        ),
    );
    figure(
        "outcome",
        format!("refused 4xx: {refused}, forwarded intact: {intact}, failed: {failed}"),
    );
    figure(
        "refused although a strict parser accepts them",
        refused_valid,
    );
    figure("backend events charged to no variant", orphans);
    ensure!(
        failed == 0 && orphans == 0,
        "{failed} of {} variants failed, {orphans} backend events charged to no variant",
        variants.len()
    );
    Ok(Outcome::Pass)
}

async fn responses(mut env: Env) -> Result<Outcome> {
    let variants = selected(responses::all());
    let all = responses::all();
    let raw = RawBackend::start(
        env.free_port(6)?,
        all.iter().map(|v| v.bytes.clone()).collect(),
    )
    .await?;
    let node = Node::start(
        &mut env,
        NodeOptions {
            host: 5,
            servers: Some(vec![("raw".to_owned(), raw.addr)]),
            ..NodeOptions::default()
        },
    )
    .await?;
    ensure!(!variants.is_empty(), "no variant selected");
    let few = variants.len() <= 5;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for v in &variants {
        let (addr, id) = (node.frontend, v.id);
        tasks.push(tokio::spawn(async move {
            let req = format!("GET /r{id:04} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            send(addr, req.as_bytes(), Duration::ZERO).await.1
        }));
    }
    let (mut bad_gateway, mut exact, mut truncated, mut failed) = (0, 0, 0, 0);
    for (v, t) in variants.iter().zip(tasks) {
        let got = t.await?;
        let expect = strict::response(&v.bytes);
        let client = strict::response(&got);
        let ok = match (&expect, &client) {
            (_, Ok(c)) if c.status == 502 && c.len == got.len() => {
                bad_gateway += 1;
                true
            }
            (Ok(e), Ok(c)) if c.status == e.status && c.body == e.body && c.len == got.len() => {
                exact += 1;
                true
            }
            // The head was on its way when the body turned out bad: a close is all that is left.
            (Err(_), Err(strict::Error::Incomplete)) => {
                truncated += 1;
                true
            }
            _ => false,
        };
        if !ok {
            failed += 1;
            println!(
                "    FAILED #{} {}: a strict parser reads the backend's response as {:?}, the client got {}",
                v.id,
                v.name,
                expect.as_ref().map(|r| (r.status, corpus::escape(&r.body))),
                format_args!(
                    "b\"{}\"",
                    corpus::escape(&got[..got.len().min(PRINT_BYTES)])
                )
            );
            println!("      backend sent {}", shown(v, few));
        }
    }
    figure(
        "variants",
        format!(
            "{} response variants in {:.1}s",
            variants.len(),
            started.elapsed().as_secs_f64()
        ),
    );
    figure(
        "outcome",
        format!(
            "502: {bad_gateway}, framed as a strict parser does: {exact}, closed mid-body after a bad body: {truncated}, failed: {failed}"
        ),
    );
    ensure!(
        failed == 0,
        "{failed} of {} response variants failed",
        variants.len()
    );
    Ok(Outcome::Pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(target: &str, body: usize) -> Seen {
        Seen::Request {
            method: "POST".into(),
            target: target.into(),
            hosts: vec!["x".into()],
            body,
        }
    }

    #[test]
    fn smuggled_requests_are_charged_to_the_variant_before_them() {
        let ev = |conn, seq, seen| Event { conn, seq, seen };
        let a = attribute(vec![
            ev(1, 2, request("ACE ;/x", 0)),
            ev(1, 1, request("/v0007/innocent", 0)),
            ev(
                1,
                3,
                Seen::Rejected {
                    reason: "400".into(),
                    raw: "AAAA".into(),
                },
            ),
            ev(2, 1, request("/h0009/hidden", 0)),
            ev(3, 1, request("/untagged", 0)),
            ev(
                3,
                2,
                Seen::Rejected {
                    reason: "400".into(),
                    raw: "POST /v0011/ HTTP/1.1".into(),
                },
            ),
        ]);
        assert_eq!(a.by_variant[&7].len(), 3);
        assert_eq!(a.by_variant[&9].len(), 1);
        assert_eq!(a.by_variant[&11].len(), 1);
        assert_eq!(a.orphans, vec![request("/untagged", 0)]);
    }

    #[test]
    fn judging() {
        let ok =
            strict::requests(b"POST /v0001/ HTTP/1.1\r\nHost: X\r\nContent-Length: 2\r\n\r\nab");
        let refused = Answer::Status(400);
        assert_eq!(judge(&ok, &refused, &[]), Ok(Verdict::Refused));
        assert_eq!(
            judge(&ok, &Answer::Status(200), &[request("/v0001/", 2)]),
            Ok(Verdict::Intact)
        );
        assert!(judge(&ok, &Answer::Status(200), &[request("/v0001/", 0)]).is_err());
        assert!(
            judge(
                &ok,
                &Answer::Status(200),
                &[request("/v0001/", 2), request("/h0001/", 0)]
            )
            .is_err()
        );
        assert!(judge(&ok, &Answer::Status(200), &[]).is_err());
        assert!(judge(&ok, &Answer::Silent, &[]).is_err());
        let bad =
            strict::requests(b"POST /v0001/ HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\nab");
        assert!(judge(&bad, &Answer::Status(200), &[request("/v0001/", 2)]).is_err());
        let absolute = strict::requests(b"GET http://evil/v0001/ HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut seen = request("http://evil/v0001/", 0);
        if let Seen::Request { method, .. } = &mut seen {
            *method = "GET".into();
        }
        assert!(judge(&absolute, &Answer::Status(200), &[seen]).is_err());
    }
}
