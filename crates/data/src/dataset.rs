//! What every torchtune dataset builder shares: where the rows come from ([`RowSource`]:
//! `source`, `data_files`, `split`, `field`), whether to pack them (`packed`), and the per-row
//! conversion into a tokenized [`Sample`] that each builder (`alpaca_dataset`,
//! `instruct_dataset`, `chat_dataset`, `text_completion_dataset`) supplies.
//!
//! Sources are local files: `source: json` (JSON / JSON Lines), `source: text` (one row per
//! line, as Hugging Face's `text` loader) or `source: parquet` with `data_files`, or a path to
//! such a file or a folder of them. A Hugging Face dataset id downloads its JSON or Parquet files
//! through hf-hub; folders and Hub datasets take their files from their dataset card's config
//! (`name`, [`crate::dataset_card`]) when it declares configs, else their splits from the file names.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tune_core::Args;

use crate::dataset_card::{config_to_read, CardConfig};
use crate::json_source::{
    parse_split, read_csv_rows, read_parquet_rows, read_rows, read_text_rows,
    skipped_by_hugging_face, DataFiles, Row, TextSampleBy,
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
    /// `source: csv` with `data_files` (a header row names the columns).
    Csv(DataFiles),
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
        use rayon::prelude::*;
        // Rows tokenize independently: on every core, in order.
        self.rows
            .rows()?
            .par_iter()
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
        // Hugging Face's text builder keeps line breaks on request (lines only).
        let sample_by = match (sample_by, args.get_opt::<bool>("keep_linebreaks")?) {
            (TextSampleBy::Line, Some(true)) => TextSampleBy::LineKeepingBreaks,
            (by, _) => by,
        };
        let data_files = match args.raw("data_files").filter(|v| !v.is_null()) {
            Some(v) => {
                Some(DataFiles::from_config(v).with_context(|| format!("{component}.data_files"))?)
            }
            None => None,
        };
        // `name` picks a config of a dataset card; the packaged builders (`json`, ...) have none.
        let name = match is_packaged(&source) {
            false => args.get_opt::<String>("name")?,
            true => None,
        };
        let known: Vec<&str> = SOURCE_ARGS
            .iter()
            .chain(own)
            .chain(&["sample_by", "keep_linebreaks"])
            .chain(name.is_some().then_some(&"name"))
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
        let wanted_splits: Vec<String> = parse_split(&split)?
            .into_iter()
            .map(|slice| slice.name)
            .collect();
        let source = resolve_source(
            component,
            &source,
            data_files,
            sample_by,
            Folder {
                data_dir: data_dir.as_deref(),
                default_hub_data_dir: default_data_dir,
                name: name.as_deref(),
                wanted_splits: &wanted_splits,
            },
        )?;
        // As load_dataset, which passes these to the one builder that has them.
        if field.is_some()
            && matches!(
                source,
                Source::Text(..) | Source::Parquet(_) | Source::Csv(_)
            )
        {
            bail!(
                "{component}: `field` picks rows out of a JSON file; these data files are not JSON"
            );
        }
        for text_only in ["sample_by", "keep_linebreaks"] {
            if !args.is_null(text_only) && !matches!(source, Source::Text(..)) {
                bail!("{component}: `{text_only}` is for plain text (`source: text`); these data files are not text");
            }
        }
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
            | Source::Csv(files)
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
                    Source::Csv(_) => read_csv_rows(path),
                    Source::Files(_) if extension_is(path, &["parquet"]) => read_parquet_rows(path),
                    Source::Files(_) if extension_is(path, &["csv"]) => read_csv_rows(path),
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
            if slice.pct1_dropremainder && total < 100 {
                bail!(
                    "{}: split {:?}: pct1_dropremainder on a split of fewer than 100 rows ({total}) \
                     always selects none (Hugging Face refuses it too); drop the rounding",
                    self.component,
                    self.split
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

/// How to read a folder of data files (local, or a Hub dataset's).
struct Folder<'a> {
    /// The subfolder to read (`data_dir`), as given.
    data_dir: Option<&'a str>,
    /// The subfolder of a Hub dataset read when `data_dir` is not given (a preset's default).
    default_hub_data_dir: Option<&'a str>,
    /// The dataset card config to read (`name`), if one is named.
    name: Option<&'a str>,
    /// The splits the `split` argument reads (only their Hub files are downloaded).
    wanted_splits: &'a [String],
}

/// `json`, `text`, `parquet` and Hugging Face's other packaged builders.
pub(crate) fn is_packaged(source: &str) -> bool {
    matches!(
        source,
        "json" | "text" | "parquet" | "csv" | "arrow" | "pandas"
    )
}

/// The config of a local dataset folder's card (`README.md`) to read (see
/// [`crate::dataset_card::config_to_read`]).
fn local_card_config(
    folder: &Path,
    name: Option<&str>,
    files_chosen: bool,
) -> Result<Option<CardConfig>> {
    let readme = folder.join("README.md");
    let text = match std::fs::read_to_string(&readme) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", readme.display())),
    };
    config_to_read(&text, name, &folder.display().to_string(), files_chosen)
        .with_context(|| readme.display().to_string())
}

/// Named data files, read as text when every one is a `.txt` file and by extension otherwise.
fn files_source(component: &str, files: DataFiles, sample_by: TextSampleBy) -> Result<Source> {
    let is_text = |p: &Path| extension_is(p, &["txt", "text"]);
    if let Some(other) = files
        .all()
        .into_iter()
        .find(|f| !is_text(f) && !looks_like_data(f))
    {
        bail!(
            "{component}: {} is neither JSON, JSON Lines, Parquet, CSV nor text; convert it to JSON \
             Lines (or Parquet)",
            other.display()
        );
    }
    Ok(match files.all().iter().all(|f| is_text(f)) {
        true => Source::Text(files, sample_by),
        false => Source::Files(files),
    })
}

fn resolve_source(
    component: &str,
    source: &str,
    data_files: Option<DataFiles>,
    sample_by: TextSampleBy,
    folder: Folder<'_>,
) -> Result<Source> {
    let local = Path::new(source);
    let is_text = |p: &Path| extension_is(p, &["txt", "text"]);
    // A given data_dir is where relative data_files are, as in Hugging Face's load_dataset.
    let data_files = match (data_files, folder.data_dir) {
        (Some(files), Some(dir)) => Some(files.relative_to(Path::new(dir))),
        (files, _) => files,
    };
    let local_files = |files: DataFiles| {
        files
            .expand_patterns(None)
            .with_context(|| format!("{component}.data_files"))
    };
    match (source, data_files) {
        ("json", Some(files)) => Ok(Source::Json(local_files(files)?)),
        ("text", Some(files)) => Ok(Source::Text(local_files(files)?, sample_by)),
        ("parquet", Some(files)) => Ok(Source::Parquet(local_files(files)?)),
        ("csv", Some(files)) => Ok(Source::Csv(local_files(files)?)),
        ("json" | "text" | "parquet" | "csv", None) => {
            bail!("{component}: `source: {source}` needs `data_files` (a file, or a list of them)")
        }
        ("arrow" | "pandas", _) => bail!(
            "{component}: source {source:?} is not supported; convert the data to JSON and use \
             `source: json` with `data_files` (or `source: text` for plain text, `source: parquet` \
             for Parquet, `source: csv` for CSV)"
        ),
        (_, None) if local.is_file() && is_text(local) => Ok(Source::Text(
            DataFiles::Train(vec![local.to_path_buf()]),
            sample_by,
        )),
        (_, None) if local.is_file() && extension_is(local, &["parquet"]) => {
            Ok(Source::Parquet(DataFiles::Train(vec![local.to_path_buf()])))
        }
        (_, None) if local.is_file() && extension_is(local, &["csv"]) => {
            Ok(Source::Csv(DataFiles::Train(vec![local.to_path_buf()])))
        }
        (_, None) if local.is_file() && looks_like_json(local) => {
            Ok(Source::Json(DataFiles::Train(vec![local.to_path_buf()])))
        }
        // A folder is read as load_dataset reads it: a given data_dir by its file names, else
        // the card's config (`name`, or the default), else by file names.
        (_, None) if local.is_dir() => {
            let config = local_card_config(local, folder.name, folder.data_dir.is_some())
                .with_context(|| component.to_string())?;
            if let Some(files) = config.as_ref().and_then(CardConfig::data_files_from_root) {
                return files_source(component, local_files(files.relative_to(local))?, sample_by);
            }
            let dir = folder
                .data_dir
                .or(config.as_ref().and_then(|c| c.data_dir.as_deref()));
            let root = match dir {
                Some(dir) => local.join(dir),
                None => local.to_path_buf(),
            };
            let mut files: Vec<(String, PathBuf)> = Vec::new();
            for path in walk(&root)? {
                let name = path
                    .strip_prefix(&root)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .replace('\\', "/");
                if looks_like_data(&path) && !skipped_by_hugging_face(&name) {
                    files.push((name, path));
                }
            }
            files.sort();
            if files.is_empty() {
                bail!(
                    "{component}: folder {} has no .json, .jsonl, .parquet or .csv files",
                    root.display()
                );
            }
            Ok(Source::Files(
                files_by_split(files)
                    .one_builder_per_split()
                    .into_data_files(),
            ))
        }
        // Named files of a local dataset folder, relative to it (and to data_dir within it).
        (_, Some(files)) if local.is_dir() => {
            // A name must still be one of the card's configs.
            if folder.name.is_some() {
                local_card_config(local, folder.name, true)
                    .with_context(|| component.to_string())?;
            }
            files_source(component, local_files(files.relative_to(local))?, sample_by)
        }
        (_, files) => files_source(
            component,
            fetch_from_hub(component, source, files, &folder)?,
            sample_by,
        ),
    }
}

/// Every file under `dir`, depth first; linked folders are not followed.
fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            out.extend(walk(&entry.path())?);
        } else {
            out.push(entry.path());
        }
    }
    Ok(out)
}

