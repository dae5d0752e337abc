//! The fdkeeper binary.

fn main() {}
