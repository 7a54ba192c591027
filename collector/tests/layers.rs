//! The collector's modules import only from the layers below them, and never in a circle (the
//! rule the README's "Repository" states). Read from the source: every `crate::<module>` path
//! outside comments and test modules is an import of that module.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each top-level module's layer: a module may import modules of lower layers, and domain
/// modules (layer 2) each other as long as they form no circle.
const LAYERS: &[(&str, u8)] = &[
    // Leaves: import no other collector module.
    ("clock", 0),
    ("errors", 0),
    ("telemetry", 0),
    ("signing", 0),
    ("catalog", 0),
    ("seats", 0),
    ("storage", 1),
    ("health", 2),
    ("group_commit", 2),
    ("webhooks", 2),
    ("licensing", 2),
    ("account_tokens", 2),
    ("privacy", 2),
    ("billing", 2),
    ("control", 2),
    ("exports", 2),
    ("overview", 2),
    ("state", 3),
    ("http", 4),
    ("worker", 4),
    // The crate root: `serve` and `Running` start the HTTP server and the worker.
    ("serve", 5),
    ("cli", 6),
];

const DOMAIN: u8 = 2;

/// The imports of each top-level module (`src/<m>.rs` or everything under `src/<m>/`).
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let relative = path.strip_prefix(&src).unwrap();
            let top = relative
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            if top == "lib" || top == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // Unit tests may reach anywhere.
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            let used = out.entry(top.clone()).or_default();
            for line in code.lines() {
                let line = line.trim_start();
                if line.starts_with("//") {
                    continue;
                }
                for (at, _) in line.match_indices("crate::") {
                    let name: String = line[at + "crate::".len()..]
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != top {
                        used.insert(name);
                    }
                }
            }
        }
    }
    out
}

#[test]
fn modules_import_only_downwards_and_domains_form_no_circle() {
    let layer: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    let imports = imports();
    for module in imports.keys() {
        assert!(
            layer.contains_key(module.as_str()),
            "module `{module}` has no layer: add it to LAYERS (and to the README's map)"
        );
    }
    let mut wrong = Vec::new();
    for (module, used) in &imports {
        let mine = layer[module.as_str()];
        for d in used {
            let theirs = layer.get(d.as_str()).copied().unwrap_or(u8::MAX);
            let fine = theirs < mine || (mine == DOMAIN && theirs == DOMAIN);
            if !fine {
                wrong.push(format!(
                    "{module} (layer {mine}) imports {d} (layer {theirs})"
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports running up:\n{}",
        wrong.join("\n")
    );
    // Domain modules: a depth-first search finds any circle.
    let domain: Vec<&String> = imports
        .keys()
        .filter(|m| layer[m.as_str()] == DOMAIN)
        .collect();
    fn visit<'a>(
        m: &'a str,
        imports: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(at) = path.iter().position(|p| *p == m) {
            panic!("import circle: {} -> {m}", path[at..].join(" -> "));
        }
        path.push(m);
        for d in imports.get(m).into_iter().flatten() {
            if imports.contains_key(d) {
                visit(d, imports, path, done);
            }
        }
        path.pop();
        done.insert(m);
    }
    let mut done = BTreeSet::new();
    for m in domain {
        visit(m, &imports, &mut Vec::new(), &mut done);
    }
}
