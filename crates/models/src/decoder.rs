//! The Llama2 TransformerDecoder, structured and named as torchtune's.
//!
//! `h = x + attn(sa_norm(x)); out = h + mlp(mlp_norm(h))`; RMSNorm in fp32; interleaved RoPE on q
//! and k; grouped-query attention by repeating kv heads; causal softmax attention; fp32 logits.
//! Every projection is a `Box<dyn Adapter>`, so LoRA/QLoRA/DoRA/plugins never change this file.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use tune_core::autograd::{
    attention, rms_norm, rope_attention, rope_interleaved, AttentionMask, MaskBlock,
};
use tune_core::{Adapter, AdapterFactory, FrozenLinear};

use crate::spec::{ModelSpec, TransformerConfig};

pub struct Attention {
    pub q_proj: Box<dyn Adapter>,
    pub k_proj: Box<dyn Adapter>,
    pub v_proj: Box<dyn Adapter>,
    pub output_proj: Box<dyn Adapter>,
}

pub struct FeedForward {
    /// gate
    pub w1: Box<dyn Adapter>,
    /// down
    pub w2: Box<dyn Adapter>,
    /// up
    pub w3: Box<dyn Adapter>,
}

pub struct DecoderLayer {
    pub sa_norm: Tensor,
    pub attn: Attention,
    pub mlp_norm: Tensor,
    pub mlp: FeedForward,
}

/// Options for one forward pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct Forward {
    /// Training mode (enables adapter dropout).
    pub train: bool,
    /// Run the base model only (torchtune's `disable_adapter`).
    pub adapters_disabled: bool,
    /// Keep every layer's output (for parity checks).
    pub capture_hidden: bool,
}

pub struct TransformerDecoder {
    pub config: TransformerConfig,
    pub tok_embeddings: Tensor,
    pub layers: Vec<Arc<DecoderLayer>>,
    /// Recompute each layer's activations in the backward instead of keeping them (torchtune's
    /// `enable_activation_checkpointing`). Training only; adapter gradients then arrive through
    /// `tune_core::autograd::param_grad`.
    pub activation_checkpointing: bool,
    pub norm: Tensor,
    /// Shared so that a loss can recompute it in the backward (see `recipes::loss`).
    pub output: Arc<dyn Adapter>,
    rope_cos: Tensor,
    rope_sin: Tensor,
}

/// Forward output: fp32 logits [batch, seq, vocab] and optionally named hidden states.
pub struct ForwardOutput {
    pub logits: Tensor,
    pub hidden: Vec<(String, Tensor)>,
}

/// How an adapter file names a copy of the adapted layer's base weight (PEFT's `base_layer`).
pub const BASE_COPY_SUFFIX: &str = ".base_layer.weight";

impl TransformerDecoder {
    /// Builds the model from base weights in torchtune names (already validated and converted to
    /// the run's dtype/device). Adapted projections get their adapter from the registry; `seed`
    /// makes adapter initialisation reproducible.
    pub fn from_weights(
        spec: &ModelSpec,
        weights: HashMap<String, Tensor>,
        seed: u64,
    ) -> Result<Self> {
        Self::from_weights_and_sources(spec, weights, HashMap::new(), seed)
    }

