//! Pull-through: cellar A (empty bucket in Garage) with cellar B (another binary cache over
//! HTTP, its own key) as upstream. The real nix client, configured with A only, substitutes
//! through the chain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// Cellar B: a local-directory cache holding `paths` of the fixture (xz).
fn upstream_with(paths: &[&str], work: &Path) -> Server {
    Server::start(upstream_env(paths, work))
}

/// The env of a cellar over a local directory holding `paths` of the fixture (xz).
fn upstream_env(paths: &[&str], work: &Path) -> Vec<(String, String)> {
    let f = fixture();
    let data = work.join("upstream-data");
    std::fs::create_dir_all(data.join("nar")).unwrap();
    for p in paths {
        let h = Fixture::hash(p);
        let ni = std::fs::read_to_string(f.xz_dir.join(format!("{h}.narinfo"))).unwrap();
        let url = ni.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap();
        std::fs::copy(f.xz_dir.join(url), data.join(url)).unwrap();
        std::fs::write(data.join(format!("{h}.narinfo")), ni).unwrap();
    }
    let log = f.xz_dir.join("log");
    if log.exists() {
        let mut cp = std::process::Command::new("cp");
        cp.arg("-r").arg(&log).arg(data.join("log"));
        run_ok(cp);
    }
    vec![
        ("CELLAR_STORE__KIND".into(), "local".into()),
        ("CELLAR_STORE__PATH".into(), data.to_str().unwrap().into()),
    ]
}

/// [`upstream_with`], private: reads need a token (the second value, for the upstream URL).
fn private_upstream_with(paths: &[&str], work: &Path) -> (Server, String) {
    let (read, rcfg) = token("puller", "read");
    let srv = Server::start_with_config(
        &format!("[auth]\nprivate = true\n{rcfg}"),
        upstream_env(paths, work),
    );
    (srv, read)
}

fn upstream_config(url: &str, key: &str, extra: &str) -> String {
    format!("[[upstreams]]\nurl = \"{url}\"\npublic_keys = [\"{key}\"]\ntimeout_secs = 2\n{extra}")
}

#[tokio::test(flavor = "multi_thread")]
async fn nix_substitutes_through_the_upstream_chain() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let all: Vec<&str> = f.closure.iter().map(String::as_str).collect();
    let b = upstream_with(&all, work.path());
    let app = App::s3("pull")
        .config(&upstream_config(&b.url, &b.public_key, ""))
        .spawn()
        .await;
    let a = &app.srv;

    substitute_and_verify(&a.url, &a.public_key, &f.top, &work.path().join("pull"));
    let mut r = nix("nix-store", &work.path().join("xdg-realise"));
    r.arg("--store")
        .arg(work.path().join("store-realise"))
        .args(["--realise", &f.top])
        .args(["--option", "substituters", &a.url])
        .args(["--option", "trusted-public-keys", &a.public_key]);
    run_ok(r);
    let mut l = nix("nix", &work.path().join("xdg-log"));
    l.args(["log", "--store", &a.url, &f.top]);
    assert!(run_ok(l).contains("building top"));

    // /metrics counts what A asked B, by upstream and result.
    let upstream = format!("upstream=\"{}\"", b.url);
    let asked = |result: &'static str| {
        let result = format!("result=\"{result}\"");
        let upstream = upstream.clone();
        async move {
            let labels = [upstream.as_str(), result.as_str()];
            metric_sum(a, "cellar_upstream_requests_total", &labels).await
        }
    };
    // At least a narinfo and a NAR for each path of the closure, and the log.
    let ok = asked("ok").await;
    assert!(ok >= 2.0 * f.closure.len() as f64 + 1.0, "{ok}");
    assert_eq!(asked("error").await + asked("timeout").await, 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_narinfos_without_a_valid_signature_are_refused() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let b = upstream_with(&[f.top.as_str()], work.path());
    // Trust a key B does not sign with (same name, other material).
    let out = std::process::Command::new(CELLAR)
        .args(["keygen", "cellar-test-1", "--out"])
        .arg(work.path().join("other.sec"))
        .output()
        .unwrap();
    let wrong = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let app = App::s3("pull-bad")
        .config(&upstream_config(&b.url, &wrong, ""))
        .spawn()
        .await;
    let a = &app.srv;
    let r = reqwest::get(format!("{}/{}.narinfo", a.url, Fixture::hash(&f.top)))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(a.log().contains("upstream narinfo refused"), "{}", a.log());
}

