//! What the operator tools read from the control plane's admin port beyond
//! `/policies` and `/proxies`: `GET /served`, the validated policies it serves in
//! canonical form (as written, rollout blocks and file weights included), and the
//! newest snapshot proxies receive (rollout removed, effective weights in place).
//! `sluicectl diff` compares policy files with the former.

use crate::Shared;

/// `GET /served` as JSON; `version` is `null` before the first publication.
pub(crate) fn served(shared: &Shared) -> serde_json::Value {
    let published = shared.snapshots.borrow();
    let Some(p) = published.as_ref() else {
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
        "version": shared.current_version(),
        "hash": p.set.hash(),
        "policies": String::from_utf8_lossy(p.set.canonical_bytes()),
        "snapshot": snapshot,
    })
}
