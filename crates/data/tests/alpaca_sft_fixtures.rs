//! alpaca_dataset + llama2_tokenizer SFT samples against fixtures/tokenizer/sft_alpaca.json:
//! the chat template, every encode call, tokens, labels and masks, for every section.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use common::*;
use serde_yaml::Value as Yaml;
use tune_data::alpaca::alpaca_to_messages;
use tune_data::json_source::Row;
use tune_data::{DatasetSpec, Llama2Tokenizer, PromptTemplate, Sample};

/// Builds a dataset component from YAML the way a config would.
fn dataset(yaml: &str) -> DatasetSpec {
    let node: Yaml = serde_yaml::from_str(yaml).unwrap();
    let path = node["_component_"].as_str().unwrap();
    let built = tune_core::registry::lookup(path)
        .unwrap()
        .build_from(&node)
        .unwrap();
    *built.downcast::<DatasetSpec>().expect("a DatasetSpec")
}

fn tokenizer(file: &str, max_seq_len: &serde_json::Value) -> Option<Llama2Tokenizer> {
    let path = if file.contains("llama2-tokenizer") {
        llama2_path()?
    } else {
        tok512_path()
    };
    let msl = max_seq_len.as_u64().map(|n| n as usize);
    Some(Llama2Tokenizer::new(path, msl, Some(PromptTemplate::Llama2Chat)).unwrap())
}

/// The section's rows as a data file: gsm8k sections use the copied gsm8k file with a split
/// slice; the others are written to a JSON Lines file.
fn data_files(
    name: &str,
    section: &serde_json::Value,
    dir: &tempfile::TempDir,
) -> (PathBuf, String) {
    let rows = section["source_rows"].as_array().unwrap();
    if name.starts_with("gsm8k") {
        let path = fixtures().join("data/gsm8k_train_alpaca.json");
        return (path, format!("train[:{}]", rows.len()));
    }
    let path = dir.path().join(format!("{name}.jsonl"));
    let mut f = std::fs::File::create(&path).unwrap();
    for r in rows {
        writeln!(f, "{}", serde_json::to_string(r).unwrap()).unwrap();
    }
    (path, "train".to_string())
}

