//! The registered components (built from YAML as a config would), and the error messages for
//! the mistakes users make: missing files, bad rows, empty data, unknown columns, hub sources.

mod common;

use std::path::Path;

use common::*;
use serde_yaml::Value as Yaml;
use tune_core::ComponentKind;
use tune_data::{CollateSft, DatasetSpec, Llama2Tokenizer, PromptTemplate};

fn build(yaml: &str) -> anyhow::Result<tune_core::registry::Built> {
    let node: Yaml = serde_yaml::from_str(yaml).unwrap();
    let name = node["_component_"].as_str().unwrap().to_string();
    tune_core::registry::lookup(&name)?.build_from(&node)
}

fn build_err(yaml: &str) -> String {
    match build(yaml) {
        Ok(_) => panic!("expected an error from {yaml}"),
        Err(e) => format!("{e:#}"),
    }
}

fn dataset(yaml: &str) -> DatasetSpec {
    *build(yaml).unwrap().downcast::<DatasetSpec>().unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn json_dataset(file: &str, extra: &str) -> String {
    format!("{{_component_: torchtune.datasets.alpaca_dataset, source: json, data_files: {file:?}{extra}}}")
}

fn tok512() -> Llama2Tokenizer {
    Llama2Tokenizer::new(tok512_path(), None, Some(PromptTemplate::Llama2Chat)).unwrap()
}

#[test]
fn components_are_registered_under_torchtune_names() {
    for (path, alias, kind) in [
        (
            "torchtune.models.llama2.llama2_tokenizer",
            "llama2_tokenizer",
            ComponentKind::Tokenizer,
        ),
        (
            "torchtune.datasets.alpaca_dataset",
            "alpaca_dataset",
            ComponentKind::Dataset,
        ),
        (
            "torchtune.datasets.alpaca_cleaned_dataset",
            "alpaca_cleaned_dataset",
            ComponentKind::Dataset,
        ),
        (
            "torchtune.data.padded_collate_sft",
            "padded_collate_sft",
            ComponentKind::Collator,
        ),
    ] {
        let c = tune_core::registry::lookup(path).unwrap();
        assert_eq!(c.kind, kind);
        assert_eq!(tune_core::registry::lookup(alias).unwrap().path, path);
    }
    let c = tune_core::registry::lookup("alpaca_dataset").unwrap();
    assert_eq!(c.arg("train_on_input").unwrap().default, Some("true"));
    assert_eq!(c.arg("split").unwrap().default, Some("train"));
    assert_eq!(c.arg("source").unwrap().default, Some("tatsu-lab/alpaca"));
    let c = tune_core::registry::lookup("alpaca_cleaned_dataset").unwrap();
    assert_eq!(
        c.arg("source").unwrap().default,
        Some("yahma/alpaca-cleaned")
    );
}

#[test]
fn llama2_tokenizer_component() {
    let path = tok512_path().display().to_string();
    let tok = build(&format!("{{_component_: torchtune.models.llama2.llama2_tokenizer, path: {path:?}, max_seq_len: 64}}"))
        .unwrap()
        .downcast::<Llama2Tokenizer>()
        .unwrap();
    assert_eq!(tok.max_seq_len(), Some(64));
    assert_eq!(tok.prompt_template(), Some(&PromptTemplate::Llama2Chat));
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (1, 2, 0));
    let tok = build(&format!(
        "{{_component_: llama2_tokenizer, path: {path:?}, prompt_template: null}}"
    ))
    .unwrap()
    .downcast::<Llama2Tokenizer>()
    .unwrap();
    assert_eq!((tok.max_seq_len(), tok.prompt_template()), (None, None));

    // A Hugging Face tokenizer.json works too (chosen by the extension).
    let json = fixtures()
        .join("tokenizer/hf_tok512/legacy.tokenizer.json")
        .display()
        .to_string();
    let tok = build(&format!(
        "{{_component_: llama2_tokenizer, path: {json:?}}}"
    ))
    .unwrap()
    .downcast::<Llama2Tokenizer>()
    .unwrap();
    let sp = Llama2Tokenizer::new(tok512_path(), None, None).unwrap();
    assert_eq!((tok.bos_id(), tok.eos_id()), (1, 2));
    assert_eq!(
        tok.encode("Hello world!", true, true, false),
        sp.encode("Hello world!", true, true, false)
    );
    assert_eq!(
        tok.encode("She ran.", false, false, true),
        sp.encode("She ran.", false, false, true)
    );
    assert_eq!(
        tok.decode(&sp.encode("Hello world!", true, true, false))
            .unwrap(),
        "Hello world!"
    );

    let err = build_err("{_component_: llama2_tokenizer, path: /no/such/tokenizer.model}");
    assert!(
        err.contains("/no/such/tokenizer.model") && err.contains("does not exist"),
        "{err}"
    );
    let err = build_err("{_component_: llama2_tokenizer}");
    assert!(err.contains("missing required argument `path`"), "{err}");
    let err = build_err(&format!(
        "{{_component_: llama2_tokenizer, path: {path:?}, max_seq_len: -5}}"
    ));
    assert!(err.contains("max_seq_len"), "{err}");
    let err = build_err(&format!(
        "{{_component_: llama2_tokenizer, path: {path:?}, prompt_template: some.Template}}"
    ));
    assert!(
        err.contains("prompt_template") && err.contains("not supported"),
        "{err}"
    );
}

