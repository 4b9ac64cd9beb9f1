//! The NAR cache through its public API, against an in-memory store.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt as _;

use super::index::{footprint, BLOCK};
use super::{NarCache, NarCacheAnswer};
use crate::nix::NarFileName;
use crate::store::memory::{MemoryStore, RangeFault};
use crate::store::{ByteRange, ByteStream, Store};

const NAME: &str = "07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar.xz";

async fn concat(s: ByteStream) -> Vec<u8> {
    let chunks: Vec<Bytes> = s.try_collect().await.unwrap();
    chunks.concat()
}

async fn body(l: NarCacheAnswer) -> Vec<u8> {
    match l {
        NarCacheAnswer::Object(o) => concat(o.body).await,
        _ => panic!("not an object"),
    }
}

fn setup(
    max: u64,
) -> (
    tempfile::TempDir,
    Arc<NarCache>,
    Arc<MemoryStore>,
    Arc<dyn Store>,
) {
    let dir = tempfile::tempdir().unwrap();
    let cache = NarCache::open_scanned(dir.path(), max, Duration::from_secs(30));
    let mem = Arc::new(MemoryStore::new());
    let store: Arc<dyn Store> = mem.clone();
    (dir, cache, mem, store)
}

/// Waits until `done` holds, looking again each time the cache reports a change made in the
/// background (a generous bound only turns a hang into a failure).
async fn wait_until(cache: &NarCache, done: impl Fn() -> bool) {
    let waiting = async {
        loop {
            let changed = cache.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if done() {
                return;
            }
            changed.await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .expect("the cache never got there");
}

/// Closes `cache` as a process exit would: returns once its background tasks have let go of it,
/// so its directory's lock is free for the next open.
async fn close(cache: Arc<NarCache>) {
    let weak = Arc::downgrade(&cache);
    drop(cache);
    let gone = async {
        while weak.strong_count() > 0 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), gone)
        .await
        .expect("a background task kept the cache");
}

/// Asks `cache` for the NAR [`NAME`] (its store key `nar/NAME`).
async fn get_nar(
    cache: &Arc<NarCache>,
    store: &Arc<dyn Store>,
) -> Result<NarCacheAnswer, crate::store::StoreError> {
    let name: NarFileName = NAME.parse().unwrap();
    cache
        .get(&name, &format!("nar/{NAME}"), None, None, store)
        .await
}

/// NAR names that sort in this order.
const NAMES: [&str; 4] = [
    "07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar",
    "17yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar",
    "27yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar",
    "37yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar",
];

/// The NAR `name` read through `cache` whole.
async fn read_named(cache: &Arc<NarCache>, store: &Arc<dyn Store>, name: &str) -> Vec<u8> {
    let file: NarFileName = name.parse().unwrap();
    let key = format!("nar/{name}");
    body(cache.get(&file, &key, None, None, store).await.unwrap()).await
}

/// The NAR `name` as a request gets it: through `cache`, or from the store when the cache
/// answers [`NarCacheAnswer::Bypass`] (as the server does).
async fn served_named(cache: &Arc<NarCache>, store: &Arc<dyn Store>, name: &str) -> Vec<u8> {
    let file: NarFileName = name.parse().unwrap();
    let key = format!("nar/{name}");
    match cache.get(&file, &key, None, None, store).await.unwrap() {
        NarCacheAnswer::Bypass => concat(store.get(&key, None).await.unwrap().unwrap().body).await,
        answer => body(answer).await,
    }
}

async fn wait_indexed(cache: &NarCache, n: usize) {
    wait_until(cache, || cache.usage().0 == n).await;
}

/// A request that finds the file of the entry it looked up of another size does not drop
/// the entry a fill put there since (a NAR named after its store path, rebuilt): only the
/// entry it looked up, if still there.
#[tokio::test]
async fn a_stale_look_does_not_drop_a_new_entry() {
    use super::index::Verified;
    let (d, cache, _mem, _store) = setup(1 << 30);
    let new = vec![9u8; 2000];
    std::fs::write(d.path().join(NAME), &new).unwrap();
    let checksum = super::disk::Checksum::of(&new);
    cache.index().insert(NAME, 2000, checksum, Verified::Yes);
    // Looked up when the entry was of 1000 bytes.
    let answer = cache.read_file(NAME, 1000, None).await.unwrap();
    assert!(matches!(answer, NarCacheAnswer::Bypass));
    assert_eq!(cache.index().size(NAME), Some(2000));
    assert!(d.path().join(NAME).exists());
    // A check of the entry as it was before a restart (1000 bytes), ending after a fill
    // replaced it: the new entry stays.
    cache.verify(NAME, (1000, super::disk::Checksum::of(&[0u8; 1000])));
    assert_eq!(cache.index().size(NAME), Some(2000));
    assert!(d.path().join(NAME).exists());
    // The entry it looked up, found wrong: dropped.
    let answer = cache.read_file(NAME, 2000, None).await.unwrap();
    assert!(matches!(answer, NarCacheAnswer::Object(_)));
    std::fs::write(d.path().join(NAME), b"short").unwrap();
    let answer = cache.read_file(NAME, 2000, None).await.unwrap();
    assert!(matches!(answer, NarCacheAnswer::Bypass));
    assert_eq!(cache.index().size(NAME), None);
}

/// A fill that cannot write its file (the disk filled up under it, an I/O error) is the
/// cache's trouble, not the client's: its readers get the rest from the store, every byte in
/// place, and nothing is kept.
#[tokio::test]
async fn readers_of_a_fill_that_cannot_write_get_the_rest_from_the_store() {
    let logs = crate::test_logs::capture();
    let (_d, cache, mem, store) = setup(1 << 30);
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
    let key = format!("nar/{NAME}");
    mem.insert(&key, data.clone());
    let name: NarFileName = NAME.parse().unwrap();
    cache
        .fail_writes_past
        .store(1 << 20, std::sync::atomic::Ordering::SeqCst);
    let got = body(cache.get(&name, &key, None, None, &store).await.unwrap()).await;
    assert!(got == data, "{} bytes, not the NAR", got.len());
    assert!(logs.text().contains("reading the rest from the store"));
    assert_eq!(cache.usage().0, 0);
}

#[tokio::test]
async fn fills_then_hits_without_the_store() {
    let (_d, cache, mem, store) = setup(1 << 30);
    let data = vec![42u8; 3_000_000];
    mem.insert(&format!("nar/{NAME}"), data.clone());
    let name: NarFileName = NAME.parse().unwrap();
    let key = format!("nar/{NAME}");
    assert_eq!(
        body(cache.get(&name, &key, None, None, &store).await.unwrap()).await,
        data
    );
    wait_indexed(&cache, 1).await;
    let before = mem.requests();
    assert_eq!(
        body(cache.get(&name, &key, None, None, &store).await.unwrap()).await,
        data
    );
    let r = Some(ByteRange::From {
        start: 10,
        end: Some(19),
    });
    match cache.get(&name, &key, r, None, &store).await.unwrap() {
        NarCacheAnswer::Object(o) => {
            assert_eq!(o.range.unwrap().total, data.len() as u64);
            assert_eq!(concat(o.body).await.len(), 10);
        }
        _ => panic!("range not served from disk"),
    }
    assert_eq!(mem.requests(), before, "hits must not touch the store");
}

/// A NAR whose bytes are not what its narinfo's `FileHash` says (rotted in the bucket at the
/// same size, replaced during its fill) is not kept: its reader's body fails before its last
/// bytes, the fill is logged with the NAR's name and both hashes, nothing is indexed, and
/// the next request reads the store again (where the object, fixed, is then kept). A large
/// NAR (a fill) and a small one (read whole) alike.
#[tokio::test]
async fn a_nar_whose_bytes_are_not_its_narinfos_is_not_kept() {
    for len in [3_000_000usize, 1000] {
        let logs = crate::test_logs::capture();
        let (_d, cache, mem, store) = setup(1 << 30);
        let good: Vec<u8> = (0..len as u32).map(|i| (i % 251) as u8).collect();
        let said = crate::nix::Sha256::digest(&good);
        cache.check_file_hashes_by(Arc::new(move |_name: String| {
            Box::pin(async move { Some(said) })
        }));
        let mut rotted = good.clone();
        rotted[len / 2] ^= 0x55;
        let key = format!("nar/{NAME}");
        mem.insert(&key, rotted);
        let read = match get_nar(&cache, &store).await {
            Ok(NarCacheAnswer::Object(o)) => o.body.try_collect::<Vec<Bytes>>().await.err(),
            Err(e) => Some(std::io::Error::other(e.to_string())),
            _ => panic!("{len}: neither served nor refused"),
        };
        let e = read.unwrap_or_else(|| panic!("{len}: the rotted NAR was served whole"));
        let text = format!("{e} {}", logs.text());
        assert!(
            text.contains("is not the NAR its narinfo describes"),
            "{len}: {text}"
        );
        assert!(text.contains(&said.to_string()), "{len}: {text}");
        assert_eq!(cache.usage().0, 0, "{len}: kept");
        // Fixed in the store: read again, served and kept.
        mem.insert(&key, good.clone());
        assert_eq!(body(get_nar(&cache, &store).await.unwrap()).await, good);
        wait_indexed(&cache, 1).await;
    }
}

#[tokio::test]
async fn eviction_keeps_the_budget() {
    // Room for two of the three 1000-byte NARs, as they take 8 KiB of disk each.
    let (d, cache, mem, store) = setup(2 * footprint(1000) + 1000);
    let names = &NAMES[..3];
    let read = |i: usize| read_named(&cache, &store, names[i]);
    for (i, n) in names.iter().enumerate().take(2) {
        mem.insert(&format!("nar/{n}"), vec![i as u8; 1000]);
        read(i).await;
        wait_indexed(&cache, i + 1).await;
    }
    // The first one is used again, so the second is now the least recently used.
    let before = mem.requests();
    assert_eq!(read(0).await, vec![0u8; 1000]);
    assert_eq!(mem.requests(), before, "a hit");
    let evicted = || crate::metrics::cache_evictions("nar_disk");
    let evicted_before = evicted();
    mem.insert(&format!("nar/{}", names[2]), vec![2u8; 1000]);
    read(2).await;
    // The last fill indexes its NAR and evicts in the background: wait for that.
    let nar_files = || {
        std::fs::read_dir(d.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".nar")
            })
            .count()
    };
    wait_until(&cache, || {
        d.path().join(names[2]).exists() && nar_files() == 2
    })
    .await;
    assert_eq!(cache.usage(), (2, 2 * footprint(1000)));
    // Counted (other tests' evictions may count meanwhile: the registry is the process's).
    assert!(evicted() > evicted_before, "{evicted_before}");
    assert!(d.path().join(names[0]).exists(), "recently used: kept");
    assert!(d.path().join(names[2]).exists());
}

#[tokio::test]
async fn a_nar_filled_again_keeps_its_new_file_when_the_old_one_is_removed_late() {
    let (d, cache, _mem, _store) = setup(1 << 30);
    cache.store_small(NAME, b"old");
    // Evicted: out of the index at once, its files to be removed in the background...
    assert!(cache.index().remove(NAME));
    // ...but filled again before that removal runs.
    cache.store_small(NAME, b"new");
    cache.remove_unindexed(NAME);
    assert_eq!(std::fs::read(d.path().join(NAME)).unwrap(), b"new");
    assert!(d.path().join(format!("{NAME}.meta")).exists());
    assert_eq!(cache.usage().0, 1);
    // Once it has left the index for good, the removal takes its files.
    assert!(cache.index().remove(NAME));
    cache.remove_unindexed(NAME);
    assert!(!d.path().join(NAME).exists());
    assert!(!d.path().join(format!("{NAME}.meta")).exists());
}

