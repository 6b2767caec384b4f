//! torchtune's `alpaca_dataset` and `alpaca_cleaned_dataset`, read from local JSON files.
//!
//! Each row `{instruction, input, output}` becomes a user message (the Alpaca prompt, masked
//! unless `train_on_input`) and an assistant message (the output), tokenized by the tokenizer
//! (which also applies its prompt template, by default Llama-2's `[INST] ... [/INST]`).
//!
//! tune-rs never downloads: `source` must be `json` with `data_files` (or a path to a local
//! `.json`/`.jsonl` file or a folder of them). A Hugging Face dataset id is a clear error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tune_core::{ArgSpec, ArgType, Args};

use crate::json_source::{parse_split, read_rows, DataFiles, Row};
use crate::llama2_tokenizer::Llama2Tokenizer;
use crate::messages::{Message, Role};
use crate::sft::{tokenize_sft, Sample};

/// The Alpaca prompt for rows with a non-empty `input`.
pub const PROMPT_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";

/// The Alpaca prompt for rows without `input`.
pub const PROMPT_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

/// The columns an Alpaca row is read from.
pub const ALPACA_COLUMNS: [&str; 3] = ["instruction", "input", "output"];

/// The Alpaca prompt for one row.
pub fn alpaca_prompt(instruction: &str, input: Option<&str>) -> String {
    match input.filter(|s| !s.is_empty()) {
        Some(input) => PROMPT_INPUT
            .replacen("{instruction}", instruction, 1)
            .replacen("{input}", input, 1),
        None => PROMPT_NO_INPUT.replacen("{instruction}", instruction, 1),
    }
}

/// torchtune's `AlpacaToMessages`: the user prompt (masked unless `train_on_input`) and the
/// assistant's output. `column_map` maps `instruction`/`input`/`output` to the row's column names.
pub fn alpaca_to_messages(
    row: &Row,
    train_on_input: bool,
    column_map: &BTreeMap<String, String>,
) -> Result<Vec<Message>> {
    let text = |key: &str, required: bool| -> Result<Option<String>> {
        let name = column_map.get(key).map_or(key, String::as_str);
        let hint = |what: &str| {
            let present: Vec<&str> = row.columns.keys().map(String::as_str).collect();
            format!(
                "{}: {what} (columns in this row: {}); if your data names the {key} column differently, \
                 set `column_map: {{{key}: <column>}}`",
                row.location(),
                if present.is_empty() { "none".to_string() } else { present.join(", ") }
            )
        };
        match row.columns.get(name) {
            None | Some(Value::Null) if !required => Ok(None),
            None => Err(anyhow!(hint(&format!("no `{name}` column")))),
            Some(Value::Null) => Err(anyhow!(hint(&format!("`{name}` is null")))),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => Ok(Some(python_str(v))),
            Some(_) => Err(anyhow!(hint(&format!("`{name}` is not text")))),
        }
    };
    let instruction = text("instruction", true)?.unwrap_or_default();
    let input = text("input", false)?;
    let output = text("output", true)?.unwrap_or_default();
    let prompt = alpaca_prompt(&instruction, input.as_deref());
    Ok(vec![
        Message::new(Role::User, prompt, !train_on_input),
        Message::new(Role::Assistant, output, false),
    ])
}

/// What Python's `str()` gives for a JSON scalar.
fn python_str(v: &Value) -> String {
    match v {
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        other => other.to_string(),
    }
}

/// Where the rows come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// `source: json` with `data_files`.
    Json(DataFiles),
}

/// A dataset component's parsed arguments (`alpaca_dataset`, `alpaca_cleaned_dataset`). Building
/// the component gives this; [`DatasetSpec::load`] tokenizes once the tokenizer exists.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetSpec {
    /// The component's short name, for messages.
    pub component: &'static str,
    pub source: Source,
    pub split: String,
    pub train_on_input: bool,
    pub column_map: BTreeMap<String, String>,
    /// The `field` of `load_dataset("json", field=...)`: rows under this top-level key.
    pub field: Option<String>,
}

/// Downloads a Hugging Face Hub dataset's JSON/JSON Lines files (those named in `data_files`, or
/// every .json/.jsonl file of the repo) into the Hugging Face cache, with hf-hub.
fn fetch_from_hub(
    component: &str,
    repo_id: &str,
    data_files: Option<DataFiles>,
) -> Result<DataFiles> {
    let fix = "Without network access, download the data yourself, then set `source: json` and \
               `data_files: path/to/data.json` (a JSON array or JSON Lines file of instruction/input/output rows)";
    let fetch = || -> Result<Vec<PathBuf>> {
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(false)
            .build()?;
        let repo = api.dataset(repo_id.to_string());
        let names: Vec<String> = match &data_files {
            Some(DataFiles::Train(files)) => files
                .iter()
                .map(|f| f.to_string_lossy().into_owned())
                .collect(),
            Some(DataFiles::Splits(_)) => {
                bail!("per-split data_files are only supported with `source: json`")
            }
            None => repo
                .info()?
                .siblings
                .into_iter()
                .map(|s| s.rfilename)
                .filter(|f| looks_like_data_file(Path::new(f)))
                .collect(),
        };
        if names.is_empty() {
            bail!(
                "the repo has no .json/.jsonl data files (tune-rs does not read parquet or arrow)"
            );
        }
        names.iter().map(|name| Ok(repo.get(name)?)).collect()
    };
    fetch().map(DataFiles::Train).with_context(|| {
        format!("{component}: cannot download Hugging Face Hub dataset {repo_id:?}. {fix}")
    })
}

