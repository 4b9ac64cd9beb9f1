//! Debug info links (`debuginfo/<build id>`, see [`crate::nix::debuginfo`]), held until a
//! narinfo naming their NAR is accepted.
//!
//! Nix uploads a path's links before its NAR and narinfo, and skips a link the cache has
//! already. Written as they came, a link would name a NAR that never arrived (its upload
//! refused, or sent again with another compression, and so another name) and lead nowhere,
//! and with `upload.trusted_keys` a write token without a trusted key could publish debug
//! files (a NAR it uploaded whose narinfo is refused) under any build id, which symbol
//! fetchers take without checking a hash. So a link waits in memory, by the NAR it names,
//! and is written once a narinfo naming that NAR is accepted, by the upload that wrote the
//! narinfo (naming the NAR as the store holds it, re-encoded or not). Links whose narinfo
//! does not come within [`HELD_FOR`], or comes for a path already present with another NAR
//! (another build), are dropped, and the oldest are when [`HELD_BYTES`] are held. A link is optional: one lost (a restart in
//! between, the narinfo sent to another replica) leaves the build id without one.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use futures::StreamExt as _;
use tokio::time::{Duration, Instant};

use super::{rejected, Uploader};
use crate::error::Error;
use crate::nix::{DebugInfoLink, DebugInfoName, NarFileName};
use crate::store::object_key;
use crate::sync::lock;

/// How long a link waits for its narinfo: as long as a listing does (the NAR between them may
/// take that long).
pub const HELD_FOR: Duration = super::listings::HELD_FOR;

/// Bytes of links held at most (a link is some 150 bytes: about a hundred thousand debug
/// files); beyond, the oldest NARs' links are dropped.
pub const HELD_BYTES: usize = 16 << 20;

/// How many links of one path are written at once.
const WRITES_AT_ONCE: usize = 16;

/// One link held: as sent, and as parsed.
struct Link {
    raw: Bytes,
    parsed: DebugInfoLink,
}

#[derive(Default)]
pub struct DebugLinks {
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    /// By the NAR file name the links name (as sent), with when the last came.
    by_nar: HashMap<String, (HashMap<DebugInfoName, Link>, Instant)>,
    bytes: usize,
}

impl Held {
    fn remove(&mut self, nar: &str) -> Option<(HashMap<DebugInfoName, Link>, Instant)> {
        let (links, at) = self.by_nar.remove(nar)?;
        self.bytes -= links.values().map(|l| l.raw.len()).sum::<usize>();
        Some((links, at))
    }
}

impl DebugLinks {
    /// Holds `link` (sent as `raw`) as `name` until a narinfo naming its NAR is accepted.
    fn hold(&self, name: DebugInfoName, raw: Bytes, parsed: DebugInfoLink) {
        let mut held = lock(&self.held);
        let now = Instant::now();
        let expired: Vec<String> = held
            .by_nar
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) >= HELD_FOR)
            .map(|(n, _)| n.clone())
            .collect();
        for n in expired {
            held.remove(&n);
        }
        // Full: the oldest NARs' links go first, the likeliest never to be taken.
        while held.bytes + raw.len() > HELD_BYTES {
            let oldest = held
                .by_nar
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(n, _)| n.clone());
            match oldest {
                Some(n) => {
                    held.remove(&n);
                }
                None => break,
            }
        }
        let nar = parsed.nar().as_str().to_owned();
        let len = raw.len();
        let (links, at) = held
            .by_nar
            .entry(nar)
            .or_insert_with(|| (HashMap::new(), now));
        *at = now;
        let replaced = links.insert(name, Link { raw, parsed });
        held.bytes += len;
        held.bytes -= replaced.map_or(0, |l| l.raw.len());
    }

    /// The links held for the NAR `nar` (as sent), if not older than [`HELD_FOR`]; no longer
    /// held after.
    fn take(&self, nar: &str) -> Vec<(DebugInfoName, Link)> {
        let mut held = lock(&self.held);
        match held.remove(nar) {
            Some((links, at)) if at.elapsed() < HELD_FOR => links.into_iter().collect(),
            _ => Vec::new(),
        }
    }

    #[cfg(test)]
    pub fn held_bytes(&self) -> usize {
        lock(&self.held).bytes
    }
}

impl Uploader {
    /// Takes the link `raw` for `debuginfo/<name>`: checked to be a link to a NAR of the
    /// cache layout, then held until a narinfo naming that NAR is accepted
    /// ([`Self::publish_debuginfo`]).
    pub async fn put_debuginfo(&self, name: &DebugInfoName, raw: Bytes) -> Result<(), Error> {
        let parsed = DebugInfoLink::parse(&raw)
            .map_err(|e| rejected(format!("not a debug info link: {e}")))?;
        // Counted among the uploads running, as a listing held is.
        let _slot = self.admit_other().await?;
        self.debuginfo.hold(name.clone(), raw, parsed);
        Ok(())
    }

