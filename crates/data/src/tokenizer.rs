//! [`Tokenizer`]: one type over both tokenizer file formats, chosen by the file name.
//!
//! - `*.json` (e.g. `tokenizer.json`): a Hugging Face tokenizer ([`HfTokenizer`]);
//! - anything else (e.g. `tokenizer.model`): a SentencePiece model ([`SentencePiece`]).

use std::path::Path;

use anyhow::{bail, Result};

use crate::hf_tokenizer::HfTokenizer;
use crate::sentencepiece::{PieceType, SentencePiece};

/// A text tokenizer loaded from a SentencePiece `tokenizer.model` or a Hugging Face `tokenizer.json`.
#[derive(Debug, Clone)]
pub enum Tokenizer {
    SentencePiece(SentencePiece),
    HuggingFace(HfTokenizer),
}

impl Tokenizer {
    /// Loads `path`, deciding the format by its extension (`.json` is Hugging Face, anything
    /// else SentencePiece). A missing file is an error naming the path.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            bail!(
                "tokenizer file {} does not exist: set the tokenizer's `path` to a SentencePiece \
                 tokenizer.model or a Hugging Face tokenizer.json",
                path.display()
            );
        }
        if path.is_dir() {
            bail!(
                "tokenizer path {} is a directory: point it at the tokenizer.model or tokenizer.json inside",
                path.display()
            );
        }
        let is_json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        Ok(if is_json {
            Tokenizer::HuggingFace(HfTokenizer::from_file(path)?)
        } else {
            Tokenizer::SentencePiece(SentencePiece::from_file(path)?)
        })
    }

    /// Text to ids, with no BOS/EOS.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self {
            Tokenizer::SentencePiece(sp) => sp.encode(text),
            Tokenizer::HuggingFace(hf) => hf.encode(text),
        }
    }

    /// Ids to text. Control/special tokens (BOS, EOS) print nothing, as in sentencepiece's
    /// `decode` and `tokenizers`' `decode(..., skip_special_tokens=True)`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tokenizer::SentencePiece(sp) => sp.decode(ids),
            Tokenizer::HuggingFace(hf) => hf.decode(ids, true),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::SentencePiece(sp) => sp.vocab_size(),
            Tokenizer::HuggingFace(hf) => hf.vocab_size(),
        }
    }

    /// The beginning-of-sequence id: the model's `bos_id`, or the id of `<s>` in a tokenizer.json.
    pub fn bos_id(&self) -> Option<u32> {
        match self {
            Tokenizer::SentencePiece(sp) => sp.bos_id(),
            Tokenizer::HuggingFace(hf) => hf.token_to_id("<s>"),
        }
    }

    /// The end-of-sequence id: the model's `eos_id`, or the id of `</s>` in a tokenizer.json.
    pub fn eos_id(&self) -> Option<u32> {
        match self {
            Tokenizer::SentencePiece(sp) => sp.eos_id(),
            Tokenizer::HuggingFace(hf) => hf.token_to_id("</s>"),
        }
    }

    pub fn id_to_piece(&self, id: u32) -> Option<&str> {
        match self {
            Tokenizer::SentencePiece(sp) => sp.id_to_piece(id),
            Tokenizer::HuggingFace(hf) => hf.id_to_token(id),
        }
    }

    /// The id of a piece, `None` when it is not in the vocabulary.
    pub fn piece_to_id(&self, piece: &str) -> Option<u32> {
        match self {
            Tokenizer::SentencePiece(sp) => {
                let id = sp.piece_to_id(piece);
                (id != sp.unk_id() || sp.id_to_piece(id) == Some(piece)).then_some(id)
            }
            Tokenizer::HuggingFace(hf) => hf.token_to_id(piece),
        }
    }

    /// Whether `id` is a control/special token (decodes to nothing).
    pub fn is_special(&self, id: u32) -> bool {
        match self {
            Tokenizer::SentencePiece(sp) => sp.piece_type(id) == Some(PieceType::Control),
            Tokenizer::HuggingFace(hf) => hf.added_tokens().iter().any(|a| a.id == id && a.special),
        }
    }
}
