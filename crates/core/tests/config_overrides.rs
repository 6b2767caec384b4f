//! torchtune's command-line override grammar (`Config::apply_overrides`), on the real
//! `llama2/7B_lora_single_device` config.

mod config_support;

use config_support::{apply, apply_err, lora_7b, yaml};
use serde_yaml::Value;
use tune_core::config::{parse_override, parse_value, Override};
use tune_core::Config;

#[test]
fn seed_overrides_at_top_level_are_errors_that_point_at_the_model() {
    let mut config = lora_7b();
    let before = config.clone();
    let err = apply_err(
        &mut config,
        &[
            "lora_attn_modules=['q_proj','k_proj','v_proj','output_proj']",
            "lora_rank=32",
            "lora_alpha=64",
            "output_dir=./lora_experiment_1",
        ],
    );
    assert!(err.starts_with("3 invalid overrides"), "{err}");
    assert!(err.contains("did you mean model.lora_rank=32?"), "{err}");
    assert!(err.contains("did you mean model.lora_alpha=64?"), "{err}");
    assert!(
        err.contains(
            "did you mean model.lora_attn_modules=['q_proj','k_proj','v_proj','output_proj']?"
        ),
        "{err}"
    );
    assert!(
        !err.contains("output_dir"),
        "output_dir is a real top-level key: {err}"
    );
    assert_eq!(config, before, "a failed set of overrides changes nothing");
}

#[test]
fn seed_overrides_on_the_model_node_apply_and_interpolate() {
    let mut config = lora_7b();
    apply(
        &mut config,
        &[
            "model.lora_attn_modules=['q_proj','k_proj','v_proj','output_proj']",
            "model.lora_rank=32",
            "model.lora_alpha=64",
            "output_dir=./lora_experiment_1",
        ],
    )
    .unwrap();
    config.resolve_interpolations().unwrap();
    assert_eq!(
        config.get("model.lora_attn_modules"),
        Some(&yaml("[q_proj, k_proj, v_proj, output_proj]"))
    );
    assert_eq!(config.get("model.lora_rank"), Some(&yaml("32")));
    assert_eq!(config.get("model.lora_alpha"), Some(&yaml("64")));
    assert_eq!(
        config.get("checkpointer.output_dir"),
        Some(&yaml("./lora_experiment_1"))
    );
    assert_eq!(
        config.get("metric_logger.log_dir"),
        Some(&yaml("./lora_experiment_1/logs"))
    );
    assert_eq!(
        config.get("profiler.output_dir"),
        Some(&yaml("./lora_experiment_1/profiling_outputs"))
    );
}

#[test]
fn lists_in_all_three_spellings_are_the_same() {
    let expected = yaml("[q_proj, v_proj]");
    for raw in [
        "[q_proj,v_proj]",
        "['q_proj','v_proj']",
        "[\"q_proj\", \"v_proj\"]",
        "[ q_proj , v_proj ]",
        "[q_proj,v_proj,]",
    ] {
        assert_eq!(parse_value(raw).unwrap(), expected, "{raw}");
        let mut config = lora_7b();
        apply(&mut config, &[&format!("model.lora_attn_modules={raw}")]).unwrap();
        assert_eq!(
            config.get("model.lora_attn_modules"),
            Some(&expected),
            "{raw}"
        );
    }
}

#[test]
fn checkpoint_files_list_override() {
    let mut config = lora_7b();
    apply(&mut config, &["checkpointer.checkpoint_files=[a,b]"]).unwrap();
    assert_eq!(
        config.get("checkpointer.checkpoint_files"),
        Some(&yaml("[a, b]"))
    );
    apply(
        &mut config,
        &["checkpointer.checkpoint_files=model.safetensors"],
    )
    .unwrap();
    assert_eq!(
        config.get("checkpointer.checkpoint_files"),
        Some(&yaml("model.safetensors"))
    );
    apply(&mut config, &["checkpointer.checkpoint_files.0=x"]).unwrap_err();
}

