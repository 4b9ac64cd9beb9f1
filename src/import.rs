//! `cellar import DIR`: brings a directory written by `nix copy --to file://DIR` into the
//! configured store through the same verification as HTTP uploads, references first. Paths
//! already in the store are skipped, so running it again imports nothing.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use futures::StreamExt as _;
use thiserror::Error;
use tokio::io::AsyncReadExt as _;
use tokio_util::io::ReaderStream;

use crate::error::{Error, UploadError};
use crate::nix::{
    references_first, DebugInfoLink, DebugInfoName, NarFileName, NarInfo, OutputName,
    RealisationName, StorePathBaseName, StorePathHash, MAX_DEBUGINFO_BYTES, MAX_NARINFO_BYTES,
};
use crate::store::{object_key, Store, StoreError};
use crate::upload::{
    RealisationStored, Uploader, MAX_LISTING_BYTES, MAX_LOG_BYTES, MAX_REALISATION_BYTES,
};

#[derive(Debug, Error)]
pub enum ImportError {
    #[error("cannot read {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// An import that stopped before its end (the store failed, or the directory could not be
/// read): what it did before, which stays done (a run again resumes), and why it stopped.
#[derive(Debug, Error)]
#[error("{cause}")]
pub struct Stopped {
    pub summary: Summary,
    #[source]
    pub cause: ImportError,
}

#[derive(Debug, Default)]
pub struct Summary {
    pub imported: usize,
    pub skipped: usize,
    /// Of those skipped, the paths the directory mended: signatures it brings added to the
    /// stored narinfo, or its NAR, missing from the store, copied back.
    pub mended: usize,
    /// Of those skipped, the paths it could not mend, and why (they stay as they are, and
    /// count as present: said, not rejected).
    pub not_mended: Vec<(String, String)>,
    /// Realisations written (new, or the stored one with signatures added).
    pub realisations: usize,
    /// Store path (or file) and why it was refused.
    pub rejected: Vec<(String, String)>,
}

/// Progress callbacks, so the CLI can draw a bar and tests can stay quiet.
pub trait Progress {
    fn start(&self, total: usize);
    fn advance(&self, path: &str);
}

impl Progress for () {
    fn start(&self, _: usize) {}
    fn advance(&self, _: &str) {}
}

/// Files are read in chunks this large (as an HTTP body would arrive).
const READ_CHUNK: usize = 256 * 1024;

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImportError + '_ {
    move |source| ImportError::Read {
        path: path.to_owned(),
        cause: source,
    }
}

/// Whether a file of the directory may be a symbolic link: a narinfo, a NAR, a realisation or a
/// debug info link may (a cache assembled with `ln -s`; each is parsed and checked, so a link
/// to another file only gets it rejected); a build log or a listing may not, since they are
/// stored as they are: a link could lead to any file the user running the import can read
/// (the server's signing key, say), which would then be served as a path's log.
#[derive(Clone, Copy, PartialEq)]
enum Links {
    Followed,
    Refused,
}

/// Opens the file at `path` in the directory: a regular file (not a pipe or a device, which
/// would hang the import or read without end), not a link with [`Links::Refused`].
/// Directories on the way may be links (`nar/` on another disk). `None` if there is none.
async fn open_file(path: &Path, links: Links) -> std::io::Result<Option<tokio::fs::File>> {
    let refused = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{what}: not read"),
        )
    };
    let mut flags = rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY;
    if links == Links::Refused {
        match tokio::fs::symlink_metadata(path).await {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(refused(
                    "a symbolic link (a build log or listing must be the file itself)",
                ))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        }
        // Nor through a link put in its place since.
        flags |= rustix::fs::OFlags::NOFOLLOW;
    }
    // Without blocking on a pipe (opening one waits for a writer).
    let file = match tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(i32::try_from(flags.bits()).unwrap_or(0))
        .open(path)
        .await
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
            return Err(refused("a symbolic link"))
        }
        Err(e) => return Err(e),
    };
    let kind = file.metadata().await?.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "a directory"
        } else {
            "not a regular file (a pipe, a socket or a device)"
        };
        return Err(refused(what));
    }
    Ok(Some(file))
}

/// [`open_file`], a missing file an error.
async fn open_existing(path: &Path, links: Links) -> std::io::Result<tokio::fs::File> {
    open_file(path, links)
        .await?
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
}

/// The file at `path`, up to one byte past `limit`: enough to tell one over the limit, never
/// all of memory for a huge one.
async fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, ImportError> {
    let mut raw = Vec::new();
    open_existing(path, Links::Followed)
        .await
        .map_err(read_err(path))?
        .take(limit + 1)
        .read_to_end(&mut raw)
        .await
        .map_err(read_err(path))?;
    Ok(raw)
}

pub async fn import_dir(
    dir: &Path,
    store: &dyn Store,
    uploader: &Uploader,
    store_dir: &str,
    progress: &dyn Progress,
) -> Result<Summary, Stopped> {
    let mut summary = Summary::default();
    match import_into(dir, store, uploader, store_dir, progress, &mut summary).await {
        Ok(()) => Ok(summary),
        Err(cause) => Err(Stopped { summary, cause }),
    }
}

