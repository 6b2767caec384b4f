//! Reading Hugging Face checkpoints into torchtune-named tensors, with torchtune's validation.
//!
//! Accepts `model.safetensors`, sharded safetensors (listed explicitly or via
//! `model.safetensors.index.json`) and PyTorch `.bin` files. Base weights must match the model
//! exactly: any missing base key or unexpected key is an error listing them all; adapter keys may
//! be missing (they are initialised). Shapes are checked per tensor.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::convert::{hf_to_tune_name, permute_hf_to_tune, rope_rows};
use crate::decoder::TransformerDecoder;
use crate::spec::ModelSpec;

/// A PyTorch checkpoint (`torch.save`): `.bin`, `.pt` or `.pth`.
pub fn is_pytorch_file(name: &str) -> bool {
    [".bin", ".pt", ".pth"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// A weight file, or the index of sharded ones: what `checkpoint_files` names, and what a saved
/// checkpoint does not copy from checkpoint_dir.
pub fn is_weight_file(name: &str) -> bool {
    name.ends_with(".safetensors")
        || is_pytorch_file(name)
        || name.ends_with(".safetensors.index.json")
        || name.ends_with(".bin.index.json")
}

/// The files of a checkpoint to read, resolved against `checkpoint_dir`.
pub fn resolve_files(checkpoint_dir: &Path, files: &[String]) -> Result<Vec<PathBuf>> {
    if !checkpoint_dir.is_dir() {
        let what = if checkpoint_dir.exists() {
            "is a file, not a folder"
        } else {
            "does not exist"
        };
        bail!(
            "checkpoint_dir {} {what}; set checkpointer.checkpoint_dir to the folder holding \
             the model (e.g. made by `tune download`) and checkpoint_files to its weight files",
            checkpoint_dir.display()
        );
    }
    let present: Vec<String> = std::fs::read_dir(checkpoint_dir)
        .map(|d| {
            let mut names: Vec<String> = d
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        })
        .unwrap_or_default();
    // Weight files at the top of the folder (an adapter's live in `adapter/` or are named
    // `adapter_model.*`).
    let weight_files: Vec<&String> = present
        .iter()
        .filter(|n| !n.starts_with("adapter") && is_weight_file(n))
        .collect();
    // A checkpoint saved with only its adapter (save_adapter_weights_only, or a mid-epoch
    // step_N) has no model weights to load: the adapter goes on top of the base model.
    let only_an_adapter = files.iter().all(|f| !checkpoint_dir.join(f).exists())
        && weight_files.is_empty()
        && (checkpoint_dir
            .join("adapter/adapter_model.safetensors")
            .is_file()
            || checkpoint_dir.join("adapter_model.safetensors").is_file());
    if only_an_adapter {
        bail!(
            "checkpoint_dir {} holds an adapter but no model weights; keep checkpoint_dir at the \
             base model and set adapter_dir={} (generate, eleuther_eval) or \
             checkpointer.adapter_checkpoint (training)",
            checkpoint_dir.display(),
            checkpoint_dir.display()
        );
    }
    let mut out = Vec::new();
    for f in files {
        let path = checkpoint_dir.join(f);
        if f.ends_with(".index.json") {
            let index: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?,
            )
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
            let map = index["weight_map"]
                .as_object()
                .with_context(|| format!("{} has no weight_map", path.display()))?;
            let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
            out.extend(shards.into_iter().map(|s| checkpoint_dir.join(s)));
            continue;
        }
        if !path.is_file() {
            // Name the weights that are there: an index covers every shard.
            let suggestion = match weight_files.iter().find(|n| n.ends_with(".index.json")) {
                Some(index) => format!("; try checkpointer.checkpoint_files=[{index}]"),
                None if !weight_files.is_empty() => {
                    let names: Vec<&str> = weight_files.iter().map(|n| n.as_str()).collect();
                    format!("; try checkpointer.checkpoint_files=[{}]", names.join(","))
                }
                None => String::new(),
            };
            bail!(
                "checkpoint file {} not found; checkpointer.checkpoint_files lists files inside \
                 checkpoint_dir, which holds: {}{suggestion}",
                path.display(),
                present.join(", ")
            );
        }
        out.push(path);
    }
    if out.is_empty() {
        bail!("checkpointer.checkpoint_files is empty; name the model's weight files");
    }
    Ok(out)
}

/// Reads every tensor of the given files (HF names) onto the CPU in their stored dtype.
pub fn read_tensors(paths: &[PathBuf]) -> Result<HashMap<String, Tensor>> {
    let mut all = HashMap::new();
    for path in paths {
        let name = path.display().to_string();
        require_weight_file(path)?;
        let tensors: Vec<(String, Tensor)> = if name.ends_with(".safetensors") {
            candle_core::safetensors::load(path, &Device::Cpu)
                .map_err(|e| unreadable_safetensors(path, e))?
                .into_iter()
                .collect()
        } else if is_pytorch_file(&name) {
            candle_core::pickle::read_all(path).with_context(|| {
                format!("cannot read PyTorch checkpoint {name}: truncated or not a torch.save zip")
            })?
        } else {
            bail!("unsupported checkpoint file {name}: expected .safetensors or a PyTorch .bin");
        };
        if tensors.is_empty() {
            // torch.save of a list, a whole module or an optimizer state reads as no tensors.
            bail!(
                "checkpoint file {name} holds no named tensors; a weight file is a state dict \
                 (torch.save(model.state_dict(), ...)) or safetensors"
            );
        }
        for (k, v) in tensors {
            if all.insert(k.clone(), v).is_some() {
                bail!("tensor `{k}` appears in more than one checkpoint file");
            }
        }
    }
    Ok(all)
}

/// Converts HF-named tensors to torchtune names (with the q/k row permutation).
/// Names that are not Llama weights are returned in the error list of unexpected keys.
pub fn hf_to_tune(
    spec: &ModelSpec,
    hf: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let c = &spec.transformer;
    let mut out = HashMap::new();
    let mut unknown = Vec::new();
    for (name, t) in hf {
        // HF stores the RoPE inverse frequencies in some checkpoints; they are not parameters.
        if name.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        match hf_to_tune_name(&name) {
            Some(tune) => {
                let t = match rope_rows(&tune) {
                    Some("q") => permute_hf_to_tune(&t, c.num_heads)?,
                    Some(_) => permute_hf_to_tune(&t, c.num_kv_heads)?,
                    None => t,
                };
                out.insert(tune, t);
            }
            None => unknown.push(name),
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        bail!(
            "unexpected keys in the checkpoint (not Llama2 weights): {}",
            unknown.join(", ")
        );
    }
    Ok(out)
}

/// torchtune's check: every base key present, nothing unexpected, every shape right.
pub fn validate_base(spec: &ModelSpec, weights: &HashMap<String, Tensor>) -> Result<()> {
    let params = spec.params()?;
    let base: HashMap<&str, &[usize]> = params
        .iter()
        .filter(|p| !p.trainable)
        .map(|p| (p.name.as_str(), p.shape.as_slice()))
        .collect();
    let mut missing: Vec<&str> = base
        .keys()
        .copied()
        .filter(|k| !weights.contains_key(*k))
        .filter(|k| !(*k == "output.weight" && spec.transformer.tie_word_embeddings))
        .collect();
    let mut unexpected: Vec<&str> = weights
        .keys()
        .map(String::as_str)
        .filter(|k| !base.contains_key(k))
        .collect();
    missing.sort();
    unexpected.sort();
    if !missing.is_empty() || !unexpected.is_empty() {
        bail!(
            "checkpoint does not match {}: missing base keys [{}], unexpected keys [{}]. Check the \
             model builder's dimensions against the checkpoint's config.json",
            spec.builder,
            missing.join(", "),
            unexpected.join(", ")
        );
    }
    let mut wrong: Vec<String> = Vec::new();
    for (name, t) in weights {
        let expected = base[name.as_str()];
        if t.dims() != expected {
            wrong.push(format!(
                "tensor `{name}` has shape {:?}, the model expects {expected:?}",
                t.dims()
            ));
        } else if !t.dtype().is_float() {
            wrong.push(format!(
                "tensor `{name}` has dtype {:?}; expected a floating-point weight",
                t.dtype()
            ));
        }
    }
    if !wrong.is_empty() {
        wrong.sort();
        bail!(
            "the checkpoint was made for different dimensions than {}: {}. Check the model builder's \
             arguments against the checkpoint's config.json",
            spec.builder,
            wrong.join("; ")
        );
    }
    Ok(())
}

/// A weight file named by checkpoint_files or an index must exist before it is read: a missing
/// shard is not a damaged one.
pub fn require_weight_file(path: &Path) -> Result<()> {
    if path.is_file() {
        return Ok(());
    }
    bail!(
        "checkpoint file {} does not exist (named by checkpoint_files or \
         model.safetensors.index.json); download the whole model again",
        path.display()
    )
}

/// Why a safetensors file could not be read, with the fix that fits: a dtype candle does not
/// load (a quantized export), a file the user may not read, or a damaged file.
pub fn unreadable_safetensors(path: &Path, error: candle_core::Error) -> anyhow::Error {
    let text = error.to_string();
    let why = if text.contains("unsupported safetensor dtype") {
        "it holds tensors of a type tune-rs does not load (a quantized export?); use the model's \
         fp32, fp16 or bf16 weights"
    } else if text.to_ascii_lowercase().contains("permission denied") {
        "permission denied; fix the file's permissions"
    } else {
        "the file is truncated or not safetensors; re-download it"
    };
    anyhow::Error::new(error).context(format!("cannot read {}: {why}", path.display()))
}

/// Reads `config.json` next to the weights, if any.
pub fn read_hf_config(checkpoint_dir: &Path) -> Result<Option<serde_json::Value>> {
    let path = checkpoint_dir.join("config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| {
        format!("{} is not valid JSON", path.display())
    })?))
}

