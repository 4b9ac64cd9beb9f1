//! What the NAR cache holds, in memory: each NAR's size, hash and whether its file has been
//! checked, the order of use (least recently used first) and the byte budget. No I/O: the
//! caller removes the files of what [`Index::evict`] hands back.
//!
//! The budget is of disk space, not of NAR bytes: each NAR is charged its [`footprint`], so
//! that a cache of many small NARs stays within it too.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::disk::Checksum;

/// Whether a cached file may be served as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verified {
    /// Written by this process, or hashed since start-up and found intact.
    Yes,
    /// Found on disk at start-up: hashed before its first use.
    No,
    /// Being hashed now.
    InProgress,
}

/// The allocation unit assumed for the cache's file system (ext4, XFS and btrfs default to it).
pub(super) const BLOCK: u64 = 4096;

/// The disk space a cached NAR of `size` bytes takes: its file rounded up to whole blocks,
/// and one block for its `.meta`. A 1 KiB NAR takes 8 KiB; a 100 MiB one, 4 KiB more.
pub(super) fn footprint(size: u64) -> u64 {
    size.div_ceil(BLOCK)
        .saturating_mul(BLOCK)
        .saturating_add(BLOCK)
}

struct Entry {
    size: u64,
    checksum: Checksum,
    /// When it was last used, on the index's own clock (a counter): its key in `Index::lru`.
    tick: u64,
    verified: Verified,
}

pub(super) struct Index {
    entries: HashMap<String, Entry>,
    /// Names by last use, oldest first. Ticks are unique, so this is a total order.
    lru: BTreeMap<u64, String>,
    tick: u64,
    /// Sum of the entries' [`footprint`]s.
    total: u64,
    budget: u64,
    /// Files found on disk at start-up and not looked at yet (the scan runs in the
    /// background): not entries until their `.meta` and size are read.
    pending: HashSet<String>,
}

/// The first tick: files found at start-up are placed before every entry used since
/// ([`Index::insert_unused`]), at ticks below the lowest.
const FIRST_TICK: u64 = u64::MAX / 2;

impl Index {
    /// An empty index that keeps at most `budget` bytes.
    pub(super) fn new(budget: u64) -> Self {
        Self {
            entries: HashMap::new(),
            lru: BTreeMap::new(),
            tick: FIRST_TICK,
            total: 0,
            budget,
            pending: HashSet::new(),
        }
    }

    /// Records the files found on disk at start-up, to be looked at ([`Self::take_pending`]).
    pub(super) fn set_pending(&mut self, names: impl IntoIterator<Item = String>) {
        self.pending.extend(names);
    }

    /// Whether `name` is a file from start-up not looked at yet.
    pub(super) fn is_pending(&self, name: &str) -> bool {
        self.pending.contains(name)
    }

    /// Claims a pending file for whoever looks at it first (the scan or a request); false if
    /// it is not pending (looked at already, or its name filled or forgotten since).
    pub(super) fn take_pending(&mut self, name: &str) -> bool {
        self.pending.remove(name)
    }

    /// Gives back the memory of the pending names looked at (once the scan is over).
    pub(super) fn shrink_pending(&mut self) {
        self.pending.shrink_to_fit();
    }

    /// Adds files found at start-up, oldest use first, as used before every entry held now
    /// (those were used since the start); a name no longer pending is left as it is.
    pub(super) fn insert_unused(
        &mut self,
        found: impl IntoIterator<Item = (String, u64, Checksum)>,
    ) {
        let found: Vec<_> = found
            .into_iter()
            .filter(|(name, ..)| self.pending.remove(name))
            .collect();
        // Below the lowest tick held, or the next one handed out.
        let first = self.lru.first_key_value().map_or(self.tick, |(&t, _)| t);
        let ticks = first.saturating_sub(found.len() as u64)..;
        for (tick, (name, size, checksum)) in ticks.zip(found) {
            self.lru.insert(tick, name.clone());
            self.total += footprint(size);
            self.entries.insert(
                name,
                Entry {
                    size,
                    checksum,
                    tick,
                    verified: Verified::No,
                },
            );
        }
    }

