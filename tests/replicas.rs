//! Two cellar replicas over one 3-node Garage cluster (replication factor 3), with the real
//! nix client, most of it through one nginx upstream (`replicas_support::Nginx`):
//!
//! - a Garage node SIGKILLed during `nix copy --from` of a 501-path closure: no failed
//!   substitution, and no 5xx reaches the client;
//! - an upload through replica A is served by replica B once B's cached 404 expires (never
//!   before, and at most the negative TTL after B's 404);
//! - a NAR whose fill on A is held mid-body is served by B meanwhile, then by A to its client;
//! - a replica SIGKILLed mid-NAR: nix retries the download, and nginx sends the retry to the
//!   other replica.
//!
//! Each test starts its own cluster, replicas and nginx, and the tests run one at a time (the
//! machine has 2 cores, and one test kills a storage node).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod replicas_support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use replicas_support::*;

/// One test at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `nix copy --from url --store store path` trusting only `key`, with a fresh lookup cache.
fn copy_from(url: &str, key: &str, store: &Path, path: &str, xdg: &Path) -> Command {
    let mut c = nix("nix", xdg);
    c.args(["copy", "--from", url, "--store"])
        .arg(store)
        .args(["--trusted-public-keys", key, path]);
    c
}

fn verify(store: &Path, key: &str, path: &str, xdg: &Path) {
    let mut v = nix("nix", xdg);
    v.args(["store", "verify", "-r", "--store"])
        .arg(store)
        .args(["--trusted-public-keys", key, path]);
    run_ok(v);
    assert!(store.join(path.trim_start_matches('/')).exists());
}

/// Waits (polling, with a deadline) until `cond` holds; fails with `what` and `log()`.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "{what} did not happen:\n{}", log());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Access log lines for `needle` (e.g. `.narinfo`, `/nar/`).
fn lines_with<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(needle)).collect()
}

/// The client status of an access log line (the third field).
fn status(line: &str) -> u16 {
    line.split(' ').nth(2).unwrap().parse().unwrap()
}

/// `nix copy --from` of a 501-path closure through nginx in front of replica A (reading
/// through Garage node 0) and B (node 1). Once 50 narinfo requests have been answered, node 0
/// is SIGKILLed: A's store is gone and the cluster runs on 2 of 3 nodes. The copy succeeds and
/// verifies, and no request the client made got a 5xx: what A could not answer (503) nginx
/// retried on B, which reads through node 1 with node 0 dead.
#[tokio::test(flavor = "multi_thread")]
async fn a_storage_node_killed_during_a_500_path_copy_fails_no_substitution() {
    let _serial = serial();
    let work = tempfile::tempdir().unwrap();
    let xdg = work.path().join("xdg");
    let (many, closure) = build("many", &[], &xdg);
    assert_eq!(closure.len(), 501);
    let cache = work.path().join("cache");
    copy_to_dir(&many, &cache, &xdg);

    let cluster = Cluster::start();
    let prefix = unique_prefix("kill-node");
    cluster.seed_dir(&prefix, &cache).await;
    let shared = Shared::new("");
    let a = shared
        .replica(cluster.store_env(&cluster.endpoints[0], &prefix))
        .await;
    let b = shared
        .replica(cluster.store_env(&cluster.endpoints[1], &prefix))
        .await;
    let lb = Nginx::start(&[&a, &b]);

    let store = work.path().join("store");
    let mut copy = copy_from(
        &lb.url,
        &shared.public_key,
        &store,
        &many,
        &work.path().join("xdg-copy"),
    );
    let started = Instant::now();
    let mut child = copy
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut finished_early = false;
    wait_until(
        "50 narinfo requests",
        || {
            if child.try_wait().unwrap().is_some() {
                finished_early = true;
                return true;
            }
            lines_with(&lb.access_log(), ".narinfo").len() >= 50
        },
        || lb.access_log(),
    );
    assert!(!finished_early, "the copy ended before the node was killed");
    cluster.kill(0);
    let at_kill = lb.access_log().lines().count();
    let out = child.wait_with_output().unwrap();
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "nix copy failed:\n{}\nnginx:\n{}\nA:\n{}",
        String::from_utf8_lossy(&out.stderr),
        lb.access_log(),
        a.log()
    );
    verify(&store, &shared.public_key, &many, &work.path().join("xdg-v"));

    let log = lb.access_log();
    let total = log.lines().count();
    // Most of the walk came after the kill (501 narinfos and 501 NARs at least).
    assert!(
        total - at_kill >= 500,
        "only {} of {total} requests after the kill",
        total - at_kill
    );
    let failed: Vec<&str> = log.lines().filter(|l| status(l) >= 500).collect();
    assert!(failed.is_empty(), "the client got 5xx:\n{}", failed.join("\n"));
    // What nginx tried on more than one replica (A's 503s, or A's refused connections).
    let retried = log.lines().filter(|l| l.contains(", ")).count();
    eprintln!(
        "kill-node: {total} requests, {} after the kill, {retried} retried on the other replica, copy took {took:?}",
        total - at_kill
    );
}
