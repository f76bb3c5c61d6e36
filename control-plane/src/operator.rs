//! What the operator tools read from the control plane's admin port beyond
//! `/policies` and `/proxies`: the admin page (`GET /`, one static HTML file built
//! into the binary whose script reads `/proxies`, `/policies` and `/rollouts`), and
//! `GET /served`, the validated policies it serves in canonical form (as written,
//! rollout blocks and file weights included) with the newest snapshot proxies receive
//! (rollout removed, effective weights in place). `sluicectl diff` compares policy
//! files with the former.

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;

use crate::state::Shared;

/// The page: proxies with their versions and NACK reasons, policy files, rollouts.
const PAGE: &str = include_str!("operator_page.html");

/// `GET /`: the page.
pub(crate) fn page() -> Response<Full<Bytes>> {
    Response::builder()
        .header("content-type", "text/html; charset=utf-8")
        .body(Full::new(Bytes::from_static(PAGE.as_bytes())))
        .expect("valid response")
}

/// `GET /served` as JSON; `version` is `null` before the first publication.
pub(crate) fn served(shared: &Shared) -> serde_json::Value {
    // A clone of the `Arc`, the watch's lock let go at once: borrowing the watch again
    // while holding it (as `Shared::current_version` does) waits behind a publication
    // queued in between, which waits for this borrow, and both hang.
    let published = shared.snapshots.borrow().clone();
    let Some(p) = published.as_deref() else {
        return serde_json::json!({ "version": null, "policies": null, "snapshot": null });
    };
    let snapshot = p.views.last().map(|v| {
        serde_json::json!({
            "version": v.snapshot.version,
            "schemaVersion": v.snapshot.schema_version,
            "policies": String::from_utf8_lossy(&v.snapshot.canonical),
        })
    });
    serde_json::json!({
        "version": p.views.last().map(|v| &v.snapshot.version),
        "hash": p.set.hash(),
        "policies": String::from_utf8_lossy(p.set.canonical_bytes()),
        "snapshot": snapshot,
    })
}
