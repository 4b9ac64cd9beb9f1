//! Builders as the README sets them up, with the real nix client against Garage: one Nix user
//! that uploads to `/upload` and substitutes from the root URL, directly and through the
//! README's nginx and Caddy examples over TLS; probes of `/upload` that
//! never reach an upstream; tokens reloaded on SIGHUP; two builders pushing their own builds
//! of a path that is not reproducible.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod replicas_support;

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;

/// `nix copy --to URL PATHS` with the netrc `netrc`, as the Nix user whose lookup cache is
/// `xdg`.
fn copy_to_command(url: &str, netrc: &Path, xdg: &Path, paths: &[&str]) -> std::process::Command {
    let mut c = nix("nix", xdg);
    c.args(["copy", "--to", url, "--option", "netrc-file"])
        .arg(netrc)
        .args(paths);
    c
}

fn copy_to(url: &str, netrc: &Path, xdg: &Path, paths: &[&str]) -> std::process::Output {
    run(copy_to_command(url, netrc, xdg, paths))
}

/// `nix copy --from URL --store STORE PATH` trusting only `key`, as the same Nix user.
fn copy_from_command(
    url: &str,
    key: &str,
    xdg: &Path,
    store: &Path,
    path: &str,
) -> std::process::Command {
    let mut c = nix("nix", xdg);
    c.args(["copy", "--from", url, "--store"]).arg(store).args([
        "--trusted-public-keys",
        key,
        path,
    ]);
    c
}

fn copy_from(url: &str, key: &str, xdg: &Path, store: &Path, path: &str) -> std::process::Output {
    run(copy_from_command(url, key, xdg, store, path))
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The README's builder setup, with recompression to zstd: one Nix user (one
/// `~/.cache/nix`) uploads to `/upload` and then substitutes from the root URL. Uploading to
/// the root URL instead, the same steps fail (the control that shows this test can fail).
#[tokio::test(flavor = "multi_thread")]
async fn one_nix_user_uploads_to_upload_then_substitutes_from_the_root() {
    let f = fixture();
    let (w, wcfg) = token("ci", "write");
    let config = format!("[upload]\ncompression = \"zstd\"\n{wcfg}");
    let work = tempfile::tempdir().unwrap();

    let app = App::s3("one-user").config(&config).spawn().await;
    let srv = &app.srv;
    let netrc = netrc(work.path(), srv, &w);
    let xdg = work.path().join("xdg-builder");
    let up = copy_to(&format!("{}/upload", srv.url), &netrc, &xdg, &[&f.top]);
    assert!(up.status.success(), "upload: {}", stderr(&up));
    let down = copy_from(
        &srv.url,
        &srv.public_key,
        &xdg,
        &work.path().join("store"),
        &f.top,
    );
    assert!(down.status.success(), "substitute: {}", stderr(&down));
    assert!(work
        .path()
        .join("store")
        .join(f.top.trim_start_matches('/'))
        .exists());

    // Control: the same user uploading to the root URL reads back its own unsigned narinfo.
    let app = App::s3("one-user-root").config(&config).spawn().await;
    let srv = &app.srv;
    let xdg = work.path().join("xdg-root-builder");
    let up = copy_to(&srv.url, &netrc, &xdg, &[&f.top]);
    assert!(up.status.success(), "upload to the root: {}", stderr(&up));
    let down = copy_from(
        &srv.url,
        &srv.public_key,
        &xdg,
        &work.path().join("store-root"),
        &f.top,
    );
    assert!(!down.status.success(), "the hazard did not reproduce");
    // Its own unsigned copy of an input-addressed path; for a content-addressed one (which
    // needs no signature), its copy's name of the NAR before recompression.
    let err = stderr(&down);
    assert!(
        err.contains("lacks a valid signature") || err.contains("does not exist in binary cache"),
        "{err}"
    );
}

/// The README's code block that holds `marker`, as written (without its info string).
fn readme_example(marker: &str) -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    readme
        .split("```")
        .skip(1)
        .step_by(2)
        .filter_map(|block| block.split_once('\n').map(|(_info, code)| code))
        .find(|code| code.contains(marker))
        .unwrap_or_else(|| panic!("the README has no example with {marker}"))
        .to_owned()
}

