//! Run-wide settings read from the top level of a recipe config: the keys each recipe reads,
//! device, dtype, seed, and typed access to top-level values and components ([`TopLevel`]).

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
            Some(v) => tune_core::args::from_value(v).map_err(|e| {
                anyhow::anyhow!(
                    "config key `{key}` has the wrong type: {}",
                    tune_core::args::in_words(&e)
                )
            }),
        }
    }

    pub fn opt<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.value(key) {
            None => Ok(None),
            Some(v) => tune_core::args::from_value(v).map(Some).map_err(|e| {
                anyhow::anyhow!(
                    "config key `{key}` has the wrong type: {}",
                    tune_core::args::in_words(&e)
                )
            }),
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
    tune_core::registry::build_as(name, kind, node).map_err(|e| {
        if e.is::<tune_core::registry::WrongType>() {
            anyhow::anyhow!("`{at}` ({name}) cannot be used by this recipe{expected}")
        } else {
            e.context(format!("building `{at}` ({name})"))
        }
    })
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
