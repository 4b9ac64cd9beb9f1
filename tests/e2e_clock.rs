//! A cellar whose clock is off from the store's (a board without a battery-backed clock that
//! booted before NTP answered, a VM restored from a snapshot) goes by the store's time, learnt
//! from the `Date` of its answers: its requests are signed with it, and `gc` compares the
//! objects' dates with it. The clock is moved with libfaketime, for the cellar process only;
//! Garage and the nix client keep the machine's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// libfaketime, as Debian installs it (scripts/test installs the package).
fn libfaketime() -> PathBuf {
    let out = Command::new("dpkg")
        .args(["-L", "libfaketime"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .find(|l| l.ends_with("/libfaketime.so.1"))
        .map(PathBuf::from)
        .expect("libfaketime is installed (scripts/test installs it)")
}

/// The env that runs a process with its clock moved by `offset` (`-2d`, `+3h`). Timers keep
/// the real monotonic clock.
fn clock_moved(offset: &str) -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), libfaketime().display().to_string()),
        ("FAKETIME".into(), offset.into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}

fn nix_copy_to(url: &str, netrc: &Path, path: &str, work: &Path) {
    let mut c = nix("nix", &work.join("xdg-up"));
    c.args(["copy", "--to", url, "--option", "download-attempts", "1"])
        .arg("--option")
        .arg("netrc-file")
        .arg(netrc)
        .arg(path);
    run_ok(c);
}

/// A server two days behind the store (Garage refuses signatures more than a day off) takes
/// uploads and serves them, its large NARs through presigned URLs; a collector three hours ahead keeps what was written a moment ago
/// (within a grace period of an hour by the store's clock, not three hours old by its own).
#[tokio::test(flavor = "multi_thread")]
async fn a_cellar_whose_clock_is_off_goes_by_the_stores() {
    let f = fixture();
    let (w, wcfg) = token("builder", "write");
    // Large NARs are downloaded from Garage through presigned URLs, which must be valid by
    // Garage's clock too.
    let mut app = App::s3("clock-off")
        .config(&wcfg)
        .env("CELLAR_STORE__REDIRECT_NARS", "true")
        .env("CELLAR_STORE__PUBLIC_ENDPOINT", s3_env().endpoint.clone());
    for (k, v) in clock_moved("-2d") {
        app = app.env(&k, v);
    }
    let app = app.spawn().await;
    let srv = &app.srv;
    let work = tempfile::tempdir().unwrap();
    let netrc = netrc(work.path(), srv, &w);
    nix_copy_to(
        &format!("{}/upload?compression=zstd", srv.url),
        &netrc,
        &f.top,
        work.path(),
    );
    assert!(
        srv.log_count("the store's clock and this machine's disagree") >= 1,
        "{}",
        srv.log()
    );
    let offset = metric_sum(srv, "cellar_store_clock_offset_seconds", &[]).await;
    assert!((offset - 172_800.0).abs() <= 2.0, "clock offset {offset} s");
    // The start-up check, refused for its time, asked again with the store's.
    srv.wait_for_log("the store answers", 1);
    assert_eq!(
        srv.log_count("the store refuses cellar"),
        0,
        "{}",
        srv.log()
    );
    substitute_and_verify(
        &srv.url,
        &srv.public_key,
        &f.top,
        &work.path().join("first"),
    );
    assert!(
        srv.log_count("NAR redirected to the store") >= 1,
        "{}",
        srv.log()
    );

    // A NAR whose narinfo is still on its way, written just now.
    let orphan = format!("{}nar/{}.nar", app.prefix, "1".repeat(52));
    s3_put(&app.s3, &orphan, b"a NAR being uploaded".to_vec()).await;
    let mut env = s3_store_env(&app.s3, &app.s3.endpoint, &app.prefix);
    env.extend(clock_moved("+3h"));
    env.push(("CELLAR_GC__GRACE_SECS".into(), "3600".into()));
    let out = Command::new(CELLAR)
        .args(["gc", "--apply"])
        .envs(env)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "gc: {said}");
    assert!(
        said.contains("the store's clock and this machine's disagree"),
        "{said}"
    );
    assert!(
        s3_exists(&app.s3, &orphan).await,
        "a NAR written a moment ago was collected: {said}"
    );
    substitute_and_verify(
        &srv.url,
        &srv.public_key,
        &f.top,
        &work.path().join("after-gc"),
    );
}

/// A cellar started hours ahead of the store (beyond `upload.staging_max_age`, 6 hours) does
/// not take another replica's multipart upload in progress for an abandoned one: its
/// start-up cleanup dates uploads by the store's clock, which the listing's answer told.
#[tokio::test(flavor = "multi_thread")]
async fn a_cellar_ahead_of_the_store_leaves_uploads_in_progress_alone() {
    let s3 = s3_env();
    let prefix = unique_prefix("clock-ahead");
    let key = format!("{prefix}nar/{}.nar", "1".repeat(52));
    let client = s3_client(&s3);
    let started = client
        .create_multipart_upload()
        .bucket(&s3.bucket)
        .key(&key)
        .send()
        .await
        .unwrap();
    let mut env = s3_store_env(&s3, &s3.endpoint, &prefix);
    env.extend(clock_moved("+8h"));
    env.push(("RUST_LOG".into(), "info,cellar=debug".into()));
    let srv = tokio::task::spawn_blocking(move || Server::start_with_config("", env))
        .await
        .unwrap();
    srv.wait_for_log("stale unfinished uploads", 1);
    assert_eq!(
        srv.log_count("no stale unfinished uploads"),
        1,
        "{}",
        srv.log()
    );
    let uploads = client
        .list_multipart_uploads()
        .bucket(&s3.bucket)
        .prefix(&prefix)
        .send()
        .await
        .unwrap();
    let ids: Vec<_> = uploads
        .uploads()
        .iter()
        .filter_map(|u| u.upload_id())
        .collect();
    assert_eq!(ids, [started.upload_id().unwrap()]);
}