/// An upstream that accepts connections and never answers, and tells which it was sent.
struct DeadUpstream {
    addr: std::net::SocketAddr,
    accepted: tokio::sync::mpsc::UnboundedReceiver<std::net::SocketAddr>,
}

impl DeadUpstream {
    async fn start() -> Self {
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = dead.local_addr().unwrap();
        let (tx, accepted) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, peer)) = dead.accept().await {
                held.push(s);
                let _ = tx.send(peer);
            }
        });
        Self { addr, accepted }
    }

    /// How many connections cellar opened since the last call. Connections are accepted in
    /// the order they were made: once a connection of the test's own made now is accepted,
    /// every earlier one has been counted.
    async fn connections_since_last(&mut self) -> usize {
        let marker = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let mine = marker.local_addr().unwrap();
        let mut n = 0;
        while let Some(peer) = self.accepted.recv().await {
            if peer == mine {
                return n;
            }
            n += 1;
        }
        unreachable!("the listener task ended")
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_upstream_is_a_miss_within_its_timeout() {
    let mut dead = DeadUpstream::start().await;
    let key = "cellar-test-1:/+L0Q/jKhm6dU1WL+m92avPr/xAL77BfJ3lwg3EXluU=";
    let app = App::s3("pull-dead")
        .config(&upstream_config(&format!("http://{}", dead.addr), key, ""))
        .spawn()
        .await;
    let a = &app.srv;
    // Three failures in a row (cellar's FAILURES_IN_A_ROW) make the upstream skipped.
    for h in ["a", "b", "c"] {
        let url = format!("{}/{h:0>32}.narinfo", a.url);
        let t = Instant::now();
        let res = reqwest::get(&url).await.unwrap();
        assert_eq!(res.status(), 404);
        // A miss while the upstream failed: not to be kept by anything in front.
        assert_eq!(res.headers()["cache-control"], "no-store");
        // timeout_secs = 2: a miss, not a hang (a bound against hanging, generous for a
        // loaded machine: what it guards is a wait of minutes).
        assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
        assert!(
            dead.connections_since_last().await >= 1,
            "the upstream was asked"
        );
    }
    // Then it is skipped: the next miss does not even connect to it, and is an ordinary one.
    let url2 = format!("{}/{}.narinfo", a.url, "0000000000000000000000000000000d");
    let res = reqwest::get(&url2).await.unwrap();
    assert_eq!(res.status(), 404);
    assert_ne!(res.headers()["cache-control"], "no-store");
    assert_eq!(dead.connections_since_last().await, 0, "asked again");
    assert!(a.log().contains("upstream unavailable"), "{}", a.log());
    // A NAR only an unreachable upstream could have is 503 (Nix retries it), not a final 404.
    let nar = format!(
        "{}/nar/{}.nar.xz",
        a.url, "0000000000000000000000000000000000000000000000000000"
    );
    assert_eq!(reqwest::get(&nar).await.unwrap().status(), 503);
}

/// With its upstream down, a build log neither the bucket nor a reachable upstream has is
/// "not available" to the real client at once: `nix log` says so, instead of failing on a 503
/// after its retries; the closure itself still substitutes from the bucket.
#[tokio::test(flavor = "multi_thread")]
async fn nix_log_says_not_available_while_the_upstream_is_down() {
    let f = fixture();
    let dead = DeadUpstream::start().await;
    let key = "cellar-test-1:/+L0Q/jKhm6dU1WL+m92avPr/xAL77BfJ3lwg3EXluU=";
    let app = App::s3("pull-dead-log")
        .seed_dir(&f.xz_dir)
        .config(&upstream_config(&format!("http://{}", dead.addr), key, ""))
        .spawn()
        .await;
    let a = &app.srv;
    let drv = f.top_drv.rsplit('/').next().unwrap();
    // The bucket has no log of top: remove the one the fixture's cache holds.
    s3_client(&app.s3)
        .delete_object()
        .bucket(&app.s3.bucket)
        .key(format!("{}log/{drv}", app.prefix))
        .send()
        .await
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let mut l = nix("nix", &work.path().join("xdg"));
    l.args(["log", "--store", &a.url, &f.top]);
    let out = l.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("is not available"), "{stderr}");
    assert!(!stderr.contains("503"), "{stderr}");
    substitute_and_verify(&a.url, &a.public_key, &f.top, work.path());
}

