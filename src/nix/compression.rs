//! Compression methods of NAR files, with the names Nix writes in `Compression:` and the file
//! extensions it gives them under `nar/`.

use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Xz,
    Zstd,
    Bzip2,
    Brotli,
    Lz4,
    Gzip,
    /// The rest of what Nix compresses with (through libarchive): served as stored, never
    /// decoded. `lzip` gets `.nar.lzip`; the others a bare `.nar`, as gzip does.
    Lzip,
    /// The legacy `.lzma` format (xz's predecessor), not xz.
    Lzma,
    Lzop,
    Grzip,
    Lrzip,
    Compress,
}

impl Compression {
    /// Every compression Nix knows.
    pub const ALL: [Self; 13] = [
        Self::None,
        Self::Xz,
        Self::Zstd,
        Self::Bzip2,
        Self::Brotli,
        Self::Lz4,
        Self::Gzip,
        Self::Lzip,
        Self::Lzma,
        Self::Lzop,
        Self::Grzip,
        Self::Lrzip,
        Self::Compress,
    ];

    /// The value of the narinfo `Compression:` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Xz => "xz",
            Self::Zstd => "zstd",
            Self::Bzip2 => "bzip2",
            Self::Brotli => "br",
            Self::Lz4 => "lz4",
            Self::Gzip => "gzip",
            Self::Lzip => "lzip",
            Self::Lzma => "lzma",
            Self::Lzop => "lzop",
            Self::Grzip => "grzip",
            Self::Lrzip => "lrzip",
            Self::Compress => "compress",
        }
    }

    /// The suffix Nix appends to `.nar`. Quirk kept from Nix: gzip (and lzma, lzop, grzip,
    /// lrzip, compress) get none.
    pub fn extension(self) -> &'static str {
        match self {
            Self::None
            | Self::Gzip
            | Self::Lzma
            | Self::Lzop
            | Self::Grzip
            | Self::Lrzip
            | Self::Compress => "",
            Self::Lzip => ".lzip",
            Self::Xz => ".xz",
            Self::Zstd => ".zst",
            Self::Bzip2 => ".bz2",
            Self::Brotli => ".br",
            Self::Lz4 => ".lz4",
        }
    }

    /// Whether cellar can decompress it (to verify an upload).
    pub fn can_decode(self) -> bool {
        matches!(
            self,
            Self::None | Self::Xz | Self::Zstd | Self::Bzip2 | Self::Brotli | Self::Gzip
        )
    }

    /// Whether cellar can re-encode uploads to it, and the levels it takes if so.
    pub fn encode_levels(self) -> Option<std::ops::RangeInclusive<i32>> {
        match self {
            Self::None => Some(0..=0),
            Self::Xz => Some(0..=9),
            Self::Zstd => Some(1..=19),
            Self::Bzip2
            | Self::Brotli
            | Self::Lz4
            | Self::Gzip
            | Self::Lzip
            | Self::Lzma
            | Self::Lzop
            | Self::Grzip
            | Self::Lrzip
            | Self::Compress => None,
        }
    }

    /// Whether cellar can re-encode uploads to it.
    pub fn can_encode(self) -> bool {
        self.encode_levels().is_some()
    }

    /// The compression an HTTP `Content-Encoding` names, as Nix names it in one when it
    /// uploads a narinfo, a listing or a log compressed (`narinfo-compression`, …): `None` for
    /// none (`identity`, or `none` as Nix's setting). `Err` (with the name) for a coding cellar
    /// does not decode: `lz4`, several codings, any other name.
    pub fn from_content_encoding(name: &str) -> Result<Option<Self>, String> {
        let name = name.trim().to_ascii_lowercase();
        let c = match name.as_str() {
            "" | "identity" | "none" => return Ok(None),
            "x-gzip" => Self::Gzip,
            other => other.parse().map_err(|_| name.clone())?,
        };
        match c {
            Self::Xz | Self::Zstd | Self::Bzip2 | Self::Brotli | Self::Gzip => Ok(Some(c)),
            Self::None => Ok(None),
            Self::Lz4
            | Self::Lzip
            | Self::Lzma
            | Self::Lzop
            | Self::Grzip
            | Self::Lrzip
            | Self::Compress => Err(name),
        }
    }

    /// `input` decompressed: a reader of what it decodes to. `xz_memory_limit` bounds the
    /// memory an xz stream's header may ask the decoder for. Several concatenated streams
    /// (members) are read as one, as Nix's own decoders do. `lz4` is not decoded (an error).
    pub fn decoder<'a, R: Read + 'a>(
        self,
        input: R,
        xz_memory_limit: u64,
    ) -> io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Self::None => Box::new(input),
            Self::Xz => {
                let stream = liblzma::stream::Stream::new_stream_decoder(
                    xz_memory_limit,
                    liblzma::stream::CONCATENATED,
                )?;
                Box::new(liblzma::read::XzDecoder::new_stream(input, stream))
            }
            Self::Zstd => Box::new(zstd::stream::read::Decoder::new(input)?),
            Self::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(input)),
            Self::Brotli => {
                let mut d = brotli_decompressor::Decompressor::new(input, 64 * 1024);
                // The standard window (at most 16 MiB), not the large one (up to 1 GiB) the
                // crate accepts by default: Nix and cache.nixos.org write standard streams.
                d.set_parameter(
                    brotli_decompressor::BrotliDecoderParameter::BROTLI_DECODER_PARAM_LARGE_WINDOW,
                    0,
                );
                Box::new(d)
            }
            Self::Gzip => Box::new(flate2::read::MultiGzDecoder::new(input)),
            Self::Lz4
            | Self::Lzip
            | Self::Lzma
            | Self::Lzop
            | Self::Grzip
            | Self::Lrzip
            | Self::Compress => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("cellar does not decode {self}"),
                ))
            }
        })
    }

    /// The compression named by an extension after `.nar.` (without the dot).
    pub fn from_extension(ext: &str) -> Option<Self> {
        match ext {
            "xz" => Some(Self::Xz),
            "zst" => Some(Self::Zstd),
            "bz2" => Some(Self::Bzip2),
            "br" => Some(Self::Brotli),
            "lz4" => Some(Self::Lz4),
            "lzip" => Some(Self::Lzip),
            _ => None,
        }
    }
}

