//! Gateway API input: `HTTPRoute`s bound to Services (GAMMA) as policies.
//!
//! - [`model`]: the HTTPRoute fields read, as serde types (every field named, so an
//!   unknown one is refused with its path), plus what the translation needs of
//!   Services and ReferenceGrants.
//! - [`mod@translate`]: the pure translation. All HTTPRoutes bound to one Service merge
//!   into one generated policy named `httproute-<svc>` in the Service's namespace,
//!   answering each name a mesh client calls the Service by (`spec.host` and `aliases`: `<svc>`,
//!   `<svc>.<ns>`, `<svc>.<ns>.svc.cluster.local`). Each match is one route named
//!   `<httproute>-<rule name or index>-<match index>`; each backendRef a `service:`
//!   backend with its `port`; weights keep their proportions exactly; `timeouts`
//!   (`0s` = none) and `retry` (its `backoff` as `retry.backoff.min`) translate into
//!   the same validated model. What Sluice does not implement is refused with the
//!   field path, never ignored.
//! - [`status`]: the verdict as `status.parents` entries, written for Sluice's own
//!   parent entries only.
//!
//! The Kubernetes source (`k8s::httproutes`) feeds it from the API; the offline
//! `sluice-control-plane convert` command from files ([`convert_files`]).

pub mod model;
pub mod status;
pub mod translate;

mod convert;

pub use convert::{Converted, convert_files};
pub use model::{ReferenceGrant, RouteObject, ServiceInfo, ServicePortInfo};
pub use status::{CONTROLLER_NAME, merged_parents};
pub use translate::{Cluster, Condition, Problem, RouteVerdict, Translation, translate};

#[cfg(test)]
mod tests;
