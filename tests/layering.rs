//! The layers of `src/` as the folders promise them, checked on the source text:
//!
//! ```text
//!   abi  ->  runtime  ->  transport  ->  cuda  ->  log, host_profile, sys
//!    \__________\______________\___________\_____>  ep_core (crates/core: no FFI, no CUDA)
//! ```
//!
//! * every `crate::X` reference goes from a layer to a lower one (never up, never sideways
//!   between the leaves `log`, `host_profile` and `sys`), so the layers have no import circle;
//! * the modules (files) of the crate have no import circle either, inside a layer included
//!   (unit-test modules, `#[cfg(test)] mod …`, are not part of the structure and are skipped);
//! * the core crate names neither this crate nor any FFI or CUDA item;
//! * the library does not depend on the CPU reference (crates/reference), only its tests do.
//!
//! `cargo test --test layering -- --nocapture` prints the file-level graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`, as (module path, source), e.g. ("cuda::context", "...").
fn modules(dir: &Path) -> BTreeMap<String, String> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).expect("read src").flatten().collect();
        entries.sort_by_key(|e| e.path());
        for e in entries {
            let p = e.path();
            let name = p.file_stem().unwrap().to_string_lossy().to_string();
            if p.is_dir() {
                let mut pre = prefix.to_vec();
                pre.push(name);
                walk(&p, &pre, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let mut path = prefix.to_vec();
                if name != "mod" && name != "lib" {
                    path.push(name);
                }
                let src = std::fs::read_to_string(&p).expect("read file");
                out.insert(path.join("::"), src);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, &[], &mut out);
    out
}

/// Source without comments (line and block) and string literals, so paths in docs or messages
/// are not imports.
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b[i] == b'"' && (i == 0 || b[i - 1] != b'\'') {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Reads one use-tree at `i` below `base`: `a::b::c`, `a::{b, c::{d, e}}` or `{a, b}`, and
/// pushes every leaf path (a rename `as x` and `self`/`*` leaves name their parent).
fn parse_tree(chars: &[char], i: &mut usize, base: Vec<String>, out: &mut Vec<Vec<String>>) {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut path = base;
    loop {
        let start = *i;
        while *i < chars.len() && ident(chars[*i]) {
            *i += 1;
        }
        if *i > start {
            let seg: String = chars[start..*i].iter().collect();
            if seg != "self" {
                path.push(seg);
            }
        }
        if chars[*i..].starts_with(&[':', ':']) {
            *i += 2;
            if chars.get(*i) == Some(&'{') {
                *i += 1;
                loop {
                    while *i < chars.len() && (chars[*i].is_whitespace() || chars[*i] == ',') {
                        *i += 1;
                    }
                    if *i >= chars.len() || chars[*i] == '}' {
                        *i += 1;
                        return;
                    }
                    let before = *i;
                    parse_tree(chars, i, path.clone(), out);
                    // Skip `as x` up to the next separator.
                    while *i < chars.len() && chars[*i] != ',' && chars[*i] != '}' {
                        *i += 1;
                    }
                    if *i == before {
                        *i += 1;
                    }
                }
            }
            if chars.get(*i) == Some(&'*') {
                *i += 1;
                break;
            }
            continue;
        }
        break;
    }
    out.push(path);
}

/// `code` without its `#[cfg(test)] mod … { … }` blocks: unit tests may reach any module of the
/// crate; they are not part of the library's structure.
fn without_test_modules(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "#[cfg(test)]".len()..];
        let trimmed = after.trim_start();
        if !trimmed.starts_with("mod ") {
            out.push_str("#[cfg(test)]");
            rest = after;
            continue;
        }
        let Some(open) = after.find('{') else { break };
        let mut depth = 0;
        let mut end = after.len();
        for (i, c) in after[open..].char_indices() {
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
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// The paths a file names: `crate::a::b`, `super::a`, and `crate::{a, b::c}` groups, as
/// absolute module paths (segments).
fn references(module: &str, is_mod_rs: bool, code: &str) -> Vec<Vec<String>> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = Vec::new();
    let here: Vec<String> = if module.is_empty() {
        vec![]
    } else {
        module.split("::").map(String::from).collect()
    };
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let starts = |kw: &str| {
            let k: Vec<char> = kw.chars().collect();
            chars[i..].starts_with(&k) && (i == 0 || !ident(chars[i - 1]))
        };
        let (base, skip) = if starts("crate::") {
            (vec![], 7)
        } else if starts("super::") {
            // `super` of a mod.rs is the parent of its folder; of a file, its folder.
            let up = if is_mod_rs { 2 } else { 1 };
            (here[..here.len().saturating_sub(up)].to_vec(), 7)
        } else {
            i += 1;
            continue;
        };
        i += skip;
        if chars.get(i) == Some(&'{') {
            // `crate::{a, b}`: a group right after the root.
            i -= 2;
        }
        parse_tree(&chars, &mut i, base, &mut out);
    }
    out
}

/// The longest module path that is a prefix of `path` (items resolve to the file defining them;
/// an item a `mod.rs` re-exports with `pub use child::{..}` resolves to that child).
fn resolve(mods: &BTreeMap<String, String>, reexports: &BTreeMap<(String, String), String>, path: &[String]) -> String {
    let mut best = String::new();
    for n in 1..=path.len() {
        let cand = path[..n].join("::");
        if mods.contains_key(&cand) {
            best = cand;
        } else {
            break;
        }
    }
    let depth = if best.is_empty() { 0 } else { best.split("::").count() };
    if let Some(item) = path.get(depth)
        && let Some(child) = reexports.get(&(best.clone(), item.clone()))
    {
        return child.clone();
    }
    best
}

/// `pub use child::{A, B}` / `pub use child::A` in a module file: (module, A) -> module::child.
fn reexports(mods: &BTreeMap<String, String>) -> BTreeMap<(String, String), String> {
    let mut out = BTreeMap::new();
    for (m, src) in mods {
        let code = code_only(src);
        for stmt in code.split(';') {
            let s = stmt.trim();
            let Some(rest) = s.strip_prefix("pub use ") else {
                continue;
            };
            let Some((child, items)) = rest.split_once("::") else {
                continue;
            };
            let child_mod = if m.is_empty() {
                child.to_string()
            } else {
                format!("{m}::{child}")
            };
            if !mods.contains_key(&child_mod) {
                continue;
            }
            let items = items.trim().trim_start_matches('{').trim_end_matches('}');
            for it in items.split(',') {
                let name = it.split_whitespace().last().unwrap_or("").to_string();
                if !name.is_empty() {
                    out.insert((m.clone(), name), child_mod.clone());
                }
            }
        }
    }
    out
}

fn layer_rank(layer: &str) -> Option<u32> {
    Some(match layer {
        "abi" => 5,
        "runtime" => 4,
        "transport" => 3,
        "cuda" => 2,
        "log" | "host_profile" | "sys" => 1,
        _ => return None,
    })
}

struct Graph {
    edges: BTreeMap<String, BTreeSet<String>>,
}

fn crate_graph() -> Graph {
    let src = root().join("src");
    let mods = modules(&src);
    let rex = reexports(&mods);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, text) in &mods {
        let is_mod_rs = src.join(m.replace("::", "/")).join("mod.rs").exists();
        let code = without_test_modules(&code_only(text));
        let e = edges.entry(m.clone()).or_default();
        for r in references(m, is_mod_rs, &code) {
            let to = resolve(&mods, &rex, &r);
            // A file's own items, its ancestors' facades (mod.rs / lib.rs only declare and
            // re-export), and its own test module are not imports.
            if to.is_empty() || &to == m || m.starts_with(&format!("{to}::")) {
                continue;
            }
            e.insert(to);
        }
    }
    Graph { edges }
}

