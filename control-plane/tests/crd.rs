//! The `RoutePolicy` CRD the chart ships: generated from the `sluice-config` types,
//! never edited by hand, and structural in the sense the Kubernetes API server enforces.
//!
//! No API server runs here, so the structural-schema rules of
//! `apiextensions.k8s.io/v1` are checked by walking the schema
//! ([`structural_violations`]); the walker itself is tested against schemas that break
//! each rule, including what schemars derives for an untagged enum.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{Map, Value, json};
use sluice_control_plane::crd::{CHART_CRD_PATH, routepolicy_crd, routepolicy_crd_yaml};

fn chart_crd_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(CHART_CRD_PATH)
}

#[test]
fn chart_crd_file_matches_the_sluice_config_types() {
    let path = chart_crd_file();
    let on_disk = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let generated = routepolicy_crd_yaml().unwrap();
    assert!(
        on_disk == generated,
        "{} drifted from the sluice-config types; regenerate it with \
         `cargo run -p sluice-control-plane --bin gen-crd`\n--- generated ---\n{generated}",
        path.display()
    );
}

#[test]
fn generated_crd_names_the_resource_the_control_plane_watches() {
    let crd = routepolicy_crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("routepolicies.sluice.dev")
    );
    assert_eq!(crd.spec.group, "sluice.dev");
    assert_eq!(crd.spec.names.kind, "RoutePolicy");
    assert_eq!(crd.spec.scope, "Namespaced");
    let served: Vec<_> = crd
        .spec
        .versions
        .iter()
        .map(|v| (v.name.as_str(), v.served, v.storage))
        .collect();
    assert_eq!(served, [("v1alpha1", true, true)]);
}

#[test]
fn generated_crd_schema_is_structural() {
    let crd = serde_json::to_value(routepolicy_crd()).unwrap();
    let violations = crd_violations(&crd);
    assert!(violations.is_empty(), "{violations:#?}");
    // The file the chart ships, read back as Kubernetes would read it.
    let path = chart_crd_file();
    let on_disk: Value = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let violations = crd_violations(&on_disk);
    assert!(violations.is_empty(), "{}: {violations:#?}", path.display());
}

#[test]
fn every_example_policy_is_accepted_by_the_crd_types() {
    // What `kubectl apply` of an example sends must deserialise as the Kubernetes
    // object type, so the examples double as RoutePolicy objects.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/policies");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).unwrap();
            if value.is_null() {
                continue;
            }
            let obj: Result<sluice_config::RoutePolicyResource, _> = serde_yaml::from_value(value);
            if let Err(e) = obj {
                panic!("{}: {e}", path.display());
            }
            seen += 1;
        }
    }
    assert!(
        seen >= 10,
        "only {seen} example policies found in {}",
        dir.display()
    );
}

// === the structural-schema walker ===

/// Every rule of `apiextensions.k8s.io/v1` that a CRD's schemas break, as
/// `path: message` lines; empty when the API server would accept them.
fn crd_violations(crd: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let Some(versions) = crd.pointer("/spec/versions").and_then(Value::as_array) else {
        return vec!["spec.versions: missing".into()];
    };
    let storage = versions
        .iter()
        .filter(|v| v["storage"] == json!(true))
        .count();
    if storage != 1 {
        out.push(format!(
            "spec.versions: {storage} storage versions, need exactly 1"
        ));
    }
    for (i, version) in versions.iter().enumerate() {
        let name = version["name"].as_str().unwrap_or("?");
        let Some(schema) = version.pointer("/schema/openAPIV3Schema") else {
            out.push(format!("spec.versions[{i}] ({name}): no openAPIV3Schema"));
            continue;
        };
        let mut v = structural_violations(schema);
        if version.pointer("/subresources/status").is_some()
            && schema.pointer("/properties/status").is_none()
        {
            v.push("status subresource without a status property".into());
        }
        out.extend(v.into_iter().map(|m| format!("{name}: {m}")));
    }
    out
}

/// Keys a `JSONSchemaProps` has: anything else is dropped or refused by the API server.
const KNOWN_KEYS: &[&str] = &[
    "id",
    "$schema",
    "$ref",
    "description",
    "type",
    "format",
    "title",
    "default",
    "maximum",
    "exclusiveMaximum",
    "minimum",
    "exclusiveMinimum",
    "maxLength",
    "minLength",
    "pattern",
    "maxItems",
    "minItems",
    "uniqueItems",
    "multipleOf",
    "enum",
    "maxProperties",
    "minProperties",
    "required",
    "items",
    "allOf",
    "oneOf",
    "anyOf",
    "not",
    "properties",
    "additionalProperties",
    "patternProperties",
    "dependencies",
    "additionalItems",
    "definitions",
    "externalDocs",
    "example",
    "nullable",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-list-type",
    "x-kubernetes-map-type",
    "x-kubernetes-validations",
];

