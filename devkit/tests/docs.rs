#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The documentation stays true to the repository: every relative link and image in README.md,
//! BENCHMARKS.md, bench/README.md and docs/*.md names a file or folder that exists, and every
//! `#anchor` on a link into a Markdown file names one of that file's headings, as GitHub makes
//! anchors (lower case, spaces to `-`, punctuation other than `-` and `_` dropped, `-1`, `-2`
//! after repeats). Code blocks and code spans are not read: what they hold is not a link.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("devkit/ sits in the workspace")
        .to_path_buf()
}

/// The documents checked, relative to the workspace root.
fn documents(root: &Path) -> Vec<PathBuf> {
    let mut docs = vec![
        PathBuf::from("README.md"),
        PathBuf::from("BENCHMARKS.md"),
        PathBuf::from("bench/README.md"),
    ];
    let mut in_docs: Vec<PathBuf> = fs::read_dir(root.join("docs"))
        .expect("a docs/ folder")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .map(|path| path.strip_prefix(root).unwrap().to_path_buf())
        .collect();
    in_docs.sort();
    docs.extend(in_docs);
    docs
}

/// The text outside fenced code blocks, as blocks (paragraphs, tables, list runs) separated
/// by blank lines, each with the number of its first line.
fn prose_blocks(text: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut fence: Option<String> = None;
    let mut current = String::new();
    let mut start = 0;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if let Some(open) = &fence {
            if trimmed.starts_with(open.as_str())
                && trimmed
                    .trim_end()
                    .chars()
                    .all(|c| c == open.chars().next().unwrap())
            {
                fence = None;
            }
            continue;
        }
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            let marker = trimmed.chars().next().unwrap();
            fence = Some(trimmed.chars().take_while(|&c| c == marker).collect());
            if !current.is_empty() {
                blocks.push((start, std::mem::take(&mut current)));
            }
            continue;
        }
        if trimmed.is_empty() {
            if !current.is_empty() {
                blocks.push((start, std::mem::take(&mut current)));
            }
            continue;
        }
        if current.is_empty() {
            start = i + 1;
        }
        current.push_str(line);
        current.push('\n');
    }
    assert!(fence.is_none(), "a code block is never closed");
    if !current.is_empty() {
        blocks.push((start, current));
    }
    blocks
}

/// A block without its code spans (a run of backticks up to the next run of as many).
fn without_code_spans(block: &str) -> String {
    let chars: Vec<char> = block.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '`' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let run = chars[i..].iter().take_while(|&&c| c == '`').count();
        let mut j = i + run;
        let mut close = None;
        while j < chars.len() {
            if chars[j] == '`' {
                let other = chars[j..].iter().take_while(|&&c| c == '`').count();
                if other == run {
                    close = Some(j + other);
                    break;
                }
                j += other;
            } else {
                j += 1;
            }
        }
        match close {
            Some(end) => i = end,
            None => {
                // An unmatched run is literal text.
                out.extend(&chars[i..i + run]);
                i += run;
            }
        }
    }
    out
}

/// The targets of a block's links and images: `[text](target)`, `![alt](target "title")`,
/// and reference definitions `[name]: target`.
fn link_targets(block: &str) -> Vec<String> {
    let text = without_code_spans(block);
    let mut targets = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let end = after
            .find(|c: char| c == ')' || c.is_whitespace())
            .unwrap_or(after.len());
        let target = after[..end].trim_start_matches('<').trim_end_matches('>');
        targets.push(target.to_string());
        rest = &after[end..];
    }
    for line in text.lines() {
        let line = line.trim_start();
        if let Some(close) = line.strip_prefix('[').and_then(|l| l.find("]:")) {
            let target = line[close + 3..].split_whitespace().next();
            if let Some(target) = target {
                targets.push(target.to_string());
            }
        }
    }
    targets
}

/// GitHub's anchor for a heading's text.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a Markdown document's headings (ATX headings outside code blocks).
fn anchors(text: &str) -> Vec<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::new();
    for (_, block) in prose_blocks(text) {
        for line in block.lines() {
            let hashes = line.chars().take_while(|&c| c == '#').count();
            if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
                continue;
            }
            let title = line[hashes..].trim().trim_end_matches('#').trim_end();
            let base = anchor(title);
            let count = seen.entry(base.clone()).or_insert(0);
            out.push(if *count == 0 {
                base.clone()
            } else {
                format!("{base}-{count}")
            });
            *count += 1;
        }
    }
    out
}

