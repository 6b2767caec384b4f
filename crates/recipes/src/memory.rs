//! Memory a run needs and uses: what the weights take and whether they fit the device (checked
//! before loading), what to change when the device runs out, and the process's peak RSS. The
//! GPU memory pool's own peaks are in [`device_memory`](crate::device_memory).

use anyhow::{bail, Result};
use candle_core::DType;

/// Bytes the model's weights take on the device in `dtype`: NF4 base linears (QLoRA) at 4.125
/// bits, everything else at the dtype's size.
pub fn weight_bytes(spec: &tune_models::ModelSpec, dtype: DType) -> Result<u64> {
    let quantized = spec.lora.as_ref().is_some_and(|l| l.quantize_base);
    let mut bits = 0u64;
    for p in spec.params()? {
        let nf4 = quantized
            && !p.trainable
            && (p.name.contains(".attn.") || p.name.contains(".mlp."))
            && p.name.ends_with(".weight");
        // 4 bits per value + an int8 scale per 64 values (+ a negligible factor per 16384).
        let per_value = if nf4 {
            4.125
        } else {
            dtype.size_in_bytes() as f64 * 8.0
        };
        bits += (p.numel() as f64 * per_value) as u64;
    }
    Ok(bits / 8)
}

/// Fails, before any weight is loaded, when the weights alone exceed the device's free memory
/// (`free_bytes`; `None` where it cannot be read, e.g. on CPU). `each_rank` names the reason in a
/// distributed run: every rank holds the whole model.
pub fn check_weights_fit(
    weights: u64,
    free_bytes: Option<u64>,
    device_name: &str,
    dtype: DType,
    each_rank: bool,
) -> Result<()> {
    let Some(free) = free_bytes else {
        return Ok(());
    };
    if weights > free {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        bail!(
            "the model's weights need {:.1} GiB in {dtype:?} but {device_name} has {:.1} GiB free{}. \
             Use a QLoRA config (model.quantize_base=True stores the base in NF4, ~4x smaller), \
             or a device with more memory",
            gib(weights),
            gib(free),
            if each_rank {
                " (every rank of lora_finetune_distributed holds the whole frozen model: tune-rs \
                 does not shard it like FSDP)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// What to change when training runs out of device memory.
pub const TRAINING_MEMORY_ADVICE: &str = "Lower batch_size (raising gradient_accumulation_steps \
     keeps the same steps), cap tokenizer.max_seq_len, set enable_activation_checkpointing=True, \
     or use a QLoRA config (model.quantize_base=True)";

/// `error`, with `advice` when it says the device ran out of memory (CUDA's
/// `CUDA_ERROR_OUT_OF_MEMORY`); `at` says where (e.g. "in the backward of step 12").
pub fn explain_out_of_memory(
    error: anyhow::Error,
    at: impl FnOnce() -> String,
    advice: &str,
) -> anyhow::Error {
    let text = format!("{error:#}").to_ascii_lowercase();
    if !(text.contains("out_of_memory") || text.contains("out of memory")) {
        return error;
    }
    error.context(format!("the device ran out of memory {}. {advice}", at()))
}

/// Peak resident memory of this process in GiB (Linux `VmHWM`).
pub fn peak_rss_gib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CUDA out-of-memory error (as candle passes cudarc's on) says what to change; any other
    /// error is left as it is.
    #[test]
    fn out_of_memory_says_what_to_change() {
        let cuda = candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        );
        let explained = explain_out_of_memory(
            cuda.into(),
            || "in the backward of step 3".into(),
            TRAINING_MEMORY_ADVICE,
        );
        let text = format!("{explained:#}");
        assert!(
            text.starts_with("the device ran out of memory in the backward of step 3")
                && text.contains("enable_activation_checkpointing=True")
                && text.contains("CUDA_ERROR_OUT_OF_MEMORY"),
            "{text}"
        );
        let other = explain_out_of_memory(
            anyhow::anyhow!("shape mismatch"),
            || unreachable!(),
            TRAINING_MEMORY_ADVICE,
        );
        assert_eq!(format!("{other:#}"), "shape mismatch");
    }

    fn spec(builder: &str) -> tune_models::ModelSpec {
        let node: serde_yaml::Value = serde_yaml::from_str(&format!(
            "_component_: torchtune.models.llama2.{builder}\nlora_attn_modules: [q_proj, v_proj]"
        ))
        .unwrap();
        tune_models::builders::model_spec_from_node(&node).unwrap()
    }

    #[test]
    fn weight_bytes_of_llama2_7b_in_bf16_and_nf4() {
        let lora = weight_bytes(&spec("lora_llama2_7b"), DType::BF16).unwrap();
        // 6.74e9 parameters x 2 bytes.
        assert_eq!(lora, 6_742_609_920 * 2);
        let qlora = weight_bytes(&spec("qlora_llama2_7b"), DType::BF16).unwrap();
        // 6.48e9 NF4 values at 4.125 bits + 262M embedding/output/norm/adapter values at 16 bits.
        let gib = qlora as f64 / (1u64 << 30) as f64;
        assert!((3.5..3.7).contains(&gib), "{gib} GiB");
    }

    #[test]
    fn weights_that_do_not_fit_are_refused_with_the_numbers() {
        let seventy_b = weight_bytes(&spec("lora_llama2_70b"), DType::BF16).unwrap();
        let e = check_weights_fit(seventy_b, Some(80 << 30), "cuda:0", DType::BF16, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("need 128.") && e.contains("80.0 GiB free"),
            "{e}"
        );
        assert!(e.contains("does not shard it like FSDP"), "{e}");
        assert!(check_weights_fit(seventy_b, None, "cpu", DType::F32, false).is_ok());
        assert!(check_weights_fit(1 << 30, Some(2 << 30), "cuda:0", DType::BF16, false).is_ok());
    }
}
