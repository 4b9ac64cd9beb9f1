//! A local directory laid out as `nix copy --to file://DIR` writes it.

use std::io::{self, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt as _;

use super::{
    ByteRange, ContentRange, Object, ObjectInfo, ObjectList, ObjectWriter, Store, StoreError,
};
use bytes::Bytes;
use tokio::io::AsyncWriteExt as _;

/// Where writers keep their files until they commit; not part of the cache layout, so never
/// served (every served name is validated).
pub(crate) const STAGING: &str = ".staging";

/// The end of the name of a copy made beside its destination when that is on another file
/// system than the staging directory (`.<staged name>.cellar-tmp`): not an object until it
/// is renamed, so never listed, and removed with the staged files when left behind.
const COPY_SUFFIX: &str = ".cellar-tmp";

/// The top-level directories objects live in: where a cross-device commit may copy into (see
/// [`COPY_SUFFIX`]), and the layout a listing follows links into ([`in_layout`]).
pub(crate) const OBJECT_DIRS: [&str; 7] = [
    "nar",
    "log",
    "debuginfo",
    "realisations",
    "build-trace",
    "build-trace-v2",
    "_cellar",
];

/// A directory at the store's root (on the root's own file system) that remembers which parts
/// of the layout were found on a file system of their own, mounted there: an empty file
/// named after each ([`note_mounted`], [`not_mounted_now`]). Not part of the layout: never
/// listed.
const MOUNTED: &str = ".cellar-mounted";

/// The owner given to what this process creates in the store: the store directory's, when
/// this process runs as root and the directory belongs to another user (`cellar pin`,
/// `gc --apply`, `verify --repair` or `import` run with sudo on a store the server's user
/// owns). Root's files and directories there are ones the server cannot replace or delete
/// in: its uploads, access records and pins would fail from then on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Owner {
    uid: u32,
    gid: u32,
}

impl Owner {
    /// The owner to give what is created under `root`, if any (see [`Owner`]).
    fn of_store(root: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let me = rustix::process::geteuid();
        let dir = std::fs::metadata(root).ok()?;
        (me.is_root() && dir.uid() != 0).then(|| Self {
            uid: dir.uid(),
            gid: dir.gid(),
        })
    }
}

/// If this process cannot write in the store at `root` (its directory, or one of those
/// cellar writes into: `.staging/`, the layout's, the pins' and the access records'), the
/// warning saying which, whose they are, and what fails: a store made by `nix copy --to
/// file://` run as root, served by another user, failed every upload with "permission
/// denied" (and Nix's retries for minutes) with nothing said at start (homelab walk).
pub fn unwritable(root: &Path) -> Option<String> {
    use rustix::fs::{Access, AtFlags};
    use std::os::unix::fs::MetadataExt as _;
    if !root.is_dir() {
        // Not there (or not to be seen): whether it can be made, in the nearest directory
        // above that is there.
        let above = root
            .ancestors()
            .skip(1)
            .map(|a| {
                if a.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    a
                }
            })
            .find(|a| a.is_dir())?;
        let wx = Access::WRITE_OK | Access::EXEC_OK;
        let errno = rustix::fs::accessat(rustix::fs::CWD, above, wx, AtFlags::EACCESS).err()?;
        return Some(format!(
            "this process (uid {}) cannot make the store's directory {} in {} ({errno}): \
             `cellar serve` will fail to start",
            rustix::process::geteuid().as_raw(),
            root.display(),
            above.display()
        ));
    }
    if let Some(why) = unreadable(root) {
        return Some(format!("{why}: every request fails"));
    }
    let mut dirs = vec![root.to_path_buf(), root.join(STAGING)];
    dirs.extend(OBJECT_DIRS.iter().map(|d| root.join(d)));
    for sub in ["_cellar/pins", "_cellar/access"] {
        dirs.push(root.join(sub));
    }
    if let Ok(days) = std::fs::read_dir(root.join("_cellar/access")) {
        dirs.extend(days.flatten().map(|d| d.path()));
    }
    // Asked of the kernel for this process's effective user (no file made, which a
    // listing running meanwhile would see): also says a read-only file system.
    let refused: Vec<(PathBuf, u32, rustix::io::Errno)> = dirs
        .into_iter()
        .filter_map(|d| {
            let m = std::fs::metadata(&d).ok().filter(|m| m.is_dir())?;
            let wx = Access::WRITE_OK | Access::EXEC_OK;
            rustix::fs::accessat(rustix::fs::CWD, &d, wx, AtFlags::EACCESS)
                .err()
                .map(|e| (d, m.uid(), e))
        })
        .collect();
    let (first, owner, errno) = refused.first()?;
    let (more, are) = match refused.len() {
        1 => (String::new(), "is"),
        n => (
            format!(" and {} more of the store's directories", n - 1),
            "are",
        ),
    };
    if *errno == rustix::io::Errno::ROFS {
        return Some(format!(
            "{}{more} {are} on a read-only file system here: uploads, access records and pins \
             written there fail (under systemd with ProtectSystem=strict, list the store in \
             ReadWritePaths=; a store served read-only on purpose can ignore this)",
            first.display()
        ));
    }
    let me = rustix::process::geteuid().as_raw();
    Some(format!(
        "this process (uid {me}) cannot write in {}{more} (owned by uid {owner}: {errno}): \
         uploads, access records and pins written there fail; give the store to the user \
         cellar runs as (`chown -R`), or run cellar as its owner",
        first.display(),
    ))
}

/// If this process cannot read the store's directory `root` (nor enter it), the error saying
/// so, whose it is: every request would fail, while the directory itself is there (re-check
/// walk: `/readyz` said ready).
fn unreadable(root: &Path) -> Option<String> {
    use rustix::fs::{Access, AtFlags};
    use std::os::unix::fs::MetadataExt as _;
    let rx = Access::READ_OK | Access::EXEC_OK;
    let errno = rustix::fs::accessat(rustix::fs::CWD, root, rx, AtFlags::EACCESS).err()?;
    let owner = std::fs::metadata(root).map_or_else(|_| "?".to_owned(), |m| m.uid().to_string());
    Some(format!(
        "this process (uid {}) cannot read the store's directory {} (owned by uid {owner}: \
         {errno})",
        rustix::process::geteuid().as_raw(),
        root.display()
    ))
}

/// Gives `path`, a directory (or copy) just created by this process, to `owner` (see
/// [`Owner`]). Not through a link: the store's owner could have put one in its place, and
/// had root give it whatever the link leads to (review). A failure (a file system that
/// refuses root's `chown`) leaves it as it is, and is logged once: the write itself
/// succeeded.
fn give(path: &Path, owner: Option<Owner>) {
    if let Some(o) = owner {
        gave(
            path,
            o,
            std::os::unix::fs::lchown(path, Some(o.uid), Some(o.gid)),
        );
    }
}

/// [`give`] for a file this process holds open: by its handle.
fn give_open(path: &Path, file: &std::fs::File, owner: Option<Owner>) {
    if let Some(o) = owner {
        gave(
            path,
            o,
            std::os::unix::fs::fchown(file, Some(o.uid), Some(o.gid)),
        );
    }
}

fn gave(path: &Path, o: Owner, r: io::Result<()>) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if let Err(e) = r {
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                path = %path.display(),
                uid = o.uid,
                cause = %e,
                "could not give what this process creates in the store to the store \
                 directory's owner (said once): run this command as that user"
            );
        }
    }
}

/// The inode of the directory `p` (through links).
fn inode(p: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(p).ok().map(|m| m.ino())
}

/// The device of the file system `p` is on (through links).
fn device(p: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(p).ok().map(|m| m.dev())
}

/// Whether `dir` is where a file system is mounted, as `/proc/self/mountinfo` says (a btrfs
/// subvolume has a device of its own without being one).
fn is_mount_point(dir: &Path) -> bool {
    let (Ok(dir), Ok(table)) = (
        std::fs::canonicalize(dir),
        std::fs::read_to_string("/proc/self/mountinfo"),
    ) else {
        return false;
    };
    table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|at| Path::new(&unescape_mount_point(at)) == dir)
}

/// A mount point as `/proc/self/mountinfo` writes it: space, tab, newline and backslash as
/// `\\ooo` octal escapes.
fn unescape_mount_point(at: &str) -> String {
    let mut out = String::with_capacity(at.len());
    let mut rest = at;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Notes each part of the layout where a file system of its own is mounted at the store's
/// root (not through a link; `mounted` says, on another device than the root, `device` says)
/// in [`MOUNTED`], with the root's device, so that once it is not mounted its objects are not
/// taken for missing ([`not_mounted_now`]).
fn note_mounted(
    root: &Path,
    device: impl Fn(&Path) -> Option<u64>,
    mounted: impl Fn(&Path) -> bool,
    owner: Option<Owner>,
) {
    let Some(root_device) = device(root) else {
        return;
    };
    for part in OBJECT_DIRS {
        let dir = root.join(part);
        let is_link = std::fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_symlink());
        let apart = !is_link && device(&dir).is_some_and(|d| d != root_device);
        let mark = root.join(MOUNTED).join(part);
        if !apart || mark.exists() || !mounted(&dir) {
            continue;
        }
        // With the root directory's inode: a copy of the store (a backup restored elsewhere on
        // the same file system) does not take the note for its own; the store renamed, or
        // seen through a bind mount (a container), still does.
        let inode = inode(root).unwrap_or_default();
        // Whole or not at all (written aside, then renamed): a note cut short by a crash
        // would name another device, and be ignored.
        let aside = root.join(MOUNTED).join(format!(".{part}.tmp"));
        let noted = create_dirs_durably(&root.join(MOUNTED), owner)
            .and_then(|()| std::fs::write(&aside, format!("{root_device}\n{inode}\n")))
            .and_then(|()| {
                give(&aside, owner);
                std::fs::File::open(&aside)?.sync_all()?;
                std::fs::rename(&aside, &mark)?;
                sync_dir(&root.join(MOUNTED))
            });
        match noted {
            Ok(()) => tracing::info!(
                dir = %dir.display(),
                noted = %mark.display(),
                "a file system of its own is mounted at this part of the store: noted, so that \
                 its objects are not taken for missing while it is not mounted"
            ),
            Err(e) => tracing::warn!(
                dir = %dir.display(),
                cause = %e,
                "a file system of its own is mounted at this part of the store, and noting it \
                 failed: while it is not mounted, its objects will look missing"
            ),
        }
    }
}

