//! A local directory laid out as `nix copy --to file://DIR` writes it.

use std::io::{self, SeekFrom};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use futures::StreamExt as _;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tokio_util::io::ReaderStream;

use super::{ByteRange, ContentRange, Object, Store, StoreError};

/// Read buffer for streaming files: small buffers cap throughput far below the disk's.
const READ_BUFFER: usize = 256 * 1024;

pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// Opens (creating if needed) the directory `root`.
    pub fn open(root: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(root)?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }
}

fn not_found(e: &io::Error) -> bool {
    // ENOTDIR: a path component is a file; the object cannot exist either.
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(20)
}

#[async_trait]
impl Store for LocalStore {
    async fn get(&self, key: &str, range: Option<ByteRange>) -> Result<Option<Object>, StoreError> {
        let path = self.path(key);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(StoreError::Other(format!("{}: {e}", path.display()))),
        };
        let meta = file.metadata().await?;
        if !meta.is_file() {
            return Ok(None);
        }
        let size = meta.len();
        let (length, content_range) = match range {
            None => (size, None),
            Some(r) => {
                let (start, end) = r
                    .resolve(size)
                    .ok_or(StoreError::RangeNotSatisfiable { size })?;
                file.seek(SeekFrom::Start(start)).await?;
                (
                    end - start + 1,
                    Some(ContentRange {
                        start,
                        end,
                        total: size,
                    }),
                )
            }
        };
        let body = ReaderStream::with_capacity(file.take(length), READ_BUFFER);
        Ok(Some(Object {
            body: body.boxed(),
            length,
            range: content_range,
        }))
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match tokio::fs::metadata(self.path(key)).await {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let m = tokio::fs::metadata(&self.root)
            .await
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", self.root.display())))?;
        if m.is_dir() {
            Ok(())
        } else {
            Err(StoreError::Unavailable(format!(
                "{} is not a directory",
                self.root.display()
            )))
        }
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }
}
