//! The upstream client, the connection end of every stack: pooled HTTP/1 and HTTP/2
//! clients (plaintext, or mTLS per backend identity) that send a request to the
//! [`Endpoint`] the balancer chose.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use sluice_filters::extensions::{Endpoint, SelectedBackend};
use sluice_filters::{UpstreamError, UpstreamErrorKind};

use crate::ProxyError;
use crate::body::{Body, BoxError, boxed};
use crate::route::BackendParams;
use crate::tls::{MeshConnector, TlsStore};

/// Pooled clients to upstreams, one per protocol; the downstream protocol picks one.
///
/// With mTLS on, a backend that names an `identity` is dialed through a
/// [`MeshConnector`] expecting that SPIFFE ID: one pair of pooled clients per
/// identity, shared by every route. [`Upstream::for_backends`] resolves them per
/// route once per policy swap, so a request picks its client by backend index.
// Every request clones its route's stack (and retry clones its inner service), so the
// clients sit behind one `Arc`: a clone is one counter, not all the clients' fields.
#[derive(Clone, Debug)]
pub struct Upstream {
    clients: Arc<Clients>,
}

#[derive(Debug)]
struct Clients {
    http1: Client<HttpConnector, Body>,
    http2: Client<HttpConnector, Body>,
    mesh: Option<Arc<MeshPools>>,
    /// The mesh clients of this route's backends, by backend index.
    by_backend: Option<Arc<[Option<MeshClients>]>>,
}

/// ALPN of the HTTP/1 mesh client: the upstream protocol follows the downstream one.
const ALPN_H1: &[&[u8]] = &[b"http/1.1"];
/// ALPN of the HTTP/2 mesh client.
const ALPN_H2: &[&[u8]] = &[b"h2"];

/// Mesh clients per expected identity.
#[derive(Debug)]
struct MeshPools {
    tls: Arc<TlsStore>,
    connector: HttpConnector,
    // Touched only when a policy swap compiles stacks, never per request.
    clients: Mutex<HashMap<Arc<str>, MeshClients>>,
}

/// The pooled HTTP/1 and HTTP/2 clients to peers of one identity.
#[derive(Clone, Debug)]
struct MeshClients {
    http1: Client<MeshConnector, Body>,
    http2: Client<MeshConnector, Body>,
}

fn client_builder() -> hyper_util::client::legacy::Builder {
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90));
    builder
}

impl Upstream {
    /// Creates the clients. Connections are kept idle for 90 s.
    pub fn new() -> Self {
        let connector = tcp_connector();
        let builder = client_builder();
        let http1 = builder.build(connector.clone());
        let http2 = client_builder().http2_only(true).build(connector);
        Self {
            clients: Arc::new(Clients {
                http1,
                http2,
                mesh: None,
                by_backend: None,
            }),
        }
    }

    /// Clients that dial backends naming an `identity` with mTLS, presenting the
    /// certificate `tls` holds.
    pub fn with_mesh(tls: Arc<TlsStore>) -> Self {
        let plain = Self::new();
        Self {
            clients: Arc::new(Clients {
                http1: plain.clients.http1.clone(),
                http2: plain.clients.http2.clone(),
                mesh: Some(Arc::new(MeshPools {
                    tls,
                    connector: tcp_connector(),
                    clients: Mutex::new(HashMap::new()),
                })),
                by_backend: None,
            }),
        }
    }

    /// This upstream for one route: backends with an `identity` get the mesh
    /// clients expecting it (when mTLS is on), the others plaintext.
    pub fn for_backends(&self, backends: &[Arc<BackendParams>]) -> Self {
        let Some(mesh) = &self.clients.mesh else {
            return self.clone();
        };
        let mut pools = mesh.clients.lock().unwrap_or_else(|e| e.into_inner());
        let by_backend: Arc<[Option<MeshClients>]> = backends
            .iter()
            .map(|b| {
                let id = b.identity.as_ref()?;
                let clients = pools.entry(id.clone()).or_insert_with(|| {
                    let mk = |alpn| {
                        MeshConnector::new(
                            mesh.connector.clone(),
                            mesh.tls.clone(),
                            Some(id.clone()),
                            alpn,
                        )
                    };
                    MeshClients {
                        http1: client_builder().build(mk(ALPN_H1)),
                        http2: client_builder().http2_only(true).build(mk(ALPN_H2)),
                    }
                });
                Some(clients.clone())
            })
            .collect();
        Self {
            clients: Arc::new(Clients {
                http1: self.clients.http1.clone(),
                http2: self.clients.http2.clone(),
                mesh: self.clients.mesh.clone(),
                by_backend: Some(by_backend),
            }),
        }
    }
}

fn tcp_connector() -> HttpConnector {
    let mut connector = HttpConnector::new();
    // Nagle plus delayed ACKs costs milliseconds at p99 on loopback.
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    connector
}

impl Default for Upstream {
    fn default() -> Self {
        Self::new()
    }
}

impl tower::Service<Request<Body>> for Upstream {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let backend = req.extensions_mut().remove::<SelectedBackend>();
        let endpoint = req.extensions_mut().remove::<Endpoint>();
        let sent = match endpoint {
            Some(Endpoint(endpoint)) => Authority::try_from(&*endpoint)
                .map_err(BoxError::from)
                .and_then(|authority| upstream_uri(authority, req.uri()))
                .map(|uri| {
                    *req.uri_mut() = uri;
                    // `request` only borrows the client; its future owns what it needs.
                    let h2 = req.version() == Version::HTTP_2;
                    if !h2 {
                        *req.version_mut() = Version::HTTP_11;
                    }
                    let mesh = match (&self.clients.by_backend, &backend) {
                        (Some(by), Some(b)) => by.get(b.index).and_then(Option::as_ref),
                        _ => None,
                    };
                    match (mesh, h2) {
                        (Some(m), true) => m.http2.request(req),
                        (Some(m), false) => m.http1.request(req),
                        (None, true) => self.clients.http2.request(req),
                        (None, false) => self.clients.http1.request(req),
                    }
                }),
            None => Err(ProxyError::NoEndpoint(backend_name(backend.as_ref())).into()),
        };
        Box::pin(async move {
            let resp = sent?.await.map_err(|e| {
                let kind = if e.is_connect() {
                    UpstreamErrorKind::ConnectFailure
                } else {
                    UpstreamErrorKind::Reset
                };
                ProxyError::Upstream {
                    backend: backend_name(backend.as_ref()),
                    source: UpstreamError::new(kind, e),
                }
            })?;
            let mut resp = resp.map(boxed);
            if let Some(b) = backend {
                resp.extensions_mut().insert(b);
            }
            Ok(resp)
        })
    }
}

fn backend_name(backend: Option<&SelectedBackend>) -> Arc<str> {
    backend.map_or_else(|| Arc::from(""), |b| b.name.clone())
}

fn upstream_uri(authority: Authority, uri: &Uri) -> Result<Uri, BoxError> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    Ok(Uri::from_parts(parts)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_uri_to_endpoint() {
        let uri: Uri = "http://orders:80/a/b?x=1".parse().unwrap();
        let up = upstream_uri(Authority::from_static("127.0.0.1:9000"), &uri).unwrap();
        assert_eq!(up, "http://127.0.0.1:9000/a/b?x=1");
        let uri: Uri = "/p".parse().unwrap();
        let up = upstream_uri(Authority::from_static("h:1"), &uri).unwrap();
        assert_eq!(up, "http://h:1/p");
    }
}