/// If the part of the layout `part` was found mounted ([`note_mounted`]) and is on the root's
/// file system now (or gone), the error saying so.
fn not_mounted_now(root: &Path, part: &str) -> Option<StoreError> {
    let mark = root.join(MOUNTED).join(part);
    let noted = std::fs::read_to_string(&mark).ok()?;
    let mut lines = noted.lines();
    let root_device = device(root);
    // A note written on another file system than the root's now, or for another root
    // directory (the store copied elsewhere with it), is not this store's. (Notes of earlier
    // versions name no inode.)
    if lines
        .next()
        .unwrap_or_default()
        .trim()
        .parse::<u64>()
        .is_ok_and(|d| Some(d) != root_device)
    {
        return None;
    }
    if let Some(noted_root) = lines.next().and_then(|l| l.trim().parse::<u64>().ok()) {
        if inode(root).is_some_and(|i| i != noted_root) {
            return None;
        }
    }
    let dir = root.join(part);
    let here = device(&dir);
    if here.is_some() && here != root_device {
        return None;
    }
    Some(StoreError::Unavailable(format!(
        "{}: on the store's own file system, where one of its own was mounted (not mounted?); \
         if its objects were moved there for good, remove {}",
        dir.display(),
        mark.display()
    )))
}

/// If `key` lies in a part of the layout that is a link to a directory not there (a disk not
/// mounted), or a mount point with nothing mounted ([`not_mounted_now`]), the error saying so:
/// an object looked up there is not missing, it cannot be seen, and callers that take
/// "absent" at its word would delete what refers to it (an upload takes back its narinfo,
/// `verify --repair` deletes narinfos). Asked only after a miss.
fn unmounted(root: &Path, key: &str) -> Option<StoreError> {
    let (top, _) = key.split_once('/')?;
    let link = root.join(top);
    let is_link = std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink());
    if !is_link {
        return not_mounted_now(root, top);
    }
    match std::fs::metadata(&link) {
        Ok(_) => None,
        Err(e) => Some(StoreError::Unavailable(format!(
            "{}: {e} (a link to a file system not mounted?)",
            link.display()
        ))),
    }
}

/// A miss of `key`: `None`, unless the store's directory is gone or the part of the layout
/// it lies in is not mounted.
fn absent<T>(root: &Path, key: &str) -> Result<Option<T>, StoreError> {
    match root_gone(root).or_else(|| unmounted(root, key)) {
        Some(e) => Err(e),
        None => Ok(None),
    }
}

/// If the store's directory itself is not there (moved or deleted while the server runs, a
/// file system not mounted), the error saying so: what it held is not missing, and a write
/// must not create an empty store in its place.
fn root_gone(root: &Path) -> Option<StoreError> {
    match std::fs::metadata(root) {
        Ok(m) if m.is_dir() => None,
        Ok(_) => Some(StoreError::Unavailable(format!(
            "{}: the store's directory is not a directory",
            root.display()
        ))),
        Err(e) => Some(StoreError::Unavailable(format!(
            "{}: the store's directory is gone ({e}): moved, deleted or not mounted?",
            root.display()
        ))),
    }
}

/// Whether the staged file at `path` is locked by the writer writing it (in this process or
/// another).
fn being_written(path: &Path) -> bool {
    // Opened for writing: NFS takes an exclusive lock only on such a file.
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .or_else(|_| std::fs::File::open(path))
        .is_ok_and(|f| matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)))
}

/// Whether `name` is a commit's copy beside its destination.
fn is_copy_beside(name: &std::ffi::OsStr) -> bool {
    name.to_str()
        .is_some_and(|n| n.starts_with('.') && n.ends_with(COPY_SUFFIX))
}

/// Read buffer for streaming files: small buffers cap throughput far below the disk's.
const READ_BUFFER: usize = 1024 * 1024;

/// The next `length` bytes of `file`, read [`READ_BUFFER`] at a time on the blocking pool
/// from the body's first poll on, each read started as soon as the chunk before it is handed
/// on: the file is read while the reader sends the chunk before (a socket write of a megabyte
/// takes longer than reading it from the page cache), where a `tokio::fs::File` reads only
/// when asked, and copies each chunk once more. One read at a time per body, so a slow reader
/// holds no thread between chunks. Ends early (no error) if the file does:
/// [`super::byte_slice`] turns that into one.
fn read_ahead(file: std::fs::File, length: u64) -> super::ByteStream {
    use std::io::Read as _;
    type Reading = tokio::task::JoinHandle<io::Result<(std::fs::File, Bytes)>>;
    enum Next {
        Open(std::fs::File),
        Reading(Reading),
        Done,
    }
    fn read(file: std::fs::File, left: u64) -> Next {
        let want = left.min(READ_BUFFER as u64);
        Next::Reading(tokio::task::spawn_blocking(move || {
            let mut buf = Vec::with_capacity(want as usize);
            let mut file = file;
            (&mut file).take(want).read_to_end(&mut buf)?;
            Ok((file, Bytes::from(buf)))
        }))
    }
    futures::stream::unfold((Next::Open(file), length), |(next, left)| async move {
        let next = match next {
            Next::Open(file) => read(file, left),
            next => next,
        };
        let Next::Reading(reading) = next else {
            return None;
        };
        let (file, chunk) = match reading.await {
            Ok(Ok(read)) => read,
            Ok(Err(e)) => return Some((Err(e), (Next::Done, 0))),
            Err(e) => return Some((Err(io::Error::other(e)), (Next::Done, 0))),
        };
        if chunk.is_empty() {
            return None;
        }
        let left = left.saturating_sub(chunk.len() as u64);
        let next = match left {
            0 => Next::Done,
            _ => read(file, left),
        };
        Some((Ok(chunk), (next, left)))
    })
    .boxed()
}

/// Reads of at most this many bytes are done whole, in one call on the blocking pool (open,
/// stat and read together); larger ones are streamed. Each hop to the blocking pool and back
/// costs tens of microseconds, which a small NAR served from a file would pay four times.
const WHOLE_READ_MAX: u64 = 256 << 10;

/// A file opened for a read: read whole already, or to be streamed (`length` bytes from its
/// current position).
enum Opened {
    Read(Bytes, Option<ContentRange>),
    File(std::fs::File, u64, Option<ContentRange>),
}

/// The regular file at `path`, open, and its size: `None` if there is none.
fn open_file(path: &Path) -> Result<Option<(std::fs::File, u64)>, StoreError> {
    // Looked at before it is opened: opening a FIFO (or a device) named like an object
    // would block a thread of the pool until something writes to it, and the process could
    // not exit. Not an object, but not nothing either: a broken store.
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() && !m.is_dir() => {
            return Err(StoreError::Other(format!(
                "{}: not a regular file ({:?})",
                path.display(),
                m.file_type()
            )))
        }
        Ok(_) => {}
        Err(e) if not_found(&e) => return Ok(None),
        Err(e) => return Err(StoreError::Other(format!("{}: {e}", path.display()))),
    }
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if not_found(&e) => return Ok(None),
        Err(e) => return Err(StoreError::Other(format!("{}: {e}", path.display()))),
    };
    let meta = file.metadata()?;
    Ok(meta.is_file().then_some((file, meta.len())))
}

/// Opens `path` for a read of `range` (all of it if `None`): `None` if there is no such file.
fn open_for_read(path: &Path, range: Option<ByteRange>) -> Result<Option<Opened>, StoreError> {
    use std::io::{Read as _, Seek as _};
    let Some((mut file, size)) = open_file(path)? else {
        return Ok(None);
    };
    let (start, length, content_range) = match range {
        None => (0, size, None),
        Some(r) => {
            let (start, end) = r
                .resolve(size)
                .ok_or(StoreError::RangeNotSatisfiable { size })?;
            let content_range = ContentRange {
                start,
                end,
                total: size,
            };
            (start, end - start + 1, Some(content_range))
        }
    };
    file.seek(SeekFrom::Start(start))?;
    if length > WHOLE_READ_MAX {
        return Ok(Some(Opened::File(file, length, content_range)));
    }
    let mut buf = Vec::with_capacity(length as usize);
    file.take(length).read_to_end(&mut buf)?;
    if buf.len() as u64 != length {
        return Err(StoreError::Other(format!(
            "{}: {} bytes read of {length} (the file shrank while read)",
            path.display(),
            buf.len()
        )));
    }
    Ok(Some(Opened::Read(Bytes::from(buf), content_range)))
}

pub struct LocalStore {
    root: PathBuf,
    /// The staged files of writers neither committed nor aborted yet
    /// ([`Store::remove_unfinished`]).
    open: Arc<std::sync::Mutex<std::collections::HashSet<PathBuf>>>,
    /// Who what this process creates here is given to, if not itself ([`Owner`]).
    owner: Option<Owner>,
}

impl LocalStore {
    /// Opens (creating if needed) the directory `root`.
    pub fn open(root: &Path) -> io::Result<Self> {
        create_dirs_durably(root, None)
            .map_err(|e| io::Error::new(e.kind(), format!("{e}{}", leads_nowhere(root))))?;
        let owner = Owner::of_store(root);
        note_mounted(root, device, is_mount_point, owner);
        if let Some(why) = unwritable(root) {
            tracing::warn!("{why}");
        }
        Ok(Self {
            root: root.to_path_buf(),
            open: Arc::default(),
            owner,
        })
    }

