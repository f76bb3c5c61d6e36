//! Bounds on policy input, checked before serde_yaml builds any value.
//!
//! A policy file comes from whoever can write the policy directory, a ConfigMap or a
//! RoutePolicy object, and a few kilobytes of YAML can cost gigabytes once
//! materialised (one anchor repeated by many aliases) or overflow the stack when
//! nested deep enough. So a file is first walked as a stream of YAML events with
//! yaml-rust2's iterative parser, which holds only a stack of open collections and
//! the sizes of the anchors seen: the file's size, its nesting depth, the number of
//! nodes it expands to (every alias counted as the nodes it repeats), its routes per
//! policy and its policies are checked there, and the first limit crossed is refused
//! with its line and column. Only a file within every limit reaches serde_yaml.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use crate::{Diagnostic, RoutePolicy};

/// How large policy input may be. Every parse is bounded; [`Limits::default`] is
/// what the proxy and the control plane use unless told otherwise by flag (with the
/// `clap` feature these fields are the `--policy-max-*` flags, `SLUICE_POLICY_MAX_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct Limits {
    /// Bytes in one policy file.
    #[cfg_attr(feature = "clap", arg(
        long = "policy-max-file-bytes",
        env = "SLUICE_POLICY_MAX_FILE_BYTES",
        value_name = "BYTES",
        default_value_t = Limits::DEFAULT.max_file_bytes,
    ))]
    pub max_file_bytes: usize,
    /// Bytes in all policy files together (the control plane's directory; a snapshot from it).
    #[cfg_attr(feature = "clap", arg(
        long = "policy-max-total-bytes",
        env = "SLUICE_POLICY_MAX_TOTAL_BYTES",
        value_name = "BYTES",
        default_value_t = Limits::DEFAULT.max_total_bytes,
    ))]
    pub max_total_bytes: usize,
    /// Nesting depth of mappings and sequences in a policy file, aliases expanded.
    #[cfg_attr(feature = "clap", arg(
        long = "policy-max-depth",
        env = "SLUICE_POLICY_MAX_DEPTH",
        value_name = "LEVELS",
        default_value_t = Limits::DEFAULT.max_depth,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_DEPTH_CEILING as u64),
    ))]
    pub max_depth: usize,
    /// Nodes a policy file may expand to, each alias counted as the nodes it repeats.
    #[cfg_attr(feature = "clap", arg(
        long = "policy-max-nodes",
        env = "SLUICE_POLICY_MAX_NODES",
        value_name = "N",
        default_value_t = Limits::DEFAULT.max_nodes,
    ))]
    pub max_nodes: usize,
    /// Routes in one policy.
    #[cfg_attr(feature = "clap", arg(
        long = "policy-max-routes",
        env = "SLUICE_POLICY_MAX_ROUTES",
        value_name = "N",
        default_value_t = Limits::DEFAULT.max_routes,
    ))]
    pub max_routes: usize,
    /// Policies in all (a proxy's file; the control plane's whole mesh).
    #[cfg_attr(feature = "clap", arg(
        long = "policy-max-policies",
        env = "SLUICE_POLICY_MAX_POLICIES",
        value_name = "N",
        default_value_t = Limits::DEFAULT.max_policies,
    ))]
    pub max_policies: usize,
}

/// The deepest nesting a flag may allow: serde_yaml refuses beyond 128 levels itself.
pub const MAX_DEPTH_CEILING: usize = 100;

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl Limits {
    /// The defaults: generous for hand-written policies, and small enough that
    /// refusing the worst file within them costs a few megabytes.
    pub const DEFAULT: Limits = Limits {
        max_file_bytes: 1024 * 1024,
        max_total_bytes: 16 * 1024 * 1024,
        max_depth: 32,
        max_nodes: 200_000,
        max_routes: 1_000,
        max_policies: 10_000,
    };

    /// The limits for one text holding a whole set (a snapshot's canonical bytes):
    /// the total size applies to it, and its node budget grows in proportion.
    pub fn for_whole_set(&self) -> Limits {
        let files = (self.max_total_bytes / self.max_file_bytes.max(1)).max(1);
        Limits {
            max_file_bytes: self.max_total_bytes.max(self.max_file_bytes),
            max_nodes: self.max_nodes.saturating_mul(files),
            ..*self
        }
    }
}

/// What a set has used so far, as its files are read one by one.
#[derive(Debug, Default)]
pub(crate) struct SetUsage {
    bytes: usize,
    policies: usize,
}

