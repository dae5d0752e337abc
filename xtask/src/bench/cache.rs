//! Bench section `cache`: proxyd's stick cache on its own (lookup, store, memory per entry), from
//! the `stick_cache` cargo bench of proxyd, which fills the real `StickCache` without stickd.

use anyhow::Result;
use serde::Deserialize;

use super::{Ctx, Figure, Section, Table};

/// The stick cache's targets.
const LOOKUP_TARGET_NS: f64 = 100.0;
const BYTES_TARGET: f64 = 120.0;

/// The bench's `--json` line.
#[derive(Debug, Deserialize)]
struct Output {
    entries: u64,
    key_len: u64,
    servers: u64,
    shards: u64,
    batches: u64,
    batch: u64,
    hot_set: u64,
    lookup_hit_ns: Figure,
    lookup_hot_ns: Figure,
    lookup_miss_ns: Figure,
    store_ns: Figure,
    /// One dependent random access to as much memory as the cache holds: the machine's floor.
    memory_access_ns: Figure,
    /// The cache's memory on transparent huge pages (None where /proc does not say).
    huge_page_bytes: Option<u64>,
    bytes_per_entry: f64,
    bytes_per_entry_minus_key: f64,
    rss_bytes_per_entry: Option<f64>,
}

fn verdict(met: bool) -> String {
    if met { "met" } else { "**missed**" }.to_owned()
}

pub async fn run(ctx: &Ctx) -> Result<Section> {
    let entries = ctx.pick(200_000, 1_000_000);
    let batches = ctx.pick(3, 9);
    let o: Output = super::proxyd_bench_json(
        "stick_cache",
        &[
            "--entries".to_string(),
            entries.to_string(),
            "--batches".to_string(),
            batches.to_string(),
        ],
    )
    .await?;
    Ok(section(&o))
}

