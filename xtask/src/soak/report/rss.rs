//! The RSS of each daemon over the run: samples per process lifetime, each lifetime's warm-up
//! left out, and the trend as a slope in MiB per hour.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// A daemon whose RSS grows faster than this over the second half of the run is a violation.
pub const RSS_SLOPE_LIMIT_MIB_PER_H: f64 = 10.0;
/// Slopes are judged only over at least this long: a minute's noise, extrapolated to an hour,
/// says nothing.
pub const RSS_MIN_SPAN: Duration = Duration::from_secs(300);
/// The first minute of each process lifetime is left out of the slope: allocator arenas and the
/// stick cache fill then, which is growth to a plateau, not a trend.
pub const LIFETIME_WARM_UP_S: f64 = 60.0;
/// stickd's warm-up is longer: its change log, sled's journal and the allocator's pages grow for
/// half an hour at the soak's 2-3 stick writes per second before they level off. Unkilled at that
/// load, stickd went from 32.7 MiB to 36.2-36.5 in 10 minutes (19-21 MiB/h) and to 38.5-40.2 in
/// 30, then stayed there (39.0-40.0 at 50 minutes); a slope fitted earlier in a lifetime reads
/// that warm-up as a leak, and one fitted after it still shows a leak of 10 MiB/h.
pub const STICKD_WARM_UP_S: f64 = 30.0 * 60.0;

/// One RSS sample of one daemon kind on one node: seconds into the run, MiB, and which
/// processes it summed (a different set starts a new lifetime).
#[derive(Clone, Debug, PartialEq)]
pub struct RssSample {
    pub t: f64,
    pub mib: f64,
    pub pids: Vec<u32>,
}

/// The samples of `series` taken at least `warm_up` seconds after the first sample of their
/// lifetime (a run of samples with the same pids).
pub fn settled(series: &[RssSample], warm_up: f64) -> Vec<RssSample> {
    series
        .chunk_by(|a, b| a.pids == b.pids)
        .flat_map(|life| {
            let born = life[0].t;
            life.iter().filter(move |s| s.t >= born + warm_up).cloned()
        })
        .collect()
}

/// Every sample as CSV (`t_s,node,daemon,mib,pids`), for a closer look than the slope.
pub fn rss_csv(rss: &BTreeMap<(usize, Daemon), Vec<RssSample>>) -> String {
    let mut out = String::from("t_s,node,daemon,mib,pids\n");
    for ((node, daemon), series) in rss {
        for s in series {
            let pids: Vec<String> = s.pids.iter().map(u32::to_string).collect();
            let _ = writeln!(
                out,
                "{:.1},node{},{},{:.2},{}",
                s.t,
                node + 1,
                daemon.name(),
                s.mib,
                pids.join(" ")
            );
        }
    }
    out
}

/// Seconds from the first to the last of `samples`.
pub(super) fn span_s(samples: &[RssSample]) -> f64 {
    let (lo, hi) = samples
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), s| {
            (lo.min(s.t), hi.max(s.t))
        });
    (hi - lo).max(0.0)
}

/// Least-squares slope in MiB per hour, with one intercept per lifetime (a run of samples with
/// the same pids): a restarted daemon starts small, and a plain fit across restarts would read
/// its drop and regrowth as a trend. `None` if no lifetime has two samples at distinct times.
pub fn slope_mib_per_hour(samples: &[RssSample]) -> Option<f64> {
    let mut num = 0.0;
    let mut den = 0.0;
    for seg in samples.chunk_by(|a, b| a.pids == b.pids) {
        let n = seg.len() as f64;
        let mt = seg.iter().map(|s| s.t).sum::<f64>() / n;
        let my = seg.iter().map(|s| s.mib).sum::<f64>() / n;
        for s in seg {
            num += (s.t - mt) * (s.mib - my);
            den += (s.t - mt) * (s.t - mt);
        }
    }
    (den > 0.0).then(|| num / den * 3600.0)
}

/// The daemon kinds whose RSS is followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Daemon {
    Fdkeeper,
    Stickd,
    ProxydMaster,
    ProxydWorkers,
}

impl Daemon {
    /// Seconds left out at the start of each lifetime (see [`STICKD_WARM_UP_S`]).
    pub fn warm_up_s(self) -> f64 {
        match self {
            Self::Stickd => STICKD_WARM_UP_S,
            _ => LIFETIME_WARM_UP_S,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Fdkeeper => "fdkeeper",
            Self::Stickd => "stickd",
            Self::ProxydMaster => "proxyd master",
            Self::ProxydWorkers => "proxyd workers",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soak::report::fixtures::series;

    #[test]
    fn each_lifetime_warm_up_is_left_out() {
        // Two lifetimes that each grow in their first minute and then stay flat: no trend.
        let mut pts = Vec::new();
        for (pid, born) in [(1, 0.0), (2, 300.0)] {
            for i in 0..30 {
                let t = born + f64::from(i) * 10.0;
                let mib = if t - born < 60.0 {
                    30.0 + (t - born) / 6.0
                } else {
                    40.0
                };
                pts.push((t, mib, pid));
            }
        }
        let all = series(&pts);
        assert!(
            slope_mib_per_hour(&all).is_some_and(|s| s > 10.0),
            "warm-up reads as growth"
        );
        let calm = settled(&all, LIFETIME_WARM_UP_S);
        assert_eq!(calm.len(), 2 * 24);
        assert_eq!(slope_mib_per_hour(&calm), Some(0.0));
    }

    #[test]
    fn slope_of_a_steady_leak_is_its_rate_per_hour() {
        // 1 MiB every 360 s = 10 MiB/h.
        let pts: Vec<(f64, f64, u32)> = (0..10)
            .map(|i| (f64::from(i) * 360.0, 50.0 + f64::from(i), 7))
            .collect();
        let got = slope_mib_per_hour(&series(&pts)).expect("slope");
        assert!((got - 10.0).abs() < 1e-9, "{got}");
        let flat: Vec<(f64, f64, u32)> = (0..10).map(|i| (f64::from(i) * 10.0, 50.0, 7)).collect();
        assert_eq!(slope_mib_per_hour(&series(&flat)), Some(0.0));
    }

    #[test]
    fn a_restart_is_not_a_trend_but_a_leak_across_restarts_still_shows() {
        // Flat at 80 MiB, restarted at 40 MiB, flat again: a plain fit would say it shrinks.
        let pts = [
            (0.0, 80.0, 1),
            (10.0, 80.0, 1),
            (20.0, 80.0, 1),
            (30.0, 40.0, 2),
            (40.0, 40.0, 2),
        ];
        assert_eq!(slope_mib_per_hour(&series(&pts)), Some(0.0));
        // Growing 0.1 MiB per 10 s in both lifetimes: 36 MiB/h.
        let pts = [
            (0.0, 80.0, 1),
            (10.0, 80.1, 1),
            (20.0, 80.2, 1),
            (30.0, 40.0, 2),
            (40.0, 40.1, 2),
        ];
        let got = slope_mib_per_hour(&series(&pts)).expect("slope");
        assert!((got - 36.0).abs() < 1e-6, "{got}");
        // Single-sample lifetimes carry no slope.
        assert_eq!(
            slope_mib_per_hour(&series(&[(0.0, 1.0, 1), (10.0, 9.0, 2)])),
            None
        );
        assert_eq!(slope_mib_per_hour(&[]), None);
    }
}
