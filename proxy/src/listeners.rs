//! What [`crate::start`] wires together: the pieces built from the flags (workload
//! identity, the stack context, the policy sources), the bound listeners, and one
//! builder per listener handing it to the one accept loop ([`crate::server::serve`])
//! with its handler and its per-connection steps.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::governance::Governance;
use crate::metrics::Metrics;
use crate::stack::StackContext;
use crate::tls::TlsStore;
use crate::transparent::Intercept;
use crate::upstream::Upstream;
use crate::{H2Limits, PolicyStore, ProxyConfig, ProxyError};
use crate::{admin, control, edge, fleet, policy, recent, server, telemetry, tls};

/// `--trust-root`'s bytes, when given.
pub(crate) fn read_trust_root(cfg: &ProxyConfig) -> Result<Option<Vec<u8>>, ProxyError> {
    read_flag_file(cfg.trust_root.as_deref(), |p| std::fs::read(p))
}

/// The admin listener's token rule: with `--admin-token-file`, the file is followed
/// (missing at start, created or rotated later) rather than read once, since in a pod
/// it is an optional Secret volume the kubelet fills and updates in place.
pub(crate) fn admin_gate(cfg: &ProxyConfig, bound: SocketAddr) -> sluice_api::AdminGate {
    match &cfg.admin_token_file {
        Some(path) => sluice_api::AdminGate::with_token_file(bound, path.clone()),
        None => sluice_api::AdminGate::new(bound, None),
    }
}

/// Reads the file a flag names, if it names one.
fn read_flag_file<T>(
    path: Option<&Path>,
    read: impl FnOnce(&Path) -> std::io::Result<T>,
) -> Result<Option<T>, ProxyError> {
    let Some(path) = path else {
        return Ok(None);
    };
    read(path).map(Some).map_err(|source| ProxyError::File {
        path: path.to_path_buf(),
        source,
    })
}

/// The workload certificate's store and the task that obtains and renews it.
type Identity = (Option<Arc<TlsStore>>, Option<JoinHandle<()>>);

/// With `--identity-token-file`, the workload certificate's store and the task that
/// obtains and renews it (mTLS on); otherwise neither.
pub(crate) fn identity(
    cfg: &ProxyConfig,
    metrics: &Metrics,
    trust_root: Option<&[u8]>,
) -> Result<Identity, ProxyError> {
    let Some(token_file) = &cfg.identity_token_file else {
        return Ok((None, None));
    };
    let url = cfg
        .identity_url
        .as_deref()
        .or(cfg.control_plane.as_deref())
        .ok_or_else(|| {
            ProxyError::Compile(
                "--identity-token-file needs --control-plane or --identity-url".into(),
            )
        })?;
    let store = Arc::new(TlsStore::empty().with_expiry_gauge(metrics.identity_expiry.clone()));
    let task = tls::identity::spawn(store.clone(), url, trust_root, token_file.clone())?;
    info!(identity_url = %url, permissive = cfg.inbound_permissive, "mTLS on");
    Ok((Some(store), Some(task)))
}

