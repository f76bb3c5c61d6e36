//! Offline translation of HTTPRoute YAML files into RoutePolicy YAML, with the
//! control plane's own refusals as errors naming the file and the field path.
//!
//! The files may also hold the Services (`v1` `Service`) and ReferenceGrants the
//! routes refer to; given any Service, parent and backend ports are checked
//! against the Services as in a cluster, otherwise references are taken as
//! written. Documents of other kinds are refused by kind.
//!
//! The output is a policy file, so it is held to a file's rules: the control plane
//! serves a translated route's backendRef weights exactly (any total), but a file's
//! weights are percentages summing to 100, so `convert` writes them as such (largest
//! remainders), warning where rounding changed their ratio, and checks that what it
//! writes loads as a file.

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

/// What `convert` writes, and what it has to say about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Converted {
    /// The policies, as one YAML stream that loads as a policy file.
    pub yaml: String,
    /// Each split whose weights could not be written as percentages in their exact
    /// ratio, with what was written instead.
    pub warnings: Vec<String>,
}

/// Translates the HTTPRoutes in `files` (`(name, text)` pairs) into the policies
/// the control plane would serve, as one YAML stream of a policy file (weights as
/// percentages); refuses with every problem of every route.
pub fn convert_files<'a>(
    files: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Converted, crate::Error> {
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
                    // A document cut short by a load error (an alias to an anchor it
                    // does not define) leaves the rest of its events to be read as
                    // the next document, which serde_yaml panics on.
                    break;
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
    let mut warnings = Vec::new();
    let mut out = String::new();
    for p in translation.policies() {
        let mut p = p.clone();
        warnings.extend(as_percentages(&mut p));
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&p).expect("policy types always serialise"));
    }
    // What is written must load where a file is read; if the translation ever
    // produced what only a snapshot takes, say so rather than write it.
    if let Err(e) = sluice_config::parse_policies("converted", &out) {
        return Err(crate::Error::Convert(vec![format!(
            "the converted policies would not load as a policy file: {e}"
        )]));
    }
    Ok(Converted {
        yaml: out,
        warnings,
    })
}

/// Rewrites every weighted split of `policy` whose weights do not sum to 100 as
/// percentages (largest remainders); a warning for each whose ratio rounding changed.
fn as_percentages(policy: &mut sluice_config::RoutePolicy) -> Vec<String> {
    let mut warnings = Vec::new();
    let name = format!(
        "{}/{}",
        policy.metadata.namespace_or_default(),
        policy.metadata.name
    );
    for route in &mut policy.spec.routes {
        for rule in &mut route.split {
            let Some(weights) = &mut rule.weights else {
                continue;
            };
            let raw: Vec<u32> = weights.values().copied().collect();
            let total: u64 = raw.iter().map(|w| u64::from(*w)).sum();
            if total == 100 || total == 0 {
                continue;
            }
            let percent = crate::apportion::apportion(100, &raw);
            let exact = raw
                .iter()
                .zip(&percent)
                .all(|(w, p)| u64::from(*p) * total == u64::from(*w) * 100);
            if !exact {
                let list = |v: &[u32]| {
                    weights
                        .keys()
                        .zip(v)
                        .map(|(k, w)| format!("{k} {w}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                warnings.push(format!(
                    "policy {name}, route {}: backendRef weights {} are written as the percentages {}, which round their ratio (the control plane serving the HTTPRoute keeps it exactly)",
                    route.name,
                    list(&raw),
                    list(&percent)
                ));
            }
            for (w, p) in weights.values_mut().zip(percent) {
                *w = p;
            }
        }
    }
    warnings
}
