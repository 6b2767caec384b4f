//! Hugging Face <-> torchtune names and layouts.
//!
//! HF Llama checkpoints store q/k rows permuted for the rotate-half RoPE; torchtune (and we) rotate
//! interleaved pairs, so loading permutes q_proj/k_proj rows per head and saving undoes it.

use anyhow::{bail, Result};
use candle_core::Tensor;

/// HF suffix -> torchtune suffix inside a layer.
const LAYER_NAMES: [(&str, &str); 9] = [
    ("self_attn.q_proj", "attn.q_proj"),
    ("self_attn.k_proj", "attn.k_proj"),
    ("self_attn.v_proj", "attn.v_proj"),
    ("self_attn.o_proj", "attn.output_proj"),
    ("mlp.gate_proj", "mlp.w1"),
    ("mlp.down_proj", "mlp.w2"),
    ("mlp.up_proj", "mlp.w3"),
    ("input_layernorm", "sa_norm"),
    ("post_attention_layernorm", "mlp_norm"),
];

/// `model.layers.3.self_attn.q_proj.weight` -> `layers.3.attn.q_proj.weight`.
pub fn hf_to_tune_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("tok_embeddings.weight".into()),
        "model.norm.weight" => return Some("norm.scale".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (idx, rest) = rest.split_once('.')?;
    idx.parse::<usize>().ok()?;
    for (h, t) in LAYER_NAMES {
        if let Some(tail) = rest.strip_prefix(h) {
            let tail = if t.ends_with("norm") && tail == ".weight" {
                ".scale"
            } else {
                tail
            };
            return Some(format!("layers.{idx}.{t}{tail}"));
        }
    }
    None
}

/// `layers.3.attn.q_proj.weight` -> `model.layers.3.self_attn.q_proj.weight`.
pub fn tune_to_hf_name(tune: &str) -> Option<String> {
    match tune {
        "tok_embeddings.weight" => return Some("model.embed_tokens.weight".into()),
        "norm.scale" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = tune.strip_prefix("layers.")?;
    let (idx, rest) = rest.split_once('.')?;
    for (h, t) in LAYER_NAMES {
        if let Some(tail) = rest.strip_prefix(t) {
            let tail = if t.ends_with("norm") && tail == ".scale" {
                ".weight"
            } else {
                tail
            };
            return Some(format!("model.layers.{idx}.{h}{tail}"));
        }
    }
    None
}

/// PEFT's name for a torchtune adapter tensor:
/// `layers.0.attn.q_proj.lora_a.weight` -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
pub fn tune_to_peft_adapter_name(tune: &str) -> Option<String> {
    let (module, leaf) = split_adapter_leaf(tune)?;
    let peft_leaf = match leaf {
        "lora_a.weight" => "lora_A.weight".to_string(),
        "lora_b.weight" => "lora_B.weight".to_string(),
        "magnitude" => "lora_magnitude_vector".to_string(),
        other => other.to_string(),
    };
    let hf_module = tune_to_hf_name(&format!("{module}.weight"))?;
    let hf_module = hf_module.strip_suffix(".weight")?;
    Some(format!("base_model.model.{hf_module}.{peft_leaf}"))
}

/// Inverse of [`tune_to_peft_adapter_name`]; also accepts names without `base_model.model.`.
pub fn peft_to_tune_adapter_name(peft: &str) -> Option<String> {
    let name = peft.strip_prefix("base_model.model.").unwrap_or(peft);
    let (module, leaf) = if let Some(m) = name.strip_suffix(".lora_A.weight") {
        (m, "lora_a.weight")
    } else if let Some(m) = name.strip_suffix(".lora_B.weight") {
        (m, "lora_b.weight")
    } else if let Some(m) = name.strip_suffix(".lora_magnitude_vector") {
        (m, "magnitude")
    } else if let Some(m) = name.strip_suffix(".lora_magnitude_vector.weight") {
        (m, "magnitude")
    } else {
        let (m, leaf) = name.rsplit_once('.')?;
        (m, leaf)
    };
    let tune_module = hf_to_tune_name(&format!("{module}.weight"))?;
    Some(format!("{}.{leaf}", tune_module.strip_suffix(".weight")?))
}

fn split_adapter_leaf(name: &str) -> Option<(&str, &str)> {
    for leaf in ["lora_a.weight", "lora_b.weight", "magnitude"] {
        if let Some(module) = name.strip_suffix(leaf).and_then(|m| m.strip_suffix('.')) {
            return Some((module, leaf));
        }
    }
    let (module, leaf) = name.rsplit_once('.')?;
    Some((module, leaf))
}

/// Whether rows of this (torchtune-named) tensor are in RoPE layout: q/k weights and their
/// row-indexed adapter tensors (lora_b, DoRA magnitude).
pub fn rope_rows(tune_name: &str) -> Option<&'static str> {
    let is_rows = tune_name.ends_with(".weight") && !tune_name.ends_with("lora_a.weight")
        || tune_name.ends_with(".magnitude");
    if !is_rows {
        return None;
    }
    if tune_name.contains(".attn.q_proj.") {
        Some("q")
    } else if tune_name.contains(".attn.k_proj.") {
        Some("k")
    } else {
        None
    }
}

