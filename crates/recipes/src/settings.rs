//! Run-wide settings read from the top level of a recipe config (device, dtype, seed, ...).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde_yaml::Value;
use tune_core::Config;

/// The top-level keys every LoRA training recipe (SFT and DPO) reads, followed by its own.
macro_rules! training_keys {
    ($($own:literal),*) => {
        &[
            "output_dir",
            "model",
            "tokenizer",
            "checkpointer",
            "dataset",
            "optimizer",
            "lr_scheduler",
            "loss",
            "metric_logger",
            "profiler",
            "resume_from_checkpoint",
            "save_adapter_weights_only",
            "save_every_n_steps",
            "seed",
            "shuffle",
            "batch_size",
            "epochs",
            "max_steps_per_epoch",
            "gradient_accumulation_steps",
            "clip_grad_norm",
            "compile",
            "log_every_n_steps",
            "log_peak_memory_stats",
            "device",
            "dtype",
            "enable_activation_checkpointing",
            "enable_activation_offloading",
            "log_level",
            "plugins",
            $($own),*
        ]
    };
}

/// Top-level keys the LoRA fine-tuning recipes read.
pub const SFT_KEYS: &[&str] = training_keys!("collate_fn");

/// Top-level keys the LoRA DPO recipes read (torchtune's DPO collates pairs itself, without a
/// `collate_fn`).
pub const DPO_KEYS: &[&str] = training_keys!();

/// torchtune training keys for torch's memory, sharding and determinism that mean nothing here
/// (every rank holds the whole model; `fsdp_cpu_offload` is announced by the distributed recipes).
pub const TRAINING_KEYS_WITHOUT_EFFECT: &[&str] = &[
    "low_cpu_ram",
    "cudnn_deterministic_mode",
    "custom_sharded_layers",
    "fsdp_reshard_after_forward",
    "fsdp_cpu_offload",
    "fsdp",
];

/// Parses `device: cpu | cuda | cuda:N`. A CUDA device in a binary built without the `cuda`
/// feature, or on a machine without a GPU, is a clear error.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .with_context(|| format!("device `{s}`: expected cuda:<index>"))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "device `{s}` was asked for, but this `tune` was built without CUDA support. Build \
                     it with scripts/build-cuda.sh (cargo --features cuda), or run with device=cpu dtype=fp32"
                );
            }
            let device = Device::new_cuda(ordinal).with_context(|| {
                format!("cannot open CUDA device {ordinal}: no usable GPU/driver here. Use device=cpu dtype=fp32")
            })?;
            crate::device_memory::keep_freed_memory(&device);
            Ok(device)
        }
        other => bail!("unknown device `{other}`; use cpu, cuda or cuda:N"),
    }
}

/// Parses torchtune's `dtype` (fp32/bf16/...) for `device`.
pub fn parse_dtype(name: &str, device: &Device) -> Result<DType> {
    let dtype = match name {
        "fp32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "fp16" | "float16" => {
            bail!("dtype fp16 is not supported by tune-rs (torchtune's training recipes refuse it too); use bf16 or fp32")
        }
        "fp64" | "float64" => DType::F64,
        other => bail!("unknown dtype `{other}`; use fp32 or bf16"),
    };
    if device.is_cpu() && dtype == DType::BF16 {
        // candle multiplies bf16 on the CPU by widening to fp32: right, but slower than fp32.
        tracing::warn!("dtype bf16 on CPU runs slower than fp32 (candle widens each bf16 matmul to fp32); it is for checking bf16 numerics");
    }
    Ok(dtype)
}

/// torchtune's `seed`: an integer from 0 to 2^32 - world_size (rank r seeds seed + r), as its
/// `set_seed` requires; `None` for `null` (or no key), which the recipe replaces by a draw.
pub fn seed_setting(cfg: &TopLevel, world_size: usize) -> Result<Option<u64>> {
    let Some(seed) = cfg.opt::<i64>("seed")? else {
        return Ok(None);
    };
    let max = u32::MAX as i64 - world_size as i64 + 1;
    if !(0..=max).contains(&seed) {
        bail!("seed {seed} is out of range: use an integer from 0 to {max}, or null for a random seed");
    }
    Ok(Some(seed as u64))
}

