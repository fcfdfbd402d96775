//! Seal: a batch's bytes → one versioned envelope, compressed and encrypted
//! with the tenant's own key (AES-256-GCM), and back.
//!
//! ```text
//! "HLSB" | version 1 | algorithm u8 | tenant_len u16 | tenant | key_id_len u8 | key_id
//!        | sequence u64 | first_lsn u64 | last_lsn u64 | events u32 | plain_len u32
//!        | nonce [12]                                   ── all of the above: associated data
//!        | body_len u32 | body = AES-256-GCM(compress(plain)) with its 16-byte tag
//! ```
//!
//! The whole header is authenticated: a batch cannot be moved to another
//! tenant, given another sequence, or relabelled with another key without
//! [`open`] refusing it. Each envelope has a fresh random 96-bit nonce; each
//! key seals a bounded number of batches ([`keys::MAX_MESSAGES_PER_KEY`]).
//! The decoder reads outside bytes: it never panics, checks every length
//! before using it, and decompresses to at most the authenticated
//! `plain_len` (≤ [`MAX_PLAIN_LEN`]). Fuzz target: `fuzz/fuzz_targets/envelope.rs`.
//!
//! The capture node seals, the apply node opens (the transport module); in
//! one process (`[transport] mode = "local"`) nothing is sealed.

pub mod compress;
pub mod keys;

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use rand::RngCore;

use crate::lsn::Lsn;
pub use compress::{Algorithm, Compression, Dictionary};
pub use keys::{FileKeys, KeyError, KeyProvider, TenantKey};

const MAGIC: &[u8; 4] = b"HLSB";
/// The envelope format version this build writes and reads.
pub const VERSION: u8 = 1;
/// Largest batch body accepted (uncompressed).
pub const MAX_PLAIN_LEN: usize = 256 << 20;

/// Why an envelope was refused or could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("not a sealed batch: {0}")]
    Malformed(String),
    #[error("sealed batch format version {0} is not supported (this build reads version {VERSION}); upgrade the apply node")]
    Version(u8),
    #[error("batch of tenant '{found}' offered as tenant '{expected}'")]
    CrossTenant { expected: String, found: String },
    #[error(
        "batch sequence {sequence} of tenant '{tenant}' is not after {last}: replayed or reordered"
    )]
    Replay {
        tenant: String,
        sequence: u64,
        last: u64,
    },
    #[error("batch of tenant '{tenant}' failed authentication: tampered with, or sealed with another key")]
    Authentication { tenant: String },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("batch body: {0}")]
    Compression(String),
}

impl SealError {
    /// The `error_type` label this error is counted under.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Malformed(_) | Self::Version(_) | Self::Compression(_) => "envelope_invalid",
            Self::CrossTenant { .. } => "envelope_cross_tenant",
            Self::Replay { .. } => "envelope_replay",
            Self::Authentication { .. } => "envelope_authentication",
            Self::Key(_) => "key",
        }
    }
}

/// What the header says about a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub tenant: String,
    pub key_id: String,
    pub algorithm: Algorithm,
    pub sequence: u64,
    pub first_lsn: Lsn,
    pub last_lsn: Lsn,
    pub events: u32,
    pub plain_len: u32,
}

/// A sealed batch and what sealing achieved.
#[derive(Debug, Clone)]
pub struct Sealed {
    pub bytes: Vec<u8>,
    /// Compressed body size / plain size (the guide's `heliosdb_compression_ratio`).
    pub ratio: f64,
}

/// Identity of a batch to seal.
#[derive(Debug, Clone)]
pub struct BatchInfo<'a> {
    pub tenant: &'a str,
    pub sequence: u64,
    pub first_lsn: Lsn,
    pub last_lsn: Lsn,
    pub events: u32,
}

