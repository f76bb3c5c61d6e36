//! End-to-end tests: real clients, real Sluice proxies, real upstreams, on loopback.

mod grpc;
mod mesh;
mod reload;
mod routing;
mod shutdown;
mod streaming;
mod websocket;
