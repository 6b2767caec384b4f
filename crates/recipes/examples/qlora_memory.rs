//! QLoRA vs LoRA: resident memory, bits per base parameter and step time on a random Llama2
//! (dim 1024, 8 layers, 8 heads, vocab 32000, fp32, CPU), with torchtune's 7B_qlora LoRA settings
//! (q/v/output_proj + MLP, rank 8, alpha 16).
//!
//! ```text
//! cargo run --release -p tune-recipes --example qlora_memory            # both, one process each
//! cargo run --release -p tune-recipes --example qlora_memory -- qlora   # one mode, JSON
//! # a model whose weights dominate (7B's layer shape, 8 layers), one timed step:
//! QLORA_DIM=4096 QLORA_HEADS=32 QLORA_MLP=11008 QLORA_STEPS=1 cargo run --release -p tune-recipes --example qlora_memory
//! ```
//!
//! Each mode runs in its own process so that peak RSS is that mode's alone. Freed buffers are
//! returned to the OS (glibc's mmap threshold is pinned at 64 KiB): the dense random weights that
//! `bench::random_model` builds before quantising would otherwise stay resident and hide the
//! difference. The random weights are built like `bench::random_model` (see [`random_model`]).
//! Peak RSS is reported for building (which holds the dense fp32 weights in both
//! modes, as any loader of an fp32 checkpoint must) and, after resetting the high-water mark,
//! for training.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use tune_models::builders::model_spec_from_node;
use tune_models::{ModelSpec, TransformerDecoder};
use tune_recipes::bench::train_steps;

const BATCH: usize = 1;
const SEQ: usize = 256;

/// `QLORA_<name>` from the environment, else `default` (the model shape and step count).
fn setting(name: &str, default: usize) -> Result<usize> {
    match std::env::var(format!("QLORA_{name}")) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("QLORA_{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

fn model_node(quantize_base: bool) -> Result<serde_yaml::Value> {
    let (dim, heads, mlp, layers) = (
        setting("DIM", 1024)?,
        setting("HEADS", 8)?,
        setting("MLP", 2816)?,
        setting("LAYERS", 8)?,
    );
    Ok(serde_yaml::from_str(&format!(
        "{{_component_: torchtune.models.llama2.lora_llama2, lora_attn_modules: [q_proj, v_proj, output_proj],
          apply_lora_to_mlp: True, apply_lora_to_output: False, vocab_size: 32000, num_layers: {layers},
          num_heads: {heads}, num_kv_heads: {heads}, embed_dim: {dim}, intermediate_dim: {mlp},
          max_seq_len: {SEQ}, lora_rank: 8, lora_alpha: 16, quantize_base: {}}}",
        if quantize_base { "True" } else { "False" }
    ))?)
}

/// `tune_recipes::bench::random_model` without its `device.set_seed` (which candle's CPU device
/// refuses): N(0, 0.02) base weights, norm scales 1, random B so the adapter path does real work.
fn random_model(spec: &ModelSpec) -> Result<TransformerDecoder> {
    let device = Device::Cpu;
    let mut weights = HashMap::new();
    for p in spec.params()?.into_iter().filter(|p| !p.trainable) {
        let t = if p.shape.len() == 1 {
            Tensor::ones(p.shape.as_slice(), DType::F32, &device)?
        } else {
            Tensor::randn(0f32, 0.02, p.shape.as_slice(), &device)?
        };
        weights.insert(p.name, t);
    }
    let model = TransformerDecoder::from_weights(spec, weights, 0)?;
    for (name, var) in model.adapter_params() {
        if name.ends_with("lora_b.weight") {
            var.set(&Tensor::randn(0f32, 0.02, var.shape(), &device)?)?;
        }
    }
    Ok(model)
}

/// A `/proc/self/status` field in MiB (`VmRSS`, `VmHWM`).
fn status_mib(field: &str) -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field}"))?;
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .context("malformed status line")?
        .parse()?;
    Ok(kib / 1024.0)
}

