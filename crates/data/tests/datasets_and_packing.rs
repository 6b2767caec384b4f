//! The dataset builders beyond Alpaca (`instruct_dataset`, `chat_dataset`,
//! `text_completion_dataset`) built from YAML as a config would, and `packed: True`.

mod common;

use std::path::Path;

use common::*;
use serde_yaml::Value as Yaml;
use tune_data::{
    DatasetSpec, Examples, Llama2Tokenizer, Message, PromptTemplate, Role, CROSS_ENTROPY_IGNORE_IDX,
};

fn dataset(yaml: &str) -> DatasetSpec {
    let node: Yaml = serde_yaml::from_str(yaml).unwrap();
    let name = node["_component_"].as_str().unwrap().to_string();
    let built = tune_core::registry::lookup(&name)
        .unwrap()
        .build_from(&node)
        .unwrap_or_else(|e| panic!("{yaml}: {e:#}"));
    *built.downcast::<DatasetSpec>().unwrap()
}

fn tok512(max_seq_len: Option<usize>) -> Llama2Tokenizer {
    Llama2Tokenizer::new(tok512_path(), max_seq_len, Some(PromptTemplate::Llama2Chat)).unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn gsm8k() -> String {
    repo_root()
        .join("tests/fixtures/data/gsm8k_train_alpaca.json")
        .display()
        .to_string()
}

#[test]
fn instruct_rows_are_the_prompt_and_the_response() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "qa.jsonl",
        "{\"question\": \"What is 2+2?\", \"answer\": \"4\"}\n{\"question\": \"Capital of France?\", \"answer\": \"Paris\"}\n",
    );
    let tok = tok512(None);
    let spec = dataset(&format!(
        "{{_component_: torchtune.datasets.instruct_dataset, source: json, data_files: {file:?}, \
           column_map: {{input: question, output: answer}}, new_system_prompt: Be brief.}}"
    ));
    let samples = spec.load(&tok).unwrap();
    assert_eq!(samples.len(), 2);
    let want = tok.tokenize_messages(
        &[
            Message::new(Role::System, "Be brief.", true),
            Message::new(Role::User, "Capital of France?", true),
            Message::new(Role::Assistant, "Paris", false),
        ],
        true,
    );
    assert_eq!((samples[1].tokens.clone(), samples[1].mask.clone()), want);
    // train_on_input defaults to False: only the response (and its EOS) counts.
    let counted: Vec<u32> = samples[1]
        .labels
        .iter()
        .filter(|&&l| l != CROSS_ENTROPY_IGNORE_IDX)
        .map(|&l| l as u32)
        .collect();
    assert_eq!(tok.decode(&counted).unwrap().trim(), "Paris");

    let node = format!(
        "{{_component_: instruct_dataset, source: json, data_files: {file:?}, column_map: {{input: question}}}}"
    );
    let node: Yaml = serde_yaml::from_str(&node).unwrap();
    let err = tune_core::registry::lookup("instruct_dataset")
        .unwrap()
        .build_from(&node)
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("`input` and `output`"),
        "{err:#}"
    );
}

#[test]
fn chat_rows_keep_every_turn() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "chats.json",
        r#"[{"dialog": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                        {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "See you."}]}]"#,
    );
    let tok = tok512(None);
    let spec = dataset(&format!(
        "{{_component_: torchtune.datasets.chat_dataset, source: json, data_files: {file:?}, \
           conversation_column: dialog, conversation_style: sharegpt}}"
    ));
    let samples = spec.load(&tok).unwrap();
    let want = tok.tokenize_messages(
        &[
            Message::new(Role::User, "Hi", true),
            Message::new(Role::Assistant, "Hello!", false),
            Message::new(Role::User, "Bye", true),
            Message::new(Role::Assistant, "See you.", false),
        ],
        true,
    );
    assert_eq!((samples[0].tokens.clone(), samples[0].mask.clone()), want);
    // Two turns, two BOS.
    assert_eq!(
        samples[0]
            .tokens
            .iter()
            .filter(|&&t| t == tok.bos_id())
            .count(),
        2
    );
}

#[test]
fn text_completion_reads_lines_and_trains_on_every_token() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "play.txt",
        "First Citizen:\r\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n",
    );
    let tok = tok512(None);
    let spec = dataset(&format!(
        "{{_component_: torchtune.datasets.text_completion_dataset, source: text, data_files: {file:?}}}"
    ));
    let samples = spec.load(&tok).unwrap();
    let lines = [
        "First Citizen:",
        "Before we proceed any further, hear me speak.",
        "",
        "All:",
        "Speak, speak.",
    ];
    assert_eq!(
        samples.len(),
        lines.len(),
        "one sample per line, the empty one too"
    );
    for (sample, line) in samples.iter().zip(lines) {
        assert_eq!(sample.tokens, tok.encode(line, true, true, false));
        assert_eq!(sample.num_label_tokens(), sample.len());
    }
    let paragraphs = dataset(&format!(
        "{{_component_: text_completion_dataset, source: text, data_files: {file:?}, sample_by: paragraph, add_eos: false}}"
    ))
    .load(&tok)
    .unwrap();
    assert_eq!(paragraphs.len(), 2);
    assert_eq!(
        paragraphs[1].tokens,
        tok.encode("All:\nSpeak, speak.\n", true, false, false)
    );
    // With max_seq_len, torchtune 0.6.1 keeps max_seq_len - 1 tokens and no EOS.
    let cut = spec.load(&tok512(Some(6))).unwrap();
    assert_eq!(cut[1].tokens, samples[1].tokens[..5]);
    // A JSON column works the same way.
    let json = write(dir.path(), "t.jsonl", "{\"body\": \"All:\"}\n");
    let from_json = dataset(&format!(
        "{{_component_: text_completion_dataset, source: json, data_files: {json:?}, column: body}}"
    ))
    .load(&tok)
    .unwrap();
    assert_eq!(from_json[0].tokens, samples[3].tokens);
}

