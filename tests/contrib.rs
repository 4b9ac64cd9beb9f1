//! What `contrib/` ships, checked with the real tools: the systemd unit with
//! `systemd-analyze verify` (and its `security` score), the compose file's cellar environment
//! with `cellar check-config` (compose itself cannot run here: no container engine), and the
//! files the Dockerfile copies.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::CELLAR;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The unit with ExecStart pointing at the binary under test (verify checks that it exists).
fn unit_for_test(dir: &Path) -> std::path::PathBuf {
    let unit = std::fs::read_to_string(Path::new(ROOT).join("contrib/cellar.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/cellar serve"));
    let path = dir.join("cellar.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/cellar", CELLAR)).unwrap();
    path
}

#[test]
fn the_systemd_unit_verifies_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_for_test(dir.path());
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze (Debian's systemd package; scripts/test installs it)");
    let err = String::from_utf8_lossy(&out.stderr);
    // An unknown or misspelled key is only a warning, exit code 0: stderr must be empty too.
    assert!(out.status.success() && err.trim().is_empty(), "{err}");

    let text = std::fs::read_to_string(&unit).unwrap();
    for needed in [
        "Type=notify",
        "WatchdogSec=",
        "DynamicUser=yes",
        "StateDirectory=cellar",
        "CacheDirectory=cellar",
        "LoadCredential=cache.sec:",
        "LimitNOFILE=",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
    ] {
        assert!(text.contains(needed), "the unit lacks {needed}");
    }
    // Settings belong in the config file: a variable here would override it, unseen by a reload.
    let settings: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("Environment=") && l.contains("CELLAR_"))
        .collect();
    assert!(settings.is_empty(), "{settings:?}");
}

/// The garbage collection's and the weekly check's services and timers verify, and each
/// service runs as the server runs: the same dynamic user (named after the server's unit),
/// state and working directory, credentials file and config file. A unit of another user would
/// have systemd hand the server's state directory over to it.
#[test]
fn the_gc_units_verify_and_run_as_the_server() {
    for (unit, command) in [
        ("cellar-gc", "gc --apply"),
        ("cellar-verify", "verify --hashes"),
    ] {
        batch_units_verify_and_run_as_the_server(unit, command);
    }
}

fn batch_units_verify_and_run_as_the_server(unit: &str, command: &str) {
    let dir = tempfile::tempdir().unwrap();
    let read = |name: &str| std::fs::read_to_string(Path::new(ROOT).join("contrib").join(name));
    let service = format!("{unit}.service");
    let timer = format!("{unit}.timer");
    let gc = read(&service).unwrap();
    assert!(
        gc.contains(&format!("ExecStart=/usr/local/bin/cellar {command} ")),
        "{gc}"
    );
    std::fs::write(
        dir.path().join(&service),
        gc.replace("/usr/local/bin/cellar", CELLAR),
    )
    .unwrap();
    std::fs::write(dir.path().join(&timer), read(&timer).unwrap()).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join(&service))
        .arg(dir.path().join(&timer))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "{unit}: {err}"
    );

    let server = read("cellar.service").unwrap();
    let setting = |unit: &str, key: &str| -> Option<String> {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
    };
    // The server's dynamic user is named after its unit unless it names one.
    let user = setting(&server, "User").unwrap_or_else(|| "cellar".to_owned());
    assert_eq!(setting(&gc, "User"), Some(user.clone()), "{gc}");
    assert_eq!(setting(&gc, "Group"), Some(user), "{gc}");
    for key in [
        "DynamicUser",
        "StateDirectory",
        "WorkingDirectory",
        "EnvironmentFile",
    ] {
        assert_eq!(setting(&gc, key), setting(&server, key), "{unit}: {key}");
    }
    let config = |unit: &str| {
        setting(unit, "ExecStart")
            .and_then(|e| e.split_once("--config ").map(|(_, c)| c.to_owned()))
    };
    assert_eq!(config(&gc), config(&server), "{unit}");
}