/// A file the event walk could not read to its end: serde_yaml, which decides what
/// the values are, must not materialise anything from document `doc` on.
#[derive(Debug)]
pub(crate) struct Unchecked {
    /// Index of the document holding the syntax error.
    pub(crate) doc: usize,
    /// yaml-rust2's account of it, used if serde_yaml accepts the document.
    pub(crate) error: Diagnostic,
    /// Where serde_yaml's reading must end: the end of the error's line, at most
    /// [`UNCHECKED_TAIL`] bytes past the error, so libyaml never reads what was not walked.
    pub(crate) cut: usize,
}

/// How far past yaml-rust2's syntax error libyaml may read to give its own account.
const UNCHECKED_TAIL: usize = 4096;

/// The byte offset [`Unchecked::cut`] for an error at character `index` of `text`.
fn cut_after(text: &str, index: usize) -> usize {
    let at = text
        .char_indices()
        .nth(index)
        .map_or(text.len(), |(b, _)| b);
    let line_end = text[at..].find('\n').map_or(text.len(), |n| at + n + 1);
    let mut cut = line_end
        .min(at.saturating_add(UNCHECKED_TAIL))
        .min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    cut
}

/// Checks one file against `limits`, counting it into `usage`. `Err` refuses the
/// file; `Ok(Some(_))` means it is within every limit up to a syntax error.
pub(crate) fn check_text(
    file: &str,
    text: &str,
    limits: &Limits,
    usage: &mut SetUsage,
) -> Result<Option<Unchecked>, Diagnostic> {
    if text.len() > limits.max_file_bytes {
        let at = line_of_byte(text, limits.max_file_bytes);
        return Err(diagnostic(
            file,
            at,
            1,
            format!(
                "the file holds more than the {} bytes allowed in one policy file (--policy-max-file-bytes)",
                limits.max_file_bytes
            ),
        ));
    }
    usage.bytes = usage.bytes.saturating_add(text.len());
    if usage.bytes > limits.max_total_bytes {
        return Err(diagnostic(
            file,
            1,
            1,
            format!(
                "with this file the policy files hold {} bytes, more than the {} allowed together (--policy-max-total-bytes)",
                usage.bytes, limits.max_total_bytes
            ),
        ));
    }
    Walk::new(file, limits, usage).run(text)
}

/// The policies and routes of policies built in code (Kubernetes objects), which
/// never were text, counted against the same limits as parsed ones. Such a policy
/// is named `namespace/name` in place of a file.
pub(crate) fn check_counts(policies: &[RoutePolicy], limits: &Limits) -> Vec<Diagnostic> {
    let label =
        |p: &RoutePolicy| format!("{}/{}", p.metadata.namespace_or_default(), p.metadata.name);
    let mut out = Vec::new();
    if let Some(over) = policies.get(limits.max_policies) {
        out.push(diagnostic(
            &label(over),
            1,
            1,
            format!(
                "{} policies, more than the {} allowed (--policy-max-policies)",
                policies.len(),
                limits.max_policies
            ),
        ));
    }
    for p in policies {
        if p.spec.routes.len() > limits.max_routes {
            out.push(Diagnostic {
                path: "spec.routes".to_string(),
                ..diagnostic(
                    &label(p),
                    1,
                    1,
                    format!(
                        "{} routes, more than the {} allowed in one policy (--policy-max-routes)",
                        p.spec.routes.len(),
                        limits.max_routes
                    ),
                )
            });
        }
    }
    out
}

/// 1-based line holding byte `at` of `text` (or its last line).
fn line_of_byte(text: &str, at: usize) -> usize {
    let end = at.min(text.len());
    1 + text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}

fn diagnostic(file: &str, line: usize, column: usize, message: String) -> Diagnostic {
    Diagnostic::at(file, line, column, message)
}

/// How many times `--policy-max-file-bytes` a file's scalars may come to, every alias
/// counted as the bytes it repeats. Without aliases a file's scalars are never more
/// than the file; the node budget alone let one large anchored string, repeated by
/// aliases in a file under 1 MiB, expand to gigabytes.
const EXPANSION: u64 = 4;

/// The size of an anchored node, to charge each alias of it.
#[derive(Clone, Copy, Debug)]
struct Anchor {
    nodes: u64,
    /// Bytes of the scalars in it.
    bytes: u64,
    /// Levels of collections inside it, itself included.
    height: usize,
    /// Direct children, for an anchored sequence used as `routes`.
    items: usize,
    /// Still being read: an alias to it from inside is recursive.
    open: bool,
}

/// Where a collection sits, as far as the counts need to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Root,
    Spec,
    Routes,
    Other,
}