    /// [`Self::from_weights`], where `sources` holds, for weights stored in NF4 (QLoRA), the
    /// checkpoint's own tensor (its dtype, on the CPU): quantisation starts from it, in its
    /// arithmetic, as torchao's does (an fp16 checkpoint is quantised in fp16, not rounded to
    /// bf16 first). The matching entry of `weights` may then be a stand-in of the right shape,
    /// dtype and device: it is never read.
    pub fn from_weights_and_sources(
        spec: &ModelSpec,
        mut weights: HashMap<String, Tensor>,
        sources: HashMap<String, Tensor>,
        seed: u64,
    ) -> Result<Self> {
        let config = spec.transformer.clone();
        let mut take = |name: &str| {
            weights
                .remove(name)
                .ok_or_else(|| anyhow!("missing weight `{name}`"))
        };
        let tok_embeddings = take("tok_embeddings.weight")?;
        let device = tok_embeddings.device().clone();

        // The linear layers come in `linear_slots` order, which is the order built below.
        let mut linears = LinearBuilder::new(spec, sources, seed)?;
        let slots = spec.linear_slots();
        let mut slots = slots.iter();
        let mut linear = |take: &mut dyn FnMut(&str) -> Result<Tensor>| {
            let slot = slots
                .next()
                .ok_or_else(|| anyhow!("model has fewer linear slots than expected"))?;
            let weight = take(&format!("{}.weight", slot.prefix))?;
            linears.build(&slot.prefix, slot.adapted, weight)
        };

        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let sa_norm = take(&format!("layers.{i}.sa_norm.scale"))?;
            let attn = Attention {
                q_proj: linear(&mut take)?,
                k_proj: linear(&mut take)?,
                v_proj: linear(&mut take)?,
                output_proj: linear(&mut take)?,
            };
            let mlp_norm = take(&format!("layers.{i}.mlp_norm.scale"))?;
            let mlp = FeedForward {
                w1: linear(&mut take)?,
                w2: linear(&mut take)?,
                w3: linear(&mut take)?,
            };
            layers.push(Arc::new(DecoderLayer {
                sa_norm,
                attn,
                mlp_norm,
                mlp,
            }));
        }
        let norm = take("norm.scale")?;
        let output_weight = if config.tie_word_embeddings {
            weights
                .remove("output.weight")
                .unwrap_or_else(|| tok_embeddings.clone())
        } else {
            take("output.weight")?
        };
        let output: Arc<dyn Adapter> = Arc::from(linear(&mut |_: &str| Ok(output_weight.clone()))?);
        // fp32 whatever the model's dtype: torchtune rotates in fp32 (see `rope_interleaved`).
        let (rope_cos, rope_sin) = rope_cache(
            config.head_dim(),
            config.max_seq_len,
            config.rope_base,
            &device,
            DType::F32,
        )?;
        Ok(TransformerDecoder {
            config,
            tok_embeddings,
            layers,
            activation_checkpointing: false,
            norm,
            output,
            rope_cos,
            rope_sin,
        })
    }

    pub fn device(&self) -> &Device {
        self.tok_embeddings.device()
    }

    pub fn dtype(&self) -> DType {
        self.tok_embeddings.dtype()
    }

    /// Every linear layer with its torchtune prefix, in `named_modules` order.
    pub fn linears(&self) -> Vec<(String, &dyn Adapter)> {
        let mut out: Vec<(String, &dyn Adapter)> = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            for (n, a) in [
                ("attn.q_proj", &l.attn.q_proj),
                ("attn.k_proj", &l.attn.k_proj),
                ("attn.v_proj", &l.attn.v_proj),
                ("attn.output_proj", &l.attn.output_proj),
                ("mlp.w1", &l.mlp.w1),
                ("mlp.w2", &l.mlp.w2),
                ("mlp.w3", &l.mlp.w3),
            ] {
                out.push((format!("layers.{i}.{n}"), a.as_ref()));
            }
        }
        out.push(("output".to_string(), self.output.as_ref()));
        out
    }

    /// Trainable tensors with full torchtune names (`layers.0.attn.q_proj.lora_a.weight`).
    pub fn adapter_params(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (prefix, layer) in self.linears() {
            for (suffix, var) in layer.trainable() {
                out.push((format!("{prefix}.{suffix}"), var));
            }
        }
        out
    }

    /// Sets adapter tensors from a map of torchtune names. Every adapter tensor must be present
    /// and shaped right; names that are not adapter tensors of this model are an error.
    /// PEFT's copies of an adapted layer's base weight (`{layer}.base_layer.weight`, saved when
    /// lm_head is a target) are checked against the model's own weight, as they would replace it.
    pub fn load_adapter(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let (base_copies, tensors): (HashMap<&String, &Tensor>, HashMap<String, Tensor>) = {
            let mut copies = HashMap::new();
            let mut rest = HashMap::new();
            for (name, t) in tensors {
                if name.ends_with(BASE_COPY_SUFFIX) {
                    copies.insert(name, t);
                } else {
                    rest.insert(name.clone(), t.clone());
                }
            }
            (copies, rest)
        };
        self.check_base_copies(&base_copies)?;
        let tensors = &tensors;
        let params = self.adapter_params();
        let known: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
        let unexpected: Vec<&String> = tensors
            .keys()
            .filter(|k| !known.contains(&k.as_str()))
            .collect();
        let missing: Vec<&str> = known
            .iter()
            .copied()
            .filter(|k| !tensors.contains_key(*k))
            .collect();
        if !unexpected.is_empty() || !missing.is_empty() {
            anyhow::bail!(
                "adapter checkpoint does not fit the model: missing {missing:?}, unexpected {unexpected:?} \
                 (check lora_attn_modules, apply_lora_to_mlp/output and lora_rank against the run that saved it)"
            );
        }
        for (name, var) in params {
            let t = &tensors[&name];
            if t.dims() != var.dims() {
                anyhow::bail!(
                    "adapter tensor `{name}` has shape {:?}, the model's has {:?}: the adapter was \
                     made with another lora_rank (or model size); use the settings of the run \
                     that saved it",
                    t.dims(),
                    var.dims()
                );
            }
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        for (_, layer) in self.linears() {
            layer.on_weights_loaded()?;
        }
        Ok(())
    }

    fn check_base_copies(&self, copies: &HashMap<&String, &Tensor>) -> Result<()> {
        let linears = self.linears();
        for (name, copy) in copies {
            let prefix = name.strip_suffix(BASE_COPY_SUFFIX).unwrap_or(name);
            let Some((_, layer)) = linears.iter().find(|(n, _)| n == prefix) else {
                anyhow::bail!(
                    "adapter tensor `{name}` replaces the weight of `{prefix}`, which is not a \
                     linear layer tune-rs adapts"
                );
            };
            let ours = layer.base_weight()?;
            // Each in the coarser of the two dtypes: PEFT saves the copy in its run's dtype.
            if !tune_core::compare::same_values(copy, &ours)? {
                anyhow::bail!(
                    "the adapter carries its own copy of `{prefix}`'s base weight (PEFT saves one \
                     when lm_head is a target), and it differs from the base model's: the adapter \
                     was made on another base model. Use that base model, or save the adapter \
                     with save_embedding_layers=False if the copy should not apply"
                );
            }
        }
        Ok(())
    }

    pub fn forward(&self, tokens: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self
            .forward_with(
                tokens,
                Forward {
                    train,
                    ..Default::default()
                },
            )?
            .logits)
    }

    /// `tokens` [batch, seq] (u32 or i64) -> fp32 logits [batch, seq, vocab].
    pub fn forward_with(&self, tokens: &Tensor, opts: Forward) -> Result<ForwardOutput> {
        self.forward_packed(tokens, None, opts)
    }

    /// [`Self::forward_with`] for rows that each hold several samples (`packed`), or one (`None`).
    pub fn forward_packed(
        &self,
        tokens: &Tensor,
        packed: Option<&PackedRows>,
        opts: Forward,
    ) -> Result<ForwardOutput> {
        let (normed, hidden) = self.final_hidden_packed(tokens, packed, opts)?;
        let logits = proj(self.output.as_ref(), &normed, opts)?.to_dtype(DType::F32)?;
        Ok(ForwardOutput { logits, hidden })
    }

    /// Everything but the output projection: the final RMSNorm's output [batch, seq, dim] (plus
    /// the named hidden states when `opts.capture_hidden`).
    pub fn final_hidden(
        &self,
        tokens: &Tensor,
        opts: Forward,
    ) -> Result<(Tensor, Vec<(String, Tensor)>)> {
        self.final_hidden_packed(tokens, None, opts)
    }

    /// [`Self::final_hidden`] for rows that each hold several samples (`packed`), or one (`None`).
    pub fn final_hidden_packed(
        &self,
        tokens: &Tensor,
        packed: Option<&PackedRows>,
        opts: Forward,
    ) -> Result<(Tensor, Vec<(String, Tensor)>)> {
        let (batch, seq) = tokens.dims2()?;
        if seq > self.config.max_seq_len {
            anyhow::bail!(
                "sequence length {seq} exceeds the model's max_seq_len {}",
                self.config.max_seq_len
            );
        }
        let ids = tokens.flatten_all()?.to_dtype(DType::U32)?;
        let mut h = self.tok_embeddings.index_select(&ids, 0)?.reshape((
            batch,
            seq,
            self.config.embed_dim,
        ))?;
        let mut hidden = Vec::new();
        if opts.capture_hidden {
            hidden.push(("tok_embeddings".to_string(), h.clone()));
        }
        let (cos, sin, mask) = match packed {
            None => (
                self.rope_cos.narrow(0, 0, seq)?,
                self.rope_sin.narrow(0, 0, seq)?,
                AttentionMask::Dense(causal_mask(seq, h.device(), h.dtype())?),
            ),
            Some(rows) => self.packed_rope_and_mask(rows, batch, seq)?,
        };
        let checkpoint = self.activation_checkpointing && opts.train && !opts.capture_hidden;
        if checkpoint {
            // A recomputed layer must repeat its forward exactly; a random adapter (dropout)
            // would draw another mask, and its gradients would be silently wrong.
            if let Some((name, _)) = self
                .linears()
                .into_iter()
                .find(|(name, a)| name != "output" && a.is_random_in_training())
            {
                return Err(anyhow!(
                    "activation checkpointing cannot recompute {name}: its adapter is random in \
                     training (dropout). Set its dropout to 0 or turn activation checkpointing off"
                ));
            }
        }
        for (i, layer) in self.layers.iter().enumerate() {
            h = if checkpoint {
                checkpointed_layer(&self.config, layer, &h, &cos, &sin, &mask, opts)?
            } else {
                layer_forward(&self.config, layer, &h, &cos, &sin, &mask, opts)?
            };
            if opts.capture_hidden {
                hidden.push((format!("layers.{i}"), h.clone()));
            }
        }
        let normed = rms_norm(&h, &self.norm, self.config.norm_eps)?;
        if opts.capture_hidden {
            hidden.push(("norm".to_string(), normed.clone()));
        }
        Ok((normed, hidden))
    }

    /// RoPE tables gathered at each token's position in its sample ([batch, seq, head_dim / 2])
    /// and the rows' block-causal mask.
    fn packed_rope_and_mask(
        &self,
        rows: &PackedRows,
        batch: usize,
        seq: usize,
    ) -> Result<(Tensor, Tensor, AttentionMask)> {
        if rows.input_pos.dims2()? != (batch, seq) {
            anyhow::bail!(
                "packed layout is for {:?} tokens but the batch is {:?}",
                rows.input_pos.dims(),
                (batch, seq)
            );
        }
        if rows.max_position >= self.config.max_seq_len {
            anyhow::bail!(
                "packed position {} exceeds the model's max_seq_len {}; lower tokenizer.max_seq_len",
                rows.max_position,
                self.config.max_seq_len
            );
        }
        let positions = rows.input_pos.flatten_all()?;
        let half = self.config.head_dim() / 2;
        let gather = |table: &Tensor| -> Result<Tensor> {
            Ok(table
                .index_select(&positions, 0)?
                .reshape((batch, seq, half))?)
        };
        if rows.dtype != self.dtype() {
            anyhow::bail!(
                "packed layout built for {:?} but the model runs in {:?}",
                rows.dtype,
                self.dtype()
            );
        }
        Ok((
            gather(&self.rope_cos)?,
            gather(&self.rope_sin)?,
            rows.mask.clone(),
        ))
    }
}

