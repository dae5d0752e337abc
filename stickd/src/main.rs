//! The stickd binary.

fn main() {}