#[test]
fn collate_component() {
    let c = build("{_component_: torchtune.data.padded_collate_sft}")
        .unwrap()
        .downcast::<CollateSft>()
        .unwrap();
    assert_eq!(
        *c,
        CollateSft {
            padding_idx: 0,
            ignore_idx: -100,
            pad_to_multiple_of: 1
        }
    );
    let c = build(
        "{_component_: padded_collate_sft, padding_idx: 3, ignore_idx: -1, pad_to_multiple_of: 8}",
    )
    .unwrap()
    .downcast::<CollateSft>()
    .unwrap();
    assert_eq!(
        *c,
        CollateSft {
            padding_idx: 3,
            ignore_idx: -1,
            pad_to_multiple_of: 8
        }
    );
    assert!(
        build_err("{_component_: padded_collate_sft, pad_to_multiple_of: 0}")
            .contains("pad_to_multiple_of")
    );
}

#[test]
fn hub_sources_and_unsupported_options_are_refused_with_the_fix() {
    let err = build_err("{_component_: torchtune.datasets.alpaca_cleaned_dataset}");
    assert!(
        err.contains("yahma/alpaca-cleaned")
            && err.contains("source: json")
            && err.contains("data_files"),
        "{err}"
    );
    let err =
        build_err("{_component_: alpaca_dataset, source: tatsu-lab/alpaca, data_files: x.json}");
    assert!(
        err.contains("cannot download x.json of Hugging Face Hub dataset \"tatsu-lab/alpaca\""),
        "{err}"
    );
    assert!(err.contains("source: json"), "{err}");
    let err = build_err("{_component_: alpaca_dataset, source: json}");
    assert!(err.contains("data_files"), "{err}");
    let err = build_err("{_component_: alpaca_dataset, source: arrow, data_files: x.arrow}");
    assert!(err.contains("convert the data to JSON"), "{err}");
    let err = build_err("{_component_: alpaca_dataset, source: csv}");
    assert!(err.contains("`source: csv` needs `data_files`"), "{err}");
    let err = build_err("{_component_: alpaca_dataset, source: json, data_files: x.json, column_map: {response: out}}");
    assert!(
        err.contains("unknown key `response`") && err.contains("instruction, input, output"),
        "{err}"
    );
    let err = build_err(
        "{_component_: alpaca_dataset, source: json, data_files: x.json, split: 'train[:5'}",
    );
    assert!(err.contains("split"), "{err}");
    let err = build_err(
        "{_component_: alpaca_dataset, source: json, data_files: x.json, shuffle_files: true}",
    );
    assert!(
        err.contains("unsupported argument `shuffle_files`"),
        "{err}"
    );
    let err = build_err(
        "{_component_: alpaca_dataset, source: json, data_files: x.json, train_on_input: maybe}",
    );
    assert!(err.contains("train_on_input"), "{err}");
}

