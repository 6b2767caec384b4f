//! Hugging Face `tokenizer.json` files of the Llama kind: a BPE model over SentencePiece-style
//! pieces (`▁` for spaces) with byte fallback, giving the same ids as the `tokenizers` library.
//!
//! Supported parts of the file (everything Llama-2/Mistral-style files use):
//! - `added_tokens`: matched in the raw text (`normalized: false`) or in the normalized text
//!   (`normalized: true`), longest first, with `lstrip`/`rstrip` and `single_word`;
//! - `normalizer`: `Sequence`, `Prepend`, `Replace` (string patterns), `Lowercase`, `Strip`, or null;
//! - `pre_tokenizer`: `Metaspace` (`prepend_scheme` always/first/never or the older
//!   `add_prefix_space`, `split`), `Sequence` of those, or null;
//! - `model`: `BPE` with `vocab`, `merges` (`"a b"` strings or `["a", "b"]` pairs), `unk_token`,
//!   `fuse_unk`, `byte_fallback`, `ignore_merges`;
//! - `decoder`: `Sequence`, `Replace`, `ByteFallback`, `Fuse`, `Strip`, `Metaspace`.
//!
//! Anything else (byte-level GPT-2 tokenizers, WordPiece, Unigram, regex patterns, Unicode
//! normalization forms) is rejected when the file is loaded, naming the unsupported part.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::bpe::{self, Symbol};

/// An entry of `added_tokens`.
#[derive(Debug, Clone, PartialEq)]
pub struct AddedToken {
    pub id: u32,
    pub content: String,
    pub special: bool,
    pub normalized: bool,
    pub lstrip: bool,
    pub rstrip: bool,
    /// Matches only where no word character (alphanumeric or `_`) touches it on either side.
    pub single_word: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Normalizer {
    Sequence(Vec<Normalizer>),
    Prepend(String),
    Replace { pattern: String, content: String },
    Lowercase,
    Strip { left: bool, right: bool },
}

impl Normalizer {
    fn apply(&self, s: String) -> String {
        match self {
            Normalizer::Sequence(list) => list.iter().fold(s, |acc, n| n.apply(acc)),
            Normalizer::Prepend(p) => {
                if s.is_empty() {
                    s
                } else {
                    format!("{p}{s}")
                }
            }
            Normalizer::Replace { pattern, content } => s.replace(pattern.as_str(), content),
            // Character by character, as `tokenizers` does (no final-sigma rule).
            Normalizer::Lowercase => s.chars().flat_map(char::to_lowercase).collect(),
            Normalizer::Strip { left, right } => {
                let mut t = s.as_str();
                if *left {
                    t = t.trim_start();
                }
                if *right {
                    t = t.trim_end();
                }
                t.to_string()
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum PrependScheme {
    Always,
    First,
    Never,
}

#[derive(Debug, Clone, PartialEq)]
struct Metaspace {
    replacement: char,
    prepend: PrependScheme,
    split: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Decoder {
    Replace {
        pattern: String,
        content: String,
    },
    ByteFallback,
    Fuse,
    Strip {
        content: char,
        start: usize,
        stop: usize,
    },
    Metaspace(Metaspace),
}

/// `"a"`, or `{"String": "a"}`; regex patterns are not supported.
fn string_pattern(v: &Value, what: &str) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Object(m) if m.contains_key("String") => Ok(m["String"]
            .as_str()
            .ok_or_else(|| anyhow!("{what}: pattern.String is not a string"))?
            .to_string()),
        Value::Object(m) if m.contains_key("Regex") => {
            bail!("{what}: regex patterns are not supported (only string patterns)")
        }
        other => bail!("{what}: unexpected pattern {other}"),
    }
}

fn str_field<'a>(v: &'a Value, key: &str, what: &str) -> Result<&'a str> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("{what}: missing string `{key}`"))
}

fn type_of<'a>(v: &'a Value, what: &str) -> Result<&'a str> {
    str_field(v, "type", what)
}

