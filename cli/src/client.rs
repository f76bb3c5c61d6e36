//! One admin API (a proxy's or the control plane's) over plain HTTP/1.1, with the token
//! on every call and every failure turned into a one-line [`CliError`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;

use crate::error::CliError;

/// Largest admin answer read (a `/config` of a large mesh is well below it).
const MAX_ANSWER: usize = 32 * 1024 * 1024;

/// Which admin API a client speaks to, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// A sidecar's admin port (15000).
    Proxy,
    /// The control plane's admin port (15014).
    ControlPlane,
}

impl Side {
    fn as_str(self) -> &'static str {
        match self {
            Side::Proxy => "proxy",
            Side::ControlPlane => "control plane",
        }
    }
}

/// A client of one admin API.
#[derive(Clone, Debug)]
pub struct AdminClient {
    side: Side,
    /// `http://host:port` plus any path prefix, without a trailing `/`.
    base: String,
    token: Option<Arc<str>>,
    timeout: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    /// A client of the admin at `url` (`http://host:port`, `host:port`, or with a path
    /// prefix when reached through another proxy), sending `token` as a bearer on
    /// every call and giving up on a call after `timeout`.
    pub fn new(
        side: Side,
        url: &str,
        token: Option<Arc<str>>,
        timeout: Duration,
    ) -> Result<Self, CliError> {
        let base = normalize(url).map_err(|reason| CliError::BadUrl {
            what: side.as_str(),
            url: url.to_string(),
            reason,
        })?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            side,
            base,
            token,
            timeout,
            client,
        })
    }

    /// The admin's base URL, as messages show it.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Which admin API this is.
    pub fn side(&self) -> Side {
        self.side
    }

    /// `GET path`, the answer parsed as `T`.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        let body = self.call(Method::GET, path).await?;
        serde_json::from_slice(&body).map_err(|e| self.malformed(path, e.to_string()))
    }

    /// `GET path`, the answer as text.
    pub async fn get_text(&self, path: &str) -> Result<String, CliError> {
        let body = self.call(Method::GET, path).await?;
        String::from_utf8(body.to_vec()).map_err(|_| self.malformed(path, "not UTF-8 text".into()))
    }

    /// `POST path` with no body; the answer as text.
    pub async fn post(&self, path: &str) -> Result<String, CliError> {
        let body = self.call(Method::POST, path).await?;
        Ok(String::from_utf8_lossy(&body).trim_end().to_string())
    }

    /// An error saying the answer to `path` was not what the API documents.
    pub fn malformed(&self, path: &str, reason: String) -> CliError {
        CliError::Malformed {
            what: self.side.as_str(),
            url: self.base.clone(),
            path: path.to_string(),
            reason,
        }
    }

    /// Sends one request and reads the whole answer, which must be a 2xx.
    async fn call(&self, method: Method, path: &str) -> Result<Bytes, CliError> {
        let uri: Uri = format!("{}{path}", self.base)
            .parse()
            .map_err(|e: http::uri::InvalidUri| CliError::Usage(format!("{path}: {e}")))?;
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::ACCEPT, "application/json, text/plain");
        if let Some(token) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| CliError::Usage(format!("{path}: {e}")))?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| self.unreachable(&e))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| CliError::Unreachable {
                    what: self.side.as_str(),
                    url: self.base.clone(),
                    reason: format!("the answer to {path} broke off: {e}"),
                })?
                .to_bytes();
            Ok::<_, CliError>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| CliError::Timeout {
                what: self.side.as_str(),
                url: self.base.clone(),
                path: path.to_string(),
                secs: self.timeout.as_secs_f64(),
            })??;
        if status.is_success() {
            return Ok(body);
        }
        let first_line = String::from_utf8_lossy(&body)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        Err(match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => CliError::Refused {
                what: self.side.as_str(),
                url: self.base.clone(),
                path: path.to_string(),
                status: status.as_u16(),
                hint: self.refusal_hint(status, &first_line),
            },
            _ => CliError::Status {
                what: self.side.as_str(),
                url: self.base.clone(),
                path: path.to_string(),
                status: status.as_u16(),
                body: first_line,
            },
        })
    }

    fn refusal_hint(&self, status: StatusCode, said: &str) -> String {
        match (status, &self.token) {
            (StatusCode::UNAUTHORIZED, Some(_)) => {
                "the token from --token-file was not accepted".into()
            }
            (StatusCode::UNAUTHORIZED, None) => {
                "this admin port is bound beyond loopback: pass its admin token with --token-file"
                    .into()
            }
            _ if said.is_empty() => "forbidden".into(),
            _ => said.to_string(),
        }
    }

    fn unreachable(&self, e: &hyper_util::client::legacy::Error) -> CliError {
        // The legacy client's own message is "client error (Connect)"; the cause says why.
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            reason = s.to_string();
            source = s.source();
        }
        CliError::Unreachable {
            what: self.side.as_str(),
            url: self.base.clone(),
            reason,
        }
    }
}

