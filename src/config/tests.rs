//! Loading and validating the configuration.

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format as _, Toml};
use figment::Figment;

use super::*;

fn from_toml(s: &str) -> Result<Config, ConfigError> {
    Config::from_figment(Figment::new().merge(Renamed(Toml::string(s))))
}

#[test]
fn defaults_are_valid() {
    let c = from_toml("").unwrap();
    let StoreBackend::Local(local) = &c.store.backend else {
        panic!("default store is not local: {c:?}");
    };
    assert_eq!(local.path, PathBuf::from("./cellar-data"));
    assert_eq!(c.listen.port(), 8080);
}

#[test]
fn shipped_config_file_parses() {
    let text = include_str!("../../config/cellar.toml");
    let c = from_toml(text).unwrap();
    assert_eq!(c.store_dir, "/nix/store");
}

/// Unknown keys are errors, said as every other error is: the key, then what is wrong with it
/// (figment's own wording puts its profile before the key, `default.store.bukket`).
#[test]
fn unknown_keys_are_errors() {
    let e = from_toml("lisen = \"127.0.0.1:1\"")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("config key `lisen`"), "{e}");
    let e = from_toml("[store]\nbukket = \"x\"")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("config key `store.bukket`"), "{e}");
    assert!(
        e.contains("no such key; known here: kind, path, bucket"),
        "{e}"
    );
    // Array entries as cellar's own errors name them; a value is never quoted (an upstream's
    // URL may carry its token).
    let e = from_toml("[[upstreams]]\nurl = 5\n")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("config key `upstreams[0].url`"), "{e}");
    let e = from_toml("upstreams = \"https://u:TOKEN@host\"")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("config key `upstreams`") && !e.contains("TOKEN"),
        "{e}"
    );
    for (toml, said) in [
        (
            "priority = \"x\"",
            "config key `priority` (from TOML source string): expected u32, found a string",
        ),
        (
            "[store]\nkind = \"ftp\"",
            "config key `store.kind` (from TOML source string): `ftp` is not one of local, s3",
        ),
        (
            "[[upstreams]]\npublic_keys = []",
            "config key `upstreams[0]` (from TOML source string): `url` is missing",
        ),
    ] {
        let e = from_toml(toml).unwrap_err().to_string();
        assert_eq!(e, said);
    }
}

