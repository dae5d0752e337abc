//! The soak's report: what the run measured, rendered as markdown, and every broken promise in
//! it listed as a violation.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use super::events::{Cause, Event, EventKind, Failure, Move, attribute, excuse};
use super::rss::{
    Daemon, LIFETIME_WARM_UP_S, RSS_MIN_SPAN, RSS_SLOPE_LIMIT_MIB_PER_H, RssSample,
    STICKD_WARM_UP_S, settled, slope_mib_per_hour, span_s,
};

/// Per traffic class: requests and failures.
#[derive(Clone, Debug, Default)]
pub struct ClassTotals {
    pub requests: u64,
    pub failed: u64,
}

/// Everything the run measured.
#[derive(Debug)]
pub struct Run {
    pub seed: u64,
    pub minutes: f64,
    pub elapsed: Duration,
    pub partition_method: &'static str,
    pub classes: BTreeMap<&'static str, ClassTotals>,
    pub failures: Vec<Failure>,
    /// Failures past the recording cap (counted as violations: nothing attributes them).
    pub unrecorded_failures: u64,
    pub events: Vec<Event>,
    pub moves: Vec<Move>,
    pub sessions: u64,
    pub uploaded_bytes: u64,
    /// Ok(time to equal tables and entries) or the difference after the settle time.
    pub tables: Result<(Duration, usize), String>,
    pub rss: BTreeMap<(usize, Daemon), Vec<RssSample>>,
}

/// The report's text and whether the run kept every promise.
pub struct Verdict {
    pub text: String,
    pub violations: Vec<String>,
}

