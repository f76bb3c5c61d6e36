//! From the text of one file to validated policies or positioned diagnostics.
//!
//! serde_yaml decides what the values are (and reports syntax errors with their
//! position); serde_path_to_error says which field a type error is in; the
//! span-aware pass in [`crate::spans`] turns every field path, including those of
//! semantic errors, into a line and column. A type error stops only its own
//! document; semantic checks report every problem they find.

use std::cell::LazyCell;
use std::collections::HashMap;

use serde::Deserialize;
use serde_path_to_error::Segment;
use serde_yaml::Value;

use crate::limits::{self, Limits, SetUsage};
use crate::spans::{self, DocSpans, Pos, child_index, child_key};
use crate::validate::{self, Finding, Input};
use crate::{API_VERSION, Diagnostic, KIND, RoutePolicy};

/// A validated policy and the source it came from, to locate it if it clashes.
#[derive(Clone, Debug)]
pub(crate) struct Located<'a> {
    pub(crate) policy: RoutePolicy,
    pub(crate) file: String,
    /// The file's text and the document's index in it; `None` for policies built in code.
    pub(crate) source: Option<(&'a str, usize)>,
}

impl Located<'_> {
    /// Where `path` was written. Only called on the error path, so the span pass
    /// runs then rather than being kept for every valid policy; `cache` keeps it for
    /// the other policies of the same text.
    fn locate(&self, path: &str, cache: &mut HashMap<*const u8, Vec<DocSpans>>) -> Pos {
        match self.source {
            Some((text, doc)) => cache
                .entry(text.as_ptr())
                .or_insert_with(|| spans::collect(text))
                .get(doc)
                .map_or(Pos::START, |d| d.locate(path, false)),
            None => Pos::START,
        }
    }
}

/// What a file is refused with when the YAML reader panics on it.
pub(crate) const READER_FAILED: &str = "the YAML reader failed on this file";

/// Parses and validates every document of one file, without cross-policy checks.
///
/// The span-aware pass runs only once something is wrong: valid files (every
/// snapshot a proxy receives) pay for one YAML parse, not two.
pub(crate) fn parse_file<'a>(
    file: &str,
    text: &'a str,
    input: Input,
    limits: &Limits,
    usage: &mut SetUsage,
) -> (Vec<Located<'a>>, Vec<Diagnostic>) {
    // serde_yaml is no longer maintained and has panicked on input before (a document
    // cut short by a load error, now handled in `parse_unguarded`): a panic must refuse
    // the file, not end the proxy's or the control plane's watcher with it. What it
    // left in `usage` does not matter, as the file's refusal refuses the whole set.
    refused_on_panic(file, || parse_unguarded(file, text, input, limits, usage))
}

/// Runs `parse`, turning a panic in it into the refusal of `file`.
fn refused_on_panic<T>(
    file: &str,
    parse: impl FnOnce() -> (Vec<T>, Vec<Diagnostic>),
) -> (Vec<T>, Vec<Diagnostic>) {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(parse)).unwrap_or_else(|panic| {
        let why = panic_message(panic.as_ref());
        let message = format!("{READER_FAILED} ({why}); nothing of it was taken");
        (Vec::new(), vec![Diagnostic::at(file, 1, 1, message)])
    })
}

/// The text a caught panic carried (`panic!`'s message), or empty for any other payload;
/// for the refusals that stand in for a panic in reading or applying a policy.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

