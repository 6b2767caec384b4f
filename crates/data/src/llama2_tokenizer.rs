//! torchtune's `llama2_tokenizer` (0.6.1): `encode`/`decode` with BOS/EOS, torchtune's
//! leading-whitespace trim, and `tokenize_messages` (prompt template, per-item encoding, BOS/EOS
//! per turn, truncation to `max_seq_len`, loss masks).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use tune_core::{ArgSpec, ArgType, Args};

use crate::messages::{Message, PromptTemplate, Role, LLAMA2_CHAT_TEMPLATE};
use crate::tokenizer::Tokenizer;

/// Characters torchtune tries to encode to decide whether the vocabulary encodes whitespace.
const WHITESPACE_CHARS: [&str; 5] = [" ", "\n", "\t", "\r", "\u{0b}"];

/// The prefix torchtune encodes in front of text to trim its leading whitespace.
const TRIM_PREFIX: &str = "\n";

/// torchtune's `Llama2Tokenizer`.
#[derive(Debug, Clone)]
pub struct Llama2Tokenizer {
    path: PathBuf,
    tokenizer: Tokenizer,
    max_seq_len: Option<usize>,
    prompt_template: Option<PromptTemplate>,
    bos_id: u32,
    eos_id: u32,
    encodes_whitespace: bool,
    trim_prefix_ids: Vec<u32>,
}

impl Llama2Tokenizer {
    /// Loads the tokenizer at `path` (a SentencePiece `tokenizer.model`, or a `tokenizer.json`).
    /// `max_seq_len` must be positive when given.
    pub fn new(
        path: impl AsRef<Path>,
        max_seq_len: Option<usize>,
        prompt_template: Option<PromptTemplate>,
    ) -> Result<Self> {
        let path = path.as_ref();
        if max_seq_len == Some(0) {
            bail!("llama2_tokenizer: max_seq_len must be a positive number or null, not 0");
        }
        let tokenizer = Tokenizer::from_file(path)?;
        let bos_id = tokenizer
            .bos_id()
            .ok_or_else(|| anyhow!("tokenizer {} has no BOS token (<s>)", path.display()))?;
        let eos_id = tokenizer
            .eos_id()
            .ok_or_else(|| anyhow!("tokenizer {} has no EOS token (</s>)", path.display()))?;
        let encodes_whitespace = WHITESPACE_CHARS
            .iter()
            .any(|c| !tokenizer.encode(c).is_empty());
        let trim_prefix_ids = tokenizer.encode(TRIM_PREFIX);
        Ok(Llama2Tokenizer {
            path: path.to_path_buf(),
            tokenizer,
            max_seq_len,
            prompt_template,
            bos_id,
            eos_id,
            encodes_whitespace,
            trim_prefix_ids,
        })
    }

