//! Parity checks against the golden torchtune fixtures, runnable on any device from the `tune`
//! binary (`tune selfcheck`), so a GPU machine without Rust can verify a CUDA build. The CPU tests
//! call the same functions.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use tune_models::decoder::Forward;
use tune_models::{builders, checkpoint, TransformerDecoder};

use crate::loss::model_ce_sum;
use crate::optim::{AdamW, AdamWConfig};

fn load(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device)
        .with_context(|| format!("cannot read fixture {}", path.display()))
}

fn f32s(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
}

pub use tune_core::compare::{max_abs_diff, rel_norm_diff};

/// The stories260K LoRA model of `tests/fixtures/lora_step` (q/v, rank 4, alpha 8), with the
/// fixture's initial adapter loaded.
pub fn lora_step_model(repo: &Path, device: &Device, dtype: DType) -> Result<TransformerDecoder> {
    crate::link();
    let node: serde_yaml::Value = serde_yaml::from_str(
        "{_component_: torchtune.models.llama2.lora_llama2, lora_attn_modules: [q_proj, v_proj], vocab_size: 512,
          num_layers: 5, num_heads: 8, num_kv_heads: 4, embed_dim: 64, max_seq_len: 512, intermediate_dim: 172,
          norm_eps: 1e-5, lora_rank: 4, lora_alpha: 8.0, lora_dropout: 0.0}",
    )?;
    let spec = builders::model_spec_from_node(&node)?;
    let (model, _) = checkpoint::load_model(
        &spec,
        &repo.join("assets/stories260K"),
        &["model.safetensors".into()],
        dtype,
        device,
        0,
    )?;
    model.load_adapter(&load(
        &repo.join("tests/fixtures/lora_step/adapter_init.safetensors"),
        device,
    )?)?;
    Ok(model)
}

/// One LoRA forward/backward and 5 AdamW steps on the fixture batch; returns every measured
/// difference from torchtune's numbers as JSON (the caller decides the tolerances).
pub fn lora_step(repo: &Path, device: &Device, dtype: DType) -> Result<serde_json::Value> {
    let fx = repo.join("tests/fixtures/lora_step");
    let model = lora_step_model(repo, device, dtype)?;
    let batch = load(&fx.join("batch.safetensors"), device)?;
    let (tokens, labels) = (&batch["tokens"], &batch["labels"]);

    let out = model.forward_with(
        tokens,
        Forward {
            train: true,
            capture_hidden: true,
            ..Default::default()
        },
    )?;
    let want_logits = load(&fx.join("logits.safetensors"), device)?;
    let logits_diff = max_abs_diff(&out.logits, &want_logits["logits"])?;
    let hidden = load(&fx.join("hidden_states.safetensors"), device)?;
    let mut hidden_diff: f64 = 0.0;
    for (name, t) in &out.hidden {
        hidden_diff = hidden_diff.max(max_abs_diff(
            t,
            hidden.get(name).context("hidden state missing")?,
        )?);
    }
    let base = model.forward_with(
        tokens,
        Forward {
            adapters_disabled: true,
            ..Default::default()
        },
    )?;
    let base_diff = max_abs_diff(&base.logits, &want_logits["base_logits_lora_disabled"])?;

    let params = model.adapter_params();
    let want_grads = load(&fx.join("grads.safetensors"), device)?;
    let per_step = load(&fx.join("adapter_per_step.safetensors"), device)?;
    let want_losses = [
        5.633181571960449f64,
        4.741989612579346,
        4.276536464691162,
        3.970587730407715,
        3.6425726413726807,
    ];
    let mut opt = AdamW::new(
        AdamWConfig {
            lr: 1e-2,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        },
        params.clone(),
    )?;
    let (mut losses, mut grad_rel, mut adapter_max, mut adapter_rel, mut beyond_1e5, mut total) =
        (Vec::new(), 0f64, 0f64, 0f64, 0usize, 0usize);
    for step in 0..5 {
        // The recipe's fused output-projection + loss path, checked against the fixture.
        let (sum, n) = model_ce_sum(&model, tokens, labels, None, true)?;
        let loss = (sum / n as f64)?;
        losses.push(loss.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64);
        let store = loss.backward()?;
        let grads: Vec<Tensor> = params
            .iter()
            .map(|(n, v)| {
                tune_core::autograd::param_grad(&store, v)?
                    .with_context(|| format!("no grad for {n}"))
            })
            .collect::<Result<_>>()?;
        if step == 0 {
            for ((name, _), g) in params.iter().zip(&grads) {
                grad_rel = grad_rel.max(rel_norm_diff(g, &want_grads[name])?);
            }
        }
        opt.step(&grads, 1e-2)?;
        for (name, var) in &params {
            let want = &per_step[&format!("step{}.{name}", step + 1)];
            adapter_max = adapter_max.max(max_abs_diff(var.as_tensor(), want)?);
            adapter_rel = adapter_rel.max(rel_norm_diff(var.as_tensor(), want)?);
            let d: Vec<f32> = (f32s(var.as_tensor())? - f32s(want)?)?
                .abs()?
                .flatten_all()?
                .to_vec1()?;
            beyond_1e5 += d.iter().filter(|x| **x > 1e-5).count();
            total += d.len();
        }
    }
    let loss_rel: f64 = losses
        .iter()
        .zip(want_losses)
        .map(|(a, b)| ((a - b) / b).abs())
        .fold(0.0, f64::max);
    Ok(json!({
        "check": "lora_step",
        "device": format!("{device:?}"),
        "dtype": format!("{dtype:?}"),
        "logits_max_abs_diff": logits_diff,
        "hidden_states_max_abs_diff": hidden_diff,
        "lora_disabled_logits_max_abs_diff": base_diff,
        "losses": losses,
        "torchtune_losses": want_losses,
        "loss_max_rel_diff": loss_rel,
        "grad_max_rel_norm_diff": grad_rel,
        "adapter_max_abs_diff_over_5_steps": adapter_max,
        "adapter_max_rel_norm_diff_over_5_steps": adapter_rel,
        "adapter_entries_beyond_1e-5": beyond_1e5,
        "adapter_entries_total": total,
    }))
}