fn check_section(name: &str) {
    let fixture = tokenizer_fixture("sft_alpaca.json");
    let section = &fixture["sections"][name];
    let Some(tok) = tokenizer(
        section["tokenizer_file"].as_str().unwrap(),
        &section["max_seq_len"],
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (file, split) = data_files(name, section, &dir);
    let mut failures = Vec::new();
    let mut checked = 0;
    for train_on_input in [true, false] {
        let spec = dataset(&format!(
            "{{_component_: torchtune.datasets.alpaca_dataset, source: json, data_files: {file:?}, \
             split: {split:?}, train_on_input: {train_on_input}}}"
        ));
        let samples: Vec<Sample> = spec.load(&tok).unwrap();
        let source_rows: Vec<Row> = spec.rows.rows().unwrap();
        assert_eq!(
            samples.len(),
            section["source_rows"].as_array().unwrap().len()
        );
        for want in section["rows"].as_array().unwrap() {
            if want["train_on_input"].as_bool() != Some(train_on_input) {
                continue;
            }
            let i = want["row_index"].as_u64().unwrap() as usize;
            let at = format!("{name} row {i} train_on_input={train_on_input}");
            checked += 1;

            // The template: messages before and after Llama2ChatTemplate.
            let messages =
                alpaca_to_messages(&source_rows[i], train_on_input, &BTreeMap::new()).unwrap();
            let templated = PromptTemplate::Llama2Chat.apply(&messages);
            for (got, key) in [
                (&messages, "messages_before_template"),
                (&templated, "messages_after_template"),
            ] {
                let want_msgs = want[key].as_array().unwrap();
                assert_eq!(got.len(), want_msgs.len(), "{at}: {key}");
                for (g, w) in got.iter().zip(want_msgs) {
                    assert_eq!(g.role.as_str(), w["role"].as_str().unwrap(), "{at}: {key}");
                    assert_eq!(g.masked, w["masked"].as_bool().unwrap(), "{at}: {key}");
                    assert_eq!(g.eot, w["eot"].as_bool().unwrap(), "{at}: {key}");
                    let items: Vec<&str> = w["content"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|c| c["content"].as_str().unwrap())
                        .collect();
                    assert_eq!(g.content, items, "{at}: {key}");
                }
            }
            let templated_text: String = templated.iter().map(|m| m.text()).collect();
            assert_eq!(
                templated_text,
                want["templated_text"].as_str().unwrap(),
                "{at}"
            );

            // Every encode call torchtune made, in order.
            for call in want["encode_calls_in_order"].as_array().unwrap() {
                let got = tok.encode(
                    call["text"].as_str().unwrap(),
                    call["add_bos"].as_bool().unwrap(),
                    call["add_eos"].as_bool().unwrap(),
                    call["trim_leading_whitespace"].as_bool().unwrap(),
                );
                if got != ids(&call["ids"]) {
                    failures.push(format!(
                        "{at}: encode {:?}: got {got:?}, want {}",
                        call["text"], call["ids"]
                    ));
                }
            }

            // The sample.
            let s = &samples[i];
            if s.tokens != ids(&want["tokens"]) {
                failures.push(format!(
                    "{at}: tokens {:?}\n want {}",
                    s.tokens, want["tokens"]
                ));
            }
            if s.labels != i64s(&want["labels"]) {
                failures.push(format!(
                    "{at}: labels {:?}\n want {}",
                    s.labels, want["labels"]
                ));
            }
            if s.mask != bools(&want["mask"]) {
                failures.push(format!("{at}: mask {:?}\n want {}", s.mask, want["mask"]));
            }
            assert_eq!(s.len() as u64, want["num_tokens"].as_u64().unwrap(), "{at}");
            assert_eq!(
                s.num_label_tokens() as u64,
                want["num_label_not_ignored"].as_u64().unwrap(),
                "{at}"
            );
            assert_eq!(
                tok.decode(&s.tokens).unwrap(),
                want["decoded_tokens"].as_str().unwrap(),
                "{at}"
            );
            let whole = tok.encode(&templated_text, true, true, false);
            assert_eq!(
                whole == s.tokens,
                want["tokens_equal_encode_of_templated_text_with_bos_eos"]
                    .as_bool()
                    .unwrap(),
                "{at}"
            );
        }
    }
    assert_eq!(checked, section["rows"].as_array().unwrap().len());
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn gsm8k_tok512_max_seq_len_128() {
    check_section("gsm8k_tok512_msl128");
}

#[test]
fn gsm8k_tok512_no_max_seq_len() {
    check_section("gsm8k_tok512_msl_none");
}

#[test]
fn gsm8k_llama2_no_max_seq_len() {
    check_section("gsm8k_llama2_msl_none");
}

#[test]
fn alpaca_rows_with_input_tok512() {
    check_section("alpaca_with_input_tok512_msl_none");
}

#[test]
fn fixture_templates_match_ours() {
    let fixture = tokenizer_fixture("sft_alpaca.json");
    let info = &fixture["template_info"];
    assert_eq!(
        info["alpaca_templates"]["prompt_input"].as_str().unwrap(),
        tune_data::alpaca::PROMPT_INPUT
    );
    assert_eq!(
        info["alpaca_templates"]["prompt_no_input"]
            .as_str()
            .unwrap(),
        tune_data::alpaca::PROMPT_NO_INPUT
    );
    let user = &info["llama2_chat_template"]["user"];
    let out = PromptTemplate::Llama2Chat.apply(&[tune_data::Message::new(
        tune_data::Role::User,
        "x",
        false,
    )]);
    assert_eq!(
        out[0].content,
        [user[0].as_str().unwrap(), "x", user[1].as_str().unwrap()]
    );
    let sys = &info["llama2_chat_template"]["system"];
    let out = PromptTemplate::Llama2Chat.apply(&[
        tune_data::Message::new(tune_data::Role::System, "s", true),
        tune_data::Message::new(tune_data::Role::User, "x", false),
    ]);
    assert_eq!(
        out[0].content[1..4],
        [sys[0].as_str().unwrap(), "s", sys[1].as_str().unwrap()]
    );
}
