//! One pass over the whole store, sorting each key into the part of the cache layout it
//! belongs to. Keys cellar does not know (`nix-cache-info`, other tools' files) are left
//! alone: a collector must never delete what it does not understand.

use std::collections::HashMap;
use std::time::SystemTime;

use futures::TryStreamExt as _;

use super::report::Progress;
use super::RESERVED_PREFIX;
use crate::nix::{StorePathBaseName, StorePathHash, TopLevelFile};
use crate::store::{object_key, Store, StoreError};

/// Size and age of one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub size: u64,
    pub modified: SystemTime,
}

/// What a key is in the cache layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    NarInfo(StorePathHash),
    Listing(StorePathHash),
    /// `nar/<file>`, by file name.
    Nar(String),
    /// `log/<drv>`, by the derivation's hash.
    Log(StorePathHash),
    /// `realisations/…` or `build-trace/…`.
    Realisation,
    /// `debuginfo/<build id>`, a link to a NAR.
    DebugInfo,
    Access,
    Pin,
    /// A collector's announcement of NARs it is about to delete ([`super::deleting`]): live
    /// while its run deletes, so never a finding and never deleted by anyone else.
    Announcement,
    /// Copies of a batch a collector is deleting ([`super::unfinished`]): settled by the next
    /// run that deletes, never a finding.
    Unfinished,
    /// When the access records began ([`super::began`]).
    RecordsBegan,
    /// What a NAR was found to be on upload ([`crate::upload::nar_records`]), by the NAR's
    /// file name: goes with its NAR.
    NarDigest(String),
    /// Under the reserved prefix, but neither an access record, a pin nor an announcement.
    ReservedOther,
    /// Not part of the layout cellar manages.
    Other,
}

pub fn classify(key: &str) -> Kind {
    // A "folder" (`_cellar/pins/`, as S3 consoles' "Create folder" and s3fs make them): no
    // object of the layout, whatever prefix it has.
    if key.ends_with('/') {
        return Kind::Other;
    }
    if let Some(rest) = key.strip_prefix(RESERVED_PREFIX) {
        return if rest.starts_with(super::access::DIR) {
            Kind::Access
        } else if rest.starts_with(super::pins::DIR) {
            Kind::Pin
        } else if rest.starts_with(super::deleting::DIR) {
            Kind::Announcement
        } else if rest.starts_with(super::unfinished::DIR) {
            Kind::Unfinished
        } else if rest == super::began::NAME {
            Kind::RecordsBegan
        } else if let Some(file) = crate::upload::nar_records::nar_of(key) {
            Kind::NarDigest(file.to_owned())
        } else {
            Kind::ReservedOther
        };
    }
    if let Some(file) = object_key::nar_file(key) {
        return Kind::Nar(file.as_str().to_owned());
    }
    if let Some(drv) = key.strip_prefix("log/") {
        return match drv.parse::<StorePathBaseName>() {
            Ok(d) => Kind::Log(d.hash()),
            Err(_) => Kind::Other,
        };
    }
    if let Some(name) = key.strip_prefix("debuginfo/") {
        return match name.parse::<crate::nix::DebugInfoName>() {
            Ok(_) => Kind::DebugInfo,
            Err(_) => Kind::Other,
        };
    }
    if ["realisations/", "build-trace/", "build-trace-v2/"]
        .iter()
        .any(|p| key.starts_with(p))
    {
        return Kind::Realisation;
    }
    match key.parse::<TopLevelFile>() {
        Ok(TopLevelFile::NarInfo(h)) => Kind::NarInfo(h),
        Ok(TopLevelFile::Listing(h)) => Kind::Listing(h),
        Err(_) => Kind::Other,
    }
}

/// Everything in the store, by kind. About 150 bytes per object, so 100k paths (narinfo + NAR
/// + listing) fit in a few tens of MiB.
#[derive(Debug, Default)]
pub struct Inventory {
    pub narinfos: Vec<(StorePathHash, Meta)>,
    pub listings: Vec<(StorePathHash, Meta)>,
    pub nars: HashMap<String, Meta>,
    pub logs: Vec<(String, StorePathHash, Meta)>,
    pub realisations: Vec<(String, Meta)>,
    pub debuginfo: Vec<(String, Meta)>,
    pub access: Vec<(String, Meta)>,
    pub pins: Vec<(String, Meta)>,
    /// Collectors' announcements (see [`super::deleting`]).
    pub announcements: Vec<(String, Meta)>,
    pub reserved_other: Vec<(String, Meta)>,
    /// Copies of a batch a collector is deleting, or left by one that died
    /// ([`super::unfinished`]).
    pub unfinished: Vec<(String, Meta)>,
    /// `_cellar/records-began`, if the store has it ([`super::began`]).
    pub records_began: Option<Meta>,
    /// Digest records of NARs ([`crate::upload::nar_records`]): key, age, the NAR's name.
    pub nar_digests: Vec<(String, Meta, String)>,
}

