//! `sluice-config`: the policy model shared by the proxy and the control plane.
//!
//! One schema, one validator. [`parse_policies`] turns the bytes of one YAML file
//! (one or more `---`-separated documents) into validated [`RoutePolicy`] values or
//! into a list of [`Diagnostic`]s, each naming file, line, column and field path.
//! A [`PolicySet`] is the validated policies of a whole mesh in canonical form with
//! their content hash, which is the policy version everywhere (snapshots, `/config`,
//! metrics). This crate does no I/O beyond the bytes it is given.
//!
//! How the pieces fit: serde_yaml reads the values into the serde types of the
//! model (`model`, with [`Duration`]); serde_path_to_error names the field of a type
//! error; `validate` checks everything the types cannot say (ranges, exactly-one-of
//! rules, references to backends, names, unreachable routes and split rules); and
//! only when something is wrong, a span-aware pass with yaml-rust2 (`spans`) maps
//! each field path to its line and column. Route precedence ([`precedence_order`])
//! and the sticky-split hash ([`sticky_point`], [`weighted_backend`]) live here too,
//! so the proxy and the validator share one definition of each.
//!
//! Every parse is bounded ([`Limits`], module `limits`): before serde_yaml builds a
//! value, a streaming pass refuses a file that is too large, nested too deep,
//! expands to too many nodes through aliases, or holds too many routes or policies.
//!
//! The `crd` feature adds the kube-rs `CustomResource` derive (the Kubernetes type
//! is `RoutePolicyResource`) and JSON schemas; default builds carry no Kubernetes
//! crates.

#![warn(missing_docs, unreachable_pub)]

pub mod defaults;
mod dot_segments;
mod duration;
mod limits;
mod model;
mod parse;
mod port;
mod precedence;
mod schema;
mod shadow;
mod spans;
mod sticky;
mod validate;

pub use validate::{is_dns_label, shadowed_routes};

pub use dot_segments::{dot_segment, first_dot_segment, resolve_dot_segments};
pub use duration::{Duration, DurationParseError};
pub use limits::{Limits, MAX_DEPTH_CEILING};
pub use model::*;
pub use parse::panic_message;
pub use port::ServicePort;
pub use precedence::{
    PrecedenceRule, compare_matches, precedence_order, precedence_rule, prefix_matches,
};
pub use schema::{
    Capability, EffectiveWeights, FileWeights, SCHEMA_V1, SCHEMA_VERSION, SCHEMA_VERSIONS,
    proxy_view, required_version,
};
pub use sticky::{
    STICKY_POINTS, rendezvous_backend, rendezvous_hash, sticky_point, weighted_backend,
};

use std::fmt;

use sha2::{Digest, Sha256};

use crate::validate::Input;

/// One problem found in a policy file, located as precisely as the source allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file name as given to the parser.
    pub file: String,
    /// 1-based line of the offending node.
    pub line: usize,
    /// 1-based column of the offending node.
    pub column: usize,
    /// Field path such as `spec.routes[0].retry.attempts` (empty for whole-document errors).
    pub path: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl Diagnostic {
    /// A diagnostic of the whole document (no field path) at `line`:`column` of `file`.
    pub(crate) fn at(file: &str, line: usize, column: usize, message: String) -> Self {
        Self {
            file: file.to_string(),
            line,
            column,
            path: String::new(),
            message,
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Why policies were refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The policies are invalid; every problem found is listed.
    #[error("{}", DisplayList(.0))]
    Invalid(Vec<Diagnostic>),
}

impl ConfigError {
    /// The individual problems.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            ConfigError::Invalid(d) => d,
        }
    }
}

struct DisplayList<'a>(&'a [Diagnostic]);

impl fmt::Display for DisplayList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// Parses and validates every policy document in one file.
///
/// `file` is only used to label diagnostics. Empty documents are skipped. Every
/// problem found is reported: a type error stops only its own document, and
/// semantic checks continue after the first problem. Two policies of the file with
/// the same namespace and name, or the same host, are refused.
pub fn parse_policies(file: &str, text: &str) -> Result<Vec<RoutePolicy>, ConfigError> {
    parse_policies_with(file, text, &Limits::default())
}