/// `example` with each `(from, to)` swapped, each `from` required to be there.
fn swapped(example: &str, swaps: &[(&str, String)]) -> String {
    swaps.iter().fold(example.to_owned(), |conf, (from, to)| {
        assert!(
            conf.contains(from),
            "the README's example lacks {from}:\n{example}"
        );
        conf.replace(from, to)
    })
}

/// One Nix user (README's builder setup) uploads the fixture's closure to `{url}/upload` with
/// the write token `token` and substitutes it from `url` into a fresh store, trusting `srv`'s
/// key and, for TLS, the certificate authority `ca`. `proxy_log` tells what the proxy saw.
fn upload_then_substitute(
    url: &str,
    ca: &str,
    srv: &Server,
    token: &str,
    work: &Path,
    proxy_log: impl Fn() -> String,
) {
    let f = fixture();
    let host = url
        .split("://")
        .nth(1)
        .and_then(|h| h.split(':').next())
        .unwrap();
    let netrc = work.join("netrc");
    std::fs::write(
        &netrc,
        format!("machine {host} login ci password {token}\n"),
    )
    .unwrap();
    let xdg = work.join("xdg");
    let mut up = copy_to_command(&format!("{url}/upload"), &netrc, &xdg, &[&f.top]);
    up.env("NIX_SSL_CERT_FILE", ca); // Nix 2.8 has no `ssl-cert-file` setting yet
    let up = run(up);
    assert!(
        up.status.success(),
        "upload: {}\nproxy: {}",
        stderr(&up),
        proxy_log()
    );
    let store = work.join("store");
    let mut down = copy_from_command(url, &srv.public_key, &xdg, &store, &f.top);
    down.env("NIX_SSL_CERT_FILE", ca);
    let down = run(down);
    assert!(
        down.status.success(),
        "substitute: {}\nproxy: {}",
        stderr(&down),
        proxy_log()
    );
    assert!(store.join(f.top.trim_start_matches('/')).exists());
}

/// The README's nginx example as written (its certificate paths swapped for a throwaway CA's,
/// its ports for free ones): one Nix user uploads a closure through it over TLS to `/upload`
/// and substitutes it from the root URL into a fresh store. A README example that nginx
/// refuses, or that does not pass uploads or NARs on, fails here.
#[tokio::test(flavor = "multi_thread")]
async fn the_readme_nginx_example_carries_uploads_and_substitution_over_tls() {
    let f = fixture();
    let (w, wcfg) = token("ci", "write");
    let work = tempfile::tempdir().unwrap();
    let app = App::s3("readme-nginx").config(&wcfg).spawn().await;
    let srv = &app.srv;
    let (ca, cert, key) = tls_certs(work.path());
    let example = readme_example("proxy_pass http://127.0.0.1:8080;");
    let nginx = replicas_support::Nginx::serving("https", |listen| {
        swapped(
            &example,
            &[
                ("listen 443 ssl;", format!("listen {listen} ssl;")),
                (
                    "/etc/letsencrypt/live/cache.example.org/fullchain.pem",
                    cert.clone(),
                ),
                (
                    "/etc/letsencrypt/live/cache.example.org/privkey.pem",
                    key.clone(),
                ),
                ("127.0.0.1:8080", srv.addr.to_string()),
            ],
        )
    });
    let url = nginx.url.replace("127.0.0.1", "localhost");
    upload_then_substitute(&url, &ca, srv, &w, work.path(), || {
        format!("{}\n{}", nginx.access_log(), nginx.error_log())
    });
    kept_for_the_host(&url, &ca, srv);
    // Both went through nginx: the uploads to /upload, the NARs from the root.
    wait_for_in_file(&nginx.access_log_path(), "GET /nar/", f.closure.len());
    let log = nginx.access_log();
    let puts = log
        .lines()
        .filter(|l| l.starts_with("PUT /upload/") && l.contains(".narinfo 201"))
        .count();
    assert_eq!(puts, f.closure.len(), "{log}");
}