impl FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "none" | "" => Self::None,
            "xz" => Self::Xz,
            "zstd" => Self::Zstd,
            "bzip2" => Self::Bzip2,
            "br" => Self::Brotli,
            "lz4" => Self::Lz4,
            "gzip" => Self::Gzip,
            "lzip" => Self::Lzip,
            "lzma" => Self::Lzma,
            "lzop" => Self::Lzop,
            "grzip" => Self::Grzip,
            "lrzip" => Self::Lrzip,
            "compress" => Self::Compress,
            other => return Err(format!("unknown compression {other:?}")),
        })
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for c in Compression::ALL {
            assert_eq!(c.as_str().parse::<Compression>().unwrap(), c);
            if let Some(ext) = c.extension().strip_prefix('.') {
                assert_eq!(Compression::from_extension(ext), Some(c));
            }
        }
        assert!("rar".parse::<Compression>().is_err());
        assert_eq!(Compression::from_extension("lzip"), Some(Compression::Lzip));
        // What Nix writes with libarchive's filters: named, served, never decoded.
        for c in ["lzip", "lzma", "lzop", "grzip", "lrzip", "compress"] {
            let c: Compression = c.parse().unwrap();
            assert!(!c.can_decode() && !c.can_encode(), "{c}");
            assert!(c.decoder(&b""[..], 1 << 20).is_err(), "{c}");
            assert!(
                Compression::from_content_encoding(c.as_str()).is_err(),
                "{c}"
            );
        }
    }
}