#[test]
fn packed_sft_data_keeps_every_sample_whole_and_in_order() {
    let tok = tok512(Some(1024));
    let node = |packed: bool| {
        format!(
            "{{_component_: alpaca_dataset, source: json, data_files: {:?}, split: 'train[:40]', \
               train_on_input: false, packed: {packed}}}",
            gsm8k()
        )
    };
    let samples = dataset(&node(false)).load(&tok).unwrap();
    let Examples::Packs(packs) = dataset(&node(true)).load_examples(&tok).unwrap() else {
        panic!("packed: true gives packs");
    };
    assert!(packs.len() < samples.len(), "{} packs", packs.len());
    let mut unpacked = Vec::new();
    for pack in &packs {
        assert_eq!(pack.tokens.len(), 1024);
        assert_eq!(pack.seq_lens.iter().sum::<usize>(), 1024);
        let mut start = 0;
        for &len in &pack.seq_lens {
            let positions = &pack.input_pos[start..start + len];
            let padding = pack.tokens[start..].iter().all(|&t| t == 0);
            if !padding {
                assert!(positions.iter().copied().eq(0..len as u32));
                unpacked.push((
                    pack.tokens[start..start + len].to_vec(),
                    pack.labels[start..start + len].to_vec(),
                ));
            }
            start += len;
        }
    }
    let want: Vec<(Vec<u32>, Vec<i64>)> = samples
        .iter()
        .map(|s| (s.tokens.clone(), s.labels.clone()))
        .collect();
    assert_eq!(unpacked, want);
}

#[test]
fn packing_needs_a_pack_length() {
    let spec = dataset(&format!(
        "{{_component_: alpaca_dataset, source: json, data_files: {:?}, packed: true}}",
        gsm8k()
    ));
    let err = spec.load_examples(&tok512(None)).unwrap_err();
    assert!(err.to_string().contains("tokenizer.max_seq_len"), "{err}");
}

#[test]
fn preference_rows_tokenize_chosen_and_rejected_separately() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "prefs.jsonl",
        concat!(
            r#"{"good": [{"role": "system", "content": "old"}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "#,
            r#""bad": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]}"#,
            "\n"
        ),
    );
    let tok = tok512(None);
    let node: Yaml = serde_yaml::from_str(&format!(
        "{{_component_: torchtune.datasets.preference_dataset, source: json, data_files: {file:?}, \
           column_map: {{chosen: good, rejected: bad}}, new_system_prompt: Answer.}}"
    ))
    .unwrap();
    let spec = *tune_core::registry::lookup("preference_dataset")
        .unwrap()
        .build_from(&node)
        .unwrap()
        .downcast::<tune_data::PreferenceSpec>()
        .unwrap();
    let pairs = spec.load(&tok).unwrap();
    let conversation = |answer: &str| {
        tok.tokenize_messages(
            &[
                Message::new(Role::System, "Answer.", true),
                Message::new(Role::User, "2+2?", true),
                Message::new(Role::Assistant, answer, false),
            ],
            true,
        )
    };
    assert_eq!(
        (pairs[0].chosen.tokens.clone(), pairs[0].chosen.mask.clone()),
        conversation("4")
    );
    assert_eq!(
        (
            pairs[0].rejected.tokens.clone(),
            pairs[0].rejected.mask.clone()
        ),
        conversation("5")
    );
    // stack_exchange_paired_dataset's default columns.
    let file = write(
        dir.path(),
        "se.json",
        r#"[{"question": "2+2?", "response_j": "4", "response_k": "5"}]"#,
    );
    let node: Yaml = serde_yaml::from_str(&format!(
        "{{_component_: stack_exchange_paired_dataset, source: json, data_files: {file:?}}}"
    ))
    .unwrap();
    let spec = *tune_core::registry::lookup("stack_exchange_paired_dataset")
        .unwrap()
        .build_from(&node)
        .unwrap()
        .downcast::<tune_data::PreferenceSpec>()
        .unwrap();
    let se = spec.load(&tok).unwrap();
    let plain = |answer: &str| {
        tok.tokenize_messages(
            &[
                Message::new(Role::User, "2+2?", true),
                Message::new(Role::Assistant, answer, false),
            ],
            true,
        )
    };
    assert_eq!(
        (se[0].chosen.tokens.clone(), se[0].chosen.mask.clone()),
        plain("4")
    );
    assert_eq!(
        (se[0].rejected.tokens.clone(), se[0].rejected.mask.clone()),
        plain("5")
    );
}

