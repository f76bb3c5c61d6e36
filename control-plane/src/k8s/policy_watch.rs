//! The tasks that feed RoutePolicy and HTTPRoute objects into the control plane's
//! state, and write each object's verdict back to its `status` while this replica
//! leads.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::k8s::httproutes::{httproute_resource, now_rfc3339, reference_grant_resource};
use crate::k8s::policies::{ObjectKey, api_resource};
use crate::state::Shared;

/// How often a cluster without the HTTPRoute CRD is asked again.
const PROBE_INTERVAL: Duration = Duration::from_secs(60);

/// Runs the RoutePolicy reflector until `shutdown`: every change to the objects
/// re-validates what changed and republishes the mesh's set.
pub(crate) async fn watch_policies(
    client: Client,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) {
    let ar = api_resource();
    super::reflect(
        Api::<DynamicObject>::all_with(client, &ar),
        Writer::new(ar),
        watcher::Config::default(),
        "RoutePolicy",
        shutdown,
        |objects| {
            let (failures, rollouts) = shared
                .with_kube_policies(|k| (k.sync(objects), k.rollout_statuses()))
                .unwrap_or_default();
            shared.metrics.validation_failures.inc_by(failures as u64);
            // Before the reload: a rollout showing up in it resumes from its status.
            shared.rollouts.follow(rollouts);
            shared.reload();
        },
    )
    .await
}

