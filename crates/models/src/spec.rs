//! A model before it has weights.

use tune_core::params::{ParamCounts, ParamInfo};
use tune_core::AdapterSpec;

/// Llama2 dimensions (torchtune's `llama2(...)` arguments).
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerConfig {
    pub vocab_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub embed_dim: usize,
    pub intermediate_dim: usize,
    pub max_seq_len: usize,
    pub norm_eps: f64,
    pub rope_base: f64,
    pub attn_dropout: f64,
    /// The output projection shares the embedding matrix (HF `tie_word_embeddings`).
    pub tie_word_embeddings: bool,
}

impl TransformerConfig {
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }
}

/// The projections of an attention block, by torchtune's names.
pub const ATTN_MODULES: [&str; 4] = ["q_proj", "k_proj", "v_proj", "output_proj"];

/// Where adapters go and how they are configured.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    pub lora_attn_modules: Vec<String>,
    pub apply_lora_to_mlp: bool,
    pub apply_lora_to_output: bool,
    pub adapter: AdapterSpec,
    /// QLoRA: frozen base linears of attention and MLP are stored in NF4.
    pub quantize_base: bool,
}

/// A model to build: dimensions plus (for LoRA models) the adapter settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// The builder it came from (for messages), e.g. `lora_llama2_7b`.
    pub builder: String,
    pub transformer: TransformerConfig,
    pub lora: Option<LoraSettings>,
}

/// `(slot, in_dim, out_dim) -> [(name, shape)]`: the trainable tensors an adapter adds to the
/// linear layer `slot` (torchtune prefix, e.g. `layers.0.attn.k_proj`).
pub type AdapterShapes<'a> = dyn Fn(&str, usize, usize) -> Vec<(String, Vec<usize>)> + 'a;

/// One linear layer of the model: torchtune name prefix and its `[out, in]` shape.
#[derive(Debug, Clone)]
pub struct LinearSlot {
    pub prefix: String,
    pub out_dim: usize,
    pub in_dim: usize,
    pub adapted: bool,
}

impl ModelSpec {
    /// Every linear layer, in torchtune's `named_modules` order, marked adapted or not.
    pub fn linear_slots(&self) -> Vec<LinearSlot> {
        let c = &self.transformer;
        let hd = c.head_dim();
        let lora = self.lora.as_ref();
        let attn_adapted =
            |m: &str| lora.is_some_and(|l| l.lora_attn_modules.iter().any(|x| x == m));
        let mlp_adapted = lora.is_some_and(|l| l.apply_lora_to_mlp);
        let mut slots = Vec::new();
        for i in 0..c.num_layers {
            let dims = [
                ("q_proj", c.num_heads * hd, c.embed_dim),
                ("k_proj", c.num_kv_heads * hd, c.embed_dim),
                ("v_proj", c.num_kv_heads * hd, c.embed_dim),
                ("output_proj", c.embed_dim, c.num_heads * hd),
            ];
            for (name, out_dim, in_dim) in dims {
                slots.push(LinearSlot {
                    prefix: format!("layers.{i}.attn.{name}"),
                    out_dim,
                    in_dim,
                    adapted: attn_adapted(name),
                });
            }
            for (name, out_dim, in_dim) in [
                ("w1", c.intermediate_dim, c.embed_dim),
                ("w2", c.embed_dim, c.intermediate_dim),
                ("w3", c.intermediate_dim, c.embed_dim),
            ] {
                slots.push(LinearSlot {
                    prefix: format!("layers.{i}.mlp.{name}"),
                    out_dim,
                    in_dim,
                    adapted: mlp_adapted,
                });
            }
        }
        slots.push(LinearSlot {
            prefix: "output".into(),
            out_dim: c.vocab_size,
            in_dim: c.embed_dim,
            adapted: lora.is_some_and(|l| l.apply_lora_to_output),
        });
        slots
    }

    /// Every parameter with torchtune's name and shape. `adapter_shapes(slot, in, out)` gives the
    /// trainable tensors an adapter adds to the `[out, in]` layer `slot` (from its factory).
    pub fn params_with(&self, adapter_shapes: &AdapterShapes) -> Vec<ParamInfo> {
        let c = &self.transformer;
        let frozen = |name: String, shape: Vec<usize>| ParamInfo {
            name,
            shape,
            trainable: false,
        };
        let mut params = vec![frozen(
            "tok_embeddings.weight".into(),
            vec![c.vocab_size, c.embed_dim],
        )];
        let slots = self.linear_slots();
        let per_layer = 7;
        for i in 0..c.num_layers {
            params.push(frozen(
                format!("layers.{i}.sa_norm.scale"),
                vec![c.embed_dim],
            ));
            for slot in &slots[i * per_layer..i * per_layer + 4] {
                push_linear(&mut params, slot, adapter_shapes);
            }
            params.push(frozen(
                format!("layers.{i}.mlp_norm.scale"),
                vec![c.embed_dim],
            ));
            for slot in &slots[i * per_layer + 4..(i + 1) * per_layer] {
                push_linear(&mut params, slot, adapter_shapes);
            }
        }
        params.push(frozen("norm.scale".into(), vec![c.embed_dim]));
        push_linear(
            &mut params,
            slots.last().expect("output slot"),
            adapter_shapes,
        );
        params
    }

    /// Parameter names/shapes using the registered adapter's shapes.
    pub fn params(&self) -> anyhow::Result<Vec<ParamInfo>> {
        match &self.lora {
            None => Ok(self.params_with(&|_, _, _| Vec::new())),
            Some(lora) => {
                let factory = tune_adapters::factory(&lora.adapter.kind)?;
                let spec = lora.adapter.clone();
                Ok(self.params_with(&move |slot, in_dim, out_dim| {
                    factory.param_shapes_for(slot, &spec, in_dim, out_dim)
                }))
            }
        }
    }

    pub fn counts(&self) -> anyhow::Result<ParamCounts> {
        Ok(ParamCounts::of(&self.params()?))
    }
}

fn push_linear(params: &mut Vec<ParamInfo>, slot: &LinearSlot, adapter_shapes: &AdapterShapes) {
    params.push(ParamInfo {
        name: format!("{}.weight", slot.prefix),
        shape: vec![slot.out_dim, slot.in_dim],
        trainable: false,
    });
    if slot.adapted {
        for (suffix, shape) in adapter_shapes(&slot.prefix, slot.in_dim, slot.out_dim) {
            params.push(ParamInfo {
                name: format!("{}.{suffix}", slot.prefix),
                shape,
                trainable: true,
            });
        }
    }
}
