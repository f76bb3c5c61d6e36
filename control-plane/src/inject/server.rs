//! The webhook's HTTPS server, `admission.k8s.io/v1` AdmissionReviews:
//! `POST /inject` (mutating: sidecar injection) and `POST /validate` (validating:
//! RoutePolicy objects get `sluice-config`'s verdict before they are stored).
//!
//! The serving certificate comes from one of two places ([`WebhookTls`]):
//! - files (a Secret the chart or cert-manager fills), reloaded when they change
//!   (cert-manager renewing it, a Secret volume's `..data` swap): the directories
//!   holding them are watched with notify. A pair that does not load (half written,
//!   key not matching) is refused with a warning and the previous certificate stays
//!   in service;
//! - the mesh CA, when the control plane runs it: issued short-lived and renewed at
//!   half its lifetime by the same rotator as the gRPC port's (`serving_cert`); the
//!   configurations' `caBundle` is then the mesh root.
//!
//! Either way each TLS handshake takes the certificate in force at that moment, so
//! a rotation touches no open connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Pod;
use kube_core::DynamicObject;
use kube_core::admission::{
    AdmissionRequest, AdmissionResponse, AdmissionReview, META_API_VERSION_V1, Operation,
};
use notify::Watcher;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::patch::{Decision, InjectConfig, decide};
use crate::Error;
use crate::serve::Http;
use crate::serving_cert::ServingCert;

/// The largest review read; the API server caps objects at 1.5 MiB and a review of an
/// update carries two.
const MAX_BODY: usize = 4 << 20;

/// Where and how the webhook serves.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// Listen address (`0.0.0.0:15017` in a cluster).
    pub addr: SocketAddr,
    /// Where the serving certificate the API server verifies comes from.
    pub tls: WebhookTls,
    /// What the injected containers look like.
    pub inject: InjectConfig,
    /// Bounds on a RoutePolicy under review, as on every other policy input.
    pub policy_limits: sluice_config::Limits,
}

/// Where the webhook's serving certificate comes from.
#[derive(Clone, Debug)]
pub enum WebhookTls {
    /// PEM files (the `caBundle` of the configurations signs them), reloaded when
    /// they change.
    Files {
        /// PEM certificate chain.
        cert: PathBuf,
        /// PEM private key of that certificate.
        key: PathBuf,
    },
    /// Issued by the mesh CA and renewed at half its lifetime
    /// ([`RunningControlPlane::webhook_tls`](crate::RunningControlPlane::webhook_tls)).
    MeshCa(MeshCaCert),
}

/// A serving certificate the mesh CA issues and renews.
#[derive(Clone)]
pub struct MeshCaCert {
    pub(crate) ca: Arc<crate::ca::Ca>,
    pub(crate) names: Vec<String>,
    pub(crate) lifetime: Duration,
    pub(crate) renewals: prometheus::IntCounter,
}

impl std::fmt::Debug for MeshCaCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCaCert")
            .field("names", &self.names)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

/// A webhook server running on the current tokio runtime.
#[derive(Debug)]
pub struct RunningWebhook {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
    reload: JoinHandle<()>,
}

impl RunningWebhook {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets open connections finish their requests, and waits for the
    /// accept loop to end.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
        let _ = self.reload.await;
    }
}

/// Loads (or has the mesh CA issue) the serving certificate, binds and starts serving.
pub async fn start_webhook(cfg: WebhookConfig) -> Result<RunningWebhook, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (shutdown, rx) = watch::channel(false);
    let (resolver, reload): (Arc<dyn ResolvesServerCert>, JoinHandle<()>) = match &cfg.tls {
        WebhookTls::Files { cert, key } => {
            let resolver = Arc::new(CurrentCert(ArcSwap::from_pointee(load_certified_key(
                cert, key, &provider,
            )?)));
            let (events, changed) = mpsc::channel(1);
            let watcher = watch_files(cert, key, events)?;
            let task = tokio::spawn(reload(
                watcher,
                changed,
                resolver.clone(),
                provider.clone(),
                (cert.clone(), key.clone()),
                rx.clone(),
            ));
            (resolver, task)
        }
        WebhookTls::MeshCa(m) => {
            let cert = ServingCert::issue(
                "webhook",
                m.ca.clone(),
                m.names.clone(),
                m.lifetime,
                m.renewals.clone(),
            )?;
            let task = tokio::spawn(cert.clone().keep_renewed(rx.clone()));
            (cert, task)
        }
    };
    let tls = server_tls(resolver, provider)?;
    let listener = TcpListener::bind(cfg.addr)
        .await
        .map_err(|source| Error::Bind {
            what: "webhook",
            addr: cfg.addr,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| Error::Bind {
        what: "webhook",
        addr: cfg.addr,
        source,
    })?;
    let task = tokio::spawn(serve(
        listener,
        TlsAcceptor::from(tls),
        Arc::new((cfg.inject, cfg.policy_limits)),
        rx,
    ));
    tracing::info!(%addr, "injection webhook listening");
    Ok(RunningWebhook {
        addr,
        shutdown,
        task,
        reload,
    })
}