#[derive(Debug)]
struct Frame {
    role: Role,
    mapping: bool,
    /// In a mapping: the next node is a key.
    expect_key: bool,
    /// The last scalar key, kept only where a role below depends on it.
    key: Option<String>,
    /// Anchor id (0 for none) and the node count when the collection opened.
    anchor: usize,
    nodes_at_start: u64,
    bytes_at_start: u64,
    height: usize,
    items: usize,
}

struct Walk<'a> {
    file: &'a str,
    limits: &'a Limits,
    usage: &'a mut SetUsage,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Anchor>,
    nodes: u64,
    /// Bytes of scalars so far, aliases expanded.
    bytes: u64,
    doc: usize,
    /// The next node is a document's root.
    at_root: bool,
}

impl<'a> Walk<'a> {
    fn new(file: &'a str, limits: &'a Limits, usage: &'a mut SetUsage) -> Self {
        Self {
            file,
            limits,
            usage,
            stack: Vec::new(),
            anchors: HashMap::new(),
            nodes: 0,
            bytes: 0,
            doc: 0,
            at_root: false,
        }
    }

    fn refuse(&self, mark: Marker, message: String) -> Diagnostic {
        diagnostic(self.file, mark.line(), mark.col() + 1, message)
    }

    fn run(mut self, text: &str) -> Result<Option<Unchecked>, Diagnostic> {
        let mut parser = Parser::new_from_str(text);
        let mut started = false;
        let mut in_doc = false;
        loop {
            let (event, mark) = match parser.next_token() {
                Ok(e) => e,
                // yaml-rust2 scans flow collections ahead of the events it emits and
                // stops at 255 open levels: the depth limit, reached early.
                Err(e) if e.info() == "recursion limit exceeded" => {
                    return Err(self.too_deep(*e.marker()));
                }
                Err(e) => {
                    let m = *e.marker();
                    return Ok(Some(Unchecked {
                        cut: cut_after(text, m.index()),
                        // Between documents, the error belongs to the next one.
                        doc: if in_doc || !started {
                            self.doc
                        } else {
                            self.doc + 1
                        },
                        error: self.refuse(m, format!("invalid YAML: {}", e.info())),
                    }));
                }
            };
            match event {
                Event::StreamEnd => return Ok(None),
                Event::DocumentStart => {
                    if started {
                        self.doc += 1;
                    }
                    started = true;
                    in_doc = true;
                    // Anchors belong to one document.
                    self.anchors.clear();
                    self.stack.clear();
                    self.at_root = true;
                }
                Event::Scalar(value, style, anchor, _) => {
                    let null = style == TScalarStyle::Plain
                        && matches!(value.as_str(), "" | "~" | "null" | "Null" | "NULL");
                    self.node(mark, !null)?;
                    self.charge(mark, 1)?;
                    self.expand(mark, value.len() as u64, false)?;
                    if anchor != 0 {
                        self.anchors.insert(
                            anchor,
                            Anchor {
                                nodes: 1,
                                bytes: value.len() as u64,
                                height: 0,
                                items: 0,
                                open: false,
                            },
                        );
                    }
                    if let Some(f) = self.stack.last_mut()
                        && f.mapping
                        && f.expect_key
                        && matches!(f.role, Role::Root | Role::Spec)
                    {
                        f.key = Some(value);
                    }
                    self.after_node();
                }
                Event::Alias(id) => {
                    let a = self.anchors.get(&id).copied();
                    if a.is_some_and(|a| a.open) {
                        return Err(self.refuse(
                            mark,
                            "an alias inside the node its anchor names would repeat itself without end".to_string(),
                        ));
                    }
                    // An unknown anchor is refused by serde_yaml; charge it as one node.
                    let a = a.unwrap_or(Anchor {
                        nodes: 1,
                        bytes: 0,
                        height: 0,
                        items: 0,
                        open: false,
                    });
                    self.node(mark, true)?;
                    if self.stack.len() + a.height > self.limits.max_depth {
                        return Err(self.too_deep(mark));
                    }
                    if let Some(f) = self.stack.last_mut() {
                        f.height = f.height.max(a.height);
                    }
                    if self.placing() == Some(Role::Routes) && a.items > self.limits.max_routes {
                        return Err(self.refuse(mark, format!(
                            "this alias repeats {} routes, more than the {} allowed in one policy (--policy-max-routes)",
                            a.items, self.limits.max_routes
                        )));
                    }
                    if self.nodes.saturating_add(a.nodes) > self.limits.max_nodes as u64 {
                        return Err(self.refuse(mark, format!(
                            "this alias repeats {} nodes, and with them the file expands to more than the {} nodes allowed (aliases count as the nodes they repeat; --policy-max-nodes)",
                            a.nodes, self.limits.max_nodes
                        )));
                    }
                    self.nodes += a.nodes;
                    self.expand(mark, a.bytes, true)?;
                    self.after_node();
                }
                Event::MappingStart(anchor, _) | Event::SequenceStart(anchor, _) => {
                    let mapping = matches!(event, Event::MappingStart(..));
                    let role = self.placing().unwrap_or(Role::Other);
                    self.node(mark, true)?;
                    self.charge(mark, 1)?;
                    if self.stack.len() + 1 > self.limits.max_depth {
                        return Err(self.too_deep(mark));
                    }
                    // `placing` says Root only at a document's top, and only a
                    // mapping there can be a policy.
                    let role = match (role, mapping) {
                        (Role::Root, true) => Role::Root,
                        (Role::Spec, true) => Role::Spec,
                        (Role::Routes, false) => Role::Routes,
                        _ => Role::Other,
                    };
                    if anchor != 0 {
                        self.anchors.insert(
                            anchor,
                            Anchor {
                                nodes: 0,
                                bytes: 0,
                                height: 0,
                                items: 0,
                                open: true,
                            },
                        );
                    }
                    self.stack.push(Frame {
                        role,
                        mapping,
                        expect_key: true,
                        key: None,
                        anchor,
                        nodes_at_start: self.nodes - 1,
                        bytes_at_start: self.bytes,
                        height: 0,
                        items: 0,
                    });
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    let Some(f) = self.stack.pop() else { continue };
                    let height = f.height + 1;
                    if f.anchor != 0 {
                        self.anchors.insert(
                            f.anchor,
                            Anchor {
                                nodes: self.nodes - f.nodes_at_start,
                                bytes: self.bytes - f.bytes_at_start,
                                height,
                                items: f.items,
                                open: false,
                            },
                        );
                    }
                    if let Some(p) = self.stack.last_mut() {
                        p.height = p.height.max(height);
                    }
                    self.after_node();
                }
                Event::DocumentEnd => in_doc = false,
                Event::Nothing | Event::StreamStart => {}
            }
        }
    }

