//! `lora_finetune_distributed` is the single-device loop made data-parallel: N ranks with
//! batch_size b take exactly the steps one device takes with batch_size N*b (DistributedSampler
//! interleaves one shuffled order), so losses, lrs and the final adapter agree up to the order
//! of f32 additions. Ranks are threads here, joined over loopback TCP as processes would be.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use candle_core::{Device, Tensor};
use tune_core::recipe::RunOptions;
use tune_recipes::distributed::{free_local_endpoint, ProcessGroup, RankInfo};
use tune_recipes::lora_finetune_single_device::{train, train_data_parallel};
use tune_recipes::training_loop::RunSummary;

fn adapter(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        dir.join("recipe_state/adapter_torchtune.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

/// Runs `world` ranks of the recipe on `config_for(rank)`; returns each rank's result.
fn run_ranks(
    world: usize,
    config_for: impl Fn(usize) -> tune_core::Config,
) -> Vec<anyhow::Result<RunSummary>> {
    let endpoint = free_local_endpoint().unwrap();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let config = config_for(rank);
            let endpoint = endpoint.clone();
            std::thread::spawn(move || {
                let info = RankInfo {
                    rank,
                    world_size: world,
                    local_rank: rank,
                };
                let mut group = ProcessGroup::connect(info, &endpoint, Duration::from_secs(60))?;
                // The group (its connections) closes when this thread ends, as a process's would.
                train_data_parallel(config, &RunOptions::default(), &mut group)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

const COMMON: &[&str] = &[
    "gradient_accumulation_steps=2",
    "max_steps_per_epoch=4",
    "shuffle=True",
    "seed=11",
    "save_adapter_weights_only=True",
    "tokenizer.max_seq_len=96",
    "clip_grad_norm=1.0",
];

#[test]
fn two_ranks_of_batch_2_take_the_steps_of_one_device_with_batch_4() {
    tune_recipes::link();
    let single_dir = tempfile::tempdir().unwrap();
    let mut single_overrides = COMMON.to_vec();
    single_overrides.push("batch_size=4");
    let single = train(
        common::stories_config(single_dir.path(), &single_overrides),
        &RunOptions::default(),
    )
    .unwrap();
    assert_eq!(single.steps.len(), 4);

    let dist_dir = tempfile::tempdir().unwrap();
    let mut dist_overrides = COMMON.to_vec();
    dist_overrides.push("batch_size=2");
    let ranks: Vec<RunSummary> = run_ranks(2, |_| {
        common::stories_config(dist_dir.path(), &dist_overrides)
    })
    .into_iter()
    .enumerate()
    .map(|(rank, r)| r.unwrap_or_else(|e| panic!("rank {rank}: {e:#}")))
    .collect();

    for summary in &ranks {
        assert_eq!(summary.steps.len(), 4);
        for (one, many) in single.steps.iter().zip(&summary.steps) {
            assert_eq!(one.step, many.step);
            assert_eq!(one.lr, many.lr);
            // Every token of the step is counted once, over both ranks.
            assert_eq!(one.tokens, many.tokens, "step {}", one.step);
            assert!(
                (one.loss - many.loss).abs() <= 1e-5 * one.loss.abs(),
                "step {}: single {} vs 2 ranks {}",
                one.step,
                one.loss,
                many.loss
            );
        }
    }
    // Both ranks logged the same numbers: they took identical steps.
    for (a, b) in ranks[0].steps.iter().zip(&ranks[1].steps) {
        assert_eq!(a.loss, b.loss);
    }

    let want = adapter(&single_dir.path().join("output/epoch_0"));
    let got = adapter(&dist_dir.path().join("output/epoch_0"));
    assert_eq!(want.len(), got.len());
    for (name, w) in &want {
        let g = &got[name];
        let rel = tune_core::compare::rel_norm_diff(g, w).unwrap();
        assert!(rel <= 1e-4, "{name}: relative difference {rel}");
    }
    // One writer: the metric log has each step once.
    let log_dir = dist_dir.path().join("output/logs");
    let log: String = std::fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(log.matches("Step 1 |").count(), 1, "{log}");
    assert_eq!(log.lines().count(), 4, "{log}");
}

#[test]
fn a_rank_that_fails_stops_the_others_with_an_error() {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    let results = run_ranks(2, |rank| {
        // Rank 1 is handed a dataset that does not exist.
        let mut overrides = vec!["batch_size=2", "max_steps_per_epoch=2"];
        if rank == 1 {
            overrides.push("dataset.data_files=/nonexistent/data.json");
        }
        common::stories_config(work.path(), &overrides)
    });
    let rank1 = format!("{:#}", results[1].as_ref().expect_err("rank 1 fails"));
    assert!(rank1.contains("nonexistent"), "{rank1}");
    let rank0 = format!("{:#}", results[0].as_ref().expect_err("rank 0 stops"));
    assert!(rank0.contains("lost rank 1"), "{rank0}");
}

#[test]
fn ranks_started_with_different_settings_refuse_to_train() {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    let results = run_ranks(2, |rank| {
        let seed = format!("seed={}", 1 + rank);
        common::stories_config(
            work.path(),
            &["batch_size=2", "max_steps_per_epoch=2", &seed],
        )
    });
    for result in results {
        let err = format!("{:#}", result.expect_err("no rank trains"));
        assert!(err.contains("another config, seed or dataset"), "{err}");
    }
}
