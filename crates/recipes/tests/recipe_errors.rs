//! Bad input gets an error that names the problem and the fix, and never a partial checkpoint.

mod common;

use tune_core::recipe::RunOptions;
use tune_recipes::lora_finetune_single_device::train;

fn run_err(overrides: &[&str]) -> String {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    let err = train(
        common::stories_config(work.path(), overrides),
        &RunOptions::default(),
    )
    .unwrap_err();
    // No half-written checkpoint is ever left behind.
    if let Ok(entries) = std::fs::read_dir(work.path().join("output")) {
        for e in entries {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                !name.contains(".partial-") && !name.contains(".tmp-"),
                "left behind {name}"
            );
        }
    }
    format!("{err:#}")
}

#[test]
fn nan_loss_stops_with_a_clear_error() {
    let e = run_err(&[
        "optimizer.lr=1e30",
        "lr_scheduler.num_warmup_steps=0",
        "max_steps_per_epoch=5",
    ]);
    assert!(e.contains("loss became"), "{e}");
    assert!(e.contains("lower the learning rate"), "{e}");
}

#[test]
fn batch_larger_than_dataset() {
    let work = tempfile::tempdir().unwrap();
    let data = common::gsm8k_rows(work.path(), 3);
    let e = run_err(&[
        &format!("dataset.data_files={}", data.display()),
        "batch_size=8",
    ]);
    assert!(
        e.contains("batch_size 8 is larger than the dataset (3 samples)"),
        "{e}"
    );
}

#[test]
fn empty_dataset() {
    let work = tempfile::tempdir().unwrap();
    let path = work.path().join("empty.json");
    std::fs::write(&path, "[]").unwrap();
    let e = run_err(&[&format!("dataset.data_files={}", path.display())]);
    assert!(e.to_lowercase().contains("empty"), "{e}");
}

#[test]
fn tokenizer_vocab_must_fit_the_model() {
    let e = run_err(&["model.vocab_size=256"]);
    assert!(e.contains("vocab_size is 256"), "{e}");
    assert!(e.contains("tokenizer.path"), "{e}");
}

#[test]
fn missing_checkpoint_dir() {
    let e = run_err(&["checkpointer.checkpoint_dir=/nonexistent/model"]);
    assert!(e.contains("/nonexistent/model does not exist"), "{e}");
}

