//! The uploader over the in-memory store: copying a path in (mirroring, import) is verified
//! like an upload.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::config::Config;
use crate::nix::Sha256;
use crate::store::memory::MemoryStore;

const PATH: &str = "6bxnj2gfflqa529lddzh3zhcn45nn86r-top";

/// Not a real NAR past its header, which is all the pipeline checks.
fn nar() -> Bytes {
    let mut v = b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1\x00\x00\x00".to_vec();
    v.extend_from_slice(&[7u8; 1000]);
    Bytes::from(v)
}

/// A narinfo for [`nar`], stored uncompressed.
fn narinfo_for(nar: &[u8], nar_size: usize) -> NarInfo {
    let h = Sha256::digest(nar);
    let text = format!(
        "StorePath: /nix/store/{PATH}\nURL: nar/{}.nar\nCompression: none\n\
         NarHash: {h}\nNarSize: {nar_size}\nReferences: \n",
        h.to_nix32()
    );
    NarInfo::parse(&text, "/nix/store").unwrap()
}

fn uploader() -> (Arc<MemoryStore>, Uploader) {
    let mem = Arc::new(MemoryStore::new());
    let store: Arc<dyn Store> = mem.clone();
    let cfg = Config::default();
    (mem, Uploader::new(&cfg.upload, &cfg.store_dir, store))
}

/// An uploader that re-encodes NARs to zstd (`upload.compression`).
fn uploader_to_zstd() -> (Arc<MemoryStore>, Uploader) {
    let mem = Arc::new(MemoryStore::new());
    let store: Arc<dyn Store> = mem.clone();
    let mut cfg = Config::default();
    cfg.upload.recompress = Some(Recompression {
        compression: Compression::Zstd,
        level: None,
    });
    (mem, Uploader::new(&cfg.upload, &cfg.store_dir, store))
}

/// An uploader that writes access records, as the server's does (the gc protocol).
fn uploader_with_access() -> (Arc<MemoryStore>, Uploader) {
    let (mem, up) = uploader();
    let store: Arc<dyn Store> = mem.clone();
    let up = up.with_access(Arc::new(crate::gc::access::AccessLog::new(store, 100)));
    (mem, up)
}

fn body(b: Bytes) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    futures::stream::iter([Ok(b)])
}

#[tokio::test]
async fn copy_path_writes_the_nar_then_the_narinfo_and_fetches_only_a_missing_nar() {
    let (mem, up) = uploader();
    let nar = nar();
    let info = narinfo_for(&nar, nar.len());
    let fetched = AtomicUsize::new(0);
    let fetch = |_| async {
        fetched.fetch_add(1, Ordering::Relaxed);
        Ok(body(nar.clone()))
    };
    let acc = up.copy_path(info.clone(), fetch, None).await.unwrap();
    assert_eq!(acc.hash, info.hash());
    let key = object_key::nar(&info.nar_file().unwrap());
    assert!(mem.head(&key).await.unwrap().is_some());
    assert!(mem
        .head(&object_key::narinfo(info.hash()))
        .await
        .unwrap()
        .is_some());
    // Again: the NAR is there, so it is not fetched.
    let fetch = |_| async {
        fetched.fetch_add(1, Ordering::Relaxed);
        Ok(body(nar.clone()))
    };
    up.copy_path(info, fetch, None).await.unwrap();
    assert_eq!(fetched.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn copy_path_refuses_a_narinfo_that_does_not_match_its_nar() {
    let (mem, up) = uploader();
    let nar = nar();
    let lying = narinfo_for(&nar, nar.len() + 1);
    let e = up
        .copy_path(lying.clone(), |_| async { Ok(body(nar.clone())) }, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Upload(UploadError::Rejected(m)) if m.contains("NarSize")),
        "{e:?}"
    );
    assert!(mem
        .head(&object_key::narinfo(lying.hash()))
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn store_failures_are_store_errors() {
    let (mem, up) = uploader();
    let nar = nar();
    mem.set_down(true);
    let e = up
        .copy_path(
            narinfo_for(&nar, nar.len()),
            |_| async { Ok(body(nar.clone())) },
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Store(StoreError::Unavailable(_))),
        "{e:?}"
    );
}

#[tokio::test]
async fn put_narinfo_checks_the_name_it_was_uploaded_as() {
    let (_, up) = uploader();
    let nar = nar();
    let info = narinfo_for(&nar, nar.len());
    up.put_nar(&info.nar_file().unwrap(), body(nar.clone()))
        .await
        .unwrap();
    let other: StorePathHash = "a6qsrmi2wws6820p89gki93wb6rjvknc".parse().unwrap();
    let text = info.render("/nix/store");
    let e = up
        .put_narinfo(other, text.as_bytes(), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Upload(UploadError::Rejected(m)) if m.contains("does not match the name")),
        "{e:?}"
    );
    up.put_narinfo(info.hash(), text.as_bytes(), None)
        .await
        .unwrap();
}

/// [`nar`]'s path uploaded through `up`: its narinfo, and the key it is stored under.
async fn published(up: &Uploader) -> (NarInfo, String) {
    let nar = nar();
    let info = narinfo_for(&nar, nar.len());
    up.copy_path(info.clone(), |_| async { Ok(body(nar.clone())) }, None)
        .await
        .unwrap();
    let key = object_key::narinfo(info.hash());
    (info, key)
}

/// Another process's uploader over `mem` (another replica, or this one after a restart),
/// writing access records if `records`.
fn another_uploader(mem: &Arc<MemoryStore>, records: bool) -> Uploader {
    let store: Arc<dyn Store> = mem.clone();
    let cfg = Config::default();
    let up = Uploader::new(&cfg.upload, &cfg.store_dir, store.clone());
    match records {
        true => up.with_access(Arc::new(crate::gc::access::AccessLog::new(store, 100))),
        false => up,
    }
}

/// Once published, a path keeps its contents: the same NarHash again changes nothing (200),
/// and so does another (a build that is not reproducible, by a second builder): the upload
/// succeeds, as `nix copy` to a store that has the path skips it, and the published one stays.
#[tokio::test]
async fn published_paths_are_immutable() {
    let (mem, up) = uploader();
    let (info, key) = published(&up).await;
    let stored = mem.get_bytes(&key, u64::MAX).await.unwrap().unwrap();

    let again = up
        .put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap();
    assert!(again.already_present);

    // Another NAR for the same store path, uploaded and complete in itself.
    let mut other = nar().to_vec();
    other.push(8);
    let other = Bytes::from(other);
    let other_info = narinfo_for(&other, other.len());
    up.put_nar(&other_info.nar_file().unwrap(), body(other.clone()))
        .await
        .unwrap();
    let kept = up
        .put_narinfo(
            info.hash(),
            other_info.render("/nix/store").as_bytes(),
            None,
        )
        .await
        .unwrap();
    assert!(kept.already_present);
    assert_eq!(
        kept.narinfo.nar_hash, info.nar_hash,
        "the published one is answered"
    );
    assert_eq!(
        mem.get_bytes(&key, u64::MAX).await.unwrap().unwrap(),
        stored,
        "the published narinfo is untouched"
    );
}

/// A stored narinfo the root cannot serve (not one of its path, or naming its NAR elsewhere
/// than `nar/`) is no published path: an upload of the path replaces it, with the access
/// records (the server's uploader) and without (a plain one), and after the upload address
/// said it absent (`probed_absent`) or not.
#[tokio::test]
async fn an_upload_replaces_a_stored_narinfo_that_cannot_be_served() {
    let nar = nar();
    let info = narinfo_for(&nar, nar.len());
    let key = object_key::narinfo(info.hash());
    let rendered = info.render("/nix/store");
    let url = format!("URL: {}", info.url);
    let broken = [
        rendered.replace('\n', "\r\n"),
        String::new(),
        rendered.replace(&url, "URL: http://elsewhere.example/x.nar.xz"),
    ];
    for with_access in [false, true] {
        for b in &broken {
            let (mem, up) = match with_access {
                true => uploader_with_access(),
                false => uploader(),
            };
            mem.insert(&key, b.clone());
            let acc = up
                .copy_path(info.clone(), |_| async { Ok(body(nar.clone())) }, None)
                .await
                .unwrap();
            assert!(!acc.already_present, "{b:?}");
            let now = mem.get_bytes(&key, u64::MAX).await.unwrap().unwrap();
            let now = NarInfo::parse(std::str::from_utf8(&now).unwrap(), "/nix/store").unwrap();
            assert_eq!(now.url, info.url, "{b:?} replaced");
        }
    }
}

/// Nix's fingerprint lists each reference once; cellar would sign a different one.
#[tokio::test]
async fn duplicate_references_are_refused() {
    let (mem, up) = uploader();
    let nar = nar();
    let text = narinfo_for(&nar, nar.len())
        .render("/nix/store")
        .replace("References: ", &format!("References: {PATH} {PATH}"));
    let info = NarInfo::parse(&text, "/nix/store").unwrap();
    let e = up
        .copy_path(info.clone(), |_| async { Ok(body(nar.clone())) }, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Upload(UploadError::Rejected(m)) if m.contains("listed twice")),
        "{e:?}"
    );
    assert!(mem
        .head(&object_key::narinfo(info.hash()))
        .await
        .unwrap()
        .is_none());
}

/// Beyond `upload.max_concurrent`, an upload waits for a slot (a client behind a proxy has
/// sent its body already, and Nix 2.8 retries without it), and is busy only after
/// [`ADMIT_WAIT`]. (Paused time: the wait passes without taking it.)
#[tokio::test(start_paused = true)]
async fn uploads_beyond_max_concurrent_wait_then_are_busy() {
    let mut cfg = Config::default();
    cfg.upload.max_concurrent = 2;
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let up = Arc::new(Uploader::new(&cfg.upload, &cfg.store_dir, store));
    let a = up.admit().await.unwrap();
    let _b = up.admit().await.unwrap();
    let started = tokio::time::Instant::now();
    let e = up.admit().await.unwrap_err();
    assert!(
        matches!(e, Error::Upload(UploadError::Busy { .. })),
        "{e:?}"
    );
    assert_eq!(started.elapsed(), ADMIT_WAIT, "refused only after waiting");
    // One that waits gets the slot a finished upload frees.
    let waiting = tokio::spawn({
        let up = up.clone();
        async move { up.admit().await.is_ok() }
    });
    tokio::time::sleep(ADMIT_WAIT / 2).await;
    drop(a);
    assert!(waiting.await.unwrap(), "a finished upload frees its slot");
}

/// A NAR a collector announced it is deleting is not relied on: the upload is refused after
/// recording what it needed, and no narinfo is written.
#[tokio::test(start_paused = true)]
async fn a_nar_being_collected_is_refused() {
    let (mem, up) = uploader_with_access();
    let nar = nar();
    let info = narinfo_for(&nar, nar.len());
    let file = info.nar_file().unwrap();
    up.put_nar(&file, body(nar.clone())).await.unwrap();
    crate::gc::deleting::announce(mem.as_ref(), "run", [file.as_str()])
        .await
        .unwrap();
    refused_as_being_deleted(&up, &info).await;
    assert!(mem
        .head(&object_key::narinfo(info.hash()))
        .await
        .unwrap()
        .is_none());
    assert!(
        mem.keys().iter().any(|k| k.starts_with("_cellar/access/")),
        "the record is written before the announcements are read"
    );

    crate::gc::deleting::withdraw(mem.as_ref(), "run")
        .await
        .unwrap();
    // The read that saw the announcement is recent enough to serve, but a refusal is checked
    // against a read made now: the collection is over, the upload goes through at once.
    up.put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap();
}

/// A read of the announcements serves the uploads whose records were complete at most
/// `TRUSTED_FOR` after it began (a collector waits longer before acting on an announcement);
/// used when older than a second, it is renewed in the background.
#[tokio::test(start_paused = true)]
async fn one_read_of_the_announcements_serves_uploads_for_a_while() {
    use crate::gc::deleting::{announce, TRUSTED_FOR};
    use tokio::time::{advance, Instant};
    let mem = Arc::new(MemoryStore::new());
    let watch = super::announcements::Announcements::new(mem.clone());
    let lists = || mem.lists();
    assert!(watch.after(Instant::now()).await.unwrap().is_empty());
    assert_eq!(lists(), 1);
    announce(mem.as_ref(), "run", ["a.nar"]).await.unwrap();
    // A record complete within TRUSTED_FOR of that read: the read serves, without a request.
    advance(TRUSTED_FOR / 4).await;
    assert!(watch.after(Instant::now()).await.unwrap().is_empty());
    assert_eq!(lists(), 1);
    // Past it, a read now.
    advance(TRUSTED_FOR).await;
    let seen = watch.after(Instant::now()).await.unwrap();
    assert!(seen.contains("a.nar"), "{seen:?}");
    assert_eq!(lists(), 2);
    // Used when over a second old, the read is renewed behind the upload's back.
    announce(mem.as_ref(), "run", ["b.nar"]).await.unwrap();
    advance(std::time::Duration::from_millis(1100)).await;
    let seen = watch.after(Instant::now()).await.unwrap();
    assert!(!seen.contains("b.nar"), "{seen:?}");
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        watch.refreshed.notified(),
    )
    .await
    .expect("no read was made in the background");
    let seen = watch.after(Instant::now()).await.unwrap();
    assert!(seen.contains("b.nar"), "{seen:?}");
    assert_eq!(lists(), 3);
}

/// An uploader writing access records, with [`nar`] uploaded, and the narinfo for it; `then`
/// runs on the store and the NAR's key when a narinfo is written (before the upload looks at
/// the NAR once more).
async fn nar_uploaded_then(
    then: impl Fn(&MemoryStore, &str) + Send + Sync + 'static,
) -> (Arc<MemoryStore>, Uploader, NarInfo) {
    let (mem, up) = uploader_with_access();
    let nar = nar();
    let info = narinfo_for(&nar, nar.len());
    let file = info.nar_file().unwrap();
    up.put_nar(&file, body(nar.clone())).await.unwrap();
    let nar_key = object_key::nar(&file);
    let store = Arc::downgrade(&mem);
    mem.after_write(&object_key::narinfo(info.hash()), move |_| {
        if let Some(m) = store.upgrade() {
            then(&m, &nar_key);
        }
    });
    (mem, up, info)
}

/// A NAR deleted while its narinfo is being written (a collector that announced it before
/// the upload's record, deleted it, and withdrew the announcement before the upload read the
/// announcements): the narinfo is taken back and the upload refused, never left pointing at
/// nothing.
#[tokio::test]
async fn a_nar_deleted_while_its_narinfo_is_written_takes_the_narinfo_back() {
    let (mem, up, info) = nar_uploaded_then(|m, nar_key| m.remove(nar_key)).await;
    let e = up
        .put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("upload it again"), "{e}");
    assert!(
        mem.head(&object_key::narinfo(info.hash()))
            .await
            .unwrap()
            .is_none(),
        "the narinfo is taken back"
    );
}

/// [`nar`]'s path, signed by `key`, uploaded through `up`.
async fn published_signed_by(up: &Uploader, key: &crate::nix::SecretKey) -> NarInfo {
    let nar = nar();
    let mut info = narinfo_for(&nar, nar.len());
    info.sign(key, "/nix/store");
    up.copy_path(info.clone(), |_| async { Ok(body(nar.clone())) }, None)
        .await
        .unwrap();
    info
}

/// The narinfo stored for `info`'s path.
fn stored_narinfo(mem: &MemoryStore, info: &NarInfo) -> NarInfo {
    let raw = mem.bytes(&object_key::narinfo(info.hash())).unwrap();
    NarInfo::parse(std::str::from_utf8(&raw).unwrap(), "/nix/store").unwrap()
}

