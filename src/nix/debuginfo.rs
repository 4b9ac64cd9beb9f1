//! Debug info links: what `nix copy --to 'URL?index-debug-info=true'` writes for each ELF debug
//! file a path holds under `lib/debug/.build-id/<xx>/<38 hex>.debug`. The link is
//! `debuginfo/<xx><38 hex>.debug`, a JSON object naming the NAR that holds the file
//! (`"archive": "../nar/<file>"`, relative to the link) and the file within it (`"member"`),
//! so that a debugger's fetcher (dwarffs) finds a program's symbols by its build id. Nix
//! writes the link before the NAR it names.

use std::fmt;
use std::str::FromStr;

use serde_json::Value;

use super::names::{err, NameError};
use super::NarFileName;

/// The largest link accepted: two strings, the member a path of at most a few hundred bytes.
pub const MAX_DEBUGINFO_BYTES: u64 = 64 << 10;

/// Where every member lives inside the NAR of its path.
const BUILD_ID_DIR: &str = "lib/debug/.build-id/";

/// The name of a link: a build id (40 lowercase hex digits, an ELF build id as debuggers ask
/// for it), with the `.debug` that Nix's uploader keeps from the file name, or without.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct DebugInfoName(String);

impl DebugInfoName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for DebugInfoName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let id = s.strip_suffix(".debug").unwrap_or(s);
        if id.len() == 40 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Self(s.to_owned()))
        } else {
            Err(err("debug info", s))
        }
    }
}

impl fmt::Display for DebugInfoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DebugInfoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// A link as uploaded: the NAR it names and the file within it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebugInfoLink {
    archive: NarFileName,
    member: String,
}

/// Why an upload is not a debug info link.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DebugInfoError {
    #[error("not a JSON object with the strings archive and member")]
    NotALink,
    #[error("archive {0:?} is not ../nar/<a NAR file name>")]
    BadArchive(String),
    #[error("member {0:?} is not a file under {BUILD_ID_DIR}")]
    BadMember(String),
}

impl DebugInfoLink {
    pub fn parse(raw: &[u8]) -> Result<Self, DebugInfoError> {
        let Ok(Value::Object(doc)) = serde_json::from_slice(raw) else {
            return Err(DebugInfoError::NotALink);
        };
        let (Some(Value::String(archive)), Some(Value::String(member))) =
            (doc.get("archive"), doc.get("member"))
        else {
            return Err(DebugInfoError::NotALink);
        };
        let nar = archive
            .strip_prefix("../nar/")
            .and_then(|f| NarFileName::parse_nix(f).ok())
            .ok_or_else(|| DebugInfoError::BadArchive(archive.chars().take(200).collect()))?;
        let inside = member.strip_prefix(BUILD_ID_DIR).unwrap_or("");
        if member.len() > 4096
            || inside.is_empty()
            || inside
                .split('/')
                .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        {
            return Err(DebugInfoError::BadMember(
                member.chars().take(200).collect(),
            ));
        }
        Ok(Self {
            archive: nar,
            member: member.clone(),
        })
    }

    /// The NAR holding the debug file.
    pub fn nar(&self) -> &NarFileName {
        &self.archive
    }

    /// The same link naming `nar` instead (the name a NAR re-encoded on upload is stored as).
    pub fn with_nar(&self, nar: NarFileName) -> Self {
        Self {
            archive: nar,
            member: self.member.clone(),
        }
    }

    /// The link as Nix writes it.
    pub fn render(&self) -> String {
        serde_json::json!({
            "archive": format!("../nar/{}", self.archive),
            "member": self.member,
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: &str = "1z7k9jzjn1dypidadna9s0plnc3m4ln6l342kq3cm9ma30f8h6if";
    const ID: &str = "abcdef0123456789abcdef0123456789abcdef01";

    #[test]
    fn names_are_build_ids() {
        for ok in [ID.to_owned(), format!("{ID}.debug")] {
            let name: DebugInfoName = ok.parse().unwrap();
            assert_eq!(name.as_str(), ok);
            assert_eq!(format!("{name:?}"), format!("{ok:?}"));
        }
        for bad in [
            "",
            ".debug",
            &ID[1..],
            &format!("{ID}0"),
            &ID.to_uppercase(),
            &format!("{ID}.dbg"),
            &format!("{}g", &ID[1..]),
            &format!("../{}", &ID[3..]),
            &format!("{ID}.debug.debug"),
        ] {
            assert!(bad.parse::<DebugInfoName>().is_err(), "{bad:?}");
        }
    }

    /// What Nix 2.8 wrote into a `file://` cache with `index-debug-info=true`.
    #[test]
    fn nix_links_parse_and_render_the_same() {
        let raw = format!(
            r#"{{"archive":"../nar/{F}.nar.zst","member":"lib/debug/.build-id/ab/cdef0123456789abcdef0123456789abcdef01.debug"}}"#
        );
        let l = DebugInfoLink::parse(raw.as_bytes()).unwrap();
        assert_eq!(l.nar().as_str(), format!("{F}.nar.zst"));
        assert_eq!(l.render(), raw);
        let xz: NarFileName = format!("{F}.nar.xz").parse().unwrap();
        assert_eq!(
            l.with_nar(xz.clone()).render(),
            raw.replace(".nar.zst", ".nar.xz")
        );
    }

    #[test]
    fn other_documents_are_refused() {
        let member = "lib/debug/.build-id/ab/x.debug";
        let link = |a: &str, m: &str| {
            DebugInfoLink::parse(
                serde_json::json!({"archive": a, "member": m})
                    .to_string()
                    .as_bytes(),
            )
        };
        assert!(link(&format!("../nar/{F}.nar.xz"), member).is_ok());
        for archive in [
            format!("nar/{F}.nar.xz"),
            format!("../nar/{F}.nar.gz2"),
            format!("../nar/../{F}.nar.xz"),
            format!("../nar/{F}.nar?hash=x"),
            "https://example.org/x.nar".to_owned(),
        ] {
            assert!(
                matches!(link(&archive, member), Err(DebugInfoError::BadArchive(_))),
                "{archive}"
            );
        }
        for m in [
            "",
            "lib/debug/.build-id/",
            "lib/debug/.build-id/../../../etc/passwd",
            "lib/debug/.build-id/ab//x",
            "lib/debug/.build-id/./x",
            "/lib/debug/.build-id/ab/x.debug",
            "bin/x",
        ] {
            assert!(
                matches!(
                    link(&format!("../nar/{F}.nar.xz"), m),
                    Err(DebugInfoError::BadMember(_))
                ),
                "{m}"
            );
        }
        // Up to 4096 bytes.
        let longest = format!("lib/debug/.build-id/{}", "a".repeat(4096 - 20));
        assert!(link(&format!("../nar/{F}.nar.xz"), &longest).is_ok());
        assert!(link(&format!("../nar/{F}.nar.xz"), &format!("{longest}a")).is_err());
        for doc in [
            "[]",
            "{}",
            "not json",
            r#"{"archive":1,"member":"lib/debug/.build-id/a"}"#,
        ] {
            assert_eq!(
                DebugInfoLink::parse(doc.as_bytes()),
                Err(DebugInfoError::NotALink),
                "{doc}"
            );
        }
    }
}