/// The split keyword among `words` (the last one wins): `train`/`training`,
/// `validation`/`valid`/`val`/`dev`, `test`/`testing`/`eval`/`evaluation`. Words are delimited
/// by `-._ `, digits or `/`, as in Hugging Face's split patterns.
fn split_keyword<'a>(words: impl DoubleEndedIterator<Item = &'a str>) -> Option<&'static str> {
    words
        .flat_map(|part| {
            part.split(|c: char| matches!(c, '-' | '.' | '_' | ' ') || c.is_ascii_digit())
        })
        .rev()
        .find_map(|word| match word.to_ascii_lowercase().as_str() {
            "train" | "training" => Some("train"),
            "validation" | "valid" | "val" | "dev" => Some("validation"),
            "test" | "testing" | "eval" | "evaluation" => Some("test"),
            _ => None,
        })
}

/// The split a file's folders (relative to the dataset folder) put it in.
fn split_of_folders(name: &str) -> Option<&'static str> {
    let parts: Vec<&str> = name.split('/').collect();
    split_keyword(parts[..parts.len() - 1].iter().copied())
}

/// The split a file's own name puts it in.
fn split_of_file_name(name: &str) -> Option<&'static str> {
    split_keyword(name.rsplit('/').next().into_iter())
}

/// A sharded file's split as Hugging Face names it first: `data/{split}-00000-of-00001...`,
/// whatever the split is called (`train_sft`, `test_gen`, ...).
fn sharded_split_of(name: &str) -> Option<String> {
    let file = name.strip_prefix("data/")?;
    if file.contains('/') {
        return None;
    }
    let (split, rest) = file.split_once('-')?;
    let bytes = rest.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        bytes
            .get(range)
            .is_some_and(|b| b.iter().all(u8::is_ascii_digit))
    };
    (digits(0..5) && rest.get(5..9) == Some("-of-") && digits(9..14) && !split.is_empty())
        .then(|| split.to_string())
}

