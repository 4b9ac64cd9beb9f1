//! Garbage collection over the in-memory store, with ages set per object.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::access::{render, Entry};
use super::report::Quiet;
use super::{run, Options};
use crate::config::GcConfig;
use crate::nix::{base32, Sha256};
use crate::store::memory::{FailOp, MemoryStore};
use crate::store::Store;

const DAY: Duration = Duration::from_secs(86400);

struct P {
    hash: String,
    base: String,
    nar: String,
}

/// The options of a collection that deletes, at `now`, waiting the usual settle time.
fn applying(now: SystemTime) -> Options {
    Options {
        apply: true,
        now,
        settle: super::deleting::SETTLE,
        stop: Default::default(),
    }
}

fn path(store: &MemoryStore, seed: &str, refs: &[&P], age: Duration, now: SystemTime) -> P {
    path_with(
        store,
        seed,
        format!("nar of {seed}").into_bytes(),
        refs,
        age,
        now,
    )
}

/// [`path`] whose NAR is `body`.
fn path_with(
    store: &MemoryStore,
    seed: &str,
    body: Vec<u8>,
    refs: &[&P],
    age: Duration,
    now: SystemTime,
) -> P {
    let hash = base32::encode(&Sha256::digest(seed.as_bytes()).as_bytes()[..20]);
    let base = format!("{hash}-{seed}");
    let file = Sha256::digest(&body).to_nix32();
    let refs: Vec<String> = refs.iter().map(|r| r.base.clone()).collect();
    let narinfo = format!(
        "StorePath: /nix/store/{base}\nURL: nar/{file}.nar\nCompression: none\nNarHash: sha256:{file}\nNarSize: {}\nReferences: {}\nDeriver: {hash}-{seed}.drv\n",
        body.len(),
        refs.join(" ")
    );
    let t = now - age;
    store.insert_at(&format!("{hash}.narinfo"), narinfo, t);
    store.insert_at(&format!("nar/{file}.nar"), body, t);
    store.insert_at(&format!("{hash}.ls"), "{}", t);
    store.insert_at(&format!("log/{hash}-{seed}.drv"), "log", t);
    P {
        hash,
        base,
        nar: format!("nar/{file}.nar"),
    }
}

/// A debug info link to `nar` (`nar/<file>`), `age` old; returns its key.
fn debug_link(store: &MemoryStore, id: u8, nar: &str, age: Duration, now: SystemTime) -> String {
    let key = format!("debuginfo/{}.debug", hex::encode([id; 20]));
    let body = format!(r#"{{"archive":"../{nar}","member":"lib/debug/.build-id/ab/x.debug"}}"#);
    store.insert_at(&key, body, now - age);
    key
}

/// A NAR digest record (see `crate::upload::nar_records`) of `nar` (`nar/<file>`), `age` old;
/// its key. Its contents do not matter to the collector.
fn digest_record(store: &MemoryStore, nar: &str, age: Duration, now: SystemTime) -> String {
    let key = format!("_cellar/nar-digests/{}", nar.trim_start_matches("nar/"));
    store.insert_at(&key, "cellar-nar-digest 1\n", now - age);
    key
}

/// What the upload pipeline and `verify --hashes` take for a NAR: its header, then `seed`.
fn nar_headed(seed: &str) -> Vec<u8> {
    let mut v = b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1\x00\x00\x00".to_vec();
    v.extend_from_slice(seed.as_bytes());
    v
}

fn cfg() -> GcConfig {
    GcConfig {
        keep: 30 * DAY,
        grace: DAY,
        ..GcConfig::default()
    }
}

async fn gc(
    mem: &Arc<MemoryStore>,
    cfg: &GcConfig,
    now: SystemTime,
    apply: bool,
) -> super::Summary {
    let store: Arc<dyn Store> = mem.clone();
    run(
        &store,
        "/nix/store",
        cfg,
        &Options {
            apply,
            now,
            settle: super::deleting::SETTLE,
            stop: Default::default(),
        },
        &Quiet,
    )
    .await
    .unwrap()
}

/// A store whose access records began long ago, as one cellar has served for years: what
/// no record names was not used within the retention. (See `records_began_*` for a store
/// cellar has just been put in front of.)
fn served_for_years() -> MemoryStore {
    let mem = MemoryStore::new();
    let long_ago = SystemTime::UNIX_EPOCH + 365 * DAY;
    mem.insert_at(
        "_cellar/records-began",
        "cellar-records-began 1\n31536000\n",
        long_ago,
    );
    mem
}

fn has(mem: &MemoryStore, key: &str) -> bool {
    mem.keys().iter().any(|k| k == key)
}

#[tokio::test(start_paused = true)]
async fn keeps_pinned_recent_and_young_closures_and_deletes_the_rest_whole() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let old = 100 * DAY;
    let shared = path(&mem, "shared", &[], old, now);
    let expired_dep = path(&mem, "expired-dep", &[], old, now);
    let expired = path(&mem, "expired", &[&expired_dep, &shared], old, now);
    let pinned_dep = path(&mem, "pinned-dep", &[], old, now);
    let pinned = path(&mem, "pinned", &[&pinned_dep], old, now);
    let read_dep = path(&mem, "read-dep", &[&shared], old, now);
    let read = path(&mem, "read", &[&read_dep], old, now);
    let young = path(&mem, "young", &[], Duration::from_secs(60), now);
    let pin = format!(
        "cellar-pin 1\ncreated: 0\npath: /nix/store/{}\n",
        pinned.base
    );
    mem.insert_at("_cellar/pins/release", pin, now - old);
    let record = render([Entry::Path(read.hash.parse().unwrap())]);
    mem.insert_at("_cellar/access/x/p-1", record, now - 2 * DAY);
    mem.insert_at("_cellar/access/x/p-0", render::<Entry>([]), now - 40 * DAY);

    let before = mem.keys();
    let dry = gc(&mem, &cfg(), now, false).await;
    assert_eq!(mem.keys(), before, "a dry run deletes nothing");
    assert_eq!(dry.deleted_paths(), 2);

    let s = gc(&mem, &cfg(), now, true).await;
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert_eq!(s.deleted_narinfos, Some(2));
    assert!(dry.deleted_narinfos.is_none());
    for kept in [&shared, &pinned_dep, &pinned, &read_dep, &read, &young] {
        assert!(
            has(&mem, &format!("{}.narinfo", kept.hash)),
            "{} lost",
            kept.base
        );
        assert!(has(&mem, &kept.nar));
    }
    for gone in [&expired, &expired_dep] {
        for key in [
            format!("{}.narinfo", gone.hash),
            format!("{}.ls", gone.hash),
            format!("log/{}.drv", gone.base),
            gone.nar.clone(),
        ] {
            assert!(!has(&mem, &key), "{key} left behind");
        }
    }
    assert!(!has(&mem, "_cellar/access/x/p-0"), "expired record kept");
    assert!(has(&mem, "_cellar/access/x/p-1"));
    assert!(has(&mem, "_cellar/pins/release"));
}

/// Expired access records are deleted without a re-read of the records before each batch
/// (each lists every record of the last days: on a busy cache, seconds per batch of 64, and
/// the records come by the thousand); the batches that delete what an upload could rely on
/// still re-read first.
#[tokio::test(start_paused = true)]
async fn expired_access_records_are_deleted_without_a_reread_per_batch() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let expired = path(&mem, "expired", &[], 100 * DAY, now);
    let records = 10 * super::sweep::BATCH;
    for i in 0..records {
        mem.insert_at(
            &format!("_cellar/access/x/p-{i}"),
            render::<Entry>([]),
            now - 40 * DAY,
        );
    }
    let lists = mem.lists();
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    let deleted = s.deleted_objects.unwrap_or_default();
    assert_eq!(deleted.get("access_record"), Some(&records));
    assert!(!has(&mem, &format!("{}.narinfo", expired.hash)));
    let listed = mem.lists() - lists;
    assert!(listed < 20, "{listed} listings for {records} records");
}

/// The time `_cellar/records-began` holds, if the store has it.
fn records_began(mem: &MemoryStore) -> Option<String> {
    let raw = mem.bytes("_cellar/records-began")?;
    String::from_utf8(raw.to_vec())
        .unwrap()
        .strip_prefix("cellar-records-began 1\n")
        .map(|t| t.trim().to_owned())
}

fn secs(t: SystemTime) -> String {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string()
}

/// A bucket cellar was put in front of a week ago, with paths from before it (`nix copy --to
/// s3://…`): no use of those could be recorded, so they count as used when the records began
/// and go only once the records have covered the retention without a use of them.
#[tokio::test(start_paused = true)]
async fn paths_from_before_the_access_records_began_get_a_whole_retention() {
    let mem = Arc::new(MemoryStore::new());
    let now = SystemTime::now();
    let old = 100 * DAY;
    let dep = path(&mem, "dep", &[], old, now);
    let unread = path(&mem, "unread", &[&dep], old, now);
    let lib = path(&mem, "lib", &[], old, now);
    let read = path(&mem, "read", &[&lib], old, now);
    // cellar's first record, a week ago, and one naming the path read since.
    let first = now - 7 * DAY;
    mem.insert_at("_cellar/access/x/p-0", render::<Entry>([]), first);
    mem.insert_at(
        "_cellar/access/x/p-1",
        render([Entry::Path(read.hash.parse().unwrap())]),
        now - DAY,
    );

    let dry = gc(&mem, &cfg(), now, false).await;
    assert_eq!(dry.deleted_paths(), 0, "{dry}");
    assert_eq!(records_began(&mem), None, "a dry run writes nothing");
    let s = gc(&mem, &cfg(), now, true).await;
    assert_eq!(s.deleted_paths(), 0, "{s}");
    // `dep` counts as a root of its own: written before the records too.
    assert_eq!(s.paths[&super::mark::Reason::Unrecorded].count, 2, "{s}");
    assert_eq!(s.paths[&super::mark::Reason::Recent].count, 1, "{s}");
    // What a path used since refers to is kept for that, as ever.
    assert_eq!(s.paths[&super::mark::Reason::Referenced].count, 1, "{s}");
    let text = s.to_string();
    let until = super::access::day(first + 30 * DAY);
    assert!(
        text.contains("written before the access records began")
            && text.contains(&format!("began on {}", super::access::day(first)))
            && text.contains(&format!("kept until {until}")),
        "{text}"
    );
    assert_eq!(
        records_began(&mem),
        Some(secs(first)),
        "the oldest record's time"
    );

    // Once the records have covered the retention, what none of them names goes, although
    // the records of the first week have gone meanwhile: the file keeps when they began.
    let later = first + 31 * DAY;
    let s = gc(&mem, &cfg(), later, true).await;
    assert!(
        !has(&mem, "_cellar/access/x/p-0"),
        "the first record expired"
    );
    assert_eq!(s.deleted_narinfos, Some(2), "{s}");
    assert!(!has(&mem, &format!("{}.narinfo", unread.hash)));
    assert!(!has(&mem, &format!("{}.narinfo", dep.hash)));
    assert!(
        has(&mem, &format!("{}.narinfo", read.hash)),
        "read within the retention"
    );
    assert!(!s.to_string().contains("began on"), "{s}");
}

/// The note on when the records began is there only when a path is kept for it.
#[tokio::test(start_paused = true)]
async fn no_note_when_every_path_from_before_was_used_since() {
    let mem = Arc::new(MemoryStore::new());
    let now = SystemTime::now();
    let read = path(&mem, "read", &[], 100 * DAY, now);
    mem.insert_at(
        "_cellar/access/x/p-0",
        render([Entry::Path(read.hash.parse().unwrap())]),
        now - DAY,
    );
    let s = gc(&mem, &cfg(), now, true).await;
    assert_eq!(s.paths[&super::mark::Reason::Recent].count, 1, "{s}");
    assert!(!s.to_string().contains("began on"), "{s}");
}

/// With no record at all (a store only `cellar gc` has seen so far), the records begin now.
#[tokio::test(start_paused = true)]
async fn with_no_record_yet_the_records_begin_with_the_first_collection() {
    let mem = Arc::new(MemoryStore::new());
    let now = SystemTime::now();
    let p = path(&mem, "p", &[], 100 * DAY, now);
    let s = gc(&mem, &cfg(), now, true).await;
    assert_eq!(s.deleted_paths(), 0, "{s}");
    assert_eq!(records_began(&mem), Some(secs(now)));
    // The file's time stands, whatever records come later.
    mem.insert_at("_cellar/access/x/p-0", render::<Entry>([]), now + 20 * DAY);
    gc(&mem, &cfg(), now + 29 * DAY, true).await;
    assert!(has(&mem, &format!("{}.narinfo", p.hash)));
    gc(&mem, &cfg(), now + 31 * DAY, true).await;
    assert!(!has(&mem, &format!("{}.narinfo", p.hash)));
}

/// A record dated after the run (a local store written by a machine whose clock is ahead)
/// does not put the beginning in the future, where it would keep everything longer.
#[tokio::test(start_paused = true)]
async fn a_record_dated_after_the_run_does_not_put_the_beginning_later() {
    let mem = Arc::new(MemoryStore::new());
    let now = SystemTime::now();
    path(&mem, "p", &[], 100 * DAY, now);
    mem.insert_at("_cellar/access/x/p-0", render::<Entry>([]), now + 5 * DAY);
    gc(&mem, &cfg(), now, true).await;
    assert_eq!(records_began(&mem), Some(secs(now)));
}

/// The records began no later than the file was written: a file whose time says later (a
/// local store's file times set back, as when it is restored from a backup) counts from
/// when it was written.
#[tokio::test(start_paused = true)]
async fn the_records_began_by_the_earlier_of_the_file_and_its_time() {
    let mem = Arc::new(MemoryStore::new());
    let now = SystemTime::now();
    let p = path(&mem, "p", &[], 100 * DAY, now);
    let said = format!("cellar-records-began 1\n{}\n", secs(now));
    mem.insert_at("_cellar/records-began", said.clone(), now - 40 * DAY);
    gc(&mem, &cfg(), now, true).await;
    assert!(
        !has(&mem, &format!("{}.narinfo", p.hash)),
        "written 40 days ago"
    );

    let mem = Arc::new(MemoryStore::new());
    let p = path(&mem, "p", &[], 100 * DAY, now);
    mem.insert_at("_cellar/records-began", said, now);
    gc(&mem, &cfg(), now, true).await;
    assert!(
        has(&mem, &format!("{}.narinfo", p.hash)),
        "records began now"
    );
}

/// Under `gc.max_bytes`, paths from before the records are the least recently used: any
/// path used since goes after them.
#[tokio::test(start_paused = true)]
async fn a_byte_budget_evicts_paths_from_before_the_records_first() {
    let mem = Arc::new(MemoryStore::new());
    let now = SystemTime::now();
    let before = path(&mem, "before", &[], 100 * DAY, now);
    let read = path(&mem, "read", &[], 100 * DAY, now);
    // Pushed (`nix copy --to s3://`) three days before the first record: a known use, older
    // than when the records began, still more recent than anything `before` could have had.
    let pushed = path(&mem, "pushed", &[], 10 * DAY, now);
    mem.insert_at("_cellar/access/x/p-0", render::<Entry>([]), now - 7 * DAY);
    mem.insert_at(
        "_cellar/access/x/p-1",
        render([Entry::Path(read.hash.parse().unwrap())]),
        now - DAY,
    );
    let all = gc(&mem, &cfg(), now, false).await;
    let kept: u64 = all.paths.values().map(|t| t.bytes).sum();
    let budget = GcConfig {
        max_bytes: Some(kept - 1),
        ..cfg()
    };
    let s = gc(&mem, &budget, now, true).await;
    assert_eq!(s.paths[&super::mark::Reason::OverBudget].count, 1, "{s}");
    assert!(!has(&mem, &format!("{}.narinfo", before.hash)));
    assert!(has(&mem, &format!("{}.narinfo", read.hash)));
    assert!(has(&mem, &format!("{}.narinfo", pushed.hash)));
}

/// With `gc.keep_days = 0`, records that began with this very run keep nothing.
#[tokio::test(start_paused = true)]
async fn with_zero_retention_the_records_beginning_now_keep_nothing() {
    let mem = Arc::new(MemoryStore::new());
    let now = SystemTime::now();
    let p = path(&mem, "p", &[], 100 * DAY, now);
    let zero = GcConfig {
        keep: Duration::ZERO,
        ..cfg()
    };
    gc(&mem, &zero, now, true).await;
    assert!(!has(&mem, &format!("{}.narinfo", p.hash)));

    // Nor does a file dated in the future, by its content and its time (a local store
    // written by a machine whose clock was ahead).
    let mem = Arc::new(MemoryStore::new());
    let p = path(&mem, "p", &[], 100 * DAY, now);
    let ahead = now + 100 * DAY;
    let said = format!("cellar-records-began 1\n{}\n", secs(ahead));
    mem.insert_at("_cellar/records-began", said, ahead);
    gc(&mem, &zero, now, true).await;
    assert!(!has(&mem, &format!("{}.narinfo", p.hash)));
}

/// A file that does not parse leaves when the records began unknown: nothing is collected.
#[tokio::test(start_paused = true)]
async fn a_damaged_records_began_file_stops_the_run() {
    let key = "_cellar/records-began";
    let valid = "cellar-records-began 1\n0\n";
    // Not the format; stored compressed by a tool that copied the bucket; far too large.
    for (damage, why) in [
        ("text", "not `cellar-records-began 1`"),
        ("encoded", "stored with Content-Encoding gzip"),
        ("large", "larger than 4096 bytes"),
    ] {
        let mem = Arc::new(MemoryStore::new());
        let now = SystemTime::now();
        path(&mem, "p", &[], 100 * DAY, now);
        match damage {
            "text" => mem.insert_at(key, "yesterday", now - 40 * DAY),
            "encoded" => {
                mem.insert_at(key, valid, now - 40 * DAY);
                mem.set_encoding(key, "gzip");
            }
            _ => mem.insert_at(key, valid.repeat(200), now - 40 * DAY),
        }
        damaged_records_began_stops_the_run(&mem, now, why).await;
    }
}

async fn damaged_records_began_stops_the_run(mem: &Arc<MemoryStore>, now: SystemTime, why: &str) {
    let before = mem.keys();
    let store: Arc<dyn Store> = mem.clone();
    let r = run(&store, "/nix/store", &cfg(), &applying(now), &Quiet).await;
    let Err(e) = r else { panic!("collected") };
    assert!(matches!(e, super::GcError::BadRecordsBegan { .. }), "{e}");
    assert!(e.to_string().contains("_cellar/records-began"), "{e}");
    assert!(e.to_string().contains(why), "{e}");
    assert_eq!(mem.keys(), before);

    // `cellar verify` names it; `--repair` deletes it, and the next collection writes it
    // again from the records there are (none here: now).
    let r = repair(mem, now).await;
    assert!(
        r.findings.iter().any(|f| matches!(f,
            super::verify::Finding::BadReserved { key, .. } if key == "_cellar/records-began")),
        "{:?}",
        r.findings
    );
    assert!(!has(mem, "_cellar/records-began"));
    let s = gc(mem, &cfg(), now, true).await;
    assert_eq!(s.deleted_paths(), 0, "{s}");
    assert_eq!(records_began(mem), Some(secs(now)));
    let r = repair(mem, now).await;
    assert!(r.findings.is_empty(), "{:?}", r.findings);
}

#[tokio::test(start_paused = true)]
async fn only_pins_are_roots_with_zero_retention_and_nothing_young_is_deleted() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let read = path(&mem, "read", &[], 10 * DAY, now);
    let young = path(&mem, "young", &[], Duration::from_secs(10), now);
    mem.insert_at(
        "_cellar/access/x/p-1",
        render([Entry::Path(read.hash.parse().unwrap())]),
        now - Duration::from_secs(5),
    );
    // An orphan NAR younger than the grace period is an upload in progress.
    mem.insert_at(
        "nar/0000000000000000000000000000000000000000000000000000.nar",
        "x",
        now,
    );
    let pins_only = GcConfig {
        keep: Duration::ZERO,
        ..cfg()
    };
    gc(&mem, &pins_only, now, true).await;
    assert!(!has(&mem, &format!("{}.narinfo", read.hash)));
    assert!(has(&mem, &format!("{}.narinfo", young.hash)));
    assert!(has(
        &mem,
        "nar/0000000000000000000000000000000000000000000000000000.nar"
    ));
}

#[tokio::test(start_paused = true)]
async fn a_byte_budget_evicts_the_least_recently_used_closures_whole() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let dep = path(&mem, "common-dep", &[], 50 * DAY, now);
    let older = path(&mem, "older", &[&dep], 50 * DAY, now);
    let newer = path(&mem, "newer", &[&dep], 50 * DAY, now);
    let oldest = path(&mem, "oldest", &[], 50 * DAY, now);
    for (p, age) in [(&newer, 1), (&older, 2), (&oldest, 3)] {
        mem.insert_at(
            &format!("_cellar/access/x/{}", p.hash),
            render([Entry::Path(p.hash.parse().unwrap())]),
            now - age * DAY,
        );
    }
    let sizes = gc(&mem, &cfg(), now, false).await;
    let all = sizes.paths.values().map(|t| t.bytes).sum::<u64>();
    // A path's bytes are its narinfo's and its NAR's.
    let stored: usize = mem
        .keys()
        .iter()
        .filter(|k| k.ends_with(".narinfo") || k.starts_with("nar/"))
        .map(|k| mem.bytes(k).unwrap().len())
        .sum();
    assert_eq!(all, stored as u64);
    // Room for everything but one byte: the least recently used closure goes.
    let budget = GcConfig {
        max_bytes: Some(all - 1),
        ..cfg()
    };
    gc(&mem, &budget, now, true).await;
    assert!(has(&mem, &format!("{}.narinfo", newer.hash)));
    assert!(has(&mem, &format!("{}.narinfo", older.hash)));
    assert!(has(&mem, &format!("{}.narinfo", dep.hash)));
    assert!(!has(&mem, &format!("{}.narinfo", oldest.hash)));
    // A budget below the newest closure evicts everything but pins and young paths.
    let tiny = GcConfig {
        max_bytes: Some(1),
        ..cfg()
    };
    gc(&mem, &tiny, now, true).await;
    assert!(!mem.keys().iter().any(|k| k.ends_with(".narinfo")));
}