#[test]
fn bad_settings_and_rows_get_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "p.json", r#"[{"chosen": [], "rejected": []}]"#);
    let node: Yaml = serde_yaml::from_str(&format!(
        "{{_component_: preference_dataset, source: json, data_files: {file:?}, packed: true}}"
    ))
    .unwrap();
    let err = tune_core::registry::lookup("preference_dataset")
        .unwrap()
        .build_from(&node)
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("not supported for preference datasets"),
        "{err:#}"
    );

    let text = write(dir.path(), "t.txt", "hello\n");
    let spec = dataset(&format!(
        "{{_component_: text_completion_dataset, source: text, data_files: {text:?}}}"
    ));
    let err = spec.load(&tok512(Some(1))).unwrap_err();
    assert!(format!("{err:#}").contains("at least 2"), "{err:#}");

    // A bad turn is reported once, with the row it is in.
    let chats = write(
        dir.path(),
        "c.json",
        r#"[{"conversations": [{"from": "robot", "value": "x"}]}]"#,
    );
    let spec = dataset(&format!(
        "{{_component_: chat_dataset, source: json, data_files: {chats:?}, conversation_column: conversations, conversation_style: sharegpt}}"
    ));
    let err = format!("{:#}", spec.load(&tok512(None)).unwrap_err());
    assert_eq!(err.matches("c.json row 0").count(), 1, "{err}");
    assert!(err.contains("robot"), "{err}");
}

/// Writes rows of string columns as a Snappy-compressed Parquet file; a name written
/// `bin:name` is a binary column (no UTF8 annotation).
fn write_parquet(path: &Path, columns: &[(&str, Vec<&str>)]) {
    write_parquet_compressed(path, columns, parquet::basic::Compression::SNAPPY)
}

fn write_parquet_compressed(
    path: &Path,
    columns: &[(&str, Vec<&str>)],
    compression: parquet::basic::Compression,
) {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let fields: String = columns
        .iter()
        .map(|(name, _)| match name.strip_prefix("bin:") {
            Some(name) => format!("REQUIRED BYTE_ARRAY {name};"),
            None => format!("REQUIRED BYTE_ARRAY {name} (UTF8);"),
        })
        .collect();
    let schema = std::sync::Arc::new(
        parquet::schema::parser::parse_message_type(&format!("message rows {{ {fields} }}"))
            .unwrap(),
    );
    let props = std::sync::Arc::new(
        WriterProperties::builder()
            .set_compression(compression)
            .build(),
    );
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, schema, props).unwrap();
    let mut group = writer.next_row_group().unwrap();
    let mut i = 0;
    while let Some(mut column) = group.next_column().unwrap() {
        let values: Vec<ByteArray> = columns[i].1.iter().map(|v| ByteArray::from(*v)).collect();
        column
            .typed::<ByteArrayType>()
            .write_batch(&values, None, None)
            .unwrap();
        column.close().unwrap();
        i += 1;
    }
    group.close().unwrap();
    writer.close().unwrap();
}

#[test]
fn parquet_files_and_split_folders_read_like_json() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tok512(None);
    let rows = [("Add 1 and 2.", "", "3"), ("Name a color.", "", "Blue")];
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|(i, x, o)| serde_json::json!({"instruction": i, "input": x, "output": o}))
        .collect();
    let json_file = write(
        dir.path(),
        "rows.json",
        &serde_json::to_string(&json).unwrap(),
    );
    let want = dataset(&format!(
        "{{_component_: alpaca_dataset, source: json, data_files: {json_file:?}}}"
    ))
    .load(&tok)
    .unwrap();

    let columns = [
        ("instruction", rows.iter().map(|r| r.0).collect::<Vec<_>>()),
        ("input", rows.iter().map(|r| r.1).collect()),
        ("output", rows.iter().map(|r| r.2).collect()),
    ];
    // pyarrow writes Snappy by default, polars Zstandard; the others are pyarrow options.
    use parquet::basic::{Compression, GzipLevel, ZstdLevel};
    for compression in [
        Compression::SNAPPY,
        Compression::ZSTD(ZstdLevel::default()),
        Compression::GZIP(GzipLevel::default()),
        Compression::LZ4_RAW,
        Compression::UNCOMPRESSED,
    ] {
        let parquet_file = dir.path().join("rows.parquet");
        write_parquet_compressed(&parquet_file, &columns, compression);
        let got = dataset(&format!(
            "{{_component_: alpaca_dataset, source: parquet, data_files: {:?}}}",
            parquet_file.display().to_string()
        ))
        .load(&tok)
        .unwrap_or_else(|e| panic!("{compression}: {e:#}"));
        assert_eq!(got, want, "{compression}");
    }

    // A folder laid out like a Hub dataset: splits from the file names.
    let folder = dir.path().join("hub_like/data");
    std::fs::create_dir_all(&folder).unwrap();
    write_parquet(&folder.join("train-00000-of-00001.parquet"), &columns);
    std::fs::copy(&json_file, folder.join("test-00000-of-00001.json")).unwrap();
    let root = dir.path().join("hub_like").display().to_string();
    for split in ["train", "test"] {
        let got = dataset(&format!(
            "{{_component_: alpaca_dataset, source: {root:?}, split: {split}}}"
        ))
        .load(&tok)
        .unwrap();
        assert_eq!(got, want, "{split}");
    }
    let err = dataset(&format!(
        "{{_component_: alpaca_dataset, source: {root:?}, split: validation}}"
    ))
    .load(&tok)
    .unwrap_err();
    assert!(format!("{err:#}").contains("test, train"), "{err:#}");
}

