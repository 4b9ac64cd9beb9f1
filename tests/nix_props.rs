//! Property tests of the Nix formats: narinfos round-trip through render and parse whatever
//! their spelling, and no input makes a parser panic; nix-base32 round-trips and its decoder
//! accepts only canonical strings; names parsed from requests never reach outside the cache.
//!
//! 64 cases each in the suite; `PROPTEST_CASES=N` for more (scripts/proptest-long).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod props_support;

use cellar::nix::{
    base32, NarFileName, NarInfo, OutputName, RealisationName, Sha256, StorePathBaseName,
    StorePathHash, TopLevelFile,
};
use props_support::*;
use proptest::prelude::*;

/// A valid narinfo's text with a few random edits: cut, spliced, overwritten.
fn mangled() -> impl Strategy<Value = Vec<u8>> {
    let edit = (
        0..4u8,
        any::<proptest::sample::Index>(),
        proptest::collection::vec(any::<u8>(), 0..12),
    );
    (narinfo(), proptest::collection::vec(edit, 1..4)).prop_map(|(n, edits)| {
        let mut b = n.render(SD).into_bytes();
        for (kind, at, bytes) in edits {
            let i = at.index(b.len() + 1);
            match kind {
                0 => b.truncate(i),
                1 => {
                    let end = (i + bytes.len()).min(b.len());
                    b.drain(i..end);
                }
                2 => {
                    b.splice(i..i, bytes);
                }
                _ => {
                    for (k, x) in bytes.into_iter().enumerate() {
                        if let Some(slot) = b.get_mut(i + k) {
                            *slot = x;
                        }
                    }
                }
            }
        }
        b
    })
}

/// Whatever parses renders to something that parses back to the same.
fn parses_back(n: &NarInfo) {
    let text = n.render(SD);
    let again = NarInfo::parse(&text, SD).unwrap_or_else(|e| panic!("{e}:\n{text}"));
    assert_eq!(&again, n, "{text}");
    assert_eq!(again.render(SD), text);
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn narinfos_round_trip_through_render_and_parse(n in narinfo()) {
        parses_back(&n);
        let h = n.hash();
        prop_assert_eq!(NarInfo::parse_for(n.render(SD).as_bytes(), SD, h).unwrap(), n);
    }

    #[test]
    fn every_spelling_of_a_narinfo_parses_to_it(
        (n, text) in narinfo().prop_flat_map(|n| (Just(n.clone()), respelled(n)))
    ) {
        let parsed = NarInfo::parse(&text, SD).unwrap_or_else(|e| panic!("{e}:\n{text}"));
        prop_assert_eq!(&parsed, &n, "{}", text);
        prop_assert_eq!(parsed.render(SD), n.render(SD));
        prop_assert_eq!(parsed.fingerprint(SD), n.fingerprint(SD));
    }

    #[test]
    fn parsing_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600), h in store_hash()) {
        let h: StorePathHash = h.parse().unwrap();
        if let Ok(n) = NarInfo::parse_for(&bytes, SD, h) {
            parses_back(&n);
        }
        if let Ok(text) = std::str::from_utf8(&bytes) {
            if let Ok(n) = NarInfo::parse(text, SD) {
                parses_back(&n);
            }
        }
    }

    #[test]
    fn mangled_narinfos_never_panic_and_what_parses_round_trips(bytes in mangled()) {
        if let Ok(text) = std::str::from_utf8(&bytes) {
            if let Ok(n) = NarInfo::parse(text, SD) {
                parses_back(&n);
                let _ = n.nar_file();
            }
        }
    }

    #[test]
    fn nix32_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        let s = base32::encode(&bytes);
        prop_assert_eq!(s.len(), base32::encoded_len(bytes.len()));
        prop_assert!(base32::is_nix32(&s));
        prop_assert_eq!(base32::decode(&s, bytes.len()).unwrap(), bytes);
    }

    #[test]
    fn nix32_decoding_never_panics_and_accepts_only_canonical_strings(
        s in prop_oneof![
            any::<String>(),
            (0..80usize).prop_flat_map(|n| proptest::collection::vec(
                proptest::sample::select(base32::ALPHABET.to_vec()), base32::encoded_len(n)
            )).prop_map(|v| String::from_utf8(v).unwrap()),
        ],
        len in 0..80usize,
    ) {
        for n in [len, s.len() * 5 / 8, (s.len() * 5).div_ceil(8)] {
            if let Ok(bytes) = base32::decode(&s, n) {
                prop_assert_eq!(bytes.len(), n);
                prop_assert_eq!(base32::encode(&bytes), s.clone());
            }
        }
    }

    #[test]
    fn sha256_spellings_agree(h in sha256().prop_flat_map(|h| (Just(h), spelled(h)))) {
        let (h, text) = h;
        prop_assert_eq!(text.parse::<Sha256>().unwrap(), h);
        prop_assert_eq!(h.to_string().parse::<Sha256>().unwrap(), h);
    }

    #[test]
    fn valid_names_round_trip(p in base_name(), h in store_hash(), long in any::<bool>(), c in compression()) {
        prop_assert_eq!(p.as_str().parse::<StorePathBaseName>().unwrap(), p.clone());
        let parsed: StorePathHash = h.parse().unwrap();
        prop_assert_eq!(parsed.as_str(), h.as_str());
        prop_assert_eq!(
            format!("{h}.narinfo").parse::<TopLevelFile>().unwrap(),
            TopLevelFile::NarInfo(parsed)
        );
        let file_hash = if long { Sha256::from_bytes([7; 32]).to_nix32() } else { h.clone() };
        let nar = format!("{file_hash}.nar{}", c.extension());
        let f: NarFileName = nar.parse().unwrap();
        prop_assert_eq!(f.as_str(), nar.as_str());
        prop_assert_eq!(f.file_hash(), file_hash.as_str());
    }

    /// Names come from request URLs and become object keys: whatever parses is the input
    /// unchanged, and holds no `/`, no whitespace, nothing that starts with a dot.
    #[test]
    fn names_from_requests_never_panic_and_stay_inside_the_cache(
        s in prop_oneof![
            any::<String>(),
            "[0-9a-z./!:_-]{0,80}",
            (base_name(), "[a-z0-9./-]{0,12}").prop_map(|(p, tail)| format!("{p}{tail}")),
            (store_hash(), "\\.(narinfo|ls|nar|nar\\.xz|nar\\.zst|x|)").prop_map(|(h, e)| format!("{h}{e}")),
        ]
    ) {
        fn safe(s: &str, parsed: &str) {
            assert_eq!(parsed, s);
            assert!(!s.contains('/') && !s.starts_with('.'), "{s:?}");
            assert!(!s.chars().any(char::is_whitespace), "{s:?}");
        }
        if let Ok(h) = s.parse::<StorePathHash>() { safe(&s, h.as_str()); }
        if let Ok(p) = s.parse::<StorePathBaseName>() { safe(&s, p.as_str()); }
        if let Ok(f) = s.parse::<NarFileName>() { safe(&s, f.as_str()); }
        if let Ok(r) = s.parse::<RealisationName>() { safe(&s, r.as_str()); }
        if let Ok(o) = s.parse::<OutputName>() { safe(&s, o.as_str()); }
        if let Ok(t) = s.parse::<TopLevelFile>() {
            let (TopLevelFile::NarInfo(h) | TopLevelFile::Listing(h)) = t;
            prop_assert!(s.starts_with(h.as_str()));
        }
        let _ = s.parse::<Sha256>();
    }
}