    /// Whether a NAR of `size` bytes is worth caching at all: one that takes more than half
    /// the budget would evict most of the cache for a single NAR.
    pub(super) fn admits(&self, size: u64) -> bool {
        footprint(size) <= self.budget / 2
    }

    /// Number of NARs, and the disk space they take (their [`footprint`]s).
    pub(super) fn usage(&self) -> (usize, u64) {
        (self.entries.len(), self.total)
    }

    /// Adds `name` (replacing any entry of that name, or its file pending from start-up) as the
    /// most recently used.
    pub(super) fn insert(&mut self, name: &str, size: u64, checksum: Checksum, verified: Verified) {
        self.remove(name);
        let tick = self.next_tick();
        self.lru.insert(tick, name.to_owned());
        self.total += footprint(size);
        self.entries.insert(
            name.to_owned(),
            Entry {
                size,
                checksum,
                tick,
                verified,
            },
        );
    }

    /// Marks `name` as just used; its size and state if it is held.
    pub(super) fn touch(&mut self, name: &str) -> Option<(u64, Verified)> {
        let tick = self.next_tick();
        let e = self.entries.get_mut(name)?;
        self.lru.remove(&e.tick);
        e.tick = tick;
        self.lru.insert(tick, name.to_owned());
        Some((e.size, e.verified))
    }

    /// Whether `name` is held (checked or not), without marking it used.
    pub(super) fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The size of `name` if it is held (checked or not), without marking it used.
    pub(super) fn size(&self, name: &str) -> Option<u64> {
        Some(self.entries.get(name)?.size)
    }

    /// The size of `name` if it is held and its file checked, without marking it used.
    pub(super) fn verified_size(&self, name: &str) -> Option<u64> {
        let e = self.entries.get(name)?;
        (e.verified == Verified::Yes).then_some(e.size)
    }

    /// Forgets `name`; true if it was held, or its file pending from start-up (whose files the
    /// caller then removes as well).
    pub(super) fn remove(&mut self, name: &str) -> bool {
        let pending = self.pending.remove(name);
        match self.entries.remove(name) {
            Some(e) => {
                self.lru.remove(&e.tick);
                self.total -= footprint(e.size);
                true
            }
            None => pending,
        }
    }

    /// Forgets every entry and pending file (their directory is gone); how many there were.
    pub(super) fn clear(&mut self) -> usize {
        let n = self.entries.len() + self.pending.len();
        self.entries.clear();
        self.lru.clear();
        self.pending.clear();
        self.total = 0;
        n
    }

    /// Forgets the least recently used NARs until the rest fit the budget; their names, whose
    /// files the caller removes.
    pub(super) fn evict(&mut self) -> Vec<String> {
        let mut victims = Vec::new();
        while self.total > self.budget {
            let Some((_, name)) = self.lru.pop_first() else {
                break;
            };
            if let Some(e) = self.entries.remove(&name) {
                self.total -= footprint(e.size);
            }
            victims.push(name);
        }
        victims
    }

    /// Forgets the least recently used NARs that together take at least `short` bytes of
    /// disk; their names, whose files the caller removes. Nothing if all of them together
    /// take less: emptying the cache would not make the room.
    pub(super) fn make_room(&mut self, short: u64) -> Vec<String> {
        if self.total < short {
            return Vec::new();
        }
        let mut victims = Vec::new();
        let mut freed = 0u64;
        while freed < short {
            let Some((_, name)) = self.lru.pop_first() else {
                break;
            };
            if let Some(e) = self.entries.remove(&name) {
                let f = footprint(e.size);
                self.total -= f;
                freed += f;
            }
            victims.push(name);
        }
        victims
    }

