//! Identity in a cluster: service-account tokens checked with TokenReview, and the
//! mesh root kept in a Secret that every replica shares.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use crate::Error;
use crate::ca::{BootstrapVerifier, Ca, VerifyFuture, WorkloadIdentity};

/// The audience proxies' projected service-account tokens are minted for.
pub const TOKEN_AUDIENCE: &str = crate::inject::TOKEN_AUDIENCE;

/// Key of the root certificate (PEM) in the CA Secret.
pub const SECRET_CERT_KEY: &str = "ca.crt";
/// Key of the root's private key (PEM) in the CA Secret.
pub const SECRET_KEY_KEY: &str = "ca.key";

/// A [`BootstrapVerifier`] that asks the API server (`TokenReview`) whether a
/// projected service-account token is valid for [`TOKEN_AUDIENCE`], and takes the
/// identity from the user it authenticates (`system:serviceaccount:<ns>:<sa>`).
#[derive(Clone)]
pub struct TokenReviewVerifier {
    client: Client,
    audience: String,
}

impl fmt::Debug for TokenReviewVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenReviewVerifier")
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl TokenReviewVerifier {
    /// A verifier accepting tokens minted for `audience`.
    pub fn new(client: Client, audience: impl Into<String>) -> Self {
        Self {
            client,
            audience: audience.into(),
        }
    }

    /// Reviews `token`: the service account it proves, or
    /// [`Error::BootstrapRefused`]; [`Error::Kube`] when the API cannot answer.
    pub async fn review(&self, token: &str) -> Result<WorkloadIdentity, Error> {
        if token.is_empty() {
            return Err(Error::BootstrapRefused);
        }
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let answer = api.create(&PostParams::default(), &review).await?;
        let status = answer.status.ok_or(Error::BootstrapRefused)?;
        if status.authenticated != Some(true) {
            tracing::info!(error = ?status.error, "TokenReview refused a bootstrap token");
            return Err(Error::BootstrapRefused);
        }
        // The API server answers with the audiences the token is valid for among
        // those asked; an answer without ours is a refusal.
        if !status
            .audiences
            .as_ref()
            .is_some_and(|a| a.contains(&self.audience))
        {
            tracing::info!(audiences = ?status.audiences, "bootstrap token is not for the mesh audience");
            return Err(Error::BootstrapRefused);
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        service_account_of(&username).ok_or_else(|| {
            tracing::info!(%username, "bootstrap token is not a service account's");
            Error::BootstrapRefused
        })
    }
}

/// `system:serviceaccount:<ns>:<sa>` → the workload identity.
fn service_account_of(username: &str) -> Option<WorkloadIdentity> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, sa) = rest.split_once(':')?;
    WorkloadIdentity::new(ns, sa).ok()
}

impl BootstrapVerifier for TokenReviewVerifier {
    /// Blocking form, for callers outside async code: runs the review on the
    /// current multi-threaded runtime. The identity service uses
    /// [`verify_async`](BootstrapVerifier::verify_async).
    fn verify(&self, token: &str) -> Result<WorkloadIdentity, Error> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| Error::BootstrapRefused)?;
        if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
            tracing::warn!("TokenReview cannot block a single-threaded runtime; use verify_async");
            return Err(Error::BootstrapRefused);
        }
        tokio::task::block_in_place(|| handle.block_on(self.review(token)))
    }

    fn verify_async<'a>(&'a self, token: &'a str) -> VerifyFuture<'a> {
        Box::pin(async move {
            self.review(token).await.map_err(|e| match e {
                Error::BootstrapRefused => e,
                other => {
                    tracing::warn!(error = %other, "TokenReview failed");
                    Error::BootstrapRefused
                }
            })
        })
    }
}

/// Loads the mesh root from the Secret `namespace/name`, creating the Secret with
/// a fresh root if it does not exist.
///
/// Replicas starting together may all find it absent: each creates its own root,
/// the API server keeps the first and answers the others 409 Conflict, and those
/// read the winner's, so every replica signs with the same root.
pub async fn load_or_create_ca_secret(
    client: Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
    leaf_ttl: Duration,
) -> Result<Ca, Error> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    if let Some(secret) = api.get_opt(name).await? {
        return ca_from_secret(&secret, namespace, name, trust_domain, leaf_ttl);
    }
    let (cert_pem, key_pem) = Ca::generate_pem(trust_domain)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_string(),
                "sluice".to_string(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(BTreeMap::from([
            (
                SECRET_CERT_KEY.to_string(),
                ByteString(cert_pem.clone().into_bytes()),
            ),
            (
                SECRET_KEY_KEY.to_string(),
                ByteString(key_pem.clone().into_bytes()),
            ),
        ])),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(%namespace, %name, "generated the mesh root and stored it in a Secret");
            Ca::from_pem_pair(trust_domain, &cert_pem, &key_pem, leaf_ttl)
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            tracing::info!(%namespace, %name, "another replica stored the mesh root first; using it");
            let secret = api.get(name).await?;
            ca_from_secret(&secret, namespace, name, trust_domain, leaf_ttl)
        }
        Err(e) => Err(e.into()),
    }
}