#[test]
fn data_file_errors_name_the_file_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tok512();

    let missing = dir.path().join("missing.json").display().to_string();
    let err = format!(
        "{:#}",
        dataset(&json_dataset(&missing, "")).load(&tok).unwrap_err()
    );
    assert!(
        err.contains("missing.json") && err.contains("data_files"),
        "{err}"
    );

    let empty = write(dir.path(), "empty.json", "[]");
    let err = format!(
        "{:#}",
        dataset(&json_dataset(&empty, "")).load(&tok).unwrap_err()
    );
    assert!(
        err.contains("empty.json") && err.contains("no rows"),
        "{err}"
    );
    let blank = write(dir.path(), "blank.jsonl", "\n\n");
    let err = format!(
        "{:#}",
        dataset(&json_dataset(&blank, "")).load(&tok).unwrap_err()
    );
    assert!(
        err.contains("blank.jsonl") && err.contains("no rows"),
        "{err}"
    );

    let bad = write(
        dir.path(),
        "bad.jsonl",
        "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"a\", \n",
    );
    let err = format!(
        "{:#}",
        dataset(&json_dataset(&bad, "")).load(&tok).unwrap_err()
    );
    assert!(
        err.contains("bad.jsonl line 2") && err.contains("malformed JSON"),
        "{err}"
    );
    let bad_array = write(dir.path(), "bad.json", "[{\"instruction\": \"a\",}]");
    let err = format!(
        "{:#}",
        dataset(&json_dataset(&bad_array, ""))
            .load(&tok)
            .unwrap_err()
    );
    assert!(
        err.contains("bad.json") && err.contains("not valid JSON") && err.contains("line 1"),
        "{err}"
    );
    let not_rows = write(dir.path(), "numbers.json", "[1, 2]");
    let err = format!(
        "{:#}",
        dataset(&json_dataset(&not_rows, ""))
            .load(&tok)
            .unwrap_err()
    );
    assert!(
        err.contains("numbers.json") && err.contains("not an object"),
        "{err}"
    );

    let no_output = write(
        dir.path(),
        "no_output.json",
        r#"[{"instruction": "a", "output": "b"}, {"instruction": "a", "response": "b"}]"#,
    );
    let err = format!(
        "{:#}",
        dataset(&json_dataset(&no_output, ""))
            .load(&tok)
            .unwrap_err()
    );
    assert!(
        err.contains("no_output.json row 1")
            && err.contains("`output`")
            && err.contains("column_map"),
        "{err}"
    );
    let no_instruction = write(
        dir.path(),
        "no_instruction.jsonl",
        "{\"prompt\": \"a\", \"output\": \"b\"}\n",
    );
    let err = format!(
        "{:#}",
        dataset(&json_dataset(&no_instruction, ""))
            .load(&tok)
            .unwrap_err()
    );
    assert!(
        err.contains("no_instruction.jsonl line 1") && err.contains("`instruction`"),
        "{err}"
    );
    // A column_map that names a column the data lacks.
    let err = format!(
        "{:#}",
        dataset(&json_dataset(&no_output, ", column_map: {output: answer}"))
            .load(&tok)
            .unwrap_err()
    );
    assert!(err.contains("`answer`") && err.contains("row 0"), "{err}");

    let gsm8k = fixtures()
        .join("data/gsm8k_train_alpaca.json")
        .display()
        .to_string();
    let err = format!(
        "{:#}",
        dataset(&json_dataset(&gsm8k, ", split: 'train[5:5]'"))
            .load(&tok)
            .unwrap_err()
    );
    assert!(err.contains("selects no rows"), "{err}");
    let err = format!(
        "{:#}",
        dataset(&json_dataset(&gsm8k, ", split: test"))
            .load(&tok)
            .unwrap_err()
    );
    assert!(err.contains("\"test\" does not exist"), "{err}");
}

