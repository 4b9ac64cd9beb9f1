//! Property test against the real Nix: narinfos generated at random (any references, in any
//! order, self-references, derivers, extra fields, other keys' signatures), signed by cellar,
//! are trusted by `nix store verify`; and one changed after signing is not, so the check is
//! live. 16 narinfos in the suite (one `nix` run); `PROPTEST_CASES=N` for more.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod props_support;

use std::collections::HashMap;
use std::path::Path;

use cellar::nix::{NarInfo, SecretKey};
use common::nix;
use props_support::{narinfo, SD};
use proptest::strategy::{Strategy as _, ValueTree as _};
use proptest::test_runner::TestRunner;

/// Nix trusts a content-addressed path without a signature, and reads `CA:` strictly: leave
/// it out, so only the signature can make a path trusted. A NarSize of 0 is corrupt to Nix.
fn signable() -> impl proptest::strategy::Strategy<Value = NarInfo> {
    narinfo().prop_map(|mut n| {
        n.ca = None;
        n.nar_size = n.nar_size.max(1);
        n
    })
}

fn cases() -> usize {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16)
}

/// Runs `nix store verify --no-contents` over `paths` of the file cache `dir`: the paths Nix
/// reports untrusted, or a panic if it failed for another reason.
fn untrusted(dir: &Path, key: &str, paths: &[String], xdg: &Path) -> Vec<String> {
    let mut cmd = nix("nix", xdg);
    cmd.args([
        "--extra-experimental-features",
        "nix-command",
        "store",
        "verify",
    ])
    .args(["--no-contents", "--store"])
    .arg(format!("file://{}", dir.display()))
    .args(["--trusted-public-keys", key])
    .args(paths);
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let bad: Vec<String> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("path '")?.strip_suffix("' is untrusted"))
        .map(str::to_owned)
        .collect();
    assert!(
        out.status.success() || !bad.is_empty(),
        "nix store verify failed:\n{stderr}"
    );
    bad
}

#[test]
fn narinfos_signed_by_cellar_verify_with_nix() {
    let key = SecretKey::generate("cellar-fp-1").unwrap();
    let public = key.public().to_string();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("cache");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("nix-cache-info"),
        format!("StoreDir: {SD}\nWantMassQuery: 1\nPriority: 40\n"),
    )
    .unwrap();

    let mut runner = TestRunner::default();
    let strategy = signable();
    let mut texts: HashMap<String, String> = HashMap::new();
    let mut paths = Vec::new();
    while paths.len() < cases() {
        let mut n = strategy.new_tree(&mut runner).unwrap().current();
        if texts.keys().any(|p| p.contains(n.hash().as_str())) {
            continue;
        }
        n.sign(&key, SD);
        let text = n.render(SD);
        std::fs::write(dir.join(format!("{}.narinfo", n.hash())), &text).unwrap();
        let path = format!("{SD}/{}", n.store_path);
        texts.insert(path.clone(), text);
        paths.push(path);
    }

    // One more, changed after it was signed: Nix must refuse it.
    let mut control = strategy.new_tree(&mut runner).unwrap().current();
    control.sign(&key, SD);
    control.nar_size = control.nar_size.wrapping_add(1).max(1);
    std::fs::write(
        dir.join(format!("{}.narinfo", control.hash())),
        control.render(SD),
    )
    .unwrap();
    let control_path = format!("{SD}/{}", control.store_path);

    for (i, batch) in paths.chunks(200).enumerate() {
        let mut batch = batch.to_vec();
        if i == 0 {
            batch.push(control_path.clone());
        }
        let bad = untrusted(&dir, &public, &batch, &work.path().join(format!("xdg-{i}")));
        let wrongly: Vec<&String> = bad.iter().filter(|p| **p != control_path).collect();
        assert!(
            wrongly.is_empty(),
            "Nix does not trust {} narinfo(s) cellar signed, e.g.:\n{}",
            wrongly.len(),
            texts[wrongly[0]]
        );
        if i == 0 {
            assert_eq!(
                bad,
                std::slice::from_ref(&control_path),
                "the changed narinfo must be refused"
            );
        }
    }
}