/// Rows that each hold several samples laid end to end (sample packing): every token's RoPE
/// position inside its sample, and an attention mask that keeps each sample to itself.
#[derive(Debug, Clone)]
pub struct PackedRows {
    /// [batch, seq] u32.
    pub input_pos: Tensor,
    /// Block-causal: a token attends to the earlier tokens of its own sample. Either per-row
    /// [batch, 1, seq, seq] additive masks, or — on the CPU, when that skips at least half the
    /// scores — blocks of whole samples attended to separately ([`AttentionMask::Blocks`]).
    pub mask: AttentionMask,
    dtype: DType,
    max_position: usize,
}

/// Samples are grouped into attention blocks of up to this many tokens (a longer sample is a
/// block of its own): fewer, larger blocks cost fewer ops, smaller ones fewer wasted scores.
/// On stories260K's one-line samples 32 beat 64 and 128 (see BENCHMARKS.md).
const BLOCK_TOKENS: usize = 32;

impl PackedRows {
    /// From each row's positions and sample lengths (which sum to the row's length), for a
    /// model running in `dtype`.
    pub fn new(
        input_pos: &[Vec<u32>],
        seq_lens: &[Vec<usize>],
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let batch = input_pos.len();
        let seq = input_pos.first().map_or(0, Vec::len);
        if seq_lens.len() != batch {
            anyhow::bail!(
                "{batch} rows of positions but {} of sample lengths",
                seq_lens.len()
            );
        }
        // Consecutive samples grouped into blocks: (start, the block's sample lengths).
        let mut rows: Vec<Vec<(usize, Vec<usize>)>> = Vec::with_capacity(batch);
        for (row, lens) in seq_lens.iter().enumerate() {
            if input_pos[row].len() != seq || lens.iter().sum::<usize>() != seq {
                anyhow::bail!("row {row}: sample lengths {lens:?} do not cover its {seq} tokens");
            }
            let mut blocks: Vec<(usize, Vec<usize>)> = Vec::new();
            let mut start = 0;
            for &len in lens.iter().filter(|&&len| len > 0) {
                match blocks.last_mut() {
                    Some((_, group)) if group.iter().sum::<usize>() + len <= BLOCK_TOKENS => {
                        group.push(len)
                    }
                    _ => blocks.push((start, vec![len])),
                }
                start += len;
            }
            rows.push(blocks);
        }
        let block_scores: usize = rows
            .iter()
            .flatten()
            .map(|(_, group)| group.iter().sum::<usize>().pow(2))
            .sum();
        // Blocks only on the CPU, where the scores they skip dominate. On a GPU the dense mask
        // is one kernel per op instead of one per block (not measured there: no GPU yet).
        let mask = if device.is_cpu() && seq > 0 && 2 * block_scores <= batch * seq * seq {
            let blocks = rows
                .iter()
                .map(|blocks| {
                    blocks
                        .iter()
                        .map(|(start, group)| {
                            Ok(MaskBlock {
                                start: *start,
                                len: group.iter().sum(),
                                mask: block_causal_mask(&[group.as_slice()], device, dtype)?
                                    .squeeze(0)?
                                    .squeeze(0)?,
                            })
                        })
                        .collect::<Result<Vec<_>>>()
                })
                .collect::<Result<Vec<_>>>()?;
            AttentionMask::Blocks(std::sync::Arc::new(blocks))
        } else {
            let lens: Vec<&[usize]> = seq_lens.iter().map(Vec::as_slice).collect();
            AttentionMask::Dense(block_causal_mask(&lens, device, dtype)?)
        };
        let max_position = input_pos.iter().flatten().copied().max().unwrap_or(0) as usize;
        Ok(PackedRows {
            input_pos: Tensor::from_vec(input_pos.concat(), (batch, seq), device)?,
            mask,
            dtype,
            max_position,
        })
    }
}