    /// What a collection starting now would be, from its parent and the key it is under;
    /// `None` for a mapping key.
    fn placing(&self) -> Option<Role> {
        let Some(f) = self.stack.last() else {
            return Some(Role::Root);
        };
        if f.mapping && f.expect_key {
            return None;
        }
        // Root and Spec frames are mappings, and only mappings keep a key.
        Some(match (f.role, f.key.as_deref()) {
            (Role::Root, Some("spec")) => Role::Spec,
            (Role::Spec, Some("routes")) => Role::Routes,
            _ => Role::Other,
        })
    }

    /// Counts a node starting now as a policy (a document's root) or a route.
    fn node(&mut self, mark: Marker, counts: bool) -> Result<(), Diagnostic> {
        if std::mem::take(&mut self.at_root) && counts {
            self.usage.policies += 1;
            if self.usage.policies > self.limits.max_policies {
                // yaml-rust2 marks a block mapping past its first key; a document's
                // root starts a line.
                return Err(diagnostic(
                    self.file,
                    mark.line(),
                    1,
                    format!(
                        "more than {} policies (--policy-max-policies)",
                        self.limits.max_policies
                    ),
                ));
            }
        }
        if let Some(f) = self.stack.last_mut()
            && f.role == Role::Routes
        {
            f.items += 1;
            if f.items > self.limits.max_routes {
                return Err(self.refuse(
                    mark,
                    format!(
                        "more than {} routes in one policy (--policy-max-routes)",
                        self.limits.max_routes
                    ),
                ));
            }
        } else if let Some(f) = self.stack.last_mut()
            && !f.mapping
        {
            f.items += 1;
        }
        Ok(())
    }

    fn charge(&mut self, mark: Marker, n: u64) -> Result<(), Diagnostic> {
        self.nodes += n;
        if self.nodes > self.limits.max_nodes as u64 {
            return Err(self.refuse(
                mark,
                format!(
                    "the file has more than the {} nodes allowed (--policy-max-nodes)",
                    self.limits.max_nodes
                ),
            ));
        }
        Ok(())
    }

