//! Generators for the property tests over Nix names, hashes and narinfos (tests/nix_props.rs,
//! tests/fingerprint_nix.rs): valid values as Nix writes them, and the ways a narinfo may be
//! spelled (field order, hash forms, optional fields) that must all parse to the same thing.
#![allow(dead_code)]

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use cellar::nix::{base32, Compression, NarInfo, Sha256, Signature, StorePathBaseName};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

pub const SD: &str = "/nix/store";

/// 64 cases in the normal suite, or `PROPTEST_CASES` (the long runs, scripts/proptest-long).
pub fn config() -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = 64;
    }
    c
}

/// A store path hash part: 32 nix-base32 characters.
pub fn store_hash() -> impl Strategy<Value = String> {
    proptest::collection::vec(0..32usize, 32)
        .prop_map(|v| v.into_iter().map(|i| base32::ALPHABET[i] as char).collect())
}

/// The name part of a store path, as Nix allows it.
pub fn store_name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9+_?=-][a-zA-Z0-9+._?=-]{0,40}"
}

pub fn base_name() -> impl Strategy<Value = StorePathBaseName> {
    (store_hash(), store_name()).prop_map(|(h, n)| format!("{h}-{n}").parse().unwrap())
}

pub fn sha256() -> impl Strategy<Value = Sha256> {
    any::<[u8; 32]>().prop_map(Sha256::from_bytes)
}

/// A hash in one of the forms Nix reads: `sha256:` with nix32, hex or base64, or SRI.
pub fn spelled(h: Sha256) -> impl Strategy<Value = String> {
    let b = *h.as_bytes();
    prop_oneof![
        Just(h.to_string()),
        Just(format!("sha256:{}", hex::encode(b))),
        Just(format!("sha256:{}", BASE64.encode(b))),
        Just(format!("sha256-{}", BASE64.encode(b))),
    ]
}

pub fn compression() -> impl Strategy<Value = Compression> {
    proptest::sample::select(Compression::ALL.to_vec())
}

pub fn signature() -> impl Strategy<Value = Signature> {
    (
        "[a-z0-9][a-z0-9.-]{0,20}",
        proptest::collection::vec(any::<u8>(), 64),
    )
        .prop_map(|(name, bytes)| format!("{name}:{}", BASE64.encode(bytes)).parse().unwrap())
}

/// A field value that fits on one line and keeps its spelling (no CR, no LF).
fn line_value() -> impl Strategy<Value = String> {
    "[^\r\n]{0,30}"
}

/// A content address (`CA`) as Nix writes them, with a sha256.
fn content_address() -> impl Strategy<Value = String> {
    (
        proptest::sample::select(vec!["text:", "fixed:", "fixed:r:", "fixed:git:"]),
        sha256(),
    )
        .prop_map(|(method, hash)| format!("{method}{hash}"))
}

/// Any narinfo cellar can hold: what `render` writes must parse back to it.
pub fn narinfo() -> impl Strategy<Value = NarInfo> {
    let file = (
        store_hash(),
        compression(),
        proptest::option::of(sha256()),
        proptest::option::of(any::<u64>()),
    );
    let nar = (sha256(), 1..=u64::MAX);
    let refs = proptest::collection::vec(base_name(), 0..6);
    let extras = (
        proptest::option::of(base_name()),
        proptest::option::of(line_value()),
        proptest::collection::vec(signature(), 0..3),
        proptest::option::of(content_address()),
        proptest::collection::vec(("X[A-Za-z0-9-]{0,10}", line_value()), 0..3),
    );
    (base_name(), file, nar, refs, any::<bool>(), extras).prop_map(
        |(
            path,
            (fh, compression, file_hash, file_size),
            (nar_hash, nar_size),
            mut references,
            self_ref,
            (deriver, system, sigs, ca, extra),
        )| {
            if self_ref {
                references.push(path.clone());
            }
            NarInfo {
                url: format!("nar/{fh}.nar{}", compression.extension()),
                store_path: path,
                compression,
                file_hash,
                file_size,
                nar_hash,
                nar_size,
                references,
                deriver,
                system,
                sigs,
                ca,
                extra,
            }
        },
    )
}

/// The text of `n` as another writer could have spelled it: fields in any order, hashes in
/// any form, `Compression:` left out when it is bzip2, `References:` without its space.
pub fn respelled(n: NarInfo) -> impl Strategy<Value = String> {
    let hashes = (
        spelled(n.nar_hash),
        n.file_hash
            .map_or_else(|| Just(None).boxed(), |h| spelled(h).prop_map(Some).boxed()),
    );
    (hashes, any::<bool>(), any::<u64>()).prop_map(move |((nar_hash, file_hash), terse, seed)| {
        let mut lines = vec![
            format!("StorePath: {SD}/{}", n.store_path),
            format!("URL: {}", n.url),
            format!("NarHash: {nar_hash}"),
            format!("NarSize: {}", n.nar_size),
        ];
        if !(terse && n.compression == Compression::Bzip2) {
            lines.push(format!("Compression: {}", n.compression));
        }
        if let Some(h) = &file_hash {
            lines.push(format!("FileHash: {h}"));
        }
        if let Some(s) = n.file_size {
            lines.push(format!("FileSize: {s}"));
        }
        let refs: Vec<&str> = n.references.iter().map(|r| r.as_str()).collect();
        if refs.is_empty() && terse {
            lines.push("References:".into());
        } else {
            lines.push(format!("References: {}", refs.join(" ")));
        }
        if let Some(d) = &n.deriver {
            lines.push(format!("Deriver: {d}"));
        } else if terse {
            lines.push("Deriver: unknown-deriver".into());
        }
        if let Some(s) = &n.system {
            lines.push(format!("System: {s}"));
        }
        if let Some(ca) = &n.ca {
            lines.push(format!("CA: {ca}"));
        }
        // Sigs and unknown fields keep their order among themselves: shuffle the rest.
        shuffle(&mut lines, seed);
        for s in &n.sigs {
            lines.push(format!("Sig: {s}"));
        }
        for (k, v) in &n.extra {
            lines.push(format!("{k}: {v}"));
        }
        let mut text = lines.join("\n");
        text.push('\n');
        text
    })
}

fn shuffle(v: &mut [String], mut seed: u64) {
    for i in (1..v.len()).rev() {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let j = (seed >> 33) as usize % (i + 1);
        v.swap(i, j);
    }
}