#[test]
fn named_datasets_are_presets_of_the_builders() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tok512(None);
    let samsum = write(
        dir.path(),
        "samsum.json",
        r#"[{"id": "1", "dialogue": "A: hi\nB: hello", "summary": "They greet."}]"#,
    );
    let from_preset = dataset(&format!(
        "{{_component_: torchtune.datasets.samsum_dataset, source: json, data_files: {samsum:?}}}"
    ))
    .load(&tok)
    .unwrap();
    let from_instruct = dataset(&format!(
        "{{_component_: instruct_dataset, source: json, data_files: {samsum:?}, \
           column_map: {{input: dialogue, output: summary}}}}"
    ))
    .load(&tok)
    .unwrap();
    assert_eq!(from_preset, from_instruct);

    let orca = write(
        dir.path(),
        "orca.jsonl",
        "{\"conversations\": [{\"from\": \"system\", \"value\": \"Be nice.\"}, {\"from\": \"human\", \"value\": \"Hi\"}, {\"from\": \"gpt\", \"value\": \"Hello!\"}]}\n",
    );
    let from_preset = dataset(&format!(
        "{{_component_: slimorca_dataset, source: json, data_files: {orca:?}}}"
    ))
    .load(&tok)
    .unwrap();
    let from_chat = dataset(&format!(
        "{{_component_: chat_dataset, source: json, data_files: {orca:?}, \
           conversation_column: conversations, conversation_style: sharegpt}}"
    ))
    .load(&tok)
    .unwrap();
    assert_eq!(from_preset, from_chat);

    let hh = write(
        dir.path(),
        "hh.jsonl",
        "{\"chosen\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello!\"}], \
          \"rejected\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Go away.\"}]}\n",
    );
    let build_pairs = |component: &str| {
        let node: Yaml = serde_yaml::from_str(&format!(
            "{{_component_: {component}, source: json, data_files: {hh:?}}}"
        ))
        .unwrap();
        tune_core::registry::lookup(component)
            .unwrap()
            .build_from(&node)
            .unwrap()
            .downcast::<tune_data::PreferenceSpec>()
            .unwrap()
            .load(&tok)
            .unwrap()
    };
    assert_eq!(
        build_pairs("hh_rlhf_helpful_dataset"),
        build_pairs("preference_dataset")
    );
}

