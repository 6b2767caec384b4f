//! LoRA DPO: the pieces against independent computations (sequence log-probabilities and their
//! gradient against candle's own differentiable ops; the DPO loss and its gradient against the
//! closed form), then the recipe on stories260K: it starts at ln 2 with zero rewards (policy ==
//! reference), learns the preferences, writes a PEFT adapter, and N ranks take the steps one
//! device takes with N times the batch.

mod common;

use std::time::Duration;

use candle_core::{Device, Tensor, Var, D};
use tune_core::recipe::RunOptions;
use tune_recipes::distributed::{free_local_endpoint, ProcessGroup, RankInfo};
use tune_recipes::lora_dpo_single_device::{sequence_log_probs, train, Preference};
use tune_recipes::rlhf_loss::{DpoLoss, RsoLoss};
use tune_recipes::selfcheck::max_abs_diff;
use tune_recipes::training_loop::{train_objective, RunSummary};

fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) as f32 / (1u64 << 31) as f32) * 4.0 - 2.0
        })
        .collect()
}

#[test]
fn sequence_log_probs_and_gradient_match_composed_ops() {
    let (batch, seq, vocab) = (3, 6, 11);
    let logits = Var::from_vec(
        pseudo_random(batch * seq * vocab, 7),
        (batch, seq, vocab),
        &Device::Cpu,
    )
    .unwrap();
    let labels: Vec<i64> = vec![
        -100, -100, 3, 4, 5, 6, //
        -100, 1, 2, -100, -100, -100, //
        -100, 10, 0, 9, 8, 7,
    ];
    let labels = Tensor::from_vec(labels.clone(), (batch, seq), &Device::Cpu).unwrap();
    let ours = sequence_log_probs(logits.as_tensor(), &labels).unwrap();

    // The same with candle's differentiable log_softmax and a one-hot mask of the shifted labels.
    let shifted: Vec<i64> = labels
        .to_vec2::<i64>()
        .unwrap()
        .iter()
        .flat_map(|row| row[1..].iter().copied().chain([-100]).collect::<Vec<_>>())
        .collect();
    let onehot: Vec<f32> = shifted
        .iter()
        .flat_map(|&l| (0..vocab as i64).map(move |v| (l == v) as u8 as f32))
        .collect();
    let onehot = Tensor::from_vec(onehot, (batch, seq, vocab), &Device::Cpu).unwrap();
    let log_probs = candle_nn::ops::log_softmax(logits.as_tensor(), D::Minus1).unwrap();
    let reference = (log_probs * onehot).unwrap().sum((1, 2)).unwrap();
    assert!(max_abs_diff(&ours, &reference).unwrap() < 1e-5);

    let weights = Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).unwrap();
    let grad_of = |t: &Tensor| {
        let store = (t * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        store.get(logits.as_tensor()).unwrap().clone()
    };
    let diff = max_abs_diff(&grad_of(&ours), &grad_of(&reference)).unwrap();
    assert!(diff < 1e-5, "gradient differs by {diff}");
}

