//! `sluice-proxy`: listeners, forwarding, live policy and admin for the Sluice sidecar.
//!
//! [`start`] binds the outbound, inbound and admin listeners (each built in
//! `listeners.rs`, all served by the one accept loop in `server.rs`) and returns a
//! [`RunningProxy`]. Every request loads the current [`PolicySnapshot`] once from the
//! [`PolicyStore`], finds its route in the snapshot's host-indexed [`RouteTable`] and
//! hands the request to that route's tower stack ([`stack`]), built once per policy
//! swap. The stack ends in pooled upstream clients ([`upstream::Upstream`]); failures
//! come back as errors that the one rescue (`rescue.rs`) turns into responses carrying
//! `x-sluice-reason`.
//! Policies reach the store from a watched local file (`--policy`) or from the control
//! plane (`--control-plane`, via `sluice_api::Subscriber`, starting from the snapshot
//! saved in `--state-dir`); both go through [`PolicyStore::apply`] and
//! [`PolicyStore::reject`].

#![warn(missing_docs, unreachable_pub)]

mod admin;
mod admin_page;
pub mod alloc;
mod authority;
pub mod body;
mod cli;
mod config;
mod control;
mod edge;
mod error;
pub mod fleet;
pub mod governance;
pub mod h2_limits;
pub mod init;
mod kept;
mod listeners;
pub mod memory;
mod message;
pub mod metrics;
pub mod policy;
pub mod probes;
pub mod recent;
mod report;
mod rescue;
pub mod route;
mod server;
pub mod stack;
pub mod telemetry;
pub mod timeouts;
pub mod tls;
pub mod transparent;
pub mod upstream;
pub mod workers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

pub use cli::cli_main;
pub use config::{LogControl, LogFormat, ProxyConfig};
pub use error::ProxyError;
pub use governance::BreakerAdmin;
pub use h2_limits::H2Limits;
pub use message::normalize_path;
pub use metrics::Metrics;
pub use policy::{ApplyOutcome, PolicySnapshot, PolicyStore, Rejection, RouteTable};
pub use stack::StackContext;

/// A proxy that is listening; dropping it without [`RunningProxy::shutdown`] leaves its
/// tasks running until the runtime ends.
#[derive(Debug)]
pub struct RunningProxy {
    outbound: Option<SocketAddr>,
    inbound: Option<SocketAddr>,
    admin: SocketAddr,
    store: PolicyStore,
    drain: Duration,
    data_shutdown: watch::Sender<bool>,
    admin_shutdown: watch::Sender<bool>,
    data_tasks: Vec<JoinHandle<()>>,
    admin_task: JoinHandle<()>,
    watcher: Option<JoinHandle<()>>,
    subscriber: Option<sluice_api::Subscriber>,
    tls: Option<Arc<tls::TlsStore>>,
    identity_task: Option<JoinHandle<()>>,
}

impl RunningProxy {
    /// Where the outbound listener is bound, unless disabled.
    pub fn outbound_addr(&self) -> Option<SocketAddr> {
        self.outbound
    }

    /// Where the inbound listener is bound, unless disabled or without an application.
    pub fn inbound_addr(&self) -> Option<SocketAddr> {
        self.inbound
    }

    /// Where the admin listener is bound.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        Some(self.admin)
    }

    /// The store whose snapshot the listeners serve.
    pub fn policy_store(&self) -> PolicyStore {
        self.store.clone()
    }

    /// How many proxies have traffic on each (policy, route), as the control plane last
    /// said: the table a fleet-wide rate limit reads when Redis is out of reach.
    pub fn route_traffic(&self) -> Arc<sluice_api::RouteTraffic> {
        self.store.context().route_traffic.clone()
    }

    /// The workload certificate, when mTLS is on.
    pub fn tls_store(&self) -> Option<Arc<tls::TlsStore>> {
        self.tls.clone()
    }

    /// Stops accepting, lets requests in flight finish within the drain timeout, then
    /// closes the admin listener.
    pub async fn shutdown(self) {
        self.store.set_draining();
        // A snapshot arriving while draining would only rebuild stacks nobody uses.
        if let Some(s) = self.subscriber {
            s.shutdown().await;
        }
        let _ = self.data_shutdown.send(true);
        for t in self.data_tasks {
            let _ = t.await;
        }
        if let Some(w) = self.watcher {
            let _ = w.await;
        }
        if let Some(t) = self.identity_task {
            t.abort();
        }
        // Spans of the drained requests go out before the process ends.
        if let Some(t) = self.store.context().telemetry.clone() {
            let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
        }
        let _ = self.admin_shutdown.send(true);
        let _ = tokio::time::timeout(self.drain, self.admin_task).await;
        info!("stopped");
    }
}

/// Binds every listener, loads the policy and returns once listening.
pub async fn start(cfg: ProxyConfig) -> Result<RunningProxy, ProxyError> {
    let metrics = Metrics::new()?;
    let trust_root = listeners::read_trust_root(&cfg)?;
    let (tls, identity_task) = listeners::identity(&cfg, &metrics, trust_root.as_deref())?;
    let ctx = listeners::stack_context(&cfg, metrics, tls.clone())?;
    let app = cfg.app.filter(|_| !cfg.no_inbound);
    let store = PolicyStore::new(ctx, cfg.service.clone(), listeners::app_authority(app)?);
    let probes = match cfg.app_probes.as_deref() {
        Some(json) => Some(Arc::new(probes::AppProbes::from_json(json)?)),
        None => None,
    };

    let bound = listeners::Bound::bind(&cfg, app.is_some()).await?;
    let addrs = bound.addrs();
    let (data_shutdown, data_rx) = watch::channel(false);
    let (admin_shutdown, admin_rx) = watch::channel(false);
    let (watcher, subscriber) =
        listeners::policy_sources(&cfg, &store, trust_root, data_rx.clone())?;

    let mut data_tasks = Vec::new();
    if let Some(l) = bound.outbound {
        data_tasks.push(listeners::serve_outbound(l, &store, &cfg, data_rx.clone()));
    }
    if let (Some(l), Some(app)) = (bound.inbound, app) {
        let inbound = listeners::Inbound {
            app,
            proxy_ports: addrs.ports(),
            tls: tls.clone(),
        };
        data_tasks.push(listeners::serve_inbound(l, &store, &cfg, inbound, data_rx));
    }
    let admin_state = admin::AdminState {
        store: store.clone(),
        log: cfg.log_control.clone(),
        gate: listeners::admin_gate(&cfg, addrs.admin),
        probes,
        tls: tls.clone(),
        node_id: cfg
            .control_plane
            .as_ref()
            .map(|_| Arc::from(cfg.node_id.clone().unwrap_or_else(control::default_node_id))),
    };
    let admin_task = listeners::serve_admin(bound.admin, admin_state, &cfg, admin_rx);

    if let Some(path) = &cfg.addr_file {
        listeners::write_addr_file(path, &addrs)?;
    }
    info!(
        outbound = ?addrs.outbound,
        inbound = ?addrs.inbound,
        admin = %addrs.admin,
        "listening"
    );
    Ok(RunningProxy {
        outbound: addrs.outbound,
        inbound: addrs.inbound,
        admin: addrs.admin,
        store,
        drain: cfg.drain_timeout,
        data_shutdown,
        admin_shutdown,
        data_tasks,
        admin_task,
        watcher,
        subscriber,
        tls,
        identity_task,
    })
}