#[test]
fn folders_split_by_file_names_and_data_dir_picks_a_subfolder() {
    let dir = tempfile::tempdir().unwrap();
    let row = |i: &str| format!(r#"[{{"instruction": "{i}", "output": "ok"}}]"#);
    std::fs::create_dir_all(dir.path().join("rl")).unwrap();
    std::fs::create_dir_all(dir.path().join("sft/.ipynb_checkpoints")).unwrap();
    std::fs::create_dir_all(dir.path().join("sft")).unwrap();
    write(&dir.path().join("rl"), "pairs_train.json", &row("rl"));
    write(&dir.path().join("sft"), "alpaca_train.json", &row("train"));
    write(&dir.path().join("sft"), "alpaca_test.json", &row("test"));
    write(
        &dir.path().join("sft/.ipynb_checkpoints"),
        "alpaca_train-checkpoint.json",
        &row("stale"),
    );
    let root = dir.path().display().to_string();
    let instructions = |extra: &str| -> Vec<String> {
        dataset(&format!(
            "{{_component_: alpaca_dataset, source: {root:?}{extra}}}"
        ))
        .rows
        .rows()
        .unwrap()
        .iter()
        .map(|r| r.columns["instruction"].as_str().unwrap().to_string())
        .collect()
    };
    // The test file is not trained on; hidden checkpoints are skipped.
    assert_eq!(instructions(""), ["rl", "train"]);
    assert_eq!(instructions(", split: test"), ["test"]);
    assert_eq!(instructions(", data_dir: sft"), ["train"]);
    assert_eq!(instructions(", data_dir: rl"), ["rl"]);
}

fn build_error(yaml: &str) -> String {
    let node: Yaml = serde_yaml::from_str(yaml).unwrap();
    let name = node["_component_"].as_str().unwrap().to_string();
    match tune_core::registry::lookup(&name)
        .unwrap()
        .build_from(&node)
    {
        Ok(_) => panic!("{yaml} built"),
        Err(e) => format!("{e:#}"),
    }
}

/// A dataset card's `configs` (README.md) name a folder's subsets: `name` (wikitext's `subset`)
/// picks one, else the default is read; a given `data_dir` is read by its file names instead.
#[test]
fn dataset_card_configs_pick_the_files_as_load_dataset_does() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(
        root,
        "README.md",
        "---\nlicense: cc-by-sa-3.0\nconfigs:\n- config_name: wikitext-103-v1\n  data_files:\n  \
         - split: train\n    path: wikitext-103-v1/train-*.jsonl\n  - split: test\n    path: \
         wikitext-103-v1/test.jsonl\n- config_name: wikitext-2-v1\n  data_dir: wikitext-2-v1\n  \
         default: true\n---\n# WikiText\n",
    );
    for sub in ["wikitext-103-v1", "wikitext-2-v1"] {
        std::fs::create_dir(root.join(sub)).unwrap();
    }
    let page = |text: &str| format!("{{\"page\": \"{text}\", \"article\": \"{text}\"}}\n");
    write(&root.join("wikitext-103-v1"), "train-0.jsonl", &page("a"));
    write(&root.join("wikitext-103-v1"), "train-1.jsonl", &page("b"));
    write(&root.join("wikitext-103-v1"), "test.jsonl", &page("t"));
    write(&root.join("wikitext-2-v1"), "train.jsonl", &page("small"));
    write(
        &root.join("wikitext-2-v1"),
        "test.jsonl",
        &page("small test"),
    );
    let source = root.display().to_string();
    let pages = |yaml: &str| -> Vec<String> {
        dataset(yaml)
            .rows
            .rows()
            .unwrap()
            .iter()
            .map(|r| r.columns["page"].as_str().unwrap().to_string())
            .collect()
    };
    let wikitext =
        |extra: &str| format!("{{_component_: wikitext_dataset, source: {source:?}{extra}}}");
    let text = |extra: &str| {
        format!("{{_component_: text_completion_dataset, source: {source:?}, column: page{extra}}}")
    };
    // wikitext_dataset's default subset is wikitext-103-v1, whose card lists its files per split.
    assert_eq!(pages(&wikitext("")), ["a", "b"]);
    assert_eq!(pages(&wikitext(", split: test")), ["t"]);
    assert_eq!(pages(&wikitext(", subset: wikitext-2-v1")), ["small"]);
    // Without a name the card's default (`default: true`) is read: its data_dir, split by names.
    assert_eq!(pages(&text("")), ["small"]);
    assert_eq!(pages(&text(", name: wikitext-103-v1, split: test")), ["t"]);
    // A given data_dir is read by its file names, whatever the card says.
    assert_eq!(
        pages(&wikitext(", data_dir: wikitext-2-v1, split: test")),
        ["small test"]
    );
    // The preset is text_completion_dataset over the `page` column, tokens and all.
    let tok = tok512(None);
    assert_eq!(
        dataset(&wikitext("")).load(&tok).unwrap(),
        dataset(&text(", name: wikitext-103-v1"))
            .load(&tok)
            .unwrap()
    );

    let err = build_error(&wikitext(", subset: wikitext-103-raw-v1"));
    assert!(err.contains("no config \"wikitext-103-raw-v1\""), "{err}");
    assert!(err.contains("wikitext-103-v1, wikitext-2-v1"), "{err}");
    let err = build_error(&wikitext(", name: wikitext-2-v1"));
    assert!(err.contains("set `subset` instead of `name`"), "{err}");
    // No subset: the card's default.
    assert_eq!(pages(&wikitext(", subset: null")), ["small"]);
    let err = build_error(&wikitext(", max_seq_len: 512"));
    assert!(err.contains("tokenizer.max_seq_len"), "{err}");

    // Patterns as Hugging Face resolves them: a trailing `**` is every file below, and the
    // card, hidden files and Hugging Face's metadata files are never data.
    let globbed = tempfile::tempdir().unwrap();
    let g = globbed.path();
    std::fs::create_dir_all(g.join("data/nested/.cache")).unwrap();
    write(g, "README.md", "---\nconfigs:\n- config_name: all\n  data_files: \"**\"\n- config_name: under\n  data_files: data/**\n---\n");
    write(&g.join("data"), "one.jsonl", &page("one"));
    write(&g.join("data/nested"), "two.jsonl", &page("two"));
    write(&g.join("data/nested/.cache"), "stale.jsonl", &page("stale"));
    write(&g.join("data"), "dataset_info.json", "{}");
    let globbed = g.display().to_string();
    for config in ["all", "under"] {
        assert_eq!(
            pages(&format!("{{_component_: text_completion_dataset, source: {globbed:?}, column: page, name: {config}}}")),
            // In name order, as Hugging Face sorts a pattern's matches.
            ["two", "one"],
            "{config}"
        );
    }
    // Several configs and no default: a data_dir alone says what to read, as in HF.
    assert_eq!(
        pages(&format!("{{_component_: text_completion_dataset, source: {globbed:?}, column: page, data_dir: data/nested}}")),
        ["two"]
    );
    let err = build_error(&format!(
        "{{_component_: text_completion_dataset, source: {globbed:?}, column: page}}"
    ));
    assert!(
        err.contains("several configs and none is the default"),
        "{err}"
    );

    // cnn_dailymail_articles_dataset reads config 3.0.0, which a card without configs lacks...
    let plain = tempfile::tempdir().unwrap();
    let articles = write(plain.path(), "train.jsonl", &page("news"));
    let err = build_error(&format!(
        "{{_component_: cnn_dailymail_articles_dataset, source: {:?}}}",
        plain.path().display().to_string()
    ));
    assert!(
        err.contains("no config \"3.0.0\"") && err.contains("declares no `configs`"),
        "{err}"
    );
    // ... unless the files are named.
    let plain_source = plain.path().display().to_string();
    assert_eq!(
        dataset(&format!(
            "{{_component_: cnn_dailymail_articles_dataset, source: {plain_source:?}, data_files: train.jsonl}}"
        ))
        .rows
        .rows()
        .unwrap()
        .len(),
        1
    );
    // ... while local files through `source: json` have no configs to pick.
    assert_eq!(
        dataset(&format!(
            "{{_component_: cnn_dailymail_articles_dataset, source: json, data_files: {articles:?}}}"
        ))
        .load(&tok)
        .unwrap(),
        dataset(&format!(
            "{{_component_: text_completion_dataset, source: json, data_files: {articles:?}, column: article}}"
        ))
        .load(&tok)
        .unwrap()
    );
}

