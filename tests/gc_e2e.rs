//! End to end: `cellar gc --apply` on a cache written by the real nix, then the real nix client
//! substitutes a pinned closure and a recently read closure trusting only cellar's key, and an
//! expired, unpinned closure is gone completely.
//!
//! The local directory store is used here because its objects can be aged (file times); S3
//! objects cannot, and a test must not wait 30 days.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod gc_support;

use std::time::Duration;

use common::{
    netrc, nix, promtool_accepts, run, run_ok_stderr, substitute_and_verify, token, walk, Server,
};
use gc_support::{
    age_files, assert_readable_by_all, build_closure, cellar, copy_to_dir, hash_of, local_env, text,
};

/// `cellar gc --apply` run over SSH gets SIGHUP when the connection drops: it stops where that
/// is safe, as on SIGINT or SIGTERM, instead of ending mid-batch (SIGHUP's default), which may
/// leave an upload without a reference.
#[test]
fn a_hangup_stops_a_collection_where_that_is_safe() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    std::fs::create_dir_all(data.join("nar")).unwrap();
    let env = local_env(&data);
    let out = cellar(&["gc", "--apply"], &env);
    assert!(out.status.success(), "{}", text(&out));
    // More NARs than one batch deletes, all expired.
    for i in 0..100 {
        let p = gc_support::Path::new(&format!("hangup-{i}"), 64, &[]);
        std::fs::write(data.join(p.narinfo_key()), p.narinfo()).unwrap();
        std::fs::write(data.join(p.nar_key()), &p.nar).unwrap();
    }
    age_files(&data, Duration::from_secs(100 * 86400));
    let log = work.path().join("gc.log");
    let mut child = std::process::Command::new(gc_support::CELLAR)
        .args(["gc", "--apply"])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "warn")
        .stdout(std::fs::File::create(work.path().join("gc.out")).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // The first NARs announced: the run waits a few seconds before deleting them.
    let deleting = data.join("_cellar/deleting");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::fs::read_dir(&deleting).map_or(true, |mut d| d.next().is_none()) {
        assert!(std::time::Instant::now() < deadline, "no NARs announced");
        std::thread::sleep(Duration::from_millis(10));
    }
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let exit = child.wait().unwrap();
    let said = std::fs::read_to_string(&log).unwrap()
        + &std::fs::read_to_string(work.path().join("gc.out")).unwrap();
    assert!(
        exit.code().is_some(),
        "ended by the signal: {exit:?}\n{said}"
    );
    assert!(said.contains("stopped on request"), "{exit:?}\n{said}");
    let nars_left = std::fs::read_dir(data.join("nar")).unwrap().count();
    assert!(nars_left > 0, "the run went to the end: {said}");
}

/// A builder's Nix remembers every path it uploaded for 30 days (`narinfo-cache-positive-ttl`)
/// and does not ask about it again: once gc collected the path, that builder's plain `nix copy
/// --to` sends nothing, as gc.md says. Asking each time, as the README's builder advice does
/// (`--option narinfo-cache-positive-ttl 0`), uploads it again, and it substitutes whole.
#[test]
fn a_builder_asking_each_time_uploads_again_what_gc_collected() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let closure = build_closure("gc-e2e-repush", w);
    let data = w.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let (tok, cfg) = token("builder", "write");
    let env = local_env(&data);
    let push = |srv: &Server, extra: &[&str]| {
        let mut c = nix("nix", &w.join("xdg-builder"));
        c.args(["copy", "--to", &format!("{}/upload", srv.url)])
            .arg("--option")
            .arg("netrc-file")
            .arg(netrc(w, srv, &tok))
            .args(extra)
            .arg(&closure.top);
        run_ok_stderr(c)
    };
    let srv = Server::start_with_config(&cfg, env.clone());
    let said = push(&srv, &[]);
    assert!(said.contains("copying path"), "{said}");
    // The next server answers at the same URL: Nix keys what it remembers by it.
    let addr = srv.addr.to_string();
    srv.stop();
    // Unused for two days, with a retention of none: collected.
    age_files(&data, Duration::from_secs(2 * 86400));
    let mut gc_env = env.clone();
    gc_env.push(("CELLAR_GC__KEEP_DAYS".into(), "0".into()));
    let out = cellar(&["gc", "--apply"], &gc_env);
    assert!(out.status.success(), "{}", text(&out));
    let top_narinfo = data.join(format!("{}.narinfo", hash_of(&closure.top)));
    assert!(!top_narinfo.exists(), "not collected: {}", text(&out));

    let mut env = env;
    env.push(("CELLAR_LISTEN".into(), addr));
    let srv = Server::start_with_config(&cfg, env);
    let said = push(&srv, &[]);
    assert!(!said.contains("copying path"), "Nix asked again: {said}");
    assert!(!top_narinfo.exists());
    let said = push(&srv, &["--option", "narinfo-cache-positive-ttl", "0"]);
    assert!(said.contains("copying path"), "{said}");
    substitute_and_verify(&srv.url, &srv.public_key, &closure.top, &w.join("again"));
}

