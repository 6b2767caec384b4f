//! `generate`: torchtune 0.6.1's generation recipe, with a KV cache.
//!
//! Build the model (optionally with a LoRA adapter on top, see [`load_for_inference`](crate::inference::load_for_inference)) and the
//! tokenizer from the config, turn `prompt` into tokens, then repeat `max_new_tokens` times:
//! forward the tokens the model has not seen yet (all of them without the cache), pick the next
//! token from the last position's logits (greedy at `temperature: 0`, else temperature + top-k
//! sampling as torchtune does), stop at EOS. Prints the text and the speed.
//!
//! Config keys (torchtune's): `model`, `checkpointer`, `tokenizer`, `prompt` (`{system, user}`
//! or a plain string), `max_new_tokens`, `temperature`, `top_k`, `seed`, `enable_kv_cache`,
//! `device`, `dtype`; tune-rs adds `adapter_dir` (a PEFT adapter folder or a tune-rs `epoch_N`).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_yaml::Value;
use tune_core::recipe::{Recipe, RecipeEntry, RunOptions};
use tune_core::{ComponentKind, Config};
use tune_data::{Llama2Tokenizer, Message, Role};
use tune_models::builders::model_spec_from_node;
use tune_models::decoder::{Forward, KvCache};
use tune_models::{ModelSpec, TransformerDecoder};

use crate::data::check_vocab;
use crate::inference::{check_adapter_source, load_for_inference, reject_quantizer};
use crate::settings::{parse_device, parse_dtype, random_seed, seed_setting, TopLevel};

pub struct Generate;

tune_core::inventory::submit! { RecipeEntry(&Generate) }

impl Recipe for Generate {
    fn name(&self) -> &'static str {
        "generate"
    }

    fn configs(&self) -> &'static [&'static str] {
        &["llama2/generation", "stories260K/generation"]
    }

    fn top_level_keys(&self) -> &'static [&'static str] {
        &[
            "model",
            "tokenizer",
            "checkpointer",
            "prompt",
            "max_new_tokens",
            "temperature",
            "top_k",
            "seed",
            "device",
            "dtype",
            "quantizer",
            "enable_kv_cache",
            "adapter_dir",
            "log_level",
            "plugins",
        ]
    }

    fn keys_without_effect(&self) -> &'static [&'static str] {
        // torchtune's generation config has an `output_dir` for its checkpointer; nothing is
        // written.
        &["output_dir", "cudnn_deterministic_mode"]
    }

    fn run(&self, config: Config, options: &RunOptions) -> Result<()> {
        if options.is_distributed() {
            bail!("generate runs on one device; drop --nnodes/--nproc_per_node");
        }
        if let Some(out) = generate(config, options)? {
            println!("{}", out.full_text);
            tracing::info!(
                "Time for inference: {:.2} sec total, {:.2} tokens/sec ({} prompt tokens, {} generated, KV cache {})",
                out.seconds,
                out.tokens_per_second(),
                out.prompt_ids.len(),
                out.token_ids.len(),
                if out.used_kv_cache { "on" } else { "off" }
            );
        }
        Ok(())
    }
}

/// What one generation produced.
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    /// The new tokens (ending with the stop token when one was produced).
    pub token_ids: Vec<u32>,
    /// The new tokens decoded.
    pub text: String,
    /// Prompt and new tokens decoded together (what the recipe prints, as torchtune does).
    pub full_text: String,
    /// Wall time of the decoding loop (prompt included).
    pub seconds: f64,
    pub used_kv_cache: bool,
    /// The sampling seed (drawn when the config's is null).
    pub seed: u64,
}

impl Generation {
    pub fn tokens_per_second(&self) -> f64 {
        self.token_ids.len() as f64 / self.seconds.max(1e-9)
    }
}

