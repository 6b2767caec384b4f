//! The `tune` binary, run as a user would: ls, cp, cat, validate, run, download.
//!
//! A few checks depend on what the binary registers (models, recipes): they assert the precise
//! message when the component or recipe is registered, and the "unknown" error otherwise, so
//! they pass while other crates are being built and check fully once they are.

use std::path::Path;
use std::process::{Command, Output};

const LORA_7B: &str = include_str!("../../../configs/llama2/7B_lora_single_device.yaml");

fn tune_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tune"))
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .output()
        .expect("the tune binary runs")
}

/// The repository root, where the bundled configs' `assets/...` paths resolve.
fn repo_root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `tune run lora_finetune_single_device --config <config> output_dir=<output> <extra>...`, run
/// from the repository root.
fn train(config: &str, output: &Path, extra: &[&str]) -> Output {
    let output_dir = format!("output_dir={}", output.display());
    let mut args = vec![
        "run",
        "lora_finetune_single_device",
        "--config",
        config,
        &output_dir,
    ];
    args.extend_from_slice(extra);
    tune_in(&repo_root(), &args)
}

fn tune(args: &[&str]) -> Output {
    tune_in(Path::new(env!("CARGO_MANIFEST_DIR")), args)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "expected success\nstdout:\n{}\nstderr:\n{}",
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

/// Asserts exit status 1 with an `Error: ` message; returns stderr.
#[track_caller]
fn fails(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected failure\nstdout:\n{}\nstderr:\n{}",
        stdout(o),
        stderr(o)
    );
    let err = stderr(o);
    assert!(err.contains("Error: "), "{err}");
    err
}

fn is_registered(component: &str) -> bool {
    ok(&tune(&["ls", "--components"]))
        .lines()
        .any(|l| l.split_whitespace().any(|w| w == component))
}

#[test]
fn help_for_every_verb() {
    let top = ok(&tune(&["--help"]));
    for verb in ["ls", "cp", "cat", "validate", "run", "download"] {
        assert!(top.contains(verb), "{verb} missing from tune --help");
        let help = ok(&tune(&[verb, "--help"]));
        assert!(help.contains("Usage:"), "{verb} --help:\n{help}");
    }
    assert!(ok(&tune(&["run", "--help"])).contains("--nproc_per_node"));
    assert!(ok(&tune(&["cp", "--help"])).contains("--make-parents"));
    // A bare `tune` prints the same help on stdout and succeeds, as torchtune's does.
    assert_eq!(ok(&tune(&[])), top);
}

#[test]
fn ls_prints_torchtunes_table() {
    let out = ok(&tune(&["ls"]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], format!("{:<40} {}", "RECIPE", "CONFIG"));
    assert_eq!(
        lines[1],
        format!(
            "{:<40} {}",
            "lora_finetune_single_device", "llama2/7B_lora_single_device"
        )
    );
    assert_eq!(
        lines[2],
        format!("{:<40} {}", "", "llama2/7B_qlora_single_device")
    );
    let distributed = lines
        .iter()
        .position(|l| l.starts_with("lora_finetune_distributed "))
        .unwrap();
    assert_eq!(
        lines[distributed],
        format!("{:<40} {}", "lora_finetune_distributed", "llama2/7B_lora")
    );
    for config in [
        "llama2/13B_qlora_single_device",
        "stories260K/lora_single_device",
        "stories260K/qlora_single_device",
        "stories260K/lora_text_completion",
        "stories260K/lora_dpo_single_device",
        "llama2/7B_lora_dpo_single_device",
        "llama2/7B_lora_dpo",
        "llama2/13B_lora",
        "llama2/70B_lora",
        "llama2/7B_qlora",
        "llama2/70B_qlora",
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.split_whitespace().last() == Some(config)),
            "{config} missing from:\n{out}"
        );
    }
    assert!(ok(&tune(&["ls", "--components"])).starts_with("KIND") || !is_registered("x"));
}

#[test]
fn cp_to_dot_keeps_the_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(&tune_in(
        dir.path(),
        &["cp", "llama2/7B_lora_single_device", "."],
    ));
    assert_eq!(out.trim(), "Copied file to ./7B_lora_single_device.yaml");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("7B_lora_single_device.yaml")).unwrap(),
        LORA_7B
    );
}

#[test]
fn cp_to_an_existing_directory_and_to_a_new_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    ok(&tune_in(
        dir.path(),
        &["cp", "stories260K/lora_single_device", "sub"],
    ));
    assert!(dir.path().join("sub/lora_single_device.yaml").is_file());
    // A path without the suffix gets `.yaml`.
    let out = ok(&tune_in(
        dir.path(),
        &["cp", "llama2/7B_lora_single_device", "my_config"],
    ));
    assert_eq!(out.trim(), "Copied file to my_config.yaml");
    assert!(dir.path().join("my_config.yaml").is_file());
}

