//! cargo xtask: test, e2e, demo, bench.

fn main() {}