/// Caddy, running the README's site block as written (its name swapped for `localhost` on a
/// free port, which Caddy certifies with its own local authority instead of Let's Encrypt).
struct Caddy {
    url: String,
    /// Caddy's local certificate authority, which clients are to trust.
    ca: String,
    log: std::path::PathBuf,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Caddy {
    fn start(site: impl Fn(&str) -> String) -> Caddy {
        // Ports found free may be taken before Caddy binds them: tried again then.
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path().to_owned();
            let free = || {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            };
            let (https, http) = (free(), free());
            let address = format!("localhost:{https}");
            // Global options: no admin endpoint, no root certificate installed into the
            // system's trust store, plain HTTP on a free port, state in the test's directory.
            let conf = format!(
                "{{\n\tadmin off\n\tskip_install_trust\n\tauto_https disable_redirects\n\
                 \thttp_port {http}\n\tstorage file_system {}\n}}\n\n{}",
                d.join("data").display(),
                site(&address)
            );
            std::fs::write(d.join("Caddyfile"), conf).unwrap();
            let log = d.join(format!("caddy-{https}.log"));
            let child = std::process::Command::new("caddy")
                .args(["run", "--adapter", "caddyfile", "--config"])
                .arg(d.join("Caddyfile"))
                .env("HOME", &d)
                .env("XDG_CONFIG_HOME", d.join("config"))
                .env("XDG_DATA_HOME", d.join("data"))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("caddy (scripts/test installs it)");
            let caddy = Caddy {
                url: format!("https://{address}"),
                ca: d
                    .join("data/pki/authorities/local/root.crt")
                    .display()
                    .to_string(),
                log,
                child,
                _dir: dir,
            };
            // Serving once its certificate is made; a lost race for a port ends it at once.
            wait_for_file(&caddy.log, "Caddy serving or failing", |t| {
                t.contains("certificate obtained successfully") || t.contains("Error:")
            });
            let text = caddy.log_text();
            if !text.contains("Error:") {
                return caddy;
            }
            assert!(
                text.contains("address already in use"),
                "caddy failed:\n{text}"
            );
        }
        panic!("caddy found no free port in five tries");
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Caddy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The README's Caddy example as written (its site name swapped for `localhost` on a free
/// port, as Caddy certifies it itself offline): one Nix user uploads through it over TLS to
/// `/upload` and substitutes from the root URL. A README example that Caddy refuses (say, a
/// directive of another Caddy version), or that does not pass requests on, fails here.
#[tokio::test(flavor = "multi_thread")]
async fn the_readme_caddy_example_carries_uploads_and_substitution_over_tls() {
    let (w, wcfg) = token("ci", "write");
    let work = tempfile::tempdir().unwrap();
    let app = App::s3("readme-caddy").config(&wcfg).spawn().await;
    let srv = &app.srv;
    let example = readme_example("reverse_proxy 127.0.0.1:8080");
    let caddy = Caddy::start(|address| {
        swapped(
            &example,
            &[
                ("cache.example.org", address.to_owned()),
                ("127.0.0.1:8080", srv.addr.to_string()),
            ],
        )
    });
    upload_then_substitute(&caddy.url, &caddy.ca, srv, &w, work.path(), || {
        caddy.log_text()
    });
    kept_for_the_host(&caddy.url, &caddy.ca, srv);
}

/// The status code of a GET of `url` by curl, trusting the certificate authority `ca`.
fn status_code(url: &str, ca: &str) -> String {
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cacert",
            ca,
            url,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Through the proxy at `url`, `/metrics` and `/status` (which names the bucket) are 404 while
/// cellar itself (`srv`, on the host) answers them, and the cache is served.
fn kept_for_the_host(url: &str, ca: &str, srv: &Server) {
    for path in ["/metrics", "/status"] {
        assert_eq!(status_code(&format!("{url}{path}"), ca), "404", "{path}");
        assert_eq!(
            status_code(&format!("{}{path}", srv.url), ca),
            "200",
            "{path}"
        );
    }
    assert_eq!(status_code(&format!("{url}/nix-cache-info"), ca), "200");
}

/// A binary cache over HTTP that counts every request for an object (not `nix-cache-info`):
/// an upstream that may never be asked.
struct CountingUpstream {
    url: String,
    requests: Arc<AtomicUsize>,
}

async fn counting_upstream(dir: &Path) -> CountingUpstream {
    use axum::extract::{Path as UrlPath, State};
    use axum::http::StatusCode;
    let requests = Arc::new(AtomicUsize::new(0));
    let dir = dir.to_owned();
    let counter = requests.clone();
    let serve = |State((dir, n)): State<(std::path::PathBuf, Arc<AtomicUsize>)>,
                 UrlPath(file): UrlPath<String>| async move {
        // Not the server's one look at its store directory when it starts.
        if file != "nix-cache-info" {
            n.fetch_add(1, Ordering::SeqCst);
        }
        match std::fs::read(dir.join(file)) {
            Ok(b) => (StatusCode::OK, b),
            Err(_) => (StatusCode::NOT_FOUND, Vec::new()),
        }
    };
    let app = axum::Router::new()
        .route("/{*file}", axum::routing::get(serve))
        .with_state((dir, counter));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    CountingUpstream { url, requests }
}

/// `nix copy --to …/upload` of a 501-path closure, with an upstream that has half of it:
/// not one request reaches the upstream, and every path is uploaded (the upstream's half
/// included, since the store lacks it).
#[tokio::test(flavor = "multi_thread")]
async fn upload_probes_never_reach_the_upstream() {
    let work = tempfile::tempdir().unwrap();
    let xdg = work.path().join("xdg");
    let expr = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/closure.nix");
    let mut b = nix("nix-build", &xdg);
    b.arg(&expr).args(["-A", "many", "--no-out-link"]);
    let many = run_ok(b).trim().to_owned();
    let mut q = nix("nix-store", &xdg);
    q.args(["-qR", &many]);
    let closure: Vec<String> = run_ok(q).lines().map(str::to_owned).collect();
    assert_eq!(closure.len(), 501);

    // The upstream: half of the small paths, signed by its own key.
    let key = work.path().join("up.sec");
    let up_pub = nix_key("upstream-1", &key, &xdg);
    let half: Vec<&str> = closure
        .iter()
        .filter(|p| p.contains("-small-"))
        .take(250)
        .map(String::as_str)
        .collect();
    let mut s = nix("nix", &xdg);
    s.args(["store", "sign", "--key-file"])
        .arg(&key)
        .args(&half);
    run_ok(s);
    let up_dir = work.path().join("upstream");
    let mut c = nix("nix", &xdg);
    c.args(["copy", "--to", &format!("file://{}", up_dir.display())])
        .args(&half);
    run_ok(c);
    let upstream = counting_upstream(&up_dir).await;
    // The upstream answers: a sanity check that the count below could be non-zero.
    let probe = format!("{}/{}.narinfo", upstream.url, Fixture::hash(half[0]));
    assert_eq!(reqwest::get(&probe).await.unwrap().status(), 200);
    let before = upstream.requests.load(Ordering::SeqCst);

    let (w, wcfg) = token("ci", "write");
    let config = format!(
        "{wcfg}[[upstreams]]\nurl = \"{}\"\npublic_keys = [\"{up_pub}\"]\n",
        upstream.url
    );
    let app = App::s3("probes").config(&config).spawn().await;
    let srv = &app.srv;
    let netrc = netrc(work.path(), srv, &w);
    let out = copy_to(&format!("{}/upload", srv.url), &netrc, &xdg, &[&many]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        upstream.requests.load(Ordering::SeqCst),
        before,
        "an upload reached the upstream"
    );
    assert_eq!(srv.log_count("narinfo uploaded"), 501);
    for p in &closure {
        let key = format!("{}{}.narinfo", app.prefix, Fixture::hash(p));
        assert!(s3_exists(&app.s3, &key).await, "{p} was not uploaded");
    }
}

/// SIGHUP: a token added to the config file and a rotated key file work without a restart, a
/// broken config or key file keeps the running one, and a download in flight finishes across
/// a reload.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_tokens_and_keys_and_keeps_the_old_ones_on_a_broken_config() {
    let (a, acfg) = token("a", "write");
    let (b, bcfg) = token("b", "write");
    // A large object to be downloading while the reload happens.
    let name = "1111111111111111111111111111111111111111111111111111.nar";
    let big: Vec<u8> = (0..(48u32 << 20)).map(|i| (i % 253) as u8).collect();
    let f = fixture();
    let app = App::s3("reload")
        .config(&acfg)
        .seed(format!("nar/{name}"), big.clone())
        .seed_dir(&f.xz_dir)
        .spawn()
        .await;
    let srv = &app.srv;
    let client = reqwest::Client::new();
    let probe = |tok: String| {
        let c = client.clone();
        let url = format!("{}/upload/nix-cache-info", srv.url);
        async move { c.get(url).bearer_auth(tok).send().await.unwrap().status() }
    };
    assert_eq!(probe(a.clone()).await, 200);
    assert_eq!(probe(b.clone()).await, 403);
    // The closure's narinfos, signed with the first key, are now in memory.
    let work = tempfile::tempdir().unwrap();
    substitute_and_verify(
        &srv.url,
        &srv.public_key,
        &f.top,
        &work.path().join("first"),
    );

    // A download that has started (headers and a first byte read) when the reload happens.
    let mut dl = std::net::TcpStream::connect(srv.addr).unwrap();
    write!(
        dl,
        "GET /nar/{name} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut first = [0u8; 1];
    dl.read_exact(&mut first).unwrap();

    std::fs::write(srv.config_path(), format!("{acfg}{bcfg}")).unwrap();
    srv.sighup();
    srv.wait_for_log("configuration reloaded", 1);
    assert_eq!(probe(b.clone()).await, 200, "the new token is accepted");
    assert_eq!(probe(a.clone()).await, 200);

    let mut rest = Vec::new();
    dl.read_to_end(&mut rest).unwrap();
    let text_end = rest.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(
        rest.starts_with(b"TTP/1.1 200"),
        "response after the reload"
    );
    assert_eq!(&rest[text_end..], &big[..], "the download finished whole");

    // A broken config (unknown key) is refused; both tokens keep working.
    std::fs::write(srv.config_path(), format!("{bcfg}\nbogus_key = 1\n")).unwrap();
    srv.sighup();
    srv.wait_for_log("configuration not reloaded", 1);
    assert!(srv.log().contains("bogus_key"), "the log says why");
    assert_eq!(probe(a.clone()).await, 200, "the old tokens stay");
    assert_eq!(probe(b).await, 200);

    // A TOML syntax error (several lines, pointing at the column) is logged on one line.
    std::fs::write(srv.config_path(), format!("{bcfg}\nlisten = \"open\n")).unwrap();
    srv.sighup();
    srv.wait_for_log("configuration not reloaded", 2);
    let log = srv.log();
    let line = log
        .lines()
        .filter(|l| l.contains("configuration not reloaded"))
        .nth(1)
        .unwrap();
    assert!(
        line.contains("TOML parse error") && line.contains("; invalid basic string"),
        "{log}"
    );

    // A change that needs a restart is refused too.
    std::fs::write(
        srv.config_path(),
        format!("{acfg}[upload]\nmax_concurrent = 3\n"),
    )
    .unwrap();
    srv.sighup();
    srv.wait_for_log("configuration not reloaded", 3);
    assert!(srv.log().contains("`upload.*` changed"), "{}", srv.log());

    // The signing key file, rotated in place: after a reload the real client trusts the new
    // key alone (the narinfos in memory were signed with the old one: they go); a key file
    // that cannot be read is refused and the new key keeps signing.
    let key_file = srv.dir.path().join("cellar-test.sec");
    let fresh = work.path().join("rotated.sec");
    let out = std::process::Command::new(CELLAR)
        .args(["keygen", "cellar-test-2", "--out"])
        .arg(&fresh)
        .output()
        .unwrap();
    assert!(out.status.success(), "keygen: {out:?}");
    let rotated_public = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    std::fs::copy(&fresh, &key_file).unwrap();
    std::fs::write(srv.config_path(), format!("{acfg}{bcfg}")).unwrap();
    srv.sighup();
    srv.wait_for_log("configuration reloaded", 2);
    // The new line for the clients' nix.conf is said, as at the start (and only when the
    // keys changed: not at the first reload).
    let said = srv.log();
    let lines: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("clients' nix.conf: trusted-public-keys"))
        .collect();
    assert_eq!(lines.len(), 1, "{said}");
    assert!(
        lines[0].ends_with(&format!("trusted-public-keys = {rotated_public}")),
        "{said}"
    );
    substitute_and_verify(
        &srv.url,
        &rotated_public,
        &f.top,
        &work.path().join("rotated"),
    );

    std::fs::write(&key_file, "not a key\n").unwrap();
    srv.sighup();
    srv.wait_for_log("configuration not reloaded", 4);
    let narinfo = format!("{}/{}.narinfo", srv.url, Fixture::hash(&f.top));
    let body = reqwest::get(narinfo).await.unwrap().text().await.unwrap();
    assert!(body.contains("Sig: cellar-test-2:"), "{body}");
}

/// Two builders push their own builds of one path that does not build reproducibly (`big`:
/// random bytes): the second, whose client still takes the path for missing (it asked before
/// the first published it), uploads it, is answered 200 and its `nix copy` succeeds, where a
/// refusal would fail its whole copy; the cache keeps the first build, which clients get.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_build_of_a_published_path_is_accepted_and_the_first_kept() {
    let (w, wcfg) = token("ci", "write");
    let work = tempfile::tempdir().unwrap();
    let app = App::s3("two-builds").config(&wcfg).spawn().await;
    let srv = &app.srv;
    let netrc = netrc(work.path(), srv, &w);
    let salt = format!("not-reproducible-{}", std::process::id());
    let expr = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/closure.nix");
    let build = || {
        let mut b = nix("nix-build", &work.path().join("xdg-build"));
        b.arg(&expr)
            .args(["-A", "big", "--argstr", "salt", &salt, "--no-out-link"]);
        run_ok(b).trim().to_owned()
    };
    let nar_hash = |path: &str| {
        let mut q = nix("nix-store", &work.path().join("xdg-build"));
        q.args(["-q", "--hash", path]);
        run_ok(q).trim().to_owned()
    };
    let path = build();
    let first = nar_hash(&path);

    // The second builder looks first, where it will push: the path is missing, and its
    // client remembers that.
    let xdg2 = work.path().join("xdg-second");
    let mut look = nix("nix", &xdg2);
    look.args(["path-info", "--store", &srv.url, &path]);
    assert!(!run(look).status.success(), "the path is not published yet");

    // The first builder publishes its build.
    let xdg1 = work.path().join("xdg-first");
    let up = copy_to(&format!("{}/upload", srv.url), &netrc, &xdg1, &[&path]);
    assert!(up.status.success(), "first upload: {}", stderr(&up));

    // The second builds the path itself: other bytes under the same store path.
    let mut delete = nix("nix-store", &work.path().join("xdg-build"));
    delete.args(["--delete", &path]);
    run_ok(delete);
    assert_eq!(build(), path);
    let second = nar_hash(&path);
    assert_ne!(first, second, "the build is not reproducible");
    let up = copy_to(&srv.url, &netrc, &xdg2, &[&path]);
    assert!(up.status.success(), "second upload: {}", stderr(&up));
    assert_eq!(
        srv.log_count("already published with another NarHash (not reproducible)"),
        1,
        "{}",
        srv.log()
    );

    // Clients get the first build.
    let h = Fixture::hash(&path);
    let narinfo = reqwest::get(format!("{}/{h}.narinfo", srv.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        narinfo.contains(&format!("NarHash: {first}\n")),
        "{first}:\n{narinfo}"
    );
    let store = work.path().join("store");
    let down = copy_from(
        &srv.url,
        &srv.public_key,
        &work.path().join("xdg-client"),
        &store,
        &path,
    );
    assert!(down.status.success(), "substitute: {}", stderr(&down));
}