#[tokio::test(start_paused = true)]
async fn an_unreadable_pin_stops_the_run() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    path(&mem, "p", &[], 100 * DAY, now);
    mem.insert_at("_cellar/pins/bad", "nonsense", now);
    let store: Arc<dyn Store> = mem.clone();
    let r = run(&store, "/nix/store", &cfg(), &applying(now), &Quiet).await;
    assert!(matches!(r, Err(super::GcError::BadPin { .. })));
    assert_eq!(mem.keys().len(), 6);
}

/// A use record with a damaged line still counts what its other lines name, and the run
/// says which record is damaged.
#[tokio::test(start_paused = true)]
async fn a_damaged_use_record_counts_its_good_lines_and_is_reported() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let read = path(&mem, "read", &[], 100 * DAY, now);
    let unread = path(&mem, "unread", &[], 100 * DAY, now);
    let record = format!("{}not a hash\n{}\n", render::<Entry>([]), read.hash);
    mem.insert_at("_cellar/access/x/p-1", record, now - DAY);
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert!(
        has(&mem, &format!("{}.narinfo", read.hash)),
        "a good line lost"
    );
    assert!(!has(&mem, &format!("{}.narinfo", unread.hash)));
    assert_eq!(s.bad_records.len(), 1, "{:?}", s.bad_records);
    let text = s.to_string();
    assert!(
        text.contains("access record _cellar/access/x/p-1 (line 2: \"not a hash\") is damaged"),
        "{text}"
    );
    let prom = super::metrics_file::render_gc(&s, None, now);
    assert!(
        prom.contains("\ncellar_gc_damaged_access_records 1\n"),
        "{prom}"
    );
    assert!(
        prom.contains("\ncellar_gc_deleted_objects{kind=\"nar\"} 1\n"),
        "{prom}"
    );
}

/// The record of an upload under way that does not parse stops the run before it deletes
/// anything: what that upload relies on is unknown. Found only by a re-read while deleting,
/// it stops the deletions still to come.
#[tokio::test(start_paused = true)]
async fn a_damaged_upload_record_under_way_stops_the_run() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    path(&mem, "old", &[], 100 * DAY, now);
    let day = super::access::day(now);
    let key = format!("_cellar/access/{day}/p-1-upload");
    mem.insert_at(&key, "cellar-access 1\ngarbage\n", now);
    let before = mem.keys();
    let store: Arc<dyn Store> = mem.clone();
    let opts = applying(now);
    let r = run(&store, "/nix/store", &cfg(), &opts, &Quiet).await;
    assert!(
        matches!(&r, Err(super::GcError::BadUploadRecord { key: k, .. }) if *k == key),
        "{:?}",
        r.map(|s| s.to_string())
    );
    // It says what to do: `verify --repair` refuses it as well until it stops mattering.
    let said = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(said.contains("30 minutes after it was written"), "{said}");
    assert!(
        said.contains("delete it once no upload is under way"),
        "{said}"
    );
    assert_eq!(mem.keys(), before, "something was deleted");
    // Older than an upload can be under way: a warning only.
    let later = Options {
        now: now + Duration::from_secs(31 * 60),
        ..opts
    };
    let s = run(&store, "/nix/store", &cfg(), &later, &Quiet)
        .await
        .unwrap();
    assert_eq!(s.bad_records.len(), 1);

    // Written while the collector settles: the re-read finds it, and nothing is deleted.
    let mem = Arc::new(served_for_years());
    let gone = path(&mem, "gone", &[], 100 * DAY, now);
    while_settling(&mem, |m| {
        let day = super::access::day(SystemTime::now());
        m.insert(&format!("_cellar/access/{day}/q-1-upload"), "garbage");
    });
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(
        s.errors.iter().any(|e| e.contains("does not parse")),
        "{:?}",
        s.errors
    );
    assert!(has(&mem, &gone.nar), "deleted after all");
}

/// The race a deleted NAR cannot recover from: an upload of the same contents records the NAR
/// just after the collector decided to delete it. The collector announces the deletion, then
/// re-reads the records, so it sees this one and keeps the NAR (an upload recording later
/// sees the announcement and is refused: see the uploader's tests).
#[tokio::test(start_paused = true)]
async fn a_nar_an_upload_records_after_the_announcement_is_kept() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let gone = path(&mem, "gone", &[], 100 * DAY, now);
    let reused = path(&mem, "reused", &[], 100 * DAY, now);
    let file: Box<str> = reused.nar.trim_start_matches("nar/").into();
    let m = mem.clone();
    // After the first announcement naming NARs (those before, from the run's start, name
    // none).
    let written = std::sync::atomic::AtomicBool::new(false);
    let last: Arc<std::sync::Mutex<String>> = Arc::default();
    let last_written = last.clone();
    mem.after_write("_cellar/deleting/", move |key| {
        let text = m
            .bytes(key)
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let text = text.unwrap_or_default();
        let names_nars = text.contains(".nar");
        if names_nars && !written.swap(true, std::sync::atomic::Ordering::SeqCst) {
            write_upload_record(&m, "upload-1", file.clone());
        }
        *last_written.lock().unwrap() = text;
    });
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert!(has(&mem, &reused.nar), "the NAR the upload relies on went");
    // Once kept, it is no longer named: the upload's narinfo would be refused while it is.
    let reused_file = reused.nar.trim_start_matches("nar/");
    let last = last.lock().unwrap().clone();
    assert!(!last.contains(reused_file), "still announced: {last}");
    assert!(last.contains(gone.nar.trim_start_matches("nar/")), "{last}");
    assert!(!has(&mem, &format!("{}.narinfo", reused.hash)));
    assert!(!has(&mem, &gone.nar));
    assert!(
        !mem.keys()
            .iter()
            .any(|k| k.starts_with("_cellar/deleting/")),
        "the announcement is withdrawn"
    );
}

/// Writes an upload record naming `file` half of `deleting::SETTLE` after every announcement:
/// an upload that read the announcements just before the collector announced, and so may rely
/// on that read for `deleting::TRUSTED_FOR`, records its NAR while the collector waits.
fn record_while_settling(mem: &Arc<MemoryStore>, file: Box<str>) {
    while_settling(mem, move |m| {
        write_upload_record(m, "upload-settling", file.clone())
    });
}

/// Runs `write` on the store half of `deleting::SETTLE` after every announcement.
fn while_settling(
    mem: &Arc<MemoryStore>,
    write: impl Fn(&MemoryStore) + Clone + Send + Sync + 'static,
) {
    let m = mem.clone();
    mem.after_write("_cellar/deleting/", move |_| {
        let (m, write) = (m.clone(), write.clone());
        tokio::spawn(async move {
            tokio::time::sleep(super::deleting::SETTLE / 2).await;
            write(&m);
        });
    });
}

/// An upload record of today (its key ends with `-upload`, as servers write them) named
/// after `name`, naming the NAR `file`.
fn write_upload_record(mem: &MemoryStore, name: &str, file: Box<str>) {
    let day = super::access::day(SystemTime::now());
    mem.insert(
        &format!("_cellar/access/{day}/{name}-upload"),
        render([Entry::Nar(file)]),
    );
}

/// The collector waits `deleting::SETTLE` between announcing NARs and re-reading the records
/// before it deletes them, so a NAR an upload records in that time is kept (the upload may
/// have read the announcements just before they were made: see `deleting`).
#[tokio::test(start_paused = true)]
async fn a_nar_recorded_while_the_collector_settles_is_kept() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let gone = path(&mem, "gone", &[], 100 * DAY, now);
    let reused = path(&mem, "reused", &[], 100 * DAY, now);
    record_while_settling(&mem, reused.nar.trim_start_matches("nar/").into());
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert!(has(&mem, &reused.nar), "the NAR the upload relies on went");
    assert!(!has(&mem, &gone.nar));

    // The same for the orphan NARs `cellar verify --repair` deletes.
    let mem = Arc::new(served_for_years());
    let (gone, _) = orphan(&mem, "gone", now);
    let (kept, file) = orphan(&mem, "kept", now);
    record_while_settling(&mem, file);
    let r = repair(&mem, now).await;
    assert!(r.repair_errors.is_empty(), "{:?}", r.repair_errors);
    assert!(has(&mem, &kept), "the NAR the upload relies on went");
    assert!(!has(&mem, &gone));
}

/// A repair whose re-read of the records fails after it deleted broken narinfos says so
/// first (it is why everything just deleted is written back), does not blame an upload, and
/// with the store failing the write-backs stops at the first (the rest stays in the run's
/// copies for the next run), instead of waiting out each one's retries.
#[tokio::test(start_paused = true)]
async fn a_repair_that_cannot_reread_the_records_says_so_first_and_stops_at_one_failed_write_back()
{
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let broken: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            let p = path(&mem, n, &[], 100 * DAY, now);
            mem.remove(&p.nar);
            mem.fail(FailOp::Write, &format!("{}.narinfo", p.hash), 0, usize::MAX);
            p
        })
        .collect();
    let yesterday = super::access::day(SystemTime::now() - DAY);
    mem.fail(
        FailOp::List,
        &format!("_cellar/access/{yesterday}/"),
        1,
        usize::MAX,
    );
    let r = repair(&mem, now).await;
    assert!(
        r.repair_errors[0].starts_with("re-reading access records"),
        "{:?}",
        r.repair_errors
    );
    let failed: Vec<_> = r
        .repair_errors
        .iter()
        .filter(|e| e.starts_with("writing back"))
        .collect();
    assert_eq!(failed.len(), 1, "{:?}", r.repair_errors);
    assert!(!failed[0].contains("upload"), "{failed:?}");
    assert!(
        r.repair_errors
            .last()
            .is_some_and(|e| e.contains("_cellar/unfinished/")),
        "{:?}",
        r.repair_errors
    );
    assert!(broken
        .iter()
        .all(|p| !has(&mem, &format!("{}.narinfo", p.hash))));
}

/// `verify --repair` with a damaged record of an upload under way repairs nothing, as gc
/// deletes nothing, and says when it will (and what to do to go on sooner): gc's own message
/// sends the user to it.
#[tokio::test(start_paused = true)]
async fn a_damaged_upload_record_under_way_stops_a_repair_saying_until_when() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let p = path(&mem, "broken", &[], 100 * DAY, now);
    mem.remove(&p.nar);
    let key = format!("_cellar/access/{}/p-1-upload", super::access::day(now));
    mem.insert_at(&key, "cellar-access 1\ngarbage\n", now);
    let r = repair(&mem, now).await;
    let said = r.repair_errors.join("\n");
    assert!(said.contains(&key), "{said}");
    assert!(said.contains("nothing repaired"), "{said}");
    assert!(said.contains("30 minutes after it was written"), "{said}");
    assert!(
        said.contains("delete it once no upload is under way"),
        "{said}"
    );
    assert!(
        has(&mem, &format!("{}.narinfo", p.hash)),
        "repaired all the same"
    );
    assert!(has(&mem, &key));
}

/// verify says which pins in force name a path the store lacks (only gc said it), and a
/// repair that deletes a pinned path (broken) says it was pinned: the next verify was clean
/// while the pin kept nothing (homelab walk).
#[tokio::test(start_paused = true)]
async fn verify_says_which_pins_keep_nothing_and_a_repair_deleting_a_pinned_path() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let broken = path(&mem, "broken", &[], 100 * DAY, now);
    mem.remove(&broken.nar);
    let whole = path(&mem, "whole", &[], 100 * DAY, now);
    let never = "/nix/store/0000000000000000000000000000000a-never";
    let pin = format!(
        "cellar-pin 1\ncreated: 0\npath: /nix/store/{}\npath: /nix/store/{}\npath: {never}\n",
        broken.base, whole.base
    );
    mem.insert_at("_cellar/pins/release", pin, now - DAY);
    let store: Arc<dyn Store> = mem.clone();
    let r = super::verify::run(&store, "/nix/store", &verify_opts(now), &Quiet)
        .await
        .unwrap();
    assert_eq!(r.pins_missing, [format!("release: {never}")]);
    let r = repair(&mem, now).await;
    let key = format!("{}.narinfo", broken.hash);
    assert!(r.repaired.contains(&key), "{:?}", r.repaired);
    assert_eq!(r.pinned_by(&key).as_deref(), Some("release"));
    assert_eq!(
        r.pinned_by(&format!("{}.narinfo", whole.hash)).as_deref(),
        Some("release")
    );
    let r = super::verify::run(&store, "/nix/store", &verify_opts(now), &Quiet)
        .await
        .unwrap();
    assert_eq!(r.pins_missing.len(), 2, "{:?}", r.pins_missing);
    assert!(
        r.pins_missing[0].contains(&broken.base),
        "{:?}",
        r.pins_missing
    );
}

async fn repair(mem: &Arc<MemoryStore>, now: SystemTime) -> super::verify::Report {
    repair_settling(mem, now, super::deleting::SETTLE).await
}

/// `verify --repair` waiting `settle` between announcing orphan NARs and deleting them.
async fn repair_settling(
    mem: &Arc<MemoryStore>,
    now: SystemTime,
    settle: Duration,
) -> super::verify::Report {
    let store: Arc<dyn Store> = mem.clone();
    let opts = repair_options(now, settle);
    super::verify::run(&store, "/nix/store", &opts, &Quiet)
        .await
        .unwrap()
}

/// The options of `verify --repair` at `now`, waiting `settle` between announcing orphan NARs
/// and deleting them.
fn repair_options(now: SystemTime, settle: Duration) -> super::verify::Options {
    super::verify::Options {
        hashes: false,
        repair: true,
        sample: None,
        grace: DAY,
        now,
        settle,
        stop: Default::default(),
        upstreams: None,
    }
}

/// Every write of a run's announcement after the one naming NAR `file` fails.
fn fail_renewals_once_named(mem: &Arc<MemoryStore>, file: Box<str>) {
    let weak = Arc::downgrade(mem);
    mem.after_write("_cellar/deleting/", move |key| {
        let Some(mem) = weak.upgrade() else { return };
        let named = mem
            .bytes(key)
            .is_some_and(|b| String::from_utf8_lossy(&b).contains(&*file));
        if named {
            mem.fail(FailOp::Write, key, 0, usize::MAX);
        }
    });
}

/// An orphan NAR old enough to repair, with its narinfo deleted long ago.
fn orphan(mem: &MemoryStore, seed: &str, now: SystemTime) -> (String, Box<str>) {
    let p = path(mem, seed, &[], 100 * DAY, now);
    mem.remove(&format!("{}.narinfo", p.hash));
    let file = p.nar.trim_start_matches("nar/").into();
    (p.nar, file)
}

/// `verify --repair` deletes orphan NARs under the collector's protocol: an upload that
/// relies on an orphan (its narinfo not written yet) names it in its access record, before
/// the repair started or while it announces, and the NAR stays.
#[tokio::test(start_paused = true)]
async fn repair_keeps_the_orphan_nars_uploads_rely_on() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let (gone, _) = orphan(&mem, "gone", now);
    let (before, before_file) = orphan(&mem, "before", now);
    let (during, during_file) = orphan(&mem, "during", now);
    write_upload_record(&mem, "a-upload", before_file);
    let m = mem.clone();
    mem.after_write("_cellar/deleting/", move |_| {
        write_upload_record(&m, "b-upload", during_file.clone());
    });
    let r = repair(&mem, now).await;
    assert!(r.repair_errors.is_empty(), "{:?}", r.repair_errors);
    assert!(!has(&mem, &gone), "the orphan no upload relies on stays");
    assert!(has(&mem, &before), "the NAR an earlier record names went");
    assert!(
        has(&mem, &during),
        "the NAR recorded during the repair went"
    );
    let mut in_use = r.in_use.clone();
    in_use.sort();
    assert_eq!(in_use, [before.clone(), during.clone()]);
    let prom = super::metrics_file::render_verify(&r, None, now);
    assert!(
        prom.contains("\ncellar_verify_kept_for_uploads 2\n"),
        "{prom}"
    );
    let nars: Vec<&String> = r
        .repaired
        .iter()
        .filter(|k| k.starts_with("nar/"))
        .collect();
    assert_eq!(nars, [&gone]);
    assert!(
        !mem.keys()
            .iter()
            .any(|k| k.starts_with("_cellar/deleting/")),
        "the announcement is withdrawn"
    );
}

/// The repair announces the NARs it is about to delete before it deletes them, so an upload
/// checking announcements meanwhile is refused.
#[tokio::test(start_paused = true)]
async fn repair_announces_the_nars_it_deletes_first() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let (gone, file) = orphan(&mem, "gone", now);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (m, s, nar) = (mem.clone(), seen.clone(), gone.clone());
    mem.after_write("_cellar/deleting/", move |key| {
        let text = m
            .bytes(key)
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        s.lock().unwrap().push((text, has(&m, &nar)));
    });
    let r = repair(&mem, now).await;
    assert!(r.repaired.contains(&gone), "{:?}", r.repaired);
    assert!(!has(&mem, &gone));
    let seen = seen.lock().unwrap();
    assert!(
        seen.iter()
            .any(|(t, present)| *present
                && t.as_deref().is_some_and(|t| t.lines().any(|l| l == &*file))),
        "{file} was not announced before it went: {seen:?}"
    );
}

/// A collector's live announcement is its run's state, not garbage: `verify` neither reports
/// nor deletes it (an upload relies on seeing it).
#[tokio::test(start_paused = true)]
async fn verify_leaves_a_collectors_announcement_alone() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let key = super::deleting::key("1767225599-ab12");
    mem.insert(&key, "cellar-deleting 1\nx.nar\n");
    let r = repair(&mem, now).await;
    assert!(
        has(&mem, &key),
        "the announcement was deleted: {:?}",
        r.repaired
    );
    assert!(r.findings.is_empty(), "{:?}", r.findings);
    // And while that collector runs, nothing is repaired (one collector at a time).
    assert!(
        r.repair_errors
            .iter()
            .any(|e| e.contains("another collection is running")),
        "{:?}",
        r.repair_errors
    );
}

/// One collector deletes at a time: `gc --apply` finds another run's live announcement and
/// stops before deleting anything, saying so; once that run is over, it collects.
#[tokio::test(start_paused = true)]
async fn a_collection_stops_while_another_runs() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let expired = path(&mem, "expired", &[], 100 * DAY, now);
    let other = super::deleting::key("1767225599-ab12");
    mem.insert(&other, "cellar-deleting 1\n");
    let store: Arc<dyn Store> = mem.clone();
    let opts = applying(now);
    let Err(e) = run(&store, "/nix/store", &cfg(), &opts, &Quiet).await else {
        panic!("collected beside another run");
    };
    assert!(e.to_string().contains(&other), "{e}");
    assert!(has(&mem, &format!("{}.narinfo", expired.hash)));
    let announcements = |m: &MemoryStore| {
        m.keys()
            .into_iter()
            .filter(|k| k.starts_with("_cellar/deleting/"))
            .count()
    };
    assert_eq!(announcements(&mem), 1, "its own announcement stayed");

    mem.remove(&other);
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert!(!has(&mem, &format!("{}.narinfo", expired.hash)));
    assert_eq!(announcements(&mem), 0, "its announcement was not withdrawn");
}

/// A collection that starts while another deletes stops, even if that other run is over by
/// the time this one has read the store: what it listed may be what the other run was
/// undoing (a narinfo it deleted, then wrote back for an upload), and acting on it would
/// delete what that narinfo needs. The same for `verify --repair`.
#[tokio::test(start_paused = true)]
async fn a_collection_that_listed_while_another_deleted_does_not_delete() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let dep = path(&mem, "dep", &[], 100 * DAY, now);
    let top = path(&mem, "top", &[&dep], 100 * DAY, now);
    let other = super::deleting::key("1767225599-ab12");
    let store: Arc<dyn Store> = mem.clone();
    let opts = applying(now);
    for repairing in [false, true] {
        // The other run is deleting as this one starts, and ends while this one reads.
        mem.insert(&other, "cellar-deleting 1\n");
        let gate = mem.hold_reads(&format!("{}.narinfo", dep.hash));
        let collect = async {
            if repairing {
                let r = repair(&mem, now).await;
                assert!(
                    r.repair_errors
                        .iter()
                        .any(|e| e.contains("another collection is running")),
                    "{:?}",
                    r.repair_errors
                );
            } else {
                let Err(e) = run(&store, "/nix/store", &cfg(), &opts, &Quiet).await else {
                    panic!("collected what it listed while another run deleted");
                };
                assert!(e.to_string().contains(&other), "{e}");
            }
        };
        tokio::pin!(collect);
        tokio::select! {
            () = &mut collect => {}
            () = gate.reached() => {
                mem.remove(&other);
                gate.open();
                collect.await;
            }
        }
        gate.open();
        for key in [
            format!("{}.narinfo", top.hash),
            format!("{}.narinfo", dep.hash),
            top.nar.clone(),
            dep.nar.clone(),
        ] {
            assert!(has(&mem, &key), "{key} deleted (repairing: {repairing})");
        }
        let ours = mem
            .keys()
            .into_iter()
            .filter(|k| k.starts_with("_cellar/deleting/") && *k != other)
            .count();
        assert_eq!(ours, 0, "its announcement stayed (repairing: {repairing})");
    }
}

