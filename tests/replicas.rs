//! Two cellar replicas over one 3-node Garage cluster (replication factor 3), with the real
//! nix client, most of it through one nginx upstream (`replicas_support::Nginx`):
//!
//! - a Garage node SIGKILLed during `nix copy --from` of a 501-path closure: no failed
//!   substitution, and no 5xx reaches the client;
//! - an upload through replica A is served by replica B once B's cached 404 expires (never
//!   before, and at most the negative TTL after B's 404);
//! - a NAR whose fill on A is held mid-body is served by B meanwhile, then by A to its client;
//! - a replica SIGKILLed mid-NAR: nix retries the download, and nginx sends the retry to the
//!   other replica;
//! - a replica whose node lost the other two is not ready (`/readyz` 503).
//!
//! Each test starts its own cluster, replicas and nginx, and the tests run one at a time (the
//! machine has 2 cores, and one test kills a storage node). The tests wait for nix and poll
//! logs on their runtime's threads; 4 workers leave the proxies threads to run on whatever
//! the core count.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod replicas_support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use replicas_support::*;

/// One test at a time (an async lock: each test holds it across awaits, in its own runtime).
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// A replica whose storage node has lost the rest of its cluster (the other two killed: as
/// if it were cut off from them) is not ready: its reads all fail, and a load balancer that
/// goes by `/readyz` (Caddy's `health_uri`, Kubernetes) must take it out of rotation. A
/// `HeadBucket`, which the node answers from its own metadata, said it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_whose_node_lost_its_cluster_is_not_ready() {
    let _serial = serial().await;
    let cluster = Cluster::start();
    let prefix = unique_prefix("quorum");
    let a = Shared::new("")
        .replica(cluster.store_env(&cluster.endpoints[0], &prefix))
        .await;
    let readyz = || async {
        reqwest::get(format!("{}/readyz", a.url))
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(readyz().await, 200);
    cluster.kill(1);
    cluster.kill(2);
    // Garage notices the lost nodes within seconds; until then it may still answer.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = readyz().await;
        if status == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {status}:\n{}",
            tail(&a.log(), 20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `nix copy --from url --store store path` trusting only `key`, with a fresh lookup cache.
fn copy_from(url: &str, key: &str, store: &Path, path: &str, xdg: &Path) -> Command {
    let mut c = nix("nix", xdg);
    c.args(["copy", "--from", url, "--store"]).arg(store).args([
        "--trusted-public-keys",
        key,
        path,
    ]);
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

/// The last `n` lines of `log` (a failure message prints what CI keeps: its end).
fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The WARN and ERROR lines of a cellar log, then its last `n` lines.
fn warnings_and_tail(log: &str, n: usize) -> String {
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    format!("{}\n...\n{}", warned.join("\n"), tail(log, n))
}

/// Access log lines for `needle` (e.g. `.narinfo`, `/nar/`).
fn lines_with<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(needle)).collect()
}

/// The client status of an access log line (the third field).
fn status(line: &str) -> u16 {
    line.split(' ').nth(2).unwrap().parse().unwrap()
}

/// A `name="value"` field of an access log line.
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let start = line.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
    let len = line[start..].find('"').unwrap();
    &line[start..start + len]
}

