//! What the validator accepts, the proxy applies: arbitrary text through
//! `parse_policies`, and every accepted set through a proxy's `PolicyStore::apply` (route
//! tables, governance stacks, inbound rules of the policy whose host the proxy serves):
//! never a panic, never a refusal. A set `validate` passes that a proxy refused would be
//! pushed by the control plane and refused by every proxy.

#![no_main]

use std::sync::OnceLock;

use http::uri::Authority;
use libfuzzer_sys::fuzz_target;
use sluice_config::{PolicySet, parse_policies};
use sluice_proxy::upstream::Upstream;
use sluice_proxy::{Metrics, PolicyStore, StackContext};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policies) = parse_policies("fuzz.yaml", text) else {
        return;
    };
    let _rt = runtime().enter();
    // The proxy serving the first policy's host (its inbound rules apply), and one
    // serving none.
    let service = policies.first().map(|p| p.spec.host.clone());
    for service in [service, None] {
        let set = PolicySet::new(policies.clone()).expect("accepted policies validate again");
        // A registry per input: label series would otherwise pile up across inputs.
        let ctx = StackContext::new(Upstream::new(), Metrics::new().expect("metrics"));
        let app: Authority = "127.0.0.1:8080".parse().unwrap();
        let store = PolicyStore::new(ctx, service.clone(), Some(app));
        if let Err(e) = store.apply("fuzz.yaml", set) {
            panic!("the proxy refused a set the validator accepted: {e}\n{text}");
        }
    }
});