/// The upstream pools, registries, tracer and recent-request ring every stack shares;
/// also starts the fleet limits' reconciliation.
pub(crate) fn stack_context(
    cfg: &ProxyConfig,
    metrics: Metrics,
    tls: Option<Arc<TlsStore>>,
) -> Result<StackContext, ProxyError> {
    let upstream = match tls {
        Some(store) => Upstream::with_mesh(store),
        None => Upstream::new(),
    };
    let fleet_settings = sluice_filters::ratelimit::fleet::FleetSettings {
        interval: cfg.fleet.sync_interval,
        default_size: cfg.fleet.fleet_size.get(),
        connected: cfg.fleet.redis_url.is_some(),
    };
    let governance = Governance::with_fleet(&metrics, fleet_settings);
    let mut ctx = StackContext::with_governance(upstream, metrics, governance);
    // The control plane's count of proxies with traffic on a route wins over --fleet-size.
    let traffic = ctx.route_traffic.clone();
    fleet::spawn(
        &cfg.fleet,
        &ctx.governance.fleet,
        // A fleet limit names its policy `<namespace>/<name>` (see `Governance::prepare`).
        Arc::new(move |policy: &str, route: &str| {
            let (namespace, policy) = policy.split_once('/').unwrap_or(("", policy));
            traffic.proxies(namespace, policy, route)
        }),
        &ctx.metrics,
    )?;
    ctx.telemetry = telemetry::Telemetry::start(
        &cfg.trace,
        &telemetry::ResourceInfo {
            service: cfg.service.clone(),
            namespace: Some(cfg.namespace.clone()),
            // As the control plane knows it: `--node-id`, else the host name.
            instance: Some(
                cfg.node_id
                    .clone()
                    .unwrap_or_else(crate::control::default_node_id),
            ),
        },
    )?;
    ctx.recent = (cfg.recent_requests > 0).then(|| {
        Arc::new(recent::RecentRequests::new(
            cfg.recent_requests,
            cfg.recent_requests_secrets,
            cfg.recent_requests_redaction.clone(),
        ))
    });
    Ok(ctx)
}

/// The inbound application's authority, when there is one.
pub(crate) fn app_authority(app: Option<SocketAddr>) -> Result<Option<Authority>, ProxyError> {
    app.map(|a| {
        a.to_string()
            .parse::<Authority>()
            .map_err(|e| ProxyError::Compile(format!("--app {a}: {e}")))
    })
    .transpose()
}

/// Starts the policy sources: the `--policy` file watcher and the `--control-plane`
/// subscription (after applying the snapshot saved in `--state-dir`).
pub(crate) fn policy_sources(
    cfg: &ProxyConfig,
    store: &PolicyStore,
    trust_root: Option<Vec<u8>>,
    shutdown: watch::Receiver<bool>,
) -> Result<(Option<JoinHandle<()>>, Option<sluice_api::Subscriber>), ProxyError> {
    let watcher = match &cfg.policy {
        Some(path) => Some(policy::watch::spawn(
            path.clone(),
            cfg.policy_limits,
            store.clone(),
            shutdown,
        )?),
        None => None,
    };
    let subscriber = match &cfg.control_plane {
        Some(url) => {
            if let Some(dir) = &cfg.state_dir {
                control::apply_saved(store, dir);
            }
            Some(control::subscribe(cfg, url, trust_root, store.clone())?)
        }
        None => {
            if cfg.state_dir.is_some() {
                warn!("--state-dir is used only with --control-plane; ignored");
            }
            None
        }
    };
    Ok((watcher, subscriber))
}

/// The listeners, bound; outbound and inbound only when enabled.
pub(crate) struct Bound {
    pub(crate) outbound: Option<TcpListener>,
    pub(crate) inbound: Option<TcpListener>,
    pub(crate) admin: TcpListener,
}

/// Where the listeners are bound.
pub(crate) struct Addrs {
    pub(crate) outbound: Option<SocketAddr>,
    pub(crate) inbound: Option<SocketAddr>,
    pub(crate) admin: SocketAddr,
}

impl Addrs {
    /// The proxy's own ports, which transparent mode never intercepts.
    pub(crate) fn ports(&self) -> Arc<[u16]> {
        [self.outbound, self.inbound, Some(self.admin)]
            .into_iter()
            .flatten()
            .map(|a| a.port())
            .collect()
    }
}

impl Bound {
    /// Binds outbound (unless `--no-outbound`), inbound (when there is an application
    /// to serve) and admin.
    pub(crate) async fn bind(cfg: &ProxyConfig, has_app: bool) -> Result<Self, ProxyError> {
        let outbound = if cfg.no_outbound {
            None
        } else {
            Some(bind(cfg.outbound).await?)
        };
        let inbound = if has_app {
            Some(bind(cfg.inbound).await?)
        } else {
            if !cfg.no_inbound {
                info!("no --app given: inbound listener not opened");
            }
            None
        };
        let admin = bind(cfg.admin).await?;
        Ok(Self {
            outbound,
            inbound,
            admin,
        })
    }

