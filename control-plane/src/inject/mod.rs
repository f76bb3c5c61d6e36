//! Sidecar injection: the mutating admission webhook that joins pods to the mesh.
//!
//! [`start_webhook`] serves `POST /inject` over TLS (`--webhook 0.0.0.0:15017`). The
//! API server sends it the pods its `MutatingWebhookConfiguration` selects (namespaces
//! labelled `sluice.dev/inject=enabled`, and pods labelled so); [`patch::decide`] answers
//! each with a JSON Patch adding the iptables init step, the proxy as a native sidecar,
//! its identity token volume, the mesh root (from the ConfigMap the control plane keeps
//! in every namespace, `--trust-root-configmap`) and probes rewritten through the proxy's admin port.
//!
//! What joining means for an application: its own port (the first TCP `containerPort`)
//! is served through the inbound stack; any other port is reached by peers only if the
//! server listens on the pod address (`0.0.0.0`): a server bound to `127.0.0.1` stays
//! private to the pod, and the proxy's own ports refuse connections from the network.
//! The rewritten probes and Prometheus scrapes use the admin port's open routes
//! (`/app-health/…`, `/metrics`), which need no admin token; the other routes need the
//! token the proxy reads from the Secret `--inject-admin-token-secret` names (mounted
//! optional: without it they stay closed).

mod patch;
mod server;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use patch::{
    ADMIN_PORT, ADMIN_TOKEN_DIR, ADMIN_TOKEN_VOLUME, ANNOTATION_ADMIN_TOKEN_SECRET, ANNOTATION_CPU,
    ANNOTATION_INJECT, ANNOTATION_MEMORY, ANNOTATION_SKIP_INBOUND, ANNOTATION_SKIP_OUTBOUND,
    ANNOTATION_STATUS, Decision, ENV_APP_PROBES, INBOUND_PORT, INIT_CONTAINER, InjectConfig,
    OUTBOUND_PORT, PROXY_CONTAINER, PROXY_UID, Refusal, TOKEN_AUDIENCE, TOKEN_DIR, TOKEN_VOLUME,
    TRUST_ROOT_DIR, TRUST_ROOT_VOLUME, check_secret_name, decide,
};
pub use server::{MeshCaCert, RunningWebhook, WebhookConfig, WebhookTls, start_webhook};

/// The control plane's webhook flags (`--webhook ADDR` turns it on).
#[derive(Clone, Debug, clap::Args)]
pub struct WebhookArgs {
    /// Serve the injection webhook (TLS) here, e.g. 0.0.0.0:15017.
    #[arg(long, env = "SLUICE_WEBHOOK", value_name = "ADDR")]
    pub webhook: Option<SocketAddr>,
    /// PEM certificate chain of the webhook. Without it (and its key) the mesh CA
    /// issues the webhook's certificate, for the gRPC port's names, and renews it
    /// like the gRPC port's (`--server-cert-lifetime`).
    #[arg(
        long,
        env = "SLUICE_WEBHOOK_CERT",
        value_name = "FILE",
        requires = "webhook_key"
    )]
    pub webhook_cert: Option<PathBuf>,
    /// PEM private key of the webhook.
    #[arg(
        long,
        env = "SLUICE_WEBHOOK_KEY",
        value_name = "FILE",
        requires = "webhook_cert"
    )]
    pub webhook_key: Option<PathBuf>,
    /// Image of the injected proxy and init containers.
    #[arg(long, env = "SLUICE_PROXY_IMAGE", value_name = "IMAGE")]
    pub proxy_image: Option<String>,
    /// Control-plane URL given to injected proxies.
    #[arg(long, env = "SLUICE_INJECT_CONTROL_PLANE", value_name = "URL")]
    pub inject_control_plane: Option<String>,
    /// Secret (key `url`, in each injected pod's namespace) with the Redis URL of the
    /// fleet rate limits, given to injected proxies as `SLUICE_REDIS_URL`.
    #[arg(long, env = "SLUICE_INJECT_REDIS_SECRET", value_name = "NAME")]
    pub inject_redis_secret: Option<String>,
    /// Secret (key `token`, in each injected pod's namespace) holding the injected
    /// proxies' admin token: mounted as an optional volume and passed as
    /// `--admin-token-file`, so an operator can reach `/breakers`, `/config`, `sluicectl
    /// top`... on a proxy whose admin port is bound beyond loopback. A pod's annotation
    /// `sluice.dev/proxy-admin-token-secret` names another, or `disabled`.
    #[arg(long, env = "SLUICE_INJECT_ADMIN_TOKEN_SECRET", value_name = "NAME", value_parser = secret_name)]
    pub inject_admin_token_secret: Option<String>,
}

fn secret_name(s: &str) -> Result<String, String> {
    check_secret_name(s)
        .map(|()| s.to_owned())
        .map_err(|why| format!("not a Secret name: {why}"))
}

impl WebhookArgs {
    /// Whether the mesh CA issues the webhook's certificate (no files given).
    pub fn from_mesh_ca(&self) -> bool {
        self.webhook.is_some() && self.webhook_cert.is_none()
    }

    /// The webhook's configuration, if `--webhook` was given; `mesh_ca` is where
    /// the certificate comes from when no files are given (`None`: the CA is off).
    pub fn to_config(&self, mesh_ca: Option<WebhookTls>) -> Option<WebhookConfig> {
        let addr = self.webhook?;
        let mut inject = InjectConfig::default();
        if let Some(image) = &self.proxy_image {
            inject.proxy_image = image.clone();
        }
        inject.control_plane_url = self.inject_control_plane.clone();
        inject.redis_url_secret = self.inject_redis_secret.clone();
        inject.admin_token_secret = self.inject_admin_token_secret.clone();
        let tls = match (&self.webhook_cert, &self.webhook_key) {
            (Some(cert), Some(key)) => WebhookTls::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => mesh_ca?,
        };
        Some(WebhookConfig {
            addr,
            tls,
            inject,
            policy_limits: sluice_config::Limits::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        webhook: WebhookArgs,
    }

    /// `--inject-admin-token-secret` reaches the patch's settings; a name the API server
    /// would refuse is refused at start, not at the first pod.
    #[test]
    fn the_admin_token_secret_flag_reaches_the_injector() {
        let flags = Flags::try_parse_from([
            "cp",
            "--webhook=127.0.0.1:15017",
            "--webhook-cert=c.pem",
            "--webhook-key=k.pem",
            "--inject-admin-token-secret=sluice-proxy-admin",
        ])
        .unwrap();
        let cfg = flags.webhook.to_config(None).unwrap();
        assert_eq!(
            cfg.inject.admin_token_secret.as_deref(),
            Some("sluice-proxy-admin")
        );
        let bad = Flags::try_parse_from(["cp", "--inject-admin-token-secret=Proxy_Admin"])
            .err()
            .unwrap()
            .to_string();
        assert!(bad.contains("not a Secret name"), "{bad}");
    }
}
