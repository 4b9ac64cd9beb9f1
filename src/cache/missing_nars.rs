//! NARs this server has seen missing, so that the narinfos pointing at them answer 404 instead
//! of handing out a path whose NAR fetch would fail (Nix treats a NAR 404 as a hard error, but
//! a narinfo 404 as "not in this cache", and then builds or asks another substituter).
//!
//! The cost: while any NAR is remembered, each narinfo answer is scanned for its `URL:` line
//! (a few hundred bytes, well under a microsecond); each entry takes about 100 bytes for
//! `ttl`; and a client that got the 404 remembers it for its negative TTL (an hour in Nix),
//! even if the NAR is uploaded again meanwhile. A NAR uploaded through this server, or served
//! by it again, is forgotten at once; one uploaded through another replica is found by the
//! next narinfo request naming it after a negative TTL (the NAR is looked for in the store
//! again once per negative TTL, [`MissingNars::to_look_again`]), else forgotten after `ttl`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use moka::future::Cache;

/// At most this many NARs are remembered (the oldest are forgotten first).
const CAPACITY: u64 = 100_000;

/// A NAR uploaded here this recently is not remembered missing, whenever the read that found
/// nothing began: reads of one NAR are shared (the memory cache, a disk fill), so a request
/// that came after an upload may get the answer of a read that began before it. Longer than a
/// read that finds nothing takes (a few store and upstream timeouts).
const UPLOADED_LATELY: Duration = Duration::from_secs(60);

/// How long an upload is remembered: what [`UPLOADED_LATELY`] needs, and as long again for a
/// read that began before the upload and took longer than that. Not the misses' lifetime: a
/// builder uploading a hundred paths a second would hold a hundred thousand names for it.
const UPLOADS_KEPT: Duration = Duration::from_secs(2 * UPLOADED_LATELY.as_secs());

pub struct MissingNars {
    /// Each NAR found missing, and when it last was (looked for again at most once per
    /// negative TTL: [`MissingNars::to_look_again`]).
    names: Cache<Box<str>, tokio::time::Instant>,
    /// When each NAR was last uploaded here (for [`UPLOADS_KEPT`]): a GET that started
    /// before that and found nothing saw the store before the upload, and is not remembered.
    uploaded: Cache<Box<str>, tokio::time::Instant>,
    /// Set once anything was ever remembered: until then narinfos are not scanned at all.
    any: AtomicBool,
}

impl MissingNars {
    pub fn new(ttl: Duration) -> Self {
        Self::holding(CAPACITY, ttl)
    }

