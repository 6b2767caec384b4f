//! `FullModelHFCheckpointer`: reads a Hugging Face checkpoint, writes each epoch's outputs.
//!
//! Output layout of `output_dir/epoch_{N}/` (every file written to a temp name and renamed; the
//! whole folder is staged and moved into place, so a kill never leaves a torn checkpoint):
//!
//! ```text
//! epoch_0/
//!   config.json, tokenizer files ...            copied from checkpoint_dir (always)
//!   model-00001-of-0000K.safetensors + index    merged weights, HF names, input dtype
//!                                               (absent with save_adapter_weights_only)
//!   adapter/adapter_model.safetensors           PEFT names: `PeftModel.from_pretrained(base, "epoch_0/adapter")`
//!   adapter/adapter_config.json
//!   recipe_state/adapter_torchtune.safetensors  the adapter in torchtune names (resume, warm starts)
//!   recipe_state/optimizer.safetensors          AdamW moments
//!   recipe_state/recipe_state.json              epoch, step, data-loader position, seed
//! ```
//! The adapter lives in its own folder because recent `transformers` releases apply an
//! `adapter_config.json` found next to `config.json` automatically: with torchtune's flat layout,
//! loading the merged model would add the adapter a second time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use tune_core::{
    Adapter, AdapterFactory, ArgSpec, ArgType, Args, Component, ComponentKind, PeftTarget,
};
use tune_models::checkpoint::{load_model, resolve_files};
use tune_models::convert::{
    peft_to_tune_adapter_name, permute_hf_to_tune, permute_tune_to_hf, rope_rows, tune_to_hf_name,
    tune_to_peft_adapter_name,
};
use tune_models::decoder::BASE_COPY_SUFFIX;
use tune_models::{ModelSpec, TransformerDecoder};

use crate::atomic;

/// The checkpointer's arguments (torchtune's names).
#[derive(Debug, Clone)]
pub struct HfCheckpointer {
    pub checkpoint_dir: PathBuf,
    pub checkpoint_files: Vec<String>,
    pub adapter_checkpoint: Option<PathBuf>,
    pub recipe_checkpoint: Option<PathBuf>,
    pub output_dir: PathBuf,
    pub model_type: String,
    /// `checkpointer.resume_from_checkpoint` (torchtune's recipes pass the top-level key in
    /// here); either one set resumes.
    pub resume_from_checkpoint: bool,
}

/// Where each HF tensor came from, to write merged weights back in the same shards and dtype.
#[derive(Debug, Clone, Default)]
pub struct SourceLayout {
    pub shard_of: HashMap<String, usize>,
    pub num_shards: usize,
    /// Each tensor's stored dtype.
    pub dtype_of: HashMap<String, DType>,
    /// The dtype most tensors are stored in (for tensors the checkpoint lacks).
    pub dtype: Option<DType>,
    /// The weight files, reread when merging over the checkpoint's own tensors.
    pub paths: Vec<PathBuf>,
}

/// Recipe progress saved with each checkpoint; enough to resume exactly.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecipeState {
    /// Epochs fully completed.
    pub epochs_run: usize,
    /// Optimizer steps taken over the whole run.
    pub global_step: usize,
    /// Batches of the current epoch already consumed (the data-loader position; 0 at epoch ends).
    pub batches_in_epoch: usize,
    pub seed: u64,
    pub total_epochs: usize,
    pub max_steps_per_epoch: Option<usize>,
    pub gradient_accumulation_steps: usize,
    pub optimizer_step: u64,
    /// Ranks that trained (`batches_in_epoch` counts each rank's batches). Older states: 1.
    #[serde(default = "one_rank")]
    pub world_size: usize,
    /// Each rank's batch size and the epoch's optimizer steps: a mid-epoch position only means
    /// the same samples with the same values. Older states: unknown.
    #[serde(default)]
    pub batch_size: Option<usize>,
    #[serde(default)]
    pub steps_per_epoch: Option<usize>,
    /// The sample order ([`data_order`]); older states shuffled otherwise.
    #[serde(default)]
    pub data_order: Option<String>,
    /// Whether the base weights were NF4 (QLoRA): the adapter learnt against them. Older
    /// states: unknown.
    #[serde(default)]
    pub quantize_base: Option<bool>,
}

/// How a run orders its samples: torch's `DistributedSampler` permutation, or file order.
pub fn data_order(shuffle: bool) -> &'static str {
    if shuffle {
        "torch_randperm"
    } else {
        "sequential"
    }
}

fn one_rank() -> usize {
    1
}

fn expand_files(value: Option<&serde_yaml::Value>) -> Result<Vec<String>> {
    match value {
        Some(serde_yaml::Value::String(s)) => Ok(vec![s.clone()]),
        Some(serde_yaml::Value::Sequence(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .context("checkpoint_files must be strings")
            })
            .collect(),
        // torchtune's compact form: {filename_format: "model-{}-of-{}.safetensors", max_filename: "00003"}
        Some(serde_yaml::Value::Mapping(m)) => {
            let format = m
                .get("filename_format")
                .and_then(|v| v.as_str())
                .context("checkpoint_files.filename_format missing")?;
            let max = m
                .get("max_filename")
                .and_then(|v| v.as_str())
                .context("checkpoint_files.max_filename missing (a string like \"00003\")")?;
            let n: usize = max
                .parse()
                .context("checkpoint_files.max_filename must be digits")?;
            Ok((1..=n)
                .map(|i| {
                    format
                        .replacen("{}", &format!("{i:0width$}", width = max.len()), 1)
                        .replacen("{}", max, 1)
                })
                .collect())
        }
        _ => bail!("checkpointer.checkpoint_files must list the model's weight files"),
    }
}

