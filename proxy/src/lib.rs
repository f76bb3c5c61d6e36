//! `sluice-proxy`: listeners, forwarding, live policy and admin for the Sluice sidecar.
//!
//! [`start`] binds the outbound, inbound and admin listeners and returns a
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

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use cli::cli_main;
pub use config::{LogControl, LogFormat, ProxyConfig};
pub use error::ProxyError;
pub use governance::BreakerAdmin;
pub use h2_limits::H2Limits;
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
    let trust_root = match &cfg.trust_root {
        Some(path) => Some(std::fs::read(path).map_err(|source| ProxyError::File {
            path: path.clone(),
            source,
        })?),
        None => None,
    };
    let (tls, identity_task) = match &cfg.identity_token_file {
        Some(token_file) => {
            let url = cfg
                .identity_url
                .as_deref()
                .or(cfg.control_plane.as_deref())
                .ok_or_else(|| {
                    ProxyError::Compile(
                        "--identity-token-file needs --control-plane or --identity-url".into(),
                    )
                })?;
            let store =
                Arc::new(tls::TlsStore::empty().with_expiry_gauge(metrics.identity_expiry.clone()));
            let task = tls::identity::spawn(
                store.clone(),
                url,
                trust_root.as_deref(),
                token_file.clone(),
            )?;
            info!(identity_url = %url, permissive = cfg.inbound_permissive, "mTLS on");
            (Some(store), Some(task))
        }
        None => (None, None),
    };
    let upstream = match &tls {
        Some(store) => upstream::Upstream::with_mesh(store.clone()),
        None => upstream::Upstream::new(),
    };
    let fleet_settings = sluice_filters::ratelimit::fleet::FleetSettings {
        interval: cfg.fleet.sync_interval,
        default_size: cfg.fleet.fleet_size.get(),
        connected: cfg.fleet.redis_url.is_some(),
    };
    let governance = governance::Governance::with_fleet(&metrics, fleet_settings);
    let mut ctx = StackContext::with_governance(upstream, metrics, governance);
    // The control plane's count of proxies with traffic on a route wins over --fleet-size.
    let traffic = ctx.route_traffic.clone();
    fleet::spawn(
        &cfg.fleet,
        &ctx.governance.fleet,
        Arc::new(move |policy: &str, route: &str| traffic.proxies(policy, route)),
        &ctx.metrics,
    )?;
    ctx.telemetry = telemetry::Telemetry::start(
        &cfg.trace,
        &telemetry::ResourceInfo {
            service: cfg.service.clone(),
            namespace: Some(cfg.namespace.clone()),
            instance: cfg.node_id.clone(),
        },
    )?;
    ctx.recent = (cfg.recent_requests > 0).then(|| {
        Arc::new(recent::RecentRequests::new(
            cfg.recent_requests,
            cfg.recent_requests_secrets,
        ))
    });
    let app = cfg.app.filter(|_| !cfg.no_inbound);
    let app_authority = app
        .map(|a| {
            a.to_string()
                .parse::<Authority>()
                .map_err(|e| ProxyError::Compile(format!("--app {a}: {e}")))
        })
        .transpose()?;
    let store = PolicyStore::new(ctx, cfg.service.clone(), app_authority);

    let token =
        match &cfg.admin_token_file {
            Some(path) => Some(sluice_api::AdminGate::read_token(path).map_err(|source| {
                ProxyError::File {
                    path: path.clone(),
                    source,
                }
            })?),
            None => None,
        };

    let probes = match cfg.app_probes.as_deref() {
        Some(json) => Some(Arc::new(probes::AppProbes::from_json(json)?)),
        None => None,
    };

    let outbound = if cfg.no_outbound {
        None
    } else {
        Some(bind(cfg.outbound).await?)
    };
    let inbound = match app {
        Some(_) => Some(bind(cfg.inbound).await?),
        None => {
            if !cfg.no_inbound {
                info!("no --app given: inbound listener not opened");
            }
            None
        }
    };
    let admin = bind(cfg.admin).await?;
    let local = |l: &TcpListener| l.local_addr().expect("bound listener has an address");
    let outbound_addr = outbound.as_ref().map(local);
    let inbound_addr = inbound.as_ref().map(local);
    let admin_addr = local(&admin);

    let (data_shutdown, data_rx) = watch::channel(false);
    let (admin_shutdown, admin_rx) = watch::channel(false);

    let watcher = match &cfg.policy {
        Some(path) => Some(policy::watch::spawn(
            path.clone(),
            cfg.policy_limits,
            store.clone(),
            data_rx.clone(),
        )?),
        None => None,
    };
    let subscriber = match &cfg.control_plane {
        Some(url) => {
            if let Some(dir) = &cfg.state_dir {
                control::apply_saved(&store, dir);
            }
            Some(control::subscribe(
                &cfg,
                url,
                trust_root.clone(),
                store.clone(),
            )?)
        }
        None => {
            if cfg.state_dir.is_some() {
                warn!("--state-dir is used only with --control-plane; ignored");
            }
            None
        }
    };

    let mut data_tasks = Vec::new();
    if let Some(l) = outbound {
        let store = store.clone();
        let outbound_head_timeouts = store.context().metrics.head_timeouts("outbound");
        let intercept = transparent::Intercept::Outbound {
            store: store.clone(),
            tcp: Arc::new(store.context().metrics.tcp("outbound")),
        };
        data_tasks.push(server::serve(
            "outbound",
            l,
            move |_peer, req| {
                let store = store.clone();
                async move { edge::outbound(&store, req).await }
            },
            data_rx.clone(),
            cfg.drain_timeout,
            cfg.timeouts,
            Some(intercept),
            None,
            cfg.h2_limits,
            Some(outbound_head_timeouts),
        ));
    }
    if let (Some(l), Some(app)) = (inbound, app) {
        let store = store.clone();
        let proxy_ports: Arc<[u16]> = [outbound_addr, inbound_addr, Some(admin_addr)]
            .into_iter()
            .flatten()
            .map(|a| a.port())
            .collect();
        let inbound_head_timeouts = store.context().metrics.head_timeouts("inbound");
        let intercept = transparent::Intercept::Inbound {
            app_port: app.port(),
            proxy_ports,
            tcp: Arc::new(store.context().metrics.tcp("inbound")),
        };
        let handler = move |_peer, req| {
            let store = store.clone();
            async move { edge::inbound(&store, req).await }
        };
        let mode = tls.as_ref().map(|tls| tls::accept::InboundTls {
            store: tls.clone(),
            permissive: cfg.inbound_permissive,
        });
        data_tasks.push(server::serve(
            "inbound",
            l,
            handler,
            data_rx.clone(),
            cfg.drain_timeout,
            cfg.timeouts,
            Some(intercept),
            mode,
            cfg.h2_limits,
            Some(inbound_head_timeouts),
        ));
    }
    let admin_state = admin::AdminState {
        store: store.clone(),
        log: cfg.log_control.clone(),
        gate: sluice_api::AdminGate::new(admin_addr, token),
        probes,
        tls: tls.clone(),
        node_id: cfg
            .control_plane
            .as_ref()
            .map(|_| Arc::from(cfg.node_id.clone().unwrap_or_else(control::default_node_id))),
    };
    let admin_task = server::serve(
        "admin",
        admin,
        move |peer, req| admin::handle(admin_state.clone(), peer, req),
        admin_rx,
        Duration::from_secs(1),
        cfg.timeouts,
        None,
        None,
        H2Limits::default(),
        None,
    );

    if let Some(path) = &cfg.addr_file {
        write_addr_file(path, outbound_addr, inbound_addr, admin_addr)?;
    }
    info!(
        outbound = ?outbound_addr,
        inbound = ?inbound_addr,
        admin = %admin_addr,
        "listening"
    );
    Ok(RunningProxy {
        outbound: outbound_addr,
        inbound: inbound_addr,
        admin: admin_addr,
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

/// Connections the kernel may hold completed for a listener before it accepts them.
/// A burst of new connections beyond the accept queue is lost on the server side while
/// the clients think themselves connected; `TcpListener::bind`'s 128 overflowed under
/// load with a few hundred clients connecting at once. The kernel caps it at
/// `net.core.somaxconn` (4,096 by default).
const LISTEN_BACKLOG: u32 = 4096;

async fn bind(addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    let listen = || -> std::io::Result<TcpListener> {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        // As `TcpListener::bind` does: a restarted proxy rebinds at once.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|source| ProxyError::Bind { addr, source })
}

/// Writes `{"outbound": …, "inbound": …, "admin": …}` atomically (temp file + rename),
/// with wildcard addresses shown as loopback so readers can connect to them.
fn write_addr_file(
    path: &Path,
    outbound: Option<SocketAddr>,
    inbound: Option<SocketAddr>,
    admin: SocketAddr,
) -> Result<(), ProxyError> {
    let connectable = |mut a: SocketAddr| {
        if a.ip().is_unspecified() {
            a.set_ip(match a.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            });
        }
        a.to_string()
    };
    let mut map = serde_json::Map::new();
    if let Some(a) = outbound {
        map.insert("outbound".into(), connectable(a).into());
    }
    if let Some(a) = inbound {
        map.insert("inbound".into(), connectable(a).into());
    }
    map.insert("admin".into(), connectable(admin).into());
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let err = |source| ProxyError::File {
        path: path.to_path_buf(),
        source,
    };
    std::fs::write(&tmp, serde_json::Value::Object(map).to_string()).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}
