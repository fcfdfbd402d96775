//! Values for `COPY … FROM STDIN (FORMAT binary)`: the text `pgoutput`
//! sends (written by the source's output functions under `DateStyle ISO`,
//! `extra_float_digits 3`, UTF-8), turned into each type's binary receive
//! format, so the target reads length-prefixed values instead of scanning
//! every byte of every row for tabs, newlines and backslashes (PostgreSQL
//! 15's COPY text parsing took ~70% of the target backend's CPU on ~2 KB
//! rows).
//!
//! Only built-in types whose source and target columns are the same type,
//! and only text in the exact form those output functions write: anything
//! else is `None`, and the caller sends the chunk as text instead. Never a
//! guess: each encoder is checked value for value against PostgreSQL's own
//! `*_send` functions (tests/binary_values.rs).

use bytes::{BufMut, BytesMut};

/// How one column's text becomes its binary value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoder {
    /// text, varchar, bpchar, json: the bytes themselves.
    Bytes,
    /// jsonb: a version byte (1), then the text.
    Jsonb,
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Numeric,
    Uuid,
    Bytea,
    Date,
    Timestamp,
    Timestamptz,
}

impl Encoder {
    /// The encoder of a built-in type (by its fixed OID), if there is one.
    pub fn for_type(oid: u32) -> Option<Encoder> {
        Some(match oid {
            25 | 1043 | 1042 | 114 => Encoder::Bytes,
            3802 => Encoder::Jsonb,
            16 => Encoder::Bool,
            21 => Encoder::Int2,
            23 => Encoder::Int4,
            20 => Encoder::Int8,
            700 => Encoder::Float4,
            701 => Encoder::Float8,
            1700 => Encoder::Numeric,
            2950 => Encoder::Uuid,
            17 => Encoder::Bytea,
            1082 => Encoder::Date,
            1114 => Encoder::Timestamp,
            1184 => Encoder::Timestamptz,
            _ => return None,
        })
    }

    /// Append the value as COPY binary writes a field: its length (4
    /// bytes), then its bytes. `None`: not in the form expected (nothing
    /// usable was appended; the caller discards the buffer).
    pub fn field(self, text: &[u8], out: &mut BytesMut) -> Option<()> {
        let at = out.len();
        out.put_i32(0);
        self.value(text, out)?;
        let len = i32::try_from(out.len() - at - 4).ok()?;
        out[at..at + 4].copy_from_slice(&len.to_be_bytes());
        Some(())
    }

    fn value(self, text: &[u8], out: &mut BytesMut) -> Option<()> {
        match self {
            Encoder::Bytes => out.put_slice(text),
            Encoder::Jsonb => {
                out.put_u8(1);
                out.put_slice(text);
            }
            Encoder::Bool => out.put_u8(match text {
                b"t" => 1,
                b"f" => 0,
                _ => return None,
            }),
            Encoder::Int2 => out.put_i16(integer(text)?.try_into().ok()?),
            Encoder::Int4 => out.put_i32(integer(text)?.try_into().ok()?),
            Encoder::Int8 => out.put_i64(integer(text)?),
            Encoder::Float4 => out.put_u32(float::<f32>(text)?.to_bits()),
            Encoder::Float8 => out.put_u64(float::<f64>(text)?.to_bits()),
            Encoder::Numeric => numeric(text, out)?,
            Encoder::Uuid => uuid(text, out)?,
            Encoder::Bytea => bytea(text, out)?,
            Encoder::Date => out.put_i32(date(text)?),
            Encoder::Timestamp => out.put_i64(timestamp(text, false)?),
            Encoder::Timestamptz => out.put_i64(timestamp(text, true)?),
        }
        Some(())
    }
}

/// `-?[0-9]+`, within i64.
fn integer(text: &[u8]) -> Option<i64> {
    let digits = text.strip_prefix(b"-").unwrap_or(text);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok()
}

