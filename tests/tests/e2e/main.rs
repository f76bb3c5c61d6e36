//! End-to-end tests: real clients, real Sluice proxies, real upstreams, on loopback.

mod cli;
mod control_plane;
mod dashboards;
mod governance;
mod governance_load;
mod grpc;
mod grpc_interop;
mod hostile_policy;
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
mod schema_versions;
mod shutdown;
mod streaming;
mod telemetry;
mod timeouts;
mod tls_identity;
mod transparent;
mod websocket;
