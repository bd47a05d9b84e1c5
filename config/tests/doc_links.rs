//! Every relative link in README.md and docs/*.md names a file of this
//! repository, and every `#anchor` a heading of that file (GitHub's slugs:
//! lower case, punctuation dropped, spaces to `-`). A relative link that
//! leaves the repository (`../shared/...`) is refused: it resolves only in
//! the checkout it was written in. Absolute URLs are not checked.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .canonicalize()
        .unwrap()
}

/// GitHub's anchor for a heading's text.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut in_code = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            out.insert(slug(line.trim_start_matches('#')));
        }
    }
    out
}

/// `(target, line)` of every `](target)` outside code blocks.
fn links(text: &str) -> Vec<(String, usize)> {
    let mut in_code = false;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        for part in line.split("](").skip(1) {
            if let Some(end) = part.find(')') {
                out.push((part[..end].to_owned(), i + 1));
            }
        }
    }
    out
}

/// Whether `path` (absolute, possibly with `..`) stays under `root`,
/// judged on its components, not on what exists on this machine.
fn lexically_inside(root: &std::path::Path, path: &std::path::Path) -> bool {
    use std::path::Component;
    let mut parts: Vec<Component> = Vec::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                parts.pop();
            }
            Component::CurDir => {}
            c => parts.push(c),
        }
    }
    parts
        .iter()
        .collect::<std::path::PathBuf>()
        .starts_with(root)
}

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let root = root();
    let mut files = vec![root.join("README.md")];
    for e in std::fs::read_dir(root.join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            files.push(p);
        }
    }
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let name = file.strip_prefix(&root).unwrap().display().to_string();
        for (target, line) in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let dest = if path.is_empty() {
                file.clone()
            } else {
                file.parent().unwrap().join(path)
            };
            // A link out of the repository resolves only in the checkout
            // it was written in (a fresh clone elsewhere, GitHub's view):
            // broken wherever it happens to resolve.
            if !lexically_inside(&root, &dest) {
                broken.push(format!("{name}:{line}: {target}: leaves the repository"));
                continue;
            }
            let Ok(dest) = dest.canonicalize() else {
                broken.push(format!("{name}:{line}: {target}: no such file"));
                continue;
            };
            checked += 1;
            if let Some(a) = anchor
                && dest.extension().is_some_and(|x| x == "md")
            {
                let text = std::fs::read_to_string(&dest).unwrap();
                if !anchors(&text).contains(a) {
                    broken.push(format!("{name}:{line}: {target}: no heading #{a}"));
                }
            }
        }
    }
    assert!(checked >= 15, "checked only {checked} links");
    assert!(
        broken.is_empty(),
        "broken links:\n  {}",
        broken.join("\n  ")
    );
}

#[test]
fn slugs_are_githubs() {
    assert_eq!(
        slug(" 8. Redis: persistence, backups, Sentinel"),
        "8-redis-persistence-backups-sentinel"
    );
    assert_eq!(slug(" `[github]`"), "github");
    assert_eq!(slug(" 6. Configuration keys"), "6-configuration-keys");
}
