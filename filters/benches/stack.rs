//! Per-request cost of the governance stack.

fn main() {}