/// [`import_dir`], counting into `summary` as it goes.
async fn import_into(
    dir: &Path,
    store: &dyn Store,
    uploader: &Uploader,
    store_dir: &str,
    progress: &dyn Progress,
    summary: &mut Summary,
) -> Result<(), ImportError> {
    let mut entries: HashMap<StorePathHash, NarInfo> = HashMap::new();
    // Paths whose narinfo in `dir` was rejected as it was read: a path referring to one is
    // rejected before its NAR is copied unless the store has that reference already.
    let mut unreadable: HashSet<StorePathHash> = HashSet::new();
    let mut rd = tokio::fs::read_dir(dir).await.map_err(read_err(dir))?;
    while let Some(e) = rd.next_entry().await.map_err(read_err(dir))? {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".narinfo") else {
            continue;
        };
        let Ok(hash) = stem.parse::<StorePathHash>() else {
            summary
                .rejected
                .push((name.clone(), "not a <hash>.narinfo name".into()));
            continue;
        };
        // Bounded like an upload's narinfo, so a huge file is a rejection, not all of memory.
        // One that cannot be read (a link leading nowhere, a directory of that name) concerns
        // that path alone.
        let raw = match read_bounded(&e.path(), MAX_NARINFO_BYTES).await {
            Ok(raw) => raw,
            Err(err) => {
                summary.rejected.push((name, err.to_string()));
                unreadable.insert(hash);
                continue;
            }
        };
        if raw.len() as u64 > MAX_NARINFO_BYTES {
            let why = format!("larger than {MAX_NARINFO_BYTES} bytes");
            summary.rejected.push((name, why));
            unreadable.insert(hash);
            continue;
        }
        match NarInfo::parse_for(&raw, store_dir, hash) {
            Ok(info) => {
                entries.insert(hash, info);
            }
            Err(err) => {
                summary.rejected.push((name, format!("bad narinfo: {err}")));
                unreadable.insert(hash);
            }
        }
    }

    progress.start(entries.len());
    let mut refused = HashSet::new();
    for h in references_first(&entries) {
        let Some(info) = entries.remove(&h) else {
            continue;
        };
        let label = format!("{store_dir}/{}", info.store_path);
        progress.advance(&label);
        let deriver = info.deriver.clone();
        // One read of what the store holds for the path: nothing (imported), the same build
        // (mended from the directory), another build, or a narinfo that cannot be read. One
        // the root cannot serve (corrupt, its NAR not under `nar/`) counts as nothing: the
        // directory's replaces it, as an upload's does.
        let stored = match uploader.stored_to_replace(h).await {
            Err(Error::Store(s)) if stops(&s) => return Err(s.into()),
            other => other,
        };
        let fresh = matches!(stored, Ok(None));
        // A path whose reference was refused would be refused after its NAR was copied (an
        // orphan): refused before.
        let mut refused_reference = info
            .references
            .iter()
            .find(|r| r.hash() != h && refused.contains(&r.hash()))
            .cloned();
        if fresh && refused_reference.is_none() {
            for r in info
                .references
                .iter()
                .filter(|r| unreadable.contains(&r.hash()))
            {
                if store.head(&object_key::narinfo(r.hash())).await?.is_none() {
                    refused_reference = Some(r.clone());
                    break;
                }
            }
        }
        // The extras of a path already there are those of the build stored, which need not be
        // this one (not every build is reproducible): written only if it is the same NAR.
        let mut extras = fresh;
        let written = match (fresh, refused_reference) {
            (false, _) => {
                summary.skipped += 1;
                match stored {
                    // The same build: the directory may mend it.
                    Ok(Some(stored)) if stored.nar_hash == info.nar_hash => {
                        extras = has_extras(dir, h, deriver.as_ref());
                        match mend(dir, store, uploader, &stored, info).await {
                            Ok(mended) => {
                                summary.mended += usize::from(mended);
                                Ok(())
                            }
                            Err(Error::Store(s)) if stops(&s) => Err(Error::Store(s)),
                            // Still there as it was: skipped, said, and the paths above it
                            // imported.
                            Err(e) if store.head(&object_key::narinfo(h)).await?.is_some() => {
                                summary.not_mended.push((label.clone(), e.to_string()));
                                Ok(())
                            }
                            // Taken back and not imported again: gone, so rejected.
                            Err(e) => Err(e),
                        }
                    }
                    // Another build (not reproducible), or gone meanwhile: left as it is.
                    Ok(_) => Ok(()),
                    // The stored narinfo could not be read (stored in a coding cellar
                    // does not decode, too large): the path is in the store all the same,
                    // and the paths above it may refer to it; only its extras are left out.
                    Err(err) => {
                        if has_extras(dir, h, deriver.as_ref()) {
                            let what = format!("{label} (its listing or log)");
                            summary.rejected.push((what, err.to_string()));
                        }
                        Ok(())
                    }
                }
            }
            (true, Some(r)) => Err(Error::Upload(UploadError::Rejected(format!(
                "its reference {store_dir}/{r} was rejected"
            )))),
            (true, None) => import_one(dir, uploader, info).await,
        };
        match written {
            Ok(()) => {}
            // The store failing is not this path's fault: stop, and let the next run resume.
            Err(Error::Store(s)) if stops(&s) => return Err(s.into()),
            Err(err) => {
                refused.insert(h);
                summary.rejected.push((label, err.to_string()));
                continue;
            }
        }
        if fresh {
            summary.imported += 1;
        }
        if !extras {
            continue;
        }
        // The listing and log come after the narinfo (a rejected path leaves none behind), so
        // a path already there may lack them: a run stopped between the two completes them.
        match import_extras(dir, store, uploader, h, deriver.as_ref(), fresh).await {
            Ok(()) => {}
            Err(Error::Store(s)) if stops(&s) => return Err(s.into()),
            Err(err) => summary
                .rejected
                .push((format!("{label} (its listing or log)"), err.to_string())),
        }
    }
    import_debuginfo(dir, store, uploader, summary).await?;
    import_realisations(dir, uploader, summary).await?;
    Ok(())
}

/// The realisations of content-addressed derivations' outputs in `dir` (`realisations/<id>.doi`,
/// as Nix up to 2.32 writes them; `build-trace/<drv>/<output>` and
/// `build-trace-v2/<drv>/<output>.doi` after), after the paths: each is checked as its upload
/// is (the path it names must be in the store, `upload.trusted_keys`), and one stored already
/// gets the signatures it brings.
async fn import_realisations(
    dir: &Path,
    uploader: &Uploader,
    summary: &mut Summary,
) -> Result<(), ImportError> {
    // (a file's path under `dir`, its store key or why it has none)
    let mut found: Vec<(String, Result<String, String>)> = Vec::new();
    for name in files_in(&dir.join("realisations")).await? {
        let key = name
            .parse::<RealisationName>()
            .map(|r| object_key::realisation(&r))
            .map_err(|_| "not a realisation's name".to_owned());
        found.push((format!("realisations/{name}"), key));
    }
    for v2 in [false, true] {
        let top = if v2 { "build-trace-v2" } else { "build-trace" };
        for drv in dirs_in(&dir.join(top)).await? {
            for out in files_in(&dir.join(top).join(&drv)).await? {
                let key = match (drv.parse::<StorePathBaseName>(), v2) {
                    (Ok(d), true) => OutputName::from_doi_file(&out)
                        .map(|o| object_key::build_trace_v2(&d, &o))
                        .ok(),
                    (Ok(d), false) => out
                        .parse::<OutputName>()
                        .map(|o| object_key::build_trace(&d, &o))
                        .ok(),
                    (Err(_), _) => None,
                };
                let key = key.ok_or_else(|| "not a build trace's name".to_owned());
                found.push((format!("{top}/{drv}/{out}"), key));
            }
        }
    }
    found.sort();
    for (label, key) in found {
        let key = match key {
            Ok(k) => k,
            Err(why) => {
                summary.rejected.push((label, why));
                continue;
            }
        };
        // A file that cannot be read concerns that realisation alone.
        let raw = match read_bounded(&dir.join(&label), MAX_REALISATION_BYTES).await {
            Ok(raw) => raw,
            Err(e) => {
                summary.rejected.push((label, e.to_string()));
                continue;
            }
        };
        if raw.len() as u64 > MAX_REALISATION_BYTES {
            let why = format!("larger than {MAX_REALISATION_BYTES} bytes");
            summary.rejected.push((label, why));
            continue;
        }
        match uploader.put_realisation(&key, raw.into(), None).await {
            Ok(RealisationStored::Written) => summary.realisations += 1,
            Ok(RealisationStored::Unchanged) => {}
            Err(Error::Store(s)) if stops(&s) => return Err(s.into()),
            Err(err) => summary.rejected.push((label, err.to_string())),
        }
    }
    Ok(())
}