impl HfCheckpointer {
    pub fn from_args(args: &Args) -> Result<Self> {
        let model_type: String = args.get("model_type")?;
        if model_type.to_uppercase() != "LLAMA2" {
            bail!("checkpointer.model_type `{model_type}` is not supported; tune-rs implements LLAMA2");
        }
        let checkpoint_dir = PathBuf::from(args.get::<String>("checkpoint_dir")?);
        let output_dir = PathBuf::from(args.get::<String>("output_dir")?);
        if !args.get::<bool>("safe_serialization")? {
            tracing::warn!(
                "checkpointer.safe_serialization=False: tune-rs writes safetensors all the same \
                 (transformers, PEFT, vLLM and mistral.rs all read them); torchtune would write \
                 PyTorch .bin files"
            );
        }
        let c = HfCheckpointer {
            checkpoint_files: expand_files(args.raw("checkpoint_files"))?,
            adapter_checkpoint: args
                .get_opt::<String>("adapter_checkpoint")?
                .map(|p| checkpoint_dir.join(p)),
            // As torchtune 0.6.1: relative to output_dir, where the run's checkpoints are.
            recipe_checkpoint: args
                .get_opt::<String>("recipe_checkpoint")?
                .map(PathBuf::from),
            checkpoint_dir,
            output_dir,
            model_type,
            resume_from_checkpoint: args.get("resume_from_checkpoint")?,
        };
        Ok(c)
    }

    /// For a run that saves into `output_dir`: it must not overlap the model being read (eval
    /// and generation, which save nothing, read a fine-tuned `output_dir/epoch_N` freely).
    pub fn check_output_dir(&self) -> Result<()> {
        if self.output_dir.exists() && !self.output_dir.is_dir() {
            bail!(
                "output_dir {} is a file; set output_dir to a folder for the checkpoints and logs",
                self.output_dir.display()
            );
        }
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let (out, ckpt) = (abs(&self.output_dir), abs(&self.checkpoint_dir));
        if out.starts_with(&ckpt) {
            bail!(
                "output_dir {} is inside checkpoint_dir {}: outputs would mix with (and could \
                 overwrite) the input model. Choose an output_dir outside it",
                self.output_dir.display(),
                self.checkpoint_dir.display()
            );
        }
        // The reverse is fine (a model kept under a general work folder) unless the model is
        // one of this run's own checkpoint folders, which a save replaces.
        if let Ok(inside) = ckpt.strip_prefix(&out) {
            let first = inside
                .components()
                .next()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .unwrap_or_default();
            if is_checkpoint_folder_name(&first) {
                bail!(
                    "checkpoint_dir {} is this run's checkpoint folder {first} in output_dir {}: \
                     saving {first} would replace the model being trained. To continue from it, \
                     choose another output_dir (or copy the folder out first)",
                    self.checkpoint_dir.display(),
                    self.output_dir.display()
                );
            }
        }
        Ok(())
    }