/// A float as float4out/float8out write it (shortest exact digits with
/// `extra_float_digits` > 0): parsing it back gives the same bits.
fn float<F: std::str::FromStr + Special>(text: &[u8]) -> Option<F> {
    match text {
        b"NaN" => return Some(F::NAN),
        b"Infinity" => return Some(F::INFINITY),
        b"-Infinity" => return Some(F::NEG_INFINITY),
        _ => {}
    }
    // Digits, sign, point and exponent only (Rust would also take "inf").
    if !text
        .iter()
        .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e'))
    {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok()
}

trait Special {
    const NAN: Self;
    const INFINITY: Self;
    const NEG_INFINITY: Self;
}

impl Special for f64 {
    const NAN: Self = f64::NAN;
    const INFINITY: Self = f64::INFINITY;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
}

impl Special for f32 {
    const NAN: Self = f32::NAN;
    const INFINITY: Self = f32::INFINITY;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
}

/// numeric_send's format: ndigits, weight, sign, dscale (int16 each), then
/// base-10000 digits, from numeric_out's `-?[0-9]+(\.[0-9]+)?`.
fn numeric(text: &[u8], out: &mut BytesMut) -> Option<()> {
    const POS: u16 = 0x0000;
    const NEG: u16 = 0x4000;
    // The specials' dscale is what numeric_send writes for them (bits of
    // their header; numeric_recv ignores it).
    let special = match text {
        b"NaN" => Some((0xC000u16, 0)),
        b"Infinity" => Some((0xD000, 32)),
        b"-Infinity" => Some((0xF000, 32)),
        _ => None,
    };
    if let Some((sign, dscale)) = special {
        out.put_i16(0);
        out.put_i16(0);
        out.put_u16(sign);
        out.put_i16(dscale);
        return Some(());
    }
    let (sign, unsigned) = match text.strip_prefix(b"-") {
        Some(rest) => (NEG, rest),
        None => (POS, text),
    };
    let (int, frac) = match unsigned.iter().position(|&b| b == b'.') {
        Some(p) => (&unsigned[..p], &unsigned[p + 1..]),
        None => (unsigned, &b""[..]),
    };
    if int.is_empty()
        || !int.iter().all(u8::is_ascii_digit)
        || !frac.iter().all(u8::is_ascii_digit)
        || (unsigned.contains(&b'.') && frac.is_empty())
    {
        return None;
    }
    let dscale = i16::try_from(frac.len()).ok()?;
    // Digit groups of four around the decimal point: the integer part
    // padded on the left, the fraction on the right.
    let lead = (4 - int.len() % 4) % 4;
    let trail = (4 - frac.len() % 4) % 4;
    let mut all = Vec::with_capacity(lead + int.len() + frac.len() + trail);
    all.resize(lead, b'0');
    all.extend_from_slice(int);
    all.extend_from_slice(frac);
    all.resize(all.len() + trail, b'0');
    let mut groups: Vec<i16> = all
        .chunks(4)
        .map(|c| c.iter().fold(0i16, |n, d| n * 10 + i16::from(d - b'0')))
        .collect();
    let int_groups = (lead + int.len()) / 4;
    let mut weight = i16::try_from(int_groups).ok()? - 1;
    // Leading and trailing zero groups are not sent.
    let first = groups.iter().position(|&g| g != 0);
    let Some(first) = first else {
        out.put_i16(0);
        out.put_i16(0);
        out.put_u16(POS);
        out.put_i16(dscale);
        return Some(());
    };
    weight -= i16::try_from(first).ok()?;
    let last = groups.iter().rposition(|&g| g != 0)?;
    groups.truncate(last + 1);
    groups.drain(..first);
    out.put_i16(i16::try_from(groups.len()).ok()?);
    out.put_i16(weight);
    out.put_u16(sign);
    out.put_i16(dscale);
    for g in groups {
        out.put_i16(g);
    }
    Some(())
}

/// uuid_out's `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (lower case).
fn uuid(text: &[u8], out: &mut BytesMut) -> Option<()> {
    if text.len() != 36 {
        return None;
    }
    let mut hex = Vec::with_capacity(32);
    for (i, &b) in text.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if b != b'-' {
                return None;
            }
        } else {
            hex.push(b);
        }
    }
    for pair in hex.chunks(2) {
        out.put_u8(hex_byte(pair[0], pair[1])?);
    }
    Some(())
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

fn hex_byte(hi: u8, lo: u8) -> Option<u8> {
    Some(hex_digit(hi)? << 4 | hex_digit(lo)?)
}

