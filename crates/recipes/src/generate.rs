//! `generate`: torchtune 0.6.1's generation recipe, with a KV cache.
//!
//! Build the model (optionally with a LoRA adapter on top, see [`load_for_inference`]) and the
//! tokenizer from the config, turn `prompt` into tokens, then repeat `max_new_tokens` times:
//! forward the tokens the model has not seen yet (all of them without the cache), pick the next
//! token from the last position's logits (greedy at `temperature: 0`, else temperature + top-k
//! sampling as torchtune does), stop at EOS. Prints the text and the speed.
//!
//! Config keys (torchtune's): `model`, `checkpointer`, `tokenizer`, `prompt` (`{system, user}`
//! or a plain string), `max_new_tokens`, `temperature`, `top_k`, `seed`, `enable_kv_cache`,
//! `device`, `dtype`; tune-rs adds `adapter_dir` (a PEFT adapter folder or a tune-rs `epoch_N`).

use std::path::{Path, PathBuf};
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
use tune_models::{LoraSettings, ModelSpec, TransformerDecoder};

use crate::checkpointer::HfCheckpointer;
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
    let mut sampler = Sampler::new(cfg.get("temperature", 0.6)?, cfg.opt("top_k")?, seed)?;
    reject_quantizer(&cfg)?;

    // ---- Tokenizer and prompt -------------------------------------------------------------
    let tokenizer: Llama2Tokenizer = cfg.build("tokenizer", ComponentKind::Tokenizer)?;
    let prompt_ids = prompt_tokens(cfg.0.get("prompt"), &tokenizer)?;
    if options.dry_run {
        let spec = model_spec_from_node(cfg.node("model")?).context("building `model`")?;
        check_fits(&spec, prompt_ids.len(), max_new_tokens)?;
        println!("{}", config.to_yaml_string());
        println!("prompt: {} tokens {:?}", prompt_ids.len(), prompt_ids);
        return Ok(None);
    }

    // ---- Model (past the dry run: only now does the device matter) ------------------------
    let device = parse_device(&cfg.get("device", "cpu".to_string())?)?;
    let dtype = parse_dtype(&cfg.get("dtype", "fp32".to_string())?, &device)?;
    let loaded = load_for_inference(&cfg, dtype, &device, seed)?;
    check_vocab(&tokenizer, &loaded.spec)?;
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

/// torchtune's `quantizer` key: only null (no quantization) is supported.
pub fn reject_quantizer(cfg: &TopLevel) -> Result<()> {
    if cfg.0.get("quantizer").is_some_and(|v| !v.is_null()) {
        bail!("quantizer is not supported by tune-rs inference recipes; set quantizer=null");
    }
    Ok(())
}