#[test]
fn dpo_loss_and_gradient_follow_the_closed_form() {
    let loss = DpoLoss {
        beta: 0.25,
        label_smoothing: 0.1,
    };
    let policy_chosen = Var::new(&[-10.0f32, -4.0], &Device::Cpu).unwrap();
    let policy_rejected = Var::new(&[-12.0f32, -3.0], &Device::Cpu).unwrap();
    let reference_chosen = Tensor::new(&[-11.0f32, -5.0], &Device::Cpu).unwrap();
    let reference_rejected = Tensor::new(&[-11.5f32, -2.0], &Device::Cpu).unwrap();
    let out = loss
        .forward(
            (policy_chosen.as_tensor(), policy_rejected.as_tensor()),
            (&reference_chosen, &reference_rejected),
        )
        .unwrap();
    let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
    let (beta, smoothing) = (0.25, 0.1);
    let margins = [(-10.0 + 12.0) - (-11.0 + 11.5), (-4.0 + 3.0) - (-5.0 + 2.0)];
    let want: f64 = margins
        .iter()
        .map(|m: &f64| {
            -(sigmoid(beta * m)).ln() * (1.0 - smoothing) - (sigmoid(-beta * m)).ln() * smoothing
        })
        .sum::<f64>()
        / 2.0;
    let got = out.loss.to_scalar::<f32>().unwrap() as f64;
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    assert_eq!(out.chosen_rewards, [0.25, 0.25]);
    assert_eq!(out.rejected_rewards, [-0.125, -0.25]);

    let store = out.loss.backward().unwrap();
    let grad = store
        .get(policy_chosen.as_tensor())
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (g, m) in grad.iter().zip(margins) {
        let want = (-beta * (1.0 - smoothing) * sigmoid(-beta * m)
            + beta * smoothing * sigmoid(beta * m))
            / 2.0;
        assert!((*g as f64 - want).abs() < 1e-6, "{g} vs {want}");
    }
    let grad_rejected = store.get(policy_rejected.as_tensor()).unwrap();
    let sum = (store.get(policy_chosen.as_tensor()).unwrap() + grad_rejected).unwrap();
    assert!(
        sum.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            < 1e-7
    );
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn dpo_config(work: &std::path::Path, overrides: &[&str]) -> tune_core::Config {
    common::builtin_config("stories260K/lora_dpo_single_device", work, overrides)
}

#[test]
fn stories260k_learns_its_preferences_and_exports_a_peft_adapter() {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    let summary = train(
        dpo_config(
            work.path(),
            &[
                "dataset.split=train[:16]",
                "epochs=6",
                "optimizer.lr=5e-3",
                "lr_scheduler.num_warmup_steps=2",
                "max_steps_per_epoch=null",
                "tokenizer.max_seq_len=256",
            ],
        ),
        &RunOptions::default(),
    )
    .unwrap();
    let losses: Vec<f64> = summary.steps.iter().map(|s| s.loss).collect();
    assert_eq!(losses.len(), 24);
    // Step 1 runs with the adapters' initial zero B: the policy is the reference.
    assert!(
        (losses[0] - std::f64::consts::LN_2).abs() < 1e-6,
        "{losses:?}"
    );
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    assert!(
        mean(&losses[20..]) < 0.5 * std::f64::consts::LN_2,
        "DPO did not learn the preferences: {losses:?}"
    );
    let log = std::fs::read_dir(work.path().join("output/logs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let log = std::fs::read_to_string(log).unwrap();
    let first = log.lines().next().unwrap();
    for key in [
        "rewards/chosen:0.0 ",
        "rewards/margins:0.0 ",
        "log_probs/chosen:",
        "logits/rejected:",
        "tokens_per_second_per_gpu:",
    ] {
        assert!(first.contains(key), "{key} missing from {first}");
    }
    // The last steps rank the chosen answers above the rejected ones.
    let accuracies = logged(work.path(), "rewards/accuracies");
    assert!(mean(&accuracies[20..]) >= 0.75, "{accuracies:?}");
    let adapter = work.path().join("output/epoch_5/adapter");
    assert!(adapter.join("adapter_model.safetensors").is_file());
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
}

/// The numbers logged for `key` at every step, from the run's DiskLogger file.
fn logged(work: &std::path::Path, key: &str) -> Vec<f64> {
    let dir = work.join("output/logs");
    let log = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|line| {
            let value = line.split(&format!("{key}:")).nth(1).unwrap();
            value.split_whitespace().next().unwrap().parse().unwrap()
        })
        .collect()
}

/// One device with batch 8 and 2 ranks with batch 2 and 2 accumulated micro-batches take the
/// same steps (the same 8 pairs, each micro-batch's mean loss weighted equally), and the ranks'
/// logged DPO numbers, averaged over all their micro-batches, equal the one device's.
#[test]
fn two_ranks_take_the_steps_of_one_device() {
    tune_recipes::link();
    let overrides = |batch: &str, accumulate: &str| {
        vec![
            "dataset.split=train[:24]".to_string(),
            "max_steps_per_epoch=3".to_string(),
            "tokenizer.max_seq_len=128".to_string(),
            "seed=5".to_string(),
            "optimizer.lr=5e-3".to_string(),
            "save_adapter_weights_only=True".to_string(),
            format!("batch_size={batch}"),
            format!("gradient_accumulation_steps={accumulate}"),
        ]
    };
    let one = tempfile::tempdir().unwrap();
    let single = train(
        dpo_config(one.path(), &refs(&overrides("8", "1"))),
        &RunOptions::default(),
    )
    .unwrap();

    let two = tempfile::tempdir().unwrap();
    let endpoint = free_local_endpoint().unwrap();
    let handles: Vec<_> = (0..2)
        .map(|rank| {
            let config = dpo_config(two.path(), &refs(&overrides("2", "2")));
            let endpoint = endpoint.clone();
            std::thread::spawn(move || -> anyhow::Result<RunSummary> {
                let info = RankInfo {
                    rank,
                    world_size: 2,
                    local_rank: rank,
                };
                let mut group = ProcessGroup::connect(info, &endpoint, Duration::from_secs(60))?;
                train_objective(
                    config,
                    &RunOptions::default(),
                    &mut group,
                    Preference::build,
                )
            })
        })
        .collect();
    let results: Vec<RunSummary> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    let losses = |s: &RunSummary| s.steps.iter().map(|s| s.loss).collect::<Vec<_>>();
    assert_eq!(losses(&results[0]), losses(&results[1]));
    for (a, b) in losses(&single).iter().zip(losses(&results[0])) {
        assert!(
            (a - b).abs() < 1e-5,
            "{:?} vs {:?}",
            losses(&single),
            losses(&results[0])
        );
    }
    for key in [
        "rewards/chosen",
        "rewards/margins",
        "log_probs/chosen",
        "logits/rejected",
    ] {
        let (a, b) = (logged(one.path(), key), logged(two.path(), key));
        assert_eq!(a.len(), 3);
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-4 * x.abs().max(1.0),
                "{key}: {a:?} vs {b:?}"
            );
        }
    }
    let load = |dir: &std::path::Path| {
        candle_core::safetensors::load(
            dir.join("output/epoch_0/recipe_state/adapter_torchtune.safetensors"),
            &Device::Cpu,
        )
        .unwrap()
    };
    // Adam divides each update by the gradient's running RMS, so an entry whose gradient is
    // near zero moves by about lr whichever way a last-bit difference of the two reduction
    // orders tips it: such entries differ by ~1e-5. A wrong average across ranks moves
    // every entry by ~lr (5e-3 per step here).
    let (a, b) = (load(one.path()), load(two.path()));
    for (name, t) in &a {
        let d = max_abs_diff(t, &b[name]).unwrap();
        assert!(d < 5e-5, "{name}: {d}");
    }
}