/// Resets `VmHWM` to the current RSS (Linux >= 4.0).
fn reset_peak() -> Result<()> {
    std::fs::write("/proc/self/clear_refs", "5")
        .context("cannot reset the peak RSS via /proc/self/clear_refs")
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn return_freed_memory_to_the_os() {
    extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    const M_MMAP_THRESHOLD: i32 = -3;
    // SAFETY: mallopt only changes allocator tuning; called before any large allocation.
    unsafe { mallopt(M_MMAP_THRESHOLD, 64 * 1024) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_freed_memory_to_the_os() {}

fn run_mode(mode: &str) -> Result<serde_json::Value> {
    return_freed_memory_to_the_os();
    tune_recipes::link();
    let quantize = match mode {
        "lora" => false,
        "qlora" => true,
        other => anyhow::bail!("unknown mode `{other}`; use lora or qlora"),
    };
    let spec = model_spec_from_node(&model_node(quantize)?)?;
    let params = spec.params()?;
    // Base linears: every `.weight` of a projection except the (never quantised) output layer.
    let is_base_linear =
        |n: &str| n.starts_with("layers.") && n.ends_with(".weight") && !n.contains("lora_");
    let base_linear: usize = params
        .iter()
        .filter(|p| is_base_linear(&p.name))
        .map(|p| p.shape.iter().product::<usize>())
        .sum();
    let other_fp32: usize = params
        .iter()
        .filter(|p| !is_base_linear(&p.name))
        .map(|p| p.shape.iter().product::<usize>())
        .sum();

    let rss_before = status_mib("VmRSS:")?;
    let started = Instant::now();
    let model = random_model(&spec)?;
    let build_seconds = started.elapsed().as_secs_f64();
    let (rss_built, peak_build) = (status_mib("VmRSS:")?, status_mib("VmHWM:")?);
    // What the base linears occupy: the model's resident bytes minus the fp32 tensors that are
    // not base linears (embeddings, norms, output, adapters).
    let base_bytes = (rss_built - rss_before) * 1024.0 * 1024.0 - 4.0 * other_fp32 as f64;
    let bits_per_base_param = 8.0 * base_bytes / base_linear as f64;

    // Dequantisation cost: every base linear is dequantised once in the forward and once in the
    // backward; `base_weight` runs the same dequantisation (a clone for dense weights).
    let linears = model.linears();
    let reps = 3;
    let started = Instant::now();
    for _ in 0..reps {
        for (name, layer) in &linears {
            if name != "output" {
                drop(layer.base_weight()?);
            }
        }
    }
    let dequant_per_step = 2.0 * started.elapsed().as_secs_f64() / reps as f64;

    reset_peak()?;
    let train = train_steps(&model, BATCH, SEQ, 1, setting("STEPS", 3)?)?;
    let peak_train = status_mib("VmHWM:")?;
    Ok(json!({
        "mode": mode,
        "batch_size": BATCH,
        "seq_len": SEQ,
        "base_linear_params": base_linear,
        "other_fp32_params": other_fp32,
        "build_seconds": build_seconds,
        "rss_before_build_mib": rss_before,
        "rss_after_build_mib": rss_built,
        "peak_rss_during_build_mib": peak_build,
        "peak_rss_during_training_mib": peak_train,
        "measured_bits_per_base_param": bits_per_base_param,
        "dequantise_all_base_linears_x2_seconds": dequant_per_step,
        "mean_step_seconds": train["mean_step_seconds"],
        "tokens_per_second": train["tokens_per_second"],
    }))
}

fn main() -> Result<()> {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "both".into());
    if mode != "both" {
        println!("{}", serde_json::to_string_pretty(&run_mode(&mode)?)?);
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let mut results = Vec::new();
    for m in ["lora", "qlora"] {
        let out = std::process::Command::new(&exe).arg(m).output()?;
        if !out.status.success() {
            anyhow::bail!("{m} run failed:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        results.push(v);
    }
    let f = |i: usize, k: &str| results[i][k].as_f64().unwrap_or(f64::NAN);
    println!(
        "QLoRA / LoRA: peak RSS in training {:.3} ({:.0} / {:.0} MiB), RSS after build {:.3}, \
         bits per base parameter {:.2} vs {:.2}, step time {:.3} ({:.2}s / {:.2}s), dequantisation {:.2}s per step",
        f(1, "peak_rss_during_training_mib") / f(0, "peak_rss_during_training_mib"),
        f(1, "peak_rss_during_training_mib"),
        f(0, "peak_rss_during_training_mib"),
        (f(1, "rss_after_build_mib") - f(1, "rss_before_build_mib")) / (f(0, "rss_after_build_mib") - f(0, "rss_before_build_mib")),
        f(1, "measured_bits_per_base_param"),
        f(0, "measured_bits_per_base_param"),
        f(1, "mean_step_seconds") / f(0, "mean_step_seconds"),
        f(1, "mean_step_seconds"),
        f(0, "mean_step_seconds"),
        f(1, "dequantise_all_base_linears_x2_seconds"),
    );
    Ok(())
}
