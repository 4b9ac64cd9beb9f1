//! The narinfo format against narinfos written by the real Nix.

use super::*;

const SD: &str = "/nix/store";

/// Written by `nix copy --to file://` (Nix 2.8) for a built path with references.
const BUILT: &str = "\
StorePath: /nix/store/6bxnj2gfflqa529lddzh3zhcn45nn86r-top
URL: nar/07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar.xz
Compression: xz
FileHash: sha256:07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7
FileSize: 300
NarHash: sha256:0v1h8fzqs60d8pccpwskrpnv3c7fz25ddhwl2rwlfblan5zvirsv
NarSize: 624
References: 20lja0xsjl4xlgskydbpsrass06a5s67-closure.nix a6qsrmi2wws6820p89gki93wb6rjvknc-leaf w7vx6x2avzilhry9m3axgkz6ic5bkmz8-mid
Deriver: 7d6lwmyccalgxawxbva0c5in599fd8vi-top.drv
Sig: test-1:mbtf5wmBtrMQCHnVpWCZlJGiFC5JYhTHoK2doDUqUIcx4J6vXRDjNRdRFmY96Ai6hxXiAjaviyjzF10WhNx/Dg==
";

#[test]
fn round_trip_built_path() {
    let n = NarInfo::parse(BUILT, SD).unwrap();
    assert_eq!(n.hash().as_str(), "6bxnj2gfflqa529lddzh3zhcn45nn86r");
    assert_eq!(n.compression, Compression::Xz);
    assert_eq!(n.references.len(), 3);
    assert_eq!(n.sigs.len(), 1);
    assert_eq!(n.render(SD), BUILT);
    assert_eq!(
        n.fingerprint(SD),
        "1;/nix/store/6bxnj2gfflqa529lddzh3zhcn45nn86r-top;\
         sha256:0v1h8fzqs60d8pccpwskrpnv3c7fz25ddhwl2rwlfblan5zvirsv;624;\
         /nix/store/20lja0xsjl4xlgskydbpsrass06a5s67-closure.nix,\
         /nix/store/a6qsrmi2wws6820p89gki93wb6rjvknc-leaf,\
         /nix/store/w7vx6x2avzilhry9m3axgkz6ic5bkmz8-mid"
    );
}

/// A narinfo cut short (a copy interrupted, a file truncated) must not pass for a whole one
/// with fewer references: cellar would sign a closure that lacks paths. Cut before
/// `References:`, it lacks the field; cut inside that line, the line has no newline. Cut
/// after it, what is left is whole as far as a signature goes (a field cut short there is
/// refused or dropped on its own).
#[test]
fn a_narinfo_cut_short_at_or_before_its_references_is_refused() {
    let at = BUILT.find("References: ").unwrap();
    let before = &BUILT[..at];
    assert!(matches!(
        NarInfo::parse(before, SD),
        Err(NarInfoError::Missing("References"))
    ));
    let refs_end = at + BUILT[at..].find('\n').unwrap();
    for cut in [at + "References: ".len() + 40, refs_end - 1, refs_end] {
        let e = NarInfo::parse(&BUILT[..cut], SD).unwrap_err();
        assert!(e.to_string().contains("cut short"), "{cut}: {e}");
    }
    // The same line with its newline, and the narinfo cut after it: whole references.
    let n = NarInfo::parse(&BUILT[..=refs_end], SD).unwrap();
    assert_eq!(n.references.len(), 3);
    let sig = BUILT.find("Sig: ").unwrap();
    let n = NarInfo::parse(&BUILT[..sig + 10], SD).unwrap();
    assert_eq!(n.references.len(), 3);
    assert!(n.sigs.is_empty(), "a signature cut short is dropped");
    // Without a newline at the end, but not after References: read.
    assert!(NarInfo::parse(BUILT.trim_end(), SD).is_ok());
}