#[test]
fn sft_and_dpo_configs_are_not_mixed_up() {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    let err = tune_recipes::lora_finetune_single_device::train(
        dpo_config(work.path(), &[]),
        &RunOptions::default(),
    )
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("DPOLoss belongs to lora_dpo_single_device"),
        "{err:#}"
    );
    let err = train(
        dpo_config(
            work.path(),
            &[
                "loss=torchtune.modules.loss.CEWithChunkedOutputLoss",
                "~loss.beta",
                "~loss.label_smoothing",
            ],
        ),
        &RunOptions::default(),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("DPO needs `loss"), "{err:#}");
    let err = train(
        common::stories_config(work.path(), &["loss=torchtune.rlhf.loss.DPOLoss"]),
        &RunOptions::default(),
    )
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("DPO trains on preference pairs"),
        "{err:#}"
    );
}

#[test]
fn rso_hinge_loss_follows_the_closed_form_and_trains() {
    let loss = RsoLoss { gamma: 0.5 };
    let policy_chosen = Var::new(&[-10.0f32, -4.0], &Device::Cpu).unwrap();
    let policy_rejected = Var::new(&[-12.0f32, -3.0], &Device::Cpu).unwrap();
    let reference = (
        Tensor::new(&[-11.0f32, -5.0], &Device::Cpu).unwrap(),
        Tensor::new(&[-11.5f32, -2.0], &Device::Cpu).unwrap(),
    );
    let out = loss
        .forward(
            (policy_chosen.as_tensor(), policy_rejected.as_tensor()),
            (&reference.0, &reference.1),
        )
        .unwrap();
    // Margins 1.5 and 2.0: hinge terms 1 - 0.75 = 0.25 and 1 - 1.0 = 0 (at the kink).
    let got = out.loss.to_scalar::<f32>().unwrap();
    assert!((got - 0.125).abs() < 1e-6, "{got}");
    let grad = out
        .loss
        .backward()
        .unwrap()
        .get(policy_chosen.as_tensor())
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!((grad[0] + 0.25).abs() < 1e-6, "{grad:?}");
    assert_eq!(out.chosen_rewards, [0.5, 0.5]);

    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    let summary = train(
        dpo_config(
            work.path(),
            &[
                "loss=torchtune.rlhf.loss.RSOLoss",
                "~loss.beta",
                "~loss.label_smoothing",
                "loss.gamma=0.1",
                "max_steps_per_epoch=2",
                "save_adapter_weights_only=True",
            ],
        ),
        &RunOptions::default(),
    )
    .unwrap();
    // Policy == reference at the first step: relu(1 - 0) = 1.
    assert!(
        (summary.steps[0].loss - 1.0).abs() < 1e-6,
        "{:?}",
        summary.steps
    );
}