#[test]
fn cp_no_clobber_keeps_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("mine.yaml");
    std::fs::write(&dest, "precious: 1\n").unwrap();
    let out = ok(&tune_in(
        dir.path(),
        &["cp", "-n", "llama2/7B_lora_single_device", "mine.yaml"],
    ));
    assert!(
        out.starts_with("File already exists at ") && out.contains("not overwriting"),
        "{out}"
    );
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), "precious: 1\n");
    // The same check for a directory destination looks at the file inside it.
    std::fs::write(
        dir.path().join("7B_lora_single_device.yaml"),
        "precious: 2\n",
    )
    .unwrap();
    ok(&tune_in(
        dir.path(),
        &["cp", "--no-clobber", "llama2/7B_lora_single_device", "."],
    ));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("7B_lora_single_device.yaml")).unwrap(),
        "precious: 2\n"
    );
    // Without -n it is overwritten.
    ok(&tune_in(
        dir.path(),
        &["cp", "llama2/7B_lora_single_device", "mine.yaml"],
    ));
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), LORA_7B);
}

#[test]
fn cp_missing_parent_needs_make_parents() {
    let dir = tempfile::tempdir().unwrap();
    let err = fails(&tune_in(
        dir.path(),
        &["cp", "llama2/7B_lora", "new_dir/my_custom_lora.yaml"],
    ));
    assert!(
        err.contains("Cannot create regular file: 'new_dir/my_custom_lora.yaml'"),
        "{err}"
    );
    assert!(err.contains("--make-parents"), "{err}");
    assert!(!dir.path().join("new_dir").exists());
    let out = ok(&tune_in(
        dir.path(),
        &[
            "cp",
            "llama2/7B_lora",
            "new_dir/my_custom_lora.yaml",
            "--make-parents",
        ],
    ));
    assert_eq!(out.trim(), "Copied file to new_dir/my_custom_lora.yaml");
    assert!(dir.path().join("new_dir/my_custom_lora.yaml").is_file());
}

#[test]
fn cp_unknown_name_lists_close_names() {
    let dir = tempfile::tempdir().unwrap();
    let err = fails(&tune_in(
        dir.path(),
        &["cp", "llama2/7B_lora_singel_device", "."],
    ));
    assert!(
        err.contains("Invalid file name: llama2/7B_lora_singel_device"),
        "{err}"
    );
    assert!(
        err.contains("Did you mean llama2/7B_lora_single_device"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn cp_a_recipe_copies_its_source_or_says_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let o = tune_in(dir.path(), &["cp", "lora_finetune_single_device", "."]);
    if o.status.success() {
        assert_eq!(
            stdout(&o).trim(),
            "Copied file to ./lora_finetune_single_device.rs"
        );
        // The recipe and the loop it runs, to read top to bottom.
        let copied =
            std::fs::read_to_string(dir.path().join("lora_finetune_single_device.rs")).unwrap();
        assert!(copied.contains("impl Objective for NextToken"), "{copied}");
        assert!(copied.contains("pub fn train_objective("), "{copied}");
        // A recipe in a folder comes whole; generate brings the inference loading it uses.
        let eval = ok(&tune_in(dir.path(), &["cp", "eleuther_eval", "."]));
        assert_eq!(eval.trim(), "Copied file to ./eleuther_eval.rs");
        let copied = std::fs::read_to_string(dir.path().join("eleuther_eval.rs")).unwrap();
        for part in [
            "pub fn evaluate(",
            "pub fn mc2(",
            "pub struct Scorer",
            "fn table(",
        ] {
            assert!(copied.contains(part), "{part} missing");
        }
        // Inner doc comments only at the top, where Rust allows them.
        let body = copied.lines().position(|l| !l.starts_with("//!")).unwrap();
        assert!(copied.lines().skip(body).all(|l| !l.starts_with("//!")));
        // Parts come with the parts they run: DPO distributed -> the DPO objective -> its losses.
        ok(&tune_in(dir.path(), &["cp", "lora_dpo_distributed", "."]));
        let copied = std::fs::read_to_string(dir.path().join("lora_dpo_distributed.rs")).unwrap();
        for part in [
            "lora_dpo_single_device.rs",
            "training_loop.rs",
            "rlhf_loss.rs",
        ] {
            assert_eq!(copied.matches(part).count(), 1, "{part}");
        }
        ok(&tune_in(dir.path(), &["cp", "generate", "."]));
        let copied = std::fs::read_to_string(dir.path().join("generate.rs")).unwrap();
        assert!(copied.contains("pub fn load_for_inference("));
    } else {
        assert!(fails(&o).contains("copy one of its configs instead"));
    }
}

#[test]
fn cat_prints_a_builtin_config() {
    assert_eq!(ok(&tune(&["cat", "llama2/7B_lora_single_device"])), LORA_7B);
    let sorted = ok(&tune(&["cat", "llama2/7B_lora_single_device", "--sort"]));
    let keys: Vec<&str> = sorted
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('-'))
        .collect();
    assert_eq!(keys.first(), Some(&"batch_size: 2"));
    let mut sorted_keys = keys.clone();
    sorted_keys.sort();
    assert_eq!(keys, sorted_keys);
    assert!(sorted.contains("lr: 0.0003"), "{sorted}");
}

#[test]
fn cat_a_local_file_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mine.yaml"), "b: 1\na: 2\n").unwrap();
    assert_eq!(
        ok(&tune_in(dir.path(), &["cat", "mine.yaml"])),
        "b: 1\na: 2\n"
    );
    assert_eq!(
        ok(&tune_in(dir.path(), &["cat", "mine.yaml", "--sort"])),
        "a: 2\nb: 1\n"
    );

    let err = fails(&tune_in(
        dir.path(),
        &["cat", "llama2/7B_lora_singel_device"],
    ));
    assert!(
        err.contains("Did you mean llama2/7B_lora_single_device"),
        "{err}"
    );
    let err = fails(&tune_in(dir.path(), &["cat", "nothere.yaml"]));
    assert!(err.contains("Config 'nothere.yaml' not found."), "{err}");
    let err = fails(&tune_in(
        dir.path(),
        &["cat", "lora_finetune_single_device"],
    ));
    assert!(
        err.contains("is a recipe, not a config") && err.contains("llama2/7B_lora_single_device"),
        "{err}"
    );
    std::fs::write(dir.path().join("bad.yaml"), "a: [1, 2\n").unwrap();
    let err = fails(&tune_in(dir.path(), &["cat", "bad.yaml"]));
    assert!(err.contains("not valid YAML"), "{err}");
}