    /// Counts `n` bytes of scalars (an alias's: the bytes it repeats) against the
    /// expansion budget.
    fn expand(&mut self, mark: Marker, n: u64, alias: bool) -> Result<(), Diagnostic> {
        self.bytes = self.bytes.saturating_add(n);
        let budget = (self.limits.max_file_bytes as u64).saturating_mul(EXPANSION);
        if self.bytes > budget && alias {
            return Err(self.refuse(
                mark,
                format!(
                    "this alias repeats {n} bytes, and with them the file's values come to more than the {budget} bytes allowed ({EXPANSION} times --policy-max-file-bytes; aliases count as the bytes they repeat)"
                ),
            ));
        }
        Ok(())
    }

    fn too_deep(&self, mark: Marker) -> Diagnostic {
        self.refuse(
            mark,
            format!(
                "nested more than {} levels deep (--policy-max-depth)",
                self.limits.max_depth
            ),
        )
    }

    /// A node just ended: in a mapping, keys and values alternate.
    fn after_node(&mut self) {
        if let Some(f) = self.stack.last_mut()
            && f.mapping
        {
            f.expect_key = !f.expect_key;
        }
    }
}

/// What a walk of an unchecked document says when it runs out of budget.
const OVER_BUDGET: &str = "over the limits of policy input";

/// Walks one document as serde_yaml loaded it, building nothing and stopping once it
/// has visited `max_nodes` nodes (aliases replayed included), so the document's own
/// syntax error, which serde_yaml reports only at the end of what it loaded, can be
/// told without trusting what comes before it.
pub(crate) fn walk_unchecked(
    doc: serde_yaml::Deserializer<'_>,
    limits: &Limits,
) -> Result<(), serde_yaml::Error> {
    use serde::de::DeserializeSeed;
    let budget = std::cell::Cell::new(limits.max_nodes);
    Counted(&budget).deserialize(doc)
}

/// Whether a [`walk_unchecked`] error is its own budget running out.
pub(crate) fn is_over_budget(e: &serde_yaml::Error) -> bool {
    e.to_string().contains(OVER_BUDGET)
}

/// A node of [`walk_unchecked`], charged to the budget it shares with every other.
#[derive(Clone, Copy)]
struct Counted<'b>(&'b std::cell::Cell<usize>);