/// A narinfo the collector could not read or delete stays, and so does everything it needs:
/// its NAR, and its references (written back if they were deleted beside it).
#[tokio::test(start_paused = true)]
async fn a_narinfo_that_stays_keeps_its_closure() {
    // A read fails after the one that loaded the graph; a delete at once.
    for (op, skip) in [(FailOp::Delete, 0), (FailOp::Read, 1)] {
        let mem = Arc::new(served_for_years());
        let now = SystemTime::now();
        let dep = path(&mem, "dep", &[], 100 * DAY, now);
        let top = path(&mem, "top", &[&dep], 100 * DAY, now);
        let other = path(&mem, "other", &[], 100 * DAY, now);
        mem.fail(op, &format!("{}.narinfo", top.hash), skip, 1);
        let s = gc(&mem, &cfg(), now, true).await;
        assert_eq!(s.errors.len(), 1, "{op:?}: {:?}", s.errors);
        for p in [&top, &dep] {
            let narinfo = format!("{}.narinfo", p.hash);
            assert!(has(&mem, &narinfo), "{op:?}: {} went", p.base);
            assert!(has(&mem, &p.nar), "{op:?}: the NAR of {} went", p.base);
        }
        assert!(!has(&mem, &format!("{}.narinfo", other.hash)));
        assert!(!has(&mem, &other.nar));
    }
}

/// A path a collection deleted and a client uploaded again before the records were read
/// again (naming it): the upload's narinfo stays, not the copy read before the deletion.
#[tokio::test(start_paused = true)]
async fn a_path_uploaded_again_after_its_deletion_keeps_the_uploads_narinfo() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let top = path(&mem, "top", &[], 100 * DAY, now);
    let key = format!("{}.narinfo", top.hash);
    let fresh = format!(
        "{}Sig: fresh\n",
        String::from_utf8_lossy(&mem.bytes(&key).unwrap())
    );
    let hooked = mem.clone();
    let th = top.hash.parse().unwrap();
    mem.after_delete(&key.clone(), move |key| {
        hooked.insert(key, fresh.clone());
        let day = super::access::day(SystemTime::now());
        hooked.insert(
            &format!("_cellar/access/{day}/top-upload"),
            render([Entry::Path(th)]),
        );
    });
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    let now_there = String::from_utf8(mem.bytes(&key).unwrap().to_vec()).unwrap();
    assert!(
        now_there.contains("Sig: fresh"),
        "the upload's narinfo was replaced: {now_there}"
    );
    assert!(has(&mem, &top.nar));
}

/// When the access records cannot be read again after a batch, an upload may have relied on
/// any narinfo of it: the batch is written back whole and the run stops, NARs untouched.
#[tokio::test(start_paused = true)]
async fn a_batch_whose_records_cannot_be_read_again_is_written_back() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let dep = path(&mem, "dep", &[], 100 * DAY, now);
    let top = path(&mem, "top", &[&dep], 100 * DAY, now);
    // The re-read before the batch passes, the one after it fails.
    let yesterday = super::access::day(SystemTime::now() - DAY);
    let prefix = format!("_cellar/access/{yesterday}/");
    mem.fail(FailOp::List, &prefix, 1, usize::MAX);
    // The first two writes back of `top` fail too (the store failing then): tried again.
    mem.fail(FailOp::Write, &format!("{}.narinfo", top.hash), 0, 2);
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(!s.errors.is_empty());
    // Planned, and said so; deleted, none (the summary and the metrics tell both).
    assert_eq!((s.deleted_paths(), s.deleted_narinfos), (2, Some(0)));
    assert_eq!(
        (s.restored, s.rescued),
        (2, 0),
        "both written back, none untouched"
    );
    assert!(s.to_string().contains("deleted: 0 narinfos\n"), "{s}");
    assert!(
        !s.errors.iter().any(|e| e.starts_with("restoring")),
        "{:?}",
        s.errors
    );
    for p in [&top, &dep] {
        assert!(has(&mem, &format!("{}.narinfo", p.hash)), "{} went", p.base);
        assert!(has(&mem, &p.nar), "the NAR of {} went", p.base);
    }
}

/// A narinfo an upload relied on that cannot be written back ends the run after its batch:
/// the store fails writes, and more deletions could leave more uploads without a reference.
#[tokio::test(start_paused = true)]
async fn a_failed_write_back_stops_the_run() {
    // In the first of two batches, and in the last one.
    for n in [super::sweep::BATCH + 6, 5] {
        a_failed_write_back_stops_a_run_of(n).await;
    }
}

async fn a_failed_write_back_stops_a_run_of(n: usize) {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let paths: Vec<P> = (0..n)
        .map(|i| path(&mem, &format!("p{i}"), &[], 100 * DAY, now))
        .collect();
    // An upload relies on the first narinfo deleted, as it goes; writing it back fails.
    let weak = Arc::downgrade(&mem);
    let first = std::sync::atomic::AtomicBool::new(true);
    mem.after_delete("", move |key| {
        let Some(mem) = weak.upgrade() else { return };
        let Some(hash) = key.strip_suffix(".narinfo") else {
            return;
        };
        if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
            let day = super::access::day(SystemTime::now());
            let record = render([Entry::Path(hash.parse().unwrap())]);
            mem.insert(&format!("_cellar/access/{day}/r-upload"), record);
            mem.fail(FailOp::Write, key, 0, usize::MAX);
        }
    });
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(
        s.errors
            .iter()
            .any(|e| e.contains("could not be written back")),
        "{:?}",
        s.errors
    );
    let left = paths
        .iter()
        .filter(|p| has(&mem, &format!("{}.narinfo", p.hash)))
        .count();
    if n > super::sweep::BATCH {
        assert!(left >= 6, "the next batch was deleted too: {left} left");
    }
    assert!(paths.iter().all(|p| has(&mem, &p.nar)), "a NAR went");
    // The copies stay for the next run, which tries again.
    assert_eq!(unfinished_files(&mem).len(), 1, "{:?}", mem.keys());
}

/// A batch written back goes back references first, and a narinfo whose reference could not
/// be written back stays deleted: a path is never back without what it needs.
#[tokio::test(start_paused = true)]
async fn a_narinfo_is_not_written_back_before_or_without_its_references() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let dep = path(&mem, "dep", &[], 100 * DAY, now);
    let top = path(&mem, "top", &[&dep], 100 * DAY, now);
    let yesterday = super::access::day(SystemTime::now() - DAY);
    mem.fail(
        FailOp::List,
        &format!("_cellar/access/{yesterday}/"),
        1,
        usize::MAX,
    );
    // Every write back of `dep` fails.
    mem.fail(
        FailOp::Write,
        &format!("{}.narinfo", dep.hash),
        0,
        usize::MAX,
    );
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(
        !has(&mem, &format!("{}.narinfo", top.hash)),
        "written back without its reference"
    );
    assert!(
        s.errors.iter().any(|e| e.starts_with("not restoring")),
        "{:?}",
        s.errors
    );
    for p in [&top, &dep] {
        assert!(has(&mem, &p.nar), "the NAR of {} went", p.base);
    }
}

/// What an upload in progress names (an upload record younger than its lifetime) is kept
/// with its closure whatever the retention and the budget say: the upload's narinfo may have
/// been checked against it, and write no record of its own.
#[tokio::test(start_paused = true)]
async fn paths_an_upload_in_progress_names_are_roots() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let dep = path(&mem, "dep", &[], 100 * DAY, now);
    let named = path(&mem, "named", &[&dep], 100 * DAY, now);
    let other = path(&mem, "other", &[], 100 * DAY, now);
    let day = super::access::day(now);
    // As an upload writes it: the narinfo and its NAR.
    let nar_file = named.nar.trim_start_matches("nar/");
    let record = |age: Duration| {
        mem.insert_at(
            &format!("_cellar/access/{day}/p-1-upload"),
            render([
                Entry::Path(named.hash.parse().unwrap()),
                Entry::Nar(nar_file.into()),
            ]),
            now - age,
        );
    };
    record(Duration::from_secs(60));
    let strict = GcConfig {
        keep: Duration::ZERO,
        max_bytes: Some(0),
        ..cfg()
    };
    let s = gc(&mem, &strict, now, true).await;
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    for p in [&named, &dep] {
        assert!(has(&mem, &format!("{}.narinfo", p.hash)), "{} went", p.base);
        assert!(has(&mem, &p.nar), "the NAR of {} went", p.base);
    }
    assert!(!has(&mem, &format!("{}.narinfo", other.hash)));
    // Once older than its lifetime, the record names an upload that is over: a use like any
    // other, within the retention and the budget.
    record(super::access::UPLOAD_RECORD_LIFETIME + Duration::from_secs(1));
    let budget = GcConfig {
        max_bytes: Some(0),
        ..cfg()
    };
    let s = gc(&mem, &budget, now, true).await;
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert!(!has(&mem, &format!("{}.narinfo", named.hash)));
    assert!(!has(&mem, &named.nar), "an evicted path's NAR stays");
}

/// Nix keeps narinfos in its own cache for 30 days, so a client substituting a path again
/// may ask for its NAR alone: that is a use of the path (and of every path naming that NAR),
/// kept with its closure like one whose narinfo was read.
#[tokio::test(start_paused = true)]
async fn a_path_whose_nar_alone_was_served_is_kept() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let dep = path(&mem, "dep", &[], 100 * DAY, now);
    let served = path(&mem, "served", &[&dep], 100 * DAY, now);
    let other = path(&mem, "other", &[], 100 * DAY, now);
    let nar_file = served.nar.trim_start_matches("nar/");
    mem.insert_at(
        "_cellar/access/x/p-1",
        render([Entry::Nar(nar_file.into())]),
        now - 2 * DAY,
    );
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    for p in [&served, &dep] {
        assert!(has(&mem, &format!("{}.narinfo", p.hash)), "{} went", p.base);
        assert!(has(&mem, &p.nar), "the NAR of {} went", p.base);
    }
    assert!(!has(&mem, &format!("{}.narinfo", other.hash)));
    assert!(!has(&mem, &other.nar));
}

/// A path `verify --repair` found broken may be healed while it deletes (its missing
/// reference uploaded again), and an upload that began after the repair's last look at the
/// records may find it and rely on it (a path referring to it): read before it is deleted, it
/// is written back once the records are read again after its chunk, and what it needs stays.
#[tokio::test(start_paused = true)]
async fn repair_writes_back_what_an_upload_relied_on_meanwhile() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let m = path(&mem, "m", &[], 100 * DAY, now);
    let m_key = format!("{}.narinfo", m.hash);
    let m_narinfo = mem.bytes(&m_key).unwrap();
    mem.remove(&m_key);
    let x = path(&mem, "x", &[&m], 100 * DAY, now);
    let z = path(&mem, "z", &[&x], 100 * DAY, now);
    let y: crate::nix::StorePathHash = "0c6kzph7q0gbwm8yd1bhcxvq58a1f5xq".parse().unwrap();
    // As the repair deletes Z (before X, its reference): M is uploaded again, which heals X,
    // and an upload of Y, which refers to X, records itself and finds X there.
    let hooked = mem.clone();
    let m_nar: Box<str> = m.nar.trim_start_matches("nar/").into();
    let (xh, mh) = (x.hash.parse().unwrap(), m.hash.parse().unwrap());
    mem.after_delete(&format!("{}.narinfo", z.hash), move |_| {
        hooked.insert(&m_key, m_narinfo.clone());
        let day = super::access::day(SystemTime::now());
        hooked.insert(
            &format!("_cellar/access/{day}/y-upload"),
            render([
                Entry::Path(mh),
                Entry::Nar(m_nar.clone()),
                Entry::Path(y),
                Entry::Path(xh),
            ]),
        );
    });
    let r = repair(&mem, now).await;
    assert!(r.repair_errors.is_empty(), "{:?}", r.repair_errors);
    assert!(
        !has(&mem, &format!("{}.narinfo", z.hash)),
        "Z was not deleted"
    );
    for (key, what) in [
        (format!("{}.narinfo", x.hash), "X's narinfo"),
        (x.nar.clone(), "X's NAR"),
        (m.nar.clone(), "M's NAR"),
    ] {
        assert!(has(&mem, &key), "{what} is gone: {:?}", r.repaired);
    }
    assert!(
        r.relied_on.contains(&format!("{}.narinfo", x.hash)),
        "{:?}",
        r.relied_on
    );
    assert!(
        !r.repaired.contains(&format!("{}.narinfo", x.hash)),
        "written back, yet reported deleted: {:?}",
        r.repaired
    );

    // X itself uploaded again after it went (whole now): the upload's narinfo stays, not
    // the broken copy read before.
    let mem = Arc::new(served_for_years());
    let x = path(&mem, "x", &[], 100 * DAY, now);
    mem.remove(&x.nar);
    let x_key = format!("{}.narinfo", x.hash);
    let fresh = format!(
        "{}\nSig: fresh\n",
        String::from_utf8_lossy(&mem.bytes(&x_key).unwrap())
    );
    let hooked = mem.clone();
    let (x_nar, xh) = (x.nar.clone(), x.hash.parse().unwrap());
    mem.after_delete(&x_key.clone(), move |key| {
        hooked.insert(&x_nar, "nar of x");
        hooked.insert(key, fresh.clone());
        let day = super::access::day(SystemTime::now());
        hooked.insert(
            &format!("_cellar/access/{day}/x-upload"),
            render([Entry::Path(xh)]),
        );
    });
    let r = repair(&mem, now).await;
    assert!(r.repair_errors.is_empty(), "{:?}", r.repair_errors);
    let now_there = String::from_utf8(mem.bytes(&x_key).unwrap().to_vec()).unwrap();
    assert!(
        now_there.contains("Sig: fresh"),
        "the upload's narinfo was replaced: {now_there}"
    );
}

/// Only findings that say an object is missing are looked at again: a narinfo that does not
/// parse costs no second request.
#[tokio::test(start_paused = true)]
async fn verify_looks_again_only_at_what_it_found_missing() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let bad = path(&mem, "bad", &[], 100 * DAY, now);
    let key = format!("{}.narinfo", bad.hash);
    mem.insert_at(&key, "not a narinfo", now - 100 * DAY);
    let r = check(&mem, now, None).await;
    assert!(found(&r).contains(&format!("unparseable {key}")), "{r:?}");
    assert_eq!(mem.heads_under(&key), 0);
}

/// A path a collection deletes while `verify` runs (its narinfo read, then its NAR gone, then
/// the narinfo) is no finding: the second look sees the narinfo gone too.
#[tokio::test(start_paused = true)]
async fn verify_reports_nothing_of_a_path_collected_while_it_runs() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let gone = path(&mem, "gone", &[], 100 * DAY, now);
    mem.remove(&gone.nar);
    let gate = mem.hold_reads(&gone.nar);
    let (r, ()) = tokio::join!(check(&mem, now, None), async {
        reach(&gate, "the second look at the NAR").await;
        mem.remove(&format!("{}.narinfo", gone.hash));
        gate.open();
    });
    assert!(
        !r.findings
            .iter()
            .any(|f| f.to_string().contains(&gone.hash)),
        "{:?}",
        r.findings
    );
}

/// `verify` reports a missing NAR only if a second look confirms it, and `--repair` deletes
/// a narinfo only if it is older than the grace period and a look before the deletion
/// confirms it again: the listing is not a snapshot, and a NAR uploaded while it runs may be
/// missing from it (the weekly check failed for those on a busy cache).
#[tokio::test(start_paused = true)]
async fn verify_looks_again_before_reporting_or_deleting_a_narinfo() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let late = path(&mem, "late", &[], 100 * DAY, now);
    let late_nar = mem.bytes(&late.nar).unwrap();
    mem.remove(&late.nar);
    let later = path(&mem, "later", &[], 100 * DAY, now);
    let later_nar = mem.bytes(&later.nar).unwrap();
    mem.remove(&later.nar);
    // A reference uploaded after the listing passed it, with its referrer.
    let dep = path(&mem, "dep", &[], 100 * DAY, now);
    let dep_key = format!("{}.narinfo", dep.hash);
    let dep_narinfo = mem.bytes(&dep_key).unwrap();
    mem.remove(&dep_key);
    let above_dep = path(&mem, "above-dep", &[&dep], 100 * DAY, now);
    let young = path(&mem, "young", &[], Duration::from_secs(60), now);
    mem.remove(&young.nar);
    // Older than what it refers to (written again since): it stays while that may be an
    // upload in progress.
    let above_young = path(&mem, "above-young", &[&young], 100 * DAY, now);
    // Young and broken on its own, and above an old broken path: said once, and what it
    // needs stays.
    let old_below = path(&mem, "old-below", &[], 100 * DAY, now);
    mem.remove(&old_below.nar);
    let young_above = path(
        &mem,
        "young-above",
        &[&old_below],
        Duration::from_secs(60),
        now,
    );
    mem.remove(&young_above.nar);
    let broken = path(&mem, "broken", &[], 100 * DAY, now);
    mem.remove(&broken.nar);
    let referrer = path(&mem, "referrer", &[&broken], 100 * DAY, now);
    // Needs a young broken path, and an old one: it goes, for the old one.
    let above_both = path(&mem, "above-both", &[&young, &broken], 100 * DAY, now);
    // Broken too (its reference is), but young: it stays, and so does what it needs.
    let broken_below = path(&mem, "broken-below", &[], 100 * DAY, now);
    mem.remove(&broken_below.nar);
    let young_referrer = path(
        &mem,
        "young-referrer",
        &[&broken_below],
        Duration::from_secs(60),
        now,
    );
    // The late NAR lands after the listing, while the narinfos are read; the later one while
    // the second look at it is under way (it saw none).
    let gate = mem.hold_reads(&format!("{}.narinfo", late.hash));
    let later_gate = mem.hold_reads(&later.nar);
    let (r, (), ()) = tokio::join!(
        repair(&mem, now),
        async {
            gate.reached().await;
            mem.insert_at(&late.nar, late_nar, now);
            mem.insert_at(&dep_key, dep_narinfo, now);
            gate.open();
        },
        async {
            reach(&later_gate, "the second look at the later NAR").await;
            mem.insert_at(&later.nar, later_nar, now);
            later_gate.open();
        }
    );
    let narinfo = |p: &P| format!("{}.narinfo", p.hash);
    let reported = |p: &P| r.findings.iter().any(|f| f.to_string().contains(&p.hash));
    assert!(!reported(&late), "the second look found its NAR");
    assert!(!reported(&above_dep), "the second look found its reference");
    assert!(reported(&later), "the second look missed its NAR");
    for p in [&late, &later] {
        assert!(has(&mem, &narinfo(p)), "deleted: {:?}", r.repaired);
        assert!(has(&mem, &p.nar));
    }
    for p in [&young, &above_young, &young_above, &old_below] {
        assert!(
            has(&mem, &narinfo(p)),
            "an upload in progress or a path that needs it was deleted: {}",
            p.base
        );
    }
    assert!(!has(&mem, &narinfo(&broken)));
    for p in [&referrer, &above_both] {
        assert!(
            !has(&mem, &narinfo(p)),
            "a path whose reference went stays: {}",
            p.base
        );
    }
    for p in [&young_referrer, &broken_below] {
        assert!(
            has(&mem, &narinfo(p)),
            "{} deleted: {:?}",
            p.base,
            r.repaired
        );
    }
    let mut kept_young = r.young.clone();
    kept_young.sort();
    // The young paths broken themselves are said to be kept too (a NAR may be on its way),
    // with what needs them and what they need, each once.
    let mut want = vec![
        narinfo(&broken_below),
        narinfo(&young_referrer),
        narinfo(&young),
        narinfo(&above_young),
        narinfo(&young_above),
        narinfo(&old_below),
    ];
    want.sort();
    assert_eq!(kept_young, want);
}

/// A pin that does not parse is reported by `verify --repair` and left alone (gc refuses to
/// run while it is there; deleting it would let the next run collect what it pins), as a
/// repair error: the run fails. Other unreadable reserved objects are deleted.
#[tokio::test(start_paused = true)]
async fn repair_reports_a_bad_pin_and_leaves_it() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    mem.insert_at(
        "_cellar/pins/typo",
        "cellar-pin 1\ncreated 12\n",
        now - 100 * DAY,
    );
    mem.insert_at("_cellar/access/x/garbage", "nonsense", now - 100 * DAY);
    let r = repair(&mem, now).await;
    let reported = |key: &str| {
        r.findings
            .iter()
            .any(|f| matches!(f, super::verify::Finding::BadReserved { key: k, .. } if k == key))
    };
    assert!(reported("_cellar/pins/typo"), "{:?}", r.findings);
    assert!(reported("_cellar/access/x/garbage"), "{:?}", r.findings);
    // Left, so not a successful repair (`verify --repair` exits 1).
    assert_eq!(r.repair_errors.len(), 1, "{:?}", r.repair_errors);
    assert!(r.repair_errors[0].starts_with("_cellar/pins/typo: "));
    assert!(has(&mem, "_cellar/pins/typo"));
    assert!(!has(&mem, "_cellar/access/x/garbage"));
}