fn parse_normalizer(v: &Value) -> Result<Normalizer> {
    let ty = type_of(v, "normalizer")?;
    Ok(match ty {
        "Sequence" => Normalizer::Sequence(
            v["normalizers"]
                .as_array()
                .ok_or_else(|| anyhow!("normalizer Sequence without `normalizers`"))?
                .iter()
                .map(parse_normalizer)
                .collect::<Result<_>>()?,
        ),
        "Prepend" => Normalizer::Prepend(str_field(v, "prepend", "Prepend normalizer")?.to_string()),
        "Replace" => Normalizer::Replace {
            pattern: string_pattern(&v["pattern"], "Replace normalizer")?,
            content: str_field(v, "content", "Replace normalizer")?.to_string(),
        },
        "Lowercase" => Normalizer::Lowercase,
        "Strip" => Normalizer::Strip {
            left: v["strip_left"].as_bool().unwrap_or(true),
            right: v["strip_right"].as_bool().unwrap_or(true),
        },
        other => bail!(
            "normalizer `{other}` is not supported (supported: Sequence, Prepend, Replace, Lowercase, Strip)"
        ),
    })
}

fn parse_metaspace(v: &Value, what: &str) -> Result<Metaspace> {
    let replacement = str_field(v, "replacement", what)?;
    let mut chars = replacement.chars();
    let (Some(replacement), None) = (chars.next(), chars.next()) else {
        bail!("{what}: replacement {replacement:?} must be one character");
    };
    let prepend = match v.get("prepend_scheme").and_then(Value::as_str) {
        Some("always") => PrependScheme::Always,
        Some("first") => PrependScheme::First,
        Some("never") => PrependScheme::Never,
        Some(other) => bail!("{what}: unknown prepend_scheme {other:?}"),
        None => match v.get("add_prefix_space").and_then(Value::as_bool) {
            Some(false) => PrependScheme::Never,
            _ => PrependScheme::Always,
        },
    };
    let split = v.get("split").and_then(Value::as_bool).unwrap_or(true);
    Ok(Metaspace {
        replacement,
        prepend,
        split,
    })
}

fn parse_pre_tokenizer(v: &Value, out: &mut Vec<Metaspace>) -> Result<()> {
    match type_of(v, "pre_tokenizer")? {
        "Sequence" => {
            for p in v["pretokenizers"].as_array().ok_or_else(|| anyhow!("pre_tokenizer Sequence without `pretokenizers`"))? {
                parse_pre_tokenizer(p, out)?;
            }
        }
        "Metaspace" => out.push(parse_metaspace(v, "Metaspace pre_tokenizer")?),
        other => bail!(
            "pre_tokenizer `{other}` is not supported: only Llama-style (Metaspace) tokenizers are, not byte-level BPE"
        ),
    }
    Ok(())
}

fn parse_decoder(v: &Value, out: &mut Vec<Decoder>) -> Result<()> {
    match type_of(v, "decoder")? {
        "Sequence" => {
            for d in v["decoders"].as_array().ok_or_else(|| anyhow!("decoder Sequence without `decoders`"))? {
                parse_decoder(d, out)?;
            }
        }
        "Replace" => out.push(Decoder::Replace {
            pattern: string_pattern(&v["pattern"], "Replace decoder")?,
            content: str_field(v, "content", "Replace decoder")?.to_string(),
        }),
        "ByteFallback" => out.push(Decoder::ByteFallback),
        "Fuse" => out.push(Decoder::Fuse),
        "Strip" => {
            let content = str_field(v, "content", "Strip decoder")?;
            let mut chars = content.chars();
            let (Some(content), None) = (chars.next(), chars.next()) else {
                bail!("Strip decoder: content {content:?} must be one character");
            };
            let start = v["start"].as_u64().unwrap_or(0) as usize;
            let stop = v["stop"].as_u64().unwrap_or(0) as usize;
            out.push(Decoder::Strip { content, start, stop });
        }
        "Metaspace" => out.push(Decoder::Metaspace(parse_metaspace(v, "Metaspace decoder")?)),
        other => bail!(
            "decoder `{other}` is not supported (supported: Sequence, Replace, ByteFallback, Fuse, Strip, Metaspace)"
        ),
    }
    Ok(())
}

/// `<0x41>` -> 0x41 (the `tokenizers` ByteFallback rule: exactly six characters).
fn byte_token(token: &str) -> Option<u8> {
    if token.len() == 6 && token.starts_with("<0x") && token.ends_with('>') {
        u8::from_str_radix(&token[3..5], 16).ok()
    } else {
        None
    }
}

/// A loaded Llama-style Hugging Face tokenizer.
#[derive(Debug, Clone)]
pub struct HfTokenizer {
    vocab: HashMap<String, u32>,
    id_to_token: Vec<Option<String>>,
    /// (left id, right id) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    unk_id: Option<u32>,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    added: Vec<AddedToken>,
    /// What each added token matches: its content, normalized for `normalized` tokens (they are
    /// looked for in the normalized text, as `tokenizers` does).
    added_patterns: Vec<String>,
    normalizer: Option<Normalizer>,
    pre_tokenizers: Vec<Metaspace>,
    decoders: Vec<Decoder>,
}

