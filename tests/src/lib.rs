//! `sluice-e2e`: the end-to-end harness for Sluice.
//!
//! Everything here runs for real on `127.0.0.1` ephemeral ports: [`Upstream`] is an
//! HTTP/1.1 and/or h2c server with a few behaviours the tests need (echo, sink, hold
//! until released), [`TestProxy`] is a `sluice-proxy` started in process through
//! `sluice_proxy::start` on a policy file in its own temporary directory, and
//! [`ChildProxy`] runs the real command line (the `e2e-proxy` binary of this crate)
//! as a child process, for what needs a process of its own: signals and resident
//! memory; [`ChildControlPlane`] does the same for `sluice-control-plane`.
//! [`HttpConn`] is a client connection over one TCP stream, HTTP/1.1 or h2c
//! prior knowledge, so a test controls exactly which protocol and which connection
//! a request uses. [`grpc`] holds a small tonic service, [`interop`] gRPC's interop cases (server and client), [`ws`] a WebSocket echo
//! server (and [`autobahn`] runs the Autobahn cases against it), [`otlp`] an OTLP trace receiver (gRPC and HTTP) that keeps the spans it gets.
//! [`reliability`] is the suite that runs load through a child proxy while faults
//! happen, and [`malformed`] the hand-written bad HTTP it sends. [`netns`] sets up
//! network namespaces for the transparent-mode and two-pod tests.
//! [`SchemaSubscriber`] is the real policy subscriber without a proxy around it,
//! accepting only the schema versions a test gives (an older release's).
//! network namespaces for the transparent-mode and two-pod tests. [`gateway`] runs the
//! Gateway API mesh conformance cluster (API double, control plane, proxy, upstreams).
//! [`WorkerUpstream`] is an
//! app with a fixed number of workers (latency grows past that knee) and [`open_loop`]
//! the fixed-rate load the overload tests send it. [`GoingAwayUpstream`] is an HTTP/2
//! upstream that sends a GOAWAY below a stream it was sent. [`TestRedis`] is a real
//! `redis-server` on an ephemeral port for the fleet rate-limit tests.
//!
//! Tests never sleep to wait for something: they wait on a condition with
//! [`wait_until`], which polls with a bounded deadline and fails the test with a
//! message naming what did not happen.

#![warn(missing_docs, unreachable_pub)]

pub mod autobahn;
mod child_control_plane;
mod client;
mod control_plane;
pub mod gateway;
mod going_away;
pub mod grpc;
pub mod interop;
pub mod malformed;
pub mod netns;
pub mod otlp;
mod proxy;
mod redis;
pub mod reliability;
pub mod rollout;
mod subscriber;
mod upstream;
mod workers;
pub mod ws;

use std::future::Future;
use std::time::{Duration, Instant};

pub use child_control_plane::{ChildControlPlane, NackingMesh};
pub use client::{HttpConn, Reply, ReqBody, Unsent, admit, full_body, read_until_closed};
pub use control_plane::TestControlPlane;
pub use going_away::GoingAwayUpstream;
pub use proxy::{ChildProxy, MeshTls, ProcMemory, ProxyOptions, TestProxy};
pub use redis::{TestRedis, wait_keys};
pub use subscriber::{RecordingSink, SchemaSubscriber};
pub use upstream::{Protocol, Stall, Upstream, tcp_coded, tcp_echo, tcp_sink};
pub use workers::{Tally, WorkerUpstream, open_loop};

/// The error type the harness passes around.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a test waits for something that should happen at once on a quiet machine.
pub const WAIT: Duration = Duration::from_secs(20);

/// A free port on 127.0.0.1 below the kernel's ephemeral range, for a server a test
/// stops and starts again on the same port.
///
/// A port from the ephemeral range (what binding port 0 gives) can be taken while the
/// server is down, as the local port of any connection another test opens, and the
/// restart then fails with "address in use". Below the range only another caller of
/// this function binds; the ports it hands out are spread by process and never twice
/// in one.
pub fn restartable_addr() -> std::net::SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let base = 10_000u32;
    let span = low.saturating_sub(base);
    if span < 1_000 {
        // No room below the range on this machine: any free port, as before.
        return std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("pick a port");
    }
    let offset = std::process::id().wrapping_mul(7_919);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = base + offset.wrapping_add(n) % span;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port as u16));
        if std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no free port between {base} and {low}");
}

/// Polls `cond` until it is true, at most `timeout`; panics naming `what` if it never is.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        if cond().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// The access lines (`sluice::access`) of a proxy's JSON log, parsed.
pub fn access_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "sluice::access")
        .collect()
}

/// The sum of the samples of `family` in Prometheus text whose labels contain every
/// one of `labels` (each written as in the text, e.g. `direction="inbound"`).
pub fn metric_sum(text: &str, family: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(family) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A port on 127.0.0.1 that nothing listens on (a dead upstream).
pub async fn closed_port() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

/// The `/metrics` text of the proxy whose admin listener is `admin`.
pub async fn scrape(admin: std::net::SocketAddr) -> String {
    proxy::admin_get(admin, "/metrics").await.1
}

/// A policy document for `host` with one route sending everything to one backend.
pub fn single_backend_policy(name: &str, host: &str, backend: std::net::SocketAddr) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: {name}, namespace: e2e }}
spec:
  host: {host}
  backends:
    only: {{ addresses: ["{backend}"] }}
  routes:
    - name: all
"#
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn restartable_addresses_are_below_the_ephemeral_range_and_differ() {
        let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .unwrap_or(32768);
        let (a, b) = (super::restartable_addr(), super::restartable_addr());
        assert_ne!(a, b);
        for addr in [a, b] {
            assert!(addr.ip().is_loopback(), "{addr}");
            assert!(addr.port() < low, "{addr} below {low}");
            std::net::TcpListener::bind(addr).expect("still free");
        }
    }
}