    /// Loads the base model (and nothing else) into `spec`'s model on `device`.
    pub fn load_base(
        &self,
        spec: &ModelSpec,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<(TransformerDecoder, ModelSpec, SourceLayout)> {
        let paths = resolve_files(&self.checkpoint_dir, &self.checkpoint_files)?;
        let layout = source_layout(&paths)?;
        let (model, spec) = load_model(
            spec,
            &self.checkpoint_dir,
            &self.checkpoint_files,
            dtype,
            device,
            seed,
        )
        .with_context(|| {
            format!(
                "loading the checkpoint in {}",
                self.checkpoint_dir.display()
            )
        })?;
        Ok((model, spec, layout))
    }

    /// Reads an adapter file (PEFT or torchtune names) as torchtune-named, torchtune-layout tensors.
    /// A folder stands for the adapter file in it (PEFT's `adapter_model.safetensors`, or a
    /// tune-rs checkpoint's `adapter/adapter_model.safetensors`).
    pub fn read_adapter(path: &Path, spec: &ModelSpec) -> Result<HashMap<String, Tensor>> {
        let inside = [
            "adapter_model.safetensors",
            "adapter/adapter_model.safetensors",
        ];
        let path: PathBuf = if path.is_dir() {
            match inside.iter().map(|f| path.join(f)).find(|p| p.is_file()) {
                Some(file) => file,
                None => bail!(
                    "adapter checkpoint {} is a folder without adapter_model.safetensors; name \
                     the adapter file itself",
                    path.display()
                ),
            }
        } else {
            path.to_path_buf()
        };
        let path = path.as_path();
        if !path.is_file() {
            bail!("adapter checkpoint {} not found (checkpointer.adapter_checkpoint is relative to checkpoint_dir)", path.display());
        }
        check_adapter_scale(path, spec)?;
        let raw = candle_core::safetensors::load(path, &Device::Cpu).with_context(|| {
            format!(
                "cannot read adapter {}: truncated or not safetensors",
                path.display()
            )
        })?;
        let kind = spec
            .lora
            .as_ref()
            .map_or("lora", |l| l.adapter.kind.as_str());
        let factory = tune_adapters::factory(kind)?;
        // Whatever name the adapter goes by (`dora`, `qdora`, an alias), DoRA has magnitudes.
        let model_has_magnitudes = spec.lora.as_ref().is_some_and(|l| {
            factory
                .param_shapes(&l.adapter, 1, 1)
                .iter()
                .any(|(name, _)| name == "magnitude")
        });
        let has_magnitudes = raw.keys().any(|n| is_magnitude_name(n));
        if has_magnitudes && !model_has_magnitudes {
            bail!(
                "adapter {} holds DoRA magnitudes (lora_magnitude_vector): it is a DoRA adapter; \
                 set model.use_dora=True (or, when an adapter_config.json gives the settings, \
                 use_dora: true in it)",
                path.display()
            );
        }
        let torchtune_dora = has_magnitudes && is_torchtune_dora_export(path);
        if torchtune_dora {
            tracing::info!(
                "{}: torchtune's DoRA export (its adapter_config.json does not say use_dora); its \
                 q/k magnitudes are read in torchtune's row order, in which torchtune wrote them",
                path.display()
            );
        }
        let mut out = HashMap::new();
        for (name, t) in raw {
            // torchtune's own names (its adapter_model.pt, our recipe_state).
            if name.starts_with("layers.") || name.starts_with("output.") {
                out.insert(name, t);
                continue;
            }
            // PEFT's copy of a targeted lm_head's base weight (it saves embedding layers'):
            // the model checks it on loading.
            if name == format!("base_model.model.lm_head{BASE_COPY_SUFFIX}") {
                out.insert(format!("output{BASE_COPY_SUFFIX}"), t);
                continue;
            }
            let tune = peft_to_tune_adapter_name(&name).with_context(|| {
                format!("adapter tensor `{name}` is neither a torchtune nor a PEFT adapter name")
            })?;
            let in_torchtune_rows = torchtune_dora && tune.ends_with(".magnitude");
            let t = match rope_heads(factory.as_ref(), &tune, spec) {
                Some(heads) if !in_torchtune_rows => permute_hf_to_tune(&t, heads)?,
                _ => t,
            };
            out.insert(tune, t);
        }
        Ok(out)
    }

    /// Writes `output_dir/{dir_name}` (see the module docs) and returns its path.
    #[allow(clippy::too_many_arguments)]
    pub fn save(
        &self,
        dir_name: &str,
        model: &TransformerDecoder,
        spec: &ModelSpec,
        layout: &SourceLayout,
        save_merged: bool,
        state: &RecipeState,
        optimizer: &crate::optim::AdamW,
    ) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.output_dir)
            .with_context(|| format!("cannot create output_dir {}", self.output_dir.display()))?;
        let dest = self.output_dir.join(dir_name);
        let staging = atomic::staging_dir(&dest)?;
        let result = (|| -> Result<()> {
            // As torchtune: config and tokenizer files in every checkpoint, weights or not.
            self.copy_model_files(&staging)?;
            if save_merged {
                if spec.lora.as_ref().is_some_and(|l| l.quantize_base) {
                    static NOTED: std::sync::Once = std::sync::Once::new();
                    NOTED.call_once(|| {
                        tracing::info!(
                            "QLoRA: the merged weights are the NF4-dequantised base plus the \
                             adapter in every linear layer (as torchtune's), so they differ from \
                             the original weights by the quantisation error; the adapter alone \
                             (adapter/) goes on the original base model"
                        )
                    });
                }
                write_merged(&staging, model, spec, layout)?;
            }
            let adapter_dir = staging.join("adapter");
            std::fs::create_dir_all(&adapter_dir)?;
            self.write_peft_adapter(&adapter_dir, &dest.join("adapter"), model, spec)?;
            let state_dir = staging.join("recipe_state");
            std::fs::create_dir_all(&state_dir)?;
            let adapter: HashMap<String, Tensor> = model
                .adapter_params()
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().clone()))
                .collect();
            atomic::save_safetensors(&state_dir.join("adapter_torchtune.safetensors"), &adapter)?;
            atomic::save_safetensors(
                &state_dir.join("optimizer.safetensors"),
                &optimizer.moments(),
            )?;
            atomic::write(
                &state_dir.join("recipe_state.json"),
                serde_json::to_string_pretty(state)?.as_bytes(),
            )?;
            Ok(())
        })();
        if let Err(e) = result {
            std::fs::remove_dir_all(&staging).ok();
            return Err(e.context(format!("saving checkpoint {}", dest.display())));
        }
        atomic::replace_dir(&staging, &dest)?;
        Ok(dest)
    }

    fn copy_model_files(&self, dest: &Path) -> Result<()> {
        for path in self.model_files()? {
            let name = path.file_name().expect("a file in checkpoint_dir");
            std::fs::copy(&path, dest.join(name))
                .with_context(|| format!("cannot copy {}", path.display()))?;
        }
        Ok(())
    }

    /// The non-weight files of checkpoint_dir (config, tokenizer, ...) every checkpoint copies.
    fn model_files(&self) -> Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        let entries = std::fs::read_dir(&self.checkpoint_dir)
            .with_context(|| format!("cannot list {}", self.checkpoint_dir.display()))?;
        for entry in entries {
            let path = entry?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let is_weights = tune_models::checkpoint::is_weight_file(&name);
            if path.is_file() && !is_weights && !name.starts_with('.') {
                files.push(path);
            }
        }
        Ok(files)
    }

    /// Before training: every file a checkpoint will copy can be read, so that a save at the
    /// end of the run does not fail on one of them and lose the run.
    pub fn check_model_files_readable(&self) -> Result<()> {
        if !self.checkpoint_dir.is_dir() {
            return Ok(()); // loading the weights says so, with the fix
        }
        for path in self.model_files()? {
            std::fs::File::open(&path).with_context(|| {
                format!(
                    "cannot read {}, which every checkpoint copies from checkpoint_dir; fix its \
                     permissions before training",
                    path.display()
                )
            })?;
        }
        Ok(())
    }

    /// Writes the PEFT files into `dir` (a staging folder that becomes `final_dir`).
    fn write_peft_adapter(
        &self,
        dir: &Path,
        final_dir: &Path,
        model: &TransformerDecoder,
        spec: &ModelSpec,
    ) -> Result<()> {
        let lora = spec
            .lora
            .as_ref()
            .context("the model has no adapter to save")?;
        // The adapter decides its PEFT config and which of its tensors follow the weight's rows.
        let factory = tune_adapters::factory(&lora.adapter.kind)?;
        let mut tensors = HashMap::new();
        for (name, var) in model.adapter_params() {
            let peft = tune_to_peft_adapter_name(&name)
                .with_context(|| format!("no PEFT name for {name}"))?;
            let t = var.as_tensor();
            let t = match rope_heads(factory.as_ref(), &name, spec) {
                Some(heads) => permute_tune_to_hf(t, heads)?,
                None => t.clone(),
            };
            tensors.insert(peft, t);
        }
        atomic::save_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
        let mut config = factory.peft_config(&lora.adapter, &peft_targets(model)?);
        // The Hub id `tune download` recorded, else the base model's folder: with it,
        // `AutoPeftModelForCausalLM.from_pretrained(adapter_dir)` finds the base on its own.
        let base = original_repo_id(&self.checkpoint_dir).or_else(|| {
            std::path::absolute(&self.checkpoint_dir)
                .ok()
                .map(|p| p.display().to_string())
        });
        if let Some(base) = base {
            config["base_model_name_or_path"] = serde_json::Value::String(base);
        }
        for warning in serving_limits(&config) {
            tracing::warn!("{}: {warning}", final_dir.display());
        }
        atomic::write(
            &dir.join("adapter_config.json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )
    }
}

/// A DoRA magnitude's name, in PEFT's or torchtune's spelling.
fn is_magnitude_name(name: &str) -> bool {
    name.ends_with(".magnitude")
        || peft_to_tune_adapter_name(name).is_some_and(|tune| tune.ends_with(".magnitude"))
}

/// Whether `adapter_file` is torchtune 0.6.1's PEFT export of a DoRA adapter: PEFT-named
/// magnitudes beside an `adapter_config.json` with neither `use_dora` nor `task_type` (torchtune
/// writes only r, lora_alpha, target_modules and peft_type; PEFT and tune-rs always write
/// `task_type`, and `use_dora: true` for DoRA).
/// torchtune moves the q/k `lora_B` rows to Hugging Face's layout there but leaves the q/k
/// magnitudes in its own, so they must not be moved back.
pub fn is_torchtune_dora_export(adapter_file: &Path) -> bool {
    let Some(config) = adapter_file
        .parent()
        .map(|dir| dir.join("adapter_config.json"))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
    else {
        return false;
    };
    if config.get("use_dora").is_some() || config.get("task_type").is_some() {
        return false;
    }
    // SAFETY: the file is only read while mapped, and not modified by us meanwhile.
    let Ok(tensors) = (unsafe { candle_core::safetensors::MmapedSafetensors::new(adapter_file) })
    else {
        return false;
    };
    tensors
        .tensors()
        .iter()
        .any(|(name, _)| name.starts_with("base_model.model.") && is_magnitude_name(name))
}

/// What a PEFT adapter with this `adapter_config.json` cannot be served by (checked against
/// vLLM 0.33's and mistral.rs 0.9.2's adapter loaders): users who trained it for an inference
/// server learn it at save time, not at deployment.
pub fn serving_limits(config: &serde_json::Value) -> Vec<String> {
    let mut limits = Vec::new();
    let peft_type = config["peft_type"].as_str().unwrap_or("LORA");
    if peft_type != "LORA" {
        limits.push(format!(
            "a {peft_type} adapter loads in Hugging Face PEFT only; vLLM and mistral.rs serve \
             LoRA adapters. Serve the merged weights there"
        ));
        return limits;
    }
    if config.get("use_dora") == Some(&serde_json::Value::Bool(true)) {
        limits.push(
            "a DoRA adapter loads in Hugging Face PEFT; vLLM and mistral.rs (0.9.1 and later) \
             refuse DoRA, and older mistral.rs would drop its magnitudes. Serve the merged \
             weights there"
                .to_string(),
        );
    }
    let targets_output = config["target_modules"]
        .as_array()
        .is_some_and(|modules| modules.iter().any(|m| m == "lm_head"));
    if targets_output {
        limits.push(
            "an adapter on the output projection (lm_head, from apply_lora_to_output) loads in \
             PEFT and vLLM; mistral.rs refuses lm_head adapters. Serve the merged weights there, \
             or train with apply_lora_to_output=False"
                .to_string(),
        );
    }
    limits
}

/// The projections that carry trainable tensors, one per module name, in torchtune's order
/// (q, k, v, output_proj, w1, w2, w3, output): what PEFT's `target_modules` lists. Taken from the
/// built model, not the config, because an adapter may leave a selected projection frozen (IA3
/// adapts w2 alone of the MLP).
pub fn peft_targets(model: &TransformerDecoder) -> Result<Vec<PeftTarget>> {
    let mut out: Vec<PeftTarget> = Vec::new();
    for (prefix, layer) in model.linears() {
        let module = prefix.rsplit('.').next().unwrap_or(&prefix).to_string();
        if layer.trainable().is_empty() || out.iter().any(|t| t.module == module) {
            continue;
        }
        let hf = tune_to_hf_name(&format!("{prefix}.weight"))
            .with_context(|| format!("no HF name for {prefix}"))?;
        let hf_module = hf
            .trim_end_matches(".weight")
            .rsplit('.')
            .next()
            .unwrap_or(&hf)
            .to_string();
        out.push(PeftTarget { module, hf_module });
    }
    Ok(out)
}

/// `(slot, leaf)` of an adapter tensor's torchtune name:
/// `layers.0.attn.k_proj.lora_a.weight` -> (`layers.0.attn.k_proj`, `lora_a.weight`).
fn split_adapter_name(name: &str) -> Option<(&str, &str)> {
    if let Some(leaf) = name.strip_prefix("output.") {
        return Some(("output", leaf));
    }
    // layers.{i}.{attn|mlp}.{projection}.{leaf}
    let end = name.match_indices('.').nth(3)?.0;
    Some((&name[..end], &name[end + 1..]))
}

/// The number of heads whose RoPE layout the rows of adapter tensor `name` follow: set for
/// q_proj/k_proj tensors with one row per output feature (which the adapter says), else `None`.
fn rope_heads(factory: &dyn AdapterFactory, name: &str, spec: &ModelSpec) -> Option<usize> {
    let (slot, leaf) = split_adapter_name(name)?;
    if !factory.rows_are_outputs(slot, leaf) {
        return None;
    }
    if slot.ends_with(".attn.q_proj") {
        Some(spec.transformer.num_heads)
    } else if slot.ends_with(".attn.k_proj") {
        Some(spec.transformer.num_kv_heads)
    } else {
        None
    }
}

fn original_repo_id(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("original_repo_id.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("repo_id")
        .and_then(|r| r.as_str())
        .map(str::to_string)
}

fn source_layout(paths: &[PathBuf]) -> Result<SourceLayout> {
    let mut layout = SourceLayout {
        num_shards: paths.len(),
        paths: paths.to_vec(),
        ..Default::default()
    };
    for (i, path) in paths.iter().enumerate() {
        tune_models::checkpoint::require_weight_file(path)?;
        if path.extension().is_some_and(|e| e == "safetensors") {
            // SAFETY: the file is only read while mapped, and not modified by us meanwhile.
            let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
                .map_err(|e| tune_models::checkpoint::unreadable_safetensors(path, e))?;
            for (name, view) in st.tensors() {
                let dtype = DType::try_from(view.dtype()).unwrap_or(DType::F32);
                layout.dtype_of.insert(name.clone(), dtype);
                layout.shard_of.insert(name, i);
            }
        } else {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if !tune_models::checkpoint::is_pytorch_file(&name) {
                bail!(
                    "unsupported checkpoint file {}: checkpoint_files lists weight files \
                     (.safetensors, a PyTorch .bin, or model.safetensors.index.json)",
                    path.display()
                );
            }
            let infos = candle_core::pickle::read_pth_tensor_info(path, false, None).with_context(
                || {
                    format!(
                        "cannot read PyTorch checkpoint {}: truncated, or not a torch.save zip \
                         (re-save it with torch.save, or convert it to safetensors)",
                        path.display()
                    )
                },
            )?;
            for info in infos {
                layout.dtype_of.insert(info.name.clone(), info.dtype);
                layout.shard_of.insert(info.name, i);
            }
        }
    }
    // The most common dtype, the same on every run (ties go to the first by name).
    let mut counts: Vec<(DType, usize)> = Vec::new();
    for dtype in layout.dtype_of.values() {
        match counts.iter_mut().find(|(d, _)| d == dtype) {
            Some((_, n)) => *n += 1,
            None => counts.push((*dtype, 1)),
        }
    }
    counts.sort_by_key(|(d, n)| (std::cmp::Reverse(*n), format!("{d:?}")));
    layout.dtype = counts.first().map(|(d, _)| *d);
    Ok(layout)
}

/// Writes merged HF weights in the input's shards and dtypes, plus `model.safetensors.index.json`.
///
/// A run in another dtype than (some of) the checkpoint's tensors (bf16 over fp32 or fp16
/// weights) holds a rounded copy of them. Then the merge goes over the checkpoint's own tensors,
/// reread one at a time: untouched embeddings, norms and linears come back bit for bit, and each
/// adapted weight is its original plus the trained adapter, computed in fp32 and rounded once.
/// QLoRA's NF4 projections, adapted or not, are the dequantised base they trained against (plus
/// the adapter), as torchtune's.
fn write_merged(
    dir: &Path,
    model: &TransformerDecoder,
    spec: &ModelSpec,
    layout: &SourceLayout,
) -> Result<()> {
    let c = &spec.transformer;
    let run_dtype = model.dtype();
    let originals = layout
        .dtype_of
        .values()
        .any(|d| *d != run_dtype)
        .then(|| SourceTensors::open(&layout.paths, layout));
    let quantized = spec.lora.as_ref().is_some_and(|l| l.quantize_base);
    let mut out = MergedShards::new(layout);
    let hf_name =
        |name: &str| tune_to_hf_name(name).with_context(|| format!("no HF name for {name}"));
    // The run's own tensor `name` (torchtune layout), as the checkpoint stores it. Each goes to
    // the CPU as soon as it is made, so a GPU holds one merged (for QLoRA: dequantised) weight at
    // a time, not a second copy of the model.
    let as_stored = |name: &str, t: Tensor| -> Result<(String, Tensor)> {
        let hf = hf_name(name)?;
        let t = match rope_rows(name) {
            Some("q") => permute_tune_to_hf(&t, c.num_heads)?,
            Some(_) => permute_tune_to_hf(&t, c.num_kv_heads)?,
            None => t,
        };
        let dtype = layout.dtype_of.get(&hf).copied().or(layout.dtype);
        let t = t
            .to_dtype(dtype.unwrap_or(run_dtype))?
            .to_device(&Device::Cpu)?;
        Ok((hf, t))
    };
    // The checkpoint's own copy of a frozen tensor, when it is to be preferred.
    let original = |hf: &str| originals.as_ref().and_then(|o| o.read(hf));

    let mut plain = vec![
        (
            "tok_embeddings.weight".to_string(),
            model.tok_embeddings.clone(),
        ),
        ("norm.scale".to_string(), model.norm.clone()),
    ];
    for (i, l) in model.layers.iter().enumerate() {
        plain.push((format!("layers.{i}.sa_norm.scale"), l.sa_norm.clone()));
        plain.push((format!("layers.{i}.mlp_norm.scale"), l.mlp_norm.clone()));
    }
    for (name, ours) in plain {
        let (hf, t) = as_stored(&name, ours)?;
        let t = original(&hf).unwrap_or(t);
        out.put(hf, t);
    }
    let output_adapted = spec.lora.as_ref().is_some_and(|l| l.apply_lora_to_output);
    for (prefix, layer) in model.linears() {
        if prefix == "output" && c.tie_word_embeddings && !output_adapted {
            continue; // still tied to the embedding: nothing to write
        }
        let name = format!("{prefix}.weight");
        let nf4 = quantized && prefix != "output";
        let (hf, t) = if nf4 {
            as_stored(&name, layer.merged_weight()?)?
        } else if layer.trainable().is_empty() {
            let (hf, t) = as_stored(&name, layer.base_weight()?)?;
            let t = original(&hf).unwrap_or(t);
            (hf, t)
        } else {
            // A tied output's base is the embedding.
            let base_hf = match prefix.as_str() {
                "output" if c.tie_word_embeddings => "model.embed_tokens.weight".to_string(),
                _ => hf_name(&name)?,
            };
            let over_original = originals.as_ref().and_then(|o| {
                let base = o.read(&base_hf)?;
                o.merged(merged_over_hf(spec, &prefix, layer, base), &name)
            });
            match over_original {
                Some(t) => (hf_name(&name)?, t),
                None => as_stored(&name, layer.merged_weight()?)?,
            }
        };
        out.put(hf, t);
    }
    if let Some(originals) = &originals {
        originals.report(run_dtype);
    }
    out.save(dir)?;
    if output_adapted {
        // The merged output no longer equals the embedding: untie it in the copied config, or
        // transformers would tie lm_head back to the embedding and drop the update. (A config
        // may say tied while the weights hold their own lm_head.)
        let path = dir.join("config.json");
        if let Ok(text) = std::fs::read_to_string(&path) {
            let mut cfg: serde_json::Value = serde_json::from_str(&text)?;
            if cfg.get("tie_word_embeddings") == Some(&serde_json::Value::Bool(true)) {
                cfg["tie_word_embeddings"] = serde_json::Value::Bool(false);
                atomic::write(&path, serde_json::to_string_pretty(&cfg)?.as_bytes())?;
            }
        }
    }
    Ok(())
}

/// Merged tensors gathered into the input's shards, then written with their index.
struct MergedShards<'a> {
    layout: &'a SourceLayout,
    shards: Vec<HashMap<String, Tensor>>,
    weight_map: serde_json::Map<String, serde_json::Value>,
    total_size: usize,
}

impl<'a> MergedShards<'a> {
    fn new(layout: &'a SourceLayout) -> Self {
        MergedShards {
            layout,
            shards: vec![HashMap::new(); layout.num_shards.max(1)],
            weight_map: serde_json::Map::new(),
            total_size: 0,
        }
    }

    fn file(&self, shard: usize) -> String {
        let n = self.shards.len();
        format!("model-{:05}-of-{n:05}.safetensors", shard + 1)
    }

    /// `t` goes in the shard its HF name `hf` came from (the first for a name it lacked).
    fn put(&mut self, hf: String, t: Tensor) {
        let shard = self.layout.shard_of.get(&hf).copied().unwrap_or(0);
        self.total_size += t.elem_count() * t.dtype().size_in_bytes();
        let file = self.file(shard);
        self.weight_map
            .insert(hf.clone(), serde_json::Value::String(file));
        self.shards[shard].insert(hf, t);
    }

    fn save(self, dir: &Path) -> Result<()> {
        for (i, tensors) in self.shards.iter().enumerate() {
            atomic::save_safetensors(&dir.join(self.file(i)), tensors)?;
        }
        let index = serde_json::json!({
            "metadata": {"total_size": self.total_size},
            "weight_map": self.weight_map,
        });
        atomic::write(
            &dir.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index)?.as_bytes(),
        )
    }
}

