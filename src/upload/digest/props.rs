//! Property test of the upload pipeline: whatever bytes arrive (valid, cut, corrupted, with
//! trailing junk, not a NAR, arbitrary) in whichever compression, and however they are split
//! into chunks, an accepted upload's NarHash/NarSize are those of the NAR its bytes really
//! decompress to (by an independent decoder), so checking them against the narinfo verifies
//! the NAR; and what is re-encoded into the store decompresses to that same NAR.
//!
//! 64 cases in the suite; `PROPTEST_CASES=N` for more (scripts/proptest-long).

use std::io::Read as _;

use proptest::prelude::*;

use super::*;
use crate::store::Store as _;

const LIMITS: Limits = Limits {
    max_nar_bytes: 1 << 30,
    xz_memory_limit_bytes: 128 << 20,
};

fn config() -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = 64;
    }
    c
}

fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
    match c {
        Compression::None => data.to_vec(),
        Compression::Xz => {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(data, 1).unwrap(),
        Compression::Bzip2 => {
            let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Compression::Brotli => {
            let mut e = brotli::CompressorWriter::new(Vec::new(), 4096, 1, 22);
            e.write_all(data).unwrap();
            e.into_inner()
        }
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        // Not decodable by the pipeline: any bytes will do, it must refuse them.
        _ => data.to_vec(),
    }
}

/// What `data` decompresses to by the codecs' own readers (not the pipeline's writers), or
/// `None` if it does not, whole.
fn reference_decode(c: Compression, data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let read = match c {
        Compression::None => return Some(data.to_vec()),
        Compression::Xz => liblzma::read::XzDecoder::new_multi_decoder(data).read_to_end(&mut out),
        Compression::Zstd => {
            zstd::stream::read::Decoder::new(data).and_then(|mut d| d.read_to_end(&mut out))
        }
        Compression::Bzip2 => bzip2::read::MultiBzDecoder::new(data).read_to_end(&mut out),
        Compression::Brotli => brotli::Decompressor::new(data, 4096).read_to_end(&mut out),
        Compression::Gzip => flate2::read::MultiGzDecoder::new(data).read_to_end(&mut out),
        _ => return None,
    };
    read.ok().map(|_| out)
}

#[derive(Debug, Clone)]
enum Input {
    /// A NAR (by its magic), compressed whole.
    Valid,
    /// Cut short at the given fraction of its compressed length.
    Truncated(proptest::sample::Index),
    /// One byte of the compressed stream XORed with a non-zero mask.
    Flipped(proptest::sample::Index, u8),
    /// Followed by bytes that are not part of the stream.
    Trailing(Vec<u8>),
    /// Two compressed NARs back to back.
    Twice,
    /// Compressed whole, but without the NAR magic.
    NotANar,
    /// Bytes that were never compressed.
    Arbitrary(Vec<u8>),
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        Just(Input::Valid),
        any::<proptest::sample::Index>().prop_map(Input::Truncated),
        (any::<proptest::sample::Index>(), 1..=255u8).prop_map(|(i, m)| Input::Flipped(i, m)),
        proptest::collection::vec(any::<u8>(), 1..64).prop_map(Input::Trailing),
        Just(Input::Twice),
        Just(Input::NotANar),
        proptest::collection::vec(any::<u8>(), 0..2048).prop_map(Input::Arbitrary),
    ]
}

fn build(c: Compression, payload: &[u8], how: &Input) -> (Vec<u8>, Vec<u8>) {
    let mut nar = NAR_MAGIC.to_vec();
    nar.extend_from_slice(payload);
    let whole = compress(c, &nar);
    let bytes = match how {
        Input::Valid => whole,
        Input::Truncated(i) => whole[..i.index(whole.len())].to_vec(),
        Input::Flipped(i, m) => {
            let mut b = whole;
            let at = i.index(b.len());
            b[at] ^= m;
            b
        }
        Input::Trailing(t) => [whole, t.clone()].concat(),
        Input::Twice => [whole.clone(), whole].concat(),
        Input::NotANar => compress(c, payload),
        Input::Arbitrary(b) => b.clone(),
    };
    (nar, bytes)
}

