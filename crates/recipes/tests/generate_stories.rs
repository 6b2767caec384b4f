//! `generate` reproduces llama2.c's greedy stories260K sample (tests/fixtures/generate) exactly,
//! with and without the KV cache; the cached forward equals the full one; sampling follows the
//! seed, temperature and top_k.

mod common;

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use serde_yaml::Value;
use tune_core::recipe::RunOptions;
use tune_models::decoder::{Forward, KvCache};
use tune_models::TransformerDecoder;
use tune_recipes::generate::{self, generate, Generation, Sampler};

fn fixture() -> serde_json::Value {
    let path = common::root().join("tests/fixtures/generate/stories260K_greedy.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The bundled stories260K generation config, paths made absolute, plus overrides.
fn gen_config(overrides: &[&str]) -> tune_core::Config {
    let root = common::root();
    let text = std::fs::read_to_string(root.join("configs/stories260K/generation.yaml"))
        .unwrap()
        .replace("assets/", &format!("{}/assets/", root.display()));
    let mut config = tune_core::Config::from_yaml_str(&text).unwrap();
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    config.apply_overrides(&overrides).unwrap();
    config.resolve_interpolations().unwrap();
    config
}

fn run(mut config: tune_core::Config, prompt: Option<&str>) -> Generation {
    tune_recipes::link();
    if let Some(p) = prompt {
        config
            .set("prompt.user", Value::String(p.to_string()))
            .unwrap();
    }
    generate(config, &RunOptions::default())
        .unwrap()
        .expect("not a dry run")
}

fn stories_model() -> TransformerDecoder {
    tune_recipes::link();
    let node: Value = serde_yaml::from_str(
        "{_component_: torchtune.models.llama2.llama2, vocab_size: 512, num_layers: 5, num_heads: 8,
          num_kv_heads: 4, embed_dim: 64, max_seq_len: 512, intermediate_dim: 172}",
    )
    .unwrap();
    let spec = tune_models::builders::model_spec_from_node(&node).unwrap();
    let dir = common::root().join("assets/stories260K");
    tune_models::checkpoint::load_model(
        &spec,
        Path::new(&dir),
        &["model.safetensors".into()],
        DType::F32,
        &Device::Cpu,
        0,
    )
    .unwrap()
    .0
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    tune_core::compare::max_abs_diff(a, b).unwrap() as f32
}

#[test]
fn greedy_from_bos_matches_llama2c_with_kv_cache() {
    let fx = fixture();
    let want: Vec<u32> = serde_json::from_value(fx["token_ids"].clone()).unwrap();
    let out = run(
        gen_config(&["temperature=0", "max_new_tokens=256"]),
        Some(""),
    );
    assert_eq!(out.prompt_ids, vec![1], "an empty prompt is BOS alone");
    assert!(out.used_kv_cache);
    assert_eq!(out.token_ids, want);
    assert_eq!(out.text, fx["text"].as_str().unwrap());
    eprintln!(
        "KV cache: {} tokens in {:.3}s = {:.0} tokens/s",
        out.token_ids.len(),
        out.seconds,
        out.tokens_per_second()
    );
}

#[test]
fn greedy_from_bos_matches_llama2c_without_kv_cache() {
    let want: Vec<u32> = serde_json::from_value(fixture()["token_ids"].clone()).unwrap();
    let out = run(
        gen_config(&[
            "temperature=0",
            "max_new_tokens=256",
            "enable_kv_cache=False",
        ]),
        Some(""),
    );
    assert!(!out.used_kv_cache);
    assert_eq!(out.token_ids, want);
    eprintln!(
        "no cache: {} tokens in {:.3}s = {:.0} tokens/s",
        out.token_ids.len(),
        out.seconds,
        out.tokens_per_second()
    );
}

#[test]
fn cached_forward_equals_full_forward() {
    let model = stories_model();
    let ids: Vec<u32> = serde_json::from_value(fixture()["token_ids"].clone()).unwrap();
    // Two rows, so batching is covered too.
    let rows: Vec<u32> = [&[1u32][..], &ids[..99]]
        .concat()
        .into_iter()
        .chain([&[1u32][..], &ids[100..199]].concat())
        .collect();
    let tokens = Tensor::from_vec(rows, (2, 100), &Device::Cpu).unwrap();
    let full = model
        .forward_with(&tokens, Forward::default())
        .unwrap()
        .logits;
    // Uneven chunks: a prompt of 37, single tokens, then a chunk of 50.
    let mut cache = KvCache::new();
    let mut parts = Vec::new();
    let mut at = 0;
    for len in [37, 1, 1, 1, 10, 50] {
        parts.push(
            model
                .forward_cached(&tokens.narrow(1, at, len).unwrap(), &mut cache)
                .unwrap(),
        );
        at += len;
        assert_eq!(cache.len(), at);
    }
    let cached = Tensor::cat(&parts, 1).unwrap();
    let diff = max_abs_diff(&full, &cached);
    assert!(diff < 1e-4, "cached vs full logits differ by {diff}");

    // A one-row prefix repeated for several continuations gives each row's full-sequence logits.
    let mut prefix = KvCache::new();
    model
        .forward_cached(&tokens.i((0..1, 0..40)).unwrap(), &mut prefix)
        .unwrap();
    let mut three = prefix.repeat_batch(3).unwrap();
    let rest = tokens.i((0..1, 40..60)).unwrap().repeat((3, 1)).unwrap();
    let out = model.forward_cached(&rest, &mut three).unwrap();
    for r in 0..3 {
        let diff = max_abs_diff(&out.i(r).unwrap(), &full.i((0, 40..60)).unwrap());
        assert!(diff < 1e-4, "row {r}: {diff}");
    }
    assert!(
        prefix.repeat_batch(2).unwrap().repeat_batch(2).is_err(),
        "only one-row caches repeat"
    );
}

#[test]
fn cache_refuses_positions_past_max_seq_len() {
    let model = stories_model();
    let mut cache = KvCache::new();
    let long = Tensor::zeros((1, 500), DType::U32, &Device::Cpu).unwrap();
    model.forward_cached(&long, &mut cache).unwrap();
    let err = model
        .forward_cached(&long.narrow(1, 0, 13).unwrap(), &mut cache)
        .unwrap_err()
        .to_string();
    assert!(err.contains("exceed the model's max_seq_len 512"), "{err}");
}

#[test]
fn sampling_follows_seed_temperature_and_top_k() {
    let prompt = "Once upon a time";
    let a = run(gen_config(&["max_new_tokens=40", "seed=7"]), Some(prompt));
    let b = run(gen_config(&["max_new_tokens=40", "seed=7"]), Some(prompt));
    let c = run(gen_config(&["max_new_tokens=40", "seed=8"]), Some(prompt));
    assert_eq!(a.token_ids, b.token_ids, "same seed, same text");
    assert!(
        a.full_text.starts_with("Once upon a time") && a.full_text.ends_with(&a.text),
        "{:?}",
        a.full_text
    );
    assert_ne!(a.token_ids, c.token_ids, "another seed, another text");
    // Sampling from the single most likely token is greedy decoding.
    let top1 = run(
        gen_config(&["max_new_tokens=40", "top_k=1", "temperature=1.5"]),
        Some(prompt),
    );
    let greedy = run(
        gen_config(&["max_new_tokens=40", "temperature=0"]),
        Some(prompt),
    );
    assert_eq!(top1.token_ids, greedy.token_ids);
    // Sampled without the cache: the same tokens for the same seed.
    let no_cache = run(
        gen_config(&["max_new_tokens=40", "seed=7", "enable_kv_cache=False"]),
        Some(prompt),
    );
    assert_eq!(no_cache.token_ids, a.token_ids);
    // `seed: null` draws a seed, as torchtune's set_seed(None), and that seed repeats the text.
    let drawn = |_| {
        run(
            gen_config(&["max_new_tokens=40", "seed=null"]),
            Some(prompt),
        )
    };
    let (d1, d2) = (drawn(1), drawn(2));
    assert_ne!(d1.seed, d2.seed, "seed=null drew the same seed twice");
    let again = run(
        gen_config(&["max_new_tokens=40", &format!("seed={}", d1.seed)]),
        Some(prompt),
    );
    assert_eq!(again.token_ids, d1.token_ids);
    assert_eq!(a.seed, 7);
    // Out of torchtune's range [0, 2^32 - 1]: refused, not wrapped.
    for seed in ["seed=-1", "seed=4294967296"] {
        let e = format!(
            "{:#}",
            generate(gen_config(&[seed]), &RunOptions::default()).unwrap_err()
        );
        assert!(
            e.contains("out of range") && e.contains("4294967295"),
            "{e}"
        );
    }
}

#[test]
fn sampler_draws_from_the_softmax() {
    // logits ln(1), ln(2), ln(3), ln(4): probabilities 0.1..0.4 at temperature 1.
    let logits: Vec<f32> = [1f32, 2., 3., 4.].iter().map(|p| p.ln()).collect();
    let mut sampler = Sampler::new(1.0, None, 3).unwrap();
    let mut counts = [0usize; 4];
    let n = 40_000;
    for _ in 0..n {
        counts[sampler.next_token(&logits).unwrap() as usize] += 1;
    }
    for (i, &c) in counts.iter().enumerate() {
        let p = (i + 1) as f64 / 10.0;
        assert!(
            (c as f64 / n as f64 - p).abs() < 0.01,
            "token {i}: {c} of {n}, expected p={p}"
        );
    }
    // top_k 2 keeps tokens 2 and 3 only, in proportion 3:4.
    let mut sampler = Sampler::new(1.0, Some(2), 3).unwrap();
    let mut counts = [0usize; 4];
    for _ in 0..n {
        counts[sampler.next_token(&logits).unwrap() as usize] += 1;
    }
    assert_eq!(counts[0] + counts[1], 0);
    assert!(
        (counts[2] as f64 / n as f64 - 3.0 / 7.0).abs() < 0.01,
        "{counts:?}"
    );
    assert_eq!(
        Sampler::greedy().next_token(&[0.5, 2.0, 2.0]).unwrap(),
        1,
        "first maximum wins"
    );
    assert!(Sampler::new(-0.1, None, 0).is_err());
    assert!(Sampler::new(1.0, Some(0), 0).is_err());
}

#[test]
fn prompt_forms() {
    let tokenizer = tune_data::Llama2Tokenizer::new(
        common::root().join("assets/stories260K/tokenizer.model"),
        None,
        None,
    )
    .unwrap();
    let text = "Once upon a time";
    let want = tokenizer.encode(text, true, false, false);
    let mapping: Value = serde_yaml::from_str("{system: null, user: Once upon a time}").unwrap();
    assert_eq!(
        generate::prompt_tokens(Some(&mapping), &tokenizer).unwrap(),
        want
    );
    assert_eq!(
        generate::prompt_tokens(Some(&Value::String(text.into())), &tokenizer).unwrap(),
        want
    );
    let bad: Value = serde_yaml::from_str("{usr: hi}").unwrap();
    let e = generate::prompt_tokens(Some(&bad), &tokenizer)
        .unwrap_err()
        .to_string();
    assert!(e.contains("prompt.usr: unknown key"), "{e}");
    let e = generate::prompt_tokens(None, &tokenizer)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`prompt` is required"), "{e}");
    // With the Llama-2 chat template the system prompt is folded into the user turn.
    let chat = tune_data::Llama2Tokenizer::new(
        common::root().join("assets/stories260K/tokenizer.model"),
        None,
        Some(tune_data::PromptTemplate::Llama2Chat),
    )
    .unwrap();
    let with_system: Value = serde_yaml::from_str("{system: Be brief., user: Hi}").unwrap();
    let ids = generate::prompt_tokens(Some(&with_system), &chat).unwrap();
    let decoded = chat.decode(&ids).unwrap();
    // (torchtune encodes each template piece separately, so SentencePiece adds its spaces.)
    assert_eq!(
        decoded,
        "[INST] <<SYS>>\n Be brief. \n<</SYS>>\n\n Hi [/INST]"
    );
}

#[test]
fn too_many_new_tokens_is_an_error_that_says_how_many_fit() {
    tune_recipes::link();
    let mut config = gen_config(&["max_new_tokens=600"]);
    config
        .set("prompt.user", Value::String(String::new()))
        .unwrap();
    let e = format!(
        "{:#}",
        generate(config, &RunOptions::default()).unwrap_err()
    );
    assert!(
        e.contains("exceeds the model's max_seq_len (512); lower max_new_tokens to at most 512"),
        "{e}"
    );
    // The last generated token is never fed back, so exactly that many fit.
    let mut config = gen_config(&["max_new_tokens=512", "temperature=0"]);
    config
        .set("prompt.user", Value::String(String::new()))
        .unwrap();
    generate(config, &RunOptions::default()).unwrap();
}

/// A null temperature is an error naming the key (it sampled at a hidden 0.6).
#[test]
fn a_null_temperature_is_refused() {
    tune_recipes::link();
    let e = format!(
        "{:#}",
        generate(gen_config(&["temperature=null"]), &RunOptions::default()).unwrap_err()
    );
    assert!(
        e.contains("temperature is null or missing") && e.contains("0 for greedy"),
        "{e}"
    );
}

/// The benchmark: greedy tokens/s of stories260K on the CPU, with and without the KV cache.
/// `cargo test -p tune-recipes --test generate_stories -- --ignored --nocapture`
#[test]
#[ignore]
fn benchmark_tokens_per_second() {
    for cache in ["True", "False"] {
        let overrides = [
            "temperature=0",
            "max_new_tokens=256",
            &format!("enable_kv_cache={cache}"),
        ];
        // Best of three.
        let best = (0..3)
            .map(|_| run(gen_config(&overrides), Some("")).tokens_per_second())
            .fold(0.0, f64::max);
        eprintln!("enable_kv_cache={cache}: 256 greedy tokens from BOS, {best:.0} tokens/s");
    }
}

#[test]
fn bundled_configs_validate_and_register() {
    tune_recipes::link();
    for name in [
        "llama2/7B_eval",
        "stories260K/eval",
        "llama2/generation",
        "stories260K/generation",
    ] {
        let path = common::root().join(format!("configs/{name}.yaml"));
        let config = tune_core::Config::load(&path).unwrap();
        let problems = tune_core::validate::validate(&config);
        assert!(problems.is_empty(), "{name}: {problems:?}");
    }
    let generate = tune_core::recipe::lookup("generate").unwrap();
    assert_eq!(
        generate.configs(),
        ["llama2/generation", "stories260K/generation"]
    );
    let eval = tune_core::recipe::lookup("eleuther_eval").unwrap();
    assert_eq!(eval.configs(), ["llama2/7B_eval", "stories260K/eval"]);
    // A dry run builds nothing heavy and returns no output.
    let dry = RunOptions {
        dry_run: true,
        ..Default::default()
    };
    assert!(generate::generate(gen_config(&[]), &dry).unwrap().is_none());
    // Nor does it need the device (a GPU config checked on a laptop).
    if !cfg!(feature = "cuda") {
        let on_gpu = gen_config(&["device=cuda", "dtype=bf16"]);
        assert!(generate::generate(on_gpu.clone(), &dry).unwrap().is_none());
        assert!(generate::generate(on_gpu, &RunOptions::default()).is_err());
    }
    // It does check that the tokens fit the model, as the run would.
    let e = format!(
        "{:#}",
        generate::generate(gen_config(&["max_new_tokens=100000"]), &dry).unwrap_err()
    );
    assert!(e.contains("exceeds the model's max_seq_len (512)"), "{e}");
    // And that the adapter it names is there.
    let e = format!(
        "{:#}",
        generate::generate(gen_config(&["adapter_dir=/nonexistent/adapter"]), &dry).unwrap_err()
    );
    assert!(e.contains("/nonexistent/adapter does not exist"), "{e}");
}

#[test]
fn a_prompt_longer_than_the_model_is_named_as_such() {
    tune_recipes::link();
    let mut config = gen_config(&["max_new_tokens=0"]);
    config
        .set(
            "prompt.user",
            Value::String("once upon a time ".repeat(200)),
        )
        .unwrap();
    let e = format!(
        "{:#}",
        generate(config, &RunOptions::default()).unwrap_err()
    );
    assert!(
        e.contains("more than the model's max_seq_len (512); shorten the prompt"),
        "{e}"
    );
}

/// An epoch folder's merged weights already hold its adapter: applying it again is refused.
#[test]
fn an_adapter_is_not_applied_to_the_merged_weights_that_hold_it() {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    tune_recipes::lora_finetune_single_device::train(
        common::stories_config(work.path(), &["max_steps_per_epoch=1"]),
        &RunOptions::default(),
    )
    .unwrap();
    let epoch = work.path().join("output/epoch_0");
    let dir = format!("checkpointer.checkpoint_dir={}", epoch.display());
    let files = "checkpointer.checkpoint_files=[model.safetensors.index.json]";
    for adapter in [epoch.clone(), epoch.join("adapter")] {
        let adapter_dir = format!("adapter_dir={}", adapter.display());
        let config = gen_config(&[&dir, files, &adapter_dir]);
        let e = format!(
            "{:#}",
            generate(config, &RunOptions::default()).unwrap_err()
        );
        assert!(e.contains("already include the adapter"), "{e}");
    }
    // With the config's `checkpoint_files: [model.safetensors]`, the error names the file to
    // use (the folder holds an adapter too, but the merged weights are the point).
    let e = format!(
        "{:#}",
        generate(gen_config(&[&dir]), &RunOptions::default()).unwrap_err()
    );
    assert!(
        e.contains("try checkpointer.checkpoint_files=[model.safetensors.index.json]")
            && !e.contains("no model weights"),
        "{e}"
    );
    // The merged weights alone generate.
    let text = run(gen_config(&[&dir, files, "max_new_tokens=8"]), None);
    assert!(!text.token_ids.is_empty());

    // torchtune's layout: the adapter files beside the merged model, no recipe_state/.
    let flat = work.path().join("torchtune_epoch_0");
    std::fs::create_dir(&flat).unwrap();
    for entry in std::fs::read_dir(&epoch).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, flat.join(path.file_name().unwrap())).unwrap();
        }
    }
    for name in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(epoch.join("adapter").join(name), flat.join(name)).unwrap();
    }
    let dir = format!("checkpointer.checkpoint_dir={}", flat.display());
    let adapter_dir = format!("adapter_dir={}", flat.display());
    let config = gen_config(&[&dir, files, &adapter_dir]);
    let e = format!(
        "{:#}",
        generate(config, &RunOptions::default()).unwrap_err()
    );
    assert!(e.contains("already include the adapter"), "{e}");
}