fn parse_unguarded<'a>(
    file: &str,
    text: &'a str,
    input: Input,
    limits: &Limits,
    usage: &mut SetUsage,
) -> (Vec<Located<'a>>, Vec<Diagnostic>) {
    // YAML allows one leading byte order mark and Windows editors write one; neither
    // the limits pass nor libyaml would read past it. It takes no column, so positions
    // in the rest of the file are those of the text without it.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let unchecked = match limits::check_text(file, text, limits, usage) {
        Ok(u) => u,
        Err(refused) => return (Vec::new(), vec![refused]),
    };
    let spans = LazyCell::new(|| spans::collect(text));
    let empty = DocSpans::default();
    let mut out = Vec::new();
    let mut errors = Vec::new();
    // Past yaml-rust2's syntax error nothing was checked: libyaml reads no further
    // than just past it.
    let yaml = unchecked.as_ref().map_or(text, |u| &text[..u.cut]);
    for (i, doc) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        if let Some(u) = unchecked.as_ref().filter(|u| i >= u.doc) {
            // The limits were checked only up to yaml-rust2's syntax error. libyaml
            // usually refuses the same document, and its wording is kept; if it
            // accepts it, yaml-rust2's error stands. Nothing is built either way.
            match limits::walk_unchecked(doc, limits) {
                // An error past the error's line is the cut's doing.
                Err(e)
                    if !limits::is_over_budget(&e)
                        && e.location().is_some_and(|l| l.line() <= u.error.line) =>
                {
                    errors.push(syntax_error(file, text, &e))
                }
                _ => errors.push(u.error.clone()),
            }
            break;
        }
        let sp = || spans.get(i).unwrap_or(&empty);
        let diag = |f: Finding| {
            let pos = sp().locate(&f.path, f.at_key);
            Diagnostic {
                file: file.to_string(),
                line: pos.line,
                column: pos.column,
                path: shown_path(&f.path),
                message: f.message,
            }
        };
        let value = match Value::deserialize(doc) {
            Ok(Value::Null) => continue,
            Ok(v) => v,
            Err(_) if !sp().duplicate_keys.is_empty() => {
                // serde_yaml refuses duplicate keys without saying where; the span
                // pass knows.
                for (path, at, first) in &sp().duplicate_keys {
                    errors.push(Diagnostic {
                        file: file.to_string(),
                        line: at.line,
                        column: at.column,
                        path: shown_path(path),
                        message: format!("duplicate key (first at line {})", first.line),
                    });
                }
                // The next document can be read only if this one loaded whole, which
                // serde_yaml, stopping at the repeated key, did not say.
                match loaded_whole(yaml, i, limits) {
                    Ok(()) => continue,
                    Err(e) => {
                        if !limits::is_over_budget(&e) {
                            errors.push(syntax_error(file, text, &e));
                        }
                        break;
                    }
                }
            }
            Err(e) => {
                errors.push(syntax_error(file, text, &e));
                // After a syntax error the rest of the stream cannot be trusted.
                break;
            }
        };
        let header = check_header(&value);
        if !header.is_empty() {
            errors.extend(header.into_iter().map(diag));
            continue;
        }
        let policy: RoutePolicy = match serde_path_to_error::deserialize(&value) {
            Ok(p) => p,
            Err(e) => {
                errors.push(diag(type_error(&e, &value)));
                continue;
            }
        };
        let findings = validate::validate_as(&policy, input);
        if findings.is_empty() {
            out.push(Located {
                file: file.to_string(),
                source: Some((text, i)),
                policy,
            });
        } else {
            errors.extend(findings.into_iter().map(diag));
        }
    }
    errors.sort_by_key(|d| (d.line, d.column));
    (out, errors)
}

/// Whether document `index` of `yaml` loads whole: walks it again, through every node.
///
/// libyaml reads a document only up to a load error (an alias to an anchor it does not
/// define: anchors do not carry over from earlier documents); serde_yaml then hands the
/// rest of that document's events out as the next document, and panics on them. Only
/// called once the documents before `index` have loaded whole, so the walk reads the
/// same documents the caller did.
fn loaded_whole(yaml: &str, index: usize, limits: &Limits) -> Result<(), serde_yaml::Error> {
    match serde_yaml::Deserializer::from_str(yaml).nth(index) {
        Some(doc) => limits::walk_unchecked(doc, limits),
        None => Ok(()),
    }
}

/// A wrong `apiVersion` or `kind` means the rest of the document follows some other
/// schema, so it is reported alone rather than as a cascade of unknown fields.
fn check_header(value: &Value) -> Vec<Finding> {
    let mut out = Vec::new();
    for (field, want) in [("apiVersion", API_VERSION), ("kind", KIND)] {
        if let Some(Value::String(got)) = value.get(field)
            && got != want
        {
            out.push(Finding {
                path: field.to_string(),
                at_key: false,
                message: format!("expected {want:?}, got {}", validate::quote_value(got)),
            });
        }
    }
    out
}