/// torchtune's trajectory config (tests/fixtures/trajectory/config.yaml) with its placeholders
/// pointed at `work` (output dir and the 96 GSM8K rows it trained on), the bundled model, and the
/// fixture's initial adapter.
pub fn trajectory_config(repo: &Path, work: &Path) -> Result<String> {
    // Absolute: the adapter checkpoint is otherwise taken relative to checkpoint_dir.
    let repo = &std::path::absolute(repo)?;
    let rows: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        repo.join("assets/data/gsm8k_first_512.json"),
    )?)?;
    let rows: Vec<serde_json::Value> = rows
        .as_array()
        .context("data file is not a JSON array")?
        .iter()
        .take(96)
        .cloned()
        .collect();
    let data = work.join("gsm8k_first96.json");
    std::fs::write(&data, serde_json::to_string(&rows)?)?;
    let text = std::fs::read_to_string(repo.join("tests/fixtures/trajectory/config.yaml"))?;
    Ok(text
        .replace("<WORK>/output", &work.join("output").display().to_string())
        .replace(
            "<WORK>/stories260K_ckpt",
            &repo.join("assets/stories260K").display().to_string(),
        )
        .replace("<WORK>/gsm8k_first96.json", &data.display().to_string())
        .replace(
            "<SHARED>/assets/stories260K/tokenizer.model",
            &repo
                .join("assets/stories260K/tokenizer.model")
                .display()
                .to_string(),
        )
        .replace(
            "adapter_checkpoint: null",
            &format!(
                "adapter_checkpoint: {}",
                repo.join("tests/fixtures/lora_step/adapter_init.safetensors")
                    .display()
            ),
        ))
}

