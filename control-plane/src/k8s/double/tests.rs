//! The double answers kube-rs as the API server would.

use futures_util::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{
    ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use serde_json::{Value, json};

use super::ApiServer;

fn lease(holder: &str) -> Lease {
    serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": { "name": "l", "namespace": "sluice-system" },
        "spec": { "holderIdentity": holder },
    }))
    .unwrap()
}

fn policy(name: &str, host: &str) -> Value {
    json!({ "apiVersion": "sluice.dev/v1alpha1", "kind": "RoutePolicy",
            "metadata": { "name": name, "namespace": "shop", "labels": { "team": "a" } },
            "spec": { "host": host, "backends": { "b": { "addresses": ["10.0.0.1:80"] } },
                      "routes": [{ "name": "r" }] } })
}

fn policies(api: &ApiServer) -> Api<DynamicObject> {
    Api::namespaced_with(
        api.client(),
        "shop",
        &super::super::policies::api_resource(),
    )
}

#[tokio::test]
async fn a_stale_update_is_a_conflict() {
    let api = ApiServer::new();
    let leases: Api<Lease> = Api::namespaced(api.client(), "sluice-system");
    let created = leases
        .create(&PostParams::default(), &lease("a"))
        .await
        .unwrap();
    let rv = created.metadata.resource_version.clone().unwrap();
    assert!(created.metadata.uid.is_some());
    let mut mine = created.clone();
    mine.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let updated = leases
        .replace("l", &PostParams::default(), &mine)
        .await
        .unwrap();
    assert_ne!(updated.metadata.resource_version.unwrap(), rv);
    // Another writer with what it read before: refused.
    let mut stale = created;
    stale.spec.as_mut().unwrap().holder_identity = Some("c".into());
    let err = leases
        .replace("l", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"));
    let again = leases
        .create(&PostParams::default(), &lease("a"))
        .await
        .unwrap_err();
    assert!(matches!(again, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists"));
    assert_eq!(
        leases
            .get("l")
            .await
            .unwrap()
            .spec
            .unwrap()
            .holder_identity
            .as_deref(),
        Some("b")
    );
}

#[tokio::test]
async fn status_and_spec_are_written_separately() {
    let api = ApiServer::new();
    let rp = policies(&api);
    let created = api.put(policy("p", "h"));
    assert_eq!(created["metadata"]["generation"], 1);
    // A status write carrying a spec change changes the status alone.
    let patch = json!({ "spec": { "host": "other" }, "status": { "accepted": true, "observedGeneration": 1 } });
    let after = rp
        .patch_status("p", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert_eq!(after.data["spec"]["host"], "h");
    assert_eq!(after.data["status"]["accepted"], true);
    assert_eq!(after.metadata.generation, Some(1));
    // A spec write carrying a status changes the spec alone, and the generation.
    let patch = json!({ "spec": { "host": "h2" }, "status": { "accepted": false } });
    let after = rp
        .patch("p", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert_eq!(after.data["spec"]["host"], "h2");
    assert_eq!(after.data["status"]["accepted"], true);
    assert_eq!(after.metadata.generation, Some(2));
    // A status write from a stale resourceVersion is a conflict.
    let stale = json!({ "metadata": { "resourceVersion": created["metadata"]["resourceVersion"] },
                        "status": { "accepted": false } });
    let err = rp
        .patch_status("p", &PatchParams::default(), &Patch::Merge(&stale))
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 409));
    // What the CRD schema refuses is refused.
    let bad = json!({ "spec": { "routes": [{ "name": "r", "timeout": "2x" }] } });
    let err = rp
        .patch("p", &PatchParams::default(), &Patch::Merge(&bad))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 422 && s.message.contains("spec.routes[0].timeout")),
        "{err:?}"
    );
}

#[tokio::test]
async fn lists_and_watches_select_by_label_and_resume_from_a_resource_version() {
    let api = ApiServer::new();
    let rp = policies(&api);
    api.put(policy("a", "h-a"));
    let mut other = policy("b", "h-b");
    other["metadata"]["labels"]["team"] = json!("b");
    api.put(other);
    let list = rp
        .list(&ListParams::default().labels("team=a"))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1);
    let from = list.metadata.resource_version.unwrap();

    // Written after the list: a watch from its resourceVersion sees it.
    api.put(policy("c", "h-c"));
    let wp = WatchParams::default().labels("team=a");
    let mut events = rp.watch(&wp, &from).await.unwrap().boxed();
    let Some(WatchEvent::Added(o)) = events.try_next().await.unwrap() else {
        panic!("an ADDED event")
    };
    assert_eq!(o.metadata.name.as_deref(), Some("c"));
    api.bookmark();
    let Some(WatchEvent::Bookmark(b)) = events.try_next().await.unwrap() else {
        panic!("a bookmark")
    };
    assert_eq!(
        b.metadata.resource_version,
        api.resource_version().to_string()
    );
    api.close_watches();
    assert!(events.try_next().await.unwrap().is_none(), "the watch ends");

    // Compacted: resuming from before is 410 Gone, inside the stream.
    api.put(policy("d", "h-d"));
    api.compact();
    let mut events = rp.watch(&wp, &from).await.unwrap().boxed();
    let Some(WatchEvent::Error(e)) = events.try_next().await.unwrap() else {
        panic!("an ERROR event")
    };
    assert_eq!(e.code, 410);
}

#[tokio::test]
async fn server_side_apply_needs_a_field_manager_and_is_recorded() {
    let api = ApiServer::new();
    let cms: Api<ConfigMap> = Api::namespaced(api.client(), "shop");
    let cm: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": "root", "namespace": "shop" }, "data": { "root.pem": "x" } }))
    .unwrap();
    cms.patch(
        "root",
        &PatchParams::apply("sluice").force(),
        &Patch::Apply(&cm),
    )
    .await
    .unwrap();
    let call = api.calls().pop().unwrap();
    assert_eq!(call.content_type, "application/apply-patch+yaml");
    assert_eq!(call.param("fieldManager"), Some("sluice"));
    assert_eq!(call.param("force"), Some("true"));
    assert_eq!(call.body["data"]["root.pem"], "x");
    assert_eq!(
        api.get("configmaps", "shop", "root").unwrap()["data"]["root.pem"],
        "x"
    );
    let err = cms
        .patch("root", &PatchParams::default(), &Patch::Apply(&cm))
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 400));
    // A field the type lacks is refused, like a strict API server.
    let typo = json!({ "apiVersion": "v1", "kind": "ConfigMap",
                       "metadata": { "name": "root", "namespace": "shop" }, "dat": {} ,"date": {"a": "b"} });
    let err = cms
        .patch("root", &PatchParams::apply("sluice"), &Patch::Apply(&typo))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 422),
        "{err:?}"
    );
    let ar = ApiResource::erase::<ConfigMap>(&());
    assert_eq!(ar.plural, "configmaps");
}
