//! Decoder of `pgoutput` logical replication messages (protocol versions 1
//! and 2: version 2 adds the stream messages of in-progress transactions,
//! inside which every change carries its (sub)transaction id).
//!
//! Input is bytes from the network: the decoder never panics, never indexes
//! without a bounds check, and never allocates more than the input could
//! describe (lengths are checked against what remains before any buffer is
//! reserved). It has a fuzz target (`fuzz/fuzz_targets/pgoutput.rs`) and a
//! property test that feeds it arbitrary bytes.
//!
//! Column values stay in PostgreSQL's own text form, as `Bytes` slices of the
//! message (no copy, never through a float).

use bytes::Bytes;

use crate::lsn::Lsn;

/// What a message could not be decoded as, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("pgoutput message is empty")]
    Empty,
    #[error("pgoutput '{tag}' message truncated while reading {what}")]
    Truncated { tag: char, what: &'static str },
    #[error("pgoutput '{tag}' message has an invalid {what}: {value}")]
    Invalid {
        tag: char,
        what: &'static str,
        value: i64,
    },
    #[error("pgoutput '{tag}' message has a string that is not UTF-8")]
    NotUtf8 { tag: char },
    #[error("pgoutput message type '{0}' (0x{1:02x}) is not supported with proto_version 2")]
    UnknownTag(char, u8),
    #[error("pgoutput '{0}' message is not allowed inside a stream block")]
    NotInStream(char),
    #[error("pgoutput '{tag}' message has {extra} unexpected trailing bytes")]
    Trailing { tag: char, extra: usize },
}

impl From<DecodeError> for crate::error::ReplicationError {
    fn from(e: DecodeError) -> Self {
        Self::Decode(e.to_string())
    }
}

/// One column value of a row image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// An unchanged TOAST value: the row's stored value stays as it is.
    UnchangedToast,
    /// PostgreSQL's text output of the value.
    Text(Bytes),
    /// Binary send format (only with the `binary` option, which we do not use).
    Binary(Bytes),
}

/// A row image.
pub type Tuple = Vec<Value>;

/// A column of a relation as the source describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnDesc {
    /// Part of the replica identity key.
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// A relation (table) description, sent before the first change to it and
/// again after its definition changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationDesc {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<ColumnDesc>,
}

/// Which old row image an UPDATE or DELETE carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldImage {
    /// `K`: only the replica identity key columns (others are NULL).
    Key,
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full,
}

/// A decoded `pgoutput` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        final_lsn: Lsn,
        commit_time_us: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time_us: i64,
    },
    Origin {
        commit_lsn: Lsn,
        name: String,
    },
    Relation(RelationDesc),
    Type {
        id: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation_id: u32,
        new: Tuple,
    },
    Update {
        relation_id: u32,
        old: Option<(OldImage, Tuple)>,
        new: Tuple,
    },
    Delete {
        relation_id: u32,
        old_image: OldImage,
        old: Tuple,
    },
    Truncate {
        cascade: bool,
        restart_identity: bool,
        relation_ids: Vec<u32>,
    },
    /// `pg_logical_emit_message` output.
    LogicalMessage {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
    /// Proto 2: a block of an in-progress transaction's changes starts.
    StreamStart {
        xid: u32,
        first_segment: bool,
    },
    /// Proto 2: the block ends (the transaction is still open).
    StreamStop,
    /// Proto 2: a streamed transaction committed.
    StreamCommit {
        xid: u32,
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time_us: i64,
    },
    /// Proto 2: a streamed transaction (`subxid == xid`) or one of its
    /// subtransactions rolled back.
    StreamAbort {
        xid: u32,
        subxid: u32,
    },
}

/// Decode one message (the payload of an XLogData frame).
pub fn decode(data: &Bytes) -> Result<Message, DecodeError> {
    let (tag_byte, mut r) = Reader::after_tag(data)?;
    let msg = decode_body(tag_byte, &mut r)?;
    r.finish()?;
    Ok(msg)
}