#[test]
fn the_systemd_unit_is_hardened() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_for_test(dir.path());
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=20", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // "Overall exposure level for cellar.service: 1.4 OK": 0 is locked down, 10 is exposed.
    let level: f64 = all
        .split("Overall exposure level for cellar.service:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{all}"));
    assert!(level <= 2.0, "exposure {level}:\n{all}");
}

/// `KEY: value` lines of the `environment:` map of `service` in a compose file. Enough YAML
/// for the file we ship, which keeps its environment maps flat.
fn compose_env(yaml: &str, service: &str) -> Vec<(String, String)> {
    let mut in_service = false;
    let mut in_env = false;
    let mut out = Vec::new();
    for line in yaml.lines() {
        let indent = line.len() - line.trim_start().len();
        let t = line.trim();
        if indent == 2 && t.ends_with(':') {
            in_service = t == format!("{service}:");
            in_env = false;
        } else if in_service && indent == 4 {
            in_env = t == "environment:";
        } else if in_service && in_env && indent == 6 {
            if let Some((k, v)) = t.split_once(": ") {
                out.push((k.to_owned(), v.trim_matches('"').to_owned()));
            }
        }
    }
    out
}

#[test]
fn the_compose_files_cellar_environment_is_a_valid_config() {
    let yaml = std::fs::read_to_string(Path::new(ROOT).join("contrib/compose.yaml")).unwrap();
    let env = compose_env(&yaml, "cellar");
    assert!(env
        .iter()
        .any(|(k, v)| k == "CELLAR_STORE__KIND" && v == "s3"));
    // The bucket and the credentials cellar uses are the ones the createbucket job makes.
    let secret = env
        .iter()
        .find(|(k, _)| k == "CELLAR_STORE__SECRET_ACCESS_KEY")
        .map(|(_, v)| v.clone())
        .unwrap();
    let job = compose_env(&yaml, "createbucket");
    assert!(job
        .iter()
        .any(|(k, v)| k == "CELLAR_S3_SECRET" && *v == secret));
    assert!(yaml.contains("mc mb --ignore-existing local/nix-cache"));
    assert!(env
        .iter()
        .any(|(k, v)| k == "CELLAR_STORE__BUCKET" && v == "nix-cache"));

    // What the image adds (ENV lines of the Dockerfile), then the compose file's environment.
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    let mut cmd = Command::new(CELLAR);
    cmd.arg("check-config");
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("CELLAR_")) {
        cmd.env_remove(k);
    }
    for l in dockerfile.lines().filter_map(|l| l.strip_prefix("ENV ")) {
        let (k, v) = l.split_once('=').unwrap();
        cmd.env(k, v);
    }
    cmd.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "check-config with the compose environment: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// compose gives cellar time to finish requests in flight and write its last access records
/// after SIGTERM: longer than `shutdown_timeout_secs` plus a store write (`store.timeout_secs`),
/// defaults here.
#[test]
fn the_compose_file_gives_cellar_time_to_stop() {
    let yaml = std::fs::read_to_string(Path::new(ROOT).join("contrib/compose.yaml")).unwrap();
    let grace: u64 = yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("stop_grace_period: "))
        .and_then(|v| v.strip_suffix('s'))
        .and_then(|v| v.parse().ok())
        .expect("stop_grace_period: <n>s");
    assert!(grace > 10 + 10, "{grace} s");
}

#[test]
fn the_dockerfile_copies_what_exists() {
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    let mut copied = 0;
    for l in dockerfile.lines().filter_map(|l| l.strip_prefix("COPY ")) {
        if l.starts_with("--from=") {
            continue;
        }
        let parts: Vec<&str> = l.split_whitespace().collect();
        for src in &parts[..parts.len() - 1] {
            assert!(Path::new(ROOT).join(src).exists(), "COPY {src}: missing");
            copied += 1;
        }
    }
    assert!(copied >= 4, "{dockerfile}");
}
