//! The NAR cache through its public API, against an in-memory store.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt as _;

use super::{NarCache, NarCacheAnswer};
use crate::nix::NarFileName;
use crate::store::memory::MemoryStore;
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
    let cache = NarCache::open(dir.path(), max, Duration::from_secs(30)).unwrap();
    let mem = Arc::new(MemoryStore::new());
    let store: Arc<dyn Store> = mem.clone();
    (dir, cache, mem, store)
}

async fn wait_indexed(cache: &NarCache, n: usize) {
    for _ in 0..200 {
        if cache.usage().0 == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("cache never held {n} NARs");
}

#[tokio::test]
async fn fills_then_hits_without_the_store() {
    let (_d, cache, mem, store) = setup(1 << 30);
    let data = vec![42u8; 3_000_000];
    mem.insert(&format!("nar/{NAME}"), data.clone());
    let name: NarFileName = NAME.parse().unwrap();
    let key = format!("nar/{NAME}");
    assert_eq!(
        body(cache.get(&name, &key, None, &store).await.unwrap()).await,
        data
    );
    wait_indexed(&cache, 1).await;
    let before = mem.requests();
    assert_eq!(
        body(cache.get(&name, &key, None, &store).await.unwrap()).await,
        data
    );
    let r = Some(ByteRange::From {
        start: 10,
        end: Some(19),
    });
    match cache.get(&name, &key, r, &store).await.unwrap() {
        NarCacheAnswer::Object(o) => {
            assert_eq!(o.range.unwrap().total, data.len() as u64);
            assert_eq!(concat(o.body).await.len(), 10);
        }
        _ => panic!("range not served from disk"),
    }
    assert_eq!(mem.requests(), before, "hits must not touch the store");
}

#[tokio::test]
async fn eviction_keeps_the_budget() {
    let (_d, cache, mem, store) = setup(2500);
    let names = [
        "07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar",
        "17yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar",
        "27yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar",
    ];
    for (i, n) in names.iter().enumerate() {
        mem.insert(&format!("nar/{n}"), vec![i as u8; 1000]);
        let name: NarFileName = n.parse().unwrap();
        body(
            cache
                .get(&name, &format!("nar/{n}"), None, &store)
                .await
                .unwrap(),
        )
        .await;
        wait_indexed(&cache, (i + 1).min(2)).await;
    }
    // The last fill indexes its NAR and evicts in the background: wait for that.
    for _ in 0..200 {
        if _d.path().join(names[2]).exists() && !_d.path().join(names[0]).exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (count, bytes) = cache.usage();
    assert_eq!((count, bytes), (2, 2000));
    assert!(
        !_d.path().join(names[0]).exists(),
        "the least recently used went"
    );
    assert!(_d.path().join(names[2]).exists());
}

#[tokio::test]
async fn restart_rebuilds_and_drops_corrupt_files() {
    let (d, cache, mem, store) = setup(1 << 30);
    let data = vec![7u8; 100_000];
    mem.insert(&format!("nar/{NAME}"), data.clone());
    let name: NarFileName = NAME.parse().unwrap();
    let key = format!("nar/{NAME}");
    body(cache.get(&name, &key, None, &store).await.unwrap()).await;
    wait_indexed(&cache, 1).await;
    drop(cache);

    // Same size, different bytes: only hashing can tell.
    let mut bytes = std::fs::read(d.path().join(NAME)).unwrap();
    bytes[500] ^= 1;
    std::fs::write(d.path().join(NAME), bytes).unwrap();
    let cache = NarCache::open(d.path(), 1 << 30, Duration::from_secs(30)).unwrap();
    assert_eq!(cache.usage().0, 1);
    // First hit: not yet verified, so the store serves it while the file is checked.
    assert!(matches!(
        cache.get(&name, &key, None, &store).await.unwrap(),
        NarCacheAnswer::Bypass
    ));
    wait_indexed(&cache, 0).await;
    // Then it is fetched again, intact.
    assert_eq!(
        body(cache.get(&name, &key, None, &store).await.unwrap()).await,
        data
    );
    wait_indexed(&cache, 1).await;
    assert_eq!(std::fs::read(d.path().join(NAME)).unwrap(), data);

    // A truncated file is removed at start.
    drop(cache);
    std::fs::write(d.path().join(NAME), b"short").unwrap();
    let cache = NarCache::open(d.path(), 1 << 30, Duration::from_secs(30)).unwrap();
    assert_eq!(cache.usage().0, 0);
    assert!(!d.path().join(NAME).exists());
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
            tokio::spawn(
                async move { body(cache.get(&name, &key, None, &store).await.unwrap()).await },
            )
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), data);
    }
    assert_eq!(mem.requests(), 1);
}

#[tokio::test]
async fn too_large_nars_pass_through_with_one_store_get() {
    let (_d, cache, mem, store) = setup(1000);
    let data = vec![9u8; 800];
    mem.insert(&format!("nar/{NAME}"), data.clone());
    let name: NarFileName = NAME.parse().unwrap();
    let key = format!("nar/{NAME}");
    assert_eq!(
        body(cache.get(&name, &key, None, &store).await.unwrap()).await,
        data
    );
    assert_eq!(mem.requests(), 1);
    assert_eq!(cache.usage().0, 0);
}

#[tokio::test]
async fn missing_nars_are_not_cached() {
    let (_d, cache, mem, store) = setup(1 << 30);
    let name: NarFileName = NAME.parse().unwrap();
    let key = format!("nar/{NAME}");
    assert!(matches!(
        cache.get(&name, &key, None, &store).await.unwrap(),
        NarCacheAnswer::NotFound
    ));
    mem.insert(&key, vec![1u8; 10]);
    assert_eq!(
        body(cache.get(&name, &key, None, &store).await.unwrap()).await,
        vec![1u8; 10]
    );
}