#[test]
fn missing_checkpoint_file_lists_what_is_there() {
    let e = run_err(&["checkpointer.checkpoint_files=[pytorch_model.bin]"]);
    assert!(e.contains("pytorch_model.bin not found"), "{e}");
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn output_dir_inside_checkpoint_dir() {
    let root = common::root();
    let inside = root.join("assets/stories260K/out");
    let e = run_err(&[&format!("checkpointer.output_dir={}", inside.display())]);
    assert!(e.contains("is inside checkpoint_dir"), "{e}");
    assert!(!inside.exists());
}

#[test]
fn truncated_checkpoint() {
    let work = tempfile::tempdir().unwrap();
    let ckpt = work.path().join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    let bytes = std::fs::read(common::root().join("assets/stories260K/model.safetensors")).unwrap();
    std::fs::write(ckpt.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::copy(
        common::root().join("assets/stories260K/config.json"),
        ckpt.join("config.json"),
    )
    .unwrap();
    let e = run_err(&[&format!("checkpointer.checkpoint_dir={}", ckpt.display())]);
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn dry_run_counts_without_loading() {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    let config = common::stories_config(
        work.path(),
        &["checkpointer.checkpoint_dir=/nonexistent/but/not/read"],
    );
    let summary = train(
        config,
        &RunOptions {
            dry_run: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(summary.steps.is_empty());
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_device_without_cuda_build() {
    let e = run_err(&["device=cuda", "dtype=bf16"]);
    assert!(e.contains("built without CUDA support"), "{e}");
    assert!(e.contains("device=cpu dtype=fp32"), "{e}");
}

#[test]
fn clip_grad_norm_logs_the_pre_clip_norm() {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    let overrides = [
        "clip_grad_norm=1e-3",
        "max_steps_per_epoch=2",
        "save_adapter_weights_only=True",
    ];
    train(
        common::stories_config(work.path(), &overrides),
        &RunOptions::default(),
    )
    .unwrap();
    let log_dir = work.path().join("output/logs");
    let log = std::fs::read_dir(&log_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let text = std::fs::read_to_string(log).unwrap();
    for line in text.lines() {
        let norm: f64 = line
            .split("grad_norm:")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        // Pre-clip: the raw gradient norm is far above the 1e-3 limit.
        assert!(norm > 1e-2, "{line}");
    }
    // Clipped to 1e-3, AdamW's first step still moves every weight by ~lr (sign-like), so the
    // adapter must have changed: check B left zero.
    let adapter = candle_core::safetensors::load(
        work.path()
            .join("output/epoch_0/recipe_state/adapter_torchtune.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let b = &adapter["layers.0.attn.q_proj.lora_b.weight"];
    let max: f32 = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(max > 0.0);
}

#[test]
fn saving_merged_weights_never_touches_the_live_base_weights() {
    // torchtune 0.6.1 on CPU merged the LoRA delta into the live weights at each save, so epoch 1
    // trained from W + dW0 and saved W + dW0 + dW1. Ours must save W + dW1 at epoch 1.
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    let overrides = [
        "epochs=2",
        "max_steps_per_epoch=2",
        "lr_scheduler.num_warmup_steps=0",
    ];
    train(
        common::stories_config(work.path(), &overrides),
        &RunOptions::default(),
    )
    .unwrap();
    let load = |p: std::path::PathBuf| {
        candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap()
    };
    let original = load(common::root().join("assets/stories260K/model.safetensors"));
    let merged = load(
        work.path()
            .join("output/epoch_1/model-00001-of-00001.safetensors"),
    );
    let peft = load(
        work.path()
            .join("output/epoch_1/adapter/adapter_model.safetensors"),
    );
    let name = "model.layers.0.self_attn.v_proj";
    let a = &peft[&format!("base_model.model.{name}.lora_A.weight")];
    let b = &peft[&format!("base_model.model.{name}.lora_B.weight")];
    let expected =
        (&original[&format!("{name}.weight")] + (b.matmul(a).unwrap() * 2.0).unwrap()).unwrap();
    let d: f32 = (&merged[&format!("{name}.weight")] - expected)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(
        d <= 1e-6,
        "epoch_1's merged weight is not W + dW1 (off by {d})"
    );
}

#[test]
fn a_dataset_without_label_tokens_stops_before_training() {
    // Prompts masked and cut at 8 tokens: no response token is left to learn from.
    let e = run_err(&[
        "dataset.train_on_input=False",
        "tokenizer.max_seq_len=8",
        "max_steps_per_epoch=2",
    ]);
    assert!(
        e.contains("no sample has a labelled token") && e.contains("tokenizer.max_seq_len (now 8)"),
        "{e}"
    );
}

#[test]
fn activation_offloading_on_the_cpu_is_refused_as_in_torchtune() {
    let e = run_err(&["enable_activation_offloading=True", "max_steps_per_epoch=1"]);
    assert!(e.contains("only applies to training on CUDA"), "{e}");
}

/// torchtune components that tune-rs does not provide are named as such, with what to use
/// instead, rather than answered with similar-looking names.
#[test]
fn unavailable_components_say_what_to_use_instead() {
    let e = run_err(&[
        "metric_logger._component_=torchtune.training.metric_logging.WandBLogger",
        "metric_logger.project=lora",
    ]);
    assert!(
        e.contains("WandBLogger` is not available in tune-rs") && e.contains("wandb sync"),
        "{e}"
    );
    // Short names and older module paths too.
    let e = run_err(&["metric_logger._component_=torchtune.utils.metric_logging.WandBLogger"]);
    assert!(e.contains("is not available in tune-rs"), "{e}");
    let e = run_err(&["checkpointer._component_=torchtune.training.FullModelMetaCheckpointer"]);
    assert!(e.contains("FullModelHFCheckpointer"), "{e}");
    let e = run_err(&["optimizer._component_=bitsandbytes.optim.PagedAdamW8bit"]);
    assert!(e.contains("torch.optim.AdamW"), "{e}");
    let e = run_err(&[
        "loss._component_=torch.nn.CrossEntropyLoss",
        "loss.label_smoothing=0.1",
    ]);
    assert!(e.contains("only its defaults"), "{e}");
}

/// Older configs' `torch.nn.CrossEntropyLoss` is wired to the same loss as
/// `CEWithChunkedOutputLoss` (with torch's defaults the two are the same mean over non-ignored
/// tokens; that loss is checked against torchtune's numbers by the lora_step and trajectory
/// fixtures).
#[test]
fn torchs_cross_entropy_trains_as_the_chunked_loss() {
    tune_recipes::link();
    let losses = |overrides: &[&str]| -> Vec<f64> {
        let work = tempfile::tempdir().unwrap();
        let mut all = vec!["max_steps_per_epoch=3"];
        all.extend_from_slice(overrides);
        train(
            common::stories_config(work.path(), &all),
            &RunOptions::default(),
        )
        .unwrap()
        .steps
        .iter()
        .map(|s| s.loss)
        .collect()
    };
    let chunked = losses(&[]);
    assert_eq!(chunked.len(), 3);
    assert_eq!(
        losses(&["loss._component_=torch.nn.CrossEntropyLoss"]),
        chunked
    );
}

/// Settings that would be silently ignored are refused with the fix.
#[test]
fn settings_that_would_do_nothing_are_refused() {
    let e = run_err(&["model.attn_dropout=0.1"]);
    assert!(
        e.contains("model.attn_dropout=0.1 is not supported in training"),
        "{e}"
    );
    let e = run_err(&["loss.ignore_index=0"]);
    assert!(e.contains("ignore_index must be -100"), "{e}");
    let e = run_err(&["output_dir=''"]);
    assert!(e.contains("output_dir is empty"), "{e}");
    let e = run_err(&["log_every_n_steps=0"]);
    assert!(e.contains("log_every_n_steps=0 would never log"), "{e}");
    let e = run_err(&[
        "collate_fn._component_=torchtune.data.padded_collate_sft",
        "collate_fn.ignore_idx=0",
    ]);
    assert!(e.contains("collate_fn.ignore_idx must be -100"), "{e}");
}

/// torch.optim.AdamW's own refusals: a negative lr would climb the loss.
#[test]
fn adamw_refuses_what_torch_refuses() {
    for (arg, want) in [
        ("optimizer.lr=-1", "invalid optimizer.lr=-1"),
        ("optimizer.eps=-1e-8", "invalid optimizer.eps=-0.00000001"),
        (
            "optimizer.weight_decay=-0.1",
            "invalid optimizer.weight_decay=-0.1",
        ),
        (
            "optimizer.betas=[1.5,0.999]",
            "invalid optimizer.betas=[1.5, 0.999]",
        ),
        ("optimizer.betas=[0.9,1.0]", "each must be in [0, 1)"),
    ] {
        let e = run_err(&[arg, "max_steps_per_epoch=1"]);
        assert!(e.contains(want), "{arg}: {e}");
    }
}

#[test]
fn samples_cut_to_one_token_have_nothing_to_learn() {
    for packed in ["dataset.packed=False", "dataset.packed=True"] {
        let e = run_err(&["tokenizer.max_seq_len=1", packed, "max_steps_per_epoch=2"]);
        assert!(
            e.contains("no sample has a labelled token after its first")
                && e.contains("tokenizer.max_seq_len (now 1)"),
            "{packed}: {e}"
        );
    }
}

/// A checkpoint folder without config.json says so, rather than blaming the dimensions.
#[test]
fn a_checkpoint_without_config_json_is_named() {
    let copy = common::stories_copy_without("config.json");
    let dir = format!("checkpointer.checkpoint_dir={}", copy.path().display());
    let e = run_err(&[&dir, "max_steps_per_epoch=1"]);
    assert!(
        e.contains("has no config.json") && e.contains("copy it from the model's repository"),
        "{e}"
    );
}

/// `checkpointer.adapter_checkpoint` may name an adapter folder (PEFT's, or an epoch folder).
#[test]
fn adapter_checkpoint_may_name_a_folder() {
    tune_recipes::link();
    let first = tempfile::tempdir().unwrap();
    let opts = ["max_steps_per_epoch=2", "save_adapter_weights_only=True"];
    train(
        common::stories_config(first.path(), &opts),
        &RunOptions::default(),
    )
    .unwrap();
    let epoch = first.path().join("output/epoch_0");
    for folder in [epoch.clone(), epoch.join("adapter")] {
        let work = tempfile::tempdir().unwrap();
        let arg = format!("checkpointer.adapter_checkpoint={}", folder.display());
        let warm = train(
            common::stories_config(work.path(), &[&arg, opts[0], opts[1]]),
            &RunOptions::default(),
        )
        .unwrap();
        assert_eq!(warm.steps.len(), 2, "{}", folder.display());
    }
    let e = run_err(&[
        &format!(
            "checkpointer.adapter_checkpoint={}",
            epoch.join("recipe_state").display()
        ),
        "max_steps_per_epoch=1",
    ]);
    assert!(
        e.contains("is a folder without adapter_model.safetensors"),
        "{e}"
    );
    // The adapter's scale is part of it: another lora_alpha would start from another model.
    let adapter = format!(
        "checkpointer.adapter_checkpoint={}",
        epoch.join("adapter").display()
    );
    let e = run_err(&[&adapter, "model.lora_alpha=32", "max_steps_per_epoch=1"]);
    assert!(
        e.contains("scales the adapter by 2 (lora_alpha 8 / r 4)")
            && e.contains("set model.lora_alpha=8"),
        "{e}"
    );
    // rsLoRA's scale, alpha / sqrt(r), is plain LoRA's with alpha * sqrt(r).
    let rslora = tempfile::tempdir().unwrap();
    for name in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(epoch.join("adapter").join(name), rslora.path().join(name)).unwrap();
    }
    let config_path = rslora.path().join("adapter_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["use_rslora"] = serde_json::Value::Bool(true);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let adapter = format!(
        "checkpointer.adapter_checkpoint={}",
        rslora.path().display()
    );
    let e = run_err(&[&adapter, "max_steps_per_epoch=1"]);
    assert!(
        e.contains("(lora_alpha 8 / r 4, rsLoRA)") && e.contains("set model.lora_alpha=16"),
        "{e}"
    );
}

/// A NaN loss before any update comes from the base model, not the learning rate.
#[test]
fn a_nan_in_the_base_weights_is_not_blamed_on_the_learning_rate() {
    let copy = common::stories_copy_without("");
    let weights = copy.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    let norm = tensors["model.norm.weight"].clone();
    let nan = (norm * f64::NAN).unwrap();
    tensors.insert("model.norm.weight".into(), nan);
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let dir = format!("checkpointer.checkpoint_dir={}", copy.path().display());
    let e = run_err(&[&dir, "max_steps_per_epoch=1"]);
    assert!(
        e.contains("before any update")
            && e.contains("NaN/inf weights")
            && !e.contains("lower the learning rate"),
        "{e}"
    );
}

/// torchtune's set_seed range, [0, 2^32 - world_size]: outside it the seed is refused, not
/// wrapped into another run's seed.
#[test]
fn seed_out_of_range() {
    for seed in ["seed=-3", "seed=4294967296"] {
        let e = run_err(&[seed]);
        assert!(
            e.contains("out of range: use an integer from 0 to 4294967295"),
            "{e}"
        );
        // A dry run says so too.
        let work = tempfile::tempdir().unwrap();
        let dry = RunOptions {
            dry_run: true,
            ..Default::default()
        };
        let e = train(common::stories_config(work.path(), &[seed]), &dry).unwrap_err();
        assert!(format!("{e:#}").contains("out of range"), "{e:#}");
    }
}

/// A file where the run would save `epoch_0` is refused before training, and left as it was.
#[test]
fn a_file_named_like_a_checkpoint_is_not_moved_aside() {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("output");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("epoch_0"), "notes").unwrap();
    let e = train(
        common::stories_config(work.path(), &["max_steps_per_epoch=1"]),
        &RunOptions::default(),
    )
    .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("epoch_0 is not a checkpoint folder"), "{e}");
    assert_eq!(
        std::fs::read_to_string(out.join("epoch_0")).unwrap(),
        "notes"
    );

    // A folder of that name holding something else: a save would replace it, so it is refused
    // too. An empty one may be replaced.
    std::fs::remove_file(out.join("epoch_0")).unwrap();
    std::fs::create_dir_all(out.join("epoch_0")).unwrap();
    std::fs::write(out.join("epoch_0/notes.txt"), "notes").unwrap();
    let e = train(
        common::stories_config(work.path(), &["max_steps_per_epoch=1"]),
        &RunOptions::default(),
    )
    .unwrap_err();
    assert!(
        format!("{e:#}").contains("epoch_0 is not a checkpoint folder"),
        "{e:#}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("epoch_0/notes.txt")).unwrap(),
        "notes"
    );
    std::fs::remove_file(out.join("epoch_0/notes.txt")).unwrap();
    train(
        common::stories_config(work.path(), &["max_steps_per_epoch=1"]),
        &RunOptions::default(),
    )
    .unwrap();
}

/// An output_dir that is a file is named before the model loads.
#[test]
fn an_output_dir_that_is_a_file_is_named() {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("output");
    std::fs::write(&file, "not a folder").unwrap();
    let e = train(
        common::stories_config(work.path(), &["max_steps_per_epoch=1"]),
        &RunOptions::default(),
    )
    .unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains("output is a file; set output_dir to a folder"),
        "{e}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a folder");
}

/// Loop settings that would train nothing, never save, or climb the loss are refused.
#[test]
fn loop_settings_that_cannot_mean_what_they_say_are_refused() {
    tune_recipes::link();
    let dry = RunOptions {
        dry_run: true,
        ..Default::default()
    };
    for (setting, wanted) in [
        ("clip_grad_norm=-1", "clip_grad_norm=-1: it must be above 0"),
        ("clip_grad_norm=0", "clip_grad_norm=0: it must be above 0"),
        (
            "clip_grad_norm=.nan",
            "clip_grad_norm=NaN: it must be above 0",
        ),
        ("epochs=0", "epochs=0 would train nothing"),
        (
            "save_every_n_steps=0",
            "save_every_n_steps=0 would never save",
        ),
    ] {
        let work = tempfile::tempdir().unwrap();
        let e = train(common::stories_config(work.path(), &[setting]), &dry).unwrap_err();
        assert!(format!("{e:#}").contains(wanted), "{setting}: {e:#}");
    }
}

/// A sample longer than the model's context is refused before training, with the setting that
/// truncates it (torchtune fails at the first batch holding it, after steps have run).
#[test]
fn a_sample_longer_than_the_model_is_refused_up_front() {
    let work = tempfile::tempdir().unwrap();
    let path = work.path().join("long.json");
    let long_output = "Once upon a time there was a little dog. ".repeat(200);
    let rows = serde_json::json!([
        {"instruction": "Tell a story.", "input": "", "output": "A short one."},
        {"instruction": "Tell a long story.", "input": "", "output": long_output},
    ]);
    std::fs::write(&path, rows.to_string()).unwrap();
    let e = run_err(&[
        &format!("dataset.data_files={}", path.display()),
        "tokenizer.max_seq_len=null",
        "batch_size=1",
        "shuffle=False",
    ]);
    assert!(
        e.contains("sample 1 has")
            && e.contains("more than the model's max_seq_len 512")
            && e.contains("set tokenizer.max_seq_len to at most 512 (now null)"),
        "{e}"
    );
}

/// A checkpoint_dir file the saves would copy but cannot read fails the run before training,
/// not at the first save after it. (As root every file is readable: nothing to check there.)
#[cfg(unix)]
#[test]
fn an_unreadable_model_file_is_named_before_training() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return;
    }
    let copy = common::stories_copy_without("");
    let locked = copy.path().join("tokenizer_config.json");
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
    let dir = format!("checkpointer.checkpoint_dir={}", copy.path().display());
    let e = run_err(&[&dir, "max_steps_per_epoch=1"]);
    assert!(
        e.contains("tokenizer_config.json, which every checkpoint copies"),
        "{e}"
    );
}

/// A weight file that cannot be read is named, whatever reads it first.
#[test]
fn unreadable_weight_files_are_named() {
    let copy = common::stories_copy_without("");
    std::fs::write(copy.path().join("garbage.bin"), b"not a torch zip").unwrap();
    let dir = format!("checkpointer.checkpoint_dir={}", copy.path().display());
    let e = run_err(&[
        &dir,
        "checkpointer.checkpoint_files=[garbage.bin]",
        "max_steps_per_epoch=1",
    ]);
    assert!(
        e.contains("cannot read PyTorch checkpoint") && e.contains("garbage.bin"),
        "{e}"
    );
    let e = run_err(&[
        &dir,
        "checkpointer.checkpoint_files=[config.json]",
        "max_steps_per_epoch=1",
    ]);
    assert!(e.contains("unsupported checkpoint file"), "{e}");
}

/// A shard that model.safetensors.index.json names but the folder lacks is called missing (and
/// the fix is to download it), not truncated.
#[test]
fn a_shard_missing_from_the_folder_is_not_called_truncated() {
    let copy = common::stories_copy_without("model.safetensors");
    std::fs::copy(
        common::root().join("assets/stories260K/model.safetensors"),
        copy.path().join("model-00001-of-00002.safetensors"),
    )
    .unwrap();
    let weights = candle_core::safetensors::load(
        common::root().join("assets/stories260K/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    // Half the tensors are said to live in a second shard that is not there.
    let weight_map: serde_json::Map<String, serde_json::Value> = weights
        .keys()
        .enumerate()
        .map(|(i, name)| {
            let shard = if i % 2 == 0 { 1 } else { 2 };
            (
                name.clone(),
                format!("model-0000{shard}-of-00002.safetensors").into(),
            )
        })
        .collect();
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(
        copy.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let dir = format!("checkpointer.checkpoint_dir={}", copy.path().display());
    let e = run_err(&[
        &dir,
        "checkpointer.checkpoint_files=[model.safetensors.index.json]",
        "max_steps_per_epoch=1",
    ]);
    assert!(
        e.contains("model-00002-of-00002.safetensors does not exist")
            && e.contains("download the whole model again")
            && !e.contains("truncated"),
        "{e}"
    );
}
