//! The peers section of the report: replication lag and equal tables, ours against HAProxy's.

use std::time::Duration;

use super::{CLIENTS_PER_NODE, Equal, HAPROXY_SIZE, POLL, Plan, Run, SAMPLE, SIZE};
use crate::bench::stats::{median, ratio, with_spread};
use crate::bench::{Section, Table};

/// "median (min..max)" of the runs that ended equal, and how many did not within the bound.
fn fmt_equal(runs: &[&Equal]) -> String {
    let ms: Vec<f64> = runs.iter().filter_map(|e| e.ms()).collect();
    let not: Vec<(Duration, u64)> = runs
        .iter()
        .filter_map(|e| match e {
            Equal::Not { bound, differ } => Some((*bound, *differ)),
            Equal::After(_) => None,
        })
        .collect();
    let mut s = if ms.is_empty() {
        String::new()
    } else {
        with_spread(&ms, 0)
    };
    if let Some((bound, _)) = not.first() {
        let differ: Vec<String> = not.iter().map(|(_, d)| d.to_string()).collect();
        if !s.is_empty() {
            s.push_str("; ");
        }
        s.push_str(&format!(
            "not equal after {:.0} s in {} of {} rounds ({} sessions differ)",
            bound.as_secs_f64(),
            not.len(),
            runs.len(),
            differ.join(", ")
        ));
    }
    s
}

/// Median in ms of the runs that ended equal; infinite when any did not (it missed the bound).
fn median_ms(runs: &[&Equal]) -> f64 {
    let ms: Vec<f64> = runs.iter().filter_map(|e| e.ms()).collect();
    if ms.len() < runs.len() {
        f64::INFINITY
    } else {
        median(&ms)
    }
}

/// Whether `ours` is at least as fast as `theirs` (times in ms, lower is better), as a phrase,
/// and whether it counts as met. A gap within `resolution` is a tie: the method cannot see it.
fn verdict(what: &str, ours: f64, theirs: f64, resolution: f64) -> (String, bool) {
    let show = |v: f64| {
        if v.is_finite() {
            format!("{v:.0} ms")
        } else {
            "not within the bound".to_owned()
        }
    };
    let (word, met) = if ours <= theirs {
        ("met", true)
    } else if ours.is_finite() && ours - theirs <= resolution {
        ("met within the resolution", true)
    } else {
        ("missed", false)
    };
    (
        format!(
            "{what}: **{word}** (median {} for stickd against {} for HAProxy)",
            show(ours),
            show(theirs)
        ),
        met,
    )
}

/// Copies missing during the load expressed as time: how many ms of new sessions a table was
/// behind the answers on average (median copies missing over the three tables / 3 / sessions
/// per second).
fn lag_ms(r: &Run) -> f64 {
    if r.rate > 0.0 {
        r.behind_median / 3.0 / r.rate * 1000.0
    } else {
        f64::NAN
    }
}