/// A long repair looks at the access records again after each chunk of deletions: broken
/// paths an upload began to rely on meanwhile (it may have healed them) are kept, or written
/// back if they went in that chunk.
#[tokio::test(start_paused = true)]
async fn a_long_repair_keeps_what_uploads_began_to_rely_on_meanwhile() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let n = super::verify::DELETE_CHUNK + 6;
    let broken: Vec<P> = (0..n)
        .map(|i| {
            let p = path(&mem, &format!("b{i}"), &[], 100 * DAY, now);
            mem.remove(&p.nar);
            p
        })
        .collect();
    // As the first narinfo goes, an upload records that it relies on every other one.
    let weak = Arc::downgrade(&mem);
    let named = |i: usize| i.is_multiple_of(2);
    let record = render(
        broken
            .iter()
            .enumerate()
            .filter(|(i, _)| named(*i))
            .map(|(_, p)| Entry::Path(p.hash.parse().unwrap())),
    );
    let named_keys: std::collections::HashSet<String> = broken
        .iter()
        .enumerate()
        .filter(|(i, _)| named(*i))
        .map(|(_, p)| format!("{}.narinfo", p.hash))
        .collect();
    // And as the second chunk begins, another names a path deleted in the first that the
    // first did not name: that one stays deleted (the upload found it missing), and keeps
    // nothing.
    let late = std::sync::Mutex::new(None::<String>);
    let deletions = std::sync::atomic::AtomicUsize::new(0);
    mem.after_delete("", move |key| {
        let Some(mem) = weak.upgrade() else { return };
        if !key.ends_with(".narinfo") {
            return;
        }
        let n = deletions.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let day = super::access::day(SystemTime::now());
        if n == 0 {
            mem.insert(&format!("_cellar/access/{day}/r-upload"), record.clone());
        }
        let mut late = late.lock().unwrap();
        if late.is_none() && !named_keys.contains(key) {
            *late = Some(key.trim_end_matches(".narinfo").to_owned());
        }
        if n == super::verify::DELETE_CHUNK {
            let h = late.as_ref().unwrap().parse().unwrap();
            mem.insert(
                &format!("_cellar/access/{day}/late-upload"),
                render([Entry::Path(h)]),
            );
        }
    });
    let r = repair(&mem, now).await;
    assert!(r.repair_errors.is_empty(), "{:?}", r.repair_errors);
    let left: Vec<usize> = (0..n)
        .filter(|&i| has(&mem, &format!("{}.narinfo", broken[i].hash)))
        .collect();
    // Those it names stay: deleted in the first chunk, they are written back once the
    // records are read again after it (the upload may have found them before they went);
    // in the second, they are kept. The others go.
    let want: Vec<usize> = (0..n).filter(|&i| named(i)).collect();
    assert_eq!(left, want);
    assert_eq!(r.relied_on.len(), left.len());
}

/// Every NAR a collection deletes was named in its announcement before (after the records
/// were read again), however many it deletes: an upload relying on one from then on is
/// refused. Over more NARs than one announcement names.
#[tokio::test(start_paused = true)]
async fn every_nar_deleted_was_announced_first() {
    use std::collections::HashSet;
    use std::sync::Mutex;
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let n = super::sweep::ANNOUNCED_AT_ONCE + 2 * super::sweep::BATCH;
    for i in 0..n {
        let file =
            base32::encode(&Sha256::digest(format!("orphan {i}").as_bytes()).as_bytes()[..32]);
        mem.insert_at(&format!("nar/{file}.nar"), "x", now - 100 * DAY);
    }
    let announced: Arc<Mutex<HashSet<String>>> = Arc::default();
    let unannounced: Arc<Mutex<Vec<String>>> = Arc::default();
    let (weak, names) = (Arc::downgrade(&mem), announced.clone());
    mem.after_write("_cellar/deleting/", move |key| {
        let Some(mem) = weak.upgrade() else { return };
        let text = String::from_utf8(mem.bytes(key).unwrap().to_vec()).unwrap();
        names
            .lock()
            .unwrap()
            .extend(text.lines().skip(1).map(str::to_owned));
    });
    let (names, missing) = (announced.clone(), unannounced.clone());
    mem.after_delete("nar/", move |key| {
        let file = key.trim_start_matches("nar/");
        if !names.lock().unwrap().contains(file) {
            missing.lock().unwrap().push(file.to_owned());
        }
    });
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert_eq!(
        mem.keys().iter().filter(|k| k.starts_with("nar/")).count(),
        0
    );
    let missing = unannounced.lock().unwrap();
    assert!(
        missing.is_empty(),
        "{} NARs deleted unannounced",
        missing.len()
    );
}

/// An access record stored compressed (`Content-Encoding`, by a tool that copied the bucket)
/// is a damaged record: `verify` reports it and `--repair` removes it, instead of failing on
/// it every time.
#[tokio::test(start_paused = true)]
async fn an_encoded_access_record_is_reported_and_removed() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let key = "_cellar/access/x/p-1";
    mem.insert_at(key, render::<Entry>([]), now - 100 * DAY);
    mem.set_encoding(key, "gzip");
    let r = repair(&mem, now).await;
    assert!(
        r.findings
            .iter()
            .any(|f| matches!(f, super::verify::Finding::BadReserved { key: k, .. } if k == key)),
        "{:?}",
        r.findings
    );
    assert!(r.repair_errors.is_empty(), "{:?}", r.repair_errors);
    assert!(!has(&mem, key));
}

/// A NAR served while the collector runs (after it listed the records) is a use of the paths
/// naming it: they are kept with their closures, as when their narinfo is served.
#[tokio::test(start_paused = true)]
async fn a_nar_served_while_the_collector_runs_keeps_its_path() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let dep = path(&mem, "dep", &[], 100 * DAY, now);
    let served = path(&mem, "served", &[&dep], 100 * DAY, now);
    let other = path(&mem, "other", &[], 100 * DAY, now);
    let file: Box<str> = served.nar.trim_start_matches("nar/").into();
    // Held when the collector first reads the narinfo (the records are listed by then).
    let gate = mem.hold_reads(&format!("{}.narinfo", served.hash));
    let day = super::access::day(SystemTime::now());
    let cfg = cfg();
    let (s, ()) = tokio::join!(gc(&mem, &cfg, now, true), async {
        gate.reached().await;
        mem.insert(
            &format!("_cellar/access/{day}/p-9"),
            render([Entry::Nar(file)]),
        );
        gate.open();
    });
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    for p in [&served, &dep] {
        assert!(has(&mem, &format!("{}.narinfo", p.hash)), "{} went", p.base);
        assert!(has(&mem, &p.nar), "the NAR of {} went", p.base);
    }
    assert!(!has(&mem, &format!("{}.narinfo", other.hash)));
}

/// A path is deleted only once its referrers' deletions are done, not alongside them: when a
/// referrer's deletion fails, what it refers to was never touched (nothing to write back),
/// and a run killed at any moment leaves every narinfo with its references.
#[tokio::test(start_paused = true)]
async fn a_path_goes_only_after_its_referrers() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let leaf = path(&mem, "leaf", &[], 100 * DAY, now);
    let mid = path(&mem, "mid", &[&leaf], 100 * DAY, now);
    let top = path(&mem, "top", &[&mid, &leaf], 100 * DAY, now);
    let lone = path(&mem, "lone", &[], 100 * DAY, now);
    mem.fail(
        FailOp::Delete,
        &format!("{}.narinfo", top.hash),
        0,
        usize::MAX,
    );
    let s = gc(&mem, &cfg(), now, true).await;
    assert_eq!(s.errors.len(), 1, "{:?}", s.errors);
    assert_eq!(s.restored, 0, "a reference was deleted beside its referrer");
    for p in [&top, &mid, &leaf] {
        assert!(has(&mem, &format!("{}.narinfo", p.hash)), "{} went", p.base);
        assert!(has(&mem, &p.nar), "the NAR of {} went", p.base);
    }
    assert!(!has(&mem, &format!("{}.narinfo", lone.hash)));
}

/// Path `again`, whose narinfo went long ago (its listing and realisation orphaned), uploaded
/// again as the narinfo of `trigger` is deleted: an upload record names it, and its listing
/// and realisation are written again. Their keys.
fn uploaded_again_during_the_run(
    mem: &Arc<MemoryStore>,
    now: SystemTime,
    trigger: &P,
) -> (String, String) {
    let again = path(mem, "again", &[], 100 * DAY, now);
    mem.remove(&format!("{}.narinfo", again.hash));
    let realisation = realisation_of(mem, &again.base, 100 * DAY, now);
    let listing = format!("{}.ls", again.hash);
    let weak = Arc::downgrade(mem);
    let h = again.hash.parse().unwrap();
    let (ls, rk) = (listing.clone(), realisation.clone());
    mem.after_delete(&format!("{}.narinfo", trigger.hash), move |_| {
        let Some(mem) = weak.upgrade() else { return };
        let day = super::access::day(SystemTime::now());
        mem.insert(
            &format!("_cellar/access/{day}/again-upload"),
            render([Entry::Path(h)]),
        );
        mem.insert(&ls, "{}");
        let written = mem.bytes(&rk).unwrap();
        mem.insert(&rk, written);
    });
    (listing, realisation)
}

/// A path uploaded again during a run, whose listing (and realisation) the plan found
/// orphaned: the upload writes them again, and the run, which reads the upload's record,
/// leaves them. Before, the run deleted them by its plan: the path was served without them.
#[tokio::test(start_paused = true)]
async fn a_listing_written_again_during_a_run_stays() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let victim = path(&mem, "victim", &[], 100 * DAY, now);
    let (listing, realisation) = uploaded_again_during_the_run(&mem, now, &victim);
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert!(!has(&mem, &format!("{}.narinfo", victim.hash)));
    assert!(has(&mem, &listing), "the listing written again went");
    assert!(
        has(&mem, &realisation),
        "the realisation written again went"
    );
}

/// `verify --repair` likewise: an orphaned listing (and realisation) written again by an
/// upload during the repair (its record read before they go) stays.
#[tokio::test(start_paused = true)]
async fn repair_leaves_a_listing_written_again_meanwhile() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let broken = path(&mem, "broken", &[], 100 * DAY, now);
    mem.remove(&broken.nar);
    let (listing, realisation) = uploaded_again_during_the_run(&mem, now, &broken);
    let r = repair(&mem, now).await;
    assert!(r.repair_errors.is_empty(), "{:?}", r.repair_errors);
    assert!(!has(&mem, &format!("{}.narinfo", broken.hash)));
    assert!(has(&mem, &listing), "the listing written again went");
    assert!(
        has(&mem, &realisation),
        "the realisation written again went"
    );
}

/// A deletion the store applied but answered with an error (a timeout after it was done)
/// counts as done: with nothing relying on the narinfo, what it refers to goes after it; with
/// an upload relying on it as it went, it is written back. Before, it counted as still there:
/// not written back, and the upload's path was left without it for good.
#[tokio::test(start_paused = true)]
async fn a_deletion_applied_despite_its_error_counts_as_done() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let leaf = path(&mem, "leaf", &[], 100 * DAY, now);
    let top = path(&mem, "top", &[&leaf], 100 * DAY, now);
    mem.fail(FailOp::DeleteAnswer, &format!("{}.narinfo", top.hash), 0, 1);
    let s = gc(&mem, &cfg(), now, true).await;
    assert_eq!(s.restored, 0, "{:?}", s.errors);
    assert!(s.errors.is_empty(), "done, yet an error: {:?}", s.errors);
    for p in [&top, &leaf] {
        assert!(
            !has(&mem, &format!("{}.narinfo", p.hash)),
            "{} stayed",
            p.base
        );
        assert!(!has(&mem, &p.nar), "the NAR of {} stayed", p.base);
    }

    let mem = Arc::new(served_for_years());
    let x = path(&mem, "x", &[], 100 * DAY, now);
    let x_key = format!("{}.narinfo", x.hash);
    let weak = Arc::downgrade(&mem);
    let xh: crate::nix::StorePathHash = x.hash.parse().unwrap();
    mem.after_delete(&x_key, move |_| {
        let Some(mem) = weak.upgrade() else { return };
        let day = super::access::day(SystemTime::now());
        mem.insert(
            &format!("_cellar/access/{day}/r-upload"),
            render([Entry::Path(xh)]),
        );
    });
    mem.fail(FailOp::DeleteAnswer, &x_key, 0, 1);
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(has(&mem, &x_key), "not written back: {:?}", s.errors);
    assert!(has(&mem, &x.nar), "its NAR went");
    assert_eq!(s.restored, 1);
}

/// A failed deletion after which the store cannot say whether the narinfo is there: it is
/// written back, with what it refers to kept, whether the deletion was applied or not.
#[tokio::test(start_paused = true)]
async fn a_failed_deletion_that_cannot_be_told_is_written_back() {
    for op in [FailOp::Delete, FailOp::DeleteAnswer] {
        let mem = Arc::new(served_for_years());
        let now = SystemTime::now();
        let leaf = path(&mem, "leaf", &[], 100 * DAY, now);
        let top = path(&mem, "top", &[&leaf], 100 * DAY, now);
        let key = format!("{}.narinfo", top.hash);
        mem.fail(op, &key, 0, 1);
        // Its reads for the graph and for the copy kept pass; the look after the failure
        // does not.
        mem.fail(FailOp::Read, &key, 2, 1);
        let s = gc(&mem, &cfg(), now, true).await;
        for p in [&top, &leaf] {
            assert!(
                has(&mem, &format!("{}.narinfo", p.hash)),
                "{op:?}: {} went",
                p.base
            );
            assert!(has(&mem, &p.nar), "{op:?}: the NAR of {} went", p.base);
        }
        assert_eq!(s.restored, 1, "{op:?}: {:?}", s.errors);
    }
}

/// `verify --repair`: a broken narinfo whose deletion was applied despite its error is
/// deleted, and so its NAR goes too.
#[tokio::test(start_paused = true)]
async fn repair_counts_a_deletion_applied_despite_its_error() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let gone = path(&mem, "gone", &[], 100 * DAY, now);
    let referrer = path(&mem, "referrer", &[&gone], 100 * DAY, now);
    mem.remove(&format!("{}.narinfo", gone.hash));
    let key = format!("{}.narinfo", referrer.hash);
    mem.fail(FailOp::DeleteAnswer, &key, 0, 1);
    let r = repair(&mem, now).await;
    assert!(!has(&mem, &key));
    assert!(
        !has(&mem, &referrer.nar),
        "the NAR of a deleted narinfo stayed"
    );
    assert!(r.repaired.contains(&key), "{:?}", r.repaired);
    assert!(r.repair_errors.is_empty(), "{:?}", r.repair_errors);
}

/// A narinfo `verify --repair` fails to delete stays, and so does its NAR: deleting the NAR
/// would leave a narinfo that was missing a reference missing its NAR as well.
#[tokio::test(start_paused = true)]
async fn repair_keeps_the_nar_of_a_narinfo_it_could_not_delete() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let gone = path(&mem, "gone", &[], 100 * DAY, now);
    let referrer = path(&mem, "referrer", &[&gone], 100 * DAY, now);
    let other = path(&mem, "other", &[&gone], 100 * DAY, now);
    mem.remove(&format!("{}.narinfo", gone.hash));
    mem.fail(
        FailOp::Delete,
        &format!("{}.narinfo", referrer.hash),
        0,
        usize::MAX,
    );
    let r = repair(&mem, now).await;
    assert_eq!(r.repair_errors.len(), 1, "{:?}", r.repair_errors);
    assert!(has(&mem, &format!("{}.narinfo", referrer.hash)));
    assert!(has(&mem, &referrer.nar), "the NAR of a narinfo left went");
    assert!(!has(&mem, &format!("{}.narinfo", other.hash)));
    assert!(!has(&mem, &other.nar));
}

/// A pin added while a collection runs (after it read the pins) keeps its closure all the
/// same: `pin add` records the paths as used, and the collector re-reads the records.
#[tokio::test(start_paused = true)]
async fn a_pin_added_during_a_run_keeps_its_closure() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let dep = path(&mem, "dep", &[], 100 * DAY, now);
    let pinned = path(&mem, "pinned", &[&dep], 100 * DAY, now);
    let other = path(&mem, "other", &[], 100 * DAY, now);
    // Held when the collector reads a narinfo: the pins are listed by then.
    let gate = mem.hold_reads(&format!("{}.narinfo", other.hash));
    let cfg = cfg();
    let (s, ()) = tokio::join!(gc(&mem, &cfg, now, true), async {
        gate.reached().await;
        let base: crate::nix::StorePathBaseName = pinned.base.parse().unwrap();
        super::pins::add(&*mem, "late", vec![base], None, "/nix/store")
            .await
            .unwrap();
        gate.open();
    });
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    for p in [&pinned, &dep] {
        assert!(has(&mem, &format!("{}.narinfo", p.hash)), "{} went", p.base);
        assert!(has(&mem, &p.nar), "the NAR of {} went", p.base);
    }
    assert!(!has(&mem, &format!("{}.narinfo", other.hash)));
    assert!(has(&mem, "_cellar/pins/late"));
}

/// A collection deletes nothing more once its announcement may have lapsed (the store refused
/// its renewals while the run was held up): another collector could have started, listing the
/// store while this one changes it.
#[tokio::test(start_paused = true)]
async fn a_collection_stops_deleting_once_its_announcement_may_have_lapsed() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let old = path(&mem, "old", &[], 100 * DAY, now);
    let narinfo = format!("{}.narinfo", old.hash);
    // From the announcement written as deletions begin (the run's second write) on, every
    // renewal fails, and the collector's read of the narinfo before deleting it is held.
    let gate = Arc::new(std::sync::Mutex::new(None));
    let (weak, slot, held) = (Arc::downgrade(&mem), gate.clone(), narinfo.clone());
    let writes = AtomicUsize::new(0);
    mem.after_write("_cellar/deleting/", move |key| {
        let Some(mem) = weak.upgrade() else { return };
        if writes.fetch_add(1, Ordering::SeqCst) == 1 {
            mem.fail(FailOp::Write, key, 0, usize::MAX);
            *slot.lock().unwrap() = Some(mem.hold_reads(&held));
        }
    });
    let cfg = cfg();
    let (s, ()) = tokio::join!(gc(&mem, &cfg, now, true), async {
        let gate = loop {
            if let Some(g) = gate.lock().unwrap().clone() {
                break g;
            }
            tokio::task::yield_now().await;
        };
        gate.reached().await;
        tokio::time::sleep(super::deleting::TTL).await;
        gate.open();
    });
    assert!(
        s.errors
            .iter()
            .any(|e| e.contains("could not be kept live")),
        "{:?}",
        s.errors
    );
    assert!(has(&mem, &narinfo), "deleted under a lapsed announcement");
    assert!(has(&mem, &old.nar));
}

/// The same for the NARs left without a narinfo: named in the announcement, whose renewals
/// the store then refuses until the run gets to delete them.
#[tokio::test(start_paused = true)]
async fn a_collection_deletes_no_nar_under_a_lapsed_announcement() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let (nar, file) = orphan(&mem, "orphan", now);
    fail_renewals_once_named(&mem, file);
    let store: Arc<dyn Store> = mem.clone();
    let opts = Options {
        apply: true,
        now,
        settle: super::deleting::TTL,
        stop: Default::default(),
    };
    let s = run(&store, "/nix/store", &cfg(), &opts, &Quiet)
        .await
        .unwrap();
    assert!(
        s.errors
            .iter()
            .any(|e| e.contains("could not be kept live")),
        "{:?}",
        s.errors
    );
    assert!(has(&mem, &nar), "deleted under a lapsed announcement");
}

/// The announcements of runs that died are removed once long past counting (twice their
/// lifetime); one that stopped counting lately stays, in case its run's clock is off.
#[tokio::test(start_paused = true)]
async fn announcements_of_dead_runs_are_removed() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let ttl = super::deleting::TTL;
    let dead = super::deleting::key("1700000000-dead");
    let lapsed = super::deleting::key("1700000000-lapsed");
    mem.insert_at(&dead, "cellar-deleting 1\n", now - ttl * 3);
    mem.insert_at(&lapsed, "cellar-deleting 1\n", now - ttl * 3 / 2);
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert!(!has(&mem, &dead));
    assert!(has(&mem, &lapsed));
}

/// A stop asked for as deletions begin (the announcement's second write).
fn stop_as_deletions_begin(mem: &MemoryStore) -> super::Stop {
    let stop = super::Stop::default();
    let (asked, writes) = (stop.clone(), std::sync::atomic::AtomicUsize::new(0));
    mem.after_write("_cellar/deleting/", move |_| {
        if writes.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            asked.request();
        }
    });
    stop
}

