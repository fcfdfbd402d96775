//! Log sequence numbers: positions in the source's write-ahead log.

use std::fmt;
use std::str::FromStr;

/// A PostgreSQL WAL position. Shown as PostgreSQL does (`16/B374D848`);
/// stored in checkpoint files as the plain number (§5.2 of the guide).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Error for text that is not an LSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not an LSN: expected PostgreSQL's form like 16/B374D848 or a plain number")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseLsnError(s.to_string());
        match s.split_once('/') {
            Some((hi, lo)) => {
                let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
                let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
                Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
            }
            None => s.parse::<u64>().map(Lsn).map_err(|_| bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips() {
        let l: Lsn = "16/B374D848".parse().expect("parse");
        assert_eq!(l.0, (0x16u64 << 32) | 0xB374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert_eq!("987654321".parse::<Lsn>().expect("number").0, 987_654_321);
        assert!("x/1".parse::<Lsn>().is_err());
        assert!("".parse::<Lsn>().is_err());
    }
}