#[tokio::test]
async fn restart_rebuilds_and_drops_corrupt_files() {
    let (d, cache, mem, store) = setup(1 << 30);
    let data = vec![7u8; 100_000];
    mem.insert(&format!("nar/{NAME}"), data.clone());
    let name: NarFileName = NAME.parse().unwrap();
    let key = format!("nar/{NAME}");
    body(cache.get(&name, &key, None, None, &store).await.unwrap()).await;
    wait_indexed(&cache, 1).await;
    close(cache).await;

    // Same size, different bytes: only hashing can tell.
    let mut bytes = std::fs::read(d.path().join(NAME)).unwrap();
    bytes[500] ^= 1;
    std::fs::write(d.path().join(NAME), bytes).unwrap();
    let cache = NarCache::open_scanned(d.path(), 1 << 30, Duration::from_secs(30));
    assert_eq!(cache.usage().0, 1);
    // First hit: the file is checked first; corrupt, it is dropped, and the NAR fetched
    // again, intact.
    let before = mem.requests();
    assert_eq!(
        body(cache.get(&name, &key, None, None, &store).await.unwrap()).await,
        data
    );
    assert_eq!(mem.requests(), before + 1);
    wait_indexed(&cache, 1).await;
    assert_eq!(std::fs::read(d.path().join(NAME)).unwrap(), data);

    // A truncated file is removed at start.
    close(cache).await;
    std::fs::write(d.path().join(NAME), b"short").unwrap();
    let cache = NarCache::open_scanned(d.path(), 1 << 30, Duration::from_secs(30));
    assert_eq!(cache.usage().0, 0);
    assert!(!d.path().join(NAME).exists());
}

/// A cache holding [`NAME`] (3 MB, filled from the store), reopened as after a restart: its
/// file is not checked yet. The directory, the cache, the store and the NAR's bytes.
async fn cached_then_restarted() -> (
    tempfile::TempDir,
    Arc<NarCache>,
    Arc<MemoryStore>,
    Arc<dyn Store>,
    Vec<u8>,
) {
    let (d, cache, mem, store) = setup(1 << 30);
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    mem.insert(&format!("nar/{NAME}"), data.clone());
    body(get_nar(&cache, &store).await.unwrap()).await;
    wait_indexed(&cache, 1).await;
    close(cache).await;
    let cache = NarCache::open_scanned(d.path(), 1 << 30, Duration::from_secs(30));
    (d, cache, mem, store, data)
}

/// An evicted NAR whose file cannot be removed (a file system gone read-only; here a directory
/// in its place, which no `unlink` removes) keeps its space, which the budget no longer
/// counts: caching pauses, as on a full disk, and the next NAR is served without a fill.
#[tokio::test]
async fn a_file_eviction_cannot_remove_pauses_caching() {
    // Room for two.
    let (d, cache, mem, store) = setup(2 * footprint(1000) + 1000);
    let names = NAMES;
    let read = |i: usize| read_named(&cache, &store, names[i]);
    for (i, n) in names.iter().enumerate() {
        mem.insert(&format!("nar/{n}"), vec![i as u8; 1000]);
    }
    for i in 0..2 {
        read(i).await;
        wait_indexed(&cache, i + 1).await;
    }
    let first = d.path().join(names[0]);
    std::fs::remove_file(&first).unwrap();
    std::fs::create_dir(&first).unwrap();
    std::fs::write(first.join("x"), b"x").unwrap();
    // Its fill evicts the first, least recently used.
    read(2).await;
    wait_until(&cache, || cache.disk_full.is_active()).await;
    assert!(first.exists());
    let before = cache.usage();
    assert_eq!(read(3).await, vec![3u8; 1000]);
    assert_eq!(cache.usage(), before, "filled during the pause");
    assert!(!d.path().join(names[3]).exists());
}

/// A cache whose store holds the NARs of [`NAMES`] (`i` bytes of value `i`, 1000 each),
/// the first of them cached, then its directory removed.
async fn cached_then_removed() -> (tempfile::TempDir, Arc<NarCache>, Arc<dyn Store>) {
    let (d, cache, mem, store) = setup(1 << 30);
    for (i, n) in NAMES.iter().enumerate() {
        mem.insert(&format!("nar/{n}"), vec![i as u8; 1000]);
    }
    assert_eq!(read_named(&cache, &store, NAMES[0]).await, vec![0u8; 1000]);
    wait_indexed(&cache, 1).await;
    std::fs::remove_dir_all(d.path()).unwrap();
    (d, cache, store)
}

/// The cache's directory removed while in use (`rm -rf` to empty the cache by hand): the next
/// request finds it gone, is served from the store, and the directory is made anew, marked
/// and locked, with nothing indexed; NARs are cached in it again from then on. (Before,
/// every NAR request warned, and nothing was cached until a restart.)
#[tokio::test]
async fn a_cache_directory_removed_while_in_use_is_made_anew() {
    let (d, cache, store) = cached_then_removed().await;
    let names = NAMES;
    assert_eq!(
        served_named(&cache, &store, names[0]).await,
        vec![0u8; 1000]
    );
    assert_eq!(cache.usage().0, 0, "the files gone are forgotten");
    assert!(d.path().join(".cellar-nar-cache").is_file(), "marked anew");
    // Locked anew: a second process is refused the directory.
    let Err(e) = NarCache::open(d.path(), 1 << 30, Duration::from_secs(30)) else {
        panic!("a second cache opened the directory");
    };
    assert!(e.to_string().contains("another running cellar"), "{e}");
    for (i, n) in names.iter().enumerate().skip(1) {
        assert_eq!(read_named(&cache, &store, n).await, vec![i as u8; 1000]);
    }
    wait_indexed(&cache, 3).await;
    assert!(
        d.path().join(names[1]).is_file(),
        "cached in the new directory"
    );
    assert!(!cache.disk_full.is_active());
}

/// The same when the first request after the removal is a miss: its fill cannot write, finds
/// the directory gone and makes it anew; the next NAR is cached.
#[tokio::test]
async fn a_cache_directory_removed_is_made_anew_by_a_fill() {
    let (d, cache, mem, store) = setup(1 << 30);
    for (i, n) in NAMES.iter().enumerate() {
        mem.insert(&format!("nar/{n}"), vec![i as u8; 1000]);
    }
    std::fs::remove_dir_all(d.path()).unwrap();
    assert_eq!(
        served_named(&cache, &store, NAMES[0]).await,
        vec![0u8; 1000]
    );
    wait_until(&cache, || d.path().join(".cellar-nar-cache").is_file()).await;
    assert_eq!(
        served_named(&cache, &store, NAMES[1]).await,
        vec![1u8; 1000]
    );
    wait_indexed(&cache, 1).await;
    assert!(d.path().join(NAMES[1]).is_file());
}

/// The cache's directory taken by another process after it was removed (a second cellar
/// started on the path meanwhile): this one does not take it back, nor touch its files; it
/// serves without caching, said once, and keeps trying after each pause.
#[tokio::test]
async fn a_cache_directory_taken_by_another_process_is_left_to_it() {
    let (d, cache, store) = cached_then_removed().await;
    let names = NAMES;
    let other = NarCache::open_scanned(d.path(), 1 << 30, Duration::from_secs(30));
    assert_eq!(read_named(&other, &store, names[3]).await, vec![3u8; 1000]);
    wait_indexed(&other, 1).await;
    let theirs = std::fs::read_dir(d.path()).unwrap().count();
    for _ in 0..2 {
        assert_eq!(
            served_named(&cache, &store, names[0]).await,
            vec![0u8; 1000]
        );
        assert_eq!(
            served_named(&cache, &store, names[1]).await,
            vec![1u8; 1000]
        );
    }
    assert!(cache.disk_full.is_active(), "paused");
    assert_eq!(
        cache.usage().0,
        1,
        "what it held is kept: the directory may come back"
    );
    // After the pause, tried again: still not this process's, so nothing is written there.
    cache.disk_full.expire();
    assert_eq!(
        served_named(&cache, &store, names[2]).await,
        vec![2u8; 1000]
    );
    wait_until(&cache, || cache.disk_full.is_active()).await;
    assert_eq!(cache.usage().0, 1);
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), theirs);
    assert!(!d.path().join(names[2]).exists());
    assert!(d.path().join(names[3]).is_file());
    assert_eq!(read_named(&other, &store, names[3]).await, vec![3u8; 1000]);
    // The other one stopped, its files left: not taken (they would lie there uncounted).
    close(other).await;
    cache.disk_full.expire();
    assert_eq!(
        served_named(&cache, &store, names[2]).await,
        vec![2u8; 1000]
    );
    wait_until(&cache, || cache.disk_full.is_active()).await;
    assert!(!d.path().join(names[2]).exists());
    // Its directory removed too: this one makes it anew.
    std::fs::remove_dir_all(d.path()).unwrap();
    cache.disk_full.expire();
    assert_eq!(
        served_named(&cache, &store, names[2]).await,
        vec![2u8; 1000]
    );
    wait_until(&cache, || cache.index().contains(names[2])).await;
    assert_eq!(cache.usage().0, 1, "what it held before is forgotten");
    assert!(d.path().join(names[2]).is_file());
}

/// The directory moved away and something else put in its place, then moved back: caching
/// resumes in it with what it held, once the pause after the failed attempt is over.
#[tokio::test]
async fn a_cache_directory_moved_away_and_back_is_used_again() {
    let (d, cache, mem, store) = setup(1 << 30);
    for (i, n) in NAMES.iter().enumerate() {
        mem.insert(&format!("nar/{n}"), vec![i as u8; 1000]);
    }
    assert_eq!(read_named(&cache, &store, NAMES[0]).await, vec![0u8; 1000]);
    wait_indexed(&cache, 1).await;
    let away = d.path().with_extension("away");
    std::fs::rename(d.path(), &away).unwrap();
    std::fs::create_dir(d.path()).unwrap();
    std::fs::write(d.path().join("someone-else's"), b"x").unwrap();
    assert_eq!(
        served_named(&cache, &store, NAMES[1]).await,
        vec![1u8; 1000]
    );
    wait_until(&cache, || cache.disk_full.is_active()).await;
    assert!(!d.path().join(NAMES[1]).exists());
    std::fs::remove_dir_all(d.path()).unwrap();
    std::fs::rename(&away, d.path()).unwrap();
    cache.disk_full.expire();
    assert_eq!(read_named(&cache, &store, NAMES[0]).await, vec![0u8; 1000]);
    assert_eq!(
        served_named(&cache, &store, NAMES[1]).await,
        vec![1u8; 1000]
    );
    wait_until(&cache, || cache.index().contains(NAMES[1])).await;
    assert_eq!(cache.usage().0, 2);
    assert!(d.path().join(NAMES[1]).is_file());
}

/// An `rm -rf` of the cache that ended half-way, leaving `.tmp/` and temporary files in it
/// and no marker, is taken again (its temporary files removed); a directory with other files
/// is not.
#[test]
fn a_cache_directory_left_with_only_temporary_files_is_taken() {
    let d = tempfile::tempdir().unwrap();
    let tmp = d.path().join(".tmp");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::write(tmp.join("0123456789abcdef01234567"), b"half").unwrap();
    let cache = NarCache::open_scanned(d.path(), 1 << 30, Duration::from_secs(30));
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    drop(cache);
    let other = tempfile::tempdir().unwrap();
    std::fs::create_dir(other.path().join(".tmp")).unwrap();
    std::fs::write(other.path().join(".tmp").join("notes.txt"), b"mine").unwrap();
    assert!(NarCache::open(other.path(), 1 << 30, Duration::from_secs(30)).is_err());
}

/// A write failure that says nothing of the next one (out of file descriptors while every
/// client comes back after a restart) costs that NAR its caching, not a pause for all.
#[test]
fn a_passing_write_failure_does_not_pause_caching() {
    let d = tempfile::tempdir().unwrap();
    let cache = NarCache::open_scanned(d.path(), 1 << 30, Duration::from_secs(30));
    let emfile = std::io::Error::from_raw_os_error(24);
    cache.write_failed(
        NAME,
        &super::disk::WriteError::io("creating", d.path(), emfile),
    );
    assert!(!cache.disk_full(1));
    let erofs = std::io::Error::from_raw_os_error(30);
    cache.write_failed(
        NAME,
        &super::disk::WriteError::io("creating", d.path(), erofs),
    );
    assert!(cache.disk_full(1), "a read-only file system pauses");
}

/// A cache directory that can no longer be written (here its `.tmp` made a file; a file
/// system gone read-only, a directory the server's user lost the right to write) pauses
/// caching as a full disk does, with one warning, instead of one per NAR; once it can be
/// written again, caching resumes after the pause.
#[test]
fn a_cache_directory_that_cannot_be_written_pauses_caching() {
    let logs = crate::test_logs::capture();
    let d = tempfile::tempdir().unwrap();
    let cache = NarCache::open_scanned(d.path(), 1 << 30, Duration::from_secs(30));
    let tmp = d.path().join(".tmp");
    std::fs::remove_dir(&tmp).unwrap();
    std::fs::write(&tmp, b"in the way").unwrap();
    let warned = || logs.text().matches("cannot write a file").count();
    for name in [NAMES[0], NAMES[1]] {
        let Err(e) = cache.disk.write_temp(b"nar") else {
            panic!("wrote under a file");
        };
        cache.write_failed(name, &e);
    }
    assert_eq!(warned(), 1, "once, not per NAR");
    assert!(cache.disk_full(1), "paused");
    std::fs::remove_file(&tmp).unwrap();
    cache.disk_full.expire();
    let (file, checksum) = cache.disk.write_temp(b"nar").unwrap();
    cache.add(NAME, 3, || {
        cache.disk.publish(file, NAME, 3, checksum)?;
        Ok(checksum)
    });
    assert_eq!(cache.usage().0, 1, "cached again");
    assert!(logs.text().contains("takes files again"));
}