#[test]
fn deletion() {
    let mut config = lora_7b();
    apply(
        &mut config,
        &[
            "~profiler",
            "~model.lora_dropout",
            "~checkpointer.checkpoint_files.1",
        ],
    )
    .unwrap();
    assert!(config.get("profiler").is_none());
    assert!(config.get("model.lora_dropout").is_none());
    assert_eq!(
        config.get("checkpointer.checkpoint_files"),
        Some(&yaml("[pytorch_model-00001-of-00002.bin]"))
    );

    let err = apply_err(&mut config, &["~model.lora_rnak"]);
    assert!(
        err.contains("no key `model.lora_rnak`")
            && err.contains("did you mean `~model.lora_rank`?"),
        "{err}"
    );
    let err = apply_err(&mut config, &["~model._component_"]);
    assert!(err.contains("delete the whole node with `~model`"), "{err}");
    let err = apply_err(&mut config, &["~seed=1"]);
    assert!(err.contains("takes no value"), "{err}");
}

/// As torchtune's parser: deletions act on the config as loaded, before any `key=value`, and a
/// mapping they leave empty goes too.
#[test]
fn deletions_apply_first_and_take_emptied_mappings() {
    for order in [
        ["model.lora_rank=16", "~model.lora_rank"],
        ["~model.lora_rank", "model.lora_rank=16"],
    ] {
        let mut config = lora_7b();
        apply(&mut config, &order).unwrap();
        assert_eq!(
            config.get("model.lora_rank"),
            Some(&yaml("16")),
            "{order:?}"
        );
    }
    let mut config = Config::from_yaml_str(
        "a:
  b:
    c: 1
d: 2
",
    )
    .unwrap();
    apply(&mut config, &["~a.b.c"]).unwrap();
    assert!(config.get("a").is_none(), "{}", config.to_yaml_string());
    // A string replaced by a mapping: deleted first, whatever the order typed.
    let mut config = Config::from_yaml_str("data_files: x.json\n").unwrap();
    let err = apply_err(&mut config, &["data_files.train=a.json"]);
    assert!(
        err.contains("delete it as well: `~data_files data_files.train=...`"),
        "{err}"
    );
    apply(&mut config, &["data_files.train=a.json", "~data_files"]).unwrap();
    assert_eq!(config.get("data_files.train"), Some(&yaml("a.json")));
    // A key only an override adds cannot be deleted (torchtune: not in the YAML).
    let mut config = lora_7b();
    apply_err(&mut config, &["extra_key=1", "~extra_key"]);
}

#[test]
fn component_shorthand() {
    let mut config = lora_7b();
    apply(
        &mut config,
        &[
            "model=torchtune.models.llama2.lora_llama2_13b",
            "model.lora_rank=16",
        ],
    )
    .unwrap();
    assert_eq!(
        config.get("model._component_"),
        Some(&yaml("torchtune.models.llama2.lora_llama2_13b"))
    );
    assert_eq!(config.get("model.lora_rank"), Some(&yaml("16")));
    assert!(
        config.get("model.lora_attn_modules").is_some(),
        "the node's other keys stay"
    );

    let err = apply_err(&mut config, &["model=null"]);
    assert!(
        err.contains("`model` is a component node") && err.contains("`~model`"),
        "{err}"
    );
}

#[test]
fn null_in_both_spellings() {
    let mut config = lora_7b();
    apply(&mut config, &["seed=42", "tokenizer.max_seq_len=None"]).unwrap();
    assert_eq!(config.get("seed"), Some(&yaml("42")));
    assert_eq!(config.get("tokenizer.max_seq_len"), Some(&Value::Null));
    apply(&mut config, &["seed=null", "max_steps_per_epoch=~"]).unwrap();
    assert_eq!(config.get("seed"), Some(&Value::Null));
    assert_eq!(config.get("max_steps_per_epoch"), Some(&Value::Null));
}

