//! Resuming when settings differ from the checkpoint's: `seed: null`, a new batch size at an
//! epoch's end, a named `recipe_checkpoint`, and the folders a resume must never pick or replace.

mod common;

use tune_core::recipe::RunOptions;
use tune_recipes::checkpointer::newest_checkpoint;
use tune_recipes::lora_finetune_single_device::train;

/// 16 GSM8K rows: batch 2 x 2 accumulated = 4 steps an epoch.
const SMALL: &[&str] = &[
    "dataset.split=train[:16]",
    "batch_size=2",
    "gradient_accumulation_steps=2",
    "max_steps_per_epoch=null",
    "save_adapter_weights_only=True",
    "tokenizer.max_seq_len=64",
];

fn with(extra: &[&str]) -> Vec<String> {
    SMALL
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
}

fn run(
    work: &std::path::Path,
    overrides: &[String],
) -> anyhow::Result<tune_recipes::training_loop::RunSummary> {
    let refs: Vec<&str> = overrides.iter().map(String::as_str).collect();
    train(common::stories_config(work, &refs), &RunOptions::default())
}

#[test]
fn a_run_without_a_seed_resumes_with_its_checkpoints_seed() {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    run(work.path(), &with(&["seed=null", "epochs=1"])).unwrap();
    let (_, first) = newest_checkpoint(&work.path().join("output"))
        .unwrap()
        .unwrap();
    let rest = run(
        work.path(),
        &with(&["seed=null", "epochs=2", "resume_from_checkpoint=True"]),
    )
    .unwrap();
    let steps: Vec<usize> = rest.steps.iter().map(|s| s.step).collect();
    assert_eq!(steps, [5, 6, 7, 8]);
    let (dir, last) = newest_checkpoint(&work.path().join("output"))
        .unwrap()
        .unwrap();
    assert!(dir.ends_with("epoch_1"), "{}", dir.display());
    assert_eq!(last.seed, first.seed);
    // The seed was used, not just recorded: epoch 1 gives the losses of a run that set that seed
    // from the start (it seeded the adapters' initialisation).
    let straight = tempfile::tempdir().unwrap();
    let seed = format!("seed={}", first.seed);
    let want = run(straight.path(), &with(&[&seed, "epochs=2"])).unwrap();
    for (a, b) in want.steps[4..].iter().zip(&rest.steps) {
        assert_eq!(a.step, b.step);
        assert!(
            (a.loss - b.loss).abs() <= 1e-6 * a.loss.abs(),
            "step {}",
            a.step
        );
    }
}

#[test]
fn a_new_batch_size_at_an_epochs_end_recounts_the_steps_so_the_schedule_ends_with_the_run() {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    let no_warmup = "lr_scheduler.num_warmup_steps=0";
    run(work.path(), &with(&["epochs=1", no_warmup])).unwrap();
    // Batch 4 x 2 accumulated: 2 steps an epoch, so epoch 0 counts as 2 steps of this run.
    let rest = run(
        work.path(),
        &with(&[
            "epochs=2",
            "batch_size=4",
            no_warmup,
            "resume_from_checkpoint=True",
        ]),
    )
    .unwrap();
    let steps: Vec<usize> = rest.steps.iter().map(|s| s.step).collect();
    assert_eq!(steps, [3, 4]);
    // The cosine schedule reaches its end (lr 0) at the run's last step, not past it.
    let last = rest.steps.last().unwrap();
    assert!(last.lr.abs() < 1e-12, "lr after the last step: {}", last.lr);
    let (_, state) = newest_checkpoint(&work.path().join("output"))
        .unwrap()
        .unwrap();
    assert_eq!(
        (state.global_step, state.steps_per_epoch, state.batch_size),
        (4, Some(2), Some(4))
    );
}

#[test]
fn recipe_checkpoint_names_the_checkpoint_and_a_mid_epoch_one_needs_the_same_batches() {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    run(work.path(), &with(&["epochs=1", "save_every_n_steps=1"])).unwrap();
    let output = work.path().join("output");
    assert!(output.join("step_2").is_dir() && output.join("epoch_0").is_dir());

    // Named: step_2 (not the newest, epoch_0), so the run goes on from step 3.
    let rest = run(
        work.path(),
        &with(&[
            "epochs=1",
            "resume_from_checkpoint=True",
            "checkpointer.recipe_checkpoint=step_2",
        ]),
    )
    .unwrap();
    let steps: Vec<usize> = rest.steps.iter().map(|s| s.step).collect();
    assert_eq!(steps, [3, 4]);

    let config_file = output.join("torchtune_config.yaml");
    let config_before = std::fs::read_to_string(&config_file).unwrap();
    let logs_before = std::fs::read_dir(output.join("logs")).unwrap().count();
    let err = run(
        work.path(),
        &with(&[
            "epochs=1",
            "batch_size=4",
            "resume_from_checkpoint=True",
            "checkpointer.recipe_checkpoint=step_2",
        ]),
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("mid-epoch") && msg.contains("batch_size 2"),
        "{msg}"
    );
    // Refused before anything is written: the run's config and logs are as they were.
    assert_eq!(
        std::fs::read_to_string(&config_file).unwrap(),
        config_before
    );
    assert_eq!(
        std::fs::read_dir(output.join("logs")).unwrap().count(),
        logs_before
    );

    // Another order mid-epoch would repeat some samples and skip others.
    let err = run(
        work.path(),
        &with(&[
            "epochs=1",
            "shuffle=False",
            "resume_from_checkpoint=True",
            "checkpointer.recipe_checkpoint=step_2",
        ]),
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("stopped mid-epoch with shuffle=True") && msg.contains("same shuffle"),
        "{msg}"
    );

    // An adapter of another rank does not fit this run's model.
    let msg = format!(
        "{:#}",
        run(
            work.path(),
            &with(&[
                "epochs=2",
                "model.lora_rank=2",
                "resume_from_checkpoint=True",
                "checkpointer.recipe_checkpoint=epoch_0",
            ]),
        )
        .unwrap_err()
    );
    assert!(msg.contains("made with another lora_rank"), "{msg}");

    // A damaged or missing state file is named, with where else to resume from.
    let optimizer = output.join("step_2/recipe_state/optimizer.safetensors");
    let bytes = std::fs::read(&optimizer).unwrap();
    std::fs::write(&optimizer, &bytes[..100]).unwrap();
    let resume_step_2 = with(&[
        "epochs=1",
        "resume_from_checkpoint=True",
        "checkpointer.recipe_checkpoint=step_2",
    ]);
    let msg = format!("{:#}", run(work.path(), &resume_step_2).unwrap_err());
    assert!(
        msg.contains("optimizer.safetensors (damaged)") && msg.contains("recipe_checkpoint="),
        "{msg}"
    );
    std::fs::remove_file(&optimizer).unwrap();
    let msg = format!("{:#}", run(work.path(), &resume_step_2).unwrap_err());
    assert!(msg.contains("optimizer.safetensors (missing)"), "{msg}");

    let err = run(
        work.path(),
        &with(&[
            "resume_from_checkpoint=True",
            "checkpointer.recipe_checkpoint=step_99",
        ]),
    )
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("step_99 does not exist")
            && format!("{err:#}").contains("holds epoch_0, step_1, step_2, step_3 ("),
        "{err:#}"
    );
}