/// A file gone before its first check after a restart (removed by hand) is fetched again and
/// said to be missing, not corrupt.
#[tokio::test]
async fn a_file_gone_before_its_check_is_missing_not_corrupt() {
    let (d, cache, _mem, store, data) = cached_then_restarted().await;
    std::fs::remove_file(d.path().join(NAME)).unwrap();
    // The check as a request starts it, run on this thread (whose log is read).
    let expected = cache.index().start_verify(NAME).unwrap();
    let logs = crate::test_logs::capture();
    cache.verify(NAME, expected);
    let said = logs.text();
    assert!(said.contains("cached file is missing"), "{said}");
    assert!(!said.contains("corrupt"), "{said}");
    drop(logs);
    assert_eq!(cache.usage().0, 0);
    assert_eq!(body(get_nar(&cache, &store).await.unwrap()).await, data);
}

/// After a restart, the requests for a file not yet checked (every client at once, after a
/// deploy) wait for its check and are served from disk: none reaches the store.
#[tokio::test]
async fn requests_for_a_file_being_checked_wait_for_the_check() {
    let (_d, cache, mem, store, data) = cached_then_restarted().await;
    let (name, key): (NarFileName, _) = (NAME.parse().unwrap(), format!("nar/{NAME}"));
    let before = mem.requests();
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (cache, store, name, key) =
                (cache.clone(), store.clone(), name.clone(), key.clone());
            tokio::spawn(async move {
                body(cache.get(&name, &key, None, None, &store).await.unwrap()).await
            })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap() == data);
    }
    assert_eq!(mem.requests(), before, "the store was asked");
}

/// Files from before a restart are checked a few at a time: with every turn taken, a request
/// for one waits its while and goes to the store, and its check runs once a turn is free.
/// With too many checks waiting already, a request goes to the store at once and the file is
/// left to be checked on its next use.
#[tokio::test(start_paused = true)]
async fn checks_after_a_restart_take_turns() {
    let (d, cache, _mem, store, data) = cached_then_restarted().await;
    let (name, key): (NarFileName, _) = (NAME.parse().unwrap(), format!("nar/{NAME}"));
    let turns = cache
        .checks
        .clone()
        .acquire_many_owned(super::CHECKS_AT_ONCE as u32)
        .await
        .unwrap();
    assert!(matches!(
        cache.get(&name, &key, None, None, &store).await.unwrap(),
        NarCacheAnswer::Bypass
    ));
    assert_eq!(
        cache
            .checks_waiting
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    drop(turns);
    wait_until(&cache, || cache.index().verified_size(NAME).is_some()).await;
    assert_eq!(
        cache
            .checks_waiting
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    close(cache).await;

    let cache = NarCache::open_scanned(d.path(), 1 << 30, Duration::from_secs(30));
    cache
        .checks_waiting
        .store(super::CHECKS_WAITING, std::sync::atomic::Ordering::SeqCst);
    let started = tokio::time::Instant::now();
    assert!(matches!(
        cache.get(&name, &key, None, None, &store).await.unwrap(),
        NarCacheAnswer::Bypass
    ));
    assert_eq!(started.elapsed(), Duration::ZERO, "the request waited");
    assert!(cache.index().unchecked(NAME), "left to be checked later");
    cache
        .checks_waiting
        .store(0, std::sync::atomic::Ordering::SeqCst);
    let hit = cache.get(&name, &key, None, None, &store).await.unwrap();
    assert!(body(hit).await == data, "checked on its next use");
}

/// After a restart, a small NAR the memory cache let go to disk is read back from there once
/// its (quick) check passes, not from the store.
#[tokio::test]
async fn a_small_file_from_before_a_restart_is_read_after_its_check() {
    let (d, cache, mem, _store) = setup(1 << 30);
    let data = vec![3u8; 10_000];
    mem.insert(&format!("nar/{NAME}"), data.clone());
    let name: NarFileName = NAME.parse().unwrap();
    cache.spill(NAME, bytes::Bytes::from(data.clone()));
    wait_indexed(&cache, 1).await;
    close(cache).await;
    let cache = NarCache::open_scanned(d.path(), 1 << 30, Duration::from_secs(30));
    let before = mem.requests();
    let obj = cache.held(&name, Some(10_000)).await.unwrap();
    assert!(body(NarCacheAnswer::Object(obj.expect("not read from disk"))).await == data);
    assert_eq!(mem.requests(), before);
}

#[tokio::test]
async fn concurrent_misses_cost_one_store_get() {
    let (_d, cache, mem, store) = setup(1 << 30);
    let data: Vec<u8> = (0..5_000_000u32).map(|i| i as u8).collect();
    mem.insert(&format!("nar/{NAME}"), data.clone());
    let name: NarFileName = NAME.parse().unwrap();
    let key = format!("nar/{NAME}");
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (cache, store, name, key) =
                (cache.clone(), store.clone(), name.clone(), key.clone());
            tokio::spawn(async move {
                body(cache.get(&name, &key, None, None, &store).await.unwrap()).await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), data);
    }
    // One fill, which reads the NAR in two parts (ranged GETs).
    assert_eq!(mem.requests(), 2);
}

/// A NAR of several parts is read with one ranged GET per part and served whole, in order,
/// and the file written is the same.
#[tokio::test]
async fn a_large_nar_is_read_in_parts_and_served_in_order() {
    let (_d, cache, mem, store) = setup(1 << 30);
    let size = 3 * super::fill::PART + 12345;
    let data: Vec<u8> = (0..size).map(|i| (i / 7) as u8).collect();
    mem.insert(&format!("nar/{NAME}"), data.clone());
    let got = get_nar(&cache, &store).await.unwrap();
    assert!(
        body(got).await == data,
        "the parts came out of order or short"
    );
    assert_eq!(mem.requests(), 4);
    wait_indexed(&cache, 1).await;
    let again = get_nar(&cache, &store).await.unwrap();
    assert!(body(again).await == data);
    assert_eq!(mem.requests(), 4, "served from disk");
}

/// Parts fetched ahead are bounded over all fills; a fill finding every such permit held (by
/// fills of a slow source) reads its parts as it gets to them instead of waiting for one, so
/// it is not stalled behind them.
#[tokio::test(start_paused = true)]
async fn a_fill_finding_every_part_permit_held_reads_its_parts_itself() {
    let (_d, cache, mem, store) = setup(1 << 30);
    let held = cache
        .parts
        .clone()
        .acquire_many_owned(super::fill::PARTS_IN_MEMORY as u32)
        .await
        .unwrap();
    let size = 3 * super::fill::PART + 12345;
    let data: Vec<u8> = (0..size).map(|i| (i / 7) as u8).collect();
    mem.insert(&format!("nar/{NAME}"), data.clone());
    let got = read_out(get_nar(&cache, &store).await.unwrap()).await;
    assert!(got.unwrap() == data, "the parts came out of order or short");
    assert_eq!(mem.requests(), 4, "one GET a part");
    wait_indexed(&cache, 1).await;
    drop(held);
}

#[tokio::test]
async fn too_large_nars_pass_through_with_one_store_get() {
    // Over the small-NAR limit (1 MiB), so it would be streamed into a file, and over half
    // the budget, so the cache must not take it: the store's answer is handed over as is.
    let (d, cache, mem, store) = setup(2_000_000);
    let data: Vec<u8> = (0..1_500_000u32).map(|i| (i % 251) as u8).collect();
    mem.insert(&format!("nar/{NAME}"), data.clone());
    let name: NarFileName = NAME.parse().unwrap();
    let key = format!("nar/{NAME}");
    for round in 1..=2 {
        assert_eq!(
            body(cache.get(&name, &key, None, None, &store).await.unwrap()).await,
            data
        );
        assert_eq!(mem.requests(), round, "every request goes to the store");
        assert_eq!(cache.usage(), (0, 0));
    }
    let files: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(&NAME[..10]))
        .collect();
    assert!(files.is_empty(), "nothing written for it: {files:?}");
}

#[tokio::test]
async fn missing_nars_are_not_cached() {
    let (_d, cache, mem, store) = setup(1 << 30);
    let name: NarFileName = NAME.parse().unwrap();
    let key = format!("nar/{NAME}");
    assert!(matches!(
        cache.get(&name, &key, None, None, &store).await.unwrap(),
        NarCacheAnswer::NotFound
    ));
    mem.insert(&key, vec![1u8; 10]);
    assert_eq!(
        body(cache.get(&name, &key, None, None, &store).await.unwrap()).await,
        vec![1u8; 10]
    );
}

#[test]
fn a_nar_that_would_leave_less_than_the_margin_free_is_not_cached() {
    let d = tempfile::tempdir().unwrap();
    let cache = NarCache::open_scanned(d.path(), 1 << 30, Duration::from_secs(30));
    assert!(!cache.disk_full(1), "a small NAR on a roomy disk");
    // Fits the free space, but would leave 100 MiB of the 256 MiB kept free.
    let avail = cache.disk.free_bytes().unwrap();
    assert!(avail > super::FREE_MARGIN, "the test needs 256 MiB free");
    assert!(cache.disk_full(avail - (100 << 20)));
    // And caching pauses: even a small NAR is served without it for a while.
    assert!(cache.disk_full(1));
}

/// A disk fuller than the budget allows (a budget larger than the disk, or other files)
/// makes the least recently used NARs go, rather than keeping the cache as it is and no new
/// NAR in it.
#[test]
fn a_short_disk_evicts_the_least_recently_used_to_make_room() {
    use super::index::Verified;
    let d = tempfile::tempdir().unwrap();
    let cache = NarCache::open_scanned(d.path(), u64::MAX / 2, Duration::from_secs(30));
    let avail = cache.disk.free_bytes().unwrap();
    assert!(avail > super::FREE_MARGIN, "the test needs 256 MiB free");
    let checksum = super::disk::Checksum::of(b"");
    // The oldest says it takes what the disk has left, the newer 1 GiB.
    let names = [
        "07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar",
        "17yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar",
    ];
    for (name, size) in names.iter().zip([avail, 1 << 30]) {
        std::fs::write(d.path().join(name), b"").unwrap();
        cache.index().insert(name, size, checksum, Verified::Yes);
    }
    // Would leave 100 MiB of the 256 MiB kept free: the oldest goes, the other stays.
    assert!(!cache.disk_full(avail - (100 << 20)));
    assert!(!d.path().join(names[0]).exists());
    assert!(d.path().join(names[1]).exists());
    assert_eq!(cache.usage().0, 1);
    // What even an empty cache could not make room for pauses caching, evicting nothing.
    assert!(cache.disk_full(avail.saturating_mul(4)));
    assert_eq!(cache.usage().0, 1);
}

/// Fills still running count as space still to be taken, but what they wrote is gone from
/// the free space already: a new NAR evicts for its own room only, not for theirs again.
#[test]
fn running_fills_do_not_make_a_new_nar_evict_for_them() {
    use super::index::Verified;
    let d = tempfile::tempdir().unwrap();
    let cache = NarCache::open_scanned(d.path(), u64::MAX / 2, Duration::from_secs(30));
    let checksum = super::disk::Checksum::of(b"");
    let names = [
        "07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar",
        "17yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar",
    ];
    for name in names {
        std::fs::write(d.path().join(name), b"").unwrap();
        cache.index().insert(name, 1 << 30, checksum, Verified::Yes);
    }
    let avail = cache.disk.free_bytes().unwrap();
    // Promised to running fills: all the free space and 1 GiB more. A 1-byte NAR makes room
    // for itself and the margin: the older NAR goes, the other stays.
    assert!(!cache.no_room(1, avail + (1 << 30)));
    assert!(!d.path().join(names[0]).exists());
    assert!(d.path().join(names[1]).exists());
}

