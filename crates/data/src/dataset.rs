//! What every torchtune dataset builder shares: where the rows come from ([`RowSource`]:
//! `source`, `data_files`, `split`, `field`), whether to pack them (`packed`), and the per-row
//! conversion into a tokenized [`Sample`] that each builder (`alpaca_dataset`,
//! `instruct_dataset`, `chat_dataset`, `text_completion_dataset`) supplies.
//!
//! Sources are local files: `source: json` (JSON / JSON Lines), `source: text` (one row per
//! line, as Hugging Face's `text` loader) or `source: parquet` with `data_files`, or a path to
//! such a file or a folder of them. A Hugging Face dataset id downloads its JSON or Parquet files
//! through hf-hub; folders and Hub datasets take their splits from the file names.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tune_core::Args;

use crate::json_source::{
    parse_split, read_parquet_rows, read_rows, read_text_rows, DataFiles, Row, TextSampleBy,
};
use crate::llama2_tokenizer::Llama2Tokenizer;
use crate::packed::{pack_samples, Examples};
use crate::sft::Sample;

/// Turns one row of a data file into a tokenized sample: the builder-specific part of a dataset.
/// Its errors name the row ([`Row::location`]).
pub trait RowToSample: Debug + Send + Sync {
    fn sample(&self, row: &Row, tokenizer: &Llama2Tokenizer) -> Result<Sample>;
}

/// Where the rows come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// `source: json` with `data_files`.
    Json(DataFiles),
    /// `source: text` with `data_files`: each row is `{"text": ...}`.
    Text(DataFiles, TextSampleBy),
    /// `source: parquet` with `data_files`.
    Parquet(DataFiles),
    /// Files read by their extension (.json/.jsonl or .parquet): a local folder, or the files
    /// of a Hugging Face Hub dataset.
    Files(DataFiles),
}

/// `packed: True`: torchtune's `PackedDataset` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packing {
    /// Split a sample that does not fit the rest of a pack across two packs (text completion's
    /// default) instead of starting the next pack with it (the SFT datasets).
    pub split_across_pack: bool,
}

/// Where a dataset component's rows come from: its `source`, `data_files`, `split` and `field`.
#[derive(Debug, Clone)]
pub struct RowSource {
    /// The component's short name, for messages.
    pub component: &'static str,
    pub source: Source,
    pub split: String,
    /// The `field` of `load_dataset("json", field=...)`: rows under this top-level key.
    pub field: Option<String>,
}

/// A dataset component's parsed arguments. Building the component gives this;
/// [`DatasetSpec::load`] tokenizes once the tokenizer exists.
#[derive(Debug, Clone)]
pub struct DatasetSpec {
    pub rows: RowSource,
    /// Set when `packed: True`.
    pub packing: Option<Packing>,
    pub to_sample: Arc<dyn RowToSample>,
}

/// The arguments that say where rows come from, taken by every dataset builder.
pub const SOURCE_ARGS: [&str; 6] = [
    "source",
    "filter_fn",
    "split",
    "data_files",
    "field",
    "data_dir",
];

impl DatasetSpec {
    /// Parses the arguments of `component`; `own` names the builder's other arguments (already
    /// read by the caller), and `split_across_pack` is the builder's packing default.
    /// Unsupported settings fail here, before any model is loaded.
    pub fn from_args(
        args: &Args,
        component: &'static str,
        own: &[&str],
        split_across_pack: bool,
        to_sample: Arc<dyn RowToSample>,
    ) -> Result<Self> {
        let own: Vec<&str> = own.iter().copied().chain(["packed"]).collect();
        let rows = RowSource::from_args(args, component, &own, None)?;
        let packing = args
            .get_opt::<bool>("packed")?
            .unwrap_or(false)
            .then_some(Packing { split_across_pack });
        Ok(DatasetSpec {
            rows,
            packing,
            to_sample,
        })
    }