/// The tokenizer's ids must all be rows of the model's embedding.
pub fn check_vocab(tokenizer: &Llama2Tokenizer, spec: &ModelSpec) -> Result<()> {
    if tokenizer.vocab_size() > spec.transformer.vocab_size {
        bail!(
            "tokenizer {} has {} tokens but the model's vocab_size is {}; point tokenizer.path at the \
             model's tokenizer.model, or fix the model's vocab_size",
            tokenizer.path().display(),
            tokenizer.vocab_size(),
            spec.transformer.vocab_size
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

// =============================================================================================
// Loading a model, and optionally an adapter, for inference (shared with `eleuther_eval`).
// =============================================================================================

/// A model ready for inference, and where its adapter came from.
pub struct InferenceModel {
    pub model: TransformerDecoder,
    pub spec: ModelSpec,
    pub adapter: Option<PathBuf>,
}

/// Builds `model` from `checkpointer` and puts an adapter on top when the config names one:
/// `adapter_dir` (a PEFT folder with `adapter_config.json` + `adapter_model.safetensors`, or a
/// tune-rs `epoch_N` folder, whose `adapter/` is used) or `checkpointer.adapter_checkpoint` (a
/// safetensors file relative to `checkpoint_dir`, PEFT or torchtune names). The LoRA settings
/// come from `adapter_config.json` when there is one, else from the `model` node.
pub fn load_for_inference(
    cfg: &TopLevel,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> Result<InferenceModel> {
    let node_spec = model_spec_from_node(cfg.node("model")?).context("building `model`")?;
    let checkpointer: HfCheckpointer = cfg.build("checkpointer", ComponentKind::Checkpointer)?;
    let source = adapter_source(cfg.opt::<String>("adapter_dir")?, &checkpointer)?;
    let spec = spec_for_adapter(node_spec, source.as_ref())?;
    let (model, spec, _) = checkpointer.load_base(&spec, dtype, device, seed)?;
    if let Some(src) = &source {
        let tensors = HfCheckpointer::read_adapter(&src.weights, &spec)?;
        model
            .load_adapter(&tensors)
            .with_context(|| format!("loading the adapter {}", src.weights.display()))?;
        tracing::info!("loaded adapter {}", src.weights.display());
    }
    Ok(InferenceModel {
        model,
        spec,
        adapter: source.map(|s| s.weights),
    })
}

/// Adapter weights and, when found, their PEFT `adapter_config.json`.
#[derive(Debug, Clone)]
pub struct AdapterSource {
    pub weights: PathBuf,
    pub peft_config: Option<serde_json::Value>,
}

fn adapter_source(
    adapter_dir: Option<String>,
    checkpointer: &HfCheckpointer,
) -> Result<Option<AdapterSource>> {
    let source = match (adapter_dir, &checkpointer.adapter_checkpoint) {
        (Some(_), Some(_)) => {
            bail!("both adapter_dir and checkpointer.adapter_checkpoint are set; keep one of them")
        }
        (Some(dir), None) => Some(AdapterSource::from_dir(Path::new(&dir), "adapter_dir")?),
        (None, Some(dir)) if dir.is_dir() => Some(AdapterSource::from_dir(
            dir,
            "checkpointer.adapter_checkpoint",
        )?),
        (None, Some(file)) => {
            let config_path = file.parent().map(|p| p.join("adapter_config.json"));
            let peft_config = match config_path.filter(|p| p.is_file()) {
                Some(p) => Some(read_json(&p)?),
                None => None,
            };
            Some(AdapterSource {
                weights: file.clone(),
                peft_config,
            })
        }
        (None, None) => None,
    };
    if let Some(src) = &source {
        refuse_adapter_already_merged(src, &checkpointer.checkpoint_dir)?;
    }
    Ok(source)
}

/// A training output's merged weights already hold the adapter saved beside them: applied
/// again, its update would count twice. tune-rs's `epoch_N` keeps the adapter in `adapter/` next
/// to `recipe_state/`; torchtune's keeps `adapter_config.json` beside the model's own files.
fn refuse_adapter_already_merged(src: &AdapterSource, checkpoint_dir: &Path) -> Result<()> {
    let (Ok(folder), Ok(weights)) = (checkpoint_dir.canonicalize(), src.weights.canonicalize())
    else {
        return Ok(());
    };
    // A checkpoint saved with save_adapter_weights_only has no merged weights to refuse.
    let has_model_weights = std::fs::read_dir(&folder).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("model") && name.ends_with(".safetensors")
                || name.ends_with(".safetensors.index.json")
        })
    });
    let tune_rs_epoch = folder.join("recipe_state").is_dir() && weights.starts_with(&folder);
    let torchtune_epoch =
        folder.join("adapter_config.json").is_file() && weights.parent() == Some(folder.as_path());
    if has_model_weights && (tune_rs_epoch || torchtune_epoch) {
        bail!(
            "the merged weights in {} already include the adapter {}; drop adapter_dir (or \
             checkpointer.adapter_checkpoint) to use them as they are, or point \
             checkpointer.checkpoint_dir at the base model to apply the adapter to it",
            folder.display(),
            weights.display()
        );
    }
    Ok(())
}