/// `(name in the dataset, file)` pairs as `data_files`, split as Hugging Face does: by the
/// sharded `data/{split}-NNNNN-of-NNNNN` names if any file has one, else by split keywords in
/// folder names if any file has one, else by keywords in file names (files without one are then
/// left out), else all `train`.
fn files_by_split<T>(files: Vec<(String, T)>) -> SplitFiles<T> {
    let by = |rule: &dyn Fn(&str) -> Option<String>| -> Vec<Option<String>> {
        files.iter().map(|(n, _)| rule(n)).collect()
    };
    let mut named = by(&sharded_split_of);
    if named.iter().all(Option::is_none) {
        named = by(&|n| split_of_folders(n).map(str::to_string));
    }
    if named.iter().all(Option::is_none) {
        named = by(&|n| split_of_file_name(n).map(str::to_string));
    }
    if named.iter().all(Option::is_none) {
        return SplitFiles::Train(files.into_iter().map(|(_, f)| f).collect());
    }
    let mut splits: std::collections::BTreeMap<String, Vec<T>> = Default::default();
    for ((_, file), split) in files.into_iter().zip(named) {
        if let Some(split) = split {
            splits.entry(split).or_default().push(file);
        }
    }
    SplitFiles::Splits(splits)
}

/// [`DataFiles`] over any kind of file handle (names before download, paths after).
enum SplitFiles<T> {
    Train(Vec<T>),
    Splits(std::collections::BTreeMap<String, Vec<T>>),
}