/// Rows of a q/k tensor from HF's half-split layout to torchtune's interleaved layout.
/// Works on `[heads*head_dim, cols]` and on 1-D `[heads*head_dim]` tensors.
pub fn permute_hf_to_tune(t: &Tensor, heads: usize) -> Result<Tensor> {
    permute_rows(t, heads, true)
}

/// Inverse of [`permute_hf_to_tune`].
pub fn permute_tune_to_hf(t: &Tensor, heads: usize) -> Result<Tensor> {
    permute_rows(t, heads, false)
}

fn permute_rows(t: &Tensor, heads: usize, to_tune: bool) -> Result<Tensor> {
    let one_d = t.rank() == 1;
    let t2 = if one_d { t.unsqueeze(1)? } else { t.clone() };
    let (rows, cols) = t2.dims2()?;
    if heads == 0 || rows % (2 * heads) != 0 {
        bail!("cannot permute {rows} rows into {heads} heads");
    }
    let half = rows / heads / 2;
    let out = if to_tune {
        t2.reshape((heads, 2, half, cols))?.transpose(1, 2)?
    } else {
        t2.reshape((heads, half, 2, cols))?.transpose(1, 2)?
    };
    let out = out.contiguous()?.reshape((rows, cols))?;
    Ok(if one_d { out.squeeze(1)? } else { out })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn names_round_trip() {
        for hf in [
            "model.embed_tokens.weight",
            "model.layers.4.self_attn.o_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.2.post_attention_layernorm.weight",
            "model.norm.weight",
            "lm_head.weight",
        ] {
            let tune = hf_to_tune_name(hf).unwrap();
            assert_eq!(tune_to_hf_name(&tune).unwrap(), hf);
        }
        assert_eq!(
            hf_to_tune_name("model.layers.1.input_layernorm.weight").unwrap(),
            "layers.1.sa_norm.scale"
        );
        assert_eq!(
            tune_to_peft_adapter_name("layers.0.attn.q_proj.lora_a.weight").unwrap(),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(
            peft_to_tune_adapter_name("base_model.model.model.layers.3.mlp.up_proj.lora_B.weight")
                .unwrap(),
            "layers.3.mlp.w3.lora_b.weight"
        );
    }

    #[test]
    fn permutation_round_trips() {
        let t = Tensor::arange(0f32, 48., &Device::Cpu)
            .unwrap()
            .reshape((16, 3))
            .unwrap();
        let p = permute_hf_to_tune(&t, 2).unwrap();
        assert_ne!(p.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        // Head 0 rows in HF order 0..8 = [first half 0..4, second half 4..8] interleave as 0,4,1,5,...
        let first_col: Vec<f32> = p
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(&first_col[..8], &[0., 12., 3., 15., 6., 18., 9., 21.]);
        let back = permute_tune_to_hf(&p, 2).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
    }
}