#[test]
fn every_built_in_config_is_well_formed() {
    let dir = tempfile::tempdir().unwrap();
    let listing = ok(&tune(&["ls"]));
    let configs: Vec<&str> = listing
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    assert!(configs.len() >= 19, "{listing}");
    for config in configs {
        let file = format!("{}.yaml", config.replace('/', "_"));
        ok(&tune_in(dir.path(), &["cp", config, &file]));
        assert_eq!(
            ok(&tune_in(dir.path(), &["validate", &file])),
            "Config is well-formed!\n",
            "{config}"
        );
    }
}

#[test]
fn validate_a_well_formed_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("plain.yaml"),
        "output_dir: /tmp/x\nlog_dir: ${output_dir}/logs\n",
    )
    .unwrap();
    assert_eq!(
        ok(&tune_in(dir.path(), &["validate", "plain.yaml"])),
        "Config is well-formed!\n"
    );
}

#[test]
fn validate_invalid_yaml() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "model:\n  _component_: x\n   lora_rank: 8\n",
    )
    .unwrap();
    let err = fails(&tune_in(dir.path(), &["validate", "bad.yaml"]));
    assert!(err.contains("config is not valid YAML"), "{err}");
    let err = fails(&tune_in(dir.path(), &["validate", "missing.yaml"]));
    assert!(err.contains("no config file missing.yaml"), "{err}");
}

#[test]
fn validate_reports_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let text = "output_dir: /tmp/x\nmodel:\n  _component_: torchtune.models.llama2.lora_llama2_7b\n  \
                lora_attn_modules: [q_proj, v_proj]\n  lora_rnak: 8\noptimizer:\n  _component_: torch.optim.AdamWW\n\
                log_dir: ${outptu_dir}/logs\nbatch_sise: 2\n";
    std::fs::write(dir.path().join("typo.yaml"), text).unwrap();
    let err = fails(&tune_in(dir.path(), &["validate", "typo.yaml"]));
    assert!(err.contains("typo.yaml has 4 problems"), "{err}");
    // Any top-level name is allowed, but a near miss of a recipe's key is a typo.
    assert!(
        err.contains("`batch_sise` is read by no recipe (did you mean `batch_size`?)"),
        "{err}"
    );
    assert!(err.contains("did you mean `${output_dir}`?"), "{err}");
    assert!(
        err.contains("optimizer: unknown _component_ `torch.optim.AdamWW`"),
        "{err}"
    );
    if is_registered("torchtune.models.llama2.lora_llama2_7b") {
        assert!(
            err.contains(
                "model: unknown key `lora_rnak` for lora_llama2_7b; did you mean `lora_rank`?"
            ),
            "{err}"
        );
    } else {
        assert!(err.contains("model: unknown _component_"), "{err}");
    }
}

/// Every built-in config is well-formed against the components this binary registers.
#[test]
fn builtin_configs_validate() {
    let out = ok(&tune(&["ls"]));
    let configs: Vec<&str> = out
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    assert!(configs.len() >= 10);
    for config in configs {
        let o = tune(&["validate", config]);
        assert!(o.status.success(), "{config}:\n{}", stderr(&o));
        assert_eq!(stdout(&o), "Config is well-formed!\n");
    }
}