#[tokio::test(flavor = "multi_thread")]
async fn head_of_a_nar_only_the_upstream_has_is_its_size() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let leaf = f.closure.iter().find(|p| p.ends_with("-leaf")).unwrap();
    let b = upstream_with(&[leaf.as_str()], work.path());
    let app = App::s3("pull-head")
        .config(&upstream_config(&b.url, &b.public_key, ""))
        .spawn()
        .await;
    let a = &app.srv;
    let ni =
        std::fs::read_to_string(f.xz_dir.join(format!("{}.narinfo", Fixture::hash(leaf)))).unwrap();
    let url = ni.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap();
    let nar = format!("{}/{url}", a.url);
    let c = reqwest::Client::new();
    // HEAD first: nothing a GET does can have brought the NAR closer.
    let head = c.head(&nar).send().await.unwrap();
    assert_eq!(head.status(), 200, "HEAD {nar}\n{}", a.log());
    // A HEAD response has no body: the size is in the header.
    let len: u64 = head.headers()[reqwest::header::CONTENT_LENGTH]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let get = c.get(&nar).send().await.unwrap();
    assert_eq!(get.status(), 200, "GET {nar}");
    let body = get.bytes().await.unwrap();
    assert_eq!(len, body.len() as u64);
    assert_eq!(body, std::fs::read(f.xz_dir.join(url)).unwrap());
}

/// A path mirrored brings its closure: asked only for `mid` (no prefetch to ask for the rest),
/// cellar copies `leaf`, which `mid` refers to, then `mid`; with the upstream gone, the real
/// client substitutes `mid`'s closure from the bucket alone. The NARs are re-encoded on the
/// way in (`upload.compression`): `mid`'s narinfo, served from memory before as the
/// upstream's (naming its `.nar.xz`), is the stored one's now (a 503 before).
#[tokio::test(flavor = "multi_thread")]
async fn mirrored_paths_land_in_the_bucket() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let leaf = f.closure.iter().find(|p| p.ends_with("-leaf")).unwrap();
    let mid = f.closure.iter().find(|p| p.ends_with("-mid")).unwrap();
    let b = upstream_with(&[leaf.as_str(), mid.as_str()], work.path());
    let app = App::s3("pull-mirror")
        .config(&upstream_config(&b.url, &b.public_key, "mirror = true\n"))
        .env("CELLAR_CACHE__PREFETCH_CONCURRENCY", "0")
        .env("CELLAR_UPLOAD__COMPRESSION", "zstd")
        .spawn()
        .await;
    let (a, s3, prefix) = (&app.srv, &app.s3, &app.prefix);
    let r = reqwest::get(format!("{}/{}.narinfo", a.url, Fixture::hash(mid)))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Mirroring runs in the background; the server logs each path it has copied.
    a.wait_for_log("mirrored from upstream", 1);
    for p in [leaf, mid] {
        let h = Fixture::hash(p);
        assert!(
            s3_exists(s3, &format!("{prefix}{h}.narinfo")).await,
            "{p} not mirrored:\n{}",
            a.log()
        );
    }
    // The stored narinfos' NARs are in the bucket too, and B is no longer needed.
    drop(b);
    let work2 = tempfile::tempdir().unwrap();
    let mut c = nix("nix", &work2.path().join("xdg"));
    c.args(["copy", "--from", &a.url, "--store"])
        .arg(work2.path().join("store"))
        .args(["--trusted-public-keys", &a.public_key, mid]);
    run_ok(c);
}