/// Additive block-causal masks [rows, 1, seq, seq] for rows of samples of the given lengths
/// (each row's lengths summing to `seq`): 0 where a token may attend, -inf elsewhere.
fn block_causal_mask(rows: &[&[usize]], device: &Device, dtype: DType) -> Result<Tensor> {
    let seq: usize = rows.first().map_or(0, |lens| lens.iter().sum());
    let mut mask = vec![f32::NEG_INFINITY; rows.len() * seq * seq];
    for (row, lens) in rows.iter().enumerate() {
        let mut start = 0;
        for &len in lens.iter() {
            for i in start..start + len {
                let line = (row * seq + i) * seq;
                mask[line + start..=line + i].fill(0.0);
            }
            start += len;
        }
    }
    Ok(Tensor::from_vec(mask, (rows.len(), 1, seq, seq), device)?.to_dtype(dtype)?)
}

fn layer_forward(
    c: &TransformerConfig,
    layer: &DecoderLayer,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: &AttentionMask,
    opts: Forward,
) -> Result<Tensor> {
    let xn = rms_norm(x, &layer.sa_norm, c.norm_eps)?;
    let (q, k, v) = projections(layer, &xn, opts)?;
    // RoPE, grouped heads and attention in one node that keeps only q, k and v.
    let attn = rope_attention(
        &q,
        &k,
        &v,
        c.num_heads,
        c.num_kv_heads,
        (cos, sin),
        mask,
        1.0 / (c.head_dim() as f64).sqrt(),
    )?;
    let h = (x + proj(layer.attn.output_proj.as_ref(), &attn, opts)?)?;
    mlp_residual(c, layer, &h, opts)
}