impl<T: AsRef<Path>> SplitFiles<T> {
    /// Each split's files narrowed to one builder's, as Hugging Face reads them ([`one_builder`]).
    fn one_builder_per_split(self) -> Self {
        match self {
            SplitFiles::Train(files) => SplitFiles::Train(one_builder(files)),
            SplitFiles::Splits(splits) => SplitFiles::Splits(
                splits
                    .into_iter()
                    .map(|(split, files)| (split, one_builder(files)))
                    .collect(),
            ),
        }
    }
}

impl SplitFiles<PathBuf> {
    fn into_data_files(self) -> DataFiles {
        match self {
            SplitFiles::Train(files) => DataFiles::Train(files),
            SplitFiles::Splits(map) => DataFiles::Splits(map),
        }
    }
}

/// Downloads a Hugging Face Hub dataset's data files (JSON, JSON Lines or Parquet: those named
/// in `data_files`, else those of the wanted splits under `data_dir`) into the Hugging Face
/// cache, with hf-hub.
fn fetch_from_hub(
    component: &str,
    repo_id: &str,
    data_files: Option<DataFiles>,
    folder: &Folder<'_>,
) -> Result<DataFiles> {
    let offline_fix =
        "Without network access, download the data yourself, then set `source: json` \
                       (or parquet) and `data_files: path/to/data.json`";
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .with_context(|| {
            format!("{component}: cannot reach the Hugging Face Hub. {offline_fix}")
        })?;
    let repo = api.dataset(repo_id.to_string());
    let get = |name: &str| -> Result<PathBuf> {
        repo.get(name).with_context(|| {
            format!("{component}: cannot download {name} of Hugging Face Hub dataset {repo_id:?}. {offline_fix}")
        })
    };
    let listing = || -> Result<Vec<String>> {
        let info = repo.info().with_context(|| {
            format!("{component}: cannot list Hugging Face Hub dataset {repo_id:?}. {offline_fix}")
        })?;
        Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
    };
    // Patterns are matched against the repository's file names.
    let data_files = match data_files {
        Some(files)
            if files
                .all()
                .iter()
                .any(|f| f.to_string_lossy().contains(['*', '?', '['])) =>
        {
            Some(
                files
                    .expand_patterns(Some(&listing()?))
                    .with_context(|| format!("{component}.data_files of {repo_id:?}"))?,
            )
        }
        files => files,
    };
    let download = |files: DataFiles| {
        files.try_map(|names| {
            names
                .iter()
                .map(|name| get(&name.to_string_lossy()))
                .collect()
        })
    };
    // The card's config to read: `name`'s, else the default, unless a data_dir or data_files
    // says which files to read (a name must still be one of its configs).
    let card_config = |listing: &[String], files_chosen: bool| -> Result<Option<CardConfig>> {
        let text = match listing.iter().any(|f| f == "README.md") {
            true => {
                let readme = get("README.md")?;
                std::fs::read_to_string(&readme)
                    .with_context(|| format!("cannot read {}", readme.display()))?
            }
            false => String::new(),
        };
        config_to_read(&text, folder.name, repo_id, files_chosen).with_context(|| {
            format!("{component}: README.md of Hugging Face Hub dataset {repo_id:?}")
        })
    };
    if let Some(files) = data_files {
        if folder.name.is_some() {
            card_config(&listing()?, true)?;
        }
        return download(files);
    }
    let listing = listing()?;
    let files_chosen = folder.data_dir.is_some() || folder.default_hub_data_dir.is_some();
    let config = card_config(&listing, files_chosen)?;
    let config = config.as_ref();
    // Only the wanted splits' files are downloaded.
    if let Some((name, files)) = config.and_then(|c| Some((&c.name, c.data_files_from_root()?))) {
        let files = files
            .expand_patterns(Some(&listing))
            .with_context(|| format!("{component}: config {name:?} of {repo_id:?}"))?;
        return download(files.only_splits(folder.wanted_splits));
    }
    let dir = folder
        .data_dir
        .or(folder.default_hub_data_dir)
        .or(config.and_then(|c| c.data_dir.as_deref()));
    let prefix = dir.map(|d| format!("{}/", d.trim_end_matches('/')));
    // Names relative to data_dir, as Hugging Face matches its split patterns.
    let files: Vec<(String, PathBuf)> = listing
        .into_iter()
        .filter(|f| looks_like_data(Path::new(f)))
        .filter_map(|f| {
            let relative = match &prefix {
                Some(p) => f.strip_prefix(p.as_str())?.to_string(),
                None => f.clone(),
            };
            (!skipped_by_hugging_face(&relative)).then_some((relative, PathBuf::from(f)))
        })
        .collect();
    if files.is_empty() {
        bail!(
            "{component}: Hugging Face Hub dataset {repo_id:?} has no .json, .jsonl, .parquet \
             or .csv data files{}",
            dir.map(|d| format!(" under {d}/")).unwrap_or_default()
        );
    }
    download(
        files_by_split(files)
            .one_builder_per_split()
            .into_data_files()
            .only_splits(folder.wanted_splits),
    )
}