pub(super) fn section(
    plan: Plan,
    rounds: usize,
    version: &str,
    ours: &[Run],
    theirs: &[Run],
) -> Section {
    let mut s = Section::new("Replication across three nodes: stickd against HAProxy peers");
    s.text.push(format!(
        "Three nodes on 127.0.0.1-3 in front of the same two demo backends. Ours: fdkeeper + \
         stickd + proxyd per node with the seed's sticky rule, stickd peered in a full mesh over \
         gRPC. Theirs: three HAProxy {version} processes (`nbthread 1`, foreground, `-L \
         haproxyN`) in one `peers mypeers` section, with the seed's `stick-table type string \
         len 32 size {HAPROXY_SIZE} expire 5m peers mypeers`, `stick on req.cook(PHPSESSID)` and \
         `stick store-response res.cook(PHPSESSID)`. Both tables are sized {SIZE} so that \
         nothing is evicted (the seed's 5k would be full in a second); HAProxy's global \
         `maxconn` is 8000 instead of the seed's 20000, which needs more file descriptors than \
         this machine allows; its health checks are proxyd's (`inter 300ms fall 2`, `timeout \
         check 1s`), and the seed's `log`, `chroot`, `user` and `daemon` lines are left out. The client is ours: {CLIENTS_PER_NODE} keep-alive connections \
         per node sending cookie-less requests, so that every answer sets a new `PHPSESSID` and \
         stores one new session on the node that served it. Tables are read as an operator \
         would: stickd's `ListTables` (entry count) and paged `Show` over gRPC, HAProxy's `show \
         table` on each process's stats socket. {rounds} round(s), one fresh cluster per system \
         and round, the two systems alternating; medians with (min..max) over the rounds."
    ));
    s.text.push(format!(
        "**Resync of a restarted node**: the tables are filled with {} sessions (the same for \
         both systems), node 3's table holder is killed with SIGKILL (stickd for ours, while its \
         proxyd keeps serving from its cache; the HAProxy process for theirs), {} more sessions \
         are written on nodes 1-2, and node 3 is started again with the same command line. The \
         time runs from that start until its table holds the same keys and servers as the \
         others' (bounded at {:.0} s). stickd restarts from its sled data and is sent only what \
         it missed; a restarted HAProxy starts empty and learns the whole table from its peers.",
        plan.fill,
        plan.extra,
        plan.resync_bound.as_secs_f64()
    ));
    s.text.push(format!(
        "**New sessions**: then the load runs at all three nodes at once for {:.0} s. \"Copies \
         missing\" is the sum over the nodes of the sessions answered so far minus the entries \
         that node's table holds (each session has its own key, stored once): the copies \
         replication still owes, sampled every {} ms during the load and once as it stops. After \
         the load the tables are polled every {} ms (the entry count of each node, then a full \
         read of the three tables once the counts agree) until they hold the same keys and \
         servers, every session included, bounded at {:.0} s.",
        plan.load.as_secs_f64(),
        SAMPLE.as_millis(),
        POLL.as_millis(),
        plan.converge_bound.as_secs_f64()
    ));

    let col = |runs: &[Run], f: &dyn Fn(&Run) -> f64, digits: usize| {
        let v: Vec<f64> = runs.iter().map(f).filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return ("n/a".to_owned(), f64::NAN);
        }
        (with_spread(&v, digits), median(&v))
    };
    let header = ["", "stickd + proxyd", "HAProxy peers", "stickd / HAProxy"];
    let num_row = |t: &mut Table, name: &str, f: &dyn Fn(&Run) -> f64| {
        let (o, om) = col(ours, f, 0);
        let (h, hm) = col(theirs, f, 0);
        t.row(vec![name.to_owned(), o, h, ratio(om, hm)]);
    };
    let eq_row = |t: &mut Table, name: &str, f: &dyn Fn(&Run) -> &Equal| {
        let o: Vec<&Equal> = ours.iter().map(f).collect();
        let h: Vec<&Equal> = theirs.iter().map(f).collect();
        t.row(vec![
            name.to_owned(),
            fmt_equal(&o),
            fmt_equal(&h),
            ratio(median_ms(&o), median_ms(&h)),
        ]);
    };
    let answered = |r: &Run| {
        r.resync_answered
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };

    let mut t = Table::new(&header);
    num_row(
        &mut t,
        "sessions in the tables when node 3 is killed",
        &|r| r.base as f64,
    );
    num_row(
        &mut t,
        "sessions written on nodes 1-2 while node 3 is down",
        &|r| r.extra as f64,
    );
    num_row(
        &mut t,
        "ms from the restart until node 3 answers a table read",
        &answered,
    );
    eq_row(
        &mut t,
        "ms from the restart until node 3's table equals the others' (lower is better)",
        &|r| &r.resync,
    );
    s.tables.push(t);

    let mut t = Table::new(&header);
    num_row(
        &mut t,
        "new sessions stored per second, 3 nodes (higher is better)",
        &|r| r.rate,
    );
    num_row(&mut t, "sessions created", &|r| r.sessions as f64);
    num_row(&mut t, "failed requests", &|r| r.failed as f64);
    num_row(
        &mut t,
        "copies missing during the load, median of the samples (lower is better)",
        &|r| r.behind_median,
    );
    num_row(
        &mut t,
        "lag during the load: ms of new sessions a table was behind on average, median copies missing / 3 / sessions per second (lower is better)",
        &lag_ms,
    );
    num_row(
        &mut t,
        "copies missing during the load, largest sample (lower is better)",
        &|r| r.behind_max as f64,
    );
    num_row(
        &mut t,
        "copies missing as the load stops (lower is better)",
        &|r| r.missing_at_stop as f64,
    );
    eq_row(
        &mut t,
        "ms from the end of the load until the 3 tables are equal (lower is better)",
        &|r| &r.converge,
    );
    s.tables.push(t);

    let conv = |runs: &[Run]| median_ms(&runs.iter().map(|r| &r.converge).collect::<Vec<_>>());
    let resync = |runs: &[Run]| median_ms(&runs.iter().map(|r| &r.resync).collect::<Vec<_>>());
    let up = |runs: &[Run]| median(&runs.iter().map(answered).collect::<Vec<_>>());
    let lag = |runs: &[Run]| median(&runs.iter().map(lag_ms).collect::<Vec<_>>());
    let poll = POLL.as_secs_f64() * 1000.0;
    let verdicts = [
        // Samples are 100 ms apart and read in a few ms: no tie margin beyond the figures.
        verdict("Lag while new sessions arrive", lag(ours), lag(theirs), 0.0),
        verdict(
            "Tables equal after the load",
            conv(ours),
            conv(theirs),
            poll,
        ),
        verdict(
            "Resync of a restarted node",
            resync(ours),
            resync(theirs),
            poll,
        ),
    ];
    let all_met = verdicts.iter().all(|(_, met)| *met);
    s.notes.push(format!(
        "Target (replication at least as fast as HAProxy's peers): **{}**. {}. A gap \
         within one poll interval ({} ms) counts as a tie.",
        if all_met { "met" } else { "missed" },
        verdicts
            .iter()
            .map(|(v, _)| v.as_str())
            .collect::<Vec<_>>()
            .join(". "),
        POLL.as_millis()
    ));
    s.notes.push(
        "Why stickd's tables lag while sessions arrive: a proxyd worker never waits on stickd in \
         the request path; it writes a new session into its own cache at once and sends stores \
         to stickd in batches (under a steady flow, a call per `STORE_GATHER`, 5 ms, in \
         proxyd/src/stick/flush.rs), and stickd then pushes them to its peers. HAProxy writes the entry in the request path and its peers applet \
         pushes it right away."
            .to_owned(),
    );
    if resync(ours).is_finite() && resync(theirs).is_finite() {
        s.notes.push(format!(
            "Where the resync time goes: the restarted stickd answers after {:.0} ms (process \
             start, opening sled and loading the entries it had) and then catches up in {:.0} \
             ms; the restarted HAProxy answers after {:.0} ms and is equal {:.0} ms later \
             (medians of the rounds).",
            up(ours),
            (resync(ours) - up(ours)).max(0.0),
            up(theirs),
            (resync(theirs) - up(theirs)).max(0.0)
        ));
    }
    s.notes.push(format!(
        "A time is taken when the entry counts of the three nodes agree (one small request \
         per node, polled every {} ms), once the full reads that follow have found the \
         contents equal: figures under one poll interval are at the resolution of the method, \
         and one that was already equal at the first read mostly measures that read. Sessions \
         per second depend mostly on the proxies' request \
         handling (the HTTP section measures that alone); here they are the rate the \
         replication had to keep up with.",
        POLL.as_millis()
    ));
    s
}
