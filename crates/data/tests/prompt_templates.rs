//! torchtune's named prompt templates (`ChatMLTemplate`, `QuestionAnswerTemplate`,
//! `SummarizeTemplate`, `GrammarErrorCorrectionTemplate`) tokenize as torchtune 0.6.1's llama2
//! tokenizer does (`tests/fixtures/tokenizer/prompt_templates.json`, made by
//! `make_prompt_template_fixtures.py` beside it).

mod common;

use common::*;
use serde_json::Value;
use tune_data::{Llama2Tokenizer, Message, PromptTemplate, Role};

#[test]
fn named_templates_tokenize_as_torchtune() {
    let text = std::fs::read_to_string(fixtures().join("tokenizer/prompt_templates.json")).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 24);
    for case in cases {
        let path = case["template"].as_str().unwrap();
        let template = PromptTemplate::from_config(&serde_yaml::Value::String(path.into()))
            .unwrap()
            .unwrap();
        let tokenizer = Llama2Tokenizer::new(tok512_path(), None, Some(template)).unwrap();
        let messages: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                Message::new(
                    Role::parse(m["role"].as_str().unwrap()).unwrap(),
                    m["content"].as_str().unwrap(),
                    m["masked"].as_bool().unwrap(),
                )
            })
            .collect();
        let add_end_tokens = case["add_end_tokens"].as_bool().unwrap();
        let (tokens, mask) = tokenizer.tokenize_messages(&messages, add_end_tokens);
        let want_tokens: Vec<u32> = serde_json::from_value(case["tokens"].clone()).unwrap();
        let want_mask: Vec<bool> = serde_json::from_value(case["mask"].clone()).unwrap();
        let what = format!(
            "{path} {} add_end_tokens={add_end_tokens}",
            case["conversation"]
        );
        assert_eq!(tokens, want_tokens, "{what}");
        assert_eq!(mask, want_mask, "{what}");
    }
    // Short class names work as they do for Llama2ChatTemplate; unknown ones name the choices.
    let short = serde_yaml::Value::String("ChatMLTemplate".into());
    assert_eq!(
        PromptTemplate::from_config(&short).unwrap(),
        Some(PromptTemplate::ChatMl)
    );
    let unknown = serde_yaml::Value::String("torchtune.data.AlpacaInstructTemplate".into());
    let e = format!("{:#}", PromptTemplate::from_config(&unknown).unwrap_err());
    assert!(e.contains("QuestionAnswerTemplate"), "{e}");
}
