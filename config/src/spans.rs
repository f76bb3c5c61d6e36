//! Positions of YAML nodes by field path.
//!
//! serde_yaml reports positions only for syntax errors, so a second, span-aware
//! pass with yaml-rust2's event parser records where each node of each document
//! starts, keyed by the same path syntax the diagnostics use
//! (`spec.routes[0].retry.attempts`). Semantic checks then point at the node
//! that is wrong, not at the document.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A 1-based line and column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Pos {
    pub(crate) line: usize,
    pub(crate) column: usize,
}

impl Pos {
    pub(crate) const START: Pos = Pos { line: 1, column: 1 };

    fn from_marker(m: Marker) -> Self {
        Pos {
            line: m.line(),
            column: m.col() + COLUMN_BASE,
        }
    }
}

/// yaml-rust2 counts columns from zero.
const COLUMN_BASE: usize = 1;

/// Where one node sits: its value and, for a mapping entry, its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) value: Pos,
    pub(crate) key: Option<Pos>,
    /// A mapping or a sequence: errors about it point at its key, where it is named.
    collection: bool,
}

/// The positions of every node of one document, and duplicate keys found in it.
#[derive(Clone, Debug, Default)]
pub(crate) struct DocSpans {
    /// Where the document's root node starts.
    pub(crate) start: Option<Pos>,
    nodes: HashMap<String, Span>,
    /// `(path of the repeated entry, its key position, the first occurrence)`.
    pub(crate) duplicate_keys: Vec<(String, Pos, Pos)>,
}

impl DocSpans {
    /// The position for `path`: its key when asked for and known, else its value;
    /// a path with no node of its own (a defaulted field) falls back to its parent.
    pub(crate) fn locate(&self, path: &str, at_key: bool) -> Pos {
        let mut p = path;
        loop {
            if let Some(span) = self.nodes.get(p) {
                return match span.key {
                    Some(k) if at_key || span.collection => k,
                    _ => span.value,
                };
            }
            match parent(p) {
                Some(up) => p = up,
                None => return self.start.unwrap_or(Pos::START),
            }
        }
    }
}

/// The path one level up: `a.b[0].c` → `a.b[0]` → `a.b` → `a` → ``.
fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

