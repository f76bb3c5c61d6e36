//! Label and field selectors as the API server reads them from a query string.

use serde_json::Value;

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed `labelSelector` plus the `fieldSelector` fields the API server
/// supports on every resource (`metadata.name`, `metadata.namespace`).
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Selector {
    labels: Vec<Requirement>,
    fields: Vec<(String, bool, String)>,
}

impl Selector {
    /// Parses both selectors; an error is the API server's 400 message.
    pub(super) fn parse(labels: Option<&str>, fields: Option<&str>) -> Result<Self, String> {
        let mut out = Self::default();
        if let Some(labels) = labels.filter(|s| !s.is_empty()) {
            for term in split_terms(labels) {
                out.labels.push(parse_requirement(term.trim())?);
            }
        }
        if let Some(fields) = fields.filter(|s| !s.is_empty()) {
            for term in fields.split(',') {
                let (key, negated, value) = if let Some((k, v)) = term.split_once("!=") {
                    (k, true, v)
                } else if let Some((k, v)) = term.split_once("==") {
                    (k, false, v)
                } else if let Some((k, v)) = term.split_once('=') {
                    (k, false, v)
                } else {
                    return Err(format!("invalid field selector {term:?}"));
                };
                if !matches!(key, "metadata.name" | "metadata.namespace") {
                    return Err(format!("field label not supported: {key}"));
                }
                out.fields
                    .push((key.to_string(), negated, value.to_string()));
            }
        }
        Ok(out)
    }

    /// Whether `obj` is selected.
    pub(super) fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match r {
            Requirement::Equals(k, v) => label(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::NotExists(k) => label(k).is_none(),
            Requirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
        });
        labels_ok
            && self.fields.iter().all(|(k, negated, v)| {
                let field = k.strip_prefix("metadata.").unwrap_or(k);
                let actual = obj["metadata"][field].as_str().unwrap_or("");
                (actual == v) != *negated
            })
    }
}

/// Splits on commas outside `( )`.
fn split_terms(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn parse_requirement(term: &str) -> Result<Requirement, String> {
    let set = |rest: &str| -> Result<Vec<String>, String> {
        let inner = rest
            .trim()
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| format!("invalid label selector {term:?}: expected ( )"))?;
        Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
    };
    if let Some((k, rest)) = term.split_once(" notin ") {
        return Ok(Requirement::NotIn(k.trim().into(), set(rest)?));
    }
    if let Some((k, rest)) = term.split_once(" in ") {
        return Ok(Requirement::In(k.trim().into(), set(rest)?));
    }
    if let Some((k, v)) = term.split_once("!=") {
        return Ok(Requirement::NotEquals(k.into(), v.into()));
    }
    if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(Requirement::Equals(k.into(), v.into()));
    }
    if let Some(k) = term.strip_prefix('!') {
        return Ok(Requirement::NotExists(k.into()));
    }
    if term.is_empty() || term.contains([' ', '(', ')']) {
        return Err(format!("invalid label selector {term:?}"));
    }
    Ok(Requirement::Exists(term.into()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn label_and_field_selectors_select_like_the_api_server() {
        let obj = json!({ "metadata": { "name": "a", "namespace": "shop",
                                        "labels": { "app": "log", "tier": "web" } } });
        let sel = |l: &str, f: &str| Selector::parse(Some(l), Some(f)).unwrap().matches(&obj);
        assert!(sel("app", ""));
        assert!(!sel("!app", ""));
        assert!(sel("app=log,tier!=db", ""));
        assert!(!sel("app==billing", ""));
        assert!(sel("tier in (db, web)", "metadata.name=a"));
        assert!(!sel("tier notin (web)", ""));
        assert!(!sel("", "metadata.namespace!=shop"));
        assert!(Selector::parse(None, Some("spec.x=1")).is_err());
        assert!(Selector::parse(Some("a in b"), None).is_err());
    }
}