/// [`parse_policies`] within the given limits instead of the defaults.
pub fn parse_policies_with(
    file: &str,
    text: &str,
    limits: &Limits,
) -> Result<Vec<RoutePolicy>, ConfigError> {
    let mut usage = limits::SetUsage::default();
    let (located, mut errors) = parse::parse_file(file, text, Input::Source, limits, &mut usage);
    errors.extend(parse::check_unique(&located));
    if errors.is_empty() {
        Ok(located.into_iter().map(|l| l.policy).collect())
    } else {
        Err(ConfigError::Invalid(errors))
    }
}

/// [`parse_policies_with`] on the bytes of a file as read (at most one byte past
/// `limits.max_file_bytes` need be read: more is refused for its size alone).
pub fn parse_policy_bytes(
    file: &str,
    bytes: &[u8],
    limits: &Limits,
) -> Result<Vec<RoutePolicy>, ConfigError> {
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        // Cut short by the size limit, the last character may be split: the size is
        // the problem to report.
        Err(_) if bytes.len() > limits.max_file_bytes => String::from_utf8_lossy(bytes),
        Err(e) => return Err(ConfigError::Invalid(vec![not_utf8(file, bytes, e)])),
    };
    parse_policies_with(file, &text, limits)
}

/// Where the first byte that is not UTF-8 is, by line and column like any other
/// problem, and which byte it is (a Latin-1 `é` is 0xe9).
fn not_utf8(file: &str, bytes: &[u8], e: std::str::Utf8Error) -> Diagnostic {
    let valid = &bytes[..e.valid_up_to()];
    let before = std::str::from_utf8(valid).unwrap_or_default();
    // A byte order mark takes no column, as in the parse.
    let before = before.strip_prefix('\u{feff}').unwrap_or(before);
    let (line, column) = parse::line_column(before, before.len());
    let message = match (e.error_len(), bytes.get(e.valid_up_to())) {
        (Some(_), Some(b)) => {
            format!(
                "not UTF-8: byte 0x{b:02x} is not part of a UTF-8 character; save the file as UTF-8"
            )
        }
        _ => "not UTF-8: the file ends inside a character; save the file as UTF-8".to_string(),
    };
    Diagnostic::at(file, line, column, message)
}

/// The validated policies of a mesh in canonical order, with their content hash.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicySet {
    policies: Vec<RoutePolicy>,
    canonical: Vec<u8>,
    hash: String,
}

impl PolicySet {
    /// Builds a set from policies, sorting them by namespace and name.
    ///
    /// The policies are validated again (they may have been built in code, e.g. from
    /// Kubernetes objects). Positions are not known here, so diagnostics name the
    /// policy (`namespace/name`) as their file with line and column 1; use
    /// [`PolicySet::from_files`] to get real positions.
    pub fn new(policies: Vec<RoutePolicy>) -> Result<Self, ConfigError> {
        Self::new_with(policies, &Limits::default())
    }

    /// [`PolicySet::new`] with the counts of policies and routes checked against
    /// `limits` (the other limits are about text, which policies built in code never were).
    pub fn new_with(policies: Vec<RoutePolicy>, limits: &Limits) -> Result<Self, ConfigError> {
        Self::checked(policies, Input::Source, limits)
    }

    /// Builds a set from policies as proxies receive them: [`proxy_view`]s, whose
    /// weights (effective during a rollout, proportional from Gateway API) may have
    /// any total. Otherwise the same checks as [`PolicySet::new`].
    pub fn from_effective(policies: Vec<RoutePolicy>) -> Result<Self, ConfigError> {
        Self::from_effective_with(policies, &Limits::default().for_whole_set())
    }

    /// [`PolicySet::from_effective`] with the counts of policies and routes checked
    /// against `limits`: a control plane's whole set, where policies from files or
    /// objects (validated on their own) meet policies translated from Gateway API.
    pub fn from_effective_with(
        policies: Vec<RoutePolicy>,
        limits: &Limits,
    ) -> Result<Self, ConfigError> {
        Self::checked(policies, Input::Snapshot, limits)
    }