/// The names of the entries of `dir` of one kind (files, or directories with `dirs`), none if
/// it does not exist.
async fn entries_in(dir: &Path, dirs: bool) -> Result<Vec<String>, ImportError> {
    let mut rd = match tokio::fs::read_dir(dir).await {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read_err(dir)(e)),
    };
    let mut names = Vec::new();
    while let Some(e) = rd.next_entry().await.map_err(read_err(dir))? {
        // Through symbolic links, as Nix would read the directory.
        let is_dir = tokio::fs::metadata(e.path())
            .await
            .map_err(read_err(&e.path()))?
            .is_dir();
        if is_dir == dirs {
            names.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    Ok(names)
}

async fn files_in(dir: &Path) -> Result<Vec<String>, ImportError> {
    entries_in(dir, false).await
}

async fn dirs_in(dir: &Path) -> Result<Vec<String>, ImportError> {
    entries_in(dir, true).await
}

/// Whether a store error stops the import: the store failing (once it works again, a run
/// goes on where this one stopped), not one object in it that cannot be read (stored in a
/// coding cellar does not decode, larger than cellar reads), which is only that path's or
/// file's trouble: a rerun would stop there again.
fn stops(e: &StoreError) -> bool {
    !matches!(e, StoreError::Encoded { .. } | StoreError::TooLarge { .. })
}

/// The debug info links of `dir/debuginfo/` (`nix copy --to 'file://DIR?index-debug-info=true'`)
/// that the store lacks and whose NAR it holds, after the paths: a link to a NAR that was
/// not imported would lead nowhere.
async fn import_debuginfo(
    dir: &Path,
    store: &dyn Store,
    uploader: &Uploader,
    summary: &mut Summary,
) -> Result<(), ImportError> {
    let links = dir.join("debuginfo");
    let mut rd = match tokio::fs::read_dir(&links).await {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(read_err(&links)(e)),
    };
    while let Some(e) = rd.next_entry().await.map_err(read_err(&links))? {
        let file = e.file_name().to_string_lossy().into_owned();
        let label = format!("debuginfo/{file}");
        let Ok(name) = file.parse::<DebugInfoName>() else {
            summary
                .rejected
                .push((label, "not a debug info link's name".into()));
            continue;
        };
        if store.head(&object_key::debuginfo(&name)).await?.is_some() {
            continue;
        }
        let raw = match read_bounded(&e.path(), MAX_DEBUGINFO_BYTES).await {
            Ok(raw) => raw,
            Err(err) => {
                summary.rejected.push((label, err.to_string()));
                continue;
            }
        };
        let link = match DebugInfoLink::parse(&raw) {
            Ok(link) => link,
            Err(err) => {
                let why = format!("not a debug info link: {err}");
                summary.rejected.push((label, why));
                continue;
            }
        };
        if !uploader.has_nar(link.nar()).await? {
            let why = format!("its NAR {} is not in the store", link.nar());
            summary.rejected.push((label, why));
            continue;
        }
        match uploader.store_debuginfo(&name, raw.into()).await {
            Ok(()) => {}
            Err(Error::Store(s)) if stops(&s) => return Err(s.into()),
            Err(err) => summary.rejected.push((label, err.to_string())),
        }
    }
    Ok(())
}

/// Mends a path the store has (`stored`) from the directory's narinfo of the same build
/// (`info`): the signatures it brings that the stored narinfo lacks are added (a cache signed
/// by its old key keeps serving that key's signatures to clients that trust only it), and a
/// NAR the stored narinfo names that the store lacks is copied from the directory, as an
/// upload of the path would do. Whether it did either.
async fn mend(
    dir: &Path,
    store: &dyn Store,
    uploader: &Uploader,
    stored: &NarInfo,
    info: NarInfo,
) -> Result<bool, Error> {
    let adds = info.sigs.iter().any(|s| !stored.sigs.contains(s));
    let lacks_nar = match stored.nar_file() {
        Ok(name) => !uploader.has_nar(&name).await?,
        Err(_) => false,
    };
    if !(adds || lacks_nar) {
        return Ok(false);
    }
    let mut info = info;
    if !lacks_nar {
        // Signatures only: the NAR the store holds stands, under the name the stored
        // narinfo gives (another compression than the directory's, say), which the
        // directory's narinfo is made to give too (signatures do not cover it), so that no
        // NAR is copied.
        info.url.clone_from(&stored.url);
        info.compression = stored.compression;
        info.file_hash = stored.file_hash;
        info.file_size = stored.file_size;
    }
    let h = info.hash();
    match import_one(dir, uploader, info.clone()).await {
        // Mended if it changed: a signature the upload rules leave out (not by one of
        // `upload.trusted_keys`) adds nothing.
        Ok(()) => Ok(lacks_nar
            || uploader
                .stored(h)
                .await?
                .is_some_and(|now| now.sigs != stored.sigs)),
        // Its stored narinfo named a NAR of another name the store lacks, and was taken back
        // (see `Uploader::accept_narinfo`): the directory's build is imported in its place.
        Err(Error::Upload(_)) if store.head(&object_key::narinfo(h)).await?.is_none() => {
            import_one(dir, uploader, info).await.map(|()| true)
        }
        Err(e) => Err(e),
    }
}

/// Whether the directory has a listing or a build log for path `h`.
fn has_extras(dir: &Path, h: StorePathHash, deriver: Option<&StorePathBaseName>) -> bool {
    dir.join(format!("{h}.ls")).exists()
        || deriver.is_some_and(|d| dir.join("log").join(d.as_str()).exists())
}

async fn import_one(dir: &Path, uploader: &Uploader, info: NarInfo) -> Result<(), Error> {
    let fetch_nar = |name: NarFileName| async move {
        let path = dir.join("nar").join(name.as_str());
        let file = open_existing(&path, Links::Followed).await.map_err(|err| {
            Error::Upload(UploadError::Rejected(format!("{}: {err}", path.display())))
        })?;
        Ok(ReaderStream::with_capacity(file, READ_CHUNK))
    };
    let name = info.nar_file().ok();
    // Import has no upstreams: every reference must be in the store (or imported first).
    match uploader.copy_path(info.clone(), fetch_nar, None).await {
        Ok(_) => Ok(()),
        // The store's copy of its NAR, read back, was bad (cut short, another file under its
        // name): the directory's is copied over it, as a client's upload would be sent again.
        Err(Error::Upload(_)) if name.as_ref().is_some_and(|n| uploader.nar_found_bad(n)) => {
            uploader.copy_path(info, fetch_nar, None).await.map(|_| ())
        }
        Err(e) => Err(e),
    }
}

/// The extras that come with path `h`, when the directory has them and the store does not
/// (`fresh`: its narinfo was just written, so it has no listing yet), streamed and bounded
/// like their HTTP uploads.
async fn import_extras(
    dir: &Path,
    store: &dyn Store,
    uploader: &Uploader,
    h: StorePathHash,
    deriver: Option<&StorePathBaseName>,
    fresh: bool,
) -> Result<(), Error> {
    // Each on its own: a listing refused does not keep the log out.
    let mut refused = Vec::new();
    let listing = dir.join(format!("{h}.ls"));
    match open_file(&listing, Links::Refused).await {
        Ok(Some(f)) => {
            let key = object_key::listing(h);
            if fresh || store.head(&key).await?.is_none() {
                let body = ReaderStream::with_capacity(f, READ_CHUNK).boxed();
                if let Err(e) = uploader.put_plain(&key, body, MAX_LISTING_BYTES).await {
                    refused.push(e);
                }
            }
        }
        Ok(None) => {}
        Err(e) => refused.push(rejected(&listing, e)),
    }
    if let Some(drv) = deriver {
        let log = dir.join("log").join(drv.as_str());
        match open_file(&log, Links::Refused).await {
            Ok(Some(f)) => {
                if store.head(&object_key::log(drv)).await?.is_none() {
                    let body = ReaderStream::with_capacity(f, READ_CHUNK).boxed();
                    let key = object_key::log(drv);
                    if let Err(e) = uploader.put_plain(&key, body, MAX_LOG_BYTES).await {
                        refused.push(e);
                    }
                }
            }
            Ok(None) => {}
            Err(e) => refused.push(rejected(&log, e)),
        }
    }
    // The store failing stops the import; otherwise each refusal is said.
    if let Some(i) = refused
        .iter()
        .position(|e| matches!(e, Error::Store(s) if stops(s)))
    {
        return Err(refused.swap_remove(i));
    }
    match refused.len() {
        0 => Ok(()),
        1 => Err(refused.remove(0)),
        _ => Err(Error::Upload(UploadError::Rejected(
            refused
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        ))),
    }
}

/// A file of the directory that could not be read, as its path's rejection.
fn rejected(path: &Path, err: std::io::Error) -> Error {
    Error::Upload(UploadError::Rejected(format!("{}: {err}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, refs: &[&str]) -> (StorePathHash, NarInfo) {
        let text = format!(
            "StorePath: /nix/store/{name}\nURL: nar/x.nar\nCompression: none\n\
             NarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\nNarSize: 1\n\
             References: {}\n",
            refs.join(" ")
        );
        let info = NarInfo::parse(&text, "/nix/store").unwrap();
        (info.hash(), info)
    }

    #[tokio::test]
    async fn a_narinfo_over_the_size_limit_is_rejected_unread() {
        let dir = tempfile::tempdir().unwrap();
        let (hash, _) = entry("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a", &[]);
        let huge = vec![b'x'; MAX_NARINFO_BYTES as usize + 1];
        std::fs::write(dir.path().join(format!("{hash}.narinfo")), huge).unwrap();
        let mem = std::sync::Arc::new(crate::store::memory::MemoryStore::new());
        let store: std::sync::Arc<dyn Store> = mem.clone();
        let cfg = crate::config::Config::default();
        let uploader = Uploader::new(&cfg.upload, "/nix/store", store.clone());
        let s = import_dir(dir.path(), &*store, &uploader, "/nix/store", &())
            .await
            .unwrap();
        assert_eq!(s.rejected.len(), 1, "{:?}", s.rejected);
        assert!(
            s.rejected[0].1.starts_with("larger than"),
            "{:?}",
            s.rejected
        );
        assert!(mem.keys().is_empty());
    }

    /// Writes a path into a `file://`-style directory: its narinfo (uncompressed NAR, hashed
    /// as `hashed`) and NAR. Returns its hash and NAR's key.
    fn write_path(
        dir: &Path,
        path: &str,
        nar: &[u8],
        hashed: &[u8],
        refs: &[&str],
    ) -> (StorePathHash, String) {
        let header = b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1\x00\x00\x00";
        let mut full = header.to_vec();
        full.extend_from_slice(nar);
        let mut claimed = header.to_vec();
        claimed.extend_from_slice(hashed);
        let digest = crate::nix::Sha256::digest(&claimed);
        let file = format!("{}.nar", crate::nix::Sha256::digest(&full).to_nix32());
        let text = format!(
            "StorePath: /nix/store/{path}\nURL: nar/{file}\nCompression: none\n\
             NarHash: {digest}\nNarSize: {}\nReferences: {}\n",
            full.len(),
            refs.join(" ")
        );
        let info = NarInfo::parse(&text, "/nix/store").unwrap();
        let h = info.hash();
        std::fs::create_dir_all(dir.join("nar")).unwrap();
        std::fs::write(dir.join("nar").join(&file), &full).unwrap();
        std::fs::write(dir.join(format!("{h}.narinfo")), &text).unwrap();
        (h, format!("nar/{file}"))
    }

    use crate::store::memory::MemoryStore;

    /// Imports `dir`, which the store must stop (an [`ImportError::Store`]): what it did first.
    async fn stopped_by_the_store(dir: &Path, mem: &MemoryStore, uploader: &Uploader) -> Summary {
        let stopped = import_dir(dir, mem, uploader, "/nix/store", &())
            .await
            .unwrap_err();
        assert!(
            matches!(stopped.cause, ImportError::Store(_)),
            "{stopped:?}"
        );
        stopped.summary
    }

    fn importer() -> (std::sync::Arc<MemoryStore>, Uploader) {
        let mem = std::sync::Arc::new(crate::store::memory::MemoryStore::new());
        let store: std::sync::Arc<dyn Store> = mem.clone();
        let cfg = crate::config::Config::default();
        let uploader = Uploader::new(&cfg.upload, "/nix/store", store);
        (mem, uploader)
    }

    /// A path already in the store whose stored narinfo cannot be read (stored in a coding
    /// cellar does not decode) is skipped, with its listing; the paths above it, which refer
    /// to it, are rejected, saying why: clients could not substitute them (the reference is a
    /// 502). One that reads as no narinfo (written by another tool, say) is replaced by the
    /// directory's, as an upload replaces it.
    #[tokio::test]
    async fn a_stored_narinfo_that_cannot_be_read_leaves_out_only_its_extras() {
        let dir = tempfile::tempdir().unwrap();
        let leaf = "0vazqgj6bk0bqvc2l2pdivn8s2rp6q2x-leaf";
        let top = "6bxnj2gfflqa529lddzh3zhcn45nn86r-top";
        let (l, _) = write_path(dir.path(), leaf, &[1; 100], &[1; 100], &[]);
        std::fs::write(dir.path().join(format!("{l}.ls")), br#"{"version":1}"#).unwrap();
        let (t, _) = write_path(dir.path(), top, &[2; 100], &[2; 100], &[leaf]);
        {
            let (mem, uploader) = importer();
            mem.insert(&object_key::narinfo(l), "not a narinfo");
            let s = import_dir(dir.path(), &*mem, &uploader, "/nix/store", &())
                .await
                .unwrap();
            assert_eq!((s.imported, s.skipped), (2, 0), "{:?}", s.rejected);
            assert!(s.rejected.is_empty(), "{:?}", s.rejected);
            assert!(uploader.stored(l).await.unwrap().is_some());
            assert!(mem.head(&object_key::listing(l)).await.unwrap().is_some());
        }
        {
            let (mem, uploader) = importer();
            mem.insert(&object_key::narinfo(l), "not a narinfo");
            mem.set_encoding(&object_key::narinfo(l), "lz4");
            let s = import_dir(dir.path(), &*mem, &uploader, "/nix/store", &())
                .await
                .unwrap();
            assert_eq!((s.imported, s.skipped), (0, 1), "{:?}", s.rejected);
            assert_eq!(s.rejected.len(), 2, "{:?}", s.rejected);
            assert_eq!(
                s.rejected[0].0,
                format!("/nix/store/{leaf} (its listing or log)")
            );
            assert_eq!(s.rejected[1].0, format!("/nix/store/{top}"));
            assert!(
                s.rejected[1]
                    .1
                    .contains("its narinfo in the store cannot be read"),
                "{:?}",
                s.rejected
            );
            assert!(mem.head(&object_key::narinfo(t)).await.unwrap().is_none());
            assert!(mem.head(&object_key::listing(l)).await.unwrap().is_none());
        }
    }

    /// The realisations of a directory written by Nix with content-addressed derivations are
    /// imported after the paths, under each of Nix's layouts, checked as their uploads are:
    /// one naming a path the store lacks, or under a name that is none, is rejected.
    #[tokio::test]
    async fn realisations_are_imported_after_the_paths_they_name() {
        let dir = tempfile::tempdir().unwrap();
        let top = "6bxnj2gfflqa529lddzh3zhcn45nn86r-top";
        write_path(dir.path(), top, &[7; 100], &[7; 100], &[]);
        let id = |n: u8| format!("sha256:{}!out", format!("{n:x}").repeat(64));
        let realisation = |id: &str, out: &str| {
            serde_json::json!({
                "dependentRealisations": {},
                "id": id,
                "outPath": out,
                "signatures": [],
            })
            .to_string()
        };
        let at = |rel: &str, body: String| {
            let path = dir.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, body).unwrap();
        };
        at(
            &format!("realisations/{}.doi", id(1)),
            realisation(&id(1), top),
        );
        let drv = "5g5d4v2ahmn1f7k9jcs2cns6ivf5gmpa-top.drv";
        at(
            &format!("build-trace-v2/{drv}/out.doi"),
            realisation(&id(2), top),
        );
        at(&format!("build-trace/{drv}/dev"), realisation(&id(5), top));
        let missing = "0d71ygfwbmy1xjlbj1v027dfmy9cqavy-other";
        at(
            &format!("realisations/{}.doi", id(3)),
            realisation(&id(3), missing),
        );
        at("realisations/not-an-id.doi", realisation(&id(4), top));
        // One byte over the limit is refused unread; at the limit it is read (and then is no
        // realisation).
        let huge = |n: usize| format!("{}{}", realisation(&id(6), top), " ".repeat(n));
        let base = realisation(&id(6), top).len();
        let limit = MAX_REALISATION_BYTES as usize;
        at(
            &format!("realisations/{}.doi", id(6)),
            huge(limit + 1 - base),
        );
        at(&format!("realisations/{}.doi", id(7)), huge(limit - base));
        let (mem, uploader) = importer();
        let s = import_dir(dir.path(), &*mem, &uploader, "/nix/store", &())
            .await
            .unwrap();
        assert_eq!((s.imported, s.realisations), (1, 3), "{:?}", s.rejected);
        let mut rejected: Vec<(&str, &str)> = s
            .rejected
            .iter()
            .map(|(what, why)| (what.as_str(), why.as_str()))
            .collect();
        rejected.sort();
        let names: Vec<&str> = rejected.iter().map(|(what, _)| *what).collect();
        assert_eq!(
            names,
            [
                "realisations/not-an-id.doi".to_owned(),
                format!("realisations/{}.doi", id(3)),
                format!("realisations/{}.doi", id(6)),
                format!("realisations/{}.doi", id(7)),
            ]
        );
        assert!(rejected[2].1.starts_with("larger than"), "{rejected:?}");
        assert!(!rejected[3].1.starts_with("larger than"), "{rejected:?}");
        for key in [
            format!("realisations/{}.doi", id(1)),
            format!("build-trace-v2/{drv}/out.doi"),
            format!("build-trace/{drv}/dev"),
        ] {
            assert!(mem.head(&key).await.unwrap().is_some(), "{key}");
        }
        assert!(mem
            .head(&format!("realisations/{}.doi", id(3)))
            .await
            .unwrap()
            .is_none());
        // Again: nothing new to write.
        let s = import_dir(dir.path(), &*mem, &uploader, "/nix/store", &())
            .await
            .unwrap();
        assert_eq!((s.skipped, s.realisations), (1, 0));
        // A stored realisation cellar cannot read (a coding it does not decode) concerns that
        // one alone; the store failing to write one stops the import, rejecting nothing.
        let first = format!("realisations/{}.doi", id(1));
        mem.set_encoding(&first, "lz4");
        let s = import_dir(dir.path(), &*mem, &uploader, "/nix/store", &())
            .await
            .unwrap();
        assert!(
            s.rejected.iter().any(|(what, _)| *what == first),
            "{:?}",
            s.rejected
        );
        mem.delete(&format!("build-trace/{drv}/dev")).await.unwrap();
        mem.fail(crate::store::memory::FailOp::Write, "build-trace/*", 0, 1);
        let stopped = stopped_by_the_store(dir.path(), &mem, &uploader).await;
        let trace = stopped
            .rejected
            .iter()
            .find(|(w, _)| w.starts_with("build-trace/"));
        assert!(trace.is_none(), "{:?}", stopped.rejected);
    }

    /// A `realisations` that is no directory cannot be read: the import stops (exit 3) and
    /// says which, rather than take it for a directory without realisations.
    #[tokio::test]
    async fn a_realisations_entry_that_cannot_be_read_stops_the_import() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("realisations"), "a file").unwrap();
        let (mem, uploader) = importer();
        let stopped = import_dir(dir.path(), &*mem, &uploader, "/nix/store", &())
            .await
            .unwrap_err();
        assert!(
            matches!(&stopped.cause, ImportError::Read { path, .. } if path.ends_with("realisations")),
            "{stopped:?}"
        );
    }

    /// The store failing stops the import wherever it meets it (writing a path's NAR, reading
    /// the narinfo of a path already there), and nothing is counted as rejected for it: a
    /// rerun goes on.
    #[tokio::test]
    async fn the_store_failing_stops_the_import_without_rejecting_anything() {
        use crate::store::memory::FailOp;
        let dir = tempfile::tempdir().unwrap();
        let top = "6bxnj2gfflqa529lddzh3zhcn45nn86r-top";
        let (h, nar) = write_path(dir.path(), top, &[7; 100], &[7; 100], &[]);
        std::fs::write(dir.path().join(format!("{h}.ls")), br#"{"version":1}"#).unwrap();
        // Writing its NAR fails.
        let (mem, uploader) = importer();
        mem.fail(FailOp::Write, &nar, 0, 1);
        let stopped = stopped_by_the_store(dir.path(), &mem, &uploader).await;
        assert!(stopped.rejected.is_empty(), "{stopped:?}");
        // Already there (with its listing to check), its narinfo cannot be read.
        let s = import_dir(dir.path(), &*mem, &uploader, "/nix/store", &())
            .await
            .unwrap();
        assert_eq!(s.imported, 1);
        mem.fail(FailOp::Read, &object_key::narinfo(h), 0, 1);
        let stopped = stopped_by_the_store(dir.path(), &mem, &uploader).await;
        assert!(stopped.rejected.is_empty(), "{stopped:?}");
        // Writing a debug info link fails.
        let id = "ab".repeat(20);
        std::fs::create_dir(dir.path().join("debuginfo")).unwrap();
        let link = serde_json::json!({
            "archive": format!("../{nar}"),
            "member": format!("lib/debug/.build-id/ab/{}.debug", "ab".repeat(19)),
        });
        let at = dir.path().join(format!("debuginfo/{id}.debug"));
        std::fs::write(at, link.to_string()).unwrap();
        mem.fail(FailOp::Write, "debuginfo/*", 0, 1);
        let stopped = stopped_by_the_store(dir.path(), &mem, &uploader).await;
        assert!(stopped.rejected.is_empty(), "{stopped:?}");
        let s = import_dir(dir.path(), &*mem, &uploader, "/nix/store", &())
            .await
            .unwrap();
        assert!(s.rejected.is_empty(), "{:?}", s.rejected);
        assert!(mem
            .head(&format!("debuginfo/{id}.debug"))
            .await
            .unwrap()
            .is_some());
    }

    /// A run stopped by the store after a path's narinfo was written, before its listing: the
    /// next run, which finds the narinfo, writes the listing.
    #[tokio::test]
    async fn a_listing_left_out_by_a_stopped_run_is_written_by_the_next() {
        use crate::store::memory::FailOp;
        let dir = tempfile::tempdir().unwrap();
        let top = "6bxnj2gfflqa529lddzh3zhcn45nn86r-top";
        let (h, _) = write_path(dir.path(), top, &[7; 100], &[7; 100], &[]);
        std::fs::write(dir.path().join(format!("{h}.ls")), br#"{"version":1}"#).unwrap();
        let (mem, uploader) = importer();
        mem.fail(FailOp::Write, &object_key::listing(h), 0, 1);

        // What it did before it stopped is told with why it stopped.
        let stopped = stopped_by_the_store(dir.path(), &mem, &uploader).await;
        assert_eq!((stopped.imported, stopped.skipped), (1, 0));
        assert!(mem.head(&object_key::narinfo(h)).await.unwrap().is_some());
        assert!(mem.head(&object_key::listing(h)).await.unwrap().is_none());

        let s = import_dir(dir.path(), &*mem, &uploader, "/nix/store", &())
            .await
            .unwrap();
        assert_eq!((s.imported, s.skipped), (0, 1));
        assert!(s.rejected.is_empty(), "{:?}", s.rejected);
        assert!(mem.head(&object_key::listing(h)).await.unwrap().is_some());
    }

    /// A path already stored from another build (another NarHash) does not get this
    /// directory's listing, which describes another NAR.
    #[tokio::test]
    async fn another_builds_listing_is_not_added_to_a_stored_path() {
        let top = "6bxnj2gfflqa529lddzh3zhcn45nn86r-top";
        let (mem, uploader) = importer();
        let stored = tempfile::tempdir().unwrap();
        let (h, _) = write_path(stored.path(), top, &[1; 100], &[1; 100], &[]);
        let s = import_dir(stored.path(), &*mem, &uploader, "/nix/store", &())
            .await
            .unwrap();
        assert_eq!(s.imported, 1);
        let dir = tempfile::tempdir().unwrap();
        write_path(dir.path(), top, &[2; 100], &[2; 100], &[]);
        std::fs::write(dir.path().join(format!("{h}.ls")), br#"{"version":1}"#).unwrap();
        let s = import_dir(dir.path(), &*mem, &uploader, "/nix/store", &())
            .await
            .unwrap();
        assert_eq!((s.skipped, s.rejected.len()), (1, 0));
        assert!(mem.head(&object_key::listing(h)).await.unwrap().is_none());
    }

    /// A path whose reference was rejected is rejected before its NAR is copied: no orphan
    /// NAR for each path above a broken one.
    /// The path below and the one above it rejected, the one above for its reference, and
    /// its NAR not copied.
    async fn assert_rejected_above(s: &Summary, mem: &MemoryStore, above_nar: &str) {
        assert_eq!(s.rejected.len(), 2, "{:?}", s.rejected);
        assert!(s.rejected[1].1.contains("reference"), "{:?}", s.rejected);
        assert!(
            mem.head(above_nar).await.unwrap().is_none(),
            "its NAR was copied"
        );
    }

    #[tokio::test]
    async fn paths_above_a_rejected_one_copy_no_nar() {
        let dir = tempfile::tempdir().unwrap();
        let broken = "6bxnj2gfflqa529lddzh3zhcn45nn86r-broken";
        let (bh, _) = write_path(dir.path(), broken, &[1; 100], &[2; 100], &[]);
        let above = "7bxnj2gfflqa529lddzh3zhcn45nn86r-above";
        let (ah, above_nar) = write_path(dir.path(), above, &[3; 100], &[3; 100], &[broken]);
        let (mem, uploader) = importer();
        let s = import_dir(dir.path(), &*mem, &uploader, "/nix/store", &())
            .await
            .unwrap();
        assert_rejected_above(&s, &mem, &above_nar).await;
        for h in [bh, ah] {
            assert!(mem.head(&object_key::narinfo(h)).await.unwrap().is_none());
        }
    }

    /// The same for a reference whose narinfo in the directory does not parse (rejected as it
    /// was read); but one the store already has is no reason to reject the path above it.
    #[tokio::test]
    async fn paths_above_an_unreadable_narinfo_copy_no_nar_unless_the_store_has_it() {
        let dir = tempfile::tempdir().unwrap();
        let broken = "6bxnj2gfflqa529lddzh3zhcn45nn86r-broken";
        let (bh, _) = write_path(dir.path(), broken, &[1; 100], &[1; 100], &[]);
        let above = "7bxnj2gfflqa529lddzh3zhcn45nn86r-above";
        let (ah, above_nar) = write_path(dir.path(), above, &[3; 100], &[3; 100], &[broken]);
        let narinfo = dir.path().join(format!("{bh}.narinfo"));
        let good = std::fs::read_to_string(&narinfo).unwrap();
        std::fs::write(&narinfo, &good[..good.len() / 2]).unwrap();
        let (mem, uploader) = importer();
        let s = import_dir(dir.path(), &*mem, &uploader, "/nix/store", &())
            .await
            .unwrap();
        assert_rejected_above(&s, &mem, &above_nar).await;
        assert!(mem.head(&object_key::narinfo(ah)).await.unwrap().is_none());
        // With the reference in the store, the path above goes in.
        std::fs::write(&narinfo, &good).unwrap();
        let only = tempfile::tempdir().unwrap();
        let (_, _) = write_path(only.path(), broken, &[1; 100], &[1; 100], &[]);
        let s = import_dir(only.path(), &*mem, &uploader, "/nix/store", &())
            .await
            .unwrap();
        assert!(s.rejected.is_empty(), "{:?}", s.rejected);
        std::fs::write(&narinfo, &good[..good.len() / 2]).unwrap();
        let s = import_dir(dir.path(), &*mem, &uploader, "/nix/store", &())
            .await
            .unwrap();
        assert_eq!(
            s.rejected.len(),
            1,
            "only the unreadable one: {:?}",
            s.rejected
        );
        assert!(mem.head(&object_key::narinfo(ah)).await.unwrap().is_some());
    }

    /// A path the store has already, as the directory holds the same build of it, is mended
    /// from the directory: the signatures its narinfo brings are added to the stored one (a
    /// cache moved to cellar keeps serving its old key's signatures), and its NAR, gone from
    /// the store, is copied back. A path the store has whole, with those signatures, is left
    /// as it is.
    #[tokio::test]
    async fn a_present_path_is_mended_from_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let leaf = "0vazqgj6bk0bqvc2l2pdivn8s2rp6q2x-leaf";
        let top = "6bxnj2gfflqa529lddzh3zhcn45nn86r-top";
        let (l, nar) = write_path(dir.path(), leaf, &[1; 100], &[1; 100], &[]);
        write_path(dir.path(), top, &[2; 100], &[2; 100], &[leaf]);
        let (mem, uploader) = importer();
        let run = || import_dir(dir.path(), &*mem, &uploader, "/nix/store", &());
        let s = run().await.unwrap();
        assert_eq!((s.imported, s.mended), (2, 0), "{:?}", s.rejected);

        // The directory's narinfo signed since (by the cache's old key).
        let at = dir.path().join(format!("{l}.narinfo"));
        let mut info =
            NarInfo::parse(&std::fs::read_to_string(&at).unwrap(), "/nix/store").unwrap();
        let old_key = crate::nix::SecretKey::generate("team-cache-1").unwrap();
        info.sign(&old_key, "/nix/store");
        std::fs::write(&at, info.render("/nix/store")).unwrap();
        let s = run().await.unwrap();
        assert_eq!(
            (s.imported, s.skipped, s.mended),
            (0, 2, 1),
            "{:?}",
            s.rejected
        );
        let stored = uploader.stored(l).await.unwrap().unwrap();
        assert_eq!(stored.sigs, info.sigs);
        let s = run().await.unwrap();
        assert_eq!((s.skipped, s.mended), (2, 0), "mended again");

        // Its NAR deleted from the store: copied back from the directory.
        mem.remove(&nar);
        let s = run().await.unwrap();
        assert_eq!((s.skipped, s.mended), (2, 1), "{:?}", s.rejected);
        assert!(s.rejected.is_empty(), "{:?}", s.rejected);
        assert_eq!(
            mem.bytes(&nar),
            std::fs::read(dir.path().join(&nar)).ok().map(Into::into)
        );

        // Its stored narinfo (the same build) names a NAR of another name, gone: taken back,
        // and the directory's build imported in its place, in the same run.
        let mut elsewhere = stored.clone();
        elsewhere.url = format!("nar/{}.nar.xz", "1".repeat(52));
        elsewhere.compression = crate::nix::Compression::Xz;
        mem.insert(&object_key::narinfo(l), elsewhere.render("/nix/store"));
        let s = run().await.unwrap();
        assert_eq!((s.skipped, s.mended), (2, 1), "{:?}", s.rejected);
        assert!(s.rejected.is_empty(), "{:?}", s.rejected);
        let now = uploader.stored(l).await.unwrap().unwrap();
        assert_eq!(now.url, nar);

        // Signatures only, the store holding the NAR under another name than the directory's
        // (another compression): added, and no NAR copied.
        let other = format!("nar/{}.nar.xz", "2".repeat(52));
        let bytes = mem.bytes(&nar).unwrap();
        mem.remove(&nar);
        mem.insert(&other, bytes.to_vec());
        let mut there = now.clone();
        there.url = other.clone();
        there.compression = crate::nix::Compression::Xz;
        there.sigs.clear();
        mem.insert(&object_key::narinfo(l), there.render("/nix/store"));
        let s = run().await.unwrap();
        assert_eq!((s.mended, s.rejected.len()), (1, 0), "{:?}", s.rejected);
        assert!(mem.bytes(&nar).is_none(), "a NAR was copied");
        let now = uploader.stored(l).await.unwrap().unwrap();
        assert_eq!((now.url.as_str(), now.sigs.len()), (other.as_str(), 1));

        // A mend that cannot be made (the NAR gone from the store and from the directory):
        // said, the path left as it is, nothing rejected.
        mem.remove(&other);
        std::fs::remove_file(dir.path().join(&nar)).unwrap();
        let s = run().await.unwrap();
        assert_eq!((s.mended, s.not_mended.len()), (0, 1), "{:?}", s.not_mended);
        assert!(s.rejected.is_empty(), "{:?}", s.rejected);
        assert!(mem.head(&object_key::narinfo(l)).await.unwrap().is_some());
    }

    /// A NAR the store holds bad under the name the directory's narinfo gives (a copy cut
    /// short) is found bad when read back for the narinfo, and the directory's copied over it
    /// in the same run; the path is imported.
    #[tokio::test]
    async fn a_bad_copy_in_the_store_is_copied_over() {
        let dir = tempfile::tempdir().unwrap();
        let top = "6bxnj2gfflqa529lddzh3zhcn45nn86r-top";
        let (t, nar) = write_path(dir.path(), top, &[2; 100], &[2; 100], &[]);
        let (mem, uploader) = importer();
        mem.insert(&nar, vec![0u8; 50]);
        let s = import_dir(dir.path(), &*mem, &uploader, "/nix/store", &())
            .await
            .unwrap();
        assert_eq!(s.imported, 1, "{:?}", s.rejected);
        assert!(s.rejected.is_empty(), "{:?}", s.rejected);
        assert!(mem.head(&object_key::narinfo(t)).await.unwrap().is_some());
        assert_eq!(
            mem.bytes(&nar),
            std::fs::read(dir.path().join(&nar)).ok().map(Into::into)
        );
    }

    /// A narinfo (or debug info link) that cannot be read, a link leading nowhere or a
    /// directory of that name, is that path's rejection: the rest is imported.
    #[tokio::test]
    async fn an_entry_that_cannot_be_read_is_rejected_alone() {
        let dir = tempfile::tempdir().unwrap();
        let top = "6bxnj2gfflqa529lddzh3zhcn45nn86r-top";
        let (t, _) = write_path(dir.path(), top, &[2; 100], &[2; 100], &[]);
        let nowhere = format!("{}.narinfo", "b".repeat(32));
        std::os::unix::fs::symlink("/nonexistent", dir.path().join(&nowhere)).unwrap();
        let folder = format!("{}.narinfo", "0".repeat(32));
        std::fs::create_dir(dir.path().join(&folder)).unwrap();
        std::fs::create_dir(dir.path().join("debuginfo")).unwrap();
        let link = format!("{}.debug", "ab".repeat(20));
        std::os::unix::fs::symlink("/nonexistent", dir.path().join("debuginfo").join(&link))
            .unwrap();
        let (mem, uploader) = importer();
        let s = import_dir(dir.path(), &*mem, &uploader, "/nix/store", &())
            .await
            .unwrap();
        assert_eq!(s.imported, 1, "{:?}", s.rejected);
        let mut rejected: Vec<&str> = s.rejected.iter().map(|(w, _)| w.as_str()).collect();
        rejected.sort();
        let link = format!("debuginfo/{link}");
        let mut expected = vec![folder.as_str(), nowhere.as_str(), link.as_str()];
        expected.sort();
        assert_eq!(rejected, expected, "{:?}", s.rejected);
        assert!(s
            .rejected
            .iter()
            .all(|(_, why)| why.starts_with("cannot read")));
        assert!(mem.head(&object_key::narinfo(t)).await.unwrap().is_some());
    }

    /// A build log or listing that is a symbolic link (to a file outside the directory the
    /// importing user can read: the signing key) is not read: rejected alone, the path
    /// imported, and the other extra still taken. A narinfo or NAR that is a link (a cache
    /// assembled with `ln -s`) is read through it: it is checked as any. A pipe is not
    /// opened for reading (which would wait for a writer for ever).
    #[tokio::test]
    async fn logs_and_listings_that_are_links_are_not_read() {
        let secret = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(secret.path(), b"cache-1:the secret key").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let real = "6bxnj2gfflqa529lddzh3zhcn45nn86r-top";
        let drv = "r7f0vq0bh65qk7ywdirn20gimcdw54dj-top.drv";
        let (h, _) = write_path(dir.path(), real, &[2; 100], &[2; 100], &[]);
        let info = std::fs::read_to_string(dir.path().join(format!("{h}.narinfo"))).unwrap();
        std::fs::write(
            dir.path().join(format!("{h}.narinfo")),
            format!("{info}Deriver: {drv}\n"),
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("log")).unwrap();
        std::fs::write(dir.path().join("log").join(drv), b"a build log").unwrap();
        std::os::unix::fs::symlink(secret.path(), dir.path().join(format!("{h}.ls"))).unwrap();
        // A log that is a link, of a path whose listing is a pipe.
        let (p, _) = write_path(
            dir.path(),
            "2bxnj2gfflqa529lddzh3zhcn45nn86r-piped",
            &[6; 100],
            &[6; 100],
            &[],
        );
        let info = std::fs::read_to_string(dir.path().join(format!("{p}.narinfo"))).unwrap();
        let pdrv = "q7f0vq0bh65qk7ywdirn20gimcdw54dj-piped.drv";
        std::fs::write(
            dir.path().join(format!("{p}.narinfo")),
            format!("{info}Deriver: {pdrv}\n"),
        )
        .unwrap();
        std::os::unix::fs::symlink(secret.path(), dir.path().join("log").join(pdrv)).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.path().join(format!("{p}.ls")),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        // A narinfo that is a link, and a path whose NAR is.
        let linked = tempfile::tempdir().unwrap();
        let (l, _) = write_path(
            linked.path(),
            "5bxnj2gfflqa529lddzh3zhcn45nn86r-linked",
            &[3; 100],
            &[3; 100],
            &[],
        );
        std::fs::create_dir_all(dir.path().join("nar")).unwrap();
        for f in std::fs::read_dir(linked.path().join("nar")).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), dir.path().join("nar").join(f.file_name())).unwrap();
        }
        std::os::unix::fs::symlink(
            linked.path().join(format!("{l}.narinfo")),
            dir.path().join(format!("{l}.narinfo")),
        )
        .unwrap();
        let (n, nar) = write_path(
            dir.path(),
            "4bxnj2gfflqa529lddzh3zhcn45nn86r-nar",
            &[4; 100],
            &[4; 100],
            &[],
        );
        let moved = linked.path().join("moved.nar");
        std::fs::rename(dir.path().join(&nar), &moved).unwrap();
        std::os::unix::fs::symlink(&moved, dir.path().join(&nar)).unwrap();
        let (mem, uploader) = importer();
        let s = import_dir(dir.path(), &*mem, &uploader, "/nix/store", &())
            .await
            .unwrap();
        assert_eq!(s.imported, 4, "{:?}", s.rejected);
        let mut rejected: Vec<String> = s.rejected.iter().map(|(w, _)| w.clone()).collect();
        rejected.sort();
        let mut expected = vec![
            format!("/nix/store/{real} (its listing or log)"),
            "/nix/store/2bxnj2gfflqa529lddzh3zhcn45nn86r-piped (its listing or log)".to_owned(),
        ];
        expected.sort();
        assert_eq!(rejected, expected, "{:?}", s.rejected);
        let why = |path: &str| {
            s.rejected
                .iter()
                .find(|(w, _)| w.contains(path))
                .map(|(_, why)| why.clone())
                .unwrap_or_default()
        };
        assert!(why("-top").contains("a symbolic link"), "{}", why("-top"));
        let piped = why("-piped");
        assert!(
            piped.contains("a symbolic link") && piped.contains("not a regular file"),
            "{piped}"
        );
        for imported in [h, p, l, n] {
            assert!(mem
                .head(&object_key::narinfo(imported))
                .await
                .unwrap()
                .is_some());
        }
        assert!(mem.head(&object_key::listing(h)).await.unwrap().is_none());
        assert!(mem.head(&object_key::listing(p)).await.unwrap().is_none());
        // The top path's log is a file: taken, though its listing was refused.
        let log: StorePathBaseName = drv.parse().unwrap();
        assert!(mem.head(&object_key::log(&log)).await.unwrap().is_some());
        let plog: StorePathBaseName = pdrv.parse().unwrap();
        assert!(mem.head(&object_key::log(&plog)).await.unwrap().is_none());
    }

    /// A cache signed by a key the server does not trust is refused path by path before any
    /// NAR is copied.
    #[tokio::test]
    async fn an_untrusted_cache_copies_no_nar() {
        let dir = tempfile::tempdir().unwrap();
        let (_, nar) = write_path(
            dir.path(),
            "6bxnj2gfflqa529lddzh3zhcn45nn86r-top",
            &[1; 100],
            &[1; 100],
            &[],
        );
        let mem = std::sync::Arc::new(crate::store::memory::MemoryStore::new());
        let store: std::sync::Arc<dyn Store> = mem.clone();
        let mut cfg = crate::config::Config::default();
        let trusted = crate::nix::SecretKey::generate("trusted-1").unwrap();
        cfg.upload.trusted_keys = vec![trusted.public()];
        let uploader = Uploader::new(&cfg.upload, "/nix/store", store);
        let s = import_dir(dir.path(), &*mem, &uploader, "/nix/store", &())
            .await
            .unwrap();
        assert_eq!(s.rejected.len(), 1, "{:?}", s.rejected);
        assert!(s.rejected[0].1.contains("trusted"), "{:?}", s.rejected);
        assert!(
            mem.head(&nar).await.unwrap().is_none(),
            "the NAR was copied"
        );
    }

    #[test]
    fn references_come_first() {
        let a = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a";
        let b = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b";
        let c = "cccccccccccccccccccccccccccccccc-c";
        let d = "dddddddddddddddddddddddddddddddd-d";
        let outside = "ffffffffffffffffffffffffffffffff-f";
        let entries: HashMap<_, _> = [
            entry(a, &[b, c, a]),
            entry(b, &[c, outside]),
            entry(c, &[]),
            entry(d, &[a]),
        ]
        .into_iter()
        .collect();
        let order: Vec<String> = references_first(&entries)
            .iter()
            .map(|h| h.to_string())
            .collect();
        let pos = |p: &str| {
            order
                .iter()
                .position(|h| p.starts_with(h.as_str()))
                .unwrap()
        };
        assert_eq!(order.len(), 4);
        assert!(
            pos(c) < pos(b) && pos(b) < pos(a) && pos(a) < pos(d),
            "{order:?}"
        );
    }
}
