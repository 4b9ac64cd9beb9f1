//! The `cellar` command line: keys, tokens, config checking, first start, shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::process::{Command, Stdio};

use common::*;

fn cellar(dir: &std::path::Path) -> Command {
    let mut c = Command::new(CELLAR);
    c.current_dir(dir);
    // The test process may carry CELLAR_* from a developer's shell: start clean.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CELLAR_") {
            c.env_remove(k);
        }
    }
    c
}

/// An S3 store with no credentials anywhere the SDK looks: the error says which keys to
/// set, in one line, instead of the SDK's kilobytes on every place it looked.
#[test]
fn an_s3_store_without_credentials_says_which_keys_to_set() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("c.toml"),
        "[store]\nkind = \"s3\"\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:9\"\n",
    )
    .unwrap();
    let mut c = cellar(d.path());
    for k in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ] {
        c.env_remove(k);
    }
    let out = c
        .env("HOME", d.path())
        .env_remove("AWS_CONFIG_FILE")
        .env_remove("AWS_SHARED_CREDENTIALS_FILE")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .args(["verify", "--config", "c.toml"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("no S3 credentials found; set store.access_key_id"),
        "{err}"
    );
    assert!(err.len() < 1000, "{err}");
}

#[test]
fn keygen_writes_a_nix_format_key_that_nix_accepts() {
    let d = tempfile::tempdir().unwrap();
    let out = cellar(d.path())
        .args(["keygen", "cache.example.org-1", "--out", "k.sec"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let public = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(public.starts_with("cache.example.org-1:"), "{public}");
    let mode = std::fs::metadata(d.path().join("k.sec"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // The real nix derives the same public key from it.
    let mut n = nix("nix", &d.path().join("xdg"));
    n.args(["key", "convert-secret-to-public"])
        .stdin(std::fs::File::open(d.path().join("k.sec")).unwrap());
    assert_eq!(run_ok(n).trim(), public);
    // Never overwrites.
    let again = cellar(d.path())
        .args(["keygen", "x-1", "--out", "k.sec"])
        .output()
        .unwrap();
    assert!(!again.status.success());
}

#[test]
fn nix_generated_keys_are_served_with() {
    let d = tempfile::tempdir().unwrap();
    let mut g = nix("nix", &d.path().join("xdg"));
    g.args(["key", "generate-secret", "--key-name", "from-nix-1"]);
    std::fs::write(d.path().join("n.sec"), run_ok(g)).unwrap();
    let out = cellar(d.path())
        .args(["check-config"])
        .env("CELLAR_SIGNING__KEY_FILES", d.path().join("n.sec"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("from-nix-1:"), "{text}");
}

#[test]
fn check_config_names_the_key() {
    let d = tempfile::tempdir().unwrap();
    for (toml, env, key) in [
        ("[store]\nkind = \"s3\"\n", vec![], "store.bucket"),
        ("lisen = \"x\"\n", vec![], "lisen"),
        (
            "",
            vec![
                ("CELLAR_STORE__ENDPOINT", "localhost:9000"),
                ("CELLAR_STORE__KIND", "s3"),
                ("CELLAR_STORE__BUCKET", "b"),
            ],
            "store.endpoint",
        ),
        ("", vec![("CELLAR_LISTEN", "nope")], "listen"),
    ] {
        std::fs::write(d.path().join("c.toml"), toml).unwrap();
        let out = cellar(d.path())
            .args(["check-config", "--config", "c.toml"])
            .envs(env)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{toml}");
        assert!(err.to_lowercase().contains(key), "{toml}: {err}");
    }
}

/// What `serve` refuses at start `check-config` refuses too: two signing keys of one name (a
/// rotation's new key made under the old name), a NAR cache directory cellar did not make.
/// It changes nothing: an empty or missing `cache.nar_dir` is fine and stays as it was.
#[test]
fn check_config_refuses_what_serve_would() {
    let d = tempfile::tempdir().unwrap();
    let check = |env: Vec<(&str, std::ffi::OsString)>| {
        let out = cellar(d.path())
            .args(["check-config"])
            .envs(env)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (file, name) in [
        ("a.sec", "same-1"),
        ("b.sec", "same-1"),
        ("c.sec", "other-1"),
    ] {
        let path = d.path().join(file);
        let out = cellar(d.path())
            .args(["keygen", name, "--out"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    // A list, in the environment, is comma-separated.
    let keys = |files: &[&str]| std::ffi::OsString::from(files.join(","));
    let (ok, err) = check(vec![(
        "CELLAR_SIGNING__KEY_FILES",
        keys(&["a.sec", "b.sec"]),
    )]);
    assert!(!ok && err.contains("same-1"), "{err}");
    let (ok, err) = check(vec![(
        "CELLAR_SIGNING__KEY_FILES",
        keys(&["a.sec", "c.sec"]),
    )]);
    assert!(ok, "{err}");

    let foreign = d.path().join("photos");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("cat.jpg"), "meow").unwrap();
    let (ok, err) = check(vec![("CELLAR_CACHE__NAR_DIR", foreign.clone().into())]);
    assert!(!ok && err.contains("cache.nar_dir"), "{err}");
    // Which directory, too.
    assert!(err.contains(&foreign.display().to_string()), "{err}");
    assert!(foreign.join("cat.jpg").exists());
    let new = d.path().join("nars");
    let (ok, err) = check(vec![("CELLAR_CACHE__NAR_DIR", new.clone().into())]);
    assert!(ok, "{err}");
    assert!(!new.exists(), "check-config made {}", new.display());
    // A local store's path that is a file (a key file, given by mistake): named, not warned
    // of as missing and then failing on "File exists".
    let (ok, err) = check(vec![("CELLAR_STORE__PATH", d.path().join("a.sec").into())]);
    assert!(
        !ok && err.contains("store.path") && err.contains("is not a directory"),
        "{err}"
    );
}

/// `check-config` says which keys of the file the environment overrides; the variables
/// Kubernetes sets beside a service named `cellar` are not taken for keys, and variables whose
/// name or value is not UTF-8 (an `OLDPWD` in Latin-1, raw bytes a CI runner exports) are
/// none of cellar's business.
#[test]
fn check_config_notes_overrides_and_ignores_service_links() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt as _;
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("c.toml"), "listen = \"127.0.0.1:9000\"\n").unwrap();
    let out = cellar(d.path())
        .args(["check-config", "--config", "c.toml"])
        .env("OLDPWD", OsStr::from_bytes(b"/home/j\xf6rg"))
        .env(OsStr::from_bytes(b"JUNK_\xff"), "x")
        .envs([
            ("CELLAR_LISTEN", "127.0.0.1:9001"),
            ("CELLAR_SERVICE_HOST", "10.0.0.7"),
            ("CELLAR_PORT_8080_TCP", "tcp://10.0.0.7:8080"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("CELLAR_LISTEN overrides `listen`"), "{text}");
}

/// `gc`, `verify` and `pin` look after an existing store: run from another directory with a
/// relative `store.path`, they fail rather than report on an empty one they made.
#[test]
fn store_commands_refuse_a_local_store_that_does_not_exist() {
    let d = tempfile::tempdir().unwrap();
    for args in [vec!["gc"], vec!["verify"], vec!["pin", "list"]] {
        let out = cellar(d.path()).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {err}");
        if args == ["verify"] {
            // Could not check: not a finding (1), an error.
            assert_eq!(out.status.code(), Some(2), "{err}");
        }
        assert!(
            err.contains("store.path") && err.contains("cellar-data"),
            "{args:?}: {err}"
        );
        assert!(
            !d.path().join("cellar-data").exists(),
            "{args:?} created the store"
        );
    }
    // The server makes it.
    std::fs::create_dir(d.path().join("cellar-data")).unwrap();
    let out = cellar(d.path()).args(["verify"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `pin add --keep-days 0` would make a pin expired as it is made (a user may read 0 as
/// "forever"): refused, naming the option, and no pin is written.
#[test]
fn a_pin_kept_zero_days_is_refused() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("cellar-data")).unwrap();
    let path = "/nix/store/6bxnj2gfflqa529lddzh3zhcn45nn86r-top";
    let out = cellar(d.path())
        .args(["pin", "add", "release", path, "--keep-days", "0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--keep-days"), "{err}");
    assert!(!d.path().join("cellar-data/_cellar/pins").exists(), "{err}");
    let out = cellar(d.path())
        .args(["pin", "add", "release", path, "--keep-days", "1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(d.path().join("cellar-data/_cellar/pins/release").exists());
}

/// `cellar import` fills a new cache before its server first starts, so it creates a missing
/// local store, but says so with the absolute path, and says which store it imports into: a
/// relative `store.path` lands wherever the command was run.
#[test]
fn import_says_where_it_creates_the_store_and_what_it_imports_into() {
    let d = tempfile::tempdir().unwrap();
    let from = d.path().join("old-cache");
    std::fs::create_dir(&from).unwrap();
    let out = cellar(d.path()).arg("import").arg(&from).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let store = d.path().join("cellar-data");
    assert!(store.is_dir());
    assert!(
        err.contains(&format!(
            "store.path {} does not exist: creating it",
            store.display()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "importing {} into file://{}",
            from.display(),
            store.display()
        )),
        "{err}"
    );
    // Once it exists, nothing is said of creating it.
    let out = cellar(d.path()).arg("import").arg(&from).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !err.contains("creating it"),
        "{err}"
    );
}

/// A reader of the output that went away (`cellar gc | head`) loses the rest of it, and the
/// command still runs to its end and exits as it would have (no panic, no exit 101): a
/// collection must not stop half-way because its report could not be printed. What would be
/// lost for good (a new token, a secret key) fails the command instead.
#[test]
fn a_closed_stdout_is_no_panic() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("cellar-data")).unwrap();
    // (arguments, exit code): a token or secret key that could not be printed fails the
    // command instead (one printed nowhere must not look made).
    for (args, code) in [
        (vec!["check-config"], 0),
        (vec!["gc"], 0),
        (vec!["verify"], 0),
        (vec!["token", "new", "--name", "ci", "--scope", "write"], 1),
        (vec!["keygen", "cache-1"], 1),
    ] {
        // The read end closed before the command starts: its first write fails (EPIPE).
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = cellar(d.path())
            .args(&args)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        if code == 1 {
            assert!(err.contains("to stdout"), "{args:?}: {err}");
        }
    }
}

/// A directory to import from that cannot be read (a typo) is said before anything is done:
/// no store is created, and no advice to run it again.
#[test]
fn an_import_from_a_missing_directory_says_so_and_creates_nothing() {
    let d = tempfile::tempdir().unwrap();
    let from = d.path().join("typo");
    let out = cellar(d.path()).arg("import").arg(&from).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot read {}", from.display())),
        "{err}"
    );
    assert!(!err.contains("goes on from there"), "{err}");
    assert!(!d.path().join("cellar-data").exists());
}

/// An import the store stops (here, nothing listens at its endpoint) says what it did before,
/// why it stopped and that a run again goes on, and exits 3: a script tells it apart from
/// rejected paths (1), which a rerun would not change, and a refused command line (2).
#[test]
fn an_import_the_store_stops_says_so_and_exits_3() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("c.toml"),
        "[store]\nkind = \"s3\"\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:9\"\n\
         access_key_id = \"k\"\nsecret_access_key = \"s\"\ntimeout_secs = 2\n",
    )
    .unwrap();
    let from = d.path().join("old-cache");
    std::fs::create_dir(&from).unwrap();
    let hash = "f904kp3djilk732cgbnxhpy7vzykbqsh";
    std::fs::write(
        from.join(format!("{hash}.narinfo")),
        include_str!("fixtures/narinfo/top.narinfo"),
    )
    .unwrap();
    let out = cellar(d.path())
        .args(["import", "--config", "c.toml"])
        .arg(&from)
        .output()
        .unwrap();
    let (stdout, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(3), "{stdout}{err}");
    assert!(
        stdout.contains("imported 0, skipped 0 (already present), rejected 0"),
        "{stdout}"
    );
    assert!(err.contains("cellar: error: the import stopped: "), "{err}");
    assert!(err.contains("the same command goes on from there"), "{err}");
}

/// A local store at a file system's root holds `lost+found`, which the server's user cannot
/// read: `gc` and `verify`, run as that user, list the store without it. (As root the test
/// runs them as `nobody`, who owns the store but not `lost+found`; otherwise `lost+found` is
/// made unreadable to its owner.)
#[test]
fn gc_and_verify_pass_over_an_unreadable_directory_outside_the_layout() {
    use std::os::unix::process::CommandExt as _;
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = d.path().join("cellar-data");
    std::fs::create_dir_all(store.join("lost+found")).unwrap();
    std::fs::write(store.join("lost+found/#1234"), b"a lost block").unwrap();
    std::fs::write(store.join("nix-cache-info"), b"StoreDir: /nix/store\n").unwrap();
    // The test's own directory is its effective user's.
    let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(d.path()).unwrap()) == 0;
    const NOBODY: u32 = 65534;
    if root {
        std::os::unix::fs::chown(&store, Some(NOBODY), Some(NOBODY)).unwrap();
        std::fs::set_permissions(
            store.join("lost+found"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
    } else {
        std::fs::set_permissions(
            store.join("lost+found"),
            std::fs::Permissions::from_mode(0o000),
        )
        .unwrap();
    }
    for args in [vec!["verify"], vec!["gc"]] {
        let mut c = cellar(d.path());
        c.args(&args)
            .env("CELLAR_STORE__PATH", &store)
            .env("HOME", d.path());
        if root {
            c.uid(NOBODY).gid(NOBODY);
        }
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {err}");
        assert!(!err.contains("lost+found"), "{args:?}: {err}");
    }
    std::fs::set_permissions(
        store.join("lost+found"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
}

#[test]
fn refuses_to_start_with_a_malformed_key_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("bad.sec"), "garbage").unwrap();
    let out = cellar(d.path())
        .args(["serve"])
        .env("CELLAR_LISTEN", "127.0.0.1:0")
        .env("CELLAR_SIGNING__KEY_FILES", "bad.sec")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bad.sec"), "{err}");
    assert!(
        !err.contains("garbage"),
        "the key file's content must not be printed"
    );
}

#[test]
fn first_start_creates_a_key_and_prints_the_trusted_key_line_then_stops_on_sigterm() {
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("serve.log");
    // The environment's `listen` wins over the file's, and the log says so.
    std::fs::write(d.path().join("c.toml"), "listen = \"127.0.0.1:1\"\n").unwrap();
    let mut child = cellar(d.path())
        .args(["serve", "--config", "c.toml"])
        .env("CELLAR_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let addr = wait_until_listening(&mut child, read_log);
    std::net::TcpStream::connect(addr).expect("the announced address accepts connections");
    assert!(d.path().join("cellar-data").is_dir());
    let key = std::fs::read_to_string(d.path().join("cellar-key.sec")).unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "exit after SIGTERM: {exit:?}");
    let err = read_log();
    assert!(err.contains("trusted-public-keys = "), "{err}");
    let created = format!(
        "store.path {} does not exist: creating it",
        d.path().join("cellar-data").display()
    );
    assert!(err.contains(&created), "{err}");
    assert!(
        err.contains("the environment overrides this key of the config file")
            && err.contains("CELLAR_LISTEN"),
        "{err}"
    );
    let secret_part = key.split_once(':').unwrap().1;
    assert!(!err.contains(secret_part), "the secret key was printed");
}

/// `cellar serve` in `dir` on a port of its own, with `env` set, logging to `log`; the child
/// and where it listens.
fn serve_logging_to(
    dir: &std::path::Path,
    log: &std::path::Path,
    env: (&str, &str),
) -> (std::process::Child, std::net::SocketAddr) {
    let mut child = cellar(dir)
        .args(["serve"])
        .env("CELLAR_LISTEN", "127.0.0.1:0")
        .env(env.0, env.1)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let addr = wait_until_listening(&mut child, || {
        std::fs::read_to_string(log).unwrap_or_default()
    });
    (child, addr)
}

/// Requests still under way when the shutdown timeout ends are cut off, and the log says how
/// many connections and uploads that was (a builder's upload cut off then fails on its
/// retry: the log is where its operator looks).
#[test]
fn a_shutdown_that_cuts_requests_off_says_how_many() {
    use std::io::{Read as _, Write as _};
    let d = tempfile::tempdir().unwrap();
    // A NAR larger than the sockets between client and server hold.
    let nar = "nar/0l74sag416b7yzqh28bm87pdp102zcgslqmm73y4qr1rn0rmqsyx.nar";
    std::fs::create_dir_all(d.path().join("cellar-data/nar")).unwrap();
    std::fs::write(d.path().join("cellar-data").join(nar), vec![0u8; 64 << 20]).unwrap();
    let log = d.path().join("serve.log");
    let (mut child, addr) = serve_logging_to(d.path(), &log, ("CELLAR_SHUTDOWN_TIMEOUT_SECS", "1"));
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    // A download under way (its answer has begun) that the client stops reading.
    let mut slow = std::net::TcpStream::connect(addr).unwrap();
    slow.write_all(format!("GET /{nar} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut begun = [0u8; 12];
    slow.read_exact(&mut begun).unwrap();
    assert_eq!(&begun, b"HTTP/1.1 200");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_for_in_file(&log, "requests still running after 1 s", 1);
    let said = read_log();
    assert!(said.contains("connections=1 uploads=0"), "{said}");
    let exit = child.wait().unwrap();
    assert!(exit.success(), "{exit:?}: {said}");
    drop(slow);
}

/// A local store's upload that a shutdown cuts off leaves no staged file behind: the task
/// that would remove it as its writer is dropped does not outlive the process (its file, up to
/// a NAR's size, stayed for `upload.staging_max_age_secs`).
#[test]
fn an_upload_a_shutdown_cuts_off_leaves_no_staged_file() {
    use std::io::Write as _;
    let d = tempfile::tempdir().unwrap();
    let token = "shutdown-test-token";
    std::fs::write(
        d.path().join("c.toml"),
        format!(
            "shutdown_timeout_secs = 1\n[[auth.tokens]]\nname = \"b\"\nhash = \"{}\"\n\
             scopes = [\"write\"]\n",
            cellar::auth::hash(token)
        ),
    )
    .unwrap();
    let log = d.path().join("serve.log");
    let mut child = cellar(d.path())
        .args(["serve", "--config", "c.toml"])
        .env("CELLAR_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info,cellar::store=debug")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let addr = wait_until_listening(&mut child, || {
        std::fs::read_to_string(&log).unwrap_or_default()
    });
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let name = "0000000000000000000000000000000000000000000000000000.nar";
    let mut nar = b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1\x00\x00\x00".to_vec();
    nar.resize(1 << 20, 7);
    write!(
        s,
        "PUT /upload/nar/{name} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: {}\r\n\r\n",
        20 << 20
    )
    .unwrap();
    s.write_all(&nar).unwrap();
    // The NAR's own staged file (the upload's record is written too).
    let nar_key = format!("nar/{name}");
    wait_for_file(&log, "the NAR's writer", |text| {
        text.lines()
            .any(|l| l.contains("writing an object") && l.contains(&nar_key))
    });
    let staging = d.path().join("cellar-data/.staging");
    // (The upload's record may be staged beside it for a moment.)
    assert!(std::fs::read_dir(&staging).unwrap().count() >= 1);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(exit.success(), "{exit:?}: {said}");
    assert!(said.contains("removed="), "{said}");
    let left: Vec<_> = std::fs::read_dir(&staging).unwrap().collect();
    assert!(left.is_empty(), "{left:?}\n{said}");
    drop(s);
}

/// Told to stop with a shutdown delay, the server waits; told twice (Ctrl-C twice), it exits
/// at once.
#[test]
fn a_second_signal_ends_the_shutdown_delay() {
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("serve.log");
    // A path to serve, whose use is recorded in memory until the server writes it.
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/narinfo");
    let narinfo = std::fs::read_to_string(fixture.join("top.narinfo")).unwrap();
    let hash = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("StorePath: /nix/store/"))
        .unwrap()[..32]
        .to_owned();
    std::fs::create_dir(d.path().join("cellar-data")).unwrap();
    std::fs::write(
        d.path().join(format!("cellar-data/{hash}.narinfo")),
        &narinfo,
    )
    .unwrap();
    let (mut child, addr) =
        serve_logging_to(d.path(), &log, ("CELLAR_SHUTDOWN_DELAY_SECS", "3600"));
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let served = std::process::Command::new("curl")
        .args(["-sf", "-o", "/dev/null"])
        .arg(format!("http://{addr}/{hash}.narinfo"))
        .status()
        .unwrap();
    assert!(served.success());
    let pid = child.id().to_string();
    let term = || {
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success());
    };
    term();
    wait_for_in_file(&log, "accepting connections for 3600 s more", 1);
    // Still serving during the delay.
    std::net::TcpStream::connect(addr).expect("closed during the delay");
    // Its use written at the signal, not only on the way out (a kill at the end of an
    // orchestrator's stop timeout would lose it).
    let records = d.path().join("cellar-data/_cellar/access");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let written = || {
        records.is_dir()
            && walk(&records).iter().any(|r| {
                std::fs::read_to_string(r)
                    .unwrap_or_default()
                    .contains(&hash)
            })
    };
    while !written() {
        assert!(
            std::time::Instant::now() < deadline,
            "no access record during the delay:\n{}",
            read_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited during the delay"
    );
    term();
    // A guard against a hung test, not a wait the test relies on.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let Ok(exit) = rx.recv_timeout(std::time::Duration::from_secs(60)) else {
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
        panic!(
            "still running a minute after the second signal:\n{}",
            read_log()
        );
    };
    let exit = exit.unwrap();
    assert_eq!(exit.code(), Some(143), "{}", read_log());
    assert!(
        read_log().contains("second shutdown signal"),
        "{}",
        read_log()
    );
    // Its use was written on the way out.
    let records = walk(&d.path().join("cellar-data/_cellar/access"));
    assert!(
        records.iter().any(|r| std::fs::read_to_string(r)
            .unwrap_or_default()
            .contains(&hash)),
        "{records:?}"
    );
}

/// A name with a space or a quote would break the netrc line or the TOML entry printed.
#[test]
fn token_new_refuses_a_name_that_would_not_fit_netrc_or_toml() {
    let d = tempfile::tempdir().unwrap();
    for bad in ["ci runner", "ci\"", "ci\nx", ""] {
        let out = cellar(d.path())
            .args(["token", "new", "--name", bad, "--scope", "read"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad:?} accepted");
        assert!(out.stdout.is_empty(), "{bad:?}: a token was printed");
    }
}

#[test]
fn token_new_prints_a_token_and_its_hash_only() {
    let d = tempfile::tempdir().unwrap();
    let out = cellar(d.path())
        .args(["token", "new", "--name", "ci", "--scope", "write"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let token = text
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .unwrap();
    assert!(text.contains(&cellar::auth::hash(token)));
    assert!(text.contains("scopes = [\"write\"]"));
    // The printed entry is valid config, alone and appended to the shipped config file.
    let entry: String = text
        .lines()
        .skip_while(|l| !l.starts_with("[[auth.tokens]]"))
        .take(4)
        .map(|l| format!("{l}\n"))
        .collect();
    let shipped = include_str!("../config/cellar.toml");
    for config in [entry.clone(), format!("{shipped}\n{entry}")] {
        std::fs::write(d.path().join("c.toml"), config).unwrap();
        let check = cellar(d.path())
            .args(["check-config", "--config", "c.toml"])
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
}

/// A local store the user cellar runs as cannot write in (made by `nix copy --to file://` as
/// root, served by another user) is said by `check-config`, naming the directory and owner:
/// uploads failed with "permission denied" with nothing said before (homelab walk).
#[test]
fn a_local_store_this_user_cannot_write_in_is_said() {
    use std::os::unix::process::CommandExt as _;
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // Run as another user: the binary linked (or copied) where that user can reach it.
    let bin = d.path().join("cellar");
    if std::fs::hard_link(CELLAR, &bin).is_err() {
        std::fs::copy(CELLAR, &bin).unwrap();
    }
    let store = d.path().join("cache");
    std::fs::create_dir_all(store.join("nar")).unwrap();
    // Root writes anywhere: it runs the check as another user. Another user makes the
    // directories read-only to itself.
    let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(d.path()).unwrap()) == 0;
    let (uid, gid) = if root {
        (4242, 4242)
    } else {
        for dir in [&store, &store.join("nar")] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        }
        let m = std::fs::metadata(d.path()).unwrap();
        (
            std::os::unix::fs::MetadataExt::uid(&m),
            std::os::unix::fs::MetadataExt::gid(&m),
        )
    };
    std::fs::write(
        d.path().join("c.toml"),
        format!(
            "[store]\nkind = \"local\"\npath = {:?}\n",
            store.display().to_string()
        ),
    )
    .unwrap();
    let check = || {
        let out = Command::new(&bin)
            .args(["check-config", "--config", "c.toml"])
            .current_dir(d.path())
            .env_remove("CELLAR_STORE__PATH")
            .uid(uid)
            .gid(gid)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let said = check();
    let owner = if root { 0 } else { uid };
    assert!(
        said.contains("warning: store.path")
            && said.contains(&format!("(uid {uid}) cannot write in"))
            && said.contains(&format!("owned by uid {owner}"))
            && said.contains("and 1 more"),
        "{said}"
    );
    // Given to that user (writable by it), nothing to say.
    for dir in [&store, &store.join("nar")] {
        if root {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid)).unwrap();
        } else {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    let said = check();
    assert!(!said.contains("cannot write"), "{said}");
    // Nor read (a directory made 0700 by another user): every request would fail.
    if root {
        std::os::unix::fs::chown(&store, Some(0), Some(0)).unwrap();
    }
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o300)).unwrap();
    let said = check();
    assert!(
        said.contains(&format!("(uid {uid}) cannot read the store's directory"))
            && said.contains("every request fails"),
        "{said}"
    );
    // Nor make it where it is to be (under a directory it cannot write in).
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o555)).unwrap();
    let missing = store.join("not/yet");
    std::fs::write(
        d.path().join("c.toml"),
        format!(
            "[store]\nkind = \"local\"\npath = {:?}\n",
            missing.display().to_string()
        ),
    )
    .unwrap();
    let said = check();
    assert!(
        said.contains(&format!("(uid {uid}) cannot make the store's directory"))
            && said.contains(&format!("in {}", store.display())),
        "{said}"
    );
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// cellar deletes files in its NAR cache: pointed at a directory it did not make, it refuses
/// to start and deletes nothing; pointed at the directory holding its key, likewise.
#[test]
fn a_nar_cache_in_someone_elses_directory_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let shared = d.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("notes.txt"), b"keep me").unwrap();
    let mut cmd = cellar(d.path());
    cmd.args(["serve"])
        .env("CELLAR_LISTEN", "127.0.0.1:0")
        .env("CELLAR_CACHE__NAR_DIR", &shared)
        .stdout(Stdio::null());
    let out = output_within_a_minute(cmd);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("cache.nar_dir"), "{err}");
    // Not said to be serving before it gave up: an operator greps the journal for it.
    assert!(!err.contains("cellar serving"), "{err}");
    assert_eq!(std::fs::read(shared.join("notes.txt")).unwrap(), b"keep me");

    // The working directory, where the first start put the signing key.
    let mut cmd = cellar(d.path());
    cmd.args(["serve"])
        .env("CELLAR_LISTEN", "127.0.0.1:0")
        .env("CELLAR_CACHE__NAR_DIR", ".")
        .stdout(Stdio::null());
    let out = output_within_a_minute(cmd);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("cache.nar_dir"), "{err}");
    assert!(d.path().join("shared/notes.txt").exists());
}

/// Runs `cmd` to its end, woken by its exit; a server that wrongly starts is killed after a
/// minute (a guard against a hung test, never a wait the test relies on), so the test fails
/// instead of hanging.
fn output_within_a_minute(mut cmd: Command) -> std::process::Output {
    let child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg(&pid).status();
            let out = rx.recv().unwrap().unwrap();
            panic!(
                "still running after a minute, killed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
