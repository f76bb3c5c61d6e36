//! Leader election over a `coordination.k8s.io/v1` Lease.
//!
//! Every replica serves proxies; only the leader writes RoutePolicy statuses, so
//! replicas never fight over them. The loop follows client-go's rules: a replica
//! takes the Lease when it is free or when its record (holder and renew time) has
//! not changed for `leaseDurationSeconds` as measured by the replica's own clock
//! (never by comparing timestamps across machines); every write carries the
//! `resourceVersion` read, so two replicas racing for it cannot both win (the
//! loser gets 409 Conflict). The leader renews every `renew_every`; a leader that
//! fails to renew steps down at once, before anyone else can take over.
//!
//! The holder also writes where its admin port answers into the Lease
//! ([`ADMIN_URL_ANNOTATION`]): followers forward the proxies' traffic reports there,
//! since only the holder judges rollouts.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;

/// Which Lease and how often.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Namespace of the Lease (the control plane's own).
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity in `holderIdentity` (its pod name).
    pub holder: String,
    /// How long a Lease not renewed stays with its holder.
    pub lease_duration: Duration,
    /// How often the leader renews (well below `lease_duration`).
    pub renew_every: Duration,
    /// How often a follower checks whether the Lease has become free.
    pub retry_every: Duration,
    /// Where this replica's admin port answers other replicas (`http://POD_IP:PORT`),
    /// written into the Lease while it holds it.
    pub admin_url: Option<String>,
}

/// The Lease annotation naming the holder's admin URL.
pub const ADMIN_URL_ANNOTATION: &str = "sluice.dev/admin-url";

impl LeaseConfig {
    /// client-go's defaults: 15 s lease, renew every 5 s, retry every 2 s.
    pub fn new(namespace: &str, name: &str, holder: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            holder: holder.to_string(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            retry_every: Duration::from_secs(2),
            admin_url: None,
        }
    }
}

/// The last Lease record seen and when (by our clock) it was first seen.
#[derive(Debug)]
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    since: Instant,
}

/// Runs the election until `shutdown` turns true, reporting leadership on
/// `leading`. On shutdown a leader gives the Lease up so another replica takes
/// over without waiting for it to expire.
pub async fn run(
    client: Client,
    cfg: LeaseConfig,
    leading: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut observed: Option<Observed> = None;
    loop {
        let now_leading = match try_acquire_or_renew(&api, &cfg, &mut observed).await {
            Ok(leading) => leading,
            Err(e) => {
                tracing::warn!(error = %e, lease = %cfg.name, "lease update failed; not leading");
                false
            }
        };
        leading.send_if_modified(|cur| {
            if *cur == now_leading {
                return false;
            }
            tracing::info!(lease = %cfg.name, holder = %cfg.holder, leading = now_leading, "leadership changed");
            *cur = now_leading;
            true
        });
        let wait = if now_leading {
            cfg.renew_every
        } else {
            cfg.retry_every
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => break,
        }
        if *shutdown.borrow() {
            break;
        }
    }
    if *leading.borrow() {
        leading.send_replace(false);
        if let Err(e) = release(&api, &cfg).await {
            tracing::warn!(error = %e, "could not release the lease; it expires on its own");
        }
    }
}