/// A NAR the disk has room for, short only by what running fills have yet to write, with
/// nothing to evict: it is not cached, but caching does not pause for the others (the fills
/// it waits on may never write it all).
#[test]
fn a_nar_short_only_by_running_fills_does_not_pause_caching() {
    let d = tempfile::tempdir().unwrap();
    let cache = NarCache::open_scanned(d.path(), u64::MAX / 2, Duration::from_secs(30));
    let avail = cache.disk.free_bytes().unwrap();
    assert!(
        avail > super::FREE_MARGIN + (1 << 20),
        "the test needs 257 MiB free"
    );
    assert!(cache.no_room(1, avail));
    assert!(!cache.disk_full.is_active(), "paused for the running fills");
    assert!(!cache.no_room(1, 0));
    // Short for itself: paused.
    assert!(cache.no_room(avail, 0));
    assert!(cache.disk_full.is_active());
}

/// A running fill reserves free space only for what it has yet to write (what it wrote is
/// gone from the free space already), and nothing once it is over.
#[tokio::test]
async fn a_fill_reserves_only_what_it_has_yet_to_write() {
    use std::sync::atomic::Ordering;
    let (_d, cache, mem, store) = setup(1 << 30);
    let size = 3u64 << 19;
    let key = format!("nar/{NAME}");
    mem.insert(&key, vec![1u8; size as usize]);
    // The store stalls halfway through the NAR: the fill keeps running.
    mem.fault_range(0, RangeFault::Stall, 1);
    let answer = get_nar(&cache, &store).await.unwrap();
    assert!(matches!(answer, NarCacheAnswer::Object(_)));
    let written_some = async {
        while cache.reserved.load(Ordering::Relaxed) == size {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), written_some)
        .await
        .expect("nothing written");
    let reserved = cache.reserved.load(Ordering::Relaxed);
    assert!(reserved > 0 && reserved < size, "{reserved}");
    drop(answer);
}