/// The q, k and v projections of `xn`, each [batch, seq, heads * head_dim].
fn projections(
    layer: &DecoderLayer,
    xn: &Tensor,
    opts: Forward,
) -> Result<(Tensor, Tensor, Tensor)> {
    let a = &layer.attn;
    Ok((
        proj(a.q_proj.as_ref(), xn, opts)?,
        proj(a.k_proj.as_ref(), xn, opts)?,
        proj(a.v_proj.as_ref(), xn, opts)?,
    ))
}

/// q and k (RoPE applied) and v of one attention block, each [batch, heads, seq, head_dim].
fn qkv(
    c: &TransformerConfig,
    layer: &DecoderLayer,
    xn: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    opts: Forward,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, s, _) = xn.dims3()?;
    let heads = |t: Tensor, n: usize| -> Result<Tensor> {
        Ok(t.reshape((b, s, n, c.head_dim()))?.transpose(1, 2)?)
    };
    let (q, k, v) = projections(layer, xn, opts)?;
    let q = rope_interleaved(&heads(q, c.num_heads)?, cos, sin)?;
    let k = rope_interleaved(&heads(k, c.num_kv_heads)?, cos, sin)?;
    Ok((q, k, heads(v, c.num_kv_heads)?))
}

/// The second half of a layer: `h + w2(silu(w1 n) * w3 n)` with `n = mlp_norm(h)`.
fn mlp_residual(
    c: &TransformerConfig,
    layer: &DecoderLayer,
    h: &Tensor,
    opts: Forward,
) -> Result<Tensor> {
    let hn = rms_norm(h, &layer.mlp_norm, c.norm_eps)?;
    let m = &layer.mlp;
    let gate = proj(m.w1.as_ref(), &hn, opts)?;
    let up = proj(m.w3.as_ref(), &hn, opts)?;
    let out = proj(
        m.w2.as_ref(),
        &tune_core::autograd::swiglu(&gate, &up)?,
        opts,
    )?;
    Ok((h + out)?)
}