    /// The component's arguments: `path`, `max_seq_len` (null), `prompt_template`
    /// (default `torchtune.models.llama2.Llama2ChatTemplate`; null for none).
    pub fn from_args(args: &Args) -> Result<Self> {
        let path: String = args.get("path")?;
        let max_seq_len: Option<i64> = args.get_opt("max_seq_len")?;
        let max_seq_len = match max_seq_len {
            None => None,
            Some(n) if n > 0 => Some(n as usize),
            Some(n) => {
                bail!("llama2_tokenizer.max_seq_len: must be a positive number or null, got {n}")
            }
        };
        let template = match args.raw("prompt_template") {
            None => Some(PromptTemplate::Llama2Chat),
            Some(v) => {
                PromptTemplate::from_config(v).context("llama2_tokenizer.prompt_template")?
            }
        };
        Self::new(&path, max_seq_len, template).context("llama2_tokenizer")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying text tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Always 0: the Llama-2 model has no pad piece, and torchtune pads with 0 (`<unk>`).
    pub fn pad_id(&self) -> u32 {
        0
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.vocab_size()
    }

    pub fn max_seq_len(&self) -> Option<usize> {
        self.max_seq_len
    }

    pub fn prompt_template(&self) -> Option<&PromptTemplate> {
        self.prompt_template.as_ref()
    }

    /// Whether the vocabulary encodes whitespace characters (torchtune's `encodes_whitespace`).
    pub fn encodes_whitespace(&self) -> bool {
        self.encodes_whitespace
    }

    /// torchtune's `encode`. With `trim_leading_whitespace` (and a vocabulary that encodes
    /// whitespace), the text is encoded after a `"\n"` whose ids are then dropped, so the text
    /// gets no dummy-prefix `▁`; torchtune's slice drops BOS with them, so trimming never adds one.
    pub fn encode(
        &self,
        text: &str,
        add_bos: bool,
        add_eos: bool,
        trim_leading_whitespace: bool,
    ) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 2 + 2);
        let trim = trim_leading_whitespace && self.encodes_whitespace;
        if add_bos && !trim {
            ids.push(self.bos_id);
        }
        if trim {
            let all = self.tokenizer.encode(&format!("{TRIM_PREFIX}{text}"));
            ids.extend(all.into_iter().skip(self.trim_prefix_ids.len()));
        } else {
            ids.extend(self.tokenizer.encode(text));
        }
        if add_eos {
            ids.push(self.eos_id);
        }
        ids
    }

    /// torchtune's `decode`: BOS/EOS and other control tokens print nothing.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids)
    }

    /// torchtune's `tokenize_messages`: applies the prompt template, then encodes every content
    /// item of every message separately (trailing spaces stripped), with BOS at the start of each
    /// turn and EOS after each assistant message (when `add_end_tokens`). With `max_seq_len`, it
    /// stops after the message that reaches it and truncates, forcing the last token to EOS and
    /// the last mask to the last message's `masked`. Returns `(tokens, mask)`; `mask` is true
    /// where the token is excluded from the loss.
    pub fn tokenize_messages(
        &self,
        messages: &[Message],
        add_end_tokens: bool,
    ) -> (Vec<u32>, Vec<bool>) {
        let templated;
        let messages = match &self.prompt_template {
            Some(t) => {
                templated = t.apply(messages);
                &templated[..]
            }
            None => messages,
        };
        let eos = add_end_tokens.then_some(self.eos_id);
        let mut tokens = Vec::new();
        let mut mask = Vec::new();
        let mut start_of_turn = true;
        let mut prev_ends_with_space = false;
        let mut last_masked = None;
        for message in messages {
            last_masked = Some(message.masked);
            let end_of_turn = message.role == Role::Assistant;
            if start_of_turn {
                tokens.push(self.bos_id);
                mask.push(message.masked);
            }
            let trim = !start_of_turn && !prev_ends_with_space;
            let before = tokens.len();
            for item in &message.content {
                tokens.extend(self.encode(item.trim_end_matches(' '), false, false, trim));
            }
            if let Some(last) = message.content.last() {
                prev_ends_with_space = last.ends_with(' ');
            }
            mask.resize(mask.len() + tokens.len() - before, message.masked);
            if end_of_turn {
                if let Some(eos) = eos {
                    tokens.push(eos);
                    mask.push(message.masked);
                }
                start_of_turn = true;
            } else {
                start_of_turn = false;
            }
            if self.max_seq_len.is_some_and(|n| tokens.len() >= n) {
                break;
            }
        }
        if let Some(n) = self.max_seq_len {
            tokens.truncate(n);
            mask.truncate(n);
            if let (Some(eos), Some(t)) = (eos, tokens.last_mut()) {
                *t = eos;
            }
            if let (Some(_), Some(masked), Some(m)) = (eos, last_masked, mask.last_mut()) {
                *m = masked;
            }
        }
        (tokens, mask)
    }
}

tune_core::inventory::submit! {
    tune_core::Component {
        path: "torchtune.models.llama2.llama2_tokenizer",
        aliases: &["llama2_tokenizer", "tune_data::Llama2Tokenizer"],
        kind: tune_core::ComponentKind::Tokenizer,
        args: &[
            ArgSpec::required("path", ArgType::Str),
            ArgSpec::nullable("max_seq_len", ArgType::Int),
            ArgSpec { name: "prompt_template", ty: ArgType::Any, default: Some(LLAMA2_CHAT_TEMPLATE), nullable: true },
        ],
        extra_args: false,
        about: "Llama-2 tokenizer (SentencePiece tokenizer.model or Llama-style tokenizer.json) with the Llama-2 chat template",
        origin: "built-in",
        build: |args| Ok(Box::new(Llama2Tokenizer::from_args(args)?)),
    }
}
