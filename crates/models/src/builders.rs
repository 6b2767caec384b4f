//! torchtune's Llama2 builders, registered under their dotted names.
//!
//! Each builder resolves its arguments into a [`ModelSpec`]; nothing is allocated until a
//! checkpoint is loaded into it.

use anyhow::{bail, Result};
use tune_core::{AdapterSpec, ArgSpec, ArgType, Args, Component, ComponentKind};

use crate::spec::{LoraSettings, ModelSpec, TransformerConfig, ATTN_MODULES};

/// torchtune's default MLP width: 2/3 of 4*dim, rounded up to a multiple of 256.
pub fn scale_hidden_dim_for_mlp(dim: usize) -> usize {
    let hidden = 2 * (4 * dim) / 3;
    256 * hidden.div_ceil(256)
}

/// Llama2 with explicit dimensions.
#[allow(clippy::too_many_arguments)]
pub fn llama2(
    vocab_size: usize,
    num_layers: usize,
    num_heads: usize,
    num_kv_heads: usize,
    embed_dim: usize,
    max_seq_len: usize,
    intermediate_dim: Option<usize>,
    norm_eps: f64,
) -> TransformerConfig {
    TransformerConfig {
        vocab_size,
        num_layers,
        num_heads,
        num_kv_heads,
        embed_dim,
        intermediate_dim: intermediate_dim.unwrap_or_else(|| scale_hidden_dim_for_mlp(embed_dim)),
        max_seq_len,
        norm_eps,
        rope_base: 10_000.0,
        attn_dropout: 0.0,
        tie_word_embeddings: false,
    }
}

pub fn llama2_7b() -> TransformerConfig {
    llama2(32_000, 32, 32, 32, 4096, 4096, Some(11_008), 1e-5)
}

pub fn llama2_13b() -> TransformerConfig {
    llama2(32_000, 40, 40, 40, 5120, 4096, Some(13_824), 1e-5)
}

pub fn llama2_70b() -> TransformerConfig {
    llama2(32_000, 80, 64, 8, 8192, 4096, Some(28_672), 1e-5)
}

fn dims_from_args(args: &Args) -> Result<TransformerConfig> {
    let mut c = llama2(
        args.get("vocab_size")?,
        args.get("num_layers")?,
        args.get("num_heads")?,
        // As torchtune: null (or 0) means as many kv heads as heads (no grouped-query attention).
        args.get_opt::<usize>("num_kv_heads")?
            .filter(|&n| n > 0)
            .unwrap_or(args.get("num_heads")?),
        args.get("embed_dim")?,
        args.get("max_seq_len")?,
        args.get_opt("intermediate_dim")?,
        args.get("norm_eps")?,
    );
    c.attn_dropout = args.get("attn_dropout")?;
    if !c.embed_dim.is_multiple_of(c.num_heads)
        || !c.num_heads.is_multiple_of(c.num_kv_heads.max(1))
    {
        bail!(
            "embed_dim ({}) must divide by num_heads ({}) and num_heads by num_kv_heads ({})",
            c.embed_dim,
            c.num_heads,
            c.num_kv_heads
        );
    }
    Ok(c)
}

