//! Compression of batch bodies. Decompression is bounded by the length the
//! (authenticated) header announces, so a hostile body cannot exhaust memory.

use std::cell::RefCell;
use std::io::{Read, Write};

use super::SealError;

/// `[compression] algorithm`, plus `None` for bodies under `min_size_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    None = 0,
    Zstd = 1,
    Snappy = 2,
    Lz4 = 3,
    Gzip = 4,
    /// zstd with the dictionary of `[compression] dictionary_path`.
    ZstdDict = 5,
}

impl Algorithm {
    pub fn from_wire(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::None,
            1 => Self::Zstd,
            2 => Self::Snappy,
            3 => Self::Lz4,
            4 => Self::Gzip,
            5 => Self::ZstdDict,
            _ => return None,
        })
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "none" => Self::None,
            "zstd" => Self::Zstd,
            "snappy" => Self::Snappy,
            "lz4" => Self::Lz4,
            "gzip" => Self::Gzip,
            _ => return None,
        })
    }
}

/// How to compress.
#[derive(Debug, Clone)]
pub struct Compression {
    pub algorithm: Algorithm,
    /// zstd 1–22, gzip 0–9; ignored by snappy and lz4.
    pub level: i32,
    /// Bodies smaller than this are not compressed.
    pub min_size_bytes: usize,
    /// A zstd dictionary (both nodes load the same file).
    pub dictionary: Option<std::sync::Arc<Dictionary>>,
}

/// A zstd dictionary, digested once for compressing and once for
/// decompressing (digesting it per batch would cost more than the batch).
pub struct Dictionary {
    encoder: zstd::dict::EncoderDictionary<'static>,
    decoder: zstd::dict::DecoderDictionary<'static>,
    pub len: usize,
}

impl Dictionary {
    pub fn new(raw: &[u8], level: i32) -> Self {
        Self {
            encoder: zstd::dict::EncoderDictionary::copy(raw, level),
            decoder: zstd::dict::DecoderDictionary::copy(raw),
            len: raw.len(),
        }
    }
}

impl std::fmt::Debug for Dictionary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dictionary({} bytes)", self.len)
    }
}

pub(super) fn compress(c: &Compression, plain: &[u8]) -> Result<(Algorithm, Vec<u8>), SealError> {
    let algorithm = if plain.len() < c.min_size_bytes {
        Algorithm::None
    } else if c.algorithm == Algorithm::Zstd && c.dictionary.is_some() {
        Algorithm::ZstdDict
    } else {
        c.algorithm
    };
    let fail = |e: std::io::Error| SealError::Compression(e.to_string());
    let out = match algorithm {
        Algorithm::None => plain.to_vec(),
        Algorithm::Zstd => zstd_compress(plain, c.level).map_err(fail)?,
        Algorithm::ZstdDict => {
            let dict = c
                .dictionary
                .as_deref()
                .ok_or_else(|| SealError::Compression("no dictionary".into()))?;
            zstd::bulk::Compressor::with_prepared_dictionary(&dict.encoder)
                .and_then(|mut z| z.compress(plain))
                .map_err(fail)?
        }
        Algorithm::Snappy => snap::raw::Encoder::new()
            .compress_vec(plain)
            .map_err(|e| SealError::Compression(e.to_string()))?,
        Algorithm::Lz4 => lz4_flex::block::compress(plain),
        Algorithm::Gzip => {
            let level = flate2::Compression::new(c.level.clamp(0, 9) as u32);
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), level);
            enc.write_all(plain).map_err(fail)?;
            enc.finish().map_err(fail)?
        }
    };
    Ok((algorithm, out))
}

thread_local! {
    /// One zstd context per thread (each pipeline has its own), reused for
    /// every batch: a new level-3 context per batch spent more time
    /// allocating and clearing its tables than compressing.
    static ZSTD_COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    static ZSTD_DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

pub(super) fn zstd_compress(plain: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    ZSTD_COMPRESSOR.with_borrow_mut(|slot| {
        let z = match slot {
            Some((l, z)) if *l == level => z,
            _ => &mut slot.insert((level, zstd::bulk::Compressor::new(level)?)).1,
        };
        z.compress(plain)
    })
}

pub(super) fn zstd_decompress(body: &[u8], plain_len: usize) -> std::io::Result<Vec<u8>> {
    ZSTD_DECOMPRESSOR.with_borrow_mut(|slot| {
        let z = match slot {
            Some(z) => z,
            None => slot.insert(zstd::bulk::Decompressor::new()?),
        };
        z.decompress(body, plain_len)
    })
}

/// Decompress to exactly `plain_len` bytes, never more.
pub(super) fn decompress(
    algorithm: Algorithm,
    body: &[u8],
    plain_len: usize,
    dictionary: Option<&Dictionary>,
) -> Result<Vec<u8>, SealError> {
    let bad = |what: String| SealError::Compression(what);
    let out = match algorithm {
        Algorithm::None => body.to_vec(),
        Algorithm::Zstd => zstd_decompress(body, plain_len).map_err(|e| bad(e.to_string()))?,
        Algorithm::ZstdDict => {
            let dict = dictionary.ok_or_else(|| {
                bad("compressed with a zstd dictionary, and this node has none: set [compression] dictionary_path to the capture node's dictionary file".into())
            })?;
            zstd::bulk::Decompressor::with_prepared_dictionary(&dict.decoder)
                .and_then(|mut z| z.decompress(body, plain_len))
                .map_err(|e| {
                    bad(format!(
                        "{e} (is [compression] dictionary_path the same file on both nodes?)"
                    ))
                })?
        }
        Algorithm::Snappy => {
            let n = snap::raw::decompress_len(body).map_err(|e| bad(e.to_string()))?;
            if n != plain_len {
                return Err(bad(format!(
                    "snappy body announces {n} bytes, header {plain_len}"
                )));
            }
            snap::raw::Decoder::new()
                .decompress_vec(body)
                .map_err(|e| bad(e.to_string()))?
        }
        Algorithm::Lz4 => {
            lz4_flex::block::decompress(body, plain_len).map_err(|e| bad(e.to_string()))?
        }
        Algorithm::Gzip => {
            let mut out = Vec::with_capacity(plain_len.min(1 << 20));
            flate2::read::GzDecoder::new(body)
                .take(plain_len as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| bad(e.to_string()))?;
            out
        }
    };
    if out.len() != plain_len {
        return Err(bad(format!(
            "body decompressed to {} bytes, header says {plain_len}",
            out.len()
        )));
    }
    Ok(out)
}
