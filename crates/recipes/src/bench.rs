//! Training-step benchmark on a random-weight Llama2 (`tune bench`): tokens/s, peak memory and,
//! on GPUs, model-FLOP utilisation. Used for BENCHMARKS.md on CPU and by scripts/gpu-check.sh.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use tune_models::{ModelSpec, TransformerDecoder};

use crate::device_memory::gib;
use crate::loss::model_ce_sum;
use crate::memory::peak_rss_gib;
use crate::optim::{AdamW, AdamWConfig};

/// Builds `spec` with N(0, 0.02) base weights (norm scales 1) directly on `device`.
pub fn random_model(
    spec: &ModelSpec,
    device: &Device,
    dtype: DType,
    seed: u64,
) -> Result<TransformerDecoder> {
    // CUDA can be seeded; candle's CPU generator cannot (the values just differ run to run).
    let _ = device.set_seed(seed);
    let mut weights = HashMap::new();
    for p in spec.params()?.into_iter().filter(|p| !p.trainable) {
        let t = if p.shape.len() == 1 {
            Tensor::ones(p.shape.as_slice(), dtype, device)?
        } else {
            Tensor::randn(0f32, 0.02, p.shape.as_slice(), device)?.to_dtype(dtype)?
        };
        weights.insert(p.name, t);
    }
    let model = TransformerDecoder::from_weights(spec, weights, seed)?;
    // Give B a value so the adapter path does real work in the backward.
    for (name, var) in model.adapter_params() {
        if name.ends_with("lora_b.weight") {
            var.set(&Tensor::randn(0f32, 0.02, var.shape(), device)?.to_dtype(var.dtype())?)?;
        }
    }
    Ok(model)
}

/// Writes `spec`'s base model with N(0, 0.02) weights (norm scales 1) as a Hugging Face
/// checkpoint, `config.json` and `model.safetensors` in `dtype`, to benchmark whole recipes
/// (`checkpointer.checkpoint_dir=DIR`) without downloading a model.
pub fn write_random_checkpoint(
    spec: &ModelSpec,
    dir: &std::path::Path,
    dtype: DType,
) -> Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tensors = HashMap::new();
    for p in spec.params()?.into_iter().filter(|p| !p.trainable) {
        let t = if p.shape.len() == 1 {
            Tensor::ones(p.shape.as_slice(), dtype, &Device::Cpu)?
        } else {
            Tensor::randn(0f32, 0.02, p.shape.as_slice(), &Device::Cpu)?.to_dtype(dtype)?
        };
        let name = tune_models::convert::tune_to_hf_name(&p.name)
            .with_context(|| format!("no Hugging Face name for {}", p.name))?;
        tensors.insert(name, t);
    }
    let c = &spec.transformer;
    let torch_dtype = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    };
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.embed_dim,
        "intermediate_size": c.intermediate_dim, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_base, "tie_word_embeddings": c.tie_word_embeddings,
        "torch_dtype": torch_dtype,
    });
    crate::atomic::save_safetensors(&dir.join("model.safetensors"), &tensors)?;
    crate::atomic::write(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )
}

/// Runs `warmup + steps` full training steps (forward, loss, backward, AdamW) on random tokens.
pub fn train_steps(
    model: &TransformerDecoder,
    batch: usize,
    seq: usize,
    warmup: usize,
    steps: usize,
) -> Result<serde_json::Value> {
    let device = model.device().clone();
    let c = model.config.clone();
    let params = model.adapter_params();
    let mut opt = AdamW::new(
        AdamWConfig {
            lr: 1e-4,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        },
        params.clone(),
    )?;
    // CUDA's uniform draws are in (0, 1]: scale to vocab - 1 so no id reaches vocab_size.
    let top = c.vocab_size.saturating_sub(1) as f32;
    let tokens = Tensor::rand(0f32, top, (batch, seq), &device)?.to_dtype(DType::U32)?;
    let labels = tokens.to_dtype(DType::I64)?;
    let mut times = Vec::new();
    for i in 0..warmup + steps {
        device.synchronize()?;
        if i == warmup {
            // Peaks of the timed steps only.
            crate::device_memory::reset_peaks(&device);
        }
        let start = Instant::now();
        let (sum, n) = model_ce_sum(model, &tokens, &labels, None, true)?;
        let loss = (sum / n as f64)?;
        let store = loss.backward()?;
        let grads: Vec<Tensor> = params
            .iter()
            .map(|(name, v)| {
                tune_core::autograd::param_grad(&store, v)?
                    .ok_or_else(|| anyhow::anyhow!("no gradient for {name}"))
            })
            .collect::<Result<_>>()?;
        drop(store);
        opt.step(&grads, 1e-4)?;
        let _: f32 = loss.to_dtype(DType::F32)?.to_scalar()?;
        device.synchronize()?;
        if i >= warmup {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    let memory = crate::device_memory::read(&device);
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let tokens_per_step = (batch * seq) as f64;
    // Model FLOPs per token. `mfu` uses the usual 6N convention (+ causal attention, 6 * layers
    // * seq * dim), as published MFU figures do; `mfu_lora` counts what LoRA needs: 4N, since
    // frozen weights get no weight gradient (forward 2N, input gradient 2N), plus the same
    // attention term. Recomputation (activation checkpointing) counts in neither.
    let n_params: f64 = model
        .linears()
        .iter()
        .map(|(_, l)| {
            l.base_weight()
                .map(|w| w.elem_count() as f64)
                .unwrap_or(0.0)
        })
        .sum();
    let attn = 6.0 * c.num_layers as f64 * seq as f64 * c.embed_dim as f64;
    let flops_per_token = 6.0 * n_params + attn;
    let lora_flops_per_token = 4.0 * n_params + attn;
    Ok(json!({
        "batch_size": batch,
        "seq_len": seq,
        "steps_timed": steps,
        "mean_step_seconds": mean,
        "tokens_per_second": tokens_per_step / mean,
        "model_flops_per_token": flops_per_token,
        "achieved_tflops": flops_per_token * tokens_per_step / mean / 1e12,
        "lora_model_flops_per_token": lora_flops_per_token,
        "achieved_tflops_lora": lora_flops_per_token * tokens_per_step / mean / 1e12,
        "peak_rss_gib": peak_rss_gib(),
        // GPU: the pool's peaks over the timed loop (torch's max_memory_allocated / _reserved)
        // and the driver's count at the end, CUDA context and cuBLAS workspaces included.
        "peak_device_memory_gib": memory.map(|m| gib(m.peak_in_use)),
        "peak_device_reserved_gib": memory.map(|m| gib(m.peak_reserved)),
        "device_memory_used_gib": memory.map(|m| gib(m.driver_used)),
    }))
}