/// [`merged_over`] for a base weight in Hugging Face's layout and dtype; the result in them too.
fn merged_over_hf(
    spec: &ModelSpec,
    slot: &str,
    trained: &dyn Adapter,
    original: Tensor,
) -> Result<Tensor> {
    let c = &spec.transformer;
    let name = format!("{slot}.weight");
    let stored = original.dtype();
    let heads = match rope_rows(&name) {
        Some("q") => Some(c.num_heads),
        Some(_) => Some(c.num_kv_heads),
        None => None,
    };
    let base = match heads {
        Some(heads) => permute_hf_to_tune(&original, heads)?,
        None => original,
    };
    let merged = merged_over(spec, slot, trained, base)?;
    let merged = match heads {
        Some(heads) => permute_tune_to_hf(&merged, heads)?,
        None => merged,
    };
    Ok(merged.to_dtype(stored)?)
}

/// The adapted layer `slot`'s merged weight over `base` (torchtune layout) instead of the
/// run's copy of it: the same adapter, rebuilt in fp32 on the CPU around `base`, given the
/// trained tensors. Works for every adapter, DoRA's normalisation and plugins' merges included.
fn merged_over(
    spec: &ModelSpec,
    slot: &str,
    trained: &dyn Adapter,
    base: Tensor,
) -> Result<Tensor> {
    let lora = spec
        .lora
        .as_ref()
        .context("an adapted layer without LoRA settings")?;
    let factory = tune_adapters::factory(&lora.adapter.kind)?;
    let base = base.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let rebuilt = factory.build_for(slot, &lora.adapter, base, 0)?;
    let trained: HashMap<String, Var> = trained.trainable().into_iter().collect();
    for (leaf, var) in rebuilt.trainable() {
        let value = trained.get(&leaf).with_context(|| {
            format!("{slot}: the rebuilt adapter has `{leaf}`, the trained one not")
        })?;
        var.set(
            &value
                .as_tensor()
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?,
        )?;
    }
    // As after loading an adapter: base and adapter weights are final.
    rebuilt.on_weights_loaded()?;
    Ok(rebuilt.merged_weight()?)
}

