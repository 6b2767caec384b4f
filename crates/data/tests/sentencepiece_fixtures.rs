//! SentencePiece encode/decode against ids recorded from sentencepiece 0.2.3 (fixtures/tokenizer).

mod common;

use common::*;
use tune_data::sentencepiece::{ModelProto, ModelType, PieceType, SentencePiece};

fn check_model_info(sp: &SentencePiece, info: &serde_json::Value) {
    let m = sp.model();
    assert_eq!(sp.vocab_size() as u64, info["vocab_size"].as_u64().unwrap());
    assert_eq!(sp.bos_id(), Some(info["bos_id"].as_u64().unwrap() as u32));
    assert_eq!(sp.eos_id(), Some(info["eos_id"].as_u64().unwrap() as u32));
    assert_eq!(sp.unk_id() as u64, info["unk_id"].as_u64().unwrap());
    assert_eq!(info["sentencepiece_pad_id"].as_i64(), Some(-1));
    assert_eq!(sp.pad_id(), None);
    assert_eq!(m.trainer_spec.model_type, ModelType::Bpe);
    assert_eq!(
        m.trainer_spec.byte_fallback,
        info["byte_fallback"].as_bool().unwrap()
    );
    assert_eq!(
        m.trainer_spec.split_digits,
        info["split_digits"].as_bool().unwrap()
    );
    assert_eq!(
        m.trainer_spec.unk_surface,
        info["unk_surface"].as_str().unwrap()
    );
    let n = &m.normalizer_spec;
    assert_eq!(n.name, info["normalizer_name"].as_str().unwrap());
    assert_eq!(
        n.add_dummy_prefix,
        info["add_dummy_prefix"].as_bool().unwrap()
    );
    assert_eq!(
        n.remove_extra_whitespaces,
        info["remove_extra_whitespaces"].as_bool().unwrap()
    );
    assert_eq!(
        n.escape_whitespaces,
        info["escape_whitespaces"].as_bool().unwrap()
    );
    assert_eq!(
        n.precompiled_charsmap.len() as u64,
        info["precompiled_charsmap_bytes"].as_u64().unwrap()
    );
    for (kind, name) in [
        (PieceType::Unknown, "UNKNOWN"),
        (PieceType::Control, "CONTROL"),
        (PieceType::Byte, "BYTE"),
        (PieceType::Normal, "NORMAL"),
    ] {
        let count = m.pieces.iter().filter(|p| p.kind == kind).count() as u64;
        assert_eq!(
            count,
            info["piece_type_counts"][name].as_u64().unwrap(),
            "{name} pieces"
        );
    }
    let first: Vec<&str> = (0..3).map(|i| sp.id_to_piece(i).unwrap()).collect();
    let want: Vec<&str> = info["piece_0_1_2"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(first, want);
}

fn check_cases(sp: &SentencePiece, fixture: &serde_json::Value) {
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len() as u64, fixture["num_texts"].as_u64().unwrap());
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want_ids = ids(&case["sp_ids"]);
        let got = sp.encode_pieces(text);
        let got_ids: Vec<u32> = got.iter().map(|(_, id)| *id).collect();
        let got_pieces: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
        let want_pieces: Vec<&str> = case["sp_pieces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        if got_ids != want_ids || got_pieces != want_pieces {
            failures.push(format!("encode {text:?}: got {got_pieces:?} {got_ids:?}, want {want_pieces:?} {want_ids:?}"));
        }
        let decoded = sp.decode(&want_ids).unwrap();
        if decoded != case["sp_decoded"].as_str().unwrap() {
            failures.push(format!(
                "decode {text:?}: got {decoded:?}, want {:?}",
                case["sp_decoded"]
            ));
        }
        assert_eq!(
            decoded == text,
            case["sp_roundtrip_exact"].as_bool().unwrap(),
            "roundtrip flag of {text:?}"
        );
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn tok512_model_info() {
    let sp = SentencePiece::from_file(tok512_path()).unwrap();
    check_model_info(&sp, &tokenizer_fixture("encode_tok512.json")["model_info"]);
}

#[test]
fn tok512_encode_and_decode_match_sentencepiece() {
    let sp = SentencePiece::from_file(tok512_path()).unwrap();
    check_cases(&sp, &tokenizer_fixture("encode_tok512.json"));
}

#[test]
fn llama2_model_info() {
    let Some(path) = llama2_path() else { return };
    let sp = SentencePiece::from_file(path).unwrap();
    check_model_info(&sp, &tokenizer_fixture("encode_llama2.json")["model_info"]);
}

#[test]
fn llama2_encode_and_decode_match_sentencepiece() {
    let Some(path) = llama2_path() else { return };
    let sp = SentencePiece::from_file(path).unwrap();
    check_cases(&sp, &tokenizer_fixture("encode_llama2.json"));
}

/// Checks `encode` (ids and, when recorded, pieces) and `decode` lists of an extra fixture.
fn check_encode_decode_lists(sp: &SentencePiece, section: &serde_json::Value, what: &str) {
    let mut failures = Vec::new();
    let encode = section["encode"].as_array().unwrap();
    for case in encode {
        let text = case["text"].as_str().unwrap();
        let got = sp.encode_pieces(text);
        let got_ids: Vec<u32> = got.iter().map(|(_, id)| *id).collect();
        if got_ids != ids(&case["ids"]) {
            failures.push(format!(
                "encode {text:?}: got {got:?}, want {} {}",
                case["pieces"], case["ids"]
            ));
        } else if let Some(pieces) = case.get("pieces") {
            let got_pieces: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
            let want: Vec<&str> = pieces
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            if got_pieces != want {
                failures.push(format!(
                    "pieces of {text:?}: got {got_pieces:?}, want {want:?}"
                ));
            }
        }
    }
    let decode = section["decode"].as_array().unwrap();
    for case in decode {
        let id_list = ids(&case["ids"]);
        let got = sp.decode(&id_list).unwrap();
        if got != case["text"].as_str().unwrap() {
            failures.push(format!(
                "decode {id_list:?}: got {got:?}, want {:?}",
                case["text"]
            ));
        }
    }
    assert!(
        encode.len() > 100 && decode.len() > 100,
        "{what}: fixture too small"
    );
    assert!(
        failures.is_empty(),
        "{what}: {} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn tok512_random_texts_and_id_lists_match_sentencepiece() {
    let sp = SentencePiece::from_file(tok512_path()).unwrap();
    check_encode_decode_lists(
        &sp,
        &tokenizer_fixture("sp_fuzz_tok512.json"),
        "sp_fuzz_tok512.json",
    );
}

/// A model with the nmt_nfkc precompiled charsmap and user-defined and control symbols; and the
/// same model with some merged pieces marked UNUSED, which encoding must split back up.
#[test]
fn nfkc_model_with_user_symbols_and_unused_pieces_matches_sentencepiece() {
    let fixture = tokenizer_fixture("sp_nfkc.json");
    let bytes = std::fs::read(fixtures().join("tokenizer/tok_nfkc.model")).unwrap();
    let sp = SentencePiece::from_bytes(&bytes).unwrap();
    assert!(!sp.model().normalizer_spec.precompiled_charsmap.is_empty());
    assert_eq!(
        sp.piece_type(sp.piece_to_id("<tool>")),
        Some(PieceType::UserDefined)
    );
    check_encode_decode_lists(
        &sp,
        &fixture["sections"]["tok_nfkc.model"],
        "tok_nfkc.model",
    );

    let unused: Vec<&str> = fixture["unused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(!unused.is_empty());
    let mut proto = ModelProto::parse(&bytes).unwrap();
    for p in proto
        .pieces
        .iter_mut()
        .filter(|p| unused.contains(&p.piece.as_str()))
    {
        p.kind = PieceType::Unused;
    }
    let sp = SentencePiece::from_proto(proto).unwrap();
    check_encode_decode_lists(
        &sp,
        &fixture["sections"]["tok_nfkc_unused.model"],
        "tok_nfkc_unused.model",
    );
}
