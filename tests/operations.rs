//! Running cellar as an operator does: systemd's readiness and watchdog notifications, who may
//! read `/metrics` and `/status`, `metrics_listen`, `cellar status`, and JSON logs with request
//! ids. Local stores: none of this depends on the store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use common::*;

/// A socket standing in for systemd's (`NOTIFY_SOCKET`), in a directory kept while the
/// first value lives, and the variable that names it.
fn notify_socket() -> (tempfile::TempDir, UnixDatagram, (String, String)) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    // A bound on each wait, not a delay: recv returns as soon as a datagram arrives.
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let var = (
        "NOTIFY_SOCKET".to_owned(),
        path.to_str().unwrap().to_owned(),
    );
    (dir, sock, var)
}

fn recv(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("no notification from cellar");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn notifies_systemd_ready_watchdog_and_stopping() {
    let (_dir, sock, notify) = notify_socket();
    let srv = Server::start(vec![
        notify,
        // 200 ms: pinged every 100 ms.
        ("WATCHDOG_USEC".into(), "200000".into()),
    ]);
    let ready = recv(&sock);
    assert!(ready.contains("READY=1\n"), "{ready}");
    assert!(
        ready.contains(&format!("STATUS=serving on {}", srv.addr)),
        "{ready}"
    );
    assert_eq!(recv(&sock), "WATCHDOG=1\n");
    assert_eq!(recv(&sock), "WATCHDOG=1\n");
    let killed = Command::new("kill")
        .args(["-TERM", &srv.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // Watchdog pings may still be queued before it.
    let stopping = (0..50).map(|_| recv(&sock)).find(|m| m != "WATCHDOG=1\n");
    assert_eq!(stopping.as_deref(), Some("STOPPING=1\n"));
}

/// `systemctl reload` only sends SIGHUP: whether the reload took is shown by `systemctl
/// status`, from the STATUS= cellar sends.
#[test]
fn a_reload_says_how_it_went_to_systemd() {
    let (_dir, sock, notify) = notify_socket();
    let srv = Server::start(vec![notify]);
    assert!(recv(&sock).contains("READY=1\n"));
    std::fs::write(srv.config_path(), "[upload]\nmax_concurrent = 0\n").unwrap();
    srv.sighup();
    let refused = recv(&sock);
    assert!(
        refused.starts_with("STATUS=serving; configuration NOT reloaded")
            && refused.contains("upload.max_concurrent"),
        "{refused}"
    );
    std::fs::write(srv.config_path(), "").unwrap();
    srv.sighup();
    let taken = recv(&sock);
    assert!(
        taken.starts_with("STATUS=serving; configuration reloaded"),
        "{taken}"
    );
}

/// With `--log-format`, the file's `log.format` has no effect, at start or on a reload: where
/// they differ (or the file is made to say what the flag does), that is no reason to refuse
/// the reload, which would also hold back whatever else the file changes (a token revoked).
#[test]
fn a_log_format_given_by_flag_does_not_hold_back_a_reload() {
    let (_dir, sock, notify) = notify_socket();
    let srv = Server::start_via(
        &["sh", "-c", "exec \"$0\" --log-format json \"$@\""],
        "[log]\nformat = \"text\"\n",
        vec![notify],
    );
    assert!(recv(&sock).contains("READY=1\n"));
    assert!(srv.log().lines().any(|l| l.starts_with('{')), "not JSON");
    for toml in [
        // The file as at start (a log rotation's SIGHUP).
        "[log]\nformat = \"text\"\n",
        "[log]\nformat = \"json\"\n",
    ] {
        std::fs::write(srv.config_path(), toml).unwrap();
        srv.sighup();
        let taken = recv(&sock);
        assert!(
            taken.starts_with("STATUS=serving; configuration reloaded"),
            "{toml}: {taken}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn private_mode_guards_metrics_and_status_and_cellar_status_reports() {
    let (r, rcfg) = token("reader", "read");
    let srv = tokio::task::spawn_blocking(move || {
        Server::start_with_config(&format!("[auth]\nprivate = true\n{rcfg}"), vec![])
    })
    .await
    .unwrap();
    let client = reqwest::Client::new();
    for path in ["metrics", "status"] {
        let url = format!("{}/{path}", srv.url);
        assert_eq!(client.get(&url).send().await.unwrap().status(), 401);
        let res = client.get(&url).bearer_auth(&r).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
    }

    // `cellar status` without the token says why; with it, reports for a person.
    let out = Command::new(CELLAR)
        .args(["status", "--url", &srv.url])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 401"));
    let work = tempfile::tempdir().unwrap();
    let token_file = work.path().join("token");
    std::fs::write(&token_file, format!("{r}\n")).unwrap();
    // A miss, then the same miss remembered: one hit in two lookups.
    for _ in 0..2 {
        let url = format!("{}/{}.narinfo", srv.url, "a".repeat(32));
        let res = client.get(url).bearer_auth(&r).send().await.unwrap();
        assert_eq!(res.status(), 404);
    }
    let out = Command::new(CELLAR)
        .args(["status", "--url", &srv.url, "--token-file"])
        .arg(&token_file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("cellar {}", env!("CARGO_PKG_VERSION"))));
    assert!(text.contains("store: file://"), "{text}");
    assert!(
        text.contains(&format!("trusted-public-keys = {}", srv.public_key)),
        "{text}"
    );
    assert!(text.contains("private: reads need a token"), "{text}");
    // The same asked by the server's config file: its `listen`, a wildcard reached through
    // the loopback.
    let config = work.path().join("cellar.toml");
    std::fs::write(
        &config,
        format!("listen = \"0.0.0.0:{}\"\n", srv.addr.port()),
    )
    .unwrap();
    let by_config = Command::new(CELLAR)
        .args(["status", "--config"])
        .arg(&config)
        .arg("--token-file")
        .arg(&token_file)
        .output()
        .unwrap();
    let by_config_text = String::from_utf8_lossy(&by_config.stdout);
    assert!(by_config.status.success(), "{by_config_text}");
    assert!(
        by_config_text.contains("private: reads need a token"),
        "{by_config_text}"
    );
    assert!(
        text.contains("narinfo memory cache: 1 entry,") && text.contains("50.0% hits"),
        "{text}"
    );
    assert!(text.contains("NAR disk cache: off"), "{text}");
    // On by default, and reported.
    assert!(
        text.contains("small-NAR memory cache: 0 entries, 0 B of 64.0 MiB"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_listen_serves_metrics_and_health_checks_unauthenticated() {
    let (_r, rcfg) = token("reader", "read");
    let srv = tokio::task::spawn_blocking(move || {
        Server::start_with_config(
            &format!(
                "metrics_listen = \"127.0.0.1:0\"\nmax_connections = 2\n\
                 [auth]\nprivate = true\n{rcfg}"
            ),
            vec![],
        )
    })
    .await
    .unwrap();
    let addr = srv.metrics_addr();
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("cellar_build_info"), "{text}");
    // Only /metrics there; and not on the main listener at all.
    let other = reqwest::get(format!("http://{addr}/nix-cache-info"))
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    let main = reqwest::get(format!("{}/metrics", srv.url)).await.unwrap();
    assert_eq!(main.status(), 401, "private: anything there needs a token");
    // Health checks there need no token, and are answered while clients hold every one of
    // the main listener's connections (`max_connections`).
    let _held: Vec<_> =
        futures::future::join_all((0..2).map(|_| tokio::net::TcpStream::connect(srv.addr))).await;
    for (path, text) in [("healthz", "ok\n"), ("readyz", "ready\n")] {
        let res = reqwest::get(format!("http://{addr}/{path}")).await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        // Requests there get an id too, as everywhere.
        assert_eq!(res.headers()["x-request-id"].len(), 16, "{path}");
        assert_eq!(res.text().await.unwrap(), text);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_carry_the_request_id_on_every_line_of_a_request_and_the_keys() {
    let (w, wcfg) = token("builder", "write");
    let srv = tokio::task::spawn_blocking(move || {
        Server::start_with_config(&wcfg, vec![("CELLAR_LOG__FORMAT".into(), "json".into())])
    })
    .await
    .unwrap();
    let res = reqwest::Client::new()
        .put(format!("{}/{}.narinfo", srv.url, "0".repeat(32)))
        .basic_auth("builder", Some(&w))
        .header("X-Request-Id", "json-req-7")
        .body("not a narinfo")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(res.headers()["x-request-id"], "json-req-7");
    let log = srv.log();
    let mut of_request = 0;
    let mut keys = None;
    // Every line, the public keys' too (log shippers parse each one).
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if let Some(k) = v["trusted_public_keys"].as_str() {
            keys = Some(k.to_owned());
        }
        let spans = v["spans"].as_array().cloned().unwrap_or_default();
        if spans.iter().any(|s| s["id"] == "json-req-7") {
            of_request += 1;
            if v["message"] == "upload rejected" {
                assert!(spans.iter().any(|s| s["token"] == "builder"), "{line}");
            }
        }
    }
    assert_eq!(keys.as_deref(), Some(srv.public_key.as_str()), "{log}");
    // The rejection (info) and the per-request line (debug, on in the tests' RUST_LOG).
    assert!(of_request >= 2, "{log}");
    assert!(log.contains("upload rejected"));
    assert!(!log.contains(&w));
}

/// With JSON logs every line of stderr is a JSON object, the one that says why cellar did not
/// start too: a port already taken (`log.format` from the environment), a config error
/// (`--log-format json`, which takes effect before the config is read).
#[test]
fn with_json_logs_a_failed_start_says_why_in_json() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.sec");
    let out = Command::new(CELLAR)
        .args(["keygen", "json-1", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success());
    let runs = [
        (
            &["serve"][..],
            vec![
                ("CELLAR_LOG__FORMAT", "json".into()),
                ("CELLAR_LISTEN", port.clone()),
                ("CELLAR_SIGNING__KEY_FILES", key.display().to_string()),
                (
                    "CELLAR_STORE__PATH",
                    dir.path().join("store").display().to_string(),
                ),
            ],
        ),
        (
            &["--log-format", "json", "serve"][..],
            vec![("CELLAR_LISTEN", "nope".to_owned())],
        ),
    ];
    for (args, env) in runs {
        let out = Command::new(CELLAR)
            .args(args)
            .envs(env)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<serde_json::Value> = err
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect();
        let last = lines
            .last()
            .unwrap_or_else(|| panic!("nothing said: {args:?}"));
        assert_eq!(last["level"], "ERROR", "{err}");
        assert!(last["error"].as_str().unwrap().contains("listen"), "{err}");
    }
    drop(taken);
}

#[test]
fn log_format_flag_is_checked() {
    let out = Command::new(CELLAR)
        .args(["--log-format", "yaml", "keygen", "x-1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected `text` or `json`"));
}

/// A SIGHUP during start-up (a `systemctl reload` while the server reads its keys, or opens
/// its store and its caches) neither ends the process nor is lost: the reload runs once the
/// server is up. Started without `--config`, the reload says that it read no file.
#[test]
fn a_sighup_during_start_up_is_a_reload_once_up() {
    use std::io::Write as _;
    for held_at_key in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let nar_dir = dir.path().join("nars");
        std::fs::create_dir(&nar_dir).unwrap();
        std::fs::write(nar_dir.join(".cellar-nar-cache"), b"").unwrap();
        let key = dir.path().join("test.sec");
        let out = Command::new(CELLAR)
            .args(["keygen", "test-1", "--out"])
            .arg(&key)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        // A FIFO holds the start-up until the test writes to it, which is when the signal is
        // sent: the signing key file (read first thing), or a `.meta` of the NAR disk cache
        // (read as the cache opens, once the store is open).
        let (fifo, key_file, text) = if held_at_key {
            let fifo = dir.path().join("held.sec");
            (fifo.clone(), fifo, std::fs::read(&key).unwrap())
        } else {
            let name = format!("{}.nar", "1".repeat(52));
            std::fs::write(nar_dir.join(&name), b"x").unwrap();
            let meta = nar_dir.join(format!("{name}.meta"));
            (meta, key.clone(), b"not a meta\n".to_vec())
        };
        assert!(Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let log_path = dir.path().join("server.log");
        let mut child = Command::new(CELLAR)
            .arg("serve")
            .current_dir(dir.path())
            .env("CELLAR_LISTEN", "127.0.0.1:0")
            .env("CELLAR_SIGNING__KEY_FILES", &key_file)
            .env("CELLAR_STORE__PATH", dir.path().join("data"))
            .env("CELLAR_CACHE__NAR_DIR", &nar_dir)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap();
        let log =
            || String::from_utf8_lossy(&std::fs::read(&log_path).unwrap_or_default()).into_owned();
        // Opened once the server opens it to read: it is starting. (In a thread of its own,
        // so that a server that never gets there fails the test instead of hanging it.)
        let (tx, rx) = std::sync::mpsc::channel();
        let at = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(std::fs::OpenOptions::new().write(true).open(at));
        });
        let mut held = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(opened) => opened.unwrap(),
            Err(_) => panic!("the server did not open {}:\n{}", fifo.display(), log()),
        };
        if held_at_key {
            // The reload reads the key file again: a plain file by then.
            std::fs::copy(&key, dir.path().join("plain.sec")).unwrap();
            std::fs::rename(dir.path().join("plain.sec"), &fifo).unwrap();
        }
        let hup = Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(hup.success());
        held.write_all(&text).unwrap();
        drop(held);
        wait_until_listening(&mut child, log);
        wait_for_in_file(&log_path, "configuration reloaded", 1);
        // Started without --config: a file written beside it is not what the reload read.
        assert!(
            log().contains("started without --config: no config file is read"),
            "{}",
            log()
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// A local store the server may not write (here its staging directory is a file; a systemd
/// unit's `ProtectSystem=strict` without `ReadWritePaths=` does the same) serves, but is
/// said in the log at start-up: every upload and every access record would fail. One whose
/// `nar/` links to a disk not mounted is not ready, and the log names `store.path`, not the
/// S3 keys.
#[tokio::test(flavor = "multi_thread")]
async fn a_local_store_unwritable_or_not_mounted_is_logged_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let unwritable = dir.path().join("unwritable");
    std::fs::create_dir_all(&unwritable).unwrap();
    std::fs::write(unwritable.join(".staging"), b"").unwrap();
    let unmounted = dir.path().join("unmounted");
    std::fs::create_dir_all(&unmounted).unwrap();
    std::os::unix::fs::symlink(dir.path().join("no-disk"), unmounted.join("nar")).unwrap();
    for (store, said, ready) in [
        (unwritable, "cannot be written", 200),
        (unmounted, "the store cannot be reached at start-up", 503),
    ] {
        let env = vec![("CELLAR_STORE__PATH".into(), store.to_str().unwrap().into())];
        let srv = tokio::task::spawn_blocking(move || {
            let srv = Server::start(env);
            srv.wait_for_log(said, 1);
            srv
        })
        .await
        .unwrap();
        let log = srv.log();
        assert!(log.contains("store.path"), "{log}");
        assert!(!log.contains("store.endpoint"), "{log}");
        if ready == 200 {
            // The cause names the directory it could not make.
            assert!(log.contains("unwritable/.staging"), "{log}");
        }
        let r = reqwest::get(format!("{}/readyz", srv.url)).await.unwrap();
        assert_eq!(r.status().as_u16(), ready, "{said}\n{log}");
    }
}

/// A process that may open fewer files than two per connection allowed (a container's
/// default of 1024 against `max_connections = 1024`) says so at start, naming the key.
#[test]
fn too_few_open_files_for_max_connections_is_logged() {
    // The server's own limit, set by util-linux's `prlimit` as it starts it (the machine's
    // may be unlimited, or above what `max_connections` takes).
    let limited = ["prlimit", "--nofile=4096:4096", "--"];
    let warning = "fewer than two per connection allowed (max_connections)";
    let srv = Server::start_via(
        &limited,
        "",
        vec![("CELLAR_MAX_CONNECTIONS".into(), "2049".into())],
    );
    srv.wait_for_log(warning, 1);
    // At the limit: no warning, as the log says once a request is answered (the check is
    // made before the first connection is taken).
    let fine = Server::start_via(
        &limited,
        "",
        vec![("CELLAR_MAX_CONNECTIONS".into(), "2048".into())],
    );
    let mut tcp = std::net::TcpStream::connect(fine.addr).unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(!fine.log().contains(warning), "{}", fine.log());
}
