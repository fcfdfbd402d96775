//! The protocol's frames: length-checked before they are read (outside
//! bytes never panic), query rows, the WAL stream's messages inside
//! CopyData, and standby status updates.

use super::*;

/// Split one frame off `buf` if it holds a whole one.
pub(super) fn take_frame(buf: &mut BytesMut) -> Result<Option<(u8, Bytes)>> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if !(4..=MAX_FRAME).contains(&len) {
        return Err(protocol(format!("frame length {len}")));
    }
    if buf.len() < 1 + len {
        buf.reserve(1 + len - buf.len());
        return Ok(None);
    }
    let tag = buf[0];
    let mut frame = buf.split_to(1 + len);
    frame.advance(5);
    Ok(Some((tag, frame.freeze())))
}

pub(super) fn data_row(mut body: Bytes) -> Result<Vec<Option<String>>> {
    if body.remaining() < 2 {
        return Err(protocol("short DataRow"));
    }
    let n = body.get_i16();
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        if body.remaining() < 4 {
            return Err(protocol("short DataRow"));
        }
        let len = body.get_i32();
        if len < 0 {
            row.push(None);
            continue;
        }
        let len = len as usize;
        if body.remaining() < len {
            return Err(protocol("short DataRow"));
        }
        row.push(Some(
            String::from_utf8_lossy(&body.split_to(len)).into_owned(),
        ));
    }
    Ok(row)
}

/// `r`: written, flushed and applied up to `lsn`.
pub(super) fn status_update(lsn: u64, reply: bool) -> BytesMut {
    let now_us = crate::clock::pg_now_us();
    let mut body = BytesMut::with_capacity(34);
    body.put_u8(b'r');
    body.put_u64(lsn);
    body.put_u64(lsn);
    body.put_u64(lsn);
    body.put_i64(now_us);
    body.put_u8(u8::from(reply));
    let mut out = BytesMut::with_capacity(40);
    out.put_u8(b'd');
    out.put_u32(4 + body.len() as u32);
    out.extend_from_slice(&body);
    out
}

/// One CopyData frame of the walsender as a message; `Ok(None)` for frames
/// that carry nothing for the caller.
pub(super) fn copy_data(mut body: Bytes) -> Result<(Option<WalMessage>, bool)> {
    let Some(&kind) = body.first() else {
        return Err(protocol("empty CopyData"));
    };
    body.advance(1);
    match kind {
        b'w' => {
            if body.remaining() < 24 {
                return Err(protocol("short XLogData header"));
            }
            let wal_start = Lsn(body.get_u64());
            let _wal_end = body.get_u64();
            let _sent_at = body.get_i64();
            Ok((
                Some(WalMessage::XLogData {
                    wal_start,
                    data: body,
                }),
                false,
            ))
        }
        b'k' => {
            if body.remaining() < 17 {
                return Err(protocol("short keepalive"));
            }
            let wal_end = Lsn(body.get_u64());
            let _sent_at = body.get_i64();
            let reply = body.get_u8() != 0;
            Ok((Some(WalMessage::Keepalive { wal_end }), reply))
        }
        other => Err(protocol(format!("CopyData of kind '{}'", other as char))),
    }
}
