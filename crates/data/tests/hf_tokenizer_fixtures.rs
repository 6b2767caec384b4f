//! Hugging Face tokenizer.json support against ids and text from the `tokenizers` library
//! (fixtures/tokenizer/hf_tok512_cases.json, made by make_extra_fixtures.py, and
//! hf_added_cases.json, made by make_added_token_fixtures.py).

mod common;

use common::*;
use tune_data::hf_tokenizer::HfTokenizer;
use tune_data::Tokenizer;

#[test]
fn tokenizer_json_matches_the_tokenizers_library() {
    let fixture = tokenizer_fixture("hf_tok512_cases.json");
    let files = fixture["files"].as_object().unwrap();
    assert_eq!(files.len(), 2);
    for (name, section) in files {
        let path = fixtures().join("tokenizer/hf_tok512").join(name);
        let hf = HfTokenizer::from_file(&path).unwrap();
        let mut failures = Vec::new();
        let encode = section["encode"].as_array().unwrap();
        for case in encode {
            let text = case["text"].as_str().unwrap();
            let got = hf.encode(text);
            if got != ids(&case["ids"]) {
                failures.push(format!(
                    "encode {text:?}: got {got:?}, want {}",
                    case["ids"]
                ));
            }
        }
        let decode = section["decode"].as_array().unwrap();
        for case in decode {
            let id_list = ids(&case["ids"]);
            for (skip, key) in [(false, "text"), (true, "text_skip_special")] {
                let got = hf.decode(&id_list, skip).unwrap();
                if got != case[key].as_str().unwrap() {
                    failures.push(format!(
                        "decode {id_list:?} (skip {skip}): got {got:?}, want {:?}",
                        case[key]
                    ));
                }
            }
        }
        assert!(encode.len() > 300 && decode.len() > 100);
        assert!(
            failures.is_empty(),
            "{name}: {} mismatches:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}

/// Added tokens with every flag (`single_word`, `lstrip`/`rstrip`, `normalized`, `special`) are
/// matched where the `tokenizers` library matches them.
#[test]
fn added_tokens_match_where_the_tokenizers_library_matches_them() {
    let fixture = tokenizer_fixture("hf_added_cases.json");
    let hf = HfTokenizer::from_file(fixtures().join("tokenizer/hf_tok512/added.tokenizer.json"))
        .unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() > 300);
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| {
            let text = case["text"].as_str().unwrap();
            let got = hf.encode(text);
            (got != ids(&case["ids"]))
                .then(|| format!("encode {text:?}: got {got:?}, want {}", case["ids"]))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// For ordinary text (no runs of spaces, no literal "<s>"), the Llama-style tokenizer.json gives
/// the same ids as the SentencePiece model it was made from, through the common `Tokenizer` type.
#[test]
fn tokenizer_type_picks_the_format_by_extension() {
    let sp = Tokenizer::from_file(tok512_path()).unwrap();
    let hf =
        Tokenizer::from_file(fixtures().join("tokenizer/hf_tok512/legacy.tokenizer.json")).unwrap();
    assert!(matches!(sp, Tokenizer::SentencePiece(_)));
    assert!(matches!(hf, Tokenizer::HuggingFace(_)));
    assert_eq!(sp.vocab_size(), hf.vocab_size());
    assert_eq!((hf.bos_id(), hf.eos_id()), (Some(1), Some(2)));
    assert!(hf.is_special(1) && sp.is_special(1) && !sp.is_special(300));
    assert_eq!(hf.piece_to_id("<s>"), Some(1));
    assert_eq!(sp.piece_to_id("<unk>"), Some(0));
    assert_eq!(sp.piece_to_id("no such piece"), None);
    let fixture = tokenizer_fixture("encode_tok512.json");
    let mut compared = 0;
    for case in fixture["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        if text.contains("  ")
            || text.starts_with(' ')
            || text.ends_with(' ')
            || text.contains('<')
            || text.contains('\u{2581}')
        {
            continue;
        }
        compared += 1;
        assert_eq!(hf.encode(text), sp.encode(text), "{text:?}");
        let ids = sp.encode(text);
        assert_eq!(
            hf.decode(&ids).unwrap(),
            sp.decode(&ids).unwrap(),
            "{text:?}"
        );
    }
    assert!(compared > 40);
}

#[test]
fn missing_or_wrong_tokenizer_files_are_clear_errors() {
    let err = Tokenizer::from_file("/nonexistent/tokenizer.model").unwrap_err();
    assert!(
        format!("{err:#}").contains("/nonexistent/tokenizer.model"),
        "{err:#}"
    );
    let err = Tokenizer::from_file(fixtures().join("tokenizer")).unwrap_err();
    assert!(format!("{err:#}").contains("directory"), "{err:#}");
    // A JSON file that is not a tokenizer, and a non-protobuf file read as a SentencePiece model.
    let err = Tokenizer::from_file(fixtures().join("tokenizer/meta.json")).unwrap_err();
    assert!(format!("{err:#}").contains("meta.json"), "{err:#}");
    let err =
        Tokenizer::from_file(fixtures().join("tokenizer/make_extra_fixtures.py")).unwrap_err();
    assert!(
        format!("{err:#}").contains("not a usable SentencePiece model"),
        "{err:#}"
    );
}