/// A builder pushing a closure the cache already has (every path found present, `copying 0
/// paths`) relies on it: a collection right after the push keeps it, whatever the retention,
/// as it keeps what an upload names. (Before, the probes were named only by the server's next
/// use record, minutes later, and a gc running then deleted the closure of a `nix copy --to`
/// that had just succeeded.)
#[test]
fn a_closure_a_builder_just_found_present_survives_a_collection() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let closure = build_closure("gc-e2e-found", w);
    let data = w.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let (tok, cfg) = token("builder", "write");
    let mut env = local_env(&data);
    // Uses are written long after the test ends: only what the push writes itself counts.
    env.push(("CELLAR_GC__ACCESS_FLUSH_SECS".into(), "86400".into()));
    let push = |srv: &Server| {
        let mut c = nix("nix", &w.join("xdg-builder"));
        c.args(["copy", "--to", &format!("{}/upload", srv.url)])
            .arg("--option")
            .arg("netrc-file")
            .arg(netrc(w, srv, &tok))
            .args(["--option", "narinfo-cache-positive-ttl", "0"])
            .arg(&closure.top);
        run_ok_stderr(c)
    };
    let srv = Server::start_with_config(&cfg, env.clone());
    let said = push(&srv);
    assert!(said.contains("copying path"), "{said}");
    srv.stop();
    // Unused for two days (its upload's records too), with a retention of none.
    age_files(&data, Duration::from_secs(2 * 86400));
    let srv = Server::start_with_config(&cfg, env.clone());
    let said = push(&srv);
    assert!(!said.contains("copying path"), "all present: {said}");
    let mut gc_env = env.clone();
    gc_env.push(("CELLAR_GC__KEEP_DAYS".into(), "0".into()));
    let out = cellar(&["gc", "--apply"], &gc_env);
    assert!(out.status.success(), "{}", text(&out));
    let top_narinfo = data.join(format!("{}.narinfo", hash_of(&closure.top)));
    assert!(top_narinfo.exists(), "collected: {}", text(&out));
    substitute_and_verify(&srv.url, &srv.public_key, &closure.top, &w.join("fresh"));
}