/// `nix store sign --store URL` sends a published narinfo back with signatures added: they
/// are merged into the stored one, only when it describes the same contents, up to
/// MAX_SIGNATURES (the rest left out, the upload not refused). One under a key name the path
/// has a signature of already is added too: a bogus one stored first must not keep the valid
/// one out. Before, the upload was answered 200 and the signatures dropped.
#[tokio::test]
async fn signatures_sent_for_a_published_path_are_added_to_it() {
    use crate::nix::SecretKey;
    let (mem, up) = uploader_with_access();
    let sd = "/nix/store";
    let info = published_signed_by(&up, &SecretKey::generate("builder-1").unwrap()).await;
    let key = object_key::narinfo(info.hash());
    let stored = || stored_narinfo(&mem, &info);

    let mut signed = info.clone();
    signed.sign(&SecretKey::generate("release-1").unwrap(), sd);
    signed.sigs.push(
        SecretKey::generate("builder-1")
            .unwrap()
            .sign(b"something else"),
    );
    let acc = up
        .put_narinfo(info.hash(), signed.render(sd).as_bytes(), None)
        .await
        .unwrap();
    assert!(acc.already_present);
    let sigs: Vec<String> = stored().sigs.iter().map(|s| s.to_string()).collect();
    assert_eq!(sigs.len(), 3, "{sigs:?}");
    assert_eq!(sigs[0], info.sigs[0].to_string(), "the builder's replaced");
    assert!(sigs[1].starts_with("release-1:"), "{sigs:?}");
    assert_eq!(acc.narinfo.sigs.len(), 3);

    // The same signatures again: the narinfo is not written.
    let rewritten = Arc::new(AtomicUsize::new(0));
    let counted = rewritten.clone();
    mem.after_write(&key, move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
    });
    up.put_narinfo(info.hash(), signed.render(sd).as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(rewritten.load(Ordering::SeqCst), 0);

    // Signed contents other than the published ones: nothing added.
    let mut other = info.clone();
    other.nar_size += 1;
    other.sign(&SecretKey::generate("other-1").unwrap(), sd);
    up.put_narinfo(info.hash(), other.render(sd).as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(stored().sigs.len(), 3);

    // Up to MAX_SIGNATURES; the upload is not refused for the rest.
    let mut many = info.clone();
    for i in 0..super::narinfo::MAX_SIGNATURES {
        many.sign(&SecretKey::generate(&format!("k{i}")).unwrap(), sd);
    }
    let acc = up
        .put_narinfo(info.hash(), many.render(sd).as_bytes(), None)
        .await
        .unwrap();
    assert!(acc.already_present);
    assert_eq!(stored().sigs.len(), super::narinfo::MAX_SIGNATURES);
    // Full: one more sent is left out, and said (the client is told 200, and `nix store sign`
    // that it added it).
    let logs = crate::test_logs::capture();
    let mut late = stored();
    late.sign(&SecretKey::generate("late-1").unwrap(), sd);
    up.put_narinfo(info.hash(), late.render(sd).as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(stored().sigs.len(), super::narinfo::MAX_SIGNATURES);
    assert!(
        logs.text().contains("left out: it holds 16 already"),
        "{}",
        logs.text()
    );
}

/// Two builders pushing one path at once through this server take turns: the second finds
/// the first one's narinfo and adds its signature to it. Before, both found the path absent
/// and the second replaced the narinfo the first had been answered for (with a
/// non-reproducible build, its NarHash too, and the first's NAR was then collected).
#[tokio::test]
async fn two_uploads_of_one_path_at_once_take_turns() {
    use crate::nix::SecretKey;
    let (mem, up) = uploader_with_access();
    let up = Arc::new(up);
    let sd = "/nix/store";
    let nar = nar();
    let info = narinfo_for(&nar, nar.len());
    up.put_nar(&info.nar_file().unwrap(), body(nar.clone()))
        .await
        .unwrap();
    let push = |builder: &str| {
        let mut signed = info.clone();
        signed.sign(&SecretKey::generate(builder).unwrap(), sd);
        let up = up.clone();
        tokio::spawn(async move {
            up.put_narinfo(signed.hash(), signed.render(sd).as_bytes(), None)
                .await
        })
    };
    let writes = mem.hold_writes(&object_key::narinfo(info.hash()));
    let first = push("builder-1");
    writes.reached().await;
    let second = push("builder-2");
    tokio::select! {
        () = up.path_contended.notified() => {}
        // Not waiting for its turn: the second write is under way.
        () = writes.reached() => {}
    }
    writes.open();
    assert!(!first.await.unwrap().unwrap().already_present);
    assert!(second.await.unwrap().unwrap().already_present);
    let sigs: Vec<String> = stored_narinfo(&mem, &info)
        .sigs
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(sigs.len(), 2, "{sigs:?}");
    assert!(sigs[0].starts_with("builder-1:"), "{sigs:?}");
}

/// With `upload.trusted_keys`, only signatures by one of them are added to a published path,
/// and only by an upload one of them signed (answered 200 as before otherwise, with nothing
/// written: such an upload writes no record either).
#[tokio::test]
async fn with_trusted_keys_only_their_signatures_are_added() {
    use crate::nix::SecretKey;
    let trusted = SecretKey::generate("release-1").unwrap();
    let mut cfg = Config::default();
    cfg.upload.trusted_keys = vec![trusted.public()];
    let mem = Arc::new(MemoryStore::new());
    let store: Arc<dyn Store> = mem.clone();
    let up = Uploader::new(&cfg.upload, &cfg.store_dir, store.clone())
        .with_access(Arc::new(crate::gc::access::AccessLog::new(store, 100)));
    let sd = "/nix/store";
    let info = published_signed_by(&up, &trusted).await;
    let stored = || stored_narinfo(&mem, &info);
    let logs = crate::test_logs::capture();
    // Unsigned by a trusted key: nothing added, and said.
    let mut unsigned = info.clone();
    unsigned.sigs.clear();
    unsigned.sign(&SecretKey::generate("stranger-1").unwrap(), sd);
    up.put_narinfo(info.hash(), unsigned.render(sd).as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(stored().sigs, info.sigs);
    assert!(
        logs.text()
            .contains("a narinfo sent for a published path added nothing"),
        "{}",
        logs.text()
    );
    // Signed by it, with a stranger's beside: only trusted signatures are added, and the
    // others said to be left out.
    let mut both = info.clone();
    both.sign(&SecretKey::generate("stranger-1").unwrap(), sd);
    let other_trusted = SecretKey::generate("release-1").unwrap();
    both.sigs.push(other_trusted.sign(b"not this path"));
    up.put_narinfo(info.hash(), both.render(sd).as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(stored().sigs, info.sigs);
    assert!(
        logs.text()
            .contains("left out: not by one of upload.trusted_keys"),
        "{}",
        logs.text()
    );
}

/// Signatures to add, but the upload's record could not be written: the upload gets the
/// error (and Nix retries), not a 200 as if they were stored.
#[tokio::test]
async fn signatures_without_a_record_are_refused_not_dropped() {
    use crate::nix::SecretKey;
    use crate::store::memory::FailOp;
    let (mem, up) = uploader_with_access();
    let info = published_signed_by(&up, &SecretKey::generate("builder-1").unwrap()).await;
    mem.fail(FailOp::Write, "_cellar/access/*", 0, usize::MAX);
    let mut signed = info.clone();
    signed.sign(&SecretKey::generate("release-1").unwrap(), "/nix/store");
    up.put_narinfo(info.hash(), signed.render("/nix/store").as_bytes(), None)
        .await
        .unwrap_err();
    assert_eq!(stored_narinfo(&mem, &info).sigs, info.sigs);
    // Nothing to add: answered as before, record or not.
    up.put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap();
}

/// A path deleted (by a collection) between the upload's first look and its record is not
/// brought back by a signature merge: its references may be going.
#[tokio::test]
async fn a_path_deleted_meanwhile_gets_no_signatures_written() {
    use crate::nix::SecretKey;
    let (mem, up, _) = uploader_covering();
    let (info, key) = published(&up).await;
    // Deleted right after this upload (whose record covers the path: it wrote it) read it.
    let gate = mem.hold_gets(&key);
    let mut signed = info.clone();
    signed.sign(&SecretKey::generate("release-1").unwrap(), "/nix/store");
    let up = Arc::new(up);
    let put = tokio::spawn({
        let up = up.clone();
        async move {
            up.put_narinfo(signed.hash(), signed.render("/nix/store").as_bytes(), None)
                .await
        }
    });
    gate.reached().await;
    mem.remove(&key);
    gate.open();
    let e = put.await.unwrap().unwrap_err();
    assert!(e.to_string().contains("deleted meanwhile"), "{e}");
    assert!(mem.bytes(&key).is_none(), "brought back");
}

/// A path found present, then collected before this upload's record was durable (the
/// collector's look at the records after its batch missed it): not answered "present" (the
/// client would skip a path the cache no longer has), but looked at again once the record is
/// written, and uploaded.
#[tokio::test]
async fn a_path_collected_before_the_record_is_written_is_uploaded_not_taken_as_present() {
    let (mem, first) = uploader_with_access();
    let (info, key) = published(&first).await;
    // Another replica, whose records do not cover the path.
    let other = another_uploader(&mem, true);
    let weak = Arc::downgrade(&mem);
    let gone = key.clone();
    mem.after_write("_cellar/access/", move |_| {
        if let Some(m) = weak.upgrade() {
            m.remove(&gone);
        }
    });
    let answer = other
        .put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap();
    assert!(!answer.already_present);
    assert!(mem.bytes(&key).is_some(), "answered, yet not in the store");
}

/// Without access records (no collector protocol, as `cellar import` runs) no record is
/// written, so a path found present is not read again: one read.
#[tokio::test]
async fn without_records_a_present_path_is_read_once() {
    let (mem, up) = uploader();
    let (info, key) = published(&up).await;
    let before = mem.gets_under(&key);
    let fresh = another_uploader(&mem, false);
    let answer = fresh
        .put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap();
    assert!(answer.already_present);
    assert_eq!(mem.gets_under(&key), before + 1);
}

/// A narinfo write answered with an error after the store applied it (a timeout), while its
/// NAR was deleted: the narinfo is taken back all the same, not left naming nothing; also
/// when the first look at the NAR fails (it is asked again). (Paused time: the waits
/// between looks pass without taking them.)
#[tokio::test(start_paused = true)]
async fn a_narinfo_written_despite_its_error_is_taken_back_when_its_nar_is_gone() {
    use crate::store::memory::FailOp;
    for failed_looks in [0, 1] {
        let (mem, up, info) = nar_uploaded_then(move |m, nar_key| {
            m.remove(nar_key);
            m.fail(FailOp::Read, nar_key, 0, failed_looks);
        })
        .await;
        let key = object_key::narinfo(info.hash());
        mem.fail(FailOp::WriteAnswer, &key, 0, 1);
        let res = up
            .put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
            .await;
        assert!(res.is_err(), "{res:?}");
        assert!(
            mem.head(&key).await.unwrap().is_none(),
            "{failed_looks} failed looks: left naming a NAR that is gone"
        );
    }
}

/// Another build of the path, naming its own NAR, written over the narinfo (through another
/// replica) before the take-back: the take-back leaves it, and deletes only a narinfo that
/// still names the NAR that is gone.
#[tokio::test]
async fn a_narinfo_replaced_before_its_take_back_is_left() {
    let info = narinfo_for(&nar(), nar().len());
    let mut other = info.clone();
    other.url = format!("nar/{}.nar", "1".repeat(52));
    let other = other.render("/nix/store");
    let key = object_key::narinfo(info.hash());
    let (mem, up, info) = nar_uploaded_then({
        let (other, key) = (other.clone(), key.clone());
        move |m, nar_key| {
            m.remove(nar_key);
            m.insert(&key, other.clone());
        }
    })
    .await;
    let e = up
        .put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("may have stored it since"), "{e}");
    assert_eq!(
        mem.bytes(&key).as_deref(),
        Some(other.as_bytes()),
        "taken back"
    );
}

/// The NAR uploaded again (by another upload of the path) between the look that found it
/// gone and the take-back: the narinfo, whole again, stays.
#[tokio::test]
async fn a_narinfo_whose_nar_is_back_before_its_take_back_is_left() {
    // Reads of the NAR are held from the narinfo's write on.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = std::sync::Mutex::new(Some(tx));
    let (mem, up, info) = nar_uploaded_then(move |m, nar_key| {
        m.remove(nar_key);
        if let Some(tx) = tx.lock().unwrap().take() {
            let _ = tx.send(m.hold_reads(nar_key));
        }
    })
    .await;
    let nar_key = object_key::nar(&info.nar_file().unwrap());
    let text = info.render("/nix/store");
    let put = up.put_narinfo(info.hash(), text.as_bytes(), None);
    let (res, ()) = tokio::join!(put, async {
        // The look after the write finds the NAR gone; it comes back before the next.
        let gate = rx.await.unwrap();
        gate.reached().await;
        mem.insert(&nar_key, nar());
        gate.open();
    });
    assert!(res.is_err(), "{res:?}");
    assert!(
        mem.bytes(&object_key::narinfo(info.hash())).is_some(),
        "taken back"
    );
}

/// A look at the NAR that fails while its narinfo is written is asked again, and never
/// takes the narinfo back: it may be another, acknowledged upload's (through another
/// replica), which a referrer was accepted on the word of. Failing every time, the upload
/// gets the error and the narinfo stays. (Paused time: the waits between looks pass without
/// taking them.)
#[tokio::test(start_paused = true)]
async fn a_failed_look_at_the_nar_is_asked_again_and_never_takes_the_narinfo_back() {
    use crate::store::memory::FailOp;
    for (failures, ok) in [(1, true), (4, false)] {
        let (mem, up, info) =
            nar_uploaded_then(move |m, nar_key| m.fail(FailOp::Read, nar_key, 0, failures)).await;
        let res = up
            .put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
            .await;
        assert_eq!(res.is_ok(), ok, "{failures} failures: {res:?}");
        let stored = mem.head(&object_key::narinfo(info.hash())).await.unwrap();
        assert!(stored.is_some(), "{failures} failures: taken back");
    }
}

/// A NAR read back for a narinfo (uploaded through another replica) takes a slot of its own
/// pool: with every one taken it waits, and is busy after [`ADMIT_WAIT`]; the uploads' slots
/// all taken do not hold it up. (Paused time.)
#[tokio::test(start_paused = true)]
async fn reading_a_nar_back_takes_a_slot_of_its_own() {
    let mem = Arc::new(MemoryStore::new());
    let mut cfg = Config::default();
    cfg.upload.max_concurrent = 1;
    let store: Arc<dyn Store> = mem.clone();
    let up = Uploader::new(&cfg.upload, &cfg.store_dir, store);
    let nar = nar();
    let info = narinfo_for(&nar, nar.len());
    mem.insert(&object_key::nar(&info.nar_file().unwrap()), nar.to_vec());
    let text = info.render("/nix/store");
    let slot = up.readback_slot().await.unwrap();
    let uploading = up.admit().await.unwrap();
    let e = up
        .put_narinfo(info.hash(), text.as_bytes(), None)
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Upload(UploadError::Busy { .. })),
        "{e:?}"
    );
    drop(slot);
    up.put_narinfo(info.hash(), text.as_bytes(), None)
        .await
        .unwrap();
    drop(uploading);
}

fn narinfo_at(path: &str, nar: &[u8], url: &str) -> NarInfo {
    let h = Sha256::digest(nar);
    let text = format!(
        "StorePath: /nix/store/{path}\nURL: {url}\nCompression: none\n\
         NarHash: {h}\nNarSize: {}\nReferences: \n",
        nar.len()
    );
    NarInfo::parse(&text, "/nix/store").unwrap()
}

#[tokio::test]
async fn narinfos_are_checked_against_remembered_digests_or_the_nar_read_back() {
    let (mem, up) = uploader();
    let paths = [
        "6bxnj2gfflqa529lddzh3zhcn45nn86r-a",
        "7bxnj2gfflqa529lddzh3zhcn45nn86r-b",
    ];
    let mut uploaded = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let mut n = nar().to_vec();
        n.push(i as u8);
        let url = format!("nar/{}.nar", Sha256::digest(&n).to_nix32());
        let info = narinfo_at(p, &n, &url);
        up.put_nar(&info.nar_file().unwrap(), body(Bytes::from(n.clone())))
            .await
            .unwrap();
        uploaded.push((info, n));
    }
    for (info, _) in &uploaded {
        let raw = info.render("/nix/store");
        up.put_narinfo(info.hash(), raw.as_bytes(), None)
            .await
            .unwrap();
    }
    assert_eq!(
        mem.gets_under("nar/"),
        0,
        "a NAR uploaded here was read back"
    );

    // A NAR that reached the store another way (another replica, an earlier run) is read
    // back and digested once.
    let (mem, up) = uploader();
    let (info, n) = &uploaded[0];
    let key = object_key::nar(&info.nar_file().unwrap());
    mem.insert(&key, n.clone());
    let raw = info.render("/nix/store");
    up.put_narinfo(info.hash(), raw.as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(mem.gets_under("nar/"), 1);

    // A stored object that is no NAR, and not what its name says: refused (a 4xx, which Nix
    // does not retry: its retry would come without a body), its NAR taken for bad, so that
    // the builder's next copy sends it again.
    let (mem, up) = uploader();
    let (info, _) = &uploaded[1];
    mem.insert(
        &object_key::nar(&info.nar_file().unwrap()),
        b"not a NAR".to_vec(),
    );
    let raw = info.render("/nix/store");
    let e = up
        .put_narinfo(info.hash(), raw.as_bytes(), None)
        .await
        .unwrap_err();
    assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST, "{e}");
    assert!(e.to_string().contains("run the copy again"), "{e}");
    assert!(up.nar_found_bad(&info.nar_file().unwrap()));
}