/// Keys a structural schema must not use anywhere.
const FORBIDDEN_KEYS: &[&str] = &[
    "id",
    "$schema",
    "$ref",
    "definitions",
    "dependencies",
    "patternProperties",
    "additionalItems",
];

/// Keys that belong to the structural spine and may not appear inside
/// `allOf`/`anyOf`/`oneOf`/`not` (value validations only there).
const SPINE_ONLY_KEYS: &[&str] = &[
    "type",
    "nullable",
    "default",
    "description",
    "title",
    "additionalProperties",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-list-type",
    "x-kubernetes-map-type",
];

const TYPES: &[&str] = &["object", "array", "string", "integer", "number", "boolean"];

/// The structural-schema rules Kubernetes enforces on a CRD's `openAPIV3Schema`
/// (<https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#specifying-a-structural-schema>),
/// as `path: message` lines.
fn structural_violations(root: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if root.get("type").and_then(Value::as_str) != Some("object") {
        out.push("openAPIV3Schema: the root must be `type: object`".into());
    }
    if root.get("default").is_some() {
        out.push("openAPIV3Schema: the root must not have a default".into());
    }
    if let Some(metadata) = root.pointer("/properties/metadata") {
        check_metadata(metadata, &mut out);
    }
    walk_spine(root, "openAPIV3Schema", &mut out);
    out
}

/// `metadata` at the root may only restrict `name` and `generateName`.
fn check_metadata(metadata: &Value, out: &mut Vec<String>) {
    let path = "openAPIV3Schema.properties.metadata";
    let Some(obj) = metadata.as_object() else {
        out.push(format!("{path}: not a schema object"));
        return;
    };
    for (key, value) in obj {
        match key.as_str() {
            "type" if value == "object" => {}
            "type" => out.push(format!("{path}: must be `type: object`")),
            "properties" => {
                for name in value.as_object().into_iter().flat_map(Map::keys) {
                    if name != "name" && name != "generateName" {
                        out.push(format!(
                            "{path}.properties.{name}: only name and generateName may be specified in metadata"
                        ));
                    }
                }
            }
            "description" => {}
            other => out.push(format!("{path}: `{other}` is not allowed in metadata")),
        }
    }
}

