//! The pipeline over in-memory bodies: hashes, codecs, truncation and limits.

use super::*;

const LIMITS: Limits = Limits {
    max_nar_bytes: 1 << 30,
    xz_memory_limit_bytes: 128 << 20,
};

fn nar(payload: &[u8]) -> Vec<u8> {
    let mut v = NAR_MAGIC.to_vec();
    v.extend_from_slice(&[0, 0, 0]);
    v.extend_from_slice(payload);
    v
}

/// The pipeline's verdict on `data` sent as `c`, in 1000-byte pieces, with nothing written.
async fn check(data: Vec<u8>, c: Compression) -> Result<NarDigest, Error> {
    digest_into(chunks(data), c, None, None, LIMITS).await
}

fn chunks(data: Vec<u8>) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let parts: Vec<io::Result<Bytes>> = data
        .chunks(1000)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    futures::stream::iter(parts)
}

#[tokio::test]
async fn hashes_compressed_and_plain() {
    let plain = nar(&vec![7u8; 100_000]);
    let xz = {
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
        e.write_all(&plain).unwrap();
        e.finish().unwrap()
    };
    let zst = zstd::encode_all(&plain[..], 3).unwrap();
    let bz = {
        let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
        e.write_all(&plain).unwrap();
        e.finish().unwrap()
    };
    let br = {
        let mut e = brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22);
        e.write_all(&plain).unwrap();
        e.into_inner()
    };
    for (c, data) in [
        (Compression::None, plain.clone()),
        (Compression::Xz, xz),
        (Compression::Zstd, zst),
        (Compression::Bzip2, bz),
        (Compression::Brotli, br),
    ] {
        let d = digest_into(chunks(data.clone()), c, None, None, LIMITS)
            .await
            .unwrap();
        assert_eq!(d.nar.hash, Sha256::digest(&plain), "{c}");
        assert_eq!(d.nar.size, plain.len() as u64);
        assert_eq!(d.input.hash, Sha256::digest(&data));
        assert_eq!(d.input.size, data.len() as u64);
    }
}

#[tokio::test]
async fn rejects_non_nars_and_truncated_streams() {
    let e = check(b"hello world, not a nar".to_vec(), Compression::None)
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Upload(UploadError::Rejected(_))),
        "{e:?}"
    );
    let plain = nar(&[1u8; 5000]);
    let mut xz = {
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
        e.write_all(&plain).unwrap();
        e.finish().unwrap()
    };
    xz.truncate(xz.len() / 2);
    let e = check(xz, Compression::Xz).await.unwrap_err();
    assert!(
        matches!(e, Error::Upload(UploadError::Rejected(_))),
        "{e:?}"
    );
    let br = {
        let mut e = brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22);
        e.write_all(&plain).unwrap();
        e.into_inner()
    };
    let mut cut = br;
    cut.truncate(cut.len() - 3);
    let e = check(cut, Compression::Brotli).await.unwrap_err();
    assert!(
        matches!(e, Error::Upload(UploadError::Rejected(_))),
        "{e:?}"
    );
    let e = check(plain, Compression::Lz4).await.unwrap_err();
    assert!(
        matches!(e, Error::Upload(UploadError::Rejected(_))),
        "{e:?}"
    );
}

/// `Compression::can_decode`/`can_encode` promise exactly the codecs built here.
#[test]
fn capabilities_match_the_codecs() {
    for c in Compression::ALL {
        let sink = NarSink {
            hash: Hashing::new(),
            flat: super::flat::FlatFile::default(),
            head: Vec::new(),
            encoder: None,
            max_bytes: u64::MAX,
        };
        assert_eq!(Decoder::new(c, sink, LIMITS).is_ok(), c.can_decode(), "{c}");
        let (tx, _rx) = mpsc::channel(1);
        let out = OutSink {
            tx,
            hash: Hashing::new(),
            buf: Vec::new(),
        };
        assert_eq!(Encoder::new(c, None, out).is_ok(), c.can_encode(), "{c}");
    }
}