#[test]
fn file_layouts_and_splits() {
    let dir = tempfile::tempdir().unwrap();
    let rows = r#"[{"instruction": "i0", "input": "", "output": "o0"}, {"instruction": "i1", "output": "o1", "input": null}]"#;
    let array = write(dir.path(), "a.json", rows);
    let lines = write(
        dir.path(),
        "a.jsonl",
        "{\"instruction\": \"i0\", \"input\": \"\", \"output\": \"o0\"}\n\n{\"instruction\": \"i1\", \"output\": \"o1\", \"input\": null}\n",
    );
    let field = write(
        dir.path(),
        "field.json",
        &format!("{{\"version\": 1, \"data\": {rows}}}"),
    );
    let columns = write(
        dir.path(),
        "columns.json",
        "{\"instruction\": [\"i0\", \"i1\"],\n \"input\": [\"\", null],\n \"output\": [\"o0\", \"o1\"]}",
    );
    let tok = tok512();
    let want = dataset(&json_dataset(&array, "")).load(&tok).unwrap();
    assert_eq!(want.len(), 2);
    assert_eq!(dataset(&json_dataset(&lines, "")).load(&tok).unwrap(), want);
    assert_eq!(
        dataset(&json_dataset(&field, ", field: data"))
            .load(&tok)
            .unwrap(),
        want
    );
    assert_eq!(
        dataset(&json_dataset(&columns, "")).load(&tok).unwrap(),
        want
    );
    // A list of files is one split; a local file path works as the source too.
    let both = dataset(&format!(
        "{{_component_: alpaca_dataset, source: json, data_files: [{array:?}, {lines:?}]}}"
    ));
    assert_eq!(both.load(&tok).unwrap().len(), 4);
    let local = dataset(&format!(
        "{{_component_: alpaca_dataset, source: {array:?}}}"
    ));
    assert_eq!(local.load(&tok).unwrap(), want);
    // Splits named in a mapping, and slices.
    let mapped = format!("{{_component_: alpaca_dataset, source: json, data_files: {{train: {array:?}, validation: {lines:?}}}");
    assert_eq!(
        dataset(&format!("{mapped}, split: 'validation[1:]'}}"))
            .load(&tok)
            .unwrap(),
        want[1..]
    );
    let gsm8k = fixtures()
        .join("data/gsm8k_train_alpaca.json")
        .display()
        .to_string();
    assert_eq!(
        dataset(&json_dataset(&gsm8k, ", split: 'train[:10%]'"))
            .rows
            .rows()
            .unwrap()
            .len(),
        747
    );
    let tail = dataset(&json_dataset(&gsm8k, ", split: 'train[-3:]'"))
        .rows
        .rows()
        .unwrap();
    assert_eq!(
        tail.iter().map(|r| r.index).collect::<Vec<_>>(),
        [7470, 7471, 7472]
    );
}

#[test]
fn train_on_input_masks_the_prompt_only() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "one.json",
        r#"[{"instruction": "Say hi.", "output": "hi"}]"#,
    );
    let tok = tok512();
    let on = dataset(&json_dataset(&file, ""))
        .load(&tok)
        .unwrap()
        .remove(0);
    let off = dataset(&json_dataset(&file, ", train_on_input: false"))
        .load(&tok)
        .unwrap()
        .remove(0);
    assert_eq!(on.tokens, off.tokens);
    assert_eq!(
        on.labels,
        on.tokens.iter().map(|&t| i64::from(t)).collect::<Vec<_>>()
    );
    assert_eq!(on.tokens[0], 1);
    assert_eq!(*on.tokens.last().unwrap(), 2);
    let answer = tok.encode("hi", false, false, false).len() + 1; // + EOS
    assert_eq!(off.num_label_tokens(), answer);
    assert!(off.mask[..off.len() - answer].iter().all(|&m| m));
    assert_eq!(
        &off.labels[off.len() - answer..],
        &on.labels[on.len() - answer..]
    );
}
