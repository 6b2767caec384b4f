//! SentencePiece `tokenizer.model` files: the `ModelProto`, its normalizer, BPE encoding with
//! byte fallback, and decoding, giving the same ids and text as the `sentencepiece` library.
//!
//! What is reproduced (sentencepiece 0.2): the normalizer (precompiled character map when the
//! model has one, user-defined symbols kept verbatim, `remove_extra_whitespaces`,
//! `add_dummy_prefix`, `escape_whitespaces`), the BPE merge order (highest score first, leftmost
//! on ties), re-segmentation of merges that land on UNUSED pieces, byte fallback for pieces not in
//! the vocabulary, and the decoder's handling of control, unknown and byte pieces and of the
//! leading dummy-prefix space. Unigram models, and models that treat whitespace as a suffix, are
//! rejected when loaded.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use crate::bpe::{self, Symbol};
use crate::charsmap::CharsMap;
use crate::protobuf::Reader;

/// SentencePiece's whitespace marker, U+2581 LOWER ONE EIGHTH BLOCK.
pub const SPACE_SYMBOL: &str = "\u{2581}";
const REPLACEMENT_CHARACTER: &str = "\u{FFFD}";

/// `ModelProto.SentencePiece.Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceType {
    fn from_proto(v: u64) -> Result<Self> {
        Ok(match v {
            1 => PieceType::Normal,
            2 => PieceType::Unknown,
            3 => PieceType::Control,
            4 => PieceType::UserDefined,
            5 => PieceType::Unused,
            6 => PieceType::Byte,
            other => bail!("unknown piece type {other}"),
        })
    }
}

/// One vocabulary entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceType,
}

/// `TrainerSpec.ModelType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    Unigram,
    Bpe,
    Word,
    Char,
}

/// The parts of `TrainerSpec` that matter after training.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerSpec {
    pub model_type: ModelType,
    pub vocab_size: i32,
    pub byte_fallback: bool,
    pub split_digits: bool,
    pub treat_whitespace_as_suffix: bool,
    pub unk_id: i32,
    pub bos_id: i32,
    pub eos_id: i32,
    pub pad_id: i32,
    pub unk_piece: String,
    pub bos_piece: String,
    pub eos_piece: String,
    pub pad_piece: String,
    /// What decoding prints for the unknown piece (default " \u{2047} ").
    pub unk_surface: String,
}

impl Default for TrainerSpec {
    /// The defaults of `sentencepiece_model.proto`.
    fn default() -> Self {
        TrainerSpec {
            model_type: ModelType::Unigram,
            vocab_size: 8000,
            byte_fallback: false,
            split_digits: false,
            treat_whitespace_as_suffix: false,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            pad_id: -1,
            unk_piece: "<unk>".into(),
            bos_piece: "<s>".into(),
            eos_piece: "</s>".into(),
            pad_piece: "<pad>".into(),
            unk_surface: " \u{2047} ".into(),
        }
    }
}

/// `NormalizerSpec`.
#[derive(Debug, Clone, PartialEq)]
pub struct NormalizerSpec {
    pub name: String,
    pub precompiled_charsmap: Vec<u8>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
}

impl Default for NormalizerSpec {
    fn default() -> Self {
        NormalizerSpec {
            name: String::new(),
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        }
    }
}

/// A parsed `ModelProto` (self-test data and the denormalizer are skipped).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelProto {
    pub pieces: Vec<Piece>,
    pub trainer_spec: TrainerSpec,
    pub normalizer_spec: NormalizerSpec,
}

impl ModelProto {
    /// Parses the protobuf bytes of a `tokenizer.model`.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut model = ModelProto::default();
        let mut r = Reader::new(bytes);
        while let Some((field, value)) = r.next_field()? {
            match field {
                1 => {
                    let piece = parse_piece(value.as_bytes()?)
                        .with_context(|| format!("piece #{}", model.pieces.len()))?;
                    model.pieces.push(piece);
                }
                2 => {
                    model.trainer_spec =
                        parse_trainer_spec(value.as_bytes()?).context("trainer_spec")?
                }
                3 => {
                    model.normalizer_spec =
                        parse_normalizer_spec(value.as_bytes()?).context("normalizer_spec")?
                }
                _ => {}
            }
        }
        Ok(model)
    }
}