/// byteaout's hex form `\x…` (`bytea_output = hex`, the default); the
/// escape form is left to the text path.
fn bytea(text: &[u8], out: &mut BytesMut) -> Option<()> {
    let hex = text.strip_prefix(b"\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    for pair in hex.chunks(2) {
        out.put_u8(hex_byte(pair[0], pair[1])?);
    }
    Some(())
}

/// Days from 2000-01-01 (PostgreSQL's epoch) to a proleptic Gregorian date
/// (astronomical year: 1 BC is year 0).
fn days(year: i64, month: i64, day: i64) -> i64 {
    // Howard Hinnant's days_from_civil.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468 - 10_957
}

fn digits(text: &[u8], n: std::ops::RangeInclusive<usize>) -> Option<(i64, &[u8])> {
    let len = text.iter().take_while(|b| b.is_ascii_digit()).count();
    if !n.contains(&len) {
        return None;
    }
    let v = text[..len]
        .iter()
        .fold(0i64, |v, d| v * 10 + i64::from(d - b'0'));
    Some((v, &text[len..]))
}

/// `YYYY-MM-DD` (four digits or more, as written: a BC year is positive):
/// year, month, day, rest. 29 February is checked by [`era`].
fn ymd(text: &[u8]) -> Option<(i64, i64, i64, &[u8])> {
    let (year, rest) = digits(text, 4..=7)?;
    let (month, rest) = digits(rest.strip_prefix(b"-")?, 2..=2)?;
    let (day, rest) = digits(rest.strip_prefix(b"-")?, 2..=2)?;
    let most = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 => 29,
        _ => return None,
    };
    if year == 0 || day < 1 || day > most {
        return None;
    }
    Some((year, month, day, rest))
}

/// The astronomical year (a year written with ` BC` is 1 - year: 1 BC is
/// year 0) and what comes before the suffix; 29 February only in a leap
/// year of that calendar.
fn era(year: i64, month: i64, day: i64, rest: &[u8]) -> Option<(i64, &[u8])> {
    let (year, rest) = match rest.strip_suffix(b" BC") {
        Some(before) => (1 - year, before),
        None => (year, rest),
    };
    let leap = year.rem_euclid(4) == 0 && (year.rem_euclid(100) != 0 || year.rem_euclid(400) == 0);
    if month == 2 && day == 29 && !leap {
        return None;
    }
    Some((year, rest))
}

/// date_out under DateStyle ISO: `YYYY-MM-DD[ BC]`, `infinity`, `-infinity`.
fn date(text: &[u8]) -> Option<i32> {
    match text {
        b"infinity" => return Some(i32::MAX),
        b"-infinity" => return Some(i32::MIN),
        _ => {}
    }
    let (year, month, day, rest) = ymd(text)?;
    let (year, rest) = era(year, month, day, rest)?;
    if !rest.is_empty() {
        return None;
    }
    i32::try_from(days(year, month, day)).ok()
}