/// A NAR object that is not what its name says (cut short by an interrupted copy, a disk's
/// corruption) fails the narinfo naming it (400: run the copy again), and is then not taken for
/// stored by an upload of its name: the builder's next attempt sends the body, which replaces
/// it, and its narinfo is accepted. Before, a large one was taken for stored by every upload
/// (answered without its body) and the path could not be pushed until `cellar verify --hashes
/// --repair` deleted it.
#[tokio::test]
async fn a_nar_found_bad_when_read_back_is_replaced_by_its_next_upload() {
    // Sent without a length (else one of another size than the stored copy's is received
    // anyway, see the next test).
    let unknown_length = None;
    let (good, info, file) = sample();
    let key = object_key::nar(&file);
    let raw = info.render("/nix/store");
    // Cut short (still a NAR's header: read whole, its sha256 is not its name's), or not a
    // NAR at all (its reading fails).
    for bad in [
        good.slice(..good.len() / 2),
        Bytes::from_static(b"not a NAR"),
    ] {
        let (mem, up) = uploader();
        mem.insert(&key, bad.to_vec());
        assert!(up.already_stored(&file, unknown_length).await.unwrap());
        let e = up
            .put_narinfo(info.hash(), raw.as_bytes(), None)
            .await
            .unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST, "{e}");
        assert!(
            !up.already_stored(&file, unknown_length).await.unwrap(),
            "a bad copy taken for stored"
        );
        up.put_nar(&file, body(good.clone())).await.unwrap();
        assert_eq!(mem.bytes(&key).unwrap(), good);
        up.put_narinfo(info.hash(), raw.as_bytes(), None)
            .await
            .unwrap();
        assert!(
            up.already_stored(&file, unknown_length).await.unwrap(),
            "stored again, still taken for bad"
        );
    }
}

/// A large NAR sent with a length (every `nix copy` PUT has one) that the store holds at
/// another size (cut short: its name is the sha256 of the whole file) is received and stored
/// over that copy on the first upload; one of the size sent is taken for stored.
#[tokio::test]
async fn a_large_nar_stored_at_another_size_is_received_again() {
    let (mem, up) = uploader();
    let file: NarFileName = format!("{}.nar.xz", "1".repeat(52)).parse().unwrap();
    let size = STORED_AGAIN_MAX + 10;
    mem.insert(&object_key::nar(&file), vec![0u8; size as usize]);
    assert!(up.already_stored(&file, Some(size)).await.unwrap());
    assert!(up.already_stored(&file, None).await.unwrap());
    assert!(!up.already_stored(&file, Some(size + 1)).await.unwrap());
}

/// A NAR that cannot be read back for a reason of this server's (over its limits) or of the
/// store's connection (its body broke off) is not taken for bad: uploads of its name still find it stored.
#[tokio::test]
async fn a_nar_this_server_cannot_read_back_is_not_taken_for_bad() {
    use crate::store::memory::FailOp;
    let unknown_length = None;
    let (good, info, file) = sample();
    let key = object_key::nar(&file);
    let raw = info.render("/nix/store");
    let mem = Arc::new(MemoryStore::new());
    let store: Arc<dyn Store> = mem.clone();
    let mut cfg = Config::default();
    cfg.upload.max_nar_bytes = good.len() as u64 - 1;
    let up = Uploader::new(&cfg.upload, &cfg.store_dir, store);
    mem.insert(&key, good.to_vec());
    assert!(up
        .put_narinfo(info.hash(), raw.as_bytes(), None)
        .await
        .is_err());
    assert!(
        up.already_stored(&file, unknown_length).await.unwrap(),
        "over the limits"
    );
    let (mem, up) = uploader();
    mem.insert(&key, good.to_vec());
    mem.fail(FailOp::Body, &key, 0, 1);
    assert!(up
        .put_narinfo(info.hash(), raw.as_bytes(), None)
        .await
        .is_err());
    assert!(
        up.already_stored(&file, unknown_length).await.unwrap(),
        "a broken read"
    );
}

/// A re-encoded copy is never taken for bad (its name is the uploaded file's hash, not its
/// own bytes': one that does not decode here may be another replica's encoding, over this
/// one's limits), so an upload does not write a new encoding over it, which published
/// narinfos name by hash and size; and a good one read back by a process that did not store
/// it (another replica) is taken.
#[tokio::test]
async fn a_re_encoded_copy_is_not_taken_for_bad() {
    let (mem, up) = uploader_to_zstd();
    let (good, info, file) = sample();
    let copy = object_key::nar(&file.with_compression(Compression::Zstd));
    let raw = info.render("/nix/store");
    mem.insert(&copy, b"no zstd frame".to_vec());
    assert!(up
        .put_narinfo(info.hash(), raw.as_bytes(), None)
        .await
        .is_err());
    // The name looked for, the copy read once: not again, to be hashed.
    assert_eq!(mem.gets_under("nar/"), 2);
    assert!(
        up.put_nar(&file, body(good.clone()))
            .await
            .unwrap()
            .is_none(),
        "a new encoding written over the copy"
    );
    assert_eq!(mem.bytes(&copy).unwrap(), &b"no zstd frame"[..]);

    let (mem, up) = uploader_to_zstd();
    mem.insert(&copy, zstd::encode_all(&good[..], 3).unwrap());
    up.put_narinfo(info.hash(), raw.as_bytes(), None)
        .await
        .unwrap();
}

/// A narinfo naming a re-encoded copy by its stored name (`<uploaded file's hash>.nar.zst`,
/// as cellar's own narinfos do: pushed again from a copy of them, mirrored, imported) is
/// checked against the bytes its `FileHash` names, not taken for a bad copy.
#[tokio::test]
async fn a_narinfo_naming_a_re_encoded_copy_by_its_stored_name_is_taken() {
    let (mem, up) = uploader_to_zstd();
    let (good, info, file) = sample();
    let stored_name = file.with_compression(Compression::Zstd);
    let zstd = zstd::encode_all(&good[..], 3).unwrap();
    mem.insert(&object_key::nar(&stored_name), zstd.clone());
    let mut named = info.clone();
    named.url = format!("nar/{stored_name}");
    named.compression = Compression::Zstd;
    named.file_hash = Some(Sha256::digest(&zstd));
    named.file_size = Some(zstd.len() as u64);
    let raw = named.render("/nix/store");
    let accepted = up.put_narinfo(info.hash(), raw.as_bytes(), None).await;
    assert!(accepted.is_ok(), "{:?}", accepted.err());
    assert!(!up.nar_found_bad(&stored_name));
    // One whose FileHash does not name the bytes either is a bad copy.
    let (mem, up) = uploader_to_zstd();
    mem.insert(&object_key::nar(&stored_name), zstd.clone());
    named.file_hash = Some(Sha256::digest(b"other bytes"));
    let raw = named.render("/nix/store");
    let e = up
        .put_narinfo(info.hash(), raw.as_bytes(), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("run the copy again"), "{e}");
}

/// A copy stored as sent that does not decode here but whose bytes are its name's (over this
/// server's limits, stored through a replica with larger ones) is not taken for bad: uploads
/// of the name still find it stored. And a copy found bad, then found good (stored again
/// through another replica), is taken for stored again.
#[tokio::test]
async fn only_bytes_that_are_not_their_name_are_taken_for_bad() {
    let unknown_length = None;
    let (mem, up) = uploader();
    let not_a_nar = b"its name's bytes, but no NAR".to_vec();
    let file: NarFileName = format!("{}.nar", Sha256::digest(&not_a_nar).to_nix32())
        .parse()
        .unwrap();
    mem.insert(&object_key::nar(&file), not_a_nar.clone());
    let info = narinfo_at(PATH, &not_a_nar, &format!("nar/{file}"));
    let e = up
        .put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap_err();
    assert_eq!(e.status(), axum::http::StatusCode::BAD_GATEWAY, "{e}");
    assert!(!up.nar_found_bad(&file));
    assert!(up.already_stored(&file, unknown_length).await.unwrap());

    let (good, info, file) = sample();
    let raw = info.render("/nix/store");
    mem.insert(&object_key::nar(&file), b"not a NAR".to_vec());
    assert!(up
        .put_narinfo(info.hash(), raw.as_bytes(), None)
        .await
        .is_err());
    assert!(up.nar_found_bad(&file));
    mem.insert(&object_key::nar(&file), good.to_vec());
    up.put_narinfo(info.hash(), raw.as_bytes(), None)
        .await
        .unwrap();
    assert!(
        !up.nar_found_bad(&file),
        "read back good, still taken for bad"
    );
}

