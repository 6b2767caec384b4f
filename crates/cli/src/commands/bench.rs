//! `tune bench`: training-step speed and memory of a random-weight Llama2 with LoRA.

use anyhow::{bail, Result};
use tune_recipes::bench::{random_model, train_steps};
use tune_recipes::settings::{parse_device, parse_dtype};

/// Benchmark full LoRA training steps (forward, loss, backward, AdamW) on random weights.
///
/// Examples:
///   $ tune bench --model llama2_7b --lora-attn-modules q_proj,v_proj --device cuda --dtype bf16
///   $ tune bench --vocab-size 32000 --num-layers 8 --embed-dim 512 --num-heads 8 \
///       --intermediate-dim 1376 --batch-size 4 --seq-len 256
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// A builder preset (llama2_7b, llama2_13b, llama2_70b); otherwise the dimensions below.
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, default_value_t = 32000, value_parser = at_least_one())]
    pub vocab_size: usize,
    #[arg(long, default_value_t = 8, value_parser = at_least_one())]
    pub num_layers: usize,
    #[arg(long, default_value_t = 8, value_parser = at_least_one())]
    pub num_heads: usize,
    #[arg(long)]
    pub num_kv_heads: Option<usize>,
    #[arg(long, default_value_t = 512, value_parser = at_least_one())]
    pub embed_dim: usize,
    #[arg(long, default_value_t = 1376, value_parser = at_least_one())]
    pub intermediate_dim: usize,
    #[arg(long, default_value_t = 4096, value_parser = at_least_one())]
    pub max_seq_len: usize,
    /// Projections with LoRA, comma-separated.
    #[arg(long, default_value = "q_proj,v_proj", value_delimiter = ',')]
    pub lora_attn_modules: Vec<String>,
    #[arg(long)]
    pub apply_lora_to_mlp: bool,
    #[arg(long, default_value_t = 8, value_parser = at_least_one())]
    pub lora_rank: usize,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    /// Adapter kind (lora, dora, or a plugin's: load it with --plugin or TUNE_PLUGIN_PATH) and
    /// QLoRA base quantisation.
    #[arg(long, default_value = "lora")]
    pub adapter: String,
    /// Load an adapter plugin (as `tune run --plugin`); repeatable.
    #[arg(long = "plugin", value_name = "PATH")]
    pub plugins: Vec<std::path::PathBuf>,
    #[arg(long)]
    pub quantize_base: bool,
    #[arg(long, default_value_t = 4, value_parser = at_least_one())]
    pub batch_size: usize,
    #[arg(long, default_value_t = 256, value_parser = at_least_one())]
    pub seq_len: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[arg(long, default_value_t = 3, value_parser = at_least_one())]
    pub steps: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    /// Recompute each layer's activations in the backward (torchtune's
    /// enable_activation_checkpointing).
    #[arg(long)]
    pub activation_checkpointing: bool,
    /// Use a plain matmul for frozen layers (its backward also computes the unused weight
    /// gradient): shows what tune-rs's input-gradient-only frozen linear saves.
    #[arg(long)]
    pub plain_frozen_matmul: bool,
    /// The device's peak dense TFLOP/s for this dtype (e.g. 989 for H100/H200 bf16), to report MFU.
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Instead of training: write the random base model as a Hugging Face checkpoint
    /// (config.json + model.safetensors) to DIR, for `tune run` benchmarks
    /// (`checkpointer.checkpoint_dir=DIR checkpointer.checkpoint_files=[model.safetensors]`).
    #[arg(long, value_name = "DIR")]
    pub write_checkpoint: Option<std::path::PathBuf>,
}

/// A size or count that must be at least 1 (a zero would fail deep inside, or measure nothing).
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

pub fn run(args: &Args) -> Result<()> {
    tune_core::autograd::set_plain_frozen_matmul(args.plain_frozen_matmul);
    crate::commands::run::load_plugins(&args.plugins, None)?;
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype, &device)?;
    let mut node = serde_yaml::Mapping::new();
    let mut set = |k: &str, v: serde_yaml::Value| node.insert(k.into(), v);
    match &args.model {
        Some(preset) => {
            set(
                "_component_",
                format!("torchtune.models.llama2.lora_{preset}").into(),
            );
        }
        None => {
            set("_component_", "torchtune.models.llama2.lora_llama2".into());
            set("vocab_size", args.vocab_size.into());
            set("num_layers", args.num_layers.into());
            set("num_heads", args.num_heads.into());
            set(
                "num_kv_heads",
                args.num_kv_heads.unwrap_or(args.num_heads).into(),
            );
            set("embed_dim", args.embed_dim.into());
            set("intermediate_dim", args.intermediate_dim.into());
            set("max_seq_len", args.max_seq_len.into());
        }
    }
    set(
        "lora_attn_modules",
        args.lora_attn_modules
            .iter()
            .map(|m| serde_yaml::Value::from(m.as_str()))
            .collect::<Vec<_>>()
            .into(),
    );
    set("apply_lora_to_mlp", args.apply_lora_to_mlp.into());
    set("lora_rank", args.lora_rank.into());
    set("lora_alpha", args.lora_alpha.into());
    set("quantize_base", args.quantize_base.into());
    if args.adapter != "lora" {
        set("adapter", args.adapter.as_str().into());
    }
    let spec = tune_models::builders::model_spec_from_node(&serde_yaml::Value::Mapping(node))?;
    if let Some(dir) = &args.write_checkpoint {
        tune_recipes::bench::write_random_checkpoint(&spec, dir, dtype)?;
        println!(
            "wrote a random {} checkpoint to {}",
            spec.builder,
            dir.display()
        );
        return Ok(());
    }
    if args.seq_len > spec.transformer.max_seq_len {
        bail!(
            "--seq-len {} is longer than the model's max_seq_len {}; raise --max-seq-len or \
             lower --seq-len",
            args.seq_len,
            spec.transformer.max_seq_len
        );
    }
    // Before allocating: a model that cannot fit is refused, not an abort mid-build.
    tune_recipes::memory::check_weights_fit(
        tune_recipes::memory::weight_bytes(&spec, dtype)?,
        tune_recipes::device_memory::free_bytes(&device),
        &args.device,
        dtype,
        false,
    )?;
    let counts = spec.counts()?;
    let started = std::time::Instant::now();
    let mut model = random_model(&spec, &device, dtype, 0)?;
    model.activation_checkpointing = args.activation_checkpointing;
    let build_seconds = started.elapsed().as_secs_f64();
    let mut result = train_steps(
        &model,
        args.batch_size,
        args.seq_len,
        args.warmup,
        args.steps,
    )?;
    result["model"] = spec.builder.clone().into();
    result["total_params"] = counts.total.into();
    result["trainable_params"] = counts.trainable.into();
    result["device"] = args.device.clone().into();
    result["dtype"] = args.dtype.clone().into();
    result["model_build_seconds"] = build_seconds.into();
    result["plain_frozen_matmul"] = args.plain_frozen_matmul.into();
    result["activation_checkpointing"] = args.activation_checkpointing.into();
    if let Some(peak) = args.peak_tflops {
        for (achieved, mfu) in [
            ("achieved_tflops", "mfu"),
            ("achieved_tflops_lora", "mfu_lora"),
        ] {
            if let Some(achieved) = result[achieved].as_f64() {
                result[mfu] = (achieved / peak).into();
            }
        }
    }
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}