#[tokio::test(flavor = "multi_thread")]
async fn pinned_and_recently_read_closures_survive_gc_and_substitute() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let pinned = build_closure("gc-e2e-pinned", w);
    let read = build_closure("gc-e2e-read", w);
    let expired = build_closure("gc-e2e-expired", w);
    let data = w.join("data");
    copy_to_dir(&[&pinned.top, &read.top, &expired.top], &data, w);
    let env = local_env(&data);
    // cellar has served the cache since then: the first collection (the timer's) wrote when
    // its access records began.
    let out = cellar(&["gc", "--apply"], &env);
    assert!(out.status.success(), "{}", text(&out));
    assert!(data.join("_cellar/records-began").exists());
    // Everything was uploaded 100 days ago, beyond the default retention of 30 days.
    age_files(&data, Duration::from_secs(100 * 86400));

    let out = cellar(&["pin", "add", "release", &pinned.top], &env);
    assert!(out.status.success(), "{}", text(&out));
    let out = cellar(&["pin", "list"], &env);
    assert!(text(&out).contains(&format!("release (kept until removed)\n  {}", pinned.top)));

    // Read one closure through a server, stopped afterwards as systemd stops it: the record
    // of the read is written by then, an object under _cellar/access/ naming the top path.
    let server_env = env.clone();
    {
        let srv = Server::start(server_env.clone());
        substitute_and_verify(&srv.url, &srv.public_key, &read.top, &w.join("read-once"));
        srv.stop();
        assert!(
            access_recorded(&data, hash_of(&read.top)),
            "no access record"
        );
    }

    // Which NAR each path names (read before gc deletes any narinfo).
    let nar_urls: std::collections::HashMap<&str, String> = read
        .paths
        .iter()
        .chain(&expired.paths)
        .map(|p| (p.as_str(), nar_url(&data, p)))
        .collect();
    let before = walk(&data).len();
    let dry = cellar(&["gc"], &env);
    assert!(dry.status.success(), "{}", text(&dry));
    assert_eq!(walk(&data).len(), before, "dry run deleted something");
    let metrics = w.join("cellar-gc.prom");
    let out = cellar(
        &["gc", "--apply", "--metrics-file", metrics.to_str().unwrap()],
        &env,
    );
    let summary = text(&out);
    assert!(out.status.success(), "{summary}");
    assert!(summary.contains("pinned"), "{summary}");
    assert!(summary.contains("used within the retention"), "{summary}");
    // The same results for Prometheus (node_exporter's textfile collector), in a file the real
    // promtool accepts.
    let prom = std::fs::read_to_string(&metrics).unwrap();
    assert!(prom.contains("cellar_gc_applied 1\n"), "{prom}");
    for series in [
        "cellar_gc_paths{outcome=\"kept\",reason=\"pinned\"} ",
        "cellar_gc_paths{outcome=\"kept\",reason=\"recent\"} ",
        "cellar_gc_paths{outcome=\"deleted\",reason=\"expired\"} ",
    ] {
        let n: u64 = prom
            .lines()
            .find_map(|l| l.strip_prefix(series))
            .unwrap_or_else(|| panic!("{series} missing:\n{prom}"))
            .parse()
            .unwrap();
        assert!(n > 0, "{series}: {prom}");
    }
    assert!(prom.contains("cellar_gc_errors 0\n"), "{prom}");
    // What it deleted: every path it decided to.
    let decided: u64 = prom
        .lines()
        .filter_map(|l| l.strip_prefix("cellar_gc_paths{outcome=\"deleted\","))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum();
    assert!(decided > 0, "{prom}");
    assert!(
        prom.contains(&format!("cellar_gc_narinfos_deleted {decided}\n")),
        "{prom}"
    );
    assert!(
        summary.contains(&format!("deleted: {decided} narinfos\n")),
        "{summary}"
    );
    promtool_accepts(&metrics);
    assert_readable_by_all(&metrics);
    assert!(prom.contains("cellar_gc_last_run_failed 0\n"), "{prom}");
    let last_success = prom
        .lines()
        .find(|l| l.starts_with("cellar_gc_last_success_timestamp_seconds "))
        .unwrap_or_else(|| panic!("no last success:\n{prom}"))
        .to_owned();

    // A run that stops (a pin that does not parse: collecting could delete what it keeps)
    // says so in the file, which keeps when a run last ended and drops the last run's
    // numbers, instead of showing them as if nothing had happened.
    let broken_pin = data.join("_cellar/pins/broken");
    std::fs::write(&broken_pin, b"not a pin").unwrap();
    let out = cellar(
        &["gc", "--apply", "--metrics-file", metrics.to_str().unwrap()],
        &env,
    );
    assert!(!out.status.success(), "{}", text(&out));
    let failed = std::fs::read_to_string(&metrics).unwrap();
    assert!(failed.contains("cellar_gc_last_run_failed 1\n"), "{failed}");
    assert!(failed.contains(&format!("{last_success}\n")), "{failed}");
    assert!(!failed.contains("cellar_gc_paths"), "{failed}");
    promtool_accepts(&metrics);
    std::fs::remove_file(&broken_pin).unwrap();

    // The expired closure is gone completely, except what the kept ones share with it: the
    // same paths, and paths whose NAR a client read (a NAR read is a use of every path naming
    // it: the leaves of the closures have the same contents, so the same NAR).
    let kept: std::collections::HashSet<&str> = pinned
        .paths
        .iter()
        .chain(&read.paths)
        .map(|p| hash_of(p))
        .collect();
    let read_nars: std::collections::HashSet<&String> =
        read.paths.iter().map(|p| &nar_urls[p.as_str()]).collect();
    for p in &expired.paths {
        let h = hash_of(p);
        let exists = data.join(format!("{h}.narinfo")).exists();
        let shares_a_read_nar = read_nars.contains(&nar_urls[p.as_str()]);
        assert_eq!(
            exists,
            kept.contains(h) || shares_a_read_nar,
            "{p}: narinfo present = {exists}\n{summary}"
        );
    }
    assert!(
        expired
            .paths
            .iter()
            .any(|p| !data.join(format!("{}.narinfo", hash_of(p))).exists()),
        "nothing of the expired closure went\n{summary}"
    );
    // No narinfo left whose NAR or references are missing.
    let out = cellar(&["verify"], &env);
    assert!(out.status.success(), "{}", text(&out));

    let srv = Server::start(server_env);
    substitute_and_verify(
        &srv.url,
        &srv.public_key,
        &pinned.top,
        &w.join("after-pinned"),
    );
    substitute_and_verify(&srv.url, &srv.public_key, &read.top, &w.join("after-read"));
    let mut c = nix("nix", &w.join("xdg-expired"));
    c.args(["copy", "--from", &srv.url, "--store"])
        .arg(w.join("store-expired"))
        .args(["--trusted-public-keys", &srv.public_key, &expired.top]);
    let out = run(c);
    assert!(
        !out.status.success(),
        "the expired closure was still substitutable"
    );

    // Removing the pin makes its closure collectable; removing it twice is an error.
    let out = cellar(&["pin", "rm", "release"], &env);
    assert!(out.status.success(), "{}", text(&out));
    let out = cellar(&["pin", "rm", "release"], &env);
    assert!(
        text(&out).contains("no pin named \"release\""),
        "{}",
        text(&out)
    );
    let out = cellar(&["pin", "add", "../escape", &pinned.top], &env);
    assert!(!out.status.success() && text(&out).contains("invalid pin name"));
}