/// Runs the recipe; `None` for a dry run.
pub fn generate(config: Config, options: &RunOptions) -> Result<Option<Generation>> {
    let cfg = TopLevel(&config);

    // ---- Settings ------------------------------------------------------------------------
    // As torchtune's set_seed: `seed: null` draws one (said, so that the text can be repeated).
    let seed = match seed_setting(&cfg, 1)? {
        Some(seed) => seed,
        None => {
            let seed = random_seed(1);
            if !options.dry_run {
                tracing::info!(
                    "seed is null: sampling with seed {seed} (seed={seed} repeats this)"
                );
            }
            seed
        }
    };
    let max_new_tokens: usize = cfg.require("max_new_tokens")?;
    let use_cache: bool = cfg.get("enable_kv_cache", true)?;
    // torchtune's recipe fails on a null temperature; a silent default would hide the typo.
    let temperature: f64 = cfg.opt("temperature")?.context(
        "temperature is null or missing: give a number, 0 for greedy decoding (torchtune's \
         generation config uses 0.6)",
    )?;
    let mut sampler = Sampler::new(temperature, cfg.opt("top_k")?, seed)?;
    reject_quantizer(&cfg)?;

    // ---- Tokenizer and prompt -------------------------------------------------------------
    let tokenizer: Llama2Tokenizer = cfg.build("tokenizer", ComponentKind::Tokenizer)?;
    let prompt_ids = prompt_tokens(cfg.0.get("prompt"), &tokenizer)?;
    if options.dry_run {
        let spec = model_spec_from_node(cfg.node("model")?).context("building `model`")?;
        check_fits(&spec, prompt_ids.len(), max_new_tokens)?;
        check_adapter_source(&cfg)?;
        println!("{}", config.to_yaml_string());
        println!("prompt: {} tokens {:?}", prompt_ids.len(), prompt_ids);
        return Ok(None);
    }

    // ---- Model (past the dry run: only now does the device matter) ------------------------
    let device = parse_device(&cfg.get("device", "cpu".to_string())?)?;
    let dtype = parse_dtype(&cfg.get("dtype", "fp32".to_string())?, &device)?;
    let loaded = load_for_inference(&cfg, dtype, &device, seed)?;
    check_vocab(&tokenizer, loaded.spec.transformer.vocab_size)?;
    check_fits(&loaded.spec, prompt_ids.len(), max_new_tokens)?;

    // ---- Generate --------------------------------------------------------------------------
    let started = Instant::now();
    let token_ids = generate_tokens(
        &loaded.model,
        &prompt_ids,
        max_new_tokens,
        &[tokenizer.eos_id()],
        &mut sampler,
        use_cache,
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let text = tokenizer.decode(&token_ids)?;
    let full_text = tokenizer.decode(&[&prompt_ids[..], &token_ids[..]].concat())?;
    Ok(Some(Generation {
        prompt_ids,
        token_ids,
        text,
        full_text,
        seconds,
        used_kv_cache: use_cache,
        seed,
    }))
}

/// Generates up to `max_new_tokens` after `prompt`, stopping after a token in `stop_tokens`.
/// With `use_cache`, the prompt is run once and then one token per step against the KV cache;
/// without it, every step runs the whole sequence again.
pub fn generate_tokens(
    model: &TransformerDecoder,
    prompt: &[u32],
    max_new_tokens: usize,
    stop_tokens: &[u32],
    sampler: &mut Sampler,
    use_cache: bool,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        bail!("the prompt has no tokens; generation needs at least BOS");
    }
    let device = model.device();
    let mut sequence = prompt.to_vec();
    let mut cache = KvCache::new();
    let mut generated = Vec::with_capacity(max_new_tokens);
    for _ in 0..max_new_tokens {
        let logits = if use_cache {
            let unseen = &sequence[cache.len()..];
            model.forward_cached(&row_tensor(unseen, device)?, &mut cache)?
        } else {
            model
                .forward_with(&row_tensor(&sequence, device)?, Forward::default())?
                .logits
        };
        let next = sampler.next_token(&last_position(&logits)?)?;
        sequence.push(next);
        generated.push(next);
        if stop_tokens.contains(&next) {
            break;
        }
    }
    Ok(generated)
}

fn row_tensor(ids: &[u32], device: &Device) -> Result<Tensor> {
    Ok(Tensor::new(ids, device)?.unsqueeze(0)?)
}

/// The logits of the last position of the first row, on the CPU.
fn last_position(logits: &Tensor) -> Result<Vec<f32>> {
    let seq = logits.dim(1)?;
    Ok(logits.i((0, seq - 1))?.to_dtype(DType::F32)?.to_vec1()?)
}

