//! An in-memory store for unit tests of the layers above the store. Counts requests and can be
//! switched into failure, so tests can check what reaches the store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt as _;

use super::{ByteRange, ContentRange, Object, ObjectWriter, Store, StoreError};
use crate::sync::lock;

#[derive(Default)]
pub struct MemoryStore {
    // A std Mutex: held only for map operations, never across an await.
    objects: Arc<Mutex<HashMap<String, Bytes>>>,
    gets: AtomicUsize,
    down: AtomicBool,
    latency_ms: AtomicUsize,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&self, key: &str, data: impl Into<Bytes>) {
        lock(&self.objects).insert(key.to_owned(), data.into());
    }

    /// Number of `get` and `head` calls so far.
    pub fn requests(&self) -> usize {
        self.gets.load(Ordering::SeqCst)
    }

    /// Makes every `get` and `head` take this long (to let concurrent requests pile up).
    pub fn set_latency(&self, d: std::time::Duration) {
        self.latency_ms
            .store(d.as_millis() as usize, Ordering::SeqCst);
    }

    async fn delay(&self) {
        let ms = self.latency_ms.load(Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(ms as u64)).await;
        }
    }

    /// While down, every call fails as an unreachable store would.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn lookup(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("memory store is down".into()));
        }
        Ok(lock(&self.objects).get(key).cloned())
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &str, range: Option<ByteRange>) -> Result<Option<Object>, StoreError> {
        self.delay().await;
        let Some(data) = self.lookup(key)? else {
            return Ok(None);
        };
        let size = data.len() as u64;
        let (data, content_range) = match range {
            None => (data, None),
            Some(r) => {
                let (s, e) = r
                    .resolve(size)
                    .ok_or(StoreError::RangeNotSatisfiable { size })?;
                (
                    data.slice(s as usize..=e as usize),
                    Some(ContentRange {
                        start: s,
                        end: e,
                        total: size,
                    }),
                )
            }
        };
        Ok(Some(Object {
            length: data.len() as u64,
            body: futures::stream::once(async move { Ok(data) }).boxed(),
            range: content_range,
        }))
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.delay().await;
        Ok(self.lookup(key)?.map(|d| d.len() as u64))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("memory store is down".into()));
        }
        Ok(())
    }

    async fn writer(&self, key: &str) -> Result<Box<dyn ObjectWriter>, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("memory store is down".into()));
        }
        Ok(Box::new(MemoryWriter {
            objects: self.objects.clone(),
            key: key.to_owned(),
            buf: Vec::new(),
        }))
    }

    async fn cleanup_staging(&self, _older_than: std::time::Duration) -> Result<usize, StoreError> {
        Ok(0)
    }

    fn describe(&self) -> String {
        "memory://".into()
    }
}

struct MemoryWriter {
    objects: Arc<Mutex<HashMap<String, Bytes>>>,
    key: String,
    buf: Vec<u8>,
}

#[async_trait]
impl ObjectWriter for MemoryWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        self.buf.extend_from_slice(&chunk);
        Ok(())
    }
    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        let this = *self;
        lock(&this.objects).insert(this.key, Bytes::from(this.buf));
        Ok(())
    }
    async fn abort(self: Box<Self>) {}
}
