//! Helpers for the garbage collection and verify tests: synthetic paths (narinfo + NAR whose
//! fields parse, with chosen references), and running `cellar gc|verify|pin` against a store.
#![allow(dead_code)]

use std::process::{Command, Output};

use cellar::nix::{base32, Sha256};

pub const CELLAR: &str = env!("CARGO_BIN_EXE_cellar");

/// A synthetic store path: `<hash>-<name>`, with a NAR of `nar_size` bytes.
#[derive(Clone, Debug)]
pub struct Path {
    pub hash: String,
    pub name: String,
    pub nar_file: String,
    pub nar: Vec<u8>,
    pub refs: Vec<String>,
}

/// A store path hash derived from `seed` (20 bytes of sha256, nix-base32).
pub fn hash(seed: &str) -> String {
    let d = Sha256::digest(seed.as_bytes());
    base32::encode(&d.as_bytes()[..20])
}

impl Path {
    pub fn new(seed: &str, nar_size: usize, refs: &[&Path]) -> Self {
        let nar: Vec<u8> = seed.bytes().cycle().take(nar_size.max(1)).collect();
        let nar_file = format!("{}.nar.xz", Sha256::digest(&nar).to_nix32());
        Self {
            hash: hash(seed),
            name: format!(
                "synthetic-{}",
                seed.replace(|c: char| !c.is_ascii_alphanumeric(), "-")
            ),
            nar_file,
            nar,
            refs: refs.iter().map(|r| r.base()).collect(),
        }
    }

    pub fn base(&self) -> String {
        format!("{}-{}", self.hash, self.name)
    }

    pub fn narinfo_key(&self) -> String {
        format!("{}.narinfo", self.hash)
    }

    pub fn nar_key(&self) -> String {
        format!("nar/{}", self.nar_file)
    }

    /// The narinfo, claiming `file_size` bytes for its NAR.
    pub fn narinfo_with_size(&self, file_size: usize) -> String {
        let refs = self.refs.join(" ");
        format!(
            "StorePath: /nix/store/{}\nURL: nar/{}\nCompression: xz\nFileHash: sha256:{}\nFileSize: {file_size}\nNarHash: sha256:{}\nNarSize: {}\nReferences: {refs}\n",
            self.base(),
            self.nar_file,
            &self.nar_file[..52],
            Sha256::digest(&self.nar).to_nix32(),
            self.nar.len(),
        )
    }

    pub fn narinfo(&self) -> String {
        self.narinfo_with_size(self.nar.len())
    }
}

/// Runs `cellar ARGS` with `env`; returns its output.
/// Runs `cellar` as contrib/cellar-gc.service does: under `UMask=0077`.
pub fn cellar(args: &[&str], env: &[(String, String)]) -> Output {
    Command::new("sh")
        .args(["-c", "umask 077 && exec \"$0\" \"$@\"", CELLAR])
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

pub fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A closure of tests/fixtures/closure.nix built by the real nix with `salt` (distinct salts
/// give distinct paths, except the content-addressed source every closure shares).
pub struct Closure {
    pub top: String,
    pub paths: Vec<String>,
}

pub fn build_closure(salt: &str, work: &std::path::Path) -> Closure {
    build_expr(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/closure.nix"),
        &["--argstr", "salt", salt, "-A", "top"],
        work,
    )
}

/// Builds `expr` (with `args`) and returns its output and closure.
pub fn build_expr(expr: &std::path::Path, args: &[&str], work: &std::path::Path) -> Closure {
    let xdg = work.join("xdg-build");
    let mut b = crate::common::nix("nix-build", &xdg);
    b.arg(expr).args(args).arg("--no-out-link");
    let top = crate::common::run_ok(b).trim().to_owned();
    let mut q = crate::common::nix("nix-store", &xdg);
    q.args(["-qR", &top]);
    let paths = crate::common::run_ok(q)
        .lines()
        .map(str::to_owned)
        .collect();
    Closure { top, paths }
}

/// `nix copy --to file://DIR` of `paths`.
pub fn copy_to_dir(paths: &[&str], dir: &std::path::Path, work: &std::path::Path) {
    let mut c = crate::common::nix("nix", &work.join("xdg-copy-to"));
    c.args(["copy", "--to", &format!("file://{}", dir.display())])
        .args(paths);
    crate::common::run_ok(c);
}

/// Sets the modification time of every file under `dir` to `age` ago.
pub fn age_files(dir: &std::path::Path, age: std::time::Duration) {
    let t = std::time::SystemTime::now() - age;
    for p in crate::common::walk(dir) {
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }
}

pub fn local_env(dir: &std::path::Path) -> Vec<(String, String)> {
    vec![
        ("CELLAR_STORE__KIND".into(), "local".into()),
        ("CELLAR_STORE__PATH".into(), dir.to_str().unwrap().into()),
    ]
}

pub fn hash_of(path: &str) -> &str {
    &path.rsplit('/').next().unwrap()[..32]
}

/// The S3 store of `prefix` in the test Garage, opened through cellar's own client.
pub async fn s3_store(
    s3: &crate::common::S3Env,
    prefix: &str,
) -> std::sync::Arc<dyn cellar::store::Store> {
    s3_store_via(s3, prefix, true).await
}

/// [`s3_store`], sending its reads directly (`direct_requests`) or through the SDK.
pub async fn s3_store_via(
    s3: &crate::common::S3Env,
    prefix: &str,
    direct_requests: bool,
) -> std::sync::Arc<dyn cellar::store::Store> {
    use cellar::config::{S3Credentials, S3StoreConfig, Secret};
    let cfg = S3StoreConfig {
        bucket: s3.bucket.clone(),
        endpoint: Some(s3.endpoint.clone()),
        region: "us-east-1".into(),
        prefix: prefix.to_owned(),
        force_path_style: true,
        direct_requests,
        credentials: Some(S3Credentials {
            access_key_id: s3.key_id.clone(),
            secret_access_key: Secret(s3.secret.clone()),
        }),
        connect_timeout: std::time::Duration::from_secs(2),
        redirect: None,
        upload_part_concurrency: 4,
    };
    std::sync::Arc::new(
        cellar::store::s3::S3Store::new(&cfg, std::time::Duration::from_secs(10)).await,
    )
}

/// node_exporter runs as another user: the metrics file must be readable by all, whatever the
/// umask cellar ran under.
pub fn assert_readable_by_all(file: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o644, "{}: mode {mode:o}", file.display());
}
