//! padded_collate_sft against fixtures/tokenizer/sft_collate.safetensors (torchtune's int64
//! tensors for rows 0-3 of the gsm8k tok512 datasets), plus the loader over real samples.

mod common;

use common::*;
use safetensors::{Dtype, SafeTensors};
use serde_yaml::Value as Yaml;
use tune_data::{
    padded_collate_sft, BatchSampler, CollateSft, DataLoader, DatasetSpec, Llama2Tokenizer,
    LoaderPosition, PromptTemplate, Sample,
};

fn gsm8k_samples(max_seq_len: Option<usize>, train_on_input: bool, rows: usize) -> Vec<Sample> {
    let tok =
        Llama2Tokenizer::new(tok512_path(), max_seq_len, Some(PromptTemplate::Llama2Chat)).unwrap();
    let file = fixtures().join("data/gsm8k_train_alpaca.json");
    let node: Yaml = serde_yaml::from_str(&format!(
        "{{source: json, data_files: {file:?}, split: 'train[:{rows}]', train_on_input: {train_on_input}}}"
    ))
    .unwrap();
    let built = tune_core::registry::lookup("alpaca_dataset")
        .unwrap()
        .build_from(&node)
        .unwrap();
    built.downcast::<DatasetSpec>().unwrap().load(&tok).unwrap()
}

fn tensor_rows(st: &SafeTensors, name: &str) -> Vec<Vec<i64>> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), Dtype::I64, "{name}");
    let (rows, cols) = (t.shape()[0], t.shape()[1]);
    let flat: Vec<i64> = t
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (0..rows)
        .map(|r| flat[r * cols..(r + 1) * cols].to_vec())
        .collect()
}

#[test]
fn padded_batches_match_torchtune() {
    let bytes = std::fs::read(fixtures().join("tokenizer/sft_collate.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let meta = tokenizer_fixture("sft_collate.json");
    let batches = meta["batches"].as_object().unwrap();
    assert_eq!(batches.len(), 4);
    for (key, info) in batches {
        let msl = if key.starts_with("gsm8k_tok512_msl128") {
            Some(128)
        } else {
            None
        };
        let train_on_input = key.ends_with("train_on_input_true");
        let samples = gsm8k_samples(msl, train_on_input, 4);
        let lengths: Vec<u64> = samples.iter().map(|s| s.len() as u64).collect();
        let want_lengths: Vec<u64> = info["row_lengths"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(lengths, want_lengths, "{key}");
        let padding_idx = info["padding_idx"].as_i64().unwrap();
        let ignore_idx = info["ignore_idx"].as_i64().unwrap();
        let batch = padded_collate_sft(&samples, padding_idx, ignore_idx);
        let shape: Vec<usize> = info["padded_shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!([batch.batch_size(), batch.seq_len()], shape[..], "{key}");
        assert_eq!(
            batch.tokens,
            tensor_rows(&st, &format!("{key}.tokens")),
            "{key} tokens"
        );
        assert_eq!(
            batch.labels,
            tensor_rows(&st, &format!("{key}.labels")),
            "{key} labels"
        );
    }
}

#[test]
fn loader_collates_the_sampled_rows_and_resumes() {
    let samples = gsm8k_samples(None, false, 8);
    let sampler = BatchSampler::new(samples.len(), 3)
        .unwrap()
        .with_shuffle(true, 0)
        .with_drop_last(true);
    let loader = DataLoader::new(&samples, sampler.clone(), CollateSft::default()).unwrap();
    assert_eq!(loader.num_batches(), 2);
    let batches: Vec<_> = loader.epoch(1).collect();
    assert_eq!(batches.len(), 2);
    for (batch, indices) in batches.iter().zip(sampler.batches_for_epoch(1)) {
        let want = padded_collate_sft(indices.iter().map(|&i| &samples[i]), 0, -100);
        assert_eq!(*batch, want);
    }
    let resumed: Vec<_> = loader
        .batches_from(LoaderPosition { epoch: 1, batch: 1 })
        .collect();
    assert_eq!(resumed.len(), 1);
    assert_eq!(resumed[0].0, LoaderPosition { epoch: 1, batch: 1 });
    assert_eq!(resumed[0].1, batches[1]);
    assert!(DataLoader::new(&samples[..5], sampler, CollateSft::default()).is_err());
}