/// `nix copy --to 'http://…?compression=gzip'` uploads gzip NARs as `<hash>.nar` (Nix gives
/// gzip no extension) with `Compression: gzip`: verified through gzip and published as gzip,
/// whether uploaded here or read back from the store (another replica's upload), and
/// re-encoded when uploads are.
#[tokio::test]
async fn a_gzip_nar_named_plain_is_verified_and_published_as_gzip() {
    use std::io::Write as _;
    let plain = nar();
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(&plain).unwrap();
    let gz = e.finish().unwrap();
    let url = format!("nar/{}.nar", Sha256::digest(&gz).to_nix32());
    let mut info = narinfo_at(PATH, &plain, &url);
    info.compression = Compression::Gzip;
    let raw = info.render("/nix/store");
    let file = info.nar_file().unwrap();

    let upload = |up: Uploader| {
        let (file, gz, raw, h) = (file.clone(), gz.clone(), raw.clone(), info.hash());
        async move {
            up.put_nar(&file, body(Bytes::from(gz))).await.unwrap();
            up.put_narinfo(h, raw.as_bytes(), None).await.unwrap();
        }
    };

    let (mem, up) = uploader();
    upload(up).await;
    let stored = stored_narinfo(&mem, &info);
    assert_eq!(stored.compression, Compression::Gzip);
    assert_eq!(stored.file_hash, Some(Sha256::digest(&gz)));
    assert_eq!(stored.url, url);
    assert_eq!(mem.bytes(&object_key::nar(&file)).unwrap(), gz);

    let (mem, up) = uploader();
    mem.insert(&object_key::nar(&file), gz.clone());
    up.put_narinfo(info.hash(), raw.as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(stored_narinfo(&mem, &info).compression, Compression::Gzip);

    let mem = Arc::new(MemoryStore::new());
    let store: Arc<dyn Store> = mem.clone();
    let mut cfg = Config::default();
    cfg.upload.recompress = Some(Recompression {
        compression: Compression::Zstd,
        level: None,
    });
    upload(Uploader::new(&cfg.upload, &cfg.store_dir, store)).await;
    let stored = stored_narinfo(&mem, &info);
    assert_eq!(stored.compression, Compression::Zstd);
    let nar = mem
        .bytes(&object_key::nar(&stored.nar_file().unwrap()))
        .unwrap();
    assert_eq!(zstd::decode_all(&nar[..]).unwrap(), plain);
}

#[tokio::test]
async fn a_nar_sent_in_the_target_compression_is_stored_as_sent() {
    let mem = Arc::new(MemoryStore::new());
    let store: Arc<dyn Store> = mem.clone();
    let mut cfg = Config::default();
    cfg.upload.recompress = Some(Recompression {
        compression: Compression::Zstd,
        level: Some(19),
    });
    let up = Uploader::new(&cfg.upload, &cfg.store_dir, store);
    let sent = Bytes::from(zstd::encode_all(&nar()[..], 1).unwrap());
    let name: NarFileName = format!("{}.nar.zst", Sha256::digest(&sent).to_nix32())
        .parse()
        .unwrap();
    up.put_nar(&name, body(sent.clone())).await.unwrap();
    let stored = mem.get_bytes(&object_key::nar(&name), 1 << 20).await;
    assert_eq!(stored.unwrap(), Some(sent), "re-encoded under its own name");
    assert_eq!(mem.keys(), [object_key::nar(&name)]);
}

/// The look for a NAR's re-encoded copy before it is committed is asked again when it fails
/// (a passing store error does not fail an upload whose body is in, nor overwrite the copy);
/// a store that cannot say at all fails the upload, and the copy stays. (Paused time: the
/// waits between looks pass without taking them.)
#[tokio::test(start_paused = true)]
async fn a_failed_look_for_the_re_encoded_copy_is_asked_again() {
    use crate::store::memory::FailOp;
    let (mem, up) = uploader_to_zstd();
    let name: NarFileName = format!("{}.nar", Sha256::digest(&nar()).to_nix32())
        .parse()
        .unwrap();
    let copy = object_key::nar(&name.with_compression(Compression::Zstd));
    mem.insert(&copy, vec![1u8; 300]);
    for (failures, written) in [(1, Ok(false)), (4, Err(()))] {
        mem.fail(FailOp::Read, &copy, 0, failures);
        let put = up.put_nar(&name, body(nar())).await;
        assert_eq!(
            put.map(|d| d.is_some()).map_err(|_| ()),
            written,
            "{failures}"
        );
        assert_eq!(
            mem.bytes(&copy).as_deref(),
            Some(&[1u8; 300][..]),
            "{failures}"
        );
    }
}

/// A narinfo refused whatever the store holds (unsigned, with `upload.trusted_keys` set) costs
/// no lookup of its references, no read back of its NAR and no upload record: only the read
/// that tells whether the path is already there, which is then answered as present.
#[tokio::test]
async fn an_unsigned_narinfo_is_refused_before_the_store_is_asked() {
    let key = crate::nix::SecretKey::generate("builder-1").unwrap();
    let mem = Arc::new(MemoryStore::new());
    let store: Arc<dyn Store> = mem.clone();
    let mut cfg = Config::default();
    cfg.upload.trusted_keys = vec![key.public()];
    let up = Uploader::new(&cfg.upload, &cfg.store_dir, store.clone())
        .with_access(Arc::new(crate::gc::access::AccessLog::new(store, 100)));
    let sd = "/nix/store";
    let nar = nar();
    let url = format!("nar/{}.nar", Sha256::digest(&nar).to_nix32());
    let mut info = narinfo_at(PATH, &nar, &url);
    // Fifty references the cache lacks, and a NAR in the store nobody uploaded here.
    info.references = (0..50)
        .map(|i| format!("{i:0>32}-r").replace('0', "a").parse().unwrap())
        .collect();
    mem.insert(&url, nar.clone());
    let e = up
        .put_narinfo(info.hash(), info.render(sd).as_bytes(), None)
        .await;
    assert!(
        matches!(&e, Err(Error::Upload(UploadError::Rejected(m))) if m.contains("trusted_keys")),
        "{e:?}"
    );
    assert_eq!(mem.heads_under(""), 0);
    assert_eq!(mem.gets_under("nar/"), 0);
    assert_eq!(
        mem.keys(),
        std::slice::from_ref(&url),
        "nothing written: no upload record"
    );

    // Already there: answered as present, as to a signed upload.
    let mut stored = info.clone();
    stored.references.clear();
    stored.sign(&key, sd);
    mem.insert(&format!("{}.narinfo", &PATH[..32]), stored.render(sd));
    let acc = up
        .put_narinfo(info.hash(), info.render(sd).as_bytes(), None)
        .await
        .unwrap();
    assert!(acc.already_present);
}

/// A path copied from a cellar that re-encoded its NAR on upload (`upload.compression`): the
/// NAR keeps the name it was uploaded under, and its bytes hash to the narinfo's `FileHash`,
/// which the copy (a mirror, `cellar import`) checks instead of the name; bytes that hash to
/// neither are refused, and nothing is written.
#[tokio::test]
async fn a_nar_another_cellar_re_encoded_is_copied_by_its_file_hash() {
    let nar = nar();
    let zst = Bytes::from(zstd::encode_all(&nar[..], 3).unwrap());
    // The name of the xz file a builder uploaded there, as that cellar keeps it.
    let uploaded = Sha256::digest(b"the xz file the builder sent");
    let url = format!("nar/{}.nar.zst", uploaded.to_nix32());
    let mut info = narinfo_at(PATH, &nar, &url);
    info.compression = Compression::Zstd;
    info.file_hash = Some(Sha256::digest(&zst));
    info.file_size = Some(zst.len() as u64);
    let (mem, up) = uploader();
    let acc = up
        .copy_path(info.clone(), |_| async { Ok(body(zst.clone())) }, None)
        .await
        .unwrap();
    assert!(!acc.already_present);
    assert_eq!(mem.bytes(&url).unwrap(), zst);
    assert_eq!(acc.narinfo.url, url);

    let (mem, up) = uploader();
    // The same NAR in another encoding (another level): a copy, but not the one named.
    let other = Bytes::from(zstd::encode_all(&nar[..], 19).unwrap());
    assert_ne!(other, zst);
    let got = up
        .copy_path(info.clone(), |_| async { Ok(body(other.clone())) }, None)
        .await;
    assert!(
        matches!(&got, Err(Error::Upload(UploadError::Rejected(m))) if m.contains("FileHash")),
        "{got:?}"
    );
    assert!(
        mem.keys()
            .iter()
            .all(|k| !k.starts_with("nar/") && !k.ends_with(".narinfo")),
        "{:?}",
        mem.keys()
    );
}

/// The server's own signatures sent back with a narinfo (a client that substituted the path
/// and pushes it, `nix store sign` against the root, a directory copied from the cache) are
/// not stored, new path or added signatures alike: the server makes them as it serves, and a
/// stored one would outlive its key's retirement. Another key's are.
#[tokio::test]
async fn the_servers_own_signatures_are_not_stored() {
    let own = crate::nix::SecretKey::generate("cache-1").unwrap();
    let other = crate::nix::SecretKey::generate("builder-1").unwrap();
    let sd = "/nix/store";
    let (mem, up) = uploader();
    up.set_own_key_names(vec!["cache-1".to_owned()]);
    let nar = nar();
    let mut info = narinfo_for(&nar, nar.len());
    info.sign(&own, sd);
    up.copy_path(info.clone(), |_| async { Ok(body(nar.clone())) }, None)
        .await
        .unwrap();
    let published = info.clone();
    let names = |mem: &MemoryStore| -> Vec<String> {
        stored_narinfo(mem, &published)
            .sigs
            .iter()
            .map(|s| s.key_name().to_owned())
            .collect()
    };
    assert!(names(&mem).is_empty(), "{:?}", names(&mem));
    info.sign(&other, sd);
    let acc = up
        .put_narinfo(info.hash(), info.render(sd).as_bytes(), None)
        .await
        .unwrap();
    assert!(acc.already_present);
    assert_eq!(names(&mem), ["builder-1"]);
}

/// A NAR string: length, bytes, zeros to a multiple of 8.
fn nar_token(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.resize(out.len().next_multiple_of(8), 0);
}

/// The NAR of one regular file, or of a directory holding it as `a`.
fn one_file_nar(contents: &[u8], in_dir: bool) -> Bytes {
    let mut n = Vec::new();
    let mut t = |s: &str| nar_token(s.as_bytes(), &mut n);
    t("nix-archive-1");
    t("(");
    if in_dir {
        for s in ["type", "directory", "entry", "(", "name", "a", "node", "("] {
            t(s);
        }
    }
    t("type");
    t("regular");
    t("contents");
    nar_token(contents, &mut n);
    let closes = if in_dir { 3 } else { 1 };
    for _ in 0..closes {
        nar_token(b")", &mut n);
    }
    Bytes::from(n)
}

/// The NAR of one executable file.
fn executable_file_nar(contents: &[u8]) -> Bytes {
    let mut n = Vec::new();
    for t in [
        "nix-archive-1",
        "(",
        "type",
        "regular",
        "executable",
        "",
        "contents",
    ] {
        nar_token(t.as_bytes(), &mut n);
    }
    nar_token(contents, &mut n);
    nar_token(b")", &mut n);
    Bytes::from(n)
}

/// With `upload.trusted_keys`, a content-addressed path passes unsigned, as Nix lets it in
/// (a builder's `secret-key-files` signs none: `nix store add-path`, `builtins.toFile`,
/// `.drv` files), if its path is the one its `CA:` gives and its NAR holds what that claims:
/// paths the real Nix made, and the same paths with other contents.
#[tokio::test]
async fn unsigned_content_addressed_paths_pass_trusted_keys_on_their_contents() {
    let key = crate::nix::SecretKey::generate("builder-1").unwrap();
    let dir = one_file_nar(b"x\n", true);
    // `nix store add-path` of a directory holding `a`: its CA is its NAR's hash.
    assert_eq!(
        Sha256::digest(&dir).to_nix32(),
        "16bgv7k5078n3n4zg41hnybrc4fa0j6q8cyx31qc9p2qwp9xsgib"
    );
    let cases = [
        // (path, CA, NAR, passes)
        (
            "h97b2v1mpva3fwnjbrr4yfdjyndj04fl-d",
            "fixed:r:sha256:16bgv7k5078n3n4zg41hnybrc4fa0j6q8cyx31qc9p2qwp9xsgib",
            dir.clone(),
            true,
        ),
        (
            "h97b2v1mpva3fwnjbrr4yfdjyndj04fl-d",
            "fixed:r:sha256:16bgv7k5078n3n4zg41hnybrc4fa0j6q8cyx31qc9p2qwp9xsgib",
            one_file_nar(b"y\n", true),
            false,
        ),
        (
            "d4b4lmbd433fa2xcdysz7p7zahnqh1z4-f.txt",
            "fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq",
            one_file_nar(b"hello\n", false),
            true,
        ),
        (
            "d4b4lmbd433fa2xcdysz7p7zahnqh1z4-f.txt",
            "fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq",
            one_file_nar(b"hellO\n", false),
            false,
        ),
        (
            "d4b4lmbd433fa2xcdysz7p7zahnqh1z4-f.txt",
            "fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq",
            one_file_nar(b"hello\n", true),
            false,
        ),
        (
            "v0lh0k7cm9jbiq3b6ccbr86imvzpibn3-u.txt",
            "text:sha256:1mha3hgpyv8cq0qvn27049a8pyd21h6wwxgw7b5cf8f3f1g97zhb",
            one_file_nar(b"u", false),
            true,
        ),
        (
            "v0lh0k7cm9jbiq3b6ccbr86imvzpibn3-u.txt",
            "text:sha256:1mha3hgpyv8cq0qvn27049a8pyd21h6wwxgw7b5cf8f3f1g97zhb",
            one_file_nar(b"v", false),
            false,
        ),
        // The same contents, executable: no text path is (its hash does not cover the bit).
        (
            "v0lh0k7cm9jbiq3b6ccbr86imvzpibn3-u.txt",
            "text:sha256:1mha3hgpyv8cq0qvn27049a8pyd21h6wwxgw7b5cf8f3f1g97zhb",
            executable_file_nar(b"u"),
            false,
        ),
    ];
    for (path, ca, nar, passes) in cases {
        let mem = Arc::new(MemoryStore::new());
        let store: Arc<dyn Store> = mem.clone();
        let mut cfg = Config::default();
        cfg.upload.trusted_keys = vec![key.public()];
        let up = Uploader::new(&cfg.upload, &cfg.store_dir, store);
        let mut info = narinfo_at(
            path,
            &nar,
            &format!("nar/{}.nar", Sha256::digest(&nar).to_nix32()),
        );
        info.ca = Some(ca.to_owned());
        // Its path not the one its CA gives: refused before anything is copied.
        let mut other = info.clone();
        other.ca = Some(format!("{}aaaa", &ca[..ca.len() - 4]));
        let got = up
            .copy_path(other, |_| async { Ok(body(nar.clone())) }, None)
            .await;
        assert!(
            matches!(&got, Err(Error::Upload(UploadError::Rejected(m))) if m.contains("trusted_keys")),
            "{path}: {got:?}"
        );
        let got = up
            .copy_path(info.clone(), |_| async { Ok(body(nar.clone())) }, None)
            .await;
        match passes {
            true => assert!(got.is_ok(), "{path}: {got:?}"),
            false => assert!(
                matches!(&got, Err(Error::Upload(UploadError::Rejected(m))) if m.contains("CA:")),
                "{path}: {got:?}"
            ),
        }
        let written = mem.head(&object_key::narinfo(info.hash())).await.unwrap();
        assert_eq!(written.is_some(), passes, "{path}");
    }
}

/// Each check of a narinfo against its NAR refuses the narinfo that fails it, with a message
/// that says which; the narinfo that passes them all is written.
#[tokio::test]
async fn every_narinfo_check_refuses_what_it_checks() {
    let key = crate::nix::SecretKey::generate("builder-1").unwrap();
    let mem = Arc::new(MemoryStore::new());
    let store: Arc<dyn Store> = mem.clone();
    let mut cfg = Config::default();
    cfg.upload.trusted_keys = vec![key.public()];
    let up = Uploader::new(&cfg.upload, &cfg.store_dir, store);
    let sd = "/nix/store";
    let nar = nar();
    let url = format!("nar/{}.nar", Sha256::digest(&nar).to_nix32());
    let good = {
        let mut i = narinfo_at(PATH, &nar, &url);
        i.file_hash = Some(Sha256::digest(&nar));
        i.file_size = Some(nar.len() as u64);
        // A path may refer to itself; that reference needs no narinfo of its own.
        i.references = vec![i.store_path.clone()];
        i
    };
    let signed = |mut i: NarInfo| {
        i.sigs.clear();
        i.sign(&key, sd);
        i
    };
    up.put_nar(&good.nar_file().unwrap(), body(nar.clone()))
        .await
        .unwrap();

    let other = Sha256::digest(b"other");
    let missing_ref: crate::nix::StorePathBaseName =
        "7bxnj2gfflqa529lddzh3zhcn45nn86r-missing".parse().unwrap();
    type Change = fn(&mut NarInfo, Sha256, &crate::nix::StorePathBaseName);
    let cases: [(&str, Change); 7] = [
        ("does not match the URL's extension", |i, _, _| {
            i.url.push_str(".xz")
        }),
        ("FileHash", |i, o, _| i.file_hash = Some(o)),
        ("FileSize", |i, _, _| i.file_size = Some(3)),
        ("NarHash", |i, o, _| i.nar_hash = o),
        ("NarSize", |i, _, _| i.nar_size += 1),
        ("is not in the cache", |i, _, r| {
            i.references.push(r.clone())
        }),
        ("has not been uploaded", |i, _, _| {
            i.url = format!("nar/{}.nar", Sha256::digest(b"never").to_nix32())
        }),
    ];
    for (needle, change) in cases {
        let mut bad = good.clone();
        change(&mut bad, other, &missing_ref);
        let raw = signed(bad).render(sd);
        let e = up.put_narinfo(good.hash(), raw.as_bytes(), None).await;
        assert!(
            matches!(&e, Err(Error::Upload(UploadError::Rejected(m))) if m.contains(needle)),
            "{needle}: {e:?}"
        );
    }
    // Not signed by a trusted key.
    let e = up
        .put_narinfo(good.hash(), good.render(sd).as_bytes(), None)
        .await;
    assert!(
        matches!(&e, Err(Error::Upload(UploadError::Rejected(m))) if m.contains("trusted_keys")),
        "{e:?}"
    );
    assert!(mem.keys().iter().all(|k| !k.ends_with(".narinfo")));

    let acc = up
        .put_narinfo(
            good.hash(),
            signed(good.clone()).render(sd).as_bytes(),
            None,
        )
        .await
        .unwrap();
    assert!(!acc.already_present);
    assert!(mem.keys().contains(&object_key::narinfo(good.hash())));

    // A NAR remembered from its upload but deleted from the bucket since is not trusted.
    let (mem, up) = uploader();
    up.put_nar(&good.nar_file().unwrap(), body(nar.clone()))
        .await
        .unwrap();
    mem.delete(&object_key::nar(&good.nar_file().unwrap()))
        .await
        .unwrap();
    let e = up
        .put_narinfo(good.hash(), good.render(sd).as_bytes(), None)
        .await;
    assert!(
        matches!(&e, Err(Error::Upload(UploadError::Rejected(m))) if m.contains("has not been uploaded")),
        "{e:?}"
    );
}

#[tokio::test]
async fn plain_uploads_are_stored_as_sent_within_their_limit() {
    let (mem, up) = uploader();
    let chunks = futures::stream::iter([Ok(Bytes::from("0123")), Ok(Bytes::from("456789"))]);
    up.put_plain("log/x", chunks, 10).await.unwrap();
    let got = mem.get_bytes("log/x", 100).await.unwrap();
    assert_eq!(got, Some(Bytes::from("0123456789")));
    let over = futures::stream::iter([Ok(Bytes::from("0123456789")), Ok(Bytes::from("a"))]);
    let e = up.put_plain("log/y", over, 10).await;
    assert!(
        matches!(e, Err(Error::Upload(UploadError::TooLarge { limit: 10 }))),
        "{e:?}"
    );
    assert_eq!(mem.keys(), ["log/x"]);
}

/// A reference the store lacks counts as present when an upstream serves a validly signed
/// narinfo for it (so builders can upload on top of cache.nixos.org); without the upstream it
/// is missing.
#[tokio::test]
async fn references_an_upstream_serves_count_as_present() {
    let upstream_key = crate::nix::SecretKey::generate("upstream-1").unwrap();
    let base = "7bxnj2gfflqa529lddzh3zhcn45nn86r-base";
    let their_url = format!("nar/{}.nar", Sha256::digest(b"base nar").to_nix32());
    let mut theirs = narinfo_at(base, b"base nar", &their_url);
    theirs.sign(&upstream_key, "/nix/store");
    let served = theirs.render("/nix/store");
    let path = format!("/{}.narinfo", theirs.hash());
    let app = axum::Router::new().route(&path, axum::routing::get(move || async move { served }));
    let upstreams = crate::upstream::serving(app, vec![upstream_key.public()]).await;

    let (_mem, up) = uploader();
    let nar = nar();
    let url = format!("nar/{}.nar", Sha256::digest(&nar).to_nix32());
    let mut ours = narinfo_at(PATH, &nar, &url);
    ours.references = vec![theirs.store_path.clone()];
    up.put_nar(&ours.nar_file().unwrap(), body(nar.clone()))
        .await
        .unwrap();
    let raw = ours.render("/nix/store");
    let e = up.put_narinfo(ours.hash(), raw.as_bytes(), None).await;
    assert!(
        matches!(&e, Err(Error::Upload(UploadError::Rejected(m))) if m.contains("not in the cache")),
        "{e:?}"
    );
    up.put_narinfo(ours.hash(), raw.as_bytes(), Some(&upstreams))
        .await
        .unwrap();
}

/// An uploader whose upload records stand in for later ones, as the server's
/// ([`crate::gc::access::UPLOAD_COVER`]), and its access log.
fn uploader_covering() -> (
    Arc<MemoryStore>,
    Uploader,
    Arc<crate::gc::access::AccessLog>,
) {
    let (mem, up) = uploader();
    let store: Arc<dyn Store> = mem.clone();
    let access = Arc::new(
        crate::gc::access::AccessLog::new(store, 100)
            .covering_uploads_for(crate::gc::access::UPLOAD_COVER),
    );
    (mem, up.with_access(access.clone()), access)
}

/// [`nar`], its narinfo and its file name.
fn sample() -> (Bytes, NarInfo, crate::nix::NarFileName) {
    let nar = nar();
    let info = narinfo_for(&nar, nar.len());
    let file = info.nar_file().unwrap();
    (nar, info, file)
}

fn records(mem: &MemoryStore) -> Vec<String> {
    mem.keys()
        .into_iter()
        .filter(|k| k.starts_with("_cellar/access/"))
        .collect()
}

/// `nix copy --to` probes the closure, then uploads each path as NAR then narinfo: the NAR's
/// record, written while the NAR is stored, names the probed paths too, so the narinfo needs
/// no record of its own (one store round trip less per path).
#[tokio::test]
async fn a_narinfo_whose_probe_and_nar_were_recorded_writes_no_record_of_its_own() {
    let (mem, up, access) = uploader_covering();
    let (nar, info, file) = sample();
    access.record_probe(info.hash());
    up.put_nar(&file, body(nar.clone())).await.unwrap();
    let after_nar = records(&mem);
    assert_eq!(after_nar.len(), 1, "{after_nar:?}");
    assert!(after_nar[0].ends_with("-upload"), "{after_nar:?}");
    let text = mem
        .get_bytes(&after_nar[0], 1 << 20)
        .await
        .unwrap()
        .unwrap();
    let named = crate::gc::access::parse(std::str::from_utf8(&text).unwrap()).unwrap();
    assert!(named.contains(&crate::gc::access::Entry::Path(info.hash())));
    assert!(named.contains(&crate::gc::access::Entry::Nar(file.as_str().into())));

    up.put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap();
    assert!(mem
        .head(&object_key::narinfo(info.hash()))
        .await
        .unwrap()
        .is_some());
    assert_eq!(records(&mem), after_nar, "no second record");
}

/// A covered narinfo for a path another replica published meanwhile (its NAR stored there,
/// never read here) is answered as present without waiting for the NAR to be read back and
/// digested, which for a large NAR takes minutes while the client waits.
#[tokio::test]
async fn a_covered_narinfo_found_present_does_not_wait_for_its_nar_read_back() {
    let (mem, up, access) = uploader_covering();
    let (nar, info, file) = sample();
    access.record_probe(info.hash());
    up.nar_expected(&file);
    assert_eq!(up.early_record(&file).await, Some(true));
    // Published through another replica.
    mem.insert(&object_key::nar(&file), nar.clone());
    mem.insert(&object_key::narinfo(info.hash()), info.render("/nix/store"));
    let gate = mem.hold_gets(&object_key::nar(&file));
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        up.put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None),
    )
    .await
    .expect("the narinfo waited for its NAR's read-back")
    .unwrap();
    assert!(answer.already_present);
    gate.open();
}

