//! Loading a model for inference, and optionally an adapter on top of it: what `generate` and
//! `eleuther_eval` share.
//!
//! The adapter comes from `adapter_dir` (a PEFT folder, or a tune-rs `epoch_N`) or
//! `checkpointer.adapter_checkpoint`; its LoRA settings from its `adapter_config.json` when there
//! is one (PEFT's names, mapped to torchtune's builder arguments), else from the `model` node.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use tune_core::ComponentKind;
use tune_models::builders::model_spec_from_node;
use tune_models::{LoraSettings, ModelSpec, TransformerDecoder};

use crate::checkpointer::HfCheckpointer;
use crate::settings::TopLevel;

/// torchtune's `quantizer` key: only null (no quantization) is supported.
pub fn reject_quantizer(cfg: &TopLevel) -> Result<()> {
    if cfg.0.get("quantizer").is_some_and(|v| !v.is_null()) {
        bail!("quantizer is not supported by tune-rs inference recipes; set quantizer=null");
    }
    Ok(())
}

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
    if let Some(src) = &source {
        let quantize_base = spec.lora.as_ref().is_some_and(|l| l.quantize_base);
        note_qlora_adapter_on_full_precision(src, quantize_base);
    }
    let (model, spec, _) = checkpointer.load_base(&spec, dtype, device, seed)?;
    if let Some(src) = &source {
        let tensors = HfCheckpointer::read_adapter(&src.weights, &spec)?;
        model
            .load_adapter(&tensors)
            .with_context(|| match &src.peft_config {
                // The settings came from the file beside the weights: the two disagree.
                Some(config) => format!(
                    "loading the adapter {}: its weights do not fit the settings of the \
                 adapter_config.json beside it (r={}, target_modules={}); the two files do not \
                 belong together",
                    src.weights.display(),
                    config["r"],
                    config["target_modules"]
                ),
                None => format!("loading the adapter {}", src.weights.display()),
            })?;
        tracing::info!("loaded adapter {}", src.weights.display());
    }
    Ok(InferenceModel {
        model,
        spec,
        adapter: source.map(|s| s.weights),
    })
}

/// Checks, without loading anything, that the adapter the config names can be found (for dry
/// runs).
pub fn check_adapter_source(cfg: &TopLevel) -> Result<()> {
    let checkpointer: HfCheckpointer = cfg.build("checkpointer", ComponentKind::Checkpointer)?;
    adapter_source(cfg.opt::<String>("adapter_dir")?, &checkpointer).map(|_| ())
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
            if !file.exists() {
                bail!(
                    "checkpointer.adapter_checkpoint {} not found (it is relative to \
                     checkpoint_dir); name an adapter_model.safetensors or a PEFT adapter folder",
                    file.display()
                );
            }
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
        if !dir.exists() {
            bail!("{key} {} does not exist; point it at a PEFT adapter folder or a tune-rs epoch_N folder", dir.display());
        }
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
            // A training run's output_dir holds its checkpoints one level down.
            if let Ok(Some((newest, _))) = crate::checkpointer::newest_checkpoint(&dir) {
                bail!(
                    "{key} {} is a training run's output_dir; point it at one of its checkpoints, \
                     e.g. {}",
                    dir.display(),
                    newest.display()
                );
            }
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

/// An adapter from a tune-rs QLoRA run learnt against the NF4-quantised base; put on the
/// full-precision base (as PEFT would) its numbers differ somewhat from the run's. Said, so that
/// nobody mistakes the difference for a bug.
fn note_qlora_adapter_on_full_precision(source: &AdapterSource, quantize_base: bool) {
    if quantize_base {
        return;
    }
    // epoch_N/adapter/adapter_model.safetensors -> epoch_N/recipe_state/recipe_state.json
    let Some(epoch) = source.weights.parent().and_then(Path::parent) else {
        return;
    };
    let state = std::fs::read_to_string(epoch.join("recipe_state/recipe_state.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
    if state.is_some_and(|s| s["quantize_base"] == serde_json::Value::Bool(true)) {
        tracing::info!(
            "{} was trained with QLoRA (against the NF4-quantised base); it is applied to the \
             full-precision base here, as PEFT applies it. To run it as trained, quantise the \
             base too: model.quantize_base=True on a lora_* model builder",
            source.weights.display()
        );
    }
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
    // torchtune's DoRA export does not say use_dora; its magnitudes do.
    let mut peft = peft.clone();
    if crate::checkpointer::is_torchtune_dora_export(&source.weights) {
        peft["use_dora"] = serde_json::Value::Bool(true);
    }
    let from_peft = lora_from_peft_config(&peft, quantize_base).with_context(|| {
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
            bail!(
                "peft_type is {kind}; adapter_dir takes LORA adapters (and DoRA via use_dora). \
                 For another adapter (a plugin's, such as IA3) use the merged weights its \
                 training saved: checkpointer.checkpoint_dir=<epoch folder> with \
                 checkpoint_files=[model.safetensors.index.json]"
            );
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
    for (key, supported) in [
        ("rank_pattern", "one rank and alpha for every adapted layer"),
        (
            "alpha_pattern",
            "one rank and alpha for every adapted layer",
        ),
        ("layers_to_transform", "every layer adapted alike"),
        (
            "modules_to_save",
            "only low-rank adapters, no fully trained copies of modules",
        ),
    ] {
        if non_empty(key) {
            bail!("adapter_config.json sets `{key}`, which tune-rs does not support ({supported})");
        }
    }
    // `bias` ("all", "lora_only") trains the adapted layers' biases, which Llama's projections
    // do not have: nothing is saved for it. `lora_bias` adds one to lora_B, which is.
    if flag(config, "lora_bias") {
        bail!("adapter_config.json has lora_bias: true (a bias on lora_B); tune-rs adapters have none");
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
