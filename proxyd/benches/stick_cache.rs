//! The stick cache's figures: lookup (hit, miss) and store time, and heap bytes per
//! entry, measured on the real `StickCache` filled with PHPSESSID-like keys (no stickd). Times
//! are the thread's CPU time per operation, medians over batches, beside this machine's own
//! floor: one random access to as much memory as the cache holds, measured in the same run.
//!
//! `cargo bench -p proxyd --bench stick_cache -- [--entries N] [--batches B] [--json]`

use std::hint::black_box;
use std::time::Instant;

use common::time::coarse_now_ms;
use common::time::thread_cpu_ns;
use proto::stick::v1 as pb;
use proxyd::stick::{CountingAlloc, TableAlloc};
use proxyd::stick::{KeyKind, SHARDS, StickCache};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// PHP's default session id: 26 characters, 5 bits each.
const KEY_LEN: usize = 26;
const ALPHABET: &[u8; 32] = b"0123456789abcdefghijklmnopqrstuv";
const SERVERS: [&str; 2] = ["app1", "app2"];
/// Keys of the "hot set" lookups.
const HOT_SET: usize = 2000;

/// xorshift64*: reproducible keys and orders without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn key(&mut self) -> String {
        let mut k = String::with_capacity(KEY_LEN);
        let mut bits = 0u64;
        for i in 0..KEY_LEN {
            if i % 12 == 0 {
                bits = self.next();
            }
            k.push(char::from(ALPHABET[(bits & 31) as usize]));
            bits >>= 5;
        }
        k
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

struct Args {
    entries: usize,
    batches: usize,
    json: bool,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        entries: 1_000_000,
        batches: 7,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut number = |what: &str| -> Result<usize, String> {
            it.next()
                .and_then(|v| v.replace('_', "").parse().ok())
                .ok_or(format!("{what} needs a number"))
        };
        match arg.as_str() {
            "--entries" => a.entries = number("--entries")?,
            "--batches" => a.batches = number("--batches")?,
            "--json" => a.json = true,
            // cargo bench passes --bench to every bench target.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.entries < 1000 || a.batches == 0 {
        return Err("--entries must be at least 1000 and --batches at least 1".into());
    }
    Ok(a)
}