/// Conversations stored as Parquet `list<struct<from, value>>` (as pyarrow writes ShareGPT data)
/// read as the same rows as their JSON.
#[test]
fn nested_parquet_conversations_read_like_json() {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let dir = tempfile::tempdir().unwrap();
    let tok = tok512(None);
    // Two rows: two turns, then four.
    let rows: [&[(&str, &str)]; 2] = [
        &[("human", "Hi"), ("gpt", "Hello!")],
        &[
            ("human", "2+2?"),
            ("gpt", "4"),
            ("human", "And 3+3?"),
            ("gpt", "6"),
        ],
    ];
    let schema = std::sync::Arc::new(
        parquet::schema::parser::parse_message_type(
            "message rows {
               REQUIRED group conversations (LIST) {
                 REPEATED group list {
                   REQUIRED group element {
                     REQUIRED BYTE_ARRAY from (UTF8);
                     REQUIRED BYTE_ARRAY value (UTF8);
                   }
                 }
               }
             }",
        )
        .unwrap(),
    );
    let path = dir.path().join("chats.parquet");
    let file = std::fs::File::create(&path).unwrap();
    let props = std::sync::Arc::new(WriterProperties::builder().build());
    let mut writer = SerializedFileWriter::new(file, schema, props).unwrap();
    let mut group = writer.next_row_group().unwrap();
    // A turn's repetition level is 0 when it starts a row, 1 when it continues the list.
    let repetition: Vec<i16> = rows
        .iter()
        .flat_map(|turns| (0..turns.len()).map(|i| i16::from(i > 0)))
        .collect();
    let definition = vec![1i16; repetition.len()];
    for field in 0..2 {
        let mut column = group.next_column().unwrap().unwrap();
        let values: Vec<ByteArray> = rows
            .iter()
            .flat_map(|turns| turns.iter())
            .map(|turn| ByteArray::from(if field == 0 { turn.0 } else { turn.1 }))
            .collect();
        column
            .typed::<ByteArrayType>()
            .write_batch(&values, Some(&definition), Some(&repetition))
            .unwrap();
        column.close().unwrap();
    }
    group.close().unwrap();
    writer.close().unwrap();

    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|turns| {
            let turns: Vec<serde_json::Value> = turns
                .iter()
                .map(|(from, value)| serde_json::json!({"from": from, "value": value}))
                .collect();
            serde_json::json!({ "conversations": turns })
        })
        .collect();
    let json_file = write(
        dir.path(),
        "chats.json",
        &serde_json::to_string(&json).unwrap(),
    );
    let load = |source: &str, file: &str| {
        dataset(&format!(
            "{{_component_: slimorca_dataset, source: {source}, data_files: {file:?}}}"
        ))
        .load(&tok)
        .unwrap()
    };
    let from_parquet = load("parquet", &path.display().to_string());
    assert_eq!(from_parquet.len(), 2);
    assert_eq!(from_parquet, load("json", &json_file));
}

#[test]
fn local_files_read_as_hugging_faces_loaders_read_them() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tok512(None);
    let texts = |spec: DatasetSpec| -> Vec<Vec<u32>> {
        spec.load(&tok)
            .unwrap()
            .into_iter()
            .map(|s| s.tokens)
            .collect()
    };
    let encoded = |lines: &[&str]| -> Vec<Vec<u32>> {
        lines
            .iter()
            .map(|l| tok.encode(l, true, true, false))
            .collect()
    };

    // Text lines end at \n, \r\n and \r only: form feeds and Unicode separators stay inside.
    let file = write(dir.path(), "t.txt", "a\u{2028}b\r\nc\x0cd\re\n");
    let lines = texts(dataset(&format!(
        "{{_component_: text_completion_dataset, source: text, data_files: {file:?}}}"
    )));
    assert_eq!(lines, encoded(&["a\u{2028}b", "c\x0cd", "e"]));

    // A JSON list of strings is a `text` column.
    let file = write(dir.path(), "docs.json", r#"["doc one", "doc two"]"#);
    let docs = texts(dataset(&format!(
        "{{_component_: text_completion_dataset, source: json, data_files: {file:?}}}"
    )));
    assert_eq!(docs, encoded(&["doc one", "doc two"]));

    // Patterns in data_files, each one's matches sorted; one that matches nothing is an error.
    let shards = dir.path().join("shards");
    std::fs::create_dir_all(&shards).unwrap();
    write(&shards, "b.jsonl", "{\"text\": \"second\"}\n");
    write(&shards, "a.jsonl", "{\"text\": \"first\"}\n");
    write(&shards, "notes.txt", "not data\n");
    let pattern = format!("{}/*.jsonl", shards.display());
    let both = texts(dataset(&format!(
        "{{_component_: text_completion_dataset, source: json, data_files: {pattern:?}}}"
    )));
    assert_eq!(both, encoded(&["first", "second"]));
    let node: Yaml = serde_yaml::from_str(&format!(
        "{{_component_: text_completion_dataset, source: json, data_files: \"{}/*.csv\"}}",
        shards.display()
    ))
    .unwrap();
    let err = tune_core::registry::lookup("text_completion_dataset")
        .unwrap()
        .build_from(&node)
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("matches no file"), "{err:#}");

    // A local folder as `source` with data_files relative to it (and to data_dir within it).
    let folder = shards.display().to_string();
    let named = texts(dataset(&format!(
        "{{_component_: text_completion_dataset, source: {folder:?}, data_files: b.jsonl}}"
    )));
    assert_eq!(named, encoded(&["second"]));
    let in_data_dir = texts(dataset(&format!(
        "{{_component_: text_completion_dataset, source: {:?}, data_dir: shards, data_files: notes.txt}}",
        dir.path().display()
    )));
    assert_eq!(in_data_dir, encoded(&["not data"]));

    // A binary Parquet column is bytes, not text (the crate would give base64).
    let parquet = dir.path().join("bin.parquet");
    write_parquet(&parquet, &[("bin:text", vec!["hello"])]);
    let spec = dataset(&format!(
        "{{_component_: text_completion_dataset, source: parquet, data_files: {:?}}}",
        parquet.display()
    ));
    let err = spec.load(&tok).unwrap_err();
    assert!(format!("{err:#}").contains("`text` is not text"), "{err:#}");
}