/// Runs the recipe on the trajectory config on `device`/`dtype` and reports every logged loss and
/// lr against torchtune's, and the final adapter's difference.
pub fn trajectory(
    repo: &Path,
    work: &Path,
    device_name: &str,
    dtype_name: &str,
) -> Result<serde_json::Value> {
    crate::link();
    let mut config = tune_core::Config::from_yaml_str(&trajectory_config(repo, work)?)?;
    config.apply_overrides(&[
        format!("device={device_name}"),
        format!("dtype={dtype_name}"),
    ])?;
    config.resolve_interpolations()?;
    let started = std::time::Instant::now();
    let summary = crate::lora_finetune_single_device::train(
        config,
        &tune_core::recipe::RunOptions::default(),
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        repo.join("tests/fixtures/trajectory/meta.json"),
    )?)?;
    let want_losses: Vec<f64> = serde_json::from_value(meta["losses_logged"].clone())?;
    let want_lrs: Vec<f64> = serde_json::from_value(meta["lrs_logged"].clone())?;
    let losses: Vec<f64> = summary.steps.iter().map(|s| s.loss).collect();
    let lrs: Vec<f64> = summary.steps.iter().map(|s| s.lr).collect();
    let loss_rel = losses
        .iter()
        .zip(&want_losses)
        .map(|(a, b)| ((a - b) / b).abs())
        .fold(0.0, f64::max);
    let lr_abs = lrs
        .iter()
        .zip(&want_lrs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let ours = load(
        &work.join("output/epoch_0/recipe_state/adapter_torchtune.safetensors"),
        &Device::Cpu,
    )?;
    let theirs = load(
        &repo.join("tests/fixtures/trajectory/adapter_final.safetensors"),
        &Device::Cpu,
    )?;
    let mut adapter_max: f64 = 0.0;
    for (name, t) in &theirs {
        adapter_max = adapter_max.max(max_abs_diff(
            ours.get(name).context("adapter tensor missing")?,
            t,
        )?);
    }
    Ok(json!({
        "check": "trajectory",
        "device": device_name,
        "dtype": dtype_name,
        "steps": losses.len(),
        "losses": losses,
        "torchtune_losses": want_losses,
        "loss_max_rel_diff": loss_rel,
        "lr_max_abs_diff": lr_abs,
        "final_adapter_max_abs_diff": adapter_max,
        "seconds": seconds,
    }))
}

/// The random-init model of `tests/fixtures/qlora_step` through the public builder
/// (`lora_llama2`, q/v rank 8, `quantize_base` as given), base weights from its HF dir, adapter
/// from its init file.
pub fn qlora_step_model(
    repo: &Path,
    quantize_base: bool,
    device: &Device,
    dtype: DType,
) -> Result<TransformerDecoder> {
    crate::link();
    let fx = repo.join("tests/fixtures/qlora_step");
    let node: serde_yaml::Value = serde_yaml::from_str(&format!(
        "{{_component_: torchtune.models.llama2.lora_llama2, lora_attn_modules: [q_proj, v_proj],
          apply_lora_to_mlp: False, apply_lora_to_output: False, vocab_size: 512, num_layers: 2,
          num_heads: 4, num_kv_heads: 2, embed_dim: 256, max_seq_len: 512, intermediate_dim: 192,
          norm_eps: 1e-5, lora_rank: 8, lora_alpha: 16, lora_dropout: 0.0, quantize_base: {quantize_base}}}"
    ))?;
    let spec = builders::model_spec_from_node(&node)?;
    let (model, _) = checkpoint::load_model(
        &spec,
        &fx.join("hf_model"),
        &["model.safetensors".into()],
        dtype,
        device,
        0,
    )?;
    model.load_adapter(&load(
        &fx.join("adapter_init_torchtune.safetensors"),
        device,
    )?)?;
    Ok(model)
}

/// One forward/loss/backward on the qlora_step fixture batch.
pub struct StepResult {
    pub loss: f64,
    pub logits: Tensor,
    pub grads: Vec<(String, Tensor)>,
}

pub fn qlora_step_run(repo: &Path, model: &TransformerDecoder) -> Result<StepResult> {
    let batch = load(
        &repo.join("tests/fixtures/qlora_step/batch.safetensors"),
        model.device(),
    )?;
    let (tokens, labels) = (&batch["tokens"], &batch["labels"]);
    let logits = model.forward(tokens, true)?;
    let (sum, n) = model_ce_sum(model, tokens, labels, None, true)?;
    let loss = (sum / n as f64)?;
    let store = loss.backward()?;
    let grads = model
        .adapter_params()
        .into_iter()
        .map(|(name, v)| {
            Ok((
                name.clone(),
                tune_core::autograd::param_grad(&store, &v)?
                    .with_context(|| format!("no grad for {name}"))?,
            ))
        })
        .collect::<Result<_>>()?;
    Ok(StepResult {
        loss: loss.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64,
        logits,
        grads,
    })
}

/// Differences from one run recorded in the fixture's results.safetensors.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepDiff {
    pub run: String,
    pub loss: f64,
    pub reference_loss: f64,
    pub loss_rel: f64,
    pub grad_rel_norm_max: f64,
    pub grad_rel_norm_min: f64,
    /// Max over tensors of max|ours - ref| / max|ref|.
    pub grad_abs_over_max_ref: f64,
    pub logits_max_abs: Option<f64>,
}