/// Resident set size from /proc/self/statm, if readable.
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Anonymous memory on transparent huge pages, from /proc/self/smaps_rollup.
fn huge_page_bytes() -> Option<u64> {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
    let line = rollup.lines().find(|l| l.starts_with("AnonHugePages:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A cache line of the pointer chase: the index of the next line to visit, and padding.
type Line = [u64; 8];

/// `bytes` of memory, from the allocator and in the pages the cache's tables use, linked into
/// one random cycle of cache lines (Sattolo's shuffle): following it makes every access depend
/// on the one before, as a lookup's bucket depends on its hash.
fn chase_ring(bytes: usize, rng: &mut Rng) -> allocator_api2::vec::Vec<Line, TableAlloc> {
    let lines = (bytes / size_of::<Line>()).max(2);
    let mut order: Vec<u64> = (0..lines as u64).collect();
    for i in (1..lines).rev() {
        let j = (rng.next() % i as u64) as usize;
        order.swap(i, j);
    }
    let mut ring = allocator_api2::vec::Vec::with_capacity_in(lines, TableAlloc::default());
    ring.resize(lines, [0u64; 8]);
    for w in 0..lines {
        ring[order[w] as usize][0] = order[(w + 1) % lines];
    }
    ring
}

/// CPU ns per step of `steps` along the ring.
fn chase(ring: &[Line], steps: usize) -> f64 {
    let mut at = 0usize;
    let start = cpu_ns();
    for _ in 0..steps {
        at = black_box(ring[at][0]) as usize;
    }
    black_box(at);
    cpu_ns().saturating_sub(start) as f64 / steps as f64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Median, min and max of one figure over the batches.
struct Figure {
    median: f64,
    min: f64,
    max: f64,
}

impl Figure {
    fn of(mut v: Vec<f64>) -> Figure {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Figure {
            median: median(&mut v),
            min,
            max,
        }
    }

    fn json(&self) -> String {
        format!(
            "{{\"median\": {:.1}, \"min\": {:.1}, \"max\": {:.1}}}",
            self.median, self.min, self.max
        )
    }
}

/// This thread's CPU time: on a shared machine wall time would count the time spent waiting
/// for a CPU (the cache pollution by others' work is counted either way).
fn cpu_ns() -> u64 {
    thread_cpu_ns().unwrap_or_else(|e| panic!("clock_gettime: {e}"))
}

/// CPU ns per call of `f` over `keys`.
fn time_batch(keys: &[&str], mut f: impl FnMut(&str)) -> f64 {
    let start = cpu_ns();
    for k in keys {
        f(black_box(k));
    }
    cpu_ns().saturating_sub(start) as f64 / keys.len() as f64
}

fn main() {
    let args = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("stick_cache: {e}");
            std::process::exit(64);
        }
    };
    let n = args.entries;
    let batch = (n / 10).clamp(1000, 100_000);
    let mut rng = Rng(0x5eed_cafe_f00d_0001);

    let cache = StickCache::new(vec![("sessions".into(), KeyKind::Text)]);
    cache
        .check_tables(&[pb::TableInfo {
            name: "sessions".into(),
            r#type: "string".into(),
            len: 32,
            expire_ms: 30 * 60 * 1000,
            ..Default::default()
        }])
        .unwrap_or_else(|e| panic!("table: {e}"));

    let keys: Vec<String> = (0..n).map(|_| rng.key()).collect();
    // Fill as the Watch stream does (batches of stickd entries), counting the heap the cache
    // keeps: whatever the batches allocate and free meanwhile cancels out.
    let expires = coarse_now_ms() + 30 * 60 * 1000;
    let rss_before = rss_bytes();
    let huge_before = huge_page_bytes();
    let before = CountingAlloc::live_bytes();
    let fill_start = Instant::now();
    for (c, chunk) in keys.chunks(10_000).enumerate() {
        let entries = chunk
            .iter()
            .enumerate()
            .map(|(i, k)| pb::Entry {
                key: k.clone(),
                server: SERVERS[(c * 10_000 + i) % SERVERS.len()].into(),
                expires_unix_ms: expires,
                version: 1,
                ..Default::default()
            })
            .collect();
        cache.apply(0, entries);
    }
    let fill_s = fill_start.elapsed().as_secs_f64();
    let heap = CountingAlloc::live_bytes() - before;
    let rss = rss_before
        .zip(rss_bytes())
        .map(|(a, b)| b.saturating_sub(a));
    let huge = huge_before
        .zip(huge_page_bytes())
        .map(|(a, b)| b.saturating_sub(a));
    assert_eq!(cache.held(0), n, "every key cached");
    let ring = chase_ring(usize::try_from(heap).unwrap_or(0), &mut rng);
    let bytes_per_entry = heap as f64 / n as f64;

    // Hits in random order (no cache line of the table is warm for the next key), misses on
    // fresh keys, stores of new keys (with the write buffer for stickd, as in the proxy).
    // Lookups lend the name to a closure, as the proxy's do (it maps the name to a server).
    let mut order: Vec<&str> = keys.iter().map(String::as_str).collect();
    let (mut hit, mut hot, mut miss, mut store) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut access = Vec::new();
    let mut found = 0usize;
    for _ in 0..args.batches {
        rng.shuffle(&mut order);
        // Copied side by side, as a key in a request buffer is at hand: only the table's
        // memory is visited at random.
        let probes = order[..batch].concat();
        let sample: Vec<&str> = (0..batch)
            .map(|i| &probes[i * KEY_LEN..(i + 1) * KEY_LEN])
            .collect();
        access.push(chase(&ring, batch));
        hit.push(time_batch(&sample, |k| {
            found += usize::from(cache.lookup_with(0, k, |name| name.len()).is_some());
        }));
        // The sessions active right now: a few thousand keys, over and over, whose entries
        // stay in the CPU caches.
        let active: Vec<&str> = sample
            .iter()
            .take(HOT_SET)
            .copied()
            .cycle()
            .take(batch)
            .collect();
        hot.push(time_batch(&active, |k| {
            found += usize::from(cache.lookup_with(0, k, |name| name.len()).is_some());
        }));
        let fresh: Vec<String> = (0..batch).map(|_| rng.key()).collect();
        let fresh: Vec<&str> = fresh.iter().map(String::as_str).collect();
        miss.push(time_batch(&fresh, |k| {
            black_box(cache.lookup_with(0, k, |name| name.len()));
        }));
        let mut s = 0;
        store.push(time_batch(&fresh, |k| {
            cache.store(0, k, SERVERS[s % 2]);
            s += 1;
        }));
        // What the flush task would send: taken so that the buffer never fills up.
        drop(cache.take_pending());
    }
    assert_eq!(found, 2 * batch * args.batches, "every hit found");
    let (hit, hot, miss, store, access) = (
        Figure::of(hit),
        Figure::of(hot),
        Figure::of(miss),
        Figure::of(store),
        Figure::of(access),
    );
    let minus_key = bytes_per_entry - KEY_LEN as f64;
    let rss_per_entry = rss.map(|r| r as f64 / n as f64);

    if args.json {
        println!(
            "{{\"entries\": {n}, \"key_len\": {KEY_LEN}, \"servers\": {}, \"shards\": {SHARDS}, \"batches\": {}, \"batch\": {batch}, \"fill_s\": {fill_s:.3}, \"hot_set\": {HOT_SET}, \"lookup_hit_ns\": {}, \"lookup_hot_ns\": {}, \"lookup_miss_ns\": {}, \"store_ns\": {}, \"memory_access_ns\": {}, \"huge_page_bytes\": {}, \"bytes_per_entry\": {bytes_per_entry:.1}, \"bytes_per_entry_minus_key\": {minus_key:.1}, \"rss_bytes_per_entry\": {}}}",
            SERVERS.len(),
            args.batches,
            hit.json(),
            hot.json(),
            miss.json(),
            store.json(),
            access.json(),
            huge.map_or("null".into(), |h| h.to_string()),
            rss_per_entry.map_or("null".into(), |r| format!("{r:.1}")),
        );
    } else {
        println!(
            "stick cache, {n} entries ({KEY_LEN}-char keys, {} servers, {SHARDS} shards), {} batches of {batch}:",
            SERVERS.len(),
            args.batches
        );
        for (what, f) in [
            ("lookup hit", &hit),
            ("hit, hot set", &hot),
            ("lookup miss", &miss),
            ("store", &store),
            ("memory access", &access),
        ] {
            println!(
                "  {what:12} {:7.1} ns (min {:.1}, max {:.1})",
                f.median, f.min, f.max
            );
        }
        println!(
            "  heap         {bytes_per_entry:7.1} bytes/entry ({minus_key:.1} + key), RSS {} bytes/entry, {} MiB on huge pages; filled in {fill_s:.2} s",
            rss_per_entry.map_or("?".into(), |r| format!("{r:.1}")),
            huge.map_or("?".into(), |h| (h >> 20).to_string()),
        );
    }
}
