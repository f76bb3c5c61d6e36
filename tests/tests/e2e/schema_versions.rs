//! Schema growth without freezing old proxies: a proxy that accepts only the first
//! schema keeps receiving every other policy's updates while one policy uses a
//! second-wave field (`stickyBy.hash: rendezvous`), and a current proxy beside it
//! receives and enforces that field.

use sluice_config::{PolicySet, SCHEMA_V1, SCHEMA_VERSION, StickyHash};
use sluice_e2e::{
    ProxyOptions, SchemaSubscriber, TestControlPlane, TestProxy, Upstream, WAIT, metric_sum,
    scrape, single_backend_policy, wait_until,
};

const SVC: &str = "svc.yaml";
const STICKY: &str = "sticky.yaml";

fn sticky_policy(hash: &str, a: std::net::SocketAddr, b: std::net::SocketAddr) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: sticky, namespace: e2e }}
spec:
  host: sticky
  backends:
    one: {{ addresses: ["{a}"] }}
    two: {{ addresses: ["{b}"] }}
  routes:
    - name: all
      split:
        - weights: {{ one: 50, two: 50 }}
          stickyBy: {{ header: x-user-id, hash: {hash} }}
"#
    )
}

/// The backend address `host`'s only route sends to in `set`, or the sticky hash.
fn svc_address(set: &PolicySet) -> Option<String> {
    let p = set.policies().iter().find(|p| p.spec.host == "svc")?;
    p.spec.backends.values().next()?.addresses.first().cloned()
}

fn sticky_hash(set: &PolicySet) -> Option<StickyHash> {
    let p = set.policies().iter().find(|p| p.spec.host == "sticky")?;
    Some(p.spec.routes[0].split[0].sticky_by.as_ref()?.hash)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_proxy_keeps_receiving_other_policies_while_one_uses_a_new_field() {
    let blue = Upstream::auto("blue").await;
    let green = Upstream::auto("green").await;
    let (one, two) = (Upstream::auto("one").await, Upstream::auto("two").await);
    let cp = TestControlPlane::start(&[
        (SVC, &single_backend_policy("svc", "svc", blue.addr())),
        (STICKY, &sticky_policy("ordered", one.addr(), two.addr())),
    ])
    .await;
    let v1 = cp.version().expect("the first load is published");
    let old = SchemaSubscriber::start(&cp.url(), "old-proxy", &[SCHEMA_V1]);
    let dir = tempfile::tempdir().expect("temporary directory");
    let new =
        TestProxy::start_subscribed(&cp.url(), "new-proxy", dir.path(), ProxyOptions::default())
            .await;
    // Nothing new is used yet: both get the same version.
    cp.wait_acked_everywhere(&v1, 2).await;

    // One policy starts using a second-wave field.
    cp.write_policy(STICKY, &sticky_policy("rendezvous", one.addr(), two.addr()));
    let cpr = &cp;
    let v1r = v1.clone();
    wait_until("the rendezvous edit is published", WAIT, || {
        let v1r = v1r.clone();
        async move { cpr.version().is_some_and(|v| v != v1r) }
    })
    .await;
    let v2 = cp.version().expect("served");
    let newr = &new;
    let v2r = v2.clone();
    wait_until(
        "the current proxy applies the rendezvous policy",
        WAIT,
        || {
            let v2r = v2r.clone();
            async move { newr.version().await.as_deref() == Some(v2r.as_str()) }
        },
    )
    .await;
    // The old proxy was not sent anything it cannot take: it still has v1.
    let status = old.status();
    assert_eq!(status.last_rejected, None, "{status:?}");
    let held = cp.admin_json("/policies").await;
    let views = held["schemaViews"].as_array().expect("schemaViews").clone();
    let v1_view = views
        .iter()
        .find(|v| v["forSchemaVersion"] == SCHEMA_V1)
        .expect("a view for schema 1");
    assert_eq!(v1_view["version"], v1.as_str(), "{held}");
    assert_eq!(v1_view["heldBack"][0]["policy"], "e2e/sticky", "{held}");
    assert_eq!(v1_view["heldBack"][0]["state"], "held", "{held}");
    let metrics = scrape(cp.admin_addr()).await;
    let held_series = metric_sum(
        &metrics,
        "sluice_cp_policies_held_back",
        &[
            r#"policy="e2e/sticky""#,
            r#"schema_version="1""#,
            r#"state="held""#,
        ],
    );
    assert_eq!(held_series, 1.0, "{metrics}");

    // Another policy changes: the old proxy receives it, with the sticky policy in
    // its last form the old schema expressed.
    cp.write_policy(SVC, &single_backend_policy("svc", "svc", green.addr()));
    let green_addr = green.addr().to_string();
    let oldr = &old;
    wait_until(
        "the old proxy receives the other policy's edit",
        WAIT,
        || {
            let green_addr = green_addr.clone();
            async move {
                oldr.sink
                    .current()
                    .is_some_and(|s| svc_address(&s).as_deref() == Some(green_addr.as_str()))
            }
        },
    )
    .await;
    let old_set = old.sink.current().expect("applied");
    assert_eq!(sticky_hash(&old_set), Some(StickyHash::Ordered));
    assert_eq!(old_set.schema_version(), SCHEMA_V1);
    assert_eq!(old.status().last_rejected, None);

    // The current proxy converges on what is served, with both edits.
    wait_until(
        "the current proxy has the served version",
        WAIT,
        || async move {
            let served = cpr.version();
            served.is_some() && newr.version().await == served
        },
    )
    .await;
    let v3 = cp.version().expect("served");
    let new_set = PolicySet::from_canonical(
        "config",
        new.admin_json("/config").await["policies"]
            .as_str()
            .unwrap_or_default()
            .as_bytes(),
    )
    .expect("the proxy's policies validate");
    assert_eq!(sticky_hash(&new_set), Some(StickyHash::Rendezvous));
    assert_eq!(new_set.schema_version(), SCHEMA_VERSION);
    // The proxy applies a snapshot before its ack reaches the control plane: wait for
    // the ack rather than reading `/proxies` the moment the proxy has it.
    let v3r = v3.as_str();
    wait_until(
        "the control plane records the current proxy's ack",
        WAIT,
        || async move {
            let proxies = cpr.admin_json("/proxies").await;
            proxies["proxies"].as_array().is_some_and(|l| {
                l.iter()
                    .any(|p| p["node_id"] == "new-proxy" && p["acked_version"] == v3r)
            })
        },
    )
    .await;
    let proxies = cp.admin_json("/proxies").await;
    let list = proxies["proxies"].as_array().expect("proxies").clone();
    let find = |node: &str| {
        list.iter()
            .find(|p| p["node_id"] == node)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(find("new-proxy")["acked_version"], v3.as_str());
    assert_eq!(
        find("old-proxy")["accepted_schema_versions"],
        serde_json::json!([SCHEMA_V1])
    );
    assert_ne!(find("old-proxy")["acked_version"], v3.as_str());
    assert!(find("old-proxy")["nacked_version"].is_null(), "{proxies}");

    old.shutdown().await;
    new.shutdown().await;
}