/// `data` as a stream of chunks cut at the given points.
fn chunked(data: &[u8], cuts: &[proptest::sample::Index]) -> Vec<io::Result<Bytes>> {
    let mut points: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
    points.push(0);
    points.push(data.len());
    points.sort_unstable();
    points.dedup();
    points
        .windows(2)
        .map(|w| Ok(Bytes::copy_from_slice(&data[w[0]..w[1]])))
        .collect()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn an_accepted_upload_has_the_nar_hash_of_what_it_decompresses_to(
        c in proptest::sample::select(Compression::ALL.to_vec()),
        payload in proptest::collection::vec(any::<u8>(), 0..3000),
        how in input(),
        cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..6),
        recompress in proptest::option::of(proptest::sample::select(vec![
            Compression::None, Compression::Xz, Compression::Zstd,
        ])),
    ) {
        let (nar, bytes) = build(c, &payload, &how);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let store = crate::store::memory::MemoryStore::new();
        let (result, stored) = rt.block_on(async {
            let mut w = store.writer("out").await.unwrap();
            let body = futures::stream::iter(chunked(&bytes, &cuts));
            let r = digest_into(body, c, recompress.map(|r| (r, Some(1))), Some(&mut w), LIMITS).await;
            w.commit().await.unwrap();
            (r, store.get_bytes("out", u64::MAX).await.unwrap().unwrap())
        });
        let reference = reference_decode(c, &bytes);
        match &result {
            Ok(d) => {
                let decoded = reference.as_ref().unwrap_or_else(|| {
                    panic!("{c} accepted bytes its own reader does not decode ({how:?})")
                });
                prop_assert!(decoded.starts_with(NAR_MAGIC), "accepted a non-NAR ({:?})", how);
                prop_assert_eq!(d.nar.hash, Sha256::digest(decoded));
                prop_assert_eq!(d.nar.size, decoded.len() as u64);
                prop_assert_eq!(d.input.hash, Sha256::digest(&bytes));
                prop_assert_eq!(d.input.size, bytes.len() as u64);
                prop_assert_eq!(d.output.hash, Sha256::digest(&stored));
                prop_assert_eq!(d.output.size, stored.len() as u64);
                let out_c = recompress.unwrap_or(c);
                let redecoded = reference_decode(out_c, &stored);
                prop_assert_eq!(redecoded.as_ref(), Some(decoded));
            }
            Err(_) => {
                // Refusing is always safe; but a whole, decodable NAR must get through.
                if c.can_decode() && matches!(how, Input::Valid) {
                    prop_assert!(false, "{} refused a valid NAR: {:?}", c, result);
                }
            }
        }
        if !c.can_decode() {
            prop_assert!(result.is_err(), "{} cannot be verified, yet was accepted", c);
        }
        if c != Compression::None && matches!(how, Input::Truncated(_)) {
            prop_assert!(result.is_err(), "{} accepted a cut stream", c);
        }
        if matches!(how, Input::Valid) && c.can_decode() {
            prop_assert_eq!(result.unwrap().nar.hash, Sha256::digest(&nar));
        }
    }

    /// Under a `.nar` name (plain or gzip, told apart by the first bytes), the pipeline
    /// decides as it does when told the compression: a plain body as plain, a gzip one as
    /// gzip, whatever pieces they come in.
    #[test]
    fn a_nar_named_plain_is_judged_as_what_it_holds(
        gzip in any::<bool>(),
        payload in proptest::collection::vec(any::<u8>(), 0..3000),
        how in input(),
        cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..6),
    ) {
        let c = if gzip { Compression::Gzip } else { Compression::None };
        let (_, bytes) = build(c, &payload, &how);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (named, told) = rt.block_on(async {
            let body = futures::stream::iter(chunked(&bytes, &cuts));
            let named = digest_named_into(body, Compression::None, None, None, LIMITS).await;
            let body = futures::stream::iter(chunked(&bytes, &cuts));
            let actual = if bytes.starts_with(&GZIP_MAGIC) { Compression::Gzip } else { Compression::None };
            (named, digest_into(body, actual, None, None, LIMITS).await)
        });
        match (&named, &told) {
            (Ok(n), Ok(t)) => {
                prop_assert_eq!(n.compression, t.compression);
                prop_assert_eq!(n.nar, t.nar);
                prop_assert_eq!(n.input, t.input);
            }
            (Err(_), Err(_)) => {}
            _ => prop_assert!(false, "named {:?}, told {:?}", named, told),
        }
        if matches!(how, Input::Valid) {
            prop_assert_eq!(named.unwrap().compression, c);
        }
    }
}