    /// The bound addresses.
    pub(crate) fn addrs(&self) -> Addrs {
        let local = |l: &TcpListener| l.local_addr().expect("bound listener has an address");
        Addrs {
            outbound: self.outbound.as_ref().map(local),
            inbound: self.inbound.as_ref().map(local),
            admin: local(&self.admin),
        }
    }
}

/// Serves the outbound listener: requests routed by the policy, and in transparent
/// mode redirected connections to their original destination.
pub(crate) fn serve_outbound(
    listener: TcpListener,
    store: &PolicyStore,
    cfg: &ProxyConfig,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let metrics = &store.context().metrics;
    let head_timeouts = metrics.head_timeouts("outbound");
    let intercept = Intercept::Outbound {
        store: store.clone(),
        tcp: Arc::new(metrics.tcp("outbound")),
    };
    let store = store.clone();
    server::serve(
        "outbound",
        listener,
        cfg.workers.clone(),
        move |_peer, req| edge::outbound(store.clone(), req),
        shutdown,
        cfg.drain_timeout,
        cfg.timeouts,
        Some(intercept),
        None,
        cfg.h2_limits,
        Some(head_timeouts),
    )
}

/// What the inbound listener needs besides the flags.
pub(crate) struct Inbound {
    /// The local application.
    pub(crate) app: SocketAddr,
    /// The proxy's own ports, passed through untouched in transparent mode.
    pub(crate) proxy_ports: Arc<[u16]>,
    /// The workload certificate, when mTLS is on.
    pub(crate) tls: Option<Arc<TlsStore>>,
}

/// Serves the inbound listener: requests for the local application, through the
/// inbound TLS accept when mTLS is on.
pub(crate) fn serve_inbound(
    listener: TcpListener,
    store: &PolicyStore,
    cfg: &ProxyConfig,
    inbound: Inbound,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let metrics = &store.context().metrics;
    let head_timeouts = metrics.head_timeouts("inbound");
    let intercept = Intercept::Inbound {
        app_port: inbound.app.port(),
        proxy_ports: inbound.proxy_ports,
        tcp: Arc::new(metrics.tcp("inbound")),
    };
    let store = store.clone();
    let handler = move |_peer, req| edge::inbound(store.clone(), req);
    let mode = inbound.tls.map(|tls| tls::accept::InboundTls {
        store: tls,
        permissive: cfg.inbound_permissive,
    });
    server::serve(
        "inbound",
        listener,
        cfg.workers.clone(),
        handler,
        shutdown,
        cfg.drain_timeout,
        cfg.timeouts,
        Some(intercept),
        mode,
        cfg.h2_limits,
        Some(head_timeouts),
    )
}

/// Serves the admin listener; it drains for a second at most.
pub(crate) fn serve_admin(
    listener: TcpListener,
    state: admin::AdminState,
    cfg: &ProxyConfig,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    server::serve(
        "admin",
        listener,
        crate::workers::Workers::here(),
        move |peer, req| admin::handle(state.clone(), peer, req),
        shutdown,
        Duration::from_secs(1),
        cfg.timeouts,
        None,
        None,
        H2Limits::default(),
        None,
    )
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
pub(crate) fn write_addr_file(path: &Path, addrs: &Addrs) -> Result<(), ProxyError> {
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
    if let Some(a) = addrs.outbound {
        map.insert("outbound".into(), connectable(a).into());
    }
    if let Some(a) = addrs.inbound {
        map.insert("inbound".into(), connectable(a).into());
    }
    map.insert("admin".into(), connectable(addrs.admin).into());
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