/// The checkpoint's weight files, read a tensor at a time (safetensors mapped, PyTorch zips by
/// entry). A tensor that cannot be reread (the files moved since the run began) or merged over
/// is written from the run's own copy instead; the save reports how many, once.
struct SourceTensors<'a> {
    files: Vec<std::result::Result<SourceFile, String>>,
    layout: &'a SourceLayout,
    fallbacks: std::cell::RefCell<Vec<String>>,
}

enum SourceFile {
    Safetensors(candle_core::safetensors::MmapedSafetensors),
    Pytorch(candle_core::pickle::PthTensors),
}

impl<'a> SourceTensors<'a> {
    fn open(paths: &[PathBuf], layout: &'a SourceLayout) -> Self {
        let files = paths
            .iter()
            .map(|path| {
                let opened = if path.extension().is_some_and(|e| e == "safetensors") {
                    // SAFETY: read while mapped; a file changed under a running job is the
                    // user's doing, as with every mapped checkpoint.
                    unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
                        .map(SourceFile::Safetensors)
                } else {
                    candle_core::pickle::PthTensors::new(path, None).map(SourceFile::Pytorch)
                };
                opened.map_err(|e| format!("cannot reopen {}: {e}", path.display()))
            })
            .collect();
        SourceTensors {
            files,
            layout,
            fallbacks: Default::default(),
        }
    }

