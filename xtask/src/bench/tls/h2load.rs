//! h2load's printout read into requests/s, counts and the protocol it negotiated.

use anyhow::{Context, Result, ensure};

/// What one h2load run printed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct H2loadResult {
    pub seconds: f64,
    pub rps: f64,
    /// Requests that got a response (`done`) and, of those, the 2xx.
    pub done: u64,
    pub ok_2xx: u64,
    /// failed + errored + timeout.
    pub failed: u64,
    /// From `Application protocol:` (ALPN), e.g. `h2`.
    pub protocol: String,
}

/// Reads h2load's summary: `finished in`, `requests:`, `status codes:`, `Application protocol:`.
pub fn parse_h2load(text: &str) -> Result<H2loadResult> {
    let mut r = H2loadResult::default();
    let (mut seen_finished, mut seen_requests) = (false, false);
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // "2.00s, 17520.50 req/s, 3.31MB/s"
            let mut parts = rest.split(',').map(str::trim);
            let took = parts.next().context("bad finished line")?;
            r.seconds = parse_seconds(took)?;
            let rps = parts.next().context("no req/s")?;
            r.rps = rps
                .trim_end_matches("req/s")
                .trim()
                .parse()
                .with_context(|| format!("bad req/s {rps:?}"))?;
            seen_finished = true;
        } else if let Some(rest) = line.strip_prefix("requests:") {
            // "35041 total, 35141 started, 35041 done, 35041 succeeded, 0 failed, 0 errored, 0 timeout"
            for part in rest.split(',') {
                let mut w = part.split_whitespace();
                let (Some(n), Some(what)) = (w.next(), w.next()) else {
                    continue;
                };
                let n: u64 = n
                    .parse()
                    .with_context(|| format!("bad count in {part:?}"))?;
                match what {
                    "done" => r.done = n,
                    "failed" | "errored" | "timeout" => r.failed += n,
                    _ => {}
                }
            }
            seen_requests = true;
        } else if let Some(rest) = line.strip_prefix("status codes:") {
            r.ok_2xx = rest
                .split(',')
                .find_map(|p| p.trim().strip_suffix(" 2xx"))
                .context("no 2xx count")?
                .parse()
                .context("bad 2xx count")?;
        } else if let Some(p) = line.strip_prefix("Application protocol:") {
            r.protocol = p.trim().to_owned();
        }
    }
    ensure!(
        seen_finished && seen_requests,
        "no summary (\"finished in\", \"requests:\")"
    );
    Ok(r)
}

/// "2.00s", "812.5ms", "93us" -> seconds.
fn parse_seconds(s: &str) -> Result<f64> {
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.parse().with_context(|| format!("bad duration {s:?}"))?;
    Ok(v * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// h2load 1.52 over TLS with ALPN h2 (its summary; the per-thread lines cut).
    const RUN: &str = "starting benchmark...
spawning thread #0: 10 total client(s). Timing-based test with 0s of warm-up time and 2s of main duration for measurements.
TLS Protocol: TLSv1.3
Cipher: TLS_AES_128_GCM_SHA256
Server Temp Key: X25519 253 bits
Application protocol: h2

finished in 2.00s, 17520.50 req/s, 3.31MB/s
requests: 35041 total, 35141 started, 35041 done, 35031 succeeded, 10 failed, 0 errored, 0 timeout
status codes: 35031 2xx, 0 3xx, 0 4xx, 10 5xx
traffic: 6.62MB (6938118) total, 412.30KB (422197) headers (space savings 92.16%), 2.51MB (2628075) data
";

    #[test]
    fn reads_h2load_output() {
        let r = parse_h2load(RUN).expect("parse");
        assert_eq!(
            r,
            H2loadResult {
                seconds: 2.0,
                rps: 17520.5,
                done: 35041,
                ok_2xx: 35031,
                failed: 10,
                protocol: "h2".to_owned(),
            }
        );
        assert!(parse_h2load("connect: Connection refused\n").is_err());
        assert!((parse_seconds("812.5ms").expect("ms") - 0.8125).abs() < 1e-12);
    }
}
