//! The policy parser and validator on arbitrary text: never a panic; refusals carry
//! located diagnostics; what is accepted validates again and survives its canonical
//! form unchanged, hash included.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_config::{Limits, PolicySet, parse_policies, parse_policies_with};

/// Limits small enough that the fuzzer's inputs reach every refusal.
const TIGHT: Limits = Limits {
    max_file_bytes: 2048,
    max_total_bytes: 4096,
    max_depth: 6,
    max_nodes: 200,
    max_routes: 3,
    max_policies: 2,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Under tight limits: a verdict, located, whatever the input.
    if let Err(err) = parse_policies_with("fuzz.yaml", text, &TIGHT) {
        assert!(!err.diagnostics().is_empty(), "a refusal says why");
        assert!(
            err.diagnostics()
                .iter()
                .all(|d| d.line >= 1 && d.column >= 1)
        );
        assert!(
            !err.to_string().contains("the YAML reader failed"),
            "the YAML reader panicked: {err}"
        );
    }
    match parse_policies("fuzz.yaml", text) {
        Ok(policies) => {
            let set = PolicySet::new(policies.clone())
                .expect("policies accepted from a file validate again");
            let files = PolicySet::from_files([("fuzz.yaml", text)])
                .expect("a file accepted alone is accepted as a set");
            assert_eq!(files.hash(), set.hash(), "one set, one hash");
            let again = PolicySet::from_canonical("canonical", set.canonical_bytes())
                .expect("the canonical form parses");
            assert_eq!(
                again.policies(),
                set.policies(),
                "canonical form round-trips"
            );
            assert_eq!(again.hash(), set.hash(), "canonical form keeps the hash");
        }
        Err(err) => {
            assert!(!err.diagnostics().is_empty(), "a refusal says why");
            // The YAML reader breaks lines at LF, CRLF and a lone CR alike, and (as YAML
            // 1.1 and kubectl's reader do) at NEL, LS and PS; an error at the end of a
            // last line without a line break is placed at the start of the next.
            let lines = 2 + text
                .replace("\r\n", "\n")
                .matches(['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}'])
                .count();
            for d in err.diagnostics() {
                assert!(d.line >= 1 && d.column >= 1, "1-based position: {d}");
                assert!(d.line <= lines, "line {} of {lines}: {d}", d.line);
                assert!(!d.message.is_empty(), "a diagnostic has a message");
                // The parser turns a panic of the YAML reader into a refusal, so that
                // a watcher survives it; it is still a bug.
                assert!(
                    !d.message.starts_with("the YAML reader failed"),
                    "the YAML reader panicked: {d}"
                );
            }
            let _ = err.to_string();
        }
    }
});