    /// The checkpoint's tensor `hf`, or `None` (the run's copy is used).
    fn read(&self, hf: &str) -> Option<Tensor> {
        let shard = *self.layout.shard_of.get(hf)?;
        let read = match self.files.get(shard)? {
            Ok(SourceFile::Safetensors(st)) => st.load(hf, &Device::Cpu).map_err(|e| e.to_string()),
            Ok(SourceFile::Pytorch(pth)) => match pth.get(hf) {
                Ok(Some(t)) => Ok(t),
                Ok(None) => Err(format!("no tensor {hf}")),
                Err(e) => Err(e.to_string()),
            },
            Err(why) => Err(why.clone()),
        };
        self.fall_back(read.map_err(|e| format!("rereading {hf}: {e}")))
    }

    /// A merge over a checkpoint tensor, or `None` (the run's own merge is used).
    fn merged(&self, merge: Result<Tensor>, name: &str) -> Option<Tensor> {
        self.fall_back(merge.map_err(|e| format!("merging {name} over the checkpoint's: {e:#}")))
    }

    fn fall_back(&self, result: std::result::Result<Tensor, String>) -> Option<Tensor> {
        result
            .map_err(|why| self.fallbacks.borrow_mut().push(why))
            .ok()
    }

    fn report(&self, run_dtype: DType) {
        let fallbacks = self.fallbacks.borrow();
        if let Some(first) = fallbacks.first() {
            tracing::warn!(
                "{} merged tensor(s) were written from the run's {run_dtype:?} copy of the base \
                 instead of the checkpoint's own (first: {first})",
                fallbacks.len()
            );
        }
    }
}