/// A cache written by `nix copy --to` long before cellar was put in front of it: no record
/// names its paths, since no cellar served them, so the first collections keep them all; once
/// the records cover a whole retention, what nobody used in it goes, and what was used stays
/// whole.
#[tokio::test(flavor = "multi_thread")]
async fn a_cache_from_before_cellar_keeps_its_paths_until_the_records_cover_the_retention() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let used = build_closure("gc-e2e-before-used", w);
    let unused = build_closure("gc-e2e-before-unused", w);
    let data = w.join("data");
    copy_to_dir(&[&used.top, &unused.top], &data, w);
    age_files(&data, Duration::from_secs(100 * 86400));
    let env = local_env(&data);
    let narinfo = |p: &str| data.join(format!("{}.narinfo", hash_of(p)));

    // Installed today; a client reads one closure; the nightly collection runs.
    let srv = Server::start(env.clone());
    substitute_and_verify(&srv.url, &srv.public_key, &used.top, &w.join("day-1"));
    srv.stop();
    let out = cellar(&["gc", "--apply"], &env);
    let summary = text(&out);
    assert!(out.status.success(), "{summary}");
    assert!(
        summary.contains("note: cellar's access records began on"),
        "{summary}"
    );
    assert!(
        summary.contains("written before the access records began"),
        "{summary}"
    );
    for p in used.paths.iter().chain(&unused.paths) {
        assert!(narinfo(p).exists(), "{p} went on the first day:\n{summary}");
    }
    assert!(data.join("_cellar/records-began").exists());

    // 31 days on (the default retention is 30), read again: the unused closure goes whole, the
    // used one stays whole.
    age_files(&data, Duration::from_secs(31 * 86400));
    let srv = Server::start(env.clone());
    substitute_and_verify(&srv.url, &srv.public_key, &used.top, &w.join("day-32"));
    srv.stop();
    // Except what shares a NAR with the used closure (both sources, and a leaf built to the
    // same bytes): a NAR read is a use of every path it holds.
    let used_nars: Vec<String> = used.paths.iter().map(|p| nar_url(&data, p)).collect();
    let gone: Vec<&String> = unused
        .paths
        .iter()
        .filter(|p| !used_nars.contains(&nar_url(&data, p)))
        .collect();
    assert!(gone.contains(&&unused.top));
    let out = cellar(&["gc", "--apply"], &env);
    let summary = text(&out);
    assert!(out.status.success(), "{summary}");
    assert!(
        !summary.contains("note: cellar's access records"),
        "{summary}"
    );
    for p in gone {
        assert!(!narinfo(p).exists(), "{p} stayed:\n{summary}");
    }
    let srv = Server::start(env);
    substitute_and_verify(&srv.url, &srv.public_key, &used.top, &w.join("after"));
}

