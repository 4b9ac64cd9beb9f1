//! Pins: named sets of store paths whose closures `cellar gc` always keeps, stored as
//! `_cellar/pins/<name>`. Like a profile, adding a pin under an existing name replaces it.
//!
//! Format: a header line `cellar-pin 1`, `created: <unix seconds>`, optionally
//! `keep-days: <N>` (the pin expires N days after it was created), then `path: <store path>`
//! lines.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::TryStreamExt as _;

use super::inventory::Meta;
use super::{GcError, RESERVED_PREFIX};
use crate::nix::{StorePathBaseName, StorePathHash};
use crate::store::{object_key, Store, StoreError};

/// Where pins live, under [`RESERVED_PREFIX`].
pub const DIR: &str = "pins/";

const HEADER: &str = "cellar-pin 1";

/// A pin is a handful of lines; anything larger is not one.
const MAX_PIN_BYTES: u64 = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    pub name: String,
    pub created: SystemTime,
    /// `None`: kept until removed.
    pub keep: Option<Duration>,
    pub paths: Vec<StorePathBaseName>,
}

impl Pin {
    /// Whether the pin still makes its paths roots at `now`.
    pub fn active(&self, now: SystemTime) -> bool {
        // A keep too long for the clock to represent lasts as long as the clock.
        self.keep
            .is_none_or(|k| self.created.checked_add(k).is_none_or(|end| end > now))
    }

    /// How long the pin lasts, as `cellar pin list` says it at `now`: until removed, until
    /// when (UTC, to the minute), or since when it has expired.
    pub fn state(&self, now: SystemTime) -> String {
        let Some(keep) = self.keep else {
            return "kept until removed".to_owned();
        };
        let days = keep.as_secs() / 86400;
        let plural = if days == 1 { "" } else { "s" };
        match self.created.checked_add(keep) {
            None => "kept until removed".to_owned(),
            Some(end) if !self.active(now) => match utc_minute(end) {
                Some(end) => format!("expired {end}"),
                None => "expired".to_owned(),
            },
            Some(end) => match utc_minute(end) {
                Some(end) => format!("kept until {end}, {days} day{plural} from its creation"),
                None => format!("kept for {days} day{plural} from its creation"),
            },
        }
    }

    pub fn render(&self, store_dir: &str) -> String {
        let secs = self
            .created
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut s = format!("{HEADER}\ncreated: {secs}\n");
        if let Some(k) = self.keep {
            s.push_str(&format!("keep-days: {}\n", k.as_secs() / 86400));
        }
        for p in &self.paths {
            s.push_str(&format!("path: {store_dir}/{p}\n"));
        }
        s
    }

    pub fn parse(name: &str, text: &str, store_dir: &str) -> Result<Self, String> {
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(format!("does not start with {HEADER:?}"));
        }
        let mut created = None;
        let mut keep = None;
        let mut paths = Vec::new();
        for (i, line) in lines.enumerate() {
            let bad = || format!("line {}: {line:?}", i + 2);
            let (k, v) = line.split_once(": ").ok_or_else(bad)?;
            match k {
                "created" => {
                    let s: u64 = v.parse().map_err(|_| bad())?;
                    created = Some(
                        UNIX_EPOCH
                            .checked_add(Duration::from_secs(s))
                            .ok_or_else(bad)?,
                    );
                }
                "keep-days" => {
                    let d: u64 = v.parse().map_err(|_| bad())?;
                    keep = Some(Duration::from_secs(d.saturating_mul(86400)));
                }
                "path" => paths.push(store_path(v, store_dir).map_err(|_| bad())?),
                _ => return Err(bad()),
            }
        }
        Ok(Self {
            name: name.to_owned(),
            created: created.ok_or("no created: line")?,
            keep,
            paths,
        })
    }
}

fn pin_key(name: &str) -> Result<String, GcError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c));
    if !ok {
        return Err(GcError::BadPinName(name.to_owned()));
    }
    Ok(format!("{RESERVED_PREFIX}{DIR}{name}"))
}