/// A collection asked to stop while it waits after announcing the NARs it is about to delete
/// (its last batch, here its only one) stops there, deleting none of them: it finished that
/// batch and exited 0 as if it had not been asked.
#[tokio::test(start_paused = true)]
async fn a_collection_asked_to_stop_while_it_announces_nars_deletes_none() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let (nar, _) = orphan(&mem, "orphan", now);
    let stop = super::Stop::default();
    let (asked, seen) = (stop.clone(), mem.clone());
    mem.after_write("_cellar/deleting/", move |k| {
        let names_nars = seen.bytes(k).is_some_and(|b| {
            b.split(|c| *c == b'\n')
                .nth(1)
                .is_some_and(|l| !l.is_empty())
        });
        if names_nars {
            asked.request();
        }
    });
    let store: Arc<dyn Store> = mem.clone();
    let opts = Options {
        apply: true,
        now,
        settle: super::deleting::SETTLE,
        stop,
    };
    let s = run(&store, "/nix/store", &cfg(), &opts, &Quiet)
        .await
        .unwrap();
    stopped_and_withdrawn(&s, &mem);
    assert!(has(&mem, &nar));
}

/// `s` says it stopped on request, and its announcement is gone from `mem`.
fn stopped_and_withdrawn(s: &super::Summary, mem: &MemoryStore) {
    assert!(
        s.errors.iter().any(|e| e.contains("stopped on request")),
        "{:?}",
        s.errors
    );
    assert!(
        !mem.keys()
            .iter()
            .any(|k| k.starts_with("_cellar/deleting/")),
        "its announcement stayed"
    );
}

/// A collection asked to stop (SIGINT, SIGTERM) once it deletes stops between batches: here
/// before the first, deleting nothing (narinfos, or NARs left without one), and withdrawing
/// its announcement. `verify --repair` alike.
#[tokio::test(start_paused = true)]
async fn a_collection_asked_to_stop_stops_between_batches() {
    for orphan_only in [false, true] {
        let mem = Arc::new(served_for_years());
        let now = SystemTime::now();
        let old = path(&mem, "old", &[], 100 * DAY, now);
        if orphan_only {
            mem.remove(&format!("{}.narinfo", old.hash));
        }
        let store: Arc<dyn Store> = mem.clone();
        let opts = Options {
            apply: true,
            now,
            settle: super::deleting::SETTLE,
            stop: stop_as_deletions_begin(&mem),
        };
        let s = run(&store, "/nix/store", &cfg(), &opts, &Quiet)
            .await
            .unwrap();
        stopped_and_withdrawn(&s, &mem);
        assert_eq!(has(&mem, &format!("{}.narinfo", old.hash)), !orphan_only);
        assert!(has(&mem, &old.nar), "orphan only: {orphan_only}");
        // The metrics file says what it did delete, not what it planned to.
        assert_eq!(s.nars.count, 1);
        let prom = super::metrics_file::render_gc(&s, None, now);
        assert!(
            prom.contains("\ncellar_gc_deleted_objects{kind=\"nar\"} 0\n"),
            "{prom}"
        );
    }
    // A repair: a narinfo whose NAR is gone, and a NAR without a narinfo.
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let broken = path(&mem, "broken", &[], 100 * DAY, now);
    mem.remove(&broken.nar);
    let (nar, _) = orphan(&mem, "orphan", now);
    let store: Arc<dyn Store> = mem.clone();
    let opts = super::verify::Options {
        stop: stop_as_deletions_begin(&mem),
        ..repair_options(now, super::deleting::SETTLE)
    };
    let r = super::verify::run(&store, "/nix/store", &opts, &Quiet)
        .await
        .unwrap();
    assert!(
        r.repair_errors
            .iter()
            .any(|e| e.contains("stopped on request")),
        "{:?}",
        r.repair_errors
    );
    assert!(has(&mem, &format!("{}.narinfo", broken.hash)));
    assert!(has(&mem, &nar));

    // Asked to stop while the broken narinfos are being deleted (past the look before their
    // chunk): the orphan NARs are not deleted, and the repair says it stopped (exit 1, a
    // failure in the metrics file), not as if it had repaired all.
    let mem = Arc::new(served_for_years());
    let broken = path(&mem, "broken", &[], 100 * DAY, now);
    mem.remove(&broken.nar);
    let (nar, _) = orphan(&mem, "orphan", now);
    let store: Arc<dyn Store> = mem.clone();
    let stop = super::Stop::default();
    let asked = stop.clone();
    mem.after_delete(&format!("{}.narinfo", broken.hash), move |_| {
        asked.request()
    });
    let opts = super::verify::Options { stop, ..opts };
    let r = super::verify::run(&store, "/nix/store", &opts, &Quiet)
        .await
        .unwrap();
    assert!(!has(&mem, &format!("{}.narinfo", broken.hash)));
    assert!(has(&mem, &nar));
    assert_eq!(
        r.repair_errors
            .iter()
            .filter(|e| e.contains("stopped on request"))
            .count(),
        1,
        "{:?}",
        r.repair_errors
    );
}

/// `verify --repair` asked to stop while it still checks ends at once, a run that did not get
/// to its end (its report says so: exit 1, a failure in the metrics file), not an error as if
/// the store could not be read (exit 2, "store error: stopped on request"); it repaired
/// nothing and withdrew its announcement.
#[tokio::test]
async fn a_repair_asked_to_stop_while_it_checks_ends_stopped() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let broken = path(&mem, "broken", &[], 100 * DAY, now);
    mem.remove(&broken.nar);
    let (nar, _) = orphan(&mem, "orphan", now);
    let held = mem.hold_gets(&format!("{}.narinfo", broken.hash));
    let store: Arc<dyn Store> = mem.clone();
    let stop = super::Stop::default();
    let opts = super::verify::Options {
        stop: stop.clone(),
        ..repair_options(now, super::deleting::SETTLE)
    };
    let (r, ()) = tokio::join!(
        super::verify::run(&store, "/nix/store", &opts, &Quiet),
        async {
            held.reached().await;
            stop.request();
        }
    );
    let r = r.unwrap();
    held.open();
    assert!(r.stopped);
    assert_eq!(r.repair_errors, [super::STOPPED]);
    assert!(r.findings.is_empty() && r.repaired.is_empty(), "{r:?}");
    assert!(has(&mem, &format!("{}.narinfo", broken.hash)));
    assert!(has(&mem, &nar));
    assert!(
        !mem.keys()
            .iter()
            .any(|k| k.starts_with("_cellar/deleting/")),
        "its announcement stayed"
    );
    // A failed run, without counts of a check it did not finish.
    let prom = super::metrics_file::render_verify(&r, None, now);
    assert!(
        prom.contains("\ncellar_verify_last_run_failed 1\n"),
        "{prom}"
    );
    assert!(!prom.contains("cellar_verify_narinfos_checked"), "{prom}");
}

/// A collection that starts after `pin add` recorded its paths but before it wrote the pin
/// keeps them too, with no retention (only pins are roots) and over the budget alike.
#[tokio::test(start_paused = true)]
async fn a_pin_being_written_when_a_run_starts_keeps_its_closure() {
    for budget in [None, Some(1)] {
        let mem = Arc::new(served_for_years());
        let now = SystemTime::now();
        let dep = path(&mem, "dep", &[], 100 * DAY, now);
        let pinned = path(&mem, "pinned", &[&dep], 100 * DAY, now);
        let other = path(&mem, "other", &[], 100 * DAY, now);
        // `pin add`'s first step; the pin itself is not written yet.
        let h: crate::nix::StorePathHash = pinned.hash.parse().unwrap();
        super::access::record_now(&*mem, [h], "pin").await.unwrap();
        let cfg = GcConfig {
            keep: if budget.is_some() {
                cfg().keep
            } else {
                Duration::ZERO
            },
            max_bytes: budget,
            ..cfg()
        };
        let s = gc(&mem, &cfg, now + Duration::from_secs(5), true).await;
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        for p in [&pinned, &dep] {
            assert!(
                has(&mem, &format!("{}.narinfo", p.hash)),
                "{} went ({budget:?})",
                p.base
            );
            assert!(has(&mem, &p.nar), "the NAR of {} went", p.base);
        }
        assert!(!has(&mem, &format!("{}.narinfo", other.hash)), "{budget:?}");
    }
}

/// A debug info link goes with the NAR it names; one naming a NAR the store lacks (Nix writes
/// the link first) once older than the retention; one that cannot be read stays.
#[tokio::test(start_paused = true)]
async fn debug_info_links_go_with_their_nars() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let kept = path(&mem, "kept", &[], Duration::from_secs(60), now);
    let expired = path(&mem, "expired", &[], 100 * DAY, now);
    let nowhere = "nar/0000000000000000000000000000000000000000000000000000.nar.xz";
    let with_kept = debug_link(&mem, 1, &kept.nar, 100 * DAY, now);
    let with_expired = debug_link(&mem, 2, &expired.nar, 100 * DAY, now);
    // Within the retention, its NAR may be on its way.
    let uploading = debug_link(&mem, 3, nowhere, 2 * DAY, now);
    let dangling = debug_link(&mem, 4, nowhere, 40 * DAY, now);
    // A kept path whose NAR is missing (a broken path, for verify): its link is not counted
    // as going, and stays.
    let broken = path(&mem, "broken", &[], Duration::from_secs(60), now);
    mem.remove(&broken.nar);
    let with_broken = debug_link(&mem, 7, &broken.nar, 100 * DAY, now);
    let unreadable = format!("debuginfo/{}", hex::encode([5u8; 20]));
    mem.insert_at(&unreadable, "not a link", now - 100 * DAY);
    // Not a link's name: not the collector's to delete.
    mem.insert_at("debuginfo/README", "x", now - 100 * DAY);

    let s = gc(&mem, &cfg(), now, true).await;
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert_eq!(s.debuginfo.count, 2);
    assert!(!has(&mem, &expired.nar));
    for key in [&with_expired, &dangling] {
        assert!(!has(&mem, key), "{key} kept");
    }
    for key in [
        &with_kept,
        &uploading,
        &unreadable,
        &with_broken,
        &"debuginfo/README".to_owned(),
    ] {
        assert!(has(&mem, key), "{key} deleted");
    }

    // A link the store cannot read now is not taken for one naming nothing: the run stops
    // before deleting anything.
    let expired = path(&mem, "expired-2", &[], 100 * DAY, now);
    debug_link(&mem, 6, &expired.nar, 100 * DAY, now);
    mem.fail(FailOp::Read, &with_kept, 0, 1);
    let store: Arc<dyn Store> = mem.clone();
    let e = run(&store, "/nix/store", &cfg(), &applying(now), &Quiet)
        .await
        .unwrap_err();
    assert!(e.to_string().contains(&with_kept), "{e}");
    assert!(has(&mem, &expired.nar));
}

/// What is decided at the end of a run follows what the run kept meanwhile: the build log,
/// listing, NAR and realisation of a path a server used while the collector ran stay with
/// that path.
#[tokio::test(start_paused = true)]
async fn a_path_used_during_the_run_keeps_its_build_log() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let used = path(&mem, "used", &[], 100 * DAY, now);
    let other = path(&mem, "other", &[], 100 * DAY, now);
    let realisation = |p: &P| realisation_of(&mem, &p.base, 100 * DAY, now);
    let (used_realisation, other_realisation) = (realisation(&used), realisation(&other));
    let used_link = debug_link(&mem, 1, &used.nar, 100 * DAY, now);
    let other_link = debug_link(&mem, 2, &other.nar, 100 * DAY, now);
    let gate = mem.hold_reads(&format!("{}.narinfo", other.hash));
    let day = super::access::day(SystemTime::now());
    let cfg = cfg();
    let (s, ()) = tokio::join!(gc(&mem, &cfg, now, true), async {
        gate.reached().await;
        mem.insert(
            &format!("_cellar/access/{day}/p-9"),
            render([Entry::Path(used.hash.parse().unwrap())]),
        );
        gate.open();
    });
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert_eq!(
        (s.rescued, s.restored),
        (1, 0),
        "kept before it was deleted"
    );
    assert!(has(&mem, &format!("{}.narinfo", used.hash)));
    assert!(has(&mem, &format!("log/{}.drv", used.base)), "its log went");
    assert!(has(&mem, &format!("{}.ls", used.hash)), "its listing went");
    assert!(has(&mem, &used.nar), "its NAR went");
    assert!(has(&mem, &used_realisation), "its realisation went");
    assert!(has(&mem, &used_link), "its debug info link went");
    assert!(!has(&mem, &other_link));
    assert!(!has(&mem, &format!("log/{}.drv", other.base)));
    assert!(!has(&mem, &format!("{}.ls", other.hash)));
    assert!(!has(&mem, &other.nar));
    assert!(!has(&mem, &other_realisation));
}

/// A realisation whose output has no narinfo here (an upstream may serve it) is kept for the
/// retention, not deleted as soon as it is past the grace period.
#[tokio::test(start_paused = true)]
async fn a_realisation_of_a_path_not_here_is_kept_for_the_retention() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let realisation = |drv: &str| {
        let out = base32::encode(&Sha256::digest(drv.as_bytes()).as_bytes()[..20]);
        let id = format!(
            "sha256:{}!out",
            hex::encode(Sha256::digest(drv.as_bytes()).as_bytes())
        );
        (
            format!("realisations/{id}.doi"),
            format!(r#"{{"id":"{id}","outPath":"{out}-{drv}","signatures":[]}}"#),
        )
    };
    let (recent, body) = realisation("recent");
    mem.insert_at(&recent, body, now - 2 * DAY);
    let (old, body) = realisation("old");
    mem.insert_at(&old, body, now - 100 * DAY);
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert!(has(&mem, &recent), "deleted within the retention");
    assert!(!has(&mem, &old));
}

/// A narinfo `verify --repair` found missing a reference is kept, with its closure, if an
/// upload names it when the repair is about to delete: the missing reference may just have
/// been uploaded (below it: `upper` is broken only through `broken`), and the upload of a path
/// referring to it relies on it.
#[tokio::test(start_paused = true)]
async fn repair_keeps_a_broken_path_an_upload_names() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let missing = path(&mem, "missing", &[], 100 * DAY, now);
    let healed = path(&mem, "healed", &[&missing], 100 * DAY, now);
    let broken = path(&mem, "broken", &[&missing], 100 * DAY, now);
    // Broken only through `broken`, and named by the upload too.
    let upper = path(&mem, "upper", &[&broken], 100 * DAY, now);
    mem.remove(&format!("{}.narinfo", missing.hash));
    // An upload of a path referring to `healed` and `upper` records them while the repair
    // reads the narinfos; a client reads `broken` (a read protects nothing).
    let gate = mem.hold_reads(&format!("{}.narinfo", broken.hash));
    let day = super::access::day(SystemTime::now());
    let (r, ()) = tokio::join!(repair(&mem, now), async {
        gate.reached().await;
        mem.insert(
            &format!("_cellar/access/{day}/p-1-upload"),
            render([
                Entry::Path(healed.hash.parse().unwrap()),
                Entry::Path(upper.hash.parse().unwrap()),
            ]),
        );
        mem.insert(
            &format!("_cellar/access/{day}/p-2"),
            render([Entry::Path(broken.hash.parse().unwrap())]),
        );
        gate.open();
    });
    assert!(r.repair_errors.is_empty(), "{:?}", r.repair_errors);
    for p in [&healed, &upper] {
        assert!(
            has(&mem, &format!("{}.narinfo", p.hash)),
            "{:?}",
            r.repaired
        );
        assert!(has(&mem, &p.nar));
    }
    let mut relied_on = r.relied_on.clone();
    relied_on.sort();
    let mut want = vec![
        format!("{}.narinfo", healed.hash),
        format!("{}.narinfo", upper.hash),
        format!("{}.narinfo", broken.hash),
    ];
    want.sort();
    assert_eq!(relied_on, want);
    assert!(
        has(&mem, &format!("{}.narinfo", broken.hash)),
        "a path below one relied on was deleted"
    );
}

/// A run's announcement is renewed while it reads the store (which can take longer than an
/// announcement counts), and no longer once it deletes (a late renewal would replace the
/// announcement naming its NARs with one naming none).
#[tokio::test(start_paused = true)]
async fn an_announcement_is_renewed_while_the_run_reads_and_not_after() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mem = Arc::new(served_for_years());
    let writes = Arc::new(AtomicUsize::new(0));
    let w = writes.clone();
    mem.after_write("_cellar/deleting/", move |_| {
        w.fetch_add(1, Ordering::SeqCst);
    });
    let store: Arc<dyn Store> = mem.clone();
    let announced = super::deleting::Announced::begin(&store)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(writes.load(Ordering::SeqCst), 1);
    let half = super::deleting::FRESH / 2;
    tokio::time::sleep(half * 3 + Duration::from_secs(1)).await;
    assert_eq!(
        writes.load(Ordering::SeqCst),
        4,
        "renewed every half of FRESH"
    );
    let run = announced.into_run().await.unwrap().unwrap();
    assert_eq!(
        writes.load(Ordering::SeqCst),
        5,
        "written again as deletions begin"
    );
    tokio::time::sleep(half * 4 + Duration::from_secs(1)).await;
    assert_eq!(
        writes.load(Ordering::SeqCst),
        9,
        "renewed every half of FRESH while it deletes"
    );
    assert!(run.live());
    let key = run.key();
    assert!(has(&mem, &key));
    run.end().await;
    assert!(!has(&mem, &key), "withdrawn at the end");
    tokio::time::sleep(half * 4).await;
    assert_eq!(writes.load(Ordering::SeqCst), 9, "renewed after its end");
}

/// Odd objects a bucket gathers do not stop a collection: a "folder" marker under the pins
/// (an S3 console's "Create folder") is no pin, and an object under `realisations/` too large
/// to be one is kept unread.
#[tokio::test(start_paused = true)]
async fn folder_markers_and_oversized_realisations_do_not_stop_a_collection() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let expired = path(&mem, "expired", &[], 100 * DAY, now);
    mem.insert_at("_cellar/pins/", "", now - 100 * DAY);
    let huge = "realisations/sha256:aa!out.doi";
    mem.insert_at(huge, vec![b' '; 2 << 20], now - 100 * DAY);
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert!(!has(&mem, &format!("{}.narinfo", expired.hash)));
    assert!(has(&mem, huge));
    assert!(has(&mem, "_cellar/pins/"));
}

/// A repair that deletes for long (a bucket an expiry rule broke) keeps its announcement live
/// between chunks of deletions: another collector must not take it for a dead run's.
#[tokio::test(start_paused = true)]
async fn a_long_repair_keeps_its_announcement_live_while_it_deletes() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let broken: Vec<P> = (0..1100)
        .map(|i| path(&mem, &format!("broken-{i}"), &[], 100 * DAY, now))
        .collect();
    for p in &broken {
        mem.remove(&p.nar);
    }
    let first = format!("{}.narinfo", broken[0].hash);
    // Announcements written once the narinfos began to go.
    let while_deleting = Arc::new(AtomicUsize::new(0));
    let (m, w) = (mem.clone(), while_deleting.clone());
    mem.after_write("_cellar/deleting/", move |_| {
        let narinfos = m.keys().iter().filter(|k| k.ends_with(".narinfo")).count();
        if (1..1100).contains(&narinfos) {
            w.fetch_add(1, Ordering::SeqCst);
        }
    });
    // 16 deletions at a time, 3 s each: the first 1024 take over 3 minutes.
    mem.set_latency(Duration::from_secs(3));
    let r = repair(&mem, now).await;
    assert!(r.repair_errors.is_empty(), "{:?}", r.repair_errors);
    assert!(!has(&mem, &first));
    assert!(
        while_deleting.load(Ordering::SeqCst) >= 1,
        "not renewed while deleting"
    );
}

/// A narinfo stored with a `Content-Encoding` it does not decode from (here: plain text that
/// says it is Brotli): `verify` reports it, naming the encoding, and goes on; `gc --apply` and
/// `verify --repair` delete nothing, since what it names (its NAR, its references) is unknown.
/// (One that decodes, as Nix's `narinfo-compression` writes it, is read as any other:
/// `an_encoded_narinfo_that_decodes_is_read_as_any_other`.)
#[tokio::test(start_paused = true)]
async fn an_encoded_narinfo_is_reported_and_nothing_is_deleted_by_it() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let dep = path(&mem, "dep", &[], 100 * DAY, now);
    let encoded = path(&mem, "encoded", &[&dep], 100 * DAY, now);
    let broken = path(&mem, "broken", &[], 100 * DAY, now);
    mem.remove(&broken.nar);
    mem.set_encoding(&format!("{}.narinfo", encoded.hash), "br");
    let before = mem.keys();
    let store: Arc<dyn Store> = mem.clone();
    let opts = applying(now);
    let Err(e) = run(&store, "/nix/store", &cfg(), &opts, &Quiet).await else {
        panic!("collected by a graph with an encoded narinfo");
    };
    assert!(e.to_string().contains("Content-Encoding br"), "{e}");
    let r = repair(&mem, now).await;
    assert!(
        r.findings
            .iter()
            .any(|f| f.to_string().contains("Content-Encoding br")),
        "{:?}",
        r.findings
    );
    assert!(
        r.repair_errors
            .iter()
            .any(|e| e.contains("nothing was repaired")),
        "{:?}",
        r.repair_errors
    );
    assert_eq!(mem.keys(), before, "deleted: {:?}", r.repaired);
}