/// Hugging Face reads a split's files with one builder: that of their most common data-file
/// extension (a draw goes to .parquet, then .jsonl, .json, .csv), over that builder's files
/// only. (It also wants the same builder for every split; tune-rs reads each with its own.)
fn one_builder<T: AsRef<Path>>(files: Vec<T>) -> Vec<T> {
    const PREFERENCE: [&str; 4] = ["parquet", "jsonl", "json", "csv"];
    let count = |extension: &str| {
        files
            .iter()
            .filter(|p| extension_is(p.as_ref(), &[extension]))
            .count()
    };
    let Some((_, best)) = PREFERENCE
        .iter()
        .enumerate()
        .max_by_key(|(rank, e)| (count(e), std::cmp::Reverse(*rank)))
    else {
        return files;
    };
    let builder: &[&str] = match *best {
        "jsonl" | "json" => &["json", "jsonl"],
        "parquet" => &["parquet"],
        _ => &["csv"],
    };
    files
        .into_iter()
        .filter(|p| extension_is(p.as_ref(), builder))
        .collect()
}

fn looks_like_data(p: &Path) -> bool {
    extension_is(p, &["json", "jsonl", "parquet", "csv"])
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
        let split_of = |name: &str| split_of_folders(name).or_else(|| split_of_file_name(name));
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
            ("alpaca_train.json", Some("train")),
            ("alpaca_test.json", Some("test")),
            ("data.train.json", Some("train")),
            ("train/part_test.json", Some("train")),
            ("my_val-2/part.json", Some("validation")),
            ("latest.json", None),
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
            files_by_split(files(&["a.json", "b.json"])).into_data_files(),
            DataFiles::Train(vec!["a.json".into(), "b.json".into()])
        );
        let splits = |names: &[&str]| match files_by_split(files(names)).into_data_files() {
            DataFiles::Splits(map) => map
                .into_iter()
                .map(|(k, v)| (k, v.len()))
                .collect::<Vec<_>>(),
            DataFiles::Train(v) => vec![("<all train>".to_string(), v.len())],
        };
        assert_eq!(
            splits(&["train.json", "my_test.json", "README.json"]),
            [("test".to_string(), 1), ("train".to_string(), 1)]
        );
        // Once any folder names a split, folders decide for every file.
        assert_eq!(
            splits(&[
                "train/a_test.json",
                "train/b.json",
                "test/c.json",
                "extra_test.json"
            ]),
            [("test".to_string(), 1), ("train".to_string(), 2)]
        );
        // Sharded names keep their own split names.
        assert_eq!(
            splits(&[
                "data/train_sft-00000-of-00003.parquet",
                "data/train_sft-00001-of-00003.parquet",
                "data/test_gen-00000-of-00001.parquet",
            ]),
            [("test_gen".to_string(), 1), ("train_sft".to_string(), 2)]
        );
        assert!(skipped_by_hugging_face(
            ".ipynb_checkpoints/train-checkpoint.json"
        ));
        assert!(skipped_by_hugging_face("dataset_infos.json"));
        assert!(skipped_by_hugging_face("data/config.json"));
        assert!(!skipped_by_hugging_face("state.json"));
        assert!(!skipped_by_hugging_face("data/train.json"));
    }
}