#[tokio::test]
async fn body_errors_are_reported_as_such() {
    let s = futures::stream::iter(vec![
        Ok(Bytes::from(nar(b"x"))),
        Err(io::Error::other("client went away")),
    ]);
    let e = digest_into(s, Compression::None, None, None, LIMITS)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Upload(UploadError::Body(_))), "{e:?}");
}

#[tokio::test]
async fn recompresses_into_the_writer() {
    use crate::store::Store as _;
    let store = crate::store::memory::MemoryStore::new();
    let plain = nar(&vec![3u8; 300_000]);
    let xz = {
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
        e.write_all(&plain).unwrap();
        e.finish().unwrap()
    };
    let mut w = store.writer("out").await.unwrap();
    let d = digest_into(
        chunks(xz.clone()),
        Compression::Xz,
        Some((Compression::Zstd, Some(3))),
        Some(&mut w),
        LIMITS,
    )
    .await
    .unwrap();
    w.commit().await.unwrap();
    let stored = store.get_bytes("out", u64::MAX).await.unwrap().unwrap();
    assert_eq!(d.output.hash, Sha256::digest(&stored));
    assert_eq!(d.output.size, stored.len() as u64);
    assert_eq!(zstd::decode_all(&stored[..]).unwrap(), plain);
    assert_eq!(d.input.hash, Sha256::digest(&xz));
}

