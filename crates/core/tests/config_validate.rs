//! `validate`: every component node checked against the registry, every problem reported.

mod config_support;

use config_support::lora_7b;
use tune_core::registry;
use tune_core::validate::validate;
use tune_core::Config;

fn problems(text: &str) -> Vec<String> {
    validate(&Config::from_yaml_str(text).unwrap())
}

const GOOD: &str = "
output_dir: /tmp/out
model:
  _component_: torchtune.models.llama2.lora_llama2_7b
  lora_attn_modules: ['q_proj', 'v_proj']
  lora_rank: 8
checkpointer:
  _component_: torchtune.training.FullModelHFCheckpointer
  checkpoint_dir: /ckpt
  checkpoint_files: [model.safetensors]
  output_dir: ${output_dir}
  model_type: LLAMA2
dataset:
  _component_: torchtune.datasets.alpaca_dataset
  source: json
  data_files: data.json
";

#[test]
fn a_good_config_has_no_problems() {
    assert_eq!(problems(GOOD), Vec::<String>::new());
}

#[test]
fn the_builtin_config_checks_the_components_that_are_registered() {
    // Only the model and checkpointer are registered in this test binary; everything else is
    // reported as unknown, and nothing else is wrong.
    let found = validate(&lora_7b());
    assert!(!found.is_empty());
    for p in &found {
        assert!(p.contains("unknown _component_"), "{p}");
    }
    assert!(
        !found
            .iter()
            .any(|p| p.starts_with("model:") || p.starts_with("checkpointer:")),
        "{found:?}"
    );
}

#[test]
fn unknown_component_names_the_closest() {
    let found = problems("model:\n  _component_: torchtune.models.llama2.lora_llama2_7bb\n  lora_attn_modules: [q_proj]\n");
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0]
            .starts_with("model: unknown _component_ `torchtune.models.llama2.lora_llama2_7bb`"),
        "{}",
        found[0]
    );
    assert!(
        found[0].contains("closest registered names: torchtune.models.llama2.lora_llama2_7b"),
        "{}",
        found[0]
    );

    let e = registry::lookup("lora_llama2_7").err().unwrap().to_string();
    assert!(e.contains("lora_llama2_7b"), "{e}");
    let e = registry::lookup("completely.different.thing")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("tune ls --components"), "{e}");
}

#[test]
fn short_aliases_are_accepted() {
    let found = problems("model:\n  _component_: lora_llama2_7b\n  lora_attn_modules: [q_proj]\n");
    assert_eq!(found, Vec::<String>::new());
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = "
model:
  _component_: torchtune.models.llama2.lora_llama2_7b
  lora_attn_modules: q_proj
  lora_rnak: 8
  lora_alpha: sixteen
checkpointer:
  _component_: torchtune.training.FullModelHFCheckpointer
  checkpoint_dir: /ckpt
  checkpoint_files: [model.safetensors]
  model_type: LLAMA2
optimizer:
  _component_: torch.optim.AdamWW
";
    let found = problems(text);
    let expect = [
        "model: lora_llama2_7b.lora_attn_modules: expected list[str], found the string \"q_proj\"",
        "model: unknown key `lora_rnak` for lora_llama2_7b; did you mean `lora_rank`?",
        "model: lora_llama2_7b.lora_alpha: expected float, found the string \"sixteen\"",
        "checkpointer: FullModelHFCheckpointer: missing required argument `output_dir` (str)",
        "optimizer: unknown _component_ `torch.optim.AdamWW`",
    ];
    assert_eq!(found.len(), expect.len(), "{found:#?}");
    for (got, want) in found.iter().zip(expect) {
        assert!(got.starts_with(want), "got {got:?}, want {want:?}");
    }
}

#[test]
fn nested_component_nodes_are_checked() {
    let text = "
wrapper:
  inner:
    _component_: torchtune.models.llama2.lora_llama2_7b
    lora_attn_modules: [q_proj]
    lora_rnak: 8
  list:
    - _component_: torchtune.datasets.alpaca_dataset
      packed: maybe
";
    let found = problems(text);
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(
        found[0].starts_with("wrapper.inner: unknown key `lora_rnak`"),
        "{}",
        found[0]
    );
    assert!(
        found[1].starts_with("wrapper.list.0: alpaca_dataset.packed: expected bool"),
        "{}",
        found[1]
    );
}

#[test]
fn component_must_be_a_string() {
    let found = problems("model:\n  _component_: 3\n");
    assert_eq!(found.len(), 1);
    assert!(
        found[0].contains("model._component_ must be a dotted name"),
        "{}",
        found[0]
    );
}