/// Nothing stays reserved once fills are over.
#[tokio::test]
async fn fills_over_reserve_nothing() {
    let (_d, cache, mem, store) = setup(1 << 30);
    mem.insert(&format!("nar/{NAME}"), vec![1u8; 3 << 19]);
    body(get_nar(&cache, &store).await.unwrap()).await;
    wait_indexed(&cache, 1).await;
    assert_eq!(cache.reserved.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test]
async fn sizes_ranges_past_the_end_and_truncated_files() {
    let (d, cache, mem, store) = setup(1 << 30);
    let data = vec![7u8; 2_000_000];
    let key = format!("nar/{NAME}");
    mem.insert(&key, data.clone());
    let name: NarFileName = NAME.parse().unwrap();
    let other: NarFileName = "17yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar"
        .parse()
        .unwrap();
    assert_eq!(cache.size_of(&name), None);
    body(cache.get(&name, &key, None, None, &store).await.unwrap()).await;
    wait_indexed(&cache, 1).await;
    assert_eq!(cache.size_of(&name), Some(2_000_000));
    assert_eq!(cache.size_of(&other), None);

    // A range past the end is refused from disk, with the size, and the file stays.
    let before = mem.requests();
    let past = Some(ByteRange::From {
        start: 5_000_000,
        end: None,
    });
    assert!(matches!(
        cache.get(&name, &key, past, None, &store).await,
        Err(crate::store::StoreError::RangeNotSatisfiable { size: 2_000_000 })
    ));
    assert_eq!(mem.requests(), before);
    assert_eq!(cache.usage().0, 1);

    // A file cut short behind the cache's back is not served: the store is asked again.
    let file = std::fs::File::options()
        .write(true)
        .open(d.path().join(NAME))
        .unwrap();
    file.set_len(1000).unwrap();
    let got = cache.get(&name, &key, None, None, &store).await.unwrap();
    assert!(
        matches!(got, NarCacheAnswer::Bypass),
        "a short file was served"
    );
    assert_eq!(cache.size_of(&name), None, "and it is forgotten");
}

/// A cache holding [`NAME`] (2 MB, checked), filled from the store it returns.
async fn filled() -> (
    tempfile::TempDir,
    Arc<NarCache>,
    Arc<MemoryStore>,
    Arc<dyn Store>,
    NarFileName,
    String,
) {
    let (d, cache, mem, store) = setup(1 << 30);
    let key = format!("nar/{NAME}");
    mem.insert(&key, vec![7u8; 2_000_000]);
    let name: NarFileName = NAME.parse().unwrap();
    body(cache.get(&name, &key, None, None, &store).await.unwrap()).await;
    wait_indexed(&cache, 1).await;
    (d, cache, mem, store, name, key)
}

/// A file that cannot be read for a while (here a loop of links: ELOOP, as EMFILE or EIO
/// would be) is not taken for a corrupt one: the request goes to the store, and the file and
/// its entry stay, unless that happens `READ_ERRORS` times in a row.
#[tokio::test]
async fn a_file_that_cannot_be_read_now_is_not_dropped() {
    let (d, cache, mem, store, name, key) = filled().await;
    let file = d.path().join(NAME);
    let kept = d.path().join("kept");
    std::fs::rename(&file, &kept).unwrap();
    std::os::unix::fs::symlink(NAME, &file).unwrap();
    let unreadable = || async {
        let got = cache.get(&name, &key, None, None, &store).await.unwrap();
        assert!(matches!(got, NarCacheAnswer::Bypass), "served from a loop");
    };
    for _ in 1..super::READ_ERRORS {
        unreadable().await;
        assert_eq!(
            cache.size_of(&name),
            Some(2_000_000),
            "the entry was dropped"
        );
    }
    // Readable again: served from disk, and its failures forgotten.
    std::fs::remove_file(&file).unwrap();
    std::fs::rename(&kept, &file).unwrap();
    let before = mem.requests();
    assert_eq!(
        body(cache.get(&name, &key, None, None, &store).await.unwrap())
            .await
            .len(),
        2_000_000
    );
    assert_eq!(mem.requests(), before);
    // Unreadable READ_ERRORS times in a row: dropped, to be fetched again.
    std::fs::rename(&file, &kept).unwrap();
    std::os::unix::fs::symlink(NAME, &file).unwrap();
    for _ in 1..super::READ_ERRORS {
        unreadable().await;
    }
    assert_eq!(cache.size_of(&name), Some(2_000_000), "dropped too soon");
    unreadable().await;
    assert_eq!(cache.size_of(&name), None, "kept for ever");
}

/// A file's count of failed reads goes with its entry (forgotten, evicted): counts of files no
/// longer held are not kept for the life of the process.
#[tokio::test]
async fn failed_reads_are_forgotten_with_the_file() {
    let (d, cache, _mem, store, name, key) = filled().await;
    let file = d.path().join(NAME);
    std::fs::rename(&file, d.path().join("kept")).unwrap();
    std::os::unix::fs::symlink(NAME, &file).unwrap();
    let got = cache.get(&name, &key, None, None, &store).await.unwrap();
    assert!(matches!(got, NarCacheAnswer::Bypass), "served from a loop");
    assert_eq!(super::lock(&cache.read_errors).len(), 1);
    cache.forget(NAME);
    assert!(super::lock(&cache.read_errors).is_empty());
}

/// After a restart, a file its check cannot read for now (here a loop of links, as EMFILE
/// would be when every client comes back at once) is not dropped as corrupt: the request goes
/// to the store at once, and the file is checked again on its next use, unless that keeps
/// failing `READ_ERRORS` times in a row.
#[tokio::test]
async fn a_file_its_check_cannot_read_now_is_checked_again() {
    let (d, cache, mem, store, name, key) = filled().await;
    close(cache).await;
    let file = d.path().join(NAME);
    let kept = d.path().join("kept");
    let reopen = || async {
        let cache = NarCache::open_scanned(d.path(), 1 << 30, Duration::from_secs(30));
        std::fs::rename(&file, &kept).unwrap();
        std::os::unix::fs::symlink(NAME, &file).unwrap();
        cache
    };
    let unreadable = |cache: Arc<NarCache>| {
        let (name, key, store) = (name.clone(), key.clone(), store.clone());
        async move {
            let got = cache.get(&name, &key, None, None, &store).await.unwrap();
            assert!(matches!(got, NarCacheAnswer::Bypass), "served from a loop");
        }
    };
    let cache = reopen().await;
    unreadable(cache.clone()).await;
    assert_eq!(cache.usage().0, 1, "dropped as corrupt");
    // Readable again: checked, and served from disk.
    std::fs::remove_file(&file).unwrap();
    std::fs::rename(&kept, &file).unwrap();
    let before = mem.requests();
    let got = body(cache.get(&name, &key, None, None, &store).await.unwrap()).await;
    assert_eq!(got.len(), 2_000_000);
    assert_eq!(mem.requests(), before);
    close(cache).await;
    // Unreadable at every check: dropped after READ_ERRORS.
    let cache = reopen().await;
    for _ in 1..super::READ_ERRORS {
        unreadable(cache.clone()).await;
    }
    assert_eq!(cache.usage().0, 1, "dropped too soon");
    // The last: dropped, and fetched again from the store into a new file.
    let before = mem.requests();
    let got = body(cache.get(&name, &key, None, None, &store).await.unwrap()).await;
    assert_eq!(got.len(), 2_000_000);
    assert!(mem.requests() > before, "not fetched again");
    wait_indexed(&cache, 1).await;
    assert!(!std::fs::symlink_metadata(&file)
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn a_full_disk_on_write_pauses_caching() {
    let d = tempfile::tempdir().unwrap();
    let cache = NarCache::open_scanned(d.path(), 1 << 30, Duration::from_secs(30));
    assert!(!cache.disk_full(1));
    cache.write_failed("x", &super::disk::WriteError::DiskFull);
    assert!(cache.disk_full(1));
}

/// Each disk-full episode is logged when it starts, and its end when a NAR is stored again:
/// a second one days later is not silent.
#[test]
fn each_disk_full_episode_is_logged() {
    let logs = crate::test_logs::capture();
    let d = tempfile::tempdir().unwrap();
    let cache = NarCache::open_scanned(d.path(), 1 << 30, Duration::from_secs(30));
    let full = || {
        logs.text()
            .matches("disk full, serving without caching")
            .count()
    };
    cache.write_failed("x", &super::disk::WriteError::DiskFull);
    cache.write_failed("y", &super::disk::WriteError::DiskFull);
    assert_eq!(full(), 1, "once per episode");
    let checksum = super::disk::Checksum::of(b"");
    // A fill from before the pause ending in it does not end it, nor is it said to.
    cache.add(NAME, 0, || Ok(checksum));
    assert!(!logs.text().contains("takes files again"));
    assert!(cache.disk_full(1));
    cache.disk_full.expire();
    cache.add(NAME, 0, || Ok(checksum));
    assert!(logs.text().contains("takes files again"));
    cache.write_failed("z", &super::disk::WriteError::DiskFull);
    assert_eq!(full(), 2, "the next episode");
}

/// Restarts keep complete NARs with their `.meta` (twice in a row), and leave alone what
/// cellar did not write there, whatever its name looks like; only those are reported.
#[tokio::test]
async fn restarts_keep_complete_nars_and_leave_foreign_files_alone() {
    let (d, cache, mem, store) = setup(1 << 30);
    mem.insert(&format!("nar/{NAME}"), vec![7u8; 1000]);
    body(get_nar(&cache, &store).await.unwrap()).await;
    wait_indexed(&cache, 1).await;
    close(cache).await;
    for f in ["notes.txt", "notes.meta"] {
        std::fs::write(d.path().join(f), b"mine").unwrap();
    }
    for _ in 0..2 {
        let opened = super::disk::Disk::open(d.path()).unwrap();
        assert_eq!(opened.nars, [NAME]);
        assert_eq!(opened.foreign, vec![d.path().join("notes.txt")]);
    }
    for f in ["notes.txt", "notes.meta", NAME, &format!("{NAME}.meta")] {
        assert!(d.path().join(f).exists(), "{f} was removed");
    }
    let cache = NarCache::open_scanned(d.path(), 1 << 30, Duration::from_secs(30));
    assert_eq!(cache.usage(), (1, footprint(1000)));
}

/// After a restart the cache answers before its files are looked at (a large cache on a slow
/// disk takes minutes): a file asked for meanwhile is looked at first and served from disk, an
/// incomplete one is removed and fetched again, a forgotten one is removed, not indexed by the
/// scan later; the scan indexes the rest as used before anything served since the start.
#[tokio::test]
async fn a_restart_serves_while_its_files_are_looked_at() {
    let (d, cache, mem, store) = setup(1 << 30);
    let names: Vec<String> = (1..=5)
        .map(|i| NAME.replacen('0', &i.to_string(), 1))
        .collect();
    let [asked, broken, forgotten, left, torn] = [0, 1, 2, 3, 4].map(|i| names[i].as_str());
    let data = |i: u8| vec![i; 100_000];
    for (i, n) in names.iter().enumerate() {
        mem.insert(&format!("nar/{n}"), data(i as u8));
        let (name, key): (NarFileName, _) = (n.parse().unwrap(), format!("nar/{n}"));
        body(cache.get(&name, &key, None, None, &store).await.unwrap()).await;
    }
    wait_indexed(&cache, 5).await;
    close(cache).await;
    // Torn: their `.meta` says another size.
    for n in [broken, torn] {
        std::fs::write(d.path().join(n), b"torn").unwrap();
    }

    let (cache, go) = NarCache::open_held(d.path(), 1 << 30, Duration::from_secs(30));
    assert_eq!(cache.usage(), (0, 0), "nothing looked at yet");
    let get = |n: &str| {
        let (cache, store, n) = (cache.clone(), store.clone(), n.to_owned());
        async move {
            let name: NarFileName = n.parse().unwrap();
            body(
                cache
                    .get(&name, &format!("nar/{n}"), None, None, &store)
                    .await
                    .unwrap(),
            )
            .await
        }
    };
    let before = mem.requests();
    assert_eq!(get(asked).await, data(0));
    assert_eq!(mem.requests(), before, "read from disk, not the store");
    assert_eq!(get(broken).await, data(1));
    assert_eq!(
        mem.requests(),
        before + 1,
        "the torn file was fetched again"
    );
    wait_until(&cache, || cache.usage().0 == 2).await;
    assert_eq!(std::fs::read(d.path().join(broken)).unwrap(), data(1));
    let name: NarFileName = forgotten.parse().unwrap();
    assert!(cache.has(&name), "on disk, not looked at yet");
    cache.forget(forgotten);
    assert!(!d.path().join(forgotten).exists());
    assert!(!cache.has(&name));

    go.send(()).unwrap();
    cache.finish_scan();
    assert_eq!(cache.index().by_use(), [left, asked, broken]);
    assert_eq!(cache.usage(), (3, 3 * footprint(100_000)));
    for f in [torn.to_owned(), format!("{torn}.meta")] {
        assert!(!d.path().join(&f).exists(), "{f} is left");
    }
    let before = mem.requests();
    assert_eq!(get(left).await, data(3));
    assert_eq!(mem.requests(), before);
}

/// A file from before a restart whose `.meta` cannot be read (out of file descriptors while
/// every client comes back; here, a directory in its place) is not taken for incomplete: the
/// scan leaves it on disk, unindexed, and a request for it goes to the store.
#[tokio::test]
async fn a_file_that_cannot_be_read_at_start_is_not_removed() {
    let (d, cache, mem, store) = setup(1 << 30);
    let data = vec![5u8; 100_000];
    mem.insert(&format!("nar/{NAME}"), data.clone());
    body(get_nar(&cache, &store).await.unwrap()).await;
    wait_indexed(&cache, 1).await;
    close(cache).await;
    let meta = d.path().join(format!("{NAME}.meta"));
    std::fs::remove_file(&meta).unwrap();
    std::fs::create_dir(&meta).unwrap();

    let cache = NarCache::open_scanned(d.path(), 1 << 30, Duration::from_secs(30));
    assert_eq!(cache.usage(), (0, 0));
    assert!(
        d.path().join(NAME).exists(),
        "removed for a read that failed"
    );
    let before = mem.requests();
    assert_eq!(body(get_nar(&cache, &store).await.unwrap()).await, data);
    assert_eq!(mem.requests(), before + 1, "served from the store");
    assert!(d.path().join(NAME).exists());
}

/// The root of a fresh file system (`lost+found` in it) is taken for an empty directory, as
/// a volume given to the cache is, and `lost+found` is neither removed nor reported; anything
/// else there still makes the directory someone else's.
#[test]
fn a_fresh_file_system_with_lost_found_is_taken_for_empty() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("lost+found")).unwrap();
    for _ in 0..2 {
        let opened = super::disk::Disk::open(d.path()).unwrap();
        assert!(opened.foreign.is_empty(), "{:?}", opened.foreign);
    }
    assert!(d.path().join("lost+found").is_dir());
    let other = tempfile::tempdir().unwrap();
    std::fs::create_dir(other.path().join("lost+found")).unwrap();
    std::fs::write(other.path().join("notes.txt"), b"mine").unwrap();
    assert!(super::disk::Disk::open(other.path()).is_err());
}

/// After a restart, the NARs read since they were written are evicted after those only
/// written: the file system's access times tell which were used.
#[test]
fn a_restart_orders_files_by_their_last_use() {
    use std::fs::FileTimes;
    use std::time::{Duration as D, UNIX_EPOCH};
    let d = tempfile::tempdir().unwrap();
    drop(NarCache::open_scanned(
        d.path(),
        1 << 30,
        Duration::from_secs(30),
    ));
    let names = [
        "07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar",
        "17yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar",
        "27yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar",
    ];
    let at = |s: u64| UNIX_EPOCH + D::from_secs(1_700_000_000 + s);
    // Written in the order 0, 1, 2; 0 read last, 1 never.
    let times = [(at(0), at(30)), (at(10), at(10)), (at(20), at(20))];
    for (name, (written, read)) in names.iter().zip(times) {
        let data = vec![1u8; 10];
        let meta = format!("10 {}\n", super::disk::Checksum::of(&data).render());
        std::fs::write(d.path().join(format!("{name}.meta")), meta).unwrap();
        let path = d.path().join(name);
        std::fs::write(&path, &data).unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_times(FileTimes::new().set_modified(written).set_accessed(read))
            .unwrap();
    }
    let cache = NarCache::open_scanned(d.path(), 1 << 30, Duration::from_secs(30));
    assert_eq!(cache.index().by_use(), [names[1], names[2], names[0]]);
    // A budget shrunk since: the least recently used goes once they are all looked at.
    drop(cache);
    let cache = NarCache::open_scanned(d.path(), 2 * footprint(10), Duration::from_secs(30));
    assert_eq!(cache.index().by_use(), [names[2], names[0]]);
    assert!(!d.path().join(names[1]).exists());
}

/// A budget shrunk below twice a NAR's size since the last run: that NAR goes, even if it was
/// used last, and the others, which fit, stay (indexed, it would have evicted them first).
#[test]
fn a_restart_with_a_smaller_budget_drops_only_the_nar_it_no_longer_admits() {
    use std::fs::FileTimes;
    use std::time::{Duration as D, UNIX_EPOCH};
    let d = tempfile::tempdir().unwrap();
    drop(NarCache::open_scanned(
        d.path(),
        1 << 30,
        Duration::from_secs(30),
    ));
    let names = &NAMES[..3];
    let big = 5 * BLOCK as usize;
    let at = |s: u64| UNIX_EPOCH + D::from_secs(1_700_000_000 + s);
    for (i, (name, size)) in names.iter().zip([10, 10, big]).enumerate() {
        let data = vec![1u8; size];
        let meta = format!("{size} {}\n", super::disk::Checksum::of(&data).render());
        std::fs::write(d.path().join(format!("{name}.meta")), meta).unwrap();
        let path = d.path().join(name);
        std::fs::write(&path, &data).unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        let t = at(10 * i as u64);
        f.set_times(FileTimes::new().set_modified(t).set_accessed(t))
            .unwrap();
    }
    // Room for all three before; now the big one is over half of it.
    let budget = 2 * footprint(big as u64) - 1;
    assert!(budget >= 2 * footprint(10) + footprint(big as u64));
    let cache = NarCache::open_scanned(d.path(), budget, Duration::from_secs(30));
    assert_eq!(cache.index().by_use(), [names[0], names[1]]);
    assert!(!d.path().join(names[2]).exists());
    assert!(d.path().join(names[0]).exists() && d.path().join(names[1]).exists());
}

#[test]
fn disk_errors_say_what_failed() {
    use super::disk::{VerifyError, WriteError};
    let full = WriteError::io(
        "writing",
        std::path::Path::new("/c/x"),
        std::io::Error::from_raw_os_error(28),
    );
    assert_eq!(full.to_string(), "no space left on the cache's file system");
    let denied = WriteError::io(
        "writing",
        std::path::Path::new("/c/x"),
        std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied"),
    );
    assert_eq!(denied.to_string(), "writing /c/x: denied");
    assert_eq!(
        VerifyError::Mismatch.to_string(),
        "its size or checksum differs from its .meta"
    );
    let unreadable = VerifyError::Unreadable(std::io::Error::other("gone"));
    assert_eq!(unreadable.to_string(), "cannot read it: gone");
}

/// A store holding one object whose body the test feeds chunk by chunk, announcing `length`
/// whatever it sends.
struct Fed {
    length: u64,
    /// Whether the body comes with its length (else, as nix-serve sends NARs, without).
    sized: bool,
    body: std::sync::Mutex<Option<ByteStream>>,
    /// Answers a range request as a miss (as an upstream cache that ignores ranges does).
    ranges_missing: bool,
}

impl Fed {
    fn new(length: u64) -> (Arc<Self>, futures::channel::mpsc::UnboundedSender<Bytes>) {
        Self::build(length, true)
    }

    fn build(
        length: u64,
        sized: bool,
    ) -> (Arc<Self>, futures::channel::mpsc::UnboundedSender<Bytes>) {
        let (tx, rx) = futures::channel::mpsc::unbounded::<Bytes>();
        // An empty chunk makes the body panic (a fill task dying without a word).
        let body: ByteStream = Box::pin(futures::StreamExt::map(rx, |b: Bytes| {
            assert!(!b.is_empty(), "the store's body blew up");
            Ok(b)
        }));
        let store = Arc::new(Self {
            length,
            sized,
            body: std::sync::Mutex::new(Some(body)),
            ranges_missing: false,
        });
        (store, tx)
    }
}

#[async_trait::async_trait]
impl Store for Fed {
    async fn get(
        &self,
        _key: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<super::Object>, crate::store::StoreError> {
        if range.is_some() && self.ranges_missing {
            return Ok(None);
        }
        let body = self.body.lock().unwrap().take();
        Ok(body.map(|body| super::Object {
            body,
            length: self.sized.then_some(self.length),
            range: None,
            encoding: None,
        }))
    }
    async fn head(&self, _key: &str) -> Result<Option<u64>, crate::store::StoreError> {
        Ok(Some(self.length))
    }
    async fn ping(&self) -> Result<(), crate::store::StoreError> {
        Ok(())
    }
    async fn writer(
        &self,
        _key: &str,
    ) -> Result<Box<dyn crate::store::ObjectWriter>, crate::store::StoreError> {
        Err(crate::store::StoreError::Other("read-only".into()))
    }
    async fn cleanup_staging(
        &self,
        _older_than: Duration,
    ) -> Result<usize, crate::store::StoreError> {
        Ok(0)
    }
    async fn stale_staging(
        &self,
        _older_than: Duration,
    ) -> Result<Vec<String>, crate::store::StoreError> {
        Ok(Vec::new())
    }
    fn list(&self, _prefix: &str) -> crate::store::ObjectList {
        Box::pin(futures::stream::empty())
    }
    async fn delete(&self, _key: &str) -> Result<(), crate::store::StoreError> {
        Ok(())
    }
    fn describe(&self) -> String {
        "fed://".into()
    }
}

/// A large NAR whose store stalls mid-body: what arrived is readable by the client at once
/// (on virtual time: before the fill's batching wait for more is over, so before it is
/// written), and the rest follows once the store goes on.
#[tokio::test(start_paused = true)]
async fn what_a_stalled_store_sent_is_readable_before_it_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let cache = NarCache::open_scanned(dir.path(), 1 << 30, Duration::from_secs(30));
    let length = 3u64 << 20;
    let (fed, tx) = Fed::new(length);
    let store: Arc<dyn Store> = fed;
    let first = Bytes::from(vec![1u8; 1000]);
    tx.unbounded_send(first.clone()).unwrap();
    let answer = get_nar(&cache, &store).await.unwrap();
    let NarCacheAnswer::Object(obj) = answer else {
        panic!("a large NAR is served while it fills");
    };
    let mut body = obj.body;
    let mut got = Vec::new();
    while got.len() < first.len() {
        let chunk = tokio::time::timeout(Duration::from_millis(1), body.try_next())
            .await
            .expect("the first bytes were held back while the store stalled")
            .unwrap()
            .unwrap();
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, first);
    let rest = vec![2u8; length as usize - first.len()];
    for part in rest.chunks(64 << 10) {
        tx.unbounded_send(Bytes::copy_from_slice(part)).unwrap();
    }
    drop(tx);
    while let Some(chunk) = body.try_next().await.unwrap() {
        assert!(
            !chunk.is_empty(),
            "an empty chunk while waiting for the fill"
        );
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got.len() as u64, length);
    assert_eq!(&got[first.len()..], &rest[..]);
    wait_indexed(&cache, 1).await;
    assert_eq!(cache.usage(), (1, footprint(length)));
}

/// Readers are told of a NAR's last byte only once its source has ended there: a source
/// without a length that stalls right at the narinfo's size (it may yet send a byte too many)
/// keeps them waiting, and they fail with the fill, rather than end as if complete.
#[tokio::test(start_paused = true)]
async fn the_last_byte_waits_for_the_end_of_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let cache = NarCache::open_scanned(dir.path(), 1 << 30, Duration::from_secs(30));
    let length = 3u64 << 20;
    let (fed, tx) = Fed::build(length, false);
    let store: Arc<dyn Store> = fed;
    for part in vec![3u8; length as usize].chunks(64 << 10) {
        tx.unbounded_send(Bytes::copy_from_slice(part)).unwrap();
    }
    let answer = get_announced(&cache, &store, length).await.unwrap();
    let read = read_out(answer).await;
    assert!(read.is_err(), "the NAR ended before its source did");
    drop(tx);
}