#[test]
fn run_errors_before_doing_any_work() {
    let err = fails(&tune(&[
        "run",
        "lora_finetune_singel_device",
        "--config",
        "llama2/7B_lora_single_device",
    ]));
    assert!(
        err.contains("recipe `lora_finetune_singel_device`"),
        "{err}"
    );
    // torchtune's other recipes, and Python recipe files, are named as not implemented.
    for (recipe, says) in [
        (
            "full_finetune_single_device",
            "a torchtune recipe that tune-rs does not implement",
        ),
        ("recipes/my_recipe.py", "not Python recipe files"),
    ] {
        let err = fails(&tune(&[
            "run",
            recipe,
            "--config",
            "llama2/7B_lora_single_device",
        ]));
        assert!(err.contains(says), "{err}");
    }

    let probe = tune(&[
        "run",
        "lora_finetune_single_device",
        "--config",
        "no/such_config",
    ]);
    let err = fails(&probe);
    if err.contains("not built into this binary") {
        return; // the recipes are not registered yet
    }
    assert!(
        err.contains("config `no/such_config` is neither a built-in config nor a file"),
        "{err}"
    );

    let err = fails(&tune(&[
        "run",
        "--nproc_per_node",
        "2",
        "lora_finetune_single_device",
        "--config",
        "llama2/7B_lora_single_device",
    ]));
    assert!(
        err.contains("does not support distributed training")
            && err.contains("or use lora_finetune_distributed"),
        "{err}"
    );
    // Inference recipes have no distributed twin to point at.
    let err = fails(&tune(&[
        "run",
        "--nproc_per_node",
        "2",
        "generate",
        "--config",
        "stories260K/generation",
    ]));
    assert!(
        err.contains("does not support distributed training") && !err.contains("or use"),
        "{err}"
    );

    let err = fails(&tune(&[
        "run",
        "lora_finetune_single_device",
        "--config",
        "llama2/7B_lora_single_device",
        "lora_attn_modules=['q_proj','k_proj','v_proj','output_proj']",
        "lora_rank=32",
        "lora_alpha=64",
        "output_dir=./lora_experiment_1",
    ]));
    if is_registered("torchtune.models.llama2.lora_llama2_7b") {
        assert!(err.contains("did you mean model.lora_rank=32?"), "{err}");
        assert!(err.contains("did you mean model.lora_alpha=64?"), "{err}");
    }
    let err = fails(&tune(&[
        "run",
        "lora_finetune_single_device",
        "--config",
        "llama2/7B_lora_single_device",
        "model.lora_attn_modules=[]",
    ]));
    assert!(err.contains("empty list"), "{err}");
}

#[test]
fn download_without_network_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_tune"))
        .args([
            "download",
            "meta-llama/Llama-2-7b-hf",
            "--output-dir",
            "models/Llama-2-7b-hf",
        ])
        .current_dir(dir.path())
        // A closed local port: the connection is refused at once.
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    let err = fails(&o);
    assert!(
        err.contains("cannot reach the Hugging Face Hub at http://127.0.0.1:9"),
        "{err}"
    );
    assert!(
        !dir.path().join("models").exists(),
        "nothing may be created"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    let err = fails(&tune(&["download", "not a repo/x/y"]));
    assert!(err.contains("is not a repo id"), "{err}");
}