/// A narinfo the store fails to read while it reads the others (a file the run's user may
/// not read): `verify` reports it by its key and checks every other path; `gc --apply` and
/// `verify --repair` delete nothing, since what it names is unknown. (Before, the first such
/// read stopped both runs with an error and no report.)
#[tokio::test(start_paused = true)]
async fn a_narinfo_that_cannot_be_read_is_reported_and_nothing_is_deleted_by_it() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let dep = path(&mem, "dep", &[], 100 * DAY, now);
    let unread = path(&mem, "unread", &[&dep], 100 * DAY, now);
    let broken = path(&mem, "broken", &[], 100 * DAY, now);
    mem.remove(&broken.nar);
    let key = format!("{}.narinfo", unread.hash);
    mem.fail(FailOp::Denied, &key, 0, usize::MAX);
    let before = mem.keys();
    let r = check(&mem, now, None).await;
    assert_eq!(
        found(&r),
        [
            format!("missing_nar {}.narinfo", broken.hash),
            format!("orphan_nar {}", unread.nar),
            format!("read_failed {key}"),
        ],
        "{:?}",
        r.findings
    );
    assert!(
        r.findings.iter().any(|f| f.to_string()
            == format!("read-failed {key}: {key}: Permission denied (a test fault)")),
        "{:?}",
        r.findings
    );
    let store: Arc<dyn Store> = mem.clone();
    let Err(e) = run(&store, "/nix/store", &cfg(), &applying(now), &Quiet).await else {
        panic!("collected by a graph with a narinfo it could not read");
    };
    assert!(e.to_string().contains("Permission denied"), "{e}");
    let r = repair(&mem, now).await;
    assert!(
        r.repair_errors
            .iter()
            .any(|e| e.contains("Permission denied") && e.contains("nothing was repaired")),
        "{:?}",
        r.repair_errors
    );
    assert_eq!(mem.keys(), before, "deleted: {:?}", r.repaired);
}

/// A run whose `store_dir` is not the servers' (a timer without the service's
/// `CELLAR_STORE_DIR`) reads every narinfo as one of another store: it deletes nothing, gc
/// nor repair, and says which key to check. (Taken for unparseable, each would have been
/// deleted by repair, and each NAR by gc.)
#[tokio::test(start_paused = true)]
async fn a_run_with_another_store_dir_deletes_nothing() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let dep = path(&mem, "dep", &[], 100 * DAY, now);
    let top = path(&mem, "top", &[&dep], 100 * DAY, now);
    let record = render([Entry::Path(top.hash.parse().unwrap())]);
    mem.insert_at("_cellar/access/x/p-1", record, now - 2 * DAY);
    let before = mem.keys();
    let store: Arc<dyn Store> = mem.clone();
    let Err(e) = run(&store, "/gnu/store", &cfg(), &applying(now), &Quiet).await else {
        panic!("collected with another store_dir");
    };
    assert!(e.to_string().contains("store_dir /gnu/store"), "{e}");
    let opts = repair_options(now, super::deleting::SETTLE);
    let r = super::verify::run(&store, "/gnu/store", &opts, &Quiet)
        .await
        .unwrap();
    assert!(
        r.repair_errors
            .iter()
            .any(|e| e.contains("store_dir") && e.contains("nothing was repaired")),
        "{:?}",
        r.repair_errors
    );
    assert_eq!(mem.keys(), before, "deleted: {:?}", r.repaired);
    // With the servers' store_dir, the same run keeps the used closure.
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert_eq!(mem.keys(), before);
}

/// An object under a narinfo's name too large to be one (no server serves it) is deleted by
/// gc and by repair without a copy to write back: read whole for one, it stopped every run.
#[tokio::test(start_paused = true)]
async fn an_oversized_narinfo_is_deleted_without_a_copy() {
    let now = SystemTime::now();
    let junk = format!("{}.narinfo", "0".repeat(32));
    let oversized = vec![b'x'; crate::nix::MAX_NARINFO_BYTES as usize + 1];
    let planted = || {
        let mem = Arc::new(served_for_years());
        mem.insert_at(&junk, oversized.clone(), now - 100 * DAY);
        mem
    };
    let mem = planted();
    // Read whole, it would have been kept as a copy to write back.
    let copied = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (weak, seen) = (Arc::downgrade(&mem), copied.clone());
    mem.after_write("_cellar/unfinished/", move |key| {
        let Some(m) = weak.upgrade() else { return };
        if m.bytes(key)
            .is_some_and(|b| b.len() as u64 > crate::nix::MAX_NARINFO_BYTES)
        {
            seen.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert!(!has(&mem, &junk), "kept by gc");
    assert!(
        !copied.load(std::sync::atomic::Ordering::SeqCst),
        "read whole"
    );
    // Reported for what it is, not as some other flaw.
    let r = check(&planted(), now, None).await;
    let said: Vec<String> = r.findings.iter().map(ToString::to_string).collect();
    let larger = format!("larger than {} bytes", crate::nix::MAX_NARINFO_BYTES);
    assert!(said.iter().any(|f| f.contains(&larger)), "{said:?}");
    let mem = planted();
    let r = repair(&mem, now).await;
    assert!(r.repair_errors.is_empty(), "{:?}", r.repair_errors);
    assert!(!has(&mem, &junk), "kept by repair");
}

/// A narinfo Nix cannot read but a client used (or a pin names) is kept, and so is what its
/// lines still name: its NAR and its references, not collected from under it.
#[tokio::test(start_paused = true)]
async fn a_kept_unparseable_narinfo_keeps_what_it_names() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let dep = path(&mem, "dep", &[], 100 * DAY, now);
    let top = path(&mem, "top", &[&dep], 100 * DAY, now);
    let key = format!("{}.narinfo", top.hash);
    let raw = String::from_utf8(
        mem.get_bytes(&key, 1 << 20)
            .await
            .unwrap()
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    mem.insert_at(&key, format!("{raw}CA: nonsense\n"), now - 100 * DAY);
    let record = render([Entry::Path(top.hash.parse().unwrap())]);
    mem.insert_at("_cellar/access/x/p-1", record, now - 2 * DAY);
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    for kept in [key, top.nar, format!("{}.narinfo", dep.hash), dep.nar] {
        assert!(has(&mem, &kept), "{kept} collected");
    }
}

/// Another run live by the time this one has read the store (its renewals failed for long, or
/// the machine slept): this one does not delete, and withdraws its announcement. The same for
/// `verify --repair`.
#[tokio::test(start_paused = true)]
async fn a_run_that_finds_another_live_once_it_has_read_does_not_delete() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let dep = path(&mem, "dep", &[], 100 * DAY, now);
    let broken = path(&mem, "broken", &[&dep], 100 * DAY, now);
    mem.remove(&broken.nar);
    let other = super::deleting::key("1767225599-ab12");
    let store: Arc<dyn Store> = mem.clone();
    let opts = applying(now);
    for repairing in [false, true] {
        let gate = mem.hold_reads(&format!("{}.narinfo", dep.hash));
        let collect = async {
            if repairing {
                let r = repair(&mem, now).await;
                assert!(
                    r.repair_errors
                        .iter()
                        .any(|e| e.contains("another collection is running")),
                    "{:?}",
                    r.repair_errors
                );
            } else {
                let Err(e) = run(&store, "/nix/store", &cfg(), &opts, &Quiet).await else {
                    panic!("deleted beside another run");
                };
                assert!(e.to_string().contains(&other), "{e}");
            }
        };
        let ((), ()) = tokio::join!(collect, async {
            gate.reached().await;
            mem.insert(&other, "cellar-deleting 1\n");
            gate.open();
        });
        for key in [
            format!("{}.narinfo", dep.hash),
            format!("{}.narinfo", broken.hash),
            dep.nar.clone(),
        ] {
            assert!(has(&mem, &key), "{key} deleted (repairing: {repairing})");
        }
        let ours = mem
            .keys()
            .into_iter()
            .filter(|k| k.starts_with("_cellar/deleting/") && *k != other)
            .count();
        assert_eq!(ours, 0, "its announcement stayed (repairing: {repairing})");
        mem.remove(&other);
    }
}

/// A run whose announcement could not be renewed for long (the store refusing its writes, or
/// the machine asleep) does not delete: another run may have started and ended meanwhile,
/// unseen. Its own writes working again by then change nothing.
#[tokio::test(start_paused = true)]
async fn a_run_whose_announcement_lapsed_does_not_delete() {
    let mem = Arc::new(served_for_years());
    let store: Arc<dyn Store> = mem.clone();
    let announced = super::deleting::Announced::begin(&store)
        .await
        .unwrap()
        .unwrap();
    // Every renewal within TTL fails (the first after half of FRESH, then one each
    // RENEW_RETRY).
    let d = super::deleting::TTL.saturating_sub(super::deleting::FRESH / 2);
    let renewals = 1 + (d.as_secs() / super::deleting::RENEW_RETRY.as_secs()) as usize;
    mem.fail(FailOp::Write, &announced.key(), 0, renewals);
    tokio::time::sleep(super::deleting::TTL).await;
    let Err(e) = announced.into_run().await else {
        panic!("went on to delete");
    };
    assert!(e.to_string().contains("nothing deleted"), "{e}");
    assert!(
        !mem.keys()
            .iter()
            .any(|k| k.starts_with("_cellar/deleting/")),
        "its announcement stayed"
    );
}

/// A run about to delete is not thrown away by a passing moment: a listing that fails once,
/// or the announcement of a run that is starting and withdraws on seeing this one.
#[tokio::test(start_paused = true)]
async fn a_run_about_to_delete_rides_out_a_passing_error_and_a_starter() {
    let mem = Arc::new(served_for_years());
    let store: Arc<dyn Store> = mem.clone();
    let announced = super::deleting::Announced::begin(&store)
        .await
        .unwrap()
        .unwrap();
    mem.fail(FailOp::List, "_cellar/deleting/", 0, 1);
    let starter = super::deleting::key("1767225599-ab12");
    mem.insert(&starter, "cellar-deleting 1\n");
    let m = mem.clone();
    let s = starter.clone();
    let (run, ()) = tokio::join!(announced.into_run(), async move {
        tokio::time::sleep(super::deleting::SETTLE / 2).await;
        m.remove(&s);
    });
    let run = run.unwrap().unwrap();
    assert!(has(&mem, &run.key()));
}

/// An announcement older than [`super::deleting::SETTLE`] is a run under way, not one starting:
/// a run about to delete stops at once, without waiting to look again.
#[tokio::test(start_paused = true)]
async fn a_run_about_to_delete_stops_at_once_for_a_run_under_way() {
    let mem = Arc::new(served_for_years());
    let store: Arc<dyn Store> = mem.clone();
    let announced = super::deleting::Announced::begin(&store)
        .await
        .unwrap()
        .unwrap();
    let other = super::deleting::key("1767225599-ab12");
    mem.insert_at(
        &other,
        "cellar-deleting 1\n",
        SystemTime::now() - Duration::from_secs(60),
    );
    let started = tokio::time::Instant::now();
    let busy = announced.into_run().await.unwrap();
    assert!(busy.is_err(), "ran beside another run");
    assert!(
        started.elapsed() < super::deleting::SETTLE,
        "waited {:?}",
        started.elapsed()
    );
}

/// The byte budget counts what is kept anyway (young paths, pins) first, and a closure that
/// fits to the byte stays. Each path is reported with why it stays or goes: a path used
/// recently is "used within the retention" even when a more recent path refers to it, and one
/// used within the retention but over the budget is "over gc.max_bytes", not "expired".
#[tokio::test(start_paused = true)]
async fn a_byte_budget_counts_young_paths_and_fits_to_the_byte() {
    use super::mark::Reason;
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    path(&mem, "young", &[], Duration::from_secs(60), now);
    let dep = path(&mem, "dep", &[], 50 * DAY, now);
    let recent = path(&mem, "recent", &[&dep], 50 * DAY, now);
    path(&mem, "expired", &[], 50 * DAY, now);
    for (p, age) in [(&recent, 1), (&dep, 2)] {
        mem.insert_at(
            &format!("_cellar/access/x/{}", p.hash),
            render([Entry::Path(p.hash.parse().unwrap())]),
            now - age * DAY,
        );
    }
    let count = |s: &super::Summary, r: Reason| s.paths.get(&r).map_or(0, |t| t.count);
    let bytes = |s: &super::Summary, r: Reason| s.paths.get(&r).map_or(0, |t| t.bytes);
    let all = gc(&mem, &cfg(), now, false).await;
    assert_eq!(count(&all, Reason::Young), 1);
    assert_eq!(count(&all, Reason::Recent), 2, "{:?}", all.paths);
    assert_eq!(count(&all, Reason::Expired), 1);
    let kept = bytes(&all, Reason::Young) + bytes(&all, Reason::Recent);
    let fits = gc(
        &mem,
        &GcConfig {
            max_bytes: Some(kept),
            ..cfg()
        },
        now,
        false,
    )
    .await;
    assert_eq!(count(&fits, Reason::Recent), 2, "{:?}", fits.paths);
    assert_eq!(count(&fits, Reason::OverBudget), 0);
    let short = gc(
        &mem,
        &GcConfig {
            max_bytes: Some(kept - 1),
            ..cfg()
        },
        now,
        false,
    )
    .await;
    assert_eq!(count(&short, Reason::Young), 1);
    assert_eq!(count(&short, Reason::OverBudget), 2, "{:?}", short.paths);
    assert_eq!(count(&short, Reason::Expired), 1);
}

/// Chains of paths (top refers to mid, mid to leaf) go referrers first, layer after layer,
/// whatever order their hashes put them in: a mid that cannot be deleted keeps its leaf, and
/// nothing is written back.
#[tokio::test(start_paused = true)]
async fn a_chain_goes_layer_after_layer_whatever_the_order_of_its_hashes() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let mut chains = Vec::new();
    for k in 0..8 {
        let leaf = path(&mem, &format!("leaf-{k}"), &[], 100 * DAY, now);
        let mid = path(&mem, &format!("mid-{k}"), &[&leaf], 100 * DAY, now);
        let top = path(&mem, &format!("top-{k}"), &[&mid], 100 * DAY, now);
        mem.fail(
            FailOp::Delete,
            &format!("{}.narinfo", mid.hash),
            0,
            usize::MAX,
        );
        chains.push((top, mid, leaf));
    }
    let s = gc(&mem, &cfg(), now, true).await;
    assert_eq!(s.errors.len(), 8, "{:?}", s.errors);
    assert_eq!(s.restored, 0, "a reference was deleted beside its referrer");
    for (top, mid, leaf) in &chains {
        assert!(
            !has(&mem, &format!("{}.narinfo", top.hash)),
            "{} stayed",
            top.base
        );
        for p in [mid, leaf] {
            assert!(has(&mem, &format!("{}.narinfo", p.hash)), "{} went", p.base);
        }
    }
}

/// A run deleting more NARs than one announcement names (64 batches of 64) names every NAR in
/// an announcement before it goes: each announcement covers the batches that follow it.
#[tokio::test(start_paused = true)]
async fn every_nar_a_long_run_deletes_was_announced() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let paths: Vec<P> = (0..4200)
        .map(|i| path(&mem, &format!("p-{i}"), &[], 100 * DAY, now))
        .collect();
    let named = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let (m, n) = (mem.clone(), named.clone());
    mem.after_write("_cellar/deleting/", move |key| {
        if let Some(body) = m.bytes(key) {
            let text = String::from_utf8_lossy(&body).into_owned();
            n.lock()
                .unwrap()
                .extend(text.lines().skip(1).map(str::to_owned));
        }
    });
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    let named = named.lock().unwrap();
    let unnamed: Vec<&str> = paths
        .iter()
        .map(|p| p.nar.trim_start_matches("nar/"))
        .filter(|f| !named.contains(*f))
        .collect();
    assert!(unnamed.is_empty(), "{} never announced", unnamed.len());
    assert!(!paths.iter().any(|p| has(&mem, &p.nar)));
}

/// A deletion phase (NARs, listings, logs, after the narinfos) that lasts far longer than an
/// announcement counts as fresh (a slow store) keeps the run's announcement live: it is written
/// again every `FRESH / 2` and a batch, whether the batch deletes NARs or only listings and logs.
#[tokio::test(start_paused = true)]
async fn a_long_deletion_phase_keeps_its_announcement_fresh() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    for i in 0..3000 {
        path(&mem, &format!("p-{i}"), &[], 100 * DAY, now);
    }
    // When the announcement was written once no narinfo was left.
    let writes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (m, w) = (mem.clone(), writes.clone());
    mem.after_write("_cellar/deleting/", move |_| {
        if !m.keys().iter().any(|k| k.ends_with(".narinfo")) {
            w.lock().unwrap().push(tokio::time::Instant::now());
        }
    });
    mem.set_latency(Duration::from_secs(2));
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    let mut writes = writes.lock().unwrap().clone();
    let phase = writes
        .last()
        .copied()
        .unwrap_or_else(tokio::time::Instant::now)
        - writes[0];
    assert!(
        phase > super::deleting::FRESH,
        "the phase took only {phase:?}"
    );
    writes.push(tokio::time::Instant::now());
    let longest = writes
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    assert!(
        longest < super::deleting::FRESH / 2 + Duration::from_secs(60),
        "the announcement went {longest:?} without being written ({} writes)",
        writes.len()
    );
}

/// `verify` without `--repair`.
async fn check(
    mem: &Arc<MemoryStore>,
    now: SystemTime,
    sample: Option<usize>,
) -> super::verify::Report {
    let opts = super::verify::Options {
        sample,
        ..verify_opts(now)
    };
    verify_as(mem, &opts).await
}

/// `verify` without `--repair`, over the whole store, with a grace period of a day.
fn verify_opts(now: SystemTime) -> super::verify::Options {
    super::verify::Options {
        hashes: false,
        repair: false,
        sample: None,
        grace: DAY,
        now,
        settle: super::deleting::SETTLE,
        stop: Default::default(),
        upstreams: None,
    }
}

async fn verify_as(mem: &Arc<MemoryStore>, opts: &super::verify::Options) -> super::verify::Report {
    let store: Arc<dyn Store> = mem.clone();
    super::verify::run(&store, "/nix/store", opts, &Quiet)
        .await
        .unwrap()
}

/// Each finding as `kind key`, sorted.
fn found(r: &super::verify::Report) -> Vec<String> {
    let mut v: Vec<String> = r
        .findings
        .iter()
        .map(|f| {
            let text = f.to_string();
            let key = text
                .split_whitespace()
                .nth(1)
                .unwrap_or("")
                .trim_end_matches(':');
            format!("{} {key}", f.kind())
        })
        .collect();
    v.sort();
    v
}

/// A realisation naming path `base`, written `age` ago.
fn realisation_of(store: &MemoryStore, base: &str, age: Duration, now: SystemTime) -> String {
    let id = format!(
        "sha256:{}!out",
        hex::encode(Sha256::digest(base.as_bytes()).as_bytes())
    );
    let key = format!("realisations/{id}.doi");
    let body = format!(r#"{{"id":"{id}","outPath":"{base}","signatures":[]}}"#);
    store.insert_at(&key, body, now - age);
    key
}

/// `verify` finds the realisations naming a path without a narinfo and the debug info links
/// naming a missing NAR (once older than the grace period: Nix writes a link before its
/// NAR), and those it cannot read; `--repair` deletes the first two, with those naming what
/// it deletes itself (a broken path, an orphan NAR), and leaves the unreadable to a human.
#[tokio::test(start_paused = true)]
async fn verify_finds_realisations_and_links_naming_nothing() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let old = 100 * DAY;
    let young = Duration::from_secs(60);
    let whole = path(&mem, "whole", &[], old, now);
    let whole_realisation = realisation_of(&mem, &whole.base, old, now);
    let whole_link = debug_link(&mem, 1, &whole.nar, old, now);
    let ghost = format!("{}-ghost", base32::encode(&[7u8; 20]));
    let dangling_realisation = realisation_of(&mem, &ghost, old, now);
    let nowhere = "nar/0000000000000000000000000000000000000000000000000000.nar.xz";
    let dangling_link = debug_link(&mem, 2, nowhere, old, now);
    // Young: maybe an upload in progress.
    let young_ghost = format!("{}-young", base32::encode(&[8u8; 20]));
    let young_realisation = realisation_of(&mem, &young_ghost, young, now);
    let young_link = debug_link(&mem, 3, nowhere, young, now);
    // A path whose NAR is gone: repair deletes it, and with it what names it.
    let broken = path(&mem, "broken", &[], old, now);
    mem.remove(&broken.nar);
    let broken_realisation = realisation_of(&mem, &broken.base, old, now);
    let o = path(&mem, "orphan", &[], old, now);
    mem.remove(&format!("{}.narinfo", o.hash));
    mem.remove(&format!("{}.ls", o.hash));
    let orphan_nar = o.nar;
    let orphan_link = debug_link(&mem, 4, &orphan_nar, old, now);
    let unreadable_realisation = "realisations/sha256:00!out.doi".to_owned();
    mem.insert_at(&unreadable_realisation, "{}", now - old);
    let unreadable_link = format!("debuginfo/{}", hex::encode([5u8; 20]));
    mem.insert_at(&unreadable_link, "not a link", now - old);
    let too_large = "realisations/sha256:01!out.doi".to_owned();
    let large = " ".repeat(crate::upload::MAX_REALISATION_BYTES as usize + 1);
    mem.insert_at(&too_large, large, now - old);
    // Another output's under this one's name (the server answers it 502).
    let misfiled = realisation_of(&mem, &whole.base, old, now).replace("!out", "!dev");
    mem.insert_at(&misfiled, mem.bytes(&whole_realisation).unwrap(), now - old);

    let r = check(&mem, now, None).await;
    assert_eq!(
        found(&r),
        vec![
            format!("dangling_debuginfo {dangling_link}"),
            format!("dangling_realisation {dangling_realisation}"),
            format!("missing_nar {}.narinfo", broken.hash),
            format!("orphan_nar {orphan_nar}"),
            format!("unreadable {unreadable_link}"),
            format!("unreadable {unreadable_realisation}"),
            format!("unreadable {too_large}"),
            format!("unreadable {misfiled}"),
        ]
    );
    assert!(
        r.findings
            .iter()
            .any(|f| f.to_string().contains("the realisation of another output")),
        "{:?}",
        r.findings
    );
    let text: Vec<String> = r.findings.iter().map(ToString::to_string).collect();
    assert!(
        text.contains(&format!(
            "dangling-realisation {dangling_realisation}: {} has no narinfo",
            &ghost[..32]
        )),
        "{text:?}"
    );
    assert!(
        text.contains(&format!(
            "dangling-debuginfo {dangling_link}: {nowhere} does not exist"
        )),
        "{text:?}"
    );
    assert!(
        text.contains(&format!(
            "unreadable {too_large}: larger than {} bytes",
            crate::upload::MAX_REALISATION_BYTES
        )),
        "{text:?}"
    );
    // A sample does not look at them.
    assert!(found(&check(&mem, now, Some(1)).await)
        .iter()
        .all(|f| !f.starts_with("dangling") && !f.starts_with("unreadable")));

    let r = repair(&mem, now).await;
    for key in [
        &dangling_realisation,
        &dangling_link,
        &broken_realisation,
        &orphan_link,
        &orphan_nar,
    ] {
        assert!(!has(&mem, key), "{key} kept");
        assert!(r.repaired.contains(key), "{key}: {:?}", r.repaired);
    }
    for key in [
        &whole_realisation,
        &whole_link,
        &whole.nar,
        &young_realisation,
        &young_link,
        &unreadable_realisation,
        &unreadable_link,
        &too_large,
        &misfiled,
    ] {
        assert!(has(&mem, key), "{key} deleted");
    }
    let mut errors = r.repair_errors.clone();
    errors.sort();
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert!(errors[0].starts_with(&format!("{unreadable_link}: not understood")));
    assert!(errors[1].starts_with(&format!("{unreadable_realisation}: not understood")));
    assert!(errors[2].starts_with(&format!("{too_large}: not understood")));
    assert!(errors[3].starts_with(&format!("{misfiled}: not understood")));
    assert_eq!(
        found(&check(&mem, now, None).await),
        vec![
            format!("unreadable {unreadable_link}"),
            format!("unreadable {unreadable_realisation}"),
            format!("unreadable {too_large}"),
            format!("unreadable {misfiled}"),
        ]
    );
}

