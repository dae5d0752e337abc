//! Bench section `rules`: the cost of a frontend's L7 rules per request, from the `rules`
//! cargo bench of proxyd, which loads real configs and routes parsed request heads.

use anyhow::Result;
use serde::Deserialize;

use super::{Ctx, Figure, Section, Table};

/// Routing one request through 1,000 host rules.
const TARGET_NS: f64 = 1000.0;

/// The bench's `--json` line.
#[derive(Debug, Deserialize)]
struct Output {
    batches: u64,
    requests: u64,
    host_rules: u64,
    host_rules_hit_ns: Figure,
    host_rules_miss_ns: Figure,
    host_set_names: u64,
    host_set_hit_ns: Figure,
    path_prefixes: u64,
    path_prefix_hit_ns: Figure,
}

pub async fn run(ctx: &Ctx) -> Result<Section> {
    let batches = ctx.pick(3, 9);
    let o: Output =
        super::proxyd_bench_json("rules", &["--batches".to_string(), batches.to_string()]).await?;
    Ok(section(&o))
}

fn section(o: &Output) -> Section {
    let mut s = Section::new("proxyd's L7 rules: cost per request");
    s.text.push(format!(
        "`cargo bench -p proxyd --bench rules`: configs loaded and compiled as `proxyd check` \
         does, then {} parsed request heads routed per batch (the parse is not counted). Times \
         are the bench thread's CPU time per request, medians (min..max) over {} batches.",
        o.requests, o.batches
    ));
    let mut t = Table::new(&["figure", "measured (ns)", "target", "verdict"]);
    let met = o.host_rules_hit_ns.median < TARGET_NS;
    t.row(vec![
        format!("{} host rules, random host among them", o.host_rules),
        o.host_rules_hit_ns.cell(),
        format!("< {TARGET_NS:.0} ns"),
        if met { "met" } else { "**missed**" }.into(),
    ]);
    t.row(vec![
        format!("{} host rules, host in none", o.host_rules),
        o.host_rules_miss_ns.cell(),
        format!("< {TARGET_NS:.0} ns"),
        if o.host_rules_miss_ns.median < TARGET_NS {
            "met"
        } else {
            "**missed**"
        }
        .into(),
    ]);
    t.row(vec![
        format!("one rule of {} host names", o.host_set_names),
        o.host_set_hit_ns.cell(),
        "-".into(),
        "-".into(),
    ]);
    t.row(vec![
        format!("one rule of {} path prefixes", o.path_prefixes),
        o.path_prefix_hit_ns.cell(),
        "-".into(),
        "-".into(),
    ]);
    s.tables.push(t);
    s.notes.push(
        "Consecutive rules whose only condition is a host are compiled into one hash table \
         (exact names; `*.` and `.` patterns in tables of their own), so routing through them \
         costs one lower-casing of the host and one lookup whatever their number; a host list \
         of one rule is the same table. Path prefixes are a sorted prefix-free array: one \
         binary search."
            .into(),
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bench_output_parses_and_the_target_is_judged() {
        let line = r#"{"batches": 7, "requests": 10000, "host_rules": 1000, "host_rules_hit_ns": {"median": 181.2, "min": 170.0, "max": 240.9}, "host_rules_miss_ns": {"median": 1500.0, "min": 90.0, "max": 1600.0}, "host_set_names": 10000, "host_set_hit_ns": {"median": 150.0, "min": 140.0, "max": 160.0}, "path_prefixes": 1000, "path_prefix_hit_ns": {"median": 210.0, "min": 200.0, "max": 230.0}}"#;
        let o: Output = serde_json::from_str(line).expect("parses");
        let s = section(&o);
        let rows = &s.tables[0].rows;
        assert_eq!(rows[0][1], "181 (170..241)");
        assert_eq!(rows[0][3], "met");
        assert_eq!(rows[1][3], "**missed**");
        assert_eq!(rows[3][0], "one rule of 1000 path prefixes");
    }
}