/// A node of the structural spine: the root, a property, `items` or a map's
/// `additionalProperties`.
fn walk_spine(node: &Value, path: &str, out: &mut Vec<String>) {
    let Some(obj) = node.as_object() else {
        out.push(format!("{path}: must be a schema object, not {node}"));
        return;
    };
    check_keys(obj, path, out);
    let flag = |k: &str| obj.get(k) == Some(&Value::Bool(true));
    let preserve = flag("x-kubernetes-preserve-unknown-fields");
    let int_or_string = flag("x-kubernetes-int-or-string");
    if obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(false)) {
        out.push(format!(
            "{path}: x-kubernetes-preserve-unknown-fields must be true or absent"
        ));
    }
    let ty = obj.get("type");
    match ty {
        None if int_or_string || preserve => {}
        None => out.push(format!(
            "{path}: no `type` (every structural node needs one)"
        )),
        Some(Value::String(t)) if TYPES.contains(&t.as_str()) => {}
        Some(other) => out.push(format!(
            "{path}: `type` must be one of {TYPES:?}, not {other}"
        )),
    }
    if int_or_string && ty.is_some() {
        out.push(format!(
            "{path}: x-kubernetes-int-or-string must not have a `type`"
        ));
    }
    // An optional int-or-string is `nullable` without a `type`: kube-core's
    // `OptionalIntOrString` transform writes it so, as k8s-openapi's optional
    // IntOrString fields are, and the API server accepts it.
    if flag("nullable") && ty.is_none() && !int_or_string {
        out.push(format!("{path}: `nullable` needs a `type`"));
    }
    if flag("uniqueItems") {
        out.push(format!("{path}: uniqueItems: true is refused"));
    }
    if flag("x-kubernetes-embedded-resource") && ty.and_then(Value::as_str) != Some("object") {
        out.push(format!(
            "{path}: x-kubernetes-embedded-resource needs `type: object`"
        ));
    }
    let props = obj.get("properties").and_then(Value::as_object);
    match obj.get("additionalProperties") {
        Some(Value::Bool(false)) => out.push(format!(
            "{path}: additionalProperties: false is refused (unknown fields are pruned instead)"
        )),
        Some(_) if props.is_some_and(|p| !p.is_empty()) => out.push(format!(
            "{path}: additionalProperties and properties are mutually exclusive"
        )),
        Some(Value::Object(_)) => {
            if ty.and_then(Value::as_str) != Some("object") {
                out.push(format!("{path}: additionalProperties on a non-object"));
            }
            walk_spine(
                &obj["additionalProperties"],
                &format!("{path}.additionalProperties"),
                out,
            );
        }
        _ => {}
    }
    if let Some(props) = props {
        if ty.is_some_and(|t| t != "object") {
            out.push(format!("{path}: properties on a non-object"));
        }
        for (name, sub) in props {
            walk_spine(sub, &format!("{path}.properties.{name}"), out);
        }
    }
    match obj.get("items") {
        Some(items @ Value::Object(_)) => walk_spine(items, &format!("{path}.items"), out),
        Some(_) => out.push(format!("{path}: `items` must be one schema, not a list")),
        None if ty.and_then(Value::as_str) == Some("array") => {
            out.push(format!("{path}: an array needs `items`"))
        }
        None => {}
    }
    if let Some(required) = obj.get("required").and_then(Value::as_array) {
        for name in required {
            let known = name
                .as_str()
                .is_some_and(|n| props.is_some_and(|p| p.contains_key(n)));
            if !known && !preserve {
                out.push(format!("{path}: required {name} is not a property"));
            }
        }
    }
    if let Some(values) = obj.get("enum").and_then(Value::as_array) {
        for v in values {
            if !value_has_type(v, ty.and_then(Value::as_str), flag("nullable")) {
                out.push(format!("{path}: enum value {v} does not match the type"));
            }
        }
    }
    if let Some(default) = obj.get("default") {
        let mut why = Vec::new();
        check_default(default, node, path, &mut why);
        out.extend(why);
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        for (i, sub) in obj
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            // The one typed branch Kubernetes allows: int-or-string spelled out.
            let int_or_string_branch = int_or_string
                && key != "oneOf"
                && (sub == &json!({ "type": "integer" }) || sub == &json!({ "type": "string" }));
            if !int_or_string_branch {
                walk_value_validation(sub, node, &format!("{path}.{key}[{i}]"), out);
            }
        }
    }
    if let Some(sub) = obj.get("not") {
        walk_value_validation(sub, node, &format!("{path}.not"), out);
    }
}

/// Unknown and forbidden keys, wherever the node sits.
fn check_keys(obj: &Map<String, Value>, path: &str, out: &mut Vec<String>) {
    for key in obj.keys() {
        if FORBIDDEN_KEYS.contains(&key.as_str()) {
            out.push(format!(
                "{path}: `{key}` is not allowed in a structural schema"
            ));
        } else if !KNOWN_KEYS.contains(&key.as_str()) {
            out.push(format!("{path}: `{key}` is not a JSONSchemaProps field"));
        }
    }
}

/// Inside `allOf`/`anyOf`/`oneOf`/`not`: only value validations, and only over
/// fields the structural spine (`spine`) already declares.
fn walk_value_validation(node: &Value, spine: &Value, path: &str, out: &mut Vec<String>) {
    let Some(obj) = node.as_object() else {
        out.push(format!("{path}: must be a schema object"));
        return;
    };
    check_keys(obj, path, out);
    for key in SPINE_ONLY_KEYS {
        if obj.contains_key(*key) {
            out.push(format!(
                "{path}: `{key}` must not appear inside allOf/anyOf/oneOf/not (structural part only)"
            ));
        }
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            match spine.pointer(&format!("/properties/{name}")) {
                Some(spine_sub) => {
                    walk_value_validation(sub, spine_sub, &format!("{path}.properties.{name}"), out)
                }
                None => out.push(format!(
                    "{path}.properties.{name}: not declared in the structural part"
                )),
            }
        }
    }
    if let Some(items) = obj.get("items") {
        match spine.get("items") {
            Some(spine_items) => {
                walk_value_validation(items, spine_items, &format!("{path}.items"), out)
            }
            None => out.push(format!("{path}.items: not declared in the structural part")),
        }
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        for (i, sub) in obj
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            walk_value_validation(sub, spine, &format!("{path}.{key}[{i}]"), out);
        }
    }
    if let Some(sub) = obj.get("not") {
        walk_value_validation(sub, spine, &format!("{path}.not"), out);
    }
}