/// A store path as given on the command line (`/nix/store/<hash>-<name>`, or its base name).
/// [`store_path`] of `s`, or else of where the symlinks along it lead: `./result` of
/// `nix-build`, a path inside it (`./result/bin/hello`), a profile (the store path it points
/// at now). Links are read, not resolved: the store path need not be on this machine, and a
/// store directory reached through a symlink (`/nix` on another disk) is still named as the
/// store names it.
pub fn store_path_or_link(s: &str, store_dir: &str) -> Result<StorePathBaseName, GcError> {
    let first = match store_path(s, store_dir) {
        Ok(p) => return Ok(p),
        Err(e) => e,
    };
    let mut at = std::path::PathBuf::from(s);
    // As many links as the kernel follows in one path.
    for _ in 0..40 {
        // The whole path a link first (`/run/current-system/sw/bin/hello` names hello's
        // package, not the system), else the first link along it (`./result/bin/hello`).
        let whole = std::fs::read_link(&at)
            .ok()
            .map(|target| match at.parent() {
                Some(dir) if target.is_relative() => dir.join(target),
                _ => target,
            });
        let Some(next) = whole.or_else(|| first_link_read(&at)) else {
            break;
        };
        at = next;
        if let Ok(p) = store_path(&at.to_string_lossy(), store_dir) {
            return Ok(p);
        }
    }
    Err(first)
}

/// `path` with its first component that is a symlink (the shortest prefix) replaced by the
/// link's target, and what followed it kept; `None` if no prefix is a link.
fn first_link_read(path: &std::path::Path) -> Option<std::path::PathBuf> {
    let mut prefix = std::path::PathBuf::new();
    let mut parts = path.components();
    while let Some(part) = parts.next() {
        prefix.push(part);
        let Ok(target) = std::fs::read_link(&prefix) else {
            continue;
        };
        let mut led = match prefix.parent() {
            Some(dir) if target.is_relative() => dir.join(target),
            _ => target,
        };
        led.push(parts.as_path());
        return Some(led);
    }
    None
}

pub fn store_path(s: &str, store_dir: &str) -> Result<StorePathBaseName, GcError> {
    let bad = || GcError::BadStorePath {
        path: s.to_owned(),
        store_dir: store_dir.to_owned(),
    };
    let base = match s.strip_prefix(store_dir) {
        Some(rest) => rest.strip_prefix('/').ok_or_else(bad)?,
        None if !s.contains('/') => s,
        None => return Err(bad()),
    };
    // `nix-build` prints output paths; a path inside one names its store path.
    let base = base.split('/').next().unwrap_or(base);
    base.parse().map_err(|_| bad())
}

/// Writes the pin `name` (replacing one of the same name). Returns the paths that have no
/// narinfo in the store yet: pinned all the same, but worth a warning.
///
/// The paths are first recorded as used ([`super::access::record_now`]): a collection already
/// running read the pins before this one existed, and keeps them by that record instead.
pub async fn add(
    store: &dyn Store,
    name: &str,
    paths: Vec<StorePathBaseName>,
    keep_days: Option<u64>,
    store_dir: &str,
) -> Result<Vec<StorePathBaseName>, GcError> {
    let key = pin_key(name)?;
    super::access::record_now(store, paths.iter().map(StorePathBaseName::hash), "pin").await?;
    let mut absent = Vec::new();
    for p in &paths {
        if store.head(&object_key::narinfo(p.hash())).await?.is_none() {
            absent.push(p.clone());
        }
    }
    let pin = Pin {
        name: name.to_owned(),
        created: store.now(),
        keep: keep_days.map(|d| Duration::from_secs(d.saturating_mul(86400))),
        paths,
    };
    store
        .put_bytes(&key, Bytes::from(pin.render(store_dir)))
        .await?;
    Ok(absent)
}

pub async fn remove(store: &dyn Store, name: &str) -> Result<(), GcError> {
    let key = pin_key(name)?;
    if store.head(&key).await?.is_none() {
        return Err(GcError::NoSuchPin(name.to_owned()));
    }
    Ok(store.delete(&key).await?)
}

