//! Identity authorization: the serving side's `inbound.allow`.
//!
//! [`AuthzLayer`] reads the [`PeerIdentity`](crate::extensions::PeerIdentity)
//! extension the proxy's inbound listener sets from the verified client
//! certificate, and refuses a peer not in the list with
//! [`FilterError::Forbidden`](crate::FilterError::Forbidden) (403 `forbidden`).
//! A request without an identity is refused too when a list is set. Without a
//! list every request passes: with mTLS on, the listener already refused peers
//! without a mesh certificate, which is what "absent allows any authenticated
//! peer" means.

mod future;
mod layer;
mod service;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::sync::Arc;

pub use future::ResponseFuture;
pub use layer::AuthzLayer;
pub use service::Authz;

/// The peers allowed to call, built once per policy swap.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    ids: Option<Arc<HashSet<Arc<str>>>>,
}

impl AllowList {
    /// From a policy's `inbound` section (`None`: no section, everyone passes).
    pub fn from_config(inbound: Option<&sluice_config::Inbound>) -> Self {
        Self::new(inbound.and_then(|i| i.allow.as_deref()))
    }

    /// Allows exactly `ids` (`None`: everyone).
    pub fn new(ids: Option<&[String]>) -> Self {
        Self {
            ids: ids.map(|ids| Arc::new(ids.iter().map(|s| Arc::from(s.as_str())).collect())),
        }
    }

    /// Whether a request from `peer` may pass.
    pub fn permits(&self, peer: Option<&str>) -> bool {
        match (&self.ids, peer) {
            (None, _) => true,
            (Some(ids), Some(p)) => ids.contains(p),
            (Some(_), None) => false,
        }
    }
}