#[test]
fn interpolations_are_resolved_before_checking() {
    let ok = problems("rank: 8\nmodel:\n  _component_: lora_llama2_7b\n  lora_attn_modules: [q_proj]\n  lora_rank: ${rank}\n");
    assert_eq!(ok, Vec::<String>::new());
    let bad = problems("model:\n  _component_: lora_llama2_7b\n  lora_attn_modules: [q_proj]\n  lora_rank: ${rnak}\n");
    assert_eq!(bad.len(), 2, "{bad:#?}");
    assert!(
        bad[0].contains("in `model.lora_rank`") && bad[0].contains("names no key"),
        "{}",
        bad[0]
    );
    assert!(bad[1].contains("expected int"), "{}", bad[1]);
}

/// `build_as` keeps each failure's cause distinguishable, so recipes can add the right hint.
#[test]
fn build_as_tells_unknown_wrong_kind_and_wrong_type_apart() {
    use tune_core::ComponentKind;
    let node: serde_yaml::Value =
        serde_yaml::from_str("{lora_attn_modules: [q_proj], lora_rank: 4}").unwrap();

    let unknown =
        registry::build_as::<()>("lora_llama2_7bb", ComponentKind::Model, &node).unwrap_err();
    assert!(unknown.is::<registry::RegistryError>(), "{unknown:#}");
    assert!(
        format!("{unknown}").contains("lora_llama2_7b"),
        "{unknown:#}"
    );

    let kind = registry::build_as::<()>("lora_llama2_7b", ComponentKind::Loss, &node).unwrap_err();
    assert_eq!(
        format!("{kind}"),
        "`lora_llama2_7b` is a model component; this node needs a loss component"
    );

    let wrong_type =
        registry::build_as::<String>("lora_llama2_7b", ComponentKind::Model, &node).unwrap_err();
    assert!(wrong_type.is::<registry::WrongType>(), "{wrong_type:#}");

    let bad_args: serde_yaml::Value = serde_yaml::from_str("{lora_rank: 4}").unwrap();
    let build =
        registry::build_as::<()>("lora_llama2_7b", ComponentKind::Model, &bad_args).unwrap_err();
    assert!(
        format!("{build}").contains("lora_attn_modules"),
        "{build:#}"
    );

    registry::build_as::<()>("lora_llama2_7b", ComponentKind::Model, &node).unwrap();
}

/// YAML merge keys (`<<: *defaults`), which OmegaConf applies, share blocks between nodes; keys
/// written beside them win.
#[test]
fn merge_keys_are_applied() {
    let config = Config::from_yaml_str(
        "opt_defaults: &defaults {lr: 3e-4, weight_decay: 0.01}\n\
         optimizer:\n  <<: *defaults\n  _component_: torch.optim.AdamW\n  lr: 1e-3\n",
    )
    .unwrap();
    assert_eq!(
        config.get("optimizer.weight_decay"),
        Some(&serde_yaml::from_str("0.01").unwrap())
    );
    assert_eq!(
        config.get("optimizer.lr"),
        Some(&serde_yaml::from_str("1e-3").unwrap())
    );
    assert!(config.get("optimizer.<<").is_none());
    // A block merging a block that merges another.
    let config = Config::from_yaml_str(
        "base: &base {x: 1}\nmid: &mid {<<: *base, y: 2}\ntop: {<<: *mid, z: 3}\n",
    )
    .unwrap();
    assert_eq!(
        config.get("top"),
        Some(&serde_yaml::from_str("{z: 3, y: 2, x: 1}").unwrap())
    );
}

/// A key given twice is named with the lines it is on (the YAML parser points at the mapping).
#[test]
fn a_duplicate_key_names_its_lines() {
    let e = Config::from_yaml_str(
        "# comment\noutput_dir: /tmp/x\nbatch_size: 4\nseed: 1\nbatch_size: 8\n",
    )
    .unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains("`batch_size` is given more than once in one mapping (lines 3, 5)"),
        "{e}"
    );
    // In a nested mapping, only that mapping's lines (not `model`'s max_seq_len).
    let e = Config::from_yaml_str(
        "model:\n  max_seq_len: 512\ntokenizer:\n  path: t\n  max_seq_len: 64\n\n  max_seq_len: 128\nseed: 1\n",
    )
    .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("(lines 5, 7)"), "{e}");
}

/// An escaped `\${b}` is the literal `${b}` once resolved: checking the resolved config must not
/// resolve it again (`tune run` checks after resolving).
#[test]
fn an_escaped_reference_stays_literal_through_the_checks() {
    let mut config = Config::from_yaml_str("note: a \\${b}\n").unwrap();
    assert_eq!(validate(&config), Vec::<String>::new());
    config.resolve_interpolations().unwrap();
    assert_eq!(config.get("note"), Some(&serde_yaml::Value::from("a ${b}")));
    assert_eq!(
        tune_core::validate::validate_resolved(&config),
        Vec::<String>::new()
    );
}