/// A small NAR whose store body ends short of its announced length is an error, not served
/// and not cached.
#[tokio::test]
async fn a_short_small_nar_is_an_error_and_not_cached() {
    let dir = tempfile::tempdir().unwrap();
    let cache = NarCache::open_scanned(dir.path(), 1 << 30, Duration::from_secs(30));
    let (fed, tx) = Fed::new(100);
    let store: Arc<dyn Store> = fed;
    tx.unbounded_send(Bytes::from(vec![1u8; 50])).unwrap();
    drop(tx);
    assert!(get_nar(&cache, &store).await.is_err());
    close(cache).await;
    assert!(!dir.path().join(NAME).exists());
}

/// A small NAR over the cache's budget is served but not written.
#[tokio::test]
async fn a_small_nar_over_the_budget_is_served_and_not_written() {
    let (d, cache, mem, store) = setup(50);
    mem.insert(&format!("nar/{NAME}"), vec![7u8; 100]);
    let got = body(get_nar(&cache, &store).await.unwrap()).await;
    assert_eq!(got.len(), 100);
    close(cache).await;
    assert!(!d.path().join(NAME).exists());
}

/// A small NAR within the budget is written and indexed once served.
#[tokio::test]
async fn a_small_nar_is_written_and_indexed() {
    let (d, cache, mem, store) = setup(1 << 20);
    mem.insert(&format!("nar/{NAME}"), vec![7u8; 100]);
    body(get_nar(&cache, &store).await.unwrap()).await;
    wait_indexed(&cache, 1).await;
    assert_eq!(cache.usage(), (1, footprint(100)));
    assert_eq!(std::fs::read(d.path().join(NAME)).unwrap(), vec![7u8; 100]);
}

/// A request that goes away while its fill waits for the store leaves nothing behind: no
/// half-made fill for the next request to find.
#[tokio::test]
async fn a_request_dropped_before_its_fill_started_leaves_no_fill() {
    let (_d, cache, mem, store) = setup(1 << 30);
    mem.insert(&format!("nar/{NAME}"), vec![7u8; 100]);
    let gate = mem.hold_reads("nar/");
    let request = tokio::spawn({
        let (cache, store) = (cache.clone(), store.clone());
        async move {
            let _ = get_nar(&cache, &store).await;
        }
    });
    gate.reached().await;
    assert_eq!(super::lock(&cache.fills).len(), 1);
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());
    assert_eq!(
        super::lock(&cache.fills).len(),
        0,
        "the empty fill was left"
    );
    gate.open();
    let got = body(get_nar(&cache, &store).await.unwrap()).await;
    assert_eq!(got.len(), 100);
}

/// A fill that dies without a word (its task panics) fails its readers instead of leaving
/// them waiting.
#[tokio::test]
async fn readers_of_a_fill_that_died_get_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let cache = NarCache::open_scanned(dir.path(), 1 << 30, Duration::from_secs(30));
    let (fed, tx) = Fed::new(3 << 20);
    let store: Arc<dyn Store> = fed;
    let answer = get_nar(&cache, &store).await.unwrap();
    let NarCacheAnswer::Object(obj) = answer else {
        panic!("a large NAR is served while it fills");
    };
    tx.unbounded_send(Bytes::new()).unwrap();
    let read = tokio::time::timeout(Duration::from_secs(10), concat_or_error(obj.body))
        .await
        .expect("the reader was left waiting");
    let e = read.unwrap_err();
    assert!(e.to_string().contains("ended unexpectedly"), "{e}");
}

/// A fill whose file cannot be published (here its `.meta` cannot be written) has still sent
/// every byte, checked: its readers finish, and only the caching is lost.
#[tokio::test]
async fn a_fill_that_cannot_be_published_still_serves_its_readers() {
    let (dir, cache, mem, store) = setup(1 << 30);
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    mem.insert(&format!("nar/{NAME}"), data.clone());
    std::fs::create_dir(dir.path().join(format!("{NAME}.meta"))).unwrap();
    let NarCacheAnswer::Object(obj) = get_nar(&cache, &store).await.unwrap() else {
        panic!("a large NAR is served while it fills");
    };
    assert_eq!(concat_or_error(obj.body).await.unwrap(), data);
    wait_until(&cache, || super::lock(&cache.fills).is_empty()).await;
    assert_eq!(cache.usage().0, 0, "not cached");
    assert!(!dir.path().join(NAME).exists());
}

async fn concat_or_error(s: ByteStream) -> std::io::Result<Vec<u8>> {
    s.try_fold(Vec::new(), |mut v, b| async move {
        v.extend_from_slice(&b);
        Ok(v)
    })
    .await
}

/// Asks for [`NAME`], a large NAR served while it fills, and returns how its download failed.
async fn failed_download(cache: &Arc<NarCache>, store: &Arc<dyn Store>) -> std::io::Error {
    let NarCacheAnswer::Object(obj) = get_nar(cache, store).await.unwrap() else {
        panic!("a large NAR is served while it fills");
    };
    concat_or_error(obj.body)
        .await
        .expect_err("the download failed")
}

/// A reader keeping up with a fill is handed the chunks just written from memory; one that
/// joins late, past what memory keeps, reads the file. Both get the whole NAR.
#[tokio::test]
async fn a_reader_keeping_up_with_a_fill_is_served_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    let cache = NarCache::open_scanned(dir.path(), 1 << 30, Duration::from_secs(30));
    let chunk = 1usize << 20;
    let length = 12 * chunk as u64;
    let (fed, tx) = Fed::new(length);
    let store: Arc<dyn Store> = fed;
    let part = |i: usize| Bytes::from(vec![i as u8; chunk]);
    tx.unbounded_send(part(0)).unwrap();
    let NarCacheAnswer::Object(obj) = get_nar(&cache, &store).await.unwrap() else {
        panic!("a large NAR is served while it fills");
    };
    let mut head = obj.body;
    let mut got = Vec::new();
    for i in 1..11 {
        while got.len() < i * chunk {
            got.extend_from_slice(&head.try_next().await.unwrap().unwrap());
        }
        tx.unbounded_send(part(i)).unwrap();
    }
    assert_eq!(
        cache.fill_file_reads(NAME),
        Some(0),
        "the head reader read the file"
    );
    let NarCacheAnswer::Object(late) = get_nar(&cache, &store).await.unwrap() else {
        panic!("a second reader joins the fill");
    };
    let mut late = late.body;
    let first = late.try_next().await.unwrap().unwrap();
    assert_eq!(first[0], 0);
    assert_eq!(
        cache.fill_file_reads(NAME),
        Some(1),
        "the late reader reads the file"
    );
    tx.unbounded_send(part(11)).unwrap();
    drop(tx);
    while let Some(b) = head.try_next().await.unwrap() {
        got.extend_from_slice(&b);
    }
    let mut late_got = first.to_vec();
    while let Some(b) = late.try_next().await.unwrap() {
        late_got.extend_from_slice(&b);
    }
    let want: Vec<u8> = (0..12).flat_map(|i| vec![i as u8; chunk]).collect();
    assert!(got == want, "the head reader's copy differs");
    assert!(late_got == want, "the late reader's copy differs");
}

/// A store that answers range requests as misses (an upstream cache that ignores ranges) is
/// asked for the whole NAR: the fill still gets it.
#[tokio::test]
async fn a_store_answering_ranges_as_misses_is_asked_for_the_whole_nar() {
    let dir = tempfile::tempdir().unwrap();
    let cache = NarCache::open_scanned(dir.path(), 1 << 30, Duration::from_secs(30));
    let data = vec![5u8; 2 << 20];
    let (fed, tx) = Fed::new(data.len() as u64);
    let fed = Arc::new(Fed {
        length: fed.length,
        sized: true,
        body: std::sync::Mutex::new(fed.body.lock().unwrap().take()),
        ranges_missing: true,
    });
    tx.unbounded_send(Bytes::from(data.clone())).unwrap();
    drop(tx);
    let store: Arc<dyn Store> = fed;
    let answer = get_nar(&cache, &store).await.unwrap();
    assert!(body(answer).await == data);
}

/// A part whose transfer breaks off, or whose store cannot be reached for a moment, is asked
/// for again: the download and the fill go on.
#[tokio::test]
async fn a_part_broken_off_is_asked_for_again() {
    let (_d, cache, mem, store) = setup(1 << 30);
    let part = super::fill::PART;
    let data: Vec<u8> = (0..3 * part + 12345).map(|i| (i / 7) as u8).collect();
    mem.insert(&format!("nar/{NAME}"), data.clone());
    mem.fault_range(part, RangeFault::CutBody, 1);
    mem.fault_range(2 * part, RangeFault::Unavailable, 1);
    let got = get_nar(&cache, &store).await.unwrap();
    assert!(body(got).await == data, "the download differs");
    let starts = mem.range_starts();
    for broken in [part, 2 * part] {
        assert_eq!(
            starts.iter().filter(|&&s| s == broken).count(),
            2,
            "the part at {broken} asked for again: {starts:?}"
        );
    }
    wait_indexed(&cache, 1).await;
    let again = get_nar(&cache, &store).await.unwrap();
    assert!(body(again).await == data, "the file written differs");
}

/// A part that keeps failing fails the download; nothing is kept, and the next request
/// reads the NAR afresh.
#[tokio::test]
async fn a_part_failing_every_time_fails_the_download_and_is_not_cached() {
    let (_d, cache, mem, store) = setup(1 << 30);
    let part = super::fill::PART;
    let data: Vec<u8> = (0..3 * part).map(|i| (i / 3) as u8).collect();
    mem.insert(&format!("nar/{NAME}"), data.clone());
    mem.fault_range(part, RangeFault::CutBody, super::fill::PART_ATTEMPTS);
    let e = failed_download(&cache, &store).await;
    assert!(e.to_string().contains("the store failed"), "{e}");
    let starts = mem.range_starts();
    assert_eq!(
        starts.iter().filter(|&&s| s == part).count(),
        super::fill::PART_ATTEMPTS,
        "{starts:?}"
    );
    let again = get_nar(&cache, &store).await.unwrap();
    assert!(body(again).await == data);
    assert_eq!(mem.range_starts().first(), Some(&0));
    assert_eq!(
        mem.range_starts().iter().filter(|&&s| s == 0).count(),
        2,
        "the second request read the NAR from the store again"
    );
}