impl HfTokenizer {
    /// Loads a `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read tokenizer {}: check the tokenizer `path`",
                path.display()
            )
        })?;
        Self::from_json(&text)
            .with_context(|| format!("{} is not a usable tokenizer.json", path.display()))
    }

    /// Loads the text of a `tokenizer.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let root: Value = serde_json::from_str(text).context("invalid JSON")?;
        let model = root
            .get("model")
            .ok_or_else(|| anyhow!("no `model` section"))?;
        let ty = model.get("type").and_then(Value::as_str).unwrap_or("BPE");
        if ty != "BPE" {
            bail!("model type `{ty}` is not supported (only BPE)");
        }
        for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
            if model
                .get(key)
                .is_some_and(|v| !v.is_null() && v.as_str() != Some(""))
            {
                bail!("BPE `{key}` is not supported (Llama-style tokenizers have none)");
            }
        }
        let vocab_obj = model["vocab"]
            .as_object()
            .ok_or_else(|| anyhow!("model.vocab is not a mapping"))?;
        let mut vocab = HashMap::with_capacity(vocab_obj.len());
        for (token, id) in vocab_obj {
            let id = id
                .as_u64()
                .ok_or_else(|| anyhow!("vocab id of {token:?} is not a number"))?
                as u32;
            vocab.insert(token.clone(), id);
        }
        let mut added = Vec::new();
        for t in root
            .get("added_tokens")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let flag = |k: &str| t.get(k).and_then(Value::as_bool).unwrap_or(false);
            added.push(AddedToken {
                id: t["id"]
                    .as_u64()
                    .ok_or_else(|| anyhow!("added token without an id: {t}"))?
                    as u32,
                content: str_field(t, "content", "added token")?.to_string(),
                special: flag("special"),
                normalized: t
                    .get("normalized")
                    .and_then(Value::as_bool)
                    .unwrap_or(!flag("special")),
                lstrip: flag("lstrip"),
                rstrip: flag("rstrip"),
                single_word: flag("single_word"),
            });
        }
        let size = vocab
            .values()
            .chain(added.iter().map(|a| &a.id))
            .map(|&id| id as usize + 1)
            .max()
            .unwrap_or(0);
        let mut id_to_token = vec![None; size];
        for (token, &id) in &vocab {
            id_to_token[id as usize] = Some(token.clone());
        }
        for a in &added {
            id_to_token[a.id as usize] = Some(a.content.clone());
        }

        let mut merges = HashMap::new();
        for (rank, m) in model["merges"].as_array().into_iter().flatten().enumerate() {
            let (a, b) = match m {
                Value::String(s) => s
                    .split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| anyhow!("merge #{rank} {s:?} is not `left right`"))?,
                Value::Array(pair) if pair.len() == 2 && pair.iter().all(Value::is_string) => (
                    pair[0].as_str().unwrap_or_default().to_string(),
                    pair[1].as_str().unwrap_or_default().to_string(),
                ),
                other => bail!("merge #{rank} {other} is neither `left right` nor [left, right]"),
            };
            let id = |t: &str| {
                vocab
                    .get(t)
                    .copied()
                    .ok_or_else(|| anyhow!("merge #{rank} uses {t:?}, which is not in the vocab"))
            };
            let merged = format!("{a}{b}");
            merges.insert((id(&a)?, id(&b)?), (rank as u32, id(&merged)?));
        }
        let unk_id = match model.get("unk_token").and_then(Value::as_str) {
            None => None,
            Some(t) => Some(
                *vocab
                    .get(t)
                    .ok_or_else(|| anyhow!("unk_token {t:?} is not in the vocab"))?,
            ),
        };
        let normalizer = match root.get("normalizer") {
            None | Some(Value::Null) => None,
            Some(v) => Some(parse_normalizer(v)?),
        };
        let mut pre_tokenizers = Vec::new();
        if let Some(v) = root.get("pre_tokenizer").filter(|v| !v.is_null()) {
            parse_pre_tokenizer(v, &mut pre_tokenizers)?;
        }
        let mut decoders = Vec::new();
        if let Some(v) = root.get("decoder").filter(|v| !v.is_null()) {
            parse_decoder(v, &mut decoders)?;
        }
        let added_patterns = added
            .iter()
            .map(|a| match (&normalizer, a.normalized) {
                (Some(n), true) => n.apply(a.content.clone()),
                _ => a.content.clone(),
            })
            .collect();
        Ok(HfTokenizer {
            added_patterns,
            vocab,
            id_to_token,
            merges,
            unk_id,
            fuse_unk: model["fuse_unk"].as_bool().unwrap_or(false),
            byte_fallback: model["byte_fallback"].as_bool().unwrap_or(false),
            ignore_merges: model["ignore_merges"].as_bool().unwrap_or(false),
            added,
            normalizer,
            pre_tokenizers,
            decoders,
        })
    }

    /// Number of ids (the largest id plus one).
    pub fn vocab_size(&self) -> usize {
        self.id_to_token.len()
    }

    pub fn added_tokens(&self) -> &[AddedToken] {
        &self.added
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.added
            .iter()
            .find(|a| a.content == token)
            .map(|a| a.id)
            .or_else(|| self.vocab.get(token).copied())
    }

    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.id_to_token.get(id as usize).and_then(|t| t.as_deref())
    }

    pub fn unk_id(&self) -> Option<u32> {
        self.unk_id
    }

    /// Splits `text` around the added tokens with the given `normalized` flag:
    /// `(start, end, Some(id))` for a token (including stripped whitespace), `None` for text.
    fn split_added(&self, text: &str, normalized: bool) -> Vec<(usize, usize, Option<u32>)> {
        let mut candidates: Vec<(&str, &AddedToken)> = self
            .added_patterns
            .iter()
            .zip(&self.added)
            .filter(|(pattern, a)| a.normalized == normalized && !pattern.is_empty())
            .map(|(pattern, a)| (pattern.as_str(), a))
            .collect();
        candidates.sort_by_key(|(pattern, _)| std::cmp::Reverse(pattern.len()));
        let mut out = Vec::new();
        let mut last = 0;
        let mut pos = 0;
        while pos < text.len() {
            let hit = candidates
                .iter()
                .find(|(pattern, _)| text[pos..].starts_with(pattern));
            let Some(&(pattern, token)) = hit else {
                pos += text[pos..].chars().next().map_or(1, char::len_utf8);
                continue;
            };
            let mut start = pos;
            let mut end = pos + pattern.len();
            // A single-word token inside a word stays text, and (as in `tokenizers`, whose
            // matches do not overlap) no other token is looked for inside it.
            let is_word_char = |c: char| c.is_alphanumeric() || c == '_';
            if token.single_word
                && (text[..start].chars().next_back().is_some_and(is_word_char)
                    || text[end..].chars().next().is_some_and(is_word_char))
            {
                pos = end;
                continue;
            }
            if token.lstrip {
                start = last + text[last..start].trim_end().len();
            }
            if token.rstrip {
                end = text.len() - text[end..].trim_start().len();
            }
            if start > last {
                out.push((last, start, None));
            }
            out.push((start, end, Some(token.id)));
            last = end;
            pos = end;
        }
        if last < text.len() {
            out.push((last, text.len(), None));
        }
        out
    }

    /// Encodes text into ids, without special tokens around it (`add_special_tokens=False`).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        for (start, end, token) in self.split_added(text, false) {
            if let Some(id) = token {
                ids.push(id);
                continue;
            }
            let normalized = match &self.normalizer {
                Some(n) => n.apply(text[start..end].to_string()),
                None => text[start..end].to_string(),
            };
            for (i, (s, e, token)) in self.split_added(&normalized, true).into_iter().enumerate() {
                if let Some(id) = token {
                    ids.push(id);
                    continue;
                }
                let at_start = start == 0 && i == 0;
                for word in self.pre_tokenize(&normalized[s..e], at_start) {
                    self.encode_word(&word, &mut ids);
                }
            }
        }
        ids
    }

    fn pre_tokenize(&self, text: &str, at_start: bool) -> Vec<String> {
        let mut words = vec![text.to_string()];
        for m in &self.pre_tokenizers {
            let mut next = Vec::new();
            for w in words {
                let rep = m.replacement.to_string();
                let mut w = w.replace(' ', &rep);
                let prepend = match m.prepend {
                    PrependScheme::Always => true,
                    PrependScheme::First => at_start,
                    PrependScheme::Never => false,
                };
                if prepend && !w.starts_with(m.replacement) {
                    w.insert(0, m.replacement);
                }
                if m.split {
                    // Split before every replacement character ("MergedWithNext").
                    let mut cur = String::new();
                    for c in w.chars() {
                        if c == m.replacement && !cur.is_empty() {
                            next.push(std::mem::take(&mut cur));
                        }
                        cur.push(c);
                    }
                    if !cur.is_empty() {
                        next.push(cur);
                    }
                } else {
                    next.push(w);
                }
            }
            words = next;
        }
        words.retain(|w| !w.is_empty());
        words
    }

    fn encode_word(&self, word: &str, out: &mut Vec<u32>) {
        if self.ignore_merges {
            if let Some(&id) = self.vocab.get(word) {
                out.push(id);
                return;
            }
        }
        let mut symbols: Vec<Symbol> = Vec::new();
        let push = |symbols: &mut Vec<Symbol>, id: u32, len: usize| {
            let start = symbols.last().map_or(0, |s| s.end);
            symbols.push(Symbol {
                start,
                end: start + len,
                id,
                frozen: false,
            });
        };
        let mut unk: Option<usize> = None; // pending unknown span length
        for c in word.chars() {
            let mut buf = [0u8; 4];
            let s = c.encode_utf8(&mut buf);
            if let Some(&id) = self.vocab.get(&*s) {
                if let (Some(len), Some(unk_id)) = (unk.take(), self.unk_id) {
                    push(&mut symbols, unk_id, len);
                }
                push(&mut symbols, id, s.len());
                continue;
            }
            if self.byte_fallback {
                let bytes: Option<Vec<u32>> = s
                    .bytes()
                    .map(|b| self.vocab.get(&format!("<0x{b:02X}>")).copied())
                    .collect();
                if let Some(bytes) = bytes {
                    for id in bytes {
                        push(&mut symbols, id, 1);
                    }
                    continue;
                }
            }
            if let Some(unk_id) = self.unk_id {
                unk = match (unk, self.fuse_unk) {
                    (Some(len), true) => Some(len + s.len()),
                    (Some(len), false) => {
                        push(&mut symbols, unk_id, len);
                        Some(s.len())
                    }
                    (None, _) => Some(s.len()),
                };
            }
        }
        if let (Some(len), Some(unk_id)) = (unk, self.unk_id) {
            push(&mut symbols, unk_id, len);
        }
        let merged = bpe::merge(symbols, |l, r| {
            self.merges
                .get(&(l.id, r.id))
                .map(|&(rank, id)| (-f64::from(rank), id))
        });
        out.extend(merged.iter().map(|s| s.id));
    }

    /// Decodes ids through the file's decoder chain. With `skip_special_tokens`, special added
    /// tokens (`<s>`, `</s>`, ...) are dropped first. Ids outside the vocabulary are an error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let mut tokens = Vec::with_capacity(ids.len());
        for &id in ids {
            if skip_special_tokens && self.added.iter().any(|a| a.id == id && a.special) {
                continue;
            }
            let token = self.id_to_token(id).ok_or_else(|| {
                anyhow!(
                    "cannot decode id {id}: not in the vocabulary ({} ids)",
                    self.vocab_size()
                )
            })?;
            tokens.push(token.to_string());
        }
        for d in &self.decoders {
            tokens = apply_decoder(d, tokens);
        }
        Ok(tokens.concat())
    }
}

