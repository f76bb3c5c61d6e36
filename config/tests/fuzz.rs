//! Inputs the `policy_parse` fuzz target turned up, kept with the positions the parser
//! reports for them: YAML counts a lone carriage return as a line break (and NEL, LS and
//! PS, as YAML 1.1 and kubectl's reader do), and places an error at the end of an
//! unterminated last line at the start of the next line.

use sluice_config::parse_policies;

fn first_position(text: &str) -> (usize, usize, String) {
    let err = parse_policies("fuzz.yaml", text).unwrap_err();
    let d = &err.diagnostics()[0];
    (d.line, d.column, d.message.clone())
}

#[test]
fn lone_carriage_returns_count_as_yaml_line_breaks() {
    let text = format!(
        "apiVersion: sluice.dev/v2alpha1\nkind: RoutePolicy\nmetadace, name{}space: s%hop }}\n\
         spec:\n  host: log-service\n  backends:\n    log-v0: {{ addresses:e[\"127.0.0.1:9101\"] }}\n\
         \x20 routes:\n    - name: ingest\n      timeout: 5\n",
        "\r".repeat(45)
    );
    let (line, column, message) = first_position(&text);
    // 2 lines, 45 carriage returns, then the key that has no ':' on line 48.
    assert_eq!((line, column), (48, 1), "{message}");
    assert!(message.contains("invalid YAML"), "{message}");
}

#[test]
fn an_unclosed_flow_mapping_at_the_end_is_placed_after_the_last_line() {
    let (line, column, message) = first_position("ec:\n  host: Policy\nmetadata: {lo`");
    assert_eq!((line, column), (4, 1), "{message}");
    assert!(message.contains("invalid YAML"), "{message}");
}

#[test]
fn unicode_line_and_paragraph_separators_count_as_yaml_line_breaks() {
    for separator in ['\u{2028}', '\u{2029}', '\u{85}'] {
        let text = format!("a1*\\{separator}\\\\Wsset:os\\{separator}\\\\Wsset:osluilseluilseC:");
        let (line, column, message) = first_position(&text);
        // The second `:` after a plain scalar on the third line.
        assert_eq!((line, column), (3, 24), "{separator:?}: {message}");
        assert!(message.contains("invalid YAML"), "{message}");
    }
}
