//! The NAR cache's files. One directory:
//!
//! ```text
//! <dir>/<nar file name>        a complete NAR, byte for byte as the store holds it
//! <dir>/<nar file name>.meta   "<size> xxh3-128:<checksum in hex>\n" (see [`Checksum`])
//! <dir>/.tmp/<random hex>      a NAR being written; emptied at start-up
//! <dir>/.cellar-nar-cache      the marker: this directory is cellar's NAR cache, locked
//!                              (flock) by the process using it
//! ```
//!
//! cellar deletes files here, so it must never take another directory for its cache (one
//! pointed at the working directory would otherwise delete the signing key in it). It creates
//! the marker only in a new or empty directory, refuses to start in a non-empty directory
//! without one, and even with one only ever removes files of the shapes above. Two processes
//! never share one cache (each removes the other's temporary files at start and evicts files
//! the other indexed): the second to open it is refused while the first holds its lock.
//!
//! A NAR is written under `.tmp/`, then its `.meta` is written, then it is renamed to its
//! final name ([`Disk::publish`]): a file under a NAR name is always complete, and its `.meta`
//! says what it must hash to. At start-up ([`Disk::open`]) the directory is listed, names
//! only, and `.tmp/` and `.meta` files without their NAR are removed; each NAR is then looked
//! at ([`Disk::examine`], in the background or on its first use) and removed if its size is not
//! its `.meta`'s; the rest is hashed before its first use ([`Disk::verify`]), because a file of
//! the right size can still hold the wrong bytes.

use std::fmt;
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::Digest as _;
use xxhash_rust::xxh3::Xxh3;

use crate::nix::NarFileName;
use crate::store::local::LocalStore;
use crate::store::{ByteRange, Object, Store as _, StoreError};

/// Temporary files, inside the cache directory so that publishing is a rename.
const TMP: &str = ".tmp";
const META_SUFFIX: &str = ".meta";
/// Says the directory is a NAR cache that cellar made (see the module doc).
const MARKER: &str = ".cellar-nar-cache";
const MARKER_TEXT: &str =
    "This directory is cellar's NAR disk cache (cache.nar_dir): cellar deletes files in it.\n";
/// How much of a file verification reads at a time.
const HASH_CHUNK: usize = 1 << 20;

/// What a cache file must hash to, as its `.meta` says. New files get an xxh3-128 checksum: it
/// finds torn and corrupted files (the point of hashing them: not an attacker, who could rewrite
/// the `.meta` too) at many times the speed of sha256, which took a quarter of a cold fill's CPU.
/// `.meta` files of older versions hold a bare sha256 in hex, still checked as such.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Checksum {
    Xxh3([u8; 16]),
    Sha256([u8; 32]),
}

const XXH3_PREFIX: &str = "xxh3-128:";

impl Checksum {
    fn parse(text: &str) -> Option<Self> {
        match text.strip_prefix(XXH3_PREFIX) {
            Some(hex) => Some(Self::Xxh3(hex::decode(hex).ok()?.try_into().ok()?)),
            None => Some(Self::Sha256(hex::decode(text).ok()?.try_into().ok()?)),
        }
    }

    pub(super) fn render(&self) -> String {
        match self {
            Self::Xxh3(h) => format!("{XXH3_PREFIX}{}", hex::encode(h)),
            Self::Sha256(h) => hex::encode(h),
        }
    }

    /// The checksum new files get, of `data`.
    pub(super) fn of(data: &[u8]) -> Self {
        let mut h = Checksummer::default();
        h.update(data);
        h.finish()
    }
}

/// Computes the [`Checksum`] of a new file from its bytes, in pieces.
#[derive(Default)]
pub(super) struct Checksummer(Xxh3);

impl Checksummer {
    pub(super) fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub(super) fn finish(&self) -> Checksum {
        Checksum::Xxh3(self.0.digest128().to_be_bytes())
    }
}