fn looks_like_data_file(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "json" | "jsonl"))
}

impl DatasetSpec {
    /// Parses and checks the arguments of `component` (whose default `source` is
    /// `default_source`). Unsupported settings fail here, before any model is loaded.
    pub fn from_args(args: &Args, component: &'static str) -> Result<Self> {
        let source: String = args.get("source")?;
        if args.get_opt::<bool>("packed")?.unwrap_or(false) {
            bail!(
                "{component}: packed=True is not supported by tune-rs yet; set `packed: False` \
                 (samples are padded per batch instead)"
            );
        }
        if !args.is_null("filter_fn") {
            bail!("{component}: filter_fn is not supported (a Python callable); filter the data file instead");
        }
        let train_on_input = args.get_opt::<bool>("train_on_input")?.unwrap_or(true);
        let split = args
            .get_opt::<String>("split")?
            .unwrap_or_else(|| "train".to_string());
        parse_split(&split).with_context(|| format!("{component}.split"))?;
        let column_map: BTreeMap<String, String> = args.get_opt("column_map")?.unwrap_or_default();
        for key in column_map.keys() {
            if !ALPACA_COLUMNS.contains(&key.as_str()) {
                bail!(
                    "{component}.column_map: unknown key `{key}`; its keys are {} (each mapped to a column name of your data)",
                    ALPACA_COLUMNS.join(", ")
                );
            }
        }
        let field = args.get_opt::<String>("field")?;
        let data_files = match args.raw("data_files").filter(|v| !v.is_null()) {
            Some(v) => {
                Some(DataFiles::from_config(v).with_context(|| format!("{component}.data_files"))?)
            }
            None => None,
        };
        let known = [
            "source",
            "column_map",
            "train_on_input",
            "packed",
            "filter_fn",
            "split",
            "data_files",
            "field",
        ];
        for (key, value) in args.extra(&known) {
            match key.as_str() {
                "streaming" if value.as_bool() == Some(true) => {
                    bail!(
                        "{component}: streaming=True is not supported; local files are read whole"
                    )
                }
                "name" | "cache_dir" | "streaming" | "trust_remote_code" | "keep_in_memory"
                | "num_proc" => {
                    tracing::warn!("{component}: ignoring load_dataset argument `{key}` (not needed for local JSON files)")
                }
                other => bail!(
                    "{component}: unsupported argument `{other}`; supported: {}",
                    known.join(", ")
                ),
            }
        }
        let source = Self::resolve_source(component, &source, data_files)?;
        Ok(DatasetSpec {
            component,
            source,
            split,
            train_on_input,
            column_map,
            field,
        })
    }