/// Every broken link of the documents, as `file:line: target: why`, and how many links were
/// checked.
fn broken_links(root: &Path) -> (Vec<String>, usize) {
    let root = root.canonicalize().unwrap();
    let mut headings: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    let mut broken = Vec::new();
    let mut checked = 0;
    for doc in documents(&root) {
        let text = fs::read_to_string(root.join(&doc))
            .unwrap_or_else(|e| panic!("{}: {e}", doc.display()));
        let dir = root.join(&doc).parent().unwrap().to_path_buf();
        for (line, block) in prose_blocks(&text) {
            for target in link_targets(&block) {
                if target.starts_with("http://")
                    || target.starts_with("https://")
                    || target.starts_with("mailto:")
                {
                    continue;
                }
                checked += 1;
                let mut fail = |why: String| {
                    broken.push(format!("{}:{line}: {target}: {why}", doc.display()));
                };
                let (path, fragment) = match target.split_once('#') {
                    Some((path, fragment)) => (path, Some(fragment)),
                    None => (target.as_str(), None),
                };
                let file = if path.is_empty() {
                    root.join(&doc)
                } else {
                    dir.join(path)
                };
                let Ok(file) = file.canonicalize() else {
                    fail("no such file or folder".to_string());
                    continue;
                };
                if !file.starts_with(&root) {
                    fail("outside the repository".to_string());
                    continue;
                }
                let Some(fragment) = fragment else { continue };
                if file.extension().is_none_or(|ext| ext != "md") {
                    continue;
                }
                let known = headings
                    .entry(file.clone())
                    .or_insert_with(|| anchors(&fs::read_to_string(&file).unwrap_or_default()));
                if !known.iter().any(|a| a == fragment) {
                    fail(format!(
                        "no heading with this anchor in {}",
                        file.strip_prefix(&root).unwrap().display()
                    ));
                }
            }
        }
    }
    (broken, checked)
}

#[test]
fn every_relative_link_and_anchor_in_the_docs_resolves() {
    let (broken, checked) = broken_links(&workspace_root());
    assert!(
        broken.is_empty(),
        "{} broken link(s) in the documentation:\n{}",
        broken.len(),
        broken.join("\n")
    );
    // Not vacuous: the README alone links a dozen files.
    assert!(
        checked > 100,
        "only {checked} links found: is the parser blind?"
    );
}

#[test]
fn the_readme_links_every_page_of_docs() {
    let root = workspace_root();
    let readme = fs::read_to_string(root.join("README.md")).unwrap();
    let targets: Vec<String> = prose_blocks(&readme)
        .iter()
        .flat_map(|(_, block)| link_targets(block))
        .collect();
    for doc in documents(&root) {
        if !doc.starts_with("docs") {
            continue;
        }
        let name = doc.to_str().unwrap();
        assert!(
            targets.iter().any(|t| t.split('#').next() == Some(name)),
            "README.md does not link {name}"
        );
    }
}

#[test]
fn anchors_follow_github() {
    assert_eq!(anchor("What `make run` shows"), "what-make-run-shows");
    assert_eq!(
        anchor("Quotas, revocation and spend caps"),
        "quotas-revocation-and-spend-caps"
    );
    assert_eq!(anchor("Personal data (GDPR)"), "personal-data-gdpr");
    assert_eq!(
        anchor("Fan-in: how many filters one collector serves"),
        "fan-in-how-many-filters-one-collector-serves"
    );
    assert_eq!(
        anchor("What changed in this round (before → after, same run)"),
        "what-changed-in-this-round-before--after-same-run"
    );
    assert_eq!(
        anchors("# A\n\n## A\n\n```\n# not a heading\n```\n\n## a_b\n"),
        ["a", "a-1", "a_b"]
    );
    assert_eq!(
        link_targets("[`x`](a.md#b) and `[not](a link)` and ![img](c.png \"t\")\n[ref]: d.md\n"),
        ["a.md#b", "c.png", "d.md"]
    );
}