#[test]
fn run_a_config_file_with_overrides_as_a_dry_run() {
    let probe = tune(&[
        "run",
        "lora_finetune_single_device",
        "--config",
        "no/such_config",
    ]);
    if stderr(&probe).contains("not built into this binary") {
        return; // the recipes are not registered yet
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tiny.yaml");
    let config = config.to_str().unwrap();
    ok(&tune(&["cp", "stories260K/lora_single_device", config]));
    let output_dir = format!("output_dir={}", dir.path().join("out").display());
    // From the repository root, where the config's relative asset paths point.
    let root = repo_root();
    let o = tune_in(
        &root,
        &[
            "run",
            "lora_finetune_single_device",
            "--config",
            config,
            "--dry-run",
            "model.lora_rank=2",
            &output_dir,
        ],
    );
    let out = ok(&o) + &stderr(&o);
    // stories260K with LoRA rank 2 on q and v: half the rank-4 adapter's 4480 parameters.
    assert!(out.contains("2240 trainable params"), "{out}");
}

#[test]
fn dry_run_counts_7b_without_weights_or_a_gpu() {
    // The 7B config names device: cuda and a checkpoint that isn't here; a dry run needs neither.
    let out = ok(&tune(&[
        "run",
        "lora_finetune_single_device",
        "--config",
        "llama2/7B_lora_single_device",
        "--dry-run",
        "model.lora_attn_modules=[q_proj,v_proj]",
        "model.apply_lora_to_mlp=False",
    ]));
    assert!(
        out.contains(
            "6742609920 total params, 4194304 trainable params, 0.06% of all params are trainable."
        ),
        "{out}"
    );
    assert!(
        out.contains("lora_llama2_7b"),
        "the resolved config is printed: {out}"
    );
}

#[test]
fn selfchecks_run_from_the_repository_root_as_gpu_check_runs_them() {
    // scripts/gpu-check.sh runs these from the root with the default `--repo .`.
    let root = repo_root();
    // bf16 too: candle multiplies bf16 on the CPU through fp32, so the GPU's bf16 graph (and
    // its tolerance against torchtune's bf16 runs) is checked here before any GPU sees it.
    for dtype in ["fp32", "bf16"] {
        for check in ["lora-step", "qlora-step", "trajectory"] {
            let out = ok(&tune_in(&root, &["selfcheck", check, "--dtype", dtype]));
            let report: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(report["check"], check.replace('-', "_"), "{out}");
            assert_eq!(report["pass"], true, "{dtype} {out}");
        }
    }
}

/// Run from elsewhere, a selfcheck says where the repository should be.
#[test]
fn selfcheck_outside_the_repository_says_so() {
    let elsewhere = tempfile::tempdir().unwrap();
    for check in ["lora-step", "trajectory"] {
        let e = fails(&tune_in(elsewhere.path(), &["selfcheck", check]));
        assert!(
            e.contains("is not a tune-rs repository") && e.contains("--repo"),
            "{e}"
        );
    }
}

#[test]
fn bench_writes_a_random_checkpoint_that_recipes_train_from() {
    let root = repo_root();
    let work = tempfile::tempdir().unwrap();
    let model = work.path().join("model");
    let dims = [
        "--vocab-size",
        "512",
        "--num-layers",
        "2",
        "--embed-dim",
        "64",
        "--num-heads",
        "8",
        "--num-kv-heads",
        "4",
        "--intermediate-dim",
        "172",
        "--max-seq-len",
        "512",
    ];
    let mut args = vec!["bench"];
    args.extend(dims);
    let model_arg = model.display().to_string();
    args.extend(["--write-checkpoint", &model_arg]);
    ok(&tune_in(&root, &args));
    assert!(model.join("config.json").is_file() && model.join("model.safetensors").is_file());
    let checkpoint = format!("checkpointer.checkpoint_dir={model_arg}");
    let output = format!("output_dir={}", work.path().join("out").display());
    ok(&tune_in(
        &root,
        &[
            "run",
            "lora_finetune_single_device",
            "--config",
            "stories260K/lora_single_device",
            &checkpoint,
            &output,
            "model.num_layers=2",
            "max_steps_per_epoch=2",
            "tokenizer.max_seq_len=64",
        ],
    ));
    assert!(work
        .path()
        .join("out/epoch_0/adapter/adapter_model.safetensors")
        .is_file());
}

/// torchtune's own config names for evaluation and generation (its docs' commands) run the
/// built-in llama2 configs.
#[test]
fn torchtunes_config_names_for_eval_and_generation_work() {
    for (alias, config, recipe) in [
        ("eleuther_evaluation", "llama2/7B_eval", "eleuther_eval"),
        ("generation", "llama2/generation", "generate"),
    ] {
        assert_eq!(ok(&tune(&["cat", alias])), ok(&tune(&["cat", config])));
        assert!(ok(&tune(&["ls"])).contains(alias), "{alias}");
        // The dry run builds the tokenizer: the bundled one stands in for Llama-2's.
        let tokenizer = "tokenizer.path=../../assets/stories260K/tokenizer.model";
        let out = ok(&tune(&[
            "run",
            recipe,
            "--config",
            alias,
            tokenizer,
            "--dry-run",
        ]));
        assert!(out.contains("torchtune.models.llama2.llama2_7b"), "{out}");
    }
}

/// torchrun options that change nothing here are accepted with a warning, so a torchrun command
/// line runs; restarts, which would change what happens, are refused.
#[test]
fn torchrun_options_without_effect_are_accepted_restarts_are_not() {
    let config = [
        "lora_finetune_single_device",
        "--config",
        "stories260K/lora_single_device",
    ];
    let mut args = vec!["run", "--max_restarts", "0", "--monitor_interval", "5"];
    args.extend(["--rdzv_conf", "join_timeout=900", "--tee", "3"]);
    args.extend(config);
    args.push("--dry-run");
    let o = tune(&args);
    ok(&o);
    let err = stderr(&o);
    for option in ["--monitor_interval", "--rdzv_conf", "--tee"] {
        assert!(
            err.contains(&format!("torchrun's {option} has no effect")),
            "{err}"
        );
    }
    let mut args = vec!["run", "--max_restarts", "3"];
    args.extend(config);
    let err = fails(&tune(&args));
    assert!(err.contains("does not restart failed ranks"), "{err}");
}

/// Asking for PyTorch .bin outputs says that safetensors are written all the same.
#[test]
fn safe_serialization_false_says_safetensors_are_written() {
    let o = tune(&[
        "run",
        "lora_finetune_single_device",
        "--config",
        "stories260K/lora_single_device",
        "checkpointer.safe_serialization=False",
        "--dry-run",
    ]);
    ok(&o);
    assert!(
        stderr(&o).contains("tune-rs writes safetensors all the same"),
        "{}",
        stderr(&o)
    );
}

/// torchtune's DPO recipes ignore clip_grad_norm; applying it here is said out loud.
#[test]
fn clip_grad_norm_in_dpo_is_announced() {
    let work = tempfile::tempdir().unwrap();
    let output = format!("output_dir={}", work.path().display());
    let o = tune_in(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .as_path(),
        &[
            "run",
            "lora_dpo_single_device",
            "--config",
            "stories260K/lora_dpo_single_device",
            &output,
            "clip_grad_norm=1.0",
            "max_steps_per_epoch=1",
        ],
    );
    ok(&o);
    assert!(
        stderr(&o).contains("torchtune's DPO recipes ignore it"),
        "{}",
        stderr(&o)
    );
}

/// torchtune's FSDP CPU offload (either spelling) is said to have no effect.
#[test]
fn fsdp_cpu_offload_is_announced_as_without_effect() {
    for key in ["fsdp_cpu_offload=True", "fsdp.cpu_offload=True"] {
        let o = tune(&[
            "run",
            "lora_finetune_distributed",
            "--config",
            "stories260K/lora_distributed",
            key,
            "--dry-run",
        ]);
        ok(&o);
        assert!(
            stderr(&o).contains("=True has no effect"),
            "{key}: {}",
            stderr(&o)
        );
    }
}

/// Top-level keys the recipe does not read: a near miss of one it reads is an error naming it,
/// anything else is announced, torchtune's memory knobs and `${key}` variables pass silently.
#[test]
fn top_level_keys_the_recipe_does_not_read() {
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "lora_finetune_single_device",
            "--config",
            "stories260K/lora_single_device",
            "--dry-run",
        ];
        args.extend_from_slice(extra);
        tune(&args)
    };
    let err = fails(&run(&["gradient_accumulaton_steps=4"]));
    assert!(
        err.contains("lora_finetune_single_device does not read `gradient_accumulaton_steps` (did you mean `gradient_accumulation_steps`?)"),
        "{err}"
    );
    // Also when the file spells it so, and beside the right spelling.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("typo.yaml");
    ok(&tune_in(
        dir.path(),
        &["cp", "stories260K/lora_single_device", "typo.yaml"],
    ));
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, format!("{text}\nmax_step_per_epoch: 3\n")).unwrap();
    let err = fails(&tune(&[
        "run",
        "lora_finetune_single_device",
        "--config",
        file.to_str().unwrap(),
        "--dry-run",
    ]));
    assert!(
        err.contains("(did you mean `max_steps_per_epoch`?)"),
        "{err}"
    );

    // Parked beside a real key rather than misspelt: announced, not refused.
    let o = run(&["dataset_2=x"]);
    ok(&o);
    assert!(
        stderr(&o).contains("top-level key dataset_2"),
        "{}",
        stderr(&o)
    );
    let o = run(&["foo=1", "collate_function=x"]);
    ok(&o);
    assert!(
        stderr(&o).contains(
            "lora_finetune_single_device does not read the top-level keys foo, collate_function; \
             they have no effect"
        ),
        "{}",
        stderr(&o)
    );
    // torchtune's keys for torch's memory, and a variable the config refers to.
    let o = run(&[
        "low_cpu_ram=True",
        "cudnn_deterministic_mode=True",
        "base=/tmp/somewhere",
        "output_dir=${base}/out",
    ]);
    ok(&o);
    assert!(!stderr(&o).contains("does not read"), "{}", stderr(&o));
    // DPO takes no collate_fn (its pairs are collated as torchtune's DPO collates them).
    let o = tune(&[
        "run",
        "lora_dpo_single_device",
        "--config",
        "stories260K/lora_dpo_single_device",
        "collate_fn=torchtune.data.padded_collate_sft",
        "--dry-run",
    ]);
    assert!(
        stderr(&o).contains("lora_dpo_single_device does not read the top-level key collate_fn"),
        "{}",
        stderr(&o)
    );
}