fn ca_from_secret(
    secret: &Secret,
    namespace: &str,
    name: &str,
    trust_domain: &str,
    leaf_ttl: Duration,
) -> Result<Ca, Error> {
    let bad = |reason: String| Error::CaSecret {
        namespace: namespace.to_string(),
        name: name.to_string(),
        reason,
    };
    let field = |key: &str| -> Result<String, Error> {
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .ok_or_else(|| bad(format!("no {key:?} entry")))?;
        String::from_utf8(bytes.0.clone()).map_err(|_| bad(format!("{key:?} is not PEM text")))
    };
    let (cert, key) = (field(SECRET_CERT_KEY)?, field(SECRET_KEY_KEY)?);
    Ca::from_pem_pair(trust_domain, &cert, &key, leaf_ttl).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use http::{Method, StatusCode};
    use serde_json::{Value, json};

    use super::*;
    use crate::k8s::double::ApiServer;

    const REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

    fn review_answer(authenticated: bool, username: &str, audiences: &[&str]) -> Value {
        json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "metadata": {}, "spec": {},
            "status": {
                "authenticated": authenticated,
                "user": { "username": username, "uid": "u1" },
                "audiences": audiences,
            }
        })
    }

    #[tokio::test]
    async fn token_review_accepts_a_service_account_token_for_the_mesh_audience() {
        let api = ApiServer::new();
        api.respond("tokenreviews", |review| {
            if review["spec"]["token"] == "good" {
                review_answer(true, "system:serviceaccount:shop:order", &["sluice"])
            } else {
                review_answer(false, "", &[])
            }
        });
        let v = TokenReviewVerifier::new(api.client(), TOKEN_AUDIENCE);
        let id = v.verify_async("good").await.unwrap();
        assert_eq!(id, WorkloadIdentity::new("shop", "order").unwrap());
        let call = api.calls().remove(0);
        assert_eq!((call.method, call.path.as_str()), (Method::POST, REVIEWS));
        assert_eq!(call.status, 201);
        assert_eq!(call.body["spec"]["audiences"], json!(["sluice"]));

        assert!(matches!(
            v.verify_async("forged").await,
            Err(Error::BootstrapRefused)
        ));
    }

    #[tokio::test]
    async fn token_review_refuses_other_audiences_users_and_api_failures() {
        let api = ApiServer::new();
        let answers = Arc::new(Mutex::new(VecDeque::from([
            review_answer(true, "system:serviceaccount:shop:order", &["api"]),
            review_answer(true, "jane@example.com", &["sluice"]),
            review_answer(true, "system:serviceaccount:Shop/x:order", &["sluice"]),
        ])));
        let a = answers.clone();
        api.respond("tokenreviews", move |_| {
            a.lock().unwrap().pop_front().expect("an answer")
        });
        let v = TokenReviewVerifier::new(api.client(), TOKEN_AUDIENCE);
        for _ in 0..3 {
            assert!(matches!(
                v.verify_async("t").await,
                Err(Error::BootstrapRefused)
            ));
        }
        assert!(answers.lock().unwrap().is_empty());
        // The API server failing is a refusal too, never an identity.
        api.fail_next(StatusCode::INTERNAL_SERVER_ERROR, |c| c.path == REVIEWS);
        assert!(matches!(
            v.verify_async("t").await,
            Err(Error::BootstrapRefused)
        ));
        assert_eq!(api.calls().last().unwrap().status, 500);
        // An empty token never reaches the API.
        assert!(matches!(v.review("").await, Err(Error::BootstrapRefused)));
        assert_eq!(api.calls().len(), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocking_verify_works_on_a_multi_threaded_runtime() {
        let api = ApiServer::new();
        api.respond("tokenreviews", |_| {
            review_answer(true, "system:serviceaccount:shop:log", &["sluice"])
        });
        let v = TokenReviewVerifier::new(api.client(), TOKEN_AUDIENCE);
        assert_eq!(
            v.verify("t").unwrap(),
            WorkloadIdentity::new("shop", "log").unwrap()
        );
        // Outside any runtime there is nothing to run the review on.
        let outside = std::thread::spawn(move || v.verify("t")).join().unwrap();
        assert!(matches!(outside, Err(Error::BootstrapRefused)));
    }

    fn secret_json(cert: &str, key: &str) -> Value {
        // `ByteString` serialises as the base64 a Secret carries.
        let b64 = |s: &str| serde_json::to_value(ByteString(s.as_bytes().to_vec())).unwrap();
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": { "name": "sluice-ca", "namespace": "sluice-system" },
            "type": "Opaque",
            "data": { "ca.crt": b64(cert), "ca.key": b64(key) },
        })
    }

    /// `(method, status)` of every request since `after`.
    fn requests(api: &ApiServer, after: usize) -> Vec<(String, u16)> {
        api.calls()[after..]
            .iter()
            .map(|c| {
                assert_eq!(
                    c.path.trim_end_matches("/sluice-ca"),
                    "/api/v1/namespaces/sluice-system/secrets"
                );
                (c.method.to_string(), c.status)
            })
            .collect()
    }

    #[tokio::test]
    async fn ca_secret_is_created_when_absent_and_loaded_when_present() {
        let api = ApiServer::new();
        let ttl = Duration::from_secs(3600);
        let first = load_or_create_ca_secret(
            api.client(),
            "sluice-system",
            "sluice-ca",
            "cluster.local",
            ttl,
        )
        .await
        .unwrap();
        assert_eq!(
            requests(&api, 0),
            [("GET".to_string(), 404), ("POST".to_string(), 201)]
        );
        let stored = api.get("secrets", "sluice-system", "sluice-ca").unwrap();
        assert_eq!(
            stored["metadata"]["labels"]["app.kubernetes.io/part-of"],
            "sluice"
        );
        assert!(stored["data"]["ca.key"].is_string());

        // A second replica (or a restart) loads the same root and writes nothing.
        let mark = api.calls().len();
        let again = load_or_create_ca_secret(
            api.client(),
            "sluice-system",
            "sluice-ca",
            "cluster.local",
            ttl,
        )
        .await
        .unwrap();
        assert_eq!(first.root_der(), again.root_der());
        assert_eq!(requests(&api, mark), [("GET".to_string(), 200)]);
    }

    #[tokio::test]
    async fn losing_the_create_race_uses_the_winners_root() {
        let (winner_cert, winner_key) = Ca::generate_pem("cluster.local").unwrap();
        let winner = secret_json(&winner_cert, &winner_key);
        let api = ApiServer::new();
        // Absent when first asked; the other replica creates it just before our create.
        api.before_each(move |c, api| {
            if c.method == Method::POST
                && api.get("secrets", "sluice-system", "sluice-ca").is_none()
            {
                api.put(winner.clone());
            }
        });
        let ca = load_or_create_ca_secret(
            api.client(),
            "sluice-system",
            "sluice-ca",
            "cluster.local",
            Duration::from_secs(60),
        )
        .await
        .unwrap();
        assert_eq!(ca.root_pem(), winner_cert);
        assert_eq!(
            requests(&api, 0),
            [
                ("GET".to_string(), 404),
                ("POST".to_string(), 409),
                ("GET".to_string(), 200)
            ]
        );
    }

    #[tokio::test]
    async fn a_secret_without_a_key_is_an_error_not_a_new_root() {
        let (cert, _key) = Ca::generate_pem("cluster.local").unwrap();
        let mut broken = secret_json(&cert, "x");
        broken["data"].as_object_mut().unwrap().remove("ca.key");
        let api = ApiServer::new();
        api.put(broken.clone());
        let err = load_or_create_ca_secret(
            api.client(),
            "sluice-system",
            "sluice-ca",
            "cluster.local",
            Duration::from_secs(60),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("no \"ca.key\" entry"), "{err}");
        assert_eq!(
            requests(&api, 0),
            [("GET".to_string(), 200)],
            "nothing is written"
        );
        let stored = api.get("secrets", "sluice-system", "sluice-ca").unwrap();
        assert_eq!(stored["data"], broken["data"]);
    }
}