/// `nix copy --from` of a 501-path closure through nginx in front of replica A (reading
/// through Garage node 0) and B (node 1). Once 50 narinfo requests have been answered, node 0
/// is SIGKILLed: A's store is gone and the cluster runs on 2 of 3 nodes. The copy succeeds and
/// verifies, and no request the client made got a 5xx: what A could not answer (503) nginx
/// retried on B. B has served the closure before (its memory holds it); A does not prefetch,
/// so it still needs its store after the kill (a prefetching A may hold the whole closure by
/// then, and nothing it answers goes wrong).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_storage_node_killed_during_a_500_path_copy_fails_no_substitution() {
    let _serial = serial().await;
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
    let mut env_a = cluster.store_env(&cluster.endpoints[0], &prefix);
    env_a.push((
        "CELLAR_CACHE__PREFETCH_CONCURRENCY".to_owned(),
        "0".to_owned(),
    ));
    let a = shared.replica(env_a).await;
    let b = shared
        .replica(cluster.store_env(&cluster.endpoints[1], &prefix))
        .await;
    for path in &closure {
        let hash = &path.rsplit('/').next().unwrap()[..32];
        let narinfo = reqwest::get(format!("{}/{hash}.narinfo", b.url))
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .text()
            .await
            .unwrap();
        let url = narinfo
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .unwrap();
        reqwest::get(format!("{}/{url}", b.url))
            .await
            .unwrap()
            .error_for_status()
            .unwrap();
    }
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
    // 50 narinfos answered (nginx writes a line per request as it ends; one `.narinfo` each).
    wait_for_in_file(&lb.access_log_path(), ".narinfo", 50);
    assert!(
        child.try_wait().unwrap().is_none(),
        "the copy ended before the node was killed"
    );
    // Counted as the kill begins: what is answered while the node goes down is after it.
    let at_kill = lb.access_log().lines().count();
    cluster.kill(0);
    let out = child.wait_with_output().unwrap();
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "nix copy failed.\nA, last lines:\n{}\nB, warnings and last lines:\n{}\nnginx errors:\n{}\nnginx, answers other than 200:\n{}\nnix:\n{}",
        tail(&a.log(), 20),
        warnings_and_tail(&b.log(), 20),
        tail(&lb.error_log(), 20),
        lb.access_log()
            .lines()
            .filter(|l| status(l) != 200)
            .collect::<Vec<_>>()
            .join("\n"),
        String::from_utf8_lossy(&out.stderr),
    );
    verify(
        &store,
        &shared.public_key,
        &many,
        &work.path().join("xdg-v"),
    );

    let log = lb.access_log();
    let total = log.lines().count();
    // Most of the walk came after the kill (501 narinfos and 501 NARs at least).
    assert!(
        total - at_kill >= 500,
        "only {} of {total} requests after the kill",
        total - at_kill
    );
    let failed: Vec<&str> = log.lines().filter(|l| status(l) >= 500).collect();
    assert!(
        failed.is_empty(),
        "the client got 5xx:\n{}",
        failed.join("\n")
    );
    // What nginx tried on more than one replica (A's 503s, or A's refused connections).
    let retried = log.lines().filter(|l| l.contains(", ")).count();
    // A lost its store: what nginx sent it after the kill failed and went to B.
    assert!(retried >= 1, "nothing was retried on B:\n{log}");
    eprintln!(
        "kill-node: {total} requests, {} after the kill, {retried} retried on the other replica, copy took {took:?}",
        total - at_kill
    );
}

/// B's negative TTL in the upload test.
const NEGATIVE_TTL: Duration = Duration::from_secs(5);

/// B answers 404 for a path, the path is uploaded through A (`nix copy --to …/upload` with a
/// netrc token), A serves it at once, and B keeps answering 404 from its cached miss until
/// that expires: never 200 before `NEGATIVE_TTL` after its first 404, and 200 within
/// `NEGATIVE_TTL` (plus polling slack) after it. Then nix substitutes it from B.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_through_a_is_served_by_b_once_its_negative_ttl_expires() {
    let _serial = serial().await;
    let work = tempfile::tempdir().unwrap();
    let xdg = work.path().join("xdg");
    let (mid, closure) = build("mid", &["--argstr", "salt", "cellar-replicas-1"], &xdg);
    assert_eq!(closure.len(), 2);
    let hash = Fixture::hash(&mid).to_owned();

    let cluster = Cluster::start();
    let prefix = unique_prefix("negative-ttl");
    let (tok, tcfg) = token("ci", "write");
    let shared = Shared::new(&format!(
        "{tcfg}[cache]\nnarinfo_negative_ttl_secs = {}\n",
        NEGATIVE_TTL.as_secs()
    ));
    let a = shared
        .replica(cluster.store_env(&cluster.endpoints[0], &prefix))
        .await;
    let b = shared
        .replica(cluster.store_env(&cluster.endpoints[1], &prefix))
        .await;
    let narinfo = |srv: &Server| format!("{}/{hash}.narinfo", srv.url);

    // B's miss, cached from some moment after `asked`.
    let asked = Instant::now();
    assert_eq!(common::status(narinfo(&b)).await, 404);
    // Cached by then at the latest.
    let first_404 = asked.elapsed();

    let netrc = netrc(work.path(), &a, &tok);
    let mut up = nix("nix", &work.path().join("xdg-up"));
    up.args(["copy", "--to", &format!("{}/upload", a.url)])
        .args(["--option", "netrc-file"])
        .arg(&netrc)
        .arg(&mid);
    run_ok(up);
    let uploaded = asked.elapsed();
    assert_eq!(common::status(narinfo(&a)).await, 200, "A after its upload");

    // Poll B: 404 while its miss is cached, then 200.
    let mut cached_404s = 0;
    let served_after = loop {
        let code = common::status(narinfo(&b)).await;
        let at = asked.elapsed();
        if code == 200 {
            break at;
        }
        assert_eq!(code, 404);
        cached_404s += 1;
        // The miss expires NEGATIVE_TTL after it was cached (by `first_404`), and B's
        // next lookup takes a moment on a loaded machine.
        assert!(
            at < first_404 + NEGATIVE_TTL + Duration::from_secs(5),
            "B still answers 404 {at:?} after it was asked ({first_404:?} for its first 404)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        served_after >= NEGATIVE_TTL,
        "B answered 200 after {served_after:?}, before its negative TTL: its miss was not cached"
    );
    eprintln!(
        "negative-ttl: upload done {uploaded:?} after B's 404; B answered 404 {cached_404s} more times, then 200 after {served_after:?}"
    );

    let store = work.path().join("store");
    run_ok(copy_from(
        &b.url,
        &shared.public_key,
        &store,
        &mid,
        &work.path().join("xdg-b"),
    ));
    verify(&store, &shared.public_key, &mid, &work.path().join("xdg-v"));
}