/// One Nix user uploads `mid` to cellar `a` (write token `w`) while `leaf`, its reference,
/// is at `a`'s upstream, then substitutes `mid` from `a` into a fresh store. The upload goes
/// to the root URL, whose probes see what the upstream serves: only mid is uploaded (the
/// upload address would upload leaf too).
fn upload_on_top_then_substitute(a: &Server, w: &str, work: &Path, leaf: &str, mid: &str) {
    let n = netrc(work, a, w);
    let mut c = nix("nix", &work.join("xdg-up"));
    c.args(["copy", "--to", &a.url, "--option", "netrc-file"])
        .arg(&n)
        .arg(mid);
    let out = run_ok_stderr(c);
    assert!(
        out.contains("-mid") && !out.contains(&format!("copying path '{leaf}'")),
        "{out}"
    );
    let mut c = nix("nix", &work.join("xdg-from"));
    c.args(["copy", "--from", &a.url, "--store"])
        .arg(work.join("store"))
        .args(["--trusted-public-keys", &a.public_key, mid]);
    run_ok(c);
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_may_reference_paths_the_upstream_has() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let leaf = f.closure.iter().find(|p| p.ends_with("-leaf")).unwrap();
    let mid = f.closure.iter().find(|p| p.ends_with("-mid")).unwrap();
    let b = upstream_with(&[leaf.as_str()], work.path());
    let (w, wcfg) = token("builder", "write");
    let app = App::s3("pull-upload")
        .config(&format!(
            "{}{wcfg}",
            upstream_config(&b.url, &b.public_key, "")
        ))
        .spawn()
        .await;
    let a = &app.srv;
    upload_on_top_then_substitute(a, &w, work.path(), leaf, mid);

    // `cellar verify` with A's config knows the upstream: mid's reference is not missing, so
    // --repair keeps mid. Without the upstream, the same bucket has a missing reference.
    let verify = |config: Option<&Path>, repair: bool| {
        let mut c = std::process::Command::new(CELLAR);
        c.arg("verify")
            .envs(s3_store_env(&app.s3, &app.s3.endpoint, &app.prefix))
            .env("RUST_LOG", "warn");
        if let Some(config) = config {
            c.arg("--config").arg(config);
        }
        if repair {
            c.arg("--repair");
        }
        c.output().unwrap()
    };
    let bare = verify(None, false);
    let out = String::from_utf8_lossy(&bare.stdout);
    assert_eq!(bare.status.code(), Some(1), "{out}");
    assert!(out.contains("missing-reference"), "{out}");
    let config = a.config_path();
    for repair in [true, false] {
        let o = verify(Some(&config), repair);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(out.contains("0 finding(s)"), "{out}");
        assert!(
            out.contains("1 reference(s) not in the store are served by upstreams"),
            "{out}"
        );
    }
    let mid_narinfo = format!("{}{}.narinfo", app.prefix, Fixture::hash(mid));
    assert!(
        s3_exists(&app.s3, &mid_narinfo).await,
        "--repair deleted mid"
    );
}

/// A private cellar as upstream, its read token in the URL: the real client substitutes
/// through it, and builders upload on top of what it has. Once that token is refused (revoked,
/// mistyped: a private cellar answers 403), the upstream is failing, not empty: `verify
/// --repair` stops rather than delete the paths that need what it serves.
#[tokio::test(flavor = "multi_thread")]
async fn a_private_upstream_refusing_its_token_is_failing_not_empty() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let leaf = f.closure.iter().find(|p| p.ends_with("-leaf")).unwrap();
    let mid = f.closure.iter().find(|p| p.ends_with("-mid")).unwrap();
    let (b, read) = private_upstream_with(&[leaf.as_str()], work.path());
    let with_token = |t: &str| b.url.replace("http://", &format!("http://cellar:{t}@"));
    let (w, wcfg) = token("builder", "write");
    let app = App::s3("private-upstream")
        .config(&format!(
            "{}{wcfg}",
            upstream_config(&with_token(&read), &b.public_key, "")
        ))
        .spawn()
        .await;
    let a = &app.srv;
    upload_on_top_then_substitute(a, &w, work.path(), leaf, mid);

    let good = std::fs::read_to_string(a.config_path()).unwrap();
    let revoked = work.path().join("revoked.toml");
    std::fs::write(
        &revoked,
        good.replace(&with_token(&read), &with_token("cellar_revoked")),
    )
    .unwrap();
    let verify = |config: &Path| {
        let mut c = std::process::Command::new(CELLAR);
        c.args(["verify", "--repair", "--config"])
            .arg(config)
            .envs(s3_store_env(&app.s3, &app.s3.endpoint, &app.prefix))
            .env("RUST_LOG", "warn");
        c.output().unwrap()
    };
    let o = verify(&revoked);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(o.status.code(), Some(2), "{out}{err}");
    assert!(
        err.contains("an upstream cache could not be asked")
            && err.contains(&format!("{}.narinfo", Fixture::hash(leaf))),
        "{err}"
    );
    let mid_narinfo = format!("{}{}.narinfo", app.prefix, Fixture::hash(mid));
    assert!(
        s3_exists(&app.s3, &mid_narinfo).await,
        "--repair deleted mid"
    );
    let o = verify(&a.config_path());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("0 finding(s)"), "{out}");
}