/// Appends a mapping key to a path.
pub(crate) fn child_key(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Appends a sequence index to a path.
pub(crate) fn child_index(path: &str, index: usize) -> String {
    format!("{path}[{index}]")
}

enum Frame {
    Map {
        path: String,
        /// The key just read, waiting for its value.
        pending_key: Option<(String, Pos)>,
        /// Keys seen so far, for duplicate detection.
        seen: HashMap<String, Pos>,
        /// Nesting depth inside a complex (non-scalar) key, whose contents are skipped.
        complex_key_depth: usize,
    },
    Seq {
        path: String,
        next: usize,
    },
}

#[derive(Default)]
struct Collector {
    docs: Vec<DocSpans>,
    stack: Vec<Frame>,
}

impl Collector {
    fn doc(&mut self) -> &mut DocSpans {
        if self.docs.is_empty() {
            self.docs.push(DocSpans::default());
        }
        self.docs.last_mut().expect("pushed above")
    }

    /// The path and key position for a node starting now, or `None` when the node
    /// is a mapping key (scalar keys are handled by the caller).
    fn place_node(&mut self) -> Option<(String, Option<Pos>)> {
        match self.stack.last_mut() {
            None => Some((String::new(), None)),
            Some(Frame::Seq { path, next }) => {
                let p = child_index(path, *next);
                *next += 1;
                Some((p, None))
            }
            Some(Frame::Map {
                path, pending_key, ..
            }) => pending_key
                .take()
                .map(|(k, kpos)| (child_key(path, &k), Some(kpos))),
        }
    }

    fn in_complex_key(&mut self) -> bool {
        matches!(self.stack.last(), Some(Frame::Map { complex_key_depth, .. }) if *complex_key_depth > 0)
    }

    fn record(&mut self, path: String, value: Pos, key: Option<Pos>, collection: bool) {
        self.pull_parent_start(key.unwrap_or(value));
        let doc = self.doc();
        if path.is_empty() {
            doc.start = Some(value);
        }
        doc.nodes.entry(path).or_insert(Span {
            value,
            key,
            collection,
        });
    }

    /// yaml-rust2 marks a block collection where its first entry has been scanned,
    /// past its start; the first child's position is the true start.
    fn pull_parent_start(&mut self, child: Pos) {
        let parent = match self.stack.last() {
            Some(Frame::Map { path, .. } | Frame::Seq { path, .. }) => path.clone(),
            None => return,
        };
        let doc = self.doc();
        if let Some(span) = doc.nodes.get_mut(&parent)
            && child < span.value
        {
            span.value = child;
            if parent.is_empty() {
                doc.start = Some(child);
            }
        }
    }

    fn start_collection(&mut self, pos: Pos, make: impl FnOnce(String) -> Frame) {
        if let Some(Frame::Map {
            complex_key_depth, ..
        }) = self.stack.last_mut()
            && *complex_key_depth > 0
        {
            *complex_key_depth += 1;
            return;
        }
        match self.place_node() {
            Some((path, key)) => {
                self.record(path.clone(), pos, key, true);
                self.stack.push(make(path));
            }
            None => {
                // A mapping or sequence used as a key: nothing in the schema takes
                // one, so it is skipped here and refused by deserialisation.
                if let Some(Frame::Map {
                    complex_key_depth, ..
                }) = self.stack.last_mut()
                {
                    *complex_key_depth = 1;
                }
            }
        }
    }

    fn end_collection(&mut self) {
        if let Some(Frame::Map {
            complex_key_depth,
            pending_key,
            ..
        }) = self.stack.last_mut()
            && *complex_key_depth > 0
        {
            *complex_key_depth -= 1;
            if *complex_key_depth == 0 {
                // The value that follows belongs to a key we cannot name.
                *pending_key = Some(("?".to_string(), Pos::START));
            }
            return;
        }
        self.stack.pop();
    }

    fn scalar_or_alias(&mut self, text: Option<String>, pos: Pos) {
        if self.in_complex_key() {
            return;
        }
        match self.place_node() {
            Some((path, key)) => self.record(path, pos, key, false),
            None => {
                let Some(Frame::Map {
                    path,
                    pending_key,
                    seen,
                    ..
                }) = self.stack.last_mut()
                else {
                    return;
                };
                let key = text.unwrap_or_else(|| "*".to_string());
                let dup = match seen.get(&key) {
                    Some(first) => Some((child_key(path, &key), pos, *first)),
                    None => {
                        seen.insert(key.clone(), pos);
                        None
                    }
                };
                *pending_key = Some((key, pos));
                self.pull_parent_start(pos);
                if let Some(dup) = dup {
                    self.doc().duplicate_keys.push(dup);
                }
            }
        }
    }
}

impl MarkedEventReceiver for Collector {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = Pos::from_marker(mark);
        match ev {
            Event::DocumentStart => {
                self.docs.push(DocSpans::default());
                self.stack.clear();
            }
            Event::MappingStart(..) => self.start_collection(pos, |path| Frame::Map {
                path,
                pending_key: None,
                seen: HashMap::new(),
                complex_key_depth: 0,
            }),
            Event::SequenceStart(..) => {
                self.start_collection(pos, |path| Frame::Seq { path, next: 0 })
            }
            Event::MappingEnd | Event::SequenceEnd => self.end_collection(),
            Event::Scalar(text, ..) => self.scalar_or_alias(Some(text), pos),
            Event::Alias(_) => self.scalar_or_alias(None, pos),
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
}

/// Nesting beyond which positions are not recorded: deeper nodes are located at
/// their nearest recorded ancestor. Policies nest about ten levels; this only bounds
/// text that was never checked against the limits (each level's path is a string
/// as long as the path above it).
const MAX_DEPTH: usize = crate::limits::MAX_DEPTH_CEILING;

/// Bytes of field paths recorded for one text, past which recording stops: a long
/// key above many nodes would otherwise be copied into every path beneath it.
const MAX_PATH_BYTES: usize = 16 * 1024 * 1024;

/// Positions for every document of `text`, in document order. Parsing stops at a
/// syntax error; documents before it keep their positions.
///
/// The events are pulled one at a time (yaml-rust2's `load` recurses once per level
/// of nesting), so no input can exhaust the stack here.
pub(crate) fn collect(text: &str) -> Vec<DocSpans> {
    let mut collector = Collector::default();
    let mut parser = Parser::new_from_str(text);
    let mut path_bytes = 0usize;
    // A syntax error is reported by serde_yaml, which decides what the values are;
    // here it only means the positions after it are unknown.
    while let Ok((event, mark)) = parser.next_token() {
        match event {
            Event::StreamEnd => break,
            Event::MappingStart(..) | Event::SequenceStart(..)
                if collector.stack.len() >= MAX_DEPTH =>
            {
                break;
            }
            _ => {}
        }
        collector.on_event(event, mark);
        if let Some(Frame::Map { path, .. } | Frame::Seq { path, .. }) = collector.stack.last() {
            path_bytes = path_bytes.saturating_add(path.len());
        }
        if path_bytes > MAX_PATH_BYTES {
            break;
        }
    }
    collector.docs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_follow_paths() {
        let text = "a: 1\nb:\n  - x: { y: 2 }\n  - z\n---\nc:   3\nc: 4\n";
        let docs = collect(text);
        assert_eq!(docs.len(), 2);
        let p = |d: &DocSpans, path, key| {
            let pos = d.locate(path, key);
            (pos.line, pos.column)
        };
        assert_eq!(p(&docs[0], "a", false), (1, 4));
        assert_eq!(p(&docs[0], "a", true), (1, 1));
        assert_eq!(p(&docs[0], "b[0].x.y", false), (3, 13));
        assert_eq!(p(&docs[0], "b[0].x.y", true), (3, 10));
        assert_eq!(p(&docs[0], "b[1]", false), (4, 5));
        // an unknown child falls back to the nearest known ancestor, and a
        // collection is located by its key
        assert_eq!(p(&docs[0], "b[0].x.nope", false), (3, 5));
        // a block mapping in a sequence starts at its first key
        assert_eq!(p(&docs[0], "b[0]", false), (3, 5));
        assert_eq!(p(&docs[0], "", false), (1, 1));
        assert_eq!(p(&docs[1], "c", false), (6, 6));
        assert_eq!(docs[1].duplicate_keys.len(), 1);
        let (path, at, first) = &docs[1].duplicate_keys[0];
        assert_eq!(path, "c");
        assert_eq!((at.line, at.column, first.line), (7, 1, 6));
    }

    #[test]
    fn a_complex_key_is_skipped_and_what_follows_is_placed() {
        // A collection used as a key, with collections nested in it: nothing inside it
        // is a node or a key of the mapping holding it; its value is placed under "?".
        let text =
            "? [a, {b: [1, {c: 2}]}, [d]]\n: v\na: 1\nnext: { e: 3 }\n---\n? [x]\n: w\nz: 1\n";
        let docs = collect(text);
        assert_eq!(docs.len(), 2);
        let d = &docs[0];
        let p = |path, key| {
            let pos = d.locate(path, key);
            (pos.line, pos.column)
        };
        assert_eq!(p("?", false), (2, 3));
        assert_eq!(p("a", true), (3, 1));
        assert_eq!(p("next", true), (4, 1));
        assert_eq!(p("next.e", false), (4, 12));
        let mut paths: Vec<&str> = d.nodes.keys().map(String::as_str).collect();
        paths.sort_unstable();
        assert_eq!(paths, ["", "?", "a", "next", "next.e"]);
        // The key's own scalars are not keys: `a` is not a duplicate.
        assert!(d.duplicate_keys.is_empty(), "{:?}", d.duplicate_keys);
        // A flat key too: its value is not read as the next key.
        let mut paths: Vec<&str> = docs[1].nodes.keys().map(String::as_str).collect();
        paths.sort_unstable();
        assert_eq!(paths, ["", "?", "z"]);
        assert_eq!(docs[1].locate("z", false).line, 8);
    }

    #[test]
    fn deep_nesting_neither_recurses_nor_grows_paths_without_bound() {
        // 100,000 levels: yaml-rust2's `load` overflows the stack on either.
        for text in ["- ".repeat(100_000) + "x\n", "[".repeat(100_000)] {
            let docs = collect(&text);
            let nodes: usize = docs.iter().map(|d| d.nodes.len()).sum();
            assert!(nodes <= MAX_DEPTH + 1, "{nodes}");
        }
    }

    #[test]
    fn a_long_key_over_many_nodes_stops_recording() {
        // Not a divisor of the bound, so the count passes it without landing on it.
        let key = "k".repeat(64 * 1024 + 7);
        // An explicit key: YAML caps an implicit one at 1,024 characters.
        let text = format!("? {key}\n: [{}]\n", vec!["1"; 1000].join(","));
        let docs = collect(&text);
        let recorded: usize = docs[0].nodes.keys().map(String::len).sum();
        assert!(recorded <= MAX_PATH_BYTES + 2 * key.len(), "{recorded}");
        // It recorded up to the bound, then stopped short of the list's end.
        assert!(recorded >= MAX_PATH_BYTES - 2 * key.len(), "{recorded}");
        assert!(docs[0].nodes.len() < 1000, "{}", docs[0].nodes.len());
    }
}
