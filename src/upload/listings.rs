//! Listings (`<hash>.ls`) held until their narinfo is accepted.
//!
//! Nix uploads a path's listing before its narinfo. Written to the store as it came, a
//! listing would be visible for a path that is not (its narinfo refused, or never sent), and
//! the loser of two pushes of a non-reproducible path at once would replace the winner's
//! listing with one of another NAR (newer Nix reads files out of the NAR at the offsets it
//! gives). So a listing waits in memory, and is written right after its narinfo, by the
//! upload that wrote it; one whose path is already present, or whose narinfo does not come
//! within [`HELD_FOR`], is dropped, and the oldest are when [`HELD_BYTES`] are held. A
//! listing is optional: one lost (a restart in between, the narinfo sent to another replica)
//! leaves the path without one, as if it had none.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::time::{Duration, Instant};

use crate::nix::StorePathHash;
use crate::sync::lock;

/// How long a listing waits for its narinfo: Nix may send it before the NAR, whose upload can
/// take hours (as long as an unfinished upload is kept: `upload.staging_max_age_secs`'s
/// default). Memory is bounded by [`HELD_BYTES`], not by this.
pub const HELD_FOR: Duration = Duration::from_secs(6 * 3600);

/// Bytes of listings held at most: beyond, the oldest are dropped (their paths then have none).
pub const HELD_BYTES: usize = 64 << 20;

#[derive(Default)]
pub struct Listings {
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    /// A listing, or none where two different ones came for the path (two pushes of a
    /// non-reproducible path at once): which narinfo each goes with is not known, so the
    /// path gets neither.
    by_path: HashMap<StorePathHash, (Option<Bytes>, Instant)>,
    bytes: usize,
}

impl Held {
    fn remove(&mut self, h: StorePathHash) -> Option<Option<Bytes>> {
        let (listing, _) = self.by_path.remove(&h)?;
        self.bytes -= listing.as_ref().map_or(0, Bytes::len);
        Some(listing)
    }
}

impl Listings {
    /// Holds `listing` for `h` (replacing the same one sent again); refused, saying why, if
    /// it does not fit, or if another listing is held for `h`: then neither is.
    pub fn hold(&self, h: StorePathHash, listing: Bytes) -> Result<(), &'static str> {
        let mut held = lock(&self.held);
        let now = Instant::now();
        let other = held.by_path.get(&h).is_some_and(|(l, at)| {
            now.duration_since(*at) < HELD_FOR && l.as_ref() != Some(&listing)
        });
        if other {
            held.remove(h);
            held.by_path.insert(h, (None, now));
            return Err(
                "another listing of the path came meanwhile (two pushes of it at once): \
                        it gets neither",
            );
        }
        held.remove(h);
        let expired: Vec<StorePathHash> = held
            .by_path
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) >= HELD_FOR)
            .map(|(h, _)| *h)
            .collect();
        for e in expired {
            held.remove(e);
        }
        if listing.len() > HELD_BYTES {
            return Err("too many listings wait for their narinfos");
        }
        // Full: the oldest go first. Those are the likeliest never to be taken (their
        // narinfo refused, or sent to another replica), and a listing is optional.
        while held.bytes + listing.len() > HELD_BYTES {
            let oldest = held
                .by_path
                .iter()
                .filter(|(_, (l, _))| l.is_some())
                .min_by_key(|(_, (_, at))| *at)
                .map(|(h, _)| *h);
            match oldest {
                Some(h) => {
                    held.remove(h);
                }
                None => break,
            }
        }
        held.bytes += listing.len();
        held.by_path.insert(h, (Some(listing), now));
        Ok(())
    }

    /// The listing held for `h`, if one is and it is not older than [`HELD_FOR`]; no longer
    /// held after.
    pub fn take(&self, h: StorePathHash) -> Option<Bytes> {
        let mut held = lock(&self.held);
        let fresh = held
            .by_path
            .get(&h)
            .is_some_and(|(_, at)| at.elapsed() < HELD_FOR);
        let listing = held.remove(h)??;
        fresh.then_some(listing)
    }

    #[cfg(test)]
    fn hold_ok(&self, h: StorePathHash, listing: Bytes) -> bool {
        self.hold(h, listing).is_ok()
    }

    #[cfg(test)]
    pub fn held_bytes(&self) -> usize {
        lock(&self.held).bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(c: char) -> StorePathHash {
        std::iter::repeat_n(c, 32)
            .collect::<String>()
            .parse()
            .unwrap()
    }

    /// As long as the docs say (docs/uploads.md), and as an unfinished upload is kept by
    /// default: a NAR sent after its listing may take that long.
    #[test]
    fn listings_wait_six_hours_as_unfinished_uploads_do() {
        assert_eq!(HELD_FOR, Duration::from_secs(6 * 3600));
        let defaults = crate::config::Config::default();
        assert_eq!(defaults.upload.staging_max_age, HELD_FOR);
    }

    #[tokio::test(start_paused = true)]
    async fn listings_are_held_once_within_their_time_and_budget() {
        let l = Listings::default();
        assert!(l.hold_ok(hash('a'), Bytes::from_static(b"first")));
        assert!(l.hold_ok(hash('a'), Bytes::from_static(b"first")));
        assert_eq!(l.held_bytes(), 5, "replaced, not added");
        assert_eq!(l.take(hash('a')).as_deref(), Some(&b"first"[..]));
        assert_eq!(l.take(hash('a')), None, "taken once");
        assert_eq!(l.held_bytes(), 0);

        // Two different listings of one path (two pushes of a non-reproducible path at
        // once): which narinfo each goes with is not known, so it gets neither, until they
        // expire.
        assert!(l.hold_ok(hash('f'), Bytes::from_static(b"one")));
        assert!(!l.hold_ok(hash('f'), Bytes::from_static(b"other")));
        assert!(!l.hold_ok(hash('f'), Bytes::from_static(b"one")));
        assert_eq!(l.held_bytes(), 0);
        assert_eq!(l.take(hash('f')), None);

        assert!(l.hold_ok(hash('b'), Bytes::from_static(b"late")));
        tokio::time::advance(HELD_FOR).await;
        assert_eq!(l.take(hash('b')), None, "its narinfo came too late");
        assert_eq!(l.held_bytes(), 0);

        assert!(l.hold_ok(hash('c'), Bytes::from(vec![0u8; HELD_BYTES])));
        assert!(
            !l.hold_ok(hash('k'), Bytes::from(vec![0u8; HELD_BYTES + 1])),
            "larger than the budget"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(l.hold_ok(hash('d'), Bytes::from_static(b"x")));
        assert_eq!(l.held_bytes(), 1, "the oldest made room");
        assert_eq!(l.take(hash('c')), None);
        assert_eq!(l.take(hash('d')).as_deref(), Some(&b"x"[..]));
        // Of several, only as many of the oldest as needed go.
        let third = HELD_BYTES / 3;
        for (i, c) in ['g', 'h', 'i'].into_iter().enumerate() {
            assert!(l.hold_ok(hash(c), Bytes::from(vec![i as u8; third])));
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert!(l.hold_ok(hash('j'), Bytes::from(vec![9u8; third])));
        assert_eq!(l.take(hash('g')), None, "the oldest went");
        assert!(l.take(hash('h')).is_some() && l.take(hash('i')).is_some());
    }
}