fn zstd_of(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

fn xz_of(data: &[u8], level: u32) -> Vec<u8> {
    let mut e = liblzma::write::XzEncoder::new(Vec::new(), level);
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn rejected_with(e: &Error, needle: &str) -> bool {
    matches!(e, Error::Upload(UploadError::Rejected(m)) if m.contains(needle))
}

/// A zstd frame cut anywhere, even after a whole block, is refused: its end is missing.
#[tokio::test]
async fn truncated_zstd_is_refused() {
    let plain = nar(&(0..200_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
    let zst = zstd_of(&plain);
    assert!(check(zst.clone(), Compression::Zstd).await.is_ok());
    for cut in [zst.len() - 1, zst.len() - 4, zst.len() / 2] {
        let e = check(zst[..cut].to_vec(), Compression::Zstd)
            .await
            .unwrap_err();
        assert!(rejected_with(&e, "incomplete frame"), "cut at {cut}: {e:?}");
    }
}

#[tokio::test]
async fn xz_needing_more_memory_than_the_limit_is_refused() {
    // xz -6 has an 8 MiB dictionary: about 9 MiB to decompress.
    let xz = xz_of(&nar(&[5u8; 10_000]), 6);
    let tight = Limits {
        xz_memory_limit_bytes: 4 << 20,
        ..LIMITS
    };
    let e = digest_into(chunks(xz.clone()), Compression::Xz, None, None, tight)
        .await
        .unwrap_err();
    assert!(rejected_with(&e, "upload.xz_memory_limit_bytes"), "{e:?}");
    assert!(check(xz, Compression::Xz).await.is_ok());
}

/// The default limit is enough for the largest preset (`xz -9`, a 64 MiB dictionary).
#[tokio::test]
async fn the_default_xz_limit_admits_xz_9() {
    let defaults = Limits::from_config(&crate::config::Config::default().upload);
    let xz = xz_of(&nar(&[9u8; 10_000]), 9);
    assert!(
        digest_into(chunks(xz), Compression::Xz, None, None, defaults)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn nars_over_max_nar_bytes_are_too_large() {
    let small = Limits {
        max_nar_bytes: 100_000,
        ..LIMITS
    };
    let too_large =
        |e: &Error| matches!(e, Error::Upload(UploadError::TooLarge { limit: 100_000 }));
    // As sent.
    let e = digest_into(
        chunks(nar(&[1u8; 150_000])),
        Compression::None,
        None,
        None,
        small,
    )
    .await
    .unwrap_err();
    assert!(too_large(&e), "{e:?}");
    // Small as sent, large decompressed.
    let bomb = zstd_of(&nar(&vec![0u8; 5_000_000]));
    assert!(bomb.len() < 100_000);
    let e = digest_into(chunks(bomb), Compression::Zstd, None, None, small)
        .await
        .unwrap_err();
    assert!(too_large(&e), "{e:?}");
    // At the limit is fine.
    let exact = nar(&vec![2u8; 100_000 - NAR_MAGIC.len() - 3]);
    assert!(
        digest_into(chunks(exact), Compression::None, None, None, small)
            .await
            .is_ok()
    );
}

/// A body that stops sending ends with `IdleTimeout`, not a wait for ever. Paused time: the
/// runtime jumps to the deadline as soon as nothing else can run.
#[tokio::test(start_paused = true)]
async fn an_idle_body_times_out() {
    let first = futures::stream::iter([Ok(Bytes::from(nar(b"x")))]);
    let stalled = first.chain(futures::stream::pending());
    let mut s = std::pin::pin!(with_idle_timeout(
        stalled,
        std::time::Duration::from_secs(30)
    ));
    assert!(s.next().await.unwrap().is_ok());
    let e = s.next().await.unwrap().unwrap_err();
    // Whoever sees the io::Error itself (a log line) reads what happened.
    assert_eq!(e.to_string(), "no data for 30 s");
    assert!(
        matches!(body_error(e), UploadError::IdleTimeout(30)),
        "wrong error"
    );
    assert!(
        s.next().await.is_none(),
        "the stream ends after the timeout"
    );
}

/// A brotli stream asking for a large window (up to 1 GiB of decoder memory) is refused, on
/// upload and when read back: Nix writes standard ones (at most 16 MiB).
#[tokio::test]
async fn brotli_streams_with_a_large_window_are_refused() {
    use std::io::Read as _;
    let plain = nar(&[3u8; 5000]);
    let large = {
        let params = brotli::enc::BrotliEncoderParams {
            large_window: true,
            lgwin: 26,
            ..Default::default()
        };
        let mut e = brotli::CompressorWriter::with_params(Vec::new(), 4096, &params);
        e.write_all(&plain).unwrap();
        e.into_inner()
    };
    let e = check(large.clone(), Compression::Brotli).await.unwrap_err();
    assert!(
        matches!(e, Error::Upload(UploadError::Rejected(_))),
        "{e:?}"
    );
    let mut out = Vec::new();
    let read = Compression::Brotli
        .decoder(&large[..], 1 << 20)
        .unwrap()
        .read_to_end(&mut out);
    assert!(read.is_err(), "read back: {} bytes", out.len());
}

#[test]
fn undecodable_compressions_are_refused_by_name() {
    for c in [Compression::Lzip, Compression::Lz4] {
        match check_decodable(c) {
            Err(UploadError::Rejected(m)) => assert!(m.contains("cannot be verified"), "{m}"),
            other => panic!("{c}: {other:?}"),
        }
    }
    for c in [
        Compression::None,
        Compression::Xz,
        Compression::Zstd,
        Compression::Bzip2,
        Compression::Brotli,
        Compression::Gzip,
    ] {
        assert!(check_decodable(c).is_ok(), "{c}");
    }
    assert_eq!(NarTooLarge.to_string(), "the decompressed NAR is too large");
}

/// The magic is checked across writes: a NAR whose first bytes arrive in a small piece, and
/// the rest of the magic inside a larger one, is accepted (the decoders pass on whatever
/// they have).
#[tokio::test]
async fn a_nar_whose_magic_arrives_in_pieces_is_accepted() {
    let plain = nar(&vec![5u8; 1000]);
    let (first, rest) = plain.split_at(3);
    let parts: Vec<io::Result<Bytes>> = std::iter::once(first)
        .chain(rest.chunks(100))
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let d = digest_into(
        futures::stream::iter(parts),
        Compression::None,
        None,
        None,
        LIMITS,
    )
    .await
    .unwrap();
    assert_eq!(d.nar.hash, Sha256::digest(&plain));
    assert_eq!(d.nar.size, plain.len() as u64);
}

/// Records the size of every chunk a writer is given.
struct ChunkSizes(std::sync::Arc<std::sync::Mutex<Vec<usize>>>);

#[async_trait::async_trait]
impl ObjectWriter for ChunkSizes {
    async fn write(&mut self, chunk: Bytes) -> Result<(), crate::store::StoreError> {
        self.0.lock().unwrap().push(chunk.len());
        Ok(())
    }
    async fn commit(self: Box<Self>) -> Result<(), crate::store::StoreError> {
        Ok(())
    }
    async fn abort(self: Box<Self>) {}
}

/// Re-encoded output reaches the store in 1 MiB chunks (the last one smaller), not in
/// whatever pieces the encoder writes: one S3 part holds a few chunks, not thousands.
#[tokio::test]
async fn re_encoded_output_is_sent_in_whole_chunks() {
    // Data that does not compress, so the output is as large as the input.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let payload: Vec<u8> = (0..3 * OUT_CHUNK + 12_345)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let sizes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut w: Box<dyn ObjectWriter> = Box::new(ChunkSizes(sizes.clone()));
    let d = digest_into(
        chunks(nar(&payload)),
        Compression::None,
        Some((Compression::Zstd, Some(1))),
        Some(&mut w),
        LIMITS,
    )
    .await
    .unwrap();
    let sizes = sizes.lock().unwrap().clone();
    assert!(sizes.len() >= 3, "{sizes:?}");
    let (last, whole) = sizes.split_last().unwrap();
    assert!(
        whole.iter().all(|s| *s >= OUT_CHUNK && *s < 2 * OUT_CHUNK),
        "{sizes:?}"
    );
    assert!(*last <= 2 * OUT_CHUNK, "{sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>() as u64, d.output.size);
}

/// Without a writer nothing is re-encoded: the output is the input, as sent.
#[tokio::test]
async fn without_a_writer_nothing_is_re_encoded() {
    let plain = nar(&vec![9u8; 50_000]);
    let d = digest_into(
        chunks(plain.clone()),
        Compression::None,
        Some((Compression::Zstd, Some(3))),
        None,
        LIMITS,
    )
    .await
    .unwrap();
    assert_eq!(d.output.hash, d.input.hash);
    assert_eq!(d.output.size, plain.len() as u64);
}

fn gzip_of(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// `data` in pieces of `size` bytes.
fn pieces(data: &[u8], size: usize) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let parts: Vec<io::Result<Bytes>> = data
        .chunks(size)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    futures::stream::iter(parts)
}

/// Nix names a gzip NAR `.nar`, as a plain one (`compression=gzip` gives it no extension):
/// sent under such a name, gzip data is decoded as gzip and said to be, whatever pieces it
/// comes in (the first shorter than gzip's magic too), and a plain NAR is plain. Declared
/// plain (a narinfo's `Compression: none`), or under another extension, gzip data is
/// refused; cut short, or re-encoded, it is gzip as any codec.
#[tokio::test]
async fn a_nar_named_plain_may_be_gzip() {
    let plain = nar(&(0..100_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
    let gz = gzip_of(&plain);
    for size in [1, 2, 3, 1000, gz.len()] {
        let d = digest_named_into(pieces(&gz, size), Compression::None, None, None, LIMITS)
            .await
            .unwrap();
        assert_eq!(d.compression, Compression::Gzip, "{size}");
        assert_eq!(d.nar.hash, Sha256::digest(&plain), "{size}");
        assert_eq!(d.nar.size, plain.len() as u64, "{size}");
        assert_eq!(d.input.hash, Sha256::digest(&gz), "{size}");
    }
    let d = digest_named_into(pieces(&plain, 1), Compression::None, None, None, LIMITS)
        .await
        .unwrap();
    assert_eq!(d.compression, Compression::None);
    assert_eq!(d.nar.hash, Sha256::digest(&plain));
    let d = check(gz.clone(), Compression::Gzip).await.unwrap();
    assert_eq!(
        (d.compression, d.nar.hash),
        (Compression::Gzip, Sha256::digest(&plain))
    );

    let e = check(gz.clone(), Compression::None).await.unwrap_err();
    assert!(rejected_with(&e, "not a NAR but gzip data"), "{e:?}");
    // Those Nix also names `.nar`, which cellar does not decode: said so, not "not a NAR".
    let mut lzma = liblzma::write::XzEncoder::new_stream(
        Vec::new(),
        liblzma::stream::Stream::new_lzma_encoder(
            &liblzma::stream::LzmaOptions::new_preset(6).unwrap(),
        )
        .unwrap(),
    );
    lzma.write_all(&plain).unwrap();
    let lzma = lzma.finish().unwrap();
    for (name, bytes) in [
        ("lzma", lzma),
        ("compress", b"\x1f\x9d\x90junk".to_vec()),
        ("lzop", b"\x89LZO\x00\r\n\x1a\n".to_vec()),
        ("grzip", b"GRZipII\x00\x02\x04:)".to_vec()),
        ("lrzip", b"LRZI\x00\x06".to_vec()),
    ] {
        let e = check(bytes, Compression::None).await.unwrap_err();
        let said = format!("not a NAR but {name} data, which cellar cannot verify");
        assert!(rejected_with(&e, &said), "{name}: {e:?}");
    }
    let e = check(b"\x5dnot lzma".to_vec(), Compression::None)
        .await
        .unwrap_err();
    assert!(rejected_with(&e, "declared: not a NAR"), "{e:?}");
    // The rest of a NAR alone (Nix 2.8's retry of an upload that failed midway): said so.
    let mut tail = vec![7u8; 64];
    tail.extend_from_slice(b"the rest of a NAR");
    let e = check(tail, Compression::None).await.unwrap_err();
    assert!(
        rejected_with(&e, "if an earlier try of this upload failed midway"),
        "{e:?}"
    );
    let e = digest_named_into(pieces(&gz, 1000), Compression::Zstd, None, None, LIMITS)
        .await
        .unwrap_err();
    assert!(rejected_with(&e, "does not decompress"), "{e:?}");
    for cut in [gz.len() - 1, gz.len() - 8, gz.len() / 2, 1] {
        let e = digest_named_into(
            pieces(&gz[..cut], 1000),
            Compression::None,
            None,
            None,
            LIMITS,
        )
        .await
        .unwrap_err();
        assert!(
            rejected_with(&e, "does not decompress"),
            "cut at {cut}: {e:?}"
        );
    }
    let e = check(b"\x1f\x00 not gzip".to_vec(), Compression::None)
        .await
        .unwrap_err();
    assert!(
        rejected_with(&e, "not a NAR") && !rejected_with(&e, "gzip"),
        "{e:?}"
    );

    use crate::store::Store as _;
    let store = crate::store::memory::MemoryStore::new();
    let mut w = store.writer("out").await.unwrap();
    let d = digest_named_into(
        pieces(&gz, 1000),
        Compression::None,
        Some((Compression::Zstd, Some(1))),
        Some(&mut w),
        LIMITS,
    )
    .await
    .unwrap();
    w.commit().await.unwrap();
    let stored = store.get_bytes("out", u64::MAX).await.unwrap().unwrap();
    assert_eq!(zstd::decode_all(&stored[..]).unwrap(), plain);
    assert_eq!(d.compression, Compression::Gzip);
    assert_eq!(d.output.hash, Sha256::digest(&stored));
}

#[tokio::test]
async fn a_body_shorter_than_the_magic_is_not_a_nar() {
    let e = check(NAR_MAGIC[..10].to_vec(), Compression::None)
        .await
        .unwrap_err();
    assert!(rejected_with(&e, "too short"), "{e:?}");
}

/// The body as sent is bounded too, not only what it decompresses to: zstd skippable frames
/// decompress to nothing, so a small NAR followed by a large one would otherwise be stored
/// whole.
#[tokio::test]
async fn a_body_over_the_limit_is_too_large_even_if_it_decompresses_to_little() {
    let limits = Limits {
        max_nar_bytes: 64 << 10,
        ..LIMITS
    };
    let mut body = zstd_of(&nar(b"small"));
    let pad = 200_000u32;
    body.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
    body.extend_from_slice(&pad.to_le_bytes());
    body.extend(std::iter::repeat_n(0u8, pad as usize));
    let e = digest_into(chunks(body), Compression::Zstd, None, None, limits)
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Upload(UploadError::TooLarge { .. })),
        "{e:?}"
    );
}