fn parse_piece(bytes: &[u8]) -> Result<Piece> {
    let mut piece = Piece {
        piece: String::new(),
        score: 0.0,
        kind: PieceType::Normal,
    };
    let mut r = Reader::new(bytes);
    while let Some((field, value)) = r.next_field()? {
        match field {
            1 => piece.piece = value.as_string()?,
            2 => piece.score = value.as_f32()?,
            3 => piece.kind = PieceType::from_proto(value.as_u64()?)?,
            _ => {}
        }
    }
    Ok(piece)
}

fn parse_trainer_spec(bytes: &[u8]) -> Result<TrainerSpec> {
    let mut t = TrainerSpec::default();
    let mut r = Reader::new(bytes);
    while let Some((field, value)) = r.next_field()? {
        match field {
            3 => {
                t.model_type = match value.as_u64()? {
                    1 => ModelType::Unigram,
                    2 => ModelType::Bpe,
                    3 => ModelType::Word,
                    4 => ModelType::Char,
                    other => bail!("unknown model_type {other}"),
                }
            }
            4 => t.vocab_size = value.as_i32()?,
            24 => t.treat_whitespace_as_suffix = value.as_bool()?,
            25 => t.split_digits = value.as_bool()?,
            35 => t.byte_fallback = value.as_bool()?,
            40 => t.unk_id = value.as_i32()?,
            41 => t.bos_id = value.as_i32()?,
            42 => t.eos_id = value.as_i32()?,
            43 => t.pad_id = value.as_i32()?,
            44 => t.unk_surface = value.as_string()?,
            45 => t.unk_piece = value.as_string()?,
            46 => t.bos_piece = value.as_string()?,
            47 => t.eos_piece = value.as_string()?,
            48 => t.pad_piece = value.as_string()?,
            _ => {}
        }
    }
    Ok(t)
}

fn parse_normalizer_spec(bytes: &[u8]) -> Result<NormalizerSpec> {
    let mut n = NormalizerSpec::default();
    let mut r = Reader::new(bytes);
    while let Some((field, value)) = r.next_field()? {
        match field {
            1 => n.name = value.as_string()?,
            2 => n.precompiled_charsmap = value.as_bytes()?.to_vec(),
            3 => n.add_dummy_prefix = value.as_bool()?,
            4 => n.remove_extra_whitespaces = value.as_bool()?,
            5 => n.escape_whitespaces = value.as_bool()?,
            _ => {}
        }
    }
    Ok(n)
}

/// `<0x41>` -> 0x41.
fn byte_of_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// A loaded SentencePiece BPE model.
#[derive(Debug, Clone)]
pub struct SentencePiece {
    model: ModelProto,
    /// NORMAL, USER_DEFINED and UNUSED pieces: what merges may produce.
    pieces: HashMap<String, u32>,
    /// UNKNOWN, CONTROL and BYTE pieces.
    reserved: HashMap<String, u32>,
    unk_id: u32,
    /// User-defined symbols, longest first (matched before anything else, never split).
    user_defined: Vec<String>,
    /// Byte value -> id of its `<0xNN>` piece.
    byte_ids: Vec<Option<u32>>,
    charsmap: Option<CharsMap>,
}

