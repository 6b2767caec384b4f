//! SentencePiece's `precompiled_charsmap`: the normalization rules (e.g. `nmt_nfkc`) compiled into
//! a Darts-clone double-array trie over UTF-8 bytes, plus a blob of NUL-terminated replacements.
//!
//! Layout: a little-endian `u32` giving the trie's size in bytes, the trie (an array of `u32`
//! units), then the replacement blob. A trie hit's value is the offset of its replacement.

use anyhow::{bail, Result};

#[derive(Debug, Clone)]
pub(crate) struct CharsMap {
    units: Vec<u32>,
    normalized: Vec<u8>,
}

fn has_leaf(unit: u32) -> bool {
    (unit >> 8) & 1 == 1
}
fn value(unit: u32) -> u32 {
    unit & ((1 << 31) - 1)
}
fn label(unit: u32) -> u32 {
    unit & ((1 << 31) | 0xff)
}
fn offset(unit: u32) -> usize {
    ((unit >> 10) << ((unit & (1 << 9)) >> 6)) as usize
}

impl CharsMap {
    pub(crate) fn parse(blob: &[u8]) -> Result<Self> {
        if blob.len() < 4 {
            bail!("charsmap of {} bytes is too short", blob.len());
        }
        let trie_size = u32::from_le_bytes(blob[..4].try_into()?) as usize;
        if trie_size & 3 != 0 || 4 + trie_size > blob.len() {
            bail!(
                "charsmap trie size {trie_size} does not fit the {}-byte blob",
                blob.len()
            );
        }
        let units = blob[4..4 + trie_size]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        Ok(CharsMap {
            units,
            normalized: blob[4 + trie_size..].to_vec(),
        })
    }

    /// The longest rule matching a prefix of `input`: `(bytes consumed, replacement)`.
    pub(crate) fn longest_prefix(&self, input: &[u8]) -> Option<(usize, &str)> {
        let mut best = None;
        let mut node = offset(*self.units.first()?);
        for (i, &byte) in input.iter().enumerate() {
            node ^= byte as usize;
            let unit = *self.units.get(node)?;
            if label(unit) != byte as u32 {
                break;
            }
            node ^= offset(unit);
            if has_leaf(unit) {
                let leaf = *self.units.get(node)?;
                best = Some((i + 1, value(leaf) as usize));
            }
        }
        let (len, at) = best?;
        let tail = self.normalized.get(at..)?;
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        std::str::from_utf8(&tail[..end]).ok().map(|s| (len, s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-built trie with one rule, "A" -> "a": root offset 1, so 'A' (0x41) lands on unit
    /// 0x40, whose offset 1 puts its leaf on unit 0x41.
    fn one_rule() -> Vec<u8> {
        let mut units = vec![0u32; 0x42];
        units[0] = 1 << 10;
        units[0x40] = 0x41 | (1 << 8) | (1 << 10);
        units[0x41] = (1 << 31) | 2; // value: offset 2 in the blob
        let mut blob = ((units.len() * 4) as u32).to_le_bytes().to_vec();
        for u in units {
            blob.extend_from_slice(&u.to_le_bytes());
        }
        blob.extend_from_slice(b"x\0a\0");
        blob
    }

    #[test]
    fn finds_the_rule_and_nothing_else() {
        let map = CharsMap::parse(&one_rule()).unwrap();
        assert_eq!(map.longest_prefix(b"AB"), Some((1, "a")));
        assert_eq!(map.longest_prefix(b"BA"), None);
        assert_eq!(map.longest_prefix(b""), None);
    }

    #[test]
    fn rejects_a_truncated_blob() {
        let mut blob = one_rule();
        blob.truncate(20);
        assert!(CharsMap::parse(&blob).is_err());
    }
}