/// A default must be what pruning would leave alone and must match its schema.
fn check_default(value: &Value, schema: &Value, path: &str, out: &mut Vec<String>) {
    let ty = schema.get("type").and_then(Value::as_str);
    let nullable = schema.get("nullable") == Some(&Value::Bool(true));
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
        || schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
    {
        return;
    }
    if !value_has_type(value, ty, nullable) {
        out.push(format!(
            "{path}: default {value} does not match type {ty:?}"
        ));
        return;
    }
    match value {
        Value::Object(fields) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (name, v) in fields {
                match (props.and_then(|p| p.get(name)), additional) {
                    (Some(sub), _) | (None, Some(sub)) => {
                        check_default(v, sub, &format!("{path}.default.{name}"), out)
                    }
                    (None, None) => out.push(format!(
                        "{path}: default field {name:?} would be pruned (not in the schema)"
                    )),
                }
            }
        }
        Value::Array(items) => {
            if let Some(sub) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    check_default(v, sub, &format!("{path}.default[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

fn value_has_type(value: &Value, ty: Option<&str>, nullable: bool) -> bool {
    match (value, ty) {
        (Value::Null, _) => nullable,
        (_, None) => true,
        (Value::Object(_), Some("object")) => true,
        (Value::Array(_), Some("array")) => true,
        (Value::String(_), Some("string")) => true,
        (Value::Bool(_), Some("boolean")) => true,
        (Value::Number(n), Some("integer")) => n.is_i64() || n.is_u64(),
        (Value::Number(_), Some("number")) => true,
        _ => false,
    }
}

// === the walker, tested on what Kubernetes refuses ===

fn crd_with_schema(schema: Value) -> Value {
    json!({
        "spec": { "versions": [ {
            "name": "v1", "served": true, "storage": true,
            "schema": { "openAPIV3Schema": schema }
        } ] }
    })
}

fn assert_refused(schema: Value, expect: &str) {
    let violations = crd_violations(&crd_with_schema(schema.clone()));
    assert!(
        violations.iter().any(|v| v.contains(expect)),
        "expected a violation containing {expect:?} for {schema}, got {violations:#?}"
    );
}

fn spec(spec: Value) -> Value {
    json!({ "type": "object", "properties": { "spec": spec } })
}

#[test]
fn walker_accepts_a_plain_structural_schema() {
    let schema = json!({
        "type": "object",
        "properties": {
            "metadata": { "type": "object", "properties": { "name": { "type": "string", "maxLength": 63 } } },
            "spec": {
                "type": "object",
                "required": ["port"],
                "properties": {
                    "port": { "x-kubernetes-int-or-string": true, "anyOf": [ { "type": "integer" }, { "type": "string" } ] },
                    "labels": { "type": "object", "additionalProperties": { "type": "string" }, "default": { "a": "b" } },
                    "mode": { "type": "string", "enum": ["a", "b"], "nullable": true, "default": "a" },
                    "items": { "type": "array", "items": { "type": "object", "properties": { "x": { "type": "integer" } } },
                               "oneOf": [ { "required": ["x"] } ] },
                    "raw": { "x-kubernetes-preserve-unknown-fields": true }
                }
            }
        }
    });
    let violations = crd_violations(&crd_with_schema(schema));
    assert!(violations.is_empty(), "{violations:#?}");
}

#[test]
fn walker_refuses_each_structural_rule_broken() {
    assert_refused(
        json!({ "type": "array", "items": { "type": "string" } }),
        "root must be `type: object`",
    );
    assert_refused(spec(json!({ "description": "no type" })), "no `type`");
    assert_refused(
        spec(json!({ "type": ["string", "null"] })),
        "`type` must be one of",
    );
    assert_refused(
        spec(
            json!({ "type": "object", "properties": { "a": { "type": "string" } }, "additionalProperties": { "type": "string" } }),
        ),
        "mutually exclusive",
    );
    assert_refused(
        spec(json!({ "type": "object", "additionalProperties": false })),
        "additionalProperties: false",
    );
    assert_refused(
        spec(json!({ "$ref": "#/definitions/Spec" })),
        "`$ref` is not allowed",
    );
    assert_refused(
        json!({ "type": "object", "definitions": {}, "properties": {} }),
        "`definitions` is not allowed",
    );
    assert_refused(
        spec(json!({ "nullable": true, "x-kubernetes-preserve-unknown-fields": true })),
        "`nullable` needs a `type`",
    );
    assert_refused(
        spec(json!({ "type": "string", "x-kubernetes-int-or-string": true })),
        "must not have a `type`",
    );
    assert_refused(
        spec(
            json!({ "type": "object", "properties": { "a": { "type": "string" } }, "anyOf": [ { "type": "object", "properties": { "a": { "type": "string" } } } ] }),
        ),
        "`type` must not appear inside allOf/anyOf/oneOf/not",
    );
    assert_refused(
        spec(
            json!({ "type": "object", "properties": { "a": { "type": "string" } }, "oneOf": [ { "properties": { "b": {} } } ] }),
        ),
        "not declared in the structural part",
    );
    assert_refused(
        json!({ "type": "object", "properties": { "metadata": { "type": "object", "properties": { "labels": { "type": "object" } } } } }),
        "only name and generateName",
    );
    assert_refused(
        json!({ "type": "object", "properties": { "metadata": { "type": "object", "default": {} } } }),
        "not allowed in metadata",
    );
    assert_refused(
        spec(
            json!({ "type": "object", "properties": { "a": { "type": "string" } }, "default": { "b": "x" } }),
        ),
        "would be pruned",
    );
    assert_refused(
        spec(json!({ "type": "integer", "default": "one" })),
        "does not match type",
    );
    assert_refused(spec(json!({ "type": "array" })), "an array needs `items`");
    assert_refused(
        spec(json!({ "type": "array", "items": { "type": "string" }, "uniqueItems": true })),
        "uniqueItems",
    );
    assert_refused(
        spec(json!({ "type": "string", "const": "x" })),
        "not a JSONSchemaProps field",
    );
    assert_refused(
        spec(json!({ "type": "object", "required": ["a"], "properties": {} })),
        "required \"a\" is not a property",
    );
}

/// What schemars derives for an untagged enum of a scalar and a struct is an
/// `anyOf` whose branches carry `type`, with no `type` on the node itself: the API
/// server refuses that, and the walker must too. kube-rs' rewriter turns it into
/// an object, which is structural but no longer admits the scalar form: either way
/// the schema and serde disagree, which is why the policy types have no untagged
/// enums.
#[test]
fn walker_refuses_what_schemars_derives_for_an_untagged_enum() {
    use kube::CustomResource;
    use kube::CustomResourceExt;
    use schemars::JsonSchema;
    use schemars::generate::SchemaSettings;
    use serde::Serialize;

    #[allow(dead_code)]
    #[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
    #[serde(untagged)]
    enum Target {
        Name(String),
        Weighted { name: String, weight: u32 },
    }

    #[allow(dead_code)]
    #[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, CustomResource)]
    #[kube(group = "example.dev", version = "v1", kind = "Untagged", namespaced)]
    struct UntaggedSpec {
        target: Target,
    }

    let raw = SchemaSettings::openapi3()
        .with(|s| s.inline_subschemas = true)
        .into_generator()
        .into_root_schema_for::<UntaggedSpec>();
    let mut raw = raw.to_value();
    raw.as_object_mut().unwrap().remove("$schema");
    let violations = crd_violations(&crd_with_schema(spec(raw.clone())));
    assert!(
        violations
            .iter()
            .any(|v| v.contains("target.anyOf[0]: `type` must not appear")),
        "{raw:#}\n{violations:#?}"
    );
    assert!(
        violations.iter().any(|v| v.contains("target: no `type`")),
        "{violations:#?}"
    );

    let rewritten = serde_json::to_value(Untagged::crd()).unwrap();
    let target = rewritten
        .pointer("/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/target")
        .unwrap();
    assert_eq!(
        target["type"], "object",
        "the string form is no longer admitted: {target:#}"
    );
}

/// The walk-through (examples/kubernetes/README.md) shows one policy accepted and one
/// denied by the validating webhook; both verdicts are sluice-config's.
#[test]
fn walkthrough_policies_get_the_verdicts_its_readme_shows() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/kubernetes");
    let good = std::fs::read_to_string(dir.join("log-service-policy.yaml")).unwrap();
    let policies = sluice_config::parse_policies("log-service-policy.yaml", &good)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(policies.len(), 1);
    assert_eq!(policies[0].spec.host, "log-service");
    let broken = std::fs::read_to_string(dir.join("broken-policy.yaml")).unwrap();
    let err = sluice_config::parse_policies("broken-policy.yaml", &broken)
        .expect_err("weights summing to 110 are refused")
        .to_string();
    assert!(err.contains("100"), "{err}");
}
