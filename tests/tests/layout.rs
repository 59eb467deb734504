//! The tree keeps ARCHITECTURE.md's invariants that a compiler cannot check.

use std::path::{Path, PathBuf};

/// The non-test Rust sources of a crate directory: `tests.rs` files and `tests/` directories are
/// test code, and so is everything after a `#[cfg(test)]` line.
fn product_sources(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() {
            if name != "tests" {
                product_sources(&p, out);
            }
        } else if name.ends_with(".rs") && name != "tests.rs" {
            let text = std::fs::read_to_string(&p).unwrap();
            let product = match text.find("#[cfg(test)]") {
                Some(at) => text[..at].to_owned(),
                None => text,
            };
            out.push((p, product));
        }
    }
}

/// Nobody formats a topic by hand: outside `topics/`, no product code holds a `"system/` literal.
#[test]
fn topic_strings_are_written_only_in_topics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut sources = Vec::new();
    for krate in ["dom0-broker/src", "domu-agent/src"] {
        product_sources(&root.join(krate), &mut sources);
    }
    assert!(
        sources.len() > 10,
        "sources not found under {}",
        root.display()
    );
    let mut found = Vec::new();
    for (path, text) in &sources {
        for (i, line) in text.lines().enumerate() {
            if line.contains("\"system/") {
                found.push(format!("{}:{}: {}", path.display(), i + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "topic strings outside topics/ (use topics::topic / topics::filter):\n{}",
        found.join("\n")
    );
}

/// The check above sees what it must: a literal in product code would be found.
#[test]
fn the_topic_string_check_can_fail() {
    let dir = std::env::temp_dir().join(format!("layout-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("tests")).unwrap();
    std::fs::write(
        dir.join("a.rs"),
        "const T: &str = \"system/x\";\n#[cfg(test)]\nconst U: &str = \"system/y\";\n",
    )
    .unwrap();
    std::fs::write(dir.join("tests.rs"), "\"system/z\"").unwrap();
    std::fs::write(dir.join("tests/b.rs"), "\"system/w\"").unwrap();
    let mut sources = Vec::new();
    product_sources(&dir, &mut sources);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(sources.len(), 1);
    assert!(sources[0].1.contains("system/x") && !sources[0].1.contains("system/y"));
}