/// Whether `e` says the file system is full (ENOSPC), or the quota of the cache's user or
/// subvolume is (EDQUOT: user quotas, btrfs qgroups, XFS project quotas): both pause caching
/// instead of failing fill after fill.
pub(super) fn is_disk_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// Why a cache file could not be written.
#[derive(Debug)]
pub(super) enum WriteError {
    /// The file system is full: worth pausing caching for, not worth a log line each time.
    DiskFull,
    /// No random name for a temporary file.
    NoRandom(getrandom::Error),
    /// A file begun in the cache's directory before it was replaced or made anew
    /// ([`Disk::replaced`], [`Disk::reclaim`]): not published.
    Stale,
    Io {
        what: &'static str,
        path: PathBuf,
        cause: io::Error,
    },
}

impl WriteError {
    pub(super) fn io(what: &'static str, path: &Path, cause: io::Error) -> Self {
        if is_disk_full(&cause) {
            Self::DiskFull
        } else {
            Self::Io {
                what,
                path: path.to_owned(),
                cause,
            }
        }
    }
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DiskFull => f.write_str("no space left on the cache's file system"),
            Self::NoRandom(e) => write!(f, "no random name for a temporary file: {e}"),
            Self::Stale => f.write_str("begun before the cache's directory was made anew"),
            Self::Io { what, path, cause } => write!(f, "{what} {}: {cause}", path.display()),
        }
    }
}

/// Why a file found at start-up may not be served.
#[derive(Debug)]
pub(super) enum VerifyError {
    Unreadable(io::Error),
    Mismatch,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreadable(e) => write!(f, "cannot read it: {e}"),
            Self::Mismatch => f.write_str("its size or checksum differs from its .meta"),
        }
    }
}

/// When a cache file was last used, as its metadata can tell after a restart: the later of
/// its write and its last read. The file system records reads as the access time: with
/// Linux's default `relatime`, a file's first read after its write and then one a day, so the
/// order of eviction after a restart follows the use of files to within a day. On a file
/// system mounted `noatime` this is the order of writing.
fn last_use(m: &std::fs::Metadata) -> std::time::SystemTime {
    let written = m.modified().unwrap_or(UNIX_EPOCH);
    m.accessed().map_or(written, |read| read.max(written))
}

/// What [`Disk::open`] found in the directory.
pub(super) struct Opened {
    pub disk: Disk,
    /// The names of the NAR files, sorted, each to be looked at ([`Disk::examine`]).
    pub nars: Vec<String>,
    /// Files cellar did not write there (left alone).
    pub foreign: Vec<PathBuf>,
}

/// A complete NAR found at start-up: its size and checksum by its `.meta`, which its file's
/// size matches.
pub(super) struct Found {
    pub size: u64,
    pub checksum: Checksum,
    /// When it was last used (see [`last_use`]).
    pub used: std::time::SystemTime,
}

/// A file under `.tmp/`, removed when dropped unless [`Disk::publish`] gave it its name.
pub(super) struct TempFile {
    path: PathBuf,
    /// The [`Disk`]'s generation it was made in.
    generation: u64,
    /// Cleared once the file has its final name.
    remove_on_drop: bool,
}