/// Every pin, by name; pins that do not parse are returned as errors beside them.
pub async fn list(
    store: &dyn Store,
    store_dir: &str,
) -> Result<(Vec<Pin>, Vec<(String, String)>), StoreError> {
    let keys: Vec<(String, Meta)> = store
        .list(&format!("{RESERVED_PREFIX}{DIR}"))
        .map_ok(|o| {
            (
                o.key,
                Meta {
                    size: o.size,
                    modified: o.modified,
                },
            )
        })
        .try_collect()
        .await?;
    read_all(store, &keys, store_dir).await
}

/// Reads the pins under `keys`.
pub async fn read_all(
    store: &dyn Store,
    keys: &[(String, Meta)],
    store_dir: &str,
) -> Result<(Vec<Pin>, Vec<(String, String)>), StoreError> {
    let mut pins = Vec::new();
    let mut bad = Vec::new();
    for (key, _) in keys {
        let name = key.rsplit('/').next().unwrap_or(key);
        let Some(raw) = store.get_bytes(key, MAX_PIN_BYTES).await? else {
            continue;
        };
        match std::str::from_utf8(&raw)
            .map_err(|_| "not UTF-8".to_owned())
            .and_then(|t| Pin::parse(name, t, store_dir))
        {
            Ok(p) => pins.push(p),
            Err(why) => bad.push((key.clone(), why)),
        }
    }
    pins.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((pins, bad))
}

/// The hashes an active pin names.
pub fn hashes(pin: &Pin) -> impl Iterator<Item = StorePathHash> + '_ {
    pin.paths.iter().map(|p| p.hash())
}

