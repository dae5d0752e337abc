//! wrk's printout read into requests/s, latency percentiles and counts.

use anyhow::{Context, Result, bail, ensure};

use super::WrkResult;

/// Reads wrk's summary (with `--latency`): totals, requests/s, p50/p99, errors.
pub fn parse_wrk(text: &str) -> Result<WrkResult> {
    let mut r = WrkResult::default();
    let mut seen_total = false;
    let mut seen_rps = false;
    let mut in_distribution = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with("Latency Distribution") {
            in_distribution = true;
            continue;
        }
        if in_distribution {
            if let Some((pct, value)) = line.split_once('%') {
                match pct.trim() {
                    "50" => r.p50_ms = parse_latency_ms(value.trim())?,
                    "99" => r.p99_ms = parse_latency_ms(value.trim())?,
                    _ => {}
                }
                continue;
            }
            in_distribution = false;
        }
        if let Some((count, rest)) = line.split_once(" requests in ") {
            r.requests = parse_count(count)?;
            let took = rest.split(',').next().unwrap_or_default();
            r.seconds = parse_latency_ms(took)? / 1000.0;
            seen_total = true;
        } else if let Some(v) = line.strip_prefix("Requests/sec:") {
            r.rps = v
                .trim()
                .parse()
                .with_context(|| format!("bad Requests/sec {v:?}"))?;
            seen_rps = true;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = parse_count(v)?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 12, write 0, timeout 3"
            for part in v.split(',') {
                let n = part
                    .split_whitespace()
                    .nth(1)
                    .context("bad Socket errors line")?;
                r.socket_errors += parse_count(n)?;
            }
        }
    }
    ensure!(
        seen_total && seen_rps,
        "no summary (\"N requests in\", \"Requests/sec:\")"
    );
    Ok(r)
}

/// "812.00us", "1.75ms", "1.02s", "2.00m" -> milliseconds.
fn parse_latency_ms(s: &str) -> Result<f64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().with_context(|| format!("bad duration {s:?}"))?;
    let scale = match unit {
        "us" => 0.001,
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => bail!("bad duration unit in {s:?}"),
    };
    Ok(v * scale)
}

/// "45532", "22.89k", "1.20M" -> a count.
fn parse_count(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, scale) = match s.chars().last() {
        Some('k') => (&s[..s.len() - 1], 1e3),
        Some('M') => (&s[..s.len() - 1], 1e6),
        Some('G') => (&s[..s.len() - 1], 1e9),
        _ => (s, 1.0),
    };
    let v: f64 = num.parse().with_context(|| format!("bad count {s:?}"))?;
    Ok((v * scale).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// wrk 4.1 to a demo backend, keep-alive (real output).
    const KEEPALIVE: &str = "Running 2s test @ http://127.0.0.1:19001/index.php
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.23ms    1.48ms   9.81ms   79.45%
    Req/Sec    22.89k     6.11k   32.35k    50.00%
  Latency Distribution
     50%    1.75ms
     75%    2.68ms
     90%    4.36ms
     99%    7.05ms
  45532 requests in 2.00s, 9.81MB read
Requests/sec:  22730.39
Transfer/sec:      4.90MB
";

    /// wrk 4.1 against a backend killed halfway (real output): socket errors, µs latencies.
    const KILLED: &str = "Running 2s test @ http://127.0.0.1:57611/index.php
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   417.80us    0.91ms  10.48ms   91.13%
    Req/Sec    19.17k     7.78k   32.69k    58.33%
  Latency Distribution
     50%  148.00us
     75%  199.00us
     90%    1.12ms
     99%    4.76ms
  22918 requests in 2.00s, 4.94MB read
  Socket errors: connect 0, read 5, write 28860, timeout 0
Requests/sec:  11436.81
Transfer/sec:      2.46MB";

    /// wrk 4.1 on a path the backend does not serve (real output): every answer a 404.
    const NOT_FOUND: &str = "Running 1s test @ http://127.0.0.1:56071/nope
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    17.66ms   27.05ms 144.96ms   91.11%
    Req/Sec     4.64k     1.57k    6.41k    55.56%
  Latency Distribution
     50%    8.65ms
     75%   12.42ms
     90%   42.54ms
     99%  133.57ms
  4513 requests in 1.02s, 828.56KB read
  Non-2xx or 3xx responses: 4513
Requests/sec:   4414.33
Transfer/sec:    810.44KB";

    #[test]
    fn reads_wrk_output() {
        let r = parse_wrk(KEEPALIVE).expect("parse");
        assert_eq!(r.requests, 45532);
        assert!((r.seconds - 2.0).abs() < 1e-9);
        assert!((r.rps - 22730.39).abs() < 1e-6);
        assert!((r.p50_ms - 1.75).abs() < 1e-9);
        assert!((r.p99_ms - 7.05).abs() < 1e-9);
        assert_eq!((r.non_2xx, r.socket_errors), (0, 0));

        let r = parse_wrk(KILLED).expect("parse");
        assert_eq!(r.requests, 22918);
        assert!((r.p50_ms - 0.148).abs() < 1e-9);
        assert!((r.p99_ms - 4.76).abs() < 1e-9);
        assert_eq!((r.non_2xx, r.socket_errors), (0, 28865));

        let r = parse_wrk(NOT_FOUND).expect("parse");
        assert_eq!((r.requests, r.non_2xx, r.socket_errors), (4513, 4513, 0));
        assert!((r.seconds - 1.02).abs() < 1e-9);
        assert!((r.p99_ms - 133.57).abs() < 1e-9);
    }

    #[test]
    fn units() {
        assert_eq!(parse_count("22.89k").expect("k"), 22890);
        assert_eq!(parse_count("1.20M").expect("M"), 1_200_000);
        assert_eq!(parse_count(" 45532 ").expect("plain"), 45532);
        assert!((parse_latency_ms("2.00m").expect("m") - 120_000.0).abs() < 1e-9);
        assert!((parse_latency_ms("1.02s").expect("s") - 1020.0).abs() < 1e-9);
        assert!(parse_latency_ms("3.0xs").is_err());
        assert!(parse_count("many").is_err());
    }

    #[test]
    fn output_without_summary_is_an_error() {
        assert!(parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n").is_err());
        let cut = KEEPALIVE.replace("Requests/sec:  22730.39\n", "");
        assert!(parse_wrk(&cut).is_err());
    }
}