/// `field` (JSON) and `sample_by` (text) on files they do not apply to are errors, as
/// load_dataset's builders reject them, rather than being dropped.
#[test]
fn source_settings_for_another_format_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = write(dir.path(), "lines.txt", "one\ntwo\n");
    let json = write(dir.path(), "rows.jsonl", "{\"text\": \"one\"}\n");
    let err = build_error(&format!(
        "{{_component_: text_completion_dataset, source: text, data_files: {text:?}, field: rows}}"
    ));
    assert!(
        err.contains("`field` picks rows out of a JSON file"),
        "{err}"
    );
    let err = build_error(&format!(
        "{{_component_: text_completion_dataset, source: json, data_files: {json:?}, sample_by: paragraph}}"
    ));
    assert!(err.contains("`sample_by` is for plain text"), "{err}");
    // Where they apply, they work.
    let by_paragraph = dataset(&format!(
        "{{_component_: text_completion_dataset, source: text, data_files: {text:?}, sample_by: paragraph}}"
    ));
    assert_eq!(by_paragraph.rows.rows().unwrap().len(), 1);
    // keep_linebreaks as Hugging Face's text builder: each line keeps its "\n" (a "\r\n" read
    // as one), the last none when the file lacks it: ['one\n', 'two\n', '\n', 'three'].
    let kept = write(dir.path(), "kept.txt", "one\r\ntwo\n\nthree");
    let rows = dataset(&format!(
        "{{_component_: text_completion_dataset, source: text, data_files: {kept:?}, keep_linebreaks: True}}"
    ))
    .rows
    .rows()
    .unwrap();
    let texts: Vec<&str> = rows
        .iter()
        .map(|r| r.columns["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["one\n", "two\n", "\n", "three"]);
    let err = build_error(&format!(
        "{{_component_: text_completion_dataset, source: json, data_files: {json:?}, keep_linebreaks: True}}"
    ));
    assert!(err.contains("`keep_linebreaks` is for plain text"), "{err}");
}

/// `source: csv` reads as Hugging Face's csv builder (pandas): quoted commas, quotes and line
/// breaks, and the cells pandas calls missing ("", NA, None, null, ...) become null, so an
/// alpaca row with such an `input` has none, as in JSON with `input: null`.
#[test]
fn csv_files_read_like_json() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tok512(None);
    let json = serde_json::json!([
        {"instruction": "Add, then say \"hi\"", "input": null, "output": "Five"},
        {"instruction": "Name a pet", "input": null, "output": "A cat\nand a dog"},
        {"instruction": "Say why", "input": "Because", "output": "Fine"},
        {"instruction": "Count", "input": null, "output": "7"},
    ]);
    let json_file = write(dir.path(), "rows.json", &json.to_string());
    let want = dataset(&format!(
        "{{_component_: alpaca_dataset, source: json, data_files: {json_file:?}}}"
    ))
    .load(&tok)
    .unwrap();
    let csv = "instruction,input,output\n\
               \"Add, then say \"\"hi\"\"\",,Five\n\
               Name a pet,NA,\"A cat\nand a dog\"\n\
               Say why,Because,Fine\n\
               Count,None,7\n";
    let csv_file = write(dir.path(), "rows.csv", csv);
    for source in [
        format!("source: csv, data_files: {csv_file:?}"),
        format!("source: {csv_file:?}"),
    ] {
        let got = dataset(&format!("{{_component_: alpaca_dataset, {source}}}"))
            .load(&tok)
            .unwrap();
        assert_eq!(got, want, "{source}");
    }
    // pandas' reading of untidy files: a repeated column name is `output.1` (the first
    // `output` stays), a short row's missing cells are null, a line of spaces is no row.
    let untidy = "instruction,output,input,output\n\
                  \"Add, then say \"\"hi\"\"\",Five,,Six\n\
                  \x20\x20\x20\n\
                  Name a pet,\"A cat\nand a dog\"\n\
                  Say why,Fine,Because\n\
                  Count,7\n";
    let untidy_file = write(dir.path(), "untidy.csv", untidy);
    let got = dataset(&format!(
        "{{_component_: alpaca_dataset, source: csv, data_files: {untidy_file:?}}}"
    ))
    .load(&tok)
    .unwrap();
    assert_eq!(got, want);
    // A row longer than the header is refused, as pandas refuses it.
    let long_file = write(
        dir.path(),
        "long.csv",
        "instruction,input,output\na,b,c,d\n",
    );
    let e = format!(
        "{:#}",
        dataset(&format!(
            "{{_component_: alpaca_dataset, source: csv, data_files: {long_file:?}}}"
        ))
        .load(&tok)
        .unwrap_err()
    );
    assert!(e.contains("expected 3 fields in line 2, saw 4"), "{e}");
    // A quote never closed would swallow the rest of the file into one cell: refused, naming
    // the line it opens in. Closed quotes, escaped ones and quotes inside a field are fine.
    let open_file = write(
        dir.path(),
        "open.csv",
        "instruction,input,output\nfine,,\"a \"\"quoted\"\" word\"\nsize,5\" screen,ok\n\"never closed,,x\nlast,,y\n",
    );
    let e = format!(
        "{:#}",
        dataset(&format!(
            "{{_component_: alpaca_dataset, source: csv, data_files: {open_file:?}}}"
        ))
        .load(&tok)
        .unwrap_err()
    );
    assert!(e.contains("starts in line 4 is never closed"), "{e}");
    let closed = open_file.replace("open.csv", "closed.csv");
    std::fs::write(
        &closed,
        "instruction,input,output\nfine,,\"a \"\"quoted\"\" word\"\nsize,5\" screen,ok\n",
    )
    .unwrap();
    let rows = dataset(&format!(
        "{{_component_: alpaca_dataset, source: csv, data_files: {closed:?}}}"
    ))
    .rows
    .rows()
    .unwrap();
    assert_eq!(rows[0].columns["output"], "a \"quoted\" word");
    assert_eq!(rows[1].columns["input"], "5\" screen");
    // `field` picks rows out of JSON only.
    let e = build_error(&format!(
        "{{_component_: alpaca_dataset, source: csv, data_files: {csv_file:?}, field: rows}}"
    ));
    assert!(e.contains("not JSON"), "{e}");
}