impl HfCheckpointer {
    /// The checkpoint a resumed run continues from: the one `recipe_checkpoint` names (a
    /// checkpoint folder such as `epoch_0` or `step_40`, or a file inside it; relative to
    /// output_dir), else the newest in output_dir.
    pub fn resume_point(&self) -> Result<(PathBuf, RecipeState)> {
        let Some(named) = &self.recipe_checkpoint else {
            return newest_checkpoint(&self.output_dir)?.with_context(|| {
                format!(
                    "resume_from_checkpoint is True but {} holds no checkpoint; set it to False \
                     (or point checkpointer.output_dir at the run to continue)",
                    self.output_dir.display()
                )
            });
        };
        let path = self.output_dir.join(named);
        if !path.exists() {
            let mut held: Vec<String> = std::fs::read_dir(&self.output_dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.path().join("recipe_state/recipe_state.json").is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            held.sort();
            bail!(
                "checkpointer.recipe_checkpoint {} does not exist; {}",
                path.display(),
                if held.is_empty() {
                    format!("{} holds no checkpoint", self.output_dir.display())
                } else {
                    format!(
                        "{} holds {} (or set it to null to resume from the newest)",
                        self.output_dir.display(),
                        held.join(", ")
                    )
                }
            );
        }
        let folder = path
            .ancestors()
            .find(|dir| dir.join("recipe_state/recipe_state.json").is_file())
            .with_context(|| {
                format!(
                    "checkpointer.recipe_checkpoint {} is not in a tune-rs checkpoint (a folder such \
                     as {}/epoch_0 holding recipe_state/recipe_state.json); torchtune's \
                     recipe_state.pt cannot be resumed here. Name a checkpoint folder, or set it \
                     to null to resume from the newest",
                    path.display(),
                    self.output_dir.display()
                )
            })?
            .to_path_buf();
        let state = read_recipe_state(&folder)?;
        if let Ok(Some((newest, later))) = newest_checkpoint(&self.output_dir) {
            if progress(&later) > progress(&state) {
                tracing::warn!(
                    "resuming from {} although {} is further along; this run overwrites the later \
                     checkpoints it reaches, and a resume that names none would pick {} until then",
                    folder.display(),
                    newest.display(),
                    newest.display()
                );
            }
        }
        Ok((folder, state))
    }
}

/// A LoRA adapter's scale (alpha / r, or alpha / sqrt(r) for rsLoRA) is part of what it learnt:
/// read at another scale, a PEFT adapter would start as another model without a word. The
/// `adapter_config.json` beside `file`, when there is one, must agree with the model node.
fn check_adapter_scale(file: &Path, spec: &ModelSpec) -> Result<()> {
    let Some(lora) = &spec.lora else {
        return Ok(());
    };
    let config_path = file.with_file_name("adapter_config.json");
    let built_in = matches!(lora.adapter.kind.as_str(), "lora" | "dora");
    if !built_in || !config_path.is_file() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
    if config["peft_type"].as_str().is_some_and(|t| t != "LORA") {
        return Ok(()); // another adapter type: its weights' names say it does not fit
    }
    let theirs = crate::inference::lora_from_peft_config(&config, lora.quantize_base)
        .with_context(|| format!("adapter_checkpoint's {}", config_path.display()))?
        .adapter;
    let ours = &lora.adapter;
    let scale = |alpha: f64, rank: usize| alpha / rank as f64;
    let (their_scale, our_scale) = (
        scale(theirs.alpha, theirs.rank),
        scale(ours.alpha, ours.rank),
    );
    // A different rank fails on the tensors' shapes, with its own message.
    if theirs.rank == ours.rank && (their_scale - our_scale).abs() > 1e-9 * their_scale.abs() {
        let rslora = if config["use_rslora"].as_bool() == Some(true) {
            ", rsLoRA"
        } else {
            ""
        };
        bail!(
            "adapter_checkpoint {}: its adapter_config.json scales the adapter by {their_scale} \
             (lora_alpha {} / r {}{rslora}), this run by {our_scale} (model.lora_alpha {} / \
             lora_rank {}); set model.lora_alpha={} to go on from the adapter as it was trained",
            file.display(),
            config["lora_alpha"],
            theirs.rank,
            ours.alpha,
            ours.rank,
            theirs.alpha
        );
    }
    Ok(())
}

/// How far into its run a checkpoint is: epochs, then batches of the epoch, then steps.
pub(crate) fn progress(s: &RecipeState) -> (usize, usize, usize) {
    (s.epochs_run, s.batches_in_epoch, s.global_step)
}

fn read_recipe_state(folder: &Path) -> Result<RecipeState> {
    let state_file = folder.join("recipe_state/recipe_state.json");
    let text = std::fs::read_to_string(&state_file)
        .with_context(|| format!("cannot read {}", state_file.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is corrupt", state_file.display()))
}

/// Whether a folder name in `output_dir` is one the recipes write (or stage): `epoch_N`,
/// `step_N`, or a hidden `.epoch_N.partial-PID` / `.epoch_N.old-PID`.
fn is_checkpoint_folder_name(name: &str) -> bool {
    let name = name.strip_prefix('.').unwrap_or(name);
    is_checkpoint_name(name.split('.').next().unwrap_or(name))
}

/// `epoch_N` or `step_N`, exactly.
fn is_checkpoint_name(name: &str) -> bool {
    ["epoch_", "step_"].iter().any(|prefix| {
        name.strip_prefix(prefix)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// A file (not a folder) named like a checkpoint this run may write (`epoch_N`, `step_N`) in
/// `output_dir` is refused before training: saving there would have to move it aside.
pub fn refuse_files_named_like_checkpoints(output_dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let path = entry.path();
        // A save replaces the whole folder: one that is not a checkpoint would be lost.
        let not_a_checkpoint = !path.is_dir() || !holds_a_checkpoint_or_nothing(&path);
        if is_checkpoint_name(&entry.file_name().to_string_lossy()) && not_a_checkpoint {
            bail!(
                "{} is not a checkpoint folder, but this run saves its checkpoints under such \
                 names (replacing what is there); move it out of output_dir or choose another \
                 output_dir",
                path.display()
            );
        }
    }
    Ok(())
}

/// Whether folder `dir` is empty or holds a checkpoint (tune-rs's or torchtune's: recipe state,
/// weights, an adapter, a model config), which a save may replace.
fn holds_a_checkpoint_or_nothing(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.is_empty()
        || names.iter().any(|name| {
            matches!(
                name.as_str(),
                "recipe_state" | "adapter" | "config.json" | "adapter_config.json"
            ) || [".safetensors", ".bin", ".pt"]
                .iter()
                .any(|ext| name.ends_with(ext))
        })
}

/// Reads the newest checkpoint in `output_dir` (furthest into the run: epochs, then batches of
/// the epoch, then steps), if any.
pub fn newest_checkpoint(output_dir: &Path) -> Result<Option<(PathBuf, RecipeState)>> {
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return Ok(None);
    };
    let mut best: Option<(PathBuf, RecipeState)> = None;
    for entry in entries {
        let path = entry?.path();
        // Hidden folders are unfinished saves (staging) or ones being replaced.
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        {
            continue;
        }
        let state_file = path.join("recipe_state/recipe_state.json");
        if !state_file.is_file() {
            continue;
        }
        let state = read_recipe_state(&path)?;
        if best
            .as_ref()
            .is_none_or(|(_, b)| progress(&state) > progress(b))
        {
            best = Some((path, state));
        }
    }
    Ok(best)
}

tune_core::inventory::submit! {
    Component {
        path: "torchtune.training.FullModelHFCheckpointer",
        aliases: &["FullModelHFCheckpointer", "torchtune.training.checkpointing.FullModelHFCheckpointer"],
        kind: ComponentKind::Checkpointer,
        args: &[
            ArgSpec::required("checkpoint_dir", ArgType::Str),
            ArgSpec::required("checkpoint_files", ArgType::Any),
            ArgSpec::required("model_type", ArgType::Str),
            ArgSpec::required("output_dir", ArgType::Str),
            ArgSpec::nullable("adapter_checkpoint", ArgType::Str),
            ArgSpec::nullable("recipe_checkpoint", ArgType::Str),
            ArgSpec::optional("resume_from_checkpoint", ArgType::Bool, "false"),
            ArgSpec::optional("safe_serialization", ArgType::Bool, "true"),
        ],
        extra_args: false,
        about: "reads Hugging Face checkpoints, writes merged weights + PEFT adapter",
        origin: "built-in",
        build: |args| Ok(Box::new(HfCheckpointer::from_args(args)?)),
    }
}

tune_core::inventory::submit! {
    tune_core::Unavailable {
        path: "torchtune.training.FullModelMetaCheckpointer",
        aliases: &["FullModelMetaCheckpointer", "torchtune.training.checkpointing.FullModelMetaCheckpointer", "torchtune.utils.FullModelMetaCheckpointer"],
        why: "tune-rs reads and writes Hugging Face checkpoints. Download the model in that format \
              (`tune download meta-llama/Llama-2-7b-hf`) and use \
              torchtune.training.FullModelHFCheckpointer",
    }
}

tune_core::inventory::submit! {
    tune_core::Unavailable {
        path: "torchtune.training.FullModelTorchTuneCheckpointer",
        aliases: &["FullModelTorchTuneCheckpointer", "torchtune.training.checkpointing.FullModelTorchTuneCheckpointer", "torchtune.utils.FullModelTorchTuneCheckpointer"],
        why: "tune-rs reads and writes Hugging Face checkpoints; use \
              torchtune.training.FullModelHFCheckpointer with a Hugging Face model folder",
    }
}
