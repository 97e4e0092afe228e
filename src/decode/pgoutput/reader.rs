//! A bounds-checked cursor over one pgoutput message.
//!
//! Every read checks the remaining length first and returns [`DecodeError`]
//! instead of panicking; lengths are validated before anything is allocated.

use bytes::Bytes;

use super::DecodeError;

pub(crate) struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a Bytes) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn offset(&self) -> usize {
        self.pos
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                what,
                offset: self.pos,
                needed: n,
                available: self.remaining(),
            });
        }
        let buf: &'a Bytes = self.buf;
        let s = &buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    pub(crate) fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(self.i32(what)? as u32)
    }

    pub(crate) fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(self.i64(what)? as u64)
    }

    /// A NUL-terminated UTF-8 string (PostgreSQL's `String` in the message-format docs).
    pub(crate) fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::UnterminatedString {
                what,
                offset: self.pos,
            })?;
        let s = std::str::from_utf8(&rest[..end])
            .map_err(|_| DecodeError::InvalidUtf8 {
                what,
                offset: self.pos,
            })?
            .to_string();
        self.pos += end + 1;
        Ok(s)
    }

    /// `n` bytes as a zero-copy slice of the message.
    pub(crate) fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        let start = self.pos;
        self.take(n, what)?;
        Ok(self.buf.slice(start..start + n))
    }

    /// A non-negative Int32 length or count; negative values are rejected before any allocation.
    pub(crate) fn len32(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let offset = self.pos;
        let v = self.i32(what)?;
        usize::try_from(v).map_err(|_| DecodeError::NegativeLength {
            what,
            offset,
            value: i64::from(v),
        })
    }

    /// A non-negative Int16 count.
    pub(crate) fn len16(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let offset = self.pos;
        let v = self.i16(what)?;
        usize::try_from(v).map_err(|_| DecodeError::NegativeLength {
            what,
            offset,
            value: i64::from(v),
        })
    }

    /// Fails unless a collection of `count` items, each at least `min_item` bytes, can still fit.
    pub(crate) fn check_fits(
        &self,
        count: usize,
        min_item: usize,
        what: &'static str,
    ) -> Result<(), DecodeError> {
        match count.checked_mul(min_item) {
            Some(n) if n <= self.remaining() => Ok(()),
            _ => Err(DecodeError::Truncated {
                what,
                offset: self.pos,
                needed: count.saturating_mul(min_item),
                available: self.remaining(),
            }),
        }
    }

    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                offset: self.pos,
                count: self.remaining(),
            })
        }
    }
}