fn syntax_error(file: &str, text: &str, e: &serde_yaml::Error) -> Diagnostic {
    let location = e.location();
    let raw = e.to_string();
    // libyaml's reader errors (a control character, say) carry a byte offset and no
    // line (their location reads 1:1): the position is worked out from the text.
    let (line, column, raw) = match (split_position(&raw), &location) {
        (Some((rest, offset)), _) => {
            let (line, column) = line_column(text, offset);
            (line, column, rest)
        }
        (None, Some(l)) => (l.line(), l.column(), raw.as_str()),
        (None, None) => (1, 1, raw.as_str()),
    };
    let mut message = format!("invalid YAML: {}", strip_locations(raw));
    // libyaml's wording for a tab says nothing about tabs.
    if location.is_some_and(|l| text.as_bytes().get(l.index()) == Some(&b'\t')) {
        message.push_str(" (indent with spaces: YAML does not allow tabs)");
    }
    Diagnostic::at(file, line, column, message)
}

/// A field path as a diagnostic shows it: each part that is a user's key cut as a
/// quoted value is, so a huge key cannot make a huge line.
fn shown_path(path: &str) -> String {
    path.split('.')
        .map(validate::cut_value)
        .collect::<Vec<_>>()
        .join(".")
}

/// A message ending in serde_yaml's " at position N" (a byte offset), without it.
fn split_position(msg: &str) -> Option<(&str, usize)> {
    let (rest, offset) = msg.rsplit_once(" at position ")?;
    Some((rest, offset.parse().ok()?))
}

/// The 1-based line and column (in characters, as libyaml counts them) of a byte
/// offset into `text`; an offset inside a character counts as that character.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.bytes().filter(|b| *b == b'\n').count() + 1;
    (line, before[line_start..].chars().count() + 1)
}