/// Does a message of this type carry its transaction id when it comes
/// inside a stream block?
pub fn carries_xid_in_stream(tag: u8) -> bool {
    matches!(tag, b'R' | b'Y' | b'I' | b'U' | b'D' | b'T' | b'M')
}

/// Decode one message sent inside a stream block (between `StreamStart` and
/// `StreamStop`): changes, relations, types and transactional messages
/// carry the id of the (sub)transaction that made them first.
pub fn decode_streamed(data: &Bytes) -> Result<(u32, Message), DecodeError> {
    let (tag_byte, mut r) = Reader::after_tag(data)?;
    if !carries_xid_in_stream(tag_byte) {
        return Err(DecodeError::NotInStream(r.tag));
    }
    let xid = r.u32("xid")?;
    let msg = decode_body(tag_byte, &mut r)?;
    r.finish()?;
    Ok((xid, msg))
}

fn decode_body(tag_byte: u8, r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let tag = r.tag;
    let msg = match tag_byte {
        b'B' => Message::Begin {
            final_lsn: Lsn(r.u64("final LSN")?),
            commit_time_us: r.i64("commit time")?,
            xid: r.u32("xid")?,
        },
        b'C' => Message::Commit {
            flags: r.u8("flags")?,
            commit_lsn: Lsn(r.u64("commit LSN")?),
            end_lsn: Lsn(r.u64("end LSN")?),
            commit_time_us: r.i64("commit time")?,
        },
        b'O' => Message::Origin {
            commit_lsn: Lsn(r.u64("commit LSN")?),
            name: r.cstr("origin name")?,
        },
        b'R' => {
            let id = r.u32("relation id")?;
            let namespace = r.cstr("namespace")?;
            let name = r.cstr("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let n = r.count("column count")?;
            // Each column takes at least 10 bytes: bound the reservation.
            let mut columns = Vec::with_capacity(n.min(r.remaining() / 10));
            for _ in 0..n {
                let flags = r.u8("column flags")?;
                let name = r.cstr("column name")?;
                let type_oid = r.u32("column type")?;
                let type_modifier = r.i32("type modifier")?;
                columns.push(ColumnDesc {
                    is_key: flags & 1 == 1,
                    name,
                    type_oid,
                    type_modifier,
                });
            }
            Message::Relation(RelationDesc {
                id,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => Message::Type {
            id: r.u32("type id")?,
            namespace: r.cstr("type namespace")?,
            name: r.cstr("type name")?,
        },
        b'I' => {
            let relation_id = r.u32("relation id")?;
            r.expect_marker(b'N', "new tuple marker")?;
            Message::Insert {
                relation_id,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation_id = r.u32("relation id")?;
            let mut marker = r.u8("tuple marker")?;
            let mut old = None;
            if marker == b'K' || marker == b'O' {
                let kind = if marker == b'K' {
                    OldImage::Key
                } else {
                    OldImage::Full
                };
                old = Some((kind, r.tuple()?));
                marker = r.u8("new tuple marker")?;
            }
            if marker != b'N' {
                return Err(r.invalid("tuple marker", i64::from(marker)));
            }
            Message::Update {
                relation_id,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation_id = r.u32("relation id")?;
            let marker = r.u8("old tuple marker")?;
            let old_image = match marker {
                b'K' => OldImage::Key,
                b'O' => OldImage::Full,
                other => return Err(r.invalid("old tuple marker", i64::from(other))),
            };
            Message::Delete {
                relation_id,
                old_image,
                old: r.tuple()?,
            }
        }
        b'T' => {
            let n = r.u32("relation count")?;
            let options = r.u8("options")?;
            if (n as usize) > r.remaining() / 4 {
                return Err(r.truncated("relation ids"));
            }
            let mut relation_ids = Vec::with_capacity(n as usize);
            for _ in 0..n {
                relation_ids.push(r.u32("relation id")?);
            }
            Message::Truncate {
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
                relation_ids,
            }
        }
        b'M' => {
            let flags = r.u8("flags")?;
            let lsn = Lsn(r.u64("message LSN")?);
            let prefix = r.cstr("prefix")?;
            let len = r.len32("content length")?;
            Message::LogicalMessage {
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content: r.bytes(len, "content")?,
            }
        }
        b'S' => Message::StreamStart {
            xid: r.u32("xid")?,
            first_segment: r.u8("first segment")? == 1,
        },
        b'E' => Message::StreamStop,
        b'c' => Message::StreamCommit {
            xid: r.u32("xid")?,
            flags: r.u8("flags")?,
            commit_lsn: Lsn(r.u64("commit LSN")?),
            end_lsn: Lsn(r.u64("end LSN")?),
            commit_time_us: r.i64("commit time")?,
        },
        b'A' => Message::StreamAbort {
            xid: r.u32("xid")?,
            subxid: r.u32("subtransaction xid")?,
        },
        other => return Err(DecodeError::UnknownTag(tag, other)),
    };
    Ok(msg)
}

struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    tag: char,
}

impl<'a> Reader<'a> {
    /// The message's type byte and a reader of what follows it.
    fn after_tag(data: &'a Bytes) -> Result<(u8, Self), DecodeError> {
        let Some(&tag_byte) = data.first() else {
            return Err(DecodeError::Empty);
        };
        let r = Reader {
            buf: data,
            pos: 1,
            tag: char::from(tag_byte),
        };
        Ok((tag_byte, r))
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// Nothing may follow a message.
    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::Trailing {
                tag: self.tag,
                extra,
            }),
        }
    }

    fn truncated(&self, what: &'static str) -> DecodeError {
        DecodeError::Truncated {
            tag: self.tag,
            what,
        }
    }

    fn invalid(&self, what: &'static str, value: i64) -> DecodeError {
        DecodeError::Invalid {
            tag: self.tag,
            what,
            value,
        }
    }

    fn take<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let end = self
            .pos
            .checked_add(N)
            .ok_or_else(|| self.truncated(what))?;
        let slice = self
            .buf
            .get(self.pos..end)
            .ok_or_else(|| self.truncated(what))?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take::<1>(what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(what)?))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.take(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(what)?))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.take(what)?))
    }

    /// A non-negative 16-bit count.
    fn count(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let n = i16::from_be_bytes(self.take(what)?);
        usize::try_from(n).map_err(|_| self.invalid(what, i64::from(n)))
    }

    /// A non-negative 32-bit length.
    fn len32(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let n = self.i32(what)?;
        usize::try_from(n).map_err(|_| self.invalid(what, i64::from(n)))
    }

    fn bytes(&mut self, len: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        if len > self.remaining() {
            return Err(self.truncated(what));
        }
        let out = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(out)
    }

    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let rest = self
            .buf
            .get(self.pos..)
            .ok_or_else(|| self.truncated(what))?;
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.truncated(what))?;
        let s = std::str::from_utf8(&rest[..nul])
            .map_err(|_| DecodeError::NotUtf8 { tag: self.tag })?
            .to_string();
        self.pos += nul + 1;
        Ok(s)
    }

    fn expect_marker(&mut self, marker: u8, what: &'static str) -> Result<(), DecodeError> {
        let m = self.u8(what)?;
        if m != marker {
            return Err(self.invalid(what, i64::from(m)));
        }
        Ok(())
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.count("tuple column count")?;
        // Each value takes at least one byte.
        if n > self.remaining() {
            return Err(self.truncated("tuple values"));
        }
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            let kind = self.u8("value kind")?;
            values.push(match kind {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' => {
                    let len = self.len32("value length")?;
                    Value::Text(self.bytes(len, "text value")?)
                }
                b'b' => {
                    let len = self.len32("value length")?;
                    Value::Binary(self.bytes(len, "binary value")?)
                }
                other => return Err(self.invalid("value kind", i64::from(other))),
            });
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests;
