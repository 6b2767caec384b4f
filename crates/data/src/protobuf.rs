//! A minimal protobuf wire-format reader: just enough to walk a SentencePiece `ModelProto`.
//!
//! Fields are read in order as `(field number, value)`; unknown fields are skipped, so a model
//! written by a newer SentencePiece (more fields) still loads.

use anyhow::{bail, Result};

/// One field's payload.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

impl Value<'_> {
    pub(crate) fn as_u64(&self) -> Result<u64> {
        match *self {
            Value::Varint(v) | Value::Fixed64(v) => Ok(v),
            Value::Fixed32(v) => Ok(v as u64),
            Value::Bytes(_) => bail!("expected a number, found a length-delimited field"),
        }
    }

    /// An `int32` field (negative values are sign-extended to 64 bits on the wire).
    pub(crate) fn as_i32(&self) -> Result<i32> {
        Ok(self.as_u64()? as i64 as i32)
    }

    pub(crate) fn as_bool(&self) -> Result<bool> {
        Ok(self.as_u64()? != 0)
    }

    pub(crate) fn as_f32(&self) -> Result<f32> {
        match *self {
            Value::Fixed32(v) => Ok(f32::from_bits(v)),
            _ => bail!("expected a 32-bit float"),
        }
    }

    pub(crate) fn as_bytes(&self) -> Result<&[u8]> {
        match *self {
            Value::Bytes(b) => Ok(b),
            _ => bail!("expected a length-delimited field"),
        }
    }

    pub(crate) fn as_string(&self) -> Result<String> {
        Ok(String::from_utf8(self.as_bytes()?.to_vec())?)
    }
}

/// Iterates over the fields of one message.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64> {
        let mut out = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&byte) = self.buf.get(self.pos) else {
                bail!("truncated varint at byte {}", self.pos);
            };
            self.pos += 1;
            out |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(out);
            }
        }
        bail!("varint longer than 10 bytes at byte {}", self.pos)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            bail!(
                "field of {n} bytes at byte {} runs past the end ({} bytes)",
                self.pos,
                self.buf.len()
            );
        };
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    /// The next `(field number, value)`, or `None` at the end of the message.
    pub(crate) fn next_field(&mut self) -> Result<Option<(u32, Value<'a>)>> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = (key >> 3) as u32;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => Value::Fixed64(u64::from_le_bytes(self.take(8)?.try_into()?)),
            2 => {
                let n = self.varint()? as usize;
                Value::Bytes(self.take(n)?)
            }
            5 => Value::Fixed32(u32::from_le_bytes(self.take(4)?.try_into()?)),
            wire => bail!("unsupported protobuf wire type {wire} (field {field})"),
        };
        Ok(Some((field, value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_each_wire_type() {
        // field 1 varint 300, field 2 fixed32 1.5f, field 3 bytes "hi", field 4 varint -1 (int32)
        let mut buf = vec![0x08, 0xac, 0x02, 0x15];
        buf.extend_from_slice(&1.5f32.to_le_bytes());
        buf.extend_from_slice(&[0x1a, 0x02, b'h', b'i', 0x20]);
        buf.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        let mut r = Reader::new(&buf);
        let (f, v) = r.next_field().unwrap().unwrap();
        assert_eq!((f, v.as_u64().unwrap()), (1, 300));
        let (f, v) = r.next_field().unwrap().unwrap();
        assert_eq!((f, v.as_f32().unwrap()), (2, 1.5));
        let (f, v) = r.next_field().unwrap().unwrap();
        assert_eq!((f, v.as_string().unwrap().as_str()), (3, "hi"));
        let (f, v) = r.next_field().unwrap().unwrap();
        assert_eq!((f, v.as_i32().unwrap()), (4, -1));
        assert!(r.next_field().unwrap().is_none());
    }

    #[test]
    fn truncated_input_is_an_error() {
        let mut r = Reader::new(&[0x1a, 0x05, b'a']);
        assert!(r.next_field().is_err());
        let mut r = Reader::new(&[0x08, 0x80]);
        assert!(r.next_field().is_err());
    }
}