    /// The component's short name, for messages.
    pub fn component(&self) -> &'static str {
        self.rows.component
    }

    /// Reads, converts and tokenizes every selected row (torchtune's `ds[i]` for every `i`),
    /// without packing.
    pub fn load(&self, tokenizer: &Llama2Tokenizer) -> Result<Vec<Sample>> {
        self.rows
            .rows()?
            .iter()
            .map(|row| self.to_sample.sample(row, tokenizer))
            .collect()
    }

    /// What the recipe trains on: the samples, or with `packed: True` the packs of
    /// `tokenizer.max_seq_len` tokens made from them.
    pub fn load_examples(&self, tokenizer: &Llama2Tokenizer) -> Result<Examples> {
        let Some(packing) = self.packing else {
            return Ok(Examples::Samples(self.load(tokenizer)?));
        };
        let max_seq_len = self.pack_length(tokenizer)?;
        let samples = self.load(tokenizer)?;
        let packs = pack_samples(
            &samples,
            max_seq_len,
            packing.split_across_pack,
            tokenizer.pad_id(),
        )
        .with_context(|| format!("{}: packing the dataset", self.component()))?;
        Ok(Examples::Packs(packs))
    }

    /// The length of every pack (`tokenizer.max_seq_len`), or the error torchtune gives without one.
    pub fn pack_length(&self, tokenizer: &Llama2Tokenizer) -> Result<usize> {
        tokenizer.max_seq_len().ok_or_else(|| {
            anyhow!(
                "{}: packed=True needs a pack length: set `tokenizer.max_seq_len` (e.g. \
                 tokenizer.max_seq_len=2048), or set `dataset.packed=False`",
                self.component()
            )
        })
    }
}

impl RowSource {
    /// Parses the source arguments of `component`; `own` names its other arguments, and
    /// `default_data_dir` is the folder of a Hub dataset read when `data_dir` is not given.
    pub fn from_args(
        args: &Args,
        component: &'static str,
        own: &[&str],
        default_data_dir: Option<&str>,
    ) -> Result<Self> {
        let source: String = args.get("source")?;
        if !args.is_null("filter_fn") {
            bail!("{component}: filter_fn is not supported (a Python callable); filter the data file instead");
        }
        let split = args
            .get_opt::<String>("split")?
            .unwrap_or_else(|| "train".to_string());
        parse_split(&split).with_context(|| format!("{component}.split"))?;
        let field = args.get_opt::<String>("field")?;
        let sample_by = match args.get_opt::<String>("sample_by")? {
            None => TextSampleBy::Line,
            Some(s) => TextSampleBy::parse(&s).with_context(|| format!("{component}.sample_by"))?,
        };
        let data_files = match args.raw("data_files").filter(|v| !v.is_null()) {
            Some(v) => {
                Some(DataFiles::from_config(v).with_context(|| format!("{component}.data_files"))?)
            }
            None => None,
        };
        let known: Vec<&str> = SOURCE_ARGS
            .iter()
            .chain(own)
            .chain(&["sample_by"])
            .copied()
            .collect();
        for (key, value) in args.extra(&known) {
            match key.as_str() {
                "streaming" if value.as_bool() == Some(true) => {
                    bail!(
                        "{component}: streaming=True is not supported; local files are read whole"
                    )
                }
                "name" | "cache_dir" | "streaming" | "trust_remote_code" | "keep_in_memory"
                | "num_proc" => {
                    tracing::warn!("{component}: ignoring load_dataset argument `{key}` (not needed for local files)")
                }
                other => bail!(
                    "{component}: unsupported argument `{other}`; supported: {}",
                    known.join(", ")
                ),
            }
        }
        let data_dir = args.get_opt::<String>("data_dir")?;
        let data_dir = data_dir.as_deref().or(default_data_dir);
        let source = resolve_source(component, &source, data_files, sample_by, data_dir)?;
        Ok(RowSource {
            component,
            source,
            split,
            field,
        })
    }