fn section(o: &Output) -> Section {
    let mut s = Section::new("proxyd's stick cache: lookup time, memory per entry");
    s.text.push(format!(
        "`cargo bench -p proxyd --bench stick_cache`: the worker's real `StickCache` (no stickd), \
         filled through the Watch path with {} entries of {}-character PHPSESSID-like keys over {} \
         servers ({} shards per table). Times are the bench thread's CPU time per operation \
         (so that waiting for a CPU on a shared machine is not counted), medians (min..max) over \
         {} batches of {} operations. Hits look keys up in random order over the whole table, so \
         that nearly every lookup misses the CPU caches; the hot set repeats {} keys, as the \
         sessions active at one moment do. A store is a new key, including its place in the write \
         buffer for stickd. Memory is the heap the filled cache holds, counted by a counting \
         allocator (requested bytes), and the growth of the process's RSS (what malloc really \
         took).",
        o.entries, o.key_len, o.servers, o.shards, o.batches, o.batch, o.hot_set
    ));
    let mut t = Table::new(&["figure", "measured", "target", "verdict"]);
    let hit = o.lookup_hit_ns.median;
    t.row(vec![
        format!("lookup, hit, random over {} entries (ns)", o.entries),
        o.lookup_hit_ns.cell(),
        format!("< {LOOKUP_TARGET_NS:.0} ns"),
        verdict(hit < LOOKUP_TARGET_NS),
    ]);
    t.row(vec![
        format!("lookup, hit, hot set of {} keys (ns)", o.hot_set),
        o.lookup_hot_ns.cell(),
        format!("< {LOOKUP_TARGET_NS:.0} ns"),
        verdict(o.lookup_hot_ns.median < LOOKUP_TARGET_NS),
    ]);
    t.row(vec![
        "lookup, miss (ns)".into(),
        o.lookup_miss_ns.cell(),
        format!("< {LOOKUP_TARGET_NS:.0} ns"),
        verdict(o.lookup_miss_ns.median < LOOKUP_TARGET_NS),
    ]);
    let floor = o.memory_access_ns.median;
    t.row(vec![
        "one random memory access, same size, same run (ns)".into(),
        o.memory_access_ns.cell(),
        "-".into(),
        format!("random hit = {:.2}x this", hit / floor),
    ]);
    t.row(vec![
        "store of a new key (ns)".into(),
        o.store_ns.cell(),
        "-".into(),
        "-".into(),
    ]);
    t.row(vec![
        "heap bytes per entry".into(),
        format!("{:.1}", o.bytes_per_entry),
        "-".into(),
        "-".into(),
    ]);
    t.row(vec![
        "heap bytes per entry minus the key".into(),
        format!("{:.1}", o.bytes_per_entry_minus_key),
        format!("<= {BYTES_TARGET:.0} + key"),
        verdict(o.bytes_per_entry_minus_key <= BYTES_TARGET),
    ]);
    t.row(vec![
        "RSS growth per entry".into(),
        o.rss_bytes_per_entry
            .map_or("n/a".into(), |r| format!("{r:.1}")),
        "-".into(),
        "-".into(),
    ]);
    t.row(vec![
        "of which on huge pages (MiB)".into(),
        o.huge_page_bytes
            .map_or("n/a".into(), |b| format!("{}", b >> 20)),
        "-".into(),
        "-".into(),
    ]);
    s.tables.push(t);
    s.notes.push(
        "No ratio against HAProxy here: its stick table is internal to the haproxy process \
         and has no counterpart that can be measured alone; the end-to-end cost of stick rules \
         against HAProxy's is in the HTTP section."
            .into(),
    );
    s.notes.push(format!(
        "An entry is 56 bytes in a hash bucket (the key inline up to 30 bytes, an absolute \
         expiry, stickd's version, a 16-bit index into the shard's interned server names) and \
         one control byte; hashbrown keeps at most 7/8 of its buckets full and doubles, so at \
         {} entries the table holds {:.2} buckets per entry. A lookup hashes the key once \
         (foldhash, seeded at random per process and table: cookie values come from clients), \
         locks one of {} shards, and reads the control bytes and the bucket. When the table is \
         far larger than the CPU caches both are memory accesses, which is what the random-order \
         figure measures: the shards' tables are on huge pages (no page walk per access) and the \
         lookup prefetches the key's home bucket while the control bytes load, so that the two \
         accesses overlap. The memory-access row is the floor under it: a chase through a ring \
         of cache lines as big as the cache, allocated the same way, one dependent access per \
         step. The hot set and the misses show the rest: hashing, the shard's lock and the \
         clock read.",
        o.entries,
        o.bytes_per_entry / 57.0,
        o.shards,
    ));
    let hot = o.lookup_hot_ns.median;
    s.notes
        .push(match (hit < LOOKUP_TARGET_NS, hot < LOOKUP_TARGET_NS) {
            (true, _) => "Lookup target met even with random keys over the whole table.".into(),
            (false, true) => format!(
                "Lookup target missed with random keys over the whole table ({hit:.0} ns, \
                 {:.2}x one random memory access of this machine, {floor:.0} ns, measured in \
                 the same run: no lookup whose entry is in no CPU cache can beat that access), \
                 met for the hot set ({hot:.0} ns).",
                hit / floor
            ),
            (false, false) => format!(
                "Lookup target missed: {hit:.0} ns with random keys, {hot:.0} ns for the hot set \
             (CPU time on this machine during this run)."
            ),
        });
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bench_output_parses_and_targets_are_judged() {
        let line = r#"{"entries": 1000000, "key_len": 26, "servers": 2, "shards": 64, "batches": 7, "batch": 100000, "fill_s": 0.860, "hot_set": 2000, "lookup_hit_ns": {"median": 514.3, "min": 468.0, "max": 595.9}, "lookup_hot_ns": {"median": 61.0, "min": 58.2, "max": 70.1}, "lookup_miss_ns": {"median": 218.1, "min": 147.5, "max": 249.0}, "store_ns": {"median": 1153.0, "min": 1031.4, "max": 1208.8}, "memory_access_ns": {"median": 257.0, "min": 250.0, "max": 270.0}, "huge_page_bytes": 100663296, "bytes_per_entry": 119.5, "bytes_per_entry_minus_key": 93.5, "rss_bytes_per_entry": null}"#;
        let o: Output = serde_json::from_str(line).expect("parses");
        let s = section(&o);
        let rows = &s.tables[0].rows;
        assert_eq!(rows[0][1], "514 (468..596)");
        assert_eq!(rows[0][3], "**missed**");
        assert_eq!(rows[1][3], "met");
        assert_eq!(rows[3][3], "random hit = 2.00x this");
        assert_eq!(rows[6][1], "93.5");
        assert_eq!(rows[6][3], "met");
        assert_eq!(rows[7][1], "n/a");
        assert_eq!(rows[8][1], "96");
        assert!(
            s.notes[2].contains("2.00x one random memory access")
                && s.notes[2].contains("met for the hot set (61 ns)"),
            "{}",
            s.notes[2]
        );
    }
}