/// Without the probe (or once the record is older than the cover), the narinfo writes its own
/// record, as always.
#[tokio::test(start_paused = true)]
async fn a_narinfo_not_covered_by_a_recent_record_writes_its_own() {
    let (mem, up, access) = uploader_covering();
    let (nar, info, file) = sample();
    up.put_nar(&file, body(nar.clone())).await.unwrap();
    up.put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(
        records(&mem).len(),
        1,
        "nothing was probed: no NAR record, the narinfo's own"
    );

    let (mem, up, access2) = uploader_covering();
    drop(access);
    access2.record_probe(info.hash());
    up.put_nar(&file, body(nar.clone())).await.unwrap();
    tokio::time::advance(crate::gc::access::UPLOAD_COVER).await;
    up.put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(
        records(&mem).len(),
        2,
        "the NAR's record is too old to count"
    );
}

/// A covered narinfo skips only its record: the announcements are still read, after the
/// NAR's record (a collector that announced the NAR before that record may not have seen it).
#[tokio::test]
async fn a_covered_narinfo_whose_nar_is_being_collected_is_refused() {
    let (mem, up, access) = uploader_covering();
    let (nar, info, file) = sample();
    access.record_probe(info.hash());
    crate::gc::deleting::announce(mem.as_ref(), "run", [file.as_str()])
        .await
        .unwrap();
    up.put_nar(&file, body(nar.clone())).await.unwrap();
    refused_as_being_deleted(&up, &info).await;
    assert!(mem
        .head(&object_key::narinfo(info.hash()))
        .await
        .unwrap()
        .is_none());
}

/// The announcements a covered narinfo relies on are read as soon as its NAR's record is
/// written, while the client sends the narinfo, not after the narinfo arrives. A collector
/// announcing the NAR after that read sees the record and keeps the NAR, so the narinfo may
/// be accepted; the same announcement before the record refuses it (the test above).
#[tokio::test]
async fn a_covered_narinfo_uses_the_announcements_read_after_its_nars_record() {
    let (mem, up, access) = uploader_covering();
    let (nar, info, file) = sample();
    access.record_probe(info.hash());
    // Another NAR being collected: not kept in what is remembered for this one.
    crate::gc::deleting::announce(mem.as_ref(), "other", ["other.nar.xz"])
        .await
        .unwrap();
    up.put_nar(&file, body(nar.clone())).await.unwrap();
    let read = early_read(&up, &file);
    assert_eq!(
        read.read.await.map(|s| s.len()),
        Some(0),
        "nothing announced about this NAR yet"
    );
    crate::gc::deleting::announce(mem.as_ref(), "run", [file.as_str()])
        .await
        .unwrap();
    up.put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(records(&mem).len(), 1, "the NAR's record only");

    // Without a record of its own, the NAR has no early read: a narinfo that is not
    // covered reads the announcements after writing its record.
    let (mem, up) = uploader_with_access();
    up.put_nar(&file, body(nar.clone())).await.unwrap();
    assert!(up
        .remembered(&object_key::nar(&file))
        .is_some_and(|v| v.announced.is_none()));
    crate::gc::deleting::announce(mem.as_ref(), "run", [file.as_str()])
        .await
        .unwrap();
    refused_as_being_deleted(&up, &info).await;
}

/// An early read answers only for the NAR names it looked for.
#[tokio::test]
async fn an_early_read_answers_only_for_the_names_it_looked_for() {
    let mem: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let now = crate::gc::access::Stamp::now(mem.as_ref());
    let watch = super::announcements::Announcements::new(mem);
    let a = super::Announced::start(watch, now, vec!["a.nar".into(), "b.nar".into()]);
    assert!(a.covers(&["a.nar"]));
    assert!(a.covers(&["b.nar", "a.nar"]));
    assert!(!a.covers(&["a.nar", "c.nar"]));
}

/// A narinfo whose NAR names an early read did not look for reads the announcements itself.
#[tokio::test]
async fn an_early_read_for_other_names_is_not_relied_on() {
    let (mem, up) = uploader_with_access();
    crate::gc::deleting::announce(mem.as_ref(), "run", ["c.nar"])
        .await
        .unwrap();
    let store: Arc<dyn Store> = mem.clone();
    let now = crate::gc::access::Stamp::now(store.as_ref());
    let watch = super::announcements::Announcements::new(store);
    let a = super::Announced::start(watch, now, vec!["a.nar".into()]);
    assert_eq!(
        a.read.clone().await.map(|s| s.len()),
        Some(0),
        "kept: a.nar only"
    );
    let e = up.not_being_deleted(&["c.nar"], Some(a)).await.unwrap_err();
    assert!(e.to_string().contains("being deleted"), "{e}");
}

/// The early read stands for a read after the NAR's record only while that record covers
/// uploads by itself. A narinfo covered by a newer record (here another one naming the path and
/// the NAR, written after the NAR's record grew too old) reads the announcements again: a
/// collector announcing the NAR meanwhile may not read the old record any more.
#[tokio::test(start_paused = true)]
async fn an_early_read_older_than_the_cover_is_not_used() {
    let (mem, up, access) = uploader_covering();
    let (nar, info, file) = sample();
    access.record_probe(info.hash());
    up.put_nar(&file, body(nar.clone())).await.unwrap();
    let read = early_read(&up, &file);
    assert_eq!(read.read.await.map(|s| s.len()), Some(0));
    tokio::time::advance(crate::gc::access::UPLOAD_COVER).await;
    crate::gc::deleting::announce(mem.as_ref(), "run", [file.as_str()])
        .await
        .unwrap();
    access.record_probe(info.hash());
    assert!(access.record_nar_upload(&[file.as_str()]).await.unwrap());
    refused_as_being_deleted(&up, &info).await;
}

/// The announcements read as soon as the record of the NAR uploaded as `file` was written.
fn early_read(up: &Uploader, file: &crate::nix::NarFileName) -> super::Announced {
    up.remembered(&object_key::nar(file))
        .and_then(|v| v.announced)
        .expect("read after the NAR's record")
}

/// Uploading `info`'s narinfo is refused: a collector is deleting its NAR.
async fn refused_as_being_deleted(up: &Uploader, info: &NarInfo) {
    let e = up
        .put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("being deleted"), "{e}");
}

/// The NAR's record is written only once the NAR is complete and checked: a refused NAR
/// leaves nothing behind, record included.
#[tokio::test]
async fn a_refused_nar_leaves_no_record() {
    let (mem, up, access) = uploader_covering();
    let (nar, info, file) = sample();
    access.record_probe(info.hash());
    let mut other = nar.to_vec();
    other.push(0);
    up.put_nar(&file, body(Bytes::from(other)))
        .await
        .unwrap_err();
    assert!(mem.keys().is_empty(), "{:?}", mem.keys());
    up.put_nar(&file, body(nar)).await.unwrap();
    assert_eq!(records(&mem).len(), 1);
}

/// The record [`Uploader::nar_expected`] started for `file`, awaited: `true` if written.
async fn early_record_written(up: &Uploader, file: &crate::nix::NarFileName) -> bool {
    up.early_record(file)
        .await
        .expect("a record was started at the probe")
}

/// `nix copy --to` probes a NAR (`HEAD nar/…`, a 404) right before uploading it: the NAR's
/// record is written then, naming the NAR and the probed closure before the NAR arrives, and
/// neither the NAR nor its narinfo writes another.
#[tokio::test]
async fn a_nar_probed_before_its_upload_is_recorded_at_the_probe() {
    let (mem, up, access) = uploader_covering();
    let (nar, info, file) = sample();
    access.record_probe(info.hash());
    up.nar_expected(&file);
    assert!(early_record_written(&up, &file).await);
    let at_probe = records(&mem);
    assert_eq!(at_probe.len(), 1, "{at_probe:?}");
    let text = mem.get_bytes(&at_probe[0], 1 << 20).await.unwrap().unwrap();
    let named = crate::gc::access::parse(std::str::from_utf8(&text).unwrap()).unwrap();
    assert!(named.contains(&crate::gc::access::Entry::Path(info.hash())));
    assert!(named.contains(&crate::gc::access::Entry::Nar(file.as_str().into())));

    up.put_nar(&file, body(nar)).await.unwrap();
    assert!(
        early_read(&up, &file).covers(&[file.as_str()]),
        "the NAR carries the read made after the probe's record"
    );
    up.put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap();
    assert!(mem.bytes(&object_key::narinfo(info.hash())).is_some());
    assert_eq!(records(&mem), at_probe, "no second record");
}

/// The early record changes when the record is written, not the protocol: a collector that
/// announced the NAR before it gets the narinfo refused.
#[tokio::test]
async fn a_nar_announced_before_its_probe_is_refused() {
    let (mem, up, access) = uploader_covering();
    let (nar, info, file) = sample();
    access.record_probe(info.hash());
    crate::gc::deleting::announce(mem.as_ref(), "run", [file.as_str()])
        .await
        .unwrap();
    up.nar_expected(&file);
    up.put_nar(&file, body(nar)).await.unwrap();
    refused_as_being_deleted(&up, &info).await;
}

/// A probe's record that no longer covers uploads by itself (the NAR took longer than
/// [`crate::gc::access::UPLOAD_COVER`] to arrive) is not used: the NAR writes a fresh one.
#[tokio::test(start_paused = true)]
async fn a_probe_record_older_than_the_cover_is_replaced_by_the_nar() {
    let (mem, up, access) = uploader_covering();
    let (nar, info, file) = sample();
    access.record_probe(info.hash());
    up.nar_expected(&file);
    assert!(early_record_written(&up, &file).await);
    tokio::time::advance(crate::gc::access::UPLOAD_COVER).await;
    access.record_probe(info.hash());
    up.put_nar(&file, body(nar)).await.unwrap();
    assert_eq!(records(&mem).len(), 2, "the NAR wrote its own record");
    up.put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(records(&mem).len(), 2, "which covers the narinfo");
}

/// A second path, `b`, with its own NAR, referring to [`PATH`].
fn referrer() -> (Bytes, NarInfo, crate::nix::NarFileName) {
    let mut v = nar().to_vec();
    v.push(1);
    let nar = Bytes::from(v);
    let h = Sha256::digest(&nar);
    let text = format!(
        "StorePath: /nix/store/0bxnj2gfflqa529lddzh3zhcn45nn86r-b\nURL: nar/{}.nar\n\
         Compression: none\nNarHash: {h}\nNarSize: {}\nReferences: {PATH}\n",
        h.to_nix32(),
        nar.len()
    );
    let info = NarInfo::parse(&text, "/nix/store").unwrap();
    let file = info.nar_file().unwrap();
    (nar, info, file)
}