    /// The selected rows, before tokenization.
    pub fn rows(&self) -> Result<Vec<Row>> {
        let files = match &self.source {
            Source::Json(files)
            | Source::Text(files, _)
            | Source::Parquet(files)
            | Source::Files(files) => files,
        };
        let mut out = Vec::new();
        for slice in parse_split(&self.split)? {
            let mut rows = Vec::new();
            let paths = files
                .split(&slice.name)
                .with_context(|| self.component.to_string())?;
            for path in paths {
                let read = match &self.source {
                    Source::Json(_) => read_rows(path, self.field.as_deref()),
                    Source::Text(_, by) => read_text_rows(path, *by),
                    Source::Parquet(_) => read_parquet_rows(path),
                    Source::Files(_) if extension_is(path, &["parquet"]) => read_parquet_rows(path),
                    Source::Files(_) => read_rows(path, self.field.as_deref()),
                };
                rows.extend(read.with_context(|| self.component.to_string())?);
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
}

fn resolve_source(
    component: &str,
    source: &str,
    data_files: Option<DataFiles>,
    sample_by: TextSampleBy,
    data_dir: Option<&str>,
) -> Result<Source> {
    let local = Path::new(source);
    let is_text = |p: &Path| extension_is(p, &["txt", "text"]);
    match (source, data_files) {
        ("json", Some(files)) => Ok(Source::Json(files)),
        ("text", Some(files)) => Ok(Source::Text(files, sample_by)),
        ("parquet", Some(files)) => Ok(Source::Parquet(files)),
        ("json" | "text" | "parquet", None) => {
            bail!("{component}: `source: {source}` needs `data_files` (a file, or a list of them)")
        }
        ("csv" | "arrow" | "pandas", _) => bail!(
            "{component}: source {source:?} is not supported; convert the data to JSON and use \
             `source: json` with `data_files` (or `source: text` for plain text, `source: parquet` \
             for Parquet)"
        ),
        (_, None) if local.is_file() && is_text(local) => Ok(Source::Text(
            DataFiles::Train(vec![local.to_path_buf()]),
            sample_by,
        )),
        (_, None) if local.is_file() && extension_is(local, &["parquet"]) => {
            Ok(Source::Parquet(DataFiles::Train(vec![local.to_path_buf()])))
        }
        (_, None) if local.is_file() && looks_like_json(local) => {
            Ok(Source::Json(DataFiles::Train(vec![local.to_path_buf()])))
        }
        (_, None) if local.is_dir() => {
            let mut files: Vec<(String, PathBuf)> = Vec::new();
            for entry in walk(local)? {
                if looks_like_data(&entry) {
                    let name = entry.strip_prefix(local).unwrap_or(&entry);
                    files.push((name.to_string_lossy().replace('\\', "/"), entry.clone()));
                }
            }
            files.sort();
            if files.is_empty() {
                bail!("{component}: folder {source} has no .json, .jsonl or .parquet files");
            }
            Ok(Source::Files(files_by_split(files)))
        }
        (_, files) => Ok(Source::Files(fetch_from_hub(
            component, source, files, data_dir,
        )?)),
    }
}

/// Every file under `dir`, depth first.
fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(walk(&path)?);
        } else {
            out.push(path);
        }
    }
    Ok(out)
}

/// The split a dataset file belongs to by Hugging Face's naming conventions: a folder or a file
/// name starting with the split's name (`train-00000-of-00001.parquet`, `data/test.json`,
/// `validation/part0.jsonl`); `dev`/`valid`/`val` mean validation, `eval`/`testing` test.
fn split_of(name: &str) -> Option<&'static str> {
    name.split('/').find_map(|part| {
        let part = part.to_ascii_lowercase();
        let word: String = part
            .chars()
            .take_while(|c| c.is_ascii_alphabetic())
            .collect();
        match word.as_str() {
            "train" | "training" => Some("train"),
            "validation" | "valid" | "val" | "dev" => Some("validation"),
            "test" | "testing" | "eval" | "evaluation" => Some("test"),
            _ => None,
        }
    })
}

/// `(name in the dataset, local path)` pairs as `data_files`: split by their names when any
/// names a split (files that name none are then left out, as Hugging Face does), else all
/// `train`.
fn files_by_split(files: Vec<(String, PathBuf)>) -> DataFiles {
    if !files.iter().any(|(name, _)| split_of(name).is_some()) {
        return DataFiles::Train(files.into_iter().map(|(_, path)| path).collect());
    }
    let mut splits: std::collections::BTreeMap<String, Vec<PathBuf>> = Default::default();
    for (name, path) in files {
        if let Some(split) = split_of(&name) {
            splits.entry(split.to_string()).or_default().push(path);
        }
    }
    DataFiles::Splits(splits)
}