    /// Claims an unchecked entry for hashing: its size and expected checksum, or `None` if it
    /// is gone, already checked or being checked.
    pub(super) fn start_verify(&mut self, name: &str) -> Option<(u64, Checksum)> {
        let e = self.entries.get_mut(name)?;
        if e.verified != Verified::No {
            return None;
        }
        e.verified = Verified::InProgress;
        Some((e.size, e.checksum))
    }

    /// Whether `name` is held, not checked, and no check of it is under way (one failed).
    pub(super) fn unchecked(&self, name: &str) -> bool {
        self.entries
            .get(name)
            .is_some_and(|e| e.verified == Verified::No)
    }

    /// Leaves `name` to be checked again (its check could not read it for now).
    pub(super) fn set_unchecked(&mut self, name: &str) {
        if let Some(e) = self.entries.get_mut(name) {
            if e.verified == Verified::InProgress {
                e.verified = Verified::No;
            }
        }
    }

    /// Records that `name`'s file was hashed and found intact.
    pub(super) fn set_verified(&mut self, name: &str) {
        if let Some(e) = self.entries.get_mut(name) {
            e.verified = Verified::Yes;
        }
    }

    /// The names held, least recently used first (tests).
    #[cfg(test)]
    pub(super) fn by_use(&self) -> Vec<String> {
        self.lru.values().cloned().collect()
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: Checksum = Checksum::Xxh3([0; 16]);
    /// What a 100-byte NAR takes on disk: a block for it, one for its `.meta`.
    const F: u64 = 2 * BLOCK;

    fn index(budget: u64, names: &[&str]) -> Index {
        let mut i = Index::new(budget);
        for n in names {
            i.insert(n, 100, SHA, Verified::Yes);
        }
        i
    }

    /// Files found at start-up are claimed once, by the scan or a request; one filled or
    /// forgotten meanwhile is no longer pending; the scan's go before every entry held.
    #[test]
    fn files_pending_from_start_up_are_claimed_once() {
        let mut i = index(3 * F, &[]);
        i.set_pending(["a", "b", "c", "d", "e"].map(String::from));
        assert!(i.is_pending("a") && !i.is_pending("x"));
        assert!(i.take_pending("a"));
        assert!(!i.take_pending("a"), "claimed once");
        assert!(!i.take_pending("x"));
        i.insert("b", 100, SHA, Verified::Yes);
        assert!(!i.is_pending("b"), "filled");
        assert!(i.remove("c"), "forgotten: its files are to go");
        assert!(!i.is_pending("c"));
        assert!(!i.remove("c"));
        i.insert("x", 100, SHA, Verified::Yes);
        let found = ["a", "b", "c", "d", "e"].map(|n| (n.to_owned(), 100, SHA));
        i.insert_unused(found);
        // Only d and e were still pending; both before what was used since.
        assert_eq!(i.by_use(), ["d", "e", "b", "x"]);
        assert_eq!(i.usage(), (4, 4 * F));
        assert!(!i.is_pending("d"));
        i.touch("d");
        assert_eq!(i.evict(), ["e"]);
    }

    #[test]
    fn evicts_the_least_recently_used_not_the_first_inserted() {
        let mut i = index(3 * F, &["a", "b", "c"]);
        // Use order now differs from insertion order: b is the oldest use.
        i.touch("a");
        i.touch("c");
        i.insert("d", 100, SHA, Verified::Yes);
        assert_eq!(i.evict(), ["b"]);
        i.touch("a");
        i.insert("e", 100, SHA, Verified::Yes);
        assert_eq!(i.evict(), ["c"]);
        assert_eq!(i.usage(), (3, 3 * F));
    }

    #[test]
    fn evicts_until_the_budget_holds() {
        let mut i = index(4 * F, &["a", "b", "c"]);
        assert!(i.evict().is_empty());
        // Five blocks and a `.meta`: 3 F.
        i.insert("big", 5 * BLOCK, SHA, Verified::Yes);
        // 6 F: two of the 100-byte NARs must go; exactly the budget is fine.
        assert_eq!(i.evict(), ["a", "b"]);
        assert_eq!(i.usage(), (2, 4 * F));
    }

    #[test]
    fn touching_a_missing_name_changes_nothing() {
        let mut i = index(2 * F, &["a", "b"]);
        assert_eq!(i.touch("zz"), None);
        assert_eq!(i.touch("b"), Some((100, Verified::Yes)));
        i.insert("c", 100, SHA, Verified::Yes);
        assert_eq!(i.evict(), ["a"]);
    }

    #[test]
    fn sizes_are_told_for_checked_files_only_and_are_no_use() {
        let mut i = index(3 * F, &["a", "b"]);
        i.insert("unchecked", 50, SHA, Verified::No);
        assert_eq!(i.verified_size("a"), Some(100));
        assert_eq!(i.verified_size("unchecked"), None);
        assert_eq!(i.verified_size("zz"), None);
        // Asking about "a" did not make it recently used: it is still the first to go.
        i.insert("c", 100, SHA, Verified::Yes);
        assert_eq!(i.evict(), ["a"]);
    }

    #[test]
    fn replacing_an_entry_counts_its_size_once() {
        let mut i = index(10 * F, &["a"]);
        i.insert("a", 3 * BLOCK, SHA, Verified::Yes);
        assert_eq!(i.usage(), (1, 4 * BLOCK));
        assert!(i.remove("a"));
        assert!(!i.remove("a"));
        assert_eq!(i.usage(), (0, 0));
    }

    #[test]
    fn unchecked_entries_are_claimed_for_hashing_once() {
        let mut i = Index::new(1000);
        i.insert("a", 10, Checksum::Xxh3([7; 16]), Verified::No);
        assert_eq!(i.start_verify("a"), Some((10, Checksum::Xxh3([7; 16]))));
        assert_eq!(i.touch("a"), Some((10, Verified::InProgress)));
        assert_eq!(i.start_verify("a"), None, "already being hashed");
        i.set_verified("a");
        assert_eq!(i.touch("a"), Some((10, Verified::Yes)));
        assert_eq!(i.start_verify("a"), None);
        assert_eq!(i.start_verify("missing"), None);
    }

    #[test]
    fn admits_at_most_half_the_budget() {
        let i = Index::new(8 * BLOCK);
        assert!(i.admits(3 * BLOCK));
        assert!(!i.admits(3 * BLOCK + 1));
    }

    #[test]
    fn room_is_made_from_the_least_recently_used_if_they_can_make_it() {
        let mut i = index(100 * F, &["a", "b", "c"]);
        i.touch("a");
        assert!(
            i.make_room(3 * F + 1).is_empty(),
            "the whole cache would not do"
        );
        assert_eq!(i.usage(), (3, 3 * F));
        assert!(i.make_room(0).is_empty());
        assert_eq!(i.make_room(F + 1), ["b", "c"]);
        assert_eq!(i.usage(), (1, F));
        assert_eq!(i.make_room(F), ["a"]);
        assert_eq!(i.usage(), (0, 0));
    }

    #[test]
    fn small_nars_are_charged_the_disk_space_they_take() {
        assert_eq!(footprint(0), BLOCK);
        assert_eq!(footprint(1), 2 * BLOCK);
        assert_eq!(footprint(BLOCK), 2 * BLOCK);
        assert_eq!(footprint(BLOCK + 1), 3 * BLOCK);
        assert_eq!(footprint(u64::MAX), u64::MAX);
        // A thousand 1 KiB NARs take 8 MiB of disk: a 4 MiB budget keeps half of them.
        let mut i = Index::new(4 << 20);
        for n in 0..1000 {
            i.insert(&n.to_string(), 1024, SHA, Verified::Yes);
        }
        assert_eq!(i.evict().len(), 488);
        assert_eq!(i.usage(), (512, 4 << 20));
    }
}
