//! Offline translation of HTTPRoute YAML files into RoutePolicy YAML, with the
//! control plane's own refusals as errors naming the file and the field path.
//!
//! The files may also hold the Services (`v1` `Service`) and ReferenceGrants the
//! routes refer to; given any Service, parent and backend ports are checked
//! against the Services as in a cluster, otherwise references are taken as
//! written. Documents of other kinds are refused by kind.

use std::collections::BTreeMap;

use serde::Deserialize as _;
use serde_json::Value;

use super::model::{GROUP, ReferenceGrant, RouteObject, ServiceInfo, ServicePortInfo};
use super::translate::{Cluster, Key, translate};

/// Reads a Service's ports from its JSON object.
pub(crate) fn service_info(obj: &Value) -> ServiceInfo {
    ServiceInfo {
        ports: obj["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some(ServicePortInfo {
                    name: p["name"].as_str().unwrap_or_default().to_string(),
                    port: i32::try_from(p["port"].as_i64()?).ok()?,
                })
            })
            .collect(),
    }
}

/// Translates the HTTPRoutes in `files` (`(name, text)` pairs) into the policies
/// the control plane would serve, as one YAML stream; refuses with every problem
/// of every route.
pub fn convert_files<'a>(
    files: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<String, crate::Error> {
    let mut errors = Vec::new();
    let mut routes = Vec::new();
    let mut origin: BTreeMap<Key, String> = BTreeMap::new();
    let mut services: BTreeMap<Key, ServiceInfo> = BTreeMap::new();
    let mut grants = Vec::new();
    for (file, text) in files {
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let at = format!("{file} (document {})", i + 1);
            let value = match Value::deserialize(doc) {
                Ok(Value::Null) => continue,
                Ok(v) => v,
                Err(e) => {
                    errors.push(format!("{at}: {e}"));
                    continue;
                }
            };
            let api_version = value["apiVersion"].as_str().unwrap_or_default();
            let kind = value["kind"].as_str().unwrap_or_default();
            let ns = value["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            let name = value["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            match (api_version, kind) {
                (v, "HTTPRoute") if v.starts_with(&format!("{GROUP}/")) => {
                    if name.is_empty() {
                        errors.push(format!("{at}: metadata.name: expected a name"));
                        continue;
                    }
                    origin.insert((ns.clone(), name.clone()), file.to_string());
                    routes.push(RouteObject {
                        namespace: ns,
                        name,
                        generation: None,
                        // Files have no creation times: their order stands in for it.
                        created: format!("{:08}", routes.len()),
                        spec: value["spec"].clone(),
                    });
                }
                ("v1", "Service") => {
                    services.insert((ns, name), service_info(&value));
                }
                (v, "ReferenceGrant") if v.starts_with(&format!("{GROUP}/")) => {
                    grants.extend(ReferenceGrant::from_object(&value));
                }
                _ => errors.push(format!(
                    "{at}: {kind} {api_version}: only HTTPRoutes (with the Services and ReferenceGrants they name) are converted"
                )),
            }
        }
    }
    let cluster = Cluster {
        services: (!services.is_empty()).then_some(&services),
        grants: &grants,
    };
    let translation = translate(&routes, cluster);
    for (key, verdict) in &translation.verdicts {
        let file = origin.get(key).map(String::as_str).unwrap_or("?");
        for parent in &verdict.parents {
            for p in &parent.problems {
                errors.push(format!(
                    "{file}: HTTPRoute {}/{} (parent Service {}/{}): {p}",
                    key.0, key.1, parent.service.0, parent.service.1
                ));
            }
        }
    }
    for r in &routes {
        if !translation.verdicts.contains_key(&r.key()) {
            let file = origin.get(&r.key()).map(String::as_str).unwrap_or("?");
            errors.push(format!(
                "{file}: HTTPRoute {}/{}: spec.parentRefs: names no Service (group \"\", kind Service), so it is not a mesh route",
                r.namespace, r.name
            ));
        }
    }
    if !errors.is_empty() {
        return Err(crate::Error::Convert(errors));
    }
    let mut out = String::new();
    for p in translation.policies() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(p).expect("policy types always serialise"));
    }
    Ok(out)
}