/// Downloads a Hugging Face Hub dataset's data files (JSON, JSON Lines or Parquet: those named
/// in `data_files`, else every such file, under `data_dir` when given) into the Hugging Face
/// cache, with hf-hub.
fn fetch_from_hub(
    component: &str,
    repo_id: &str,
    data_files: Option<DataFiles>,
    data_dir: Option<&str>,
) -> Result<DataFiles> {
    let fix = "Without network access, download the data yourself, then set `source: json` (or \
               parquet) and `data_files: path/to/data.json`";
    let fetch = || -> Result<DataFiles> {
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(false)
            .build()?;
        let repo = api.dataset(repo_id.to_string());
        let get = |name: &String| -> Result<PathBuf> { Ok(repo.get(name)?) };
        let names = |files: &[PathBuf]| -> Vec<String> {
            files
                .iter()
                .map(|f| f.to_string_lossy().into_owned())
                .collect()
        };
        match data_files {
            Some(DataFiles::Train(files)) => Ok(DataFiles::Train(
                names(&files).iter().map(get).collect::<Result<_>>()?,
            )),
            Some(DataFiles::Splits(map)) => {
                let mut out = std::collections::BTreeMap::new();
                for (split, files) in map {
                    out.insert(split, names(&files).iter().map(get).collect::<Result<_>>()?);
                }
                Ok(DataFiles::Splits(out))
            }
            None => {
                let prefix = data_dir.map(|d| format!("{}/", d.trim_end_matches('/')));
                let wanted: Vec<String> = repo
                    .info()?
                    .siblings
                    .into_iter()
                    .map(|s| s.rfilename)
                    .filter(|f| looks_like_data(Path::new(f)))
                    .filter(|f| prefix.as_ref().is_none_or(|p| f.starts_with(p.as_str())))
                    .collect();
                if wanted.is_empty() {
                    bail!(
                        "the repo has no .json, .jsonl or .parquet data files{}",
                        match data_dir {
                            Some(d) => format!(" under {d}/"),
                            None => String::new(),
                        }
                    );
                }
                let mut files = Vec::with_capacity(wanted.len());
                for name in wanted {
                    let path = get(&name)?;
                    files.push((name, path));
                }
                Ok(files_by_split(files))
            }
        }
    };
    fetch().with_context(|| {
        format!("{component}: cannot download Hugging Face Hub dataset {repo_id:?}. {fix}")
    })
}

fn looks_like_data(p: &Path) -> bool {
    extension_is(p, &["json", "jsonl", "parquet"])
}

fn looks_like_json(p: &Path) -> bool {
    extension_is(p, &["json", "jsonl"])
}

fn extension_is(p: &Path, extensions: &[&str]) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| extensions.contains(&e.to_ascii_lowercase().as_str()))
}

/// The text of column `key` of `row` (renamed by `column_map`), with an error that names the
/// row, the columns it has, and the `column_map` fix. Missing or null optional columns are `None`.
pub fn text_column(
    row: &Row,
    key: &str,
    column_map: &std::collections::BTreeMap<String, String>,
    required: bool,
) -> Result<Option<String>> {
    let name = column_map.get(key).map_or(key, String::as_str);
    let hint = |what: &str| {
        let present: Vec<&str> = row.columns.keys().map(String::as_str).collect();
        anyhow!(
            "{}: {what} (columns in this row: {}); if your data names the {key} column differently, \
             set `column_map: {{{key}: <column>}}`",
            row.location(),
            if present.is_empty() { "none".to_string() } else { present.join(", ") }
        )
    };
    match row.columns.get(name) {
        None | Some(Value::Null) if !required => Ok(None),
        None => Err(hint(&format!("no `{name}` column"))),
        Some(Value::Null) => Err(hint(&format!("`{name}` is null"))),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v @ (Value::Number(_) | Value::Bool(_))) => Ok(Some(python_str(v))),
        Some(_) => Err(hint(&format!("`{name}` is not text"))),
    }
}

/// What Python's `str()` gives for a JSON scalar.
fn python_str(v: &Value) -> String {
    match v {
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        other => other.to_string(),
    }
}

/// Checks a `column_map` against the keys a builder knows.
pub fn check_column_map(
    component: &str,
    column_map: &std::collections::BTreeMap<String, String>,
    keys: &[&str],
) -> Result<()> {
    for key in column_map.keys() {
        if !keys.contains(&key.as_str()) {
            bail!(
                "{component}.column_map: unknown key `{key}`; its keys are {} (each mapped to a column name of your data)",
                keys.join(", ")
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names_follow_hugging_face() {
        for (name, split) in [
            (
                "data/train-00000-of-00001-a09b74b3ef9c3b56.parquet",
                Some("train"),
            ),
            ("test.json", Some("test")),
            ("validation/part0.jsonl", Some("validation")),
            ("data/dev.json", Some("validation")),
            ("data/rl/train-00001.parquet", Some("train")),
            ("alpaca_data_cleaned.json", None),
            ("trainer_notes.json", None),
        ] {
            assert_eq!(split_of(name), split, "{name}");
        }
        let files = |names: &[&str]| -> Vec<(String, PathBuf)> {
            names
                .iter()
                .map(|n| (n.to_string(), PathBuf::from(n)))
                .collect()
        };
        assert_eq!(
            files_by_split(files(&["a.json", "b.json"])),
            DataFiles::Train(vec!["a.json".into(), "b.json".into()])
        );
        let DataFiles::Splits(map) =
            files_by_split(files(&["train.json", "test.json", "README.json"]))
        else {
            panic!("named splits");
        };
        assert_eq!(map.keys().collect::<Vec<_>>(), ["test", "train"]);
    }
}