#[test]
fn unfinished_saves_are_never_resumed_from() {
    let work = tempfile::tempdir().unwrap();
    let output = work.path().join("output");
    let write_state = |folder: &str, global_step: usize| {
        let dir = output.join(folder).join("recipe_state");
        std::fs::create_dir_all(&dir).unwrap();
        let state = serde_json::json!({
            "epochs_run": 1, "global_step": global_step, "batches_in_epoch": 0, "seed": 1,
            "total_epochs": 1, "max_steps_per_epoch": null, "gradient_accumulation_steps": 1,
            "optimizer_step": global_step
        });
        std::fs::write(dir.join("recipe_state.json"), state.to_string()).unwrap();
    };
    write_state("epoch_0", 4);
    write_state(".epoch_1.partial-4194400", 8);
    let (dir, state) = newest_checkpoint(&output).unwrap().unwrap();
    assert!(dir.ends_with("epoch_0"));
    assert_eq!(state.global_step, 4);
}

#[test]
fn a_model_inside_this_runs_own_checkpoint_folder_is_refused() {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    let inside = work.path().join("output/epoch_0");
    std::fs::create_dir_all(&inside).unwrap();
    let err = run(
        work.path(),
        &with(&[&format!("checkpointer.checkpoint_dir={}", inside.display())]),
    )
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("would replace the model being trained"),
        "{err:#}"
    );

    let err = run(work.path(), &with(&["max_steps_per_epoch=0"])).unwrap_err();
    assert!(
        format!("{err:#}").contains("max_steps_per_epoch=0"),
        "{err:#}"
    );
}

#[test]
fn resume_from_checkpoint_is_read_at_the_top_level_or_on_the_checkpointer() {
    tune_recipes::link();
    // A config without the key takes it as an override: recipes read it at the top level.
    let mut config = common::stories_config(tempfile::tempdir().unwrap().path(), &[]);
    config
        .apply_overrides(&["~resume_from_checkpoint".to_string()])
        .unwrap();
    config
        .apply_overrides(&["resume_from_checkpoint=True".to_string()])
        .unwrap();

    let work = tempfile::tempdir().unwrap();
    run(work.path(), &with(&["epochs=1"])).unwrap();
    let rest = run(
        work.path(),
        &with(&["epochs=2", "checkpointer.resume_from_checkpoint=True"]),
    )
    .unwrap();
    let steps: Vec<usize> = rest.steps.iter().map(|s| s.step).collect();
    assert_eq!(steps, [5, 6, 7, 8]);
}

/// A mid-epoch checkpoint from before tune-rs recorded its sample order resumes in file order
/// (which never changed), but not shuffled (the old shuffle was not torch's).
#[test]
fn mid_epoch_checkpoints_without_a_recorded_order_resume_only_unshuffled() {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    let unshuffled = ["epochs=1", "save_every_n_steps=1", "shuffle=False"];
    run(work.path(), &with(&unshuffled)).unwrap();
    let state_file = work
        .path()
        .join("output/step_2/recipe_state/recipe_state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
    assert_eq!(state["data_order"], "sequential");
    state.as_object_mut().unwrap().remove("data_order");
    std::fs::write(&state_file, state.to_string()).unwrap();
    let from_step_2 = |shuffle: &str| {
        with(&[
            "epochs=1",
            shuffle,
            "resume_from_checkpoint=True",
            "checkpointer.recipe_checkpoint=step_2",
        ])
    };
    let msg = format!(
        "{:#}",
        run(work.path(), &from_step_2("shuffle=True")).unwrap_err()
    );
    assert!(
        msg.contains("written before tune-rs shuffled as torch does"),
        "{msg}"
    );
    let rest = run(work.path(), &from_step_2("shuffle=False")).unwrap();
    let steps: Vec<usize> = rest.steps.iter().map(|s| s.step).collect();
    assert_eq!(steps, [3, 4]);
}
