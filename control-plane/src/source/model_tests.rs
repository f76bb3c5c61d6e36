//! The policy directory against a model of what a platform engineer edits: random
//! sequences of writes (policies, broken YAML, emptied files) and removals, one or
//! several files per re-read, and restarts, over three files whose policies claim
//! overlapping names, hosts and aliases, on a real directory. After every step the set is checked against what the directory promises:
//! a set is always published, a file's policies in force stay in force while the file
//! is there, a file not in force at its current content says why, re-reading changes
//! nothing, a restart serves the same set, and once the files agree every file is
//! served at its current content.

use std::collections::{BTreeMap, HashSet};

use proptest::prelude::*;

use super::*;

const FILES: [&str; 3] = ["a.yaml", "b.yaml", "c.yaml"];

/// One policy: its namespace, name and host drawn from small pools, so that files clash.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Pol {
    /// 2 is no namespace at all (`default`).
    ns: u8,
    name: u8,
    host: u8,
    alias: Option<u8>,
    burst: u8,
}

impl Pol {
    fn namespace(&self) -> String {
        match self.ns {
            2 => "default".into(),
            n => format!("ns{n}"),
        }
    }

    fn yaml(&self) -> String {
        let namespace = match self.ns {
            2 => String::new(),
            _ => format!(", namespace: {}", self.namespace()),
        };
        let aliases = match self.alias {
            Some(a) => format!("  aliases: [h{a}]\n"),
            None => String::new(),
        };
        format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: p{}{namespace} }}\nspec:\n  host: h{}\n{aliases}  inbound: {{ rateLimit: {{ perSecond: 100, burst: {} }} }}\n",
            self.name,
            self.host,
            u32::from(self.burst) + 1
        )
    }

    /// Whether the policy validates on its own: an alias is not its own host.
    fn valid(&self) -> bool {
        self.alias != Some(self.host)
    }

    fn claims(&self) -> Vec<String> {
        let mut claims = vec![
            format!("name {}/p{}", self.namespace(), self.name),
            format!("host h{}", self.host),
        ];
        claims.extend(self.alias.map(|a| format!("host h{a}")));
        claims
    }
}

/// What a write leaves in a file.
#[derive(Clone, Debug)]
enum Content {
    Broken,
    Empty,
    Policies(Vec<Pol>),
}

impl Content {
    fn text(&self) -> String {
        match self {
            Content::Broken => "apiVersion: [\n".into(),
            Content::Empty => String::new(),
            Content::Policies(ps) => ps.iter().map(Pol::yaml).collect::<Vec<_>>().join("---\n"),
        }
    }

