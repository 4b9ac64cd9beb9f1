use std::io::Write as _;
use std::time::Duration;

use super::*;

/// `"cellar build log line\n"` 200 times, compressed by Python's `brotli.compress`.
const LOG_BR: &[u8] = b"\x1b\x2f\x11\xf8\x05\x6a\x87\xfb\x0f\xcb\xf6\xf2\x12\xa7\x28\x31\x98\xe5\xb4\x2a\x21\x9d\x54\xc0\xdf\x80\xeb\xa9\x11\x00\x66\x23";

fn log_text() -> Vec<u8> {
    b"cellar build log line\n".repeat(200)
}

fn coding(c: Compression) -> Option<Coding> {
    Some(Coding {
        compression: c,
        xz_memory_limit_bytes: 64 << 20,
    })
}

/// `data` compressed with `c` by the encoders cellar itself links (brotli has none: see
/// [`LOG_BR`]).
fn encode(c: Compression, data: &[u8]) -> Vec<u8> {
    match c {
        Compression::Xz => {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(data, 3).unwrap(),
        Compression::Bzip2 => {
            let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        other => panic!("no encoder for {other}"),
    }
}

/// `bytes` as a body of chunks of at most `size` bytes.
fn chunked(bytes: &[u8], size: usize) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let chunks: Vec<_> = bytes
        .chunks(size)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    futures::stream::iter(chunks)
}

async fn collect(
    s: futures::stream::BoxStream<'static, io::Result<Bytes>>,
) -> Result<Vec<u8>, UploadError> {
    let mut s = s;
    let mut out = Vec::new();
    while let Some(chunk) = s.next().await {
        out.extend_from_slice(&chunk.map_err(crate::upload::digest::body_error)?);
    }
    Ok(out)
}

#[test]
fn the_header_names_a_coding_cellar_decodes_or_is_refused() {
    assert_eq!(of(None).unwrap(), None);
    for plain in ["", "identity", " Identity ", "none"] {
        assert_eq!(of(Some(plain.as_bytes())).unwrap(), None, "{plain:?}");
    }
    for (name, c) in [
        ("xz", Compression::Xz),
        ("zstd", Compression::Zstd),
        ("bzip2", Compression::Bzip2),
        ("br", Compression::Brotli),
        ("gzip", Compression::Gzip),
        ("x-gzip", Compression::Gzip),
        (" GZIP ", Compression::Gzip),
    ] {
        assert_eq!(of(Some(name.as_bytes())).unwrap(), Some(c), "{name:?}");
    }
    for refused in ["lz4", "compress", "deflate", "gzip, br", "\u{e9}"] {
        match of(Some(refused.as_bytes())) {
            Err(UploadError::UnsupportedEncoding(_)) => {}
            other => panic!("{refused:?}: {other:?}"),
        }
    }
    assert!(matches!(
        of(Some(b"\xff")),
        Err(UploadError::UnsupportedEncoding(_))
    ));
}

/// Nothing starts before the decoded body is asked for: built outside any runtime (where
/// starting the decoder's thread would panic), it can be dropped unread. An upload waiting
/// for a slot thus neither reads its body (`100 Continue`) nor holds a thread.
#[test]
fn the_decoder_starts_when_the_body_is_first_read() {
    let never_polled =
        futures::stream::poll_fn(|_| -> std::task::Poll<Option<io::Result<Bytes>>> {
            panic!("the body was read")
        });
    drop(decode(coding(Compression::Gzip), never_polled, 1 << 20));
}

#[tokio::test]
async fn every_coding_nix_sends_is_decoded_whatever_the_chunks() {
    let text = log_text();
    for c in [
        Compression::Xz,
        Compression::Zstd,
        Compression::Bzip2,
        Compression::Gzip,
    ] {
        let sent = encode(c, &text);
        for size in [1, 7, 4096] {
            let out = collect(decode(coding(c), chunked(&sent, size), 1 << 20)).await;
            assert_eq!(out.unwrap(), text, "{c} in chunks of {size}");
        }
    }
    for size in [1, 5, 4096] {
        let out = collect(decode(
            coding(Compression::Brotli),
            chunked(LOG_BR, size),
            1 << 20,
        ));
        assert_eq!(out.await.unwrap(), text, "br in chunks of {size}");
    }
}

#[tokio::test]
async fn no_coding_passes_the_body_on_as_it_is() {
    let out = collect(decode(None, chunked(b"not compressed", 3), 1 << 20)).await;
    assert_eq!(out.unwrap(), b"not compressed");
    let all = decode_all(None, Bytes::from_static(b"as sent"), 1).await;
    assert_eq!(&all.unwrap()[..], b"as sent");
}

#[tokio::test]
async fn concatenated_members_are_decoded_as_one() {
    for c in [
        Compression::Xz,
        Compression::Zstd,
        Compression::Bzip2,
        Compression::Gzip,
    ] {
        let mut sent = encode(c, b"first\n");
        sent.extend(encode(c, b"second\n"));
        let out = collect(decode(coding(c), chunked(&sent, 3), 1 << 20)).await;
        assert_eq!(out.unwrap(), b"first\nsecond\n", "{c}");
    }
}

#[tokio::test]
async fn more_decoded_than_the_limit_is_too_large() {
    let text = log_text();
    let limit = text.len() as u64 - 1;
    for c in [Compression::Zstd, Compression::Gzip] {
        let sent = encode(c, &text);
        match collect(decode(coding(c), chunked(&sent, 64), limit)).await {
            Err(UploadError::TooLarge { limit: l }) => assert_eq!(l, limit),
            other => panic!("{c}: {other:?}"),
        }
        // Exactly the limit is accepted.
        let out = collect(decode(coding(c), chunked(&sent, 64), limit + 1)).await;
        assert_eq!(out.unwrap().len(), text.len());
    }
    match collect(decode(
        coding(Compression::Brotli),
        chunked(LOG_BR, 8),
        4399,
    ))
    .await
    {
        Err(UploadError::TooLarge { .. }) => {}
        other => panic!("br: {other:?}"),
    }
}

#[tokio::test]
async fn more_sent_than_the_limit_is_too_large_even_if_it_decodes_to_little() {
    // Empty gzip members: each decodes to nothing.
    let empty = encode(Compression::Gzip, b"");
    let sent = empty.repeat(100);
    let limit = sent.len() as u64 - 1;
    match collect(decode(coding(Compression::Gzip), chunked(&sent, 16), limit)).await {
        Err(UploadError::TooLarge { limit: l }) => assert_eq!(l, limit),
        other => panic!("{other:?}"),
    }
    let out = collect(decode(
        coding(Compression::Gzip),
        chunked(&sent, 16),
        limit + 1,
    ))
    .await;
    assert_eq!(out.unwrap(), b"");
}

#[tokio::test]
async fn a_body_that_does_not_decode_is_rejected_naming_its_coding() {
    for c in [
        Compression::Xz,
        Compression::Zstd,
        Compression::Bzip2,
        Compression::Gzip,
        Compression::Brotli,
    ] {
        match collect(decode(
            coding(c),
            chunked(b"plain text, not compressed", 4),
            1 << 20,
        ))
        .await
        {
            Err(UploadError::Rejected(m)) => {
                assert!(m.contains(c.as_str()), "{c}: {m}")
            }
            other => panic!("{c}: {other:?}"),
        }
    }
    // Cut short.
    let sent = encode(Compression::Xz, &log_text());
    let short = &sent[..sent.len() - 8];
    match collect(decode(coding(Compression::Xz), chunked(short, 16), 1 << 20)).await {
        Err(UploadError::Rejected(_)) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_xz_stream_asking_for_more_memory_than_allowed_is_rejected() {
    let sent = encode(Compression::Xz, &log_text());
    let tight = Some(Coding {
        compression: Compression::Xz,
        xz_memory_limit_bytes: 1024,
    });
    match collect(decode(tight, chunked(&sent, 64), 1 << 20)).await {
        Err(UploadError::Rejected(_)) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_body_breaking_or_stalling_is_its_own_failure_not_a_bad_coding() {
    let sent = encode(Compression::Zstd, &log_text());
    let half = Bytes::copy_from_slice(&sent[..sent.len() / 2]);
    let broken = futures::stream::iter(vec![
        Ok(half.clone()),
        Err(io::Error::other("connection reset")),
    ]);
    match collect(decode(coding(Compression::Zstd), broken, 1 << 20)).await {
        Err(UploadError::Body(m)) => assert!(m.contains("connection reset"), "{m}"),
        other => panic!("{other:?}"),
    }
    // A body that stops sending ends with the idle timeout's error.
    let stalled = crate::upload::digest::with_idle_timeout(
        futures::stream::iter(vec![Ok(half)]).chain(futures::stream::pending()),
        Duration::from_millis(20),
    );
    match collect(decode(coding(Compression::Zstd), stalled, 1 << 20)).await {
        Err(UploadError::IdleTimeout(_)) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn decode_all_decodes_a_whole_body_and_keeps_its_limit() {
    let text = log_text();
    let sent = Bytes::from(encode(Compression::Bzip2, &text));
    let out = decode_all(coding(Compression::Bzip2), sent.clone(), 1 << 20).await;
    assert_eq!(&out.unwrap()[..], &text[..]);
    match decode_all(coding(Compression::Bzip2), sent, 100).await {
        Err(UploadError::TooLarge { limit: 100 }) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_decoder_stops_when_the_reader_goes_away() {
    // The body comes from the test; once the decoded stream is dropped, the decoder must stop
    // reading it (and so drop it) at its next chunk, not decode on for an upload given up.
    let (body_tx, mut body_rx) = mpsc::channel::<io::Result<Bytes>>(1);
    let body = futures::stream::poll_fn(move |cx| body_rx.poll_recv(cx));
    let chunk = Bytes::from(encode(Compression::Gzip, &[b'a'; 100_000]));
    let mut s = decode(coding(Compression::Gzip), body, u64::MAX);
    body_tx.send(Ok(chunk.clone())).await.unwrap();
    assert!(!s.next().await.unwrap().unwrap().is_empty());
    drop(s);
    let mut sent = 0;
    while body_tx.send(Ok(chunk.clone())).await.is_ok() {
        sent += 1;
        assert!(
            sent < 100,
            "the decoder still reads the body after its reader went away"
        );
    }
}

/// A decoder that dies half-way (here the body panics under it) ends the decoded body with an
/// error: what it produced before is not taken for the whole (a truncated log stored as
/// uploaded).
#[tokio::test]
async fn a_decoder_that_dies_does_not_pass_for_a_complete_body() {
    let text: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let sent = encode(Compression::Gzip, &text);
    let half = Bytes::copy_from_slice(&sent[..sent.len() / 2]);
    let mut polls = 0;
    let body = futures::stream::poll_fn(move |_| {
        polls += 1;
        if polls > 1 {
            panic!("the body's source failed (a test)");
        }
        std::task::Poll::Ready(Some(Ok(half.clone())))
    });
    match collect(decode(coding(Compression::Gzip), body, 1 << 30)).await {
        Err(UploadError::Internal(m)) => assert!(m.contains("decoder"), "{m}"),
        other => panic!("{:?}", other.map(|b| b.len())),
    }
}