/// Compress and encrypt `plain` for `batch.tenant`.
pub fn seal(
    batch: &BatchInfo<'_>,
    plain: &[u8],
    compression: &Compression,
    keys: &dyn KeyProvider,
) -> Result<Sealed, SealError> {
    if plain.len() > MAX_PLAIN_LEN {
        return Err(SealError::Malformed(format!(
            "batch of {} bytes exceeds {MAX_PLAIN_LEN}",
            plain.len()
        )));
    }
    let tenant_len = u16::try_from(batch.tenant.len())
        .map_err(|_| SealError::Malformed("tenant id too long".into()))?;
    let key = keys.sealing_key(batch.tenant)?;
    let key_id_len =
        u8::try_from(key.id.len()).map_err(|_| SealError::Malformed("key id too long".into()))?;
    key.use_once(batch.tenant)?;
    let (algorithm, mut body) = compress::compress(compression, plain)?;

    let mut out = Vec::with_capacity(64 + batch.tenant.len() + body.len() + 16);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(algorithm as u8);
    out.extend_from_slice(&tenant_len.to_be_bytes());
    out.extend_from_slice(batch.tenant.as_bytes());
    out.push(key_id_len);
    out.extend_from_slice(key.id.as_bytes());
    out.extend_from_slice(&batch.sequence.to_be_bytes());
    out.extend_from_slice(&batch.first_lsn.0.to_be_bytes());
    out.extend_from_slice(&batch.last_lsn.0.to_be_bytes());
    out.extend_from_slice(&batch.events.to_be_bytes());
    out.extend_from_slice(&(plain.len() as u32).to_be_bytes());
    let mut nonce = [0u8; 12];
    rand::rng().fill_bytes(&mut nonce);
    out.extend_from_slice(&nonce);

    let cipher = Aes256Gcm::new_from_slice(key.bytes())
        .map_err(|_| SealError::Malformed("bad key length".into()))?;
    let nonce_arr =
        Nonce::try_from(&nonce[..]).map_err(|_| SealError::Malformed("nonce".into()))?;
    // Encrypted in place: no second copy of the batch.
    let tag = cipher
        .encrypt_inout_detached(&nonce_arr, &out, body.as_mut_slice().into())
        .map_err(|_| SealError::Malformed("encryption failed".into()))?;
    let body_len = u32::try_from(body.len() + tag.len())
        .map_err(|_| SealError::Malformed("body too long".into()))?;
    out.extend_from_slice(&body_len.to_be_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(tag.as_slice());
    let ratio = if plain.is_empty() {
        1.0
    } else {
        body.len() as f64 / plain.len() as f64
    };
    Ok(Sealed { bytes: out, ratio })
}

/// Check, decrypt and decompress an envelope meant for `expected_tenant`.
/// `after_sequence`: the last sequence accepted for the tenant; the batch
/// must come after it.
pub fn open(
    bytes: &[u8],
    expected_tenant: &str,
    after_sequence: Option<u64>,
    keys: &dyn KeyProvider,
) -> Result<(Header, Vec<u8>), SealError> {
    open_with(bytes, expected_tenant, after_sequence, keys, None)
}

/// [`open`], with the zstd dictionary of `[compression] dictionary_path`.
pub fn open_with(
    bytes: &[u8],
    expected_tenant: &str,
    after_sequence: Option<u64>,
    keys: &dyn KeyProvider,
    dictionary: Option<&Dictionary>,
) -> Result<(Header, Vec<u8>), SealError> {
    let mut r = Reader { buf: bytes, pos: 0 };
    if r.take(4)? != MAGIC {
        return Err(SealError::Malformed("bad magic".into()));
    }
    let version = r.u8()?;
    if version != VERSION {
        return Err(SealError::Version(version));
    }
    let algorithm_byte = r.u8()?;
    let algorithm = Algorithm::from_wire(algorithm_byte)
        .ok_or_else(|| SealError::Malformed(format!("unknown compression {algorithm_byte}")))?;
    let tenant_len = u16::from_be_bytes(r.array()?) as usize;
    let tenant = std::str::from_utf8(r.take(tenant_len)?)
        .map_err(|_| SealError::Malformed("tenant is not UTF-8".into()))?
        .to_string();
    let key_id_len = r.u8()? as usize;
    let key_id = std::str::from_utf8(r.take(key_id_len)?)
        .map_err(|_| SealError::Malformed("key id is not UTF-8".into()))?
        .to_string();
    let header = Header {
        tenant,
        key_id,
        algorithm,
        sequence: u64::from_be_bytes(r.array()?),
        first_lsn: Lsn(u64::from_be_bytes(r.array()?)),
        last_lsn: Lsn(u64::from_be_bytes(r.array()?)),
        events: u32::from_be_bytes(r.array()?),
        plain_len: u32::from_be_bytes(r.array()?),
    };
    let nonce: [u8; 12] = r.array()?;
    let aad_end = r.pos;
    let body_len = u32::from_be_bytes(r.array()?) as usize;
    let body = r.take(body_len)?;
    if r.pos != bytes.len() {
        return Err(SealError::Malformed(format!(
            "{} trailing bytes",
            bytes.len() - r.pos
        )));
    }
    if header.plain_len as usize > MAX_PLAIN_LEN {
        return Err(SealError::Malformed(format!(
            "announced size {} exceeds {MAX_PLAIN_LEN}",
            header.plain_len
        )));
    }
    if header.tenant != expected_tenant {
        return Err(SealError::CrossTenant {
            expected: expected_tenant.to_string(),
            found: header.tenant,
        });
    }
    let key = keys.opening_key(&header.tenant, &header.key_id)?;
    let cipher = Aes256Gcm::new_from_slice(key.bytes())
        .map_err(|_| SealError::Malformed("bad key length".into()))?;
    let nonce = Nonce::try_from(&nonce[..]).map_err(|_| SealError::Malformed("nonce".into()))?;
    let aad = bytes
        .get(..aad_end)
        .ok_or_else(|| SealError::Malformed("header".into()))?;
    let unauthentic = || SealError::Authentication {
        tenant: header.tenant.clone(),
    };
    let split = body.len().checked_sub(16).ok_or_else(unauthentic)?;
    let (ciphertext, tag) = body.split_at(split);
    let tag = Tag::try_from(tag).map_err(|_| unauthentic())?;
    let mut compressed = ciphertext.to_vec();
    cipher
        .decrypt_inout_detached(&nonce, aad, compressed.as_mut_slice().into(), &tag)
        .map_err(|_| unauthentic())?;
    // Only an authenticated sequence is compared.
    if let Some(last) = after_sequence {
        if header.sequence <= last {
            return Err(SealError::Replay {
                tenant: header.tenant,
                sequence: header.sequence,
                last,
            });
        }
    }
    let plain = compress::decompress(
        header.algorithm,
        &compressed,
        header.plain_len as usize,
        dictionary,
    )?;
    Ok((header, plain))
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SealError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or_else(|| SealError::Malformed("length overflow".into()))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or_else(|| SealError::Malformed("truncated".into()))?;
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], SealError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, SealError> {
        Ok(self.array::<1>()?[0])
    }
}

#[cfg(test)]
mod tests;