/// Nix keeps the narinfos it read in its own cache for 30 days: the same user substituting
/// a closure again (a store wiped, a machine reinstalled) asks cellar for the NARs alone.
/// Those reads are uses of the paths too, so the closure survives a collection that comes
/// after the reads of its narinfos left the retention.
#[tokio::test(flavor = "multi_thread")]
async fn a_closure_fetched_again_through_the_clients_narinfo_cache_survives_gc() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let again = build_closure("gc-e2e-again", w);
    let expired = build_closure("gc-e2e-again-expired", w);
    let data = w.join("data");
    copy_to_dir(&[&again.top, &expired.top], &data, w);
    age_files(&data, Duration::from_secs(100 * 86400));
    // One server address and key throughout, as a deployment has: the client's cache is
    // keyed by the URL, and its narinfos carry the key's signatures.
    let key = w.join("cache.sec");
    let out = cellar(&["keygen", "cache-1", "--out", key.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let public_key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let port = quiet_port();
    let mut env = local_env(&data);
    env.push(("CELLAR_LISTEN".into(), format!("127.0.0.1:{port}")));
    env.push((
        "CELLAR_SIGNING__KEY_FILES".into(),
        key.to_str().unwrap().into(),
    ));
    // One user, whose client cache persists between the steps.
    let xdg = w.join("xdg-user");
    let substitute = |srv: &Server, store: &str| {
        let mut c = nix("nix", &xdg);
        c.args(["copy", "--from", &srv.url, "--store"])
            .arg(w.join(store))
            .args(["--trusted-public-keys", &public_key, &again.top]);
        let out = run(c);
        assert!(out.status.success(), "{}", text(&out));
    };
    let records = || walk(&data.join("_cellar/access"));

    let srv = Server::start(env.clone());
    substitute(&srv, "store-1");
    srv.stop();
    assert!(access_recorded(&data, hash_of(&again.top)));
    // Forty days on, the reads of its narinfos are past the retention (30 days).
    age_files(&data, Duration::from_secs(40 * 86400));
    let before = records();

    let srv = Server::start(env.clone());
    substitute(&srv, "store-2");
    srv.stop();
    let new: Vec<String> = records()
        .into_iter()
        .filter(|p| !before.contains(p))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    let new = new.concat();
    assert!(new.contains("\nnar/"), "no NAR read recorded: {new}");
    assert!(
        !new.contains(hash_of(&again.top)),
        "the client asked for a narinfo again: {new}"
    );

    let out = cellar(&["gc", "--apply"], &env);
    assert!(out.status.success(), "{}", text(&out));
    for p in &again.paths {
        let h = hash_of(p);
        assert!(
            data.join(format!("{h}.narinfo")).exists(),
            "{p} went:\n{}",
            text(&out)
        );
    }
    assert!(!data
        .join(format!("{}.narinfo", hash_of(&expired.top)))
        .exists());
    let srv = Server::start(env);
    substitute_and_verify(&srv.url, &public_key, &again.top, &w.join("after"));
}

/// The `URL:` of the narinfo of `path` in the store directory `data`.
fn nar_url(data: &std::path::Path, path: &str) -> String {
    let narinfo = data.join(format!("{}.narinfo", hash_of(path)));
    std::fs::read_to_string(narinfo)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap_or_default()
        .to_owned()
}

fn access_recorded(data: &std::path::Path, hash: &str) -> bool {
    let dir = data.join("_cellar/access");
    dir.exists()
        && walk(&dir)
            .iter()
            .any(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains(hash)))
}

/// A port where nothing listens, below Linux's ephemeral range (32768 and up, where outgoing
/// connections and listeners on port 0 get theirs) and below the Garage scripts' (20000 and
/// up): while the server is stopped between steps, nothing else of the run takes it.
fn quiet_port() -> u16 {
    let seed = std::process::id() as usize * 7919;
    (0..10_000)
        .map(|i| 10_000 + ((seed + i) % 10_000) as u16)
        .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        .expect("a free port in 10000-19999")
}