impl Counted<'_> {
    fn charge<E: serde::de::Error>(self) -> Result<(), E> {
        match self.0.get().checked_sub(1) {
            Some(left) => {
                self.0.set(left);
                Ok(())
            }
            None => Err(E::custom(OVER_BUDGET)),
        }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Counted<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Counted<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        self.charge()
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
        self.charge()
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
        self.charge()
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
        self.charge()
    }

    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<(), E> {
        self.charge()
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.charge()
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        self.charge()
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.charge()?;
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.charge()?;
        while map.next_key_seed(self)?.is_some() {
            map.next_value_seed(self)?;
        }
        Ok(())
    }

    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        use serde::de::VariantAccess;
        // A tagged node (`!tag value`): the tag, then its value.
        let ((), value) = data.variant_seed(self)?;
        value.newtype_variant_seed(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, limits: &Limits) -> Result<Option<Unchecked>, Diagnostic> {
        check_text("f.yaml", text, limits, &mut SetUsage::default())
    }

    fn refusal(text: &str, limits: &Limits) -> String {
        check(text, limits).unwrap_err().to_string()
    }

    #[test]
    fn a_policy_within_limits_passes() {
        let text = include_str!("../../examples/policies/log-service.yaml");
        assert!(check(text, &Limits::default()).unwrap().is_none());
    }

    #[test]
    fn size_is_refused_at_the_line_that_crosses_it() {
        let limits = Limits {
            max_file_bytes: 10,
            ..Limits::default()
        };
        assert_eq!(
            refusal("a: 1\nb: 2\nc: 3\n", &limits),
            "f.yaml:3:1: the file holds more than the 10 bytes allowed in one policy file (--policy-max-file-bytes)"
        );
    }

    #[test]
    fn depth_counts_collections_and_aliases_expand_it() {
        let limits = Limits {
            max_depth: 3,
            ..Limits::default()
        };
        assert!(check("a: [[1]]\n", &limits).unwrap().is_none());
        assert_eq!(
            refusal("a: [[[1]]]\n", &limits),
            "f.yaml:1:6: nested more than 3 levels deep (--policy-max-depth)"
        );
        assert_eq!(
            refusal("x: &x [[1]]\ny: [*x]\n", &limits),
            "f.yaml:2:5: nested more than 3 levels deep (--policy-max-depth)"
        );
    }

    #[test]
    fn aliases_are_charged_with_their_anchor_and_nested_anchors_multiply() {
        let limits = Limits {
            max_nodes: 100,
            ..Limits::default()
        };
        // a = 1 + 10, b = 1 + 3 * 11 = 34; the root map, keys and b's aliases add up.
        let text = "a: &a [1,1,1,1,1,1,1,1,1,1]\nb: &b [*a, *a, *a]\nc: [*b, *b]\n";
        assert_eq!(
            refusal(text, &limits),
            "f.yaml:3:9: this alias repeats 34 nodes, and with them the file expands to more than the 100 nodes allowed (aliases count as the nodes they repeat; --policy-max-nodes)"
        );
        assert!(
            check(&text.replace(", *b]", "]"), &limits)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn alias_bytes_may_reach_the_expansion_budget_but_not_pass_it() {
        // Scalars: the keys `ab` and `cd` (4 bytes) and the anchored value, once as
        // itself and seven times through aliases: 4 + 8 * 40 = 324 bytes, in 75 bytes;
        // the seventh alias (column 24) is the one that crosses 320.
        let text = format!("ab: &a {}\ncd: [*a,*a,*a,*a,*a,*a,*a]\n", "x".repeat(40));
        let at = |max_file_bytes: usize| Limits {
            max_file_bytes,
            ..Limits::default()
        };
        assert!(check(&text, &at(81)).unwrap().is_none(), "324 = 4 * 81");
        assert_eq!(
            refusal(&text, &at(80)),
            "f.yaml:2:24: this alias repeats 40 bytes, and with them the file's values come to more than the 320 bytes allowed (4 times --policy-max-file-bytes; aliases count as the bytes they repeat)"
        );
    }

    #[test]
    fn a_recursive_alias_is_refused() {
        assert_eq!(
            refusal("a: &a [1, *a]\n", &Limits::default()),
            "f.yaml:1:11: an alias inside the node its anchor names would repeat itself without end"
        );
    }

    #[test]
    fn routes_and_policies_are_counted() {
        let limits = Limits {
            max_routes: 2,
            max_policies: 2,
            ..Limits::default()
        };
        let policy = |routes: &str| format!("kind: RoutePolicy\nspec:\n  routes: {routes}\n");
        assert!(check(&policy("[a, b]"), &limits).unwrap().is_none());
        assert_eq!(
            refusal(&policy("[a, b, c]"), &limits),
            "f.yaml:3:18: more than 2 routes in one policy (--policy-max-routes)"
        );
        // Only spec.routes counts.
        assert!(
            check("other: [a, b, c]\nspec: {x: [a, b, c]}\n", &limits)
                .unwrap()
                .is_none()
        );
        let aliased = "x: &r [a, b, c]\nspec:\n  routes: *r\n";
        assert_eq!(
            refusal(aliased, &limits),
            "f.yaml:3:11: this alias repeats 3 routes, more than the 2 allowed in one policy (--policy-max-routes)"
        );
        let three = "a: 1\n---\n---\nb: 1\n---\nc: 1\n";
        assert_eq!(
            refusal(three, &limits),
            "f.yaml:6:1: more than 2 policies (--policy-max-policies)"
        );
        // Policies add up over the files of a set.
        let mut usage = SetUsage::default();
        assert!(check_text("a.yaml", "a: 1\n---\nb: 1\n", &limits, &mut usage).is_ok());
        let err = check_text("b.yaml", "c: 1\n", &limits, &mut usage).unwrap_err();
        assert_eq!(
            err.to_string(),
            "b.yaml:1:1: more than 2 policies (--policy-max-policies)"
        );
    }

    #[test]
    fn total_bytes_add_up_over_a_set() {
        let limits = Limits {
            max_total_bytes: 12,
            ..Limits::default()
        };
        let mut usage = SetUsage::default();
        assert!(check_text("a.yaml", "a: 1\n", &limits, &mut usage).is_ok());
        assert!(check_text("b.yaml", "b: 1\n", &limits, &mut usage).is_ok());
        assert_eq!(
            check_text("c.yaml", "c: 1\n", &limits, &mut usage)
                .unwrap_err()
                .to_string(),
            "c.yaml:1:1: with this file the policy files hold 15 bytes, more than the 12 allowed together (--policy-max-total-bytes)"
        );
    }

    #[test]
    fn the_defaults_are_the_documented_ones_and_a_whole_set_scales_them() {
        // README's "Policy input limits" table.
        assert_eq!(
            Limits::default(),
            Limits {
                max_file_bytes: 1_048_576,
                max_total_bytes: 16_777_216,
                max_depth: 32,
                max_nodes: 200_000,
                max_routes: 1_000,
                max_policies: 10_000,
            }
        );
        let limits = Limits {
            max_file_bytes: 100,
            max_total_bytes: 1_000,
            max_nodes: 50,
            ..Limits::default()
        };
        // One text of a whole set may be as large as all files, with ten files' nodes.
        assert_eq!(
            limits.for_whole_set(),
            Limits {
                max_file_bytes: 1_000,
                max_nodes: 500,
                ..limits
            }
        );
        // A total below one file's size still allows one file.
        let one = Limits {
            max_total_bytes: 40,
            ..limits
        };
        assert_eq!(
            one.for_whole_set(),
            Limits {
                max_file_bytes: 100,
                ..one
            }
        );
    }

    #[test]
    fn every_limit_allows_exactly_its_value() {
        let text = "a: 1\n";
        let exact = |limits: Limits| check(text, &limits);
        assert!(
            exact(Limits {
                max_file_bytes: 5,
                ..Limits::default()
            })
            .is_ok()
        );
        assert!(
            exact(Limits {
                max_total_bytes: 5,
                ..Limits::default()
            })
            .is_ok()
        );
        // The mapping, its key and its value.
        assert!(
            exact(Limits {
                max_nodes: 3,
                ..Limits::default()
            })
            .is_ok()
        );
        assert!(
            exact(Limits {
                max_nodes: 2,
                ..Limits::default()
            })
            .is_err()
        );

        // x's sequence is 3 nodes; the alias adds them again: 1 + 1 + 3 + 1 + 3.
        let aliased = "x: &x [1, 1]\ny: *x\n";
        assert!(
            check(
                aliased,
                &Limits {
                    max_nodes: 9,
                    ..Limits::default()
                }
            )
            .is_ok()
        );
        assert_eq!(
            refusal(
                aliased,
                &Limits {
                    max_nodes: 8,
                    ..Limits::default()
                }
            ),
            "f.yaml:2:4: this alias repeats 3 nodes, and with them the file expands to more than the 8 nodes allowed (aliases count as the nodes they repeat; --policy-max-nodes)"
        );
        // An alias one level inside, to a sequence of one level: 3 levels in all.
        let nested = "x: &x [1]\ny: [*x]\n";
        assert!(
            check(
                nested,
                &Limits {
                    max_depth: 3,
                    ..Limits::default()
                }
            )
            .is_ok()
        );
        assert_eq!(
            refusal(
                nested,
                &Limits {
                    max_depth: 2,
                    ..Limits::default()
                }
            ),
            "f.yaml:2:5: nested more than 2 levels deep (--policy-max-depth)"
        );
        let routes = "x: &r [a, b]\nspec:\n  routes: *r\n";
        assert!(
            check(
                routes,
                &Limits {
                    max_routes: 2,
                    ..Limits::default()
                }
            )
            .is_ok()
        );
    }

    #[test]
    fn only_a_document_with_content_counts_as_a_policy() {
        let one = Limits {
            max_policies: 1,
            ..Limits::default()
        };
        // An empty or null document is no policy; a quoted "~" is a string.
        assert!(check("a: 1\n---\n~\n---\n", &one).is_ok());
        assert_eq!(
            refusal("a: 1\n---\n\"~\"\n", &one),
            "f.yaml:3:1: more than 1 policies (--policy-max-policies)"
        );
        assert_eq!(
            refusal("a: 1\n---\nb\n", &one),
            "f.yaml:3:1: more than 1 policies (--policy-max-policies)"
        );
    }

    #[test]
    fn only_the_top_level_spec_holds_routes() {
        let limits = Limits {
            max_routes: 2,
            ..Limits::default()
        };
        assert!(check("metadata: {spec: {routes: [a, b, c]}}\n", &limits).is_ok());
        assert!(check("- spec: {routes: [a, b, c]}\n", &limits).is_ok());
        assert!(check("spec: [{routes: [a, b, c]}]\n", &limits).is_ok());
        assert!(check("spec: {routes: [a, b, c]}\n", &limits).is_err());
    }

    #[test]
    fn policies_built_in_code_are_counted_against_the_same_limits() {
        let text = include_str!("../../examples/policies/log-service.yaml");
        let policy = crate::parse_policies("log-service.yaml", text)
            .unwrap()
            .remove(0);
        let routes = policy.spec.routes.len();
        let two = vec![policy.clone(), policy];
        let limits = Limits {
            max_routes: routes,
            max_policies: 2,
            ..Limits::default()
        };
        assert!(check_counts(&two, &limits).is_empty());

        let over = check_counts(
            &two,
            &Limits {
                max_routes: routes - 1,
                max_policies: 1,
                ..limits
            },
        );
        let shown: Vec<_> = over
            .iter()
            .map(|d| (d.file.as_str(), d.path.as_str(), d.message.as_str()))
            .collect();
        let name = format!(
            "{}/{}",
            two[0].metadata.namespace_or_default(),
            two[0].metadata.name
        );
        let too_many = format!(
            "{routes} routes, more than the {} allowed in one policy (--policy-max-routes)",
            routes - 1
        );
        assert_eq!(
            shown,
            [
                (
                    name.as_str(),
                    "",
                    "2 policies, more than the 1 allowed (--policy-max-policies)"
                ),
                (name.as_str(), "spec.routes", too_many.as_str()),
                (name.as_str(), "spec.routes", too_many.as_str()),
            ]
        );
    }

    #[test]
    fn the_cut_ends_the_error_line_within_the_tail_on_a_character_boundary() {
        assert_eq!(cut_after("ab\ncd\nef", 0), 3);
        assert_eq!(cut_after("ab\ncd\nef", 4), 6);
        assert_eq!(cut_after("ab\ncd", 4), 5);
        // Characters, not bytes: index 2 is the second line's first.
        assert_eq!(cut_after("é\nab\n", 2), 6);
        // A long line is cut UNCHECKED_TAIL bytes on, back to where a 3-byte character starts.
        let long = "€".repeat(UNCHECKED_TAIL);
        assert_eq!(cut_after(&long, 0), UNCHECKED_TAIL / 3 * 3);
    }

    #[test]
    fn an_error_before_or_between_documents_belongs_to_the_next() {
        // A directive is read before its document starts.
        let directives = "%YAML 1.1\n%YAML 1.1\n---\nb: 1\n";
        let before = check(directives, &Limits::default()).unwrap().unwrap();
        assert_eq!(before.doc, 0);
        let after_end = format!("a: 1\n...\n{directives}");
        let between = check(&after_end, &Limits::default()).unwrap().unwrap();
        assert_eq!(between.doc, 1);
        let within = check("a: 1\n---\nb: 1\n]\n", &Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(within.doc, 1);
    }

    /// Walks the first document of `text` as serde_yaml loads it, with `max_nodes`.
    fn walk(text: &str, max_nodes: usize) -> Result<(), serde_yaml::Error> {
        let doc = serde_yaml::Deserializer::from_str(text).next().unwrap();
        walk_unchecked(
            doc,
            &Limits {
                max_nodes,
                ..Limits::default()
            },
        )
    }

    #[test]
    fn the_unchecked_walk_charges_every_node_and_alias() {
        // A mapping of eight pairs: 1 + 8 keys + 7 values of one node + a sequence of 2
        // + a tagged value of 2 (its tag and its value).
        let every_kind = "a: true\nb: -1\nc: 1\nd: 1.5\ne: x\nf: ~\ng: [1]\nh: !t y\n";
        walk(every_kind, 19).unwrap();
        assert!(is_over_budget(&walk(every_kind, 18).unwrap_err()));
        // Each kind of node is charged: one node fewer than the document has fails.
        let each = [
            ("true", 1),
            ("-1", 1),
            ("1", 1),
            ("1.5", 1),
            ("x", 1),
            ("~", 1),
            ("[]", 1),
            ("{}", 1),
            ("!t y", 2),
        ];
        for (node, nodes) in each {
            let text = format!("a: {node}\n");
            assert!(walk(&text, 2 + nodes).is_ok(), "{text}");
            let e = walk(&text, 1 + nodes).unwrap_err();
            assert!(is_over_budget(&e), "{text}: {e}");
        }
        // Aliases are replayed, so a bomb runs the budget out.
        let bomb = "a: &a [1, 1, 1, 1]\nb: [*a, *a, *a, *a]\n";
        let e = walk(bomb, 20).unwrap_err();
        assert!(is_over_budget(&e), "{e}");
        walk(bomb, 30).unwrap();
        // An error of the document's own is not the budget's.
        let e = walk("a: !!int x\n", 10).unwrap_err();
        assert!(!is_over_budget(&e), "{e}");
    }

    #[test]
    fn a_syntax_error_names_its_document() {
        let unchecked = check("a: 1\n---\nb: [\n", &Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(unchecked.doc, 1);
        assert!(unchecked.error.message.starts_with("invalid YAML: "));
    }
}