/// The model sees the prompt and every generated token but the last (as in torchtune), so
/// `prompt + max_new_tokens - 1` positions must fit.
fn check_fits(spec: &ModelSpec, prompt_len: usize, max_new_tokens: usize) -> Result<()> {
    let max = spec.transformer.max_seq_len;
    if prompt_len > max {
        bail!(
            "the prompt is {prompt_len} tokens, more than the model's max_seq_len ({max}); \
             shorten the prompt"
        );
    }
    if prompt_len + max_new_tokens.saturating_sub(1) > max {
        bail!(
            "the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's \
             max_seq_len ({max}); lower max_new_tokens to at most {}",
            (max + 1).saturating_sub(prompt_len)
        );
    }
    Ok(())
}

/// torchtune's `prompt`: a mapping `{system: ..., user: ...}` tokenized as chat messages with the
/// tokenizer's prompt template (no end tokens), or a plain string encoded as `[BOS] + text`.
pub fn prompt_tokens(prompt: Option<&Value>, tokenizer: &Llama2Tokenizer) -> Result<Vec<u32>> {
    match prompt {
        None | Some(Value::Null) => {
            bail!("config key `prompt` is required, e.g. prompt.user=\"Tell me a joke.\"")
        }
        Some(Value::String(text)) => Ok(tokenizer.encode(text, true, false, false)),
        Some(Value::Mapping(map)) => {
            let mut messages = Vec::new();
            for (key, value) in map {
                let key = key.as_str().unwrap_or_default();
                let role = match key {
                    "system" => Role::System,
                    "user" => Role::User,
                    other => bail!("prompt.{other}: unknown key; `prompt` takes `system` (optional) and `user`"),
                };
                match value {
                    Value::Null if role == Role::System => {}
                    Value::String(text) => messages.push(Message::new(role, text.clone(), true)),
                    other => bail!(
                        "prompt.{key} must be a string, found {}; quote a value YAML reads \
                         otherwise: prompt.{key}=\"'...'\"",
                        tune_core::config::kind_of(other)
                    ),
                }
            }
            if !messages.iter().any(|m| m.role == Role::User) {
                bail!("prompt needs a `user` message, e.g. prompt.user=\"Tell me a joke.\"");
            }
            messages.sort_by_key(|m| m.role != Role::System);
            messages.push(Message::new(Role::Assistant, "", true));
            Ok(tokenizer.tokenize_messages(&messages, false).0)
        }
        Some(other) => bail!(
            "prompt must be a string or a mapping with `user` (and `system`), found {}",
            tune_core::config::kind_of(other)
        ),
    }
}

/// Picks the next token: the argmax at temperature 0, otherwise torchtune's sampling (scale by
/// 1/temperature, keep the `top_k` largest logits, softmax, draw with exponential noise).
pub struct Sampler {
    temperature: f64,
    top_k: Option<usize>,
    rng: StdRng,
}

impl Sampler {
    pub fn new(temperature: f64, top_k: Option<usize>, seed: u64) -> Result<Self> {
        if temperature.is_nan() || temperature < 0.0 {
            bail!("temperature must be 0 (greedy) or positive, got {temperature}");
        }
        if top_k == Some(0) {
            bail!("top_k must be at least 1, or null to sample from the whole vocabulary");
        }
        Ok(Sampler {
            temperature,
            top_k,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    pub fn greedy() -> Self {
        Sampler {
            temperature: 0.0,
            top_k: None,
            rng: StdRng::seed_from_u64(0),
        }
    }

    pub fn next_token(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            bail!("empty logits");
        }
        if self.temperature == 0.0 {
            return Ok(argmax(logits));
        }
        let scaled: Vec<f64> = logits
            .iter()
            .map(|&l| l as f64 / self.temperature.max(1e-5))
            .collect();
        let floor = match self.top_k {
            Some(k) if k < scaled.len() => kth_largest(&scaled, k),
            _ => f64::NEG_INFINITY,
        };
        let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        // argmax(p / q) with q ~ Exp(1) draws index i with probability p_i (torchtune's sampler).
        let mut best = (0u32, f64::NEG_INFINITY);
        for (i, &l) in scaled.iter().enumerate() {
            if l < floor {
                continue;
            }
            let q = -(1.0 - self.rng.gen::<f64>()).ln();
            let score = (l - max).exp() / q;
            if score > best.1 {
                best = (i as u32, score);
            }
        }
        Ok(best.0)
    }
}

/// Index of the largest value (the first one on ties, as torch.argmax and llama2.c).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

fn kth_largest(values: &[f64], k: usize) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    sorted[k - 1]
}