/// A stand-in for nix-serve or harmonia (`style`) serving a `file://` copy of the fixture's
/// closure, uncompressed and signed with a key of its own: their narinfo URLs, their NARs
/// streamed chunked without a length (tests/fixtures/other_cache_server.py says why it is a
/// stand-in). Killed when dropped.
struct OtherServer {
    url: String,
    public_key: String,
    child: std::process::Child,
}

impl OtherServer {
    fn start(style: &str, work: &Path) -> Self {
        use std::io::BufRead as _;
        let f = fixture();
        let xdg = work.join(format!("xdg-{style}"));
        let sec = work.join(format!("{style}.sec"));
        let mut k = nix("nix", &xdg);
        k.args(["key", "generate-secret", "--key-name", style]);
        std::fs::write(&sec, run_ok(k)).unwrap();
        let mut p = nix("nix", &xdg);
        p.args(["key", "convert-secret-to-public"])
            .stdin(std::fs::File::open(&sec).unwrap());
        let public_key = run_ok(p).trim().to_owned();
        let dir = work.join(format!("cache-{style}"));
        let mut c = nix("nix", &xdg);
        c.args(["copy", "--to"])
            .arg(format!(
                "file://{}?compression=none&secret-key={}",
                dir.display(),
                sec.display()
            ))
            .arg(&f.top);
        run_ok(c);
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/other_cache_server.py");
        let mut child = std::process::Command::new("python3")
            .arg(script)
            .arg(style)
            .arg(&dir)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut port = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut port)
            .unwrap();
        Self {
            url: format!("http://127.0.0.1:{}", port.trim()),
            public_key,
            child,
        }
    }
}