/// With save_adapter_weights_only the epoch folder still gets checkpoint_dir's config and
/// tokenizer files (as torchtune's), has no merged weights, and its adapter applies to the base.
#[test]
fn an_adapter_only_checkpoint_keeps_the_model_files_and_applies_to_the_base() {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    tune_recipes::lora_finetune_single_device::train(
        common::stories_config(
            work.path(),
            &["max_steps_per_epoch=1", "save_adapter_weights_only=True"],
        ),
        &RunOptions::default(),
    )
    .unwrap();
    let epoch = work.path().join("output/epoch_0");
    for name in [
        "config.json",
        "generation_config.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        assert!(
            epoch.join(name).is_file(),
            "{name} missing from {}",
            epoch.display()
        );
    }
    let weights: Vec<_> = std::fs::read_dir(&epoch)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .collect();
    assert!(weights.is_empty(), "{weights:?}");
    let adapter_dir = format!("adapter_dir={}", epoch.display());
    let text = run(gen_config(&[&adapter_dir, "max_new_tokens=8"]), None);
    assert!(!text.token_ids.is_empty());
    // Pointed at the epoch folder as a model, the missing weights are the problem named.
    let dir = format!("checkpointer.checkpoint_dir={}", epoch.display());
    let e = format!(
        "{:#}",
        generate(gen_config(&[&dir, &adapter_dir]), &RunOptions::default()).unwrap_err()
    );
    assert!(!e.contains("already include the adapter"), "{e}");
    assert!(
        e.contains("holds an adapter but no model weights") && e.contains("base model"),
        "{e}"
    );
}

/// torchtune's generate recipe, greedy, prints the same (`tests/fixtures/generate/
/// torchtune_greedy.json`): a plain prompt, and a system + user prompt through the Llama-2 chat
/// template.
#[test]
fn greedy_generation_prints_what_torchtune_printed() {
    let path = common::root().join("tests/fixtures/generate/torchtune_greedy.json");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let mut overrides = vec!["top_k=1".to_string(), "max_new_tokens=40".to_string()];
        overrides.extend(
            case["overrides"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o.as_str().unwrap().to_string()),
        );
        let refs: Vec<&str> = overrides.iter().map(String::as_str).collect();
        let got = run(gen_config(&refs), None);
        assert_eq!(
            got.full_text,
            case["printed"].as_str().unwrap(),
            "{overrides:?}"
        );
    }
}