/// `nix copy --to` as the server sees it: the closure probed (absent), then NAR and narinfo
/// path after path. What this process just learned stands in for store reads: the probe's
/// miss for the stored narinfo, the NAR it received under its own record, and the reference
/// it wrote itself. A narinfo then costs its write and the NAR's last check, nothing more.
#[tokio::test]
async fn a_closure_uploaded_path_after_path_reads_only_the_last_nar_check() {
    let (mem, up, access) = uploader_covering();
    let (nar, info, file) = sample();
    let (b_nar, b_info, b_file) = referrer();
    for h in [info.hash(), b_info.hash()] {
        access.record_probe(h);
        up.probed_absent(h);
    }
    up.put_nar(&file, body(nar)).await.unwrap();
    let before = mem.requests();
    up.put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(
        mem.requests() - before,
        1,
        "one HEAD: the NAR, as the narinfo is written"
    );
    assert_eq!(mem.gets_under(&object_key::narinfo(info.hash())), 0);

    up.put_nar(&b_file, body(b_nar)).await.unwrap();
    let before = mem.requests();
    up.put_narinfo(b_info.hash(), b_info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(
        mem.requests() - before,
        1,
        "the reference written here and the probed miss are not asked again"
    );
    assert!(mem.bytes(&object_key::narinfo(b_info.hash())).is_some());
}

/// Without a probe, or with one older than a minute, the stored narinfo is read: a path
/// published meanwhile is not overwritten (it is kept), however it got there.
#[tokio::test(start_paused = true)]
async fn a_stale_or_missing_probe_reads_the_stored_narinfo() {
    let (mem, up, access) = uploader_covering();
    let (nar, info, file) = sample();
    access.record_probe(info.hash());
    up.probed_absent(info.hash());
    up.put_nar(&file, body(nar.clone())).await.unwrap();
    tokio::time::advance(super::PROBED_ABSENT_TRUST).await;
    // Published by someone else after the probe, with other contents.
    let mut other = info.clone();
    other.nar_hash = Sha256::digest(b"other");
    mem.insert(
        &object_key::narinfo(info.hash()),
        other.render("/nix/store"),
    );
    let kept = up
        .put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap();
    assert!(kept.already_present, "the published one is kept");
    assert_eq!(kept.narinfo.nar_hash, other.nar_hash);
    assert_eq!(mem.gets_under(&object_key::narinfo(info.hash())), 1);

    // No probe at all: read too.
    let (mem, up, _) = uploader_covering();
    up.put_nar(&file, body(nar)).await.unwrap();
    up.put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(mem.gets_under(&object_key::narinfo(info.hash())), 1);
}

/// A reference counts as present without a request only while written here recently
/// ([`crate::gc::access::UPLOAD_COVER`]) and with the gc protocol's records: afterwards, and
/// for references found in the store, it is asked for (and a missing one refuses the upload).
#[tokio::test(start_paused = true)]
async fn references_written_here_count_only_while_their_record_keeps_them() {
    let (mem, up, _) = uploader_covering();
    let (nar, info, file) = sample();
    let (b_nar, b_info, b_file) = referrer();
    up.put_nar(&file, body(nar.clone())).await.unwrap();
    up.put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap();
    tokio::time::advance(crate::gc::access::UPLOAD_COVER).await;
    // Gone from the store (as if collected long after its record): the referrer is refused.
    mem.remove(&object_key::narinfo(info.hash()));
    up.put_nar(&b_file, body(b_nar.clone())).await.unwrap();
    let e = up
        .put_narinfo(b_info.hash(), b_info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("is not in the cache"), "{e}");

    // Written moments ago, but no access log: asked for, and refused as well.
    let (mem, up) = uploader();
    up.put_nar(&file, body(nar)).await.unwrap();
    up.put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap();
    mem.remove(&object_key::narinfo(info.hash()));
    up.put_nar(&b_file, body(b_nar)).await.unwrap();
    let e = up
        .put_narinfo(b_info.hash(), b_info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("is not in the cache"), "{e}");
}

/// Two builders upload one NAR at once; the store drops the slower one's upload when the
/// first completes (Garage ends every other multipart upload of a key). The object stands with
/// the same bytes: the slower upload reads and checks the rest of its body and succeeds, and
/// its narinfo checks the stored object (read back), not the bytes it received. Without the
/// object, the failure is the upload's; a body that is not its name is refused either way.
#[tokio::test]
async fn a_nar_another_upload_of_its_name_landed_first_stands() {
    use crate::store::memory::FailOp;
    let (nar, info, file) = sample();
    let key = object_key::nar(&file);
    for covering in [false, true] {
        let (mem, up) = if covering {
            let (mem, up, _) = uploader_covering();
            (mem, up)
        } else {
            uploader()
        };
        mem.insert(&key, nar.clone());
        mem.fail(FailOp::Part, &key, 0, 1);
        let d = up.put_nar(&file, body(nar.clone())).await.unwrap().unwrap();
        assert_eq!(d.input.hash.to_nix32(), file.file_hash());
        let reads = mem.gets_under(&key);
        up.put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
            .await
            .unwrap();
        assert_eq!(
            mem.gets_under(&key),
            reads + 1,
            "the stored NAR was not read back"
        );
    }
    let (mem, up) = uploader();
    mem.fail(FailOp::Part, &key, 0, 1);
    let e = up.put_nar(&file, body(nar.clone())).await.unwrap_err();
    assert!(e.to_string().contains("UploadPart"), "{e}");
    assert!(mem.bytes(&key).is_none());
    // Another body under the name: refused, though the name's object stands.
    mem.insert(&key, nar.clone());
    mem.fail(FailOp::Part, &key, 0, 1);
    let mut other = nar.to_vec();
    other.push(0);
    let e = up
        .put_nar(&file, body(Bytes::from(other)))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("but its name says"), "{e}");
    assert_eq!(mem.bytes(&key), Some(nar.clone()));
    // An object of another size under the name is not these bytes: the upload fails.
    let (mem, up) = uploader();
    mem.insert(&key, nar.slice(..100));
    mem.fail(FailOp::Part, &key, 0, 1);
    let e = up.put_nar(&file, body(nar.clone())).await.unwrap_err();
    assert!(
        e.to_string().contains("stands in the store with 100 bytes"),
        "{e}"
    );
    // Nor is a copy found bad taken for the upload: its failure is the upload's.
    let (mem, up) = uploader();
    mem.insert(&key, nar.clone());
    up.found_bad_copy(&file, "a test".into()).await;
    mem.fail(FailOp::Part, &key, 0, 1);
    let e = up.put_nar(&file, body(nar.clone())).await.unwrap_err();
    assert!(e.to_string().contains("UploadPart"), "{e}");
    assert!(up.nar_found_bad(&file));
}

/// A reference is a whole store path, not a hash: one whose hash has a narinfo of another
/// name (in the store, or written here moments ago), or the path's own hash under another
/// name, or whose stored narinfo cannot be read, is not in the cache, and clients could not
/// substitute the referrer. Each refusal says why.
#[tokio::test]
async fn references_are_matched_by_their_whole_name() {
    let (nar, info, file) = sample();
    let (b_nar, b_info, b_file) = referrer();
    let renamed = |refs: &str| {
        let text = b_info.render("/nix/store").replace(
            &format!("References: {PATH}"),
            &format!("References: {refs}"),
        );
        assert!(text.contains(refs), "{text}");
        text
    };
    let other_name = format!("{}-not-top", &PATH[..32]);
    let own_other_name = "0bxnj2gfflqa529lddzh3zhcn45nn86r-not-b";
    for covering in [false, true] {
        let (mem, up) = if covering {
            let (mem, up, _) = uploader_covering();
            (mem, up)
        } else {
            uploader()
        };
        up.put_nar(&file, body(nar.clone())).await.unwrap();
        up.put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
            .await
            .unwrap();
        up.put_nar(&b_file, body(b_nar.clone())).await.unwrap();
        for (refs, why) in [
            (
                other_name.clone(),
                format!("its hash is /nix/store/{PATH}'s"),
            ),
            (
                format!("{PATH} {own_other_name}"),
                "is not in the cache;".to_owned(),
            ),
        ] {
            let e = up
                .put_narinfo(b_info.hash(), renamed(&refs).as_bytes(), None)
                .await
                .unwrap_err();
            let e = e.to_string();
            assert!(
                e.contains("is not in the cache") && e.contains(&why),
                "{covering}: {e}"
            );
            assert!(mem
                .head(&object_key::narinfo(b_info.hash()))
                .await
                .unwrap()
                .is_none());
        }
        // The whole name: taken.
        up.put_narinfo(b_info.hash(), b_info.render("/nix/store").as_bytes(), None)
            .await
            .unwrap();
        mem.remove(&object_key::narinfo(b_info.hash()));
    }
    // A stored narinfo that cannot be read is a 502 to clients: no reference.
    let (mem, up) = uploader();
    mem.insert(&object_key::narinfo(info.hash()), "StorePath: x\n");
    up.put_nar(&b_file, body(b_nar)).await.unwrap();
    let e = up
        .put_narinfo(b_info.hash(), b_info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("its narinfo in the store cannot be read"), "{e}");
}

/// The maps of what this process learned hold more than one entry: two NARs probed before
/// either arrives both keep their records, two paths probed and two written are all known.
#[tokio::test]
async fn what_was_learned_is_kept_for_several_paths_at_once() {
    let (_mem, up, access) = uploader_covering();
    let (_, info, file) = sample();
    let (_, b_info, b_file) = referrer();
    access.record_probe(info.hash());
    up.nar_expected(&file);
    up.nar_expected(&b_file);
    assert_eq!(up.early_record(&file).await, Some(true));
    assert_eq!(up.early_record(&b_file).await, Some(true));
    up.probed_absent(info.hash());
    up.probed_absent(b_info.hash());
    assert!(up.known_absent(info.hash()) && up.known_absent(b_info.hash()));
    up.wrote(&info.store_path, tokio::time::Instant::now());
    up.wrote(&b_info.store_path, tokio::time::Instant::now());
    assert!(up.recently_written(&info.store_path) && up.recently_written(&b_info.store_path));
    assert!(!up.known_absent(info.hash()), "written since the probe");
}

/// Two uploads of the same path: one is written and acknowledged, the other finds the NAR
/// gone (a collection deleted it) and takes the narinfo back. A referrer is then checked
/// against the store, not taken on the word of the first write: it would be published with a
/// reference the cache no longer has.
#[tokio::test(start_paused = true)]
async fn a_narinfo_taken_back_is_not_counted_as_written() {
    let (mem, up, _) = uploader_covering();
    let (nar, info, file) = sample();
    let (b_nar, b_info, b_file) = referrer();
    up.put_nar(&file, body(nar)).await.unwrap();
    let text = info.render("/nix/store");
    // The other upload's write, acknowledged.
    up.wrote(&info.store_path, tokio::time::Instant::now());
    assert!(up.recently_written(&info.store_path));
    let nar_key = object_key::nar(&file);
    let store = Arc::downgrade(&mem);
    mem.after_write(&object_key::narinfo(info.hash()), move |_| {
        if let Some(m) = store.upgrade() {
            m.remove(&nar_key);
        }
    });
    assert!(up
        .put_narinfo(info.hash(), text.as_bytes(), None)
        .await
        .is_err());
    assert!(mem
        .head(&object_key::narinfo(info.hash()))
        .await
        .unwrap()
        .is_none());
    up.put_nar(&b_file, body(b_nar)).await.unwrap();
    let e = up
        .put_narinfo(b_info.hash(), b_info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("is not in the cache"), "{e}");
}

/// Two uploads of the same path: one takes the narinfo back while the other's write is still
/// under way. That write, once it ends, is not counted as written: the take-back may have
/// deleted what it wrote. A write begun after the take-back counts again.
#[tokio::test(start_paused = true)]
async fn a_write_under_way_when_its_narinfo_is_taken_back_is_not_counted() {
    let (_mem, up, _) = uploader_covering();
    let (_, info, _) = sample();
    let began = tokio::time::Instant::now();
    tokio::time::advance(std::time::Duration::from_millis(5)).await;
    up.unwrote(info.hash());
    tokio::time::advance(std::time::Duration::from_millis(5)).await;
    up.wrote(&info.store_path, began);
    assert!(!up.recently_written(&info.store_path));
    up.wrote(&info.store_path, tokio::time::Instant::now());
    assert!(up.recently_written(&info.store_path));
}

/// A write of the path that begins while another upload's take-back is deleting its narinfo
/// is not counted as written: that delete may remove what it wrote. (Paused time: the store
/// takes a second per look and per delete.)
#[tokio::test(start_paused = true)]
async fn a_write_begun_while_the_take_back_deletes_is_not_counted() {
    let (mem, up, _) = uploader_covering();
    let (nar, info, file) = sample();
    up.put_nar(&file, body(nar)).await.unwrap();
    let written = Arc::new(tokio::sync::Notify::new());
    let (store, nar_key, w) = (
        Arc::downgrade(&mem),
        object_key::nar(&file),
        written.clone(),
    );
    mem.after_write(&object_key::narinfo(info.hash()), move |_| {
        if let Some(m) = store.upgrade() {
            m.remove(&nar_key);
            w.notify_one();
        }
    });
    mem.set_latency(std::time::Duration::from_secs(1));
    let text = info.render("/nix/store");
    let (taken_back, ()) =
        tokio::join!(up.put_narinfo(info.hash(), text.as_bytes(), None), async {
            written.notified().await;
            // The look takes a second, then the delete another: this write begins in the
            // middle of the delete.
            tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
            up.wrote(&info.store_path, tokio::time::Instant::now());
        });
    assert!(taken_back.is_err());
    assert!(!up.recently_written(&info.store_path));
}

/// A narinfo found stored for a path counts as present only if its NAR is there too: one left
/// in place when its NAR could not be looked at, whose NAR is in fact gone, is removed, and
/// the upload refused so that the client sends the path again.
#[tokio::test]
async fn a_stored_narinfo_without_its_nar_is_not_present() {
    let (mem, up) = uploader();
    let (nar, info, file) = sample();
    up.put_nar(&file, body(nar)).await.unwrap();
    let text = info.render("/nix/store");
    up.put_narinfo(info.hash(), text.as_bytes(), None)
        .await
        .unwrap();
    let again = up
        .put_narinfo(info.hash(), text.as_bytes(), None)
        .await
        .unwrap();
    assert!(again.already_present);
    mem.remove(&object_key::nar(&file));
    let e = up
        .put_narinfo(info.hash(), text.as_bytes(), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("upload the path again"), "{e}");
    assert!(mem
        .head(&object_key::narinfo(info.hash()))
        .await
        .unwrap()
        .is_none());

    // With upload.trusted_keys, only a narinfo signed by one of them has it removed; an
    // unsigned one is refused (not told the path is there) and the narinfo stays.
    let key = crate::nix::SecretKey::generate("builder-1").unwrap();
    let mut cfg = Config::default();
    cfg.upload.trusted_keys = vec![key.public()];
    let store: Arc<dyn Store> = mem.clone();
    let strict = Uploader::new(&cfg.upload, &cfg.store_dir, store);
    mem.insert(&object_key::narinfo(info.hash()), text.clone().into_bytes());
    let e = strict
        .put_narinfo(info.hash(), text.as_bytes(), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("names a NAR it lacks"), "{e}");
    assert!(mem
        .head(&object_key::narinfo(info.hash()))
        .await
        .unwrap()
        .is_some());
}

