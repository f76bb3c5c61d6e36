//! End-to-end tests: real clients, real Sluice proxies, real upstreams, on loopback.

mod cli;
mod control_plane;
mod dashboards;
mod governance;
mod governance_load;
mod grpc;
mod hardening;
mod init_netns;
mod injected;
mod kubernetes;
mod malformed;
mod mesh;
mod mtls;
mod pods;
mod reliability;
mod reload;
mod routing;
mod shutdown;
mod streaming;
mod telemetry;
mod transparent;
mod websocket;
