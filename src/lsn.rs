//! Log sequence numbers.
//!
//! An LSN is a 64-bit byte position in PostgreSQL's write-ahead log. PostgreSQL
//! prints it as two hexadecimal halves, `X/Y` (upper 32 bits / lower 32 bits),
//! which is the form walcast accepts and prints everywhere (`pg_lsn` type).

use std::fmt;
use std::str::FromStr;

/// A write-ahead log position (`pg_lsn`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The invalid/zero position; `START_REPLICATION … 0/0` means "from the slot's confirmed position".
    pub const ZERO: Lsn = Lsn(0);

    /// The `X/Y` text appended to `out`, as [`fmt::Display`] writes it, without
    /// the formatter (every change's `commit_lsn` is rendered this way).
    pub fn push_to(self, out: &mut String) {
        let half = |out: &mut String, v: u32| {
            let digits = (8 - v.leading_zeros() / 4).max(1);
            for i in (0..digits).rev() {
                out.push(char::from(
                    b"0123456789ABCDEF"[((v >> (4 * i)) & 0xF) as usize],
                ));
            }
        };
        half(out, (self.0 >> 32) as u32);
        out.push('/');
        half(out, self.0 as u32);
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The text was not an LSN of the form `X/Y`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid LSN {0:?}: expected two hexadecimal numbers separated by '/', such as 0/16B3748")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_string());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        for v in [0u64, 1, 0x16B3748, 0x1_0000_0000, u64::MAX] {
            let l = Lsn(v);
            assert_eq!(l.to_string().parse::<Lsn>().unwrap(), l);
        }
        assert_eq!(Lsn(0x1_0000_00AB).to_string(), "1/AB");
    }

    #[test]
    fn push_to_writes_what_display_does() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for v in [0u64, 1, 0xF, 0x10, 0x16B3748, 0x1_0000_0000, u64::MAX]
            .into_iter()
            .chain((0..2000).map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x >> (x % 64)
            }))
        {
            let mut s = String::from("lsn ");
            Lsn(v).push_to(&mut s);
            assert_eq!(s, format!("lsn {}", Lsn(v)));
        }
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "/",
            "1/",
            "/1",
            "x/1",
            "1/2/3",
            "123456789/0",
            "16B3748",
        ] {
            assert!(s.parse::<Lsn>().is_err(), "{s}");
        }
    }
}