/// `YYYY-MM-DD HH:MM UTC` of `t`; `None` past the year 9999.
fn utc_minute(t: SystemTime) -> Option<String> {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let at = i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())?;
    Some(format!(
        "{:04}-{:02}-{:02} {:02}:{:02} UTC",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pin list` says until when a pin lasts, and since when it has expired, in UTC.
    #[test]
    fn a_pins_state_says_when_it_ends() {
        let day = Duration::from_secs(86400);
        // 2023-11-14 22:13:20 UTC.
        let created = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut p = Pin {
            name: "release".into(),
            created,
            keep: Some(day),
            paths: Vec::new(),
        };
        assert_eq!(
            p.state(created),
            "kept until 2023-11-15 22:13 UTC, 1 day from its creation"
        );
        assert_eq!(p.state(created + 2 * day), "expired 2023-11-15 22:13 UTC");
        p.keep = Some(7 * day);
        assert_eq!(
            p.state(created),
            "kept until 2023-11-21 22:13 UTC, 7 days from its creation"
        );
        p.keep = None;
        assert_eq!(p.state(created), "kept until removed");
        p.keep = Some(Duration::from_secs(u64::MAX));
        assert_eq!(p.state(created), "kept until removed");
        // Beyond the year 9999: no date.
        p.keep = Some(3_000_000 * day);
        assert_eq!(p.state(created), "kept for 3000000 days from its creation");
    }

    #[test]
    fn pins_round_trip() {
        let p = Pin {
            name: "release".into(),
            created: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            keep: Some(Duration::from_secs(7 * 86400)),
            paths: vec!["6bxnj2gfflqa529lddzh3zhcn45nn86r-top".parse().unwrap()],
        };
        let text = p.render("/nix/store");
        assert_eq!(Pin::parse("release", &text, "/nix/store").unwrap(), p);
        assert!(p.active(p.created + Duration::from_secs(86400)));
        assert!(!p.active(p.created + Duration::from_secs(8 * 86400)));
        assert!(Pin::parse("x", "cellar-pin 1\npath: /etc/passwd\n", "/nix/store").is_err());
    }

    /// Times beyond what the clock holds neither panic nor end a pin.
    #[test]
    fn huge_times_do_not_overflow() {
        let forever = format!("{HEADER}\ncreated: 1700000000\nkeep-days: {}\n", u64::MAX);
        let p = Pin::parse("long", &forever, "/nix/store").unwrap();
        assert!(p.active(UNIX_EPOCH + Duration::from_secs(4_000_000_000)));
        let bad_date = format!("{HEADER}\ncreated: {}\n", u64::MAX);
        assert!(Pin::parse("late", &bad_date, "/nix/store").is_err());
    }

    #[test]
    fn names_and_paths_are_checked() {
        assert!(pin_key("ci-main_1.2").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", "../x"] {
            assert!(pin_key(bad).is_err(), "{bad}");
        }
        let sd = "/nix/store";
        let p = "/nix/store/6bxnj2gfflqa529lddzh3zhcn45nn86r-top";
        assert!(store_path(p, sd).is_ok());
        assert!(store_path(&format!("{p}/bin/hi"), sd).is_ok());
        assert!(store_path("6bxnj2gfflqa529lddzh3zhcn45nn86r-top", sd).is_ok());
        assert!(store_path("/usr/bin/top", sd).is_err());
        // Inside a store path only as a full path: a relative one is not a store path.
        assert!(store_path("6bxnj2gfflqa529lddzh3zhcn45nn86r-top/bin", sd).is_err());
    }

    /// `./result` and profiles name the store path their symlinks lead to, whether it is on
    /// this machine or not; a link out of the store, a plain file and a dangling link out of
    /// the store are refused as they are named.
    #[test]
    fn links_name_the_store_path_they_lead_to() {
        let d = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(d.path()).unwrap();
        let sd = root.join("store");
        let top = sd.join("6bxnj2gfflqa529lddzh3zhcn45nn86r-top");
        std::fs::create_dir_all(&top).unwrap();
        let sd = sd.to_str().unwrap();
        std::os::unix::fs::symlink(&top, root.join("result")).unwrap();
        // A profile: a relative link to a link.
        std::os::unix::fs::symlink("result", root.join("profile")).unwrap();
        // Not on this machine (a profile copied from a builder, say).
        std::fs::remove_dir(&top).unwrap();
        // A directory of links, and a relative one; a path inside a link's store path.
        std::fs::create_dir(root.join("links")).unwrap();
        std::os::unix::fs::symlink("../profile", root.join("links/p")).unwrap();
        // A link to the directory that holds `result`.
        std::os::unix::fs::symlink(&root, root.join("links/up")).unwrap();
        for link in [
            "result",
            "profile",
            "result/bin/hello",
            "links/p",
            "links/p/bin",
            "links/up/result",
        ] {
            let link = root.join(link);
            let got = store_path_or_link(link.to_str().unwrap(), sd).unwrap();
            assert_eq!(got.to_string(), "6bxnj2gfflqa529lddzh3zhcn45nn86r-top");
        }
        // A link inside an environment (a profile's `bin/hello`) names the package it leads
        // to, not the environment.
        let env = std::path::Path::new(sd).join("7bxnj2gfflqa529lddzh3zhcn45nn86r-env");
        std::fs::create_dir_all(env.join("bin")).unwrap();
        let hello = format!("{sd}/8bxnj2gfflqa529lddzh3zhcn45nn86r-hello/bin/hello");
        std::os::unix::fs::symlink(&hello, env.join("bin/hello")).unwrap();
        std::os::unix::fs::symlink(&env, root.join("sw")).unwrap();
        let got = store_path_or_link(root.join("sw/bin/hello").to_str().unwrap(), sd).unwrap();
        assert_eq!(got.to_string(), "8bxnj2gfflqa529lddzh3zhcn45nn86r-hello");
        std::fs::write(root.join("file"), "").unwrap();
        std::os::unix::fs::symlink(root.join("file"), root.join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(root.join("gone"), root.join("dangling")).unwrap();
        for bad in ["file", "elsewhere", "dangling", "elsewhere/x", "dangling/x"] {
            let bad = root.join(bad);
            let e = store_path_or_link(bad.to_str().unwrap(), sd).unwrap_err();
            assert!(e.to_string().contains(bad.to_str().unwrap()), "{e}");
        }
    }
}
