//! Garbage collection racing `nix copy --to cellar` against a real Garage. The upload's
//! closure references paths the collector would otherwise delete (they are past the
//! retention); whatever the interleaving, the bucket never holds a narinfo whose closure is
//! incomplete, and the real client substitutes the upload afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod gc_support;

use std::time::{Duration, Instant, SystemTime};

use cellar::config::GcConfig;
use cellar::gc::{self, Quiet};
use common::{
    netrc, nix, run, s3_env, s3_exists, s3_put, s3_store_env, s3_upload_dir, substitute_and_verify,
    token, unique_prefix, Proxy, Server, CELLAR,
};
use gc_support::{build_closure, build_expr, copy_to_dir, s3_store};

/// The retention of the collector in this test: short, so that the base closure expires
/// within the test.
const KEEP: Duration = Duration::from_secs(8);

const EXPR: &str = r#"
{ closure }:
let
  base = import closure { salt = "gc-race-base"; };
  mk = name: script: builtins.derivation {
    inherit name;
    salt = "gc-race-upload";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" script ];
  };
  kids = builtins.genList (i: mk "race-${toString i}" "echo ${base.top} ${base.mid} ${toString i} > $out") 40;
in mk "race-top" "echo ${toString kids} ${base.leaf} > $out"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn gc_racing_nix_copy_never_breaks_the_uploaded_closure() {
    let s3 = s3_env();
    let prefix = unique_prefix("gc-race");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let base = build_closure("gc-race-base", w);
    let expr = w.join("race.nix");
    std::fs::write(&expr, EXPR).unwrap();
    let closure_nix =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/closure.nix");
    let upload = build_expr(
        &expr,
        &["--arg", "closure", closure_nix.to_str().unwrap()],
        w,
    );
    assert!(upload.paths.len() > 40);

    let dir = w.join("base-cache");
    copy_to_dir(&[&base.top], &dir, w);
    s3_upload_dir(&s3, &prefix, &dir).await;
    let uploaded_at = Instant::now();

    let (tok, tok_cfg) = token("builder", "write");
    let mut env = s3_store_env(&s3, &s3.endpoint, &prefix);
    // Reads are not written during the test: only what uploads record protects the base.
    env.push(("CELLAR_GC__ACCESS_FLUSH_SECS".into(), "3600".into()));
    let srv = Server::start_with_config(&tok_cfg, env);
    let n = netrc(w, &srv, &tok);
    let store = s3_store(&s3, &prefix).await;
    let cfg = GcConfig {
        keep: KEEP,
        grace: Duration::ZERO,
        ..GcConfig::default()
    };

    // The base must be past the retention when the race starts: this waits for the clock,
    // not for another task.
    tokio::time::sleep_until((uploaded_at + KEEP + Duration::from_secs(1)).into()).await;

    let copy = |tag: &'static str| {
        let (url, n, top, w) = (
            srv.url.clone(),
            n.clone(),
            upload.top.clone(),
            w.to_path_buf(),
        );
        tokio::task::spawn_blocking(move || {
            let mut c = nix("nix", &w.join(format!("xdg-up-{tag}")));
            // The upload address: its probes ask the store itself, so a path the collector
            // removed is seen missing and uploaded again (the root URL's memory cache could
            // still answer for it).
            let to = format!("{url}/upload");
            c.args(["copy", "--to", &to, "--option", "download-attempts", "1"])
                .arg("--option")
                .arg("netrc-file")
                .arg(&n)
                .arg(&top);
            run(c)
        })
    };
    let uploading = copy("race");
    let mut runs = 0;
    while !uploading.is_finished() {
        let opts = gc::Options {
            apply: true,
            now: SystemTime::now(),
            settle: gc::deleting::SETTLE,
            stop: Default::default(),
        };
        let s = gc::run(&store, "/nix/store", &cfg, &opts, &Quiet)
            .await
            .unwrap();
        assert!(s.errors.is_empty(), "{s}");
        runs += 1;
    }
    let out = uploading.await.unwrap();
    assert!(runs > 0);
    eprintln!(
        "first nix copy {}",
        if out.status.success() {
            "succeeded"
        } else {
            "was refused"
        }
    );
    if !out.status.success() {
        // The one case the protocol refuses instead of keeping: the collector deleted a
        // reference after the client checked it and before the upload recorded it. The
        // refusal is clean, and the next `nix copy` uploads what is missing.
        let err = String::from_utf8_lossy(&out.stderr);
        let log = srv.log();
        let why: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("upload rejected"))
            .collect();
        eprintln!("refused: {why:#?}");
        // The reason is in the response body (printed by newer clients) and in the log.
        assert!(
            err.contains("HTTP error 400") && (err.contains("upload rejected") || !why.is_empty()),
            "{err}\n{log}"
        );
        let again = copy("again").await.unwrap();
        assert!(
            again.status.success(),
            "{}",
            String::from_utf8_lossy(&again.stderr)
        );
    }

    let report = gc::verify::run(
        &store,
        "/nix/store",
        &gc::verify::Options {
            hashes: false,
            repair: false,
            sample: None,
            grace: Duration::from_secs(3600),
            now: SystemTime::now(),
            settle: gc::deleting::SETTLE,
            stop: Default::default(),
            upstreams: None,
        },
        &Quiet,
    )
    .await
    .unwrap();
    assert!(
        report.findings.is_empty(),
        "after {runs} gc runs: {:?}",
        report.findings
    );
    substitute_and_verify(
        &srv.url,
        &srv.public_key,
        &upload.top,
        &w.join("substitute"),
    );
    eprintln!("{runs} gc runs raced the upload");
}