/// A layer whose activations are recomputed in the backward (activation checkpointing): the
/// forward runs and drops its graph, keeping only the layer's input and output; the backward
/// reruns the layer with a graph, takes the input gradient, and hands the adapter gradients to
/// `tune_core::autograd`'s side store (a custom op can only return its input's gradient).
fn checkpointed_layer(
    c: &TransformerConfig,
    layer: &Arc<DecoderLayer>,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: &AttentionMask,
    opts: Forward,
) -> Result<Tensor> {
    let saved = x.detach();
    // The graph built here dies with this temporary; only the detached output is kept.
    let y = layer_forward(c, layer, &saved, cos, sin, mask, opts)?.detach();
    // The first layer's input (the embedding lookup) is not tracked: make it a variable so the
    // op is recorded and the backward reaches this layer's adapters.
    let input = if x.track_op() {
        x.clone()
    } else {
        Var::from_tensor(x)?.into_inner()
    };
    let (c, layer, cos, sin, mask) = (
        c.clone(),
        layer.clone(),
        cos.clone(),
        sin.clone(),
        mask.clone(),
    );
    let to_candle = |e: anyhow::Error| candle_core::Error::Msg(format!("{e:#}"));
    Ok(tune_core::autograd::with_backward(
        "checkpointed_layer",
        &input,
        y,
        move |grad| {
            let xv = Var::from_tensor(&saved)?;
            let y = layer_forward(&c, &layer, xv.as_tensor(), &cos, &sin, &mask, opts)
                .map_err(to_candle)?;
            let store = (y * grad)?.sum_all()?.backward()?;
            for adapter in layer.projections() {
                for (_, var) in adapter.trainable() {
                    if let Some(g) = store.get(var.as_tensor()) {
                        tune_core::autograd::accumulate_side_grad(&var, g)?;
                    }
                }
            }
            store.get(xv.as_tensor()).cloned().ok_or_else(|| {
                candle_core::Error::Msg("checkpointed layer: no input gradient".into())
            })
        },
    )?)
}

impl DecoderLayer {
    /// The seven projections, in torchtune's order.
    pub fn projections(&self) -> [&dyn Adapter; 7] {
        [
            self.attn.q_proj.as_ref(),
            self.attn.k_proj.as_ref(),
            self.attn.v_proj.as_ref(),
            self.attn.output_proj.as_ref(),
            self.mlp.w1.as_ref(),
            self.mlp.w2.as_ref(),
            self.mlp.w3.as_ref(),
        ]
    }
}

fn proj(layer: &dyn Adapter, x: &Tensor, opts: Forward) -> candle_core::Result<Tensor> {
    if opts.adapters_disabled {
        layer.forward_base(x)
    } else {
        layer.forward(x, opts.train)
    }
}

/// Additive causal mask [seq, seq]: 0 on and below the diagonal, -inf above.
pub fn causal_mask(seq: usize, device: &Device, dtype: DType) -> candle_core::Result<Tensor> {
    let values: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (seq, seq), device)?.to_dtype(dtype)
}

