//! When the access records began: a path can only be judged unused for `gc.keep_days` once
//! uses have been recorded for that long.
//!
//! A bucket cellar is put in front of usually holds paths from before (`nix copy --to
//! s3://…`, the guide's setup): their narinfos are older than the retention and no record
//! names them, because no cellar served them yet. Judged by the records alone, the first
//! `gc --apply` would delete every one of them not read since cellar started, a day after it
//! was installed. Instead, a path written before the records began counts as used when they
//! began, so it goes only once the records have covered the whole retention without a use of
//! it (or earlier to fit `gc.max_bytes`, least recently used first as ever).
//!
//! The first `gc --apply` writes `_cellar/records-began`: the time of the oldest access record
//! in the store (or now, with none), which it would otherwise lose when it deletes records
//! older than the retention. A dry run works that out the same way without writing it. The
//! file holds the time as seconds since the epoch; the records began no later than the file
//! was written either, so the earlier of the two counts (S3 cannot date an object back, so
//! that is the time in the file; a local store's file times can be set back).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::inventory::{Inventory, Meta};
use super::{GcError, RESERVED_PREFIX};
use crate::store::{Store, StoreError};

/// The key, under [`RESERVED_PREFIX`].
pub const NAME: &str = "records-began";

const HEADER: &str = "cellar-records-began 1";

/// Anything larger is not this file.
const MAX_BYTES: u64 = 4096;

pub fn key() -> String {
    format!("{RESERVED_PREFIX}{NAME}")
}

/// When the access records began, as the store's file says, or else as the store's records
/// show (the oldest, or `now` with none), never after `now`. With `write`, a missing file is
/// written, so that the time survives the deletion of old records.
pub async fn establish(
    store: &dyn Store,
    inv: &Inventory,
    now: SystemTime,
    write: bool,
) -> Result<SystemTime, GcError> {
    if let Some(meta) = inv.records_began {
        return Ok(read(store, meta).await?.min(now));
    }
    let began = inv
        .access
        .iter()
        .map(|(_, m)| m.modified)
        .min()
        .unwrap_or(now)
        .min(now);
    if write {
        store.put_bytes(&key(), Bytes::from(render(began))).await?;
    }
    Ok(began)
}

/// Why the store's file does not parse, if it has one that does not (`cellar verify`).
pub async fn damaged(store: &dyn Store, inv: &Inventory) -> Result<Option<String>, StoreError> {
    let Some(meta) = inv.records_began else {
        return Ok(None);
    };
    match read(store, meta).await {
        Ok(_) => Ok(None),
        Err(GcError::BadRecordsBegan { reason, .. }) => Ok(Some(reason)),
        Err(GcError::Store(e)) => Err(e),
        Err(e) => Err(StoreError::Other(e.to_string())),
    }
}

async fn read(store: &dyn Store, meta: Meta) -> Result<SystemTime, GcError> {
    let bad = |reason: String| GcError::BadRecordsBegan { key: key(), reason };
    // Stored compressed (by a tool that copied the bucket) or too large: damaged, like a file
    // that does not parse (deleted by `verify --repair`), not a store failing.
    let raw = match store.get_bytes(&key(), MAX_BYTES).await {
        Err(StoreError::Encoded { encoding, .. }) => {
            return Err(bad(format!("stored with Content-Encoding {encoding}")))
        }
        Err(StoreError::TooLarge { .. }) => {
            return Err(bad(format!("larger than {MAX_BYTES} bytes")))
        }
        other => other?,
    }
    .ok_or_else(|| bad("gone while this run read the store".to_owned()))?;
    let text = std::str::from_utf8(&raw).map_err(|_| bad("not UTF-8".to_owned()))?;
    let began = parse(text).ok_or_else(|| {
        bad(format!(
            "not `{HEADER}` and a time in seconds since the epoch"
        ))
    })?;
    Ok(began.min(meta.modified))
}

fn render(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    format!("{HEADER}\n{secs}\n")
}

fn parse(text: &str) -> Option<SystemTime> {
    let mut lines = text.lines();
    if lines.next()? != HEADER {
        return None;
    }
    let secs: u64 = lines.next()?.trim().parse().ok()?;
    if lines.any(|l| !l.trim().is_empty()) {
        return None;
    }
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_time_round_trips_in_whole_seconds() {
        let t = UNIX_EPOCH + Duration::from_secs(1_764_950_400);
        assert_eq!(parse(&render(t)), Some(t));
        assert_eq!(
            parse(&render(t + Duration::from_millis(900))),
            Some(t),
            "whole seconds, rounded down"
        );
    }

    #[test]
    fn anything_else_does_not_parse() {
        for text in [
            "",
            "1764950400\n",
            "cellar-records-began 2\n1764950400\n",
            "cellar-records-began 1\n",
            "cellar-records-began 1\nyesterday\n",
            "cellar-records-began 1\n1764950400\n1764950401\n",
            "cellar-records-began 1\n-5\n",
        ] {
            assert_eq!(parse(text), None, "{text:?}");
        }
        assert!(
            parse("cellar-records-began 1\n1764950400").is_some(),
            "no last newline"
        );
    }
}