pub fn qlora_step_compare(repo: &Path, ours: &StepResult, run: &str) -> Result<StepDiff> {
    let want = load(
        &repo.join("tests/fixtures/qlora_step/results.safetensors"),
        &Device::Cpu,
    )?;
    let reference_loss = want
        .get(&format!("{run}.loss"))
        .with_context(|| format!("no run {run} in the fixture"))?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?[0];
    let (mut rel_max, mut rel_min, mut abs_ratio) = (0f64, f64::MAX, 0f64);
    for (name, g) in &ours.grads {
        let r = want
            .get(&format!("{run}.grad.{name}"))
            .with_context(|| format!("no reference gradient {name}"))?;
        let rel = rel_norm_diff(g, r)?;
        rel_max = rel_max.max(rel);
        rel_min = rel_min.min(rel);
        let scale = f32s(r)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
        abs_ratio = abs_ratio.max(max_abs_diff(g, r)? / scale);
    }
    Ok(StepDiff {
        run: run.to_string(),
        loss: ours.loss,
        reference_loss,
        loss_rel: ((ours.loss - reference_loss) / reference_loss).abs(),
        grad_rel_norm_max: rel_max,
        grad_rel_norm_min: rel_min,
        grad_abs_over_max_ref: abs_ratio,
        logits_max_abs: match want.get(&format!("{run}.logits")) {
            Some(l) => Some(max_abs_diff(&ours.logits, l)?),
            None => None,
        },
    })
}

/// QLoRA (and dense LoRA, same harness) against torchtune + torchao on `device`: fp32 against the
/// recipe's fp32 run, bf16 against the bf16 runs.
pub fn qlora_step(repo: &Path, device: &Device, dtype: DType) -> Result<serde_json::Value> {
    let (qlora_run, lora_run) = match dtype {
        DType::BF16 => ("qlora_bf16", "lora_bf16"),
        _ => ("qlora_fp32_recipe", "lora_fp32"),
    };
    let qlora = qlora_step_compare(
        repo,
        &qlora_step_run(repo, &qlora_step_model(repo, true, device, dtype)?)?,
        qlora_run,
    )?;
    let lora = qlora_step_compare(
        repo,
        &qlora_step_run(repo, &qlora_step_model(repo, false, device, dtype)?)?,
        lora_run,
    )?;
    let mut report = json!({
        "check": "qlora_step",
        "device": format!("{device:?}"),
        "dtype": format!("{dtype:?}"),
        "qlora": qlora,
        "lora": lora,
    });
    // Off the CPU, NF4 dequantises through candle ops: it must give the host path's bits.
    if !device.is_cpu() {
        report["nf4_device_vs_host_max_abs_diff"] = json!(nf4_device_vs_host(repo, device, dtype)?);
    }
    Ok(report)
}

/// The largest difference between NF4 round trips (quantise, dequantise) of the NF4 fixtures'
/// inputs on `device` and on the host: 0 when the device path gives the host's bits.
pub fn nf4_device_vs_host(repo: &Path, device: &Device, dtype: DType) -> Result<f64> {
    let mut worst = 0f64;
    for case in ["w128x128_seed0", "w128x256_seed3_outliers"] {
        let path = repo.join(format!("tests/fixtures/nf4/{case}.safetensors"));
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        // Only this tensor: the files also hold torchao's int8 scalers, which candle cannot read.
        let input = candle_core::safetensors::SliceSafetensors::new(&bytes)?
            .load("input_bf16", &Device::Cpu)
            .with_context(|| format!("{} without input_bf16", path.display()))?
            .to_dtype(dtype)?;
        let host = tune_adapters::nf4::Nf4Tensor::quantize(&input)?.dequantize()?;
        let on_device =
            tune_adapters::nf4::Nf4Tensor::quantize(&input.to_device(device)?)?.dequantize()?;
        worst = worst.max(max_abs_diff(&on_device, &host)?);
    }
    Ok(worst)
}

