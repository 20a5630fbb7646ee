//! The layout docs/ARCHITECTURE.md describes, checked from the sources: each room of
//! `detector-user/src` depends only on the rooms below it, and no module imports one that
//! imports it back, directly or through others.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// The rooms, lowest first: each may use only those before it.
const ROOMS: [&str; 8] = [
    "text", "engine", "probe", "process", "cli", "targets", "report", "run",
];

/// The engine is pure: it must not reach the kernel, the file system or the clock.
const ENGINE_FORBIDDEN: [&str; 5] = ["aya::", "std::fs", "std::io::Read", "tokio", "std::process"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a source file: `targets/python/mod.rs` is `targets::python`.
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src()).expect("under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts
        .last()
        .is_some_and(|p| p == "mod" || p == "lib" || p == "main")
    {
        parts.pop();
    }
    parts
}

/// The code outside `#[cfg(test)]` modules (tests may reach anywhere).
fn non_test(text: &str) -> &str {
    text.find("#[cfg(test)]\nmod tests")
        .map_or(text, |i| &text[..i])
}

/// Expands a `use` tree (`a::{b, c::{d}}`) into its paths.
fn expand(tree: &str, prefix: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let head = tree[..open].trim().trim_end_matches("::");
        // Text that only looks like a `use` (in a comment or string) may not close its braces.
        let Some(close) = tree.rfind('}').filter(|&c| c > open) else {
            return;
        };
        let inner = &tree[open + 1..close];
        let base = join(prefix, head);
        let (mut depth, mut start) = (0, 0);
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&inner[start..i], &base, out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        expand(&inner[start..], &base, out);
    } else if !tree.is_empty() {
        let path = tree.split(" as ").next().unwrap_or(tree).trim();
        out.push(join(prefix, path));
    }
}

fn join(prefix: &str, path: &str) -> String {
    match (prefix.is_empty(), path.is_empty()) {
        (true, _) => path.to_string(),
        (_, true) => prefix.to_string(),
        _ => format!("{prefix}::{path}"),
    }
}

/// Every path a module names: its `use` trees and inline `crate::`/`super::` paths, made
/// absolute (`crate::` dropped).
fn referenced(module: &[String], text: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("use ") {
        let at_line_start = i == 0 || rest[..i].ends_with('\n') || rest[..i].ends_with(' ');
        let Some(end) = rest[i..].find(';') else {
            break;
        };
        if at_line_start {
            expand(&rest[i + 4..i + end], "", &mut paths);
        }
        rest = &rest[i + end..];
    }
    for marker in ["crate::", "super::"] {
        let mut rest = text;
        while let Some(i) = rest.find(marker) {
            let tail = &rest[i..];
            let len = tail
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(tail.len());
            paths.push(tail[..len].trim_end_matches(':').to_string());
            rest = &rest[i + marker.len()..];
        }
    }
    paths
        .into_iter()
        .filter_map(|p| {
            let mut parts: Vec<String> = p.split("::").map(str::to_string).collect();
            match parts.first().map(String::as_str) {
                Some("crate") => Some(parts.split_off(1)),
                Some("super") => {
                    let mut base = module.to_vec();
                    // `super` of a `mod.rs` module is its parent's parent; of a file, its parent.
                    while parts.first().is_some_and(|p| p == "super") {
                        parts.remove(0);
                        base.pop();
                    }
                    base.extend(parts);
                    Some(base)
                }
                _ => None,
            }
        })
        .collect()
}

struct Crate {
    /// Module path -> the modules (files) it uses.
    uses: BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
    text: BTreeMap<Vec<String>, String>,
}

fn load() -> Crate {
    let mut files = Vec::new();
    sources(&src(), &mut files);
    let text: BTreeMap<Vec<String>, String> = files
        .iter()
        .filter(|f| !f.ends_with("main.rs"))
        .map(|f| (module_of(f), fs::read_to_string(f).expect("read source")))
        .collect();
    let modules: BTreeSet<Vec<String>> = text.keys().cloned().collect();
    let mut uses = BTreeMap::new();
    for (module, body) in &text {
        let mut used = BTreeSet::new();
        for path in referenced(module, non_test(body)) {
            // The longest module prefix of the path is the module it reaches.
            if let Some(target) = (1..=path.len())
                .rev()
                .map(|n| path[..n].to_vec())
                .find(|p| modules.contains(p))
                && target != *module
                && !target.starts_with(module)
            {
                used.insert(target);
            }
        }
        uses.insert(module.clone(), used);
    }
    Crate { uses, text }
}

#[test]
fn each_room_uses_only_the_rooms_below_it() {
    let krate = load();
    let rank = |m: &[String]| m.first().and_then(|r| ROOMS.iter().position(|x| x == r));
    let mut wrong = Vec::new();
    for (module, used) in &krate.uses {
        let Some(from) = rank(module) else {
            continue;
        };
        for target in used {
            if let Some(to) = rank(target)
                && to > from
            {
                wrong.push(format!("{} uses {}", module.join("::"), target.join("::")));
            }
        }
    }
    assert!(wrong.is_empty(), "upward dependencies: {wrong:#?}");
    let rooms: BTreeSet<&str> = krate
        .uses
        .keys()
        .filter_map(|m| m.first().map(String::as_str))
        .collect();
    for room in rooms {
        assert!(
            ROOMS.contains(&room),
            "module room {room} is not in the layout: add it to ROOMS and docs/ARCHITECTURE.md"
        );
    }
}

#[test]
fn no_module_imports_itself_back() {
    let krate = load();
    // Depth-first search for a back edge, reporting the cycle found.
    fn visit(
        m: &Vec<String>,
        uses: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        stack: &mut Vec<Vec<String>>,
        done: &mut BTreeSet<Vec<String>>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == m) {
            return Some(stack[i..].iter().map(|s| s.join("::")).collect());
        }
        if !done.insert(m.clone()) {
            return None;
        }
        stack.push(m.clone());
        for next in uses.get(m).into_iter().flatten() {
            if let Some(cycle) = visit(next, uses, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    for m in krate.uses.keys() {
        let mut stack = Vec::new();
        if let Some(cycle) = visit(m, &krate.uses, &mut stack, &mut done) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_engine_touches_no_kernel_file_or_clock() {
    let krate = load();
    for (module, body) in &krate.text {
        if module.first().is_some_and(|r| r == "engine") {
            let code = non_test(body);
            for forbidden in ENGINE_FORBIDDEN
                .iter()
                .chain(&["Instant::now", "SystemTime"])
            {
                assert!(
                    !code.contains(forbidden),
                    "{} uses {forbidden}: the engine stays pure",
                    module.join("::")
                );
            }
        }
    }
}

#[test]
fn use_trees_expand() {
    let mut out = Vec::new();
    expand("crate::{a::{b, c as d}, e}", "", &mut out);
    assert_eq!(out, ["crate::a::b", "crate::a::c", "crate::e"]);
    let m = vec![
        "targets".to_string(),
        "python".to_string(),
        "gil".to_string(),
    ];
    assert_eq!(
        referenced(&m, "use super::dwarf::{R, with_dwarf};"),
        [
            vec!["targets", "python", "dwarf", "R"],
            vec!["targets", "python", "dwarf", "with_dwarf"],
            vec!["targets", "python", "dwarf"],
        ]
    );
}