/// A random seed for `seed: null`, in the range [`seed_setting`] accepts.
pub fn random_seed(world_size: usize) -> u64 {
    let max = u32::MAX as u64 + 1 - world_size as u64;
    rand::random::<u32>() as u64 % (max + 1)
}

/// Typed access to top-level keys with defaults.
pub struct TopLevel<'a>(pub &'a Config);

impl TopLevel<'_> {
    fn value(&self, key: &str) -> Option<&Value> {
        self.0.root.get(key).filter(|v| !v.is_null())
    }

    pub fn get<T: serde::de::DeserializeOwned>(&self, key: &str, default: T) -> Result<T> {
        match self.value(key) {
            None => Ok(default),
            Some(v) => tune_core::args::from_value(v)
                .with_context(|| format!("config key `{key}` has the wrong type")),
        }
    }

    pub fn opt<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.value(key) {
            None => Ok(None),
            Some(v) => tune_core::args::from_value(v)
                .map(Some)
                .with_context(|| format!("config key `{key}` has the wrong type")),
        }
    }

    pub fn require<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T> {
        self.opt(key)?
            .with_context(|| format!("config key `{key}` is required"))
    }

    /// A component node (`model`, `tokenizer`, ...): its `_component_` must be of `kind`.
    pub fn node(&self, key: &str) -> Result<&Value> {
        self.value(key)
            .with_context(|| format!("config has no `{key}` section"))
    }

    pub fn build<T: 'static>(&self, key: &str, kind: tune_core::ComponentKind) -> Result<T> {
        self.build_expecting(key, kind, "")
    }

    /// [`Self::build`]; when the component is of a type this recipe cannot use, the error ends
    /// with `expected` (what the recipe needs instead).
    pub fn build_expecting<T: 'static>(
        &self,
        key: &str,
        kind: tune_core::ComponentKind,
        expected: &str,
    ) -> Result<T> {
        build_node(key, self.node(key)?, kind, expected)
    }

    /// Every component under `key`: one for a component node, one per item for a list of them
    /// (torchtune's `dataset: [{...}, {...}]`).
    pub fn build_each<T: 'static>(
        &self,
        key: &str,
        kind: tune_core::ComponentKind,
        expected: &str,
    ) -> Result<Vec<T>> {
        match self.node(key)? {
            Value::Sequence(items) if items.is_empty() => bail!("`{key}` is an empty list"),
            Value::Sequence(items) => items
                .iter()
                .enumerate()
                .map(|(i, node)| build_node(&format!("{key}.{i}"), node, kind, expected))
                .collect(),
            node => Ok(vec![build_node(key, node, kind, expected)?]),
        }
    }
}

/// Builds the component `node` (found at `at`, a dotted path for messages) as a `T` of `kind`;
/// `expected` ends the error when it is another type.
pub fn build_node<T: 'static>(
    at: &str,
    node: &Value,
    kind: tune_core::ComponentKind,
    expected: &str,
) -> Result<T> {
    let name = node
        .get("_component_")
        .and_then(|v| v.as_str())
        .with_context(|| format!("`{at}` needs a `_component_`"))?;
    let component = tune_core::registry::lookup(name)?;
    if component.kind != kind {
        bail!(
            "`{at}._component_` is `{name}`, a {} component; expected a {kind}",
            component.kind
        );
    }
    let built = component
        .build_from(node)
        .with_context(|| format!("building `{at}` ({name})"))?;
    built
        .downcast::<T>()
        .map(|b| *b)
        .map_err(|_| anyhow::anyhow!("`{at}` ({name}) cannot be used by this recipe{expected}"))
}

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

/// torchtune's profiler node is accepted (so torchtune YAMLs validate); it does nothing here.
#[derive(Debug, Clone)]
pub struct ProfilerSpec;

tune_core::inventory::submit! {
    tune_core::Component {
        path: "torchtune.training.setup_torch_profiler",
        aliases: &["setup_torch_profiler"],
        kind: tune_core::ComponentKind::Profiler,
        args: &[tune_core::ArgSpec::optional("enabled", tune_core::ArgType::Bool, "false")],
        extra_args: true,
        about: "accepted for compatibility; profiling is not implemented (a warning when enabled)",
        origin: "built-in",
        build: |_| Ok(Box::new(ProfilerSpec)),
    }
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
        let node: Value = serde_yaml::from_str(&format!(
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