/// Resolves torchtune's LoRA arguments; an empty or unknown `lora_attn_modules` is an error.
pub fn lora_settings(args: &Args) -> Result<LoraSettings> {
    let modules: Vec<String> = args.get("lora_attn_modules")?;
    if modules.is_empty() {
        bail!(
            "lora_attn_modules is empty: LoRA would train nothing in attention. Give a subset of \
             {ATTN_MODULES:?}, e.g. model.lora_attn_modules=[q_proj,v_proj]"
        );
    }
    for m in &modules {
        if !ATTN_MODULES.contains(&m.as_str()) {
            let hint = tune_core::registry::closest(m, ATTN_MODULES.iter().copied(), 1);
            bail!(
                "unknown module `{m}` in lora_attn_modules{}; choose from {ATTN_MODULES:?}",
                hint.first()
                    .map(|h| format!(" (did you mean `{h}`?)"))
                    .unwrap_or_default()
            );
        }
    }
    let use_dora: bool = args.get("use_dora")?;
    // The qlora builders default it to True; an explicit False wins, as with torchtune's partial.
    let quantize_base: bool = args.get("quantize_base")?;
    let rank: usize = args.get("lora_rank")?;
    if rank == 0 {
        bail!("lora_rank must be at least 1");
    }
    let kind = match args.get_opt::<String>("adapter")? {
        Some(kind) if use_dora && kind != "dora" => bail!(
            "use_dora=True asks for DoRA but adapter={kind:?} asks for another adapter; keep one \
             of the two"
        ),
        Some(kind) => kind,
        None if use_dora => "dora".to_string(),
        None => "lora".to_string(),
    };
    // `qlora`/`qdora` are what `lora`/`dora` become on an NF4 base; named alone they would
    // quantise only the adapted projections and leave the rest full precision.
    if let Some(plain) = kind.strip_prefix('q') {
        let quantized_variant =
            tune_core::registry::lookup(plain).is_ok_and(|c| c.kind == ComponentKind::Adapter);
        if quantized_variant {
            bail!(
                "adapter={kind:?} is what {plain} becomes with quantize_base=True; for QLoRA set \
                 model.quantize_base=True and adapter={plain:?} (or leave adapter unset), which \
                 quantises every attention and MLP projection"
            );
        }
    }
    let dropout: f64 = args.get("lora_dropout")?;
    // torch's Dropout takes [0, 1]; at 1 every input to the adapter is dropped and it learns
    // nothing.
    if !(0.0..1.0).contains(&dropout) {
        bail!(
            "lora_dropout is {dropout}: it is the probability of dropping each input to the \
             adapter, at least 0 and below 1 (torchtune's configs use 0.0 or 0.05)"
        );
    }
    Ok(LoraSettings {
        lora_attn_modules: modules,
        apply_lora_to_mlp: args.get("apply_lora_to_mlp")?,
        apply_lora_to_output: args.get("apply_lora_to_output")?,
        adapter: AdapterSpec {
            kind,
            rank,
            alpha: args.get("lora_alpha")?,
            dropout,
        },
        quantize_base,
    })
}

fn spec(builder: &str, transformer: TransformerConfig, lora: Option<LoraSettings>) -> ModelSpec {
    ModelSpec {
        builder: builder.to_string(),
        transformer,
        lora,
    }
}

const DIM_ARGS: &[ArgSpec] = &[
    ArgSpec::required("vocab_size", ArgType::Int),
    ArgSpec::required("num_layers", ArgType::Int),
    ArgSpec::required("num_heads", ArgType::Int),
    ArgSpec::nullable("num_kv_heads", ArgType::Int),
    ArgSpec::required("embed_dim", ArgType::Int),
    ArgSpec::required("max_seq_len", ArgType::Int),
    ArgSpec::nullable("intermediate_dim", ArgType::Int),
    ArgSpec::optional("attn_dropout", ArgType::Float, "0.0"),
    ArgSpec::optional("norm_eps", ArgType::Float, "1e-5"),
    ArgSpec::optional("rope_base", ArgType::Float, "10000.0"),
];

/// The adapter arguments; `$rank` and `$alpha` are the `lora_rank` / `lora_alpha` specs (the
/// sized builders default them, `lora_llama2` requires them, as torchtune's).
macro_rules! lora_args {
    ($rank:expr, $alpha:expr, $quantize_base:literal $(, $extra:expr)*) => {
        &[
            ArgSpec::required("lora_attn_modules", ArgType::StrList),
            ArgSpec::optional("apply_lora_to_mlp", ArgType::Bool, "false"),
            ArgSpec::optional("apply_lora_to_output", ArgType::Bool, "false"),
            $rank,
            $alpha,
            ArgSpec::optional("lora_dropout", ArgType::Float, "0.0"),
            ArgSpec::optional("use_dora", ArgType::Bool, "false"),
            ArgSpec::optional("quantize_base", ArgType::Bool, $quantize_base),
            // tune-rs: pick any registered adapter (e.g. a plugin's `ia3`) for the selected layers.
            ArgSpec::nullable("adapter", ArgType::Str),
            $($extra,)*
        ]
    };
}

macro_rules! fixed_builder {
    ($path:literal, $alias:literal, $f:ident) => {
        tune_core::inventory::submit! {
            Component {
                path: $path,
                aliases: &[$alias],
                kind: ComponentKind::Model,
                args: &[],
                extra_args: false,
                about: "Llama2 base model (all weights frozen)",
                origin: "built-in",
                build: |_| Ok(Box::new(spec($alias, $f(), None))),
            }
        }
    };
}

