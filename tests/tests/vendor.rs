//! The vendored broker can be audited: `vendor/rumqttd` is exactly the crates.io release
//! (`vendor/rumqttd-0.20.0.crate`, checked against crates.io's checksum) with the patch series of
//! `vendor/patches` applied in order, each patch with its reason (`vendor/PATCHES.md`). A change to
//! a line of `vendor/rumqttd` outside the series fails this test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use system_tests::TestDir;

/// crates.io's `cksum` of rumqttd 0.20.0 (its index entry).
const RELEASE_SHA256: &str = "32399b9dee6e96350790223dd7356bf7f8f15009d7e58e20f4093f1137213e16";

fn vendor() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../vendor")
}

/// Every file under `dir`, by path relative to it, with its bytes.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_vendored_broker_is_the_release_plus_its_patch_series() {
    let release = vendor().join("rumqttd-0.20.0.crate");
    let sum = sh(Command::new("sha256sum").arg(&release));
    assert!(
        sum.starts_with(RELEASE_SHA256),
        "{} is not crates.io's rumqttd 0.20.0: {sum}",
        release.display()
    );
    let dir = TestDir::new("vendor");
    sh(Command::new("tar")
        .arg("xzf")
        .arg(&release)
        .arg("-C")
        .arg(&dir.path));
    let built = dir.join("rumqttd-0.20.0");
    let mut patches: Vec<PathBuf> = std::fs::read_dir(vendor().join("patches"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "patch"))
        .collect();
    patches.sort();
    assert!(patches.len() >= 7, "{patches:?}");
    let listed = std::fs::read_to_string(vendor().join("PATCHES.md")).unwrap();
    for p in &patches {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            listed.contains(&name),
            "{name} is not listed in vendor/PATCHES.md"
        );
        sh(Command::new("git")
            .args(["apply", "-p1", "--whitespace=nowarn"])
            .arg(p)
            .current_dir(&built));
    }
    let expected = tree(&built);
    let vendored = tree(&vendor().join("rumqttd"));
    let missing: Vec<_> = expected
        .keys()
        .filter(|k| !vendored.contains_key(*k))
        .collect();
    let extra: Vec<_> = vendored
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "missing from vendor/rumqttd: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "in vendor/rumqttd but not in the release and its patches: {extra:?}"
    );
    for (path, bytes) in &expected {
        if vendored[path] != *bytes {
            let first = String::from_utf8_lossy(bytes)
                .lines()
                .zip(String::from_utf8_lossy(&vendored[path]).lines())
                .enumerate()
                .find(|(_, (a, b))| a != b)
                .map(|(i, (a, b))| format!("line {}: expected {a:?}, found {b:?}", i + 1))
                .unwrap_or_else(|| "lengths differ".into());
            panic!(
                "vendor/rumqttd/{} differs from the release plus its patches ({first}): \
                 make the change a patch of vendor/patches and list it in vendor/PATCHES.md",
                path.display()
            );
        }
    }
}