pub fn render(run: &Run) -> Verdict {
    let mut v = Vec::new();
    let mut t = String::new();
    let requests: u64 = run.classes.values().map(|c| c.requests).sum();
    let secs = run.elapsed.as_secs_f64().max(1e-9);
    let _ = writeln!(t, "# Soak report\n");
    let _ = writeln!(
        t,
        "- {:.1} minutes asked, {:.1} s of traffic; seed {} (replay: `cargo xtask soak --minutes {} --seed {}`)",
        run.minutes, secs, run.seed, run.minutes, run.seed
    );
    let _ = writeln!(t, "- partition: {}", run.partition_method);
    let _ = writeln!(
        t,
        "- requests: {requests} ({:.1} req/s), {} sticky sessions created, {:.1} MiB uploaded",
        requests as f64 / secs,
        run.sessions,
        run.uploaded_bytes as f64 / (1024.0 * 1024.0)
    );

    let _ = writeln!(
        t,
        "\n## Traffic\n\n| class | requests | failed |\n|---|---:|---:|"
    );
    for (name, c) in &run.classes {
        let _ = writeln!(t, "| {name} | {} | {} |", c.requests, c.failed);
    }

    let _ = writeln!(
        t,
        "\n## Events\n\n| event | count | not ok | mean time to whole (s) |\n|---|---:|---:|---:|"
    );
    for kind in EventKind::ALL {
        let es: Vec<&Event> = run.events.iter().filter(|e| e.kind == kind).collect();
        let bad = es.iter().filter(|e| !e.ok).count();
        let mean = if es.is_empty() {
            0.0
        } else {
            es.iter()
                .map(|e| (e.end - e.start).as_secs_f64())
                .sum::<f64>()
                / es.len() as f64
        };
        let _ = writeln!(t, "| {} | {} | {bad} | {mean:.2} |", kind.name(), es.len());
        for e in es.iter().filter(|e| !e.ok) {
            v.push(format!(
                "{} on node{} at +{:.1}s: {}",
                kind.name(),
                e.node + 1,
                e.start.as_secs_f64(),
                e.note
            ));
        }
    }

    let mut causes: BTreeMap<Cause, u64> = BTreeMap::new();
    let mut samples: BTreeMap<Cause, &Failure> = BTreeMap::new();
    for f in &run.failures {
        let c = attribute(f, &run.events);
        *causes.entry(c).or_default() += 1;
        samples.entry(c).or_insert(f);
    }
    if run.unrecorded_failures > 0 {
        *causes.entry(Cause::Violation(None)).or_default() += run.unrecorded_failures;
    }
    let _ = writeln!(t, "\n## Failures by cause\n");
    if causes.is_empty() {
        let _ = writeln!(t, "none");
    } else {
        let _ = writeln!(t, "| cause | count | first |\n|---|---:|---|");
    }
    for (c, n) in &causes {
        let first = samples.get(c).map_or(String::new(), |f| {
            format!(
                "+{:.3}s node{} {} {}: {}",
                f.started.as_secs_f64(),
                f.node + 1,
                f.class,
                f.kind.name(),
                f.why
            )
        });
        let _ = writeln!(t, "| {} | {n} | {} |", c.name(), first.replace('|', "/"));
        if matches!(c, Cause::Violation(_)) {
            v.push(format!("{n} failed requests: {}", c.name()));
        }
    }

    let mut excused: BTreeMap<EventKind, u64> = BTreeMap::new();
    let mut unexcused = 0u64;
    let mut listed = String::new();
    for m in &run.moves {
        match excuse(m, &run.events) {
            Some(k) => *excused.entry(k).or_default() += 1,
            None => {
                unexcused += 1;
                if unexcused <= 10 {
                    let _ = writeln!(
                        listed,
                        "- +{:.3}s on node{}: {} -> {} (entry from node{} at +{:.3}s)",
                        m.at.as_secs_f64(),
                        m.node + 1,
                        m.from,
                        m.to,
                        m.holder + 1,
                        m.since.as_secs_f64()
                    );
                }
            }
        }
    }
    let _ = writeln!(
        t,
        "\n## Sticky moves\n\n{} moves: {unexcused} not excused by any event{}",
        run.moves.len(),
        excused
            .iter()
            .map(|(k, n)| format!(", {n} after a {}", k.name()))
            .collect::<String>()
    );
    t.push_str(&listed);
    if unexcused > 0 {
        v.push(format!(
            "{unexcused} sticky moves not after a kill or partition of the node holding the entry"
        ));
    }

    let _ = writeln!(t, "\n## Stick tables at the end\n");
    match &run.tables {
        Ok((took, n)) => {
            let _ = writeln!(
                t,
                "equal on every node after {:.2} s of settling ({n} entries)",
                took.as_secs_f64()
            );
        }
        Err(why) => {
            let _ = writeln!(t, "NOT equal: {why}");
            v.push(format!("stick tables differ at the end: {why}"));
        }
    }

    let half = run.elapsed.as_secs_f64() / 2.0;
    let judged = Duration::from_secs_f64(half) >= RSS_MIN_SPAN;
    let _ = writeln!(
        t,
        "\n## RSS (MiB, sampled from /proc)\n\nSlope: least squares over the second half (from +{half:.0}s), one intercept per process lifetime, each lifetime's first {LIFETIME_WARM_UP_S:.0} s left out (stickd's first {:.0} min: n/a until a stickd lives longer; node1's is never killed); limit {RSS_SLOPE_LIMIT_MIB_PER_H} MiB/h{}.\n\n| node | daemon | first | last | max | samples | slope MiB/h |\n|---|---|---:|---:|---:|---:|---:|",
        STICKD_WARM_UP_S / 60.0,
        if judged {
            String::new()
        } else {
            format!(
                " (not judged: the second half is shorter than {} s)",
                RSS_MIN_SPAN.as_secs()
            )
        }
    );
    for ((node, daemon), series) in &run.rss {
        let late: Vec<RssSample> = settled(series, daemon.warm_up_s())
            .into_iter()
            .filter(|s| s.t >= half)
            .collect();
        // A few samples just past a long warm-up say nothing about an hour either.
        let slope = (span_s(&late) >= RSS_MIN_SPAN.as_secs_f64())
            .then(|| slope_mib_per_hour(&late))
            .flatten();
        let first = series.first().map_or(0.0, |s| s.mib);
        let last = series.last().map_or(0.0, |s| s.mib);
        let max = series.iter().map(|s| s.mib).fold(0.0, f64::max);
        let over = judged && slope.is_some_and(|s| s > RSS_SLOPE_LIMIT_MIB_PER_H);
        let _ = writeln!(
            t,
            "| node{} | {} | {first:.1} | {last:.1} | {max:.1} | {} | {}{} |",
            node + 1,
            daemon.name(),
            series.len(),
            slope.map_or("n/a".into(), |s| format!("{s:+.1}")),
            if over { " OVER" } else { "" }
        );
        if over {
            v.push(format!(
                "node{} {} RSS grows {:+.1} MiB/h (limit {RSS_SLOPE_LIMIT_MIB_PER_H})",
                node + 1,
                daemon.name(),
                slope.unwrap_or_default()
            ));
        }
    }

    let _ = writeln!(t, "\n## Verdict\n");
    if v.is_empty() {
        let _ = writeln!(t, "no violation");
    } else {
        for line in &v {
            let _ = writeln!(t, "- VIOLATION: {line}");
        }
    }
    Verdict {
        text: t,
        violations: v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soak::report::fixtures::{addr, event, failure, s, series};

    /// A run of `minutes` with nothing but `rss` to judge.
    fn quiet_run(minutes: u64, rss: BTreeMap<(usize, Daemon), Vec<RssSample>>) -> Run {
        Run {
            seed: 1,
            minutes: minutes as f64,
            elapsed: s(minutes * 60),
            partition_method: "test",
            classes: BTreeMap::new(),
            failures: Vec::new(),
            unrecorded_failures: 0,
            events: Vec::new(),
            moves: Vec::new(),
            sessions: 0,
            uploaded_bytes: 0,
            tables: Ok((s(0), 0)),
            rss,
        }
    }

    /// stickd's RSS every 10 s over one lifetime of `minutes`: 21 MiB/h for its first 10
    /// minutes, 10 MiB/h until 30, then `after` MiB/h (the shape measured unkilled at the soak's
    /// load, with `after` = 3).
    fn stickd_life(pid: u32, born: f64, minutes: u32, after: f64) -> Vec<(f64, f64, u32)> {
        (0..minutes * 6)
            .map(|i| {
                let age = f64::from(i) * 10.0;
                let h = |a: f64| a / 3600.0;
                let mib = 32.7
                    + 21.0 * h(age.min(600.0))
                    + 10.0 * h(age.clamp(600.0, 1800.0) - 600.0)
                    + after * h((age - 1800.0).max(0.0));
                (born + age, mib, pid)
            })
            .collect()
    }

    #[test]
    fn stickd_is_judged_past_its_warm_up_and_a_leak_on_top_still_fails() {
        let judge = |minutes: u64, series_of: &dyn Fn(f64) -> Vec<(f64, f64, u32)>| {
            let mut rss = BTreeMap::new();
            rss.insert((0, Daemon::Stickd), series(&series_of(0.0)));
            render(&quiet_run(minutes, rss)).violations
        };
        // Killed every 6 minutes: its warm-up only, never judged.
        let short = |_: f64| {
            (0..10)
                .flat_map(|k| stickd_life(k + 1, f64::from(k) * 360.0, 6, 3.0))
                .collect()
        };
        assert!(judge(60, &short).is_empty());
        // One lifetime of an hour: judged over its second half, after the warm-up.
        assert!(judge(60, &|born| stickd_life(1, born, 60, 3.0)).is_empty());
        // The same with a leak of 10 MiB/h on top of the warm-up's tail.
        let leak = judge(60, &|born| stickd_life(1, born, 60, 13.0));
        assert_eq!(leak.len(), 1, "{leak:?}");
        assert!(leak[0].contains("node1 stickd RSS grows +13.0"), "{leak:?}");
        // A 30-minute run cannot see past the warm-up: not judged, rather than judged on it.
        assert!(judge(30, &|born| stickd_life(1, born, 30, 13.0)).is_empty());
    }

    #[test]
    fn the_verdict_lists_every_violation() {
        let mut rss = BTreeMap::new();
        // 20 minutes, growing 1 MiB per minute = 60 MiB/h.
        rss.insert(
            (0, Daemon::ProxydWorkers),
            series(
                &(0..120)
                    .map(|i| (f64::from(i) * 10.0, 30.0 + f64::from(i) / 6.0, 3))
                    .collect::<Vec<_>>(),
            ),
        );
        let mut kill = event(EventKind::KillWorker, 0, 100, 101);
        kill.killed_conns.insert(addr(40000));
        let mut refused = event(EventKind::Reload, 1, 300, 301);
        refused.ok = false;
        refused.note = "refused".into();
        let run = Run {
            seed: 42,
            minutes: 20.0,
            elapsed: s(1200),
            partition_method: "test",
            classes: BTreeMap::new(),
            failures: vec![
                failure(0, 40000, 90, 99, 100),
                failure(0, 40001, 90, 500, 500),
            ],
            unrecorded_failures: 0,
            events: vec![kill, refused],
            moves: vec![Move {
                node: 0,
                holder: 1,
                at: s(700),
                since: s(650),
                from: "app1".into(),
                to: "app2".into(),
                seen: vec![None, None, None],
            }],
            sessions: 1,
            uploaded_bytes: 0,
            tables: Err("node2 has 1 entry more".into()),
            rss,
        };
        let verdict = render(&run);
        assert_eq!(verdict.violations.len(), 5, "{:#?}", verdict.violations);
        assert!(verdict.text.contains("+60.0 OVER"), "{}", verdict.text);
        assert!(
            verdict
                .text
                .contains("| expected: in flight on the killed worker | 1 |")
        );
    }
}
