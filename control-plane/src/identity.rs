//! The `sluice.v1.Identity/Certify` service: CSR plus bootstrap credential in,
//! workload certificate out.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use sluice_api::pb;
use sluice_api::pb::identity_server::{Identity, IdentityServer};
use tonic::{Request, Response, Status};

use crate::Error;
use crate::ca::{BootstrapVerifier, Ca};

/// The tonic service behind `sluice.v1.Identity`.
#[derive(Debug, Clone)]
pub struct IdentityService {
    ca: Arc<Ca>,
    verifier: Arc<dyn BootstrapVerifier>,
}

impl IdentityService {
    /// A service signing with `ca` for the identities `verifier` proves.
    pub fn new(ca: Arc<Ca>, verifier: Arc<dyn BootstrapVerifier>) -> Self {
        Self { ca, verifier }
    }

    /// The service ready to add to a tonic `Server`.
    pub fn into_server(self) -> IdentityServer<Self> {
        IdentityServer::new(self)
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<pb::CertifyRequest>,
    ) -> Result<Response<pb::CertifyResponse>, Status> {
        let req = request.into_inner();
        let identity = self.verifier.verify_async(&req.token).await.map_err(|e| {
            tracing::warn!(error = %e, "certify: bootstrap credential refused");
            Status::unauthenticated("bootstrap credential refused")
        })?;
        let issued = self
            .ca
            .sign_csr(&req.csr_der, &identity)
            .map_err(|e| match e {
                Error::Csr(_) => Status::invalid_argument(e.to_string()),
                other => {
                    tracing::error!(error = %other, "certify: signing failed");
                    Status::internal("signing failed")
                }
            })?;
        tracing::info!(spiffe_id = %issued.spiffe_id, "issued workload certificate");
        let not_after = issued
            .not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Ok(Response::new(pb::CertifyResponse {
            cert_chain_der: vec![issued.cert_der.to_vec()],
            trust_root_der: self.ca.root_der().to_vec(),
            not_after,
        }))
    }
}