impl TempFile {
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// A read handle of its own, for readers tailing the file while it is written.
    pub(super) fn reader(&self) -> Result<std::fs::File, WriteError> {
        std::fs::File::open(&self.path).map_err(|e| WriteError::io("opening", &self.path, e))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.remove_on_drop {
            // Best effort: `.tmp/` is emptied at the next start anyway.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

pub(super) struct Disk {
    dir: PathBuf,
    tmp: PathBuf,
    /// Serves complete files, ranges included.
    files: LocalStore,
    /// The marker, locked for as long as this process uses the directory; replaced when the
    /// directory is made anew ([`Disk::reclaim`]).
    lock: std::sync::Mutex<std::fs::File>,
    /// How many times the directory was made anew: a temporary file of an earlier one cannot
    /// be published (its directory is gone), which says nothing of the current one.
    generation: std::sync::atomic::AtomicU64,
}

impl Disk {
    /// Opens `dir` (created if missing), removes what an interrupted run left (`.tmp/`, and
    /// `.meta` files without their NAR), and returns the names of the NARs and the files that
    /// are not cellar's. Names only: a large cache on a slow disk lists in a second, where
    /// reading every `.meta` takes minutes (the NARs are looked at later, [`Self::examine`]).
    pub(super) fn open(dir: &Path) -> io::Result<Opened> {
        let lock = claim(dir)?;
        let tmp = dir.join(TMP);
        std::fs::create_dir_all(&tmp)?;
        for e in std::fs::read_dir(&tmp)?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        let disk = Self {
            dir: dir.to_owned(),
            tmp,
            files: LocalStore::open(dir)?,
            lock: std::sync::Mutex::new(lock),
            generation: std::sync::atomic::AtomicU64::new(0),
        };
        let mut nars = Vec::new();
        let mut foreign = Vec::new();
        let mut metas = Vec::new();
        for e in std::fs::read_dir(dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(nar) = name.strip_suffix(META_SUFFIX) {
                if nar.parse::<NarFileName>().is_ok() {
                    metas.push(nar.to_owned());
                }
                continue;
            }
            if name.starts_with('.') || name == LOST_FOUND {
                continue;
            }
            if name.parse::<NarFileName>().is_err() {
                // Not a name cellar writes here: not cellar's to delete.
                foreign.push(e.path());
                continue;
            }
            nars.push(name);
        }
        nars.sort_unstable();
        // `.meta` files whose NAR is gone (the rename never happened): nothing else uses the
        // directory yet.
        for nar in metas {
            if nars.binary_search(&nar).is_err() {
                let _ = std::fs::remove_file(disk.meta_path(&nar));
            }
        }
        foreign.sort();
        Ok(Opened {
            disk,
            nars,
            foreign,
        })
    }

    /// Looks at the NAR file `name` found at start-up: `None` if it is incomplete (no `.meta`,
    /// one that does not parse, or a file not of its size), to be removed; an error if either
    /// could not be read now (out of file descriptors while every client comes back, an I/O
    /// error), which says nothing of the file.
    pub(super) fn examine(&self, name: &str) -> io::Result<Option<Found>> {
        let gone = |e: io::Error| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::InvalidData => Ok(None),
            _ => Err(e),
        };
        let text = match std::fs::read_to_string(self.meta_path(name)) {
            Ok(text) => text,
            Err(e) => return gone(e),
        };
        let Some((size, checksum)) = parse_meta(&text) else {
            return Ok(None);
        };
        let m = match std::fs::symlink_metadata(self.dir.join(name)) {
            Ok(m) => m,
            Err(e) => return gone(e),
        };
        Ok((m.len() == size).then(|| Found {
            size,
            checksum,
            used: last_use(&m),
        }))
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the directory this process locked is no longer at its path: removed, renamed
    /// or replaced while in use (its marker gone, or another file than the one locked).
    pub(super) fn replaced(&self) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        let held = crate::sync::lock(&self.lock).metadata();
        match (std::fs::metadata(self.dir.join(MARKER)), held) {
            (Ok(now), Ok(held)) => (now.dev(), now.ino()) != (held.dev(), held.ino()),
            (Err(e), _) => e.kind() == io::ErrorKind::NotFound,
            (Ok(_), Err(_)) => false,
        }
    }

    /// Makes the directory anew after it was removed or replaced ([`Self::replaced`]): as at
    /// start-up, only where it is missing or empty (or cellar's and unlocked), and locked.
    pub(super) fn reclaim(&self) -> io::Result<()> {
        // A marked directory holding NARs (another cellar's, stopped since) is taken at a
        // start only, which indexes its files: taken here, they would lie there uncounted.
        let marked = self.dir.join(MARKER).is_file();
        if let (true, Ok(entries)) = (marked, std::fs::read_dir(&self.dir)) {
            let held = entries.flatten().any(|e| {
                let name = e.file_name();
                name != MARKER && name != TMP && name != LOST_FOUND
            });
            if held {
                return Err(io::Error::other(format!(
                    "{} holds files of another cache; restart cellar to take it",
                    self.dir.display()
                )));
            }
        }
        let lock = claim(&self.dir)?;
        std::fs::create_dir_all(&self.tmp)?;
        *crate::sync::lock(&self.lock) = lock;
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    fn meta_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}{META_SUFFIX}"))
    }

    /// Opens the complete file of `name`.
    pub(super) async fn read(
        &self,
        name: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<Object>, StoreError> {
        self.files.get(name, range).await
    }

    /// Bytes available to this process on the cache's file system; `None` if unknown.
    pub(super) fn free_bytes(&self) -> Option<u64> {
        rustix::fs::statvfs(&self.dir)
            .ok()
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
    }

    /// A new, empty temporary file, open for writing.
    pub(super) fn create_temp(&self) -> Result<(TempFile, std::fs::File), WriteError> {
        let mut rnd = [0u8; 12];
        getrandom::getrandom(&mut rnd).map_err(WriteError::NoRandom)?;
        let tmp = TempFile {
            path: self.tmp.join(hex::encode(rnd)),
            generation: self.generation.load(std::sync::atomic::Ordering::SeqCst),
            remove_on_drop: true,
        };
        let create = || std::fs::File::create(&tmp.path);
        let writer = match create() {
            // `.tmp/` alone removed (a clean-up by hand): made again, in the directory this
            // process holds only (not in one an `rm -rf` is emptying, nor another's).
            Err(e) if e.kind() == io::ErrorKind::NotFound && !self.replaced() => {
                std::fs::create_dir(&self.tmp).and_then(|()| create())
            }
            created => created,
        }
        .map_err(|e| WriteError::io("creating", &tmp.path, e))?;
        Ok((tmp, writer))
    }

    /// Gives a complete temporary file its name: `.meta` first, then the rename, so that a
    /// NAR name never points at a file without its size and hash.
    pub(super) fn publish(
        &self,
        mut tmp: TempFile,
        name: &str,
        size: u64,
        checksum: Checksum,
    ) -> Result<(), WriteError> {
        if tmp.generation != self.generation.load(std::sync::atomic::Ordering::SeqCst)
            || self.replaced()
        {
            return Err(WriteError::Stale);
        }
        let meta = self.meta_path(name);
        let text = format!("{size} {}\n", checksum.render());
        let written = std::fs::File::create(&meta)
            .and_then(|mut m| m.write_all(text.as_bytes()))
            .map_err(|e| WriteError::io("writing", &meta, e));
        let dest = self.dir.join(name);
        let renamed = written.and_then(|()| {
            std::fs::rename(&tmp.path, &dest).map_err(|e| WriteError::io("renaming to", &dest, e))
        });
        match renamed {
            Ok(()) => tmp.remove_on_drop = false,
            Err(_) => {
                let _ = std::fs::remove_file(&meta);
            }
        }
        renamed
    }

    /// Writes a NAR held whole in memory to a temporary file, to be published; its checksum.
    pub(super) fn write_temp(&self, data: &[u8]) -> Result<(TempFile, Checksum), WriteError> {
        let (tmp, mut file) = self.create_temp()?;
        file.write_all(data)
            .map_err(|e| WriteError::io("writing", &tmp.path, e))?;
        Ok((tmp, Checksum::of(data)))
    }

    /// Writes a NAR held whole in memory; its checksum.
    #[cfg(test)]
    pub(super) fn write_whole(&self, name: &str, data: &[u8]) -> Result<Checksum, WriteError> {
        let (tmp, checksum) = self.write_temp(data)?;
        self.publish(tmp, name, data.len() as u64, checksum)?;
        Ok(checksum)
    }

    /// Hashes the file of `name` and compares it with its expected size and checksum.
    pub(super) fn verify(&self, name: &str, expected: (u64, Checksum)) -> Result<(), VerifyError> {
        let actual =
            hash_file(&self.dir.join(name), &expected.1).map_err(VerifyError::Unreadable)?;
        if actual == expected {
            Ok(())
        } else {
            Err(VerifyError::Mismatch)
        }
    }

    /// Removes the file of `name` and its `.meta`. Readers holding the file open keep
    /// reading it; only the name goes.
    /// An error other than the file missing already is the first one met (the `.meta` is
    /// tried all the same).
    pub(super) fn remove(&self, name: &str) -> io::Result<()> {
        let mut failed = Ok(());
        for f in [self.dir.join(name), self.meta_path(name)] {
            match std::fs::remove_file(f) {
                Err(e) if e.kind() != io::ErrorKind::NotFound && failed.is_ok() => failed = Err(e),
                _ => {}
            }
        }
        failed
    }
}

/// What `mkfs` puts at the root of a file system: neither cellar's nor foreign to report.
const LOST_FOUND: &str = "lost+found";

/// Makes sure `dir` is a NAR cache cellar may delete files in: creates it (with the marker) if
/// missing or empty, accepts it if it has the marker, refuses it otherwise; then locks the
/// marker, refusing a directory another process holds.
fn claim(dir: &Path) -> io::Result<std::fs::File> {
    std::fs::create_dir_all(dir)?;
    let marker = dir.join(MARKER);
    if !claimable(dir)? {
        std::fs::write(&marker, MARKER_TEXT)?;
    }
    // Opened for writing: an exclusive lock over NFS needs a file open for writing.
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&marker)?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(io::Error::other(format!(
            "{} is the NAR cache of another running cellar; give each process a cache.nar_dir \
             of its own",
            dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Whether `dir` may be taken as a NAR cache (changing nothing): `Ok(true)` if it has the
/// marker, `Ok(false)` if it is missing or empty (the marker is then to be written), an error
/// if it holds files cellar did not make.
pub(super) fn claimable(dir: &Path) -> io::Result<bool> {
    if dir.join(MARKER).is_file() {
        return Ok(true);
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    // The root of a freshly made file system (a volume of its own) holds `lost+found`; an
    // `rm -rf` of the cache that ended half-way may leave `.tmp/` with temporary files.
    if entries.flatten().any(|e| {
        e.file_name() != LOST_FOUND && !(e.file_name() == TMP && only_temporary(&e.path()))
    }) {
        return Err(io::Error::other(format!(
            "{} is not empty and has no {MARKER} file, so it is not a NAR cache cellar \
             made; cellar deletes files in its NAR cache, so point cache.nar_dir at a new \
             or empty directory of its own",
            dir.display()
        )));
    }
    Ok(false)
}

/// Whether `dir` holds nothing but files named as cellar names its temporary files (24 hex
/// digits, [`Disk::create_temp`]).
fn only_temporary(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().all(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        name.len() == 24
            && name.bytes().all(|b| b.is_ascii_hexdigit())
            && e.file_type().is_ok_and(|t| t.is_file())
    })
}

fn parse_meta(text: &str) -> Option<(u64, Checksum)> {
    let (size, hash) = text.trim().split_once(' ')?;
    Some((size.parse().ok()?, Checksum::parse(hash)?))
}

/// The size and checksum of the file at `path`, of the same kind as `like`.
fn hash_file(path: &Path, like: &Checksum) -> io::Result<(u64, Checksum)> {
    let mut f = std::fs::File::open(path)?;
    let mut xxh3 = Checksummer::default();
    let mut sha256 = sha2::Sha256::new();
    let mut buf = vec![0u8; HASH_CHUNK];
    let mut n = 0u64;
    loop {
        let r = f.read(&mut buf)?;
        if r == 0 {
            break;
        }
        match like {
            Checksum::Xxh3(_) => xxh3.update(&buf[..r]),
            Checksum::Sha256(_) => sha256.update(&buf[..r]),
        }
        n += r as u64;
    }
    Ok(match like {
        Checksum::Xxh3(_) => (n, xxh3.finish()),
        Checksum::Sha256(_) => (n, Checksum::Sha256(sha256.finalize().into())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar.xz";

    /// A directory replaced while this process holds the old one (emptied by `rm -rf`, taken
    /// by another process): nothing is written into it, neither `.tmp/` made again there nor a
    /// file begun before published there; once made anew here, both work again.
    #[test]
    fn nothing_is_written_into_a_directory_not_held() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("cache");
        let Opened { disk, .. } = Disk::open(&dir).unwrap();
        let (begun, checksum) = disk.write_temp(b"nar").unwrap();
        std::fs::rename(&dir, parent.path().join("old")).unwrap();
        std::fs::create_dir(&dir).unwrap();
        assert!(disk.replaced());
        assert!(matches!(
            disk.publish(begun, NAME, 3, checksum),
            Err(WriteError::Stale)
        ));
        assert!(disk.write_temp(b"nar").is_err(), "wrote into the new one");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        disk.reclaim().unwrap();
        assert!(!disk.replaced());
        disk.write_whole(NAME, b"nar").unwrap();
        assert!(dir.join(NAME).is_file());
    }

    #[test]
    fn enospc_is_disk_full() {
        let nospc = io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error());
        assert!(is_disk_full(&nospc));
        let quota = io::Error::from_raw_os_error(rustix::io::Errno::DQUOT.raw_os_error());
        assert!(is_disk_full(&quota));
        assert!(!is_disk_full(&io::Error::from(
            io::ErrorKind::PermissionDenied
        )));
        assert!(matches!(
            WriteError::io("writing", Path::new("x"), nospc),
            WriteError::DiskFull
        ));
    }

    #[test]
    fn written_files_survive_a_reopen_and_verify() {
        let d = tempfile::tempdir().unwrap();
        let Opened { disk, nars, .. } = Disk::open(d.path()).unwrap();
        assert!(nars.is_empty());
        let sum = disk.write_whole(NAME, b"hello").unwrap();
        // xxh3-128 of "hello" (the reference implementation's `xxh128sum`).
        let hello = "b5e9c1ad071b3e7fc779cfaa5e523818";
        assert_eq!(sum.render(), format!("xxh3-128:{hello}"));
        let meta = std::fs::read_to_string(d.path().join(format!("{NAME}.meta"))).unwrap();
        assert_eq!(meta, format!("5 xxh3-128:{hello}\n"));
        assert!(disk.verify(NAME, (5, sum)).is_ok());
        assert!(matches!(
            disk.verify(NAME, (5, Checksum::Xxh3([0; 16]))),
            Err(VerifyError::Mismatch)
        ));
        assert!(matches!(
            disk.verify(NAME, (4, sum)),
            Err(VerifyError::Mismatch)
        ));

        drop(disk);
        let Opened { disk, nars, .. } = Disk::open(d.path()).unwrap();
        assert_eq!(nars, [NAME]);
        let found = disk.examine(NAME).unwrap().unwrap();
        assert_eq!((found.size, found.checksum), (5, sum));
    }

    #[test]
    fn files_of_older_versions_are_checked_with_their_sha256() {
        let d = tempfile::tempdir().unwrap();
        drop(Disk::open(d.path()).unwrap());
        std::fs::write(d.path().join(NAME), b"hello").unwrap();
        let sha256_of_hello = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        std::fs::write(
            d.path().join(format!("{NAME}.meta")),
            format!("5 {sha256_of_hello}\n"),
        )
        .unwrap();
        let Opened { disk, nars, .. } = Disk::open(d.path()).unwrap();
        assert_eq!(nars, [NAME]);
        let found = disk.examine(NAME).unwrap().unwrap();
        let expected = (found.size, found.checksum);
        assert!(matches!(expected.1, Checksum::Sha256(_)));
        assert!(disk.verify(NAME, expected).is_ok());
        std::fs::write(d.path().join(NAME), b"jello").unwrap();
        assert!(matches!(
            disk.verify(NAME, expected),
            Err(VerifyError::Mismatch)
        ));
    }

    #[test]
    fn a_cache_directory_is_used_by_one_process_at_a_time() {
        let d = tempfile::tempdir().unwrap();
        let Opened { disk: first, .. } = Disk::open(d.path()).unwrap();
        let e = Disk::open(d.path()).err().unwrap().to_string();
        assert!(e.contains("another running cellar"), "{e}");
        drop(first);
        assert!(
            Disk::open(d.path()).is_ok(),
            "free again once the first is gone"
        );
    }

    #[test]
    fn open_removes_leftovers() {
        let d = tempfile::tempdir().unwrap();
        let Opened { disk, .. } = Disk::open(d.path()).unwrap();
        let (tmp, _) = disk.create_temp().unwrap();
        let tmp_path = tmp.path().to_owned();
        std::mem::forget(tmp); // as if the process died mid-fill
        std::fs::write(d.path().join("not-a-nar"), b"x").unwrap();
        std::fs::write(d.path().join(NAME), b"no meta").unwrap();
        let orphan_meta = format!("{}{META_SUFFIX}", NAME.replacen('0', "1", 1));
        std::fs::write(d.path().join(&orphan_meta), b"1 00").unwrap();
        let short = NAME.replacen('0', "2", 1);
        std::fs::write(d.path().join(&short), b"short").unwrap();
        let meta = format!("6 {}\n", Checksum::Xxh3([0; 16]).render());
        std::fs::write(d.path().join(format!("{short}{META_SUFFIX}")), meta).unwrap();

        drop(disk);
        let Opened {
            disk,
            nars,
            foreign,
        } = Disk::open(d.path()).unwrap();
        assert!(!tmp_path.exists());
        assert!(!d.path().join(&orphan_meta).exists());
        // The NARs are listed, to be looked at: one without its `.meta`, one not its size.
        assert_eq!(nars, [NAME.to_owned(), short.clone()]);
        assert!(disk.examine(NAME).unwrap().is_none());
        assert!(disk.examine(&short).unwrap().is_none());
        // A `.meta` that cannot be read now says nothing of its file.
        std::fs::create_dir(d.path().join(format!("{NAME}{META_SUFFIX}"))).unwrap();
        assert!(disk.examine(NAME).is_err());
        // Only files of the shapes cellar writes are removed; others are reported.
        assert!(d.path().join("not-a-nar").exists());
        assert_eq!(foreign, [d.path().join("not-a-nar")]);
    }

    #[test]
    fn only_a_new_empty_or_marked_directory_is_taken() {
        let d = tempfile::tempdir().unwrap();
        // The working directory of a first start: a signing key, a config.
        std::fs::write(d.path().join("cellar-key.sec"), b"secret").unwrap();
        let e = Disk::open(d.path()).err().unwrap().to_string();
        assert!(e.contains("cache.nar_dir") && e.contains(MARKER), "{e}");
        assert!(d.path().join("cellar-key.sec").exists());
        assert!(!d.path().join(MARKER).exists());

        let fresh = d.path().join("nars");
        Disk::open(&fresh).unwrap();
        assert!(fresh.join(MARKER).is_file());
        Disk::open(&fresh).unwrap(); // marked: taken again

        let empty = tempfile::tempdir().unwrap();
        Disk::open(empty.path()).unwrap();
        assert!(empty.path().join(MARKER).is_file());
    }

    #[test]
    fn a_dropped_temp_file_is_removed() {
        let d = tempfile::tempdir().unwrap();
        let Opened { disk, .. } = Disk::open(d.path()).unwrap();
        let (tmp, _) = disk.create_temp().unwrap();
        let path = tmp.path().to_owned();
        assert!(path.exists());
        drop(tmp);
        assert!(!path.exists());
    }
}