    /// Opens the directory `root`, which must exist: for the commands that look after a store
    /// (`gc`, `verify`, `pin`), which would otherwise report on an empty one made for them,
    /// say when run from another directory than the server's with a relative `store.path`.
    pub fn open_existing(root: &Path) -> io::Result<Self> {
        if !root.is_dir() {
            let shown = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "store.path {} is not a directory (a relative path is taken from the \
                     working directory)",
                    shown.display()
                ),
            ));
        }
        let owner = Owner::of_store(root);
        note_mounted(root, device, is_mount_point, owner);
        Ok(Self {
            root: root.to_path_buf(),
            open: Arc::default(),
            owner,
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Staged files of writers that never committed, older than `older_than`: those in the
    /// staging directory, and the copies a commit across file systems left beside their
    /// destination (a process killed during the copy) in a top-level directory that is on
    /// another file system (only there can one be).
    async fn staged_older_than(
        &self,
        older_than: std::time::Duration,
    ) -> Result<Vec<PathBuf>, StoreError> {
        let staging = self.root.join(STAGING);
        let mut out = Vec::new();
        Self::old_files_in(&staging, older_than, |_| true, &mut out).await?;
        // Those a writer still has (this process's, or locked: see `writer`) are not left
        // behind.
        let ours = crate::sync::lock(&self.open).clone();
        let mut out = tokio::task::spawn_blocking(move || {
            out.retain(|p| !ours.contains(p) && !being_written(p));
            out
        })
        .await
        .map_err(|e| StoreError::Other(e.to_string()))?;
        use std::os::unix::fs::MetadataExt as _;
        let device = |p: &Path| std::fs::metadata(p).ok().map(|m| m.dev());
        let root_device = device(&self.root);
        for name in OBJECT_DIRS {
            let dir = self.root.join(name);
            let dir_device = device(&dir);
            // Another file system, or a bind mount of the same one (a rename into it fails
            // too, although its device is the root's: review).
            let apart = dir_device.is_some() && dir_device != root_device;
            if !apart && !is_mount_point(&dir) {
                continue;
            }
            // And the directories in it, where nested keys are (`_cellar/access/<day>/`,
            // `build-trace/<drv>/`).
            let mut nested = Vec::new();
            Self::old_files_in(&dir, older_than, is_copy_beside, &mut out).await?;
            Self::dirs_in(&dir, &mut nested).await?;
            for d in nested {
                Self::old_files_in(&d, older_than, is_copy_beside, &mut out).await?;
            }
        }
        Ok(out)
    }

    /// Adds to `out` the directories in `dir` (not through links).
    async fn dirs_in(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), StoreError> {
        let mut rd = match tokio::fs::read_dir(dir).await {
            Ok(rd) => rd,
            Err(e) if not_found(&e) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        while let Some(e) = rd.next_entry().await? {
            if e.file_type().await.is_ok_and(|t| t.is_dir()) {
                out.push(e.path());
            }
        }
        Ok(())
    }

    /// Adds to `out` the entries of `dir` older than `older_than` whose name `wanted` takes.
    async fn old_files_in(
        dir: &Path,
        older_than: std::time::Duration,
        wanted: fn(&std::ffi::OsStr) -> bool,
        out: &mut Vec<PathBuf>,
    ) -> Result<(), StoreError> {
        let mut rd = match tokio::fs::read_dir(dir).await {
            Ok(rd) => rd,
            Err(e) if not_found(&e) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        while let Some(e) = rd.next_entry().await? {
            if !wanted(&e.file_name()) {
                continue;
            }
            let old = e
                .metadata()
                .await
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= older_than);
            if old {
                out.push(e.path());
            }
        }
        Ok(())
    }
}

type ListSender = tokio::sync::mpsc::Sender<Result<ObjectInfo, StoreError>>;

/// Whether `dir` (under `root`) is where objects of the cache's layout live: the root itself,
/// or under one of the directories its keys begin with. A file system's `lost+found` is not,
/// wherever it is (a `nar/` on a disk of its own has one).
fn in_layout(root: &Path, dir: &Path) -> bool {
    let Ok(rel) = dir.strip_prefix(root) else {
        return true;
    };
    if rel.components().any(|c| c.as_os_str() == "lost+found") {
        return false;
    }
    match rel.components().next() {
        None => true,
        Some(first) => first
            .as_os_str()
            .to_str()
            .is_some_and(|d| OBJECT_DIRS.contains(&d)),
    }
}

/// Sends every file under `root` whose key starts with `prefix` (skipping the staging
/// directory) until done or the receiver is gone.
fn walk(root: &Path, prefix: &str, tx: &ListSender) {
    // Start at the deepest directory the prefix names, so listing `_cellar/pins/` does not
    // walk every NAR.
    let start = match prefix.rfind('/') {
        Some(i) => root.join(&prefix[..i]),
        None => root.to_path_buf(),
    };
    // A part of the layout the listing covers that is a mount point with nothing mounted:
    // its objects are not missing, they cannot be seen.
    let covered = OBJECT_DIRS.iter().filter(|d| {
        let top = format!("{d}/");
        top.starts_with(prefix) || prefix.starts_with(&top)
    });
    if let Some(e) = covered.into_iter().find_map(|d| not_mounted_now(root, d)) {
        let _ = tx.blocking_send(Err(e));
        return;
    }
    // Directories already walked, by device and inode: a symlinked directory (a `nar/` on
    // another disk) is followed, and one that links back up is walked once.
    let mut seen = std::collections::HashSet::new();
    let mut dirs = vec![start];
    while let Some(dir) = dirs.pop() {
        if let Ok(m) = std::fs::metadata(&dir) {
            use std::os::unix::fs::MetadataExt as _;
            if !seen.insert((m.dev(), m.ino())) {
                continue;
            }
        }
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if not_found(&e) => match unmounted(root, prefix) {
                // Listing inside a part of the layout that is not mounted (`_cellar/pins/`).
                Some(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
                None => continue,
            },
            // A directory no object lives in, that the server's user may not read: a store
            // at a file system's root has `lost+found` (root's, mode 0700).
            Err(e)
                if e.kind() == std::io::ErrorKind::PermissionDenied && !in_layout(root, &dir) =>
            {
                tracing::debug!(dir = %dir.display(), "not listing a directory outside the cache's layout");
                continue;
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(StoreError::Other(format!("{}: {e}", dir.display()))));
                return;
            }
        };
        for entry in rd {
            let item = entry.and_then(|e| Ok((e.path(), e.file_type()?)));
            let (path, ft) = match item {
                // A link to a directory outside the layout (a `result` of a nix-build run
                // in the store's directory) is not followed: nothing of the cache lives
                // there. A link to a file is, wherever it is: a narinfo linked in (a cache
                // assembled with `ln -s`) is served, so it is listed, or gc would find its
                // NAR unreferenced and delete it.
                Ok((path, ft)) if ft.is_symlink() && !in_layout(root, &path) => {
                    match std::fs::metadata(&path) {
                        Ok(m) if m.is_file() => (path, m.file_type()),
                        _ => continue,
                    }
                }
                // What a symbolic link points to, as the object reads do (a dangling one is
                // no object).
                Ok((path, ft)) if ft.is_symlink() => match std::fs::metadata(&path) {
                    Ok(m) => (path, m.file_type()),
                    // A part of the layout linked to a disk not mounted: its objects are not
                    // missing, they cannot be seen (`verify --repair` would delete every
                    // narinfo whose NAR it then cannot find).
                    Err(e) if path.parent() == Some(root) && in_layout(root, &path) => {
                        let _ = tx.blocking_send(Err(StoreError::Unavailable(format!(
                            "{}: {e} (a link to a file system not mounted?)",
                            path.display()
                        ))));
                        return;
                    }
                    Err(e) if not_found(&e) => continue,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e.into()));
                        return;
                    }
                },
                Ok(x) => x,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e.into()));
                    return;
                }
            };
            let Some(key) = path
                .strip_prefix(root)
                .ok()
                .and_then(|k| k.to_str())
                .map(str::to_owned)
            else {
                continue;
            };
            if ft.is_dir() {
                // At the top, only the layout's directories hold objects: a `.snapshots`
                // (snapper), `.git` or `lost+found` there is not walked.
                let outside = path.parent() == Some(root) && !OBJECT_DIRS.contains(&key.as_str());
                if !outside && (key.starts_with(prefix) || prefix.starts_with(&key)) {
                    dirs.push(path);
                }
                continue;
            }
            if !ft.is_file()
                || !key.starts_with(prefix)
                || path.file_name().is_some_and(is_copy_beside)
            {
                continue;
            }
            let info = std::fs::metadata(&path).map(|m| ObjectInfo {
                key,
                size: m.len(),
                modified: m.modified().unwrap_or(std::time::UNIX_EPOCH),
            });
            let item = match info {
                Ok(i) => Ok(i),
                // Deleted between readdir and stat: no longer part of the listing.
                Err(e) if not_found(&e) => continue,
                Err(e) => Err(e.into()),
            };
            if tx.blocking_send(item).is_err() {
                return;
            }
        }
    }
}

/// Makes `dir` durable: its entry in its parent and its own entries reach the disk.
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(test)]
    if crate::sync::lock(&tests::FAILING_SYNCS)
        .iter()
        .any(|d| d == dir)
    {
        return Err(io::Error::from_raw_os_error(5));
    }
    std::fs::File::open(dir)?.sync_all()
}