    /// At most `capacity` names of each kind, the least recently used out first: moka's
    /// default admission refuses a new name once full (it has not been used yet), so requests
    /// for made-up names (each a miss) would keep out the NARs found missing after them, whose
    /// narinfos would then be served.
    fn holding(capacity: u64, ttl: Duration) -> Self {
        fn cache<V: Clone + Send + Sync + 'static>(
            capacity: u64,
            ttl: Duration,
        ) -> Cache<Box<str>, V> {
            Cache::builder()
                .max_capacity(capacity)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .time_to_live(ttl.max(Duration::from_secs(1)))
                .build()
        }
        Self {
            names: cache(capacity, ttl),
            uploaded: cache(capacity, UPLOADS_KEPT),
            any: AtomicBool::new(false),
        }
    }

    /// Lets go of what expired (moka otherwise does at its next use): a server gone quiet
    /// gives that memory back too.
    pub async fn let_go_stale(&self) {
        self.names.run_pending_tasks().await;
        self.uploaded.run_pending_tasks().await;
    }

    /// A GET of `nar/<file>` that started at `asked` found nothing. Not remembered if the NAR
    /// was uploaded since: that GET looked before the upload ended.
    pub async fn seen_missing(&self, file: &str, asked: tokio::time::Instant) {
        if self.uploaded_since(file, asked).await {
            return;
        }
        // Set before the name is kept, and the upload looked for again after: an upload
        // recorded meanwhile either finds the name to forget, or is found here.
        self.any.store(true, Ordering::SeqCst);
        self.names
            .insert(file.into(), tokio::time::Instant::now())
            .await;
        if self.uploaded_since(file, asked).await {
            self.names.invalidate(file).await;
        }
    }

    /// Whether `file` was uploaded here since `asked`, or lately ([`UPLOADED_LATELY`]).
    async fn uploaded_since(&self, file: &str, asked: tokio::time::Instant) -> bool {
        self.uploaded
            .get(file)
            .await
            .is_some_and(|at| at >= asked || at.elapsed() < UPLOADED_LATELY)
    }

    /// `nar/<file>` was uploaded.
    pub async fn seen_present(&self, file: &str) {
        self.uploaded
            .insert(file.into(), tokio::time::Instant::now())
            .await;
        if self.any.load(Ordering::SeqCst) {
            self.names.invalidate(file).await;
        }
    }

    /// `nar/<file>` was served: found again (uploaded through another replica since), it is
    /// no longer missing.
    pub async fn seen_served(&self, file: &str) {
        if self.any.load(Ordering::Relaxed) {
            self.names.invalidate(file).await;
        }
    }

    /// Whether the rendered narinfo `body` points at a NAR known to be missing.
    pub fn points_to_missing(&self, body: &[u8]) -> bool {
        self.missing_in(body).is_some()
    }

    /// The NAR known to be missing the rendered narinfo `body` points at, if it does.
    pub fn missing_in<'a>(&self, body: &'a [u8]) -> Option<&'a str> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        let text = std::str::from_utf8(body).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("URL: nar/"))
            .filter(|file| self.is_missing(file))
    }

    /// Whether `nar/<file>`, known to be missing, is to be looked for again now: it was found
    /// missing `every` ago or longer. Another path naming the same NAR may have been uploaded
    /// through another replica since (the same contents, so the same NAR), which this one
    /// would otherwise hide for as long as it remembers the NAR missing. Once per `every`:
    /// the next look is due `every` from now.
    pub async fn to_look_again(&self, file: &str, every: std::time::Duration) -> bool {
        // A negative TTL of 0 would look on every request.
        let every = every.max(std::time::Duration::from_secs(1));
        match self.names.get(file).await {
            Some(at) if at.elapsed() >= every => {
                self.names
                    .insert(file.into(), tokio::time::Instant::now())
                    .await;
                true
            }
            _ => false,
        }
    }

    /// Whether `nar/<file>` is known to be missing.
    pub fn is_missing(&self, file: &str) -> bool {
        self.any.load(Ordering::Relaxed) && self.names.contains_key(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn remembers_until_uploaded() {
        let m = MissingNars::new(Duration::from_secs(60));
        let body = b"StorePath: /nix/store/x\nURL: nar/abc.nar.xz\nCompression: xz\n";
        assert!(!m.points_to_missing(body));
        assert!(!m.is_missing("abc.nar.xz"));
        m.seen_missing("abc.nar.xz", tokio::time::Instant::now())
            .await;
        assert!(m.points_to_missing(body));
        assert!(m.is_missing("abc.nar.xz"));
        assert!(!m.is_missing("def.nar.xz"));
        m.seen_present("abc.nar.xz").await;
        assert!(!m.points_to_missing(body));
        assert!(!m.is_missing("abc.nar.xz"));
        // Served again (uploaded through another replica): forgotten too.
        let other = b"StorePath: /nix/store/y\nURL: nar/def.nar.xz\nCompression: xz\n";
        m.seen_missing("def.nar.xz", tokio::time::Instant::now())
            .await;
        assert!(m.points_to_missing(other));
        m.seen_served("def.nar.xz").await;
        assert!(!m.points_to_missing(other));
    }

    /// Full of names nobody will ask about again (made-up names, each a miss), it still takes
    /// the next NAR found missing, and hides its narinfo.
    #[tokio::test]
    async fn a_nar_found_missing_after_many_others_is_remembered() {
        let m = MissingNars::holding(16, Duration::from_secs(600));
        for i in 0..64 {
            for _ in 0..3 {
                m.seen_missing(&format!("junk{i}.nar"), tokio::time::Instant::now())
                    .await;
            }
        }
        m.seen_missing("abc.nar.xz", tokio::time::Instant::now())
            .await;
        m.names.run_pending_tasks().await;
        let body = b"StorePath: /nix/store/x\nURL: nar/abc.nar.xz\nCompression: xz\n";
        assert!(m.points_to_missing(body));
    }

    /// A GET that found nothing but started before the NAR's upload ended (it looked first)
    /// is not remembered: the narinfo uploaded with that NAR is served. Nor is one that
    /// started after it, while the upload is recent: reads of a NAR are shared, and its answer
    /// may be a read's that began before the upload. Later, a miss is remembered.
    #[tokio::test(start_paused = true)]
    async fn a_miss_older_than_the_upload_is_not_remembered() {
        let m = MissingNars::new(Duration::from_secs(600));
        let body = b"StorePath: /nix/store/x\nURL: nar/abc.nar.xz\nCompression: xz\n";
        let asked = tokio::time::Instant::now();
        tokio::time::advance(Duration::from_millis(5)).await;
        m.seen_present("abc.nar.xz").await;
        m.seen_missing("abc.nar.xz", asked).await;
        assert!(!m.points_to_missing(body));
        tokio::time::advance(Duration::from_millis(5)).await;
        m.seen_missing("abc.nar.xz", tokio::time::Instant::now())
            .await;
        assert!(!m.points_to_missing(body), "uploaded lately");
        tokio::time::advance(UPLOADED_LATELY).await;
        m.seen_missing("abc.nar.xz", tokio::time::Instant::now())
            .await;
        assert!(m.points_to_missing(body));
    }
}
