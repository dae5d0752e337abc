//! Medians, spreads, ratios and CPU time read from /proc: the arithmetic every section shares.

use std::time::Duration;

/// Median of `values` (the mean of the middle two for an even count); 0 when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// (min, max) of `values`; (0, 0) when empty.
pub fn spread(values: &[f64]) -> (f64, f64) {
    let mut it = values.iter().copied().filter(|x| x.is_finite());
    let Some(first) = it.next() else {
        return (0.0, 0.0);
    };
    it.fold((first, first), |(lo, hi), x| (lo.min(x), hi.max(x)))
}

/// "median (min..max)" with `digits` decimals; just the median for a single value.
pub fn with_spread(values: &[f64], digits: usize) -> String {
    let m = median(values);
    if values.len() < 2 {
        return format!("{m:.digits$}");
    }
    let (lo, hi) = spread(values);
    format!("{m:.digits$} ({lo:.digits$}..{hi:.digits$})")
}

/// `ours / theirs` as "1.23×", or "n/a" when `theirs` is 0 or either is not a number.
pub fn ratio(ours: f64, theirs: f64) -> String {
    if theirs == 0.0 || !ours.is_finite() || !theirs.is_finite() {
        return "n/a".to_owned();
    }
    format!("{:.2}×", ours / theirs)
}

/// A ratio judged against `target` as "1.23": two digits, or three where two would print the
/// target itself for a ratio on the other side of it (1.496 against 1.5).
pub fn near(value: f64, target: f64) -> String {
    let two = format!("{value:.2}");
    if value != target && two == format!("{target:.2}") {
        return format!("{value:.3}");
    }
    two
}

/// Clock ticks per second for /proc/PID/stat times.
fn clock_ticks() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        // Linux has used 100 on every architecture this runs on.
        _ => 100.0,
    }
}

/// CPU time (user + system) that `root` and its living descendants have used so far, counting
/// what their reaped children used (cutime, cstime), so that workers that exit during a run are
/// still counted by their parent. Take the difference of two readings around a run.
pub fn cpu_time(root: u32) -> Duration {
    let mut pids = crate::harness::descendants(root);
    pids.push(root);
    let ticks: u64 = pids.iter().map(|&p| proc_ticks(p)).sum();
    Duration::from_secs_f64(ticks as f64 / clock_ticks())
}

/// utime + stime + cutime + cstime of one process, 0 if it is gone.
fn proc_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // After "pid (comm) ": state is field 3, utime 14 .. cstime 17 (1-based).
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    rest.split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|s| s.parse::<u64>().ok())
        .sum()
}

/// Resident memory of `root` and its descendants, bytes.
pub fn rss_tree(root: u32) -> u64 {
    let mut pids = crate::harness::descendants(root);
    pids.push(root);
    pids.iter().map(|&p| rss_bytes(p)).sum()
}

/// Resident set size of one process in bytes (VmRSS), 0 if it is gone.
pub fn rss_bytes(pid: u32) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ratio_near_its_target_shows_the_digit_that_decides() {
        assert_eq!(near(1.4963, 1.5), "1.496");
        assert_eq!(near(1.5, 1.5), "1.50");
        assert_eq!(near(1.4, 1.5), "1.40");
        assert_eq!(near(0.8004, 0.8), "0.800");
    }

    #[test]
    fn median_and_spread() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(spread(&[4.0, 1.0, 3.0]), (1.0, 4.0));
        assert_eq!(with_spread(&[10.0, 12.0, 11.0], 0), "11 (10..12)");
        assert_eq!(with_spread(&[10.0], 1), "10.0");
        assert_eq!(ratio(3.0, 2.0), "1.50×");
        assert_eq!(ratio(3.0, 0.0), "n/a");
    }

    #[test]
    fn own_cpu_time_grows() {
        let before = cpu_time(std::process::id());
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(200) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let after = cpu_time(std::process::id());
        assert!(after > before, "{before:?} -> {after:?}");
        assert!(rss_bytes(std::process::id()) > 0);
    }
}