/// `create_dir_all`, with each directory it creates made durable in its parent: an object
/// acknowledged in a new directory (`build-trace/<drv>/`, the first `nar/`) must survive a
/// power cut with the directory.
fn create_dirs_durably(dir: &Path, owner: Option<Owner>) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut at = dir;
    while !at.try_exists().unwrap_or(false) {
        missing.push(at.to_path_buf());
        match at.parent() {
            Some(p) => at = p,
            None => break,
        }
    }
    std::fs::create_dir_all(dir)?;
    for created in missing.iter().rev() {
        give(created, owner);
        if let Some(parent) = created.parent() {
            // A relative path's first directory is in the working directory.
            let parent = match parent.as_os_str().is_empty() {
                true => Path::new("."),
                false => parent,
            };
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// Makes the staged file `tmp` (written and synced) the object at `dest`, durably: its
/// directories created, renamed there (or, on another file system than the staging
/// directory, copied beside it, synced and renamed), and the directory synced. Run whole on
/// the blocking pool, so that a request dropped meanwhile (its client gone) cannot stop it
/// between the rename and the directory's sync: an object visible is durable.
fn publish(tmp: &Path, dest: &Path, owner: Option<Owner>) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    // Whether this makes the object appear, or replaces one there before.
    let appears = std::fs::symlink_metadata(dest).is_err();
    let ino = |p: &Path| std::fs::symlink_metadata(p).map(|m| m.ino()).ok();
    let mut placed = ino(tmp);
    // Its directories are created when the rename finds them missing: also when a delete
    // removed one it emptied (a collector deleting the last access record of a day) after
    // this found it.
    let mut tries = 0;
    let renamed = loop {
        match std::fs::rename(tmp, dest) {
            Err(e) if not_found(&e) && tries < 3 && tmp.exists() => {
                tries += 1;
                if let Some(parent) = dest.parent() {
                    create_dirs_durably(parent, owner)?;
                }
            }
            r => break r,
        }
    };
    match renamed {
        Ok(()) => {}
        // The destination is on another file system than the staging directory (a `nar/`
        // mounted from another disk): copied next to it, made durable, then renamed there.
        Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {
            let beside = dest.with_file_name(format!(
                ".{}{COPY_SUFFIX}",
                tmp.file_name().and_then(|n| n.to_str()).unwrap_or("upload")
            ));
            // Removed unless renamed.
            let mut copy = RemovedOnDrop(Some(beside.clone()));
            std::fs::copy(tmp, &beside)?;
            give(&beside, owner);
            placed = ino(&beside);
            std::fs::File::open(&beside)?.sync_all()?;
            std::fs::rename(&beside, dest)?;
            copy.0 = None;
            let _ = std::fs::remove_file(tmp);
        }
        Err(e) => return Err(e),
    }
    // The rename is durable once the directory is: an acknowledged upload must survive
    // a power cut, and a narinfo must not survive one that its NAR did not.
    let Some(parent) = dest.parent() else {
        return Ok(());
    };
    sync_dir(parent).map_err(|e| {
        // Visible, but maybe not after a power cut: an object this made appear is taken
        // back, or an upload's check would find it there and answer it stored (a narinfo
        // retried would be "already present"). One it replaced (the same NAR, a narinfo
        // rewritten) stays: taking it back would remove what was there before. So does one
        // another writer put there since (not the file this renamed).
        let taken_back = appears
            && placed.is_some()
            && ino(dest) == placed
            && std::fs::remove_file(dest).is_ok();
        io::Error::new(
            e.kind(),
            format!(
                "making its directory durable: {e}{}",
                if taken_back { " (taken back)" } else { "" }
            ),
        )
    })
}

/// What to add to an error about `path` if `path` or a directory above it is a link that
/// leads nowhere (creating a directory through one fails with "File exists"): that link, and
/// what it most likely means.
fn leads_nowhere(path: &Path) -> String {
    let dangling = path.ancestors().find(|a| {
        std::fs::symlink_metadata(a).is_ok_and(|m| m.file_type().is_symlink())
            && std::fs::metadata(a).is_err()
    });
    match dangling {
        Some(link) => format!(
            " ({} is a link that leads nowhere: a file system not mounted?)",
            link.display()
        ),
        None => String::new(),
    }
}

fn not_found(e: &io::Error) -> bool {
    // ENOTDIR: a path component is a file; the object cannot exist either.
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

#[async_trait]
impl Store for LocalStore {
    async fn get(&self, key: &str, range: Option<ByteRange>) -> Result<Option<Object>, StoreError> {
        let path = self.path(key);
        let (root, k) = (self.root.clone(), key.to_owned());
        let opened = tokio::task::spawn_blocking(move || match open_for_read(&path, range)? {
            None => absent(&root, &k),
            found => Ok(found),
        })
        .await
        .map_err(|e| StoreError::Other(format!("reading {key}: {e}")))??;
        Ok(opened.map(|o| match o {
            Opened::Read(data, range) => Object {
                length: Some(data.len() as u64),
                body: futures::stream::once(async move { Ok(data) }).boxed(),
                range,
                encoding: None,
            },
            Opened::File(file, length, range) => {
                // A file that shrank since it was opened (truncated in place) ends the body
                // with an error, not early: its readers were told `length`.
                let body = read_ahead(file, length);
                Object {
                    body: super::byte_slice(body, 0, length),
                    length: Some(length),
                    range,
                    encoding: None,
                }
            }
        }))
    }

    /// One blocking read instead of a hop to the blocking pool per open, stat and read:
    /// narinfos are small and read often.
    async fn get_bytes(&self, key: &str, limit: u64) -> Result<Option<Bytes>, StoreError> {
        let path = self.path(key);
        let key = key.to_owned();
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            let Some((mut f, size)) = open_file(&path)? else {
                return absent(&root, &key);
            };
            if size > limit {
                return Err(StoreError::TooLarge { key, limit });
            }
            let mut buf = Vec::with_capacity(size as usize);
            std::io::Read::read_to_end(
                &mut std::io::Read::take(&mut f, limit.saturating_add(1)),
                &mut buf,
            )?;
            if buf.len() as u64 > limit {
                return Err(StoreError::TooLarge { key, limit });
            }
            Ok(Some(Bytes::from(buf)))
        })
        .await
        .map_err(|e| StoreError::Other(e.to_string()))?
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let (path, root, key) = (self.path(key), self.root.clone(), key.to_owned());
        tokio::task::spawn_blocking(move || match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if not_found(&e) => absent(&root, &key),
            Err(e) => Err(StoreError::Other(format!("{}: {e}", path.display()))),
        })
        .await
        .map_err(|e| StoreError::Other(format!("looking up {}: {e}", self.root.display())))?
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let m = tokio::fs::metadata(&self.root)
            .await
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", self.root.display())))?;
        if m.is_dir() {
            // Every part of the layout linked elsewhere must be there too.
            let root = self.root.clone();
            let missing = tokio::task::spawn_blocking(move || {
                if let Some(why) = unreadable(&root) {
                    return Some(StoreError::Misconfigured(why));
                }
                OBJECT_DIRS
                    .iter()
                    .find_map(|d| unmounted(&root, &format!("{d}/")))
            })
            .await
            .map_err(|e| StoreError::Other(e.to_string()))?;
            missing.map_or(Ok(()), Err)
        } else {
            Err(StoreError::Unavailable(format!(
                "{} is not a directory",
                self.root.display()
            )))
        }
    }

    async fn writer(&self, key: &str) -> Result<Box<dyn ObjectWriter>, StoreError> {
        // Not into a mount point with nothing mounted: what is written there would vanish
        // under the file system once it is mounted again.
        if let Some(e) = key
            .split_once('/')
            .and_then(|(top, _)| not_mounted_now(&self.root, top))
        {
            return Err(e);
        }
        if let Some(e) = root_gone(&self.root) {
            return Err(e);
        }
        let staging = self.root.join(STAGING);
        let at = |e: io::Error| StoreError::Other(format!("creating {}: {e}", staging.display()));
        if !tokio::fs::try_exists(&staging).await.unwrap_or(false) {
            tokio::fs::create_dir_all(&staging).await.map_err(at)?;
            give(&staging, self.owner);
        }
        let mut rnd = [0u8; 12];
        getrandom::getrandom(&mut rnd).map_err(|e| StoreError::Other(e.to_string()))?;
        let tmp = staging.join(hex::encode(rnd));
        let file = tokio::fs::File::create(&tmp).await.map_err(at)?;
        let file = file.into_std().await;
        give_open(&tmp, &file, self.owner);
        // Locked while it is written: a cleanup (another process's, a `verify --repair`)
        // goes by age, and a slow upload's file can be as old as one left by a crash. Where
        // the file system has no locks (NFS without a lock manager), written unlocked.
        if let Err(e) = file.try_lock() {
            tracing::debug!(staged = %tmp.display(), cause = %e, "a staged file could not be locked");
        }
        let file = tokio::fs::File::from_std(file);
        tracing::debug!(key, staged = %tmp.display(), "writing an object");
        crate::sync::lock(&self.open).insert(tmp.clone());
        Ok(Box::new(LocalWriter {
            file: Some(tokio::io::BufWriter::with_capacity(READ_BUFFER, file)),
            tmp,
            dest: self.path(key),
            done: false,
            open: self.open.clone(),
            owner: self.owner,
        }))
    }

    async fn remove_unfinished(&self) -> usize {
        let open: Vec<PathBuf> = crate::sync::lock(&self.open).drain().collect();
        let n = open.len();
        let _ = tokio::task::spawn_blocking(move || {
            for tmp in open {
                let _ = std::fs::remove_file(tmp);
            }
        })
        .await;
        n
    }

    async fn cleanup_staging(&self, older_than: std::time::Duration) -> Result<usize, StoreError> {
        let mut n = 0;
        for path in self.staged_older_than(older_than).await? {
            if tokio::fs::remove_file(&path).await.is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    async fn stale_staging(
        &self,
        older_than: std::time::Duration,
    ) -> Result<Vec<String>, StoreError> {
        Ok(self
            .staged_older_than(older_than)
            .await?
            .iter()
            .map(|p| p.display().to_string())
            .collect())
    }

    fn list(&self, prefix: &str) -> ObjectList {
        // Walked on a blocking thread that feeds a small channel: the walk runs only as fast
        // as the caller consumes it, so memory stays bounded on any tree size.
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let root = self.root.clone();
        let prefix = prefix.to_owned();
        tokio::task::spawn_blocking(move || walk(&root, &prefix, &tx));
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
            .boxed()
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key);
        let nested = key.matches('/').count() >= 2;
        tokio::task::spawn_blocking(move || {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(e),
            }
            // Durable before it is answered, as a write is: a collector deletes narinfos
            // before the NARs they name, and a filesystem may make the unlinks of two
            // directories durable in either order (btrfs logs a directory another write
            // syncs), so a power cut could bring back a narinfo whose NAR went. Also when
            // the file was gone already: a delete retried after its sync failed.
            match path.parent().map(sync_dir) {
                Some(Err(e)) if !not_found(&e) => return Err(e),
                _ => {}
            }
            // A directory below a part of the layout (an expired day of access records,
            // `_cellar/access/<day>/`; a derivation's `build-trace/<drv>/`) goes with its
            // last object, as a prefix does in S3, or months of them stay behind empty. Not
            // when another object is in it (or lands in it meanwhile: `publish` creates it
            // again); a directory left is no error.
            if nested {
                if let Some(dir) = path.parent() {
                    let _ = std::fs::remove_dir(dir);
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| StoreError::Other(format!("deleting {key}: {e}")))?
        .map_err(|e| StoreError::Other(format!("deleting {key}: {e}")))
    }

    fn describe(&self) -> String {
        // Absolute: a relative store.path is taken from the working directory, which logs and
        // `cellar import` should not leave the reader to guess.
        let root = std::path::absolute(&self.root).unwrap_or_else(|_| self.root.clone());
        format!("file://{}", root.display())
    }
}

struct LocalWriter {
    file: Option<tokio::io::BufWriter<tokio::fs::File>>,
    tmp: PathBuf,
    dest: PathBuf,
    done: bool,
    /// Its store's writers still open, `tmp` among them until this one ends.
    open: Arc<std::sync::Mutex<std::collections::HashSet<PathBuf>>>,
    /// Who the directories it creates are given to ([`Owner`]).
    owner: Option<Owner>,
}

impl LocalWriter {
    /// No longer among its store's open writers.
    fn ended(&self) {
        crate::sync::lock(&self.open).remove(&self.tmp);
    }

    /// A failed write, saying of which object and where it was staged: "No space left on
    /// device" alone does not say which disk is full.
    fn failed(&self, e: &io::Error) -> StoreError {
        StoreError::Other(format!(
            "writing {} (staged in {}): {e}",
            self.dest.display(),
            self.tmp.display()
        ))
    }
}

#[async_trait]
impl ObjectWriter for LocalWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        match &mut self.file {
            Some(f) => f.write_all(&chunk).await.map_err(|e| self.failed(&e)),
            None => Err(StoreError::Other("write after close".into())),
        }
    }

    async fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        let mut f = self
            .file
            .take()
            .ok_or_else(|| StoreError::Other("commit after close".into()))?;
        f.flush().await.map_err(|e| self.failed(&e))?;
        f.get_mut().sync_all().await.map_err(|e| self.failed(&e))?;
        // Kept open, and so locked, until it is published (see `being_written`).
        let locked = f.into_inner().into_std().await;
        let (tmp, dest, owner) = (self.tmp.clone(), self.dest.clone(), self.owner);
        let published = tokio::task::spawn_blocking(move || {
            let published = publish(&tmp, &dest, owner);
            drop(locked);
            // Not published: the staged file goes before the failure is answered.
            if published.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            published
        })
        .await
        .map_err(|e| StoreError::Other(format!("publishing {}: {e}", self.dest.display())))?;
        self.ended();
        self.done = true;
        published.map_err(|e| {
            StoreError::Other(format!(
                "publishing {}: {e}{}",
                self.dest.display(),
                leads_nowhere(&self.dest)
            ))
        })
    }

    async fn abort(mut self: Box<Self>) {
        // Removed before this returns (a writer only dropped has it removed in the
        // background, see `Drop`).
        drop(self.file.take());
        self.ended();
        self.done = true;
        let tmp = std::mem::take(&mut self.tmp);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(tmp)).await;
    }
}