/// The certificate handed to each new TLS handshake.
#[derive(Debug)]
struct CurrentCert(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// Reads a PEM chain and its key; refuses an empty chain or a key of another certificate.
fn load_certified_key(
    cert: &Path,
    key: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, Error> {
    let bad = |path: &Path, reason: String| Error::WebhookTls {
        path: path.to_owned(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad(cert, "no certificate in the file".to_owned()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, e.to_string()))?;
    let certified =
        CertifiedKey::from_der(chain, key_der, provider).map_err(|e| bad(key, e.to_string()))?;
    // `from_der` lets a key whose public half it cannot compute through; a rotation
    // caught between writing the certificate and the key must not be served.
    certified
        .keys_match()
        .map_err(|e| bad(key, format!("does not belong to {}: {e}", cert.display())))?;
    Ok(certified)
}

fn server_tls(
    resolver: Arc<dyn ResolvesServerCert>,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::WebhookTls {
            path: PathBuf::new(),
            reason: e.to_string(),
        })?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    // The API server speaks HTTP/2 to webhooks when offered, HTTP/1.1 otherwise.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Watches the directories of the certificate and key (a Secret volume replaces files by
/// swapping a `..data` symlink, which only a directory watch sees).
fn watch_files(
    cert: &Path,
    key: &Path,
    events: mpsc::Sender<()>,
) -> Result<notify::RecommendedWatcher, Error> {
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        match res {
            // A full channel already holds a pending reload, which reads the latest files.
            Ok(_) => {
                let _ = events.try_send(());
            }
            Err(e) => tracing::warn!(error = %e, "webhook certificate watch error"),
        }
    })
    .map_err(|source| Error::Watch {
        path: cert.to_path_buf(),
        source,
    })?;
    let mut dirs: Vec<&Path> = Vec::new();
    for file in [cert, key] {
        let dir = match file.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    for dir in dirs {
        watcher
            .watch(dir, notify::RecursiveMode::NonRecursive)
            .map_err(|source| Error::Watch {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    Ok(watcher)
}

/// Reloads the certificate on every change until shutdown; an unchanged or unreadable
/// pair leaves the one in service alone.
async fn reload(
    _watcher: notify::RecommendedWatcher,
    mut changed: mpsc::Receiver<()>,
    resolver: Arc<CurrentCert>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    (cert, key): (PathBuf, PathBuf),
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            event = changed.recv() => if event.is_none() { return },
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        match load_certified_key(&cert, &key, &provider) {
            Ok(new) if new.cert != resolver.0.load().cert => {
                resolver.0.store(Arc::new(new));
                tracing::info!(cert = %cert.display(), "webhook certificate reloaded");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "webhook certificate not reloaded; the previous one stays in service")
            }
        }
    }
}

/// Serves the webhook's routes over TLS on `listener` until shutdown.
async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    inject: Arc<(InjectConfig, sluice_config::Limits)>,
    shutdown: watch::Receiver<bool>,
) {
    let svc = hyper::service::service_fn(move |req| {
        let inject = inject.clone();
        async move { Ok::<_, Infallible>(handle(req, &inject.0, &inject.1).await) }
    });
    crate::serve::serve_http(
        listener,
        "webhook",
        Some(acceptor),
        Http::Auto,
        svc,
        shutdown,
    )
    .await;
}

async fn handle(
    req: Request<Incoming>,
    inject: &InjectConfig,
    limits: &sluice_config::Limits,
) -> Response<Full<Bytes>> {
    let validating = match req.uri().path() {
        "/inject" => false,
        "/validate" => true,
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                "not found; the webhook paths are /inject and /validate",
            );
        }
    };
    if req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "POST an AdmissionReview");
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("cannot read the body: {e}"),
            );
        }
    };
    let answer = if validating {
        validate_review(&body, limits)
    } else {
        review(&body, inject)
    };
    match answer {
        Ok(resp) => match serde_json::to_vec(&resp.into_review()) {
            Ok(json) => Response::builder()
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(json)))
                .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "response")),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        },
        Err(msg) => {
            tracing::warn!(error = %msg, "unreadable admission review");
            text(StatusCode::BAD_REQUEST, &msg)
        }
    }
}