/// `cellar gc --apply` and `cellar verify --repair` asked to stop (SIGTERM, as `systemctl
/// stop` sends; Ctrl-C alike) while they read the store end at once: they delete nothing and
/// withdraw their announcement, so the next run goes ahead at once instead of finding
/// "another collection is running".
#[tokio::test(flavor = "multi_thread")]
async fn a_collection_stopped_while_it_reads_deletes_nothing_and_lets_the_next_run_go() {
    for run in [["gc", "--apply"], ["verify", "--repair"]] {
        stopped_while_reading(run).await;
    }
}

async fn stopped_while_reading(run: [&str; 2]) {
    use std::io::BufRead as _;
    let s3 = s3_env();
    let prefix = unique_prefix("gc-stop");
    // A NAR without a narinfo: garbage for a run with no grace period.
    let orphan = format!("{prefix}nar/{}.nar", "1".repeat(52));
    s3_put(&s3, &orphan, b"no narinfo names me".to_vec()).await;
    let gc_env = |endpoint: &str| {
        let mut env = s3_store_env(&s3, endpoint, &prefix);
        env.push(("CELLAR_GC__GRACE_SECS".into(), "0".into()));
        env.push(("CELLAR_STORE__TIMEOUT_SECS".into(), "60".into()));
        env
    };
    // Every answer of the store is held: the run is stuck at its first request.
    let proxy = Proxy::start(&s3.endpoint).await;
    proxy.hold_after(0);
    let mut child = std::process::Command::new(CELLAR)
        .args(run)
        .envs(gc_env(&proxy.url()))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    proxy.held().await;
    let st = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    // It says it will stop; then the store answers again.
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    while !said.contains("cellar: stopping") {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "ended: {said}");
        said.push_str(&line);
    }
    proxy.release();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    said.push_str(&rest);
    let status = child.wait().unwrap();
    assert!(!status.success(), "{said}");
    assert!(said.contains("stopped on request"), "{said}");
    assert!(s3_exists(&s3, &orphan).await, "deleted by a stopped run");

    let out = std::process::Command::new(CELLAR)
        .args(run)
        .envs(gc_env(&s3.endpoint))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the next run: {said}");
    assert!(
        !s3_exists(&s3, &orphan).await,
        "the next run deleted nothing"
    );
}