/// Every built-in config (copies of torchtune's) uses only keys its recipes read.
#[test]
fn built_in_configs_use_only_keys_their_recipes_read() {
    let listing = ok(&tune(&["ls"]));
    let mut recipe = String::new();
    let mut checked = 0;
    for line in listing.lines().skip(1) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let config = match words.as_slice() {
            [name, config] => {
                recipe = name.to_string();
                config
            }
            [config] => config,
            _ => continue,
        };
        let o = tune(&["run", &recipe, "--config", config, "--dry-run"]);
        assert!(
            !stderr(&o).contains("does not read"),
            "{recipe} {config}: {}",
            stderr(&o)
        );
        checked += 1;
    }
    assert!(checked >= 19, "{listing}");
}

/// torchtune's quantizers are refused with what to do instead, not answered with look-alikes.
#[test]
fn torchtunes_quantizers_say_to_set_quantizer_null() {
    let o = tune(&[
        "run",
        "eleuther_eval",
        "--config",
        "stories260K/eval",
        "quantizer._component_=torchtune.training.quantization.Int8DynActInt4WeightQuantizer",
        "--dry-run",
    ]);
    let err = fails(&o);
    assert!(
        err.contains("not implemented in tune-rs; set quantizer=null") && !err.contains("closest"),
        "{err}"
    );
}

/// A config key written as a flag after --config gets the override form, not clap's
/// `-- --flag` tip (which leads to a second error); an unknown launcher option keeps clap's.
#[test]
fn a_config_key_written_as_a_flag_gets_the_override_form() {
    let o = tune(&[
        "run",
        "lora_finetune_single_device",
        "--config",
        "stories260K/lora_single_device",
        "--max_steps_per_epoch",
        "2",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("config overrides are written `max_steps_per_epoch=VALUE`"),
        "{}",
        stderr(&o)
    );
    // A near miss of a real option keeps clap's suggestion.
    let o = tune(&[
        "run",
        "lora_finetune_single_device",
        "--config",
        "stories260K/lora_single_device",
        "--dry_run",
    ]);
    assert!(
        stderr(&o).contains("a similar argument exists: '--dry-run'"),
        "{}",
        stderr(&o)
    );
    let o = tune(&["run", "--nprocs", "2", "lora_finetune_distributed"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("unexpected argument '--nprocs'"),
        "{}",
        stderr(&o)
    );
}

/// Resuming a QLoRA checkpoint without quantize_base (or the reverse) goes on, with a warning:
/// the adapter learnt against the NF4 weights.
#[test]
fn resuming_across_quantize_base_warns() {
    let work = tempfile::tempdir().unwrap();
    let root = repo_root();
    let output = format!("output_dir={}", work.path().display());
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "lora_finetune_single_device",
            "--config",
            "stories260K/qlora_single_device",
            &output,
            "max_steps_per_epoch=1",
            "tokenizer.max_seq_len=64",
            "save_adapter_weights_only=True",
        ];
        args.extend_from_slice(extra);
        tune_in(&root, &args)
    };
    let first = run(&["epochs=1"]);
    assert!(
        !stderr(&first).contains("base (model.quantize_base"),
        "{}",
        stderr(&first)
    );
    ok(&first);
    let resumed = run(&[
        "epochs=2",
        "resume_from_checkpoint=True",
        "model.quantize_base=False",
    ]);
    ok(&resumed);
    assert!(
        stderr(&resumed).contains(
            "adapter was trained on an NF4 (QLoRA) base, and this run uses a full-precision base"
        ),
        "{}",
        stderr(&resumed)
    );
}

