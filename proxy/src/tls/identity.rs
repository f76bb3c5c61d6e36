//! The proxy's workload certificate from the control plane: the first one as
//! soon as the control plane answers, then renewals, for as long as the proxy runs.

use std::path::PathBuf;
use std::sync::Arc;

use sluice_api::pb::identity_client::IdentityClient;
use tokio::task::JoinHandle;

use super::{Credentials, TlsStore, run_renewal};
use crate::ProxyError;

/// Starts certifying into `store` through the Identity service at `url`
/// (`https://` verified against `trust_root`). The bootstrap token is read from
/// `token_file` before every request, so a rotated token (a projected
/// service-account token) is picked up. Abort the task to stop.
pub(crate) fn spawn(
    store: Arc<TlsStore>,
    url: &str,
    trust_root: Option<&[u8]>,
    token_file: PathBuf,
) -> Result<JoinHandle<()>, ProxyError> {
    let endpoint = sluice_api::control_plane_endpoint(url, trust_root)
        .map_err(|e| ProxyError::Compile(format!("identity: {e}")))?;
    // Lazy: the control plane may come up after us; each attempt reconnects.
    let client = IdentityClient::new(endpoint.connect_lazy());
    Ok(tokio::spawn(run_renewal(store, move || {
        let mut client = client.clone();
        let token_file = token_file.clone();
        async move {
            let token = tokio::fs::read_to_string(&token_file)
                .await
                .map_err(|source| ProxyError::File {
                    path: token_file.clone(),
                    source,
                })?;
            Credentials::request(&mut client, token.trim()).await
        }
    })))
}
