//! `eleuther_eval` reproduces lm-evaluation-harness 0.4.13 on stories260K (tests/fixtures/mc2):
//! every answer's log-likelihood within 1e-4, per-question mc2 and the mean within 1e-5, mc1
//! exactly, with and without context caching.

mod common;

use std::path::Path;

use serde_json::Value;
use tune_core::recipe::RunOptions;
use tune_recipes::eleuther_eval::{self, evaluate, EvalReport, Task};

fn fixture() -> Value {
    let path = common::root().join("tests/fixtures/mc2/mc2_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The bundled stories260K eval config, paths made absolute, output in `work`, plus overrides.
fn eval_config(work: &Path, overrides: &[&str]) -> tune_core::Config {
    let root = common::root();
    let text = std::fs::read_to_string(root.join("configs/stories260K/eval.yaml"))
        .unwrap()
        .replace("assets/", &format!("{}/assets/", root.display()));
    let mut config = tune_core::Config::from_yaml_str(&text).unwrap();
    let mut all = vec![format!("output_dir={}", work.display())];
    all.extend(overrides.iter().map(|s| s.to_string()));
    config.apply_overrides(&all).unwrap();
    config.resolve_interpolations().unwrap();
    config
}

fn run(work: &Path, overrides: &[&str]) -> EvalReport {
    tune_recipes::link();
    evaluate(eval_config(work, overrides), &RunOptions::default())
        .unwrap()
        .expect("not a dry run")
}

fn run_err(overrides: &[&str]) -> String {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    let err = evaluate(eval_config(work.path(), overrides), &RunOptions::default()).unwrap_err();
    format!("{err:#}")
}

/// Compares a report on the fixture's 20 questions with lm-eval's numbers; returns the largest
/// log-likelihood difference.
fn check_against_fixture(report: &EvalReport) -> f64 {
    let fx = fixture();
    let questions = fx["questions"].as_array().unwrap();
    let mut max_ll_diff: f64 = 0.0;
    let mut checked = 0;
    for task in &report.tasks {
        let key = match task.task {
            Task::TruthfulQaMc1 => "mc1_targets",
            Task::TruthfulQaMc2 => "mc2_targets",
        };
        assert_eq!(task.questions.len(), 20);
        for (ours, want) in task.questions.iter().zip(questions) {
            assert_eq!(ours.index as u64, want["index"].as_u64().unwrap());
            let want_choices = want[key].as_array().unwrap();
            assert_eq!(
                ours.choices.len(),
                want_choices.len(),
                "question {}",
                ours.index
            );
            for (c, w) in ours.choices.iter().zip(want_choices) {
                assert_eq!(
                    c.answer,
                    w["choice"].as_str().unwrap(),
                    "file order of answers"
                );
                assert_eq!(c.label as u64, w["label"].as_u64().unwrap());
                let want_ids: Vec<u32> =
                    serde_json::from_value(w["continuation_ids"].clone()).unwrap();
                assert_eq!(
                    c.continuation_ids, want_ids,
                    "question {} answer {:?}",
                    ours.index, c.answer
                );
                let diff = (c.ll - w["ll"].as_f64().unwrap()).abs();
                assert!(
                    diff <= 1e-4,
                    "question {} answer {:?}: ll {} vs lm-eval {}",
                    ours.index,
                    c.answer,
                    c.ll,
                    w["ll"]
                );
                assert_eq!(c.is_greedy, w["is_greedy"].as_bool().unwrap());
                max_ll_diff = max_ll_diff.max(diff);
                checked += 1;
            }
            match task.task {
                Task::TruthfulQaMc2 => {
                    let want_mc2 = want["mc2"].as_f64().unwrap();
                    assert!(
                        (ours.acc - want_mc2).abs() <= 1e-5,
                        "question {} mc2 {} vs {want_mc2}",
                        ours.index,
                        ours.acc
                    );
                }
                Task::TruthfulQaMc1 => assert_eq!(
                    ours.acc,
                    want["mc1_acc"].as_f64().unwrap(),
                    "question {}",
                    ours.index
                ),
            }
        }
    }
    assert_eq!(
        checked,
        fx["summary"]["n_choice_evaluations"].as_u64().unwrap() as usize
    );
    let mc2 = report
        .tasks
        .iter()
        .find(|t| t.task == Task::TruthfulQaMc2)
        .unwrap();
    let mc1 = report
        .tasks
        .iter()
        .find(|t| t.task == Task::TruthfulQaMc1)
        .unwrap();
    let want_mean = fx["summary"]["mc2_mean"].as_f64().unwrap();
    assert!(
        (mc2.acc - want_mean).abs() <= 1e-5,
        "mean mc2 {} vs lm-eval {want_mean}",
        mc2.acc
    );
    assert_eq!(mc1.acc, fx["summary"]["mc1_acc_mean"].as_f64().unwrap());
    max_ll_diff
}

#[test]
fn reproduces_lm_eval_with_context_cache() {
    let work = tempfile::tempdir().unwrap();
    let report = run(
        work.path(),
        &[
            "tasks=[truthfulqa_mc1,truthfulqa_mc2]",
            "limit=20",
            "log_samples=True",
        ],
    );
    let diff = check_against_fixture(&report);
    eprintln!(
        "context cache: max |ll - lm-eval| = {diff:.2e}, mc2 = {:.10}",
        report.tasks[1].acc
    );
    // mc1's answers are all among mc2's: each distinct request is scored once.
    assert_eq!(
        report.requests,
        237 - report.tasks[0]
            .questions
            .iter()
            .map(|q| q.choices.len())
            .sum::<usize>()
    );

    // The JSON file carries lm-eval's keys and every answer.
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(work.path().join("eval_results.json")).unwrap(),
    )
    .unwrap();
    let acc = doc["results"]["truthfulqa_mc2"]["acc,none"]
        .as_f64()
        .unwrap();
    assert_eq!(acc, report.tasks[1].acc);
    assert!(
        doc["results"]["truthfulqa_mc2"]["acc_stderr,none"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    // The run's settings as the config spells them.
    assert_eq!(doc["config"]["device"], "cpu");
    assert_eq!(doc["config"]["dtype"], "fp32");
    assert_eq!(doc["n-samples"]["truthfulqa_mc1"]["original"], 817);
    assert_eq!(doc["n-samples"]["truthfulqa_mc1"]["effective"], 20);
    assert_eq!(
        doc["samples"]["truthfulqa_mc2"].as_array().unwrap().len(),
        20
    );
    assert!(
        report.table().contains("|truthfulqa_mc2  |acc   |0.3989|"),
        "{}",
        report.table()
    );
}

#[test]
fn reproduces_lm_eval_scoring_whole_inputs() {
    let work = tempfile::tempdir().unwrap();
    let report = run(
        work.path(),
        &[
            "tasks=[truthfulqa_mc2,truthfulqa_mc1]",
            "limit=20",
            "enable_kv_cache=False",
            "batch_size=5",
        ],
    );
    // Tasks are reported in the order asked for.
    assert_eq!(report.tasks[0].task, Task::TruthfulQaMc2);
    let diff = check_against_fixture(&report);
    eprintln!("whole inputs: max |ll - lm-eval| = {diff:.2e}");
}

#[test]
fn mc2_formula_matches_lm_eval_cases() {
    for case in fixture()["mc2_formula_cases"].as_array().unwrap() {
        let lls: Vec<f64> = serde_json::from_value(case["lls"].clone()).unwrap();
        let labels: Vec<u8> = serde_json::from_value(case["labels"].clone()).unwrap();
        let ours = eleuther_eval::mc2(&lls, &labels);
        if case["mc2_lm_eval_is_nan"].as_bool().unwrap() {
            // lm-eval underflows to 0/0 here; the max-subtracted form stays exact.
            let want = 1.0 / (1.0 + (-1.0f64).exp());
            assert!((ours - want).abs() < 1e-12, "{}: {ours}", case["name"]);
        } else {
            let want = case["mc2_lm_eval"].as_f64().unwrap();
            assert!(
                (ours - want).abs() < 1e-12,
                "{}: {ours} vs {want}",
                case["name"]
            );
        }
    }
    assert_eq!(
        eleuther_eval::mc1(&[-1.0, -2.0, -1.0]),
        1.0,
        "ties go to the first answer"
    );
    assert_eq!(eleuther_eval::mc1(&[-2.0, -1.0]), 0.0);
}

#[test]
fn context_and_tokens_match_lm_eval() {
    let fx = fixture();
    let questions = eleuther_eval::load_truthfulqa(None).unwrap();
    assert_eq!(questions.len(), 817);
    let tokenizer = tune_data::Llama2Tokenizer::new(
        common::root().join("assets/stories260K/tokenizer.model"),
        None,
        None,
    )
    .unwrap();
    let primer_ids: Vec<u32> = serde_json::from_value(fx["primer_ids_with_bos"].clone()).unwrap();
    assert_eq!(fx["primer"].as_str().unwrap(), eleuther_eval::QA_PRIMER);
    assert_eq!(
        tokenizer.encode(eleuther_eval::QA_PRIMER, true, false, false),
        primer_ids
    );
    let q0 = &fx["questions"][0];
    let encoded = eleuther_eval::encode_pair(
        &tokenizer,
        &eleuther_eval::context(&questions[0].question),
        &eleuther_eval::continuation(&questions[0].mc2[0].0),
        true,
    );
    let want_ctx: Vec<u32> = serde_json::from_value(q0["context_ids"].clone()).unwrap();
    assert_eq!(encoded.context, want_ctx);
    // torchtune's own wrapper encodes without BOS (add_bos=False): the same ids minus the first.
    let no_bos = eleuther_eval::encode_pair(
        &tokenizer,
        &eleuther_eval::context(&questions[0].question),
        &eleuther_eval::continuation(&questions[0].mc2[0].0),
        false,
    );
    assert_eq!(no_bos.context, want_ctx[1..]);
    assert_eq!(no_bos.continuation, encoded.continuation);
    // Questions 164 and 607 list a false mc2 answer before a true one: file order is kept.
    let labels = |i: usize| {
        questions[i]
            .mc2
            .iter()
            .map(|(_, l)| *l)
            .collect::<Vec<u8>>()
    };
    assert_eq!(labels(164), vec![1, 1, 1, 0, 1, 0, 0, 0, 0]);
    assert_eq!(labels(607), vec![1, 1, 0, 1, 0, 0, 0]);
}

#[test]
fn reads_the_hugging_face_schema_too() {
    let work = tempfile::tempdir().unwrap();
    let path = work.path().join("tqa.jsonl");
    std::fs::write(
        &path,
        concat!(
            r#"{"question": "Q1?", "mc1_targets": {"choices": ["b", "a"], "labels": [1, 0]}, "mc2_targets": {"choices": ["z", "y", "x"], "labels": [0, 1, 1]}}"#,
            "\n",
            r#"{"question": "Q2?", "mc1_targets": {"c": 1, "a": 0}, "mc2_targets": {"c": 1, "a": 0}}"#,
            "\n"
        ),
    )
    .unwrap();
    let q = eleuther_eval::load_truthfulqa(Some(&path)).unwrap();
    assert_eq!(q[0].mc1.0, vec![("b".to_string(), 1), ("a".to_string(), 0)]);
    assert_eq!(
        q[0].mc2.iter().map(|(a, _)| a.as_str()).collect::<String>(),
        "zyx"
    );
    assert_eq!(
        q[1].mc2.0,
        vec![("c".to_string(), 1), ("a".to_string(), 0)],
        "object order, not sorted"
    );
}

#[test]
fn bad_settings_name_the_fix() {
    let e = run_err(&["tasks=[truthfulqa_mc3]"]);
    assert!(
        e.contains("unknown task `truthfulqa_mc3`") && e.contains("did you mean"),
        "{e}"
    );
    let e = run_err(&["tasks=[truthfulqa]"]);
    assert!(
        e.contains("lm-eval's group") && e.contains("tasks=[truthfulqa_mc1,truthfulqa_mc2]"),
        "{e}"
    );
    let e = run_err(&["limit=2.5"]);
    assert!(e.contains("limit must be"), "{e}");
    let e = run_err(&["truthfulqa_path=/nonexistent/tqa.json"]);
    assert!(
        e.contains("/nonexistent/tqa.json") && e.contains("null for the bundled copy"),
        "{e}"
    );
    let e = run_err(&["batch_size=0"]);
    assert!(e.contains("batch_size must be at least 1"), "{e}");
    let e = run_err(&["adapter_dir=/nonexistent/adapter"]);
    assert!(
        e.contains("adapter_dir /nonexistent/adapter does not exist"),
        "{e}"
    );
    let e = run_err(&["tasks=truthfulqa_mc1,truthfulqa_mc2"]);
    assert!(e.contains("give the tasks as a list"), "{e}");
    let e = run_err(&["tasks=[truthfulqa_gen]"]);
    assert!(
        e.contains("truthfulqa_gen") && e.contains("not implemented"),
        "{e}"
    );
    let e = run_err(&["max_seq_length=0"]);
    assert!(e.contains("max_seq_length must be at least 1"), "{e}");

    // mc1 counts the first answer as the correct one: a file that says otherwise is refused
    // rather than scored wrongly.
    let work = tempfile::tempdir().unwrap();
    let second_true = work.path().join("second_true.json");
    std::fs::write(
        &second_true,
        r#"[{"question": "Q?", "mc1_targets": {"a": 0, "b": 1}, "mc2_targets": {"a": 0, "b": 1}}]"#,
    )
    .unwrap();
    let path = format!("truthfulqa_path={}", second_true.display());
    let e = run_err(&[&path, "tasks=[truthfulqa_mc1]"]);
    assert!(e.contains("put the true answer first"), "{e}");
    // mc2 reads every label: the same file is fine for it.
    let dry = RunOptions {
        dry_run: true,
        ..Default::default()
    };
    let mc2_only = eval_config(work.path(), &[&path, "tasks=[truthfulqa_mc2]"]);
    assert!(evaluate(mc2_only, &dry).unwrap().is_none());

    // Nowhere to write the results: refused before any scoring.
    std::fs::create_dir_all(work.path().join("eval_results.json")).unwrap();
    let started = std::time::Instant::now();
    let e = evaluate(eval_config(work.path(), &[]), &RunOptions::default()).unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("eval_results.json is a folder"), "{e}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}

/// An answer longer than max_seq_length: the error names the length that scores every answer,
/// and that length works.
#[test]
fn a_too_short_max_seq_length_names_the_length_that_works() {
    let e = run_err(&["limit=20", "max_seq_length=70"]);
    let needed: usize = e
        .split("set max_seq_length to at least ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{e}"));
    assert!(needed > 70, "{e}");
    let work = tempfile::tempdir().unwrap();
    let fits = format!("max_seq_length={needed}");
    let report = run(work.path(), &["limit=20", &fits]);
    assert_eq!(report.tasks[0].questions.len(), 20);
}

#[test]
fn limit_as_fraction_and_short_max_length() {
    let work = tempfile::tempdir().unwrap();
    // 0.004 of 817 questions rounds up to 4 (lm-eval's rule).
    let report = run(work.path(), &["limit=0.004", "max_seq_length=256"]);
    assert_eq!(report.tasks[0].questions.len(), 4);
    assert_eq!(report.max_length, 256);
    // Every input is truncated from the left at 256 tokens: no context is cached, same numbers.
    let whole = run(
        work.path(),
        &["limit=0.004", "max_seq_length=256", "enable_kv_cache=False"],
    );
    for (a, b) in report.tasks[0]
        .questions
        .iter()
        .zip(&whole.tasks[0].questions)
    {
        for (x, y) in a.choices.iter().zip(&b.choices) {
            assert!((x.ll - y.ll).abs() < 1e-4, "{} vs {}", x.ll, y.ll);
        }
    }
}

#[test]
fn without_bos_as_torchtunes_wrapper_scores_differ() {
    let work = tempfile::tempdir().unwrap();
    let with_bos = run(work.path(), &["limit=2"]);
    let without = run(work.path(), &["limit=2", "add_bos=False"]);
    let ll = |r: &EvalReport| r.tasks[0].questions[0].choices[0].ll;
    assert!(ll(&with_bos).is_finite() && ll(&without).is_finite());
    assert!((ll(&with_bos) - ll(&without)).abs() > 1e-3);
}

/// The benchmark: truthfulqa_mc2 on all 817 questions with stories260K on the CPU.
/// `cargo test -p tune-recipes --test eval_truthfulqa -- --ignored --nocapture`
/// (`EVAL_OVERRIDES="enable_kv_cache=False limit=100"` to vary it).
#[test]
#[ignore]
fn benchmark_mc2_all_questions() {
    let work = tempfile::tempdir().unwrap();
    let extra = std::env::var("EVAL_OVERRIDES").unwrap_or_default();
    let overrides: Vec<&str> = extra.split_whitespace().collect();
    let report = run(work.path(), &overrides);
    eprintln!("{}", report.table());
}

#[test]
fn runs_through_the_recipe_registry() {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    let recipe = tune_core::recipe::lookup("eleuther_eval").unwrap();
    recipe
        .run(
            eval_config(work.path(), &["limit=2"]),
            &RunOptions::default(),
        )
        .unwrap();
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(work.path().join("eval_results.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(doc["n-samples"]["truthfulqa_mc2"]["effective"], 2);
    assert_eq!(doc["config"]["model"], "llama2");
    assert!(
        doc.get("samples").is_none(),
        "samples only with log_samples"
    );
    let distributed = RunOptions {
        nproc_per_node: 2,
        ..Default::default()
    };
    let e = recipe
        .run(eval_config(work.path(), &[]), &distributed)
        .unwrap_err()
        .to_string();
    assert!(e.contains("runs on one device"), "{e}");
}
