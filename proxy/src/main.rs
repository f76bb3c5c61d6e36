//! The `sluice-proxy` binary.

fn main() {}