impl Inventory {
    pub async fn load(store: &dyn Store, progress: &dyn Progress) -> Result<Self, StoreError> {
        let mut inv = Self::default();
        let mut list = store.list("");
        progress.phase("listing the store", None);
        while let Some(o) = list.try_next().await? {
            progress.advance(1);
            let meta = Meta {
                size: o.size,
                modified: o.modified,
            };
            match classify(&o.key) {
                Kind::NarInfo(h) => inv.narinfos.push((h, meta)),
                Kind::Listing(h) => inv.listings.push((h, meta)),
                Kind::Nar(f) => {
                    inv.nars.insert(f, meta);
                }
                Kind::Log(h) => inv.logs.push((o.key, h, meta)),
                Kind::Realisation => inv.realisations.push((o.key, meta)),
                Kind::DebugInfo => inv.debuginfo.push((o.key, meta)),
                Kind::Access => inv.access.push((o.key, meta)),
                Kind::Pin => inv.pins.push((o.key, meta)),
                // Each run withdraws its own; a dead run's stops counting after its TTL.
                Kind::Announcement => inv.announcements.push((o.key, meta)),
                Kind::ReservedOther => inv.reserved_other.push((o.key, meta)),
                // Settled by the next run that deletes, before it lists the store.
                Kind::Unfinished => inv.unfinished.push((o.key, meta)),
                Kind::RecordsBegan => inv.records_began = Some(meta),
                Kind::NarDigest(f) => inv.nar_digests.push((o.key, meta, f)),
                Kind::Other => {}
            }
        }
        // Listing order differs between stores; a fixed order makes runs reproducible.
        inv.narinfos.sort_unstable_by_key(|(h, _)| *h);
        Ok(inv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_classified_by_layout() {
        let h = "6bxnj2gfflqa529lddzh3zhcn45nn86r";
        assert!(matches!(
            classify(&format!("{h}.narinfo")),
            Kind::NarInfo(_)
        ));
        assert!(matches!(classify(&format!("{h}.ls")), Kind::Listing(_)));
        let nar = "nar/07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar.xz";
        assert!(matches!(classify(nar), Kind::Nar(_)));
        assert!(matches!(
            classify(&format!("log/{h}-top.drv")),
            Kind::Log(_)
        ));
        assert_eq!(classify("realisations/x!out.doi"), Kind::Realisation);
        assert_eq!(classify("build-trace/x.drv/out"), Kind::Realisation);
        assert_eq!(classify("build-trace-v2/x.drv/out.doi"), Kind::Realisation);
        let id = "abcdef0123456789abcdef0123456789abcdef01";
        assert_eq!(classify(&format!("debuginfo/{id}.debug")), Kind::DebugInfo);
        assert_eq!(classify(&format!("debuginfo/{id}")), Kind::DebugInfo);
        assert_eq!(classify("debuginfo/readme"), Kind::Other);
        assert_eq!(classify("_cellar/access/2026-01-01/p-1"), Kind::Access);
        assert_eq!(classify("_cellar/pins/release"), Kind::Pin);
        assert_eq!(
            classify("_cellar/deleting/1767225599-ab12"),
            Kind::Announcement
        );
        assert_eq!(
            classify("_cellar/unfinished/1767225599-ab12"),
            Kind::Unfinished
        );
        assert_eq!(classify("_cellar/records-began"), Kind::RecordsBegan);
        let nar = format!("{}.nar.zst", "0".repeat(52));
        assert_eq!(
            classify(&format!("_cellar/nar-digests/{nar}")),
            Kind::NarDigest(nar)
        );
        assert_eq!(classify("_cellar/nar-digests/"), Kind::Other);
        assert_eq!(classify("_cellar/nar-digests/junk"), Kind::ReservedOther);
        assert_eq!(classify("_cellar/records-began.bak"), Kind::ReservedOther);
        assert_eq!(classify("_cellar/junk"), Kind::ReservedOther);
        assert_eq!(classify("nix-cache-info"), Kind::Other);
        assert_eq!(classify("nar/not-a-nar"), Kind::Other);
        for folder in [
            "_cellar/pins/",
            "_cellar/",
            "realisations/",
            "_cellar/access/d/",
        ] {
            assert_eq!(classify(folder), Kind::Other, "{folder}");
        }
    }
}
