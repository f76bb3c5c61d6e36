//! `sluice-examples`: the governance-free services the Sluice demo runs, and the
//! pieces to start them in process.
//!
//! The services know nothing about rate limits, retries, breakers or canaries: that
//! is the sidecar's job. [`log_service`] ingests log lines (`POST /logs`) and can be
//! told to fail a share of requests or answer slowly, so the sidecar's governance has
//! something to act on. [`order_service`] takes orders (`POST /orders`) and logs each
//! one by calling the log service through its outbound sidecar. Both are started with
//! a `start(addr, config)` function that binds, spawns the server and returns a
//! [`RunningService`] (its bound address and a way to stop it), so the binaries, the
//! demo and the end-to-end tests all run the same code. [`load`] sends the log service
//! open-loop load in a mix of priorities (the demo's overload scene and the overload
//! benchmark).

#![warn(missing_docs, unreachable_pub)]

pub mod load;
pub mod log_service;
pub mod order_service;
mod server;

pub use server::RunningService;