/// A listing is written with its narinfo, never for a path that is not in the cache (its
/// narinfo refused) nor over the listing of a path already there (another build's, of
/// another NAR).
#[tokio::test]
async fn listings_are_written_with_their_narinfo_only() {
    let (mem, up) = uploader();
    let (nar, info, file) = sample();
    let h = info.hash();
    let listing = || body(Bytes::from_static(b"{\"version\":1}"));
    up.put_nar(&file, body(nar)).await.unwrap();
    // Refused (its NarSize is wrong): no listing either.
    let mut wrong = info.clone();
    wrong.nar_size += 1;
    let fate = up.put_listing(h, listing(), 1 << 20).await.unwrap();
    assert_eq!(fate, super::ListingFate::Held);
    // The same again (Nix's retry) is held as it was; another listing of the path at once (a
    // second build pushed beside it) is not, and the path gets neither.
    let fate = up.put_listing(h, listing(), 1 << 20).await.unwrap();
    assert_eq!(fate, super::ListingFate::Held);
    let other = body(Bytes::from_static(b"{\"another\":1}"));
    let fate = up.put_listing(h, other, 1 << 20).await.unwrap();
    assert_eq!(fate, super::ListingFate::Dropped);
    assert!(up.listings.take(h).is_none());
    up.put_listing(h, listing(), 1 << 20).await.unwrap();
    assert!(up
        .put_narinfo(h, wrong.render("/nix/store").as_bytes(), None)
        .await
        .is_err());
    assert!(mem.head(&object_key::listing(h)).await.unwrap().is_none());
    // Accepted: its listing follows.
    up.put_narinfo(h, info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(
        mem.bytes(&object_key::listing(h)).as_deref(),
        Some(&b"{\"version\":1}"[..]),
        "the listing held since before the refusal is written with the accepted narinfo"
    );
    // Another push of the present path with its own listing: the stored one stays.
    up.put_listing(h, body(Bytes::from_static(b"{\"other\":1}")), 1 << 20)
        .await
        .unwrap();
    let again = up
        .put_narinfo(h, info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap();
    assert!(again.already_present);
    assert_eq!(
        mem.bytes(&object_key::listing(h)).as_deref(),
        Some(&b"{\"version\":1}"[..])
    );
    assert_eq!(up.listings.held_bytes(), 0, "dropped, not kept for later");
    // Over its limit: refused as it comes.
    let e = up
        .put_listing(h, body(Bytes::from(vec![b' '; 100])), 10)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("larger than"), "{e}");
}

/// A listing larger than all the listings held at most is read to its end and answered as
/// taken (a refusal would fail the client's whole copy), but not kept; one that fits is.
#[tokio::test]
async fn a_listing_too_large_to_hold_is_read_and_dropped() {
    use super::listings::HELD_BYTES;
    let (_mem, up) = uploader();
    let h: StorePathHash = "f904kp3djilk732cgbnxhpy7vzykbqsh".parse().unwrap();
    let mib = Bytes::from(vec![b' '; 1 << 20]);
    let chunks = |n: usize| {
        let c: Vec<std::io::Result<Bytes>> = (0..n).map(|_| Ok(mib.clone())).collect();
        futures::stream::iter(c)
    };
    let over = HELD_BYTES / (1 << 20) + 1;
    let logs = crate::test_logs::capture();
    let fate = up.put_listing(h, chunks(over), 256 << 20).await.unwrap();
    assert_eq!(fate, super::ListingFate::Dropped);
    // Let go as soon as it could not be held, not read whole first.
    let logged = logs.text();
    assert!(
        logged.contains("larger than the listings held at most"),
        "{logged}"
    );
    assert_eq!(up.listings.held_bytes(), 0);
    assert!(up.listings.take(h).is_none());
    let fits = HELD_BYTES / (1 << 20);
    let fate = up.put_listing(h, chunks(fits), 256 << 20).await.unwrap();
    assert_eq!(fate, super::ListingFate::Held);
    assert_eq!(up.listings.held_bytes(), HELD_BYTES);
}

/// The listings being received together take no more memory than those held may: one that
/// finds no room while others arrive is read to its end and dropped (answered as taken), and
/// holds nothing.
#[tokio::test]
async fn listings_arriving_together_take_no_more_memory_than_those_held() {
    use super::listings::HELD_BYTES;
    let (_mem, up) = uploader();
    let up = Arc::new(up);
    let first: StorePathHash = "f904kp3djilk732cgbnxhpy7vzykbqsh".parse().unwrap();
    let second: StorePathHash = "6bxnj2gfflqa529lddzh3zhcn45nn86r".parse().unwrap();
    let mib = Bytes::from(vec![b' '; 1 << 20]);
    let part = (HELD_BYTES / (1 << 20)) * 5 / 8;
    // The first sends its part and waits to send the rest.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<std::io::Result<Bytes>>();
    for _ in 0..part {
        tx.send(Ok(mib.clone())).unwrap();
    }
    let arriving = tokio::spawn({
        let up = up.clone();
        let body = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk, rx))
        });
        async move { up.put_listing(first, body, 256 << 20).await }
    });
    // The first's part is in (a bound only turns a hang into a failure).
    let taken = async {
        while up.listings_arriving.available_permits() > (HELD_BYTES >> 10) - (part << 10) {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), taken)
        .await
        .expect("the first listing took no room");
    let whole: Vec<std::io::Result<Bytes>> = (0..part).map(|_| Ok(mib.clone())).collect();
    let logs = crate::test_logs::capture();
    let fate = up
        .put_listing(second, futures::stream::iter(whole), 256 << 20)
        .await
        .unwrap();
    assert_eq!(fate, super::ListingFate::Dropped);
    assert!(up.listings.take(second).is_none(), "held beyond the room");
    assert!(logs.text().contains("listing dropped"), "{}", logs.text());
    drop(tx);
    arriving.await.unwrap().unwrap();
    assert!(up.listings.take(first).is_some());
    assert_eq!(up.listings_arriving.available_permits(), HELD_BYTES >> 10);

    // One past what is held at most, still arriving, takes no room: the others are kept.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<std::io::Result<Bytes>>();
    for _ in 0..=HELD_BYTES / (1 << 20) {
        tx.send(Ok(mib.clone())).unwrap();
    }
    let sent = Arc::new(tokio::sync::Notify::new());
    let oversized = tokio::spawn({
        let up = up.clone();
        let sent = sent.clone();
        let body = futures::stream::unfold(rx, move |mut rx| {
            let sent = sent.clone();
            async move {
                if rx.is_empty() {
                    sent.notify_one();
                }
                rx.recv().await.map(|chunk| (chunk, rx))
            }
        });
        async move { up.put_listing(first, body, 256 << 20).await }
    });
    sent.notified().await;
    assert_eq!(up.listings_arriving.available_permits(), HELD_BYTES >> 10);
    let whole: Vec<std::io::Result<Bytes>> = (0..part).map(|_| Ok(mib.clone())).collect();
    up.put_listing(second, futures::stream::iter(whole), 256 << 20)
        .await
        .unwrap();
    assert!(up.listings.take(second).is_some());
    drop(tx);
    oversized.await.unwrap().unwrap();
}

mod realisations {
    use super::*;

    const KEY: &str =
        "realisations/sha256:15e3c560894cbb27085cf65b5a2ecb18488c999497f4531b6907a7581ce6d527!out.doi";

    /// Signatures as Nix writes them (`name:base64` of 64 bytes), by no key.
    const K1: &str = "k:AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ==";
    const J2: &str = "j:AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAg==";

    fn realisation(out: &str, sigs: &[&str]) -> Bytes {
        Bytes::from(
            serde_json::to_vec(&serde_json::json!({
                "dependentRealisations": {},
                "id": "sha256:15e3c560894cbb27085cf65b5a2ecb18488c999497f4531b6907a7581ce6d527!out",
                "outPath": out,
                "signatures": sigs,
            }))
            .unwrap(),
        )
    }

    async fn stored(mem: &MemoryStore) -> Option<crate::nix::Realisation> {
        let raw = mem.get_bytes(KEY, 1 << 20).await.unwrap()?;
        Some(crate::nix::Realisation::parse(&raw).unwrap())
    }

    const OTHER: &str = "0d71ygfwbmy1xjlbj1v027dfmy9cqavy-other";

    /// With `upload.trusted_keys`, a realisation is stored only if one of them signed it, as
    /// Nix 2.8 signs it: one unsigned, signed by another key, or in a form whose signatures
    /// cellar cannot check is refused, and nothing is written.
    #[tokio::test]
    async fn with_trusted_keys_a_realisation_needs_their_signature() {
        use crate::nix::realisation::tests::{NIX_KEY, SIGNED_BY_NIX};
        const SIGNED_KEY: &str = "realisations/sha256:7a7db71bf33c7a51688c3ea589f67c31e5319f1ed424e37a1d28a25ea64ac904!out.doi";
        let mut cfg = Config::default();
        cfg.upload.trusted_keys = vec![NIX_KEY.parse().unwrap()];
        let mem = Arc::new(MemoryStore::new());
        let store: Arc<dyn Store> = mem.clone();
        let up = Uploader::new(&cfg.upload, &cfg.store_dir, store);
        mem.insert(
            "a4zbls512viq6cfmz5qh3qpr79yy9y11.narinfo",
            crate::nix::narinfo::stub("a4zbls512viq6cfmz5qh3qpr79yy9y11-ca-top"),
        );
        mem.insert(
            &format!("{}.narinfo", &PATH[..32]),
            crate::nix::narinfo::stub(PATH),
        );
        let other_key = crate::nix::SecretKey::generate("k1").unwrap();
        let doc: serde_json::Value = serde_json::from_str(SIGNED_BY_NIX).unwrap();
        let mut by_other = doc.clone();
        let mut unsigned = doc.clone();
        unsigned["signatures"] = serde_json::json!([]);
        let fp = crate::nix::Realisation::parse(unsigned.to_string().as_bytes())
            .unwrap()
            .fingerprint()
            .unwrap();
        by_other["signatures"] = serde_json::json!([other_key.sign(fp.as_bytes()).to_string()]);
        let newer = serde_json::json!({
            "outPath": PATH,
            "signatures": [{"keyName": "k1", "sig": "x"}],
        });
        for (key, body) in [
            (SIGNED_KEY, unsigned.clone()),
            (SIGNED_KEY, by_other.clone()),
            (KEY, newer),
        ] {
            let e = up
                .put_realisation(key, Bytes::from(body.to_string()), None)
                .await
                .unwrap_err();
            assert!(e.to_string().contains("upload.trusted_keys"), "{e}");
        }
        assert!(!mem.keys().iter().any(|k| k.starts_with("realisations/")));
        // Signed, but sent under another output's name: refused.
        let e = up
            .put_realisation(KEY, Bytes::from(SIGNED_BY_NIX), None)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("is not the one its name says"),
            "{e}"
        );
        let stored = up
            .put_realisation(SIGNED_KEY, Bytes::from(SIGNED_BY_NIX), None)
            .await
            .unwrap();
        assert_eq!(stored, RealisationStored::Written);
        // Stored, it is answered as before when sent again unsigned (a builder that did not
        // sign it, or a client that substituted it): nothing would be written.
        let again = up
            .put_realisation(SIGNED_KEY, Bytes::from(unsigned.to_string()), None)
            .await
            .unwrap();
        assert_eq!(again, RealisationStored::Unchanged);
        // Signatures by keys not trusted are not added to it (left out, as a narinfo's are).
        let again = up
            .put_realisation(SIGNED_KEY, Bytes::from(by_other.to_string()), None)
            .await
            .unwrap();
        assert_eq!(again, RealisationStored::Unchanged);
        assert_eq!(
            mem.bytes(SIGNED_KEY).as_deref(),
            Some(SIGNED_BY_NIX.as_bytes())
        );
        // Nor written with a new one: only the trusted key's signature is stored, not one by
        // another key, nor a string that is no signature.
        mem.delete(SIGNED_KEY).await.unwrap();
        let mut crowded = doc.clone();
        let trusted_sig = doc["signatures"][0].clone();
        crowded["signatures"] = serde_json::json!([
            by_other["signatures"][0].clone(),
            "junk-not-a-sig",
            trusted_sig.clone()
        ]);
        let stored = up
            .put_realisation(SIGNED_KEY, Bytes::from(crowded.to_string()), None)
            .await
            .unwrap();
        assert_eq!(stored, RealisationStored::Written);
        let now: serde_json::Value =
            serde_json::from_slice(&mem.bytes(SIGNED_KEY).unwrap()).unwrap();
        assert_eq!(now["signatures"], serde_json::json!([trusted_sig]));
    }

    /// Without `upload.trusted_keys`, a string that is no signature is left out of what is
    /// stored (clients would read it under some key's name); signatures by any key stay.
    #[tokio::test]
    async fn strings_that_are_no_signatures_are_left_out_of_realisations() {
        let (mem, up) = uploader();
        mem.insert(
            &format!("{}.narinfo", &PATH[..32]),
            crate::nix::narinfo::stub(PATH),
        );
        let k = crate::nix::SecretKey::generate("k1").unwrap();
        let unsigned = crate::nix::Realisation::parse(&realisation(PATH, &[])).unwrap();
        let sig = k
            .sign(unsigned.fingerprint().unwrap().as_bytes())
            .to_string();
        up.put_realisation(KEY, realisation(PATH, &[&sig, "junk", "k2:AAAA"]), None)
            .await
            .unwrap();
        let now: serde_json::Value = serde_json::from_slice(&mem.bytes(KEY).unwrap()).unwrap();
        assert_eq!(now["signatures"], serde_json::json!([sig]));
    }

    /// The server's own signatures sent back with a realisation (a client that copied it from
    /// the cache and pushes it, served signed by the server) are not stored, as a narinfo's
    /// are not: made afresh as it is served, a stored one would outlive its key's retirement.
    #[tokio::test]
    async fn the_servers_own_signatures_are_left_out_of_realisations() {
        let (mem, up) = uploader();
        up.set_own_key_names(vec!["cache-1".to_owned()]);
        mem.insert(
            &format!("{}.narinfo", &PATH[..32]),
            crate::nix::narinfo::stub(PATH),
        );
        let unsigned = crate::nix::Realisation::parse(&realisation(PATH, &[])).unwrap();
        let fp = unsigned.fingerprint().unwrap();
        let own = crate::nix::SecretKey::generate("cache-1").unwrap();
        let builder = crate::nix::SecretKey::generate("builder-1").unwrap();
        let (own, builder) = (
            own.sign(fp.as_bytes()).to_string(),
            builder.sign(fp.as_bytes()).to_string(),
        );
        up.put_realisation(KEY, realisation(PATH, &[&own, &builder]), None)
            .await
            .unwrap();
        let now: serde_json::Value = serde_json::from_slice(&mem.bytes(KEY).unwrap()).unwrap();
        assert_eq!(now["signatures"], serde_json::json!([builder]));
    }

    /// Another output's realisation stored under this one's name (answered 502: Nix does not
    /// compare ids) is replaced by an upload of this one, as an unreadable one is; a sent one
    /// naming its output by a whole path (which Nix 2.8 cannot read) is refused; and
    /// signatures are added to the stored one only from the same realisation as Nix signs it.
    #[tokio::test]
    async fn misfiled_whole_path_and_other_fingerprint_realisations() {
        let (mem, up) = uploader();
        mem.insert(
            &format!("{}.narinfo", &PATH[..32]),
            crate::nix::narinfo::stub(PATH),
        );
        let dev = String::from_utf8(realisation(PATH, &[K1]).to_vec())
            .unwrap()
            .replace("!out", "!dev");
        mem.insert(KEY, dev);
        let stored = up
            .put_realisation(KEY, realisation(PATH, &[]), None)
            .await
            .unwrap();
        assert_eq!(stored, RealisationStored::Written);
        assert_eq!(mem.bytes(KEY).unwrap(), realisation(PATH, &[]));

        let whole = realisation(&format!("/nix/store/{PATH}"), &[]);
        let e = up.put_realisation(KEY, whole, None).await.unwrap_err();
        assert!(e.to_string().contains("is a whole path"), "{e}");

        let mut other: serde_json::Value =
            serde_json::from_slice(&realisation(PATH, &[K1])).unwrap();
        other["dependentRealisations"] = serde_json::json!({"sha256:00!out": "x"});
        let again = up
            .put_realisation(KEY, Bytes::from(other.to_string()), None)
            .await
            .unwrap();
        assert_eq!(again, RealisationStored::Unchanged);
        assert_eq!(mem.bytes(KEY).unwrap(), realisation(PATH, &[]));
    }

    /// Realisations waiting for their turn (one at a time per process) hold no upload slot:
    /// with one being stored slowly and another waiting behind it, a listing or log still
    /// gets the other slot at once. (Paused time: one waiting for a slot would be busy after
    /// `ADMIT_WAIT`.)
    #[tokio::test(start_paused = true)]
    async fn realisations_waiting_their_turn_hold_no_upload_slot() {
        let mut cfg = Config::default();
        cfg.upload.max_concurrent = 2;
        let mem = Arc::new(MemoryStore::new());
        let store: Arc<dyn Store> = mem.clone();
        let up = Arc::new(Uploader::new(&cfg.upload, &cfg.store_dir, store));
        mem.insert(
            &format!("{}.narinfo", &PATH[..32]),
            crate::nix::narinfo::stub(PATH),
        );
        let gate = mem.hold_reads(KEY);
        let put = || {
            let up = up.clone();
            tokio::spawn(async move { up.put_realisation(KEY, realisation(PATH, &[]), None).await })
        };
        let first = put();
        gate.reached().await;
        let second = put();
        // The second is waiting for the first (yields, no clock).
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        // A listing's or log's upload slot.
        let started = tokio::time::Instant::now();
        let slot = up.admit_other().await;
        assert!(slot.is_ok(), "{:?}", slot.err());
        assert!(started.elapsed() < ADMIT_WAIT, "it waited for a slot");
        drop(slot);
        gate.open();
        first.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
    }

    /// An uploader whose upload of the realisation [`KEY`] is held at its read of the stored
    /// one (its path is in the cache): the gate that holds it, and the upload.
    async fn one_held_at_its_read() -> (
        Arc<Uploader>,
        Arc<crate::store::memory::ReadGate>,
        tokio::task::JoinHandle<Result<RealisationStored, Error>>,
    ) {
        let (mem, up) = uploader();
        let up = Arc::new(up);
        mem.insert(
            &format!("{}.narinfo", &PATH[..32]),
            crate::nix::narinfo::stub(PATH),
        );
        let gate = mem.hold_reads(KEY);
        let first = tokio::spawn({
            let up = up.clone();
            async move { up.put_realisation(KEY, realisation(PATH, &[]), None).await }
        });
        gate.reached().await;
        (up, gate, first)
    }

    /// The turns are per output: one realisation held up (a slow store, a slow upstream)
    /// does not hold up the upload of another output's.
    #[tokio::test(start_paused = true)]
    async fn another_outputs_realisation_does_not_wait_for_its_turn() {
        let (up, gate, first) = one_held_at_its_read().await;
        let id = "sha256:15e3c560894cbb27085cf65b5a2ecb18488c999497f4531b6907a7581ce6d527!dev";
        let dev = Bytes::from(
            serde_json::to_vec(&serde_json::json!({
                "dependentRealisations": {},
                "id": id,
                "outPath": PATH,
                "signatures": [],
            }))
            .unwrap(),
        );
        let started = tokio::time::Instant::now();
        let done = up
            .put_realisation(&format!("realisations/{id}.doi"), dev, None)
            .await
            .unwrap();
        assert_eq!(done, RealisationStored::Written);
        assert_eq!(started.elapsed(), std::time::Duration::ZERO);
        gate.open();
        first.await.unwrap().unwrap();
    }

    /// A realisation waits for its turn as long as an upload waits for a slot, then is busy
    /// (a queue of them behind a slow one must not stall each client for the whole queue).
    #[tokio::test(start_paused = true)]
    async fn a_realisation_waits_for_its_turn_no_longer_than_for_a_slot() {
        let (up, gate, first) = one_held_at_its_read().await;
        let started = tokio::time::Instant::now();
        let e = up
            .put_realisation(KEY, realisation(PATH, &[]), None)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Upload(UploadError::Busy { .. })), "{e}");
        assert_eq!(started.elapsed(), ADMIT_WAIT);
        gate.open();
        first.await.unwrap().unwrap();
    }

    /// A realisation is stored once the path it names is in the cache (by its whole name), and
    /// refused before.
    #[tokio::test]
    async fn a_realisation_waits_for_its_output() {
        let (mem, up) = uploader();
        let err = up
            .put_realisation(KEY, realisation(PATH, &[]), None)
            .await
            .unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::BAD_REQUEST, "{err}");
        assert!(err.to_string().contains(PATH), "{err}");
        assert!(stored(&mem).await.is_none());
        mem.insert(
            &format!("{}.narinfo", &PATH[..32]),
            crate::nix::narinfo::stub(PATH),
        );
        // The path's hash under another name is not the path.
        let renamed = format!("{}-not-top", &PATH[..32]);
        let err = up
            .put_realisation(KEY, realisation(&renamed, &[]), None)
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&renamed), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("its hash is /nix/store/{PATH}'s")),
            "{err}"
        );
        assert!(stored(&mem).await.is_none());
        let sent = realisation(PATH, &[K1]);
        let done = up.put_realisation(KEY, sent.clone(), None).await.unwrap();
        assert_eq!(done, RealisationStored::Written);
        assert_eq!(mem.get_bytes(KEY, 1 << 20).await.unwrap().unwrap(), sent);
    }

    /// A published realisation is kept: sent again it writes nothing; with a signature more
    /// it gains that signature; naming another path it stays, and the upload succeeds.
    #[tokio::test]
    async fn a_published_realisation_is_kept() {
        let (mem, up) = uploader();
        mem.insert(
            &format!("{}.narinfo", &PATH[..32]),
            crate::nix::narinfo::stub(PATH),
        );
        mem.insert(
            &format!("{}.narinfo", &OTHER[..32]),
            crate::nix::narinfo::stub(OTHER),
        );
        let first = realisation(PATH, &[K1]);
        up.put_realisation(KEY, first.clone(), None).await.unwrap();
        let writes = mem.writes();
        let again = up.put_realisation(KEY, first.clone(), None).await.unwrap();
        assert_eq!(again, RealisationStored::Unchanged);
        assert_eq!(mem.writes(), writes);

        let signed = up
            .put_realisation(KEY, realisation(PATH, &[J2]), None)
            .await
            .unwrap();
        assert_eq!(signed, RealisationStored::Written);
        let now = stored(&mem).await.unwrap();
        assert_eq!(
            now.with_signatures_of(
                &crate::nix::Realisation::parse(&realisation(PATH, &[K1, J2])).unwrap()
            ),
            None,
            "both signatures kept"
        );

        // Another build's (not reproducible): the published one stays, and the upload
        // succeeds (Nix sends it on every copy).
        let before = mem.get_bytes(KEY, 1 << 20).await.unwrap();
        let writes = mem.writes();
        let other = up
            .put_realisation(KEY, realisation(OTHER, &[K1]), None)
            .await
            .unwrap();
        assert_eq!(other, RealisationStored::Unchanged);
        assert_eq!(mem.get_bytes(KEY, 1 << 20).await.unwrap(), before);
        assert_eq!(mem.writes(), writes);
    }

    /// A stored realisation naming a path the cache no longer has (an expiry rule, a path
    /// deleted by hand) is no conflict: the upload naming a path that is there replaces it.
    #[tokio::test]
    async fn a_realisation_naming_a_path_gone_is_replaced() {
        let (mem, up) = uploader();
        mem.insert(
            &format!("{}.narinfo", &PATH[..32]),
            crate::nix::narinfo::stub(PATH),
        );
        mem.insert(
            &format!("{}.narinfo", &OTHER[..32]),
            crate::nix::narinfo::stub(OTHER),
        );
        up.put_realisation(KEY, realisation(PATH, &[K1]), None)
            .await
            .unwrap();
        mem.remove(&format!("{}.narinfo", &PATH[..32]));
        let sent = realisation(OTHER, &[K1]);
        let done = up.put_realisation(KEY, sent.clone(), None).await.unwrap();
        assert_eq!(done, RealisationStored::Written);
        assert_eq!(mem.get_bytes(KEY, 1 << 20).await.unwrap().unwrap(), sent);
    }

    /// What is not a realisation is refused before the store is asked; a stored one that
    /// does not parse is replaced by a good upload.
    #[tokio::test]
    async fn garbage_is_refused_and_replaced() {
        let (mem, up) = uploader();
        let err = up
            .put_realisation(KEY, Bytes::from_static(b"{\"outPath\": 1}"), None)
            .await
            .unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::BAD_REQUEST, "{err}");
        assert_eq!(mem.gets_under(""), 0);
        mem.insert(KEY, "garbage");
        mem.insert(
            &format!("{}.narinfo", &PATH[..32]),
            crate::nix::narinfo::stub(PATH),
        );
        let sent = realisation(PATH, &[]);
        up.put_realisation(KEY, sent.clone(), None).await.unwrap();
        assert_eq!(mem.get_bytes(KEY, 1 << 20).await.unwrap().unwrap(), sent);
    }
}

