//! `packed: True` on the real stories260K model: a row holding several samples gives each
//! sample exactly the logits it gets alone (positions restart, samples cannot see each other),
//! and the packed batch's loss and adapter gradients equal those of the same samples padded
//! (when each sample's first label is ignored, as with a masked prompt, so no label crosses a
//! boundary). Then a packed training run through the recipe.

mod common;

use candle_core::{DType, Device, Tensor};
use tune_core::autograd::AttentionMask;
use tune_core::compare::max_abs_diff_scaled;
use tune_core::recipe::RunOptions;
use tune_data::packed::{pack_samples, Examples};
use tune_data::{CollateSft, Sample};
use tune_models::decoder::{Forward, PackedRows};
use tune_models::TransformerDecoder;
use tune_recipes::loss::model_ce_sum;
use tune_recipes::selfcheck::{self, max_abs_diff};

/// A sample of `len` pseudo-random tokens whose first two labels are ignored.
fn sample(seed: u32, len: usize) -> Sample {
    let tokens: Vec<u32> = (0..len as u32)
        .map(|i| (seed * 7919 + i * 104_729) % 509 + 3)
        .collect();
    let mask = (0..len).map(|i| i < 2).collect();
    Sample::from_tokens_and_mask(tokens, mask)
}

fn model() -> TransformerDecoder {
    selfcheck::lora_step_model(&common::root(), &Device::Cpu, DType::F32).unwrap()
}

/// The model's view of a batch of packs, checking which attention layout it chose.
fn packed_rows(layout: &tune_data::PackedLayout, in_blocks: bool) -> PackedRows {
    let rows = PackedRows::new(
        &layout.input_pos,
        &layout.seq_lens,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    assert_eq!(
        matches!(rows.mask, AttentionMask::Blocks(_)),
        in_blocks,
        "{:?}",
        layout.seq_lens
    );
    rows
}

fn tensor(rows: &[Vec<i64>]) -> Tensor {
    let shape = (rows.len(), rows.first().map_or(0, Vec::len));
    Tensor::from_vec(rows.concat(), shape, &Device::Cpu).unwrap()
}

/// Short samples share one attention block per row (the dense row mask); long ones are
/// attended to block by block ([`AttentionMask::Blocks`]). Both layouts are checked.
#[test]
fn each_packed_sample_sees_only_itself() {
    let short = [
        sample(1, 7),
        sample(2, 12),
        sample(3, 5),
        sample(4, 20),
        sample(5, 9),
    ];
    let long = [
        sample(11, 100),
        sample(12, 90),
        sample(13, 80),
        sample(14, 150),
    ];
    each_sample_alone(&short, 32, false);
    each_sample_alone(&long, 300, true);
}

fn each_sample_alone(samples: &[Sample], pack_length: usize, in_blocks: bool) {
    let model = model();
    let packs = pack_samples(samples, pack_length, false, 0).unwrap();
    assert_eq!(packs.len(), 2);
    let batch = Examples::Packs(packs).collate(&[0, 1], &CollateSft::default());
    let layout = batch.packed.clone().unwrap();
    let rows = packed_rows(&layout, in_blocks);
    let logits = model
        .forward_packed(&tensor(&batch.tokens), Some(&rows), Forward::default())
        .unwrap()
        .logits;
    let mut next = samples.iter();
    for (row, lens) in layout.seq_lens.iter().enumerate() {
        let mut start = 0;
        for &len in lens {
            if batch.tokens[row][start..].iter().any(|&t| t != 0) {
                let s = next.next().unwrap();
                let alone_tokens: Vec<i64> = s.tokens.iter().map(|&t| i64::from(t)).collect();
                let alone = model.forward(&tensor(&[alone_tokens]), false).unwrap();
                let packed = logits
                    .narrow(0, row, 1)
                    .unwrap()
                    .narrow(1, start, len)
                    .unwrap();
                let diff = max_abs_diff(&packed, &alone).unwrap();
                assert!(diff < 1e-4, "row {row} sample at {start}: {diff}");
            }
            start += len;
        }
    }
    assert!(next.next().is_none(), "every sample was compared");
}

#[test]
fn packed_loss_and_gradients_equal_padded_ones() {
    let short = [sample(6, 10), sample(7, 13), sample(8, 6), sample(9, 17)];
    let long = [
        sample(16, 130),
        sample(17, 60),
        sample(18, 70),
        sample(19, 140),
    ];
    loss_and_gradients_as_padded(&short, 24);
    loss_and_gradients_as_padded(&long, 256);
}

fn loss_and_gradients_as_padded(samples: &[Sample], pack_length: usize) {
    let packs = pack_samples(samples, pack_length, false, 0).unwrap();
    let packed_batch = Examples::Packs(packs.clone()).collate(
        &(0..packs.len()).collect::<Vec<_>>(),
        &CollateSft::default(),
    );
    let padded_batch = CollateSft::default().collate(samples.iter());
    let layout = packed_batch.packed.clone().unwrap();
    let rows = packed_rows(&layout, pack_length > 100);

    for checkpointing in [false, true] {
        let mut model = model();
        model.activation_checkpointing = checkpointing;
        let grads = |tokens: &Tensor, labels: &Tensor, packed: Option<&PackedRows>| {
            let (sum, n) = model_ce_sum(&model, tokens, labels, packed, true).unwrap();
            let value: f32 = sum.to_scalar().unwrap();
            let store = sum.backward().unwrap();
            let grads: Vec<Tensor> = model
                .adapter_params()
                .iter()
                .map(|(_, v)| tune_core::autograd::param_grad(&store, v).unwrap().unwrap())
                .collect();
            (value, n, grads)
        };
        let (packed_sum, packed_n, packed_grads) = grads(
            &tensor(&packed_batch.tokens),
            &tensor(&packed_batch.labels),
            Some(&rows),
        );
        let (padded_sum, padded_n, padded_grads) = grads(
            &tensor(&padded_batch.tokens),
            &tensor(&padded_batch.labels),
            None,
        );
        assert_eq!(packed_n, padded_n);
        assert!(
            (packed_sum - padded_sum).abs() <= 1e-5 * padded_sum.abs(),
            "{packed_sum} vs {padded_sum}"
        );
        for (a, b) in packed_grads.iter().zip(&padded_grads) {
            let diff = max_abs_diff_scaled(a, b).unwrap();
            assert!(
                diff <= 1e-4,
                "checkpointing {checkpointing}: gradient differs by {diff} of its scale"
            );
        }
    }
}

#[test]
fn packed_training_runs_through_the_recipe() {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    let overrides = [
        "dataset.packed=True",
        "dataset.split=train[:160]",
        "tokenizer.max_seq_len=512",
        "batch_size=2",
        "max_steps_per_epoch=12",
    ];
    let summary = tune_recipes::lora_finetune_single_device::train(
        common::stories_config(work.path(), &overrides),
        &RunOptions::default(),
    )
    .unwrap();
    let losses: Vec<f64> = summary.steps.iter().map(|s| s.loss).collect();
    assert_eq!(losses.len(), 12);
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    assert!(
        mean(&losses[8..]) < mean(&losses[..4]),
        "packed training did not lower the loss: {losses:?}"
    );
    assert!(work
        .path()
        .join("output/epoch_0/adapter/adapter_model.safetensors")
        .is_file());
}
