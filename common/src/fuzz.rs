//! A small mutation fuzzer on stable Rust for the parsers of network bytes: seeded, bounded in
//! time, and reproducible from the seed it prints when a target panics.
//!
//! Every crate's fuzz targets are ordinary `#[test]`s named `fuzz_*` that call [`run`]. A test
//! run gives each target [`DEFAULT_SECONDS`]; `cargo xtask fuzz --seconds N` sets
//! `FUZZ_SECONDS=N` and runs them from a release build. `FUZZ_SEED` replays one run.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Time per target in an ordinary test run: enough for some hundred thousand inputs in a
/// release build, a few thousand in a debug one.
pub const DEFAULT_SECONDS: f64 = 1.0;
/// Largest input a mutation produces: parsers must bound their work, not the fuzzer.
pub const MAX_INPUT: usize = 256 * 1024;

/// Bytes that framing and field parsers treat specially, and their Unicode look-alikes.
const INTERESTING: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"\t",
    b"\0",
    b"\x0b",
    b"\x0c",
    b":",
    b",",
    b";",
    b"=",
    b"\"",
    b"\xc2\xa0",
    b"\xa0",
    b"\xe2\x80\x8b",
    b"\xff",
    b"0",
    b"00",
    b"-1",
    b"+1",
    b"0x10",
    b"ffffffffffffffff",
    b"18446744073709551616",
    b"chunked",
    b"Chunked",
    b"identity",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Host",
    b"Connection",
    b"close",
    b"keep-alive",
    b"Upgrade",
    b"Expect",
    b"100-continue",
    b"\r\n\r\n",
    b"0\r\n\r\n",
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"HTTP/2.0",
    b"GET",
    b"POST",
    b"http://",
    b"/",
    b"*",
    b"?",
    b"#",
    b"%00",
    b"%0d%0a",
];

/// A xorshift generator: deterministic from its seed, no dependency.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// Random bytes, biased towards the ones parsers care about.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            if self.chance(3) {
                let piece: &&[u8] = self.pick(INTERESTING);
                v.extend_from_slice(piece);
            } else {
                v.push(self.next_u64() as u8);
            }
        }
        v.truncate(n);
        v
    }
}

/// One mutation of `input`, possibly splicing in part of `other`.
pub fn mutate(rng: &mut Rng, input: &mut Vec<u8>, other: &[u8]) {
    let at = |rng: &mut Rng, v: &Vec<u8>| rng.below(v.len() + 1);
    match rng.below(9) {
        0 if !input.is_empty() => {
            let i = rng.below(input.len());
            input[i] ^= 1 << rng.below(8);
        }
        1 if !input.is_empty() => {
            let i = rng.below(input.len());
            input[i] = rng.next_u64() as u8;
        }
        2 => {
            let i = at(rng, input);
            let piece = (*rng.pick(INTERESTING)).to_vec();
            input.splice(i..i, piece);
        }
        3 if !input.is_empty() => {
            let i = rng.below(input.len());
            let n = rng.below((input.len() - i).min(64)) + 1;
            input.drain(i..i + n);
        }
        4 if !input.is_empty() => {
            // Repeat a slice: duplicate fields, chunk lines, separators.
            let i = rng.below(input.len());
            let n = rng.below((input.len() - i).min(128)) + 1;
            let piece = input[i..i + n].to_vec();
            let j = at(rng, input);
            input.splice(j..j, piece);
        }
        5 if !other.is_empty() => {
            let i = rng.below(other.len());
            let n = rng.below(other.len() - i) + 1;
            let j = at(rng, input);
            input.splice(j..j, other[i..i + n].iter().copied());
        }
        6 => {
            let i = at(rng, input);
            let n = rng.below(16) + 1;
            let piece = rng.bytes(n);
            input.splice(i..i, piece);
        }
        7 if !input.is_empty() => {
            // Flip the case of an ASCII letter: field names and codings are case-blind.
            let i = rng.below(input.len());
            input[i] = if input[i].is_ascii_lowercase() {
                input[i].to_ascii_uppercase()
            } else {
                input[i].to_ascii_lowercase()
            };
        }
        _ => {
            let n = rng.below(input.len() + 1);
            input.truncate(n);
        }
    }
    input.truncate(MAX_INPUT);
}

/// The time each target gets: `FUZZ_SECONDS`, else [`DEFAULT_SECONDS`].
pub fn budget() -> Duration {
    let secs = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(DEFAULT_SECONDS);
    Duration::from_secs_f64(secs)
}

fn seed() -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// What one fuzz run did.
#[derive(Clone, Copy, Debug)]
pub struct Report {
    pub seed: u64,
    pub inputs: u64,
}

/// Feeds `target` mutations of `seeds` (each input 1 to 8 mutations away from a seed) for
/// [`budget`]. A panic in `target` is re-raised with the seed and the input that caused it.
pub fn run(name: &str, seeds: &[&[u8]], mut target: impl FnMut(&[u8])) -> Report {
    assert!(!seeds.is_empty(), "a fuzz target needs at least one seed");
    let seed = seed();
    let mut rng = Rng::new(seed);
    let deadline = Instant::now() + budget();
    let mut inputs = 0u64;
    // The seeds themselves first: they must pass too.
    let mut input = Vec::new();
    while inputs < seeds.len() as u64 || Instant::now() < deadline {
        input.clear();
        let base = seeds[inputs as usize % seeds.len()];
        input.extend_from_slice(base);
        if inputs >= seeds.len() as u64 {
            let other = *rng.pick(seeds);
            for _ in 0..=rng.below(8) {
                mutate(&mut rng, &mut input, other);
            }
        }
        inputs += 1;
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| target(&input))) {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            panic!(
                "fuzz target {name} failed on input #{inputs} (replay with FUZZ_SEED={seed}): {why}\ninput: {:?}",
                String::from_utf8_lossy(&input)
            );
        }
    }
    eprintln!("fuzz {name}: {inputs} inputs (FUZZ_SEED={seed})");
    Report { seed, inputs }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_inputs() {
        let gen_inputs = |seed| {
            let mut rng = Rng::new(seed);
            let mut v = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
            for _ in 0..50 {
                mutate(&mut rng, &mut v, b"Content-Length: 5\r\n");
            }
            v
        };
        assert_eq!(gen_inputs(7), gen_inputs(7));
        assert_ne!(gen_inputs(7), gen_inputs(8));
    }

    #[test]
    fn a_panic_names_the_seed_and_the_input() {
        let caught = catch_unwind(|| {
            run("demo", &[b"abc"], |input| {
                assert!(!input.starts_with(b"abc"), "found it");
            })
        })
        .expect_err("the seed itself panics");
        let msg = caught.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("FUZZ_SEED="), "{msg}");
        assert!(msg.contains("found it"), "{msg}");
        assert!(msg.contains("abc"), "{msg}");
    }

    #[test]
    fn mutations_stay_bounded() {
        let mut rng = Rng::new(3);
        let mut v = vec![b'a'; MAX_INPUT];
        for _ in 0..1000 {
            mutate(&mut rng, &mut v, &[b'b'; 4096]);
            assert!(v.len() <= MAX_INPUT);
        }
    }
}
