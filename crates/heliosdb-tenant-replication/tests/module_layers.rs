//! Dependencies between the library's top-level modules (`src/<module>`)
//! must go one way along the data flow. Today some pairs still import each
//! other; they are listed below and may only go away (#19 removes them). A
//! pair that newly imports each other fails this test, as does a listed pair
//! that no longer does (take it off the list).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Pairs of top-level modules that import each other, left to untangle.
const KNOWN_MUTUAL: &[(&str, &str)] = &[
    ("apply", "batch"),
    ("apply", "capture"),
    ("apply", "checkpoint"),
    ("apply", "config"),
    ("config", "seal"),
    ("config", "transport"),
    ("provision", "snapshot"),
    ("seal", "transport"),
];

/// Top-level module → the top-level modules its files name as `crate::…`.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut modules = BTreeSet::new();
    for entry in std::fs::read_dir(src).expect("src") {
        let path = entry.expect("entry").path();
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("")
            .to_string();
        if path.is_dir() || path.extension().is_some_and(|e| e == "rs") {
            modules.insert(name);
        }
    }
    modules.remove("lib");
    modules.remove("main");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).expect("under src");
            let first = rel.components().next().expect("a component");
            let owner = Path::new(first.as_os_str())
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("")
                .to_string();
            if !modules.contains(&owner) {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read");
            for (at, _) in text.match_indices("crate::") {
                let name: String = text[at + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if name != owner && modules.contains(&name) {
                    graph.entry(owner.clone()).or_default().insert(name);
                }
            }
        }
    }
    graph
}

#[test]
fn no_two_top_level_modules_newly_import_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&src);
    let mut mutual = BTreeSet::new();
    for (a, deps) in &graph {
        for b in deps {
            if graph.get(b).is_some_and(|d| d.contains(a)) {
                mutual.insert(if a < b {
                    (a.clone(), b.clone())
                } else {
                    (b.clone(), a.clone())
                });
            }
        }
    }
    let known: BTreeSet<(String, String)> = KNOWN_MUTUAL
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let new: Vec<_> = mutual.difference(&known).collect();
    assert!(
        new.is_empty(),
        "modules that now import each other (dependencies must go one way along the data flow; see docs/architecture.md): {new:?}"
    );
    let gone: Vec<_> = known.difference(&mutual).collect();
    assert!(
        gone.is_empty(),
        "these pairs no longer import each other: take them off KNOWN_MUTUAL: {gone:?}"
    );
    // The scan sees the graph at all.
    assert!(graph.get("pipeline").is_some_and(|d| d.contains("apply")));
}