/// The model node against the checkpoint's `config.json`. Head counts are not visible in the
/// weights' shapes (4 heads of 16 and 8 of 8 have the same q_proj), so a mismatch would train
/// another model without a word; the other dimensions are named here before the shapes fail.
/// RoPE's base and the norm's epsilon only change numbers: a warning.
fn check_config_agrees(spec: &ModelSpec, config: &serde_json::Value, path: &Path) -> Result<()> {
    let c = &spec.transformer;
    let number = |key: &str| config.get(key).and_then(|v| v.as_u64()).map(|n| n as usize);
    let heads = number("num_attention_heads");
    let dimensions = [
        (
            "vocab_size",
            number("vocab_size"),
            c.vocab_size,
            "vocab_size",
        ),
        (
            "hidden_size",
            number("hidden_size"),
            c.embed_dim,
            "embed_dim",
        ),
        (
            "num_hidden_layers",
            number("num_hidden_layers"),
            c.num_layers,
            "num_layers",
        ),
        (
            "intermediate_size",
            number("intermediate_size"),
            c.intermediate_dim,
            "intermediate_dim",
        ),
        ("num_attention_heads", heads, c.num_heads, "num_heads"),
        // HF's default: as many kv heads as heads.
        (
            "num_key_value_heads",
            number("num_key_value_heads").or(heads),
            c.num_kv_heads,
            "num_kv_heads",
        ),
    ];
    let mismatches: Vec<String> = dimensions
        .iter()
        .filter_map(|&(hf_key, theirs, ours, arg)| {
            theirs
                .filter(|&n| n != ours)
                .map(|n| format!("{hf_key} is {n} where model.{arg} is {ours}"))
        })
        .collect();
    if !mismatches.is_empty() {
        bail!(
            "{} describes another model than the `model` node ({} builds it): {}. Use the \
             builder for this checkpoint, or set those model arguments to config.json's values",
            path.display(),
            spec.builder,
            mismatches.join("; ")
        );
    }
    let float = |key: &str| config.get(key).and_then(|v| v.as_f64());
    for (hf_key, theirs, ours, what) in [
        ("rope_theta", float("rope_theta"), c.rope_base, "RoPE base"),
        (
            "rms_norm_eps",
            float("rms_norm_eps"),
            c.norm_eps,
            "model.norm_eps",
        ),
    ] {
        if theirs.is_some_and(|t| (t - ours).abs() > 1e-12 * t.abs().max(1.0)) {
            tracing::warn!(
                "{} has {hf_key} {} where this model's {what} is {ours}; the numbers will differ \
                 from the checkpoint's own",
                path.display(),
                theirs.unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// Loads a Llama2 HF checkpoint into the model described by `spec`.
/// Ties the output to the embedding when config.json says `tie_word_embeddings` and the checkpoint
/// has no `lm_head.weight`. Returns the model and the (possibly updated) spec.
pub fn load_model(
    spec: &ModelSpec,
    checkpoint_dir: &Path,
    files: &[String],
    dtype: DType,
    device: &Device,
    seed: u64,
) -> Result<(TransformerDecoder, ModelSpec)> {
    let mut spec = spec.clone();
    let paths = resolve_files(checkpoint_dir, files)?;
    let hf = read_tensors(&paths)?;
    let hf_config = read_hf_config(checkpoint_dir)?;
    if let Some(config) = &hf_config {
        check_config_agrees(&spec, config, &checkpoint_dir.join("config.json"))?;
    }
    let tied_in_config = hf_config
        .as_ref()
        .and_then(|c| c.get("tie_word_embeddings").and_then(|v| v.as_bool()))
        .unwrap_or(false);
    match (tied_in_config, hf.get("lm_head.weight")) {
        (true, None) => spec.transformer.tie_word_embeddings = true,
        // transformers does the same (and says so): two different matrices are not tied.
        (true, Some(lm_head))
            if !hf
                .get("model.embed_tokens.weight")
                .map(|embedding| tune_core::compare::same_values(lm_head, embedding))
                .transpose()?
                .unwrap_or(false) =>
        {
            tracing::warn!(
                "config.json says tie_word_embeddings, but the checkpoint's lm_head.weight differs \
                 from its embedding: the output layer uses lm_head.weight, untied (as transformers \
                 does); set tie_word_embeddings to false in config.json to silence this"
            )
        }
        _ => {}
    }
    let tune = hf_to_tune(&spec, hf)?;
    validate_base(&spec, &tune).map_err(|e| match hf_config {
        // Without it a tied checkpoint looks as if it lacked its output layer.
        None => e.context(format!(
            "{} has no config.json, which every Hugging Face checkpoint ships with (it says, \
             among other things, whether lm_head is tied to the embedding); copy it from the \
             model's repository",
            checkpoint_dir.display()
        )),
        Some(_) => e,
    })?;
    let quantized = spec.lora.as_ref().is_some_and(|l| l.quantize_base);
    let mut on_device = HashMap::with_capacity(tune.len());
    let mut sources = HashMap::new();
    for (name, t) in tune {
        // QLoRA quantises the checkpoint's own tensor (see `from_weights_and_sources`), so the
        // dense weight never goes to the device: a 70B model loads in its NF4 size, not bf16's.
        if quantized && name.starts_with("layers.") && t.rank() == 2 {
            let stand_in = Tensor::zeros((), dtype, device)?.broadcast_as(t.shape())?;
            on_device.insert(name.clone(), stand_in);
            sources.insert(name, t);
        } else {
            on_device.insert(name, t.to_dtype(dtype)?.to_device(device)?);
        }
    }
    let model = TransformerDecoder::from_weights_and_sources(&spec, on_device, sources, seed)?;
    Ok((model, spec))
}