    fn checked(
        mut policies: Vec<RoutePolicy>,
        input: Input,
        limits: &Limits,
    ) -> Result<Self, ConfigError> {
        let over = limits::check_counts(&policies, limits);
        if !over.is_empty() {
            return Err(ConfigError::Invalid(over));
        }
        let mut errors = Vec::new();
        let mut located = Vec::with_capacity(policies.len());
        for p in &policies {
            let file = format!("{}/{}", p.metadata.namespace_or_default(), p.metadata.name);
            errors.extend(
                validate::validate_as(p, input)
                    .into_iter()
                    .map(|f| Diagnostic {
                        file: file.clone(),
                        line: 1,
                        column: 1,
                        path: f.path,
                        message: f.message,
                    }),
            );
            located.push(parse::Located {
                policy: p.clone(),
                file,
                source: None,
            });
        }
        errors.extend(parse::check_unique(&located));
        if !errors.is_empty() {
            return Err(ConfigError::Invalid(errors));
        }
        Ok(Self::build(std::mem::take(&mut policies)))
    }

    /// Parses and validates several files (`(name, text)` pairs) into one set,
    /// refusing the same namespace and name, or the same host, in two places.
    /// The order of the files does not change the result.
    pub fn from_files<'a>(
        files: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, ConfigError> {
        Self::from_files_with(files, &Limits::default())
    }