/// `tune bench` refuses sizes that would fail deep inside (or measure nothing) and a model
/// that cannot fit, before allocating it.
#[test]
fn bench_checks_its_sizes_first() {
    let o = tune(&["bench", "--seq-len", "0"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = fails(&tune(&[
        "bench",
        "--seq-len",
        "1024",
        "--max-seq-len",
        "512",
    ]));
    assert!(e.contains("longer than the model's max_seq_len 512"), "{e}");
    let e = fails(&tune(&[
        "bench",
        "--vocab-size",
        "1000000000",
        "--num-layers",
        "1",
    ]));
    assert!(e.contains("the model's weights need 3814.7 GiB"), "{e}");
}

/// `tune validate` checks what `tune run` checks next: the plugins the config loads and the
/// adapter its model names.
#[test]
fn validate_checks_plugins_and_adapter_names() {
    let dir = tempfile::tempdir().unwrap();
    let config = ok(&tune(&["cat", "stories260K/lora_single_device"]));
    let with_adapter = config.replace("  lora_rank: 4", "  lora_rank: 4\n  adapter: foo");
    assert_ne!(with_adapter, config);
    let path = dir.path().join("bad_adapter.yaml");
    std::fs::write(&path, &with_adapter).unwrap();
    let e = fails(&tune(&["validate", path.to_str().unwrap()]));
    assert!(
        e.contains("model.adapter: unknown _component_ `foo`"),
        "{e}"
    );
    // The model builder's own checks, past the argument types.
    for (from, to, expected) in [
        ("lora_rank: 4", "lora_rank: -1", "lora_rank"),
        ("lora_dropout: 0.0", "lora_dropout: 1.5", "lora_dropout"),
        ("'v_proj']", "'x_proj']", "x_proj"),
    ] {
        let changed = config.replacen(from, to, 1);
        assert_ne!(changed, config, "{from}");
        let path = dir.path().join("bad_model.yaml");
        std::fs::write(&path, &changed).unwrap();
        let e = fails(&tune(&["validate", path.to_str().unwrap()]));
        assert!(e.contains("model: ") && e.contains(expected), "{e}");
    }
    let path = dir.path().join("missing_plugin.yaml");
    std::fs::write(&path, format!("{config}plugins: [/nonexistent/libx.so]\n")).unwrap();
    let e = fails(&tune(&["validate", path.to_str().unwrap()]));
    assert!(e.contains("plugin /nonexistent/libx.so not found"), "{e}");
}

/// `tune bench --plugin` benchmarks a plugin's adapter (skipped when the example plugin is not
/// built; CI builds it first).
#[test]
fn bench_loads_a_plugin_adapter() {
    let root = repo_root();
    let plugin = root.join("plugins/ia3/target/release/libtune_ia3.so");
    if !plugin.is_file() {
        eprintln!("skipping: {} is not built", plugin.display());
        return;
    }
    let small = [
        "bench",
        "--adapter",
        "ia3",
        "--lora-attn-modules",
        "k_proj,v_proj",
        "--vocab-size",
        "64",
        "--num-layers",
        "1",
        "--num-heads",
        "4",
        "--embed-dim",
        "32",
        "--intermediate-dim",
        "64",
        "--batch-size",
        "1",
        "--seq-len",
        "16",
        "--warmup",
        "0",
        "--steps",
        "1",
    ];
    let e = fails(&tune(&small));
    assert!(e.contains("--plugin PATH"), "{e}");
    let mut with_plugin = small.to_vec();
    let plugin = plugin.display().to_string();
    with_plugin.extend(["--plugin", &plugin]);
    let out = ok(&tune(&with_plugin));
    assert!(out.contains("\"tokens_per_second\""), "{out}");
}

/// A plugin named through a symbolic link and by its own path is one plugin, announced once
/// (skipped when the example plugin is not built; CI builds it first).
#[test]
fn a_plugin_named_twice_is_announced_once() {
    let root = repo_root();
    let plugin = root.join("plugins/ia3/target/release/libtune_ia3.so");
    if !plugin.is_file() {
        eprintln!("skipping: {} is not built", plugin.display());
        return;
    }
    let plugin = plugin.canonicalize().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("libia3_link.so");
    std::os::unix::fs::symlink(&plugin, &link).unwrap();
    let o = tune(&[
        "ls",
        "--adapters",
        "--plugin",
        link.to_str().unwrap(),
        "--plugin",
        plugin.to_str().unwrap(),
    ]);
    ok(&o);
    let log = stderr(&o);
    assert_eq!(log.matches("loaded plugin").count(), 1, "{log}");
}

/// A QLoRA run's adapter put on the full-precision base says so; with the base quantised as in
/// training it does not.
#[test]
fn a_qlora_adapter_on_the_full_precision_base_is_noted() {
    let root = repo_root();
    let tune = |args: &[&str]| tune_in(&root, args);
    let work = tempfile::tempdir().unwrap();
    ok(&train(
        "stories260K/qlora_single_device",
        work.path(),
        &["max_steps_per_epoch=1"],
    ));
    let adapter_dir = format!("adapter_dir={}", work.path().join("epoch_0").display());
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "generate",
            "--config",
            "stories260K/generation",
            &adapter_dir,
            "max_new_tokens=2",
        ];
        args.extend_from_slice(extra);
        let o = tune(&args);
        ok(&o);
        stderr(&o)
    };
    let note = "was trained with QLoRA";
    assert!(generate(&[]).contains(note));
    let as_trained = generate(&[
        "model._component_=torchtune.models.llama2.lora_llama2",
        "model.lora_attn_modules=[q_proj,v_proj]",
        "model.lora_rank=4",
        "model.lora_alpha=8",
        "model.quantize_base=True",
    ]);
    assert!(!as_trained.contains(note), "{as_trained}");
}