/// A folder is read with one builder, as Hugging Face picks it: that of the most common data
/// extension (.json and .jsonl count apart; a draw goes to parquet, then jsonl, json, csv), and
/// only its files.
#[test]
fn a_folder_is_read_with_the_builder_of_its_most_common_extension() {
    let tok = tok512(None);
    let row = |i: &str| serde_json::json!({"instruction": i, "input": "", "output": "ok"});
    let load = |dir: &Path| {
        dataset(&format!(
            "{{_component_: alpaca_dataset, source: {:?}}}",
            dir.display().to_string()
        ))
        .load(&tok)
        .unwrap()
        .len()
    };
    let json_wins = tempfile::tempdir().unwrap();
    write(json_wins.path(), "train-a.jsonl", &row("a").to_string());
    write(json_wins.path(), "train-b.jsonl", &row("b").to_string());
    write(
        json_wins.path(),
        "train-c.csv",
        "instruction,input,output\nc,,ok\nd,,ok\ne,,ok\n",
    );
    assert_eq!(load(json_wins.path()), 2, "the csv file is not read");
    let csv_wins = tempfile::tempdir().unwrap();
    write(
        csv_wins.path(),
        "train-a.csv",
        "instruction,input,output\na,,ok\n",
    );
    write(
        csv_wins.path(),
        "train-b.csv",
        "instruction,input,output\nb,,ok\n",
    );
    write(
        csv_wins.path(),
        "train-c.json",
        &serde_json::json!([row("c"), row("d"), row("e")]).to_string(),
    );
    assert_eq!(load(csv_wins.path()), 2, "the json file is not read");
    let draw = tempfile::tempdir().unwrap();
    write(draw.path(), "train-a.jsonl", &row("a").to_string());
    write(
        draw.path(),
        "train-b.csv",
        "instruction,input,output\nb,,ok\nc,,ok\n",
    );
    assert_eq!(load(draw.path()), 1, "a draw goes to jsonl before csv");
}

/// `(pct1_dropremainder)` needs 100 rows or more, as in Hugging Face (below that every percent is
/// zero rows); with them, each percent is `rows / 100` rows.
#[test]
fn pct1_dropremainder_needs_a_hundred_rows() {
    let dir = tempfile::tempdir().unwrap();
    let rows = |n: usize| {
        let rows: Vec<serde_json::Value> = (0..n)
            .map(|i| serde_json::json!({"text": format!("row {i}")}))
            .collect();
        write(
            dir.path(),
            &format!("rows{n}.json"),
            &serde_json::to_string(&rows).unwrap(),
        )
    };
    let spec = |file: &str| {
        dataset(&format!(
            "{{_component_: text_completion_dataset, source: json, data_files: {file:?}, \
             split: 'train[:3%](pct1_dropremainder)'}}"
        ))
    };
    let err = format!("{:#}", spec(&rows(50)).rows.rows().unwrap_err());
    assert!(err.contains("fewer than 100 rows (50)"), "{err}");
    assert_eq!(spec(&rows(250)).rows.rows().unwrap().len(), 6);
}
