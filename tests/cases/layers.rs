//! The crate's layering (see the crate essay in `src/lib.rs`): a module may use
//! modules of its own layer or below, never above, and no two modules may import
//! each other, directly or through others. Read from the source text, so a new
//! `use crate::…` that breaks the layering fails here, naming the file and the path.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layers from the bottom. A folder's modules share its layer.
const LAYERS: &[(&str, u8)] = &[
    ("lsn", 0),
    ("config", 0),
    ("shutdown", 0),
    ("testing", 0),
    ("decode", 1),
    ("source", 2),
    ("changelog", 2),
    ("route", 3),
    ("cluster", 3),
    ("deliver", 4),
    ("server", 5),
    ("daemon", 6),
    ("cli", 7),
];

fn layer(module: &str) -> u8 {
    let top = module.split("::").next().unwrap_or(module);
    LAYERS
        .iter()
        .find(|(name, _)| *name == top)
        .map(|(_, l)| *l)
        .unwrap_or_else(|| panic!("module {module} has no layer: add its folder to LAYERS"))
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "bin") {
                files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/decode/pgoutput/mod.rs` → `decode::pgoutput`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

/// The text without comments and without `#[cfg(test)] mod … { … }` blocks
/// (tests may reach anywhere).
fn code(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let line = match line.find("//") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        out.push_str(line);
        out.push('\n');
    }
    while let Some(start) = out.find("#[cfg(test)]") {
        let after = &out[start + "#[cfg(test)]".len()..];
        let trimmed = after.trim_start();
        if !trimmed.starts_with("mod ") {
            // An attribute on an item other than a module: drop just the attribute.
            out.replace_range(start..start + "#[cfg(test)]".len(), "");
            continue;
        }
        let brace = after.find('{');
        let semi = after.find(';');
        let Some(brace) = brace.filter(|b| semi.is_none_or(|s| *b < s)) else {
            // `#[cfg(test)] mod tests;`: a file of its own, skipped by `graph`.
            let end = start + "#[cfg(test)]".len() + semi.unwrap_or(0) + 1;
            out.replace_range(start..end, "");
            continue;
        };
        let open = start + "#[cfg(test)]".len() + brace;
        let mut depth = 0usize;
        let mut end = open;
        for (i, c) in out[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.replace_range(start..end, "");
    }
    out
}

/// Every path named after `crate::`, groups expanded one level:
/// `crate::{a::B, c}` → `a::B`, `c`.
fn crate_paths(code: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1usize;
            let mut end = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = i;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let mut depth = 0usize;
            let mut item = String::new();
            for c in group[..end].chars().chain(std::iter::once(',')) {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        paths.push(path_prefix(item.trim()));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    item.push(c);
                }
            }
        } else {
            paths.push(path_prefix(rest));
        }
    }
    paths.retain(|p| !p.is_empty());
    paths
}

fn path_prefix(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
        .collect::<String>()
        .trim_end_matches(':')
        .to_string()
}

/// The longest module a path starts with.
fn resolve<'m>(modules: &'m BTreeSet<String>, path: &str) -> Option<&'m String> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len())
        .rev()
        .find_map(|n| modules.get(&parts[..n].join("::")))
}

type Graph = BTreeMap<String, BTreeSet<String>>;

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut list = Vec::new();
    files(&src, &mut list);
    let modules: BTreeSet<String> = list
        .iter()
        .map(|f| module_of(&src, f))
        .filter(|m| m != "lib" && m != "main" && !m.ends_with("::tests"))
        .collect();
    let mut g = Graph::new();
    for f in &list {
        let m = module_of(&src, f);
        if m == "lib" || m == "main" || m.ends_with("::tests") {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        let deps = g.entry(m.clone()).or_default();
        for p in crate_paths(&code(&text)) {
            if let Some(to) = resolve(&modules, &p) {
                // A module naming its own items or its own children is not a dependency.
                if *to != m && !to.starts_with(&format!("{m}::")) {
                    deps.insert(to.clone());
                }
            }
        }
    }
    g
}

/// A cycle through `start`, if there is one.
fn cycle_from(g: &Graph, start: &str) -> Option<Vec<String>> {
    fn walk(
        g: &Graph,
        at: &str,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in g.get(at).into_iter().flatten() {
            if next == start {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(g, next, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    let mut seen = BTreeSet::new();
    walk(g, start, start, &mut path, &mut seen).then_some(path)
}

#[test]
fn no_module_uses_a_higher_layer() {
    let g = graph();
    let upward: Vec<String> = g
        .iter()
        .flat_map(|(from, deps)| {
            deps.iter()
                .filter(|to| layer(to) > layer(from))
                .map(move |to| {
                    format!(
                        "{from} (layer {}) uses {to} (layer {})",
                        layer(from),
                        layer(to)
                    )
                })
        })
        .collect();
    assert!(
        upward.is_empty(),
        "imports against the layering (src/lib.rs):\n{}",
        upward.join("\n")
    );
}

#[test]
fn no_import_cycles() {
    let g = graph();
    let cycles: Vec<String> = g
        .keys()
        .filter_map(|m| cycle_from(&g, m))
        .map(|c| format!("{} → {}", c.join(" → "), c[0]))
        .collect();
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

/// The checker itself sees what it must: an upward `use`, a grouped one, and
/// none in comments or test modules.
#[test]
fn the_checker_reads_paths_groups_and_skips_tests() {
    let text = "use crate::route::hub::Hub;\nuse crate::{decode::event::{Item, Row}, lsn::Lsn};\n// crate::cli::args\nfn f() { crate::server::metrics::x(); }\n#[cfg(test)]\nmod tests { use crate::cli::demo; }\n";
    let paths = crate_paths(&code(text));
    assert_eq!(
        paths,
        [
            "route::hub::Hub",
            "decode::event",
            "lsn::Lsn",
            "server::metrics::x"
        ]
    );
    let g = graph();
    assert!(
        g["route::hub"].contains("decode::event"),
        "{:?}",
        g["route::hub"]
    );
    assert!(cycle_from(&g, "decode::pgoutput").is_none());
    let mut looped = g.clone();
    looped
        .get_mut("lsn")
        .unwrap()
        .insert("decode::pgoutput".to_string());
    assert!(cycle_from(&looped, "lsn").is_some());
}