/// `tune run lora_finetune_single_device --config stories260K/lora_single_device <override>
/// --dry-run`.
fn lora_dry_run(override_: &str) -> Output {
    tune(&[
        "run",
        "lora_finetune_single_device",
        "--config",
        "stories260K/lora_single_device",
        override_,
        "--dry-run",
    ])
}

/// An unknown component is compared with the components its node can hold: a scheduler's name
/// is not answered with optimizers.
#[test]
fn unknown_components_are_compared_with_their_own_kind() {
    let o = lora_dry_run("lr_scheduler._component_=torch.optim.lr_scheduler.LambdaLR");
    let e = fails(&o);
    assert!(
        e.contains("unknown _component_ `torch.optim.lr_scheduler.LambdaLR`")
            && !e.contains("AdamW"),
        "{e}"
    );
    let o = lora_dry_run(
        "lr_scheduler._component_=torchtune.training.lr_schedulers.get_cosine_schedule_with_warmp",
    );
    let e = fails(&o);
    assert!(
        e.contains("closest registered names: torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup"),
        "{e}"
    );
}

/// An argument torchtune's recipe passes to a component itself is named as such, not as a
/// typo of another argument.
#[test]
fn arguments_the_recipe_passes_are_named_as_such() {
    let o = lora_dry_run("lr_scheduler.num_training_steps=100");
    let e = fails(&o);
    assert!(
        e.contains("num_training_steps is passed by the recipe") && !e.contains("did you mean"),
        "{e}"
    );
}

/// The config a run saves keeps its `${output_dir}` references, as torchtune's does: run again
/// with another output_dir, it writes there and leaves the first run alone.
#[test]
fn a_saved_config_reused_with_another_output_dir_writes_there() {
    let work = tempfile::tempdir().unwrap();
    let (first, second) = (work.path().join("first"), work.path().join("second"));
    let run = |config: &str, output: &Path| {
        let one_step = ["max_steps_per_epoch=1", "save_adapter_weights_only=True"];
        ok(&train(config, output, &one_step))
    };
    run("stories260K/lora_single_device", &first);
    let saved = first.join("torchtune_config.yaml");
    let text = std::fs::read_to_string(&saved).unwrap();
    assert!(text.contains("${output_dir}"), "{text}");
    let adapter = first.join("epoch_0/adapter/adapter_model.safetensors");
    let before = std::fs::read(&adapter).unwrap();
    let logs_before = std::fs::read_dir(first.join("logs")).unwrap().count();
    run(saved.to_str().unwrap(), &second);
    assert!(second
        .join("epoch_0/adapter/adapter_model.safetensors")
        .is_file());
    assert!(second.join("logs").is_dir());
    assert_eq!(std::fs::read(&adapter).unwrap(), before);
    assert_eq!(
        std::fs::read_dir(first.join("logs")).unwrap().count(),
        logs_before
    );
}

/// StdoutLogger prints torchtune's `Step N | key:value ` lines (trailing space included) on
/// standard output; the disk log's path is announced as torchtune announces it, and without a
/// terminal each step's progress is a log line.
#[test]
fn stdout_logger_lines_are_torchtunes() {
    let work = tempfile::tempdir().unwrap();
    let o = train(
        "stories260K/lora_single_device",
        work.path(),
        &[
            "max_steps_per_epoch=2",
            "save_adapter_weights_only=True",
            "metric_logger._component_=torchtune.training.metric_logging.StdoutLogger",
        ],
    );
    let out = ok(&o);
    let steps: Vec<&str> = out.lines().filter(|l| l.starts_with("Step ")).collect();
    assert_eq!(steps.len(), 2, "{out}");
    for line in steps {
        assert!(line.contains(" | loss:") && line.ends_with(' '), "{line:?}");
    }
    let o = train(
        "stories260K/lora_single_device",
        &work.path().join("disk"),
        &["max_steps_per_epoch=1", "save_adapter_weights_only=True"],
    );
    ok(&o);
    assert!(stderr(&o).contains("Writing logs to "), "{}", stderr(&o));
    // Without a terminal the progress bar is not drawn: each step is a log line instead.
    assert!(stderr(&o).contains("step 1/1: loss "), "{}", stderr(&o));
}