fn top(m: &str) -> &str {
    m.split("::").next().unwrap_or("")
}

#[test]
fn layers_only_point_down() {
    let g = crate_graph();
    let mut bad = Vec::new();
    for (from, tos) in &g.edges {
        for to in tos {
            let (a, b) = (top(from), top(to));
            if a == b || a.is_empty() {
                continue;
            }
            match (layer_rank(a), layer_rank(b)) {
                (Some(ra), Some(rb)) if ra > rb => {}
                _ => bad.push(format!("{from} -> {to}")),
            }
        }
    }
    assert!(
        bad.is_empty(),
        "imports that point up or sideways between layers (abi > runtime > transport > cuda > log, host_profile, sys):\n  {}",
        bad.join("\n  ")
    );
}

#[test]
fn modules_have_no_import_circle() {
    let g = crate_graph();
    if std::env::var_os("NCCL_EP_PRINT_GRAPH").is_some() || std::env::args().any(|a| a == "--nocapture") {
        for (from, tos) in &g.edges {
            if !tos.is_empty() {
                println!("{from} -> {}", tos.iter().cloned().collect::<Vec<_>>().join(", "));
            }
        }
    }
    // Depth-first search with colours; report one circle.
    let mut colour: BTreeMap<&str, u8> = BTreeMap::new();
    fn visit<'a>(
        n: &'a str,
        g: &'a Graph,
        colour: &mut BTreeMap<&'a str, u8>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        colour.insert(n, 1);
        stack.push(n);
        for m in g.edges.get(n).into_iter().flatten() {
            match colour.get(m.as_str()).copied().unwrap_or(0) {
                0 => {
                    if let Some(c) = visit(m, g, colour, stack) {
                        return Some(c);
                    }
                }
                1 => {
                    let at = stack.iter().position(|&s| s == m).unwrap_or(0);
                    let mut c: Vec<String> = stack[at..].iter().map(|s| s.to_string()).collect();
                    c.push(m.clone());
                    return Some(c);
                }
                _ => {}
            }
        }
        stack.pop();
        colour.insert(n, 2);
        None
    }
    for n in g.edges.keys() {
        if colour.get(n.as_str()).copied().unwrap_or(0) == 0
            && let Some(c) = visit(n, &g, &mut colour, &mut Vec::new())
        {
            panic!("import circle: {}", c.join(" -> "));
        }
    }
}

#[test]
fn core_crate_is_pure() {
    let core = root().join("crates/core/src");
    let forbidden = [
        "nccl_ep::",
        "crate::abi",
        "cudarc",
        "libc",
        "extern \"C\"",
        "#[repr(C)]",
        "*mut ",
        "*const ",
    ];
    for (m, text) in modules(&core) {
        let code = code_only(&text);
        for f in forbidden {
            assert!(
                !code.contains(f),
                "crates/core module `{m}` contains `{f}`: the core takes no FFI or CUDA"
            );
        }
    }
    let manifest = std::fs::read_to_string(root().join("crates/core/Cargo.toml")).unwrap();
    // The [dependencies] table, up to the next table.
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .and_then(|s| s.split("\n[").next())
        .unwrap_or("");
    assert!(
        deps.lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')),
        "crates/core has dependencies: {deps}"
    );
}

#[test]
fn library_does_not_depend_on_the_reference() {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .and_then(|s| s.split("\n[").next())
        .unwrap_or("");
    assert!(
        !deps.contains("reference"),
        "the library depends on the reference: {deps}"
    );
    for (m, text) in modules(&root().join("src")) {
        assert!(
            !code_only(&text).contains("ep_reference"),
            "src module `{m}` uses the CPU reference"
        );
    }
}
