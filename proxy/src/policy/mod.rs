//! Live policy: the compiled snapshot requests read, the store that swaps it, and the
//! local-file source that feeds the store.

mod store;
pub mod table;
pub(crate) mod watch;

use std::sync::Arc;
use std::time::SystemTime;

use http::uri::Authority;
use http::{HeaderMap, Method};
use sluice_config::PolicySet;
use tracing::warn;

pub use store::{ApplyOutcome, PolicyStore, Rejection};
pub use table::{Mismatch, RouteMatcher, RouteTable};

use crate::ProxyError;
use crate::stack::{RouteEntry, StackContext, build_inbound, build_outbound};

/// Everything a request needs from the policy, swapped whole: requests load it once and
/// keep what they loaded until they finish, whatever swaps happen meanwhile.
#[derive(Debug)]
pub struct PolicySnapshot {
    set: Option<Arc<PolicySet>>,
    source: String,
    applied_at: Option<SystemTime>,
    table: RouteTable<RouteEntry>,
    inbound: Option<RouteEntry>,
}

impl PolicySnapshot {
    /// The snapshot before any policy is loaded: no outbound route, inbound still forwards.
    pub(crate) fn empty(ctx: &StackContext, app: Option<&Authority>) -> Self {
        Self {
            set: None,
            source: String::new(),
            applied_at: None,
            table: RouteTable::default(),
            inbound: app.map(|a| build_inbound(ctx, a.clone(), None)),
        }
    }

    /// Compiles a validated set: one route stack per route, built here and only here.
    pub(crate) fn compile(
        ctx: &StackContext,
        set: PolicySet,
        source: &str,
        service: Option<&str>,
        app: Option<&Authority>,
    ) -> Result<Self, ProxyError> {
        let own = service.and_then(|s| {
            set.policies()
                .iter()
                .find(|p| p.spec.hosts().any(|h| h == s))
        });
        ctx.prepare(set.policies(), own);
        let (table, warnings) =
            RouteTable::compile(set.policies(), |params| build_outbound(ctx, params))?;
        for w in warnings {
            warn!(source, "{w}");
        }
        let inbound = app.map(|a| build_inbound(ctx, a.clone(), own));
        Ok(Self {
            set: Some(Arc::new(set)),
            source: source.to_string(),
            applied_at: Some(SystemTime::now()),
            table,
            inbound,
        })
    }

    /// The policy version (content hash), once a policy is loaded.
    pub fn hash(&self) -> Option<&str> {
        self.set.as_deref().map(PolicySet::hash)
    }

    /// The policies in force.
    pub fn policy_set(&self) -> Option<&PolicySet> {
        self.set.as_deref()
    }

    /// Where the policies came from (a file path, a control-plane URL).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// When this snapshot was swapped in.
    pub fn applied_at(&self) -> Option<SystemTime> {
        self.applied_at
    }

    /// The outbound route that takes a request, if any.
    pub fn route(
        &self,
        host: &str,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<&RouteEntry> {
        self.table.select(host, method, path, headers)
    }

    /// Whether a policy claims `host`; transparent mode passes other hosts through.
    pub fn has_host(&self, host: &str) -> bool {
        self.table.has_host(host)
    }

    /// The inbound stack (present when the proxy has an application to forward to).
    pub fn inbound(&self) -> Option<&RouteEntry> {
        self.inbound.as_ref()
    }
}

/// A store with no application and fresh metrics, for unit tests.
#[cfg(test)]
pub(crate) fn store_for_tests() -> PolicyStore {
    let ctx = StackContext::new(
        crate::upstream::Upstream::new(),
        crate::metrics::Metrics::new().unwrap(),
    );
    PolicyStore::new(ctx, None, None)
}