impl Drop for OtherServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pull-through from the servers people run on a builder: nix-serve names NARs
/// `nar/<pathhash>-<narhash>.nar`, harmonia `nar/<narhash>.nar?hash=<pathhash>`, and both
/// stream them without a `Content-Length`. The real client substitutes the closure through
/// cellar, which passes their URLs on, streams a NAR it knows no size of as it comes (no
/// length, no ranges offered), and keeps those whose narinfo it served (`Compression: none`
/// gives the size): once the upstream is gone, the closure still substitutes from cellar.
#[tokio::test(flavor = "multi_thread")]
async fn nix_substitutes_from_nix_serve_and_harmonia() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let leaf = f.closure.iter().find(|p| p.ends_with("-leaf")).unwrap();
    for style in ["nix-serve", "harmonia"] {
        let other = OtherServer::start(style, work.path());
        let app = App::s3(&format!("pull-{style}"))
            .config(&upstream_config(&other.url, &other.public_key, ""))
            .spawn()
            .await;
        let a = &app.srv;
        let upstream_ni = reqwest::get(format!("{}/{}.narinfo", other.url, Fixture::hash(leaf)))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let field = |ni: &str, name: &str| {
            ni.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .map(str::to_owned)
        };
        let url = field(&upstream_ni, "URL").unwrap();
        let want = if style == "nix-serve" {
            format!("nar/{}-", Fixture::hash(leaf))
        } else {
            "?hash=".to_owned()
        };
        assert!(url.contains(&want), "{style}: {upstream_ni}");

        // Asked for before its narinfo, a NAR comes as sent: no length, no ranges.
        let nar = reqwest::get(format!("{}/{url}", a.url)).await.unwrap();
        assert_eq!(nar.status(), 200, "{style}: GET {url}\n{}", a.log());
        assert!(
            !nar.headers().contains_key(reqwest::header::ACCEPT_RANGES),
            "{style}: ranges offered on a NAR of unknown length"
        );
        let direct = reqwest::get(format!("{}/{url}", other.url))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(nar.bytes().await.unwrap(), direct, "{style}");

        substitute_and_verify(&a.url, &a.public_key, &f.top, &work.path().join(style));

        // The narinfo keeps the upstream's NAR URL and gives the size it lacked.
        let ni = reqwest::get(format!("{}/{}.narinfo", a.url, Fixture::hash(leaf)))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(field(&ni, "URL"), Some(url.clone()), "{style}: {ni}");
        assert_eq!(field(&upstream_ni, "FileSize"), None, "{upstream_ni}");
        assert_eq!(
            field(&ni, "FileSize"),
            field(&ni, "NarSize"),
            "{style}: {ni}"
        );
        let nar = reqwest::get(format!("{}/{url}", a.url)).await.unwrap();
        assert_eq!(nar.content_length(), Some(direct.len() as u64), "{style}");
        assert_eq!(nar.bytes().await.unwrap(), direct, "{style}");

        // Without the upstream, the closure (small NARs and a 2 MiB one) comes from cellar.
        drop(other);
        substitute_and_verify(
            &a.url,
            &a.public_key,
            &f.top,
            &work.path().join(format!("{style}-gone")),
        );
    }

    // Mirrored, a path is stored under harmonia's names, and substitutes without it.
    let fresh = work.path().join("mirror");
    std::fs::create_dir(&fresh).unwrap();
    let other = OtherServer::start("harmonia", &fresh);
    let app = App::s3("pull-harmonia-mirror")
        .config(&upstream_config(
            &other.url,
            &other.public_key,
            "mirror = true\n",
        ))
        .spawn()
        .await;
    let a = &app.srv;
    let ni = reqwest::get(format!("{}/{}.narinfo", a.url, Fixture::hash(leaf)))
        .await
        .unwrap();
    assert_eq!(ni.status(), 200);
    a.wait_for_log("mirrored from upstream", 1);
    drop(other);
    substitute_and_verify(
        &a.url,
        &a.public_key,
        leaf,
        &work.path().join("harmonia-mirrored"),
    );
}

/// Debug info links come through from an upstream as logs do, and lead to the upstream's NAR,
/// which cellar pulls through too; the path itself substitutes through the chain.
#[tokio::test(flavor = "multi_thread")]
async fn debug_info_links_come_through_from_the_upstream() {
    let work = tempfile::tempdir().unwrap();
    // Cellar B over a directory `nix copy --to 'file://…?index-debug-info=true'` wrote.
    let data = work.path().join("upstream-data");
    let path = debug_info_cache(work.path(), "cellar-upstream-debug", &data);
    let b = Server::start(vec![
        ("CELLAR_STORE__KIND".into(), "local".into()),
        ("CELLAR_STORE__PATH".into(), data.to_str().unwrap().into()),
    ]);
    let app = App::s3("pull-debuginfo")
        .config(&upstream_config(&b.url, &b.public_key, ""))
        .spawn()
        .await;
    let a = &app.srv;

    let id = "abcdef0123456789abcdef0123456789abcdef01";
    let sent = std::fs::read(data.join(format!("debuginfo/{id}.debug"))).unwrap();
    let res = reqwest::get(format!("{}/debuginfo/{id}.debug", a.url))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.bytes().await.unwrap(), sent);
    let link: serde_json::Value = serde_json::from_slice(&sent).unwrap();
    let nar = link["archive"]
        .as_str()
        .unwrap()
        .strip_prefix("../")
        .unwrap();
    let res = reqwest::get(format!("{}/{nar}", a.url)).await.unwrap();
    assert_eq!(res.status(), 200, "{nar}");
    assert_eq!(
        res.bytes().await.unwrap(),
        std::fs::read(data.join(nar)).unwrap()
    );
    assert_eq!(
        status(format!("{}/debuginfo/{}", a.url, "0".repeat(40))).await,
        404
    );
    substitute_and_verify(&a.url, &a.public_key, &path, &work.path().join("sub"));
}