/// A store answering a part with other bytes than those asked for, or refusing the
/// credentials, is not asked again: the download fails at once and nothing is cached.
#[tokio::test]
async fn a_part_answered_wrongly_fails_without_asking_again() {
    for fault in [RangeFault::WrongRange, RangeFault::Denied] {
        let (_d, cache, mem, store) = setup(1 << 30);
        let part = super::fill::PART;
        let data: Vec<u8> = (0..4 * part).map(|i| (i / 5) as u8).collect();
        mem.insert(&format!("nar/{NAME}"), data.clone());
        mem.fault_range(2 * part, fault, 1);
        let e = failed_download(&cache, &store).await;
        assert!(e.to_string().contains("the store failed"), "{fault:?}: {e}");
        let starts = mem.range_starts();
        assert_eq!(
            starts.iter().filter(|&&s| s == 2 * part).count(),
            1,
            "{fault:?}: {starts:?}"
        );
        let again = get_nar(&cache, &store).await.unwrap();
        assert!(body(again).await == data, "{fault:?}");
    }
}

/// A small NAR read whole is offered to the memory cache first: kept there, it is not
/// written; refused (too large for it), it is written as without one.
#[tokio::test]
async fn a_small_nar_goes_to_memory_if_it_takes_it_else_to_a_file() {
    for takes in [true, false] {
        let (d, cache, mem, store) = setup(1 << 20);
        mem.insert(&format!("nar/{NAME}"), vec![7u8; 100]);
        let offered = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = offered.clone();
        cache.keep_small_in(Arc::new(move |name: String, data: Bytes| {
            seen.lock().unwrap().push((name, data.len()));
            Box::pin(async move { takes })
        }));
        assert_eq!(
            body(get_nar(&cache, &store).await.unwrap()).await,
            vec![7u8; 100]
        );
        if takes {
            let settled = async {
                while cache.has(&NAME.parse().unwrap()) {
                    tokio::task::yield_now().await;
                }
            };
            tokio::time::timeout(Duration::from_secs(60), settled)
                .await
                .expect("the fill never ended");
            assert_eq!(cache.usage(), (0, 0), "kept in memory: no file");
            assert!(!d.path().join(NAME).exists());
        } else {
            wait_indexed(&cache, 1).await;
            assert_eq!(std::fs::read(d.path().join(NAME)).unwrap(), vec![7u8; 100]);
        }
        assert_eq!(*offered.lock().unwrap(), vec![(NAME.to_owned(), 100)]);
    }
}

/// A part whose store goes quiet mid-body (a connection neither closed nor sending) is given
/// up on and asked for again, before the fill's own wait for the store runs out.
#[tokio::test]
async fn a_part_gone_quiet_is_asked_for_again() {
    let dir = tempfile::tempdir().unwrap();
    let cache = NarCache::open_scanned(dir.path(), 1 << 30, Duration::from_secs(3));
    let mem = Arc::new(MemoryStore::new());
    let store: Arc<dyn Store> = mem.clone();
    let part = super::fill::PART;
    let data: Vec<u8> = (0..3 * part).map(|i| (i / 11) as u8).collect();
    mem.insert(&format!("nar/{NAME}"), data.clone());
    mem.fault_range(part, RangeFault::Stall, 1);
    let got = get_nar(&cache, &store).await.unwrap();
    assert!(body(got).await == data, "the download differs");
    let starts = mem.range_starts();
    assert!(
        starts.iter().filter(|&&s| s == part).count() >= 2,
        "the quiet part asked for again: {starts:?}"
    );
}

/// The first part of a NAR goes out to clients as it arrives: broken off, or gone quiet, it
/// is resumed from the byte where it stopped, for a small NAR read whole as for a large one
/// read in parts; the download and the file written are the NAR.
#[tokio::test]
async fn a_first_part_broken_off_is_resumed_where_it_stopped() {
    let part = super::fill::PART;
    for (size, fault) in [
        // Cut after its first byte: one byte left to ask for.
        (2, RangeFault::CutBody),
        (100_000, RangeFault::CutBody),
        (3 * part + 777, RangeFault::CutBody),
        (3 * part + 777, RangeFault::Stall),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cache = NarCache::open_scanned(dir.path(), 1 << 30, Duration::from_secs(3));
        let mem = Arc::new(MemoryStore::new());
        let store: Arc<dyn Store> = mem.clone();
        let data: Vec<u8> = (0..size).map(|i| (i / 13) as u8).collect();
        mem.insert(&format!("nar/{NAME}"), data.clone());
        mem.fault_range(0, fault, 1);
        let got = get_nar(&cache, &store).await.unwrap();
        assert!(
            body(got).await == data,
            "{size} {fault:?}: the download differs"
        );
        let cut = size.min(part) / 2;
        let starts = mem.range_starts();
        assert_eq!(
            starts.iter().filter(|&&s| s == cut).count(),
            1,
            "{size} {fault:?}: resumed at {cut}: {starts:?}"
        );
        assert_eq!(starts.iter().filter(|&&s| s == 0).count(), 1, "{starts:?}");
        wait_indexed(&cache, 1).await;
        let again = get_nar(&cache, &store).await.unwrap();
        assert!(
            body(again).await == data,
            "{size} {fault:?}: the file differs"
        );
    }
}

/// A first part that cannot be resumed fails the download after its last try, or at once
/// when the store answers the rest wrongly; nothing is kept, and the next request reads the
/// NAR afresh.
#[tokio::test]
async fn a_first_part_that_cannot_be_resumed_fails_the_download() {
    let part = super::fill::PART;
    for (fault, tries) in [
        (RangeFault::Unavailable, super::fill::PART_ATTEMPTS - 1),
        (RangeFault::Denied, 1),
        (RangeFault::WrongRange, 1),
    ] {
        let (_d, cache, mem, store) = setup(1 << 30);
        let data: Vec<u8> = (0..3 * part).map(|i| (i / 17) as u8).collect();
        mem.insert(&format!("nar/{NAME}"), data.clone());
        mem.fault_range(0, RangeFault::CutBody, 1);
        mem.fault_range(part / 2, fault, 5);
        let e = failed_download(&cache, &store).await;
        assert!(e.to_string().contains("the store failed"), "{fault:?}: {e}");
        let starts = mem.range_starts();
        assert_eq!(
            starts.iter().filter(|&&s| s == part / 2).count(),
            tries,
            "{fault:?}: {starts:?}"
        );
        // Faults are left at part / 2; the next read starts at 0 and goes on in whole parts.
        let again = get_nar(&cache, &store).await.unwrap();
        assert!(body(again).await == data, "{fault:?}");
    }
}

/// A request that found the NAR neither in the index nor filling, because its fill ended in
/// between (indexed, then gone from the fills), is served from the file that fill wrote, not
/// from the store again.
#[tokio::test]
async fn a_fill_ended_since_the_index_was_read_is_served_from_its_file() {
    let (_d, cache, mem, store) = setup(1 << 30);
    let data: Vec<u8> = (0..3 * super::fill::PART / 2)
        .map(|i| (i / 19) as u8)
        .collect();
    mem.insert(&format!("nar/{NAME}"), data.clone());
    assert!(body(get_nar(&cache, &store).await.unwrap()).await == data);
    wait_until(&cache, || cache.fill_file_reads(NAME).is_none()).await;
    assert_eq!(cache.usage().0, 1);
    let asked = mem.requests();
    // What `get` does after it found nothing in the index.
    let (answer, counted) = cache
        .through_fill(NAME, &format!("nar/{NAME}"), None, &store)
        .await;
    assert_eq!(counted, "hit");
    assert!(body(answer.unwrap()).await == data);
    assert_eq!(
        mem.requests(),
        asked,
        "the NAR was read from the store again"
    );
}

/// A request that goes away before its fill has started leaves the fill to another request
/// waiting for it, and a request arriving after that joins the same fill: the store is read
/// once for the two that stayed.
#[tokio::test]
async fn a_request_gone_before_its_fill_started_leaves_the_fill_to_those_waiting() {
    let (_d, cache, mem, store) = setup(1 << 30);
    let data: Vec<u8> = (0..100_000u32).map(|i| (i / 23) as u8).collect();
    mem.insert(&format!("nar/{NAME}"), data.clone());
    let gate = mem.hold_reads("nar/");
    let spawn_get = |cache: &Arc<NarCache>, store: &Arc<dyn Store>| {
        let (cache, store) = (cache.clone(), store.clone());
        tokio::spawn(async move { body(get_nar(&cache, &store).await.unwrap()).await })
    };
    let first = spawn_get(&cache, &store);
    gate.reached().await; // its read of the store is held
    let second = spawn_get(&cache, &store);
    // Until the second waits on the first's fill (a bound turns a hang into a failure).
    let arrived = |n: usize| {
        let cache = cache.clone();
        let waiting = async move {
            while cache.at_fills.load(std::sync::atomic::Ordering::SeqCst) < n {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), waiting)
    };
    arrived(2)
        .await
        .expect("the second request never reached the fill");
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    gate.reached().await; // the second started the fill over: its read is held
    let third = spawn_get(&cache, &store);
    arrived(3)
        .await
        .expect("the third request never reached the fill");
    gate.open();
    assert!(second.await.unwrap() == data);
    assert!(third.await.unwrap() == data);
    assert_eq!(
        mem.requests(),
        2,
        "the first request's read, then the second's; the third joined"
    );
}

/// An empty object (broken, but there) has no first part to ask for: S3 answers that range
/// 416. It is read whole instead, and served as it is, not as a 416 to a request without a
/// range.
#[tokio::test]
async fn an_empty_object_is_read_whole() {
    let (_d, cache, mem, store) = setup(1 << 30);
    mem.insert(&format!("nar/{NAME}"), Vec::new());
    let answer = get_nar(&cache, &store).await.unwrap();
    assert!(body(answer).await.is_empty());
}

/// At most `MAX_RUNNING` large NARs are written to disk at once: fills outlive their
/// requests, so a client starting and dropping many downloads would otherwise hold as many
/// store connections and buffers. Beyond it a NAR streams from the store without a fill.
#[tokio::test]
async fn fills_are_bounded() {
    let (_d, cache, mem, store) = setup(1 << 30);
    let n = super::fill::MAX_RUNNING + 1;
    // Every first part stalls halfway: the fills keep running.
    mem.fault_range(0, RangeFault::Stall, n);
    let mut answers = Vec::new();
    for i in 0..n {
        let name = format!(
            "{}.nar",
            crate::nix::Sha256::digest(&i.to_le_bytes()).to_nix32()
        );
        mem.insert(&format!("nar/{name}"), vec![1u8; 3 << 19]);
        let f: NarFileName = name.parse().unwrap();
        let answer = cache
            .get(&f, &format!("nar/{name}"), None, None, &store)
            .await;
        assert!(
            matches!(answer, Ok(NarCacheAnswer::Object(_))),
            "NAR {i} not served"
        );
        answers.push(answer);
    }
    assert_eq!(
        cache.running.load(std::sync::atomic::Ordering::SeqCst),
        super::fill::MAX_RUNNING
    );
    assert_eq!(
        crate::sync::lock(&cache.fills).len(),
        super::fill::MAX_RUNNING,
        "the last NAR has no fill"
    );
    // A fill ahead of its request that could not start is not even asked of the store.
    let name: NarFileName = NAME.parse().unwrap();
    let key = format!("nar/{NAME}");
    mem.insert(&key, vec![1u8; 3 << 19]);
    let size = 3 << 19;
    assert_eq!(cache.prefetch(&name, &key, size, &store).await, "skipped");
    assert_eq!(mem.gets_under(&key), 0);
}

/// Prefetches start fills only while fewer than `PREFETCH_RUNNING_MAX` run: the others are
/// kept for clients' own requests, which are still filled then.
#[tokio::test]
async fn prefetches_leave_fills_to_clients() {
    use std::sync::atomic::Ordering;
    let (_d, cache, mem, store) = setup(1 << 30);
    cache
        .running
        .store(super::fill::PREFETCH_RUNNING_MAX, Ordering::SeqCst);
    let name: NarFileName = NAME.parse().unwrap();
    let key = format!("nar/{NAME}");
    let size = 3 << 19;
    mem.insert(&key, vec![1u8; size as usize]);
    assert_eq!(cache.prefetch(&name, &key, size, &store).await, "skipped");
    assert_eq!(mem.gets_under(&key), 0);
    body(cache.get(&name, &key, None, None, &store).await.unwrap()).await;
    wait_indexed(&cache, 1).await;
    assert!(cache.has(&name), "the client's request was not filled");
}