#[test]
fn numbers() {
    let f = |raw: &str| parse_value(raw).unwrap().as_f64().unwrap();
    assert_eq!(f("3e-4"), 3e-4);
    assert_eq!(f("1e-5"), 1e-5);
    assert_eq!(f("1.0e-05"), 1e-5);
    assert_eq!(f("2E+3"), 2000.0);
    assert_eq!(f("0.5"), 0.5);
    assert_eq!(f(".5"), 0.5);
    assert_eq!(f("-0.25"), -0.25);
    assert!(f("inf").is_infinite());
    assert!(
        parse_value("3e-4").unwrap().as_i64().is_none(),
        "3e-4 is a float"
    );
    assert_eq!(parse_value("8").unwrap().as_i64(), Some(8));
    assert_eq!(parse_value("-1").unwrap().as_i64(), Some(-1));
    assert_eq!(parse_value("0").unwrap().as_i64(), Some(0));
    // A leading zero keeps the text (torchtune forces this for `max_filename: "00015"`).
    assert_eq!(parse_value("00015").unwrap(), yaml("'00015'"));
    // Not numbers.
    for s in ["1e", "e5", "1.2.3", "3e-4x", "0x10", "1_000", "v1.5"] {
        assert!(parse_value(s).unwrap().is_string(), "{s}");
    }

    let mut config = lora_7b();
    apply(
        &mut config,
        &[
            "optimizer.lr=3e-4",
            "batch_size=8",
            "gradient_accumulation_steps=1",
        ],
    )
    .unwrap();
    assert_eq!(
        config.get("optimizer.lr").and_then(Value::as_f64),
        Some(3e-4)
    );
    assert_eq!(config.get("batch_size"), Some(&yaml("8")));
}

#[test]
fn bools() {
    for (raw, b) in [
        ("True", true),
        ("true", true),
        ("TRUE", true),
        ("False", false),
        ("false", false),
    ] {
        assert_eq!(parse_value(raw).unwrap(), Value::Bool(b), "{raw}");
    }
    let mut config = lora_7b();
    apply(
        &mut config,
        &["model.apply_lora_to_output=True", "shuffle=false"],
    )
    .unwrap();
    assert_eq!(
        config.get("model.apply_lora_to_output"),
        Some(&Value::Bool(true))
    );
    assert_eq!(config.get("shuffle"), Some(&Value::Bool(false)));
    // YAML 1.1 spellings (PyYAML's, so torchtune's) pass where a bool or a number belongs.
    apply(
        &mut config,
        &["model.apply_lora_to_output=yes", "model.lora_rank=1_6"],
    )
    .unwrap();
    assert_eq!(config.get("model.lora_rank"), Some(&yaml("1_6")));
}

#[test]
fn strings_and_quoting() {
    assert_eq!(parse_value("json").unwrap(), yaml("json"));
    assert_eq!(parse_value("'123'").unwrap(), yaml("'123'"));
    assert_eq!(parse_value("\"True\"").unwrap(), yaml("'True'"));
    assert_eq!(parse_value("'it''s'").unwrap(), yaml("\"it's\""));
    assert_eq!(parse_value("a b").unwrap(), yaml("a b"));
    assert_eq!(
        parse_value("{a: 1, b: [x]}").unwrap(),
        yaml("{a: 1, b: [x]}")
    );
    assert_eq!(parse_value("[[1, 2], [3]]").unwrap(), yaml("[[1, 2], [3]]"));
    assert_eq!(parse_value("['a,b', c]").unwrap(), yaml("['a,b', c]"));

    // A value may hold `=`; only the first one splits.
    assert_eq!(
        parse_override("dataset.filter=a=b").unwrap(),
        Override::Set {
            key: "dataset.filter".into(),
            raw: "a=b".into(),
            value: yaml("a=b")
        }
    );
    assert_eq!(
        parse_override("~a.b").unwrap(),
        Override::Delete { key: "a.b".into() }
    );
}