    /// [`PolicySet::from_files`] within the given limits; the policies and bytes of
    /// all files count together against `max_policies` and `max_total_bytes`.
    pub fn from_files_with<'a>(
        files: impl IntoIterator<Item = (&'a str, &'a str)>,
        limits: &Limits,
    ) -> Result<Self, ConfigError> {
        let mut located = Vec::new();
        let mut errors = Vec::new();
        let mut usage = limits::SetUsage::default();
        for (name, text) in files {
            let (ok, errs) = parse::parse_file(name, text, Input::Source, limits, &mut usage);
            located.extend(ok);
            errors.extend(errs);
        }
        errors.extend(parse::check_unique(&located));
        if !errors.is_empty() {
            return Err(ConfigError::Invalid(errors));
        }
        Ok(Self::build(located.into_iter().map(|l| l.policy).collect()))
    }

    /// Sorts validated policies and computes their canonical bytes and hash. Values
    /// written equal to their defaults are left out first: writing a default is no
    /// edit, and keeps the hash.
    fn build(mut policies: Vec<RoutePolicy>) -> Self {
        policies.iter_mut().for_each(defaults::leave_out);
        policies.sort_by(|a, b| {
            (a.metadata.namespace.as_deref(), a.metadata.name.as_str())
                .cmp(&(b.metadata.namespace.as_deref(), b.metadata.name.as_str()))
        });
        let mut canonical = Vec::new();
        for p in &policies {
            canonical.extend_from_slice(b"---\n");
            canonical.extend_from_slice(
                serde_yaml::to_string(p)
                    .expect("policy types always serialise")
                    .as_bytes(),
            );
        }
        let hash = hex::encode(&Sha256::digest(&canonical)[..8]);
        Self {
            policies,
            canonical,
            hash,
        }
    }

    /// Parses and validates a set from its canonical bytes (as carried in snapshots).
    pub fn from_canonical(source: &str, bytes: &[u8]) -> Result<Self, ConfigError> {
        Self::from_canonical_with(source, bytes, &Limits::default())
    }

    /// [`PolicySet::from_canonical`] within the given limits: the bytes hold a whole
    /// set, so they are held to [`Limits::for_whole_set`].
    pub fn from_canonical_with(
        source: &str,
        bytes: &[u8],
        limits: &Limits,
    ) -> Result<Self, ConfigError> {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            ConfigError::Invalid(vec![Diagnostic::at(
                source,
                1,
                1,
                format!("not UTF-8: {e}"),
            )])
        })?;
        let mut usage = limits::SetUsage::default();
        let (located, mut errors) = parse::parse_file(
            source,
            text,
            Input::Snapshot,
            &limits.for_whole_set(),
            &mut usage,
        );
        errors.extend(parse::check_unique(&located));
        if !errors.is_empty() {
            return Err(ConfigError::Invalid(errors));
        }
        Ok(Self::build(located.into_iter().map(|l| l.policy).collect()))
    }

    /// The policies, sorted by namespace and name.
    pub fn policies(&self) -> &[RoutePolicy] {
        &self.policies
    }

    /// The canonical serialisation: stable for equal policies.
    pub fn canonical_bytes(&self) -> &[u8] {
        &self.canonical
    }

    /// The content hash (hex): the policy version.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The lowest schema version that expresses every policy of the set.
    pub fn schema_version(&self) -> u32 {
        self.policies
            .iter()
            .map(required_version)
            .max()
            .unwrap_or(SCHEMA_V1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_empty_documents_and_comments() {
        let text = "# leading comment\n---\n---\napiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: { name: a }\nspec:\n  host: Shop\n  inbound: {}\n";
        let err = parse_policies("f.yaml", text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "f.yaml:8:9: spec.host: expected a lower-case host name without scheme or port (e.g. \"log-service\"), got \"Shop\""
        );
        assert_eq!(
            parse_policies("f.yaml", "# nothing\n---\n").unwrap(),
            vec![]
        );
    }

    #[test]
    fn a_mapping_as_key_is_refused_by_name() {
        let text =
            "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: { { name: a }: 1 }\n";
        let err = parse_policies("f.yaml", text).unwrap_err();
        assert_eq!(err.diagnostics().len(), 1);
        assert!(err.to_string().contains("expected a field name"), "{err}");
    }

    #[test]
    fn design_example_parses_and_hash_is_stable() {
        let text = include_str!("../../examples/policies/log-service.yaml");
        let policies = parse_policies("log-service.yaml", text).unwrap();
        assert_eq!(policies.len(), 1);
        let spec = &policies[0].spec;
        assert_eq!(spec.host, "log-service");
        let weights = spec.routes[0].split[1].weights.as_ref().unwrap();
        assert_eq!(weights.keys().collect::<Vec<_>>(), ["log-v1", "log-v2"]);
        let set = PolicySet::new(policies).unwrap();
        let again = PolicySet::from_canonical("snapshot", set.canonical_bytes()).unwrap();
        assert_eq!(set.hash(), again.hash());
        assert_eq!(set.policies(), again.policies());
    }
}

#[cfg(test)]
mod total_tests {
    use super::*;

    #[test]
    fn files_need_100_and_snapshots_take_any_total() {
        let text = include_str!("../../examples/policies/log-service.yaml");
        let mut p = parse_policies("log-service.yaml", text).unwrap();
        let weights = p[0].spec.routes[0].split[1].weights.as_mut().unwrap();
        weights[0] = 1;
        weights[1] = 2;
        let err = PolicySet::new(p.clone()).unwrap_err();
        assert!(
            err.to_string().ends_with("weights sum to 3, expected 100"),
            "{err}"
        );
        let set = PolicySet::from_effective(p).unwrap();
        assert_eq!(set.schema_version(), SCHEMA_VERSION);
        let again = PolicySet::from_canonical("snapshot", set.canonical_bytes()).unwrap();
        assert_eq!(again.hash(), set.hash());
        let mut zero = set.policies().to_vec();
        let w = zero[0].spec.routes[0].split[1].weights.as_mut().unwrap();
        w[0] = 0;
        w[1] = 0;
        assert!(PolicySet::from_effective(zero).is_err());
    }
}

#[cfg(all(test, feature = "crd"))]
mod crd_tests {
    use kube::CustomResourceExt;

    use crate::RoutePolicyResource;

    #[test]
    fn crd_names_group_kind_and_schema() {
        let crd = RoutePolicyResource::crd();
        assert_eq!(crd.spec.group, "sluice.dev");
        assert_eq!(crd.spec.names.kind, "RoutePolicy");
        assert_eq!(crd.spec.names.plural, "routepolicies");
        assert_eq!(crd.spec.scope, "Namespaced");
        let json = serde_json::to_value(&crd).unwrap();
        let spec = &json["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["properties"]["host"]["type"], "string");
        let timeout = &spec["properties"]["routes"]["items"]["properties"]["timeout"];
        assert_eq!(timeout["type"], "string", "{timeout}");
        // Kubernetes refuses `additionalProperties` beside `properties` in a
        // structural schema; unknown fields are refused by the validating webhook.
        let text = json.to_string();
        assert!(!text.contains("\"additionalProperties\":false"), "{text}");
        // The control plane writes its verdict through the status subresource.
        let version = &json["spec"]["versions"][0];
        assert_eq!(version["subresources"]["status"], serde_json::json!({}));
        let status = &version["schema"]["openAPIV3Schema"]["properties"]["status"];
        assert_eq!(
            status["properties"]["observedGeneration"]["type"],
            "integer"
        );
        assert_eq!(status["properties"]["error"]["type"], "string");
    }
}