fn apply_decoder(d: &Decoder, tokens: Vec<String>) -> Vec<String> {
    match d {
        Decoder::Replace { pattern, content } => tokens
            .into_iter()
            .map(|t| t.replace(pattern.as_str(), content))
            .collect(),
        Decoder::Fuse => vec![tokens.concat()],
        Decoder::ByteFallback => {
            let mut out = Vec::with_capacity(tokens.len());
            let mut bytes: Vec<u8> = Vec::new();
            let flush = |bytes: &mut Vec<u8>, out: &mut Vec<String>| {
                if bytes.is_empty() {
                    return;
                }
                match String::from_utf8(std::mem::take(bytes)) {
                    Ok(s) => out.push(s),
                    // An invalid run becomes one U+FFFD per byte, as in `tokenizers`.
                    Err(e) => {
                        for _ in e.into_bytes() {
                            out.push("\u{FFFD}".to_string());
                        }
                    }
                }
            };
            for t in tokens {
                match byte_token(&t) {
                    Some(b) => bytes.push(b),
                    None => {
                        flush(&mut bytes, &mut out);
                        out.push(t);
                    }
                }
            }
            flush(&mut bytes, &mut out);
            out
        }
        Decoder::Strip {
            content,
            start,
            stop,
        } => tokens
            .into_iter()
            .map(|t| {
                let chars: Vec<char> = t.chars().collect();
                let mut from = 0;
                while from < (*start).min(chars.len()) && chars[from] == *content {
                    from += 1;
                }
                let mut to = chars.len();
                while chars.len() - to < *stop && to > from && chars[to - 1] == *content {
                    to -= 1;
                }
                chars[from..to].iter().collect()
            })
            .collect(),
        Decoder::Metaspace(m) => tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                // The first token loses every replacement character (the prepended ones).
                if i == 0 && m.prepend != PrependScheme::Never {
                    t.chars().filter(|&c| c != m.replacement).collect()
                } else {
                    t.replace(m.replacement, " ")
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> HfTokenizer {
        HfTokenizer::from_json(
            r#"{
              "added_tokens": [{"id": 1, "content": "<s>", "special": true, "normalized": false}],
              "normalizer": {"type": "Sequence", "normalizers": [
                  {"type": "Prepend", "prepend": "▁"},
                  {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
              "pre_tokenizer": null,
              "decoder": {"type": "Sequence", "decoders": [
                  {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                  {"type": "ByteFallback"}, {"type": "Fuse"},
                  {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
              "model": {"type": "BPE", "unk_token": "<unk>", "fuse_unk": true, "byte_fallback": true,
                "vocab": {"<unk>": 0, "<s>": 1, "<0x21>": 2, "▁": 3, "a": 4, "b": 5, "▁a": 6, "ab": 7, "▁ab": 8},
                "merges": ["▁ a", "a b", "▁a b"]}
            }"#,
        )
        .unwrap()
    }

    #[test]
    fn merges_by_rank_with_byte_fallback_and_unk() {
        let t = tiny();
        assert_eq!(t.encode("ab"), [8]);
        assert_eq!(t.encode("ba"), [3, 5, 4]);
        assert_eq!(t.encode("a!"), [6, 2]);
        // 'x' and 'y' have no piece and no byte piece: one fused <unk>.
        assert_eq!(t.encode("axy"), [6, 0]);
        // The added token splits the text; each side is normalized (so gets its own "▁").
        assert_eq!(t.encode("a<s>a"), [6, 1, 6]);
        assert_eq!(t.decode(&[6, 1, 6, 2], false).unwrap(), "a<s> a!");
        assert_eq!(t.decode(&[6, 1, 6, 2], true).unwrap(), "a a!");
        assert!(t.decode(&[99], false).is_err());
    }

    #[test]
    fn normalized_added_tokens_match_their_normalized_text() {
        let json = r#"{
          "added_tokens": [{"id": 9, "content": "<t>", "special": false, "normalized": true}],
          "normalizer": {"type": "Sequence", "normalizers": [
              {"type": "Prepend", "prepend": "▁"},
              {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
          "model": {"type": "BPE", "unk_token": "<unk>", "byte_fallback": true,
            "vocab": {"<unk>": 0, "▁": 3, "a": 4, "▁a": 6},
            "merges": ["▁ a"]}
        }"#;
        let t = HfTokenizer::from_json(json).unwrap();
        // "<t>" normalizes to "▁<t>", which is what the normalized text holds.
        assert_eq!(t.encode("<t>"), [9]);
        assert_eq!(t.encode("a <t>"), [6, 9]);
    }

    #[test]
    fn lowercase_and_metaspace_decoding_follow_tokenizers() {
        // Character by character: no final sigma.
        assert_eq!(Normalizer::Lowercase.apply("ΣΑΣ".to_string()), "σασ");
        let metaspace = Decoder::Metaspace(Metaspace {
            replacement: '▁',
            prepend: PrependScheme::Always,
            split: true,
        });
        let tokens = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            apply_decoder(&metaspace, tokens(&["▁▁a", "▁b"])).concat(),
            "a b"
        );
    }

    #[test]
    fn unsupported_parts_are_named() {
        let err = HfTokenizer::from_json(r#"{"pre_tokenizer": {"type": "ByteLevel"}, "model": {"type": "BPE", "vocab": {}, "merges": []}}"#)
            .unwrap_err();
        assert!(format!("{err:#}").contains("ByteLevel"), "{err:#}");
        let err =
            HfTokenizer::from_json(r#"{"model": {"type": "WordPiece", "vocab": {}}}"#).unwrap_err();
        assert!(format!("{err:#}").contains("WordPiece"), "{err:#}");
    }
}
