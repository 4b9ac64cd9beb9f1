//! What serving does for garbage collection: a narinfo whose NAR the server has seen missing
//! answers 404, nothing under the reserved prefix is served, and served narinfos end up in an
//! access record.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod gc_support;

use common::{walk, Server};
use gc_support::{local_env, Path};

#[tokio::test(flavor = "multi_thread")]
async fn a_narinfo_whose_nar_was_seen_missing_answers_404() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let lost = Path::new("lost-nar", 100, &[]);
    let kept = Path::new("kept-nar", 100, &[]);
    for p in [&lost, &kept] {
        std::fs::create_dir_all(data.join("nar")).unwrap();
        std::fs::write(data.join(p.narinfo_key()), p.narinfo()).unwrap();
        std::fs::write(data.join(p.nar_key()), &p.nar).unwrap();
    }
    std::fs::create_dir_all(data.join("_cellar/pins")).unwrap();
    std::fs::write(
        data.join("_cellar/pins/secret"),
        "cellar-pin 1\ncreated: 0\n",
    )
    .unwrap();
    let mut env = local_env(&data);
    // No prefetch: it would load the small NAR into memory before the test removes its file.
    env.push(("CELLAR_CACHE__PREFETCH_CONCURRENCY".into(), "0".into()));
    let srv = Server::start(env);
    let http = reqwest::Client::new();
    let get = |path: String| {
        let http = http.clone();
        let url = format!("{}/{path}", srv.url);
        async move { http.get(url).send().await.unwrap().status().as_u16() }
    };

    assert_eq!(get(lost.narinfo_key()).await, 200);
    std::fs::remove_file(data.join(lost.nar_key())).unwrap();
    assert_eq!(get(lost.nar_key()).await, 404);
    // Served from the memory cache until now; from here on it is "not in this cache".
    assert_eq!(get(lost.narinfo_key()).await, 404);
    assert_eq!(get(kept.narinfo_key()).await, 200);

    for reserved in [
        "_cellar/pins/secret",
        "_cellar/access/",
        "_cellar%2Fpins%2Fsecret",
    ] {
        assert_eq!(get(reserved.into()).await, 404, "{reserved}");
    }

    // The served narinfos are recorded as used, at the latest when the server stops.
    srv.stop();
    let dir = data.join("_cellar/access");
    let recorded = dir.exists()
        && walk(&dir)
            .iter()
            .any(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains(&kept.hash)));
    assert!(recorded, "no access record");
}