async fn try_acquire_or_renew(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let duration_secs = i32::try_from(cfg.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(&cfg.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: Some(cfg.namespace.clone()),
                annotations: cfg
                    .admin_url
                    .as_ref()
                    .map(|u| [(ADMIN_URL_ANNOTATION.to_string(), u.clone())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.holder.clone()),
                lease_duration_seconds: Some(duration_secs),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return conflict_is_false(api.create(&PostParams::default(), &lease).await);
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    // Has the record changed since we last looked? Expiry counts from then.
    let changed = observed
        .as_ref()
        .is_none_or(|o| o.holder != holder || o.renew_time != spec.renew_time);
    if changed {
        *observed = Some(Observed {
            holder: holder.clone(),
            renew_time: spec.renew_time.clone(),
            since: Instant::now(),
        });
    }
    let theirs = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(cfg.lease_duration, Duration::from_secs);
    let ours = holder.as_deref() == Some(cfg.holder.as_str());
    let expired = observed
        .as_ref()
        .is_some_and(|o| o.since.elapsed() >= theirs);
    if !ours && holder.is_some() && !expired {
        return Ok(false);
    }
    if !ours {
        spec.acquire_time = Some(now.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        tracing::info!(lease = %cfg.name, previous = ?holder, "taking over the lease");
    }
    spec.holder_identity = Some(cfg.holder.clone());
    spec.lease_duration_seconds = Some(duration_secs);
    spec.renew_time = Some(now);
    let annotations = lease
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    match &cfg.admin_url {
        Some(url) => annotations.insert(ADMIN_URL_ANNOTATION.to_string(), url.clone()),
        None => annotations.remove(ADMIN_URL_ANNOTATION),
    };
    // `replace` sends the resourceVersion we read: a concurrent writer makes it 409.
    let result = api.replace(&cfg.name, &PostParams::default(), &lease).await;
    let won = conflict_is_false(result)?;
    if won {
        *observed = None;
    }
    Ok(won)
}

/// Keeps `holder` at the admin URL of the Lease's current holder when that is
/// another replica (`None` while this one holds it, or nobody does, or the holder
/// names none), looking every `retry_every`, until `shutdown`.
pub async fn watch_holder(
    client: Client,
    cfg: LeaseConfig,
    holder: watch::Sender<Option<String>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    loop {
        match api.get_opt(&cfg.name).await {
            Ok(lease) => {
                let url = lease.and_then(|l| {
                    let who = l.spec.as_ref()?.holder_identity.clone()?;
                    if who.is_empty() || who == cfg.holder {
                        return None;
                    }
                    l.metadata.annotations?.remove(ADMIN_URL_ANNOTATION)
                });
                holder.send_if_modified(|cur| {
                    if *cur == url {
                        return false;
                    }
                    tracing::info!(holder_admin_url = ?url, "rollout reports now go to the lease holder there");
                    *cur = url;
                    true
                });
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the lease; keeping the holder's last address")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.retry_every) => {}
            _ = shutdown.changed() => return,
        }
    }
}

fn conflict_is_false(result: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

async fn release(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(&cfg.name).await? else {
        return Ok(());
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() != Some(cfg.holder.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    api.replace(&cfg.name, &PostParams::default(), &lease)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::k8s::double::ApiServer;

    /// The Lease as stored in the API double.
    fn stored(api: &ApiServer) -> Value {
        api.get("leases", "sluice-system", "sluice-control-plane")
            .expect("the Lease exists")
    }

    fn held_by(holder: &str) -> Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": { "name": "sluice-control-plane", "namespace": "sluice-system" },
            "spec": { "holderIdentity": holder, "leaseDurationSeconds": 15,
                      "renewTime": "2026-01-01T00:00:00.000000Z" }
        })
    }

    fn cfg(holder: &str) -> LeaseConfig {
        LeaseConfig::new("sluice-system", "sluice-control-plane", holder)
    }

    #[tokio::test(start_paused = true)]
    async fn first_replica_creates_the_lease_and_leads_until_shutdown() {
        let api = ApiServer::new();
        let (tx, mut rx) = watch::channel(false);
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(api.client(), cfg("cp-a"), tx, stop_rx));
        rx.wait_for(|l| *l).await.unwrap();
        assert_eq!(stored(&api)["spec"]["holderIdentity"], "cp-a");
        let created = stored(&api)["metadata"]["resourceVersion"].clone();
        // Renewals keep it.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(*rx.borrow());
        assert_ne!(
            stored(&api)["metadata"]["resourceVersion"],
            created,
            "renewed"
        );
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        assert!(!*rx.borrow());
        // Released: the next replica need not wait for expiry.
        assert!(stored(&api)["spec"]["holderIdentity"].is_null());
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_waits_for_a_live_holder_and_takes_over_a_stale_one() {
        let api = ApiServer::new();
        api.put(held_by("cp-other"));
        let (tx, mut rx) = watch::channel(false);
        let (_stop_tx, stop_rx) = watch::channel(false);
        let start = Instant::now();
        tokio::spawn(run(api.client(), cfg("cp-b"), tx, stop_rx));
        // The holder keeps renewing for a while: we must not take it.
        for i in 0..10 {
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert!(!*rx.borrow(), "took a live lease after {i} renewals");
            let mut renewed = stored(&api);
            renewed["spec"]["renewTime"] = json!(format!("2026-01-01T00:00:{:02}.000000Z", i + 1));
            api.put(renewed);
        }
        // Then it stops renewing: after the lease duration it is ours.
        let stopped = Instant::now();
        rx.wait_for(|l| *l).await.unwrap();
        let waited = stopped.elapsed();
        assert!(
            waited >= Duration::from_secs(15),
            "took over after {waited:?}"
        );
        assert!(
            waited <= Duration::from_secs(15 + 2 + 1),
            "took over after {waited:?}"
        );
        assert!(start.elapsed() > Duration::from_secs(30));
        let lease = stored(&api);
        assert_eq!(lease["spec"]["holderIdentity"], "cp-b");
        assert_eq!(lease["spec"]["leaseTransitions"], 1);
    }

    #[tokio::test(start_paused = true)]
    async fn two_replicas_starting_together_elect_one() {
        let api = ApiServer::new();
        let (a_tx, a) = watch::channel(false);
        let (b_tx, b) = watch::channel(false);
        let (_stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(run(api.client(), cfg("cp-a"), a_tx, stop_rx.clone()));
        tokio::spawn(run(api.client(), cfg("cp-b"), b_tx, stop_rx));
        let mut leader = None;
        for _ in 0..120 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (a, b) = (*a.borrow(), *b.borrow());
            assert!(!(a && b), "two leaders");
            let now = if a {
                Some("cp-a")
            } else if b {
                Some("cp-b")
            } else {
                None
            };
            if leader.is_some() {
                assert_eq!(now, leader, "the leader keeps the Lease while it renews");
            }
            leader = leader.or(now);
        }
        let leader = leader.expect("a leader");
        assert_eq!(stored(&api)["spec"]["holderIdentity"], leader);
        // A create that lost the race was refused by the store.
        let creates: Vec<u16> = api
            .calls()
            .iter()
            .filter(|c| c.method == http::Method::POST)
            .map(|c| c.status)
            .collect();
        assert_eq!(creates[0], 201);
        assert!(creates[1..].iter().all(|c| *c == 409), "{creates:?}");
    }
}