impl SentencePiece {
    /// Loads a `tokenizer.model` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).with_context(|| {
            format!(
                "cannot read SentencePiece model {}: check the tokenizer `path`",
                path.display()
            )
        })?;
        Self::from_bytes(&bytes)
            .with_context(|| format!("{} is not a usable SentencePiece model", path.display()))
    }

    /// Loads a model from the bytes of a `tokenizer.model`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let model = ModelProto::parse(bytes).context("malformed ModelProto")?;
        Self::from_proto(model)
    }

    /// Builds the encoder from a parsed model.
    pub fn from_proto(model: ModelProto) -> Result<Self> {
        if model.pieces.is_empty() {
            bail!("the model has no pieces");
        }
        if model.trainer_spec.model_type != ModelType::Bpe {
            bail!(
                "only BPE SentencePiece models are supported; this one is {:?} (Llama-2 tokenizers are BPE)",
                model.trainer_spec.model_type
            );
        }
        if model.trainer_spec.treat_whitespace_as_suffix {
            bail!("models trained with treat_whitespace_as_suffix are not supported");
        }
        let mut pieces = HashMap::new();
        let mut reserved = HashMap::new();
        let mut user_defined = Vec::new();
        let mut unk_id = None;
        let mut byte_ids = vec![None; 256];
        for (i, p) in model.pieces.iter().enumerate() {
            let id = i as u32;
            if p.piece.is_empty() {
                // As SentencePiece refuses it at load; an empty piece would match everywhere.
                bail!("piece {id} is empty; the tokenizer model is corrupt");
            }
            let normal = matches!(
                p.kind,
                PieceType::Normal | PieceType::UserDefined | PieceType::Unused
            );
            let map = if normal { &mut pieces } else { &mut reserved };
            if map.insert(p.piece.clone(), id).is_some() {
                bail!("piece {:?} is defined twice", p.piece);
            }
            match p.kind {
                PieceType::UserDefined => user_defined.push(p.piece.clone()),
                PieceType::Unknown => {
                    if unk_id.is_some() {
                        bail!("more than one UNKNOWN piece");
                    }
                    unk_id = Some(id);
                }
                PieceType::Byte => {
                    if !model.trainer_spec.byte_fallback {
                        bail!(
                            "byte piece {:?} found although byte_fallback is false",
                            p.piece
                        );
                    }
                    let b = byte_of_piece(&p.piece).ok_or_else(|| {
                        anyhow!("byte piece {:?} is not of the form <0xNN>", p.piece)
                    })?;
                    byte_ids[b as usize] = Some(id);
                }
                _ => {}
            }
        }
        let unk_id = unk_id.ok_or_else(|| anyhow!("the model has no UNKNOWN piece"))?;
        if model.trainer_spec.byte_fallback && byte_ids.iter().any(Option::is_none) {
            bail!("byte_fallback is set but the model lacks some of the 256 <0xNN> pieces");
        }
        user_defined.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let charsmap = if model.normalizer_spec.precompiled_charsmap.is_empty() {
            None
        } else {
            Some(
                CharsMap::parse(&model.normalizer_spec.precompiled_charsmap)
                    .context("precompiled_charsmap")?,
            )
        };
        Ok(SentencePiece {
            model,
            pieces,
            reserved,
            unk_id,
            user_defined,
            byte_ids,
            charsmap,
        })
    }

    pub fn model(&self) -> &ModelProto {
        &self.model
    }

    pub fn vocab_size(&self) -> usize {
        self.model.pieces.len()
    }

    fn special_id(&self, id: i32) -> Option<u32> {
        (id >= 0 && (id as usize) < self.vocab_size()).then_some(id as u32)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.special_id(self.model.trainer_spec.bos_id)
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.special_id(self.model.trainer_spec.eos_id)
    }

    /// The model's own pad id (`None` for Llama-2, whose pad_id is -1).
    pub fn pad_id(&self) -> Option<u32> {
        self.special_id(self.model.trainer_spec.pad_id)
    }

    pub fn unk_id(&self) -> u32 {
        self.unk_id
    }

    pub fn id_to_piece(&self, id: u32) -> Option<&str> {
        self.model.pieces.get(id as usize).map(|p| p.piece.as_str())
    }

    pub fn piece_type(&self, id: u32) -> Option<PieceType> {
        self.model.pieces.get(id as usize).map(|p| p.kind)
    }

    /// The id of a piece; the unknown id for a string that is not a piece (as sentencepiece).
    pub fn piece_to_id(&self, piece: &str) -> u32 {
        self.reserved
            .get(piece)
            .or_else(|| self.pieces.get(piece))
            .copied()
            .unwrap_or(self.unk_id)
    }

    fn user_defined_prefix(&self, s: &str) -> Option<usize> {
        self.user_defined
            .iter()
            .find(|u| s.starts_with(u.as_str()))
            .map(|u| u.len())
    }

    /// One normalization step: the replacement for the start of `s` and how many bytes it consumed.
    fn normalize_prefix<'a>(&'a self, s: &'a str) -> (&'a str, usize) {
        if let Some(n) = self.user_defined_prefix(s) {
            return (&s[..n], n);
        }
        if let Some(map) = &self.charsmap {
            if let Some((consumed, replacement)) = map.longest_prefix(s.as_bytes()) {
                return (replacement, consumed);
            }
        }
        let n = s.chars().next().map_or(0, char::len_utf8);
        (&s[..n], n)
    }

    /// The normalized text that BPE runs on ("Hello  world" -> "▁Hello▁world" for tok512).
    pub fn normalize(&self, text: &str) -> String {
        let spec = &self.model.normalizer_spec;
        let mut input = text;
        if spec.remove_extra_whitespaces {
            loop {
                let (rep, n) = self.normalize_prefix(input);
                if n == 0 || rep != " " {
                    break;
                }
                input = &input[n..];
            }
        }
        let mut out = String::with_capacity(input.len() * 3 / 2 + 3);
        if input.is_empty() {
            return out;
        }
        let space = if spec.escape_whitespaces {
            SPACE_SYMBOL
        } else {
            " "
        };
        if spec.add_dummy_prefix {
            out.push_str(space);
        }
        let mut prev_space = spec.remove_extra_whitespaces;
        while !input.is_empty() {
            let (rep, n) = self.normalize_prefix(input);
            let mut rep = rep;
            if prev_space {
                rep = rep.trim_start_matches(' ');
            }
            if !rep.is_empty() {
                if spec.escape_whitespaces {
                    for (i, part) in rep.split(' ').enumerate() {
                        if i > 0 {
                            out.push_str(SPACE_SYMBOL);
                        }
                        out.push_str(part);
                    }
                } else {
                    out.push_str(rep);
                }
                prev_space = rep.ends_with(' ');
            }
            input = &input[n..];
            if !spec.remove_extra_whitespaces {
                prev_space = false;
            }
        }
        if spec.remove_extra_whitespaces {
            while out.ends_with(space) {
                out.truncate(out.len() - space.len());
            }
        }
        out
    }

    /// Encodes text into ids (no BOS/EOS), exactly as `SentencePieceProcessor.encode(text)`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_pieces(text)
            .into_iter()
            .map(|(_, id)| id)
            .collect()
    }

    /// Encodes text into `(piece, id)` pairs; byte-fallback pieces are named `<0xNN>`.
    pub fn encode_pieces(&self, text: &str) -> Vec<(String, u32)> {
        let norm = self.normalize(text);
        let mut symbols = Vec::new();
        let mut pos = 0;
        while pos < norm.len() {
            let rest = &norm[pos..];
            let (len, frozen) = match self.user_defined_prefix(rest) {
                Some(n) => (n, true),
                None => (rest.chars().next().map_or(1, char::len_utf8), false),
            };
            symbols.push(Symbol {
                start: pos,
                end: pos + len,
                id: 0,
                frozen,
            });
            pos += len;
        }
        // Merges that produce an UNUSED piece are undone afterwards ("resegmentation").
        let mut rev_merge: HashMap<(usize, usize), (usize, usize, usize)> = HashMap::new();
        let merged = bpe::merge(symbols, |l, r| {
            let id = *self.pieces.get(&norm[l.start..r.end])?;
            let piece = &self.model.pieces[id as usize];
            if piece.kind == PieceType::Unused {
                rev_merge.insert((l.start, r.end), (l.start, l.end, r.end));
            }
            Some((f64::from(piece.score), id))
        });
        let mut out = Vec::with_capacity(merged.len());
        for s in merged {
            self.resegment(&norm, s.start, s.end, &rev_merge, &mut out);
        }
        out
    }

    fn resegment(
        &self,
        norm: &str,
        start: usize,
        end: usize,
        rev_merge: &HashMap<(usize, usize), (usize, usize, usize)>,
        out: &mut Vec<(String, u32)>,
    ) {
        let w = &norm[start..end];
        let id = self.piece_to_id(w);
        if self.piece_type(id) == Some(PieceType::Unused) {
            if let Some(&(a, b, c)) = rev_merge.get(&(start, end)) {
                self.resegment(norm, a, b, rev_merge, out);
                self.resegment(norm, b, c, rev_merge, out);
                return;
            }
        }
        if self.piece_type(id) == Some(PieceType::Unknown) && self.model.trainer_spec.byte_fallback
        {
            for &b in w.as_bytes() {
                let id = self.byte_ids[b as usize].unwrap_or(self.unk_id);
                out.push((format!("<0x{b:02X}>"), id));
            }
        } else {
            out.push((w.to_string(), id));
        }
    }

    /// Decodes ids into text, exactly as `SentencePieceProcessor.decode(ids)`: control pieces
    /// vanish, the unknown piece prints as `unk_surface`, runs of byte pieces are read as UTF-8
    /// (each invalid byte becoming U+FFFD), `▁` becomes a space, and the dummy-prefix space of the
    /// first piece is dropped. Ids outside the vocabulary are an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let spec = &self.model.normalizer_spec;
        let strip_bos_ws = spec.add_dummy_prefix || spec.remove_extra_whitespaces;
        let mut out = String::new();
        let mut bytes: Vec<u8> = Vec::new();
        let mut is_bos_ws = true;
        for &id in ids {
            let piece = self.model.pieces.get(id as usize).ok_or_else(|| {
                anyhow!(
                    "cannot decode id {id}: the vocabulary has {} pieces",
                    self.vocab_size()
                )
            })?;
            if piece.kind == PieceType::Byte {
                bytes.push(byte_of_piece(&piece.piece).expect("checked when loading"));
                continue;
            }
            flush_bytes(&mut bytes, &mut out);
            if !out.is_empty() {
                // Text from byte pieces counts as the start of the sentence too.
                is_bos_ws = false;
            }
            let (text, has_bos_ws): (std::borrow::Cow<str>, bool) = match piece.kind {
                PieceType::Control => ("".into(), false),
                PieceType::Unknown => (self.model.trainer_spec.unk_surface.as_str().into(), false),
                _ => {
                    let mut p = piece.piece.as_str();
                    let mut has_bos_ws = false;
                    if is_bos_ws && strip_bos_ws {
                        if let Some(rest) = p.strip_prefix(SPACE_SYMBOL) {
                            p = rest;
                            has_bos_ws = !spec.remove_extra_whitespaces;
                        }
                    }
                    (p.replace(SPACE_SYMBOL, " ").into(), has_bos_ws)
                }
            };
            if is_bos_ws && (!text.is_empty() || has_bos_ws) {
                is_bos_ws = false;
            }
            out.push_str(&text);
        }
        flush_bytes(&mut bytes, &mut out);
        Ok(out)
    }
}