/// Removes serde_yaml's " at line N column M" parts: the diagnostic carries them.
fn strip_locations(msg: &str) -> String {
    let mut out = String::new();
    let mut rest = msg;
    while let Some(i) = rest.find(" at line ") {
        out.push_str(&rest[..i]);
        let after = &rest[i + " at line ".len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        let after = &after[digits..];
        rest = match after.strip_prefix(" column ") {
            Some(col) => &col[col.bytes().take_while(u8::is_ascii_digit).count()..],
            None => after,
        };
    }
    out.push_str(rest);
    out
}

/// Maps whose keys are user-chosen names rather than field names.
const FREE_KEYED: [&str; 5] = ["backends", "weights", "headers", "labels", "annotations"];

/// Turns serde's message into one that names what was expected and what was written.
fn type_error(e: &serde_path_to_error::Error<serde_yaml::Error>, root: &Value) -> Finding {
    let mut path = String::new();
    // The path with indices and user-chosen keys erased, to look up what a field takes.
    let mut pattern = String::new();
    let mut node = Some(root);
    let mut last_key: Option<&str> = None;
    for seg in e.path().iter() {
        match seg {
            Segment::Seq { index } => {
                path = child_index(&path, *index);
                pattern.push_str("[]");
                node = node.and_then(|n| n.get(*index));
                last_key = None;
            }
            Segment::Map { key } | Segment::Enum { variant: key } => {
                path = child_key(&path, key);
                let generic = match last_key {
                    Some(k) if FREE_KEYED.contains(&k) => "*",
                    _ => key.as_str(),
                };
                pattern = child_key(&pattern, generic);
                node = node.and_then(|n| n.get(key.as_str()));
                last_key = Some(key.as_str());
            }
            Segment::Unknown => {
                path = child_key(&path, "?");
                node = None;
                last_key = None;
            }
        }
    }
    let raw = strip_locations(&e.inner().to_string());
    let quoted = backticked(&raw);

    if let Some(rest) = raw.strip_prefix("unknown field ") {
        let name = quoted.first().cloned().unwrap_or_default();
        let expected = &quoted[quoted.len().min(1)..];
        let mut message = format!("unknown field {}", validate::quote_value(&name));
        if expected.is_empty() || rest.contains("there are no fields") {
            message.push_str(", no fields are expected here");
        } else {
            message.push_str(&format!(", expected one of: {}", expected.join(", ")));
            if let Some(near) = expected.iter().find(|f| edit_distance(f, &name) <= 2) {
                message.push_str(&format!(" (did you mean {near:?}?)"));
            }
        }
        // serde_path_to_error's path already ends with the unknown key.
        return Finding {
            path,
            at_key: true,
            message,
        };
    }
    if raw.starts_with("missing field ") {
        let name = quoted.first().cloned().unwrap_or_default();
        return Finding {
            path,
            at_key: false,
            message: format!("missing required field {name:?}"),
        };
    }
    let got = node.map(describe);
    if raw.starts_with("unknown variant ") {
        let expected = &quoted[quoted.len().min(1)..];
        let got =
            got.unwrap_or_else(|| validate::quote_value(quoted.first().map_or("", String::as_str)));
        return Finding {
            path,
            at_key: false,
            message: format!("expected one of {}, got {got}", expected.join(", ")),
        };
    }
    if raw.starts_with("invalid type: ") || raw.starts_with("invalid value: ") {
        let serde_expected = raw.rsplit_once(", expected ").map(|(_, e)| e).unwrap_or("");
        let expected = expected_for(&pattern)
            .unwrap_or_else(|| plain_expectation(serde_expected, path.is_empty()));
        let got = got.unwrap_or_else(|| "something else".to_string());
        return Finding {
            path,
            at_key: false,
            message: format!("expected {expected}, got {got}"),
        };
    }
    // Custom messages (durations) are already written for users, but quote the
    // value whole.
    let message = match node {
        Some(Value::String(s)) => raw.replace(&format!("{s:?}"), &validate::quote_value(s)),
        _ => raw,
    };
    Finding {
        path,
        at_key: false,
        message,
    }
}

/// What a field takes, for fields whose type alone does not say it.
fn expected_for(pattern: &str) -> Option<String> {
    use validate::*;
    let table: [(&str, &dyn Fn() -> String); 13] = [
        ("retry.attempts", &|| ATTEMPTS.expected()),
        ("rateLimit.perSecond", &|| PER_SECOND.expected()),
        ("rateLimit.burst", &|| BURST.expected()),
        ("budget.minPerSecond", &|| MIN_PER_SECOND.expected()),
        ("budget.ratio", &|| RATIO_EXPECTED.to_string()),
        ("weights.*", &|| WEIGHT.expected()),
        ("failureRate.percent", &|| PERCENT.expected()),
        ("failureRate.minRequests", &|| MIN_REQUESTS.expected()),
        ("consecutiveFailures", &|| CONSECUTIVE_FAILURES.expected()),
        ("halfOpenRequests", &|| HALF_OPEN_REQUESTS.expected()),
        ("statusCodes[]", &|| STATUS_CODE.expected()),
        ("maxReplayBytes", &|| MAX_REPLAY_BYTES.expected()),
        ("key.path", &|| "true".to_string()),
    ];
    table
        .iter()
        .find(|(suffix, _)| pattern.ends_with(suffix))
        .map(|(_, f)| f())
}

/// serde's names for types, in words.
fn plain_expectation(serde_expected: &str, at_root: bool) -> String {
    match serde_expected {
        "u8" | "u16" | "u32" | "u64" | "i32" | "i64" => "an integer".to_string(),
        "f32" | "f64" => "a number".to_string(),
        "a boolean" => "true or false".to_string(),
        "a sequence" => "a list".to_string(),
        "a map" => "a mapping".to_string(),
        "field identifier" => "a field name".to_string(),
        s if s.starts_with("struct ") && at_root => {
            "a RoutePolicy document (apiVersion, kind, metadata, spec)".to_string()
        }
        s if s.starts_with("struct ") => "a mapping".to_string(),
        s => s.to_string(),
    }
}

/// How a YAML value reads in a message.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "nothing (null)".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => validate::quote_value(s),
        Value::Sequence(_) => "a list".to_string(),
        Value::Mapping(_) => "a mapping".to_string(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

/// The `quoted` parts of a serde message, in order.
fn backticked(msg: &str) -> Vec<String> {
    msg.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s.to_string())
        .collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Refuses a second policy with the same namespace and name, or the same host.
pub(crate) fn check_unique(items: &[Located<'_>]) -> Vec<Diagnostic> {
    let mut names: HashMap<(&str, &str), &Located<'_>> = HashMap::new();
    let mut hosts: HashMap<&str, (&Located<'_>, String)> = HashMap::new();
    let mut out = Vec::new();
    let mut cache = HashMap::new();
    let mut at = |item: &Located<'_>, path: &str| {
        let p = item.locate(path, &mut cache);
        (p, format!("{}:{}:{}", item.file, p.line, p.column))
    };
    for item in items {
        let m = &item.policy.metadata;
        let ns = m.namespace_or_default();
        if let Some(first) = names.get(&(ns, m.name.as_str())) {
            let (pos, _) = at(item, "metadata.name");
            let (_, first_at) = at(first, "metadata.name");
            out.push(Diagnostic {
                file: item.file.clone(),
                line: pos.line,
                column: pos.column,
                path: "metadata.name".to_string(),
                message: format!("duplicate policy {ns}/{} (also at {first_at})", m.name,),
            });
        } else {
            names.insert((ns, m.name.as_str()), item);
        }
        let spec = &item.policy.spec;
        let claimed = std::iter::once(("spec.host".to_string(), spec.host.as_str())).chain(
            spec.aliases
                .iter()
                .enumerate()
                .map(|(i, a)| (format!("spec.aliases[{i}]"), a.as_str())),
        );
        for (path, host) in claimed {
            match hosts.get(host) {
                // A repeat inside one policy is the validator's to report.
                Some((first, _)) if std::ptr::eq(*first, item) => {}
                Some((first, first_path)) => {
                    let fm = &first.policy.metadata;
                    let (pos, _) = at(item, &path);
                    let (_, first_at) = at(first, first_path);
                    out.push(Diagnostic {
                        file: item.file.clone(),
                        line: pos.line,
                        column: pos.column,
                        path,
                        message: format!(
                            "host {host:?} already has a policy: {}/{} at {first_at}",
                            fm.namespace_or_default(),
                            fm.name,
                        ),
                    });
                }
                None => {
                    hosts.insert(host, (item, path));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_policies;

    #[test]
    fn a_panic_while_reading_refuses_the_file_and_says_why() {
        let (ok, errors) = refused_on_panic::<()>("p.yaml", || panic!("unexpected end of mapping"));
        assert!(ok.is_empty());
        let [d] = errors.as_slice() else {
            panic!("{errors:?}")
        };
        assert_eq!((d.file.as_str(), d.line, d.column), ("p.yaml", 1, 1));
        assert_eq!(
            d.message,
            "the YAML reader failed on this file (unexpected end of mapping); nothing of it was taken"
        );
        let (_, errors) = refused_on_panic::<()>("p.yaml", || panic!("{} {}", "formatted", 1));
        assert!(errors[0].message.contains("(formatted 1)"), "{errors:?}");
        let (ok, errors) = refused_on_panic("p.yaml", || (vec![1], Vec::new()));
        assert_eq!(
            (ok, errors.len()),
            (vec![1], 0),
            "no panic, nothing changed"
        );
    }

    /// `0x1` and `1` are different text, which the span pass compares, and one number,
    /// which serde_yaml compares: refused as the reader says, not skipped.
    #[test]
    fn a_key_repeated_as_another_spelling_of_it_is_refused() {
        let text = "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: { name: log, namespace: shop, labels: { 0x1: a, 1: b } }\nspec:\n  host: log\n";
        let err = parse_policies("p.yaml", text).unwrap_err().to_string();
        assert_eq!(
            err,
            "p.yaml:3:49: invalid YAML: metadata.labels: duplicate entry with key 1"
        );
    }

    /// serde_yaml reports a repeated key before it has looked at the rest of the
    /// document; an alias further on that names no anchor of this document cut the
    /// document's loading short, and its remaining events used to be read as the next
    /// document (a panic, or a bogus "got \"routes\"" at 1:1).
    #[test]
    fn a_repeated_key_before_an_alias_to_another_documents_anchor_is_refused_with_both() {
        let doc = |name: &str, anchor: &str, rest: &str| {
            format!(
                "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: {name}, namespace: shop }}\nspec:\n  host: {name}\n{anchor}  routes:\n    - name: all\n      split: [{{ backend: v1 }}]\n{rest}"
            )
        };
        let first = doc(
            "log",
            "  backends: &b\n    v1: { addresses: [\"127.0.0.1:9101\"] }\n",
            "",
        );
        for (alias_last, second) in [
            (true, doc("order", "  host: order\n", "  backends: *b\n")),
            (false, doc("order", "  host: order\n  backends: *b\n", "")),
        ] {
            let text = format!("{first}---\n{second}---\n{}", doc("web", "", ""));
            let err = parse_policies("p.yaml", &text).unwrap_err().to_string();
            let alias_line = if alias_last { 21 } else { 18 };
            assert_eq!(
                err,
                format!(
                    "p.yaml:17:3: spec.host: duplicate key (first at line 16)\n\
                     p.yaml:{alias_line}:13: invalid YAML: unknown anchor"
                ),
                "alias last: {alias_last}"
            );
        }
    }

    #[test]
    fn strips_serde_yaml_locations() {
        assert_eq!(
            strip_locations(
                "did not find expected key at line 3 column 5, while parsing a block mapping at line 1 column 1"
            ),
            "did not find expected key, while parsing a block mapping"
        );
    }

    const POLICY: &str = "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: { name: a }\nspec:\n  host: a\n  inbound: {}\n";

    #[test]
    fn a_leading_byte_order_mark_is_skipped() {
        let bom = format!("\u{feff}{POLICY}");
        let limits = Limits::default();
        let policies = crate::parse_policy_bytes("f.yaml", bom.as_bytes(), &limits).unwrap();
        assert_eq!(policies[0].spec.host, "a");
        assert_eq!(crate::parse_policies("f.yaml", &bom).unwrap(), policies);
        // Positions on the first line do not count the mark.
        let wrong = bom.replace("sluice.dev/v1alpha1", "v1");
        let err = crate::parse_policies("f.yaml", &wrong).unwrap_err();
        assert_eq!(
            err.to_string(),
            "f.yaml:1:13: apiVersion: expected \"sluice.dev/v1alpha1\", got \"v1\""
        );
        // The limits pass reads the same text, and places its refusals alike.
        let shallow = Limits {
            max_depth: 1,
            ..Limits::default()
        };
        let err = crate::parse_policy_bytes("f.yaml", bom.as_bytes(), &shallow).unwrap_err();
        let plain = crate::parse_policy_bytes("f.yaml", POLICY.as_bytes(), &shallow).unwrap_err();
        assert_eq!(err, plain);
        assert!(err.to_string().contains("--policy-max-depth"), "{err}");
        // Only one mark: a second is content, and refused as such.
        let twice = format!("\u{feff}{bom}");
        assert!(crate::parse_policies("f.yaml", &twice).is_err());
    }

    #[test]
    fn bad_bytes_are_placed_by_line_and_column() {
        let limits = Limits::default();
        let latin1 = [POLICY.as_bytes(), b"# caf\xe9\n"].concat();
        let err = crate::parse_policy_bytes("f.yaml", &latin1, &limits).unwrap_err();
        assert_eq!(
            err.to_string(),
            "f.yaml:7:6: not UTF-8: byte 0xe9 is not part of a UTF-8 character; save the file as UTF-8"
        );
        let cut = [POLICY.as_bytes(), b"# \xc3"].concat();
        let err = crate::parse_policy_bytes("f.yaml", &cut, &limits).unwrap_err();
        assert_eq!(
            err.to_string(),
            "f.yaml:7:3: not UTF-8: the file ends inside a character; save the file as UTF-8"
        );
        // Columns count characters, as libyaml's do.
        let nul = format!("{POLICY}# \u{e9}\u{e9}\0\n");
        let err = crate::parse_policies("f.yaml", &nul).unwrap_err();
        assert_eq!(
            err.to_string(),
            "f.yaml:7:5: invalid YAML: control characters are not allowed"
        );
    }

    /// A file is read at most one byte past the size limit, so it may be cut inside a
    /// character: past the limit its size is what is reported, not its encoding; at the
    /// limit, a file ending inside a character is not UTF-8.
    #[test]
    fn a_file_cut_at_the_size_limit_is_refused_for_its_size() {
        let whole = [POLICY.as_bytes(), "# \u{e9}\u{e9}".as_bytes()].concat();
        let cut = &whole[..whole.len() - 1];
        let past = Limits {
            max_file_bytes: cut.len() - 1,
            ..Limits::default()
        };
        let err = crate::parse_policy_bytes("f.yaml", cut, &past)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("f.yaml:7:1: the file holds more than the ")
                && err.contains(" bytes allowed in one policy file"),
            "{err}"
        );
        let at = Limits {
            max_file_bytes: cut.len(),
            ..Limits::default()
        };
        let err = crate::parse_policy_bytes("f.yaml", cut, &at).unwrap_err();
        assert_eq!(
            err.to_string(),
            "f.yaml:7:4: not UTF-8: the file ends inside a character; save the file as UTF-8"
        );
    }

    #[test]
    fn huge_values_in_second_wave_fields_are_quoted_cut_short() {
        let huge = "X".repeat(200_000);
        let text = format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: a }}\nspec:\n  host: a\n  backends:\n    b: {{ addresses: [\"127.0.0.1:1\"] }}\n  routes:\n    - name: r\n      upgrades: [&v {huge}]\n      fallback: {{ on: [timeout], backend: *v }}\n"
        );
        let err = parse_policies("f.yaml", &text).unwrap_err().to_string();
        assert!(err.len() < 4096, "{} bytes", err.len());
        assert!(
            err.contains(&format!("\"{}…\" (199920 more bytes)", "X".repeat(80))),
            "{err}"
        );
    }

    #[test]
    fn huge_values_are_quoted_cut_short() {
        let huge = "x".repeat(200_000);
        let cut = format!("\"{}…\" (199920 more bytes)", "x".repeat(80));
        // One value aliased into every field that quotes it, and two type errors.
        let text = format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: &v {huge} }}\nspec:\n  host: *v\n  aliases: [*v]\n  backends:\n    b: {{ addresses: [*v], identity: *v }}\n  routes:\n    - name: *v\n      match: {{ method: *v, path: {{ prefix: *v }}, headers: {{ x: *v }} }}\n      split: [{{ backend: *v }}]\n  inbound: {{ allow: [*v] }}\n---\nkind: RoutePolicy\nspec: {{ routes: [{{ timeout: &t {huge} }}] }}\n---\nkind: {huge}\n"
        );
        let err = parse_policies("f.yaml", &text).unwrap_err().to_string();
        assert!(err.len() < 4096, "{} bytes", err.len());
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(
            lines[0],
            format!(
                "f.yaml:3:22: metadata.name: expected a lower-case name of letters, digits, '-' and '.' (at most 253), got {cut}"
            )
        );
        assert!(
            lines.iter().any(|l| l.ends_with(&format!(
                "timeout: expected a duration such as \"500ms\", \"2s\" or \"1m30s\", got {cut}"
            ))),
            "{err}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.ends_with(&format!("kind: expected \"RoutePolicy\", got {cut}"))),
            "{err}"
        );
        // A huge key is cut in the path as in the message.
        let key = format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: a }}\nspec:\n  ? {huge}\n  : 1\n"
        );
        let err = parse_policies("f.yaml", &key).unwrap_err().to_string();
        assert!(err.len() < 1024, "{err}");
        assert!(
            err.starts_with(&format!(
                "f.yaml:5:5: spec.{}… (199920 more bytes): unknown field {cut}, expected one of: ",
                "x".repeat(80)
            )),
            "{err}"
        );
    }

    #[test]
    fn line_column_of_offsets() {
        assert_eq!(line_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_column("ab\ncd", 2), (1, 3));
        assert_eq!(line_column("ab\ncd", 3), (2, 1));
        assert_eq!(line_column("ab\n\u{e9}d", 5), (2, 2));
        // Inside a character, or past the end.
        assert_eq!(line_column("ab\n\u{e9}d", 4), (2, 1));
        assert_eq!(line_column("ab", 9), (1, 3));
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("retrys", "retry"), 1);
        assert_eq!(edit_distance("timeuot", "timeout"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