/// torchtune's RoPE tables: theta_i = base^(-2i/d), angle = position * theta_i, in fp32.
pub fn rope_cache(
    head_dim: usize,
    max_seq_len: usize,
    base: f64,
    device: &Device,
    dtype: DType,
) -> candle_core::Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let theta: Vec<f32> = (0..half)
        .map(|i| 1.0 / (base as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let theta = Tensor::from_vec(theta, (1, half), device)?;
    let positions = Tensor::arange(0u32, max_seq_len as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((max_seq_len, 1))?;
    let angles = positions.broadcast_mul(&theta)?;
    Ok((
        angles.cos()?.to_dtype(dtype)?,
        angles.sin()?.to_dtype(dtype)?,
    ))
}

/// Keys and values of every token a [`TransformerDecoder`] has seen, per layer, for incremental
/// decoding ([`TransformerDecoder::forward_cached`]). Each layer holds `[batch, kv_heads, len,
/// head_dim]` tensors after RoPE and before the kv heads are repeated.
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
}

impl KvCache {
    /// An empty cache (the next token is at position 0).
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens cached so far: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rows in the cache (0 when empty).
    pub fn batch(&self) -> usize {
        self.layers
            .first()
            .map(|(k, _)| k.dim(0).unwrap_or(0))
            .unwrap_or(0)
    }

    /// This single-row cache repeated for `rows` rows (one prefix continued in several ways).
    pub fn repeat_batch(&self, rows: usize) -> Result<KvCache> {
        if self.is_empty() {
            return Ok(self.clone());
        }
        if self.batch() != 1 {
            anyhow::bail!(
                "repeat_batch needs a cache of one row, this one has {}",
                self.batch()
            );
        }
        let grow = |t: &Tensor| -> candle_core::Result<Tensor> {
            let (_, h, s, d) = t.dims4()?;
            t.broadcast_as((rows, h, s, d))?.contiguous()
        };
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| Ok((grow(k)?, grow(v)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            len: self.len,
        })
    }
}

impl TransformerDecoder {
    /// Runs `tokens` [batch, seq] at positions `cache.len()..cache.len() + seq`, attending to the
    /// cached tokens and causally to each other, and appends their keys/values to `cache`.
    /// Returns fp32 logits [batch, seq, vocab]: the same numbers [`Self::forward_with`] gives for
    /// these positions of the whole sequence (up to float rounding). Adapters are applied in
    /// inference mode (no dropout).
    pub fn forward_cached(&self, tokens: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (batch, seq) = tokens.dims2()?;
        let start = cache.len();
        if start + seq > self.config.max_seq_len {
            anyhow::bail!(
                "positions {start}..{} exceed the model's max_seq_len {}; shorten the prompt or generate fewer tokens",
                start + seq,
                self.config.max_seq_len
            );
        }
        if !cache.is_empty() && cache.batch() != batch {
            anyhow::bail!(
                "the cache holds {} rows but {batch} were given",
                cache.batch()
            );
        }
        let ids = tokens.flatten_all()?.to_dtype(DType::U32)?;
        let mut h = self.tok_embeddings.index_select(&ids, 0)?.reshape((
            batch,
            seq,
            self.config.embed_dim,
        ))?;
        let cos = self.rope_cos.narrow(0, start, seq)?;
        let sin = self.rope_sin.narrow(0, start, seq)?;
        // One mask row per new token, stacked for the query heads that share a kv head (see below).
        let heads_per_kv = self.config.num_heads / self.config.num_kv_heads;
        let mask = match seq {
            1 => None,
            _ => Some(
                offset_causal_mask(seq, start, h.device(), h.dtype())?.repeat((heads_per_kv, 1))?,
            ),
        };
        let mut new_layers = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let past = cache.layers.get(i);
            let (out, kv) =
                self.layer_forward_cached(layer, &h, &cos, &sin, mask.as_ref(), past)?;
            h = out;
            new_layers.push(kv);
        }
        cache.layers = new_layers;
        cache.len = start + seq;
        let normed = rms_norm(&h, &self.norm, self.config.norm_eps)?;
        Ok(proj(self.output.as_ref(), &normed, Forward::default())?.to_dtype(DType::F32)?)
    }

    fn layer_forward_cached(
        &self,
        layer: &DecoderLayer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        past: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let c = &self.config;
        let opts = Forward::default();
        let (b, s, _) = x.dims3()?;
        let hd = c.head_dim();
        let xn = rms_norm(x, &layer.sa_norm, c.norm_eps)?;
        let (q, k, v) = qkv(c, layer, &xn, cos, sin, opts)?;
        let v = v.contiguous()?;
        let (k, v) = match past {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k, v),
        };
        // Grouped-query attention without copying the cache for every query head: the `times`
        // query heads that share a kv head are stacked as rows ([b, kv, times * s, d]).
        let times = c.num_heads / c.num_kv_heads;
        let q = q.reshape((b, c.num_kv_heads, times * s, hd))?;
        let attn = attention(&q, &k, &v, mask, 1.0 / (hd as f64).sqrt())?;
        let attn = attn
            .reshape((b, c.num_heads, s, hd))?
            .transpose(1, 2)?
            .reshape((b, s, c.num_heads * hd))?;
        let h = (x + proj(layer.attn.output_proj.as_ref(), &attn, opts)?)?;
        Ok((mlp_residual(c, layer, &h, opts)?, (k, v)))
    }
}