/// Appends a run of byte pieces as UTF-8; every byte that does not start a valid character
/// becomes one U+FFFD (sentencepiece replaces byte by byte, unlike `String::from_utf8_lossy`).
fn flush_bytes(bytes: &mut Vec<u8>, out: &mut String) {
    let mut i = 0;
    while i < bytes.len() {
        let want = match bytes[i] {
            0x00..=0x7f => 1,
            0xc2..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf4 => 4,
            _ => 0,
        };
        match (want > 0 && i + want <= bytes.len())
            .then(|| std::str::from_utf8(&bytes[i..i + want]).ok())
            .flatten()
        {
            Some(s) => {
                out.push_str(s);
                i += want;
            }
            None => {
                out.push_str(REPLACEMENT_CHARACTER);
                i += 1;
            }
        }
    }
    bytes.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_piece_names() {
        assert_eq!(byte_of_piece("<0x0A>"), Some(10));
        assert_eq!(byte_of_piece("<0xff>"), Some(255));
        assert_eq!(byte_of_piece("<0x1>"), None);
        assert_eq!(byte_of_piece("a"), None);
    }

    #[test]
    fn an_empty_piece_is_refused_at_load() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../assets/stories260K/tokenizer.model"
        );
        let mut model = ModelProto::parse(&std::fs::read(path).unwrap()).unwrap();
        assert!(SentencePiece::from_proto(model.clone()).is_ok());
        model.pieces[300] = Piece {
            piece: String::new(),
            score: 0.0,
            kind: PieceType::UserDefined,
        };
        let err = SentencePiece::from_proto(model).unwrap_err();
        assert!(err.to_string().contains("piece 300 is empty"), "{err}");
    }

    #[test]
    fn invalid_utf8_becomes_one_replacement_per_byte() {
        let mut out = String::new();
        // "é", a truncated 3-byte sequence (two bad bytes), "a", a stray continuation byte.
        let mut bytes = vec![0xc3, 0xa9, 0xe2, 0x82, b'a', 0x80];
        flush_bytes(&mut bytes, &mut out);
        assert_eq!(out, "é\u{FFFD}\u{FFFD}a\u{FFFD}");
        assert!(bytes.is_empty());
    }
}
