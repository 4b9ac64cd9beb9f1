//! Helpers for uploads: tokens and netrc files, nix as a builder, and raw HTTP uploads of a
//! path taken from a `file://` cache.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{nix, run_ok, Fixture, Server};

// ---------------------------------------------------------------------------------------------
// Tokens

/// A fresh token and the `[[auth.tokens]]` config entry accepting it with `scope`.
pub fn token(name: &str, scope: &str) -> (String, String) {
    let token = cellar::auth::generate().unwrap();
    let entry = format!(
        "[[auth.tokens]]\nname = \"{name}\"\nhash = \"{}\"\nscopes = [\"{scope}\"]\n",
        cellar::auth::hash(&token)
    );
    (token, entry)
}

/// A netrc file for `server` with `token` as password.
pub fn netrc(dir: &Path, server: &Server, token: &str) -> PathBuf {
    let p = dir.join(format!("netrc-{}", &token[token.len() - 6..]));
    std::fs::write(
        &p,
        format!("machine 127.0.0.1 login builder password {token}\n"),
    )
    .unwrap();
    let _ = server;
    p
}

/// `cellar import dir` with the store `env` gives, asserted to succeed: what it printed (its
/// summary).
pub fn cellar_import(dir: &Path, env: Vec<(String, String)>) -> String {
    let out = Command::new(super::CELLAR)
        .arg("import")
        .arg(dir)
        .envs(env)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    said
}

/// Runs `cmd`, asserts success, returns its stderr (where nix reports progress).
pub fn run_ok_stderr(mut cmd: Command) -> String {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{cmd:?} failed:\n{err}");
    err
}

/// `nix copy --from url` into a fresh store under `work`, then `nix store verify` there, both
/// trusting only `key`.
pub fn substitute_and_verify(url: &str, key: &str, top: &str, work: &Path) {
    let store = work.join("store-copy");
    let mut c = nix("nix", &work.join("xdg-copy"));
    c.args(["copy", "--from", url, "--store"])
        .arg(&store)
        .args(["--trusted-public-keys", key, top]);
    run_ok(c);
    let mut v = nix("nix", &work.join("xdg-verify"));
    v.args(["store", "verify", "-r", "--store"])
        .arg(&store)
        .args(["--trusted-public-keys", key, top]);
    run_ok(v);
    assert!(store.join(top.trim_start_matches('/')).exists());
}

// ---------------------------------------------------------------------------------------------
// Uploads over raw HTTP, from a fixture written by `nix copy --to file://`

/// One path of a `file://` cache: its narinfo text, NAR file name and NAR bytes.
pub struct Upload {
    pub narinfo: String,
    pub nar_name: String,
    pub nar: Vec<u8>,
}

pub fn fixture_upload(dir: &Path, path: &str) -> Upload {
    let narinfo =
        std::fs::read_to_string(dir.join(format!("{}.narinfo", Fixture::hash(path)))).unwrap();
    let url = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_owned();
    let nar = std::fs::read(dir.join(&url)).unwrap();
    Upload {
        narinfo,
        nar_name: url.trim_start_matches("nar/").to_owned(),
        nar,
    }
}

pub async fn put(
    client: &reqwest::Client,
    url: String,
    token: &str,
    body: Vec<u8>,
) -> (u16, String) {
    let res = client
        .put(url)
        .basic_auth("b", Some(token))
        .body(body)
        .send()
        .await
        .unwrap();
    (res.status().as_u16(), res.text().await.unwrap())
}

pub async fn status(url: String) -> u16 {
    reqwest::get(url).await.unwrap().status().as_u16()
}

/// A path with debug info (`tests/fixtures/debug.nix`, two build ids), new to the store for
/// each `salt`, built by the real nix under `work`.
pub fn debug_info_path(work: &Path, salt: &str) -> String {
    let expr = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/debug.nix");
    let mut b = nix("nix-build", &work.join("xdg-build"));
    b.arg("--no-out-link")
        .arg(&expr)
        .args(["--argstr", "salt", salt]);
    run_ok(b).trim().to_owned()
}

/// [`debug_info_path`], copied with `nix copy --to 'file://DIR?index-debug-info=true'` into
/// `dir`, which then holds its links under `debuginfo/`.
pub fn debug_info_cache(work: &Path, salt: &str, dir: &Path) -> String {
    let path = debug_info_path(work, salt);
    let mut c = nix("nix", &work.join("xdg-copy"));
    c.args([
        "copy",
        "--to",
        &format!("file://{}?index-debug-info=true", dir.display()),
        &path,
    ]);
    run_ok(c);
    path
}