#[test]
fn empty_references_ca_several_sigs_and_unknown_fields() {
    let text = "\
StorePath: /nix/store/20lja0xsjl4xlgskydbpsrass06a5s67-closure.nix
URL: nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.zst
Compression: zstd
FileHash: sha256:1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3
FileSize: 132
NarHash: sha256:0v1h8fzqs60d8pccpwskrpnv3c7fz25ddhwl2rwlfblan5zvirsv
NarSize: 120
References: 
Sig: a-1:mbtf5wmBtrMQCHnVpWCZlJGiFC5JYhTHoK2doDUqUIcx4J6vXRDjNRdRFmY96Ai6hxXiAjaviyjzF10WhNx/Dg==
Sig: b-1:mbtf5wmBtrMQCHnVpWCZlJGiFC5JYhTHoK2doDUqUIcx4J6vXRDjNRdRFmY96Ai6hxXiAjaviyjzF10WhNx/Dg==
CA: text:sha256:1lr2bzm3kzl4rz6pvpqhzqs0ydwf3q8rcy2f1zdsdh4p5pnd7w0z
FutureField: something new
";
    let n = NarInfo::parse(text, SD).unwrap();
    assert!(n.references.is_empty());
    assert!(n.deriver.is_none());
    assert_eq!(n.sigs.len(), 2);
    assert!(n.ca.is_some());
    assert_eq!(
        n.extra,
        vec![("FutureField".into(), "something new".into())]
    );
    assert_eq!(n.render(SD), text);
    assert!(n.fingerprint(SD).ends_with(";120;"));
}

#[test]
fn missing_compression_means_bzip2_and_hex_narhash_is_normalised() {
    let text = "StorePath: /nix/store/6bxnj2gfflqa529lddzh3zhcn45nn86r-top\n\
URL: nar/x.nar.bz2\n\
NarHash: sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n\
NarSize: 13\n\
References:\n";
    let n = NarInfo::parse(text, SD).unwrap();
    assert_eq!(n.compression, Compression::Bzip2);
    assert!(n
        .render(SD)
        .contains("NarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\n"));
    // An empty value too, as Nix reads it.
    let empty = NarInfo::parse(&format!("{text}Compression: \n"), SD).unwrap();
    assert_eq!(empty.compression, Compression::Bzip2);
    assert!(empty.render(SD).contains("Compression: bzip2\n"));
}

/// Nix splits a line at its first `:`, so a key with a colon in it is another field to it
/// (`References:x: y` a second, corrupt `References`): refused, not passed on.
#[test]
fn a_key_with_a_colon_is_refused() {
    for line in ["References:x: y", "X:Y: z"] {
        let e = NarInfo::parse(&format!("{BUILT}{line}\n"), SD).unwrap_err();
        assert!(matches!(e, NarInfoError::NoColon(11)), "{line}: {e}");
    }
}