#[test]
fn errors_name_the_key() {
    let e = from_toml("[store]\nkind = \"s3\"").unwrap_err().to_string();
    assert!(e.contains("store.bucket"), "{e}");
    let e = from_toml("[store]\nkind = \"ftp\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("store.kind") || e.contains("kind"), "{e}");
    let e = from_toml("store_dir = \"nix/store\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("store_dir"), "{e}");
    let e = from_toml("[store]\nkind = \"s3\"\nbucket = \"b\"\nendpoint = \"localhost:9000\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("store.endpoint"), "{e}");
    // A region that is blank or holds whitespace.
    let s3 = |rest: &str| from_toml(&format!("[store]\nkind = \"s3\"\nbucket = \"b\"\n{rest}"));
    assert!(s3("region = \"eu-west-1\"").is_ok());
    for (rest, key) in [
        ("region = \" \"", "store.region"),
        ("region = \"us east\"", "store.region"),
    ] {
        let e = s3(rest).unwrap_err().to_string();
        assert!(e.contains(&format!("`{key}`")), "{rest}: {e}");
    }
    // Credentials set but empty would override the instance's: refused, by name.
    for (key, toml) in [
        (
            "store.access_key_id",
            "access_key_id = \"\"\nsecret_access_key = \"s\"",
        ),
        (
            "store.secret_access_key",
            "access_key_id = \"k\"\nsecret_access_key = \" \"",
        ),
    ] {
        let e = from_toml(&format!("[store]\nkind = \"s3\"\nbucket = \"b\"\n{toml}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(key) && e.contains("must not be empty"), "{e}");
    }
}

/// A bucket configured without `kind = "s3"` (an environment that sets CELLAR_STORE__BUCKET
/// and forgets CELLAR_STORE__KIND) is refused: it would quietly serve a local directory.
#[test]
fn s3_keys_without_the_s3_kind_are_errors() {
    for key in [
        "bucket = \"b\"",
        "endpoint = \"http://localhost:3900\"",
        "access_key_id = \"k\"",
        "secret_access_key = \"s\"",
        "public_endpoint = \"https://s3.example.org\"",
    ] {
        for kind in ["", "kind = \"local\"\n"] {
            let e = from_toml(&format!("[store]\n{kind}{key}"))
                .unwrap_err()
                .to_string();
            let name = key.split(' ').next().unwrap();
            assert!(e.contains("store.kind"), "{key}: {e}");
            assert!(e.contains(&format!("store.{name}")), "{key}: {e}");
        }
    }
    // What the shipped file sets for every kind stays allowed.
    assert!(from_toml("[store]\nregion = \"eu-west-1\"\nprefix = \"cache/\"").is_ok());
}

/// `CELLAR_UPLOAD__TRUSTED_KEYS` set from an unset variable is refused: read as no keys, it would
/// quietly let a leaked write token publish unsigned paths.
#[test]
#[allow(clippy::result_large_err)] // figment's Jail API
fn an_empty_trusted_keys_variable_is_refused() {
    figment::Jail::expect_with(|jail| {
        let key = "test-1:/+L0Q/jKhm6dU1WL+m92avPr/xAL77BfJ3lwg3EXluU=";
        jail.create_file("c.toml", &format!("[upload]\ntrusted_keys = [\"{key}\"]\n"))?;
        for blank in ["", " , "] {
            jail.set_env("CELLAR_UPLOAD__TRUSTED_KEYS", blank);
            let e = Config::load(Some(Path::new("c.toml")))
                .map(|c| format!("{c:?}"))
                .unwrap_err()
                .to_string();
            assert!(
                e.to_lowercase().contains("upload.trusted_keys") && e.contains("empty"),
                "{blank:?}: {e}"
            );
        }
        // Keys in the variable, as a comma-separated list, still replace the file's.
        jail.set_env("CELLAR_UPLOAD__TRUSTED_KEYS", format!("{key}, {key}"));
        let c = Config::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
        assert_eq!(c.upload.trusted_keys.len(), 2);
        // An empty list written in the file is a choice: unsigned uploads are accepted.
        jail.clear_env();
        jail.create_file("c.toml", "[upload]\ntrusted_keys = []\n")?;
        let c = Config::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
        assert!(c.upload.trusted_keys.is_empty());
        Ok(())
    });
}

/// A key file variable set from an unset one (compose's `${KEY}`) is refused: read as no key
/// files, it would make cellar sign with a new key no client trusts.
#[test]
#[allow(clippy::result_large_err)] // figment's Jail API
fn an_empty_key_file_variable_is_refused() {
    figment::Jail::expect_with(|jail| {
        jail.create_file("c.toml", "[signing]\nkey_files = [\"a.sec\"]\n")?;
        jail.set_env("CELLAR_SIGNING__KEY_FILES", "");
        let e = Config::load(Some(Path::new("c.toml")))
            .map(|c| format!("{c:?}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.to_lowercase().contains("signing.key_files") && e.contains("empty"),
            "{e}"
        );
        jail.set_env("CELLAR_SIGNING__KEY_FILES", " , ");
        assert!(Config::load(Some(Path::new("c.toml"))).is_err());
        // An empty list written in the file is a choice: the created key.
        jail.clear_env();
        jail.create_file("c.toml", "[signing]\nkey_files = []\n")?;
        let c = Config::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
        assert!(c.signing.key_files.is_empty());
        Ok(())
    });
}

#[test]
#[allow(clippy::result_large_err)] // figment's Jail API
fn env_overrides_with_nesting_and_csv_lists() {
    figment::Jail::expect_with(|jail| {
        jail.create_file(
            "c.toml",
            "listen = \"127.0.0.1:9000\"\n[store]\nkind = \"local\"\n",
        )?;
        jail.set_env("CELLAR_STORE__KIND", "s3");
        jail.set_env("CELLAR_STORE__BUCKET", "nix-cache");
        jail.set_env("CELLAR_SIGNING__KEY_FILES", "a.sec,b.sec");
        let c = Config::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
        assert_eq!(c.listen.port(), 9000);
        let StoreBackend::S3(s3) = &c.store.backend else {
            return Err(format!("store is not s3: {c:?}").into());
        };
        assert_eq!(s3.bucket, "nix-cache");
        assert_eq!(
            c.signing.key_files,
            vec![PathBuf::from("a.sec"), PathBuf::from("b.sec")]
        );
        // What Kubernetes and Docker set beside a service named `cellar` is not configuration.
        for (var, value) in [
            ("CELLAR_SERVICE_HOST", "10.0.0.7"),
            ("CELLAR_SERVICE_PORT", "8080"),
            ("CELLAR_SERVICE_PORT_HTTP", "8080"),
            ("CELLAR_PORT", "tcp://10.0.0.7:8080"),
            ("CELLAR_PORT_8080_TCP_ADDR", "10.0.0.7"),
            ("CELLAR_NAME", "/web/cellar"),
            ("CELLAR_ENV_FOO", "bar"),
            // Beside a service named `cellar-metrics`.
            ("CELLAR_METRICS_SERVICE_HOST", "10.0.0.8"),
            ("CELLAR_METRICS_SERVICE_PORT", "9090"),
            ("CELLAR_METRICS_SERVICE_PORT_HTTP", "9090"),
            ("CELLAR_METRICS_PORT", "tcp://10.0.0.8:9090"),
            ("CELLAR_METRICS_PORT_9090_TCP", "tcp://10.0.0.8:9090"),
            ("CELLAR_METRICS_PORT_9090_TCP_PROTO", "tcp"),
            ("CELLAR_METRICS_PORT_9090_TCP_PORT", "9090"),
            ("CELLAR_METRICS_PORT_9090_TCP_ADDR", "10.0.0.8"),
        ] {
            jail.set_env(var, value);
        }
        // A bucket or a secret made of digits is still text, as written.
        jail.set_env("CELLAR_STORE__BUCKET", "2024");
        jail.set_env("CELLAR_STORE__PREFIX", "007");
        let c = Config::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
        assert_eq!(c.listen.port(), 9000);
        let StoreBackend::S3(s3) = &c.store.backend else {
            return Err(format!("store is not s3: {c:?}").into());
        };
        assert_eq!(s3.bucket, "2024");
        assert_eq!(s3.prefix, "007/");
        // Quoted, as a Docker env file or compose file keeps `KEY="value"`: read as the other
        // keys' values are (as TOML), without the quotes.
        jail.set_env("CELLAR_STORE__BUCKET", "\"nix-cache\"");
        jail.set_env("CELLAR_STORE__PREFIX", "'cache/'");
        let c = Config::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
        let StoreBackend::S3(s3) = &c.store.backend else {
            return Err(format!("store is not s3: {c:?}").into());
        };
        assert_eq!(
            (s3.bucket.as_str(), s3.prefix.as_str()),
            ("nix-cache", "cache/")
        );
        jail.set_env("CELLAR_STORE__BUCKET", "2024");
        jail.set_env("CELLAR_STORE__PREFIX", "007");
        // The file's `store.kind` is overridden, and said so; `listen` is not.
        assert_eq!(
            Config::env_overrides(Path::new("c.toml")),
            vec![("CELLAR_STORE__KIND".to_owned(), "store.kind".to_owned())]
        );
        // A misspelt key is still an error.
        // A key taken as text from its variable is said to come from it.
        jail.set_env("CELLAR_UPLOAD__TRUSTED_KEYS", "not-a-key");
        let e = Config::load(None).unwrap_err().to_string();
        assert!(e.contains("(from CELLAR_UPLOAD__TRUSTED_KEYS)"), "{e}");
        std::env::remove_var("CELLAR_UPLOAD__TRUSTED_KEYS");
        jail.set_env("CELLAR_STORE__BUKKET", "x");
        let e = Config::load(None).unwrap_err().to_string();
        assert!(
            e.starts_with("config key `store.bukket` (from `CELLAR_` environment"),
            "{e}"
        );
        Ok(())
    });
}

#[test]
fn durations_and_counts_have_upper_bounds() {
    for (toml, key) in [
        (
            "idle_timeout_secs = 9223372036854775807",
            "idle_timeout_secs",
        ),
        ("narinfo_max_age_secs = 99999999999", "narinfo_max_age_secs"),
        (
            "[cache]\nnarinfo_ttl_secs = 99999999999",
            "cache.narinfo_ttl_secs",
        ),
        (
            "[cache]\nnarinfo_negative_ttl_secs = 99999999999",
            "cache.narinfo_negative_ttl_secs",
        ),
        (
            "[gc]\naccess_flush_secs = 9223372036854775807",
            "gc.access_flush_secs",
        ),
        ("[gc]\ngrace_secs = 9223372036854775807", "gc.grace_secs"),
        (
            "[store]\ntimeout_secs = 9223372036854775807",
            "store.timeout_secs",
        ),
        ("max_connections = 1000001", "max_connections"),
        ("[upload]\nmax_concurrent = 129", "upload.max_concurrent"),
        (
            "[gc]\naccess_max_entries = 2000001",
            "gc.access_max_entries",
        ),
    ] {
        let e = from_toml(toml).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains("at most"), "{toml}: {e}");
    }
    assert!(from_toml("[upload]\nmax_concurrent = 128").is_ok());
    assert!(from_toml("[gc]\naccess_max_entries = 2000000").is_ok());
    // Ten years is still a duration.
    let c = from_toml("[cache]\nnarinfo_ttl_secs = 315360000").unwrap();
    assert_eq!(c.cache.narinfo_ttl, Duration::from_secs(315_360_000));
}

#[test]
fn upload_and_auth_sections() {
    let c = from_toml(
        "[upload]\ncompression = \"zstd\"\ncompression_level = 19\n\
         trusted_keys = [\"test-1:/+L0Q/jKhm6dU1WL+m92avPr/xAL77BfJ3lwg3EXluU=\"]\n\
         [[auth.tokens]]\nname = \"ci\"\nhash = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"\nscopes = [\"write\"]\n",
    )
    .unwrap();
    assert_eq!(
        c.upload.recompress,
        Some(Recompression {
            compression: Compression::Zstd,
            level: Some(19)
        })
    );
    assert_eq!(c.upload.trusted_keys.len(), 1);
    assert_eq!(c.auth.tokens[0].scopes, vec![Scope::Write]);
    for (bad, key) in [
        ("[upload]\ncompression = \"br\"", "upload.compression"),
        (
            "[upload]\ncompression = \"zstd\"\ncompression_level = 40",
            "upload.compression_level",
        ),
        ("[upload]\ntrusted_keys = [\"nope\"]", "trusted_keys"),
        ("[auth]\nprivate = true", "auth.private"),
        (
            "[[auth.tokens]]\nname = \"x\"\nhash = \"abc\"\nscopes = [\"read\"]",
            "auth.tokens[0].hash",
        ),
        (
            "[[auth.tokens]]\nname = \"x\"\nhash = \"abc\"\nscopes = [\"admin\"]",
            "admin",
        ),
    ] {
        let e = from_toml(bad).unwrap_err().to_string();
        assert!(e.contains(key), "{bad}: {e}");
    }
}

/// A value read well but invalid says where it came from, as an unreadable one does: the
/// file, or the environment.
#[test]
#[allow(clippy::result_large_err)] // figment's Jail API
fn invalid_values_name_their_source() {
    figment::Jail::expect_with(|jail| {
        jail.create_file(
            "bad.toml",
            "[[auth.tokens]]\nname = \"ok\"\nhash = \"sha256:{}\"\nscopes = [\"read\"]\n\
             [[auth.tokens]]\nname = \"ci\"\nhash = \"abc\"\nscopes = [\"write\"]\n"
                .replace("{}", &"0".repeat(64))
                .as_str(),
        )?;
        let e = Config::load(Some(Path::new("bad.toml")))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("config key `auth.tokens[1].hash` (in ")
                && e.contains("bad.toml): token \"ci\""),
            "{e}"
        );
        jail.set_env("CELLAR_UPLOAD__COMPRESSION", "zstd");
        jail.set_env("CELLAR_UPLOAD__COMPRESSION_LEVEL", "40");
        let e = Config::load(None).unwrap_err().to_string();
        assert!(
            e.starts_with("config key `upload.compression_level` (from `CELLAR_` environment"),
            "{e}"
        );
        Ok(())
    });
}

/// Values that would be accepted and misbehave: a priority Nix 2.8 cannot read (`stoi`), one
/// token given twice (the last entry's scopes would decide).
#[test]
fn values_that_would_misbehave_are_refused() {
    assert!(from_toml("priority = 2147483647").is_ok());
    let e = from_toml("priority = 2147483648").unwrap_err().to_string();
    assert!(e.starts_with("config key `priority`"), "{e}");
    let token = |name: &str, scope: &str| {
        format!(
            "[[auth.tokens]]\nname = \"{name}\"\nhash = \"sha256:{}\"\nscopes = [\"{scope}\"]\n",
            "0".repeat(64)
        )
    };
    let e = from_toml(&format!(
        "{}{}",
        token("ci", "write"),
        token("ci-ro", "read")
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("config key `auth.tokens[1].hash`") && e.contains("auth.tokens[0] (\"ci\")"),
        "{e}"
    );
    // The hash of the empty token (`echo -n "$TOKEN" | sha256sum`, the variable unset).
    let e = from_toml(&format!(
        "[[auth.tokens]]\nname = \"ci\"\nhash = \"sha256:{}\"\nscopes = [\"write\"]\n",
        crate::config::TokenHash::of("")
            .to_string()
            .trim_start_matches("sha256:")
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("config key `auth.tokens[0].hash`") && e.contains("empty token"),
        "{e}"
    );
    // Two tokens of one name (`cellar token new` twice without `--name`) are two tokens.
    let other = format!(
        "[[auth.tokens]]\nname = \"ci\"\nhash = \"sha256:{}\"\nscopes = [\"read\"]\n",
        "1".repeat(64)
    );
    assert!(from_toml(&format!("{}{other}", token("ci", "write"))).is_ok());
}

#[test]
fn upstreams_and_cache() {
    let c = from_toml(
        "[cache]\nnar_dir = \"/tmp/x\"\n[[upstreams]]\nurl = \"https://cache.nixos.org\"\n\
         public_keys = [\"cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=\"]\n",
    )
    .unwrap();
    assert_eq!(c.upstreams.len(), 1);
    assert_eq!(c.upstreams[0].timeout, Duration::from_secs(5));
    assert!(c.cache.nar_dir.is_some());
    for (bad, key) in [
        (
            "[[upstreams]]\nurl = \"ftp://x\"\npublic_keys = [\"a:AAAA\"]",
            "public",
        ),
        (
            "[[upstreams]]\nurl = \"ftp://x\"\npublic_keys = []",
            "upstreams[0].url",
        ),
        (
            "[[upstreams]]\nurl = \"http://x\"\npublic_keys = []",
            "upstreams[0].public_keys",
        ),
        (
            "[[upstreams]]\nurl = \"https://x/cache?token=t\"\npublic_keys = [\"cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=\"]",
            "upstreams[0].url",
        ),
        (
            "[cache]\nnar_dir = \"/x\"\nnar_max_bytes = 5",
            "cache.nar_max_bytes",
        ),
        (
            "[[upstreams]]\nurl = \"http://x\"\npublic_keys = [\"cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=\"]\n\
             [[upstreams]]\nurl = \"http://y\"\npublic_keys = [\"cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=\"]\n\
             [[upstreams]]\nurl = \"http://X:80/\"\npublic_keys = [\"cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=\"]",
            "config key `upstreams[2].url` (from TOML source string): upstreams[0] has the same URL",
        ),
    ] {
        let e = from_toml(bad).unwrap_err().to_string();
        assert!(e.contains(key), "{bad}: {e}");
    }
}

#[test]
fn secrets_do_not_print() {
    let c = from_toml(
        "[store]\nkind = \"s3\"\nbucket = \"b\"\naccess_key_id = \"AK\"\nsecret_access_key = \"SUPERSECRET\"",
    )
    .unwrap();
    assert!(!format!("{c:?}").contains("SUPERSECRET"));
}

#[test]
fn prefix_normalisation() {
    assert_eq!(file::normalise_prefix(""), "");
    assert_eq!(file::normalise_prefix("cache"), "cache/");
    assert_eq!(file::normalise_prefix("cache/"), "cache/");
    let c = from_toml("[store]\nkind = \"s3\"\nbucket = \"b\"\nprefix = \"cache\"").unwrap();
    let StoreBackend::S3(s3) = &c.store.backend else {
        panic!("not s3: {c:?}");
    };
    assert_eq!(s3.prefix, "cache/");
    for good in ["v1..2/", "..cache/", "a.b/"] {
        let c = from_toml(&format!(
            "[store]\nkind = \"s3\"\nbucket = \"b\"\nprefix = \"{good}\""
        ));
        assert!(c.is_ok(), "{good}: {c:?}");
    }
    for bad in [
        "/cache",
        "../cache",
        "./cache",
        "cache/./x",
        "a/.",
        "a/../b",
        "a/..",
    ] {
        let err = from_toml(&format!(
            "[store]\nkind = \"s3\"\nbucket = \"b\"\nprefix = \"{bad}\""
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("store.prefix"), "{bad}: {err}");
    }
}

#[test]
fn token_hashes_and_durations_are_parsed_once() {
    let h = "sha256:00000000000000000000000000000000000000000000000000000000000000ff";
    let c = from_toml(&format!(
        "narinfo_max_age_secs = 7\n[cache]\nnarinfo_ttl_secs = 9\nnar_dir = \"\"\n\
         [[auth.tokens]]\nname = \"x\"\nhash = \"{h}\"\nscopes = [\"read\"]"
    ))
    .unwrap();
    assert_eq!(c.narinfo_max_age, Duration::from_secs(7));
    assert_eq!(c.cache.narinfo_ttl, Duration::from_secs(9));
    assert_eq!(
        c.cache.nar_dir, None,
        "an empty nar_dir disables the disk cache"
    );
    assert_eq!(c.auth.tokens[0].hash.0[31], 0xff);
    assert_eq!(c.auth.tokens[0].hash.to_string(), h);
    assert_eq!(TokenHash::of("t"), TokenHash::of("t"));
    assert_ne!(TokenHash::of("t"), TokenHash::of("u"));
}

/// In a jail: relative paths are judged against the working directory, which the jailed
/// tests change while they run (a test outside one saw it change under it, or vanish).
#[test]
#[allow(clippy::result_large_err)] // figment's Jail API
fn the_nar_cache_never_overlaps_what_cellar_keeps() {
    figment::Jail::expect_with(|_jail| {
        nar_dir_overlaps();
        Ok(())
    });
}

fn nar_dir_overlaps() {
    for (bad, why) in [
        // The working directory: holds the generated key (./cellar-key.sec).
        (
            "[store]\nkind = \"s3\"\nbucket = \"b\"\n[cache]\nnar_dir = \".\"",
            "signing key",
        ),
        ("[cache]\nnar_dir = \"./\"", "store directory"),
        (
            "[store]\npath = \"/srv/cache\"\n[cache]\nnar_dir = \"/srv/cache/nar\"",
            "store directory",
        ),
        (
            "[store]\npath = \"/srv/cache/x/..\"\n[cache]\nnar_dir = \"/srv\"",
            "store directory",
        ),
        (
            "[signing]\nkey_files = [\"/etc/cellar/k.sec\"]\n[cache]\nnar_dir = \"/etc\"",
            "signing key",
        ),
    ] {
        let e = from_toml(bad).unwrap_err().to_string();
        assert!(e.contains("cache.nar_dir") && e.contains(why), "{bad}: {e}");
    }
    // Beside the store and the key, in a directory of its own: fine.
    from_toml("[store]\npath = \"/srv/cache\"\n[cache]\nnar_dir = \"/srv/nar\"").unwrap();
    from_toml("[cache]\nnar_dir = \"./nar-cache\"").unwrap();
}

/// Overlaps reached through links are refused as those named are: the store's `nar/` linked
/// to a bigger disk with the NAR cache put in that very directory (every uploaded NAR was
/// deleted at the next start, as an incomplete file of the cache's), `nar_dir` a link into
/// the store, a link that leads nowhere yet (a disk not mounted), a link to the key's
/// directory.
#[test]
fn the_nar_cache_never_overlaps_what_cellar_keeps_through_links() {
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    for d in ["data", "big/nar", "data2", "keys"] {
        std::fs::create_dir_all(t.join(d)).unwrap();
    }
    std::os::unix::fs::symlink(t.join("big/nar"), t.join("data/nar")).unwrap();
    std::os::unix::fs::symlink(t.join("data2/nar"), t.join("link2")).unwrap();
    std::os::unix::fs::symlink(t.join("unmounted/nar"), t.join("data2/log")).unwrap();
    std::os::unix::fs::symlink(t.join("keys"), t.join("keylink")).unwrap();
    // The store reached through a link, its `nar/` a relative link up from where it really is.
    std::fs::create_dir_all(t.join("real/c")).unwrap();
    std::os::unix::fs::symlink(t.join("real/c"), t.join("c")).unwrap();
    std::os::unix::fs::symlink("../disk/nar", t.join("real/c/nar")).unwrap();
    let t = t.display();
    for (store, nar_dir, why) in [
        ("data", "big/nar".to_owned(), "store directory's"),
        ("data", "big/nar/sub".to_owned(), "store directory's"),
        ("data", "big".to_owned(), "store directory's"),
        ("data2", "link2".to_owned(), "store directory"),
        ("data2", "unmounted/nar".to_owned(), "store directory's"),
        ("data", "keylink".to_owned(), "signing key"),
        ("c", "real/disk/nar".to_owned(), "store directory's"),
    ] {
        let toml = format!(
            "[store]\npath = \"{t}/{store}\"\n[signing]\nkey_files = [\"{t}/keys/k.sec\"]\n\
             [cache]\nnar_dir = \"{t}/{nar_dir}\""
        );
        let e = from_toml(&toml).unwrap_err().to_string();
        assert!(
            e.contains("cache.nar_dir") && e.contains(why),
            "{nar_dir}: {e}"
        );
    }
    // Beside the linked `nar/` on the big disk, in a directory of its own: fine.
    from_toml(&format!(
        "[store]\npath = \"{t}/data\"\n[signing]\nkey_files = [\"{t}/keys/k.sec\"]\n\
         [cache]\nnar_dir = \"{t}/big/cache\""
    ))
    .unwrap();
}

#[test]
#[allow(clippy::result_large_err)] // figment's Jail API
fn the_nar_cache_never_holds_the_config_file() {
    figment::Jail::expect_with(|jail| {
        jail.create_file("c.toml", "[cache]\nnar_dir = \"/\"\n")?;
        let e = Config::load(Some(Path::new("c.toml")))
            .unwrap_err()
            .to_string();
        // The key check comes first for "/"; a config file under the NAR dir is refused too.
        assert!(e.contains("cache.nar_dir"), "{e}");
        jail.create_file(
            "d.toml",
            "[store]\nkind = \"s3\"\nbucket = \"b\"\n\
             [signing]\ngenerated_key_file = \"/var/lib/k.sec\"\n[cache]\nnar_dir = \".\"\n",
        )?;
        let e = Config::load(Some(Path::new("d.toml")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("config file"), "{e}");
        Ok(())
    });
}

#[test]
fn the_nar_disk_cache_is_on_by_default_for_s3_only() {
    let s3 = "[store]\nkind = \"s3\"\nbucket = \"b\"\n";
    let c = from_toml(s3).unwrap();
    assert_eq!(c.cache.nar_dir, Some(PathBuf::from("./cellar-nar-cache")));
    let c = from_toml(&format!("{s3}[cache]\nnar_dir = \"\"")).unwrap();
    assert_eq!(c.cache.nar_dir, None, "empty turns it off");
    let c = from_toml(&format!("{s3}[cache]\nnar_dir = \"/var/cache/x\"")).unwrap();
    assert_eq!(c.cache.nar_dir, Some(PathBuf::from("/var/cache/x")));
    assert_eq!(
        from_toml("").unwrap().cache.nar_dir,
        None,
        "local store: off"
    );
}

#[test]
fn nar_redirects_need_an_s3_store_and_a_valid_url_and_lifetime() {
    let s3 = "[store]\nkind = \"s3\"\nbucket = \"b\"\n";
    let redirect = |c: Config| match c.store.backend {
        StoreBackend::S3(s) => s.redirect,
        other => panic!("not s3: {other:?}"),
    };
    assert_eq!(redirect(from_toml(s3).unwrap()), None, "off by default");
    assert_eq!(
        redirect(from_toml(&format!("{s3}redirect_nars = true")).unwrap()),
        Some(crate::config::NarRedirect {
            public_endpoint: None,
            ttl: Duration::from_secs(3600),
        })
    );
    let on = format!(
        "{s3}redirect_nars = true\npublic_endpoint = \"https://s3.example.org\"\n\
         redirect_ttl_secs = 600"
    );
    assert_eq!(
        redirect(from_toml(&on).unwrap()),
        Some(crate::config::NarRedirect {
            public_endpoint: Some("https://s3.example.org".into()),
            ttl: Duration::from_secs(600),
        })
    );
    for (bad, key) in [
        ("[store]\nredirect_nars = true", "store.redirect_nars"),
        (
            &format!("{s3}redirect_nars = true\npublic_endpoint = \"s3.example.org\""),
            "store.public_endpoint",
        ),
        (
            &format!("{s3}redirect_nars = true\nredirect_ttl_secs = 59"),
            "store.redirect_ttl_secs",
        ),
        (
            &format!("{s3}redirect_nars = true\nredirect_ttl_secs = 604801"),
            "store.redirect_ttl_secs",
        ),
    ] {
        let e = from_toml(bad).unwrap_err().to_string();
        assert!(e.contains(key), "{bad}: {e}");
    }
    assert!(from_toml(&format!(
        "{s3}redirect_nars = true\nredirect_ttl_secs = 604800"
    ))
    .is_ok());
}

#[test]
fn upload_part_concurrency_is_bounded() {
    let s3 = "[store]\nkind = \"s3\"\nbucket = \"b\"\n";
    let parts = |c: Config| match c.store.backend {
        StoreBackend::S3(s) => s.upload_part_concurrency,
        other => panic!("not s3: {other:?}"),
    };
    assert_eq!(parts(from_toml(s3).unwrap()), 4, "the default");
    for ok in [1, 16] {
        let c = from_toml(&format!("{s3}upload_part_concurrency = {ok}")).unwrap();
        assert_eq!(parts(c), ok);
    }
    for bad in [0, 17] {
        let e = from_toml(&format!("{s3}upload_part_concurrency = {bad}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("store.upload_part_concurrency"), "{bad}: {e}");
    }
}

#[test]
fn direct_requests_keeps_its_old_name() {
    let s3 = "[store]\nkind = \"s3\"\nbucket = \"b\"\n";
    let direct = |c: Config| match c.store.backend {
        StoreBackend::S3(s) => s.direct_requests,
        other => panic!("not s3: {other:?}"),
    };
    assert!(direct(from_toml(s3).unwrap()), "on by default");
    assert!(!direct(
        from_toml(&format!("{s3}direct_requests = false")).unwrap()
    ));
    assert!(!direct(
        from_toml(&format!("{s3}direct_reads = false")).unwrap()
    ));
    let e = from_toml(&format!("{s3}direct_reads = false\ndirect_requests = true"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("store.direct_reads") && e.contains("store.direct_requests"),
        "{e}"
    );
}

/// A variable of either name overrides the file's key of either name, and is reported as
/// overriding it.
#[test]
#[allow(clippy::result_large_err)] // figment's Jail API
fn a_variable_overrides_a_renamed_key_under_either_name() {
    figment::Jail::expect_with(|jail| {
        let direct = |c: Config| match c.store.backend {
            StoreBackend::S3(s) => s.direct_requests,
            other => panic!("not s3: {other:?}"),
        };
        let s3 = "[store]\nkind = \"s3\"\nbucket = \"b\"\n";
        for (in_file, var, value) in [
            (
                "direct_reads = false",
                "CELLAR_STORE__DIRECT_REQUESTS",
                "true",
            ),
            (
                "direct_requests = true",
                "CELLAR_STORE__DIRECT_READS",
                "false",
            ),
            ("direct_reads = true", "CELLAR_STORE__DIRECT_READS", "false"),
        ] {
            jail.clear_env();
            jail.create_file("c.toml", &format!("{s3}{in_file}\n"))?;
            jail.set_env(var, value);
            let c = Config::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(direct(c).to_string(), value, "{in_file} with {var}");
            assert_eq!(
                Config::env_overrides(Path::new("c.toml")),
                vec![(var.to_owned(), "store.direct_requests".to_owned())],
                "{in_file} with {var}"
            );
        }
        // Both names as variables: an error, as in the file, not whichever came last.
        jail.clear_env();
        jail.set_env("CELLAR_STORE__DIRECT_READS", "7");
        jail.set_env("CELLAR_STORE__DIRECT_REQUESTS", "true");
        let e = Config::load(Some(Path::new("c.toml")))
            .map(|c| format!("{c:?}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`store.direct_reads` is the old name of `store.direct_requests`"),
            "{e}"
        );
        Ok(())
    });
}

/// A value of the wrong type in the file is reported with the file it is in, also for the
/// keys read under a new name ([`Renamed`] keeps the file's name for its errors).
#[test]
#[allow(clippy::result_large_err)] // figment's Jail API
fn a_bad_value_names_the_file() {
    figment::Jail::expect_with(|jail| {
        jail.create_file(
            "c.toml",
            "[store]\nkind = \"s3\"\nbucket = \"b\"\ndirect_reads = 7\n",
        )?;
        let e = Config::load(Some(Path::new("c.toml")))
            .map(|c| format!("{c:?}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.toml") && e.contains("direct_requests"), "{e}");
        Ok(())
    });
}

/// A list key's variable is text, as a path is: a key file named `2024` is that file.
#[test]
#[allow(clippy::result_large_err)] // figment's Jail API
fn a_list_variable_of_digits_is_names() {
    figment::Jail::expect_with(|jail| {
        jail.set_env("CELLAR_SIGNING__KEY_FILES", "2024");
        let c = Config::load(None).map_err(|e| e.to_string())?;
        assert_eq!(c.signing.key_files, vec![PathBuf::from("2024")]);
        jail.set_env("CELLAR_SIGNING__KEY_FILES", "2024,2025");
        let c = Config::load(None).map_err(|e| e.to_string())?;
        assert_eq!(
            c.signing.key_files,
            vec![PathBuf::from("2024"), PathBuf::from("2025")]
        );
        Ok(())
    });
}

#[test]
fn a_reload_names_each_key_only_a_restart_applies() {
    let base = from_toml("").unwrap();
    // Each line is a change from the defaults, in the file's own words: the reload must name
    // that key (so the log tells the operator what was kept), or accept it.
    let fixed = [
        ("listen", "listen = \"127.0.0.1:9999\""),
        ("metrics_listen", "metrics_listen = \"127.0.0.1:9998\""),
        ("header_read_timeout_secs", "header_read_timeout_secs = 7"),
        ("idle_timeout_secs", "idle_timeout_secs = 7"),
        ("max_connections", "max_connections = 7"),
        ("log.format", "[log]\nformat = \"json\""),
        ("shutdown_timeout_secs", "shutdown_timeout_secs = 7"),
        ("shutdown_delay_secs", "shutdown_delay_secs = 7"),
        ("store_dir", "store_dir = \"/gnu/store\""),
        ("store.*", "[store]\nkind = \"local\"\npath = \"elsewhere\""),
        ("upload.*", "[upload]\nmax_nar_bytes = 7000000"),
        ("cache.nar_dir", "[cache]\nnar_dir = \"nars\""),
        (
            "cache.prefetch_concurrency",
            "[cache]\nprefetch_concurrency = 0",
        ),
        (
            "cache.prefetch_nar_max_bytes",
            "[cache]\nprefetch_nar_max_bytes = 0",
        ),
        ("gc.access_flush_secs", "[gc]\naccess_flush_secs = 7"),
        ("gc.access_max_entries", "[gc]\naccess_max_entries = 7000"),
    ];
    for (key, toml) in fixed {
        let new = from_toml(toml).unwrap_or_else(|e| panic!("{toml}: {e}"));
        assert_eq!(base.needs_restart(&new), Some(key), "{toml}");
    }
    let reloadable = [
        "priority = 7",
        "narinfo_max_age_secs = 7",
        "[gc]\nkeep_days = 7",
        "[cache]\nnarinfo_ttl_secs = 7",
    ];
    for toml in reloadable {
        let new = from_toml(toml).unwrap_or_else(|e| panic!("{toml}: {e}"));
        assert_eq!(base.needs_restart(&new), None, "{toml}");
    }
}

#[test]
fn nars_up_to_256_mib_are_prefetched_by_default() {
    let c = from_toml("").unwrap();
    assert_eq!(c.cache.prefetch_nar_max_bytes, 256 << 20);
    let c = from_toml("[cache]\nprefetch_nar_max_bytes = 1000").unwrap();
    assert_eq!(c.cache.prefetch_nar_max_bytes, 1000);
}

/// S3 takes at most 10 000 parts in one object: a larger NAR limit would accept an upload
/// that fails only after ~78 GiB were sent. A local store has no such bound.
#[test]
fn the_nar_limit_fits_in_an_s3_object() {
    let s3 = "[store]\nkind = \"s3\"\nbucket = \"b\"\n";
    let at = |n: u64| format!("{s3}[upload]\nmax_nar_bytes = {n}\n");
    let c = from_toml(&at(S3_MAX_OBJECT_BYTES)).unwrap();
    assert_eq!(c.upload.max_nar_bytes, S3_MAX_OBJECT_BYTES);
    let e = from_toml(&at(S3_MAX_OBJECT_BYTES + 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("upload.max_nar_bytes"), "{e}");
    let local = format!("[upload]\nmax_nar_bytes = {}\n", S3_MAX_OBJECT_BYTES + 1);
    assert!(from_toml(&local).is_ok());
}

/// Link variables of services named `cellar-<x>` are told from configuration keys with `_` in
/// their names, and nested keys never are link variables.
#[test]
fn link_variables_of_sibling_services_are_not_keys() {
    use super::config_key;
    for var in [
        "CELLAR_HEADLESS_SERVICE_HOST",
        "CELLAR_MY_CACHE_PORT_80_TCP_ADDR",
        "CELLAR_X_PORT",
    ] {
        assert_eq!(config_key(var), None, "{var}");
    }
    for (var, key) in [
        ("CELLAR_NOT_FOUND_MAX_AGE_SECS", "not_found_max_age_secs"),
        ("CELLAR_METRICS_LISTEN", "metrics_listen"),
        ("CELLAR_STORE__PORT", "store.port"),
        ("CELLAR_UPLOAD__MAX_CONCURRENT", "upload.max_concurrent"),
        ("CELLAR_X_PORT_80_TCPX", "x_port_80_tcpx"),
    ] {
        assert_eq!(config_key(var).as_deref(), Some(key), "{var}");
    }
}

/// A configuration error never repeats a secret: not a syntax error's excerpt of the file,
/// not a secret of the wrong type. Where the error is stays said.
#[test]
fn config_errors_do_not_quote_secrets() {
    for (toml, place) in [
        ("[store]\nsecret_access_key = \"SUPERSECRET", "line 2"),
        ("[store]\nsecret_access_key = SUPERSECRET", "line 2"),
        (
            "[store]\nsecret_access_key = 1234567",
            "store.secret_access_key",
        ),
    ] {
        let e = from_toml(toml).unwrap_err().to_string();
        assert!(!e.contains("SUPERSECRET") && !e.contains("1234567"), "{e}");
        assert!(e.contains(place), "{e}");
    }
    // Other errors keep figment's words.
    let e = from_toml("[store]\ntimeout_secs = \"x\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("timeout_secs") && e.contains("string"), "{e}");
}

/// No key of the configuration (the shipped file lists every one) is taken for a link
/// variable when set through the environment.
#[test]
fn every_key_can_be_set_through_the_environment() {
    use super::config_key;
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/cellar.toml"))
            .unwrap();
    let mut section = String::new();
    let mut n = 0;
    for line in shipped.lines().map(|l| l.trim_start_matches('#').trim()) {
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.trim_matches(|c| c == '[' || c == ']').to_owned();
            continue;
        }
        let Some((key, _)) = line.split_once(" = ") else {
            continue;
        };
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            continue;
        }
        let full = if section.is_empty() {
            key.to_owned()
        } else {
            format!("{section}.{key}")
        };
        let var = format!("CELLAR_{}", full.replace('.', "__").to_ascii_uppercase());
        assert_eq!(config_key(&var).as_deref(), Some(full.as_str()), "{var}");
        n += 1;
    }
    assert!(n > 40, "{n} keys read");
}

/// An upstream URL that is not http(s) is refused without repeating what it may hold.
#[test]
fn a_bad_url_is_refused_without_its_credentials() {
    let e = from_toml(
        "[[upstreams]]\nurl = \"htps://cellar:T0KEN@cache.example.org\"\n\
         public_keys = [\"cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=\"]",
    )
    .unwrap_err()
    .to_string();
    assert!(!e.contains("T0KEN"), "{e}");
    assert!(
        e.contains("cache.example.org") && e.contains("http://"),
        "{e}"
    );
}

/// URLs cellar would put paths after wrongly, or not at all, are refused at start-up by their
/// key (they used to start, then miss or fail on every request): whitespace, no host, a
/// query or fragment; never with the credentials they hold.
#[test]
fn urls_that_cannot_take_a_path_are_refused() {
    let key = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
    for (url, why) in [
        ("https://cache.example.org/ ", "whitespace"),
        ("https://u:T0KEN@cache.example.org/x y", "whitespace"),
        ("https://", "URL"),
        ("https://cache.example.org/?token=1", "query"),
        ("https://cache.example.org/#x", "fragment"),
    ] {
        let toml = format!("[[upstreams]]\nurl = \"{url}\"\npublic_keys = [\"{key}\"]");
        let e = from_toml(&toml).unwrap_err().to_string();
        assert!(e.contains("upstreams") && e.contains(why), "{url}: {e}");
        assert!(!e.contains("T0KEN"), "{e}");
    }
    for (key, url, why) in [
        ("endpoint", "http://minio:9000 ", "whitespace"),
        ("endpoint", "http://minio:9000/?x=1", "query"),
        ("public_endpoint", "https://s3.example.org/#a", "fragment"),
    ] {
        let toml = format!(
            "[store]\nkind = \"s3\"\nbucket = \"b\"\nredirect_nars = true\n{key} = \"{url}\""
        );
        let e = from_toml(&toml).unwrap_err().to_string();
        assert!(
            e.contains(&format!("store.{key}")) && e.contains(why),
            "{e}"
        );
    }
    // Fine: a path, a port, credentials, an address.
    for url in [
        "https://cache.example.org/sub/",
        "http://u:p@nas.lan:5000",
        "http://[fd00::1]:8080",
    ] {
        let toml = format!("[[upstreams]]\nurl = \"{url}\"\npublic_keys = [\"{key}\"]");
        from_toml(&toml).unwrap();
    }
}

/// `metrics_listen` may not take the port `listen` serves: the same address, or either on
/// every address (`0.0.0.0`, `[::]`); `serve` would fail to bind where `check-config` passed.
#[test]
fn metrics_listen_may_not_take_the_port_of_listen() {
    for (listen, metrics) in [
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("0.0.0.0:8080", "127.0.0.1:8080"),
        ("127.0.0.1:8080", "0.0.0.0:8080"),
        ("[::]:8080", "127.0.0.1:8080"),
        ("[::1]:8080", "[::]:8080"),
    ] {
        let e = from_toml(&format!(
            "listen = \"{listen}\"\nmetrics_listen = \"{metrics}\""
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("metrics_listen"), "{listen} {metrics}: {e}");
    }
    for (listen, metrics) in [
        ("127.0.0.1:8080", "127.0.0.1:9090"),
        ("127.0.0.1:8080", "127.0.0.2:8080"),
        ("0.0.0.0:8080", "0.0.0.0:9090"),
        ("127.0.0.1:0", "127.0.0.1:0"),
        ("0.0.0.0:8080", "[::1]:8080"),
        ("[::1]:8080", "0.0.0.0:8080"),
    ] {
        let c = from_toml(&format!(
            "listen = \"{listen}\"\nmetrics_listen = \"{metrics}\""
        ));
        assert!(c.is_ok(), "{listen} {metrics}: {c:?}");
    }
}

/// An empty `signing.generated_key_file` (a variable set from an unset one) is refused naming
/// the key, not found at start-up as "cannot write key file".
#[test]
fn an_empty_generated_key_file_is_refused() {
    let e = from_toml("[signing]\ngenerated_key_file = \"\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("signing.generated_key_file"), "{e}");
}

/// A secret key given where a key file's path belongs (`…="$(cat k.sec)"`) is refused at
/// start-up by the key's name, without repeating it: for the generated key's file too, which
/// otherwise became a directory tree named after the key, logged as created.
#[test]
fn a_secret_key_in_place_of_a_key_files_path_is_refused() {
    let key = crate::nix::SecretKey::generate("cache-1")
        .unwrap()
        .to_nix_format();
    for (field, toml) in [
        (
            "signing.generated_key_file",
            format!("[signing]\ngenerated_key_file = \"{key}\""),
        ),
        (
            "signing.key_files",
            format!("[signing]\nkey_files = [\"/etc/k.sec\", \"{key}\"]"),
        ),
    ] {
        let e = from_toml(&toml).unwrap_err().to_string();
        assert!(e.contains(field) && e.contains("secret key"), "{e}");
        assert!(!e.contains(&key[8..]), "the key is repeated: {e}");
    }
}

/// A `--config` file that is not there is named as the flag it came from, not as a key.
#[test]
fn a_missing_config_file_is_named_by_its_flag() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("cellar.toml");
    let e = Config::load(Some(&missing)).unwrap_err().to_string();
    assert_eq!(
        e,
        format!("--config {}: not a readable file", missing.display())
    );
    // A directory is no file either.
    let e = Config::load(Some(dir.path())).unwrap_err().to_string();
    assert!(e.ends_with(": not a readable file"), "{e}");
}

/// `--log-format` takes `text` or `json`, and says what it expects of anything else.
#[test]
fn log_formats_parse_by_name() {
    assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
    assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
    assert_eq!(
        "xml".parse::<LogFormat>(),
        Err("\"xml\": expected `text` or `json`".to_owned())
    );
}

/// Credentials never reach a log or an error through `Debug`: not alone, not inside the
/// config they are part of.
#[test]
fn secrets_are_redacted_in_debug_output() {
    assert_eq!(format!("{:?}", Secret("s3cr3t-value".into())), "<redacted>");
    let c = from_toml(
        "[store]\nkind = \"s3\"\nbucket = \"b\"\naccess_key_id = \"AKIDEXAMPLE\"\n\
         secret_access_key = \"s3cr3t-value\"",
    )
    .unwrap();
    let shown = format!("{c:?}");
    assert!(shown.contains("<redacted>"), "{shown}");
    assert!(!shown.contains("s3cr3t-value"), "{shown}");
}

/// What start-up errors say the store is: the directory, or the bucket and its endpoint,
/// never the credentials.
#[test]
fn a_store_is_described_without_its_credentials() {
    let local = from_toml("[store]\nkind = \"local\"\npath = \"/srv/cache\"").unwrap();
    assert_eq!(
        local.store.backend.to_string(),
        "local directory /srv/cache"
    );
    let s3 = |extra: &str| {
        from_toml(&format!(
            "[store]\nkind = \"s3\"\nbucket = \"nix\"\naccess_key_id = \"AKIDEXAMPLE\"\n\
             secret_access_key = \"s3cr3t-value\"\n{extra}"
        ))
        .unwrap()
        .store
        .backend
        .to_string()
    };
    assert_eq!(s3(""), "s3 bucket \"nix\"");
    assert_eq!(
        s3("endpoint = \"http://127.0.0.1:3900\""),
        "s3 bucket \"nix\" at http://127.0.0.1:3900"
    );
}

/// A token's hash shows as it is written in the config (`sha256:<hex>`), in `Debug` too.
#[test]
fn token_hashes_show_as_configured() {
    let written = format!("sha256:{}", "ab".repeat(32));
    let h: TokenHash = written.parse().unwrap();
    assert_eq!(h.to_string(), written);
    assert_eq!(format!("{h:?}"), written);
}

/// `store_dir` is an absolute path without a trailing `/` or whitespace; anything else is
/// refused naming the key.
#[test]
fn store_dirs_are_absolute_paths_without_a_trailing_slash() {
    for good in ["/nix/store", "/gnu/store", "/a"] {
        let c = from_toml(&format!("store_dir = {good:?}")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.store_dir, good);
    }
    for bad in [
        "",
        "/",
        "nix/store",
        "/nix/store/",
        "/nix/my store",
        "/nix/store\t",
    ] {
        let e = from_toml(&format!("store_dir = {bad:?}"))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("config key `store_dir` (from TOML source string): ")
                && e.ends_with("must be an absolute path without a trailing `/`"),
            "{bad:?}: {e}"
        );
    }
}

/// A duration that must be positive says so; one with a larger minimum names it.
#[test]
fn durations_below_their_minimum_say_what_is_expected() {
    let said = |toml: &str| from_toml(toml).map(|_| ()).unwrap_err().to_string();
    assert_eq!(
        said("idle_timeout_secs = 0"),
        "config key `idle_timeout_secs` (from TOML source string): must be > 0"
    );
    assert_eq!(
        said(
            "[store]\nkind = \"s3\"\nbucket = \"b\"\nredirect_nars = true\nredirect_ttl_secs = 59"
        ),
        "config key `store.redirect_ttl_secs` (from TOML source string): must be at least 60"
    );
}

/// `max_connections` takes 1 to 1 000 000, both ends included.
#[test]
fn max_connections_takes_one_to_a_million() {
    for n in [1, 1_000_000] {
        let c = from_toml(&format!("max_connections = {n}")).unwrap();
        assert_eq!(c.max_connections, n);
    }
    let said = |n: usize| {
        from_toml(&format!("max_connections = {n}"))
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        said(0),
        "config key `max_connections` (from TOML source string): must be > 0"
    );
    assert_eq!(
        said(1_000_001),
        "config key `max_connections` (from TOML source string): must be at most 1000000"
    );
}

/// The NAR caches' sizes and the prefetch's concurrency, at both ends of what each takes.
#[test]
fn cache_limits_are_taken_up_to_their_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let nars = dir.path().join("nars").display().to_string();
    let ok = |toml: String| {
        from_toml(&format!("[cache]\n{toml}")).unwrap_or_else(|e| panic!("{toml}: {e}"))
    };
    let said = |toml: String| {
        from_toml(&format!("[cache]\n{toml}"))
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let mib = 1u64 << 20;
    ok(format!("nar_dir = {nars:?}\nnar_max_bytes = {}", 64 * mib));
    assert_eq!(
        said(format!(
            "nar_dir = {nars:?}\nnar_max_bytes = {}",
            64 * mib - 1
        )),
        "config key `cache.nar_max_bytes` (from TOML source string): must be at least 64 MiB when cache.nar_dir is set"
    );
    let c = ok(format!("nar_memory_max_object_bytes = {}", 16 * mib));
    assert_eq!(c.cache.nar_memory_max_object, 16 * mib);
    assert!(
        said(format!("nar_memory_max_object_bytes = {}", 16 * mib + 1))
            .starts_with("config key `cache.nar_memory_max_object_bytes` (from TOML source string): must be at most 16 MiB")
    );
    // An object may be as large as the memory cache, not larger; with the cache off (0),
    // its size does not matter.
    ok("nar_memory_bytes = 1000\nnar_memory_max_object_bytes = 1000".into());
    ok("nar_memory_bytes = 0\nnar_memory_max_object_bytes = 1000".into());
    assert_eq!(
        said("nar_memory_bytes = 1000\nnar_memory_max_object_bytes = 1001".into()),
        "config key `cache.nar_memory_max_object_bytes` (from TOML source string): must not exceed cache.nar_memory_bytes"
    );
    assert_eq!(
        ok("prefetch_concurrency = 1024".into())
            .cache
            .prefetch_concurrency,
        1024
    );
    assert_eq!(
        said("prefetch_concurrency = 1025".into()),
        "config key `cache.prefetch_concurrency` (from TOML source string): must be at most 1024"
    );
}

/// A generated key's name is what Nix allows: not empty, no `:`, no whitespace.
#[test]
fn generated_key_names_are_checked() {
    let c = from_toml("[signing]\ngenerated_key_name = \"cache.example.org-1\"").unwrap();
    assert_eq!(
        c.signing.generated_key_name.as_deref(),
        Some("cache.example.org-1")
    );
    for bad in ["", "cache:1", "cache 1", "cache\t1"] {
        let e = from_toml(&format!("[signing]\ngenerated_key_name = {bad:?}"))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("config key `signing.generated_key_name` (from TOML source string): "),
            "{bad:?}: {e}"
        );
    }
}

/// Each bounded key takes its bound and refuses one past it, naming itself: `(line at the
/// bound, line one past it, the key)`.
#[test]
fn bounded_keys_take_their_bounds_and_refuse_past_them() {
    let s3 = "[store]\nkind = \"s3\"\nbucket = \"b\"\n";
    for (ok, refused, key) in [
        (
            "[upload]\nstaging_max_age_secs = 60",
            "[upload]\nstaging_max_age_secs = 59",
            "upload.staging_max_age_secs",
        ),
        (
            "[upload]\nmax_nar_bytes = 1048576",
            "[upload]\nmax_nar_bytes = 1048575",
            "upload.max_nar_bytes",
        ),
        (
            "[upload]\nxz_memory_limit_bytes = 68157440",
            "[upload]\nxz_memory_limit_bytes = 68157439",
            "upload.xz_memory_limit_bytes",
        ),
        (
            "[gc]\nkeep_days = 365000",
            "[gc]\nkeep_days = 365001",
            "gc.keep_days",
        ),
        (
            "[gc]\naccess_max_entries = 1000",
            "[gc]\naccess_max_entries = 999",
            "gc.access_max_entries",
        ),
        (
            "[gc]\naccess_max_entries = 2000000",
            "[gc]\naccess_max_entries = 2000001",
            "gc.access_max_entries",
        ),
    ] {
        from_toml(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        let e = from_toml(refused).map(|_| ()).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("config key `{key}` (from TOML source string): ")),
            "{refused}: {e}"
        );
    }
    for bucket in ["a/b", "a b", "a\tb"] {
        let e = from_toml(&format!("[store]\nkind = \"s3\"\nbucket = {bucket:?}"))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("config key `store.bucket` (from TOML source string): ")
                && e.ends_with("is not a bucket name"),
            "{bucket:?}: {e}"
        );
    }
    from_toml(s3).unwrap();
}

/// `gc.keep_days` is days, and `gc.max_bytes = 0` means no budget.
#[test]
fn gc_retention_and_budget_are_read_as_written() {
    let c = from_toml("[gc]\nkeep_days = 7\nmax_bytes = 5000").unwrap();
    assert_eq!(c.gc.keep, Duration::from_secs(7 * 24 * 3600));
    assert_eq!(c.gc.max_bytes, Some(5000));
    let c = from_toml("[gc]\nmax_bytes = 0").unwrap();
    assert_eq!(c.gc.max_bytes, None);
}

/// An S3 endpoint variable set but empty is refused by name, at start-up and in check-config
/// (the SDK took it as the endpoint and every request failed); the first one set decides, as
/// it does for the SDK, and `store.endpoint` makes both unused.
#[test]
fn an_empty_endpoint_variable_is_refused() {
    let s3 = from_toml("[store]\nkind = \"s3\"\nbucket = \"b\"").unwrap();
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| std::ffi::OsString::from(v))
        }
    };
    let e = s3
        .check_endpoint_env(env(&[
            ("AWS_ENDPOINT_URL_S3", ""),
            ("AWS_ENDPOINT_URL", "http://x"),
        ]))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("config key `store.endpoint` (from AWS_ENDPOINT_URL_S3): unset, so the S3 client takes $AWS_ENDPOINT_URL_S3, which is set but empty"),
        "{e}"
    );
    let e = s3
        .check_endpoint_env(env(&[("AWS_ENDPOINT_URL", " ")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("(from AWS_ENDPOINT_URL)"), "{e}");
    assert!(s3
        .check_endpoint_env(env(&[
            ("AWS_ENDPOINT_URL_S3", "http://s3"),
            ("AWS_ENDPOINT_URL", "")
        ]))
        .is_ok());
    assert!(s3.check_endpoint_env(env(&[])).is_ok());
    assert!(s3
        .check_endpoint_env(env(&[
            ("AWS_ENDPOINT_URL_S3", ""),
            ("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
        ]))
        .is_ok());
    let configured =
        from_toml("[store]\nkind = \"s3\"\nbucket = \"b\"\nendpoint = \"http://e\"").unwrap();
    assert!(configured
        .check_endpoint_env(env(&[("AWS_ENDPOINT_URL_S3", "")]))
        .is_ok());
    let local = from_toml("").unwrap();
    assert!(local
        .check_endpoint_env(env(&[("AWS_ENDPOINT_URL_S3", "")]))
        .is_ok());
}

/// A config file others may read is said to hold secrets when it does: the S3 secret, an
/// upstream URL's credentials; not when it holds none, nor when others may not read it.
#[test]
fn secrets_in_a_file_others_can_read_are_named() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.toml");
    std::fs::write(
        &f,
        "[store]\nkind = \"s3\"\nbucket = \"b\"\naccess_key_id = \"k\"\n\
         secret_access_key = \"s\"\n\
         [[upstreams]]\nurl = \"https://cache.nixos.org\"\n\
         [[upstreams]]\nurl = \"https://ci:t0ken@attic.lan/ci\"\n\
         [[upstreams]]\nurl = \"https://mirror.lan/a@b\"\n",
    )
    .unwrap();
    let mode = |m: u32| std::fs::set_permissions(&f, std::fs::Permissions::from_mode(m)).unwrap();
    mode(0o644);
    assert_eq!(
        Config::secrets_others_can_read(&f),
        ["store.secret_access_key", "upstreams[1].url"]
    );
    mode(0o640);
    assert!(Config::secrets_others_can_read(&f).is_empty());
    mode(0o644);
    // In a directory others may not enter.
    let closed =
        |m: u32| std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(m)).unwrap();
    closed(0o750);
    assert!(Config::secrets_others_can_read(&f).is_empty());
    closed(0o755);
    std::fs::write(&f, "[[upstreams]]\nurl = \"https://cache.nixos.org\"\n").unwrap();
    assert!(Config::secrets_others_can_read(&f).is_empty());
}
