//! The L7 rules' cost per request: real configs (loaded and compiled as `proxyd check` does)
//! with 1,000 host rules, one rule of 10,000 host names, and 1,000 path prefixes, routing real
//! parsed request heads. Times are the thread's CPU time per route (head parse excluded),
//! medians over batches.
//!
//! `cargo bench -p proxyd --bench rules -- [--batches B] [--json]`

use std::hint::black_box;
use std::net::IpAddr;

use common::time::thread_cpu_ns;
use proxyd::http::head::{RequestHead, parse_request};
use proxyd::http::route::View;
use proxyd::rules::Rules;

const REQUESTS: usize = 10_000;

/// xorshift64*: reproducible orders without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n as u64) as usize
    }
}

fn config(rules: &str) -> proxyd::Config {
    let text = format!(
        "[global]\nadmin_socket = \"/tmp/b/admin.sock\"\nfdkeeper_socket = \"/tmp/b/lend.sock\"\n\
         [[frontend]]\nname = \"www\"\nbind = [\"127.0.0.1:8080\"]\ndefault_backend = \"app\"\n{rules}\n\
         [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"a\"\naddress = \"127.0.0.1:9001\"\n\
         [[backend]]\nname = \"api\"\n[[backend.server]]\nname = \"b\"\naddress = \"127.0.0.1:9002\"\n"
    );
    proxyd::Config::from_source(common::SourceFile::from_text("bench.toml", text))
        .unwrap_or_else(|e| panic!("bench config: {e}"))
}

fn heads(hosts_and_paths: impl Iterator<Item = (String, String)>) -> Vec<RequestHead> {
    hosts_and_paths
        .map(|(h, p)| {
            let raw = format!(
                "GET {p} HTTP/1.1\r\nHost: {h}\r\nUser-Agent: bench/1\r\nAccept: */*\r\nCookie: s=abc\r\n\r\n"
            );
            parse_request(raw.as_bytes())
                .ok()
                .flatten()
                .expect("a complete head")
        })
        .collect()
}

/// CPU ns per route over `reqs`; checks every answer against `want`.
fn batch(
    rules: &Rules,
    reqs: &[RequestHead],
    want: impl Fn(usize, &proxyd::rules::Decision<'_>) -> bool,
) -> f64 {
    let src: IpAddr = "192.0.2.1".parse().expect("ip");
    let start = thread_cpu_ns().expect("clock");
    for (i, head) in reqs.iter().enumerate() {
        let route = rules.route(&View {
            head: black_box(head),
            src,
            tls: false,
        });
        assert!(
            want(i, &route.decision),
            "request {i}: {:?}",
            route.decision
        );
        black_box(&route);
    }
    thread_cpu_ns().expect("clock").saturating_sub(start) as f64 / reqs.len() as f64
}

struct Figure {
    median: f64,
    min: f64,
    max: f64,
}

impl Figure {
    fn of(mut v: Vec<f64>) -> Figure {
        v.sort_by(f64::total_cmp);
        Figure {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
        }
    }

    fn json(&self) -> String {
        format!(
            "{{\"median\": {:.1}, \"min\": {:.1}, \"max\": {:.1}}}",
            self.median, self.min, self.max
        )
    }
}

fn main() {
    let mut batches = 7;
    let mut json = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--batches" => {
                batches = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--batches needs a number")
            }
            "--json" => json = true,
            // cargo bench passes --bench.
            _ => {}
        }
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    use proxyd::rules::Decision;

    // 1,000 rules `host = hN.example.com` -> backend, one after the other.
    let mut text = String::new();
    for i in 0..1000 {
        let b = if i % 2 == 0 { "api" } else { "app" };
        text.push_str(&format!(
            "[[frontend.rule]]\nwhen = {{ host = \"h{i}.example.com\" }}\nuse_backend = \"{b}\"\n"
        ));
    }
    let c = config(&text);
    let host_rules = c.frontends[0].rules.clone();
    let picks: Vec<usize> = (0..REQUESTS).map(|_| rng.below(1000)).collect();
    let hits = heads(
        picks
            .iter()
            .map(|i| (format!("h{i}.example.com"), "/".into())),
    );
    let misses = heads((0..REQUESTS).map(|i| (format!("x{i}.example.org"), "/".into())));

    // One rule holding 10,000 host names.
    let names: Vec<String> = (0..10_000).map(|i| format!("\"s{i}.ex.com\"")).collect();
    let c = config(&format!(
        "[[frontend.rule]]\nwhen = {{ host = [{}] }}\nuse_backend = \"api\"\n",
        names.join(",")
    ));
    let host_set = c.frontends[0].rules.clone();
    let set_hits =
        heads((0..REQUESTS).map(|_| (format!("s{}.ex.com", rng.below(10_000)), "/".into())));

    // One rule holding 1,000 path prefixes.
    let prefixes: Vec<String> = (0..1000).map(|i| format!("\"/p{i}/\"")).collect();
    let c = config(&format!(
        "[[frontend.rule]]\nwhen = {{ path_prefix = [{}] }}\nuse_backend = \"api\"\n",
        prefixes.join(",")
    ));
    let prefix_rules = c.frontends[0].rules.clone();
    let prefix_hits = heads((0..REQUESTS).map(|_| {
        (
            "www.example.com".into(),
            format!("/p{}/x/y?z=1", rng.below(1000)),
        )
    }));

    let (mut hit, mut miss, mut set, mut prefix) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..batches {
        hit.push(batch(&host_rules, &hits, |i, d| {
            let want = if picks[i].is_multiple_of(2) { 1 } else { 0 };
            *d == Decision::Backend(want)
        }));
        miss.push(batch(&host_rules, &misses, |_, d| *d == Decision::Default));
        set.push(batch(&host_set, &set_hits, |_, d| {
            *d == Decision::Backend(1)
        }));
        prefix.push(batch(&prefix_rules, &prefix_hits, |_, d| {
            *d == Decision::Backend(1)
        }));
    }
    let (hit, miss, set, prefix) = (
        Figure::of(hit),
        Figure::of(miss),
        Figure::of(set),
        Figure::of(prefix),
    );
    if json {
        println!(
            "{{\"batches\": {batches}, \"requests\": {REQUESTS}, \"host_rules\": {}, \"host_rules_hit_ns\": {}, \"host_rules_miss_ns\": {}, \"host_set_names\": 10000, \"host_set_hit_ns\": {}, \"path_prefixes\": 1000, \"path_prefix_hit_ns\": {}}}",
            host_rules.len(),
            hit.json(),
            miss.json(),
            set.json(),
            prefix.json()
        );
    } else {
        println!(
            "1,000 host rules, hit:   {:.0} ns ({:.0}..{:.0})",
            hit.median, hit.min, hit.max
        );
        println!(
            "1,000 host rules, miss:  {:.0} ns ({:.0}..{:.0})",
            miss.median, miss.min, miss.max
        );
        println!(
            "10,000 names, one rule:  {:.0} ns ({:.0}..{:.0})",
            set.median, set.min, set.max
        );
        println!(
            "1,000 path prefixes:     {:.0} ns ({:.0}..{:.0})",
            prefix.median, prefix.min, prefix.max
        );
    }
}
