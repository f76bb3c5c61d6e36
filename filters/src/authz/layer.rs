use tower_layer::Layer;

use super::{AllowList, Authz};

/// Refuses requests whose peer identity is not allowed.
#[derive(Clone, Debug, Default)]
pub struct AuthzLayer {
    allow: AllowList,
}

impl AuthzLayer {
    /// A layer enforcing `allow`.
    pub fn new(allow: AllowList) -> Self {
        Self { allow }
    }
}

impl<S> Layer<S> for AuthzLayer {
    type Service = Authz<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authz::new(inner, self.allow.clone())
    }
}