    fn resolve_source(
        component: &str,
        source: &str,
        data_files: Option<DataFiles>,
    ) -> Result<Source> {
        let local = Path::new(source);
        match (source, data_files) {
            ("json", Some(files)) => Ok(Source::Json(files)),
            ("json", None) => bail!(
                "{component}: `source: json` needs `data_files` (a .json or .jsonl file, or a list of them)"
            ),
            ("csv" | "parquet" | "text" | "arrow" | "pandas", _) => bail!(
                "{component}: source {source:?} is not supported; convert the data to JSON and use \
                 `source: json` with `data_files`"
            ),
            (_, None) if local.is_file() && looks_like_data_file(local) => {
                Ok(Source::Json(DataFiles::Train(vec![local.to_path_buf()])))
            }
            (_, None) if local.is_dir() => {
                let mut files: Vec<PathBuf> = std::fs::read_dir(local)
                    .with_context(|| format!("cannot list {}", local.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_file() && looks_like_data_file(p))
                    .collect();
                files.sort();
                if files.is_empty() {
                    bail!("{component}: folder {source} has no .json or .jsonl files");
                }
                Ok(Source::Json(DataFiles::Train(files)))
            }
            (_, files) => Ok(Source::Json(fetch_from_hub(component, source, files)?)),
        }
    }

    /// The selected rows, before tokenization.
    pub fn rows(&self) -> Result<Vec<Row>> {
        let Source::Json(files) = &self.source;
        let mut out = Vec::new();
        for slice in parse_split(&self.split)? {
            let mut rows = Vec::new();
            let paths = files
                .split(&slice.name)
                .with_context(|| self.component.to_string())?;
            for path in paths {
                rows.extend(
                    read_rows(path, self.field.as_deref())
                        .with_context(|| self.component.to_string())?,
                );
            }
            let total = rows.len();
            if total == 0 {
                bail!(
                    "{}: the data files of split {:?} have no rows: {}",
                    self.component,
                    slice.name,
                    paths
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let range = slice.range(total);
            out.extend(rows.into_iter().skip(range.start).take(range.len()));
        }
        if out.is_empty() {
            bail!(
                "{}: split {:?} selects no rows; widen the slice",
                self.component,
                self.split
            );
        }
        Ok(out)
    }

    /// Reads, converts and tokenizes every selected row (torchtune's `ds[i]` for every `i`).
    pub fn load(&self, tokenizer: &Llama2Tokenizer) -> Result<Vec<Sample>> {
        self.rows()?
            .iter()
            .map(|row| {
                let messages = alpaca_to_messages(row, self.train_on_input, &self.column_map)?;
                tokenize_sft(&messages, tokenizer).with_context(|| row.location())
            })
            .collect()
    }
}

const DATASET_ARGS_ALPACA: &[ArgSpec] = &[
    ArgSpec::optional("source", ArgType::Str, "tatsu-lab/alpaca"),
    ArgSpec::nullable("column_map", ArgType::Any),
    ArgSpec::optional("train_on_input", ArgType::Bool, "true"),
    ArgSpec::optional("packed", ArgType::Bool, "false"),
    ArgSpec::nullable("filter_fn", ArgType::Any),
    ArgSpec::optional("split", ArgType::Str, "train"),
    ArgSpec::nullable("data_files", ArgType::Any),
];

const DATASET_ARGS_ALPACA_CLEANED: &[ArgSpec] = &[
    ArgSpec::optional("source", ArgType::Str, "yahma/alpaca-cleaned"),
    ArgSpec::nullable("column_map", ArgType::Any),
    ArgSpec::optional("train_on_input", ArgType::Bool, "true"),
    ArgSpec::optional("packed", ArgType::Bool, "false"),
    ArgSpec::nullable("filter_fn", ArgType::Any),
    ArgSpec::optional("split", ArgType::Str, "train"),
    ArgSpec::nullable("data_files", ArgType::Any),
];

tune_core::inventory::submit! {
    tune_core::Component {
        path: "torchtune.datasets.alpaca_dataset",
        aliases: &["alpaca_dataset"],
        kind: tune_core::ComponentKind::Dataset,
        args: DATASET_ARGS_ALPACA,
        extra_args: true,
        about: "Alpaca instruction data (instruction/input/output rows) from local JSON: source: json, data_files: ...",
        origin: "built-in",
        build: |args| Ok(Box::new(DatasetSpec::from_args(args, "alpaca_dataset")?)),
    }
}

tune_core::inventory::submit! {
    tune_core::Component {
        path: "torchtune.datasets.alpaca_cleaned_dataset",
        aliases: &["alpaca_cleaned_dataset"],
        kind: tune_core::ComponentKind::Dataset,
        args: DATASET_ARGS_ALPACA_CLEANED,
        extra_args: true,
        about: "alpaca_dataset with yahma/alpaca-cleaned as the default source (use source: json, data_files: ... offline)",
        origin: "built-in",
        build: |args| Ok(Box::new(DatasetSpec::from_args(args, "alpaca_cleaned_dataset")?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(json: &str) -> Row {
        let columns = match serde_json::from_str(json).unwrap() {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        Row {
            file: PathBuf::from("data.json"),
            index: 3,
            line: None,
            columns,
        }
    }

    #[test]
    fn prompts_with_and_without_input() {
        let m = alpaca_to_messages(
            &row(r#"{"instruction": "Add.", "input": "1 2", "output": "3"}"#),
            false,
            &BTreeMap::new(),
        )
        .unwrap();
        assert!(m[0].text().contains("### Input:\n1 2\n\n### Response:\n"));
        assert!(m[0].masked && !m[1].masked);
        assert_eq!(m[1].text(), "3");
        for input in [r#""input": """#, r#""input": null"#, r#""other": 1"#] {
            let json = format!(r#"{{"instruction": "Add.", {input}, "output": "3"}}"#);
            let m = alpaca_to_messages(&row(&json), true, &BTreeMap::new()).unwrap();
            assert_eq!(
                m[0].text(),
                PROMPT_NO_INPUT.replace("{instruction}", "Add.")
            );
            assert!(!m[0].masked);
        }
    }

    #[test]
    fn missing_columns_name_the_row_and_the_fix() {
        let err = alpaca_to_messages(
            &row(r#"{"instruction": "x", "response": "y"}"#),
            true,
            &BTreeMap::new(),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("data.json row 3")
                && msg.contains("`output`")
                && msg.contains("column_map"),
            "{msg}"
        );
        assert!(msg.contains("instruction, response"), "{msg}");
        let map = BTreeMap::from([("output".to_string(), "response".to_string())]);
        let m = alpaca_to_messages(&row(r#"{"instruction": "x", "response": "y"}"#), true, &map)
            .unwrap();
        assert_eq!(m[1].text(), "y");
        let err = alpaca_to_messages(
            &row(r#"{"instruction": null, "output": "y"}"#),
            true,
            &BTreeMap::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("null"));
    }
}