/// timestamp_out / timestamptz_out under DateStyle ISO:
/// `YYYY-MM-DD HH:MM:SS[.ffffff][±HH[:MM[:SS]]][ BC]`, `infinity`,
/// `-infinity`; microseconds from 2000-01-01 00:00:00 (UTC for timestamptz).
fn timestamp(text: &[u8], zoned: bool) -> Option<i64> {
    match text {
        b"infinity" => return Some(i64::MAX),
        b"-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let (year, month, day, rest) = ymd(text)?;
    let (hour, rest) = digits(rest.strip_prefix(b" ")?, 2..=2)?;
    let (minute, rest) = digits(rest.strip_prefix(b":")?, 2..=2)?;
    let (second, mut rest) = digits(rest.strip_prefix(b":")?, 2..=2)?;
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut micros = 0;
    if let Some(frac) = rest.strip_prefix(b".") {
        let (f, after) = digits(frac, 1..=6)?;
        let len = frac.len() - after.len();
        micros = f * 10i64.pow(6 - u32::try_from(len).ok()?);
        rest = after;
    }
    let mut offset = 0;
    if zoned {
        let (sign, after) = match rest.first() {
            Some(b'+') => (1, &rest[1..]),
            Some(b'-') => (-1, &rest[1..]),
            _ => return None,
        };
        let (h, mut after) = digits(after, 2..=2)?;
        let mut secs = h * 3600;
        if let Some(m) = after.strip_prefix(b":") {
            let (m, a) = digits(m, 2..=2)?;
            secs += m * 60;
            after = a;
            if let Some(s) = after.strip_prefix(b":") {
                let (s, a) = digits(s, 2..=2)?;
                secs += s;
                after = a;
            }
        }
        offset = sign * secs;
        rest = after;
    }
    let (year, rest) = era(year, month, day, rest)?;
    if !rest.is_empty() {
        return None;
    }
    let secs = days(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset;
    secs.checked_mul(1_000_000)?.checked_add(micros)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL: [Encoder; 14] = [
        Encoder::Bytes,
        Encoder::Jsonb,
        Encoder::Bool,
        Encoder::Int2,
        Encoder::Int4,
        Encoder::Int8,
        Encoder::Float4,
        Encoder::Float8,
        Encoder::Numeric,
        Encoder::Uuid,
        Encoder::Bytea,
        Encoder::Date,
        Encoder::Timestamp,
        Encoder::Timestamptz,
    ];

    proptest! {
        // Values come from outside: any bytes are refused or encoded,
        // never a panic; a field's length prefix matches what follows.
        #[test]
        fn any_bytes_are_refused_or_encoded_never_a_panic(
            text in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..48),
                "[0-9 :.+-BCx\\a-f]{0,40}".prop_map(String::into_bytes),
            ]
        ) {
            for e in ALL {
                let mut out = BytesMut::new();
                if e.field(&text, &mut out).is_some() {
                    let len = i32::from_be_bytes(out[..4].try_into().expect("four bytes"));
                    prop_assert_eq!(len as usize, out.len() - 4);
                }
            }
        }
    }

    fn enc(e: Encoder, text: &str) -> Option<Vec<u8>> {
        let mut out = BytesMut::new();
        e.value(text.as_bytes(), &mut out)?;
        Some(out.to_vec())
    }

    #[test]
    fn integers_floats_and_booleans() {
        assert_eq!(
            enc(Encoder::Int4, "-42"),
            Some((-42i32).to_be_bytes().to_vec())
        );
        assert_eq!(enc(Encoder::Int2, "70000"), None);
        assert_eq!(enc(Encoder::Int8, "+1"), None);
        assert_eq!(enc(Encoder::Int8, ""), None);
        assert_eq!(
            enc(Encoder::Float8, "0.1"),
            Some(0.1f64.to_be_bytes().to_vec())
        );
        assert_eq!(
            enc(Encoder::Float8, "-0"),
            Some((-0.0f64).to_be_bytes().to_vec())
        );
        assert_eq!(enc(Encoder::Float4, "inf"), None);
        assert_eq!(enc(Encoder::Bool, "t"), Some(vec![1]));
        assert_eq!(enc(Encoder::Bool, "true"), None);
    }

    #[test]
    fn numerics_in_base_ten_thousand() {
        // 12345.678: weight 1, digits 1 2345 6780, dscale 3.
        let want: Vec<u8> = [3i16, 1, 0, 3, 1, 2345, 6780]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        assert_eq!(enc(Encoder::Numeric, "12345.678"), Some(want));
        // 0.00010: weight -1, digit 1, dscale 5.
        let want: Vec<u8> = [1i16, -1, 0, 5, 1]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        assert_eq!(enc(Encoder::Numeric, "0.00010"), Some(want));
        assert_eq!(enc(Encoder::Numeric, "1e5"), None);
        assert_eq!(enc(Encoder::Numeric, "1."), None);
    }

    #[test]
    fn dates_and_times_from_the_epoch() {
        assert_eq!(
            enc(Encoder::Date, "2000-01-01"),
            Some(0i32.to_be_bytes().to_vec())
        );
        assert_eq!(
            enc(Encoder::Date, "1999-12-31"),
            Some((-1i32).to_be_bytes().to_vec())
        );
        assert_eq!(enc(Encoder::Date, "2001-02-29"), None);
        assert_eq!(
            enc(Encoder::Timestamptz, "2000-01-01 01:00:00.5+01"),
            Some(500_000i64.to_be_bytes().to_vec())
        );
        assert_eq!(enc(Encoder::Timestamp, "2000-01-01 00:00:00+01"), None);
        assert_eq!(enc(Encoder::Timestamptz, "2000-01-01 00:00:00"), None);
    }
}
