//! With an adapter on the output layer (`apply_lora_to_output`, e.g. `llama2/13B_lora`), the
//! training loss runs the output layer a chunk of rows at a time and recomputes it in the
//! backward: the same loss and the same gradients for every adapter as the full logits give.

mod common;

use candle_core::{Device, Tensor};
use tune_core::autograd::param_grad;
use tune_core::compare::max_abs_diff_scaled;
use tune_recipes::loss::{chunked_ce_sum, model_ce_sum};

fn model() -> tune_models::TransformerDecoder {
    let model = common::stories_lora_model("apply_lora_to_output: true", 5);
    // Non-zero B everywhere, so every adapter matrix gets a gradient.
    for (i, (name, var)) in model.adapter_params().into_iter().enumerate() {
        if name.ends_with("lora_b.weight") {
            let values = Tensor::randn(0f32, 0.02, var.dims(), &Device::Cpu).unwrap();
            var.set(&(values + i as f64 * 1e-3).unwrap()).unwrap();
        }
    }
    model
}

#[test]
fn chunked_output_loss_equals_the_full_logits() {
    let model = model();
    assert!(!model.output.trainable().is_empty());
    // 3 rows of 300 tokens: 900 rows of logits, so several chunks of 256.
    let tokens: Vec<i64> = (0..900).map(|i| (i * 7919 % 509 + 3) as i64).collect();
    let tokens = Tensor::from_vec(tokens, (3, 300), &Device::Cpu).unwrap();
    let labels: Vec<i64> = (0..900)
        .map(|i| {
            if i % 300 < 30 {
                -100
            } else {
                (i * 31 % 500) as i64
            }
        })
        .collect();
    let labels = Tensor::from_vec(labels, (3, 300), &Device::Cpu).unwrap();

    let grads = |sum: Tensor| {
        let store = sum.backward().unwrap();
        model
            .adapter_params()
            .into_iter()
            .map(|(name, v)| (name, param_grad(&store, &v).unwrap().unwrap()))
            .collect::<Vec<_>>()
    };
    let (chunked, n_chunked) = model_ce_sum(&model, &tokens, &labels, None, true).unwrap();
    let chunked_value: f32 = chunked.to_scalar().unwrap();
    let chunked_grads = grads(chunked);
    let logits = model.forward(&tokens, true).unwrap();
    let (full, n_full) = chunked_ce_sum(&logits, &labels).unwrap();
    let full_value: f32 = full.to_scalar().unwrap();
    let full_grads = grads(full);

    assert_eq!(n_chunked, n_full);
    assert!(
        (chunked_value - full_value).abs() <= 1e-5 * full_value.abs(),
        "{chunked_value} vs {full_value}"
    );
    assert!(chunked_grads.iter().any(|(n, _)| n.starts_with("output.")));
    for ((name, a), (_, b)) in chunked_grads.iter().zip(&full_grads) {
        let diff = max_abs_diff_scaled(a, b).unwrap();
        assert!(diff <= 1e-4, "{name}: {diff} of its scale");
    }
}