/// Whether a selfcheck report is within tolerance: in fp32 the CPU tests' tolerances, in bf16
/// the loss within 1% of torchtune's. Returns the failed conditions (empty: passed).
pub fn failures(report: &serde_json::Value) -> Vec<String> {
    // "BF16" (candle's name) or the command line's "bf16" / "bfloat16".
    let bf16 = report["dtype"]
        .as_str()
        .is_some_and(|d| matches!(d.to_ascii_lowercase().as_str(), "bf16" | "bfloat16"));
    let mut limits: Vec<(String, f64)> = Vec::new();
    let mut want = |path: &str, limit: f64| limits.push((path.to_string(), limit));
    match (report["check"].as_str().unwrap_or_default(), bf16) {
        ("lora_step", false) => {
            want("loss_max_rel_diff", 1e-5);
            want("grad_max_rel_norm_diff", 1e-4);
            want("logits_max_abs_diff", 1e-4);
            want("hidden_states_max_abs_diff", 1e-4);
        }
        ("qlora_step", false) => {
            for run in ["qlora", "lora"] {
                want(&format!("{run}.loss_rel"), 1e-5);
                want(&format!("{run}.grad_rel_norm_max"), 1e-4);
            }
        }
        ("trajectory", false) => {
            want("loss_max_rel_diff", 1e-5);
            want("lr_max_abs_diff", 1e-12);
            want("final_adapter_max_abs_diff", 1e-4);
        }
        // bf16 against torchtune's fp32 run: the loss within 1%, the gradients roughly (bf16
        // rounding gives ~9% by relative norm here; a wrong backward gives ~100%).
        ("lora_step", true) => {
            want("loss_max_rel_diff", 0.01);
            want("grad_max_rel_norm_diff", 0.2);
        }
        ("trajectory", true) => want("loss_max_rel_diff", 0.01),
        // Against torchtune's own bf16 runs: gradients within 2% by relative norm.
        ("qlora_step", true) => {
            for run in ["qlora", "lora"] {
                want(&format!("{run}.loss_rel"), 0.01);
                want(&format!("{run}.grad_rel_norm_max"), 2e-2);
            }
        }
        (other, _) => return vec![format!("unknown check {other:?}")],
    }
    if report.get("nf4_device_vs_host_max_abs_diff").is_some() {
        want("nf4_device_vs_host_max_abs_diff", 0.0);
    }
    let mut failed = Vec::new();
    // A run that logged fewer steps than torchtune's would compare only its first ones.
    if let (Some(ours), Some(theirs)) = (
        report["losses"].as_array(),
        report["torchtune_losses"].as_array(),
    ) {
        if ours.len() != theirs.len() {
            failed.push(format!(
                "logged {} losses, torchtune {}",
                ours.len(),
                theirs.len()
            ));
        }
    }
    failed.extend(limits.into_iter().filter_map(|(path, limit)| {
        let value = path.split('.').fold(report, |v, key| &v[key]).as_f64();
        // A NaN or a missing number fails too.
        (!value.is_some_and(|v| v <= limit))
            .then(|| format!("{path} = {value:?}, wanted <= {limit:e}"))
    }));
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerances_depend_on_the_dtype_and_nan_fails() {
        let report = |dtype: &str, loss: f64| {
            json!({"check": "trajectory", "dtype": dtype, "loss_max_rel_diff": loss,
                   "lr_max_abs_diff": 0.0, "final_adapter_max_abs_diff": 1e-6,
                   "losses": [1.0, 2.0], "torchtune_losses": [1.0, 2.0]})
        };
        assert!(failures(&report("fp32", 1e-6)).is_empty());
        assert_eq!(failures(&report("fp32", 1e-3)).len(), 1);
        assert!(failures(&report("bf16", 1e-3)).is_empty());
        assert!(failures(&report("bfloat16", 1e-3)).is_empty());
        let mut short = report("fp32", 1e-6);
        short["losses"] = json!([1.0]);
        assert_eq!(failures(&short).len(), 1);
        assert_eq!(failures(&report("bf16", 0.02)).len(), 1);
        // serde_json writes NaN as null: a missing number fails.
        assert_eq!(failures(&report("BF16", f64::NAN)).len(), 1);
        let mut nf4 = json!({"check": "qlora_step", "dtype": "BF16",
            "qlora": {"loss_rel": 0.001, "grad_rel_norm_max": 0.01},
            "lora": {"loss_rel": 0.001, "grad_rel_norm_max": 0.01},
            "nf4_device_vs_host_max_abs_diff": 0.0});
        assert!(failures(&nf4).is_empty());
        nf4["nf4_device_vs_host_max_abs_diff"] = json!(1e-3);
        assert_eq!(failures(&nf4).len(), 1);
    }
}
