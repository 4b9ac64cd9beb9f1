//! Garbage collection against a real Garage, over more than 1000 keys (several listing
//! pages): pinned closures stay whole, everything else goes, and no narinfo is left whose NAR
//! or references are missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod gc_support;

use std::time::{Duration, SystemTime};

use cellar::config::GcConfig;
use cellar::gc::{self, Quiet};
use common::{s3_env, s3_exists, s3_put, unique_prefix};
use futures::{StreamExt as _, TryStreamExt as _};
use gc_support::{s3_store, s3_store_via, Path};

#[tokio::test(flavor = "multi_thread")]
async fn gc_over_several_listing_pages_keeps_pinned_closures_whole() {
    let s3 = s3_env();
    let prefix = unique_prefix("gc-s3");
    // Chains of 5: each path refers to the one before it.
    let mut paths: Vec<Path> = Vec::new();
    for i in 0..600 {
        let p = if i % 5 == 0 {
            Path::new(&format!("s3gc-{i}"), 40, &[])
        } else {
            Path::new(&format!("s3gc-{i}"), 40, &[&paths[i - 1]])
        };
        paths.push(p);
    }
    futures::stream::iter(paths.iter().map(|p| {
        let (s3, prefix) = (&s3, &prefix);
        async move {
            s3_put(s3, &format!("{prefix}{}", p.nar_key()), p.nar.clone()).await;
            s3_put(s3, &format!("{prefix}{}", p.narinfo_key()), p.narinfo()).await;
        }
    }))
    .buffer_unordered(16)
    .collect::<Vec<()>>()
    .await;

    let store = s3_store(&s3, &prefix).await;
    // Pin the tops of the first 10 chains.
    let tops: Vec<usize> = (0..10).map(|c| c * 5 + 4).collect();
    let pinned = tops
        .iter()
        .map(|&i| paths[i].base().parse().unwrap())
        .collect();
    gc::pins::add(store.as_ref(), "tops", pinned, None, "/nix/store")
        .await
        .unwrap();

    // Nothing but pins is a root, and nothing is young: everything unpinned goes.
    let cfg = GcConfig {
        keep: Duration::ZERO,
        grace: Duration::ZERO,
        ..GcConfig::default()
    };
    let dry = gc::run(
        &store,
        "/nix/store",
        &cfg,
        &gc::Options {
            apply: false,
            now: SystemTime::now(),
            settle: gc::deleting::SETTLE,
            stop: Default::default(),
        },
        &Quiet,
    )
    .await
    .unwrap();
    assert_eq!(dry.deleted_paths(), 550, "{dry}");
    let s = gc::run(
        &store,
        "/nix/store",
        &cfg,
        &gc::Options {
            apply: true,
            now: SystemTime::now(),
            settle: gc::deleting::SETTLE,
            stop: Default::default(),
        },
        &Quiet,
    )
    .await
    .unwrap();
    assert!(s.errors.is_empty(), "{s}");

    for (i, p) in paths.iter().enumerate() {
        let kept = i < 50;
        let key = format!("{prefix}{}", p.narinfo_key());
        assert_eq!(s3_exists(&s3, &key).await, kept, "{key}");
        let nar = format!("{prefix}{}", p.nar_key());
        assert_eq!(s3_exists(&s3, &nar).await, kept, "{nar}");
    }
    let report = gc::verify::run(
        &store,
        "/nix/store",
        &gc::verify::Options {
            hashes: false,
            repair: false,
            sample: None,
            grace: Duration::ZERO,
            now: SystemTime::now(),
            settle: gc::deleting::SETTLE,
            stop: Default::default(),
            upstreams: None,
        },
        &Quiet,
    )
    .await
    .unwrap();
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    assert_eq!(report.narinfos_checked, 50);
}

/// A listing of the keys after one, as a collector's re-read of the access records asks for
/// it (records are named by the time their write began): against Garage, by either request
/// path (direct, and the SDK's), it has what sorts after that key under the prefix, over
/// several pages, and nothing before it.
#[tokio::test(flavor = "multi_thread")]
async fn a_listing_after_a_key_has_what_sorts_after_it() {
    let s3 = s3_env();
    let prefix = unique_prefix("list-after");
    let mut keys: Vec<String> = (0..1100).map(|i| format!("d/-{i:04}-x")).collect();
    // Named as records of earlier versions were: after every dated name.
    keys.extend(["d/0abc-1".to_owned(), "d/fedc-2-upload".to_owned()]);
    futures::stream::iter(keys.iter().map(|k| {
        let (s3, prefix) = (&s3, &prefix);
        async move { s3_put(s3, &format!("{prefix}{k}"), b"x".to_vec()).await }
    }))
    .buffer_unordered(16)
    .collect::<Vec<()>>()
    .await;
    s3_put(&s3, &format!("{prefix}e/-2000-y"), b"x".to_vec()).await;
    for direct in [true, false] {
        let store = s3_store_via(&s3, &prefix, direct).await;
        let mut got: Vec<String> = store
            .list_after("d/", "d/-0049-x")
            .map_ok(|o| o.key)
            .try_collect()
            .await
            .unwrap();
        got.sort();
        assert_eq!(got, keys[50..], "direct requests: {direct}");
        let all: Vec<_> = store.list("d/").try_collect().await.unwrap();
        assert_eq!(all.len(), keys.len());
    }
}