/// Additive mask [seq, start + seq] for `seq` new tokens after `start` cached ones: new token `i`
/// sees every cached token and the new tokens up to itself.
pub fn offset_causal_mask(
    seq: usize,
    start: usize,
    device: &Device,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    let total = start + seq;
    let values: Vec<f32> = (0..seq)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > start + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(values, (seq, total), device)?.to_dtype(dtype)
}

/// Builds a model's linear layers one by one: frozen, frozen in NF4 (QLoRA's base), or with
/// the model's adapter on top.
struct LinearBuilder<'a> {
    spec: &'a ModelSpec,
    factory: Option<Arc<dyn AdapterFactory>>,
    /// For NF4 layers, the checkpoint's own tensor, quantised in its own arithmetic.
    sources: HashMap<String, Tensor>,
    /// Each layer's adapter initialisation draws from the next seed.
    seed: u64,
}

impl<'a> LinearBuilder<'a> {
    fn new(spec: &'a ModelSpec, sources: HashMap<String, Tensor>, seed: u64) -> Result<Self> {
        let factory = match &spec.lora {
            Some(l) => Some(tune_adapters::factory(&l.adapter.kind)?),
            None => None,
        };
        Ok(LinearBuilder {
            spec,
            factory,
            sources,
            seed,
        })
    }

    /// The layer `slot` (e.g. `layers.0.attn.q_proj`) over `weight`; `adapted` when the config
    /// puts the adapter on it.
    fn build(&mut self, slot: &str, adapted: bool, weight: Tensor) -> Result<Box<dyn Adapter>> {
        self.seed = self.seed.wrapping_add(1);
        let (spec, seed) = (self.spec, self.seed);
        // QLoRA: torchtune stores every attention/MLP projection in NF4 (in its own q/k layout,
        // which is what `weight` is in here), never the output layer.
        let quantize = spec.lora.as_ref().is_some_and(|l| l.quantize_base) && slot != "output";
        let source = self
            .sources
            .remove(&format!("{slot}.weight"))
            .filter(|_| quantize);
        let factory = self.factory.clone();
        let build = || -> Result<Box<dyn Adapter>> {
            match (factory, &spec.lora) {
                (Some(factory), Some(l)) if adapted => {
                    let factory = if quantize {
                        tune_adapters::quantized_factory(&l.adapter.kind)?
                    } else {
                        factory
                    };
                    factory
                        .build_for(slot, &l.adapter, weight, seed)
                        .with_context(|| {
                            format!("building the {} adapter of {slot}", l.adapter.kind)
                        })
                }
                _ if quantize => tune_adapters::frozen_nf4_linear(&weight)
                    .with_context(|| format!("quantising {slot} to NF4")),
                _ => Ok(Box::new(FrozenLinear { weight })),
            }
        };
        let given = source.is_some();
        let (built, used) = tune_adapters::nf4::quantizing_source(source, build);
        let built = built?;
        // The weight passed in was only a stand-in for the source: it must have been used.
        if given && !used {
            return Err(anyhow!(
                "{slot}: the {} adapter did not quantise its base weight to NF4; set \
                 quantize_base=False to use it",
                spec.lora
                    .as_ref()
                    .map_or("base", |l| l.adapter.kind.as_str())
            ));
        }
        Ok(built)
    }
}