/// Without an adapter on the output layer the log-probabilities and logit means come from the
/// hidden states in chunks: the same numbers (and policy gradients) as from the full logits.
#[test]
fn chunked_log_probs_equal_the_full_logits() {
    use tune_models::decoder::Forward;
    let model = tune_recipes::selfcheck::lora_step_model(
        &common::root(),
        &Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let tokens: Vec<i64> = (0..2 * 2 * 300)
        .map(|i| (i * 7919 % 509 + 3) as i64)
        .collect();
    let tokens = Tensor::from_vec(tokens, (4, 300), &Device::Cpu).unwrap();
    let labels: Vec<i64> = (0..4 * 300)
        .map(|i| {
            if i % 300 < 40 {
                -100
            } else {
                (i * 31 % 500) as i64
            }
        })
        .collect();
    let labels = Tensor::from_vec(labels, (4, 300), &Device::Cpu).unwrap();
    let train = Forward {
        train: true,
        ..Default::default()
    };
    let (chunked, (mean_chosen, mean_rejected)) =
        tune_recipes::lora_dpo_single_device::log_probs_and_logit_means(
            &model, &tokens, &labels, 2, train,
        )
        .unwrap();
    let logits = model.forward_with(&tokens, train).unwrap().logits;
    let full = sequence_log_probs(&logits, &labels).unwrap();
    assert!(
        max_abs_diff(&chunked, &full).unwrap() < 1e-3,
        "{chunked} {full}"
    );
    let want = |start: usize| {
        logits
            .narrow(0, start, 2)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    assert!(
        (mean_chosen - want(0)).abs() < 1e-4,
        "{mean_chosen} vs {}",
        want(0)
    );
    assert!((mean_rejected - want(2)).abs() < 1e-4);
    let weights = Tensor::new(&[1.0f32, -0.5, 0.25, 2.0], &Device::Cpu).unwrap();
    let grads = |t: &Tensor| {
        let store = (t * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        model
            .adapter_params()
            .iter()
            .map(|(_, v)| store.get(v.as_tensor()).unwrap().clone())
            .collect::<Vec<_>>()
    };
    for (a, b) in grads(&chunked).iter().zip(grads(&full)) {
        assert!(tune_core::compare::max_abs_diff_scaled(a, &b).unwrap() <= 1e-4);
    }
}

/// Settings under which DPO would learn nothing are refused with the reason.
#[test]
fn dpo_that_cannot_learn_is_refused() {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    let err = |overrides: &[&str]| {
        let e = train(dpo_config(work.path(), overrides), &RunOptions::default()).unwrap_err();
        format!("{e:#}")
    };
    let e = err(&["loss.beta=0"]);
    assert!(
        e.contains("loss.beta=0: the DPO loss needs beta > 0"),
        "{e}"
    );
    // Both sides read from one column: nothing to prefer.
    let e = err(&[
        "dataset.column_map.prompt=question",
        "dataset.column_map.chosen=response_j",
        "dataset.column_map.rejected=response_j",
    ]);
    assert!(
        e.contains("every preference pair has the same chosen and rejected tokens"),
        "{e}"
    );
    for smoothing in ["0.5", "-0.1"] {
        let e = err(&[&format!("loss.label_smoothing={smoothing}")]);
        assert!(e.contains("below 0.5"), "{e}");
    }
    let e = err(&[
        "loss=torchtune.rlhf.loss.RSOLoss",
        "~loss.beta",
        "~loss.label_smoothing",
        "loss.gamma=0",
    ]);
    assert!(
        e.contains("loss.gamma=0: the RSO loss needs gamma > 0"),
        "{e}"
    );
    let e = err(&["tokenizer.max_seq_len=2"]);
    assert!(
        e.contains("no preference pair keeps a response token")
            && e.contains("tokenizer.max_seq_len (now 2)"),
        "{e}"
    );
}