impl AdapterSource {
    /// A PEFT adapter folder, or a tune-rs checkpoint folder holding one in `adapter/`; `key`
    /// names the setting that gave it, for messages.
    pub fn from_dir(dir: &Path, key: &str) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{key} {} is not a folder; point it at a PEFT adapter folder or a tune-rs epoch_N folder", dir.display());
        }
        let dir = if !dir.join("adapter_config.json").is_file()
            && dir.join("adapter/adapter_config.json").is_file()
        {
            dir.join("adapter")
        } else {
            dir.to_path_buf()
        };
        let config_path = dir.join("adapter_config.json");
        if !config_path.is_file() {
            bail!(
                "{key} {} has no adapter_config.json: expected a PEFT adapter folder (adapter_config.json + \
                 adapter_model.safetensors) or a tune-rs epoch_N folder with adapter/ inside",
                dir.display()
            );
        }
        let weights = dir.join("adapter_model.safetensors");
        if !weights.is_file() {
            let hint = if dir.join("adapter_model.bin").is_file() {
                "; only adapter_model.bin is there: re-save it with safetensors (PEFT save_pretrained(safe_serialization=True))"
            } else {
                ""
            };
            bail!(
                "{key} {} has no adapter_model.safetensors{hint}",
                dir.display()
            );
        }
        Ok(AdapterSource {
            weights,
            peft_config: Some(read_json(&config_path)?),
        })
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// The model to build: the `model` node's dimensions with the adapter's LoRA settings. Without an
/// adapter, a LoRA builder's (zero-initialised, output-neutral) adapters are dropped.
fn spec_for_adapter(mut spec: ModelSpec, source: Option<&AdapterSource>) -> Result<ModelSpec> {
    let Some(source) = source else {
        if spec.lora.take().is_some() {
            tracing::info!(
                "`{}` has LoRA settings but no adapter was given; running the base model",
                spec.builder
            );
        }
        return Ok(spec);
    };
    let Some(peft) = &source.peft_config else {
        if spec.lora.is_none() {
            bail!(
                "{} has no adapter_config.json next to it and `{}` has no LoRA settings: use a lora_* model \
                 builder with the adapter's lora_attn_modules, lora_rank and lora_alpha, or set adapter_dir to a \
                 folder with adapter_config.json",
                source.weights.display(),
                spec.builder
            );
        }
        return Ok(spec);
    };
    let quantize_base = spec.lora.as_ref().is_some_and(|l| l.quantize_base);
    let from_peft = lora_from_peft_config(peft, quantize_base).with_context(|| {
        format!(
            "reading the adapter_config.json of {}",
            source.weights.display()
        )
    })?;
    if let Some(node) = &spec.lora {
        if node != &from_peft {
            tracing::warn!("the `model` node's LoRA settings differ from adapter_config.json; using adapter_config.json");
        }
    }
    spec.lora = Some(from_peft);
    Ok(spec)
}

/// torchtune's LoRA settings from a PEFT `adapter_config.json` (`r`, `lora_alpha`,
/// `target_modules` in Hugging Face names, `use_dora`, `use_rslora`). Options tune-rs cannot
/// represent are an error rather than a silently different model.
pub fn lora_from_peft_config(
    config: &serde_json::Value,
    quantize_base: bool,
) -> Result<LoraSettings> {
    if let Some(kind) = config.get("peft_type").and_then(|v| v.as_str()) {
        if kind != "LORA" {
            bail!("peft_type is {kind}; only LORA adapters (and DoRA via use_dora) are supported");
        }
    }
    let rank = config
        .get("r")
        .and_then(|v| v.as_u64())
        .context("adapter_config.json has no integer `r` (the LoRA rank)")? as usize;
    if rank == 0 {
        bail!("adapter_config.json: r must be at least 1");
    }
    let mut alpha = config
        .get("lora_alpha")
        .and_then(|v| v.as_f64())
        .unwrap_or(8.0);
    if flag(config, "use_rslora") {
        // rsLoRA scales by alpha/sqrt(r); torchtune's LoRA by alpha/r.
        alpha *= (rank as f64).sqrt();
    }
    reject_unsupported_peft_options(config)?;
    let (lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output) =
        target_modules(config.get("target_modules"))?;
    let kind = if flag(config, "use_dora") {
        "dora"
    } else {
        "lora"
    };
    Ok(LoraSettings {
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        adapter: tune_core::AdapterSpec {
            kind: kind.to_string(),
            rank,
            alpha,
            dropout: config
                .get("lora_dropout")
                .and_then(|v| v.as_f64())
                .unwrap_or(0.0),
        },
        quantize_base,
    })
}