/// Bytes of a NAR body a held store connection lets through before it holds.
const HOLD_AFTER: u64 = 256 << 10;

/// A 2 MiB NAR is being filled into A's NAR disk cache (A's store connection is held after
/// 256 KiB, so the fill stays in progress and A's client has part of it). Meanwhile nix asks B
/// for the same path: B fills its own cache from the cluster and serves it completely. Then A's
/// store connection is let go: A's fill completes and its client gets the whole NAR too. Both
/// stores verify, and both replicas end with the NAR on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nar_being_filled_on_a_and_requested_on_b_is_served_to_both() {
    let _serial = serial().await;
    let work = tempfile::tempdir().unwrap();
    let xdg = work.path().join("xdg");
    let (big, closure) = build("big", &[], &xdg);
    assert_eq!(closure.len(), 1);
    let cache = work.path().join("cache");
    copy_to_dir(&big, &cache, &xdg);

    let cluster = Cluster::start();
    let prefix = unique_prefix("fill");
    cluster.seed_dir(&prefix, &cache).await;
    let proxy_a = Proxy::start(&cluster.endpoints[0]).await;
    proxy_a.hold_after(HOLD_AFTER);
    let shared = Shared::new("");
    let nar_dir = |n: &str| {
        let d = work.path().join(n);
        (
            "CELLAR_CACHE__NAR_DIR".to_owned(),
            d.to_str().unwrap().to_owned(),
        )
    };
    let mut env_a = cluster.store_env(&proxy_a.url(), &prefix);
    env_a.push(nar_dir("nars-a"));
    let a = shared.replica(env_a).await;
    let mut env_b = cluster.store_env(&cluster.endpoints[1], &prefix);
    env_b.push(nar_dir("nars-b"));
    // B's NAR is read by its client's own GET (a miss), not ahead of it when the narinfo
    // passes: read ahead, it could be on disk before the client asks.
    env_b.push((
        "CELLAR_CACHE__PREFETCH_NAR_MAX_BYTES".to_owned(),
        "0".to_owned(),
    ));
    let b = shared.replica(env_b).await;

    let store_a = work.path().join("store-a");
    let mut child_a = copy_from(
        &a.url,
        &shared.public_key,
        &store_a,
        &big,
        &work.path().join("xdg-a"),
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // A's fill has started and is held mid-body.
    proxy_a.held().await;
    a.wait_for_log("NAR cache: miss", 1);
    assert!(child_a.try_wait().unwrap().is_none());

    let store_b = work.path().join("store-b");
    run_ok(copy_from(
        &b.url,
        &shared.public_key,
        &store_b,
        &big,
        &work.path().join("xdg-b"),
    ));
    verify(
        &store_b,
        &shared.public_key,
        &big,
        &work.path().join("xdg-vb"),
    );
    assert_eq!(b.log_count("NAR cache: miss"), 1, "{}", b.log());
    // A's fill was in progress all along.
    assert!(proxy_a.holding() >= 1);
    assert!(child_a.try_wait().unwrap().is_none());

    proxy_a.release();
    let out = child_a.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nix copy from A: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.log()
    );
    verify(
        &store_a,
        &shared.public_key,
        &big,
        &work.path().join("xdg-va"),
    );
    // Each replica completed its own fill: woken by its log's line, then its file is there.
    for (r, d) in [(&a, "nars-a"), (&b, "nars-b")] {
        r.wait_for_log("NAR cache: stored", 1);
        let files = walk(&work.path().join(d));
        assert!(
            files
                .iter()
                .any(|p| p.to_string_lossy().ends_with(".nar.xz")),
            "no NAR in {d}: {files:?}"
        );
    }
}