/// A NAR of `size` bytes (plain, a NAR's header then filler) and a narinfo for it as Nix
/// writes one (with `FileHash` and `FileSize`).
fn sized(size: usize) -> (Bytes, NarInfo, crate::nix::NarFileName) {
    let mut n = nar().to_vec();
    n.resize(size, 7);
    let h = Sha256::digest(&n);
    let text = format!(
        "StorePath: /nix/store/{PATH}\nURL: nar/{}.nar\nCompression: none\n\
         FileHash: {h}\nFileSize: {size}\nNarHash: {h}\nNarSize: {size}\nReferences: \n",
        h.to_nix32()
    );
    let info = NarInfo::parse(&text, "/nix/store").unwrap();
    let file = info.nar_file().unwrap();
    (Bytes::from(n), info, file)
}

/// A NAR of the records' size uploaded through an uploader over a fresh store (which writes
/// its record): the store, the NAR, its narinfo and that narinfo as uploaded, its name.
async fn large_nar_uploaded() -> (
    Arc<MemoryStore>,
    Bytes,
    NarInfo,
    String,
    crate::nix::NarFileName,
) {
    let (n, info, file) = sized(nar_records::MIN_SIZE as usize);
    let raw = info.render("/nix/store");
    let (mem, up) = uploader();
    up.put_nar(&file, body(n.clone())).await.unwrap();
    (mem, n, info, raw, file)
}

/// A large NAR is recorded with its digest beside it, so that its narinfo reaching another
/// replica (or this one after a restart) is checked without reading the NAR back; a small one
/// is not (reading it back costs what reading a record does).
#[tokio::test]
async fn a_large_nars_narinfo_reaching_another_replica_is_checked_by_its_digest_record() {
    let (mem, n, info, raw, file) = large_nar_uploaded().await;
    let record = mem.bytes(&nar_records::key(&file)).expect("a record");
    let d = nar_records::parse(&file, &record).unwrap();
    assert_eq!(d.nar.hash, info.nar_hash);

    let other = another_uploader(&mem, false);
    other
        .put_narinfo(info.hash(), raw.as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(mem.gets_under("nar/"), 0, "the NAR was read back");
    let stored = stored_narinfo(&mem, &info);
    assert_eq!(stored.nar_hash, info.nar_hash);
    assert_eq!(stored.file_size, Some(n.len() as u64));

    // Just below the size: no record, read back.
    let (n, info, file) = sized(nar_records::MIN_SIZE as usize - 1);
    let (mem, up) = uploader();
    up.put_nar(&file, body(n)).await.unwrap();
    assert!(mem.bytes(&nar_records::key(&file)).is_none());
    another_uploader(&mem, false)
        .put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(mem.gets_under("nar/"), 1);
}

/// A record is taken only for an object of the size it gives (one cut short is read back and
/// found bad), not for a copy found bad here, and not when the narinfo says the NAR is small.
#[tokio::test]
async fn a_digest_record_vouches_only_for_a_copy_that_may_be_its_file() {
    let (mem, n, info, raw, file) = large_nar_uploaded().await;
    let key = object_key::nar(&file);

    // Cut short under its name: read back, refused, taken for bad.
    mem.insert(&key, n.slice(..n.len() - 1));
    let other = another_uploader(&mem, false);
    let e = other
        .put_narinfo(info.hash(), raw.as_bytes(), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("run the copy again"), "{e}");
    assert_eq!(mem.gets_under("nar/"), 1);
    // Its record deleted: no replica takes a copy of its size for good any more.
    assert!(mem.bytes(&nar_records::key(&file)).is_none(), "record kept");

    // Sent again to the replica that found it bad, whose commit fails: no record over what
    // may still be the bad copy.
    mem.fail(crate::store::memory::FailOp::WriteAnswer, &key, 0, 1);
    other.put_nar(&file, body(n.clone())).await.unwrap_err();
    assert!(
        mem.bytes(&nar_records::key(&file)).is_none(),
        "record written"
    );

    // Of the right size again but taken for bad here: read back (and good now, its record
    // written again).
    mem.insert(&key, n.clone());
    other
        .put_narinfo(info.hash(), raw.as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(mem.gets_under("nar/"), 2);
    assert!(!other.nar_found_bad(&file));
    assert!(mem.bytes(&nar_records::key(&file)).is_some());

    // A narinfo whose FileSize is below the records' size does not look for one.
    let (mem, _, _, _, _) = large_nar_uploaded().await;
    let mut small = info.clone();
    small.file_size = Some(nar_records::MIN_SIZE - 1);
    let before = mem.gets_under("_cellar/");
    let _ = another_uploader(&mem, false)
        .put_narinfo(info.hash(), small.render("/nix/store").as_bytes(), None)
        .await;
    assert_eq!(
        mem.gets_under("_cellar/"),
        before,
        "a record was looked for"
    );
    assert_eq!(mem.gets_under("nar/"), 1);
}

/// A NAR re-encoded on upload gets no record: its stored name is not the hash of its bytes.
#[tokio::test]
async fn a_re_encoded_nar_gets_no_digest_record() {
    let (n, _, file) = sized(nar_records::MIN_SIZE as usize);
    let (mem, up) = uploader_to_zstd();
    up.put_nar(&file, body(n)).await.unwrap();
    assert!(
        !mem.keys()
            .iter()
            .any(|k| k.starts_with("_cellar/nar-digests/")),
        "{:?}",
        mem.keys()
    );
}

/// A record whose NAR is not in the store vouches for nothing: the narinfo is refused. One
/// that cannot be read leaves the NAR to be read back.
#[tokio::test]
async fn a_digest_record_without_its_nar_or_unreadable_is_not_relied_on() {
    let (mem, n, info, raw, file) = large_nar_uploaded().await;
    mem.remove(&object_key::nar(&file));
    let e = another_uploader(&mem, false)
        .put_narinfo(info.hash(), raw.as_bytes(), None)
        .await
        .unwrap_err();
    assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST, "{e}");
    assert!(mem.bytes(&object_key::narinfo(info.hash())).is_none());

    mem.insert(&object_key::nar(&file), n);
    let before = mem.gets_under("nar/");
    mem.fail(
        crate::store::memory::FailOp::Read,
        &nar_records::key(&file),
        0,
        1,
    );
    another_uploader(&mem, false)
        .put_narinfo(info.hash(), raw.as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(
        mem.gets_under("nar/"),
        before + 1,
        "the NAR was not read back"
    );
}

/// A large NAR stored without a record (before records were written, or its write failed) is
/// read back once, and recorded then: the next replica to check a narinfo of it does not read
/// it back.
#[tokio::test]
async fn a_large_nar_read_back_whole_gets_its_digest_record() {
    let (n, info, file) = sized(nar_records::MIN_SIZE as usize);
    let raw = info.render("/nix/store");
    let (mem, _) = uploader();
    mem.insert(&object_key::nar(&file), n);
    another_uploader(&mem, false)
        .put_narinfo(info.hash(), raw.as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(mem.gets_under("nar/"), 1);
    let record = mem.bytes(&nar_records::key(&file)).expect("a record");
    assert_eq!(
        nar_records::parse(&file, &record).unwrap().nar.hash,
        info.nar_hash
    );
    mem.remove(&object_key::narinfo(info.hash()));
    another_uploader(&mem, false)
        .put_narinfo(info.hash(), raw.as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(mem.gets_under("nar/"), 1, "read back again");

    // A smaller one is not recorded.
    let (n, info, file) = sized(nar_records::MIN_SIZE as usize - 1);
    let (mem, _) = uploader();
    mem.insert(&object_key::nar(&file), n);
    another_uploader(&mem, false)
        .put_narinfo(info.hash(), info.render("/nix/store").as_bytes(), None)
        .await
        .unwrap();
    assert!(mem.bytes(&nar_records::key(&file)).is_none());
}

/// Records are judged by the store's time (their `LastModified`): once the store's clock is
/// past the cover (it jumped ahead, or this machine was suspended: its monotonic clock stops,
/// its wall clock catches up), a path written before is no longer taken as covered or as
/// written, though this process's own clock says minutes. A referrer uploaded then writes a
/// record naming it, which a collector sees. Before, the referrer was taken as covered by the
/// old record, which the collector took for days old: it deleted the reference under it.
#[tokio::test]
async fn records_stop_covering_uploads_once_the_stores_time_is_past_the_cover() {
    let (mem, up, access) = uploader_covering();
    let (nar, info, file) = sample();
    let (b_nar, b_info, b_file) = referrer();
    up.put_nar(&file, body(nar)).await.unwrap();
    let text = info.render("/nix/store");
    up.put_narinfo(info.hash(), text.as_bytes(), None)
        .await
        .unwrap();
    assert!(up.recently_written(&info.store_path));
    mem.set_clock_ahead(std::time::Duration::from_secs(3 * 24 * 3600));
    assert!(!up.recently_written(&info.store_path));
    let before = records(&mem);
    // As Nix pushes the referrer: its probe, its NAR, its narinfo.
    access.record_probe(b_info.hash());
    up.put_nar(&b_file, body(b_nar)).await.unwrap();
    let text = b_info.render("/nix/store");
    up.put_narinfo(b_info.hash(), text.as_bytes(), None)
        .await
        .unwrap();
    let reference = info.hash().to_string();
    let named = records(&mem)
        .into_iter()
        .filter(|k| !before.contains(k))
        .any(|k| {
            let bytes = mem.bytes(&k).unwrap();
            String::from_utf8_lossy(&bytes).contains(&reference)
        });
    assert!(named, "no record since the jump names the reference");
}