/// A file removed when this is dropped, unless taken out first.
struct RemovedOnDrop(Option<PathBuf>);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        if !self.done {
            self.ended();
            // On the blocking pool if there is one: an aborted upload's writer is dropped on
            // a runtime worker, which a slow or hung disk (NFS) would otherwise stall.
            let tmp = std::mem::take(&mut self.tmp);
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn_blocking(move || std::fs::remove_file(tmp))),
                Err(_) => drop(std::fs::remove_file(tmp)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Directories whose sync fails (an I/O error), for the tests of [`super::publish`].
    pub(super) static FAILING_SYNCS: std::sync::Mutex<Vec<PathBuf>> =
        std::sync::Mutex::new(Vec::new());

    use futures::TryStreamExt as _;

    use super::*;

    async fn read(store: &LocalStore, key: &str, range: Option<ByteRange>) -> (Vec<u8>, Object) {
        let mut obj = store.get(key, range).await.unwrap().unwrap();
        let body = std::mem::replace(&mut obj.body, futures::stream::empty().boxed());
        let chunks: Vec<Bytes> = body.try_collect().await.unwrap();
        (chunks.concat(), obj)
    }

    #[test]
    fn the_layout_is_the_root_and_the_directories_keys_begin_with() {
        let root = Path::new("/srv/cache");
        for dir in [
            "",
            "nar",
            "log",
            "realisations/x",
            "build-trace/a",
            "build-trace-v2/a",
            "debuginfo",
            "_cellar/access/d",
        ] {
            assert!(in_layout(root, &root.join(dir)), "{dir}");
        }
        for dir in ["lost+found", ".snapshots", "narx", "nar/lost+found"] {
            assert!(!in_layout(root, &root.join(dir)), "{dir}");
        }
    }

    /// The keys `list` gives under `prefix`, sorted.
    async fn keys(store: &LocalStore, prefix: &str) -> Vec<String> {
        let mut keys: Vec<String> = store
            .list(prefix)
            .map_ok(|o| o.key)
            .try_collect()
            .await
            .unwrap();
        keys.sort();
        keys
    }

    /// A store in a fresh directory holding `nar/x.nar` (`nar`).
    async fn holding_a_nar() -> (tempfile::TempDir, LocalStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        store
            .put_bytes("nar/x.nar", Bytes::from_static(b"nar"))
            .await
            .unwrap();
        (dir, store)
    }

    /// A write whose directory could not be made durable after the rename (an I/O error) fails,
    /// and an object it made appear is taken back: an upload's check found it there and
    /// answered the upload stored, not durable (review, with injected EIO). One it replaced
    /// stays (what was there before), and the staged file is gone either way.
    #[tokio::test]
    async fn an_object_its_directory_could_not_make_durable_is_taken_back() {
        let (dir, store) = holding_a_nar().await;
        let nar_dir = dir.path().join("nar");
        crate::sync::lock(&FAILING_SYNCS).push(nar_dir.clone());
        let r = store
            .put_bytes("nar/new.nar", Bytes::from_static(b"new"))
            .await;
        let said = format!("{r:?}");
        assert!(
            said.contains("durable") && said.contains("taken back"),
            "{said}"
        );
        assert_eq!(store.head("nar/new.nar").await.unwrap(), None);
        assert!(store
            .put_bytes("nar/x.nar", Bytes::from_static(b"nar"))
            .await
            .is_err());
        assert_eq!(store.head("nar/x.nar").await.unwrap(), Some(3));
        assert_eq!(
            std::fs::read_dir(dir.path().join(STAGING)).unwrap().count(),
            0
        );
        crate::sync::lock(&FAILING_SYNCS).retain(|d| *d != nar_dir);
        store
            .put_bytes("nar/new.nar", Bytes::from_static(b"new"))
            .await
            .unwrap();
        assert_eq!(store.head("nar/new.nar").await.unwrap(), Some(3));
    }

    /// An aborted write leaves nothing, by the time `abort` returns; a dropped one, soon after.
    #[tokio::test]
    async fn an_aborted_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let staged = || std::fs::read_dir(dir.path().join(STAGING)).unwrap().count();
        let mut w = store.writer("nar/x.nar").await.unwrap();
        w.write(Bytes::from_static(b"half")).await.unwrap();
        assert_eq!(staged(), 1);
        w.abort().await;
        assert_eq!(staged(), 0);
        assert!(store.head("nar/x.nar").await.unwrap().is_none());
    }

    /// A shutdown that cuts uploads off removes what their writers staged (their tasks, which
    /// would remove it, do not outlive the runtime: up to `upload.max_concurrent` NARs' worth
    /// of dead files stayed for `staging_max_age_secs`); writers that committed or aborted are
    /// not among them.
    #[tokio::test]
    async fn what_open_writers_staged_is_removed_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let mut cut = store.writer("nar/x.nar").await.unwrap();
        cut.write(Bytes::from_static(b"half")).await.unwrap();
        let mut done = store.writer("nar/y.nar").await.unwrap();
        done.write(Bytes::from_static(b"whole")).await.unwrap();
        done.commit().await.unwrap();
        let aborted = store.writer("nar/z.nar").await.unwrap();
        aborted.abort().await;
        let cut_file = std::fs::read_dir(dir.path().join(STAGING))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect::<Vec<_>>();
        assert_eq!(cut_file.len(), 1);
        // Dropped: its file is removed in the background, and it is no longer open.
        drop(store.writer("nar/w.nar").await.unwrap());
        assert_eq!(store.remove_unfinished().await, 1);
        assert!(!cut_file[0].exists());
        assert_eq!(store.head("nar/y.nar").await.unwrap(), Some(5));
        assert_eq!(store.remove_unfinished().await, 0);
        drop(cut);
    }

    /// Directories at the top other than the layout's hold no objects, and are not walked:
    /// a snapper `.snapshots` would multiply the listing, and files there are no objects.
    #[tokio::test]
    async fn directories_outside_the_layout_are_not_listed() {
        let dir = tempfile::tempdir().unwrap();
        for d in [".snapshots/1", ".git", "narx", "nar"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        for f in [
            ".snapshots/1/a.narinfo",
            ".git/HEAD",
            "narx/y.nar",
            "nar/x.nar",
        ] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        let store = LocalStore::open(dir.path()).unwrap();
        store
            .put_bytes("a.narinfo", Bytes::from_static(b"info"))
            .await
            .unwrap();
        assert_eq!(keys(&store, "").await, ["a.narinfo", "nar/x.nar"]);
    }

    /// A narinfo linked into the store's directory (a cache assembled with `ln -s`) is listed
    /// as it is served, or gc would take its NAR for unreferenced; a link to a directory
    /// outside the layout, or to nothing, is not.
    #[tokio::test]
    async fn a_narinfo_linked_in_is_listed() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join("a.narinfo"), b"info").unwrap();
        std::os::unix::fs::symlink(other.path().join("a.narinfo"), dir.path().join("a.narinfo"))
            .unwrap();
        std::os::unix::fs::symlink(other.path().join("gone"), dir.path().join("b.narinfo"))
            .unwrap();
        std::os::unix::fs::symlink(other.path(), dir.path().join("result")).unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        assert_eq!(read(&store, "a.narinfo", None).await.0, b"info");
        assert_eq!(keys(&store, "").await, ["a.narinfo"]);
    }

    /// A `nar/` on another file system, linked into the store's directory (a bigger disk):
    /// uploads land there although the staging directory is on the other file system (a
    /// rename across file systems fails), and a listing of the whole store follows the link,
    /// as one of `nar/` does. A link back up the tree is walked once.
    #[tokio::test]
    async fn a_directory_on_another_file_system_linked_in_is_written_and_listed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir_in("/dev/shm").unwrap();
        use std::os::unix::fs::MetadataExt as _;
        assert_ne!(
            std::fs::metadata(dir.path()).unwrap().dev(),
            std::fs::metadata(elsewhere.path()).unwrap().dev(),
            "/dev/shm is not another file system here"
        );
        std::os::unix::fs::symlink(elsewhere.path(), dir.path().join("nar")).unwrap();
        std::os::unix::fs::symlink(dir.path(), dir.path().join("loop")).unwrap();
        // A nix-build's `result` in the store's directory: not followed.
        std::os::unix::fs::symlink(elsewhere.path(), dir.path().join("result")).unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        store
            .put_bytes("nar/x.nar", Bytes::from_static(b"nar"))
            .await
            .unwrap();
        store
            .put_bytes("a.narinfo", Bytes::from_static(b"info"))
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(elsewhere.path().join("x.nar")).unwrap(),
            b"nar"
        );
        assert_eq!(keys(&store, "").await, ["a.narinfo", "nar/x.nar"]);
        assert_eq!(keys(&store, "nar/").await, ["nar/x.nar"]);
        // Nothing of the copy is left beside it.
        let beside: Vec<_> = std::fs::read_dir(elsewhere.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(beside, ["x.nar"]);
        // A copy whose rename into place fails (a directory is in the way) is removed, and
        // so is the staged file, before the failure is answered.
        std::fs::create_dir(elsewhere.path().join("d.nar")).unwrap();
        assert!(store
            .put_bytes("nar/d.nar", Bytes::from_static(b"nar"))
            .await
            .is_err());
        std::fs::remove_dir(elsewhere.path().join("d.nar")).unwrap();
        let staged = std::fs::read_dir(dir.path().join(STAGING)).unwrap().count();
        assert_eq!(staged, 0);
        let beside: Vec<_> = std::fs::read_dir(elsewhere.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(beside, ["x.nar"]);
        // A copy left there by a process killed during it: not an object, and removed with
        // the staged files.
        std::fs::write(elsewhere.path().join(".0a1b.cellar-tmp"), b"half").unwrap();
        // Also one level down, where nested keys are (`_cellar/access/<day>/`): never
        // cleaned before (review).
        std::fs::create_dir(elsewhere.path().join("day")).unwrap();
        std::fs::write(elsewhere.path().join("day/.0c1d.cellar-tmp"), b"half").unwrap();
        assert_eq!(keys(&store, "").await, ["a.narinfo", "nar/x.nar"]);
        let zero = std::time::Duration::ZERO;
        let mut stale = store.stale_staging(zero).await.unwrap();
        stale.sort();
        assert!(
            stale.len() == 2
                && stale[0].ends_with("/.0a1b.cellar-tmp")
                && stale[1].ends_with("/day/.0c1d.cellar-tmp"),
            "{stale:?}"
        );
        assert_eq!(store.cleanup_staging(zero).await.unwrap(), 2);
        assert!(!elsewhere.path().join(".0a1b.cellar-tmp").exists());
        std::fs::remove_dir(elsewhere.path().join("day")).unwrap();
        assert_eq!(keys(&store, "").await, ["a.narinfo", "nar/x.nar"]);
        // The disk not mounted (the link dangles): the listing fails, it does not find no NAR.
        drop(elsewhere);
        let listed: Result<Vec<_>, _> = store.list("").try_collect().await;
        assert!(
            matches!(listed, Err(StoreError::Unavailable(_))),
            "{listed:?}"
        );
        // Nor is any object there missing: a caller taking it at its word would delete the
        // narinfos that name it. The store is not ready.
        let unavailable = |r: Result<bool, StoreError>| {
            assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        };
        unavailable(store.head("nar/x.nar").await.map(|h| h.is_some()));
        unavailable(store.get("nar/x.nar", None).await.map(|o| o.is_some()));
        unavailable(store.get_bytes("nar/x.nar", 10).await.map(|o| o.is_some()));
        let listed: Result<Vec<_>, _> = store.list("nar/").try_collect().await;
        unavailable(listed.map(|l| l.is_empty()));
        unavailable(store.ping().await.map(|()| true));
        // What is missing elsewhere is missing.
        assert_eq!(store.head("b.narinfo").await.unwrap(), None);
        assert_eq!(store.head("log/x").await.unwrap(), None);
        assert!(store.get("log/x", None).await.unwrap().is_none());
        assert_eq!(keys(&store, "log/").await, Vec::<String>::new());
    }

    /// Mount points as `/proc/self/mountinfo` escapes them, and this machine's root found a
    /// mount point there.
    #[test]
    fn mount_points_are_read_as_the_kernel_writes_them() {
        assert_eq!(unescape_mount_point(r"/mnt/a\040b\011c"), "/mnt/a b\tc");
        assert_eq!(unescape_mount_point(r"/x\134y"), r"/x\y");
        assert_eq!(unescape_mount_point(r"/odd\9"), r"/odd\9");
        assert!(is_mount_point(Path::new("/")));
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_mount_point(dir.path()));
    }

    /// A write, or the store's directory, through a link that leads nowhere (a disk not
    /// mounted) fails saying so, not only "File exists".
    #[tokio::test]
    async fn a_write_through_a_link_that_leads_nowhere_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = LocalStore::open(&root).unwrap();
        std::os::unix::fs::symlink(dir.path().join("gone"), root.join("nar")).unwrap();
        let e = store
            .put_bytes("nar/x.nar", Bytes::from_static(b"nar"))
            .await
            .unwrap_err()
            .to_string();
        let said = format!(
            "{} is a link that leads nowhere",
            root.join("nar").display()
        );
        assert!(e.contains(&said), "{e}");
        store
            .put_bytes("log/x", Bytes::from_static(b"log"))
            .await
            .unwrap();
        // Another failure through a link that leads somewhere is said as it is.
        std::fs::create_dir_all(dir.path().join("real/x")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("real"), root.join("debuginfo")).unwrap();
        let e = store
            .put_bytes("debuginfo/x", Bytes::from_static(b"in the way"))
            .await
            .unwrap_err()
            .to_string();
        assert!(!e.contains("leads nowhere"), "{e}");
        std::os::unix::fs::symlink(dir.path().join("gone"), dir.path().join("linked")).unwrap();
        let e = LocalStore::open(&dir.path().join("linked"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("is a link that leads nowhere"), "{e}");
    }

    /// A part of the layout mounted at the store's root (a `nar/` on a disk of its own) is
    /// noted when the store is opened; once nothing is mounted there (the empty mount point,
    /// on the root's file system), its objects are not missing but cannot be seen: the
    /// listings covering it fail (`verify --repair` deleted every narinfo), misses there are
    /// unavailable, the store is not ready. What is missing elsewhere is missing.
    /// The store's directory moved away while the server runs: a miss is not "absent" (its
    /// narinfos would answer 404, which clients keep for an hour) but the store unavailable,
    /// and a write does not create an empty store in its place. Back, it is served.
    #[tokio::test]
    async fn a_store_directory_gone_is_unavailable_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("a.narinfo"), b"x").unwrap();
        let store = LocalStore::open(&root).unwrap();
        let moved = dir.path().join("moved");
        std::fs::rename(&root, &moved).unwrap();
        let unavailable = |r: Result<bool, StoreError>| {
            assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        };
        unavailable(store.head("a.narinfo").await.map(|h| h.is_some()));
        unavailable(store.get("nar/x.nar", None).await.map(|o| o.is_some()));
        unavailable(store.writer("b.narinfo").await.map(|_| true));
        assert!(!root.exists(), "an empty store was created in its place");
        std::fs::rename(&moved, &root).unwrap();
        assert_eq!(store.head("a.narinfo").await.unwrap(), Some(1));
        assert!(store.head("b.narinfo").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_mount_point_with_nothing_mounted_is_not_an_empty_directory() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("nar")).unwrap();
        std::fs::write(root.join("a.narinfo"), b"x").unwrap();
        // `log/` linked elsewhere: a link is looked after as one (see `unmounted`).
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), root.join("log")).unwrap();
        // As if `nar/` (and what `log/` links to) were on another file system than the root.
        let root_device = device(root);
        let mounted = |p: &Path| {
            if p.ends_with("nar") || p.ends_with("log") {
                root_device.map(|d| d + 1)
            } else {
                device(p)
            }
        };
        note_mounted(root, device, |_| true, None);
        assert!(!root.join(MOUNTED).exists(), "nothing is mounted");
        // A device of its own without a mount (a btrfs subvolume) is not noted.
        note_mounted(root, mounted, |_| false, None);
        assert!(!root.join(MOUNTED).exists(), "a subvolume");
        note_mounted(root, mounted, |_| true, None);
        assert!(root.join(MOUNTED).join("nar").exists());
        assert!(!root.join(MOUNTED).join("log").exists());
        // Now on the root's file system, as an empty mount point is.
        let store = LocalStore::open(root).unwrap();
        let unavailable = |r: Result<bool, StoreError>| {
            assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        };
        for prefix in ["", "nar/", "nar/x", "n"] {
            let listed: Result<Vec<_>, _> = store.list(prefix).try_collect().await;
            unavailable(listed.map(|l| l.is_empty()));
        }
        unavailable(store.head("nar/x.nar").await.map(|h| h.is_some()));
        unavailable(store.get("nar/x.nar", None).await.map(|o| o.is_some()));
        unavailable(store.ping().await.map(|()| true));
        // Nor is anything written there, to vanish once the disk is mounted again.
        unavailable(
            store
                .put_bytes("nar/y.nar", Bytes::from_static(b"nar"))
                .await
                .map(|()| true),
        );
        assert!(!root.join("nar/y.nar").exists());
        assert_eq!(store.head("b.narinfo").await.unwrap(), None);
        assert_eq!(store.head("log/x").await.unwrap(), None);
        assert_eq!(keys(&store, "log/").await, Vec::<String>::new());
        assert_eq!(keys(&store, "a").await, ["a.narinfo"]);
        // A note from another file system (the store copied here with it) is not this one's.
        let noted = std::fs::read_to_string(root.join(MOUNTED).join("nar")).unwrap();
        let device = root_device.unwrap();
        let ino = inode(root).unwrap();
        assert_eq!(noted, format!("{device}\n{ino}\n"));
        std::fs::write(root.join(MOUNTED).join("nar"), "1").unwrap();
        store.ping().await.unwrap();
        // Nor is one written for another root directory: a copy of the store restored on the
        // same file system (homelab walk: its every NAR miss was a 503).
        std::fs::write(
            root.join(MOUNTED).join("nar"),
            format!("{device}\n{}\n", ino + 1),
        )
        .unwrap();
        store.ping().await.unwrap();
        // One of an earlier version names no path.
        std::fs::write(root.join(MOUNTED).join("nar"), device.to_string()).unwrap();
        unavailable(store.ping().await.map(|()| true));
        std::fs::write(root.join(MOUNTED).join("nar"), noted).unwrap();
        unavailable(store.ping().await.map(|()| true));
        // Moved back for good: the note removed, the directory is what it holds.
        std::fs::remove_file(root.join(MOUNTED).join("nar")).unwrap();
        assert_eq!(keys(&store, "").await, ["a.narinfo"]);
        assert_eq!(store.head("nar/x.nar").await.unwrap(), None);
        store.ping().await.unwrap();
    }

    /// Run as root (`sudo cellar pin add`, `gc --apply`) on a store another user owns (the
    /// server's), what cellar creates there is that user's: root's files and directories
    /// there failed the server's uploads, access records and pins from then on (homelab
    /// walk). A store root owns keeps root's. (The tests run as root, as the README's test
    /// command does; another user's store is its own then, and nothing is given.)
    #[tokio::test]
    async fn what_root_creates_in_another_users_store_is_given_to_that_user() {
        use std::os::unix::fs::MetadataExt as _;
        if !rustix::process::geteuid().is_root() {
            let dir = tempfile::tempdir().unwrap();
            assert_eq!(Owner::of_store(dir.path()), None);
            return;
        }
        let owner = |p: &Path| {
            let m = std::fs::metadata(p).unwrap();
            (m.uid(), m.gid())
        };
        let dir = tempfile::tempdir().unwrap();
        let theirs = dir.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(4242), Some(4243)).unwrap();
        let store = LocalStore::open(&theirs).unwrap();
        for key in ["nar/x.nar", "_cellar/pins/p", "a.narinfo"] {
            store
                .put_bytes(key, Bytes::from_static(b"x"))
                .await
                .unwrap();
        }
        for made in [
            ".staging",
            "nar",
            "nar/x.nar",
            "_cellar",
            "_cellar/pins",
            "_cellar/pins/p",
            "a.narinfo",
        ] {
            assert_eq!(owner(&theirs.join(made)), (4242, 4243), "{made}");
        }
        // A writer's staged file too, before it is committed.
        let mut w = store.writer("log/y").await.unwrap();
        w.write(Bytes::from_static(b"y")).await.unwrap();
        let staged: Vec<_> = std::fs::read_dir(theirs.join(STAGING)).unwrap().collect();
        assert_eq!(staged.len(), 1);
        assert_eq!(owner(&staged[0].as_ref().unwrap().path()), (4242, 4243));
        w.abort().await;
        let ours = dir.path().join("ours");
        let store = LocalStore::open(&ours).unwrap();
        store
            .put_bytes("nar/x.nar", Bytes::from_static(b"x"))
            .await
            .unwrap();
        for made in [".staging", "nar", "nar/x.nar"] {
            assert_eq!(owner(&ours.join(made)), (0, 0), "{made}");
        }
    }

    /// Small and large files, whole and in ranges, read the same: the bytes asked for, their
    /// length and range.
    #[tokio::test]
    async fn files_are_read_whole_and_in_ranges_at_any_size() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        for size in [1000, WHOLE_READ_MAX, WHOLE_READ_MAX + 1, 3 << 20] {
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let key = format!("nar/f{size}");
            std::fs::create_dir_all(dir.path().join("nar")).unwrap();
            std::fs::write(dir.path().join(&key), &data).unwrap();
            let (got, obj) = read(&store, &key, None).await;
            assert!(got == data, "{size}: whole");
            assert_eq!((obj.length, obj.range), (Some(size), None), "{size}");
            let ranges = [
                (
                    ByteRange::From {
                        start: 10,
                        end: Some(19),
                    },
                    10,
                    19,
                ),
                (
                    ByteRange::From {
                        start: size - 5,
                        end: None,
                    },
                    size - 5,
                    size - 1,
                ),
                (ByteRange::Suffix(7), size - 7, size - 1),
            ];
            for (r, start, end) in ranges {
                let (got, obj) = read(&store, &key, Some(r)).await;
                assert!(
                    got == data[start as usize..=end as usize],
                    "{size}: {r:?} sent other bytes"
                );
                assert_eq!(obj.length, Some(end - start + 1), "{size}: {r:?}");
                assert_eq!(
                    obj.range,
                    Some(ContentRange {
                        start,
                        end,
                        total: size
                    }),
                    "{size}: {r:?}"
                );
            }
            let past = ByteRange::From {
                start: size,
                end: None,
            };
            assert!(matches!(
                store.get(&key, Some(past)).await,
                Err(StoreError::RangeNotSatisfiable { size: s }) if s == size
            ));
        }
        assert!(store.get("nar/none", None).await.unwrap().is_none());
        assert!(
            store.get("nar", None).await.unwrap().is_none(),
            "a directory"
        );
    }

    /// Files staged by writers that never committed (a process killed mid-upload) are stale
    /// once older than asked, and removed then; younger ones are left to their writers.
    /// Where the layout's directories share the staging directory's file system, no copy can
    /// have been made beside an object, and they are not scanned for one (`nar/` may hold
    /// millions of files): a file there named like one is not touched.
    #[tokio::test]
    async fn staged_files_are_stale_once_old_and_only_they_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let zero = std::time::Duration::ZERO;
        // Nothing was ever staged: no staging directory, nothing stale.
        assert_eq!(store.cleanup_staging(zero).await.unwrap(), 0);
        std::fs::create_dir_all(dir.path().join(STAGING)).unwrap();
        std::fs::create_dir_all(dir.path().join("nar")).unwrap();
        let staged = dir.path().join(STAGING).join("0a1b2c");
        std::fs::write(&staged, b"half").unwrap();
        let alike = dir.path().join("nar/.0a1b.cellar-tmp");
        std::fs::write(&alike, b"x").unwrap();
        let hour = std::time::Duration::from_secs(3600);
        assert!(store.stale_staging(hour).await.unwrap().is_empty());
        assert_eq!(store.cleanup_staging(hour).await.unwrap(), 0);
        assert!(staged.exists());
        assert_eq!(
            store.stale_staging(zero).await.unwrap(),
            [staged.display().to_string()]
        );
        assert_eq!(store.cleanup_staging(zero).await.unwrap(), 1);
        assert!(!staged.exists() && alike.exists());
        // A writer's file, however old (a slow upload), is its writer's while it writes: a
        // cleanup going by age alone deleted it under a live upload (review). Its own
        // process knows it; another (`verify --repair`, a second server) finds it locked.
        let other = LocalStore::open(dir.path()).unwrap();
        let mut w = store.writer("nar/slow.nar").await.unwrap();
        w.write(Bytes::from_static(b"slow")).await.unwrap();
        for s in [&store, &other] {
            assert!(s.stale_staging(zero).await.unwrap().is_empty());
            assert_eq!(s.cleanup_staging(zero).await.unwrap(), 0);
        }
        w.commit().await.unwrap();
        assert_eq!(store.head("nar/slow.nar").await.unwrap(), Some(4));
        // A staging directory that cannot be read is an error, not "nothing stale".
        std::fs::remove_dir(dir.path().join(STAGING)).unwrap();
        std::os::unix::fs::symlink(STAGING, dir.path().join(STAGING)).unwrap();
        assert!(store.cleanup_staging(zero).await.is_err());
        assert!(store.stale_staging(zero).await.is_err());
    }

    /// In a listing, a link inside the layout that points nowhere (an object deleted where it
    /// lived) is no object; one that cannot be followed for another reason (it loops) fails
    /// the listing, as an unreadable store does: gc and verify must not take what they cannot
    /// see for absent.
    #[tokio::test]
    async fn a_listing_skips_dangling_links_and_fails_on_unreadable_ones() {
        let (dir, store) = holding_a_nar().await;
        std::os::unix::fs::symlink("gone.nar", dir.path().join("nar/y.nar")).unwrap();
        assert_eq!(keys(&store, "").await, ["nar/x.nar"]);
        assert_eq!(keys(&store, "nar/").await, ["nar/x.nar"]);
        std::os::unix::fs::symlink("z.nar", dir.path().join("nar/z.nar")).unwrap();
        let listed: Result<Vec<_>, _> = store.list("nar/").try_collect().await;
        assert!(listed.is_err(), "{listed:?}");
        // The store's directory itself unreadable (here a link that loops).
        let root = dir.path().join("cache");
        let store = LocalStore::open(&root).unwrap();
        std::fs::remove_dir(&root).unwrap();
        std::os::unix::fs::symlink("cache", &root).unwrap();
        let listed: Result<Vec<_>, _> = store.list("").try_collect().await;
        assert!(listed.is_err(), "{listed:?}");
    }

    /// `get_bytes` reads an object of up to its limit whole, and refuses a larger one
    /// without reading it.
    #[tokio::test]
    async fn whole_reads_hold_to_their_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        store
            .put_bytes("a.narinfo", Bytes::from_static(b"0123456789"))
            .await
            .unwrap();
        for limit in [10, 11, u64::MAX] {
            let got = store.get_bytes("a.narinfo", limit).await.unwrap();
            assert_eq!(got.as_deref(), Some(&b"0123456789"[..]), "{limit}");
        }
        for limit in [0, 9] {
            assert!(
                matches!(
                    store.get_bytes("a.narinfo", limit).await,
                    Err(StoreError::TooLarge { limit: l, .. }) if l == limit
                ),
                "{limit}"
            );
        }
        assert_eq!(store.get_bytes("b.narinfo", 10).await.unwrap(), None);
    }

    /// `head` gives an object's size; a directory or nothing at all is no object.
    #[tokio::test]
    async fn head_gives_an_objects_size() {
        let (_dir, store) = holding_a_nar().await;
        assert_eq!(store.head("nar/x.nar").await.unwrap(), Some(3));
        assert_eq!(store.head("nar").await.unwrap(), None);
        assert_eq!(store.head("nar/y.nar").await.unwrap(), None);
        assert_eq!(store.head("nar/x.nar/y").await.unwrap(), None);
    }

    /// A listing by a prefix that ends inside a name gives the keys that begin with it, and
    /// no others from the directory walked.
    #[tokio::test]
    async fn a_listing_gives_only_the_keys_of_its_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        for key in [
            "nar/xa.nar",
            "nar/xb.nar",
            "nar/y.nar",
            "a.narinfo",
            "b.narinfo",
        ] {
            store
                .put_bytes(key, Bytes::from_static(b"x"))
                .await
                .unwrap();
        }
        assert_eq!(keys(&store, "nar/x").await, ["nar/xa.nar", "nar/xb.nar"]);
        assert_eq!(keys(&store, "a").await, ["a.narinfo"]);
        // A link to a directory inside a `lost+found` (no part of the layout) is not followed.
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join("f.nar"), b"x").unwrap();
        std::fs::create_dir(dir.path().join("nar/lost+found")).unwrap();
        std::os::unix::fs::symlink(other.path(), dir.path().join("nar/lost+found/d")).unwrap();
        assert_eq!(
            keys(&store, "nar/").await,
            ["nar/xa.nar", "nar/xb.nar", "nar/y.nar"]
        );
    }

    /// A delete removes the object and is durable; deleting what is not there (nor the
    /// directory it would be in) is no error; a directory is not deleted as an object.
    #[tokio::test]
    async fn deletes_remove_objects_and_what_is_gone_is_no_error() {
        let (dir, store) = holding_a_nar().await;
        store.delete("nar/x.nar").await.unwrap();
        assert!(!dir.path().join("nar/x.nar").exists());
        store.delete("nar/x.nar").await.unwrap();
        store.delete("log/none/x").await.unwrap();
        assert!(store.delete("nar").await.is_err());
        assert!(dir.path().join("nar").is_dir());
    }

    /// A FIFO (or any file that is not a regular one) named like an object is a broken store,
    /// said with its path, at once: opening it would block a thread until something writes
    /// to it. A directory named like one is not there.
    #[tokio::test]
    async fn a_fifo_named_like_an_object_is_an_error_not_a_wait() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        std::fs::create_dir_all(dir.path().join("nar/d.nar")).unwrap();
        let fifo = dir.path().join("nar/f.nar");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let e = store
            .get("nar/f.nar", None)
            .await
            .err()
            .expect("a FIFO was read");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(e.to_string().contains("nar/f.nar"), "{e}");
        assert!(store.get("nar/d.nar", None).await.unwrap().is_none());
    }

    /// A directory below a part of the layout goes with its last object (months of expired
    /// access days would stay behind empty), not while another object is in it; the parts
    /// themselves stay; an object written there again finds its directory.
    #[tokio::test]
    async fn a_nested_directory_goes_with_its_last_object() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        for key in ["_cellar/access/d1/a", "_cellar/access/d1/b", "log/x"] {
            store
                .put_bytes(key, Bytes::from_static(b"1"))
                .await
                .unwrap();
        }
        store.delete("_cellar/access/d1/a").await.unwrap();
        assert!(dir.path().join("_cellar/access/d1").is_dir());
        store.delete("_cellar/access/d1/b").await.unwrap();
        assert!(!dir.path().join("_cellar/access/d1").exists());
        assert!(dir.path().join("_cellar/access").is_dir());
        store.delete("log/x").await.unwrap();
        assert!(dir.path().join("log").is_dir());
        store
            .put_bytes("_cellar/access/d1/c", Bytes::from_static(b"2"))
            .await
            .unwrap();
        assert_eq!(
            keys(&store, "_cellar/access/").await,
            ["_cellar/access/d1/c"]
        );
    }

    /// Logs and `cellar import` name the store by its absolute path.
    #[test]
    fn the_store_is_described_by_its_absolute_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        assert_eq!(store.describe(), format!("file://{}", dir.path().display()));
    }

    /// A writer dropped without a commit or an abort (its request gone) leaves no staged
    /// file: removed at once when dropped outside a runtime (in the background within one).
    #[test]
    fn a_dropped_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let w = rt.block_on(async {
            let mut w = store.writer("nar/x.nar").await.unwrap();
            w.write(Bytes::from_static(b"half")).await.unwrap();
            w
        });
        let staged = || std::fs::read_dir(dir.path().join(STAGING)).unwrap().count();
        assert_eq!(staged(), 1);
        drop(w);
        assert_eq!(staged(), 0);
        // A committed one (dropped by its commit) leaves its object.
        rt.block_on(async {
            let mut w = store.writer("nar/y.nar").await.unwrap();
            w.write(Bytes::from_static(b"whole")).await.unwrap();
            w.commit().await.unwrap();
        });
        assert_eq!(
            std::fs::read(dir.path().join("nar/y.nar")).unwrap(),
            b"whole"
        );
    }

    /// Only a dot file ending in the copy's suffix is a copy beside an object.
    #[test]
    fn copies_beside_are_dot_files_with_the_suffix() {
        use std::ffi::OsStr;
        assert!(is_copy_beside(OsStr::new(".0a1b.cellar-tmp")));
        for name in ["0a1b.cellar-tmp", ".0a1b", ".cellar-tmp.x", "x.nar"] {
            assert!(!is_copy_beside(OsStr::new(name)), "{name}");
        }
    }

    /// An object that cannot be opened for another reason than its absence (a link that
    /// loops) is an error: callers take a miss at its word (`verify --repair` deletes what
    /// names a missing NAR).
    #[tokio::test]
    async fn an_object_that_cannot_be_opened_is_an_error_not_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        std::fs::create_dir_all(dir.path().join("nar")).unwrap();
        std::os::unix::fs::symlink("x.nar", dir.path().join("nar/x.nar")).unwrap();
        assert!(matches!(
            store.get("nar/x.nar", None).await,
            Err(StoreError::Other(_))
        ));
        assert!(store.get_bytes("nar/x.nar", 10).await.is_err());
        assert!(store.head("nar/x.nar").await.is_err());
    }

    /// The maintenance commands open only a store directory that exists, and say which
    /// setting names the one that does not.
    #[test]
    fn maintenance_opens_only_an_existing_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(LocalStore::open_existing(dir.path()).is_ok());
        let missing = dir.path().join("cache");
        let e = LocalStore::open_existing(&missing).err().expect("opened");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("store.path"), "{e}");
        assert!(!missing.exists(), "created");
        std::fs::write(&missing, b"a file").unwrap();
        assert!(LocalStore::open_existing(&missing).is_err());
    }

    /// A large object's file truncated in place after it was opened ends its body with an
    /// error, not early with the bytes that were left (a reader told its length would take
    /// them for the whole object).
    #[tokio::test]
    async fn a_file_truncated_while_streamed_fails_its_body() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let size = WHOLE_READ_MAX as usize + 100;
        std::fs::create_dir_all(dir.path().join("nar")).unwrap();
        let path = dir.path().join("nar/x.nar");
        std::fs::write(&path, vec![1u8; size]).unwrap();
        let obj = store.get("nar/x.nar", None).await.unwrap().unwrap();
        assert_eq!(obj.length, Some(size as u64));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(10)
            .unwrap();
        let read: Result<Vec<Bytes>, _> = obj.body.try_collect().await;
        let e = read.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }

    /// A large file streams in chunks of [`READ_BUFFER`] (the last one what is left), whole or
    /// a range of it, byte for byte.
    #[tokio::test]
    async fn large_files_stream_in_read_buffer_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..READ_BUFFER * 5 / 2).map(|i| (i % 251) as u8).collect();
        std::fs::create_dir_all(dir.path().join("nar")).unwrap();
        std::fs::write(dir.path().join("nar/x.nar"), &data).unwrap();
        let chunks = |obj: Object| async {
            let read: Vec<Bytes> = obj.body.try_collect().await.unwrap();
            read
        };
        let whole = chunks(store.get("nar/x.nar", None).await.unwrap().unwrap()).await;
        let sizes: Vec<usize> = whole.iter().map(Bytes::len).collect();
        assert_eq!(sizes, [READ_BUFFER, READ_BUFFER, READ_BUFFER / 2]);
        assert!(whole.concat() == data);
        let from = READ_BUFFER as u64 / 2 + 7;
        let range = ByteRange::From {
            start: from,
            end: None,
        };
        let tail = chunks(store.get("nar/x.nar", Some(range)).await.unwrap().unwrap()).await;
        let sizes: Vec<usize> = tail.iter().map(Bytes::len).collect();
        assert_eq!(sizes, [READ_BUFFER, READ_BUFFER - 7]);
        assert!(tail.concat() == data[from as usize..]);
    }

    /// The next chunk is read while the reader still holds the one before: with the body not
    /// polled again, a writer can still hand its next megabyte to the file (a pipe here, which
    /// holds 64 KiB unless someone reads it).
    #[tokio::test]
    async fn the_next_chunk_is_read_before_it_is_asked_for() {
        use futures::StreamExt as _;
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let (send, to_write) = std::sync::mpsc::channel::<Vec<u8>>();
        let (wrote, written) = std::sync::mpsc::channel::<()>();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let mut pipe = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            for chunk in to_write {
                pipe.write_all(&chunk).unwrap();
                wrote.send(()).unwrap();
            }
        });
        let file = std::fs::File::open(&fifo).unwrap();
        let mut body = read_ahead(file, 2 * READ_BUFFER as u64);
        send.send(vec![1; READ_BUFFER]).unwrap();
        assert_eq!(body.next().await.unwrap().unwrap(), vec![1; READ_BUFFER]);
        written.recv().unwrap();
        send.send(vec![2; READ_BUFFER]).unwrap();
        // A generous bound only turns a writer blocked for good into a failure.
        let taken = written.recv_timeout(std::time::Duration::from_secs(60));
        assert!(
            taken.is_ok(),
            "the second megabyte was not read until asked for"
        );
        assert_eq!(body.next().await.unwrap().unwrap(), vec![2; READ_BUFFER]);
        assert!(body.next().await.is_none());
    }

    /// Reads up to [`WHOLE_READ_MAX`] are done whole in one blocking call; larger ones stream.
    #[test]
    fn small_reads_are_whole_and_large_ones_stream() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; WHOLE_READ_MAX as usize + 100]).unwrap();
        let whole = open_for_read(&path, Some(ByteRange::Suffix(WHOLE_READ_MAX))).unwrap();
        assert!(matches!(whole, Some(Opened::Read(ref b, _)) if b.len() as u64 == WHOLE_READ_MAX));
        let large = open_for_read(&path, None).unwrap();
        assert!(matches!(large, Some(Opened::File(_, n, None)) if n == WHOLE_READ_MAX + 100));
    }
}