/// `http://host:port[/prefix]` without a trailing `/`; a bare `host:port` gets `http://`.
fn normalize(url: &str) -> Result<String, String> {
    let with_scheme = if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    };
    let uri: Uri = with_scheme.parse().map_err(|e| format!("{e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(format!(
                "scheme {other} is not served by admin ports (they speak plain HTTP)"
            ));
        }
        None => return Err("no scheme".into()),
    }
    let Some(authority) = uri.authority() else {
        return Err("no host".into());
    };
    if uri.query().is_some() {
        return Err("a query has no place in a base URL".into());
    }
    let path = uri.path().trim_end_matches('/');
    Ok(format!("http://{authority}{path}"))
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;

    use http::Response;
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    use super::*;

    #[test]
    fn normalizes_base_urls() {
        assert_eq!(
            normalize("127.0.0.1:15000").unwrap(),
            "http://127.0.0.1:15000"
        );
        assert_eq!(normalize("http://a:1/").unwrap(), "http://a:1");
        assert_eq!(normalize("http://a:1/x/y/").unwrap(), "http://a:1/x/y");
        assert!(normalize("https://a:1").unwrap_err().contains("plain HTTP"));
        assert!(normalize("http://a:1/?q=1").is_err());
        assert!(normalize("http://").is_err());
    }

    /// A real admin-like server on loopback: `/good` is JSON, `/bad` is not, `/secret`
    /// wants `Bearer s3cret`.
    async fn serve() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let authorized = req.headers().get(header::AUTHORIZATION)
                            == Some(&http::HeaderValue::from_static("Bearer s3cret"));
                        if req.uri().path() == "/big" {
                            // Past a mebibyte: a large mesh's `/config` still reads.
                            let big = format!(r#"{{"state":"{}"}}"#, "x".repeat(3 << 20));
                            return Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(big))));
                        }
                        let (status, body) = match req.uri().path() {
                            "/good" => (200, r#"{"state":"closed"}"#),
                            "/closed" => (403, ""),
                            "/closed-why" => {
                                (403, "forbidden: no admin token is configured\nmore\n")
                            }
                            "/bad" => (200, "<html>not json"),
                            "/secret" if authorized => (200, r#"{"state":"open"}"#),
                            "/secret" => (401, "unauthorized: send Authorization\n"),
                            _ => (404, "not found\n"),
                        };
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from_static(body.as_bytes())))
                                .unwrap(),
                        )
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        addr
    }

    #[derive(Debug, serde::Deserialize)]
    struct State {
        state: String,
    }

    fn client(addr: SocketAddr, token: Option<&str>) -> AdminClient {
        AdminClient::new(
            Side::Proxy,
            &addr.to_string(),
            token.map(Arc::from),
            Duration::from_secs(10),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn reads_json_and_names_each_failure_in_one_line() {
        let addr = serve().await;
        let c = client(addr, None);
        let good: State = c.get_json("/good").await.unwrap();
        assert_eq!(good.state, "closed");

        let bad = c.get_json::<State>("/bad").await.unwrap_err();
        assert!(matches!(bad, CliError::Malformed { .. }), "{bad}");
        assert_eq!(bad.exit_code(), 3);

        let refused = c.get_json::<State>("/secret").await.unwrap_err();
        let line = refused.to_string();
        assert!(
            line.contains("(401)") && line.contains("--token-file"),
            "{line}"
        );
        assert!(!line.contains('\n'));

        let wrong = client(addr, Some("nope"))
            .get_json::<State>("/secret")
            .await
            .unwrap_err();
        assert!(wrong.to_string().contains("was not accepted"), "{wrong}");

        let right: State = client(addr, Some("s3cret"))
            .get_json("/secret")
            .await
            .unwrap();
        assert_eq!(right.state, "open");

        // A 403 says why in its first line, or that it is forbidden.
        for (path, hint) in [
            ("/closed", "forbidden"),
            ("/closed-why", "forbidden: no admin token is configured"),
        ] {
            match c.get_text(path).await.unwrap_err() {
                CliError::Refused {
                    status, hint: h, ..
                } => {
                    assert_eq!((status, h.as_str()), (403, hint));
                }
                other => panic!("{path}: {other}"),
            }
        }
        let big: State = c.get_json("/big").await.unwrap();
        assert_eq!(big.state.len(), 3 << 20);

        let missing = c.get_text("/nothing").await.unwrap_err();
        assert!(
            matches!(missing, CliError::Status { status: 404, .. }),
            "{missing}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_admin_is_one_line() {
        // A port that was just free: nothing listens there.
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let err = client(addr, None).get_text("/live").await.unwrap_err();
        let line = err.to_string();
        assert!(matches!(err, CliError::Unreachable { .. }), "{line}");
        assert!(
            line.starts_with("cannot reach the proxy admin at http://127.0.0.1:"),
            "{line}"
        );
        assert!(!line.contains('\n'));
        assert_eq!(err.exit_code(), 3);
    }
}