/// nginx in front of A and B (each reading the cluster through a proxy that holds a NAR body
/// after 256 KiB). nix asks for a 2 MiB path; whichever replica gets the NAR request is
/// SIGKILLed while its client holds part of the NAR. nginx cannot retry a response it has
/// begun, so the client sees its transfer cut; nix retries the download (from where it was
/// cut, with `Range`, since cellar sends `Accept-Ranges`), nginx finds the dead replica
/// refusing connections and sends the retry to the other, and the copy succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_mid_download_the_retry_through_the_other_succeeds() {
    let _serial = serial().await;
    let work = tempfile::tempdir().unwrap();
    let xdg = work.path().join("xdg");
    let (big, _) = build("big", &[], &xdg);
    let cache = work.path().join("cache");
    copy_to_dir(&big, &cache, &xdg);

    let cluster = Cluster::start();
    let prefix = unique_prefix("kill-replica");
    cluster.seed_dir(&prefix, &cache).await;
    let shared = Shared::new("");
    let mut proxies = Vec::new();
    let mut replicas = Vec::new();
    for i in 0..2 {
        let p = Proxy::start(&cluster.endpoints[i]).await;
        p.hold_after(HOLD_AFTER);
        // Only the client's own download reads the NAR: this is about the replica it went
        // through. (A replica serving a narinfo GET reads its NAR ahead otherwise.)
        let mut env = cluster.store_env(&p.url(), &prefix);
        env.push((
            "CELLAR_CACHE__PREFETCH_NAR_MAX_BYTES".to_owned(),
            "0".to_owned(),
        ));
        replicas.push(shared.replica(env).await);
        proxies.push(p);
    }
    let lb = Nginx::start(&[&replicas[0], &replicas[1]]);

    let store = work.path().join("store");
    let child = copy_from(
        &lb.url,
        &shared.public_key,
        &store,
        &big,
        &work.path().join("xdg-copy"),
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // A NAR held mid-body, by whichever replica the client reached.
    let victim = tokio::select! {
        () = proxies[0].held() => 0,
        () = proxies[1].held() => 1,
    };
    let survivor = 1 - victim;
    proxies[survivor].release();
    let st = Command::new("kill")
        .args(["-KILL", &replicas[victim].pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "nix copy failed:\n{stderr}\nnginx:\n{}\n{}",
        lb.access_log(),
        lb.error_log()
    );
    verify(&store, &shared.public_key, &big, &work.path().join("xdg-v"));

    // The NAR requests: the first was answered by the victim and cut; the last one was the
    // client's retry, answered by the survivor.
    let log = lb.access_log();
    let nars = lines_with(&log, "/nar/");
    let (victim_addr, survivor_addr) = (
        replicas[victim].addr.to_string(),
        replicas[survivor].addr.to_string(),
    );
    assert!(nars.len() >= 2, "{log}");
    assert_eq!(field(nars[0], "upstream"), victim_addr, "{log}");
    let last = nars[nars.len() - 1];
    assert!(
        field(last, "upstream").ends_with(&survivor_addr)
            && field(last, "ustatus")
                .rsplit(", ")
                .next()
                .unwrap()
                .starts_with("20"),
        "{log}"
    );
    eprintln!("kill-replica: nix said:\n{stderr}\nnginx:\n{log}");
}