    /// Stores the link `raw` as `debuginfo/<name>` at once, replacing one stored there, for
    /// `cellar import`, which checked that the store holds its NAR. With `upload.compression`
    /// the link names the NAR as the store holds it (re-encoded, unless the store holds it as
    /// sent already), so that it leads to a file cellar serves.
    pub async fn store_debuginfo(&self, name: &DebugInfoName, raw: Bytes) -> Result<(), Error> {
        let link = DebugInfoLink::parse(&raw)
            .map_err(|e| rejected(format!("not a debug info link: {e}")))?;
        let _slot = self.admit_other().await?;
        // A NAR the store holds under the name sent (stored before re-encoding was set up) is
        // not uploaded again, and its narinfo keeps naming it: so does its link.
        let body = match self.reencoded(link.nar()) {
            Some((stored, _))
                if self
                    .store
                    .head(&object_key::nar(link.nar()))
                    .await?
                    .is_none() =>
            {
                Bytes::from(link.with_nar(stored).render())
            }
            _ => raw,
        };
        self.store
            .put_bytes(&object_key::debuginfo(name), body)
            .await?;
        Ok(())
    }

    /// Writes the links held for the NAR a narinfo named as `sent` (`<file>`, as the client
    /// uploaded it), now that the narinfo is accepted and names it as `stored`: a link then
    /// names the NAR as the store holds it. Two paths may hold the same debug file, and either
    /// NAR serves it: a link stored already is replaced. Links are optional: one that cannot
    /// be written is logged, and the upload stands.
    pub(super) async fn publish_debuginfo(&self, sent: &str, stored: &NarFileName) {
        let links = self.debuginfo.take(sent);
        if links.is_empty() {
            return;
        }
        let renamed = stored.as_str() != sent;
        futures::stream::iter(links)
            .for_each_concurrent(WRITES_AT_ONCE, |(name, link)| async move {
                let body = if renamed {
                    Bytes::from(link.parsed.with_nar(stored.clone()).render())
                } else {
                    link.raw
                };
                if let Err(e) = self
                    .store
                    .put_bytes(&object_key::debuginfo(&name), body)
                    .await
                {
                    tracing::warn!(debuginfo = %name, nar = %stored, cause = %e, "a debug info link could not be written; the build id has none");
                }
            })
            .await;
    }

    /// Bytes of links held (for tests).
    #[cfg(test)]
    pub fn debuginfo_held_bytes(&self) -> usize {
        self.debuginfo.held_bytes()
    }

    /// Drops the links held for the NAR `sent` names: their narinfo came for a path already
    /// present, whose links (if it has any) stay as they are.
    pub(super) fn drop_debuginfo(&self, sent: &str) {
        self.debuginfo.take(sent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(c: char) -> DebugInfoName {
        std::iter::repeat_n(c, 40)
            .collect::<String>()
            .parse()
            .unwrap()
    }

    fn link(nar: &str, member: &str) -> (Bytes, DebugInfoLink) {
        let raw = Bytes::from(format!(
            r#"{{"archive":"../nar/{nar}","member":"lib/debug/.build-id/{member}"}}"#
        ));
        let parsed = DebugInfoLink::parse(&raw).unwrap();
        (raw, parsed)
    }

    const NAR_A: &str = "1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.xz";
    const NAR_B: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73.nar.xz";
    const NAR_C: &str = "07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar";

    /// Links wait by the NAR they name, are taken once and within their time, the same link
    /// sent again replaces the first, and the oldest NARs' links make room.
    #[tokio::test(start_paused = true)]
    async fn links_are_held_by_their_nar_within_their_time_and_budget() {
        let l = DebugLinks::default();
        let (raw, parsed) = link(NAR_A, "aa/1.debug");
        let one = raw.len();
        l.hold(name('a'), raw.clone(), parsed.clone());
        l.hold(name('a'), raw, parsed);
        assert_eq!(l.held_bytes(), one, "replaced, not added");
        let (raw, parsed) = link(NAR_A, "bb/2.debug");
        l.hold(name('b'), raw, parsed);
        let (raw, parsed) = link(NAR_B, "cc/3.debug");
        l.hold(name('c'), raw, parsed);
        assert!(l.take("other.nar.xz").is_empty());
        let mut taken: Vec<String> = l
            .take(NAR_A)
            .into_iter()
            .map(|(n, _)| n.to_string())
            .collect();
        taken.sort();
        assert_eq!(taken, [name('a').to_string(), name('b').to_string()]);
        assert!(l.take(NAR_A).is_empty(), "taken once");

        tokio::time::advance(HELD_FOR).await;
        assert!(l.take(NAR_B).is_empty(), "its narinfo came too late");
        assert_eq!(l.held_bytes(), 0);

        let big = Bytes::from(vec![b' '; HELD_BYTES / 2]);
        let (_, parsed) = link(NAR_A, "aa/1.debug");
        l.hold(name('a'), big.clone(), parsed);
        tokio::time::advance(Duration::from_secs(1)).await;
        let (_, parsed) = link(NAR_B, "bb/2.debug");
        l.hold(name('b'), big.clone(), parsed);
        tokio::time::advance(Duration::from_secs(1)).await;
        let (raw, parsed) = link(NAR_C, "cc/3.debug");
        l.hold(name('c'), raw, parsed);
        assert!(l.take(NAR_A).is_empty(), "the oldest made room");
        assert_eq!(l.take(NAR_B).len(), 1);
        assert_eq!(l.take(NAR_C).len(), 1);
        assert_eq!(l.held_bytes(), 0);
    }
}