#[test]
fn strict_errors() {
    let crlf = BUILT.replace('\n', "\r\n");
    assert_eq!(
        NarInfo::parse(&crlf, SD).unwrap_err(),
        NarInfoError::CarriageReturn(1)
    );
    for (field, prefix) in [
        ("URL", "URL:"),
        ("NarHash", "NarHash:"),
        ("NarSize", "NarSize:"),
        ("StorePath", "StorePath:"),
    ] {
        let t: String = BUILT
            .lines()
            .filter(|l| !l.starts_with(prefix))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            NarInfo::parse(&t, SD).unwrap_err(),
            NarInfoError::Missing(field)
        );
    }
    // A signature no key could verify is dropped; the narinfo and its good signatures stay.
    let bad_sig = BUILT.replace("Sig: test-1:mbtf", "Sig: test-1:!!tf");
    let unsigned = NarInfo::parse(&bad_sig, SD).unwrap();
    assert!(unsigned.sigs.is_empty());
    assert!(!unsigned.render(SD).contains("Sig:"));
    let beside_good = format!("{BUILT}Sig: other-1:c2hvcnQ=\nSig: nocolon\n");
    let kept = NarInfo::parse(&beside_good, SD).unwrap();
    assert_eq!(kept.sigs, NarInfo::parse(BUILT, SD).unwrap().sigs);
    let other_dir = NarInfo::parse(BUILT, "/gnu/store").unwrap_err();
    assert!(matches!(
        other_dir,
        NarInfoError::Bad {
            field: "StorePath",
            ..
        }
    ));
    let dup = format!("{BUILT}NarSize: 1\n");
    assert!(matches!(
        NarInfo::parse(&dup, SD),
        Err(NarInfoError::Duplicate {
            field: "NarSize",
            ..
        })
    ));
    assert!(matches!(
        NarInfo::parse("garbage\n", SD),
        Err(NarInfoError::NoColon(1))
    ));
    // A URL must be one word: empty or with spaces, it names no NAR Nix could fetch.
    for url in ["URL: ", "URL: nar/a b.nar.xz"] {
        let t = BUILT.replace(
            "URL: nar/07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar.xz",
            url,
        );
        assert!(
            matches!(
                NarInfo::parse(&t, SD),
                Err(NarInfoError::Bad { field: "URL", .. })
            ),
            "{url:?}"
        );
    }
    // Unknown fields are kept, but a key must be a word: an empty one or one with spaces is a
    // line that is not `Key: value`.
    for (line, n) in [(": x", 11), ("Two Words: x", 11)] {
        let t = format!("{BUILT}{line}\n");
        assert_eq!(
            NarInfo::parse(&t, SD).unwrap_err(),
            NarInfoError::NoColon(n),
            "{line:?}"
        );
    }
    let bad_ref = BUILT.replace("a6qsrmi2", "a6qsrmi/");
    assert!(matches!(
        NarInfo::parse(&bad_ref, SD),
        Err(NarInfoError::Bad {
            field: "References",
            ..
        })
    ));
}

/// Narinfos written and signed by the real Nix 2.8 (`nix store sign` + `nix copy --to
/// file://`): our fingerprint must be the one Nix signed, and rendering must give back the
/// exact bytes.
#[test]
fn real_nix_narinfos_round_trip_and_verify() {
    let key: PublicKey = include_str!("../../../tests/fixtures/narinfo/test-1.pub")
        .trim()
        .parse()
        .unwrap();
    for text in [
        include_str!("../../../tests/fixtures/narinfo/top.narinfo"),
        include_str!("../../../tests/fixtures/narinfo/ca-src-zstd.narinfo"),
    ] {
        let n = NarInfo::parse(text, SD).unwrap();
        assert_eq!(n.render(SD), text);
        assert!(n.is_signed_by_any(std::slice::from_ref(&key), SD), "{text}");
        let mut tampered = n.clone();
        tampered.references.pop();
        tampered.nar_size += 1;
        assert!(!tampered.is_signed_by_any(std::slice::from_ref(&key), SD));
    }
}

#[test]
fn fingerprint_lists_references_sorted_like_nix() {
    let mut n = NarInfo::parse(BUILT, SD).unwrap();
    let sorted = n.fingerprint(SD);
    n.references.reverse();
    assert_eq!(n.fingerprint(SD), sorted);
    // A reference listed twice is once in the set Nix reads and signs.
    assert!(n.references.len() > 1, "{sorted}");
    n.references.push(n.references[0].clone());
    assert_eq!(n.fingerprint(SD), sorted);
}

#[test]
fn signing_replaces_same_name_and_verifies() {
    let mut n = NarInfo::parse(BUILT, SD).unwrap();
    let k = SecretKey::generate("test-1").unwrap();
    n.sign(&k, SD);
    assert_eq!(n.sigs.len(), 1, "same key name replaces the old signature");
    assert!(n.is_signed_by_any(&[k.public()], SD));
    let k2 = SecretKey::generate("cellar-2").unwrap();
    n.sign(&k2, SD);
    assert_eq!(n.sigs.len(), 2);
    assert!(n.is_signed_by_any(&[k2.public()], SD));
    // The signature does not cover URL/Compression/FileHash/FileSize...
    n.url = "nar/other.nar.zst".into();
    n.compression = Compression::Zstd;
    n.file_size = Some(1);
    assert!(n.is_signed_by_any(&[k.public()], SD));
    // ...but does cover NarSize.
    n.nar_size += 1;
    assert!(!n.is_signed_by_any(&[k.public(), k2.public()], SD));
}