    /// The policies, when the file validates on its own (no claim twice within it).
    fn valid(&self) -> Option<&[Pol]> {
        let Content::Policies(ps) = self else {
            return None;
        };
        let mut seen = HashSet::new();
        (ps.iter().all(Pol::valid) && ps.iter().flat_map(Pol::claims).all(|c| seen.insert(c)))
            .then_some(ps.as_slice())
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// Files written (or removed, `None`) between two re-reads: one save, or several
    /// within the debounce.
    Edit(Vec<(usize, Option<Content>)>),
    Restart,
}

fn pol() -> impl Strategy<Value = Pol> {
    (
        0u8..3,
        0u8..3,
        0u8..4,
        prop::option::weighted(0.2, 0u8..4),
        0u8..3,
    )
        .prop_map(|(ns, name, host, alias, burst)| Pol {
            ns,
            name,
            host,
            alias,
            burst,
        })
}

fn content() -> impl Strategy<Value = Content> {
    prop_oneof![
        1 => Just(Content::Broken),
        1 => Just(Content::Empty),
        6 => prop::collection::vec(pol(), 1..=2).prop_map(Content::Policies),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let change = (0..FILES.len(), prop::option::weighted(0.85, content()));
    prop_oneof![
        8 => prop::collection::vec(change, 1..=3).prop_map(Op::Edit),
        1 => Just(Op::Restart),
    ]
}

/// Each file's version in force (its content hash), for files with one.
fn served(pd: &PolicyDir) -> BTreeMap<String, String> {
    pd.files
        .iter()
        .filter_map(|(f, s)| Some((f.clone(), s.served.as_ref()?.version.clone())))
        .collect()
}

/// Re-reads and builds, as the control plane's reload does; a set is always published.
fn reload(pd: &mut PolicyDir, step: usize) -> String {
    pd.rescan();
    let (set, _) = pd
        .build_set()
        .unwrap_or_else(|| panic!("step {step}: no set published"));
    set.hash().to_string()
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = tempfile::tempdir().expect("tempdir");
    let open = || PolicyDir::open(dir.path(), Some(state.path()), Limits::default()).expect("open");
    let mut pd = open();
    let mut on_disk: BTreeMap<usize, Content> = BTreeMap::new();
    reload(&mut pd, 0);
    for (step, op) in ops.into_iter().enumerate() {
        let before = served(&pd);
        let mut touched = HashSet::new();
        match &op {
            Op::Edit(changes) => {
                for (f, c) in changes {
                    let path = dir.path().join(FILES[*f]);
                    match c {
                        Some(c) => {
                            std::fs::write(path, c.text()).expect("write");
                            on_disk.insert(*f, c.clone());
                        }
                        None => {
                            let _ = std::fs::remove_file(path);
                            on_disk.remove(f);
                        }
                    }
                    touched.insert(FILES[*f]);
                }
            }
            Op::Restart => {
                let hash = reload(&mut pd, step);
                pd = open();
                let again = reload(&mut pd, step);
                assert_eq!(again, hash, "step {step}: a restart serves another set");
            }
        }
        let hash = reload(&mut pd, step);
        let after = served(&pd);

        // What another file had in force stays in force (at some version) while that
        // file is there: an edit elsewhere never takes it off the proxies.
        for file in before.keys() {
            if !touched.contains(file.as_str()) {
                assert!(
                    after.contains_key(file),
                    "step {step} ({op:?}): {file} was taken out of force\nbefore {before:?}\nafter {after:?}"
                );
            }
        }

        // A file not in force at its current content says why: nothing is left
        // unapplied without a reason shown in `/policies`.
        let views = pd.file_views();
        for (f, c) in &on_disk {
            let current = short_hash(c.text().as_bytes());
            if after.get(FILES[*f]) != Some(&current) {
                let view = views.iter().find(|v| v.file == FILES[*f]);
                assert!(
                    view.is_some_and(|v| v.error.is_some()),
                    "step {step}: {} is not in force at its content and says nothing
{view:?}",
                    FILES[*f]
                );
            }
        }

        // Re-reading an unchanged directory changes nothing.
        assert_eq!(
            reload(&mut pd, step),
            hash,
            "step {step}: a re-read moved the set"
        );
        assert_eq!(served(&pd), after, "step {step}: a re-read moved a version");

        // Once every file validates and no two claim the same name or host, each is
        // served at its current content: nothing stays stuck on an older version.
        let valid: Option<Vec<&[Pol]>> = on_disk.values().map(Content::valid).collect();
        if let Some(valid) = valid {
            let mut claims = HashSet::new();
            let agree = valid
                .iter()
                .flat_map(|ps| ps.iter().flat_map(Pol::claims))
                .all(|c| claims.insert(c));
            if agree {
                for (f, c) in &on_disk {
                    let want = short_hash(c.text().as_bytes());
                    assert_eq!(
                        after.get(FILES[*f]),
                        Some(&want),
                        "step {step}: {} agrees with every file but is not served at its content\n{after:?}",
                        FILES[*f]
                    );
                }
                assert_eq!(after.len(), on_disk.len(), "step {step}: {after:?}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn the_directory_keeps_its_promises_over_any_sequence_of_edits(
        ops in prop::collection::vec(op(), 1..14)
    ) {
        run(ops);
    }
}
