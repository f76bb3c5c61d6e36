//! Hostile policy files too large to keep in the corpus, generated: each is cheap to
//! write and, without bounds on policy input, costly to parse (memory, stack or time).
//! Shared by the corpus test, the allocation test and the end-to-end tests.

#![allow(dead_code)] // each test binary uses some of these

use std::fmt::Write;

/// The start of a policy document, up to `spec.host`.
const HEAD: &str = "apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: hostile, namespace: shop }
spec:
  host: hostile
";

/// One anchor of 3,000 items referenced 3,000 times (18 KB): over 1 GB once built.
pub(crate) fn alias_fan_out() -> String {
    let items = vec!["0"; 3_000].join(",");
    let aliases = vec!["*a"; 3_000].join(", ");
    format!("{HEAD}  x: &a [{items}]\n  y: [{aliases}]\n")
}

/// One anchored string of 900,000 letters, a valid method token, repeated by `aliases`
/// routes' `method` (under 1 MiB whatever the count): within the node budget, where
/// 200 aliases once took 867 MB and 36 s to accept.
pub(crate) fn string_fan_out(aliases: usize) -> String {
    let mut s = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: hostile, namespace: shop, annotations: {{ big: &big \"{}\" }} }}\nspec:\n  host: hostile\n  backends:\n    v1: {{ addresses: [\"127.0.0.1:9101\"] }}\n  routes:\n",
        "A".repeat(900_000)
    );
    for i in 0..aliases {
        let _ = writeln!(s, "    - {{ name: r{i}, match: {{ method: *big }} }}");
    }
    s
}

/// Block sequences nested 100,000 levels on one line (200 KB).
pub(crate) fn deep_block_nesting() -> String {
    format!("{}x\n", "- ".repeat(100_000))
}

/// Block mappings nested 1,400 levels, one more space of indent each (1 MB).
pub(crate) fn deep_block_mappings() -> String {
    let mut s = String::new();
    for i in 0..1_400 {
        let _ = writeln!(s, "{}a:", " ".repeat(i));
    }
    s
}

/// Flow sequences opened 100,000 times (100 KB).
pub(crate) fn deep_flow_nesting() -> String {
    "[".repeat(100_000)
}

/// A valid policy padded with comments to one byte over the default 1 MiB.
pub(crate) fn oversized() -> String {
    let mut s = format!("{HEAD}  inbound: {{}}\n");
    while s.len() <= 1024 * 1024 {
        s.push_str("# padding padding padding padding padding padding padding padding\n");
    }
    s
}

/// A policy of `n` routes.
pub(crate) fn routes(n: usize) -> String {
    let mut s =
        format!("{HEAD}  backends:\n    v1: {{ addresses: [\"127.0.0.1:9101\"] }}\n  routes:\n");
    for i in 0..n {
        let _ = writeln!(
            s,
            "    - {{ name: r{i}, match: {{ path: {{ prefix: /r{i} }} }}, split: [{{ backend: v1 }}] }}"
        );
    }
    s
}

/// `n` documents in one file, each an empty mapping: counted as policies before
/// anything else is looked at.
pub(crate) fn policies(n: usize) -> String {
    "--- {}\n".repeat(n)
}

/// Just within every default limit and still refused (a list of 199,000 nodes where
/// a name belongs): what refusing the largest file the limits let through costs.
pub(crate) fn dense_within_limits() -> String {
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: [{}] }}\n",
        vec!["0"; 199_000].join(",")
    )
}

/// Every generated case with the exact refusal it gets under the default limits.
pub(crate) fn cases() -> Vec<(&'static str, String, String)> {
    vec![
        (
            "alias-fan-out.yaml",
            alias_fan_out(),
            "alias-fan-out.yaml:7:267: this alias repeats 3001 nodes, and with them the file expands to more than the 200000 nodes allowed (aliases count as the nodes they repeat; --policy-max-nodes)".to_string(),
        ),
        (
            "string-fan-out.yaml",
            string_fan_out(200),
            "string-fan-out.yaml:12:36: this alias repeats 900000 bytes, and with them the file's values come to more than the 4194304 bytes allowed (4 times --policy-max-file-bytes; aliases count as the bytes they repeat)".to_string(),
        ),
        (
            "deep-block-nesting.yaml",
            deep_block_nesting(),
            "deep-block-nesting.yaml:1:65: nested more than 32 levels deep (--policy-max-depth)"
                .to_string(),
        ),
        (
            "deep-block-mappings.yaml",
            deep_block_mappings(),
            "deep-block-mappings.yaml:33:34: nested more than 32 levels deep (--policy-max-depth)"
                .to_string(),
        ),
        (
            "deep-flow-nesting.yaml",
            deep_flow_nesting(),
            "deep-flow-nesting.yaml:1:256: nested more than 32 levels deep (--policy-max-depth)"
                .to_string(),
        ),
        (
            "oversized.yaml",
            oversized(),
            "oversized.yaml:15892:1: the file holds more than the 1048576 bytes allowed in one policy file (--policy-max-file-bytes)".to_string(),
        ),
        (
            "too-many-routes.yaml",
            routes(1_001),
            "too-many-routes.yaml:1009:7: more than 1000 routes in one policy (--policy-max-routes)"
                .to_string(),
        ),
        (
            "too-many-policies.yaml",
            policies(10_001),
            "too-many-policies.yaml:10001:1: more than 10000 policies (--policy-max-policies)"
                .to_string(),
        ),
        (
            "dense-within-limits.yaml",
            dense_within_limits(),
            "dense-within-limits.yaml:3:13: metadata.name: expected a string, got a list".to_string(),
        ),
    ]
}