/// Waits until a read reaches `gate`; fails (on the paused clock, at once when nothing else
/// runs) when none does.
async fn reach(gate: &crate::store::memory::ReadGate, what: &str) {
    tokio::time::timeout(Duration::from_secs(600), gate.reached())
        .await
        .unwrap_or_else(|_| panic!("never {what}"));
}

/// The listing is not a snapshot: a path or NAR uploaded after it (here while the realisation
/// and link naming them are read) is looked for again before `--repair` deletes what names
/// it, and what the store cannot answer for is kept.
#[tokio::test(start_paused = true)]
async fn repair_looks_again_before_deleting_a_realisation_or_link() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let late = format!("{}-late", base32::encode(&[9u8; 20]));
    let late_realisation = realisation_of(&mem, &late, 100 * DAY, now);
    let late_nar = "nar/1111111111111111111111111111111111111111111111111111.nar";
    let late_link = debug_link(&mem, 1, late_nar, 100 * DAY, now);
    let unsure = format!("{}-unsure", base32::encode(&[10u8; 20]));
    let unsure_realisation = realisation_of(&mem, &unsure, 100 * DAY, now);
    let unsure_narinfo = format!("{}.narinfo", &unsure[..32]);
    mem.fail(FailOp::Read, &unsure_narinfo, 0, 1);
    // Being uploaded again as the repair looks: the upload records name them.
    let inflight = format!("{}-inflight", base32::encode(&[11u8; 20]));
    let inflight_realisation = realisation_of(&mem, &inflight, 100 * DAY, now);
    let inflight_nar = "nar/2222222222222222222222222222222222222222222222222222.nar";
    let inflight_link = debug_link(&mem, 2, inflight_nar, 100 * DAY, now);
    let day = super::access::day(SystemTime::now());
    let gate = mem.hold_reads(&late_realisation);
    let path_looked_at = mem.hold_reads(&format!("{}.narinfo", &inflight[..32]));
    let nar_looked_at = mem.hold_reads(inflight_nar);
    let (r, ()) = tokio::join!(repair(&mem, now), async {
        reach(&gate, "read the realisation").await;
        mem.insert(&format!("{}.narinfo", &late[..32]), "uploaded since");
        mem.insert(late_nar, "uploaded since");
        gate.open();
        reach(&path_looked_at, "path looked at").await;
        let h = inflight[..32].parse().unwrap();
        mem.insert(
            &format!("_cellar/access/{day}/a-upload"),
            render([Entry::Path(h)]),
        );
        path_looked_at.open();
        reach(&nar_looked_at, "nar looked at").await;
        let f = inflight_nar.trim_start_matches("nar/").into();
        mem.insert(
            &format!("_cellar/access/{day}/b-upload"),
            render([Entry::Nar(f)]),
        );
        nar_looked_at.open();
    });
    assert!(has(&mem, &inflight_realisation), "{:?}", r.repaired);
    assert!(has(&mem, &inflight_link), "{:?}", r.repaired);
    assert!(has(&mem, &late_realisation), "{:?}", r.repaired);
    assert!(has(&mem, &late_link), "{:?}", r.repaired);
    assert!(has(&mem, &unsure_realisation), "{:?}", r.repaired);
    assert_eq!(r.repair_errors.len(), 1, "{:?}", r.repair_errors);
    assert!(
        r.repair_errors[0].contains(&unsure_narinfo)
            && r.repair_errors[0].contains(&unsure_realisation),
        "{:?}",
        r.repair_errors
    );
}

/// `verify` with `hashes` on.
async fn verify_hashing(
    mem: &Arc<MemoryStore>,
    now: SystemTime,
    repair: bool,
) -> super::verify::Report {
    let opts = super::verify::Options {
        hashes: true,
        repair,
        ..verify_opts(now)
    };
    verify_as(mem, &opts).await
}

/// With `hashes`, `verify` reads every NAR and checks it as the client does (its bytes against
/// `FileHash`, else decoded against `NarHash` and `NarSize`): a NAR of the right size whose
/// bytes changed (bit rot, an overwrite by another tool) is found, the paths above it cannot
/// be served whole, and `--repair` deletes them. A NAR that cannot be read is reported as not
/// hashed; one kept with a `Content-Encoding` or whose `FileHash` alone is off is not a finding.
#[tokio::test(start_paused = true)]
async fn verify_hashes_the_nars_when_asked() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let old = 100 * DAY;
    let nar = nar_headed;
    let whole = path_with(&mem, "whole", nar("whole"), &[], old, now);
    let rotten = path_with(&mem, "rotten", nar("rotten"), &[], old, now);
    let body = mem.bytes(&rotten.nar).unwrap();
    let mut flipped = body.to_vec();
    *flipped.last_mut().unwrap() ^= 1;
    mem.insert_at(&rotten.nar, flipped.clone(), now - old);
    let above = path_with(&mem, "above", nar("above"), &[&rotten], old, now);
    let narinfo_of = |p: &P| {
        let key = format!("{}.narinfo", p.hash);
        (
            key.clone(),
            String::from_utf8(mem.bytes(&key).unwrap().to_vec()).unwrap(),
        )
    };
    let wrong = Sha256::digest(b"other bytes");
    // A FileHash the NAR does not have, but it decodes to its NarHash: the client takes it.
    let refiled = path_with(&mem, "refiled", nar("refiled"), &[], old, now);
    let (key, text) = narinfo_of(&refiled);
    let text = text.replace("NarSize", &format!("FileHash: {wrong}\nNarSize"));
    mem.insert_at(&key, text, now - old);
    // As Nix writes them, with the FileHash of the bytes before they changed.
    let rotten_filed = path_with(&mem, "rotten-filed", nar("rotten-filed"), &[], old, now);
    let (key, text) = narinfo_of(&rotten_filed);
    let good = mem.bytes(&rotten_filed.nar).unwrap();
    let text = text.replace(
        "NarSize",
        &format!("FileHash: {}\nNarSize", Sha256::digest(&good)),
    );
    mem.insert_at(&key, text, now - old);
    let mut bad = good.to_vec();
    *bad.last_mut().unwrap() ^= 1;
    mem.insert_at(&rotten_filed.nar, bad, now - old);
    // The right NarHash, the wrong NarSize.
    let mis_sized = path_with(&mem, "mis-sized", nar("mis-sized"), &[], old, now);
    let (key, text) = narinfo_of(&mis_sized);
    let size = nar("mis-sized").len();
    let text = text.replace(
        &format!("NarSize: {size}\n"),
        &format!("NarSize: {}\n", size + 1),
    );
    mem.insert_at(&key, text, now - old);
    // Said to be xz, and not.
    let undecodable = path_with(&mem, "undecodable", nar("undecodable"), &[], old, now);
    let (key, text) = narinfo_of(&undecodable);
    mem.insert_at(&key, text.replace("none", "xz"), now - old);
    // xz without FileHash: decoded.
    let xz = path_with(&mem, "xz", nar("xz"), &[], old, now);
    let (key, text) = narinfo_of(&xz);
    mem.insert_at(&key, text.replace("none", "xz"), now - old);
    let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
    std::io::Write::write_all(&mut e, &nar("xz")).unwrap();
    mem.insert_at(&xz.nar, e.finish().unwrap(), now - old);
    // Kept with a Content-Encoding, which the client undoes before it checks: not checked.
    let encoded = path_with(&mem, "encoded", nar("encoded"), &[], old, now);
    mem.insert_at(&encoded.nar, b"gzip of it".to_vec(), now - old);
    mem.set_encoding(&encoded.nar, "gzip");
    // Its NAR cannot be read now: not checked, and said so.
    let unread = path_with(&mem, "unread", nar("unread"), &[], old, now);

    assert!(found(&check(&mem, now, None).await).is_empty());
    mem.fail(FailOp::Read, &unread.nar, 0, 1);
    let r = verify_hashing(&mem, now, false).await;
    assert_eq!(found(&r), {
        let mut v = vec![
            format!("nar_hash {}.narinfo", rotten.hash),
            format!("nar_hash {}.narinfo", rotten_filed.hash),
            format!("nar_hash {}.narinfo", mis_sized.hash),
            format!("nar_hash {}.narinfo", undecodable.hash),
            format!("unservable_reference {}.narinfo", above.hash),
        ];
        v.sort();
        v
    });
    assert_eq!(r.unhashed.len(), 1, "{:?}", r.unhashed);
    assert!(
        r.unhashed[0].starts_with(&format!("{}.narinfo: ", unread.hash)),
        "{:?}",
        r.unhashed
    );
    let text: Vec<String> = r.findings.iter().map(ToString::to_string).collect();
    let expected = format!(
        "nar-hash {}.narinfo: {} decodes to {}, NarHash says {}",
        rotten.hash,
        rotten.nar,
        Sha256::digest(&flipped),
        Sha256::digest(&body)
    );
    assert!(text.contains(&expected), "{text:?}");
    let expected = format!(
        "nar-hash {}.narinfo: {} decodes to {} bytes, NarSize says {}",
        mis_sized.hash,
        mis_sized.nar,
        size,
        size + 1
    );
    assert!(text.contains(&expected), "{text:?}");
    let prefix = format!(
        "nar-hash {}.narinfo: {} does not decode: ",
        undecodable.hash, undecodable.nar
    );
    assert!(text.iter().any(|t| t.starts_with(&prefix)), "{text:?}");

    // Repaired: what is broken goes, what is whole stays. The rotten NAR, uploaded again
    // while the check reads it, is looked at again before its narinfo goes.
    let mem2 = Arc::new(served_for_years());
    let healed = path_with(&mem2, "healed", nar("healed"), &[], old, now);
    let good = mem2.bytes(&healed.nar).unwrap();
    let mut bad = good.to_vec();
    *bad.last_mut().unwrap() ^= 1;
    mem2.insert_at(&healed.nar, bad, now - old);
    let gate = mem2.hold_reads(&healed.nar);
    let (r2, ()) = tokio::join!(verify_hashing(&mem2, now, true), async {
        reach(&gate, "read the NAR").await;
        mem2.insert(&healed.nar, good.clone());
        gate.open();
    });
    assert_eq!(
        found(&r2),
        vec![format!("nar_hash {}.narinfo", healed.hash)]
    );
    assert!(
        has(&mem2, &format!("{}.narinfo", healed.hash)),
        "{:?}",
        r2.repaired
    );

    let r = verify_hashing(&mem, now, true).await;
    assert!(r.repair_errors.is_empty(), "{:?}", r.repair_errors);
    for gone in [&rotten.hash, &above.hash, &undecodable.hash] {
        assert!(!has(&mem, &format!("{gone}.narinfo")), "{gone} kept");
    }
    assert!(!has(&mem, &rotten.nar));
    for kept in [&whole, &refiled, &xz, &unread, &encoded] {
        assert!(
            has(&mem, &format!("{}.narinfo", kept.hash)),
            "{} went",
            kept.base
        );
        assert!(has(&mem, &kept.nar), "{} went", kept.nar);
    }
    let r = verify_hashing(&mem, now, false).await;
    assert!(found(&r).is_empty() && r.unhashed.is_empty(), "{r:?}");
}

/// Orphan NARs and listings, and unfinished uploads, are findings once older than the grace
/// period (younger, they may be an upload in progress); `--repair` deletes those, a broken
/// path with its listing and the paths above it, and leaves what is whole or young.
#[tokio::test(start_paused = true)]
async fn verify_finds_and_repairs_what_is_past_the_grace_period_only() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let ok = path(&mem, "ok", &[], 100 * DAY, now);
    let (old_nar, _) = orphan(&mem, "old", now);
    let old = path(&mem, "old", &[], 100 * DAY, now);
    mem.remove(&format!("{}.narinfo", old.hash));
    let young = path(&mem, "young", &[], Duration::from_secs(3600), now);
    mem.remove(&format!("{}.narinfo", young.hash));
    let broken = path(&mem, "broken", &[], 100 * DAY, now);
    mem.remove(&broken.nar);
    let above = path(&mem, "above", &[&broken], 100 * DAY, now);
    mem.leave_staged("staging/abandoned");

    let r = check(&mem, now, None).await;
    let n = |h: &str| format!("{h}.narinfo");
    let mut expected = vec![
        format!("missing_nar {}", n(&broken.hash)),
        format!("unservable_reference {}", n(&above.hash)),
        format!("orphan_nar {old_nar}"),
        format!("orphan_listing {}.ls", old.hash),
        "unfinished_upload staging/abandoned".to_owned(),
    ];
    expected.sort();
    assert_eq!(found(&r), expected);

    let r = repair(&mem, now).await;
    assert!(r.repair_errors.is_empty(), "{:?}", r.repair_errors);
    assert!(
        r.repaired.iter().any(|k| k == "1 unfinished upload(s)"),
        "{:?}",
        r.repaired
    );
    for gone in [
        n(&broken.hash),
        n(&above.hash),
        format!("{}.ls", broken.hash),
        format!("{}.ls", above.hash),
        above.nar.clone(),
        old_nar,
        format!("{}.ls", old.hash),
    ] {
        assert!(!has(&mem, &gone), "{gone} stayed");
    }
    for kept in [
        n(&ok.hash),
        ok.nar.clone(),
        format!("{}.ls", ok.hash),
        young.nar.clone(),
        format!("{}.ls", young.hash),
    ] {
        assert!(has(&mem, &kept), "{kept} went");
    }
    assert!(check(&mem, now, None).await.findings.is_empty());
}

/// A path whose NAR is not the size its narinfo gives is a finding, confirmed by a second
/// look and repaired, down to a narinfo exactly as old as the grace period.
#[tokio::test(start_paused = true)]
async fn a_nar_of_another_size_is_found_and_repaired() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let sized = |seed: &str, file_size: usize, age: Duration| {
        let p = path(&mem, seed, &[], age, now);
        let key = format!("{}.narinfo", p.hash);
        let text = String::from_utf8(mem.bytes(&key).unwrap().to_vec()).unwrap();
        mem.insert_at(&key, format!("{text}FileSize: {file_size}\n"), now - age);
        p
    };
    let right = sized("right", "nar of right".len(), 100 * DAY);
    let wrong = sized("wrong", 999, DAY);
    let r = check(&mem, now, None).await;
    assert_eq!(found(&r), vec![format!("nar_size {}.narinfo", wrong.hash)]);
    let r = repair(&mem, now).await;
    assert!(r.repair_errors.is_empty(), "{:?}", r.repair_errors);
    assert!(
        !r.repaired.iter().any(|k| k.contains("unfinished")),
        "none left: {:?}",
        r.repaired
    );
    assert!(!has(&mem, &format!("{}.narinfo", wrong.hash)));
    assert!(has(&mem, &format!("{}.narinfo", right.hash)));
}

/// A sample of at least every narinfo is a full check (orphans included); a smaller one does
/// not take the references it did not draw for missing ones.
#[tokio::test(start_paused = true)]
async fn samples_check_what_they_draw_and_no_more() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let low = path(&mem, "low", &[], 100 * DAY, now);
    let _top = path(&mem, "top", &[&low], 100 * DAY, now);
    let (orphan_nar, _) = orphan(&mem, "orphan", now);
    let r = check(&mem, now, Some(2)).await;
    assert_eq!(r.narinfos_checked, 2);
    assert!(
        found(&r).contains(&format!("orphan_nar {orphan_nar}")),
        "{:?}",
        found(&r)
    );
    for _ in 0..10 {
        let r = check(&mem, now, Some(1)).await;
        assert_eq!(r.narinfos_checked, 1);
        assert!(r.findings.is_empty(), "{:?}", found(&r));
    }
}

/// A repair deletes the NARs it announced however long it took to get there, as long as its
/// announcement was kept live; once the store refused its renewals for long enough that
/// another collector could start, it deletes nothing more.
#[tokio::test(start_paused = true)]
async fn a_repair_deletes_only_while_its_announcement_is_live() {
    let ttl = super::deleting::TTL;
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let (nar, file) = orphan(&mem, "orphan", now);
    // Slower than an announcement lasts, renewed meanwhile: deleted.
    let r = repair_settling(&mem, now, ttl + Duration::from_secs(1)).await;
    assert!(r.repair_errors.is_empty(), "{:?}", r.repair_errors);
    assert!(!has(&mem, &nar));

    let (nar, file2) = orphan(&mem, "orphan-2", now);
    assert_ne!(file, file2);
    // Deleted after the NARs, if at all.
    mem.insert_at("_cellar/access/x/garbage", "nonsense", now - 100 * DAY);
    fail_renewals_once_named(&mem, file2);
    let r = repair_settling(&mem, now, ttl).await;
    assert!(
        r.repair_errors
            .iter()
            .any(|e| e.contains("could not be kept live")),
        "{:?}",
        r.repair_errors
    );
    assert!(has(&mem, &nar), "deleted under a lapsed announcement");
    assert!(
        has(&mem, "_cellar/access/x/garbage"),
        "deleted after the lapse"
    );
}

/// A reference the store lacks but an upstream serves is not missing (the server accepted
/// the upload on top of it and serves it through); one nobody serves is.
#[tokio::test]
async fn references_an_upstream_serves_are_not_missing() {
    let elsewhere = served_for_years();
    let now = SystemTime::now();
    let served = path(&elsewhere, "served", &[], 100 * DAY, now);
    let nowhere = path(&elsewhere, "nowhere", &[], 100 * DAY, now);
    // Named by a realisation only.
    let realised = path(&elsewhere, "realised", &[], 100 * DAY, now);
    let key = crate::nix::SecretKey::generate("upstream-1").unwrap();
    let mut app = axum::Router::new();
    for p in [&served, &realised] {
        let raw = elsewhere.bytes(&format!("{}.narinfo", p.hash)).unwrap();
        let mut info =
            crate::nix::NarInfo::parse(std::str::from_utf8(&raw).unwrap(), "/nix/store").unwrap();
        info.sign(&key, "/nix/store");
        let text = info.render("/nix/store");
        app = app.route(
            &format!("/{}.narinfo", p.hash),
            axum::routing::get(move || async move { text.clone() }),
        );
    }
    let upstreams = crate::upstream::serving(app, vec![key.public()]).await;

    let mem = Arc::new(served_for_years());
    let top = path(&mem, "top", &[&served, &nowhere], 100 * DAY, now);
    // So with realisations: the server accepts one of a path an upstream serves.
    let kept = realisation_of(&mem, &realised.base, 100 * DAY, now);
    let dangling = realisation_of(&mem, &nowhere.base, 100 * DAY, now);
    let store: Arc<dyn Store> = mem.clone();
    let opts = super::verify::Options {
        hashes: false,
        repair: false,
        sample: None,
        grace: DAY,
        now,
        settle: super::deleting::SETTLE,
        stop: Default::default(),
        upstreams: Some(Arc::new(upstreams)),
    };
    let r = super::verify::run(&store, "/nix/store", &opts, &Quiet)
        .await
        .unwrap();
    assert_eq!(r.on_upstreams, 2);
    assert_eq!(
        found(&r),
        vec![
            format!("dangling_realisation {dangling}"),
            format!("missing_reference {}.narinfo", top.hash)
        ]
    );
    assert!(
        r.findings[1].to_string().contains(&nowhere.hash),
        "{}",
        r.findings[1]
    );
    let repairing = super::verify::Options {
        hashes: false,
        repair: true,
        settle: Duration::ZERO,
        ..opts
    };
    let r = super::verify::run(&store, "/nix/store", &repairing, &Quiet)
        .await
        .unwrap();
    assert!(r.repair_errors.is_empty(), "{:?}", r.repair_errors);
    assert!(!has(&mem, &dangling));
    assert!(
        has(&mem, &kept),
        "a realisation of a path an upstream serves went"
    );
}