fn flag(config: &serde_json::Value, key: &str) -> bool {
    config.get(key).and_then(|v| v.as_bool()).unwrap_or(false)
}

fn reject_unsupported_peft_options(config: &serde_json::Value) -> Result<()> {
    let non_empty = |key: &str| match config.get(key) {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Object(m)) => !m.is_empty(),
        Some(serde_json::Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    };
    for key in [
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "modules_to_save",
    ] {
        if non_empty(key) {
            bail!("adapter_config.json sets `{key}`, which tune-rs does not support (one rank and alpha for every adapted layer)");
        }
    }
    if let Some(bias) = config.get("bias").and_then(|v| v.as_str()) {
        if bias != "none" {
            bail!("adapter_config.json has bias `{bias}`; only bias \"none\" is supported");
        }
    }
    if flag(config, "fan_in_fan_out") {
        bail!("adapter_config.json has fan_in_fan_out: true (GPT-2 style Conv1D weights); Llama adapters have it false");
    }
    Ok(())
}

/// Hugging Face module names -> (`lora_attn_modules`, `apply_lora_to_mlp`, `apply_lora_to_output`).
fn target_modules(value: Option<&serde_json::Value>) -> Result<(Vec<String>, bool, bool)> {
    const ATTN: [(&str, &str); 4] = [
        ("q_proj", "q_proj"),
        ("k_proj", "k_proj"),
        ("v_proj", "v_proj"),
        ("o_proj", "output_proj"),
    ];
    const MLP: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];
    let names: Vec<String> = match value {
        Some(serde_json::Value::String(s)) if s == "all-linear" => ATTN
            .iter()
            .map(|(hf, _)| hf.to_string())
            .chain(MLP.iter().map(|m| m.to_string()))
            .collect(),
        Some(serde_json::Value::String(s)) => {
            bail!("target_modules is the pattern {s:?}; tune-rs needs a list of module names (q_proj, v_proj, ...)")
        }
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(|s| s.rsplit('.').next().unwrap_or(s).to_string())
            })
            .collect::<Option<_>>()
            .context("target_modules must be a list of strings")?,
        _ => bail!("adapter_config.json has no target_modules"),
    };
    let mut attn = Vec::new();
    let mut mlp = Vec::new();
    let mut output = false;
    for name in &names {
        if let Some((_, tune)) = ATTN.iter().find(|(hf, _)| hf == name) {
            attn.push(tune.to_string());
        } else if MLP.contains(&name.as_str()) {
            mlp.push(name.as_str());
        } else if name == "lm_head" {
            output = true;
        } else {
            bail!("target module `{name}` is not a Llama projection; expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or lm_head");
        }
    }
    if !mlp.is_empty() && MLP.iter().any(|m| !mlp.contains(m)) {
        bail!("target_modules adapts {mlp:?} but not all of gate_proj, up_proj, down_proj; tune-rs adapts the MLP as a whole (apply_lora_to_mlp)");
    }
    // torchtune's order: q, k, v, output.
    attn.sort_by_key(|m| ATTN.iter().position(|(_, t)| t == m));
    attn.dedup();
    Ok((attn, !mlp.is_empty(), output))
}

/// torchtune's torchao quantizers (generation and eval take one as `quantizer`), refused with
/// what to do instead.
macro_rules! unavailable_quantizers {
    ($($name:literal),*) => {$(
        tune_core::inventory::submit! {
            tune_core::Unavailable {
                path: concat!("torchtune.training.quantization.", $name),
                aliases: &[$name, concat!("torchtune.utils.quantization.", $name)],
                why: "torchao's int4/int8 quantization is not implemented in tune-rs; set \
                      quantizer=null (generation and eval then run in the config's dtype)",
            }
        }
    )*};
}

unavailable_quantizers!(
    "Int4WeightOnlyQuantizer",
    "Int4WeightOnlyQATQuantizer",
    "Int4WeightOnlyQATQuantizerModuleSwap",
    "Int8DynActInt4WeightQuantizer",
    "Int8DynActInt4WeightQATQuantizer",
    "Int8DynActInt4WeightQATQuantizerModuleSwap"
);