#[test]
fn new_keys_are_created() {
    let mut config = lora_7b();
    apply(
        &mut config,
        &[
            "my_recipe_flag=3",
            "fsdp.cpu_offload=False",
            "profiler.enabled=True",
        ],
    )
    .unwrap();
    assert_eq!(config.get("my_recipe_flag"), Some(&yaml("3")));
    assert_eq!(config.get("fsdp.cpu_offload"), Some(&Value::Bool(false)));
    assert_eq!(config.get("profiler.enabled"), Some(&Value::Bool(true)));
    // A null node becomes a mapping.
    let mut config = Config::from_yaml_str("a: null").unwrap();
    apply(&mut config, &["a.b=1"]).unwrap();
    assert_eq!(config.get("a.b"), Some(&yaml("1")));
}

#[test]
fn typo_in_a_component_key_gets_a_suggestion() {
    let mut config = lora_7b();
    let err = apply_err(&mut config, &["model.lora_rnak=32"]);
    assert!(
        err.contains("unknown key `lora_rnak` for lora_llama2_7b; did you mean `lora_rank`?"),
        "{err}"
    );
    // Also when the typo is in the middle of the path.
    let err = apply_err(&mut config, &["checkpointer.outptu_dir.x=1"]);
    assert!(err.contains("did you mean `output_dir`?"), "{err}");
    // A component that takes extra keyword arguments accepts new keys.
    let mut config =
        Config::from_yaml_str("dataset:\n  _component_: torchtune.datasets.alpaca_dataset\n")
            .unwrap();
    apply(
        &mut config,
        &["dataset.data_files=x.json", "dataset.source=json"],
    )
    .unwrap();
}

#[test]
fn wrong_type_for_a_component_argument() {
    let mut config = lora_7b();
    let err = apply_err(&mut config, &["model.lora_rank=eight"]);
    assert!(
        err.contains("lora_llama2_7b.lora_rank: expected int"),
        "{err}"
    );
    let err = apply_err(&mut config, &["model.apply_lora_to_mlp=maybe"]);
    assert!(err.contains("expected bool"), "{err}");
    // An interpolation is checked after it is resolved, not before.
    apply(&mut config, &["model.lora_rank=${batch_size}"]).unwrap();
    config.resolve_interpolations().unwrap();
    assert_eq!(config.get("model.lora_rank"), Some(&yaml("2")));
}

#[test]
fn lists_that_cannot_be_what_was_meant_are_errors() {
    let cases: &[(&str, &str)] = &[
        // torchtune issue #1486: the list arrives as one string.
        ("model.lora_attn_modules=\"['q_proj','v_proj']\"", "not a list: the brackets were quoted"),
        ("model.lora_attn_modules='[q_proj,v_proj]'", "not a list: the brackets were quoted"),
        ("model.lora_attn_modules=[]", "empty list, which is almost never intended; list the items, e.g. model.lora_attn_modules=[q_proj,v_proj]"),
        ("model.lora_attn_modules=[ ]", "empty list"),
        ("model.lora_attn_modules=q_proj,v_proj", "takes a list, but got the string \"q_proj,v_proj\"; write model.lora_attn_modules=[q_proj,v_proj]"),
        ("model.lora_attn_modules=q_proj", "takes a list"),
        // A Python tuple becomes a list, not a list holding the tuple's text.
        ("model.lora_attn_modules=(q_proj,v_proj)", "write model.lora_attn_modules=[q_proj,v_proj]"),
        ("model.lora_attn_modules=[\"'q_proj'\",v_proj]", "holds quotes or brackets"),
        ("model.lora_attn_modules=['a,b']", "holds a comma"),
        ("model.lora_attn_modules=[q_proj,", "no closing `]`"),
        ("model.lora_attn_modules=[q_proj,,v_proj]", "empty item"),
        ("model.lora_attn_modules=['q_proj,v_proj]", "unterminated quote"),
        ("checkpointer.checkpoint_files=a.bin,b.bin", "holds commas; for several values write checkpointer.checkpoint_files=[a.bin,b.bin]"),
        // The LoRA example only where it fits.
        ("seed=[]", "empty list, which is almost never intended; list the items, or delete the key with ~seed"),
    ];
    for (arg, expected) in cases {
        let mut config = lora_7b();
        let err = apply_err(&mut config, &[arg]);
        assert!(err.contains(expected), "{arg}: {err}");
    }
}

