//! Per-request cost of the breaker and retry layers when nothing fails.

fn main() {}