#[test]
fn parse_for_checks_the_name() {
    let h: StorePathHash = "6bxnj2gfflqa529lddzh3zhcn45nn86r".parse().unwrap();
    let other: StorePathHash = "a6qsrmi2wws6820p89gki93wb6rjvknc".parse().unwrap();
    let n = NarInfo::parse_for(BUILT.as_bytes(), SD, h).unwrap();
    assert_eq!(n, NarInfo::parse(BUILT, SD).unwrap());
    assert_eq!(
        NarInfo::parse_for(BUILT.as_bytes(), SD, other).unwrap_err(),
        NarInfoError::WrongPath {
            path: "/nix/store/6bxnj2gfflqa529lddzh3zhcn45nn86r-top".into(),
            expected: other,
        }
    );
    let mut bytes = BUILT.as_bytes().to_vec();
    bytes.extend_from_slice(b"System: \xff\n");
    assert_eq!(
        NarInfo::parse_for(&bytes, SD, h).unwrap_err(),
        NarInfoError::NotUtf8
    );
    assert!(matches!(
        NarInfo::parse_for(b"garbage\n", SD, h),
        Err(NarInfoError::NoColon(1))
    ));
}

#[test]
fn nar_file_comes_from_the_url() {
    let mut n = NarInfo::parse(BUILT, SD).unwrap();
    assert_eq!(
        n.nar_file().unwrap().as_str(),
        "07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar.xz"
    );
    for (url, not_under_nar) in [
        ("https://example.org/nar/x.nar", true),
        (
            "07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar.xz",
            true,
        ),
        (
            "nar/../07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar",
            false,
        ),
        ("nar/x.nar", false),
    ] {
        n.url = url.into();
        let e = n.nar_file().unwrap_err();
        assert_eq!(
            matches!(e, NarUrlError::NotUnderNar(_)),
            not_under_nar,
            "{url}: {e}"
        );
    }
}

/// nix-serve and harmonia give no `FileSize`: an uncompressed NAR's file is its NAR, so it
/// takes `NarSize`. A compressed one's size is unknown, and a given one is kept.
#[test]
fn an_uncompressed_nar_without_a_file_size_gets_its_nar_size() {
    let mut n = NarInfo::parse(BUILT, SD).unwrap();
    n.file_size = None;
    n.complete_file_size();
    assert_eq!(n.file_size, None, "compressed: unknown");
    n.compression = Compression::None;
    n.complete_file_size();
    assert_eq!(n.file_size, Some(624));
    n.file_size = Some(5);
    n.complete_file_size();
    assert_eq!(n.file_size, Some(5), "given: kept");
}

/// What Nix's own parser makes of three edge cases: `NarSize: 0` is corrupt (no NAR is
/// empty), an empty `CA:` is no CA, and one it cannot parse is corrupt too (a client reading
/// it fails, rather than skipping the path).
#[test]
fn zero_nar_size_is_refused_and_an_empty_ca_is_none() {
    let text = |size: u64, ca: &str| {
        format!(
            "StorePath: /nix/store/6bxnj2gfflqa529lddzh3zhcn45nn86r-top\n\
URL: nar/x.nar\n\
Compression: none\n\
NarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\n\
NarSize: {size}\n\
References:\n{ca}"
        )
    };
    let zero = NarInfo::parse(&text(0, ""), SD);
    assert!(
        zero.as_ref()
            .is_err_and(|e| e.to_string().contains("NarSize")),
        "{zero:?}"
    );
    let n = NarInfo::parse(&text(120, "CA: \n"), SD).unwrap();
    assert_eq!(n.ca, None);
    assert!(!n.render(SD).contains("CA:"));
    let garbage = NarInfo::parse(&text(120, "CA: fixed:r:sha256:garbage\n"), SD);
    assert!(
        garbage
            .as_ref()
            .is_err_and(|e| e.to_string().contains("CA")),
        "{garbage:?}"
    );
    let ca = "fixed:r:sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
    let n = NarInfo::parse(&text(120, &format!("CA: {ca}\n")), SD).unwrap();
    assert_eq!(n.ca.as_deref(), Some(ca));
}