#[test]
fn brackets_are_text_where_no_list_belongs() {
    let mut config = lora_7b();
    apply(
        &mut config,
        &[
            "prompt.user=\"[INST] Tell me a joke [/INST]\"",
            "run_name='[a]'",
        ],
    )
    .unwrap();
    assert_eq!(
        config.get("prompt.user"),
        Some(&yaml("'[INST] Tell me a joke [/INST]'"))
    );
    assert_eq!(config.get("run_name"), Some(&yaml("'[a]'")));
}

#[test]
fn a_new_top_level_key_that_the_config_refers_to_is_not_misplaced() {
    // `lora_rank` is a model argument, but here it is a variable the model node reads.
    let mut config = lora_7b();
    apply(
        &mut config,
        &["lora_rank=16", "model.lora_rank=${lora_rank}"],
    )
    .unwrap();
    config.resolve_interpolations().unwrap();
    assert_eq!(config.get("model.lora_rank"), Some(&yaml("16")));
    let err = apply_err(&mut lora_7b(), &["lora_rank=16"]);
    assert!(err.contains("did you mean model.lora_rank=16?"), "{err}");
}

#[test]
fn absurdly_nested_values_are_an_error_not_a_crash() {
    let deep = format!("foo={}a{}", "[".repeat(30_000), "]".repeat(30_000));
    let err = apply_err(&mut lora_7b(), &[deep.as_str()]);
    assert!(err.contains("more than 32 deep"), "{err}");
    apply(&mut lora_7b(), &["foo=[[a, [b]], {c: [d]}]"]).unwrap();
}

#[test]
fn malformed_overrides() {
    let cases: &[(&str, &str)] = &[
        ("lora_rank", "must be `key=value`"),
        ("seed=", "the value is empty"),
        ("=3", "the key is empty"),
        ("model..lora_rank=3", "empty segment"),
        ("model lora_rank=3", "contains ' '"),
        (
            "batch_size.x=1",
            "`batch_size` is the number 2, not a mapping",
        ),
        ("seed='abc", "unterminated quote"),
        ("seed={a: [}", "not a valid mapping"),
    ];
    for (arg, expected) in cases {
        let mut config = lora_7b();
        let err = apply_err(&mut config, &[arg]);
        assert!(err.contains(expected), "{arg}: {err}");
    }
}

#[test]
fn later_overrides_see_earlier_ones() {
    let mut config = lora_7b();
    apply(
        &mut config,
        &["~profiler", "profiler.enabled=True", "seed=1", "seed=2"],
    )
    .unwrap();
    assert_eq!(config.get("profiler"), Some(&yaml("{enabled: true}")));
    assert_eq!(config.get("seed"), Some(&yaml("2")));
}

#[test]
fn every_bad_override_is_reported_at_once() {
    let mut config = lora_7b();
    let err = apply_err(
        &mut config,
        &["seed=1", "model.lora_rnak=3", "~nope", "x", "batch_size=4"],
    );
    assert!(err.starts_with("3 invalid overrides"), "{err}");
    for bad in ["`model.lora_rnak=3`", "`~nope`", "`x`"] {
        assert!(err.contains(bad), "{bad} missing from {err}");
    }
}
