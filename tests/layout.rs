//! The layout docs/architecture.md describes, held by tests: the crate's
//! modules use each other without circles, and SQL is written in the store
//! and the migrations only.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// Every `.rs` file under `src/`, with its module path (`pool::dispatch`).
fn modules() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(Path::new(SRC), &mut files);
    files
        .into_iter()
        .filter_map(|path| {
            let rel = path.strip_prefix(SRC).unwrap().with_extension("");
            let name = rel
                .to_string_lossy()
                .trim_end_matches("/mod")
                .replace('/', "::");
            (name != "lib" && name != "main")
                .then(|| (name, std::fs::read_to_string(&path).unwrap()))
        })
        .collect()
}

/// The names the crate root re-exports, and the module each comes from.
fn reexports() -> BTreeMap<String, String> {
    let lib = std::fs::read_to_string(format!("{SRC}/lib.rs")).unwrap();
    let mut map = BTreeMap::new();
    for line in lib.lines().filter(|l| l.starts_with("pub use ")) {
        let body = line.trim_start_matches("pub use ").trim_end_matches(';');
        let Some((module, names)) = body.split_once("::") else {
            continue;
        };
        let names = names.trim_start_matches('{').trim_end_matches('}');
        for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            map.insert(name.to_string(), module.to_string());
        }
    }
    map
}

/// The top-level modules each top-level module uses (`crate::x`, and
/// `crate::Name` through the root's re-exports).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules();
    let tops: BTreeSet<String> = modules
        .iter()
        .map(|(m, _)| m.split("::").next().unwrap().to_string())
        .collect();
    let reexports = reexports();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, source) in &modules {
        let from = module.split("::").next().unwrap().to_string();
        let code: String = source
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let mut used = BTreeSet::new();
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + "crate::".len()..];
            let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                group[..end].split(',').collect()
            } else {
                vec![rest]
            };
            for name in names {
                let first: String = name
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                let target = reexports.get(&first).cloned().unwrap_or(first);
                let top = target.split("::").next().unwrap_or_default().to_string();
                if tops.contains(&top) && top != from {
                    used.insert(top);
                }
            }
        }
        graph.entry(from).or_default().extend(used);
    }
    graph
}

/// A circle through `start`, if the graph has one.
fn circle_from(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_string(), vec![start.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((node, path)) = stack.pop() {
        for next in graph.get(&node).into_iter().flatten() {
            if next == start {
                let mut circle = path.clone();
                circle.push(start.to_string());
                return Some(circle);
            }
            if seen.insert(next.clone()) {
                let mut path = path.clone();
                path.push(next.clone());
                stack.push((next.clone(), path));
            }
        }
    }
    None
}

#[test]
fn the_modules_use_each_other_without_circles() {
    let graph = graph();
    assert!(graph.len() > 15, "the graph was read: {graph:?}");
    assert!(
        graph["pool"].contains("manager"),
        "the pool claims through the TaskQueueManager"
    );
    for module in graph.keys() {
        if let Some(circle) = circle_from(&graph, module) {
            panic!("an import circle: {}", circle.join(" -> "));
        }
    }
}

#[test]
fn sql_is_written_in_the_store_and_the_migrations_only() {
    // The bench's raw-SQL baselines are SQL on purpose: they measure what
    // the same work costs without syncq.
    let allowed = ["store", "cli::bench"];
    for (module, source) in modules() {
        if allowed
            .iter()
            .any(|a| module == *a || module.starts_with(&format!("{a}::")))
        {
            continue;
        }
        for marker in [
            "sqlx::query",
            "query!(",
            "query_as!(",
            "query_scalar!(",
            "raw_sql(",
        ] {
            assert!(
                !source.contains(marker),
                "{module} runs SQL ({marker}): statements belong in src/store/"
            );
        }
    }
}