/// A reference the store lacks while an upstream cannot answer (failing, or refusing the
/// credentials in its URL) stops `verify` before anything is taken for missing, saying which
/// path it asked for: a repair must not delete what that upstream may serve.
#[tokio::test]
async fn an_upstream_that_cannot_answer_stops_verify_naming_the_path() {
    let elsewhere = served_for_years();
    let now = SystemTime::now();
    let missing = path(&elsewhere, "missing", &[], 100 * DAY, now);
    let key = crate::nix::SecretKey::generate("upstream-1").unwrap();
    let app =
        axum::Router::new().fallback(|| async { axum::http::StatusCode::SERVICE_UNAVAILABLE });
    let upstreams = crate::upstream::serving(app, vec![key.public()]).await;
    let mem = Arc::new(served_for_years());
    let top = path(&mem, "top", &[&missing], 100 * DAY, now);
    let store: Arc<dyn Store> = mem.clone();
    let opts = super::verify::Options {
        hashes: false,
        repair: true,
        sample: None,
        grace: DAY,
        now,
        settle: Duration::ZERO,
        stop: Default::default(),
        upstreams: Some(Arc::new(upstreams)),
    };
    let e = super::verify::run(&store, "/nix/store", &opts, &Quiet)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, crate::store::StoreError::UpstreamDown(m) if m.contains(&format!("{}.narinfo", missing.hash))),
        "{e}"
    );
    assert!(has(&mem, &format!("{}.narinfo", top.hash)));
}

/// A narinfo Nix's S3 store wrote compressed (`narinfo-compression=xz`, `Content-Encoding: xz`)
/// is read decoded: a collection runs (it stops at a narinfo it cannot read) and deletes
/// nothing of these young paths, and `verify` finds nothing wrong.
#[tokio::test(start_paused = true)]
async fn an_encoded_narinfo_that_decodes_is_read_as_any_other() {
    use std::io::Write as _;
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let dep = path(&mem, "dep", &[], DAY, now);
    let top = path(&mem, "top", &[&dep], DAY, now);
    let key = format!("{}.narinfo", top.hash);
    let plain = mem.bytes(&key).unwrap();
    let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 6);
    xz.write_all(&plain).unwrap();
    mem.insert(&key, xz.finish().unwrap());
    mem.set_encoding(&key, "xz");
    let before = mem.keys();
    let store: Arc<dyn Store> = mem.clone();
    let opts = applying(now);
    let report = run(&store, "/nix/store", &cfg(), &opts, &Quiet)
        .await
        .unwrap();
    assert_eq!(mem.keys(), before, "{report:?}");
    let r = repair(&mem, now).await;
    assert!(r.findings.is_empty(), "{:?}", r.findings);
}

/// The dead run's announcement lapsed (as it does after `deleting::TTL`): removed.
fn announcements_lapse(mem: &MemoryStore) {
    for k in mem.keys() {
        if k.starts_with("_cellar/deleting/") {
            mem.remove(&k);
        }
    }
}

fn unfinished_files(mem: &MemoryStore) -> Vec<String> {
    mem.keys()
        .into_iter()
        .filter(|k| k.starts_with("_cellar/unfinished/"))
        .collect()
}

/// Runs `then` on the store when `key` is deleted, then fires the receiver: with
/// [`killed_when`], a run cut off right there. Every store call takes a moment from then on,
/// so that the run can be cut off between two of them.
fn on_deletion_of(
    mem: &Arc<MemoryStore>,
    key: &str,
    then: impl Fn(&MemoryStore) + Send + Sync + 'static,
) -> tokio::sync::oneshot::Receiver<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = std::sync::Mutex::new(Some(tx));
    let weak = Arc::downgrade(mem);
    mem.after_delete(key, move |_| {
        let Some(mem) = weak.upgrade() else { return };
        then(&mem);
        if let Some(tx) = tx.lock().unwrap().take() {
            let _ = tx.send(());
        }
    });
    mem.set_latency(Duration::from_millis(1));
    rx
}

/// Runs `deleting` until `cut` fires, then drops it: a run killed at that moment.
async fn killed_when<T>(
    deleting: impl std::future::Future<Output = T>,
    cut: tokio::sync::oneshot::Receiver<()>,
) {
    tokio::select! {
        _ = deleting => panic!("the run ended before it was cut off"),
        _ = cut => {}
    }
}

/// A collection that dies between deleting a batch and reading the access records again
/// (killed, a power cut) leaves the copies of that batch in the store, and the next run that
/// deletes writes back what of it is missing and whole before it lists anything: a path an
/// upload wrote meanwhile, relying on one of them, gets it back. Before, the copies died with
/// the run, and the path was left without its reference for good.
#[tokio::test(start_paused = true)]
async fn a_collection_killed_while_deleting_is_settled_by_the_next_run() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let x = path(&mem, "x", &[], 100 * DAY, now);
    let other = path(&mem, "other", &[], 100 * DAY, now);
    let x_key = format!("{}.narinfo", x.hash);
    // As X goes, a builder uploads P, which refers to X, through a server: its record (which
    // names X), then its narinfo. The run is cut off right after.
    let x_base = x.base.clone();
    let rx = on_deletion_of(&mem, &x_key, move |mem| {
        let p_hash = base32::encode(&Sha256::digest(b"p").as_bytes()[..20]);
        let day = super::access::day(SystemTime::now());
        mem.insert(
            &format!("_cellar/access/{day}/p-upload"),
            render([
                Entry::Path(p_hash.parse().unwrap()),
                Entry::Path(x_base[..32].parse().unwrap()),
            ]),
        );
        let nar = b"nar of p";
        let file = Sha256::digest(nar).to_nix32();
        mem.insert(&format!("nar/{file}.nar"), nar.to_vec());
        mem.insert(
            &format!("{p_hash}.narinfo"),
            format!(
                "StorePath: /nix/store/{p_hash}-p\nURL: nar/{file}.nar\nCompression: none\nNarHash: sha256:{file}\nNarSize: 8\nReferences: {x_base}\n"
            ),
        );
    });
    let store: Arc<dyn Store> = mem.clone();
    let (config, opts) = (cfg(), applying(now));
    let first = run(&store, "/nix/store", &config, &opts, &Quiet);
    killed_when(first, rx).await;
    assert!(!has(&mem, &x_key), "X was not deleted before the cut");
    assert_eq!(unfinished_files(&mem).len(), 1, "{:?}", mem.keys());
    announcements_lapse(&mem);
    // `cellar verify` says what explains P's missing reference meanwhile.
    let checked = super::verify::run(&store, "/nix/store", &verify_opts(now), &Quiet)
        .await
        .unwrap();
    assert!(
        checked
            .unfinished
            .iter()
            .any(|l| l.contains("the next `gc --apply`")),
        "{:?}",
        checked.unfinished
    );

    let s = gc(&mem, &cfg(), now, true).await;
    assert!(has(&mem, &x_key), "X not written back: {:?}", s.unfinished);
    assert!(has(&mem, &x.nar), "X's NAR went");
    assert!(
        s.unfinished
            .iter()
            .any(|l| l.starts_with(&format!("wrote back {x_key}"))),
        "{:?}",
        s.unfinished
    );
    // Nobody used the other one since: it stays deleted, as the dead run meant (and its NAR
    // goes with this run).
    assert!(!has(&mem, &format!("{}.narinfo", other.hash)));
    assert!(
        s.unfinished
            .iter()
            .any(|l| l.contains("nobody used them since")),
        "{:?}",
        s.unfinished
    );
    assert!(unfinished_files(&mem).is_empty(), "{:?}", mem.keys());
}

/// A run settles its batch before it deletes the next one: nothing is left behind by a run
/// that ends, whether it deleted everything or stopped on an error.
#[tokio::test(start_paused = true)]
async fn a_run_that_ends_leaves_no_copies() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let paths: Vec<P> = (0..super::sweep::BATCH + 3)
        .map(|i| path(&mem, &format!("p{i}"), &[], 100 * DAY, now))
        .collect();
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert_eq!(s.deleted_narinfos, Some(paths.len()));
    assert!(unfinished_files(&mem).is_empty(), "{:?}", mem.keys());
}

/// What a run that died while deleting `p` leaves: the copy of its narinfo (the batch of run
/// `run`), and the narinfo gone. Returns the narinfo's key.
async fn died_deleting(mem: &MemoryStore, run: &str, p: &P) -> String {
    let key = format!("{}.narinfo", p.hash);
    let body = mem.bytes(&key).unwrap();
    super::unfinished::record(mem, run, [(p.hash.parse().unwrap(), &body)])
        .await
        .unwrap();
    mem.remove(&key);
    key
}

/// A dead run last read the records before it wrote its batch's copies, by as long as reading
/// that batch took (a store timing out, a pause): an upload's record dated half an hour before
/// the copies, which that run never saw, still has what it names written back.
#[tokio::test(start_paused = true)]
async fn a_dead_runs_batch_is_settled_by_records_from_well_before_it() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let x = path(&mem, "x", &[], 100 * DAY, now);
    let x_key = died_deleting(&mem, "1767225599-dead", &x).await;
    let t = SystemTime::now() - Duration::from_secs(30 * 60);
    let dated = format!(
        "_cellar/access/{}/{}-0123456789ab-00000001-upload",
        super::access::day(t),
        super::access::time_of_day(t)
    );
    mem.insert_at(&dated, render([Entry::Path(x.hash.parse().unwrap())]), t);
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(has(&mem, &x_key), "X not written back: {:?}", s.unfinished);
}

/// What a dead run left is written back only if used since (named by an access record, or
/// needed by one that is), and whole: a copy whose NAR is gone, or whose reference is not
/// back, stays out; a path uploaded again since keeps the upload's narinfo; references go
/// back before their referrers. `verify --repair` settles it too.
#[tokio::test(start_paused = true)]
async fn copies_left_by_a_dead_run_are_written_back_only_whole() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let b = path(&mem, "b", &[], 100 * DAY, now);
    // A referrer whose name sorts before its reference's.
    let seed = (0..)
        .map(|i| format!("a{i}"))
        .find(|s| base32::encode(&Sha256::digest(s.as_bytes()).as_bytes()[..20]) < b.hash)
        .unwrap();
    let a = path(&mem, &seed, &[&b], 100 * DAY, now);
    let c = path(&mem, "c", &[], 100 * DAY, now);
    let e = path(&mem, "e", &[&c], 100 * DAY, now);
    let d = path(&mem, "d", &[], 100 * DAY, now);
    let key = |p: &P| format!("{}.narinfo", p.hash);
    let copies: Vec<(crate::nix::StorePathHash, bytes::Bytes)> = [&a, &b, &c, &d, &e]
        .iter()
        .map(|p| (p.hash.parse().unwrap(), mem.bytes(&key(p)).unwrap()))
        .collect();
    super::unfinished::record(
        mem.as_ref(),
        "1767225599-dead",
        copies.iter().map(|(h, body)| (*h, body)),
    )
    .await
    .unwrap();
    for p in [&a, &b, &c, &e] {
        mem.remove(&key(p));
    }
    mem.remove(&c.nar);
    mem.insert(&key(&d), "uploaded again");
    // Used since: A (and so B, which it needs), C and E; not G.
    let g = path(&mem, "g", &[], 100 * DAY, now);
    died_deleting(&mem, "1767225599-dead2", &g).await;
    let day = super::access::day(SystemTime::now());
    mem.insert(
        &format!("_cellar/access/{day}/since"),
        render(
            [&a, &c, &e]
                .iter()
                .map(|p| Entry::Path(p.hash.parse().unwrap())),
        ),
    );
    // And a broken path the repair deletes (keeping copies while it does).
    let f = path(&mem, "f", &[], 100 * DAY, now);
    mem.remove(&f.nar);
    let b_first = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (seen, weak, b_key) = (b_first.clone(), Arc::downgrade(&mem), key(&b));
    mem.after_write(&key(&a), move |_| {
        if let Some(mem) = weak.upgrade() {
            seen.store(has(&mem, &b_key), std::sync::atomic::Ordering::SeqCst);
        }
    });
    let r = repair(&mem, now).await;
    assert!(
        has(&mem, &key(&a)) && has(&mem, &key(&b)),
        "{:?}",
        r.unfinished
    );
    assert!(
        b_first.load(std::sync::atomic::Ordering::SeqCst),
        "A written back before its reference"
    );
    assert!(!has(&mem, &key(&c)), "written back without its NAR");
    assert!(!has(&mem, &key(&e)), "written back without its reference");
    assert!(!has(&mem, &key(&g)), "written back, though nobody used it");
    assert_eq!(mem.bytes(&key(&d)).as_deref(), Some(&b"uploaded again"[..]));
    assert!(r.repaired.contains(&key(&f)), "{:?}", r.repaired);
    for why in ["its NAR", "its reference"] {
        assert!(
            r.unfinished.iter().any(|l| l.contains(why)),
            "{why}: {:?}",
            r.unfinished
        );
    }
    assert!(unfinished_files(&mem).is_empty(), "{:?}", mem.keys());
}

/// A run that died days ago: what was used since it began deleting counts, not only the last
/// day's records.
#[tokio::test(start_paused = true)]
async fn copies_of_a_run_that_died_days_ago_count_every_use_since() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let g = path(&mem, "g", &[], 100 * DAY, now);
    let key = died_deleting(&mem, "1767225599-dead", &g).await;
    let [file] = &unfinished_files(&mem)[..] else {
        panic!("{:?}", mem.keys())
    };
    mem.insert_at(file, mem.bytes(file).unwrap(), now - 3 * DAY);
    let two_days_ago = now - 2 * DAY;
    mem.insert_at(
        &format!("_cellar/access/{}/since", super::access::day(two_days_ago)),
        render([Entry::Path(g.hash.parse().unwrap())]),
        two_days_ago,
    );
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(has(&mem, &key), "not written back: {:?}", s.unfinished);
}

/// A damaged upload record among those written since (which only `verify --repair` removes)
/// does not keep a dead run's copies from being settled: every whole one is written back.
#[tokio::test(start_paused = true)]
async fn copies_are_settled_whole_when_the_records_since_cannot_be_read() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let g = path(&mem, "g", &[], 100 * DAY, now);
    let key = died_deleting(&mem, "1767225599-dead", &g).await;
    let day = super::access::day(SystemTime::now());
    mem.insert(&format!("_cellar/access/{day}/x-upload"), "not a record\n");
    let r = repair(&mem, now).await;
    assert!(has(&mem, &key), "{:?} {:?}", r.unfinished, r.repair_errors);
    assert!(
        r.unfinished
            .iter()
            .any(|l| l.contains("could not all be read")),
        "{:?}",
        r.unfinished
    );
    assert!(unfinished_files(&mem).is_empty());
}

/// `verify --repair` killed while it deletes broken narinfos leaves copies too: one an upload
/// healed and relied on meanwhile is written back by the next run.
#[tokio::test(start_paused = true)]
async fn a_repair_killed_while_deleting_is_settled_by_the_next_run() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let m = path(&mem, "m", &[], 100 * DAY, now);
    let m_key = format!("{}.narinfo", m.hash);
    let m_narinfo = mem.bytes(&m_key).unwrap();
    mem.remove(&m_key);
    let x = path(&mem, "x", &[&m], 100 * DAY, now);
    let x_key = format!("{}.narinfo", x.hash);
    // As X goes, M is uploaded again (which heals X), and an upload of Y relies on X.
    let xh: crate::nix::StorePathHash = x.hash.parse().unwrap();
    let rx = on_deletion_of(&mem, &x_key, move |mem| {
        mem.insert(&m_key, m_narinfo.clone());
        let day = super::access::day(SystemTime::now());
        mem.insert(
            &format!("_cellar/access/{day}/y-upload"),
            render([Entry::Path(xh)]),
        );
    });
    let store: Arc<dyn Store> = mem.clone();
    let opts = repair_options(now, super::deleting::SETTLE);
    killed_when(super::verify::run(&store, "/nix/store", &opts, &Quiet), rx).await;
    assert!(!has(&mem, &x_key), "X was not deleted before the cut");
    announcements_lapse(&mem);
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(has(&mem, &x_key), "X not written back: {:?}", s.unfinished);
    assert!(has(&mem, &x.nar) && has(&mem, &m.nar));
}

/// A NAR's digest record (written by uploads, see `crate::upload::nar_records`) goes with its
/// NAR, and once its NAR has been gone for the grace period (it is written while its NAR is
/// committed); the record of a kept NAR stays, and `verify` reports none of them.
#[tokio::test(start_paused = true)]
async fn nar_digest_records_go_with_their_nars() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let record = |nar: &str, age: Duration| digest_record(&mem, nar, age, now);
    let kept = path(&mem, "kept", &[], Duration::from_secs(60), now);
    let expired = path(&mem, "expired", &[], 100 * DAY, now);
    let nowhere = "nar/0000000000000000000000000000000000000000000000000000.nar.zst";
    let nowhere_young = "nar/1111111111111111111111111111111111111111111111111111.nar.zst";
    let with_kept = record(&kept.nar, 100 * DAY);
    let with_expired = record(&expired.nar, 100 * DAY);
    let gone = record(nowhere, 2 * DAY);
    let arriving = record(nowhere_young, Duration::from_secs(60));

    let r = verify_as(&mem, &verify_opts(now)).await;
    assert!(r.findings.is_empty(), "{:?}", found(&r));

    let s = gc(&mem, &cfg(), now, false).await;
    assert_eq!(s.nar_digests.count, 2);
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert_eq!(
        s.deleted_objects.as_ref().and_then(|d| d.get("nar_digest")),
        Some(&2)
    );
    assert!(!has(&mem, &expired.nar));
    for key in [&with_expired, &gone] {
        assert!(!has(&mem, key), "{key} kept");
    }
    for key in [&with_kept, &arriving] {
        assert!(has(&mem, key), "{key} deleted");
    }
}

/// The digest record of a NAR an upload under way names stays, its NAR missing and the record
/// past the grace period: the NAR may be on its way.
#[tokio::test(start_paused = true)]
async fn a_nar_digest_record_an_upload_names_stays() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let file = "2222222222222222222222222222222222222222222222222222.nar.zst";
    let key = digest_record(&mem, &format!("nar/{file}"), 2 * DAY, now);
    write_upload_record(&mem, "uploading", file.into());
    assert_eq!(gc(&mem, &cfg(), now, false).await.nar_digests.count, 0);
    let s = gc(&mem, &cfg(), now, true).await;
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert!(has(&mem, &key), "deleted");
}

/// `verify --repair` deletes the digest records of the NARs it deletes, and of those
/// `--hashes` finds are not what their narinfo says, even one too young to be deleted (an
/// upload's narinfo check would take it for its file); the record of a good NAR stays.
#[tokio::test(start_paused = true)]
async fn verify_repair_deletes_the_digest_records_of_what_it_finds_bad_or_deletes() {
    let mem = Arc::new(served_for_years());
    let now = SystemTime::now();
    let old = 100 * DAY;
    let nar = nar_headed;
    let record = |p: &str| digest_record(&mem, p, old, now);
    let whole = path_with(&mem, "whole", nar("whole"), &[], old, now);
    // Its bytes changed moments ago: too young to be deleted, its narinfo goes.
    let rotten = path_with(&mem, "rotten", nar("rotten"), &[], old, now);
    let mut flipped = mem.bytes(&rotten.nar).unwrap().to_vec();
    *flipped.last_mut().unwrap() ^= 1;
    mem.insert_at(&rotten.nar, flipped, now - Duration::from_secs(60));
    let orphan = "nar/3333333333333333333333333333333333333333333333333333.nar";
    mem.insert_at(orphan, nar("orphan"), now - old);
    let (with_whole, with_rotten, with_orphan) =
        (record(&whole.nar), record(&rotten.nar), record(orphan));

    let r = verify_hashing(&mem, now, true).await;
    assert!(r.repair_errors.is_empty(), "{:?}", r.repair_errors);
    assert!(!has(&mem, &format!("{}.narinfo", rotten.hash)));
    assert!(has(&mem, &rotten.nar), "a young NAR deleted");
    assert!(!has(&mem, orphan));
    for key in [&with_rotten, &with_orphan] {
        assert!(!has(&mem, key), "{key} kept");
    }
    assert!(has(&mem, &with_whole), "a good NAR's record deleted");
}