/// Answers one review. `Err` means there is no request to answer (no uid to echo), which
/// the API server sees as a failed call and handles by the webhook's `failurePolicy`.
fn review(body: &[u8], inject: &InjectConfig) -> Result<AdmissionResponse, String> {
    let req = admission_request(body)?;
    let resp = AdmissionResponse::from(&req);
    if req.operation != Operation::Create || req.kind.kind != "Pod" || !req.kind.group.is_empty() {
        return Ok(resp);
    }
    let pod = match req
        .object
        .as_ref()
        .ok_or_else(|| "the request carries no object".to_owned())
        .and_then(|o| serde_json::to_value(o).map_err(|e| e.to_string()))
        .and_then(|v| serde_json::from_value::<Pod>(v).map_err(|e| e.to_string()))
    {
        Ok(p) => p,
        Err(e) => {
            return Ok(refuse(
                resp,
                &format!("sluice injection: unreadable pod: {e}"),
            ));
        }
    };
    let pod_name = pod
        .metadata
        .name
        .clone()
        .or_else(|| pod.metadata.generate_name.clone())
        .unwrap_or_default();
    let ns = req.namespace.as_deref().unwrap_or("");
    match decide(&pod, inject) {
        Ok(Decision::Skip(why)) => {
            tracing::debug!(pod = %pod_name, namespace = ns, why, "not injecting");
            Ok(resp)
        }
        Ok(Decision::Patch { ops, warnings }) => {
            let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))
                .map_err(|e| format!("internal: {e}"))?;
            let mut resp = resp.with_patch(patch).map_err(|e| e.to_string())?;
            if !warnings.is_empty() {
                resp.warnings = Some(warnings);
            }
            tracing::info!(pod = %pod_name, namespace = ns, "injecting the proxy");
            Ok(resp)
        }
        Err(refusal) => Ok(refuse(resp, &format!("sluice injection: {refusal}"))),
    }
}

/// The request of an `admission.k8s.io/v1` AdmissionReview.
fn admission_request(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, String> {
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(|e| format!("malformed AdmissionReview: {e}"))?;
    if review.types.api_version != META_API_VERSION_V1 || review.types.kind != "AdmissionReview" {
        return Err(format!(
            "expected kind AdmissionReview of {META_API_VERSION_V1}, got {} of {:?}",
            review.types.kind, review.types.api_version
        ));
    }
    review
        .try_into()
        .map_err(|_| "the AdmissionReview has no request".to_owned())
}

/// Answers a RoutePolicy review: allowed when `sluice-config` accepts the spec,
/// denied with the validator's messages (field paths) when it does not. Anything
/// else (deletes, other kinds) is allowed.
fn validate_review(
    body: &[u8],
    limits: &sluice_config::Limits,
) -> Result<AdmissionResponse, String> {
    let req = admission_request(body)?;
    let resp = AdmissionResponse::from(&req);
    if !matches!(req.operation, Operation::Create | Operation::Update)
        || req.kind.kind != sluice_config::KIND
        || req.kind.group != "sluice.dev"
    {
        return Ok(resp);
    }
    let Some(obj) = &req.object else {
        return Ok(refuse(resp, "sluice: the request carries no RoutePolicy"));
    };
    let ns = obj
        .metadata
        .namespace
        .as_deref()
        .or(req.namespace.as_deref())
        .unwrap_or("default");
    let name = obj
        .metadata
        .name
        .as_deref()
        .or(obj.metadata.generate_name.as_deref())
        .unwrap_or(&req.name);
    let spec = obj.data.get("spec").cloned().unwrap_or_default();
    match crate::k8s::validate_object(ns, name, &spec, limits) {
        Ok(_) => Ok(resp),
        Err(error) => {
            tracing::info!(namespace = ns, name, %error, "RoutePolicy refused at admission");
            let message = format!("RoutePolicy {ns}/{name} refused by sluice-config:\n{error}");
            let mut resp = resp.deny(&message);
            resp.result = kube_core::Status::failure(&message, "Invalid").with_code(422);
            Ok(resp)
        }
    }
}

fn refuse(resp: AdmissionResponse, message: &str) -> AdmissionResponse {
    let mut resp = resp.deny(message);
    resp.result = kube_core::Status::failure(message, "BadRequest").with_code(400);
    resp
}

fn text(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{msg}\n"))));
    *r.status_mut() = status;
    r
}