/// With every fill running, a NAR that cannot get one evicts nothing for its room on a disk
/// that is short of it: neither its prefetch nor its request (streamed without a fill).
#[tokio::test]
async fn a_nar_that_cannot_be_filled_evicts_nothing() {
    use super::index::Verified;
    let (d, cache, mem, store) = setup(u64::MAX / 2);
    let avail = cache.disk.free_bytes().unwrap();
    // Fills under way are yet to write all the disk has left: any new NAR is short of room,
    // which evicting the only NAR held (1 GiB, it says) would make.
    let old = "07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar";
    std::fs::write(d.path().join(old), b"").unwrap();
    let checksum = super::disk::Checksum::of(b"");
    cache.index().insert(old, 1 << 30, checksum, Verified::Yes);
    cache
        .reserved
        .store(avail, std::sync::atomic::Ordering::Relaxed);
    cache.running.store(
        super::fill::MAX_RUNNING,
        std::sync::atomic::Ordering::SeqCst,
    );
    let name: NarFileName = NAME.parse().unwrap();
    let key = format!("nar/{NAME}");
    let size = 3 << 19;
    mem.insert(&key, vec![1u8; size as usize]);
    assert_eq!(cache.prefetch(&name, &key, size, &store).await, "skipped");
    let got = body(cache.get(&name, &key, None, None, &store).await.unwrap()).await;
    assert_eq!(got.len() as u64, size);
    assert!(d.path().join(old).exists());
    assert_eq!(cache.usage().0, 1);
    // Once a fill is free, room is made for it.
    cache.running.store(0, std::sync::atomic::Ordering::SeqCst);
    cache.prefetch(&name, &key, size, &store).await;
    assert!(!cache.index().contains(old));
}

/// A prefetch whose fill is slow (a NAR an upstream trickles in) gives its slot back after
/// `PREFETCH_HOLD`, saying "started", and the fill goes on.
#[tokio::test(start_paused = true)]
async fn a_slow_prefetch_gives_its_slot_back_and_its_fill_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    // A part that has gone quiet is asked for again only after a fraction of this, which
    // is still far longer than the hold.
    let cache = NarCache::open_scanned(dir.path(), 1 << 30, Duration::from_secs(3600));
    let mem = Arc::new(MemoryStore::new());
    let store: Arc<dyn Store> = mem.clone();
    mem.fault_range(0, RangeFault::Stall, 1);
    let name: NarFileName = NAME.parse().unwrap();
    let key = format!("nar/{NAME}");
    // Read in parts, the first of which stalls halfway.
    let size = 3 * super::fill::PART;
    mem.insert(&key, vec![1u8; size as usize]);
    let started = tokio::time::Instant::now();
    assert_eq!(cache.prefetch(&name, &key, size, &store).await, "started");
    assert!(started.elapsed() >= super::fill::PREFETCH_HOLD);
    assert_eq!(
        cache.running.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the fill stopped"
    );
}

/// Asks `cache` for the NAR [`NAME`] with the size its narinfo gives.
async fn get_announced(
    cache: &Arc<NarCache>,
    store: &Arc<dyn Store>,
    size: u64,
) -> Result<NarCacheAnswer, crate::store::StoreError> {
    get_announced_as(cache, store, NAME, size).await
}

/// Asks `cache` for the NAR `name` with the size its narinfo gives.
async fn get_announced_as(
    cache: &Arc<NarCache>,
    store: &Arc<dyn Store>,
    name: &str,
    size: u64,
) -> Result<NarCacheAnswer, crate::store::StoreError> {
    let parsed: NarFileName = name.parse().unwrap();
    cache
        .get(&parsed, &format!("nar/{name}"), None, Some(size), store)
        .await
}

/// Reads an answer to its end: its bytes, or the error that cut it.
async fn read_out(l: NarCacheAnswer) -> std::io::Result<Vec<u8>> {
    match l {
        NarCacheAnswer::Object(o) => {
            let chunks: Vec<Bytes> = o.body.try_collect().await?;
            Ok(chunks.concat())
        }
        _ => panic!("not an object"),
    }
}

/// nix-serve and harmonia send NARs without a length: with the size from the narinfo, a NAR
/// large or small is filled all the same and then served without the store; without one it
/// is streamed as it comes and not kept.
#[tokio::test]
async fn a_nar_sent_without_a_length_is_kept_at_its_narinfos_size() {
    for len in [3_000_000usize, 5_000] {
        let (_d, cache, mem, store) = setup(1 << 30);
        mem.serve_unsized();
        let data: Vec<u8> = (0..len).map(|i| (i / 7) as u8).collect();
        mem.insert(&format!("nar/{NAME}"), data.clone());

        let unknown = get_nar(&cache, &store).await.unwrap();
        match &unknown {
            NarCacheAnswer::Object(o) => assert_eq!(o.length, None, "{len}"),
            _ => panic!("{len}: not served"),
        }
        assert!(body(unknown).await == data, "{len}");

        let answer = get_announced(&cache, &store, len as u64).await.unwrap();
        match &answer {
            NarCacheAnswer::Object(o) => assert_eq!(o.length, Some(len as u64), "{len}"),
            _ => panic!("{len}: not served"),
        }
        assert!(body(answer).await == data, "{len}");
        wait_indexed(&cache, 1).await;
        let asked = mem.requests();
        let hit = get_announced(&cache, &store, len as u64).await.unwrap();
        assert!(body(hit).await == data, "{len}");
        assert_eq!(mem.requests(), asked, "{len}: not served from disk");
    }
}

/// A NAR sent without a length that does not end at its narinfo's size fails its readers
/// (they were promised that length) and is not kept; one sent with a length other than its
/// narinfo's is a store error (a 502) if it is named after its bytes (it is broken: truncated,
/// foreign), and served as sent if it is named after its store path (rebuilt); neither kept.
#[tokio::test]
async fn a_nar_of_another_size_than_its_narinfos_is_not_kept() {
    for len in [3_000_000usize, 5_000] {
        for wrong in [len as u64 - 1, len as u64 + 1] {
            let (_d, cache, mem, store) = setup(1 << 30);
            mem.serve_unsized();
            let data = vec![9u8; len];
            mem.insert(&format!("nar/{NAME}"), data.clone());
            match get_announced(&cache, &store, wrong).await {
                Ok(answer) => {
                    let got = read_out(answer).await;
                    assert!(
                        got.is_err(),
                        "{len}/{wrong}: a body of the wrong size ended well"
                    );
                }
                Err(e) => assert!(e.to_string().contains("body"), "{len}/{wrong}: {e}"),
            }
            wait_until(&cache, || crate::sync::lock(&cache.fills).is_empty()).await;
            assert_eq!(cache.usage().0, 0, "{len}/{wrong}: kept");
        }

        let by_path = "6bxnj2gfflqa529lddzh3zhcn45nn86r.nar";
        for name in [NAME, by_path] {
            let (_d, cache, mem, store) = setup(1 << 30);
            let data = vec![8u8; len];
            mem.insert(&format!("nar/{name}"), data.clone());
            let got = get_announced_as(&cache, &store, name, len as u64 + 1).await;
            if name == NAME {
                let e = got.err().expect("a broken NAR served");
                assert!(e.to_string().contains("FileSize says"), "{len}: {e}");
                assert_eq!(
                    crate::error::Error::from(e).status(),
                    axum::http::StatusCode::BAD_GATEWAY
                );
            } else {
                assert!(read_out(got.unwrap()).await.unwrap() == data, "{len}");
            }
            wait_until(&cache, || crate::sync::lock(&cache.fills).is_empty()).await;
            assert_eq!(cache.usage().0, 0, "{len}: kept");
        }
    }
}

/// A NAR named after its store path (as attic and old nix-serve name them) changes when the
/// upstream rebuilds the path: once its narinfo gives another size, the file on disk is
/// dropped and the new NAR fetched, for the streaming path and for memory's loads alike.
#[tokio::test]
async fn a_file_its_narinfo_now_gives_another_size_is_fetched_again() {
    let (_d, cache, mem, store) = setup(1 << 30);
    let old = vec![1u8; 3_000_000];
    mem.insert(&format!("nar/{NAME}"), old.clone());
    assert!(body(get_announced(&cache, &store, 3_000_000).await.unwrap()).await == old);
    wait_indexed(&cache, 1).await;

    let name: NarFileName = NAME.parse().unwrap();
    assert!(cache.held(&name, Some(3_000_000)).await.unwrap().is_some());
    assert!(
        cache.held(&name, Some(2_000_000)).await.unwrap().is_none(),
        "memory loaded a file of another size"
    );
    assert_eq!(cache.usage().0, 0, "the file is still indexed");

    assert!(body(get_announced(&cache, &store, 3_000_000).await.unwrap()).await == old);
    wait_indexed(&cache, 1).await;
    let new = vec![2u8; 2_000_000];
    mem.insert(&format!("nar/{NAME}"), new.clone());
    assert!(body(get_announced(&cache, &store, 2_000_000).await.unwrap()).await == new);
    wait_until(&cache, || cache.usage() == (1, footprint(2_000_000))).await;
}

/// A request whose narinfo gives another size than the fill running for that name (of the
/// NAR it replaced) does not join that fill: the caller asks the store.
#[tokio::test]
async fn a_fill_of_another_size_than_the_narinfo_is_not_joined() {
    let (_d, cache, mem, store) = setup(1 << 30);
    let len = 3 * super::fill::PART / 2;
    mem.insert(&format!("nar/{NAME}"), vec![1u8; len as usize]);
    // The second part stalls: the fill keeps running.
    mem.fault_range(super::fill::PART, RangeFault::Stall, usize::MAX);
    let first = get_announced(&cache, &store, len).await.unwrap();
    assert!(matches!(first, NarCacheAnswer::Object(_)));
    assert!(crate::sync::lock(&cache.fills).contains_key(NAME));
    let other = get_announced(&cache, &store, len - 1).await.unwrap();
    assert!(matches!(other, NarCacheAnswer::Bypass), "joined the fill");
    let same = get_announced(&cache, &store, len).await.unwrap();
    assert!(matches!(same, NarCacheAnswer::Object(_)));
}

/// A miss served through a fill counts as a `miss`; one streamed from the store uncached
/// (too large for the budget) as a `bypass`: the `miss` count is what was fetched into the
/// cache.
#[tokio::test]
async fn a_miss_that_is_not_kept_counts_as_a_bypass() {
    let (_d, cache, mem, store) = setup(16 << 20);
    mem.insert(&format!("nar/{NAME}"), vec![3u8; 4 << 20]);
    let (answer, counted) = cache
        .through_fill(NAME, &format!("nar/{NAME}"), None, &store)
        .await;
    assert_eq!(counted, "miss");
    drop(answer.unwrap());
    let big = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s.nar";
    mem.insert(&format!("nar/{big}"), vec![1u8; 40 << 20]);
    for announced in [Some(40 << 20), None] {
        let (answer, counted) = cache
            .through_fill(big, &format!("nar/{big}"), announced, &store)
            .await;
        assert!(matches!(answer, Ok(NarCacheAnswer::Object(_))));
        assert_eq!(counted, "bypass", "{announced:?}");
    }
}

/// NARs served without a fill (too large for the budget) hold none of the part buffers the
/// fills share: two clients that never read them (a paused laptop) do not stall the fill of
/// another NAR until it times out. Whether their size was announced or not.
#[tokio::test(start_paused = true)]
async fn nars_served_without_a_fill_hold_no_part_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let cache = NarCache::open_scanned(dir.path(), 16 << 20, Duration::from_secs(2));
    let mem = Arc::new(MemoryStore::new());
    let store: Arc<dyn Store> = mem.clone();
    let big_name = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s.nar";
    let big: NarFileName = big_name.parse().unwrap();
    let big_key = format!("nar/{big_name}");
    mem.insert(&big_key, vec![1u8; 40 << 20]);
    let mut unread = Vec::new();
    for announced in [Some(40 << 20), None, None, None, None, None] {
        let (gets, ranged) = (mem.gets_under("nar/"), mem.range_starts().len());
        let answer = cache
            .get(&big, &big_key, None, announced, &store)
            .await
            .unwrap();
        assert!(matches!(answer, NarCacheAnswer::Object(_)), "{announced:?}");
        unread.push(answer);
        if announced.is_some() {
            // Known too large from its narinfo: one plain GET, not a first part first.
            assert_eq!(mem.gets_under("nar/"), gets + 1);
            assert_eq!(mem.range_starts().len(), ranged);
        }
    }
    let data = vec![2u8; 6 << 20];
    mem.insert(&format!("nar/{NAME}"), data.clone());
    let got = read_out(get_nar(&cache, &store).await.unwrap())
        .await
        .unwrap();
    assert!(got == data, "the fill stalled");
    drop(unread);
}
