//! The repository's copy of the GitHub fixtures (`fixtures/github`, read by
//! the other tests) is the shared reference data, byte for byte.

use std::path::{Path, PathBuf};

fn files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(root, &p, out);
        } else {
            out.push(p.strip_prefix(root).unwrap().to_owned());
        }
    }
}

#[test]
fn the_vendored_fixtures_are_the_shared_ones() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let vendored = repo.join("fixtures/github");
    let shared = repo.join("../shared/fixtures/github");
    let mut ours = Vec::new();
    files(&vendored, &vendored, &mut ours);
    assert!(
        ours.len() > 20,
        "fixtures/github holds only {} files",
        ours.len()
    );
    if !shared.exists() {
        // A checkout away from shared/: the copy is what the tests use; only
        // this comparison cannot run.
        eprintln!("SKIPPED drift check: {} not found", shared.display());
        return;
    }
    let mut theirs = Vec::new();
    files(&shared, &shared, &mut theirs);
    ours.sort();
    theirs.sort();
    assert_eq!(
        ours, theirs,
        "fixtures/github and shared/fixtures/github hold different files"
    );
    for f in &ours {
        assert!(
            std::fs::read(vendored.join(f)).unwrap() == std::fs::read(shared.join(f)).unwrap(),
            "{} differs; copy it again",
            f.display()
        );
    }
}
