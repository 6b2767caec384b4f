//! torchtune's `llama2_tokenizer` encode/decode against fixtures/tokenizer/encode_*.json.

mod common;

use std::path::Path;

use common::*;
use tune_data::Llama2Tokenizer;

fn check(path: &Path, fixture: &serde_json::Value) {
    let tok = Llama2Tokenizer::new(path, None, None).unwrap();
    assert_eq!(
        tok.bos_id(),
        fixture["model_info"]["bos_id"].as_u64().unwrap() as u32
    );
    assert_eq!(
        tok.eos_id(),
        fixture["model_info"]["eos_id"].as_u64().unwrap() as u32
    );
    assert_eq!(
        i64::from(tok.pad_id()),
        fixture["model_info"]["torchtune_pad_id"].as_i64().unwrap()
    );
    assert_eq!(
        tok.vocab_size() as u64,
        fixture["model_info"]["vocab_size"].as_u64().unwrap()
    );
    assert_eq!(
        tok.encodes_whitespace(),
        fixture["torchtune_encodes_whitespace_flag"]
            .as_bool()
            .unwrap()
    );
    let prefix = fixture["torchtune_trim_prefix"].as_str().unwrap();
    assert_eq!(
        tok.encode(prefix, false, false, false),
        ids(&fixture["torchtune_trim_prefix_ids"])
    );
    let mut failures = Vec::new();
    let mut trim_differs = 0;
    for case in fixture["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let checks = [
            (
                "bos_eos",
                tok.encode(text, true, true, false),
                &case["tt_ids_bos_eos"],
            ),
            (
                "no_bos_eos",
                tok.encode(text, false, false, false),
                &case["tt_ids_no_bos_eos"],
            ),
            (
                "trim",
                tok.encode(text, false, false, true),
                &case["tt_ids_trim_leading_whitespace"],
            ),
        ];
        for (what, got, want) in checks {
            if got != ids(want) {
                failures.push(format!("{what} {text:?}: got {got:?}, want {want}"));
            }
        }
        // torchtune's trim slices BOS off with the prefix ids.
        assert_eq!(
            tok.encode(text, true, false, true),
            tok.encode(text, false, false, true)
        );
        if case["tt_trim_differs_from_sp"].as_bool().unwrap() {
            trim_differs += 1;
            assert_ne!(tok.encode(text, false, false, true), ids(&case["sp_ids"]));
        }
        let decoded = tok.decode(&ids(&case["tt_ids_bos_eos"])).unwrap();
        if decoded != case["tt_decoded_bos_eos"].as_str().unwrap() {
            failures.push(format!(
                "decode {text:?}: got {decoded:?}, want {}",
                case["tt_decoded_bos_eos"]
            ));
        }
    }
    assert!(
        trim_differs > 10,
        "the fixture should exercise the whitespace trim"
    );
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn tok512_matches_torchtune() {
    check(&tok512_path(), &tokenizer_fixture("encode_tok512.json"));
}

#[test]
fn llama2_matches_torchtune() {
    let Some(path) = llama2_path() else { return };
    check(&path, &tokenizer_fixture("encode_llama2.json"));
}

#[test]
fn max_seq_len_zero_is_rejected() {
    let err = Llama2Tokenizer::new(tok512_path(), Some(0), None).unwrap_err();
    assert!(err.to_string().contains("max_seq_len"), "{err:#}");
}