/// While this replica leads, writes every object's verdict to its `status`
/// (only where it differs, so the writes' own watch events change nothing).
pub(crate) async fn write_statuses(
    client: Client,
    shared: Arc<Shared>,
    mut leading: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let ar = api_resource();
    let mut changes = shared.changes.subscribe();
    loop {
        let mut failed = false;
        // Between winning the lease and taking over the rollouts, this replica still
        // holds the states it followed: written back, they would read as already
        // described, and it would never record the start of a rollout no status
        // described before. `drive_while_leading` bumps `changes` once it took over.
        if *leading.borrow_and_update() && shared.rollouts.is_leading() {
            failed |= write_route_statuses(&client, &shared).await;
            let rollouts = shared.rollouts.statuses();
            let pending = shared
                .with_kube_policies(|k| k.pending_statuses(&rollouts))
                .unwrap_or_default();
            for (key, status, resource_version) in pending {
                let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &key.0, &ar);
                // A merge patch: fields set to null are removed.
                let patch = json!({
                    "metadata": { "resourceVersion": resource_version },
                    "status": {
                    "observedGeneration": status.observed_generation,
                    "accepted": status.accepted,
                    "hash": status.hash,
                    "error": status.error,
                    // Null removes the field when no route has a rollout.
                    "rollouts": (!status.rollouts.is_empty()).then_some(&status.rollouts),
                }});
                match patch_status(&api, "RoutePolicy", &key, &patch).await {
                    Some(true) => {
                        shared.with_kube_policies(|k| k.mark_written(key, status));
                    }
                    Some(false) => {}
                    None => failed = true,
                }
            }
        }
        let retry = async {
            if failed {
                tokio::time::sleep(Duration::from_secs(5)).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            r = leading.changed() => if r.is_err() { return },
            _ = retry => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Writes the `status.parents` of every HTTPRoute whose verdict changed (Sluice's
/// entries only; the list is shared with other controllers, and the resourceVersion
/// precondition keeps a concurrent writer's entries). True if any write failed.
async fn write_route_statuses(client: &Client, shared: &Shared) -> bool {
    let ar = httproute_resource();
    let now = now_rfc3339();
    let pending = shared
        .with_kube_policies(|k| k.gateway.pending_statuses(&now))
        .unwrap_or_default();
    let mut failed = false;
    for (key, parents, resource_version) in pending {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &key.0, &ar);
        let patch = json!({
            "metadata": { "resourceVersion": resource_version },
            "status": { "parents": parents },
        });
        match patch_status(&api, "HTTPRoute", &key, &patch).await {
            Some(true) => {
                shared.with_kube_policies(|k| k.gateway.mark_written(key, parents));
            }
            Some(false) => {}
            None => failed = true,
        }
    }
    failed
}

/// Writes one object's status with `patch` (a merge patch whose resourceVersion is a
/// precondition: another writer in between makes it a 409). `Some(true)` when
/// written, `Some(false)` when the object is gone (its delete event removes it),
/// `None` when it must be tried again (changed meanwhile: its watch event brings
/// the version to judge; or the API failed).
async fn patch_status(
    api: &Api<DynamicObject>,
    kind: &str,
    key: &ObjectKey,
    patch: &Value,
) -> Option<bool> {
    match api
        .patch_status(&key.1, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => {
            tracing::debug!(namespace = %key.0, name = %key.1, "{kind} status written");
            Some(true)
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Some(false),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            tracing::debug!(namespace = %key.0, name = %key.1, "{kind} changed since it was judged; its status waits for the new version");
            None
        }
        Err(e) => {
            tracing::warn!(namespace = %key.0, name = %key.1, error = %e, "cannot write {kind} status; will retry");
            None
        }
    }
}

/// Whether the API serves `ar` to this control plane: a 404 means its CRD is not
/// installed, a 403 that the RBAC (an older chart's) does not grant it; either way
/// the control plane runs without it.
async fn served(client: &Client, ar: &ApiResource) -> Result<bool, kube::Error> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), ar);
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(kube::Error::Api(s)) if s.code == 403 => {
            tracing::warn!(resource = %ar.plural, "the control plane may not list these (RBAC); Gateway API input goes without them");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Runs the HTTPRoute and ReferenceGrant reflectors until `shutdown`; without the
/// HTTPRoute CRD, says so once and asks again every [`PROBE_INTERVAL`].
pub(crate) async fn watch_httproutes(
    client: Client,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let routes_ar = httproute_resource();
    let grants_ar = reference_grant_resource();
    let mut said_absent = false;
    loop {
        match served(&client, &routes_ar).await {
            Ok(true) => break,
            Ok(false) => {
                if !said_absent {
                    tracing::info!(
                        "HTTPRoutes (gateway.networking.k8s.io/v1) are not served (no CRD, or no RBAC for them): Gateway API input is off until they are"
                    );
                    said_absent = true;
                }
                let newly = shared
                    .with_kube_policies(|k| {
                        let first = k.gateway.installed.is_none();
                        k.gateway.set_installed(false);
                        first
                    })
                    .unwrap_or(false);
                if newly {
                    shared.reload();
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot ask the API for HTTPRoutes; retrying"),
        }
        let wait = if said_absent {
            PROBE_INTERVAL
        } else {
            Duration::from_secs(5)
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
    tracing::info!("watching HTTPRoutes bound to Services (Gateway API input)");
    let grants_served = match served(&client, &grants_ar).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot ask the API for ReferenceGrants; taking none");
            false
        }
    };
    let _ = shared.with_kube_policies(|k| {
        k.gateway.set_installed(true);
        if !grants_served {
            k.gateway.sync_grants(&[]);
        }
    });
    let routes = super::reflect(
        Api::<DynamicObject>::all_with(client.clone(), &routes_ar),
        Writer::new(routes_ar.clone()),
        watcher::Config::default(),
        "HTTPRoute",
        shutdown.clone(),
        |objects| {
            let _ = shared.with_kube_policies(|k| k.gateway.sync_routes(objects));
            shared.reload();
        },
    );
    let grants = async {
        if grants_served {
            super::reflect(
                Api::<DynamicObject>::all_with(client.clone(), &grants_ar),
                Writer::new(grants_ar.clone()),
                watcher::Config::default(),
                "ReferenceGrant",
                shutdown.clone(),
                |objects| {
                    let _ = shared.with_kube_policies(|k| k.gateway.sync_grants(objects));
                    shared.reload();
                },
            )
            .await
        }
    };
    tokio::join!(routes, grants);
}