macro_rules! lora_builder {
    ($path:literal, $alias:literal, $f:ident, $rank:literal, $alpha:literal, $quant:literal) => {
        tune_core::inventory::submit! {
            Component {
                path: $path,
                aliases: &[$alias],
                kind: ComponentKind::Model,
                args: lora_args!(
                    ArgSpec::optional("lora_rank", ArgType::Int, $rank),
                    ArgSpec::optional("lora_alpha", ArgType::Float, $alpha),
                    $quant
                ),
                extra_args: false,
                about: "Llama2 with adapters on the chosen projections",
                origin: "built-in",
                build: |args| Ok(Box::new(spec($alias, $f(), Some(lora_settings(args)?)))),
            }
        }
    };
}

fixed_builder!("torchtune.models.llama2.llama2_7b", "llama2_7b", llama2_7b);
fixed_builder!(
    "torchtune.models.llama2.llama2_13b",
    "llama2_13b",
    llama2_13b
);
fixed_builder!(
    "torchtune.models.llama2.llama2_70b",
    "llama2_70b",
    llama2_70b
);
lora_builder!(
    "torchtune.models.llama2.lora_llama2_7b",
    "lora_llama2_7b",
    llama2_7b,
    "8",
    "16",
    "false"
);
lora_builder!(
    "torchtune.models.llama2.lora_llama2_13b",
    "lora_llama2_13b",
    llama2_13b,
    "8",
    "16",
    "false"
);
lora_builder!(
    "torchtune.models.llama2.lora_llama2_70b",
    "lora_llama2_70b",
    llama2_70b,
    "8",
    "16",
    "false"
);
lora_builder!(
    "torchtune.models.llama2.qlora_llama2_7b",
    "qlora_llama2_7b",
    llama2_7b,
    "8",
    "16",
    "true"
);
lora_builder!(
    "torchtune.models.llama2.qlora_llama2_13b",
    "qlora_llama2_13b",
    llama2_13b,
    "8",
    "16",
    "true"
);
lora_builder!(
    "torchtune.models.llama2.qlora_llama2_70b",
    "qlora_llama2_70b",
    llama2_70b,
    "8",
    "16",
    "true"
);

tune_core::inventory::submit! {
    Component {
        path: "torchtune.models.llama2.llama2",
        aliases: &["llama2"],
        kind: ComponentKind::Model,
        args: DIM_ARGS,
        extra_args: false,
        about: "Llama2 with explicit dimensions",
        origin: "built-in",
        build: |args| {
            let mut dims = dims_from_args(args)?;
            dims.rope_base = args.get("rope_base")?;
            Ok(Box::new(spec("llama2", dims, None)))
        },
    }
}

tune_core::inventory::submit! {
    Component {
        path: "torchtune.models.llama2.lora_llama2",
        aliases: &["lora_llama2"],
        kind: ComponentKind::Model,
        args: lora_args!(
            ArgSpec::required("lora_rank", ArgType::Int),
            ArgSpec::required("lora_alpha", ArgType::Float),
            "false",
            ArgSpec::required("vocab_size", ArgType::Int),
            ArgSpec::required("num_layers", ArgType::Int),
            ArgSpec::required("num_heads", ArgType::Int),
            ArgSpec::nullable("num_kv_heads", ArgType::Int),
            ArgSpec::required("embed_dim", ArgType::Int),
            ArgSpec::required("max_seq_len", ArgType::Int),
            ArgSpec::nullable("intermediate_dim", ArgType::Int),
            ArgSpec::optional("attn_dropout", ArgType::Float, "0.0"),
            ArgSpec::optional("norm_eps", ArgType::Float, "1e-5")
        ),
        extra_args: false,
        about: "Llama2 with explicit dimensions and adapters",
        origin: "built-in",
        build: |args| Ok(Box::new(spec("lora_llama2", dims_from_args(args)?, Some(lora_settings(args)?)))),
    }
}

/// Builds a model spec from a config node (`_component_` plus arguments).
pub fn model_spec_from_node(node: &serde_yaml::Value) -> Result<ModelSpec> {
    let name = node
        .get("_component_")
        .and_then(|v| v.as_str())
        .ok_or_else(|| anyhow::anyhow!("the `model` node needs a `_component_`"))?;
    tune_core::registry::build_as(name, ComponentKind::Model, node)
}
